"""sdelab: continuous-time score-based diffusion models with first-class likelihood.

The core meets at a plain ``score_fn(x, t)`` plus a :class:`~sdelab.sde.Schedule`:

>>> import torch, sdelab
>>> sde = sdelab.make_schedule("vp")                       # VE, VP, sub-VP, cosine, tutorial, VDM
>>> data = sdelab.GaussianData(torch.zeros(2), torch.eye(2))
>>> loss = sdelab.dsm_loss(data.score_fn(sde), sde, data.sample(8), parametrization="score",
...                        weighting="likelihood", time_sampling="importance").loss
"""

from sdelab import metrics as metrics  # sdelab.metrics.gaussian_w2 after `import sdelab`
from sdelab.losses import TimeSample, dsm_loss, sample_time, sdeflow_dsm
from sdelab.oracle import GaussianData
from sdelab.parametrization import KINDS, ScoreModel, convert, score_fn_to_kind
from sdelab.sde import (
    SCHEDULES,
    CosineSchedule,
    FunctionSchedule,
    LogSNRSchedule,
    Schedule,
    ScheduleOutput,
    SubVPSchedule,
    TutorialSchedule,
    VDMLinearSchedule,
    VESchedule,
    VPSchedule,
    make_schedule,
)

__version__ = "0.1.0"

__all__ = [
    "KINDS",
    "SCHEDULES",
    "CosineSchedule",
    "FunctionSchedule",
    "GaussianData",
    "LogSNRSchedule",
    "Schedule",
    "ScheduleOutput",
    "ScoreModel",
    "SubVPSchedule",
    "TimeSample",
    "TutorialSchedule",
    "VDMLinearSchedule",
    "VESchedule",
    "VPSchedule",
    "convert",
    "dsm_loss",
    "make_schedule",
    "sample_time",
    "score_fn_to_kind",
    "sdeflow_dsm",
]
