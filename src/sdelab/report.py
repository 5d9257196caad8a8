"""Run-level operations behind the CLI: sample a trained run, measure its likelihood, plot it.

Each takes a run folder written by ``sdelab train`` and loads it with
:func:`sdelab.train.checkpoint.load_run` (no pickles; the config comes from the checkpoint).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdelab.likelihood import EvaluationResult, evaluate_likelihood
from sdelab.samplers import SampleResult, sample
from sdelab.train.checkpoint import load_run
from sdelab.train.loop import make_run_dataset

__all__ = [
    "LikelihoodRow",
    "image_levels",
    "likelihood_table",
    "plot_run",
    "run_likelihood",
    "sample_run",
]

#: Likelihood estimators by CLI name.
METHODS = ("ode", "elbo", "scoreflow")


def sample_run(
    run_dir: str | Path,
    *,
    n: int,
    sampler: str = "euler_maruyama",
    steps: int = 1000,
    seed: int = 0,
    which: str = "ema",
    options: dict[str, Any] | None = None,
    return_trajectory: bool = False,
) -> SampleResult:
    """Draw ``n`` samples from a trained run with any sampler in ``sdelab.samplers.SAMPLERS``."""
    if n < 1:
        raise ValueError(f"--n must be a positive number of samples, got {n}")
    config, model, schedule = load_run(run_dir, which)
    shape = config.model.image_shape or [config.model.dim]  # U-Net runs sample (n, C, H, W)
    with torch.no_grad():
        return sample(
            model,
            schedule,
            (n, *shape),
            sampler=sampler,
            steps=steps,
            generator=seed,
            return_trajectory=return_trajectory,
            **(options or {}),
        )


def run_likelihood(
    run_dir: str | Path,
    *,
    method: str = "ode",
    n: int = 2000,
    batch_size: int = 1000,
    exact_trace: bool = True,
    probes: int = 1,
    seed: int = 0,
    which: str = "ema",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    progress: bool = True,
) -> EvaluationResult:
    """Test-set negative log-likelihood of a run, mean ± SE in nats (and bits/dim).

    ``method="ode"``: exact log-likelihood through the probability-flow ODE, with the exact
    trace or ``probes`` Hutchinson probes. ``"elbo"``: sdeflow-light's bound. ``"scoreflow"``:
    the likelihood-weighted DSM bound. Uses the first ``n`` points of the run's fixed test set.
    For image runs the test set is integer levels, uniformly dequantized by
    :func:`evaluate_likelihood` (``levels``, ``scale``, ``shift`` from the dataset), so bits/dim
    is a bound on the discrete data's −log₂ P(k) per dimension.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    config, model, schedule = load_run(run_dir, which)
    dataset = make_run_dataset(config)
    data = dataset.test_set(n)
    # Image data: the test set is integer levels; evaluate_likelihood dequantizes them
    # uniformly, maps y = scale·(k + u)/L + shift and accounts for both in bits/dim.
    discrete = image_levels(dataset)
    kwargs: dict[str, Any] = {}
    if method == "ode":
        kwargs = dict(rtol=rtol, atol=atol)
        if exact_trace:
            kwargs["divergence"] = "exact"
        else:
            kwargs.update(divergence="hutchinson", n_probes=probes)
    with torch.no_grad():  # inference: the estimators enable grad internally where needed
        return evaluate_likelihood(
            model,
            schedule,
            data.split(batch_size),
            estimator=method,
            generator=torch.Generator().manual_seed(seed),
            progress=progress,
            **discrete,
            **kwargs,
        )


def image_levels(dataset: Any) -> dict[str, Any]:
    """``levels``/``scale``/``shift``/``dequantization`` for :func:`evaluate_likelihood` when
    ``dataset`` serves integer levels (image data), else ``{}``."""
    if getattr(dataset, "num_levels", None) is None:
        return {}
    return dict(
        levels=dataset.num_levels,
        scale=dataset.scale,
        shift=dataset.shift,
        dequantization="uniform",
    )


