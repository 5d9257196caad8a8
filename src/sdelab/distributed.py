r"""Many processes, one result: the few ``torch.distributed`` calls sdelab makes.

sdelab does not launch processes itself: ``torchrun --nproc_per_node N`` or
``accelerate launch --num_processes N`` start N copies of the same command and set
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. :func:`init` joins
that process group (NCCL on CUDA, gloo on CPU); with one process it does nothing, so the
single-process path never touches ``torch.distributed``. Training synchronises gradients with
PyTorch's ``DistributedDataParallel``; evaluation has no collective until every rank has
finished its own solves (:func:`gather_indexed`), so ranks taking different numbers of
adaptive ODE steps cannot deadlock.

Work is split by *index*, never by rank (:func:`shard`): item i (a test batch, a chunk of
samples) goes to rank i mod N and its randomness is seeded by i, so the gathered result is the
same for every N.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "any_rank",
    "barrier",
    "gather_indexed",
    "get_info",
    "init",
    "leave",
    "shard",
]

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part (collectives are live)."""
        return self.world_size > 1


def launched_world_size() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: str | torch.device = "cpu") -> DistInfo:
    """Join the launcher's process group (once) and return this process's place in it.

    Args:
        device: the device training/evaluation runs on; ``cuda`` selects the NCCL backend and
            pins this process to ``cuda:LOCAL_RANK``, anything else uses gloo.

    Returns:
        :class:`DistInfo`; ``DistInfo()`` (rank 0 of 1) when no launcher set ``WORLD_SIZE > 1``.
    """
    if launched_world_size() <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def leave(wait: bool = True) -> bool:
    """Leave the process group joined by :func:`init`; returns whether there was one.

    Args:
        wait: first wait for every rank (a barrier), so that no rank tears its group down
            while another still works or is inside its last collective. Pass ``False`` when
            this rank alone failed: the others may never reach the barrier.

    A process that was in a group must then end with ``os._exit`` (the CLI does): the group's
    gloo worker threads outlive :func:`torch.distributed.destroy_process_group` (a
    ``DistributedDataParallel`` keeps references to the group that are never released) and
    racing them against the interpreter's own teardown aborts the process now and then
    (``terminate called without an active exception``).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False
    if wait:
        try:
            dist.barrier()
        except RuntimeError:  # a rank that failed alone has left: the launcher ends the run
            pass
    dist.destroy_process_group()
    return True


def get_info() -> DistInfo:
    """This process's place in an initialised group, or rank 0 of 1."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shard(n_items: int, info: DistInfo) -> range:
    """The item indices this rank handles: ``rank, rank + N, rank + 2N, …`` below ``n_items``."""
    return range(info.rank, n_items, info.world_size)


def gather_indexed(local: Sequence[tuple[int, T]], info: DistInfo) -> list[T]:
    """Every rank's ``(index, item)`` pairs, on every rank, as one list sorted by index.

    The only collective of an evaluation; call it after all local work is done. Items are
    pickled (``all_gather_object``), so move tensors to the CPU first.
    """
    pairs = list(local)
    if info.enabled:
        parts: list[Any] = [None] * info.world_size
        dist.all_gather_object(parts, pairs)
        pairs = [p for part in parts for p in part]
    return [item for _, item in sorted(pairs, key=lambda p: p[0])]


def any_rank(flag: bool, info: DistInfo, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is true on any rank (e.g. a signal seen by one)."""
    if not info.enabled:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op with one process)."""
    if info.enabled:
        dist.barrier()
