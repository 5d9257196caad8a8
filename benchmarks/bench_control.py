"""Issue 9 benchmark: controllable generation on scikit-learn's 8×8 digits (17 levels).

Trains on this CPU (one thread):

1. one class-conditional U-Net score run (``model.num_classes: 10``,
   ``model.label_dropout: 0.1``) from the built-in ``images/digits`` config with ``--steps``
   steps, batch ``--batch-size``, score-matching weighting and uniform times (sample quality
   rather than likelihood). Its null-class score s(x, t, ∅) is the *unconditional* model of
   classifier guidance and inpainting, so both guidance kinds share one network and one
   training (and the CPU budget one run);
2. a noise-conditional ConvClassifier for classifier guidance (``train_classifier``, the score
   run's schedule) and, independently (other seed), a **clean** ConvClassifier (t = t_min only)
   that scores the samples.

Then reports

- the clean classifier's accuracy on the 359-image test split;
- class-conditional sampling: for guidance scales S ∈ {0, 1, 2, 4} and both classifier
  guidance (s(x,t,∅) + S ∇ log p_t(y | x), noise-conditional classifier) and
  classifier-free guidance (s(x,t,∅) + S (s(x,t,y) − s(x,t,∅)), conditional run), the share
  of ``--per-class`` samples per class (10 classes) that the clean classifier assigns to the
  requested class (samples quantized to the 17 levels first). S = 0 is unconditional (chance
  ≈ 0.1), S = 1 the conditional distribution;
- inpainting of a central 4×4 square (the replacement method with s(x, t, ∅), PC sampler)
  on ``--n-inpaint`` test images: PSNR over the unknown pixels (pixel values in [0, 1])
  against the held-out originals, of one draw and of the mean of ``--inpaint-draws`` draws
  (a Monte-Carlo posterior mean, the MSE-optimal fill), vs filling the square with the mean
  training image.

Writes PNG grids to ``--images`` (inpainting rows: original, observation, completion, mean fill;
class grids: one row per class for both guidance kinds).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_control.py
"""

from __future__ import annotations

import argparse
import math
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from sdelab.controllable import cfg_score_fn, guided_score_fn, inpaint
from sdelab.data.images import model_to_levels
from sdelab.data.png import save_png_grid
from sdelab.samplers import sample
from sdelab.train.build import load_run, make_run_dataset
from sdelab.train.classifier import load_classifier, train_classifier
from sdelab.train.config import load_config
from sdelab.train.loop import train

SCALES = (0.0, 1.0, 2.0, 4.0)


def _train_score(out: Path, args: argparse.Namespace) -> float:
    """Train the conditional digits run; returns its process CPU seconds."""
    over = [
        f"train.steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        "loss.weighting=score-matching",
        "loss.time_sampling=uniform",
        f"train.ckpt_every={args.steps}",
        "train.log_every=100",
        "model.num_classes=10",
        "model.label_dropout=0.1",
    ]
    t0 = time.process_time()
    train(load_config("images/digits", over), out)
    return time.process_time() - t0


def _quantized(x: torch.Tensor, dataset) -> torch.Tensor:
    """Samples mapped to the 17 levels and back to bin centres (what an image file holds)."""
    levels = model_to_levels(x, dataset.num_levels, data_range=dataset.data_range)
    return dataset.to_model(levels)


