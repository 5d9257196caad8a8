"""Models trained elsewhere: diffusers and k-diffusion adapters, with no download.

A tiny ``UNet2DModel`` built from a config stands in for a checkpoint: the tests check the
adapter against diffusers' own arithmetic (alphas_cumprod, ``DDPMScheduler.step``) and against
the Gaussian oracle, never against stored numbers.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sdelab.interop import DiscreteVPSchedule, from_diffusers, from_k_diffusion, load_diffusers
from sdelab.likelihood import log_likelihood
from sdelab.likelihood.bpd import ODE, Levels, bits_per_dim
from sdelab.likelihood.options import Hutchinson
from sdelab.oracle import GaussianData
from sdelab.samplers import sample

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    ScoreSdeVeScheduler,
    UNet2DModel,
)

D64 = torch.float64
N_STEPS = 50  # a short chain keeps the tests fast; its betas reach ᾱ_T ≈ 0.006


def tiny_unet(seed: int = 0, out_channels: int = 2, **overrides) -> UNet2DModel:
    torch.manual_seed(seed)
    cfg = dict(
        sample_size=8,
        in_channels=2,
        out_channels=out_channels,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
    )
    cfg.update(overrides)
    return UNet2DModel(**cfg).eval()


def ddpm(**overrides) -> DDPMScheduler:
    cfg = dict(num_train_timesteps=N_STEPS, beta_start=1e-3, beta_end=0.2, clip_sample=False)
    cfg.update(overrides)
    return DDPMScheduler(**cfg)


# ---- the schedule -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "scheduler",
    [
        DDPMScheduler(beta_schedule="linear"),
        DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        DDIMScheduler(trained_betas=torch.linspace(1e-3, 0.05, 200).tolist()),
    ],
    ids=["linear", "scaled_linear", "squaredcos_cap_v2", "trained_betas"],
)
@pytest.mark.parametrize("interpolation", ["pchip", "linear"])
def test_schedule_matches_alphas_cumprod_at_every_step(scheduler, interpolation):
    schedule = DiscreteVPSchedule(scheduler.alphas_cumprod, interpolation=interpolation)
    n = torch.arange(len(scheduler.alphas_cumprod))
    alpha, sigma = schedule.alpha_sigma(schedule.step_times(n))
    assert (alpha**2 - scheduler.alphas_cumprod.to(D64)).abs().max() <= 1e-6
    assert (alpha**2 + sigma**2 - 1).abs().max() <= 1e-12
    # the chain between adjacent steps is DDPM's: α_{t|s}² = 1 − β
    a, G = schedule.transition(schedule.step_times(n[:-1]), schedule.step_times(n[1:]))
    assert torch.allclose(a**2, 1 - scheduler.betas[1:].to(D64), atol=1e-6)
    assert torch.allclose(a**2 + G**2, torch.ones_like(a), atol=1e-12)


def test_schedule_is_a_consistent_sde():
    """Between the knots: dλ/dt matches finite differences, λ decreases, g²/σ² = −dλ/dt, and
    t(λ(t)) = t."""
    schedule = DiscreteVPSchedule(DDPMScheduler().alphas_cumprod)
    t = torch.linspace(0.0, 1.0, 3001, dtype=D64)[1:-1]
    out = schedule(t)
    h = 1e-7
    fd = (schedule.log_snr(t + h) - schedule.log_snr(t - h)) / (2 * h)
    assert torch.allclose(out.d_log_snr, fd, rtol=1e-5)
    assert bool((out.d_log_snr < 0).all()) and bool((out.log_snr[1:] < out.log_snr[:-1]).all())
    assert torch.allclose(out.g2 / out.sigma**2, -out.d_log_snr, rtol=1e-10)
    assert torch.allclose(schedule.t_of_log_snr(out.log_snr), t, atol=1e-9)


def test_schedule_refuses_zero_terminal_snr_and_flat_steps():
    with pytest.raises(ValueError, match="zero terminal SNR"):
        DiscreteVPSchedule(DDPMScheduler(rescale_betas_zero_snr=True).alphas_cumprod)
    with pytest.raises(ValueError, match="strictly decreasing"):
        DiscreteVPSchedule(torch.tensor([0.9, 0.9, 0.5]))


# ---- the score function -------------------------------------------------------------------------
def test_ancestral_sampler_reproduces_ddpm_step_chain():
    """sdelab's ancestral sampler on the integer-step grid + the final denoising step is
    DDPMScheduler.step's chain under the same noise, for all steps and for 10 leading steps."""
    unet, scheduler = tiny_unet(), ddpm()
    score_fn, schedule = from_diffusers(unet, scheduler)
    x_T = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    for steps in (N_STEPS, 10):
        scheduler.set_timesteps(steps)
        x, gen = x_T.clone(), torch.Generator().manual_seed(7)
        with torch.no_grad():
            for n in scheduler.timesteps:
                x = scheduler.step(unet(x, n).sample, n, x, generator=gen).prev_sample
        res = sample(
            score_fn,
            schedule,
            None,
            sampler="ancestral",
            grid=schedule.step_times(scheduler.timesteps),
            x_init=x_T,
            generator=torch.Generator().manual_seed(7),
            denoise=True,
        )
        assert res.nfe == steps
        scale = float(x.abs().max())
        assert (res.samples - x).abs().max() <= 1e-5 * scale
        if steps == N_STEPS:  # the default uniform grid with N − 1 steps is the same chain
            uniform = sample(
                score_fn,
                schedule,
                None,
                sampler="ancestral",
                steps=N_STEPS - 1,
                x_init=x_T,
                generator=torch.Generator().manual_seed(7),
                denoise=True,
            )
            assert (uniform.samples - x).abs().max() <= 1e-5 * scale


