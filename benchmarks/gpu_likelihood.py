"""GPU part of benchmarks/gpu_check.sh: likelihood and training throughput on CUDA.

Run:  .venv/bin/python benchmarks/gpu_likelihood.py [--device cuda] [--quick]

Prints markdown tables:
1. the likelihood comparison of bench_likelihood_speed.py on the device (random MLP, D = 64,
   B = 256): today's augmented exact trace, the quadrature default, Hutchinson at the nodes, and
   the Score-SDE design (scipy on the host: a device → host → device round trip per
   evaluation), wall seconds with the device synchronised;
2. a CIFAR-10-size U-Net (images/score_sde_cifar10_vp's network, random weights: cost only)
   likelihood per image, Hutchinson 1 probe: quadrature (17 nodes) and augmented;
3. training images/s of that U-Net in fp32, bf16 and fp16 autocast, with the VP schedule and a
   learned VDM schedule (``vdm-learned``), using the library's own training step.

Exits with a one-line error when the device is not available (so the CPU-side logic is
testable: ``--device cuda`` on a machine without CUDA fails clearly).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def check_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "gpu_likelihood.py: CUDA is not available (torch.cuda.is_available() is False): run "
            "on a GPU machine, or pass --device cpu for a dry run"
        )
    return dev


def wall(fn, dev: torch.device, repeats: int = 2):
    """Median wall time with the device synchronised; the first call is a warm-up."""
    out = fn()
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def table_mlp(dev: torch.device, batch: int) -> list[str]:
    from bench_likelihood import RandomMLP, oracle, scoresde_likelihood
    from sdelab.likelihood import log_likelihood
    from sdelab.likelihood.options import Augmented, Exact, Hutchinson, Quadrature
    from sdelab.sde import VPSchedule

    sde = VPSchedule()
    x = oracle(64, seed=64).sample(batch, generator=torch.Generator().manual_seed(0)).float()
    x = x.to(dev)
    mlp = RandomMLP(64).to(dev).eval().requires_grad_(False)
    with torch.no_grad():
        # the reference: the same network in float64 (a float32 network cannot resolve 1e-7)
        mlp64 = RandomMLP(64).to(dev).double().eval().requires_grad_(False)
        ref = log_likelihood(mlp64, sde, x.double(), tol=1e-7, integrator=Augmented()).logp
    rows = [
        ("augmented exact, tol 1e-5 nats", dict(integrator=Augmented(), tol=1e-5)),
        ("default (augmented exact, tol 1e-2 nats)", dict()),
        ("quadrature exact, tol 1e-5", dict(integrator=Quadrature(), divergence=Exact(), tol=1e-5)),
        (
            "quadrature Hutchinson 8 probes, tol 1e-5",
            dict(integrator=Quadrature(), divergence=Hutchinson(n_probes=8), tol=1e-5),
        ),
        (
            "augmented Hutchinson 1 probe, tol 1e-5",
            dict(integrator=Augmented(), divergence=Hutchinson(), tol=1e-5),
        ),
    ]
    lines = [
        "| method | s | speed vs first row | NFE | max err (nats) |",
        "|---|---:|---:|---:|---:|",
    ]
    t_today = None
    for label, kw in rows:

        def run(kw=kw):
            with torch.no_grad():
                gen = torch.Generator(device=dev).manual_seed(1)
                return log_likelihood(mlp, sde, x, generator=gen, **kw)

        t, res = wall(run, dev)
        t_today = t_today or t
        err = float((res.logp - ref).abs().max())
        lines.append(f"| {label} | {t:.3f} | {t_today / t:.1f}× | {res.nfe} | {err:.1e} |")
    t, (lp, nfe) = wall(lambda: scoresde_likelihood(mlp, sde, x, 1e-5, 1e-5), dev, repeats=1)
    err = float((lp.to(dev).double() - ref).abs().max())
    lines.append(
        f"| Score-SDE design (scipy, host round trip) | {t:.3f} | {t_today / t:.1f}× | {nfe} "
        f"| {err:.1e} |"
    )
    return lines


def cifar_model(dev: torch.device, schedule_name: str | None = None):
    from sdelab.sde import make_schedule
    from sdelab.train.build import build_model
    from sdelab.train.config import load_config

    over = ["model.image_shape=[3, 32, 32]", "model.dim=3072"]
    if schedule_name:
        over.append(f"sde.name={schedule_name}")
        over.append("sde.kwargs={}")
    config = load_config("images/score_sde_cifar10_vp", over)
    schedule = make_schedule(config.sde.name, **config.sde.kwargs)
    return config, build_model(config, schedule).to(dev), schedule.to(dev)


def table_cifar(dev: torch.device, batch: int, tol: float = 1e-5) -> list[str]:
    from sdelab.likelihood import log_likelihood
    from sdelab.likelihood.options import Augmented, Hutchinson, Quadrature

    _, model, sde = cifar_model(dev)
    model.eval().requires_grad_(False)
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x = x.to(dev)
    lines = ["| method | s per image | NFE | divergence evals |", "|---|---:|---:|---:|"]
    for label, kw in (
        (
            "default (randomized 32 nodes, DPM-Solver++(3M) 64 steps, Hutchinson 1 probe)",
            dict(tol=None),
        ),
        (
            f"quadrature, Hutchinson 1 probe, tol {tol:g} nats",
            dict(integrator=Quadrature(), divergence=Hutchinson(), tol=tol),
        ),
        (
            f"augmented, Hutchinson 1 probe, tol {tol:g} nats",
            dict(integrator=Augmented(), divergence=Hutchinson(), tol=tol),
        ),
    ):

        def run(kw=kw):
            with torch.no_grad():
                gen = torch.Generator(device=dev).manual_seed(1)
                return log_likelihood(model, sde, x, generator=gen, **kw)

        t, res = wall(run, dev, repeats=1)
        evals = int(res.divergence_evals.max())
        lines.append(f"| {label} | {t / batch:.3f} | {res.nfe} | {evals} |")
    return lines


def table_training(dev: torch.device, steps: int, size: int = 32, batch: int = 64) -> list[str]:
    from sdelab.train.config import load_config

    lines = [
        "| schedule | precision | images/s | final loss |",
        "|---|---|---:|---:|",
    ]
    import tempfile

    from sdelab.train.loop import train

    for sched in ("vp", "vdm-learned"):
        for precision in ("no", "bf16", "fp16"):
            over = [
                f"train.device={dev}",
                f"train.steps={steps}",
                f"train.mixed_precision={precision}",
                f"train.batch_size={batch}",
                f"train.ckpt_every={steps}",
                f"train.log_every={max(steps // 2, 1)}",
                "data.name=digits",
                f"data.options={{size: {size}, channels: 3, data_range: '[-1,1]'}}",
            ]
            if sched != "vp":
                over += [
                    f"sde.name={sched}",
                    "sde.kwargs={}",
                    "loss.objective=vdm",
                    "loss.weighting=likelihood",
                ]
            if size < 32:  # the CPU dry run's small images have no 16-pixel level
                over.append("model.attn_resolutions=[]")
            try:
                config = load_config("images/score_sde_cifar10_vp", over)
                with tempfile.TemporaryDirectory() as tmp:
                    t0 = time.perf_counter()
                    out = train(config, Path(tmp) / "run")
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    dt = time.perf_counter() - t0
                loss = out.last_loss if out.last_loss is not None else float("nan")
                lines.append(f"| {sched} | {precision} | {steps * batch / dt:.1f} | {loss:.4g} |")
            except Exception as e:  # a failing combination is a finding, not the end
                msg = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
                lines.append(f"| {sched} | {precision} | FAILED | {msg} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small sizes (a CPU dry run)")
    p.add_argument("--tables", default="123", help="which tables (default 123)")
    args = p.parse_args()
    dev = check_device(args.device)
    quick = args.quick
    if "1" in args.tables:
        print(f"### Likelihood on {dev} (random MLP, D = 64, float32 model)\n")
        print("\n".join(table_mlp(dev, 16 if quick else 256)) + "\n")
    if "2" in args.tables:
        print("### CIFAR-10-size U-Net (3×32×32, score_sde_cifar10_vp network, random weights)\n")
        print("\n".join(table_cifar(dev, 2 if quick else 16, 1e-2 if quick else 1e-5)) + "\n")
    print("### Training throughput (same U-Net, digits resized to 3×32×32, batch 64)\n")
    if "3" in args.tables:
        sizes = dict(size=8, batch=4) if quick else {}
        print("\n".join(table_training(dev, 2 if quick else 60, **sizes)) + "\n")


if __name__ == "__main__":
    main()
