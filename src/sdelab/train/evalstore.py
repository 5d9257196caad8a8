"""Evaluations that survive pre-emption: per-batch results written as they are computed.

A resumable evaluation of a run lives in ``RUN/eval/<name>/``: ``meta.json`` (every option
that changes a number: method, tolerances, estimator, probes, dequantization and dequantizer,
split, n, batch size, seed, repeats) and one ``batch_NNNNNN.safetensors`` per finished test
batch (the per-example nats, the per-repeat nats, example indices, NFE), each written
atomically, so a ``kill -9`` at any moment loses at most the batch in flight. ``--resume``
reads the finished batches and computes only the rest; since batch i's randomness depends only
on (seed, i), the result equals an uninterrupted evaluation's, example by example. Resuming
with other options is a one-line error, and an existing evaluation is never overwritten without
``--resume``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from sdelab.likelihood.bpd import EvaluationResult
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

    Raises:
        ValueError: finished batches without ``resume``; ``resume`` with other options.
    """

    def __init__(self, folder: str | Path, options: dict[str, Any], *, resume: bool) -> None:
        self.folder = Path(folder)
        self.options = json.loads(json.dumps(options))  # normalised: tuples -> lists
        meta = self.folder / "meta.json"
        done = self.finished()
        if done and not resume:
            raise ValueError(
                f"{self.folder} holds {len(done)} finished batch(es) of an earlier evaluation: "
                "pass --resume to continue it, or delete the folder"
            )
        if resume and meta.is_file():
            saved = json.loads(meta.read_text())["options"]
            differ = sorted(k for k in saved.keys() | self.options.keys()
                            if saved.get(k) != self.options.get(k))  # fmt: skip
            if differ:
                shown = ", ".join(
                    f"{k} (saved {saved.get(k)!r}, given {self.options.get(k)!r})"
                    for k in differ[:3]
                )
                raise ValueError(
                    f"cannot resume {self.folder} with other options: {shown}; resume with the "
                    "same options or start a new evaluation"
                )

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
        path = self._path(i)
        if not path.is_file():
            return None
        blob = path.read_bytes()
        return load_safetensors(blob), json.loads(_metadata(blob)["result"])

    def put_tensors(self, i: int, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Store item i (tensors and JSON-able metadata) atomically."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        blob = save_safetensors(tensors, metadata={"result": json.dumps(meta)})
        atomic_write(self._path(i), blob)

    def get(self, i: int) -> EvaluationResult | None:
        """Batch i's stored likelihood result, or ``None`` if it has not been computed."""
        stored = self.get_tensors(i)
        if stored is None:
            return None
        t, meta = stored
        return EvaluationResult(
            nll=t["nll"],
            bpd=t["bpd"],
            per_repeat=t.get("per_repeat"),
            nfe=int(meta["nfe"]),
            estimator=meta["estimator"],
            dequantization=meta["dequantization"],
            nll_mean=float("nan"),
            nll_se=float("nan"),
            bpd_mean=float("nan"),
            bpd_se=float("nan"),
        )

    def put(self, i: int, res: EvaluationResult) -> None:
        """Store batch i's likelihood result atomically."""
        tensors = {"nll": res.nll, "bpd": res.bpd}
        if res.per_repeat is not None:
            tensors["per_repeat"] = res.per_repeat
        meta = {"nfe": res.nfe, "estimator": res.estimator, "dequantization": res.dequantization}
        self.put_tensors(i, tensors, meta)


def _metadata(blob: bytes) -> dict[str, str]:
    """The string metadata of a safetensors blob (its JSON header's ``__metadata__``)."""
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n].decode("utf-8")).get("__metadata__", {})