class _Reparametrised(nn.Module):
    """An epsilon UNet rewritten to predict x_0 or v with diffusers' own formulas at integer
    steps: three parametrisations of one model."""

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, kind: str) -> None:
        super().__init__()
        self.unet, self.ac, self.kind = unet, alphas_cumprod, kind
        self.config = unet.config

    def forward(self, x, timestep):
        eps = self.unet(x, timestep).sample
        a = self.ac[timestep.round().long()].reshape(-1, 1, 1, 1)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()  # DDPMScheduler.step's pred_original_sample
        out = x0 if self.kind == "sample" else a.sqrt() * eps - (1 - a).sqrt() * x0
        return SimpleNamespace(sample=out)


def test_epsilon_sample_and_v_prediction_give_the_same_score():
    unet, scheduler = tiny_unet(), ddpm()
    x = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    scores = {}
    for kind in ("epsilon", "sample", "v_prediction"):
        net = unet if kind == "epsilon" else _Reparametrised(unet, scheduler.alphas_cumprod, kind)
        score_fn, schedule = from_diffusers(net, ddpm(prediction_type=kind))
        t = schedule.step_times(torch.tensor([0, 7, 25, 49]))
        with torch.no_grad():
            scores[kind] = score_fn(x, t.float())
    ref = scores["epsilon"]
    for kind in ("sample", "v_prediction"):
        assert torch.allclose(scores[kind], ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))


def test_learned_variance_channels_are_dropped():
    unet, scheduler = tiny_unet(out_channels=4), ddpm(variance_type="learned_range")
    score_fn, schedule = from_diffusers(unet, scheduler)
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        eps = unet(x, t * (N_STEPS - 1)).sample[:, :2]
        expected = -eps / schedule.alpha_sigma(t)[1].reshape(-1, 1, 1, 1)
        assert torch.allclose(score_fn(x, t), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="3 channels"):
        from_diffusers(tiny_unet(out_channels=3), scheduler)


def test_integer_only_time_embedding_is_refused_or_snapped():
    unet = tiny_unet(time_embedding_type="learned", num_train_timesteps=N_STEPS)
    with pytest.raises(ValueError, match="snap_to_steps=True"):
        from_diffusers(unet, ddpm())
    score_fn, schedule = from_diffusers(unet, ddpm(), snap_to_steps=True)
    x = torch.randn(2, 2, 8, 8)
    n = torch.tensor([3, 40])
    with torch.no_grad():
        expected = -unet(x, n).sample / schedule.alpha_sigma(schedule.step_times(n))[1].reshape(
            -1, 1, 1, 1
        )
        got = score_fn(x, schedule.step_times(n).float())  # exact at integer steps
    assert torch.allclose(got, expected.float(), rtol=1e-5, atol=1e-5)


