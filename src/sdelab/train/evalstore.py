"""Evaluations that survive pre-emption: per-batch results written as they are computed.

A resumable evaluation of a run lives in ``RUN/eval/<name>/``: ``meta.json`` (every option
that changes a number: method, tolerances, estimator, probes, dequantization and dequantizer,
split, n, batch size, seed, repeats) and one ``batch_NNNNNN.safetensors`` per finished test
batch (the per-example nats, the per-repeat nats, example indices, NFE), each written
atomically with the sha256 of its tensors and metadata, so a ``kill -9`` at any moment loses at
most the batch in flight and a truncated or altered batch is refused by name. ``--resume``
reads the finished batches and computes only the rest; since batch i's randomness depends only
on (seed, i), the result equals an uninterrupted evaluation's, example by example. Resuming
with other options is a one-line error, and an existing evaluation is never overwritten without
``--resume``.

While an evaluation runs, its folder is locked like a run folder (``.lock``: owner pid, host,
command; a lock whose process is gone is taken over, :class:`~sdelab.train.rundir.RunLock`), so
a second evaluation of the same run is told to wait. An evaluation that started afresh and
fails with an error (not an interruption) leaves nothing behind (:meth:`EvalStore.guard`): a
retry with the fixed input starts cleanly. When the process ends, the lock is released and an
emptied ``RUN/eval/`` removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from sdelab import distributed
from sdelab.likelihood.bpd import EvaluationResult
from sdelab.likelihood.dequantization import nats_to_bpd
from sdelab.train.rundir import RunLock
from sdelab.utils import atomic_write

__all__ = ["EVAL_DIR", "EvalStore"]

EVAL_DIR = "eval"
_FORMAT = "sdelab-evaluation"


class EvalStore:
    """The folder of one resumable evaluation (see the module docstring).

    Args:
        folder: ``RUN/eval/<name>``.
        options: the evaluation's options (JSON-able); they must equal the stored ones to
            resume.
        resume: continue an existing evaluation; without it a folder that holds finished
            batches is refused.
        command: names the evaluation in the lock file (shown to a second evaluation).

    The main process locks the folder at once (released by :meth:`close`, :meth:`finish`, or
    when the process ends).

    Raises:
        ValueError: finished batches without ``resume``; ``resume`` with other options; a
            finished batch that is truncated or altered (its checksum does not match).
        RunLockedError: another live process is evaluating into the folder.
    """

    def __init__(
        self,
        folder: str | Path,
        options: dict[str, Any],
        *,
        resume: bool,
        command: str = "sdelab evaluation",
    ) -> None:
        self.folder = Path(folder)
        self.options = json.loads(json.dumps(options))  # normalised: tuples -> lists
        self._lock: RunLock | None = None
        if distributed.get_info().is_main:
            self._lock = RunLock(self.folder, command, reentrant=True).acquire()
        self._finalizer = weakref.finalize(self, _cleanup, self._lock, self.folder)
        try:
            self._check(resume)
        except BaseException:
            self.close()
            raise
        self.fresh = not self.finished()  # started afresh: cleared if it fails (guard)

    def _check(self, resume: bool) -> None:
        meta = self.folder / "meta.json"
        done = self.finished()
        saved = _saved_options(meta)
        differ = [] if saved is None else _differences(saved, self.options)
        if done and not resume:
            if differ:
                raise ValueError(
                    f"{self.folder} holds {len(done)} finished batch(es) of an interrupted "
                    f"evaluation with other options ({_shown(differ, saved, self.options)}): "
                    "finish that one with its options and --resume, or delete the folder to "
                    "start this one"
                )
            raise ValueError(
                f"{self.folder} holds {len(done)} finished batch(es) of an interrupted "
                "evaluation with these options: pass --resume to continue it, or delete the "
                "folder to start afresh"
            )
        if resume and differ:
            raise ValueError(
                f"cannot resume {self.folder} with other options: "
                f"{_shown(differ, saved, self.options)}; resume with the same options, or "
                "delete the folder to start afresh"
            )
        if resume:
            for i in done:
                self._read(i)  # every finished batch is checked before any work

    @contextlib.contextmanager
    def guard(self) -> Iterator[EvalStore]:
        """Run an evaluation into this store: if it started afresh and fails with an error
        (not an interruption: ``KeyboardInterrupt`` and ``OSError`` such as a full disk keep
        the finished batches for ``--resume``), the store is removed; the lock is released
        on every exit."""
        try:
            yield self
        except OSError:
            raise
        except Exception:
            if self.fresh and self._lock is not None:
                shutil.rmtree(self.folder, ignore_errors=True)
            raise
        finally:
            self.close()

    def close(self) -> None:
        """Release the lock; remove the folder if it holds no finished batch, and ``RUN/eval``
        if it is left empty (idempotent)."""
        self._finalizer()

    def finish(self) -> None:
        """The evaluation is complete (its result is the caller's to keep): remove the store."""
        if self._lock is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.close()

    def open(self) -> None:
        """Create the folder and write ``meta.json`` (rank 0 only)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"format": _FORMAT, "options": self.options}
        atomic_write(self.folder / "meta.json", json.dumps(record, indent=1) + "\n")

    def _path(self, i: int) -> Path:
        return self.folder / f"batch_{i:06d}.safetensors"

    def finished(self) -> list[int]:
        """Indices of the finished batches."""
        if not self.folder.is_dir():
            return []
        return sorted(int(p.stem.split("_")[1]) for p in self.folder.glob("batch_*.safetensors"))

    def get_tensors(self, i: int) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """Item i's stored tensors and JSON metadata, or ``None`` if it has not been stored."""
        if not self._path(i).is_file():
            return None
        return self._read(i)

    def _read(self, i: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Batch i, its checksum verified (a one-line ``ValueError`` naming the file if not)."""
        path = self._path(i)
        blob = path.read_bytes()
        try:
            header, data = _split(blob)
            result = header["__metadata__"]["result"]
            if _checksum(data, result) == header["__metadata__"].get("sha256"):
                return load_safetensors(blob), json.loads(result)
        except Exception:  # unparsable: cut short or overwritten
            pass
        raise ValueError(
            f"{path} is damaged (truncated, or altered: it does not match its sha256): delete "
            "that file and --resume again to recompute that batch"
        )

    def put_tensors(self, i: int, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Store item i (tensors and JSON-able metadata) atomically, with the sha256 of both."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        result = json.dumps(meta)
        _, data = _split(save_safetensors(tensors, metadata={"result": result}))
        blob = save_safetensors(
            tensors, metadata={"result": result, "sha256": _checksum(data, result)}
        )
        atomic_write(self._path(i), blob)

    def get(self, i: int) -> EvaluationResult | None:
        """Batch i's stored likelihood result, or ``None`` if it has not been computed."""
        stored = self.get_tensors(i)
        if stored is None:
            return None
        t, meta = stored
        nan = float("nan")
        return EvaluationResult(
            nll=t["nll"],
            bpd=t["bpd"],
            per_repeat=t.get("per_repeat"),
            error=t.get("error"),
            probe_se=t.get("probe_se"),
            nfe=int(meta["nfe"]),
            estimator=meta["estimator"],
            dequantization=meta["dequantization"],
            policy=meta.get("policy"),
            grid_check=float(meta.get("grid_check", nan)),
            dim=int(meta["dim"]) if "dim" in meta else _dim_of(t["nll"], t["bpd"]),
            nll_mean=nan,
            nll_se=nan,
            bpd_mean=nan,
            bpd_se=nan,
        )

    def put(self, i: int, res: EvaluationResult) -> None:
        """Store batch i's likelihood result atomically."""
        tensors = {"nll": res.nll, "bpd": res.bpd}
        for name in ("per_repeat", "error", "probe_se"):
            if getattr(res, name) is not None:
                tensors[name] = getattr(res, name)
        meta = {
            "nfe": res.nfe,
            "estimator": res.estimator,
            "dequantization": res.dequantization,
            "policy": res.policy,
            "grid_check": res.grid_check,  # NaN is written as JSON NaN and read back
            "dim": res.dim,
        }
        self.put_tensors(i, tensors, meta)


def _dim_of(nll: Tensor, bpd: Tensor) -> int:
    """D of a batch stored before results recorded it: nats / (bits/dim · log 2)."""
    ok = bpd.abs() > 0
    if not bool(ok.any()):
        return 0
    return round(float((nats_to_bpd(nll[ok], 1) / bpd[ok]).mean()))


def _split(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """A safetensors blob's JSON header and its tensor bytes."""
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n].decode("utf-8")), blob[8 + n :]


def _checksum(data: bytes, result: str) -> str:
    return hashlib.sha256(data + result.encode("utf-8")).hexdigest()


def _saved_options(meta: Path) -> dict[str, Any] | None:
    try:
        return json.loads(meta.read_text())["options"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or cut short: written again by open()


def _differences(saved: dict[str, Any], given: dict[str, Any]) -> list[str]:
    return sorted(k for k in saved.keys() | given.keys() if saved.get(k) != given.get(k))


def _shown(keys: list[str], saved: dict[str, Any], given: dict[str, Any]) -> str:
    return ", ".join(f"{k} saved {saved.get(k)!r}, given {given.get(k)!r}" for k in keys[:3])


def _cleanup(lock: RunLock | None, folder: Path) -> None:
    """Release the store's lock and remove what holds no work: the folder without a finished
    batch, ``RUN/eval`` when empty (main process only: it holds the lock)."""
    if lock is None:
        return
    try:
        if folder.is_dir() and not any(folder.glob("batch_*.safetensors")):
            shutil.rmtree(folder, ignore_errors=True)  # meta.json, the lock, a stray temp file
    finally:
        lock.release()
    with contextlib.suppress(OSError):
        if folder.parent.is_dir() and not any(folder.parent.iterdir()):
            folder.parent.rmdir()
