"""Plots written straight to PNG with matplotlib's Agg canvas (no pyplot, no global state)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_loss", "plot_samples", "read_jsonl"]


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
    fig.savefig(path, dpi=120)
    return path


def plot_loss(metrics: str | Path, path: str | Path, *, key: str = "loss") -> Path:
    """Training curve from a run's ``metrics.jsonl`` (or its run folder) to a PNG.

    Plots ``key`` against ``step`` with a moving average over ~2% of the points, on a log
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
    window = max(1, len(value) // 50)
    if window > 1:
        smooth = np.convolve(value, np.ones(window) / window, mode="valid")
        ax.plot(step[window - 1 :], smooth, lw=1.5, label=f"moving average ({window})")
    if np.all(value > 0):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_samples(
    data, samples, path: str | Path, *, titles: tuple[str, str] = ("data", "samples")
) -> Path:
    """Side-by-side scatter plots of data and model samples (first two coordinates), sharing
    axis limits. ``data`` and ``samples`` are ``(N, ≥2)`` tensors or arrays. Returns the path."""
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
    fig = Figure(figsize=(8, 4))
    for i, (title, a) in enumerate(zip(titles, arrays)):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.scatter(a[:, 0], a[:, 1], s=1, alpha=0.5, linewidths=0)
        ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
        ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
        ax.set_aspect("equal")
        ax.set_title(f"{title} (n={len(a)})")
    fig.tight_layout()
    return _save(fig, path)