def test_unsupported_scheduler_and_prediction_type_are_refused():
    for other in (diffusers.EDMEulerScheduler(), diffusers.FlowMatchEulerDiscreteScheduler()):
        with pytest.raises(ValueError, match="unsupported scheduler"):
            from_diffusers(tiny_unet(), other)
    with pytest.raises(ValueError, match="prediction_type"):
        scheduler = ddpm()
        scheduler.register_to_config(prediction_type="flow")
        from_diffusers(tiny_unet(), scheduler)


# ---- loading from disk ----------------------------------------------------------------------
def test_load_pipeline_folder_and_bare_unet_folder(tmp_path):
    unet, scheduler = tiny_unet(), ddpm(prediction_type="v_prediction")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    unet.save_pretrained(tmp_path / "bare")
    scheduler.save_pretrained(tmp_path / "bare")  # scheduler_config.json beside config.json
    score_fn, _ = from_diffusers(unet, scheduler)
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([0.1, 0.9])
    with torch.no_grad():
        ref = score_fn(x, t)
    for folder in ("pipe", "bare"):
        model = load_diffusers(tmp_path / folder)
        assert model.image_shape == (2, 8, 8) and model.channels == 2
        assert model.data_range == (-1.0, 1.0) and (model.scale, model.shift) == (2.0, -1.0)
        assert model.kind == "vp" and model.prediction_type == "v_prediction"
        assert model.num_train_timesteps == N_STEPS
        with torch.no_grad():
            assert torch.allclose(model.score_fn(x, t), ref, atol=1e-6)
    # a scheduler given explicitly as a JSON file overrides the folder's
    other = tmp_path / "other.json"
    other.write_text((tmp_path / "pipe" / "scheduler" / "scheduler_config.json").read_text())
    assert load_diffusers(tmp_path / "bare", scheduler=other).prediction_type == "v_prediction"


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        load_diffusers(tmp_path / "missing")
    with pytest.raises(ValueError, match="no UNet config"):
        load_diffusers(tmp_path)
    tiny_unet().save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="no scheduler config"):
        load_diffusers(tmp_path / "bare")


# ---- likelihood -----------------------------------------------------------------------------
def test_ode_bits_per_dim_is_finite_reproducible_and_equals_hand_wrapping(tmp_path):
    unet, scheduler = tiny_unet(), ddpm()
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path)
    model = load_diffusers(tmp_path)
    schedule = model.schedule
    k = torch.randint(0, 256, (3, 2, 8, 8), generator=torch.Generator().manual_seed(0))

    def by_hand(x, t):  # −ε̂/σ_t with the network's timestep t·(N − 1)
        sigma = schedule.alpha_sigma(t)[1].reshape(-1, 1, 1, 1)
        return -unet(x, t * (N_STEPS - 1)).sample / sigma

    def bpd(score_fn):
        with torch.no_grad():
            return bits_per_dim(
                score_fn,
                k,
                Levels(256, model.scale, model.shift),
                schedule=schedule,
                estimator=ODE(tol=1e-3, divergence=Hutchinson()),
                generator=torch.Generator().manual_seed(3),
            )

    first, again, hand = bpd(model.score_fn), bpd(model.score_fn), bpd(by_hand)
    assert bool(torch.isfinite(first.bpd).all()) and bool((first.bpd > 0).all())
    assert first.nfe > 0
    assert torch.equal(first.bpd, again.bpd)
    assert torch.allclose(first.bpd, hand.bpd, atol=1e-4)


# ---- VE ------------------------------------------------------------------------------------
def test_score_sde_ve_model():
    unet = tiny_unet(time_embedding_type="fourier", block_out_channels=(8, 16))
    scheduler = ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=50.0, sampling_eps=1e-5)
    score_fn, schedule = from_diffusers(unet, scheduler)
    scheduler.set_sigmas(20)
    sigma = schedule.alpha_sigma(scheduler.timesteps.to(D64))[1]
    assert torch.allclose(sigma, scheduler.sigmas.to(D64), rtol=1e-5)
    assert schedule.prior_std == pytest.approx(50.0) and schedule.t_min == 1e-5
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([0.2, 0.7])
    with torch.no_grad():  # the pipeline's call: unet(x, σ_t).sample is the score
        expected = unet(x, schedule.alpha_sigma(t)[1]).sample
        assert torch.allclose(score_fn(x, t), expected, atol=1e-6)
    with pytest.raises(ValueError, match="learned"):
        from_diffusers(tiny_unet(time_embedding_type="learned", num_train_timesteps=10), scheduler)


