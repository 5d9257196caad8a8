"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: evaluate in many
processes and let rank 0 write what it got (compared there with a one-process run)."""

from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file

from sdelab import distributed
from sdelab.likelihood.bpd import ODE, evaluate_sharded
from sdelab.likelihood.options import Hutchinson
from sdelab.runs import run_likelihood, sample_run
from sdelab.sde import make_schedule

#: the hard data's estimator: the exact trace to 1e-3 nats per example.
HARD = ODE(tol=1e-3)


def hard_score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """N(0, I) data's VP score, plus a fast wiggle for examples far out (|x| > 5): those need
    many more adaptive ODE steps than the rest. Examples do not interact."""
    far = (x.norm(dim=1, keepdim=True) > 5).to(x.dtype)
    return -x + far * 2.0 * torch.sin(20.0 * x)


def hard_data() -> torch.Tensor:
    return torch.tensor([[6.0, 6.0], [0.1, 0.2], [-0.3, 0.4], [0.5, -0.6], [0.2, 0.1]])


def evaluate_all(run_dir: str) -> dict[str, torch.Tensor]:
    """Every distributed evaluation under test, as tensors."""
    hard = evaluate_sharded(
        hard_score,
        make_schedule("vp"),
        hard_data(),
        estimator=HARD,
        batch_size=1,
        group=distributed.get_info(),
    )
    unsharded: list[int] = []  # no group: every batch here, though a process group exists
    evaluate_sharded(
        hard_score,
        make_schedule("vp"),
        hard_data()[1:],
        batch_size=1,
        on_batch=lambda i, _: unsharded.append(i),
    )
    lik = run_likelihood(
        run_dir,
        estimator=ODE(tol=1e-3, divergence=Hutchinson(1)),
        n=7,
        batch_size=2,
        progress=False,
    )
    smp = sample_run(run_dir, n=11, batch_size=3, sampler="euler_maruyama", steps=20, seed=3)
    return {
        "hard_nll": hard.nll,
        "hard_nfe": torch.tensor(hard.nfe),
        "unsharded": torch.tensor(unsharded),
        "lik_nll": lik.nll,
        "samples": smp.samples,
    }


def nfe_per_example() -> list[int]:
    """NFE of each hard-data example solved alone (batch size 1)."""
    out = []
    for x in hard_data():
        res = evaluate_sharded(hard_score, make_schedule("vp"), x[None], estimator=HARD)
        out.append(res.nfe)
    return out


if __name__ == "__main__":
    run_dir, out = sys.argv[1], sys.argv[2]
    info = distributed.init("cpu")
    result = evaluate_all(run_dir)
    if info.is_main:
        save_file({k: v.contiguous() for k, v in result.items()}, out)
    torch.distributed.destroy_process_group()
