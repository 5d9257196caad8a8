"""Issue 21 benchmark: sample quality of a trained image run per sampler, with the metric's floor.

For a trained run (e.g. ``sdelab train images/digits``) and a clean classifier of its data
(``sdelab train-classifier RUN --clean``, trained here when ``--classifier`` is not given), it
prints a markdown table of the Fréchet distance of the classifier's penultimate features and
KID (100 subsets of ``--kid-subset-size`` rows) against the test split for Euler–Maruyama
(1000 steps), predictor–corrector, DPM-Solver++
at about 20 and 50 NFE and the probability-flow ODE (RK4), and the floor: the same metrics of
the training split against the test split (real data against real data).

    python benchmarks/bench_quality_samplers.py runs/digits [--classifier runs/digits-clean]
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date
from pathlib import Path

import torch

from sdelab.quality import collect_features, evaluate_quality
from sdelab.runs import data_split, make_extractor, open_run, run_quality
from sdelab.train.classifier import train_classifier

SAMPLERS = [  # (label, sampler, steps, options)
    ("Euler–Maruyama, 1000 steps", "euler_maruyama", 1000, {}),
    ("PC (reverse diffusion + Langevin), 500 steps", "pc", 500, {}),
    ("DPM-Solver++, 19 steps", "dpm_solver", 19, {}),
    ("DPM-Solver++, 49 steps", "dpm_solver", 49, {}),
    ("probability-flow ODE, RK4, 25 steps", "ode", 25, {"method": "rk4"}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a trained image run folder")
    parser.add_argument("--classifier", help="clean classifier folder (trained if absent)")
    parser.add_argument("--clf-steps", type=int, default=1500)
    parser.add_argument("--n", type=int, default=None, help="samples (default: test split size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kid-subset-size", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    loaded = open_run(args.run)
    dataset = loaded.dataset
    clf = args.classifier
    if clf is None:
        clf = str(Path(args.run).parent / (Path(args.run).name + "-clean-clf"))
        if not Path(clf, "classifier.json").exists():
            train_classifier(args.run, clf, steps=args.clf_steps, width=32, clean=True, seed=1)
    extractor = make_extractor("classifier", dataset, classifier=clf)
    test = data_split(dataset, "test", None)
    n = args.n or len(test)
    gen = torch.Generator().manual_seed(args.seed)
    ref = collect_features(extractor, test.split(500))
    train = data_split(dataset, "train", n)
    floor = evaluate_quality(
        collect_features(extractor, train.split(500), probs=True),
        ref,
        "fd,kid,is",
        kid_subset_size=args.kid_subset_size,
        generator=gen,
    )
    print(
        f"# Sample quality per sampler — {date.today()}, {platform.machine()}, "
        f"{torch.get_num_threads()} torch threads"
    )
    print(
        f"run {args.run} ({dataset.name}), clean classifier {clf}, {n} samples each, "
        f"reference: the {len(test)} test images\n"
    )
    print("| samples | NFE | FD (classifier features) | KID × 100 | IS | CPU s |")
    print("|---|---|---|---|---|---|")
    print(
        f"| training split (the floor) | – | {floor.fd:.3f} | {100 * floor.kid:.2f} ± "
        f"{100 * floor.kid_sd:.2f} | {floor.inception_score:.2f} | – |"
    )
    for label, sampler, steps, options in SAMPLERS:
        c0 = time.process_time()
        ev = run_quality(
            loaded,
            metrics="fd,kid,is",
            features="classifier",
            classifier=clf,
            n=n,
            sampler=sampler,
            steps=steps,
            seed=args.seed,
            options=options,
            kid_subset_size=args.kid_subset_size,
            progress=False,
        )
        r = ev.result
        print(
            f"| {label} | {ev.nfe} | {r.fd:.3f} | {100 * r.kid:.2f} ± {100 * r.kid_sd:.2f} | "
            f"{r.inception_score:.2f} | {time.process_time() - c0:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
