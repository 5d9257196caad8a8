r"""Typed run configuration: pydantic models loaded from YAML, with dotted command-line overrides.

A run config has seven sections; every key has a default, so a YAML file names only what it
changes. Unknown keys and bad values are rejected with one line naming the key and the valid
choices. ``sdelab train --dry-run`` prints the resolved config.

.. code-block:: yaml

    data:   {name: checkerboard, path: null, options: {}}      # name: a key of DATASETS
    sde:    {name: vp, kwargs: {}}                               # make_schedule(name, **kwargs)
    model:  {arch: mlp, width: 128, depth: 3, embedding: sinusoidal, embedding_dim: 64,
             embedding_scale: null, dim: null}                   # dim: filled from the data
            # arch: unet adds base_channels: 32, channel_mults: [1, 2, 2], num_res_blocks: 1,
            # attn_resolutions: [], mid_attention: true, attn_heads: 1, dropout: 0.0,
            # fourier_features: [], num_groups: 8, image_shape: null (filled from the data)
            # num_classes: 0, label_dropout: 0.0 (class-conditional nets, either arch)
    loss:   {objective: dsm, parametrization: eps, weighting: score-matching,
             time_sampling: uniform, low_discrepancy: false, vlb_steps: 0,
             discrete_steps: 1000, score_matching_order: 1, high_order_weight: 1.0,
             second_order_form: full}                            # objective: dsm vdm ddpm smld
    optim:  {name: adam, lr: 0.001, betas: [0.9, 0.999], eps: 1.0e-08, weight_decay: 0.0,
             warmup_steps: 0, schedule: constant, min_lr_ratio: 0.0, grad_clip: 1.0}
    train:  {steps: 10000, batch_size: 512, ema_decay: 0.999, seed: 0, log_every: 10,
             ckpt_every: 1000, keep_last: 3, eval_every: 0, device: cpu, tensorboard: false,
             mixed_precision: "no", grad_accum: 1, sample_every: 0, ckpt_every_epochs: 0,
             memory_check: true, memory_limit_mb: null, channels_last: false, compile: false,
             init_from: null}
    eval:   {n_test: 2000, sampler: null, steps: 500, options: {}, n_samples: 64,
             sampler_options: {}}

Built-in configs live in the package, ``src/sdelab/configs/<group>/<name>.yaml`` (installed as
package data); :func:`resolve_config_path` finds them by ``group/name`` or by bare ``name``.
"""

from __future__ import annotations

import inspect
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sdelab.data import DATASETS, dataset_options
from sdelab.data.image_data import IMAGE_DATA_NAMES, image_shape_for
from sdelab.losses import SECOND_ORDER_FORMS, TIME_SAMPLERS, WEIGHTINGS
from sdelab.nets.embeddings import TIME_EMBEDDINGS
from sdelab.nets.unet import ImageUNet
from sdelab.parametrization import KINDS
from sdelab.samplers import SAMPLERS, sampler_options
from sdelab.sde import SCHEDULES, make_schedule

__all__ = [
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "SDEConfig",
    "TrainConfig",
    "apply_overrides",
    "builtin_configs",
    "load_config",
    "resolve_config_path",
]


#: The SDE each discrete objective discretises.
DISCRETE_SCHEDULES = {"ddpm": "vp", "smld": "ve"}
#: Options of the exact chains (sdelab.discrete.sample_ddpm / sample_ncsn) for eval.sampler=chain.
CHAIN_OPTIONS = {"ddpm": (), "smld": ("n_steps_each", "step_lr", "denoise")}
#: Schedules the VDM objective accepts, and those of them with parameters.
VDM_SCHEDULES = ("vdm", "vdm-learned-ends", "vdm-learned")
LEARNED_SCHEDULES = ("vdm-learned-ends", "vdm-learned")


class ConfigError(ValueError):
    """A bad config file, key or value; the message is one line naming the key and the fix."""


