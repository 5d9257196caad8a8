"""The standard plots of a 2-D run (:func:`plot_run`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sdelab.data import TOYS, toy_log_prob
from sdelab.plots import (
    plot_density,
    plot_loss,
    plot_sample_strip,
    plot_samples,
    plot_trajectories,
)
from sdelab.runs.core import open_run
from sdelab.runs.sampling import sample_run
from sdelab.train.build import make_run_dataset
from sdelab.train.periodic import sample_paths


def plot_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    n: int = 5000,
    seed: int = 0,
    on_write: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Write the standard plots of a 2-D run: loss curve, data vs samples (probability-flow ODE
    and reverse SDE), the model density from the ODE likelihood, and λ = 0 / λ = 1 trajectories;
    for any run with the grids of ``train.sample_every``, also ``samples_during_training.png``,
    a strip of them (the only plot of an image run). ``on_write(path)`` is called as each file
    is written (e.g. to print it; the sampling then shows its progress on stderr). Returns the
    written paths."""
    loaded = open_run(run_dir)
    run_dir, config, model, schedule = loaded.run_dir, loaded.config, loaded.model, loaded.schedule
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    grids = sample_paths(run_dir)  # train.sample_every's grids, as one strip
    strip = [] if not grids else [plot_sample_strip(grids, out / "samples_during_training.png")]
    if config.model.dim != 2:
        if strip:
            return strip
        raise ValueError(f"plot draws 2-D runs; this run's data has {config.model.dim} dims")
    dataset = make_run_dataset(config)
    test = dataset.test_set(n)
    paths: list[Path] = []

    def wrote(path: Path) -> None:
        paths.append(path)
        if on_write is not None:
            on_write(path)

    if (run_dir / "metrics.jsonl").exists():
        wrote(plot_loss(run_dir / "metrics.jsonl", out / "loss.png"))
    for sampler, steps in (("ode", 200), ("euler_maruyama", 1000)):
        res = sample_run(
            loaded, n=n, sampler=sampler, steps=steps, seed=seed, progress=on_write is not None
        )
        wrote(
            plot_samples(
                test,
                res.samples,
                out / f"samples_{sampler}.png",
                titles=("test data", f"samples ({sampler.replace('_', '-')}, NFE {res.nfe})"),
            )
        )
    truth = None
    if config.data.name in TOYS:

        def truth(x, name=config.data.name):
            return toy_log_prob(name, x)

    wrote(plot_density(model, schedule, out / "density.png", data=test, true_log_prob=truth))
    wrote(plot_trajectories(model, schedule, out / "trajectories.png", seed=seed))
    return paths + strip
