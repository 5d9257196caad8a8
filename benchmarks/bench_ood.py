"""Out-of-distribution detection by likelihood, measured: raw bits/dim, the complexity-corrected
score and the likelihood ratio across noise levels.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ood.py --run RUN [--n 500]
        [--sigmas 0.05,0.2] [--save scores.npz] [--plot docs/images/ood_scores.png]

RUN is a Fashion-MNIST run trained on classes 0–4 only, e.g.
``sdelab train images/fashion_mnist_small 'data.options.classes=[0,1,2,3,4]' --out RUN``.
Three sets of ``--n`` images are scored with the run's EMA model:

- *in*: test images of classes 0–4 (T-shirt/top, trouser, pullover, dress, coat);
- *out*: test images of classes 5–9 (sandal, shirt, sneaker, bag, ankle boot);
- *far*: scikit-learn's 8×8 digits (test split first, then training), 17 levels mapped to 256
  and resized to 28×28 (:func:`sdelab.data.images.requantize`).

Per image: test bits/dim by the default ODE estimator (uniform dequantization, one draw,
seed 0), the PNG code length in bits/dim (:func:`sdelab.likelihood.ood.compression_bits_per_dim`),
and for each noise level σ the bits/dim of detail finer than σ
(:func:`sdelab.likelihood.ood.noise_level_log_ratio`, the randomized rule with its step count
scaled to the band's share of the log-SNR range). Scores (higher = more likely out):
raw bpd; bpd − PNG bits/dim (Serrà et al. 2020); the fine part at σ; the coarse part
bpd − fine. Prints the mean of each per set and the AUROC (± Hanley–McNeil SE) of every score
for in vs out and in vs far.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import time

import numpy as np
import torch

from sdelab.data import make_dataset
from sdelab.data.images import load_digits, requantize
from sdelab.likelihood import ODE, Levels, bits_per_dim
from sdelab.likelihood.dequantization import dequantize
from sdelab.likelihood.ood import auroc, compression_bits_per_dim, noise_level_log_ratio
from sdelab.likelihood.options import EXPONENTIAL_STEPS, Randomized, default_policy
from sdelab.progress import Progress
from sdelab.train.build import dequantization_options, load_run, make_run_dataset


def time_of_sigma(sched, sigma: float) -> float:
    """The time where σ(t) = sigma (bisection; σ increases with t)."""
    lo, hi = sched.t_min, sched.T
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        s = float(sched.alpha_sigma(torch.tensor(mid, dtype=torch.float64))[1])
        lo, hi = (mid, hi) if s < sigma else (lo, mid)
    return 0.5 * (lo + hi)


def band_steps(sched, t: float) -> int:
    """The default step count scaled to the share of the log-SNR range in [t_min, t]."""
    lam = sched.log_snr(torch.tensor([sched.t_min, t, sched.T], dtype=torch.float64))
    share = float((lam[0] - lam[1]) / (lam[0] - lam[2]))
    return max(8, math.ceil(EXPONENTIAL_STEPS * share))


def image_sets(run: str, n: int):
    """{name: levels (n, 1, 28, 28)} and the run's (config, model, schedule, dequantization)."""
    config, model, sched = load_run(run)
    dataset = make_run_dataset(config)
    kept = getattr(dataset, "classes_kept", None)
    if dataset.name != "fashion_mnist" or kept is None:
        raise SystemExit(
            f"{run} is not a Fashion-MNIST run on a subset of classes (data.options.classes): "
            "train one with 'data.options.classes=[0,1,2,3,4]'"
        )
    full = make_dataset("fashion_mnist", root=dataset.root)
    labels = full.test_labels
    k_all = full.test_set(len(labels))
    inside = torch.isin(labels, torch.tensor(kept))
    digits = torch.cat([load_digits(split="test").levels, load_digits(split="train").levels])
    sets = {
        "in": k_all[inside][:n],
        "out": k_all[~inside][:n],
        "far": requantize(digits[:n], 17, 256, size=28),
    }
    return sets, (config, model, sched, dequantization_options(dataset)), kept


