"""Training and the run folder: typed config (:mod:`~sdelab.train.config`), config → objects
(:mod:`~sdelab.train.build`), objectives, the loop (:func:`sdelab.train.loop.train`), the
skeleton every training command runs in (:mod:`~sdelab.train.skeleton`: lock, checkpoints,
resume, signals, logs, progress), the run folder (:mod:`~sdelab.train.rundir`,
:mod:`~sdelab.train.checkpoint`), noise-conditional classifiers
(:mod:`~sdelab.train.classifier`) and variational dequantizers
(:mod:`~sdelab.train.dequantizer`)."""

from sdelab.train.build import Run, build_model, build_run, load_run, make_run_dataset
from sdelab.train.checkpoint import CheckpointError, load_checkpoint
from sdelab.train.config import ConfigError, RunConfig, builtin_configs, load_config
from sdelab.train.loop import (
    EvalContext,
    EvalHook,
    TrainingError,
    TrainingInterrupted,
    TrainResult,
    train,
)

__all__ = [
    "CheckpointError",
    "ConfigError",
    "EvalContext",
    "EvalHook",
    "Run",
    "RunConfig",
    "TrainResult",
    "TrainingError",
    "TrainingInterrupted",
    "build_model",
    "build_run",
    "builtin_configs",
    "load_checkpoint",
    "load_config",
    "load_run",
    "make_run_dataset",
    "train",
]
