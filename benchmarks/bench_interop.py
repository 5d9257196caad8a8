"""Benchmark: a diffusers model trained elsewhere, evaluated and sampled by sdelab.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_interop.py      (prints markdown)

Table 1 — the interpolation of a discrete chain's ᾱ_n between integer steps (no network):
built from the even steps of diffusers' 1000-step schedules and compared at the odd ones
(half-resolution test), max|Δᾱ| and max|Δλ|; and a linear-β VP fitted by least squares to
−log ᾱ_n, whose error is at the integer steps themselves.

Table 2 — a tiny ``UNet2DModel`` (diffusers' own class and DDPM recipe: ε-prediction, 1000
linear-β steps, uniform integer t) trained on the 8×8 digits for ``--steps`` steps, saved with
``save_pretrained``, read back with ``sdelab.interop.load_diffusers``, then: ODE bits/dim on
test digits (uniform dequantization over 17 levels, ``ODE(tol=1e-3, divergence=Hutchinson(),
integrator=Augmented())``: 1 Rademacher probe, the augmented dopri5 solve with its
two-tolerance check to 1e-3 nats per image) with each schedule choice, the snapped network
(round t·(N − 1), the price of an integer-only time embedding), and Score-SDE's protocol (a
fitted linear-β VP, t_min = 1e-5);
sampling time and NFE: diffusers' own DDPMScheduler loop vs sdelab's ancestral sampler (the
same chain) and DPM-Solver++(2M).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
import time

import numpy as np
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from scipy.interpolate import PchipInterpolator

from sdelab.data.images import load_digits
from sdelab.interop import DiffusersUNet, from_diffusers, load_diffusers
from sdelab.likelihood.bpd import ODE, Levels, bits_per_dim
from sdelab.likelihood.options import Augmented, Hutchinson
from sdelab.parametrization import ScoreModel
from sdelab.samplers import sample
from sdelab.sde import VPSchedule


def interpolation_table() -> None:
    print("| beta_schedule | choice | max abs Δᾱ | max abs Δλ |")
    print("|---|---|---:|---:|")
    cases = {
        "linear": {},
        "scaled_linear": dict(beta_start=0.00085, beta_end=0.012),
        "squaredcos_cap_v2": {},
    }
    for name, kw in cases.items():
        ac = DDPMScheduler(beta_schedule=name, **kw).alphas_cumprod.double().numpy()
        n = len(ac)
        t = np.arange(n) / (n - 1)
        lam, B = np.log(ac) - np.log1p(-ac), -np.log(ac)
        ev, od = np.arange(0, n, 2), np.arange(1, n - 1, 2)

        def errs(pred_lam, ac=ac, lam=lam, truth=od):
            a = 1 / (1 + np.exp(-pred_lam))
            return np.abs(a - ac[truth]).max(), np.abs(pred_lam - lam[truth]).max()

        def from_B(b):
            return -np.log(np.expm1(b))

        rows = {
            "PCHIP in log ᾱ (sdelab default)": errs(from_B(PchipInterpolator(t[ev], B[ev])(t[od]))),
            "linear in log ᾱ (β constant per step)": errs(from_B(np.interp(t[od], t[ev], B[ev]))),
            "PCHIP in log-SNR": errs(PchipInterpolator(t[ev], lam[ev])(t[od])),
            "linear in log-SNR": errs(np.interp(t[od], t[ev], lam[ev])),
        }
        design = np.stack([t - 0.5 * t**2, 0.5 * t**2], 1)  # B = β_min t + ½(β_max − β_min) t²
        (b_min, b_max), *_ = np.linalg.lstsq(design, B, rcond=None)
        fit_B = b_min * t + 0.5 * (b_max - b_min) * t**2
        fit_a = np.abs(np.exp(-fit_B) - ac).max()
        with np.errstate(invalid="ignore", divide="ignore"):  # fitted B(0) = 0: λ = ∞
            fit_l = np.abs(from_B(fit_B) - lam).max()
        rows[f"fitted linear-β VP ({b_min:.3g}, {b_max:.3g}), at the steps"] = (fit_a, fit_l)
        for choice, (da, dl) in rows.items():
            dl_text = f"{dl:.1e}" if np.isfinite(dl) else "inf (fitted B ≤ 0 near t = 0)"
            print(f"| {name} | {choice} | {da:.1e} | {dl_text} |")


def tiny_unet() -> UNet2DModel:
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    )


def train(steps: int, seed: int) -> tuple[UNet2DModel, DDPMScheduler, float]:
    """diffusers' DDPM recipe: ε-MSE at uniform integer t, on digits scaled to [−1, 1]."""
    torch.manual_seed(seed)
    levels = load_digits(split="train").levels.float()
    data = 2 * (levels + 0.5) / 17 - 1  # bin centres in [−1, 1]
    unet, scheduler = tiny_unet(), DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    start = time.process_time()
    for _ in range(steps):
        x0 = data[torch.randint(0, len(data), (128,), generator=gen)]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (128,), generator=gen)
        loss = (unet(scheduler.add_noise(x0, noise, t), t).sample - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unet.eval(), scheduler, time.process_time() - start


class _FittedVP(VPSchedule):
    """Score-SDE's protocol for discrete DDPM models: a linear-β VP, network input t·(N − 1)."""

    def net_time(self, t):
        return torch.as_tensor(t) * 999


def bpd_rows(model, k: torch.Tensor, seed: int) -> None:
    unet, scheduler = model.unet, model.scheduler
    ac = scheduler.alphas_cumprod.double().numpy()
    t = np.arange(1000) / 999
    design = np.stack([t - 0.5 * t**2, 0.5 * t**2], 1)
    (b_min, b_max), *_ = np.linalg.lstsq(design, -np.log(ac), rcond=None)
    fitted = _FittedVP(float(b_min), float(b_max), t_min=1e-5)
    variants = {
        "PCHIP log ᾱ (default), t_min = 0 (σ = 0.01)": (model.score_fn, model.schedule),
        "linear log ᾱ, t_min = 0": from_diffusers(unet, scheduler, interpolation="linear"),
        "PCHIP, network snapped to steps": from_diffusers(unet, scheduler, snap_to_steps=True),
        f"fitted linear-β VP ({b_min:.3g}, {b_max:.3g}), t_min = 1e-5 (Score-SDE)": (
            ScoreModel(DiffusersUNet(unet), fitted, parametrization="eps"),
            fitted,
        ),
    }
    print("| variant | ODE bpd (uniform deq.) | NFE per batch | CPU-s |")
    print("|---|---:|---:|---:|")
    for name, (score_fn, schedule) in variants.items():
        start = time.process_time()
        with torch.no_grad():
            res = bits_per_dim(
                score_fn,
                k,
                Levels(17, model.scale, model.shift),
                schedule=schedule,
                estimator=ODE(tol=1e-3, divergence=Hutchinson(), integrator=Augmented()),
                generator=torch.Generator().manual_seed(seed),
            )
        se = float(res.bpd.std() / len(res.bpd) ** 0.5)
        cpu = time.process_time() - start
        print(f"| {name} | {float(res.bpd.mean()):.3f} ± {se:.3f} | {res.nfe} | {cpu:.0f} |")


def sampling_rows(model, n: int, seed: int) -> None:
    unet, scheduler = model.unet, model.scheduler
    print("| sampler | NFE | CPU-s | samples in [−1, 1] after clamp: mean ± sd |")
    print("|---|---:|---:|---|")
    x_T = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    scheduler.set_timesteps(1000)
    start = time.process_time()
    x, gen = x_T.clone(), torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for step in scheduler.timesteps:
            x = scheduler.step(unet(x, step).sample, step, x, generator=gen).prev_sample
    ref, ref_cpu = x, time.process_time() - start
    runs = {"diffusers DDPMScheduler loop": (ref, 1000, ref_cpu)}
    for name, kw in {
        "sdelab ancestral on the same steps": dict(
            sampler="ancestral",
            grid=model.schedule.step_times(scheduler.timesteps),
            generator=torch.Generator().manual_seed(seed + 1),
            denoise=True,
        ),
        "sdelab dpm_solver, 20 log-SNR steps": dict(
            sampler="dpm_solver", steps=20, grid="logsnr", generator=seed
        ),
    }.items():
        start = time.process_time()
        res = sample(model.score_fn, model.schedule, None, x_init=x_T, **kw)
        runs[name] = (res.samples, res.nfe, time.process_time() - start)
    for name, (xs, nfe, cpu) in runs.items():
        c = xs.clamp(-1, 1)
        extra = ""
        if name.startswith("sdelab ancestral"):
            extra = f" (max abs diff to diffusers {float((xs - ref).abs().max()):.1e})"
        print(
            f"| {name} | {nfe} | {cpu:.1f} | {float(c.mean()):.3f} ± {float(c.std()):.3f}{extra} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1500, help="training steps of the tiny UNet")
    p.add_argument("--n-eval", type=int, default=128, help="test digits for bits/dim")
    p.add_argument("--n-samples", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"date {datetime.date.today()}, {platform.machine()}, torch {torch.__version__}\n")
    print("### Interpolating a discrete chain (half-resolution test, 1000-step schedules)\n")
    interpolation_table()
    unet, scheduler, train_cpu = train(args.steps, args.seed)
    params = sum(p.numel() for p in unet.parameters())
    print(
        f"\n### Tiny UNet2DModel ({params} parameters, {args.steps} steps, {train_cpu:.0f} CPU-s)\n"
    )
    with tempfile.TemporaryDirectory() as folder:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
        model = load_diffusers(folder)
        print(model.describe(), "\n")
        k = load_digits(split="test").levels[: args.n_eval].long()
        bpd_rows(model, k, args.seed)
        print()
        sampling_rows(model, args.n_samples, args.seed)


if __name__ == "__main__":
    main()