# ---- k-diffusion ----------------------------------------------------------------------------
def gaussian_denoiser(data: GaussianData):
    """The exact D(x, σ) = E[x_0 | x_0 + σ ε = x] = μ + Σ (Σ + σ² I)⁻¹ (x − μ) of Gaussian data."""

    def denoise(x, sigma):
        rot = (x - data.mean) @ data.evecs
        shrink = data.evals / (data.evals + sigma[:, None] ** 2)
        return data.mean + (rot * shrink) @ data.evecs.T

    return denoise


def test_k_diffusion_adapter_gives_the_exact_score_and_likelihood():
    cov = torch.tensor([[1.0, 0.6, 0.0], [0.6, 1.5, 0.2], [0.0, 0.2, 0.5]], dtype=D64)
    data = GaussianData(torch.tensor([0.5, -1.0, 2.0], dtype=D64), cov)
    score_fn, schedule = from_k_diffusion(gaussian_denoiser(data), 0.02, 80.0)
    assert schedule.alpha_sigma(torch.tensor([0.0, 1.0], dtype=D64))[1].tolist() == pytest.approx(
        [0.02, 80.0]
    )
    x = data.sample(16, generator=torch.Generator().manual_seed(0))
    t = torch.rand(16, generator=torch.Generator().manual_seed(1), dtype=D64)
    assert torch.allclose(score_fn(x, t), data.score(x, t, schedule), rtol=1e-10, atol=1e-10)
    # ODE likelihood of the adapter = the exact density of p_{t_min} = N(μ, Σ + σ_min² I)
    # the flow of the adapter's score carries p_{t_min} to p_T exactly: log p_{t_min}(x) =
    # log p_T(z) + ∫∇·v (the prior π differs from p_T by ~0.05 nats at σ_max = 80, so use p_T)
    res = log_likelihood(score_fn, schedule, x, tol=1e-7)
    flow = data.marginal_log_prob(res.z, schedule.T, schedule) + res.delta_logp
    exact = data.marginal_log_prob(x, schedule.t_min, schedule)
    assert torch.allclose(flow, exact, atol=1e-5)


def test_k_diffusion_adapter_validates_its_arguments():
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        from_k_diffusion(lambda x, s: x, 1.0, 0.5)
    with pytest.raises(ValueError, match="callable"):
        from_k_diffusion(None, 0.1, 1.0)
    assert math.isfinite(from_k_diffusion(lambda x, s: x, 0.1, 1.0)[1].prior_std)


# ---- the discrete schedule under every sampler and the ODE likelihood (Gaussian oracle) -----
GAUSS = GaussianData(torch.tensor([1.0, -0.5]), torch.tensor([[0.5, 0.2], [0.2, 0.3]]))


@pytest.mark.parametrize(
    ("sampler", "options"),
    [
        ("euler_maruyama", {}),
        ("reverse_diffusion", {}),
        ("ancestral", {}),
        ("pc", {}),
        ("lambda", {"lam": 0.5}),
        ("ode", {"method": "rk4"}),
        ("dpm_solver", {}),
    ],
)
def test_every_sampler_runs_on_a_ddpm_schedule(sampler, options):
    """The exact score of Gaussian data on the discrete chain's schedule: every sampler's
    samples have the data's mean and covariance (plus σ_0² I at step 0) within 4 SE."""
    # 200 steps to β = 0.1: ᾱ_T = 5e-5, so the prior N(0, I) is p_T to 0.01 in the mean
    schedule = DiscreteVPSchedule(
        DDPMScheduler(num_train_timesteps=200, beta_end=0.1).alphas_cumprod
    )
    n = 4000
    res = sample(
        GAUSS.score_fn(schedule),
        schedule,
        (n, 2),
        sampler=sampler,
        steps=199,
        generator=0,
        **options,
    )
    x = res.samples
    mean, cov = GAUSS.marginal(schedule, 0.0)
    se = (torch.diagonal(cov) / n).sqrt()
    assert bool(((x.mean(0) - mean).abs() <= 4 * se + 0.02).all()), x.mean(0)
    emp = torch.cov(x.T)
    assert torch.allclose(emp, cov, atol=0.05 * float(cov.abs().max()) + 4 * float(se.max()))


