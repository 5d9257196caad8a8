"""Reverse-time samplers: Euler–Maruyama, reverse diffusion, ancestral, predictor–corrector
with Langevin correctors, annealed Langevin dynamics, the λ-family, the probability-flow ODE
(fixed-step Runge–Kutta and adaptive torchdiffeq solvers) and DPM-Solver++ (2M/3M), with
measured default grids and orders (``DEFAULT_GRIDS``, ``sdelab.samplers.defaults``).

>>> from sdelab.samplers import sample, SampleResult, SAMPLERS
>>> res = sample(score_fn, schedule, (B, D), sampler="pc", steps=500)   # doctest: +SKIP
"""

from sdelab.samplers.api import SampleResult, sample
from sdelab.samplers.defaults import (
    DEFAULT_GRIDS,
    PROBE_GRIDS,
    PROBE_TOL,
    default_grid,
    linear_probe,
)
from sdelab.samplers.grids import GRIDS, time_grid
from sdelab.samplers.ode import (
    ADAPTIVE_METHODS,
    DPM_3M_FROM_NFE,
    DPM_LOWER_ORDER_FINAL_STEPS,
    DPM_MIN_STEP_RATIO,
    ODE_METHODS,
    TABLEAUX,
    ButcherTableau,
    dpm_solver_default_order,
    dpm_solver_orders,
    rk_step,
    sample_dpm_solver,
    sample_ode,
)
from sdelab.samplers.registry import COMMON_OPTIONS, SAMPLERS, sampler_options
from sdelab.samplers.stochastic import (
    CORRECTORS,
    PREDICTORS,
    ald_corrector,
    ancestral_predictor,
    denoise,
    euler_maruyama_predictor,
    langevin_corrector,
    reverse_diffusion_predictor,
    sample_ancestral,
    sample_annealed_langevin,
    sample_euler_maruyama,
    sample_lambda,
    sample_pc,
    sample_reverse_diffusion,
)

__all__ = [
    "ADAPTIVE_METHODS",
    "COMMON_OPTIONS",
    "CORRECTORS",
    "DEFAULT_GRIDS",
    "DPM_3M_FROM_NFE",
    "DPM_LOWER_ORDER_FINAL_STEPS",
    "DPM_MIN_STEP_RATIO",
    "GRIDS",
    "ODE_METHODS",
    "PREDICTORS",
    "PROBE_GRIDS",
    "PROBE_TOL",
    "SAMPLERS",
    "TABLEAUX",
    "ButcherTableau",
    "SampleResult",
    "ald_corrector",
    "ancestral_predictor",
    "default_grid",
    "denoise",
    "dpm_solver_default_order",
    "dpm_solver_orders",
    "euler_maruyama_predictor",
    "langevin_corrector",
    "linear_probe",
    "reverse_diffusion_predictor",
    "rk_step",
    "sample",
    "sample_ancestral",
    "sample_annealed_langevin",
    "sample_dpm_solver",
    "sample_euler_maruyama",
    "sample_lambda",
    "sample_ode",
    "sample_pc",
    "sample_reverse_diffusion",
    "sampler_options",
    "time_grid",
]
