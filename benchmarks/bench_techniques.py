"""Each maximum-likelihood training technique as a paired difference at equal training CPU time.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_techniques.py calibrate --out DIR
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_techniques.py train --out DIR [--only ROW..]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_techniques.py eval --out DIR [--n 1000]
    .venv/bin/python benchmarks/bench_techniques.py table --out DIR [--plot PNG]

The rows are the technique stack of the ``recipes/<data>_*`` configs
(``docs/how-to/ml-training.md``), each trained for the same CPU budget (``--budget-min``):

- ``first_order``: ScoreFlow's likelihood weighting with importance-sampled time, v-prediction;
- ``high_order``: the same for ``1 − --stage-share`` of the budget, then Lu et al.'s
  second-order DSM started from it for the rest (their recipe: high-order training starts
  from a first-order checkpoint), at a constant lr 2e-4;
- ``velocity``: i-DODE's first stage (importance sampling of λ with density ∝ sigmoid(λ));
- ``finetune``: ``velocity`` for ``1 − --stage-share`` of the budget, then i-DODE's
  error-bounded second-order flow-matching fine-tuning for the rest;
- ``flips``: ``finetune`` with horizontal flips of the training images in both stages.

``calibrate`` measures each stage's CPU seconds per training step (median of 5 steps after 2
warm-up steps, one thread) and ``train`` sets each stage's step count from it, so that every
row spends the budget; each stage's CPU time (``time.process_time``) is recorded and the table
shows the measured sum. ``eval`` scores every row's final model on the first ``--n`` test
images, all rows on the same images: the exact likelihood through the probability-flow ODE
(the default estimator) with uniform and truncated-normal dequantization, and ScoreFlow's
bound (uniform dequantization; the SDE's likelihood bound, 16 importance-sampled draws); the
intermediate checkpoints on the first ``--n-curve`` images for the bits/dim-per-CPU-minute
curve (every point of which is a mean over those images: the final models' too). ``table``
prints every row with its standard error and the paired per-image
differences — against the row it adds to and against the baseline — whose standard error is
the spread of the per-image differences over √n (it includes both rows' estimator noise).

``table --recipe-runs RUN ...`` adds whole runs of one recipe trained for different lengths
(each with the ``cpu.json`` of its training and the output of ``sdelab likelihood RUN --n N``,
uniform dequantization, the same first N test images): their bits/dim against training
CPU-minutes, each paired with the previous run, and the target line of ``--target``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_high_order import step_seconds
from sdelab.likelihood import ODE, ScoreFlow
from sdelab.runs import run_likelihood
from sdelab.train.config import load_config
from sdelab.train.loop import train

# a second stage starts from the first stage's newest checkpoint (its recipe holds its constant
# lr 2e-4)
FLIPS = ["data.options.hflip=true"]


def stack(data: str) -> dict[str, dict]:
    """Row name -> its stages (recipe, overrides, share of the budget) and the row it adds to."""
    r = f"recipes/{data}_"
    return {
        "first_order": dict(parent=None, stages=[(r + "first_order", [], None)]),
        "high_order": dict(
            parent="first_order",
            stages=[(r + "first_order", [], "first"), (r + "high_order", [], "second")],
        ),
        "velocity": dict(parent="first_order", stages=[(r + "velocity", [], None)]),
        "finetune": dict(
            parent="velocity",
            stages=[(r + "velocity", [], "first"), (r + "velocity_finetune", [], "second")],
        ),
        "flips": dict(
            parent="finetune",
            stages=[
                (r + "velocity_flips", [], "first"),
                (r + "velocity_finetune", FLIPS, "second"),
            ],
        ),
    }


def _key(recipe: str, over: list[str]) -> str:
    return recipe + (" " + " ".join(over) if over else "")


def cmd_calibrate(args) -> None:
    costs = {}
    for row in stack(args.data).values():
        for recipe, over, _ in row["stages"]:
            key = _key(recipe, over)
            if key not in costs:
                costs[key] = step_seconds(recipe, over, 5)
                print(f"{key}: {costs[key]:.3f} CPU s / step", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration.json").write_text(json.dumps(costs, indent=1))


def _stage_plan(args, row: dict) -> list[tuple[str, list[str], int]]:
    costs = json.loads((args.out / "calibration.json").read_text())
    plan = []
    for recipe, over, part in row["stages"]:
        share = {None: 1.0, "first": 1 - args.stage_share, "second": args.stage_share}[part]
        steps = max(1, round(share * args.budget_min * 60 / costs[_key(recipe, over)]))
        plan.append((recipe, over, steps))
    return plan


def cmd_train(args) -> None:
    rows = stack(args.data)
    for name in args.only or list(rows):
        previous = None
        for i, (recipe, over, steps) in enumerate(_stage_plan(args, rows[name])):
            run_dir = args.out / name / f"stage{i + 1}"
            record = run_dir / "cpu.json"
            if not record.exists():
                every = max(1, steps // 4) if len(rows[name]["stages"]) == 1 else steps
                over = [*over, f"train.steps={steps}", f"train.ckpt_every={every}",
                        "train.keep_last=20"]  # fmt: skip
                if previous is not None:
                    over.append(f"train.init_from={previous}")
                print(f"{name} stage {i + 1}: {recipe} {' '.join(over)}", flush=True)
                t0 = time.process_time()
                train(load_config(recipe, over), run_dir, progress=False)
                cpu = time.process_time() - t0
                record.write_text(json.dumps({"cpu_s": cpu, "steps": steps, "overrides": over}))
            previous = run_dir


def _stages(out: Path, name: str) -> list[Path]:
    return sorted((out / name).glob("stage*"))


def _checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*.json"))


def _evaluate(run_dir: Path, step: int, n: int, what: str, path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    estimator, kind = {
        "uniform": (ODE(), "uniform"),
        "truncated_normal": (ODE(), "truncated_normal"),
        "scoreflow": (ScoreFlow(), "uniform"),
    }[what]
    t0 = time.process_time()
    res = run_likelihood(run_dir, estimator=estimator, n=n, batch_size=250, checkpoint=step,
                         dequantization=kind, progress=False)  # fmt: skip
    record = dict(bpd=res.bpd.tolist(), mean=res.bpd_mean, se=res.bpd_se, n=n, step=step,
                  cpu_s=time.process_time() - t0, policy=res.policy.get("tag", what))  # fmt: skip
    path.write_text(json.dumps(record))
    print(f"{run_dir} step {step} {what}: {res.bpd_mean:.4f} ± {res.bpd_se:.4f} "
          f"({record['cpu_s']:.0f} CPU s)", flush=True)  # fmt: skip
    return record


def cmd_eval(args) -> None:
    rows = stack(args.data)
    for name in args.only or list(rows):
        stages = _stages(args.out, name)
        final = stages[-1]
        step = _checkpoints(final)[-1]
        for what in args.what:
            _evaluate(final, step, args.n, what, args.out / name / f"final_{what}.json")
        if args.n_curve:
            for s, run_dir in enumerate(stages):
                for ck in _checkpoints(run_dir):
                    if run_dir == final and ck == step:
                        continue
                    path = args.out / name / f"curve_stage{s + 1}_{ck}.json"
                    _evaluate(run_dir, ck, args.n_curve, "uniform", path)


def _cpu_min(args, name: str, upto: tuple[int, int] | None = None) -> float:
    """Training CPU-minutes of a row (or up to stage s, checkpoint ck)."""
    total = 0.0
    for s, run_dir in enumerate(_stages(args.out, name)):
        rec = json.loads((run_dir / "cpu.json").read_text())
        if upto is not None and s + 1 == upto[0]:
            return (total + rec["cpu_s"] * upto[1] / rec["steps"]) / 60
        total += rec["cpu_s"]
    return total / 60


def _head(rec: dict, n: int) -> tuple[float, float]:
    """Mean and standard error of a result's first n per-image values."""
    x = torch.tensor(rec["bpd"][:n], dtype=torch.float64)
    return float(x.mean()), float(x.std()) / math.sqrt(len(x))


