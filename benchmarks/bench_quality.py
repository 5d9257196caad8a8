"""Issue 21 benchmark: what the offline sample-quality metrics cost, and their floor on digits.

1. Cost on this CPU (one thread) of each metric on Inception-sized features (F = 2048), and
   the FID Inception-v3's forward throughput (random weights: the cost does not depend on them).
2. On scikit-learn's 8×8 digits, with the penultimate features of a clean ConvClassifier
   (``fit_classifier(..., clean=True)`` on the training split, VP schedule, t = t_min; the
   network ``sdelab train-classifier --clean`` trains) and with raw pixels: FD, KID,
   precision/recall and the classifier's Inception-style score of

   - the training split against the test split: the metric's floor (two samples of the same
     law, 1438 vs 359 images), what a perfect sampler would score at this n;
   - the training split with Gaussian noise of sd σ ∈ {0.1, 0.2, 0.4} (model space [−1, 1])
     and with its pixels shuffled (one fixed permutation): known degradations. They are made
     from the training images so that, like samples, they are independent of the reference
     (degraded copies of the reference images themselves would score below the floor).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_quality.py
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from sdelab.data.image_data import ImageData
from sdelab.metrics import (
    feature_moments,
    frechet_distance,
    kid,
    precision_recall,
    sliced_w2,
)
from sdelab.nets.classifier import ConvClassifier
from sdelab.nets.inception import FIDInceptionV3
from sdelab.quality import ClassifierFeatures, IdentityFeatures, collect_features, evaluate_quality
from sdelab.sde import make_schedule
from sdelab.train.classifier import fit_classifier


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def cost_table(n: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2048, generator=g, dtype=torch.float64)
    y = 0.5 + torch.randn(n, 2048, generator=g, dtype=torch.float64)
    (mx, cx), t_mom = _timed(lambda: feature_moments(x))
    my, cy = feature_moments(y)
    _, t_fd = _timed(lambda: frechet_distance(mx, cx, my, cy))
    _, t_kid = _timed(lambda: kid(x, y, num_subsets=100, subset_size=1000, generator=g))
    _, t_pr = _timed(lambda: precision_recall(x, y, k=3))
    _, t_sw = _timed(lambda: sliced_w2(x, y, num_projections=256, generator=g))
    net = FIDInceptionV3().eval()
    imgs = torch.rand(8, 3, 32, 32, generator=g)
    with torch.no_grad():
        net(imgs[:1])  # warm-up
        _, t_inc = _timed(lambda: net(imgs))
    print(f"Cost, F = 2048 features, n = {n} per set (one thread):\n")
    print("| step | seconds |")
    print("|---|---:|")
    print(f"| mean + covariance of one set | {t_mom:.2f} |")
    print(f"| Fréchet distance from two (mu, sigma) | {t_fd:.2f} |")
    print(f"| KID, 100 subsets of 1000 | {t_kid:.2f} |")
    print(f"| precision/recall, k = 3 | {t_pr:.2f} |")
    print(f"| sliced W2, 256 directions | {t_sw:.2f} |")
    print(f"| FID Inception-v3 forward, 8 images 32→299 | {t_inc:.2f} ({8 / t_inc:.1f} img/s) |")


def digits_table(clf_steps: int) -> None:
    data = ImageData("digits")
    schedule = make_schedule("vp")
    torch.manual_seed(0)
    net = ConvClassifier(1, 10, channels=32, image_shape=data.image_shape)
    train_levels = data.load("train").levels.to(torch.int64)
    train = data.to_model(train_levels)  # bin centres
    test = data.to_model(data.test_set(10_000))
    (_, t_fit) = _timed(
        lambda: fit_classifier(
            net,
            data.sample_labeled,
            schedule,
            steps=clf_steps,
            batch_size=128,
            lr=2e-3,
            clean=True,
        )
    )
    with torch.no_grad():
        t = torch.full((len(test),), schedule.t_min)
        acc = float((net(test, t).argmax(1) == data.test_labels).double().mean())
    clf = ClassifierFeatures(net, t=schedule.t_min)
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(data.dim, generator=g)
    sets = {"train split (floor)": train}
    for sd in (0.1, 0.2, 0.4):
        sets[f"train + N(0, {sd}²) noise"] = train + sd * torch.randn(train.shape, generator=g)
    sets["train, pixels shuffled"] = train.reshape(len(train), -1)[:, perm].reshape(train.shape)
    ref = {
        "classifier": collect_features(clf, [test]),
        "pixels": collect_features(IdentityFeatures(), [test]),
    }
    print(
        f"\nDigits: clean ConvClassifier ({clf_steps} steps, {t_fit:.0f} s), test accuracy "
        f"{acc:.3f}; reference = the {len(test)}-image test split.\n"
    )
    print(
        "| set (vs the test split) | FD (clf) | KID (clf) | P / R (clf) | IS (clf) | FD (pixels) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    r_test = evaluate_quality(
        collect_features(clf, [test], probs=True), ref["classifier"], ["is"], is_splits=1
    )
    for name, x in sets.items():
        fc = collect_features(clf, [x], probs=True)
        r = evaluate_quality(
            fc,
            ref["classifier"],
            ["fd", "kid", "pr", "is"],
            kid_subsets=50,
            kid_subset_size=300,
            is_splits=1,
            generator=g,
        )
        rp = evaluate_quality(collect_features(IdentityFeatures(), [x]), ref["pixels"], ["fd"])
        print(
            f"| {name} | {r.fd:.3f} | {r.kid:.4f} ± {r.kid_sd:.4f} | "
            f"{r.precision:.2f} / {r.recall:.2f} | {r.inception_score:.2f} | {rp.fd:.2f} |"
        )
    print(f"\n(IS of the test split itself: {r_test.inception_score:.2f}; at most 10 classes)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000, help="rows per set in the cost table")
    p.add_argument("--clf-steps", type=int, default=1500, help="classifier training steps")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {platform.machine()}, {time.strftime('%Y-%m-%d')}\n")
    cost_table(args.n)
    digits_table(args.clf_steps)


if __name__ == "__main__":
    main()