def test_ode_likelihood_on_a_ddpm_schedule_is_exact():
    schedule = DiscreteVPSchedule(DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod)
    data = GaussianData(GAUSS.mean.double(), GAUSS.cov.double())
    x = data.sample(8, generator=torch.Generator().manual_seed(0))
    # the interpolated schedule has a kink at every one of its 1000 steps: a tight tolerance
    # costs thousands of steps, so check the per-example contract at tol = 1e-4 nats
    tol = 1e-4
    with torch.no_grad():
        res = log_likelihood(data.score_fn(schedule), schedule, x, tol=tol)
    flow = data.marginal_log_prob(res.z, schedule.T, schedule) + res.delta_logp
    err = (flow - data.marginal_log_prob(x, 0.0, schedule)).abs()
    assert float(err.max()) < 3 * tol and bool((res.error >= err).all())


def test_exact_divergence_works_through_a_diffusers_unet():
    """The batched (vmap) backward fails inside UNet2DModel; the exact trace falls back to one
    VJP per direction and still equals the trace of the Jacobian."""
    from sdelab.likelihood.divergence import _Divergence

    unet, scheduler = tiny_unet(in_channels=1, out_channels=1), ddpm()
    score_fn, schedule = from_diffusers(unet, scheduler)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.6])

    def velocity(x):
        return schedule.probability_flow(x, t, score_fn(x, t))

    xg = x.clone().requires_grad_(True)
    div = _Divergence.make(x, "exact", 1, "rademacher", None)(velocity(xg), xg, False)
    for b in range(2):
        jac = torch.autograd.functional.jacobian(
            lambda xb, b=b: velocity(xb[None].expand(2, -1, -1, -1))[b], x[b]
        )
        assert torch.allclose(div[b], jac.reshape(64, 64).trace(), rtol=1e-4, atol=1e-3)


def test_bounds_on_a_ddpm_schedule_bound_the_data_nll():
    """ELBO and ScoreFlow bound with the exact score on the discrete chain's schedule: averaged
    over three seeds, both sit at the data's NLL (decoder and prior gaps are ~1e-3 here)."""
    from sdelab.likelihood import elbo, scoreflow_bound

    schedule = DiscreteVPSchedule(
        DDPMScheduler(num_train_timesteps=200, beta_end=0.1).alphas_cumprod
    )
    data = GaussianData(GAUSS.mean.double(), GAUSS.cov.double())
    x = data.sample(1000, generator=torch.Generator().manual_seed(0))
    nll = float(-data.log_prob(x).mean())
    for bound in (elbo, scoreflow_bound):
        means = [
            float(
                bound(
                    data.score_fn(schedule),
                    schedule,
                    x,
                    n_samples=32,
                    generator=torch.Generator().manual_seed(seed),
                ).nll_bound.mean()
            )
            for seed in (1, 2, 3)
        ]
        assert abs(sum(means) / 3 - nll) < 0.1, (bound.__name__, means, nll)


def test_ddpm_compatible_schedulers_share_the_chain(tmp_path):
    """A pipeline saved with another sampler of the same β chain (here Euler) loads as the
    same model: same schedule, same score."""
    unet, scheduler = tiny_unet(), ddpm(prediction_type="v_prediction")
    euler = diffusers.EulerDiscreteScheduler.from_config(scheduler.config)
    unet.save_pretrained(tmp_path)
    euler.save_pretrained(tmp_path)
    model = load_diffusers(tmp_path)
    assert type(model.scheduler).__name__ == "EulerDiscreteScheduler"
    ref_fn, ref_schedule = from_diffusers(unet, scheduler)
    t = torch.linspace(0, 1, 101, dtype=D64)
    assert torch.allclose(model.schedule.log_snr(t), ref_schedule.log_snr(t), atol=1e-6)
    x, tt = torch.randn(2, 2, 8, 8), torch.tensor([0.2, 0.7])
    with torch.no_grad():
        assert torch.allclose(model.score_fn(x, tt), ref_fn(x, tt), atol=1e-5)
