"""Shared fixtures: every built-in schedule plus two user-defined ones."""

from __future__ import annotations

import pytest
import torch

from sdelab.interop import DiscreteVPSchedule
from sdelab.sde import SCHEDULES, FunctionSchedule, Schedule, make_schedule

# One intra-op thread per test process: pytest-xdist already runs one worker per core, and
# OpenMP barriers across oversubscribed cores slow small ops by 10-100x.
torch.set_num_threads(1)


class OUSchedule(Schedule):
    """A user-defined schedule given only by α and σ (Ornstein–Uhlenbeck on [1e-3, 5])."""

    def __init__(self) -> None:
        super().__init__(t_min=1e-3, T=5.0)

    def alpha_sigma(self, t):
        return torch.exp(-t), torch.sqrt(-torch.expm1(-2 * t))


def edm_like() -> FunctionSchedule:
    """α = 1, σ = t on [0.002, 80], as two plain functions."""
    return FunctionSchedule(torch.ones_like, lambda t: t, t_min=0.002, T=80.0)


def all_schedules() -> dict[str, Schedule]:
    out = {name: make_schedule(name) for name in SCHEDULES if name != "vdm-learned"}
    out["vdm-learned"] = make_schedule("vdm-learned", hidden=16)  # small: keeps tests fast
    out["user-subclass"] = OUSchedule()
    out["user-functions"] = edm_like()
    # a discrete DDPM chain (1000 linear β) as a continuous schedule (sdelab.interop)
    out["ddpm-discrete"] = DiscreteVPSchedule(
        torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
    )
    return out


SCHEDULE_NAMES = list(all_schedules())


@pytest.fixture(params=SCHEDULE_NAMES)
def schedule(request) -> Schedule:
    return all_schedules()[request.param]


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
