"""U-Net training speed on this CPU (issue 22, item 1): ours against diffusers, options, profile.

    .venv/bin/pip install diffusers        # the peer; installs beside torch==2.13.0
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_unet_speed.py [--reps 7] [--compile]

For the networks of ``images/digits`` (8×8, batch 128) and ``images/fashion_mnist_small``
(28×28, batch 64) it prints three tables:

1. **Peer**: one training step (forward, ε-MSE loss, backward, Adam) of our ``UNet`` and of
   diffusers' ``UNet2DModel`` built with the same depth, widths, blocks per level, middle
   attention, GroupNorm groups and time-embedding width — the parameter counts are printed
   and must be equal — in fp32, under bf16 autocast, and in channels_last. ``peer/ours`` is
   the peer's time over ours: ≥ 1 means ours is at least as fast.
2. **Options**: our whole ``train_step`` (data batch, time sampling, loss, backward, clipping,
   Adam, EMA) built from the config with ``train.mixed_precision=bf16``,
   ``train.channels_last=true``, two threads, and with ``--compile`` also
   ``train.compile=true`` (compilation takes minutes on this CPU; its time is printed).
3. **Profile**: where one fp32 step of ours spends its self CPU time (torch.profiler), the
   FLOPs of a forward + backward (``torch.utils.flop_counter``) and the FLOP/s that gives,
   against the measured peak of a large conv and matmul on this CPU (fp32 and bf16).

The machine's two cores are shared with other jobs, so every table times its variants
*interleaved* (one step of each in turn, ``--reps`` rounds after warm-up) and reports medians;
compare the ratios, which one run measures under the same load, more than absolute times.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from sdelab.nets.unet import UNet
from sdelab.train.build import build_run, make_run_dataset, resolve_config
from sdelab.train.config import load_config
from sdelab.train.loop import train_step

CONFIGS = (("images/digits", 128), ("images/fashion_mnist_small", 64))


def diffusers_unet(kwargs: dict) -> torch.nn.Module:
    """diffusers' ``UNet2DModel`` with the layout of ``UNet(**kwargs)``: the same channels per
    level, residual blocks per level (one more going up), strided-conv down / conv up
    sampling, middle res–attention–res, GroupNorm groups and ε, and a 4·base time embedding
    of a sinusoidal base-width feature. Raises ImportError with the install line."""
    try:
        from diffusers import UNet2DModel
    except ImportError as e:  # the peer is optional
        raise ImportError("the peer needs diffusers: .venv/bin/pip install diffusers") from e
    if kwargs.get("fourier_features") or kwargs.get("num_classes") or kwargs.get("dropout"):
        raise ValueError("the peer U-Net has no Fourier features, classes or dropout here")
    h, _ = kwargs["image_size"]
    mults = kwargs["channel_mults"]
    widths = tuple(kwargs["base_channels"] * m for m in mults)
    attn = [h // 2**i in kwargs["attn_resolutions"] for i in range(len(mults))]
    return UNet2DModel(
        sample_size=h,
        in_channels=kwargs["in_channels"],
        out_channels=kwargs["in_channels"],
        block_out_channels=widths,
        layers_per_block=kwargs["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        norm_num_groups=kwargs["num_groups"],
        norm_eps=1e-6,
        add_attention=kwargs["mid_attention"],
        attention_head_dim=widths[-1] // kwargs["attn_heads"],
        downsample_type="conv",
        upsample_type="conv",
        time_embedding_type="positional",
        flip_sin_to_cos=False,
        freq_shift=0,
    )


def _net_kwargs(name: str) -> dict:
    config = load_config(name)
    config = resolve_config(config, make_run_dataset(config))
    return config.model.unet_kwargs()


def _net_step(
    net: torch.nn.Module, call: Callable, batch: int, shape: tuple, bf16: bool, cl: bool
) -> Callable[[], None]:
    """One ε-MSE training step of ``net`` on a fixed random batch (the cost does not depend
    on the values)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=g)
    eps = torch.randn(batch, *shape, generator=g)
    t = torch.rand(batch, generator=g).clamp(1e-3, 1)
    if cl:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = call(net, x, t)
        (out.float() - eps).square().mean().backward()
        opt.step()

    return step


def _interleaved(steps: dict[str, Callable[[], None]], reps: int, warmup: int = 2) -> dict:
    """Median seconds of each step, timing one of each in turn for ``reps`` rounds: the CPU
    time of this process (what the shared cores actually gave us; the sum over threads)."""
    return {k: cpu for k, (cpu, _) in _interleaved_both(steps, reps, warmup).items()}


