"""Colorization (issue 9) on tinted digits: an RGB data set that trains on a CPU.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_colorize.py     # ≈ 10 CPU-min

There is no small colour data set on this machine, so this script makes one: every 8×8
scikit-learn digit (its own fixed train/test split) is drawn in one random fully saturated hue
(HSV(h, 1, 1), h uniform), pixel = round(255 · level/16 · rgb(h)), and written as PNG files in
``root/{train,test}/<digit>/`` — the ``folder`` data set's layout. A small U-Net
(``images/digits`` with 3 channels) trains on it through ``sdelab train``; then the test images'
gray versions (channel mean) are coloured with :func:`sdelab.controllable.colorize` (Score-SDE's
decoupled-space inpainting: the gray channel is fixed, the two chroma channels are sampled).

Reports, over ``--n`` random test images: PSNR of one colourisation against the true colour
image, vs the gray image itself (R = G = B = gray) as the baseline — the hue is drawn
uniformly and cannot be read from the gray image, so a *draw* is not expected to beat gray on
PSNR; the hue coherence of the ink pixels (1 when an image has one hue, as the data do; near
0 for unrelated hues), which says whether the colourisations look like the data; the largest
deviation of the samples' channel mean from the given gray (it must be float rounding); and
the CPU times.
Writes a PNG (rows: original, gray input, three colourisations) to ``--png``.
"""

from __future__ import annotations

import argparse
import colorsys
import datetime
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdelab.controllable import colorize
from sdelab.data.images import load_image_dataset
from sdelab.data.png import save_png_grid
from sdelab.train.build import load_run, make_run_dataset
from sdelab.train.config import load_config
from sdelab.train.loop import train


def write_tinted_digits(root: Path, seed: int = 0) -> None:
    """The tinted-digits folder data set under ``root`` (train and test splits)."""
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        data = load_image_dataset("digits", split=split)
        levels = data.levels.numpy()[:, 0].astype(np.float64) / 16.0  # (N, 8, 8) in [0, 1]
        for i, (img, label) in enumerate(zip(levels, data.labels.tolist(), strict=True)):
            rgb = np.array(colorsys.hsv_to_rgb(rng.uniform(), 1.0, 1.0))
            pix = np.round(255.0 * img[..., None] * rgb).astype(np.uint8)  # (8, 8, 3)
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pix, mode="RGB").save(folder / f"{i:04d}.png")


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of model-space images in [−1, 1], computed on [0, 1] pixel values."""
    mse = (((a - b) / 2) ** 2).mean()
    return float(10 * torch.log10(1.0 / mse))


def hue_coherence(x: torch.Tensor, threshold: float = 0.25) -> float:
    """Mean over images of |mean over ink pixels of e^{i·hue}|, the ink being the pixels whose
    max(R, G, B) exceeds ``threshold``, for model-space images in [−1, 1] (hue angle
    atan2(√3 (G − B), 2R − G − B)). 1 when each image has one hue, as the tinted data do;
    near 0 for pixels of unrelated hues."""
    rgb = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)  # (n, H, W, 3)
    r, g, b = rgb.unbind(-1)
    z = torch.complex(2 * r - g - b, math.sqrt(3) * (g - b))
    ink = (rgb.max(dim=-1).values > threshold) & (z.abs() > 1e-6)
    unit = torch.where(ink, z / z.abs().clamp_min(1e-12), torch.zeros_like(z))
    per_image = unit.sum(dim=(1, 2)).abs() / ink.sum(dim=(1, 2)).clamp_min(1)
    return float(per_image[ink.any(dim=(1, 2))].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps")
    parser.add_argument("--n", type=int, default=100, help="test images to colour")
    parser.add_argument("--sample-steps", type=int, default=200, help="PC steps")
    parser.add_argument("--png", default="docs/images/colorize_tinted_digits.png")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root, run_dir = Path(tmp) / "tinted", Path(tmp) / "run"
        write_tinted_digits(root)
        over = [
            "data.name=folder",
            f"data.options={{root: {root}, channels: 3, size: 8, data_range: '[-1,1]'}}",
            f"train.steps={args.steps}",
            f"train.ckpt_every={args.steps}",
            "train.log_every=100",
        ]
        t0 = time.process_time()
        train(load_config("images/digits", over), run_dir)
        train_cpu = time.process_time() - t0

        config, model, schedule = load_run(run_dir)
        dataset = make_run_dataset(config)
        levels = dataset.test_set(10_000)  # the whole test split, sorted by class folder
        pick = torch.randperm(len(levels), generator=torch.Generator().manual_seed(0))
        x = dataset.to_model(levels[pick[: args.n]])  # (n, 3, 8, 8), bin centres in [−1, 1]
        gray = x.mean(dim=1, keepdim=True)
        t0 = time.process_time()
        with torch.no_grad():
            res = colorize(
                model, schedule, gray, sampler="pc", steps=args.sample_steps, generator=0
            )
            more = colorize(
                model,
                schedule,
                gray[:8].repeat(2, 1, 1, 1),
                sampler="pc",
                steps=args.sample_steps,
                generator=1,
            )
        color_cpu = time.process_time() - t0
        out = res.samples.clamp(-1, 1)
        gray_err = float((res.samples.mean(dim=1, keepdim=True) - gray).abs().max())
        psnr_model = _psnr(out, x)
        psnr_gray = _psnr(gray.expand_as(x), x)
        coh_data, coh_model = hue_coherence(x), hue_coherence(out)

        k = 8
        draws = more.samples.clamp(-1, 1).reshape(2, k, *x.shape[1:])
        png = save_png_grid(
            [x[:k], gray[:k].expand(-1, 3, -1, -1), out[:k], draws[0], draws[1]], args.png
        )
        with Image.open(png) as img:
            factor = max(1, 400 // img.width)
            big = img.resize((img.width * factor, img.height * factor), Image.NEAREST)
        big.save(png)

    print("## Colorization on tinted digits (issue 9)\n")
    print(
        f"Date: {datetime.date.today()}. Machine: {platform.machine()}, torch "
        f"{torch.__version__}, {args.threads} thread(s). U-Net `images/digits` with 3 channels, "
        f"{args.steps} steps; PC sampler (reverse diffusion + Langevin), "
        f"{args.sample_steps} steps; {args.n} test images.\n"
    )
    print("| colourisation | PSNR vs the true colours (dB) |")
    print("|---|---:|")
    print(f"| score model, one draw | {psnr_model:.2f} |")
    print(f"| gray image (R = G = B = gray) | {psnr_gray:.2f} |")
    print(
        f"\nHue coherence of the ink (|mean e^(i·hue)| over pixels with max(R, G, B) > 0.25, "
        f"1 = one hue per image): data {coh_data:.3f}, colourisations {coh_model:.3f}."
    )
    print(f"Largest |channel mean of a sample − given gray|: {gray_err:.1e}")
    print(f"CPU: training {train_cpu / 60:.1f} min, colourisation {color_cpu / 60:.1f} min.")
    print(f"PNG (rows: original, gray input, three colourisations): `{png}`")


if __name__ == "__main__":
    main()
