"""``sdelab sample``: draw samples from a trained run."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdelab.cli.common import (
    DEFAULT_STEPS,
    CLIError,
    add_weights_options,
    check_new_files,
    check_sampler_options,
    finite_float,
    join_launched_group,
    nonneg_int,
    parse_options,
    positive_int,
)
from sdelab.cli.interop import add_diffusers_options, diffusers_sample
from sdelab.data.images import model_to_levels
from sdelab.data.png import save_level_grid
from sdelab.plots import plot_samples
from sdelab.runs import (
    guided_sample_run,
    open_run,
    sample_run,
    save_samples,
)
from sdelab.samplers import SAMPLERS

_SUFFIXES = (".npy", ".csv")


def _sample(args: argparse.Namespace) -> int:
    """Draw samples from a trained run with any sampler; save them as .npy/.csv (+ a PNG)."""
    if args.diffusers is not None:
        return diffusers_sample(args)
    if args.run is None:
        raise CLIError("give a RUN folder (or --diffusers DIR)")
    info = join_launched_group()
    out = Path(args.out)
    steps = args.steps if args.steps is not None else DEFAULT_STEPS.get(args.sampler, 1000)
    kwargs = dict(n=args.n, sampler=args.sampler, steps=steps, seed=args.seed)
    options = check_sampler_options(args.sampler, parse_options(args.option))
    run = open_run(args.run, args.weights, args.checkpoint)  # the checkpoint is read once
    dataset = run.dataset
    outputs = _outputs(out, dataset.image_shape is not None, run.config.model.dim)
    if info.is_main:
        check_new_files(outputs)
    if args.class_ is not None or args.classifier is not None:
        if args.class_ is None:
            raise CLIError("--classifier needs --class K (the class to sample)")
        res = guided_sample_run(
            run,
            args.classifier,
            args.class_,
            scale=args.guidance,
            options=options,
            batch_size=args.batch_size,
            progress=True,
            **kwargs,
        )
    else:
        res = sample_run(run, options=options, batch_size=args.batch_size, progress=True, **kwargs)
    if not info.is_main:
        return 0
    try:
        print(_save(res, run, out, args, steps))
    except BaseException:  # all or nothing: no file of an interrupted save (none existed)
        for path in outputs:
            path.unlink(missing_ok=True)
        raise
    return 0


def _save(res, run, out: Path, args: argparse.Namespace, steps: int) -> str:
    """Write the samples (and their plot or grid), each atomically; the line to print."""
    dataset = run.dataset
    made_by = "" if getattr(run, "step", None) is None else f", checkpoint step {run.step}"
    if dataset.image_shape is not None:  # image run: .npy + PNG grid
        return _save_image_samples(res, dataset, out, args, made_by)
    save_samples(res.samples, out)
    msg = f"{args.n} samples ({args.sampler}, {steps} steps, NFE {res.nfe}{made_by}) -> {out}"
    if res.samples.shape[1] == 2:
        test = dataset.test_set(min(args.n, 5000))
        png = plot_samples(
            test,
            res.samples,
            out.with_suffix(".png"),
            titles=("test data", f"samples ({args.sampler})"),
        )
        msg += f", plot {png}"
    return msg


def _outputs(out: Path, image: bool, dim: int | None) -> list[Path]:
    """Every file ``sample --out OUT`` writes: image runs OUT.npy + OUT.png; vector runs OUT
    (.npy/.csv) and, in 2-D, the plot OUT.png."""
    if image:
        return [out.with_suffix(".npy"), out.with_suffix(".png")]
    if out.suffix not in _SUFFIXES:
        raise CLIError(f"--out {out}: a vector run's samples are .npy or .csv files")
    return [out, out.with_suffix(".png")] if dim == 2 else [out]


def _save_image_samples(
    res, dataset, out: Path, args: argparse.Namespace, made_by: str = ""
) -> str:
    """Image runs: model-space samples (N, C, H, W) to ``out.npy`` and their pixel levels
    (``model_to_levels``) as a PNG grid to ``out.png``, whichever of the two ``--out`` names."""
    npy, png = out.with_suffix(".npy"), out.with_suffix(".png")
    samples = res.samples.reshape(len(res.samples), *dataset.image_shape)
    save_samples(samples, npy)
    levels = model_to_levels(samples, dataset.num_levels, data_range=dataset.data_range)
    save_level_grid(levels, dataset.num_levels, png)
    return f"{args.n} samples ({args.sampler}, NFE {res.nfe}{made_by}) -> {npy}, grid {png}"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to ``sub``."""
    p = sub.add_parser(
        "sample",
        help="draw samples from a trained run",
        description=_sample.__doc__,
        epilog="examples:\n  sdelab sample runs/checker --sampler ode --n 5000 --out s.npy\n"
        "  sdelab sample runs/checker --sampler pc --option predictor=reverse_diffusion "
        "--option snr=0.16 --n 2000 --out pc.npy\n"
        "  sdelab sample runs/digits --sampler ode --n 64 --out grid.png   # + grid.npy\n"
        "  sdelab sample runs/moons-cond --class 1 --guidance 2 --out m1.npy   # CFG\n"
        "  sdelab sample runs/8g --class 3 --classifier runs/8g-clf --out c3.npy\n"
        "  sdelab sample --diffusers ddpm-cifar10 --sampler dpm_solver --steps 20 --n 64 "
        "--out s.npy\n\n"
        "--steps defaults to what suits the sampler: ode 100 (RK4: NFE 400), dpm_solver 20,\n"
        "the others 1000. no file is written unless all can be (OUT and its plot OUT.png);\n"
        "samples that are not finite (a diverged run) are an error.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", nargs="?", help="run folder written by sdelab train")
    add_diffusers_options(p, data=False)
    p.add_argument(
        "--sampler",
        default="euler_maruyama",
        choices=sorted(SAMPLERS),
        help="sampler (default euler_maruyama)",
    )
    p.add_argument(
        "--n",
        "--num-samples",  # under torchrun, whose own options swallow the abbreviation --n
        dest="n",
        type=positive_int,
        default=1000,
        help="number of samples (default 1000)",
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="time steps (default: ode 100, dpm_solver 20, others 1000)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="samples per chunk, the unit split over processes (default: all at once)",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="sampler option, repeatable (snr=0.16, lam=0.5, method=rk4, ...)",
    )
    add_weights_options(p)
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--class",
        dest="class_",
        type=nonneg_int,
        metavar="K",
        help="class-conditional: class index",
    )
    p.add_argument(
        "--guidance",
        type=finite_float,
        default=1.0,
        metavar="S",
        help="guidance scale with --class: 0 unconditional, 1 conditional (default), >1 "
        "sharper; classifier-free on a run with model.num_classes, else classifier guidance",
    )
    p.add_argument(
        "--classifier",
        metavar="DIR",
        help="folder from sdelab train-classifier: classifier guidance (needed for "
        "unconditional runs)",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="output .npy or .csv; image runs write FILE.npy and a PNG grid FILE.png",
    )
    p.set_defaults(func=_sample)
