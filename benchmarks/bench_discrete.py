"""Seed 001's three score-SDE models, as their CPU-sized Fashion-MNIST twins (issue 20).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_discrete.py     # ≈ 15 CPU-min

Trains ``images/fashion_vpsde_discrete`` (DDPM's discrete-time VP, loss.objective ddpm),
``images/fashion_vpsde_continuous`` (continuous VP, Euler–Maruyama) and
``images/fashion_subvpsde`` (sub-VP, predictor–corrector) with ``sdelab.train.loop.train``,
then for each:

- test bits/dim through the probability-flow ODE (uniform dequantization,
  ``ODE(tol=1e-3, divergence=Hutchinson(), integrator=Augmented())``: one Rademacher probe,
  the augmented dopri5 solve with its two-tolerance check to 1e-3 nats per image, ``--n`` test
  images) — for the discrete model through its continuous view (t ↦ t·(N − 1));
- for the discrete model also DDPM's own discrete variational bound
  (:func:`sdelab.discrete.ddpm_vlb`, all N − 1 terms, discretised decoder, no dequantization);
- a 6×6 grid of samples with the config's sampler (``eval.sampler``, 1000 steps; the exact
  DDPM chain for the discrete model), written to ``--out``/fashion_<name>.png.

Times are CPU seconds of this process (``time.process_time``), not wall time: the cores are
shared. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
import time
from pathlib import Path

import torch

from sdelab.data.png import save_level_grid
from sdelab.discrete import DiscreteScoreModel, ddpm_vlb
from sdelab.likelihood.bpd import ODE, Levels, evaluate_likelihood
from sdelab.likelihood.options import Augmented, Hutchinson
from sdelab.train.build import load_run, make_run_dataset
from sdelab.train.config import load_config
from sdelab.train.loop import train
from sdelab.train.periodic import draw_samples
from sdelab.utils import mean_se_float

TWINS = ("fashion_vpsde_discrete", "fashion_vpsde_continuous", "fashion_subvpsde")


def bench_twin(name: str, args, root: Path) -> dict:
    over = list(args.override)
    cfg = load_config(f"images/{name}", over)
    t0 = time.process_time()
    train(cfg, root / name)
    train_cpu = time.process_time() - t0
    config, model, schedule = load_run(root / name)
    data = make_run_dataset(config)
    k = data.test_set(args.n)
    batches = [k[i : i + 64] for i in range(0, args.n, 64)]
    t0 = time.process_time()
    ode = evaluate_likelihood(
        model,
        schedule,
        batches,
        estimator=ODE(tol=1e-3, divergence=Hutchinson(), integrator=Augmented()),
        levels=Levels(data.num_levels, data.scale, data.shift),
        generator=torch.Generator().manual_seed(1),
        progress=False,
    )
    ode_cpu = time.process_time() - t0
    row = dict(
        name=name,
        objective=config.loss.objective,
        sde=config.sde.name,
        sampler=config.eval.sampler,
        params=sum(p.numel() for p in model.parameters()),
        train_cpu=train_cpu,
        ode=(ode.bpd_mean, ode.bpd_se),
        ode_nfe=ode.nfe,
        ode_cpu=ode_cpu,
        vlb=None,
    )
    if isinstance(model, DiscreteScoreModel):
        t0 = time.process_time()
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            bpd = torch.cat(
                [
                    ddpm_vlb(
                        model.eps_at_step,
                        model.chain,
                        kb,
                        num_levels=data.num_levels,
                        scale=data.scale,
                        shift=data.shift,
                        generator=gen,
                    ).bpd
                    for kb in k[: args.n_vlb].split(64)
                ]
            )
        row["vlb"] = mean_se_float(bpd)
        row["vlb_cpu"] = time.process_time() - t0
    t0 = time.process_time()
    with torch.no_grad():
        x = draw_samples(model, config, 36, torch.Generator().manual_seed(0), "cpu")
    row["sample_cpu"] = time.process_time() - t0
    png = save_level_grid(data.to_levels(x), data.num_levels, Path(args.out) / f"{name}.png")
    row["png"] = png
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64, help="test images for the ODE bpd")
    p.add_argument("--n-vlb", type=int, default=32, help="test images for DDPM's bound")
    p.add_argument("--out", default="docs/images", help="folder for the sample grids")
    p.add_argument("--runs", default=None, help="keep the run folders here (default: temp)")
    p.add_argument("--override", nargs="*", default=[], help="config overrides for every twin")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; {platform.processor()}")
    header = (
        "| twin | objective | SDE | sampler | params | train CPU-min | test bpd, ODE "
        f"(n={args.n}) | NFE | DDPM bound bpd (n={args.n_vlb}) | eval CPU-min | grid |\n"
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"
    )
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.runs or tmp)
        for name in TWINS:
            r = bench_twin(name, args, root)
            vlb = "—" if r["vlb"] is None else f"{r['vlb'][0]:.3f} ± {r['vlb'][1]:.3f}"
            evals = r["ode_cpu"] + r.get("vlb_cpu", 0.0) + r["sample_cpu"]
            lines.append(
                f"| {r['name']} | {r['objective']} | {r['sde']} | {r['sampler']} "
                f"| {r['params']:,} | {r['train_cpu'] / 60:.1f} | {r['ode'][0]:.3f} ± "
                f"{r['ode'][1]:.3f} | {r['ode_nfe']} | {vlb} | {evals / 60:.1f} | {r['png']} |"
            )
            print("\n".join([header, *lines]), flush=True)  # the table so far


if __name__ == "__main__":
    main()