def _interleaved_both(steps: dict, reps: int, warmup: int = 2) -> dict[str, tuple[float, float]]:
    """:func:`_interleaved` giving (CPU seconds, wall seconds) medians."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    wall: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(reps):
        for k, step in steps.items():
            c0, w0 = time.process_time(), time.perf_counter()
            step()
            cpu[k].append(time.process_time() - c0)
            wall[k].append(time.perf_counter() - w0)
    return {k: (statistics.median(cpu[k]), statistics.median(wall[k])) for k in steps}


def _ours(net, x, t):
    return net(x, t)


def _peer(net, x, t):
    return net(x, 1000 * t).sample  # our sinusoidal embedding scales t by 1000 inside


def peer_table(args: argparse.Namespace) -> None:
    print("### Our U-Net against diffusers' UNet2DModel (one training step)\n")
    print(
        "| config | parameters (ours / peer) | batch | variant | ours CPU ms | peer CPU ms |",
        end="",
    )
    print(" peer/ours |")
    print("|---|---|---:|---|---:|---:|---:|")
    for name, batch in CONFIGS:
        kw = _net_kwargs(name)
        shape = (kw["in_channels"], *kw["image_size"])
        torch.manual_seed(0)
        ours, peer = UNet(**kw), diffusers_unet(kw)
        n_ours = sum(p.numel() for p in ours.parameters())
        n_peer = sum(p.numel() for p in peer.parameters())
        variants = {
            "fp32": (False, False),
            "bf16 autocast": (True, False),
            "channels_last": (False, True),
        }
        steps = {}
        for v, (bf16, cl) in variants.items():
            steps[("ours", v)] = _net_step(UNet(**kw), _ours, batch, shape, bf16, cl)
            steps[("peer", v)] = _net_step(diffusers_unet(kw), _peer, batch, shape, bf16, cl)
        sec = _interleaved(steps, args.reps)
        for v in variants:
            a, b = sec[("ours", v)], sec[("peer", v)]
            print(
                f"| `{name}` | {n_ours:,} / {n_peer:,} | {batch} | {v} | {1000 * a:.0f} "
                f"| {1000 * b:.0f} | {b / a:.2f} |",
                flush=True,
            )
    print()


def options_table(args: argparse.Namespace, out: Path) -> None:
    print("### Options of our training step (`sdelab.train.loop.train_step`)\n")
    print("| config | batch | option | CPU ms/step | CPU speed-up | wall ms/step | wall speed-up |")
    print("|---|---:|---|---:|---:|---:|---:|")
    fp32, bf16 = "train.mixed_precision=no", "train.mixed_precision=bf16"
    cl, comp = "train.channels_last=true", "train.compile=true"
    options = {  # label: (overrides, threads)
        "fp32, 1 thread": ([fp32], 1),
        "bf16 autocast": ([bf16], 1),
        "channels_last": ([fp32, cl], 1),
        "bf16 + channels_last": ([bf16, cl], 1),
        "fp32, 2 threads": ([fp32], 2),
        "bf16, 2 threads": ([bf16], 2),
    }
    if args.compile:
        options["compile"] = ([fp32, comp], 1)
        options["compile + bf16"] = ([bf16, comp], 1)
    for name, batch in CONFIGS:
        steps, compile_s = {}, {}
        for label, (over, threads) in options.items():
            run = build_run(load_config(name, over), out / f"{name}_{len(steps)}".replace("/", "_"))

            def step(run=run, threads=threads) -> None:
                torch.set_num_threads(threads)
                train_step(run)
                torch.set_num_threads(args.threads)

            if run.config.train.compile:  # the first step compiles: time it apart
                t0 = time.perf_counter()
                step()
                compile_s[label] = time.perf_counter() - t0
            steps[label] = step
        sec = _interleaved_both(steps, args.reps)
        base_cpu, base_wall = sec["fp32, 1 thread"]
        for label, (c, w) in sec.items():
            note = f" (first step {compile_s[label]:.0f} s)" if label in compile_s else ""
            print(
                f"| `{name}` | {batch} | {label}{note} | {1000 * c:.0f} | {base_cpu / c:.2f} "
                f"| {1000 * w:.0f} | {base_wall / w:.2f} |",
                flush=True,
            )
    print()


def _peak(reps: int) -> dict[str, float]:
    """CPU GFLOP/s of a large 3×3 conv (128→128 channels, 32×32, batch 32; NCHW and
    channels_last) and of a 1024³ matmul, in fp32 and bf16."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 128, 32, 32, generator=g)
    w = torch.randn(128, 128, 3, 3, generator=g)
    a, b = torch.randn(1024, 1024, generator=g), torch.randn(1024, 1024, generator=g)
    flops = {"conv": 2 * 32 * 128 * 128 * 9 * 32 * 32, "matmul": 2 * 1024**3}
    steps = {}
    for tag, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for fmt in ("NCHW", "NHWC"):
            m = torch.channels_last if fmt == "NHWC" else torch.contiguous_format
            xs, ws = (u.to(dtype).contiguous(memory_format=m) for u in (x, w))
            steps[("conv", f"{tag} {fmt}")] = lambda xs=xs, ws=ws: torch.conv2d(xs, ws, padding=1)
        as_, bs = a.to(dtype), b.to(dtype)
        steps[("matmul", tag)] = lambda as_=as_, bs=bs: as_ @ bs
    sec = _interleaved(steps, reps)
    return {f"{op} {v}": flops[op] / s / 1e9 for (op, v), s in sec.items()}


