"""Small shared helpers: broadcasting, seeding, validation, statistics, atomic files."""

from __future__ import annotations

import contextlib
import errno
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

#: A score function ``score_fn(x, t) -> ∇_x log p_t(x)``: x ``(B, ...)``, t ``(B,)``.
ScoreFn = Callable[[Tensor, Tensor], Tensor]


def _adaptive_solvers() -> tuple[str, ...]:
    """torchdiffeq's adaptive Runge–Kutta solvers, read from the installed torchdiffeq (they
    take the ``norm`` and ``step_t`` options); the known list if its internals move."""
    try:
        from torchdiffeq._impl.odeint import SOLVERS
        from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver
    except ImportError:  # pragma: no cover - another torchdiffeq layout
        return ("adaptive_heun", "bosh3", "dopri5", "dopri8", "fehlberg2")
    return tuple(
        sorted(
            name
            for name, cls in SOLVERS.items()
            if isinstance(cls, type) and issubclass(cls, RKAdaptiveStepsizeODESolver)
        )
    )


#: torchdiffeq's adaptive Runge–Kutta solvers, the one list the samplers and the likelihood use.
ADAPTIVE_SOLVERS: tuple[str, ...] = _adaptive_solvers()


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so ``v`` broadcasts against a tensor of rank ``ndim``.

    A per-example quantity of shape ``(B,)`` becomes ``(B, 1, ..., 1)``; a 0-d tensor stays 0-d
    (it already broadcasts). This is the one place where time-like tensors meet data of any rank.
    """
    if v.ndim == 0:
        return v
    if v.ndim > ndim:
        raise ValueError(
            f"cannot broadcast a tensor of rank {v.ndim} against data of rank {ndim}: "
            "pass one value per example (shape (B,)) or a scalar"
        )
    return v.reshape(*v.shape, *([1] * (ndim - v.ndim)))


def batch_time(t: Tensor | float, x: Tensor) -> Tensor:
    """Return time as a ``(B,)`` tensor on ``x``'s device and dtype, from a scalar or ``(B,)``.

    Raises ``ValueError`` when ``t`` has one value per example but the count differs from ``B``.
    """
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t.expand(x.shape[0]).contiguous()  # torch.func transforms need real storage
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(
            f"time has shape {tuple(t.shape)} but the batch has {x.shape[0]} examples: "
            "pass a scalar or one time per example"
        )
    return t


def make_generator(
    seed: int | torch.Generator | None, device: torch.device | str = "cpu"
) -> torch.Generator | None:
    """Turn a seed into a ``torch.Generator`` (a generator passes through, ``None`` stays)."""
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def randn_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``torch.randn_like`` that honours an explicit generator."""
    return torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)


def sum_except_batch(x: Tensor) -> Tensor:
    """Sum over every dim but the first: per-example totals of shape ``(B,)``."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def derive_seed(seed: int, *stream: int) -> int:
    """An independent 63-bit seed for sub-stream ``stream`` of run seed ``seed`` (SeedSequence)."""
    entropy = [int(seed), *(int(s) for s in stream)]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def chunk_generator(seed: int, stream: int, i: int, device: torch.device | str) -> torch.Generator:
    """The generator of work chunk ``i`` (a sample chunk, a test batch) of stream ``stream``.

    Chunk 0 uses ``seed`` itself, so a single chunk draws what one plain call with that seed
    draws; chunk i > 0 uses :func:`derive_seed` ``(seed, stream, i)``.
    """
    value = seed if i == 0 else derive_seed(seed, stream, i)
    return torch.Generator(device=device).manual_seed(value)


def check_int(name: str, value: object, minimum: int, hint: str = "") -> int:
    """``value`` as an int, which must be a true integer (not a bool) ``>= minimum``.

    Raises:
        ValueError: naming ``name``, the bound, ``hint`` (e.g. ``" (e.g. 256 for 8-bit
            data)"``) and the value.
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{hint}, got {value!r}")
    return int(value)


def mean_se(v: Tensor, dim: int | None = None) -> tuple[Tensor, Tensor]:
    """Mean and standard error (sample std / √n) of ``v``, over all entries or along ``dim``.

    With a single value the standard error is NaN (it cannot be estimated).
    """
    v = torch.as_tensor(v)
    n = v.numel() if dim is None else v.shape[dim]
    mean = v.mean() if dim is None else v.mean(dim)
    if n < 2:
        return mean, torch.full_like(mean, float("nan"))
    std = v.std() if dim is None else v.std(dim)
    return mean, std / math.sqrt(n)


def mean_se_float(v: Tensor) -> tuple[float, float]:
    """:func:`mean_se` over all entries, as two floats."""
    mean, se = mean_se(torch.as_tensor(v).double())
    return float(mean), float(se)


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so a rename inside it survives a crash (no-op where unsupported)."""
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` atomically: hidden temp file, fsync, ``os.replace``, fsync dir."""
    payload = data.encode() if isinstance(data, str) else data
    with atomic_open(path) as f:
        f.write(payload)


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through, atomically: the data go to a hidden temp file
    beside it (fsynced, then ``os.replace``-d onto ``path`` when the block ends); on any error
    (a full disk included) the temp file is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # name the file it was to become (a write names none)
        if e.errno is None and "written" in str(e):  # numpy's short write: the disk took less
            raise OSError(errno.ENOSPC, f"{e}: no space left on device", str(path)) from None
        if e.filename is None or str(e.filename) == str(tmp):
            e.filename = str(path)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(path.parent)