def _choose(what: str, value: object, choices) -> ValueError:
    return ValueError(f"unknown {what} {value!r}: choose one of {', '.join(choices)}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Training data. ``name``: a key of ``sdelab.data.DATASETS`` (the eight toys, ``oracle``,
    ``array``); ``path``: the ``.npy``/``.csv`` file for ``array``; ``options``: extra
    keyword arguments of the dataset (``oracle``: mean, cov; ``array``: test_fraction).
    :func:`load_config` makes ``path`` and ``options.root`` absolute (relative to the working
    directory), so the run works from anywhere; ``as_typed`` keeps what was typed."""

    name: str = "checkerboard"
    path: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    as_typed: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in DATASETS:
            raise _choose("dataset", v, DATASETS)
        return v

    @model_validator(mode="after")
    def _path_for_arrays(self) -> DataConfig:
        if (self.name == "array") != (self.path is not None):
            raise ValueError("set data.path (a .npy/.csv file) exactly when data.name is 'array'")
        valid = [o for o in dataset_options(self.name) if o != "path"]
        unknown = sorted(set(self.options) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown data.options {', '.join(unknown)} for dataset {self.name!r}: "
                f"valid are {', '.join(valid) or 'none'}"
            )
        return self


class SDEConfig(_Section):
    """The forward SDE: ``make_schedule(name, **kwargs)``; ``name`` is a key of SCHEDULES
    (ve, vp, subvp, cosine, tutorial, vdm); ``kwargs`` e.g. {beta_min: 0.1, t_min: 1e-3}."""

    name: str = "vp"
    kwargs: dict[str, float] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in SCHEDULES:
            raise _choose("schedule", v, SCHEDULES)
        return v

    @model_validator(mode="after")
    def _builds(self) -> SDEConfig:
        valid = [p for p in inspect.signature(SCHEDULES[self.name]).parameters]
        unknown = sorted(set(self.kwargs) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown sde.kwargs {', '.join(unknown)} for schedule {self.name!r}: "
                f"valid are {', '.join(valid)}"
            )
        make_schedule(self.name, **self.kwargs)  # bad values raise a ValueError saying why
        return self


class ModelConfig(_Section):
    """The network: ``arch`` (mlp, unet); ``width`` and ``depth`` (MLP hidden layers);
    ``embedding`` of time (sinusoidal, fourier) with ``embedding_dim`` (MLP only; the U-Net
    embeds into ``base_channels``) and ``embedding_scale`` (null: the embedding's default);
    ``dim``: data dimension, null = taken from the dataset (every saved config has it filled
    in). U-Net only (``sdelab.nets.unet.UNet``): ``base_channels``, ``channel_mults``,
    ``num_res_blocks``, ``attn_resolutions`` (feature-map sizes with self-attention),
    ``mid_attention``, ``attn_heads``, ``dropout``, ``fourier_features`` (VDM input-feature
    exponents), ``num_groups``, and ``image_shape`` [C, H, W] (null = from the image data;
    filled in when the config is loaded, so a checkpoint rebuilds the U-Net alone).
    Class-conditional nets (classifier-free guidance, either arch): ``num_classes`` K ≥ 2 (0 =
    unconditional) adds a learned class embedding (K classes + a null class) to the time
    embedding; the data must have K classes and training feeds their labels, each replaced by
    the null label with probability ``label_dropout`` (e.g. 0.1; needed for guidance scales
    other than 1)."""

    arch: Literal["mlp", "unet"] = "mlp"
    width: int = Field(128, ge=1)
    depth: int = Field(3, ge=1)
    embedding: str = "sinusoidal"
    embedding_dim: int = Field(64, ge=2, multiple_of=2)
    embedding_scale: float | None = Field(None, gt=0)
    dim: int | None = Field(None, ge=1)
    base_channels: int = Field(32, ge=1)
    channel_mults: list[int] = Field(default_factory=lambda: [1, 2, 2], min_length=1)
    num_res_blocks: int = Field(1, ge=1)
    attn_resolutions: list[int] = Field(default_factory=list)
    mid_attention: bool = True
    attn_heads: int = Field(1, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    fourier_features: list[int] = Field(default_factory=list)
    num_groups: int = Field(8, ge=1)
    image_shape: list[int] | None = Field(None, min_length=3, max_length=3)
    num_classes: int = Field(0, ge=0)
    label_dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _conditional(self) -> ModelConfig:
        if self.num_classes == 1:
            raise ValueError(
                "model.num_classes=1: a conditional net needs at least 2 classes (0 = off)"
            )
        if self.label_dropout > 0 and not self.num_classes:
            raise ValueError(
                "model.label_dropout needs a conditional net: set model.num_classes=K too"
            )
        return self

    @field_validator("channel_mults", "image_shape")
    @classmethod
    def _positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(m < 1 for m in v):
            raise ValueError(f"must be positive integers, got {v}")
        return v

    @field_validator("embedding")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in TIME_EMBEDDINGS:
            raise _choose("time embedding", v, TIME_EMBEDDINGS)
        return v

    def unet_kwargs(self) -> dict[str, Any]:
        """The :class:`~sdelab.nets.unet.ImageUNet` arguments of ``arch: unet`` (``image_shape``
        must be set)."""
        if self.image_shape is None:
            raise ValueError("model.image_shape is unset: resolve it from the image data first")
        c, h, w = self.image_shape
        scale = {} if self.embedding_scale is None else {"scale": self.embedding_scale}
        return dict(
            image_size=(h, w),
            in_channels=c,
            base_channels=self.base_channels,
            channel_mults=tuple(self.channel_mults),
            num_res_blocks=self.num_res_blocks,
            attn_resolutions=tuple(self.attn_resolutions),
            mid_attention=self.mid_attention,
            attn_heads=self.attn_heads,
            dropout=self.dropout,
            time_embedding=self.embedding,
            time_embedding_kwargs=scale,
            fourier_features=tuple(self.fourier_features),
            num_groups=self.num_groups,
            num_classes=self.num_classes,
        )


class LossConfig(_Section):
    """The training objective. ``objective``: ``dsm`` (denoising score matching,
    ``sdelab.dsm_loss``) or ``vdm`` (the whole VDM variational bound, ``sdelab.vdm.vdm_vlb``:
    diffusion + prior + reconstruction, in bits/dim; image data use the discretized decoder over
    their levels, continuous data the Gaussian decoder; a learned schedule's shape gets VDM's
    variance-minimising gradient). ``parametrization`` is what the network predicts (eps,
    score, x0, v, drift, velocity = i-DODE's dx_t/dt); ``weighting`` (score-matching = σ²,
    likelihood = g²; ``vdm`` needs likelihood); ``time_sampling`` (uniform, importance ∝ g²/σ²,
    importance-velocity ∝ −λ' sigmoid(λ): i-DODE's); ``low_discrepancy`` (VDM's
    evenly spaced, antithetic times); ``vlb_steps`` (``vdm`` only: 0 = continuous-time
    diffusion loss, T > 0 = the T-step loss). Discrete time (``sdelab.discrete``): ``ddpm``
    (DDPM's L_simple on ``discrete_steps`` N integer steps of the VP SDE, sde.name=vp) and
    ``smld`` (NCSN's σ²-weighted loss on N geometric noise levels of the VE SDE, sde.name=ve);
    the saved model is their continuous view, so every sampler and the ODE likelihood apply.
    ``score_matching_order`` (``dsm`` only): 2 or 3 add Lu et al.'s second- (and third-) order
    denoising score matching terms (``sdelab.losses.high_order_dsm_loss``), weighted by
    ``high_order_weight`` λ; ``second_order_form``: ``full`` (Lu et al.: Frobenius + trace) or
    ``trace`` (i-DODE's second-order flow-matching fine-tuning, λ = 0.1)."""

    objective: Literal["dsm", "vdm", "ddpm", "smld"] = "dsm"
    parametrization: str = "eps"
    weighting: str = "score-matching"
    time_sampling: str = "uniform"
    low_discrepancy: bool = False
    vlb_steps: int = Field(0, ge=0)
    discrete_steps: int = Field(1000, ge=2)  # N of ddpm / smld (sdelab.discrete)
    score_matching_order: Literal[1, 2, 3] = 1
    high_order_weight: float = Field(1.0, ge=0)
    second_order_form: str = "full"

    @field_validator("second_order_form")
    @classmethod
    def _form(cls, v: str) -> str:
        if v not in SECOND_ORDER_FORMS:
            raise _choose("second_order_form", v, SECOND_ORDER_FORMS)
        return v

    @model_validator(mode="after")
    def _high_order(self) -> LossConfig:
        if self.score_matching_order > 1 and self.objective != "dsm":
            raise ValueError(
                f"loss.score_matching_order={self.score_matching_order} adds terms to denoising "
                f"score matching: set loss.objective=dsm (got {self.objective})"
            )
        return self

    @field_validator("parametrization")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v not in KINDS:
            raise _choose("parametrization", v, KINDS)
        return v

    @field_validator("weighting")
    @classmethod
    def _weighting(cls, v: str) -> str:
        if v not in WEIGHTINGS:
            raise _choose("weighting", v, WEIGHTINGS)
        return v

    @field_validator("time_sampling")
    @classmethod
    def _sampler(cls, v: str) -> str:
        if v not in TIME_SAMPLERS:
            raise _choose("time sampler", v, TIME_SAMPLERS)
        return v


class OptimConfig(_Section):
    """Optimiser: ``name`` adam or adamw; ``lr``; ``betas``; ``eps``; ``weight_decay``;
    ``warmup_steps`` of linear warm-up from lr/warmup_steps to lr; ``schedule`` after the
    warm-up: ``constant`` or ``cosine`` (decay to ``min_lr_ratio``·lr at the last of
    ``train.steps``); ``grad_clip``: max global gradient norm (null: no clipping)."""

    name: Literal["adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"betas must lie in [0, 1), got {list(v)}")
        return v


_DEVICE = re.compile(r"^(cpu|auto|mps|cuda(:\d+)?)$")


class TrainConfig(_Section):
    """The loop: ``steps`` (optimizer steps in total), ``batch_size``, ``ema_decay`` (0: EMA =
    raw weights; warmed up as min(ema_decay, (1 + step)/(10 + step))), ``seed``, and every
    how many steps to ``log_every`` (JSONL line), ``ckpt_every`` (checkpoint; the last step is
    always saved), ``eval_every`` (0: never) and how many checkpoints to ``keep_last``;
    ``device`` (cpu, cuda, cuda:N, mps, auto); ``tensorboard`` (needs
    ``pip install 'sdelab[tensorboard]'``); ``mixed_precision`` (no, bf16, fp16: autocast of the
    loss; fp16 needs CUDA and uses a gradient scaler; auto: bf16 where the device computes it
    natively — a CPU with AVX-512 BF16/AMX, a CUDA GPU of compute capability ≥ 8 — else no);
    ``grad_accum`` (micro-batches per optimizer step: ``batch_size`` is the global batch, split
    over processes, then into ``grad_accum`` micro-batches, so it must be divisible by
    processes × grad_accum);
    ``sample_every`` (0: never): write ``samples/step_NNNNNNNN.png`` and ``.npy`` from the EMA
    model with ``eval.sampler`` / ``eval.steps`` and a fixed seed; ``ckpt_every_epochs`` (0:
    off): also checkpoint every that many passes over the training set;
    ``memory_check``: before step 1 print the parameter count and the peak memory of one trial
    step, and refuse to start when it exceeds the device's free memory (or
    ``memory_limit_mb``);
    ``channels_last`` (store the network's 4-D weights, hence its activations, NHWC) and
    ``compile`` (``torch.compile`` the trained network; the first step compiles, minutes on a
    CPU): speed options with the same maths, both off by default as measured on a 2-core CPU
    (``benchmarks/bench_unet_speed.py``);
    ``init_from``: a run folder whose newest checkpoint (weights and EMA) starts this run at
    step 0, e.g. a fine-tuning stage after a trained run (the model, sde and parametrization
    must match; ignored on ``--resume``, where the run's own checkpoint wins)."""

    steps: int = Field(10_000, ge=1)
    batch_size: int = Field(512, ge=1)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    seed: int = Field(0, ge=0)
    log_every: int = Field(10, ge=1)
    ckpt_every: int = Field(1000, ge=1)
    keep_last: int = Field(3, ge=1)
    eval_every: int = Field(0, ge=0)
    device: str = "cpu"
    tensorboard: bool = False
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "no"
    grad_accum: int = Field(1, ge=1)
    sample_every: int = Field(0, ge=0)
    ckpt_every_epochs: int = Field(0, ge=0)
    memory_check: bool = True
    memory_limit_mb: float | None = Field(None, gt=0)
    channels_last: bool = False
    compile: bool = False
    init_from: str | None = None

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE.match(v):
            raise ValueError(f"unknown device {v!r}: choose one of cpu, cuda, cuda:N, mps, auto")
        return v

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _no_precision(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `no` as False
        return "no" if v is False or v is None else v

    @model_validator(mode="after")
    def _batches(self) -> TrainConfig:
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"train.batch_size={self.batch_size} is not divisible by "
                f"train.grad_accum={self.grad_accum}: each micro-batch must be the same size"
            )
        if self.mixed_precision == "fp16" and self.device in ("cpu", "mps"):
            raise ValueError(
                f"train.mixed_precision=fp16 needs CUDA, but train.device={self.device}: "
                "on CPU use bf16 or no"
            )
        return self


#: ``eval.options`` of the built-in likelihood hook (``sdelab.train.hooks.likelihood_hook``):
#: name -> (check, what it must be).
EVAL_OPTIONS = {
    "n_eval": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "an integer >= 1",
    ),
    "tol": (
        lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v > 0,
        "> 0 (nats per example)",
    ),
}


class EvalConfig(_Section):
    """Periodic evaluation (every ``train.eval_every`` steps, by the hook the caller passes):
    ``n_test`` held-out points, a ``sampler`` name (a key of ``sdelab.samplers.SAMPLERS``, or
    ``chain``: the exact DDPM/NCSN chain of a discrete objective; null: euler_maruyama) and its
    number of ``steps``, ``options`` for the built-in likelihood hook (:data:`EVAL_OPTIONS`:
    ``n_eval``, ``tol``; other keys are errors — a hook of your own takes its
    settings as arguments); for ``train.sample_every``: ``n_samples`` and the sampler's
    ``sampler_options`` (e.g. {snr: 0.075}). ``fd_features`` (``identity`` or ``classifier``
    with ``fd_classifier`` a clean classifier folder) adds the Fréchet distance of ``fd_n`` EMA
    samples (drawn with ``sampler`` / ``steps``, DPM-Solver 20 steps by default) to the test
    set; ``select_best: fd`` keeps the checkpoint of the lowest FD (``RUN/best.json``;
    ``--checkpoint best`` in sample and likelihood)."""

    n_test: int = Field(2000, ge=1)
    sampler: str | None = None
    steps: int = Field(500, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)
    n_samples: int = Field(64, ge=1)
    sampler_options: dict[str, Any] = Field(default_factory=dict)
    fd_features: Literal["identity", "classifier"] | None = None
    fd_classifier: str | None = None
    fd_n: int = Field(500, ge=2)
    select_best: Literal["fd"] | None = None

    @model_validator(mode="after")
    def _fd_options(self) -> EvalConfig:
        if self.select_best == "fd" and self.fd_features is None:
            raise ValueError(
                "eval.select_best=fd needs eval.fd_features (identity for vector data, "
                "classifier with eval.fd_classifier=DIR from sdelab train-classifier --clean)"
            )
        if self.fd_features == "classifier" and not self.fd_classifier:
            raise ValueError("eval.fd_features=classifier needs eval.fd_classifier=DIR")
        return self

    @field_validator("options")
    @classmethod
    def _known_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - set(EVAL_OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown eval.options {', '.join(unknown)}: valid are {', '.join(EVAL_OPTIONS)}"
            )
        for key, value in v.items():
            check, want = EVAL_OPTIONS[key]
            if not check(value):
                raise ValueError(f"eval.options.{key} must be {want}, got {value!r}")
        return v


class RunConfig(_Section):
    """A whole run; see the module docstring for every key and its default."""

    data: DataConfig = Field(default_factory=DataConfig)
    sde: SDEConfig = Field(default_factory=SDEConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _vdm_objective(self) -> RunConfig:
        """``loss.objective: vdm`` needs a VDM schedule, likelihood weighting and, on image
        data, the [-1, 1] range of its decoder; a learned schedule needs the VDM objective."""
        loss, sde = self.loss, self.sde
        learned = sde.name in LEARNED_SCHEDULES
        if loss.objective != "vdm":
            if learned:
                raise ValueError(
                    f"sde.name={sde.name} has parameters only the VDM bound trains: set "
                    "loss.objective=vdm (or use the fixed sde.name=vdm)"
                )
            if loss.vlb_steps:
                raise ValueError("loss.vlb_steps needs loss.objective=vdm: remove it or set both")
            return self
        if sde.name not in VDM_SCHEDULES:
            raise ValueError(
                f"loss.objective=vdm needs a variance-preserving schedule on [0, 1] with finite "
                f"end points: set sde.name to one of {', '.join(VDM_SCHEDULES)} "
                f"(got {sde.name!r})"
            )
        if loss.weighting != "likelihood":
            raise ValueError(
                "loss.objective=vdm is the likelihood-weighted bound: set loss.weighting=likelihood"
            )
        if self.model.num_classes:
            raise ValueError(
                "loss.objective=vdm trains unconditional models: set model.num_classes=0 "
                "(class-conditional training uses loss.objective=dsm)"
            )
        if loss.time_sampling != "uniform" and (learned or loss.vlb_steps):
            why = (
                "a learned schedule's shape is trained by the variance of the uniform-t loss"
                if learned
                else "the T-step loss draws its step uniformly"
            )
            raise ValueError(
                f"loss.time_sampling={loss.time_sampling} with loss.objective=vdm: {why}; "
                "set loss.time_sampling=uniform"
            )
        data_range = self.data.options.get("data_range", "[-1,1]")
        if self.data.name in IMAGE_DATA_NAMES and data_range != "[-1,1]":
            raise ValueError(
                f"loss.objective=vdm decodes image levels at bin centres in [-1, 1], but "
                f"data.options.data_range={data_range}: set data.options.data_range=[-1,1]"
            )
        return self

    @model_validator(mode="after")
    def _discrete_objective(self) -> RunConfig:
        """``ddpm`` discretises the VP SDE and ``smld`` the VE SDE, at uniform integer steps."""
        loss = self.loss
        need = DISCRETE_SCHEDULES.get(loss.objective)
        if need is None:
            return self
        if self.sde.name != need:
            raise ValueError(
                f"loss.objective={loss.objective} discretises the {need.upper()} SDE: set "
                f"sde.name={need} (got {self.sde.name!r})"
            )
        for key, default in (("weighting", "score-matching"), ("time_sampling", "uniform")):
            if getattr(loss, key) != default:
                raise ValueError(
                    f"loss.{key}={getattr(loss, key)} has no meaning for loss.objective="
                    f"{loss.objective} (uniform steps, σ² weighting): remove it or set "
                    f"loss.{key}={default}"
                )
        if loss.objective == "ddpm":
            beta_max = float(self.sde.kwargs.get("beta_max", 20.0))
            if loss.discrete_steps <= beta_max:
                raise ValueError(
                    f"loss.discrete_steps={loss.discrete_steps} gives DDPM steps β = β_max/N >= 1:"
                    f" use more than {beta_max:g} steps"
                )
        return self

    @model_validator(mode="after")
    def _sampler_known(self) -> RunConfig:
        sampler = self.eval.sampler
        if sampler is not None and sampler not in SAMPLERS and sampler != "chain":
            raise ValueError(
                f"unknown eval.sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}, chain"
            )
        if sampler == "chain" and self.loss.objective not in DISCRETE_SCHEDULES:
            raise ValueError(
                "eval.sampler=chain is the exact chain of a discrete objective: set "
                "loss.objective to ddpm or smld, or choose a continuous sampler"
            )
        if sampler == "chain":
            valid = CHAIN_OPTIONS[self.loss.objective]
        else:
            valid = tuple(sampler_options(sampler or "euler_maruyama"))
        unknown = sorted(set(self.eval.sampler_options) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown eval.sampler_options {', '.join(unknown)} for eval.sampler="
                f"{sampler or 'euler_maruyama'}: valid are {', '.join(valid) or 'none'}"
            )
        return self

    @model_validator(mode="after")
    def _unet_on_images(self) -> RunConfig:
        """``model.arch: unet`` needs image data; fill and check ``model.image_shape`` and
        build the U-Net on the meta device so bad sizes/levels fail here, in one line."""
        if self.model.arch != "unet":
            return self
        if self.data.name not in IMAGE_DATA_NAMES:
            raise ValueError(
                f"model.arch=unet needs image data: data.name is {self.data.name!r}, choose "
                f"one of {', '.join(IMAGE_DATA_NAMES)} (or model.arch=mlp)"
            )
        shape = image_shape_for(self.data.name, self.data.options)
        given = self.model.image_shape
        if given is not None and shape is not None and list(shape) != list(given):
            raise ValueError(
                f"model.image_shape={list(given)} but the data are {list(shape)} (C, H, W): "
                "remove model.image_shape"
            )
        if given is None and shape is None:
            raise ValueError(
                "model.arch=unet on a folder needs data.options.size (or model.image_shape)"
            )
        if given is None:
            self.model.image_shape = list(shape)
        with torch.device("meta"):  # builds no memory, only validates the options
            ImageUNet(**self.model.unet_kwargs())  # raises ValueError naming the bad option
        return self

    # ---- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return json.loads(self.model_dump_json())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> RunConfig:
        """Validate a nested dict; raise :class:`ConfigError` with a one-line message."""
        if not isinstance(data, dict):
            raise ConfigError(
                f"{source}: expected a mapping of sections, got {type(data).__name__}"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(f"{source}: {_format_errors(e)}") from None


def _section_fields(loc: tuple) -> list[str] | None:
    """Field names valid at the parent of ``loc`` (for 'unknown key' messages)."""
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return list(model.model_fields)


def _format_errors(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "config"
        if e["type"] == "extra_forbidden":
            valid = _section_fields(loc)
            hint = f": valid keys are {', '.join(valid)}" if valid else ""
            parts.append(f"unknown key {key!r}{hint}")
            continue
        msg = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if e["type"] != "value_error" and "input" in e:
            msg += f" (got {e['input']!r})"
        parts.append(f"{key}: {msg}")
    return "; ".join(parts)


# ---- overrides -------------------------------------------------------------------------------
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_scalar(text: str) -> Any:
    """A command-line value as a YAML scalar (``3e-4`` is a float, ``null`` is None, ``[1, 2]`` a
    list), with YAML 1.1's gap filled: exponent floats without a dot parse as numbers."""
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value)
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``KEY=VALUE`` overrides (``optim.lr=3e-4``, ``sde.kwargs.beta_max=10``) to a
    nested dict, returning a new dict. Values are YAML scalars. Raises :class:`ConfigError`."""
    out = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(
                f"bad override {item!r}: write KEY=VALUE with a dotted key, e.g. optim.lr=3e-4"
            )
        try:
            value = parse_scalar(text)
        except yaml.YAMLError:
            raise ConfigError(f"bad override {item!r}: {text!r} is not a YAML value") from None
        *parents, leaf = key.split(".")
        node = out
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                prefix = ".".join(parents[: i + 1])
                raise ConfigError(f"bad override {item!r}: {prefix} is a value, not a section")
            node = child
        node[leaf] = value
    return out


# ---- files and built-ins ---------------------------------------------------------------------
class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (not the last
    one silently kept)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first at line {seen[key]})",
                key_node.start_mark,
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """``line L, column C: problem`` of a YAML error."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or (str(e).splitlines() or ["parse error"])[0]
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _builtin_root():
    return resources.files("sdelab") / "configs"


def builtin_configs() -> list[str]:
    """Names of the built-in configs, as ``group/name`` (e.g. ``toy/checkerboard``)."""
    root = _builtin_root()
    if not root.is_dir():
        return []
    names = []
    for group in root.iterdir():
        if group.is_dir():
            names += [
                f"{group.name}/{f.name[:-5]}" for f in group.iterdir() if f.name.endswith(".yaml")
            ]
    return sorted(names)


def resolve_config_path(config: str | Path) -> Path | Any:
    """A YAML path, or a built-in config by ``group/name`` or unique bare ``name``.

    Raises ``FileNotFoundError`` listing the built-ins when neither matches.
    """
    path = Path(config)
    if path.is_file():
        return path
    name = str(config).removesuffix(".yaml")
    builtins = builtin_configs()
    matches = [b for b in builtins if b == name or b.split("/", 1)[1] == name]
    if len(matches) == 1:
        group, stem = matches[0].split("/", 1)
        return _builtin_root() / group / f"{stem}.yaml"
    raise FileNotFoundError(
        f"config {str(config)!r} is neither a YAML file nor a built-in config: "
        f"choose one of {', '.join(builtins)}"
    )


def load_config(config: str | Path | dict[str, Any], overrides: list[str] = ()) -> RunConfig:
    """Load a run config from a YAML path, a built-in name or a dict, then apply overrides.

    Args:
        config: YAML file path, built-in name (see :func:`builtin_configs`) or a nested dict.
        overrides: dotted ``KEY=VALUE`` strings, e.g. ``["optim.lr=3e-4", "train.steps=500"]``.

    Returns:
        The validated :class:`RunConfig` (``model.dim`` may still be unset).

    Raises:
        FileNotFoundError: no such file or built-in.
        ConfigError: bad YAML, unknown key or bad value (one line naming the key and choices).
    """
    if isinstance(config, dict):
        data, source = config, "config"
    else:
        path = resolve_config_path(config)
        source = str(config)
        try:
            data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML ({_yaml_problem(e)})") from None
    data = absolute_data_paths(apply_overrides(data, list(overrides)))
    return RunConfig.from_dict(_absolute_init_from(data), source)


def _absolute_init_from(data: dict[str, Any]) -> dict[str, Any]:
    """``train.init_from`` made absolute (relative to the working directory), so the saved
    config names the run it started from wherever it is read."""
    section = data.get("train") if isinstance(data, dict) else None
    value = section.get("init_from") if isinstance(section, dict) else None
    if not isinstance(value, str) or not value:
        return data
    return {**data, "train": {**section, "init_from": str(Path(value).expanduser().resolve())}}


#: Data keys holding file system paths, made absolute by :func:`absolute_data_paths`.
PATH_KEYS = ("path", "options.root")


def absolute_data_paths(data: dict[str, Any], cwd: str | Path | None = None) -> dict[str, Any]:
    """``data.path`` and ``data.options.root`` of a config dict made absolute (``~`` expanded,
    relative to ``cwd``, default the working directory), what was typed kept in
    ``data.as_typed``; returns a new dict."""
    section = data.get("data") if isinstance(data, dict) else None
    if not isinstance(section, dict):
        return data
    section = json.loads(json.dumps(section))
    typed = dict(section.get("as_typed") or {})
    for key in PATH_KEYS:
        *parent, leaf = key.split(".")
        node = section
        for part in parent:
            node = node.get(part) if isinstance(node, dict) else None
        value = node.get(leaf) if isinstance(node, dict) else None
        if not isinstance(value, str) or not value:
            continue
        path = Path(value).expanduser()
        absolute = str(path if path.is_absolute() else (Path(cwd or Path.cwd()) / path).resolve())
        if absolute != value:
            node[leaf] = absolute
            typed.setdefault(key, value)
    if typed:
        section["as_typed"] = typed
    return {**data, "data": section}