def _paired(a: dict, b: dict) -> tuple[float, float]:
    d = torch.tensor(a["bpd"], dtype=torch.float64) - torch.tensor(b["bpd"], dtype=torch.float64)
    return float(d.mean()), float(d.std()) / math.sqrt(len(d))


def _cli_result(run: Path, n: int) -> dict:
    """The newest ``sdelab likelihood RUN --n n`` result of a run (ODE, uniform, test split)."""
    found = sorted(
        run.glob(f"likelihood_ode_*_uniform_test_n{n}_*_ema_step*.json"),
        key=lambda p: int(p.stem.rsplit("step", 1)[1]),
    )
    if not found:
        raise SystemExit(f"{run}: no `sdelab likelihood {run} --n {n}` result; run it first")
    rec = json.loads(found[-1].read_text())
    import numpy as np

    bpd = np.load(found[-1].with_suffix(".npz"))["bpd"].tolist()
    cpu = json.loads((run / "cpu.json").read_text())
    step = int(found[-1].stem.rsplit("step", 1)[1])
    return dict(bpd=bpd, mean=rec["bpd_mean"], se=rec["bpd_se"], n=n, step=step,
                cpu_min=cpu["cpu_s"] / 60, policy=rec["tag"])  # fmt: skip


def recipe_table(args) -> list[tuple[str, dict]]:
    runs = [(Path(r).name, _cli_result(Path(r), args.n)) for r in args.recipe_runs]
    runs.sort(key=lambda r: r[1]["cpu_min"])
    print(f"\nWhole runs of one recipe ({runs[0][1]['policy']}; first {args.n} test images):\n")
    print("| run | steps | training CPU-min | ODE bpd, uniform | Δ vs the previous run |")
    print("|---|---:|---:|---:|---:|")
    for i, (name, r) in enumerate(runs):
        delta = "—"
        if i:
            m, se = _paired(r, runs[i - 1][1])
            delta = f"{m:+.4f} ± {se:.4f}"
        print(f"| {name} | {r['step']} | {r['cpu_min']:.1f} | {r['mean']:.4f} ± {r['se']:.4f} "
              f"| {delta} |")  # fmt: skip
    return runs


