"""Cost per training step of high-order denoising score matching against first order (issue 32).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_high_order.py [--steps 8] [--fashion]

For the digits recipe's U-Net (``recipes/digits_first_order``; ``--fashion`` adds
``recipes/fashion_first_order``) one optimizer step (batch, loss, backward, clipping, Adam,
EMA: :func:`sdelab.train.loop.train_step`) is timed in CPU seconds (``time.process_time``,
one torch thread) for ``loss.score_matching_order`` 1, 2 (Lu et al.'s Frobenius + trace form;
i-DODE's trace form) and 3, all in fp32 (orders 2 and 3 run the network in fp32 even under
autocast: forward-mode autodiff has no autocast rules), plus order 1 with the recipe's own
``mixed_precision: auto`` (bf16 where the CPU has it). Two warm-up steps, then the median of
``--steps`` steps. Prints a Markdown table: CPU s/step and the ratio to fp32 first order.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import tempfile
import time

import torch

from sdelab.train.build import build_run
from sdelab.train.config import load_config
from sdelab.train.loop import train_step

VARIANTS = [
    ("1 (bf16 where native)", ["loss.score_matching_order=1"]),
    ("1", ["loss.score_matching_order=1", "train.mixed_precision=no"]),
    ("2, full (Lu et al.)", ["loss.score_matching_order=2", "train.mixed_precision=no"]),
    (
        "2, trace (i-DODE fine-tuning)",
        [
            "loss.score_matching_order=2",
            "loss.second_order_form=trace",
            "loss.high_order_weight=0.1",
            "train.mixed_precision=no",
        ],
    ),
    ("3 (Lu et al.)", ["loss.score_matching_order=3", "train.mixed_precision=no"]),
]


def step_seconds(config_name: str, overrides: list[str], steps: int) -> float:
    """Median CPU seconds of one training step after two warm-up steps."""
    config = load_config(config_name, [*overrides, "train.memory_check=false"])
    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(config, tmp)
        for _ in range(2):
            train_step(run)
        times = []
        for _ in range(steps):
            start = time.process_time()
            train_step(run)
            times.append(time.process_time() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--fashion", action="store_true", help="also the Fashion-MNIST U-Net")
    args = parser.parse_args()
    torch.set_num_threads(1)
    configs = ["recipes/digits_first_order"] + (["recipes/fashion_first_order"] * args.fashion)
    print(
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
        f"{platform.processor() or 'cpu'}, torch {torch.__version__}, 1 thread, median of "
        f"{args.steps} steps"
    )
    for name in configs:
        cfg = load_config(name)
        print(f"\n{name} (batch {cfg.train.batch_size}, base_channels {cfg.model.base_channels})\n")
        print("| score_matching_order | CPU s / step | × first order (fp32) |")
        print("|---|---|---|")
        rows = [(label, step_seconds(name, over, args.steps)) for label, over in VARIANTS]
        ref = dict(rows)["1"]
        for label, sec in rows:
            print(f"| {label} | {sec:.3f} | {sec / ref:.2f} |", flush=True)


if __name__ == "__main__":
    main()
