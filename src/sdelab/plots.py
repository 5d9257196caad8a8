"""Plots written straight to PNG with matplotlib's Agg canvas (no pyplot, no global state)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imread

from sdelab.likelihood import Augmented, Exact, log_likelihood
from sdelab.samplers import sample
from sdelab.utils import atomic_open

__all__ = [
    "density_grid",
    "plot_density",
    "plot_loss",
    "plot_sample_strip",
    "plot_samples",
    "plot_trajectories",
    "read_jsonl",
    "samples_figure",
    "smoothing_window",
]


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a JSONL file, skipping blank or cut-off lines."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    with atomic_open(path) as f:  # never a half-written figure
        fig.savefig(f, dpi=120, format=path.suffix.lstrip(".") or "png")
    return path


def plot_loss(metrics: str | Path, path: str | Path, *, key: str = "loss") -> Path:
    """Training curve from a run's ``metrics.jsonl`` (or its run folder) to a PNG.

    Plots ``key`` against ``step`` with a moving average over a tenth of the logged points
    (at least 5, so the trend shows at any run length; :func:`smoothing_window`), on a log
    y-axis when every value is positive. Returns the PNG path.
    """
    metrics = Path(metrics)
    if metrics.is_dir():
        metrics = metrics / "metrics.jsonl"
    rows = [r for r in read_jsonl(metrics) if key in r and "step" in r]
    if not rows:
        raise ValueError(f"{metrics} has no {key!r} records: train the run first")
    step = np.array([r["step"] for r in rows], dtype=float)
    value = np.array([r[key] for r in rows], dtype=float)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(step, value, lw=0.6, alpha=0.4, label=key)
    window = smoothing_window(len(value))
    if window > 1:
        smooth = np.convolve(value, np.ones(window) / window, mode="valid")
        span = step[window - 1] - step[0]
        label = f"moving average ({window} points, {span:.0f} steps)"
        ax.plot(step[window - 1 :], smooth, lw=1.5, label=label)
    if np.all(value > 0):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def smoothing_window(n: int) -> int:
    """Points in the loss curve's moving average for ``n`` logged points: a tenth of them, at
    least 5 (at most half the points), 1 (no smoothing) below 4 points."""
    if n < 4:
        return 1
    return min(max(5, n // 10), n // 2)


def plot_samples(
    data, samples, path: str | Path, *, titles: tuple[str, str] = ("data", "samples")
) -> Path:
    """Side-by-side scatter plots of data and model samples (first two coordinates), sharing
    axis limits. ``data`` and ``samples`` are ``(N, ≥2)`` tensors or arrays; long titles are
    wrapped to fit. Returns the path."""
    return _save(samples_figure(data, samples, titles), path)


def samples_figure(data, samples, titles: tuple[str, str] = ("data", "samples")) -> Figure:
    """The figure of :func:`plot_samples` (laid out, not saved)."""
    arrays = [
        (x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)) for x in (data, samples)
    ]
    for name, a in zip(titles, arrays):
        if a.ndim != 2 or a.shape[1] < 2:
            raise ValueError(f"{name} must have shape (N, D) with D >= 2, got {a.shape}")
    both = np.concatenate([a[:, :2] for a in arrays])
    finite = both[np.isfinite(both).all(1)]
    lo, hi = np.percentile(finite, [0.5, 99.5], axis=0) if len(finite) else ([-1, -1], [1, 1])
    pad = 0.05 * (np.asarray(hi) - np.asarray(lo)) + 1e-6
    fig = Figure(figsize=(8, 4.4), layout="constrained")  # lays out titles after the aspect
    for i, (title, a) in enumerate(zip(titles, arrays)):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.scatter(a[:, 0], a[:, 1], s=1, alpha=0.5, linewidths=0)
        ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
        ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
        ax.set_aspect("equal")
        ax.set_title(textwrap.fill(f"{title} (n={len(a)})", 34), fontsize=10)
    FigureCanvasAgg(fig)
    return fig


def density_grid(
    score_fn,
    schedule,
    *,
    lim: tuple[float, float, float, float],
    n: int = 100,
    batch_size: int = 5000,
    tol: float = 0.05,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """log p(x) of a 2-D model on an n×n grid via the probability-flow ODE: the exact trace and
    one augmented solve to ``tol`` nats per point, without the tolerance check (a picture needs
    no error bar, and the check would double the cost of the demo's slowest plot).

    ``lim`` is (x_min, x_max, y_min, y_max). Returns (xs, ys, logp) with logp of shape (n, n).
    """
    xs = np.linspace(lim[0], lim[1], n)
    ys = np.linspace(lim[2], lim[3], n)
    grid = torch.tensor(np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2), dtype=torch.float32)
    logp = []
    for chunk in grid.split(batch_size):
        with torch.no_grad():  # inference: no graph through the solve
            res = log_likelihood(
                score_fn,
                schedule,
                chunk,
                tol=tol,
                divergence=Exact(),
                integrator=Augmented(check=False),
            )
        logp.append(res.logp)
    return xs, ys, torch.cat(logp).reshape(n, n).numpy()


def plot_density(
    score_fn,
    schedule,
    path: str | Path,
    *,
    data=None,
    lim=None,
    n: int = 100,
    true_log_prob=None,
) -> Path:
    """Heat map of the model density exp(log p) on a grid (ODE likelihood), next to the data
    (or the true density when ``true_log_prob(x) -> log p`` is given). Returns the path."""
    if lim is None:
        if data is None:
            raise ValueError("plot_density needs lim=(x0, x1, y0, y1) or data to set the window")
        a = data.detach().cpu().numpy() if torch.is_tensor(data) else np.asarray(data)
        lo, hi = np.percentile(a[:, :2], [0.5, 99.5], axis=0)
        pad = 0.1 * (hi - lo)
        lim = (lo[0] - pad[0], hi[0] + pad[0], lo[1] - pad[1], hi[1] + pad[1])
    xs, ys, logp = density_grid(score_fn, schedule, lim=lim, n=n)
    panels = [("model density (ODE)", np.exp(logp))]
    if true_log_prob is not None:
        pts = torch.tensor(np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2), dtype=torch.float64)
        panels.insert(0, ("true density", np.exp(true_log_prob(pts).numpy().reshape(n, n))))
    fig = Figure(figsize=(4 * len(panels) + (4 if data is not None else 0), 4))
    k = len(panels) + (data is not None)
    for i, (title, dens) in enumerate(panels):
        ax = fig.add_subplot(1, k, i + 1)
        ax.imshow(dens, origin="lower", extent=lim, cmap="magma", aspect="equal")
        ax.set_title(title)
    if data is not None:
        ax = fig.add_subplot(1, k, k)
        a = data.detach().cpu().numpy() if torch.is_tensor(data) else np.asarray(data)
        ax.scatter(a[:, 0], a[:, 1], s=1, alpha=0.4, linewidths=0)
        ax.set_xlim(lim[0], lim[1])
        ax.set_ylim(lim[2], lim[3])
        ax.set_aspect("equal")
        ax.set_title(f"test data (n={len(a)})")
    fig.tight_layout()
    return _save(fig, path)


def plot_trajectories(
    score_fn,
    schedule,
    path: str | Path,
    *,
    n: int = 2000,
    steps: int = 500,
    lams: tuple[float, ...] = (0.0, 1.0),
    snapshots: int = 6,
    seed: int = 0,
) -> Path:
    """Sample paths of the λ-family reverse processes from T to t_min (sdeflow-light's figure:
    λ = 0 the reverse SDE, λ = 1 the probability-flow ODE). One row per λ, ``snapshots``
    scatter plots at evenly spaced steps, the same prior draw for every λ, and the paths of a
    few particles in the last panel. Returns the path."""
    x_init = schedule.prior_sample((n, 2), generator=torch.Generator().manual_seed(seed))
    fig = Figure(figsize=(2.4 * (snapshots + 1), 2.5 * len(lams)))
    for row, lam in enumerate(lams):
        res = sample(
            score_fn,
            schedule,
            None,
            sampler="lambda",
            lam=lam,
            steps=steps,
            x_init=x_init,
            generator=seed + 1,
            return_trajectory=True,
        )
        traj, times = res.trajectory.detach().cpu().numpy(), res.times.cpu().numpy()
        idx = np.linspace(0, len(traj) - 1, snapshots).round().astype(int)
        final = traj[-1]
        lo, hi = np.percentile(final, [0.5, 99.5], axis=0)
        pad = 0.15 * (hi - lo)
        for j, i in enumerate(idx):
            ax = fig.add_subplot(len(lams), snapshots + 1, row * (snapshots + 1) + j + 1)
            ax.scatter(traj[i, :, 0], traj[i, :, 1], s=0.5, alpha=0.5, linewidths=0)
            ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
            ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"λ={lam:g}, t={times[i]:.3f}", fontsize=8)
        ax = fig.add_subplot(len(lams), snapshots + 1, row * (snapshots + 1) + snapshots + 1)
        for p in range(min(25, n)):
            ax.plot(traj[:, p, 0], traj[:, p, 1], lw=0.5, alpha=0.7)
        ax.scatter(final[:25, 0], final[:25, 1], s=4, c="k")
        ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
        ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"λ={lam:g}: 25 paths", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_sample_strip(
    images: list[str | Path],
    path: str | Path,
    *,
    titles: list[str] | None = None,
    max_frames: int = 8,
) -> Path:
    """One row of PNG images (e.g. the sample grids a run wrote while training), evenly thinned
    to at most ``max_frames`` (first and last always kept), each titled. Returns the path."""
    if not images:
        raise ValueError("no images to put in a strip: train with train.sample_every > 0 first")
    frames = np.linspace(0, len(images) - 1, min(max_frames, len(images))).round()
    idx = np.unique(frames).astype(int)
    titles = titles or [Path(p).stem for p in images]
    fig = Figure(figsize=(2.4 * len(idx), 2.8))
    for j, i in enumerate(idx):
        ax = fig.add_subplot(1, len(idx), j + 1)
        image = imread(str(images[i]))
        gray = dict(cmap="gray", vmin=0.0, vmax=1.0) if image.ndim == 2 else {}  # not viridis
        ax.imshow(image, interpolation="nearest", **gray)
        ax.set_title(titles[i], fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)