@dataclass(frozen=True)
class LikelihoodRow:
    """One line of the likelihood table."""

    name: str
    nats: float
    se: float


def likelihood_table(
    run_dir: str | Path, *, n: int = 2000, progress: bool = True, seed: int = 0
) -> list[LikelihoodRow]:
    """Test NLL by the exact-trace ODE, the ELBO and the ScoreFlow bound, and the data's true
    entropy when known (the NLL a perfect model attains), each in nats."""
    rows = []
    for method, label in (
        ("ode", "NLL, probability-flow ODE (exact trace)"),
        ("elbo", "NLL bound, ELBO of the reverse SDE (sdeflow)"),
        ("scoreflow", "NLL bound, likelihood-weighted DSM (ScoreFlow)"),
    ):
        res = run_likelihood(run_dir, method=method, n=n, progress=progress, seed=seed)
        rows.append(LikelihoodRow(label, res.nll_mean, res.nll_se))
    config, _, _ = load_run(run_dir)
    entropy = make_run_dataset(config).entropy()
    if entropy is not None:
        rows.append(LikelihoodRow("true entropy of the data (the floor)", entropy, 0.0))
    return rows


def format_table(rows: list[LikelihoodRow], n: int) -> str:
    """A markdown table of likelihood rows."""
    lines = [f"| test set, n = {n} | nats (mean ± SE) |", "|---|---|"]
    for r in rows:
        val = f"{r.nats:.4f}" if r.se == 0 else f"{r.nats:.4f} ± {r.se:.4f}"
        lines.append(f"| {r.name} | {val} |")
    return "\n".join(lines)


def plot_run(
    run_dir: str | Path, out_dir: str | Path | None = None, *, n: int = 5000, seed: int = 0
) -> list[Path]:
    """Write the standard plots of a 2-D run: loss curve, data vs samples (probability-flow ODE
    and reverse SDE), the model density from the ODE likelihood, and λ = 0 / λ = 1 trajectories.
    Returns the written paths."""
    from sdelab.data import TOYS, toy_log_prob
    from sdelab.plots import plot_density, plot_loss, plot_samples, plot_trajectories

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    config, model, schedule = load_run(run_dir)
    if config.model.dim != 2:
        raise ValueError(f"plot draws 2-D runs; this run's data has {config.model.dim} dims")
    dataset = make_run_dataset(config)
    test = dataset.test_set(n)
    paths = []
    if (run_dir / "metrics.jsonl").exists():
        paths.append(plot_loss(run_dir / "metrics.jsonl", out / "loss.png"))
    for sampler, steps in (("ode", 200), ("euler_maruyama", 1000)):
        res = sample_run(run_dir, n=n, sampler=sampler, steps=steps, seed=seed)
        paths.append(
            plot_samples(
                test,
                res.samples,
                out / f"samples_{sampler}.png",
                titles=("test data", f"samples ({sampler}, NFE {res.nfe})"),
            )
        )
    truth = None
    if config.data.name in TOYS:

        def truth(x, name=config.data.name):
            return toy_log_prob(name, x)

    paths.append(plot_density(model, schedule, out / "density.png", data=test, true_log_prob=truth))
    paths.append(plot_trajectories(model, schedule, out / "trajectories.png", seed=seed))
    return paths


def save_samples(samples: torch.Tensor, path: str | Path) -> Path:
    """Save samples as ``.npy`` (or ``.csv`` by suffix); refuses to overwrite an existing file."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists: choose another --out or delete it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = samples.detach().cpu().numpy()
    if path.suffix == ".csv":
        np.savetxt(path, arr.reshape(len(arr), -1), delimiter=",")
    elif path.suffix == ".npy":
        np.save(path, arr)
    else:
        raise ValueError(f"unknown sample file type {path.suffix!r}: use .npy or .csv")
    return path


def write_json(path: str | Path, record: dict[str, Any]) -> Path:
    """Write a small JSON record (NaN-free) next to a run."""
    path = Path(path)
    clean = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }
    path.write_text(json.dumps(clean, indent=2) + "\n", encoding="utf-8")
    return path
