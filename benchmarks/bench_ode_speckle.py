"""Why do probability-flow ODE samples of a short Fashion-MNIST run end as speckle (issue 22,
item 4)? A measurement on a trained run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ode_speckle.py RUN [--n 64] [--step S]

Speckle is measured by the high-frequency energy of an image in [0, 1]: the mean squared
discrete Laplacian, HF(x) = mean((4x − Σ neighbours)²). A sample is *speckled* when its HF
exceeds the 99th percentile of the run's test images (so ~1% of real images would count).

Tables:

1. The speckled share of ``--n`` samples from the same prior draws for Euler–Maruyama (500
   steps + Tweedie denoising), and for DPM-Solver++ (50 steps) and Heun (100 steps) ending at
   ``t_end`` = t_min (the schedule's), 1e-2, 3e-2 or 1e-1, each followed by the Tweedie step
   x̂₀ = (x + σ²·s(x, t_end))/α at t_end (or not).
2. Along the DPM-Solver++ trajectory ending at t_min: the mean HF of the Tweedie estimate
   x̂₀(x_t, t) for the samples that end speckled and for those that end clean, at the grid's
   times — where the two groups part is where the speckle enters — and how much of its
   prior draw x_T each group's final sample still carries.
"""

from __future__ import annotations

import argparse
import datetime
import statistics

import torch
from torch import Tensor

from sdelab.samplers import denoise, sample, time_grid
from sdelab.sde import make_schedule
from sdelab.train.build import load_run, make_run_dataset


def high_freq(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` in [0, 1] -> ``(B,)`` mean squared 4-neighbour Laplacian (zero pad)."""
    p = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    lap = 4 * x - p[..., :-2, 1:-1] - p[..., 2:, 1:-1] - p[..., 1:-1, :-2] - p[..., 1:-1, 2:]
    return lap.square().flatten(1).mean(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--n", type=int, default=64, help="samples per sampler")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--em-steps", type=int, default=500)
    parser.add_argument("--step", type=int, default=None, help="checkpoint (default: newest)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config, model, schedule = load_run(args.run, step=args.step)
    dataset = make_run_dataset(config)
    shape = tuple(dataset.image_shape)
    levels = dataset.test_set(1000).float()
    test01 = (levels + 0.5) / dataset.num_levels
    threshold = torch.quantile(high_freq(test01.reshape(-1, *shape)), 0.99).item()

    def to01(y: Tensor) -> Tensor:  # model space -> [0, 1]
        return ((y - dataset.shift) / dataset.scale).clamp(0, 1).reshape(-1, *shape)

    prior = torch.randn(args.n, *shape, generator=torch.Generator().manual_seed(args.seed))
    sk = config.sde.kwargs
    print(
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; run "
        f"{args.run} (checkpoint {args.step or 'newest'}, EMA weights); {args.n} samples from the "
        f"same prior draws; speckled = HF above the test images' 99th percentile "
        f"({threshold:.4f}).\n"
    )
    print("| sampler | t_end | Tweedie step | NFE | speckled share | median HF |")
    print("|---|---:|---|---:|---:|---:|")

    def report(name, t_end, tweedie, nfe, x):
        hf = high_freq(to01(x))
        share = (hf > threshold).float().mean().item()
        print(
            f"| {name} | {t_end:g} | {tweedie} | {nfe} | {share:.2f} | "
            f"{statistics.median(hf.tolist()):.4f} |",
            flush=True,
        )
        return hf

    with torch.no_grad():
        em = sample(
            model,
            schedule,
            None,
            sampler="euler_maruyama",
            steps=args.em_steps,
            x_init=prior.clone(),
            generator=args.seed,
            denoise=True,
        )
        report("Euler–Maruyama", schedule.t_min, "yes", em.nfe, em.samples)
        for name, sampler, steps, extra in (
            ("DPM-Solver++", "dpm_solver", 50, {}),
            ("Heun (ODE)", "ode", 100, {"method": "heun"}),
        ):
            for t_end in (schedule.t_min, 1e-2, 3e-2, 1e-1):
                ends = make_schedule(config.sde.name, **{**sk, "t_min": t_end})
                grid = time_grid(ends, steps, "logsnr")
                res = sample(
                    model,
                    schedule,
                    None,
                    sampler=sampler,
                    steps=steps,
                    grid=grid,
                    x_init=prior.clone(),
                    generator=args.seed,
                    return_trajectory=t_end == schedule.t_min and sampler == "dpm_solver",
                    **extra,
                )
                report(name, t_end, "no", res.nfe, res.samples)
                x0 = denoise(model, schedule, res.samples, t_end)
                hf = report(name, t_end, "yes", res.nfe + 1, x0)
                if res.trajectory is not None:
                    traj, times, bad = res.trajectory, res.times, hf > threshold
    print()
    print("Mean HF of the Tweedie estimate x̂₀(x_t, t) along DPM-Solver++ (ending at t_min):\n")
    print("| t | σ_t | speckled at the end | clean at the end |")
    print("|---:|---:|---:|---:|")
    with torch.no_grad():
        picks = sorted({*range(0, len(times), max(1, len(times) // 12)), len(times) - 1})
        for i in picks:
            t = times[i]
            x0 = denoise(model, schedule, traj[i], t)
            hf = high_freq(to01(x0))
            sigma = schedule.alpha_sigma(torch.as_tensor(t))[1].item()
            cols = [f"{hf[m].mean().item():.4f}" if m.any() else "–" for m in (bad, ~bad)]
            print(f"| {float(t):.4f} | {sigma:.3f} | {cols[0]} | {cols[1]} |", flush=True)
    # How much of its prior draw x_T a final sample still carries: the coefficient k of the
    # least-squares fit x_end ≈ k·x_T (0 when the ODE has replaced the noise by an image).
    x_t, x_end = traj[0].flatten(1), traj[-1].flatten(1)
    k = (x_end * x_t).sum(1) / x_t.square().sum(1)
    print(
        f"\nProjection k of the final DPM-Solver++ sample on its prior draw (x_end ≈ k·x_T): "
        f"speckled {k[bad].mean().item():.3f} (n = {int(bad.sum())}), clean "
        f"{k[~bad].mean().item():.3f} (n = {int((~bad).sum())})."
    )


if __name__ == "__main__":
    main()