def cmd_table(args) -> None:
    rows = stack(args.data)
    names = [n for n in rows if (args.out / n / "final_uniform.json").exists()]
    res = {
        n: {w: json.loads(p.read_text())
            for w in ("uniform", "truncated_normal", "scoreflow")
            if (p := args.out / n / f"final_{w}.json").exists()}
        for n in names
    }  # fmt: skip
    first = res[names[0]]["uniform"]
    print(f"{args.data}: first {first['n']} test images, ODE = {first['policy']}; "
          f"budget {args.budget_min:g} CPU-min per row, second stages "
          f"{args.stage_share:.0%} of it. {platform.machine()}, torch {torch.__version__}, "
          f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC.\n")  # fmt: skip
    print("| row | adds to | training CPU-min (steps) | ODE bpd, uniform | Δ vs the row it adds to "
          "| Δ vs first_order | ODE bpd, truncated normal | ScoreFlow bound (SDE) "
          "| bound − ODE |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for n in names:
        r = res[n]
        steps = "+".join(str(json.loads((d / "cpu.json").read_text())["steps"])
                         for d in _stages(args.out, n))  # fmt: skip
        parent = rows[n]["parent"]
        cells = [n, parent or "—", f"{_cpu_min(args, n):.1f} ({steps})",
                 f"{r['uniform']['mean']:.4f} ± {r['uniform']['se']:.4f}"]  # fmt: skip
        for other in (parent, "first_order"):
            if other is None or other == n or other not in res:
                cells.append("—")
            else:
                m, se = _paired(r["uniform"], res[other]["uniform"])
                cells.append(f"{m:+.4f} ± {se:.4f}")
        tn = r.get("truncated_normal")
        cells.append(f"{tn['mean']:.4f} ± {tn['se']:.4f}" if tn else "—")
        sf = r.get("scoreflow")
        if sf:
            m, se = _paired(sf, r["uniform"])
            cells += [f"{sf['mean']:.4f} ± {sf['se']:.4f}", f"{m:+.4f} ± {se:.4f}"]
        else:
            cells += ["—", "—"]
        print("| " + " | ".join(cells) + " |")
    runs = recipe_table(args) if args.recipe_runs else []
    if args.plot:
        plot(args, names, res, runs)


def plot(args, names: list[str], res: dict, runs: list[tuple[str, dict]]) -> None:
    """Test bits/dim against training CPU-minutes, one line per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for n in names:
        pts = []
        for p in sorted((args.out / n).glob("curve_stage*_*.json")):
            s, ck = p.stem.removeprefix("curve_stage").split("_")
            rec = json.loads(p.read_text())
            pts.append((_cpu_min(args, n, (int(s), int(ck))), rec["mean"], rec["se"], rec["n"]))
        pts.append((_cpu_min(args, n), *_head(res[n]["uniform"], args.n_curve), args.n_curve))
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                           marker="o", capsize=3, label=n)  # fmt: skip
    if runs:
        heads = [_head(r, args.n_curve) for _, r in runs]
        ax.errorbar([r["cpu_min"] for _, r in runs], [h[0] for h in heads],
                    yerr=[h[1] for h in heads], marker="s", color="k", capsize=3,
                    label="first_order recipe, whole runs")  # fmt: skip
        for (_, r), h in zip(runs, heads, strict=True):
            ax.annotate(f"{r['step']} steps", (r["cpu_min"], h[0]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")  # fmt: skip
    if args.target:
        bpd, minutes = args.target
        ax.axhline(bpd, color="k", ls=":", lw=1)
        ax.axvline(minutes, color="k", ls=":", lw=1)
    ax.set(xlabel="training CPU-minutes (1 thread)", ylabel="test bits/dim (ODE, uniform)",
           title=f"{args.data}: the technique stack at equal CPU\n(every point: the mean over "
                 f"the first {args.n_curve} test images ± SE)")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["calibrate", "train", "eval", "table"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", default="fashion", choices=["fashion", "digits"])
    p.add_argument("--budget-min", type=float, default=10.0, help="training CPU-min per row")
    p.add_argument("--stage-share", type=float, default=0.25, help="second stage's share")
    p.add_argument("--only", nargs="*", default=None, help="rows (default: all)")
    p.add_argument("--n", type=int, default=1000, help="test images of the final models")
    p.add_argument("--n-curve", type=int, default=250, help="test images of the curve (0: none)")
    p.add_argument("--what", nargs="*", default=["uniform", "truncated_normal", "scoreflow"])
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--recipe-runs", nargs="*", default=[], help="whole runs of one recipe")
    p.add_argument("--target", nargs=2, type=float, default=None, metavar=("BPD", "CPU_MIN"))
    args = p.parse_args()
    torch.set_num_threads(1)
    {"calibrate": cmd_calibrate, "train": cmd_train, "eval": cmd_eval, "table": cmd_table}[
        args.command
    ](args)


if __name__ == "__main__":
    main()
