"""Progress of long work with an ETA: a tqdm bar on a terminal, plain periodic lines otherwise.

On a terminal (stderr is a TTY) a :class:`Progress` draws a tqdm bar and, every tenth of the
work, writes a line above it (``train: 500/5000 steps (10%), 0:12 elapsed, ETA 1:48, loss
0.81``), so a history of the loss stays on screen. When stderr is not a terminal (CI, a log
file) no bar is drawn: the same lines are printed every tenth of the work and at least every
``every_s`` seconds, one per line, so logs stay readable — once the work has taken
:attr:`Progress.MIN_S` seconds (short work stays quiet).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import torch
from tqdm.auto import tqdm

__all__ = ["Progress", "TimeProgress"]


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` / ``m:ss`` for a number of seconds."""
    s = max(0, round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Progress towards ``total`` units (steps, examples, samples).

    Args:
        total: units of the whole job (``initial`` of them already done, e.g. on resume).
        desc: what is being done (``train``, ``likelihood``, ``sample``).
        unit: the unit's name, plural (``steps``).
        enabled: ``False`` shows nothing (other ranks of a process group, ``progress=False``).
        stream: where to write (default stderr); ``tty`` overrides its ``isatty()``.
        every_s: without a terminal, print at least this often.
        marks: lines per job (every ``total / marks`` units).
    """

    #: Without a terminal, no line before the work has run this many seconds.
    MIN_S = 2.0

    def __init__(
        self,
        total: float,
        desc: str,
        unit: str = "it",
        *,
        initial: float = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
        tty: bool | None = None,
        every_s: float = 30.0,
        marks: int = 10,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = initial
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s, self.marks = every_s, marks
        self.info: dict[str, Any] = {}
        self._start = self._last = time.perf_counter()
        self._mark = self._mark_of(initial)
        self.bar = None
        if enabled and tty:
            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit.rstrip("s") or unit,
                file=self.stream,
                dynamic_ncols=True,
                leave=False,
            )

    def _mark_of(self, n: float) -> int:
        return int(n * self.marks / self.total) if self.total else 0

    def update(self, n: float = 1, **info: Any) -> None:
        """``n`` more units done; ``info`` (e.g. ``loss=0.8``) is shown with the next line."""
        self.set(self.n + n, **info)

    def set(self, n: float, **info: Any) -> None:
        """``n`` units done in all."""
        if not self.enabled:
            return
        delta = n - self.n
        self.n = n
        self.info.update(info)
        if self.bar is not None:
            self.bar.update(delta)
            if info:
                self.bar.set_postfix({k: _short(v) for k, v in self.info.items()}, refresh=False)
        mark = self._mark_of(n)
        now = time.perf_counter()
        late = self.bar is None and now - self._last >= self.every_s
        quiet = self.bar is None and now - self._start < self.MIN_S
        if ((mark > self._mark and n < self.total) or late) and not quiet:
            self._mark = mark
            self.line()

    def line(self, text: str | None = None) -> None:
        """Write ``text`` (default: the progress line) without breaking the bar."""
        if not self.enabled:
            return
        self._last = time.perf_counter()
        text = text if text is not None else self.status()
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def status(self) -> str:
        """``desc: n/total unit (p%), elapsed, ETA, info``."""
        elapsed = time.perf_counter() - self._start
        done = self.n - self.initial
        left = self.total - self.n
        eta = format_duration(elapsed / done * left) if done > 0 else "?"
        pct = 100 * self.n / self.total if self.total else 100.0
        extra = "".join(f", {k} {_short(v)}" for k, v in self.info.items())
        count = f"{int(self.n)}/{int(self.total)} {self.unit}"
        return (
            f"{self.desc}: {count} ({pct:.0f}%), {format_duration(elapsed)} elapsed, "
            f"ETA {eta}{extra}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class TimeProgress(torch.nn.Module):
    """A score function that moves a :class:`Progress` while a solver integrates ``count``
    examples from time ``t_from`` to ``t_to`` (either direction): each call sets the bar to
    ``done + count · (fraction of the way reached)``. Works for any sampler or ODE solver,
    adaptive ones included, since it only reads the times the score is called at.

    An ``nn.Module`` holding ``score_fn``, so code that looks for the score's parameters sees
    them; calls pass straight through.
    """

    def __init__(self, score_fn, bar: Progress, done: float, count: float, t_from, t_to) -> None:
        super().__init__()
        self.score_fn = score_fn
        self.bar, self.done, self.count = bar, done, count
        self.t_from, self.span = float(t_from), float(t_to) - float(t_from)
        self.furthest = 0.0

    def forward(self, x, t, *args, **kwargs):
        if self.bar.enabled and self.span:
            t0 = float(t.reshape(-1)[0]) if torch.is_tensor(t) else float(t)
            frac = min(max((t0 - self.t_from) / self.span, 0.0), 1.0)
            if frac > self.furthest:
                self.furthest = frac
                self.bar.set(self.done + frac * self.count)
        return self.score_fn(x, t, *args, **kwargs)
