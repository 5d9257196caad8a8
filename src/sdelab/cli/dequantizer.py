"""``sdelab train-dequantizer``: a variational dequantizer for a trained image run."""

from __future__ import annotations

import argparse
import json

from sdelab.nets.dequantizer import DEQUANTIZER_PRESETS
from sdelab.train.dequantizer import train_dequantizer_run


def _train_dequantizer(args: argparse.Namespace) -> int:
    """Train a variational dequantizer q(u | k) (a Flow++-style conditional flow) for a trained
    image run, whose score model stays frozen (ScoreFlow's train_deq): it minimises the
    ScoreFlow bound of −log p(a(k+u)/L + b) + log q(u | k). Use it with sdelab likelihood RUN
    --dequantizer DIR. Progress goes to stderr; SIGTERM or Ctrl-C saves a checkpoint, and
    --resume continues it."""
    path = train_dequantizer_run(
        args.run,
        args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        preset=args.preset,
        ema_decay=args.ema_decay,
        n_samples=args.n_samples,
        ckpt_every=args.ckpt_every,
        log_every=args.log_every,
        seed=args.seed,
        resume=args.resume,
    )
    record = json.loads(path.read_text())
    print(f"dequantizer ({record['flow']['couplings']} couplings) -> {path.parent}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to ``sub``."""
    p = sub.add_parser(
        "train-dequantizer",
        help="train a variational dequantizer for an image run",
        description=_train_dequantizer.__doc__,
        epilog="examples:\n"
        "  sdelab train-dequantizer runs/digits --steps 600 --out runs/digits-deq\n"
        "  sdelab train-dequantizer runs/digits --steps 1200 --out runs/digits-deq --resume\n"
        "  sdelab likelihood runs/digits --dequantizer runs/digits-deq --probes 1\n"
        "  sdelab train-dequantizer runs/c10 --preset flowpp --out runs/c10-deq   # Flow++ size",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="image run folder written by sdelab train")
    p.add_argument(
        "--out", required=True, metavar="DIR", help="dequantizer folder (new, or --resume)"
    )
    p.add_argument("--steps", type=int, default=2000, help="training steps (default 2000)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument(
        "--preset", default="small", choices=sorted(DEQUANTIZER_PRESETS), help="flow size (small)"
    )
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights (0.999)")
    p.add_argument("--n-samples", type=int, default=2, help="bound draws per image (default 2)")
    p.add_argument("--ckpt-every", type=int, default=500, help="checkpoint every N steps (500)")
    p.add_argument("--log-every", type=int, default=50, help="log every N steps (50)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--resume", action="store_true", help="continue the folder in --out")
    p.set_defaults(func=_train_dequantizer)