def score_set(name, k, model, sched, deq, sigmas, batch: int):
    """Per-image bpd, its error (nats), PNG bits/dim, and the fine part at each σ."""
    levels = Levels(deq["levels"], deq["scale"], deq["shift"])
    out = {"bpd": [], "error": [], "png": [], **{f"fine{s}": [] for s in sigmas}}
    times = {s: time_of_sigma(sched, s) for s in sigmas}
    bar = Progress(len(k), f"{name}: images")
    for i in range(0, len(k), batch):
        kb = k[i : i + batch]
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            res = bits_per_dim(model, kb, levels, schedule=sched, estimator=ODE(), generator=g)
        out["bpd"].append(res.bpd.double())
        out["error"].append(res.error.double())
        out["png"].append(compression_bits_per_dim(kb))
        y = dequantize(kb, levels.num_levels, levels.scale, levels.shift,
                       generator=torch.Generator().manual_seed(i)).y  # fmt: skip
        for s in sigmas:
            t = times[s]
            rnd = Randomized(steps=band_steps(sched, t))
            with torch.no_grad():
                gb = torch.Generator().manual_seed(i + 1)
                band = noise_level_log_ratio(model, sched, y, t, integrator=rnd, generator=gb)
            out[f"fine{s}"].append(band.bits_per_dim.double())
        bar.update(len(kb))
    bar.close()
    return {key: torch.cat(v) for key, v in out.items()}, times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a Fashion-MNIST run trained on classes 0–4")
    p.add_argument("--n", type=int, default=500, help="images per set")
    p.add_argument("--sigmas", default="0.05,0.2", help="noise levels of the band split")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--save", default=None, help="write every per-image score to this .npz")
    p.add_argument("--plot", default=None, help="draw the score histograms to this PNG")
    args = p.parse_args()
    sigmas = [float(s) for s in args.sigmas.split(",") if s]
    sets, (_, model, sched, deq), kept = image_sets(args.run, args.n)
    policy = default_policy(sets["in"].shape[1:])
    print(f"Command: bench_ood.py --run {args.run} --n {args.n} --sigmas {args.sigmas}")
    now = datetime.datetime.now(datetime.UTC)
    print(f"Date: {now:%Y-%m-%d %H:%M} UTC. Machine: {platform.machine()}, "
          f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}. "
          f"Run: {args.run} (classes {list(kept)}). ODE: {policy.tag}.")  # fmt: skip
    scores, cpu = {}, {}
    for name, k in sets.items():
        t0 = time.process_time()
        scores[name], times = score_set(name, k, model, sched, deq, sigmas, args.batch)
        cpu[name] = time.process_time() - t0
    # the scores: higher = more likely out of distribution
    kinds = {"raw bpd": lambda s: s["bpd"], "bpd − PNG bits/dim": lambda s: s["bpd"] - s["png"]}
    for sg in sigmas:
        kinds[f"fine part, σ < {sg:g}"] = lambda s, sg=sg: s[f"fine{sg}"]
        kinds[f"coarse part, σ ≥ {sg:g}"] = lambda s, sg=sg: s["bpd"] - s[f"fine{sg}"]
    print()
    print("| set | images | bpd | PNG bits/dim | "
          + " | ".join(f"fine part σ < {sg:g} (t = {times[sg]:.3g})" for sg in sigmas)
          + " | largest per-image error bar (nats) | CPU s |")  # fmt: skip
    print("|---|---:|---:|---:|" + "---:|" * len(sigmas) + "---:|---:|")
    for name, s in scores.items():
        n = len(s["bpd"])

        def pm(v, n=n):
            return f"{float(v.mean()):.3f} ± {float(v.std() / math.sqrt(n)):.3f}"

        fine = " | ".join(pm(s[f"fine{sg}"]) for sg in sigmas)
        print(f"| {name} | {n} | {pm(s['bpd'])} | {pm(s['png'])} | {fine} "
              f"| {float(s['error'].max()):.3g} | {cpu[name]:.0f} |")  # fmt: skip
    print()
    print("| score (higher = out) | AUROC in vs out (classes 5–9) | AUROC in vs far (digits) |")
    print("|---|---:|---:|")
    for label, fn in kinds.items():
        a_out = auroc(fn(scores["in"]), fn(scores["out"]))
        a_far = auroc(fn(scores["in"]), fn(scores["far"]))
        print(f"| {label} | {a_out} | {a_far} |")
    if args.save:
        np.savez(args.save, **{f"{n}_{k}": v.numpy() for n, s in scores.items()
                               for k, v in s.items()})  # fmt: skip
    if args.plot:
        plot(scores, args.plot)


def plot(scores, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    labels = {"in": "in: classes 0–4", "out": "out: classes 5–9", "far": "far: digits 28×28"}
    for ax, (title, fn) in zip(
        axes,
        [("raw bits/dim", lambda s: s["bpd"]),
         ("bits/dim − PNG bits/dim", lambda s: s["bpd"] - s["png"])],
        strict=True,
    ):  # fmt: skip
        for name, s in scores.items():
            ax.hist(fn(s).numpy(), bins=40, alpha=0.5, label=labels[name], density=True)
        ax.set_xlabel(title)
        ax.set_ylabel("density")
    axes[0].legend(frameon=False)
    fig.suptitle("Fashion-MNIST model of classes 0–4: scores of three image sets")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
