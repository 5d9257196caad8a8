"""Reverse-time samplers: Euler–Maruyama, reverse diffusion, ancestral, predictor–corrector
with Langevin correctors, annealed Langevin dynamics, the λ-family, the probability-flow ODE
(fixed-step Runge–Kutta and adaptive torchdiffeq solvers) and DPM-Solver++ (2M/3M), with
measured default grids and orders (``DEFAULT_GRIDS``, ``sdelab.samplers.defaults``).

>>> from sdelab.samplers import sample, SampleResult, SAMPLERS
>>> res = sample(score_fn, schedule, (B, D), sampler="pc", steps=500)   # doctest: +SKIP

The building blocks (predictor and corrector steps, Butcher tableaux, DPM-Solver's order
rules, the probe's thresholds) live in the submodules ``stochastic``, ``ode``, ``defaults``.
"""

from sdelab.samplers.api import SampleResult, sample
from sdelab.samplers.defaults import DEFAULT_GRIDS, linear_probe
from sdelab.samplers.grids import GRIDS, time_grid
from sdelab.samplers.ode import ODE_METHODS, TABLEAUX, sample_dpm_solver, sample_ode
from sdelab.samplers.registry import SAMPLERS, sampler_options
from sdelab.samplers.stochastic import (
    CORRECTOR_STEPS,
    CORRECTORS,
    PREDICTOR_STEPS,
    PREDICTORS,
    ald_step,
    ancestral_step,
    denoise,
    euler_maruyama_step,
    gaussian_log_prob,
    noise_log_prob,
    reverse_diffusion_step,
    sample_ancestral,
    sample_annealed_langevin,
    sample_euler_maruyama,
    sample_lambda,
    sample_pc,
    sample_reverse_diffusion,
)

__all__ = [
    "CORRECTORS",
    "CORRECTOR_STEPS",
    "DEFAULT_GRIDS",
    "GRIDS",
    "ODE_METHODS",
    "PREDICTORS",
    "PREDICTOR_STEPS",
    "SAMPLERS",
    "TABLEAUX",
    "SampleResult",
    "ald_step",
    "ancestral_step",
    "denoise",
    "euler_maruyama_step",
    "gaussian_log_prob",
    "linear_probe",
    "noise_log_prob",
    "reverse_diffusion_step",
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