_CATEGORIES = (
    ("conv backward", ("convolution_backward",)),
    ("conv forward", ("mkldnn_convolution", "_convolution", "aten::convolution", "conv2d")),
    ("GroupNorm (fwd + bwd)", ("group_norm",)),
    ("SiLU (fwd + bwd)", ("silu",)),
    ("attention", ("attention", "bmm", "softmax", "baddbmm")),
    ("linear (time MLP)", ("addmm", "aten::mm", "linear")),
    ("copies / cat / upsample", ("copy_", "aten::cat", "clone", "stack", "upsample", "contiguous")),
    ("Adam", ("adam", "_foreach", "lerp", "addcdiv", "addcmul", "sqrt")),
)


def _category(op: str) -> str:
    for cat, keys in _CATEGORIES:
        if any(k in op for k in keys):
            return cat
    return "other (elementwise, autograd)"


def profile_table(args: argparse.Namespace) -> None:
    from torch.profiler import ProfilerActivity, profile

    peak = _peak(args.reps)
    print("### Profile of one training step of our U-Net (1 thread)\n")
    print(
        "Measured peak of this CPU, CPU-time GFLOP/s: "
        + ", ".join(f"{k} {v:.0f}" for k, v in peak.items())
        + "\n"
    )
    rows = []
    for name, batch in CONFIGS:
        kw = _net_kwargs(name)
        shape = (kw["in_channels"], *kw["image_size"])
        torch.manual_seed(0)
        net = UNet(**kw)
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(batch, *shape, generator=g), torch.rand(batch, generator=g)
        with FlopCounterMode(display=False) as counter:
            net(x, t).square().mean().backward()
        flops = counter.get_total_flops()
        steps = {
            dtype: _net_step(UNet(**kw), _ours, batch, shape, dtype == "bf16", False)
            for dtype in ("fp32", "bf16")
        }
        sec = _interleaved(steps, args.reps)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                steps["fp32"]()
        by_cat: dict[str, float] = {}
        for e in prof.key_averages():
            by_cat[_category(e.key)] = by_cat.get(_category(e.key), 0.0) + e.self_cpu_time_total
        total = sum(by_cat.values())
        rows.append((name, batch, flops, sec, {k: v / total for k, v in by_cat.items()}))

    print("| config | batch | GFLOP fwd+bwd | fp32 GFLOP/s (of best fp32 conv) |", end="")
    print(" bf16 autocast GFLOP/s (of best bf16 conv) |")
    print("|---|---:|---:|---:|---:|")
    top32 = max(v for k, v in peak.items() if k.startswith("conv fp32"))
    top16 = max(v for k, v in peak.items() if k.startswith("conv bf16"))
    for name, batch, flops, sec, _ in rows:
        f32, b16 = flops / sec["fp32"] / 1e9, flops / sec["bf16"] / 1e9
        print(
            f"| `{name}` | {batch} | {flops / 1e9:.2f} | {f32:.0f} ({f32 / top32:.0%}) "
            f"| {b16:.0f} ({b16 / top16:.0%}) |"
        )
    print()
    cats = [c for c, _ in _CATEGORIES] + ["other (elementwise, autograd)"]
    print("| share of self CPU time | " + " | ".join(f"`{r[0]}`" for r in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for c in cats:
        print(f"| {c} | " + " | ".join(f"{r[4].get(c, 0.0):.1%}" for r in rows) + " |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="interleaved timed rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--compile", action="store_true", help="also time train.compile=true")
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["peer", "options", "profile"],
        choices=["peer", "options", "profile"],
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: "
        f"{platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} thread(s), "
        f"torch {torch.__version__}; medians of {args.reps} interleaved rounds.\n"
    )
    if "peer" in args.parts:
        peer_table(args)
    if "options" in args.parts:
        with tempfile.TemporaryDirectory() as tmp:
            options_table(args, Path(tmp))
    if "profile" in args.parts:
        profile_table(args)


if __name__ == "__main__":
    main()
