"""Bits/dim per CPU-minute (issue 22): train image recipes, evaluate every checkpoint.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_recipe.py digits --out DIR
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_recipe.py fashion --out DIR \\
        [--recipes v_lw_is_bf16_cos ...] [--n 1000] [--plot docs/images/bpd_per_cpu_minute.png]

Each recipe is a list of overrides of the built-in config (``images/digits`` or
``images/fashion_mnist_small``); it is trained once (one torch thread) into ``DIR/<recipe>``,
its CPU time (``time.process_time``) recorded, and every saved checkpoint is evaluated: test
bits/dim by the probability-flow ODE in the Score-SDE design — uniform dequantization,
``ODE(divergence=Hutchinson(), integrator=Augmented(check=False), tol=--tol)``: one augmented
dopri5 solve with 1 Rademacher probe fixed along the path, no two-tolerance check, ``--tol`` a
per-example target in nats (default 1e-5) — first ``--n`` test images, mean ± SE over
images. A checkpoint's CPU-minutes are the run's training CPU time × step / steps (the step
cost is constant). A run folder that already holds ``cpu.json`` is not trained again, so the
evaluation can be repeated or extended (``--steps-eval``). Prints a Markdown table; ``--plot``
draws test bpd against training CPU-minutes, one line per recipe and data set, with the
issue's targets.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from sdelab.likelihood.bpd import ODE
from sdelab.likelihood.options import Augmented, Hutchinson
from sdelab.runs import run_likelihood
from sdelab.runs.core import open_run
from sdelab.train.config import load_config
from sdelab.train.loop import train

CONFIGS = {"digits": "images/digits", "fashion": "images/fashion_mnist_small"}
TARGETS = {"digits": (1.6, 15.0), "fashion": (3.2, 30.0)}
# the recipes measured in benchmarks/RESULTS.md (issue 22); the built-in configs now hold the
# last of each data set
# what the configs had before dropout and t_min = 1e-5 (2026-12-02): the earlier recipes
BEFORE = ["model.dropout=0.0", "sde.kwargs.t_min=1e-3"]
RECIPES = {
    "digits": {
        "eps_bf16_cos_8000": [
            "train.steps=8000",
            "loss.parametrization=eps",
            "model.embedding_scale=1000",
            *BEFORE,
        ],
        "v_bf16_cos_8000": ["train.steps=8000", "model.embedding_scale=1000", *BEFORE],
        "v_bf16_cos_emb100_4500": ["train.steps=4500", *BEFORE],
        # regularization against the overfitting of the 1438 training digits
        "v_emb100_drop01_6000": ["train.steps=6000", "model.dropout=0.1", "sde.kwargs.t_min=1e-3"],
        "v_emb100_drop03_6000": ["train.steps=6000", "model.dropout=0.3", "sde.kwargs.t_min=1e-3"],
        # data at t_min: σ(1e-3) ≈ 0.01 blurs the edges of the 2/17-wide dequantization bins
        "v_emb100_drop01_tmin1e-4_6000": [
            "train.steps=6000",
            "model.dropout=0.1",
            "sde.kwargs.t_min=1e-4",
        ],
        # EMA rate (on the current config)
        "v_emb100_drop01_tmin1e-5_ema9995_6000": ["train.steps=6000", "train.ema_decay=0.9995"],
        "v_emb100_drop01_tmin1e-5_6000": [
            "train.steps=6000",
            "model.dropout=0.1",
            "sde.kwargs.t_min=1e-5",
        ],
        # width and depth at a fixed budget of ≈ 15 CPU-minutes (steps from the step cost:
        # 136 ms at 32 channels, 267 at 48, 351 at 64, 208 with two res blocks per level)
        "w48_3300": ["train.steps=3300", "model.base_channels=48"],
        "w64_2500": ["train.steps=2500", "model.base_channels=64"],
        "res2_4300": ["train.steps=4300", "model.num_res_blocks=2"],
    },
    "fashion": {
        "v_lw_is_bf16_cos_emb100_6500": ["train.steps=6500", "sde.kwargs.t_min=1e-3"],
        # σ(1e-3) ≈ 0.01 is wider than a bin (2/256): the background's hard edge at −1 blurs
        "v_emb100_tmin1e-5_7500": ["train.steps=7500", "sde.kwargs.t_min=1e-5"],
    },
}


def train_recipe(data: str, name: str, over: list[str], out: Path) -> Path:
    run_dir = out / name
    record = run_dir / "cpu.json"
    if record.exists():
        return run_dir
    over = [*over, "train.ckpt_every=1000", "train.keep_last=20"]
    t0 = time.process_time()
    train(load_config(CONFIGS[data], over), run_dir)
    cpu = time.process_time() - t0
    record.write_text(json.dumps({"cpu_s": cpu, "overrides": over}))
    return run_dir


def checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*.json"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", choices=sorted(CONFIGS))
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--recipes", nargs="*", default=None, help="default: every recipe of DATA")
    p.add_argument("--n", type=int, default=None, help="test images (default: all / 1000)")
    p.add_argument("--steps-eval", default=None, help="comma-separated checkpoint steps")
    p.add_argument("--tol", type=float, default=1e-5, help="ODE: per-example target in nats")
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--results", type=Path, default=None, help="JSON lines of every point")
    args = p.parse_args()
    torch.set_num_threads(1)
    n = args.n or (359 if args.data == "digits" else 1000)
    names = args.recipes or list(RECIPES[args.data])
    estimator = ODE(tol=args.tol, divergence=Hutchinson(), integrator=Augmented(check=False))
    print(
        f"## Bits/dim per CPU-minute: {args.data} (issue 22)\n\n"
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
        f"torch {torch.__version__}, 1 thread; ODE bpd, augmented dopri5, 1 probe, "
        f"tol {args.tol:g} nats, no check, first {n} test images\n"
    )
    print("| recipe | step | training CPU-min | test bpd ± SE | eval CPU-min |")
    print("|---|---:|---:|---:|---:|")
    points = []
    for name in names:
        run_dir = train_recipe(args.data, name, RECIPES[args.data][name], args.out)
        cpu = json.loads((run_dir / "cpu.json").read_text())["cpu_s"]
        total = load_config(str(run_dir / "config.yaml")).train.steps
        steps = checkpoints(run_dir)
        if args.steps_eval:
            want = {int(s) for s in args.steps_eval.split(",")}
            steps = [s for s in steps if s in want]
        for step in steps:
            t0 = time.process_time()
            res = run_likelihood(
                open_run(run_dir, step=step),
                n=n,
                batch_size=min(n, 500),
                estimator=estimator,
                progress=False,
            )
            point = dict(
                data=args.data,
                recipe=name,
                step=step,
                cpu_min=cpu / 60 * step / total,
                bpd=res.bpd_mean,
                se=res.bpd_se,
                eval_min=(time.process_time() - t0) / 60,
                n=n,
            )
            points.append(point)
            print(
                f"| {name} | {step} | {point['cpu_min']:.1f} | {res.bpd_mean:.3f} ± "
                f"{res.bpd_se:.3f} | {point['eval_min']:.1f} |",
                flush=True,
            )
            if args.results:
                with args.results.open("a") as f:
                    f.write(json.dumps(point) + "\n")
    if args.plot:
        plot_points(points if not args.results else _read(args.results), args.plot)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_points(points: list[dict], path: Path) -> None:
    """Test bpd against training CPU-minutes, one panel per data set, with the targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datas = sorted({p["data"] for p in points})
    fig, axes = plt.subplots(1, len(datas), figsize=(5.5 * len(datas), 4), squeeze=False)
    for ax, data in zip(axes[0], datas, strict=True):
        for recipe in dict.fromkeys(p["recipe"] for p in points if p["data"] == data):
            pts = sorted(
                (p for p in points if p["data"] == data and p["recipe"] == recipe),
                key=lambda p: p["cpu_min"],
            )
            ax.errorbar(
                [p["cpu_min"] for p in pts],
                [p["bpd"] for p in pts],
                yerr=[p["se"] for p in pts],
                marker="o",
                capsize=3,
                label=recipe,
            )
            if len({p["n"] for p in pts}) > 1:  # say which points saw fewer test images
                for p in pts:
                    ax.annotate(
                        f"n={p['n']}",
                        (p["cpu_min"], p["bpd"]),
                        fontsize=7,
                        xytext=(4, 4),
                        textcoords="offset points",
                    )
        bpd, minutes = TARGETS[data]
        ax.axhline(bpd, color="k", ls=":", lw=1)
        ax.axvline(minutes, color="k", ls=":", lw=1)
        ax.set(xlabel="training CPU-minutes (1 thread)", ylabel="test bits/dim (ODE)", title=data)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
