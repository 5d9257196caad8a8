"""The sampler registry: ``SAMPLERS`` (name -> function) and each sampler's options.

Both :func:`~sdelab.samplers.sample` and the measured defaults
(:mod:`~sdelab.samplers.defaults`) read it; it imports only the samplers themselves.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import Tensor

from sdelab.samplers.ode import sample_dpm_solver, sample_ode
from sdelab.samplers.stochastic import (
    sample_ancestral,
    sample_annealed_langevin,
    sample_euler_maruyama,
    sample_lambda,
    sample_pc,
    sample_reverse_diffusion,
)

__all__ = ["COMMON_OPTIONS", "SAMPLERS", "sampler_options"]

#: Samplers by name. Each is ``fn(score_fn, schedule, x_T, ts, *, generator, constraint,
#: callback, **options) -> x_{t_min}``; its other keyword arguments are its options.
SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler_maruyama": sample_euler_maruyama,
    "reverse_diffusion": sample_reverse_diffusion,
    "ancestral": sample_ancestral,
    "pc": sample_pc,
    "annealed_langevin": sample_annealed_langevin,
    "lambda": sample_lambda,
    "ode": sample_ode,
    "dpm_solver": sample_dpm_solver,
}

_PLUMBING = ("generator", "constraint", "callback", "log_probs")  # passed by `sample`
#: Options `sample` handles itself, valid with every sampler: name -> default.
COMMON_OPTIONS: dict[str, object] = {"denoise": False, "rho": None}


def sampler_options(name: str) -> dict[str, object]:
    """The options of sampler ``name`` with their defaults (the common ones included)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
    params = inspect.signature(SAMPLERS[name]).parameters.values()
    own = {
        p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name not in _PLUMBING
    }
    return {**own, **COMMON_OPTIONS}
