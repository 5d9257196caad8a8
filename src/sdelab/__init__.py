"""sdelab: continuous-time score-based diffusion models with first-class likelihood.

The core meets at a plain ``score_fn(x, t)`` plus a :class:`~sdelab.sde.Schedule`:

>>> import torch, sdelab
>>> sde = sdelab.make_schedule("vp")                       # VE, VP, sub-VP, cosine, tutorial, VDM
>>> data = sdelab.GaussianData(torch.zeros(2), torch.eye(2))
>>> loss = sdelab.dsm_loss(data.score_fn(sde), sde, data.sample(8), parametrization="score",
...                        weighting="likelihood", time_sampling="importance").loss
>>> res = sdelab.sample(data.score_fn(sde), sde, (8, 2), sampler="dpm_solver", steps=20)
>>> ll = sdelab.log_likelihood(data.score_fn(sde), sde, data.sample(8), tol=1e-2)

This namespace holds what a user calls; everything else lives in its subpackage
(``sdelab.samplers``, ``sdelab.likelihood``, ``sdelab.train``, ``sdelab.metrics``, …).
Optional dependencies (diffusers) are imported only when used.
"""

from sdelab import metrics as metrics  # sdelab.metrics.gaussian_w2 after `import sdelab`
from sdelab.interop import from_diffusers, from_k_diffusion, load_diffusers
from sdelab.likelihood.bounds import elbo, scoreflow_bound
from sdelab.likelihood.bpd import bits_per_dim, evaluate_likelihood
from sdelab.likelihood.dequantization import nats_to_bpd
from sdelab.likelihood.ode import LikelihoodResult, log_likelihood
from sdelab.likelihood.options import Augmented, Exact, Hutchinson, Quadrature, Randomized
from sdelab.losses import dsm_loss
from sdelab.oracle import GaussianData
from sdelab.parametrization import ScoreModel, convert
from sdelab.samplers import SampleResult, sample
from sdelab.sde import (
    CosineSchedule,
    FunctionSchedule,
    LogSNRSchedule,
    Schedule,
    SubVPSchedule,
    TutorialSchedule,
    VDMLinearSchedule,
    VESchedule,
    VPSchedule,
    make_schedule,
)

__version__ = "0.1.0"

__all__ = [
    "Augmented",
    "CosineSchedule",
    "Exact",
    "FunctionSchedule",
    "GaussianData",
    "Hutchinson",
    "LikelihoodResult",
    "LogSNRSchedule",
    "Quadrature",
    "Randomized",
    "SampleResult",
    "Schedule",
    "ScoreModel",
    "SubVPSchedule",
    "TutorialSchedule",
    "VDMLinearSchedule",
    "VESchedule",
    "VPSchedule",
    "__version__",
    "bits_per_dim",
    "convert",
    "dsm_loss",
    "elbo",
    "evaluate_likelihood",
    "from_diffusers",
    "from_k_diffusion",
    "load_diffusers",
    "log_likelihood",
    "make_schedule",
    "nats_to_bpd",
    "sample",
    "scoreflow_bound",
]
