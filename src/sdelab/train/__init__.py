"""Training: typed config, the loop, checkpoints. See :func:`sdelab.train.loop.train`."""

from sdelab.train.checkpoint import CheckpointError, load_checkpoint, load_run
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
    "RunConfig",
    "TrainResult",
    "TrainingError",
    "TrainingInterrupted",
    "builtin_configs",
    "load_checkpoint",
    "load_config",
    "load_run",
    "train",
]
