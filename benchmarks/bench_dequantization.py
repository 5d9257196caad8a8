"""Dequantization (issue 19): uniform vs truncated-normal vs variational bits/dim, same model.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_dequantization.py RUN \\
        [--steps 500] [--n 359] [--preset small] [--probes 1]

RUN is a trained image run (e.g. ``sdelab train images/digits --out RUN``). The script

1. trains a variational dequantizer (``sdelab.nets.dequantizer``, preset ``--preset``) for
   ``--steps`` steps on the run's training images against the frozen EMA score model, with
   ScoreFlow's bound as −log p (``sdelab.likelihood.dequantizer.train_dequantizer``), and times it;
2. evaluates the first ``--n`` test images with each dequantization, using the **same** score
   model, the **same** images and the same probes: the probability-flow ODE likelihood
   (Hutchinson, ``--probes`` Rademacher probes, augmented, tol = 1e-5 nats) and the ScoreFlow bound,
   each as bits/dim ± SE over images, plus the paired difference to uniform ± its SE.

One torch thread; times are CPU seconds (``time.process_time``).
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import time

import torch

from sdelab.likelihood import log_likelihood, scoreflow_bound
from sdelab.likelihood.dequantization import (
    Dequantized,
    dequantize,
    nats_to_bpd,
    variational_dequantize,
)
from sdelab.likelihood.dequantizer import train_dequantizer
from sdelab.likelihood.options import Augmented, Hutchinson
from sdelab.nets.dequantizer import Dequantizer
from sdelab.train.build import load_run, make_run_dataset


def _train_batches(levels: torch.Tensor, batch_size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, len(levels), (batch_size,), generator=g)
        yield levels[idx].to(torch.int64)


def _mean_se(v: torch.Tensor) -> tuple[float, float]:
    return float(v.mean()), float(v.std() / math.sqrt(v.numel()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--preset", default="small")
    p.add_argument("--n", type=int, default=359)
    p.add_argument("--probes", type=int, default=1)
    p.add_argument("--eval-batch", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    config, model, schedule = load_run(args.run)
    data = make_run_dataset(config)
    levels, scale, shift = data.num_levels, data.scale, data.shift
    train_levels = data.load("train").levels
    test = data.test_set(args.n)

    flow = Dequantizer(data.image_shape, levels, args.preset, seed=args.seed)
    n_params = sum(q.numel() for q in flow.parameters())
    opt = torch.optim.Adam(flow.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    log: list[tuple[int, float]] = []

    def callback(step: int, loss: float, _flow) -> None:
        sched.step()
        if step % max(1, args.steps // 10) == 0:
            log.append((step, loss))
            print(f"  dequantizer step {step}: bound {loss:.4f} bpd", flush=True)

    t0 = time.process_time()
    train_dequantizer(
        model,
        schedule,
        _train_batches(train_levels, args.batch_size, args.seed),
        flow,
        args.steps,
        levels=levels,
        scale=scale,
        shift=shift,
        optimizer=opt,
        generator=torch.Generator().manual_seed(args.seed + 1),
        callback=callback,
    )
    train_cpu = time.process_time() - t0
    flow.eval()

    d = data.dim
    # the augmented solve at 1e-5 nats per example
    ode_kwargs = dict(divergence=Hutchinson(n_probes=args.probes), integrator=Augmented(), tol=1e-5)

    def dequantized(method: str, k: torch.Tensor, g: torch.Generator) -> Dequantized:
        if method == "variational":
            with torch.no_grad():
                return variational_dequantize(k, levels, scale, shift, flow, generator=g)
        return dequantize(k, levels, scale, shift, method=method, schedule=schedule, generator=g)

    def evaluate(method: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Per-image ODE and ScoreFlow-bound bpd; the same generator seeds for every method,
        so the probes and the bound's noise are shared (paired comparison)."""
        t0 = time.process_time()
        ode, bound = [], []
        for i in range(0, len(test), args.eval_batch):
            k = test[i : i + args.eval_batch]
            dq = dequantized(method, k, torch.Generator().manual_seed(1000 + i))
            g = torch.Generator().manual_seed(2000 + i)
            res = log_likelihood(model, schedule, dq.y, generator=g, **ode_kwargs)
            ode.append(nats_to_bpd(-res.logp - dq.entropy, d))
            with torch.no_grad():
                g = torch.Generator().manual_seed(3000 + i)
                b = scoreflow_bound(model, schedule, dq.y, generator=g).nll_bound
            bound.append(nats_to_bpd(b - dq.entropy, d))
        return torch.cat(ode).detach(), torch.cat(bound).detach(), time.process_time() - t0

    results = {m: evaluate(m) for m in ("uniform", "truncated_normal", "variational")}

    print(
        f"\nDate: {datetime.date.today()}. Machine: {platform.machine()}, torch "
        f"{torch.__version__}, {args.threads} thread(s); CPU time = process time."
    )
    print(
        f"Run {args.run} ({config.data.name}, L = {levels}, D = {d}); dequantizer preset "
        f"{args.preset!r} ({n_params:,} parameters), {args.steps} steps, batch "
        f"{args.batch_size}, Adam {args.lr} cosine; training {train_cpu / 60:.1f} CPU-min. "
        f"Test: first {len(test)} images, ODE with {args.probes} Rademacher probe(s)."
    )
    header = "| dequantization | ODE bpd | Δ vs uniform | ScoreFlow bound bpd | eval CPU-s |"
    print("\n" + header)
    print("|---|---:|---:|---:|---:|")
    base_ode = results["uniform"][0]
    for m, (ode, bound, cpu) in results.items():
        mo, so = _mean_se(ode)
        mb, sb = _mean_se(bound)
        dm, ds = _mean_se(ode - base_ode)
        delta = "—" if m == "uniform" else f"{dm:+.4f} ± {ds:.4f}"
        print(f"| {m} | {mo:.4f} ± {so:.4f} | {delta} | {mb:.4f} ± {sb:.4f} | {cpu:.0f} |")
    print("\ntraining log (step, minibatch bound bpd):", ", ".join(f"{s}: {v:.3f}" for s, v in log))


if __name__ == "__main__":
    main()
