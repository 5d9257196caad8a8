"""Memory at start: the parameter count and the peak memory of one trial training step.

The trial step is a real :func:`~sdelab.train.loop.train_step` at the configured batch on the
configured device, after which the weights, EMA, optimizer, scaler, generators and step counter
are put back exactly, so training is the same with or without the check. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA and the growth of the resident set (sampled every
millisecond) on CPU. When it exceeds the free memory of the device — or
``train.memory_limit_mb`` — training refuses to start, naming ``train.batch_size`` and
``train.grad_accum``.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdelab.train.build import Run
from sdelab.train.config import ConfigError

__all__ = ["MemoryReport", "check_memory", "measure_step"]

MIB = 2**20


@dataclass(frozen=True)
class MemoryReport:
    """``params``: trainable parameters; ``peak_bytes`` of one step (inf: out of memory);
    ``limit_bytes``: what the device offers (or ``train.memory_limit_mb``)."""

    params: int
    peak_bytes: float
    limit_bytes: float | None
    device: torch.device

    def line(self, run: Run) -> str:
        tc = run.config.train
        limit = "" if self.limit_bytes is None else f" of {self.limit_bytes / MIB:,.0f} MiB"
        what = "CUDA peak" if self.device.type == "cuda" else "resident-set growth"
        return (
            f"sdelab: {self.params:,} parameters; one step at train.batch_size={tc.batch_size} "
            f"(grad_accum={tc.grad_accum}) on {self.device}: {what} "
            f"{self.peak_bytes / MIB:,.1f} MiB{limit}"
        )


def parameter_count(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _available_cpu_bytes() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class _PeakRSS:
    """Samples the resident set in a thread while the block runs; ``growth`` = peak − start."""

    def __enter__(self) -> _PeakRSS:
        self.start = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.start)


def _snapshot(run: Run) -> dict:
    return dict(
        model=copy.deepcopy(run.model.state_dict()),
        ema=copy.deepcopy(run.ema.state_dict()),
        optimizer=copy.deepcopy(run.optimizer.state_dict()),
        scaler=None if run.scaler is None else copy.deepcopy(run.scaler.state_dict()),
        data_gen=run.data_gen.get_state(),
        loss_gen=run.loss_gen.get_state(),
        step=run.step,
        rng=torch.random.get_rng_state(),  # dropout draws from the global generator
        cuda_rng=torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None,
    )


def _restore(run: Run, snap: dict) -> None:
    run.model.load_state_dict(snap["model"])
    run.ema.load_state_dict(snap["ema"])
    run.optimizer.load_state_dict(snap["optimizer"])
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        if snap["scaler"]:
            run.scaler.load_state_dict(snap["scaler"])
        else:  # never used yet: a fresh scaler is the saved state
            run.scaler = torch.amp.GradScaler("cuda")
    run.data_gen.set_state(snap["data_gen"])
    run.loss_gen.set_state(snap["loss_gen"])
    run.step = snap["step"]
    torch.random.set_rng_state(snap["rng"])
    if snap["cuda_rng"] is not None:
        torch.cuda.set_rng_state(snap["cuda_rng"], run.device)


def measure_step(run: Run, step: Callable[[Run], object]) -> MemoryReport:
    """Run ``step(run)`` once, measure its peak memory, and put the run back as it was.

    A step that raises (other than running out of CUDA memory, reported as an infinite peak)
    re-raises after the run is restored.
    """
    device, tc = run.device, run.config.train
    snap = _snapshot(run)
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            try:
                step(run)
                torch.cuda.synchronize(device)
                peak: float = float(torch.cuda.max_memory_allocated(device))
            except torch.OutOfMemoryError:
                peak = float("inf")
            free, _ = torch.cuda.mem_get_info(device)
            limit = float(free + torch.cuda.memory_allocated(device))
        else:
            with _PeakRSS() as rss:
                step(run)
            peak, limit = float(rss.growth), _available_cpu_bytes()
    finally:
        _restore(run, snap)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if tc.memory_limit_mb is not None:
        limit = tc.memory_limit_mb * MIB
    return MemoryReport(parameter_count(run.model), peak, limit, device)


def check_memory(run: Run, step: Callable[[Run], object]) -> MemoryReport:
    """:func:`measure_step`, print its one line (rank 0), and raise :class:`ConfigError` when
    the step does not fit."""
    report = measure_step(run, step)
    if run.dist.is_main:
        print(report.line(run), flush=True)
    if report.limit_bytes is not None and report.peak_bytes > report.limit_bytes:
        tc = run.config.train
        need = (
            "more than the device has"
            if report.peak_bytes == float("inf")
            else (f"{report.peak_bytes / MIB:,.1f} MiB")
        )
        raise ConfigError(
            f"one training step at train.batch_size={tc.batch_size} needs {need} but "
            f"{report.limit_bytes / MIB:,.1f} MiB are free on {report.device}: lower "
            f"train.batch_size or raise train.grad_accum (now {tc.grad_accum})"
        )
    return report