def _accuracy(clean, x: torch.Tensor, labels: torch.Tensor, t_min: float) -> float:
    with torch.no_grad():
        pred = clean(x, torch.full((len(x),), t_min)).argmax(1)
    return float((pred == labels).float().mean())


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of pixel values in [0, 1] over all given entries."""
    return 10 * math.log10(1.0 / float(((a - b) ** 2).mean()))


def _upscale(path: Path, factor: int = 4) -> None:
    from PIL import Image

    with Image.open(path) as img:
        big = img.resize((img.width * factor, img.height * factor), Image.NEAREST)
    big.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1000, help="score-model training steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--clf-steps", type=int, default=1500, help="classifier training steps")
    p.add_argument("--per-class", type=int, default=16, help="samples per class and setting")
    p.add_argument("--sample-steps", type=int, default=100, help="Euler–Maruyama steps")
    p.add_argument("--n-inpaint", type=int, default=100)
    p.add_argument("--inpaint-steps", type=int, default=200, help="PC steps")
    p.add_argument("--inpaint-draws", type=int, default=8, help="draws per image (their mean)")
    p.add_argument("--images", default="docs/images", help="folder for the PNG grids")
    p.add_argument("--workdir", default=None, help="keep runs here (default: a temp folder)")
    args = p.parse_args()
    torch.manual_seed(0)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_control_"))
    images = Path(args.images)
    cpu: dict[str, float] = {}

    # ---- training ----------------------------------------------------------------------------
    cond = work / "cond"
    cpu["conditional U-Net, label dropout 0.1"] = _train_score(cond, args)
    t0 = time.process_time()
    kw = dict(steps=args.clf_steps, batch_size=128, width=32, lr=2e-3)
    train_classifier(cond, work / "clf", seed=0, **kw)
    cpu["noise-conditional classifier"] = time.process_time() - t0
    t0 = time.process_time()
    train_classifier(cond, work / "clean", seed=1, clean=True, **kw)
    cpu["clean classifier"] = time.process_time() - t0
    noisy_clf, noisy_meta = load_classifier(work / "clf")
    clean_clf, clean_meta = load_classifier(work / "clean")

    # ---- class-conditional sampling ----------------------------------------------------------
    t0 = time.process_time()
    config, model_c, schedule = load_run(cond)
    model_u = model_c  # called as model(x, t): the null class, i.e. the unconditional score
    dataset = make_run_dataset(config)
    t_min = schedule.t_min
    labels = torch.arange(10).repeat_interleave(args.per_class)
    shape = (len(labels), *dataset.image_shape)
    rows: dict[tuple[str, float], float] = {}
    grids = {}
    for scale in SCALES:
        fns = {
            "classifier guidance": guided_score_fn(
                model_u, noisy_clf, labels, scale, num_classes=10
            ),
            "classifier-free guidance": cfg_score_fn(model_c, labels, scale, num_classes=10),
        }
        for kind, fn in fns.items():
            with torch.no_grad():
                res = sample(
                    fn,
                    schedule,
                    shape,
                    sampler="euler_maruyama",
                    steps=args.sample_steps,
                    generator=int(scale * 10) + 1,
                )
            x = _quantized(res.samples, dataset)
            rows[(kind, scale)] = _accuracy(clean_clf, x, labels, t_min)
            grids[(kind, scale)] = x
    cpu["class-conditional sampling"] = time.process_time() - t0

    # ---- inpainting --------------------------------------------------------------------------
    t0 = time.process_time()
    n = args.n_inpaint
    originals = dataset.to_model(dataset.test_set(n))  # (n, 1, 8, 8) bin centres
    mask = torch.ones(dataset.image_shape)
    mask[:, 2:6, 2:6] = 0.0  # the central 4×4 square is unknown
    draws = args.inpaint_draws
    res = inpaint(
        model_u,
        schedule,
        originals.repeat(draws, 1, 1, 1),  # draw j of image i is row j·n + i
        mask,
        sampler="pc",
        steps=args.inpaint_steps,
        generator=0,
    )
    all_filled = _quantized(res.samples, dataset).reshape(draws, *originals.shape)
    filled = all_filled[0]
    posterior_mean = all_filled.mean(0)  # Monte-Carlo estimate of E[x | observation]
    unknown = (mask == 0).expand_as(originals)

    def pix(x: torch.Tensor) -> torch.Tensor:  # model space [-1, 1] -> [0, 1]
        return ((x + 1) / 2)[unknown]

    train_mean = dataset.to_model(dataset.load("train").levels.double()).mean(0).float()
    baseline = torch.where(unknown, train_mean.expand_as(originals), originals)
    psnr_model, psnr_mean = _psnr(pix(filled), pix(originals)), _psnr(pix(baseline), pix(originals))
    psnr_post = _psnr(pix(posterior_mean), pix(originals))
    cpu["inpainting"] = time.process_time() - t0

    # ---- pictures ----------------------------------------------------------------------------
    k = 8
    save_png_grid(
        [originals[:k], originals[:k] * mask + (mask - 1), filled[:k], baseline[:k]],
        images / "control_inpaint_digits.png",
    )
    for kind, name in (("classifier-free guidance", "cfg"), ("classifier guidance", "clf")):
        x = grids[(kind, 2.0)].reshape(10, args.per_class, *dataset.image_shape)[:, :k]
        save_png_grid(list(x), images / f"control_classes_{name}_digits.png")
    for f in images.glob("control_*_digits.png"):
        _upscale(f)

    # ---- table -------------------------------------------------------------------------------
    print(f"Date: {date.today()}; machine: {platform.machine()}, torch {torch.__version__}, ")
    print(f"{torch.get_num_threads()} thread(s). Score runs: {args.steps} steps, batch ")
    print(f"{args.batch_size}; classifiers: {args.clf_steps} steps, batch 128.\n")
    acc = clean_meta["accuracy"]["0"]
    print(f"Clean classifier (t = t_min), test-split accuracy: **{acc:.3f}** (359 images)")
    noisy = ", ".join(f"u={u}: {v:.3f}" for u, v in noisy_meta["accuracy"].items())
    print(f"Noise-conditional classifier, test accuracy at t = t_min + u(T − t_min): {noisy}\n")
    n_s = 10 * args.per_class
    print(f"Share of samples the clean classifier assigns to the requested class ({n_s} per")
    print(f"cell, {args.per_class} per class; Euler–Maruyama, {args.sample_steps} steps):\n")
    print("| guidance | " + " | ".join(f"S = {s:g}" for s in SCALES) + " |")
    print("|---|" + "---:|" * len(SCALES))
    for kind in ("classifier guidance", "classifier-free guidance"):
        cells = " | ".join(f"{rows[(kind, s)]:.3f}" for s in SCALES)
        print(f"| {kind} | {cells} |")
    se = math.sqrt(0.25 / n_s)
    print(f"\n(binomial standard error ≤ {se:.3f} per cell)\n")
    print(f"Inpainting, central 4×4 of 8×8, {n} test images (PC, {args.inpaint_steps} steps):\n")
    print("| method | PSNR over the unknown pixels (dB) |")
    print("|---|---:|")
    print(f"| score model (replacement method, one draw) | {psnr_model:.2f} |")
    print(f"| score model, mean of {draws} draws (≈ posterior mean) | {psnr_post:.2f} |")
    print(f"| mean training image | {psnr_mean:.2f} |\n")
    print("| stage | CPU time (s) |")
    print("|---|---:|")
    for name, secs in cpu.items():
        print(f"| {name} | {secs:.0f} |")
    print(f"| total | {sum(cpu.values()):.0f} |")


if __name__ == "__main__":
    main()
