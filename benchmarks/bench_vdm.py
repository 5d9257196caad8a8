"""VDM (issue 8): fixed linear vs learned noise schedules, trained through ``sdelab train``.

For 8×8 digits (17 levels, discretized decoder, bits/dim) and the 2-D moons toy (Gaussian
decoder, nats), one short run per schedule on the same data, seed and steps, then

- the test VLB (continuous time, EMA weights, mean ± SE over the test set), and
- the variance of the single-draw diffusion-loss estimator *given x*: for m test points, K
  independent draws of (t, ε) each, the within-point variance averaged over the points — the
  noise VDM's variance gradient and importance sampling fight, with data variation removed.
  Each run is measured with uniform t and with importance-sampled t (log-SNR uniform).

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_vdm.py [--digits-steps 600] [--toy-steps 1500]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sdelab.runs import run_vlb
from sdelab.train.build import load_run, make_run_dataset
from sdelab.train.config import load_config
from sdelab.train.loop import train
from sdelab.vdm import vdm_vlb

SCHEDULES = {
    "fixed linear (vdm)": ["sde.name=vdm", "sde.kwargs={gamma_min: -13.3, gamma_max: 5.0}"],
    "learned end points (vdm-learned-ends)": [
        "sde.name=vdm-learned-ends",
        "sde.kwargs={gamma_min: -13.3, gamma_max: 5.0}",
    ],
    "learned γ-network (vdm-learned)": [
        "sde.name=vdm-learned",
        "sde.kwargs={gamma_min: -13.3, gamma_max: 5.0, hidden: 64}",
    ],
}


def estimator_variance(run_dir: Path, time_sampling: str, m: int = 200, k: int = 16) -> float:
    """Mean over m test points of the variance over k draws of the diffusion loss (nats²)."""
    config, model, schedule = load_run(run_dir)
    dataset = make_run_dataset(config)
    x = dataset.test_set(m)
    levels = getattr(dataset, "num_levels", None)
    reps = x.repeat_interleave(k, dim=0)
    with torch.no_grad():
        loss = vdm_vlb(
            model.eps,
            schedule,
            reps,
            num_levels=levels,
            time_sampling=time_sampling,
            low_discrepancy=False,
            generator=torch.Generator().manual_seed(7),
        ).diffusion
    return float(loss.reshape(m, k).var(dim=1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits-steps", type=int, default=600)
    parser.add_argument("--toy-steps", type=int, default=1500)
    args = parser.parse_args()
    rows = []
    t_all = time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        for data, base, steps, unit in (
            ("digits 8×8", "images/vdm_digits", args.digits_steps, "bpd"),
            ("moons 2-D", "toy/vdm_moons", args.toy_steps, "nats"),
        ):
            for name, over in SCHEDULES.items():
                if data.startswith("moons") and "ends" in name:
                    continue  # the toy compares the two extremes only
                run = Path(tmp) / f"{base.replace('/', '_')}_{len(rows)}"
                cfg = load_config(
                    base,
                    [
                        *over,
                        f"train.steps={steps}",
                        f"train.ckpt_every={steps}",
                        "train.log_every=100",
                    ],
                )
                t0 = time.process_time()
                train(cfg, run)
                cpu = time.process_time() - t0
                res = run_vlb(run, n=2000, progress=False)
                mean, se = res.mean_se("total", unit)
                var_u = estimator_variance(run, "uniform")
                var_i = estimator_variance(run, "importance")
                rows.append((data, name, steps, cpu, unit, mean, se, var_u, var_i))
                print(f"done {data} {name}: {mean:.4f} ± {se:.4f} {unit}", flush=True)
    print()
    print(
        "| data | schedule | steps | train CPU s | test VLB (mean ± SE) | "
        "Var[L_diff | x], uniform t | Var[L_diff | x], importance t |"
    )
    print("|---|---|---|---|---|---|---|")
    for data, name, steps, cpu, unit, mean, se, var_u, var_i in rows:
        print(
            f"| {data} | {name} | {steps} | {cpu:.0f} | {mean:.4f} ± {se:.4f} {unit} | "
            f"{var_u:.4g} | {var_i:.4g} |"
        )
    print(
        f"\ntotal CPU time {time.process_time() - t_all:.0f} s; variances in nats², m = 200 "
        "test points × K = 16 draws, EMA weights"
    )


if __name__ == "__main__":
    main()
