r"""The training loop, as a few small functions.

:func:`build_run` makes everything a run holds (:class:`Run`), :func:`train_step` does one
optimizer step, :func:`update_ema` the moving average, :func:`evaluate` calls the optional
evaluation hook, :class:`MetricsLog` writes JSONL (and TensorBoard), :func:`save` /
:func:`restore` go through :mod:`sdelab.train.checkpoint`, and :func:`train` strings them
together.

Randomness: three independent streams derived from ``train.seed`` — model initialisation, data
batches (a CPU generator) and loss times/noise (a generator on the training device); each
evaluation gets its own generator seeded by (seed, step), so evaluating never changes
training. With the generators' states in the checkpoint, a resumed run repeats an
uninterrupted one exactly (bit for bit on CPU).

Signals: SIGTERM and SIGINT finish the current step, save a checkpoint and raise
:class:`TrainingInterrupted`. A non-finite loss or gradient stops the run before the bad update
with :class:`TrainingError`, keeping the last good checkpoint.

Many processes (``torchrun`` / ``accelerate launch``, see :mod:`sdelab.distributed`): every
rank draws the same global batch, times and noise from the same generators and keeps its
slice (rows ``rank·B/N …``), split further into ``train.grad_accum`` micro-batches; gradients
are averaged by ``DistributedDataParallel``. So N processes take the same optimizer steps as
one (up to float rounding), every rank's generator state is the same, and a checkpoint of an
N-process run resumes in any number of processes. EMA, logs, evaluation and checkpoints happen
on rank 0 only; a signal seen by any rank stops all of them after the same step. With one
process, full precision and ``grad_accum=1`` the step is exactly the single-process one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sdelab import distributed
from sdelab.data import Dataset, make_dataset
from sdelab.data.toys import derive_seed
from sdelab.distributed import DistInfo
from sdelab.losses import TimeSample, dsm_loss, sample_time
from sdelab.nets.mlp import build_model
from sdelab.parametrization import ScoreModel
from sdelab.sde import Schedule, make_schedule
from sdelab.train.checkpoint import (
    CKPT_DIR,
    atomic_write,
    list_checkpoints,
    load_checkpoint,
    optimizer_state_from_flat,
    optimizer_state_to_flat,
    prefixed,
    save_checkpoint,
)
from sdelab.train.config import ConfigError, OptimConfig, RunConfig
from sdelab.utils import randn_like
from sdelab.vdm import variance_gradient_step, vdm_vlb, vlb_times

__all__ = [
    "CKPT_DIR",
    "EVAL_FILE",
    "METRICS_FILE",
    "RESUMABLE_KEYS",
    "EvalContext",
    "EvalHook",
    "MetricsLog",
    "Run",
    "StepStats",
    "TrainResult",
    "TrainingError",
    "TrainingInterrupted",
    "build_run",
    "check_world",
    "drop_labels",
    "ema_decay_at",
    "evaluate",
    "lr_at",
    "resolve_config",
    "restore",
    "save",
    "train",
    "train_step",
    "update_ema",
]

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
# Seed streams of train.seed (the data test set uses stream 1, array splits stream 2).
_INIT_STREAM, _DATA_STREAM, _LOSS_STREAM, _EVAL_STREAM = 10, 11, 12, 13
#: Keys that may differ between a run's saved config and the one given with ``--resume``.
RESUMABLE_KEYS = (
    "train.steps",
    "train.log_every",
    "train.ckpt_every",
    "train.keep_last",
    "train.eval_every",
    "train.device",
    "train.tensorboard",
    "train.mixed_precision",
    "train.grad_accum",
    "eval",
)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says what to change."""


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT: a checkpoint was saved at ``step``; resume with ``--resume``."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} after step {step}; checkpoint saved to {checkpoint}; "
            "continue with --resume"
        )


@dataclass
class Run:
    """Everything a training run holds; ``step`` counts completed optimizer steps."""

    config: RunConfig
    run_dir: Path
    device: torch.device
    dataset: Dataset
    schedule: Schedule
    model: ScoreModel  # the trained weights
    ema: ScoreModel  # their exponential moving average
    optimizer: torch.optim.Optimizer
    data_gen: torch.Generator  # training batches (CPU)
    loss_gen: torch.Generator  # times and noise of the loss (on device)
    step: int = 0
    dist: DistInfo = field(default_factory=DistInfo)  # this process's rank of how many
    ddp: torch.nn.Module | None = None  # DistributedDataParallel(model.net) with > 1 process
    scaler: torch.amp.GradScaler | None = None  # fp16 only


@dataclass(frozen=True)
class StepStats:
    """What one optimizer step reports."""

    loss: float
    grad_norm: float
    lr: float


@dataclass(frozen=True)
class EvalContext:
    """What an evaluation hook receives.

    ``model`` is the EMA :class:`ScoreModel` (eval mode; gradients enabled, so divergence
    estimators work), ``raw_model`` the trained weights, ``test_data`` the run's fixed held-out
    set ``(eval.n_test, D)`` on the device, ``generator`` a fresh generator seeded by
    (seed, step) — use it for all randomness so evaluating never changes training.
    """

    step: int
    model: ScoreModel
    raw_model: ScoreModel
    schedule: Schedule
    test_data: Tensor
    config: RunConfig
    generator: torch.Generator
    run_dir: Path


#: ``hook(ctx) -> {"name": value}``: scalar metrics logged to eval.jsonl and TensorBoard.
EvalHook = Callable[[EvalContext], Mapping[str, float]]


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` returns."""

    run_dir: Path
    step: int
    last_loss: float | None
    checkpoint: Path | None


# ---- building --------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; an unavailable device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available: use train.device=cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device=mps but MPS is not available: use train.device=cpu")
    return torch.device(name)


def resolve_config(config: RunConfig, dataset: Dataset | None = None) -> RunConfig:
    """Fill in what the data decides (``model.dim``), checking it against a set value, and
    check that a class-conditional net (``model.num_classes``) fits the data's labels."""
    dataset = dataset or make_run_dataset(config)
    k, have = config.model.num_classes, getattr(dataset, "num_classes", 0)
    if k and not have:
        from sdelab.data.toys import no_labels_error

        raise ConfigError(
            f"model.num_classes={k}: {no_labels_error(config.data.name)}, or set "
            "model.num_classes=0"
        )
    if k and k != have:
        raise ConfigError(
            f"model.num_classes={k} but dataset {config.data.name!r} has {have} classes: "
            f"set model.num_classes={have}"
        )
    if config.model.dim not in (None, dataset.dim):
        raise ConfigError(
            f"model.dim={config.model.dim} but dataset {config.data.name!r} has dimension "
            f"{dataset.dim}: remove model.dim or set it to {dataset.dim}"
        )
    return config.model_copy(update={"model": config.model.model_copy(update={"dim": dataset.dim})})


def make_run_dataset(config: RunConfig) -> Dataset:
    """The dataset a run trains on (its test set is fixed by ``train.seed``)."""
    options = dict(config.data.options)
    if config.data.path is not None:
        options["path"] = config.data.path
    return make_dataset(config.data.name, seed=config.train.seed, **options)


def _generator(seed: int, stream: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, stream))


def check_world(config: RunConfig, info: DistInfo) -> None:
    """The global batch must split evenly over processes and micro-batches."""
    tc = config.train
    parts = info.world_size * tc.grad_accum
    if tc.batch_size % parts:
        raise ConfigError(
            f"train.batch_size={tc.batch_size} does not split over {info.world_size} "
            f"process(es) x train.grad_accum={tc.grad_accum}: use a multiple of {parts}"
        )


def build_run(config: RunConfig, run_dir: str | Path, info: DistInfo | None = None) -> Run:
    """Dataset, schedule, model, EMA, optimizer and generators at step 0 for ``config``.

    ``info``: this process's place in a process group (:func:`sdelab.distributed.init`); with
    more than one process the network is wrapped in ``DistributedDataParallel`` and a CUDA
    device becomes ``cuda:LOCAL_RANK``.
    """
    info = info or DistInfo()
    check_world(config, info)
    device = resolve_device(config.train.device)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    precision = config.train.mixed_precision
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"train.mixed_precision=fp16 needs CUDA, but the run is on {device}: use bf16 or no"
        )
    dataset = make_run_dataset(config)
    config = resolve_config(config, dataset)
    schedule = make_schedule(config.sde.name, **config.sde.kwargs).to(device)
    seed = config.train.seed
    with torch.random.fork_rng(devices=[]):  # initialise from the run seed, leave global RNG be
        torch.manual_seed(derive_seed(seed, _INIT_STREAM))
        model = build_model(config, schedule).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    o = config.optim
    opt_cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    optimizer = opt_cls(
        _param_groups(model), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay
    )
    ddp = None
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        ddp = DistributedDataParallel(model.net, device_ids=ids)
    return Run(
        config=config,
        run_dir=Path(run_dir),
        device=device,
        dataset=dataset,
        schedule=schedule,
        model=model,
        ema=ema,
        optimizer=optimizer,
        data_gen=_generator(seed, _DATA_STREAM, torch.device("cpu")),
        loss_gen=_generator(seed, _LOSS_STREAM, device),
        dist=info,
        ddp=ddp,
        scaler=torch.amp.GradScaler("cuda") if precision == "fp16" else None,
    )


def _param_groups(model: ScoreModel) -> list[dict[str, Any]]:
    """The network's parameters, then a learned schedule's (if any) without weight decay: decay
    would pull γ's end points towards 0, which is no regularisation of the model."""
    schedule = list(model.schedule.parameters())
    if not schedule:
        return [{"params": list(model.parameters())}]
    ids = {id(p) for p in schedule}
    net = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": net}, {"params": schedule, "weight_decay": 0.0}]


# ---- one step --------------------------------------------------------------------------------
def lr_at(optim: OptimConfig, step: int) -> float:
    """Learning rate of update number ``step + 1``: linear warm-up over ``warmup_steps``
    (lr·1/W, lr·2/W, …, lr), then constant."""
    if optim.warmup_steps == 0:
        return optim.lr
    return optim.lr * min(1.0, (step + 1) / optim.warmup_steps)


def ema_decay_at(decay: float, step: int) -> float:
    """EMA decay after update number ``step`` (1-based): min(decay, (1 + step)/(10 + step)),
    the usual warm-up, so a short run's EMA is not dominated by the random initial weights."""
    return min(decay, (1 + step) / (10 + step))


def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model for parameters; buffers are copied."""
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            if decay == 0:
                e.copy_(p)
            else:
                e.lerp_(p, 1.0 - decay)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


def drop_labels(
    labels: Tensor, p: float, null: int, generator: torch.Generator | None = None
) -> Tensor:
    """Replace each label by the null label ``null`` with probability ``p`` (independently;
    the mask is drawn with ``generator`` over the whole batch). ``p = 0`` draws nothing."""
    if p == 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null), labels)


def _batch(run: Run) -> tuple[Tensor, Tensor | None]:
    """The global batch ``x0`` and, for a conditional net, its labels after label dropout
    (the mask drawn from the loss generator, before the times and noise)."""
    cfg = run.config
    b, k = cfg.train.batch_size, cfg.model.num_classes
    if not k:
        return run.dataset.sample(b, run.data_gen).to(run.device), None
    x0, labels = run.dataset.sample_labeled(b, run.data_gen)
    labels = drop_labels(labels.to(run.device), cfg.model.label_dropout, k, run.loss_gen)
    return x0.to(run.device), labels


def _labeled(net: Callable, labels: Tensor | None) -> Callable:
    """``net`` as ``(x, t) -> net(x, t, labels)`` for a conditional net (``dsm_loss`` calls
    ``net(x_t, t)``); ``net`` itself when unconditional."""
    return net if labels is None else (lambda x, t: net(x, t, labels))


def train_step(run: Run) -> StepStats:
    """One optimizer step on a fresh batch; raises :class:`TrainingError` (without updating
    the weights) if the loss or the gradient norm is not finite."""
    cfg = run.config
    vdm = cfg.loss.objective == "vdm"  # unconditional only (RunConfig checks)
    x0, labels = (_train_batch(run, vdm).to(run.device), None) if vdm else _batch(run)
    lr = lr_at(cfg.optim, run.step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if vdm:  # the VDM bound: one path for plain, micro-batched and many-process steps
        run.optimizer.zero_grad(set_to_none=True)
        loss = _vdm_backward(run, x0)
        if not torch.isfinite(loss):
            raise TrainingError(f"loss is {float(loss)} at step {run.step + 1}")
    elif _is_plain(run):  # one process, full precision, one micro-batch: the original step
        loss = dsm_loss(
            _labeled(run.model.net, labels),
            run.schedule,
            x0,
            parametrization=cfg.loss.parametrization,
            weighting=cfg.loss.weighting,
            time_sampling=cfg.loss.time_sampling,
            low_discrepancy=cfg.loss.low_discrepancy,
            generator=run.loss_gen,
        ).loss.mean()
        if not torch.isfinite(loss):
            raise TrainingError(f"loss is {float(loss.detach())} at step {run.step + 1}")
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
    else:
        run.optimizer.zero_grad(set_to_none=True)
        loss = _sharded_backward(run, x0, labels)  # the global batch mean, same on every rank
        if not torch.isfinite(loss):
            raise TrainingError(f"loss is {float(loss)} at step {run.step + 1}")
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), max_norm)
    if run.scaler is not None:  # fp16: an overflowing step is skipped and the scale lowered
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        if not torch.isfinite(grad_norm):
            raise TrainingError(f"gradient norm is {float(grad_norm)} at step {run.step + 1}")
        run.optimizer.step()
    run.step += 1
    if run.dist.is_main:  # the other ranks never read their EMA
        update_ema(run.ema, run.model, ema_decay_at(cfg.train.ema_decay, run.step))
    return StepStats(loss=float(loss.detach()), grad_norm=float(grad_norm), lr=lr)


def _train_batch(run: Run, vdm: bool) -> Tensor:
    """A training batch: for the VDM bound on image data the integer levels (its decoder is
    discrete, no dequantization), otherwise the dataset's model-space sample."""
    b = run.config.train.batch_size
    if vdm and getattr(run.dataset, "num_levels", None) is not None:
        return run.dataset.sample_levels(b, run.data_gen)
    return run.dataset.sample(b, run.data_gen)


def _micro_batches(run: Run, b: int) -> Iterator[tuple[slice, contextlib.AbstractContextManager]]:
    """This rank's ``train.grad_accum`` micro-batches of a global batch of ``b`` rows: (rows,
    context); the context defers DDP's gradient all-reduce to the last micro-batch's backward."""
    info, k = run.dist, run.config.train.grad_accum
    per_rank = b // info.world_size
    micro = per_rank // k
    for j in range(k):
        lo = info.rank * per_rank + j * micro
        last = j == k - 1
        sync = contextlib.nullcontext() if run.ddp is None or last else run.ddp.no_sync()
        yield slice(lo, lo + micro), sync


def _vdm_backward(run: Run, x0: Tensor) -> Tensor:
    """Backward of the VDM bound (in bits/dim) on this rank's share of the global batch
    ``x0`` (integer levels for image data), in ``grad_accum`` micro-batches; returns the
    global mean (all-reduced).

    The network and any learned end points get ∇ mean(VLB); a learned schedule's shape
    parameters get ∇ mean(L_diffusion²), VDM's variance-minimising gradient
    (:func:`sdelab.vdm.variance_gradient_step`). Times and both noises are drawn for the whole
    global batch in the order :func:`sdelab.vdm.vdm_vlb` draws them, so every split of the
    batch takes the same step. The schedule is not part of the DDP-wrapped network: its
    gradients are averaged over processes here.
    """
    cfg, info = run.config, run.dist
    levels = getattr(run.dataset, "num_levels", None)
    n_steps = cfg.loss.vlb_steps or None
    b = x0.shape[0]
    like = x0 if x0.is_floating_point() else x0.to(torch.get_default_dtype())
    t = vlb_times(
        run.schedule,
        b,
        n_steps=n_steps,
        time_sampling=cfg.loss.time_sampling,
        low_discrepancy=cfg.loss.low_discrepancy,
        generator=run.loss_gen,
        device=x0.device,
        dtype=like.dtype,
    )
    noise = randn_like(like, run.loss_gen)
    z0_noise = randn_like(like, run.loss_gen)
    shape = run.schedule.shape_parameters()
    ids = {id(p) for p in shape}
    others = [p for p in run.model.parameters() if id(p) not in ids]
    per_rank = b // info.world_size
    net = run.ddp if run.ddp is not None else run.model.net
    schedule = run.schedule

    def eps_fn(z: Tensor, time: Tensor) -> Tensor:
        return net(z, schedule.net_time(time))

    total = torch.zeros((), device=x0.device)
    for rows, sync in _micro_batches(run, b):
        with sync:
            with _autocast(run):
                vlb = vdm_vlb(
                    eps_fn,
                    schedule,
                    x0[rows],
                    levels=levels,
                    n_steps=n_steps,
                    parametrization=cfg.loss.parametrization,
                    t=t[rows],
                    noise=noise[rows],
                    z0_noise=z0_noise[rows],
                )
            to_bpd = 1.0 / (vlb.dims * math.log(2))
            bpd = vlb.total.float() * to_bpd
            variance_gradient_step(
                vlb.diffusion.float() * to_bpd,
                others,
                shape,
                total=bpd,
                denominator=per_rank,  # DDP averages over ranks: the global mean
                scale=run.scaler.scale if run.scaler is not None else None,
            )
        total += bpd.detach().sum()
    if info.enabled:
        import torch.distributed as dist

        for p in schedule.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= info.world_size
        dist.all_reduce(total)
    return total / b


def _is_plain(run: Run) -> bool:
    tc = run.config.train
    return not run.dist.enabled and tc.grad_accum == 1 and tc.mixed_precision == "no"


def _autocast(run: Run):
    precision = run.config.train.mixed_precision
    if precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=run.device.type, dtype=dtype)


def _sharded_backward(run: Run, x0: Tensor, labels: Tensor | None = None) -> Tensor:
    """Backward of this rank's share of the global batch ``x0`` ``(B, ...)`` (with its labels
    after dropout, for a conditional net), in ``grad_accum`` micro-batches; returns the global
    mean loss (all-reduced).

    Times and noise are drawn for the whole global batch, in the order :func:`dsm_loss` draws
    them (the label-dropout mask before them, over the global batch too), so the rows of rank
    r are those a single process gives the same examples.
    """
    cfg, info = run.config, run.dist
    b = x0.shape[0]
    time = sample_time(
        run.schedule,
        b,
        method=cfg.loss.time_sampling,
        low_discrepancy=cfg.loss.low_discrepancy,
        generator=run.loss_gen,
        device=x0.device,
        dtype=x0.dtype,
    )
    noise = randn_like(x0, run.loss_gen)
    per_rank = b // info.world_size
    net = run.ddp if run.ddp is not None else run.model.net
    total = torch.zeros((), device=x0.device)
    for rows, sync in _micro_batches(run, b):
        with sync:
            with _autocast(run):
                loss = dsm_loss(
                    _labeled(net, None if labels is None else labels[rows]),
                    run.schedule,
                    x0[rows],
                    parametrization=cfg.loss.parametrization,
                    weighting=cfg.loss.weighting,
                    time=TimeSample(time.t[rows], time.weight[rows]),
                    noise=noise[rows],
                ).loss.float()  # (micro,)
            shard_mean = loss.sum() / per_rank  # DDP averages these over ranks: the global mean
            if run.scaler is not None:
                shard_mean = run.scaler.scale(shard_mean)
            shard_mean.backward()
        total += loss.detach().sum()
    if info.enabled:
        import torch.distributed as dist

        dist.all_reduce(total)
    return total / b


# ---- evaluation, logging ---------------------------------------------------------------------
def evaluate(run: Run, hook: EvalHook) -> dict[str, float]:
    """Call ``hook`` on the EMA model with the fixed test set; returns its metrics as floats."""
    test = run.dataset.test_set(run.config.eval.n_test).to(run.device)
    gen = torch.Generator(device=run.device).manual_seed(
        derive_seed(run.config.train.seed, _EVAL_STREAM, run.step)
    )
    ctx = EvalContext(
        step=run.step,
        model=run.ema.eval(),
        raw_model=run.model,
        schedule=run.ema.schedule,  # a learned schedule is averaged with the weights
        test_data=test,
        config=run.config,
        generator=gen,
        run_dir=run.run_dir,
    )
    try:
        return {str(k): float(v) for k, v in hook(ctx).items()}
    finally:
        run.ema.train()


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` / ``eval.jsonl`` (flushed each
    line) and mirrors scalars to TensorBoard when asked."""

    def __init__(self, run_dir: Path, tensorboard: bool = False, enabled: bool = True) -> None:
        self.run_dir = run_dir
        self.enabled = enabled  # False on ranks other than 0: writes nothing
        self._files: dict[str, Any] = {}
        self._tb = _summary_writer(run_dir / "tensorboard") if tensorboard and enabled else None

    def write(self, name: str, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if name not in self._files:
            self._files[name] = open(self.run_dir / name, "a", encoding="utf-8")
        f = self._files[name]
        f.write(json.dumps(record) + "\n")
        f.flush()
        if self._tb is not None:
            prefix = "eval/" if name == EVAL_FILE else "train/"
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self._tb.add_scalar(prefix + key, value, record["step"])

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self._tb is not None:
            self._tb.close()


def _require_tensorboard():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "train.tensorboard=true needs the tensorboard package: "
            "pip install 'sdelab[tensorboard]', or set train.tensorboard=false"
        ) from None
    return SummaryWriter


def _summary_writer(log_dir: Path):
    return _require_tensorboard()(log_dir=str(log_dir))


def _truncate_jsonl(path: Path, step: int) -> None:
    """Keep only records with ``step <= step`` (a resumed run rewrites what follows; a line
    cut by a kill is dropped)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", math.inf) <= step:
            kept.append(line + "\n")
    atomic_write(path, "".join(kept))


# ---- checkpoints -----------------------------------------------------------------------------
def save(run: Run, metrics: Mapping[str, float] | None = None) -> Path:
    """Checkpoint the run at its current step (see :mod:`sdelab.train.checkpoint`)."""
    opt_tensors, opt_meta = optimizer_state_to_flat(run.optimizer)
    tensors = {
        **{f"model.{k}": v for k, v in run.model.state_dict().items()},
        **{f"ema.{k}": v for k, v in run.ema.state_dict().items()},
        **opt_tensors,
        "rng.data": run.data_gen.get_state(),
        "rng.loss": run.loss_gen.get_state(),
    }
    meta = {"optimizer": opt_meta, "metrics": dict(metrics or {})}
    return save_checkpoint(
        run.run_dir,
        run.step,
        tensors,
        meta,
        config=run.config,
        keep_last=run.config.train.keep_last,
    )


def restore(run: Run, step: int | None = None) -> None:
    """Load weights, EMA, optimizer state, generator states and step from a checkpoint."""
    ckpt = load_checkpoint(run.run_dir, step)
    t = ckpt.tensors
    run.model.load_state_dict(prefixed(t, "model"))
    run.ema.load_state_dict(prefixed(t, "ema"))
    run.optimizer.load_state_dict(optimizer_state_from_flat(t, ckpt.meta["optimizer"]))
    run.data_gen.set_state(t["rng.data"])
    run.loss_gen.set_state(t["rng.loss"])
    run.step = ckpt.step


# ---- the run folder --------------------------------------------------------------------------
def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, Mapping) and v else {key: v})
    return out


def _merge_for_resume(saved: RunConfig, given: RunConfig, run_dir: Path) -> RunConfig:
    """The saved config with the resumable keys taken from ``given``; any other difference is
    an error naming the keys."""
    a, b = _flat(saved.to_dict()), _flat(given.to_dict())

    def allowed(key: str) -> bool:
        return any(key == r or key.startswith(r + ".") for r in RESUMABLE_KEYS)

    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and not allowed(k))
    if differ:
        shown = ", ".join(f"{k} (saved {a.get(k)!r}, given {b.get(k)!r})" for k in differ[:3])
        raise ConfigError(
            f"cannot resume {run_dir} with a different config: {shown}; on resume only "
            f"{', '.join(RESUMABLE_KEYS)} may change"
        )
    return saved.model_copy(update={"train": given.train, "eval": given.eval})


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} is a file: choose another --out")
    if not resume and run_dir.is_dir() and any(run_dir.iterdir()):
        raise ConfigError(
            f"run folder {run_dir} is not empty: pass --resume to continue it, "
            "or choose a new --out"
        )


def _write_config(run_dir: Path, config: RunConfig) -> None:
    atomic_write(run_dir / "config.yaml", config.to_yaml())
    atomic_write(run_dir / "config.json", config.to_json() + "\n")


# ---- signals ---------------------------------------------------------------------------------
class _StopOnSignal:
    """Context manager turning SIGTERM/SIGINT into a flag the loop checks between steps."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signals need the main thread
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


# ---- the loop --------------------------------------------------------------------------------
def train(
    config: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    eval_hook: EvalHook | None = None,
) -> TrainResult:
    """Train ``config`` in ``run_dir``, checkpointing as configured.

    Args:
        config: the run config (``model.dim`` is filled in from the data).
        run_dir: the run folder; it must be empty or absent unless ``resume``.
        resume: continue from the newest checkpoint in ``run_dir`` (from step 0 if there is
            none). Only :data:`RESUMABLE_KEYS` may differ from the saved config.
        eval_hook: ``hook(EvalContext) -> {name: value}``, called every ``train.eval_every``
            steps and after the last one (when ``eval_every > 0``).

    Writes ``config.yaml``, ``config.json``, ``metrics.jsonl`` (step, loss, grad_norm, lr,
    steps_per_s, every ``log_every`` steps and at the end), ``eval.jsonl``,
    ``checkpoints/`` and ``loss.png``.

    Raises:
        ConfigError: non-empty run folder without ``resume``, incompatible config, missing
            TensorBoard or device.
        TrainingError: non-finite loss or gradient (the last good checkpoint is kept).
        TrainingInterrupted: SIGTERM/SIGINT, after saving a checkpoint.
    """
    run_dir = Path(run_dir)
    info = distributed.init(resolve_device(config.train.device))
    _check_run_dir(run_dir, resume)
    distributed.barrier(info)  # every rank has checked the folder before rank 0 writes to it
    if config.train.tensorboard:
        _require_tensorboard()  # fail before any work
    config = resolve_config(config)
    check_world(config, info)
    run_dir.mkdir(parents=True, exist_ok=True)
    has_ckpt = resume and bool(list_checkpoints(run_dir))
    if has_ckpt:
        config = _merge_for_resume(load_checkpoint(run_dir).config, config, run_dir)
    run = build_run(config, run_dir, info)
    if has_ckpt:
        restore(run)
    if info.is_main:
        _write_config(run_dir, run.config)
        for name in (METRICS_FILE, EVAL_FILE):
            _truncate_jsonl(run_dir / name, run.step)
    log = MetricsLog(run_dir, run.config.train.tensorboard, enabled=info.is_main)
    try:
        last_loss, ckpt = _loop(run, log, eval_hook)
    finally:
        log.close()
    if info.is_main:
        _plot(run_dir)
    return TrainResult(run_dir=run_dir, step=run.step, last_loss=last_loss, checkpoint=ckpt)


def _loop(
    run: Run, log: MetricsLog, eval_hook: EvalHook | None
) -> tuple[float | None, Path | None]:
    tc = run.config.train
    ckpts = list_checkpoints(run.run_dir)
    ckpt: Path | None = ckpts[-1][1] if ckpts else None
    stats: StepStats | None = None
    info = run.dist
    bar = tqdm(
        total=tc.steps,
        initial=run.step,
        disable=None if info.is_main else True,
        dynamic_ncols=True,
        unit="step",
    )
    t_last, step_last = time.perf_counter(), run.step
    with _StopOnSignal() as stop, bar:
        while run.step < tc.steps:
            try:
                stats = train_step(run)
            except TrainingError as e:
                kept = f"the last good checkpoint {ckpt} is kept" if ckpt else "no checkpoint yet"
                raise TrainingError(
                    f"{e}: training stopped, {kept}; lower optim.lr or set optim.grad_clip, "
                    "then --resume"
                ) from None
            bar.update(1)
            last = run.step == tc.steps
            if run.step % tc.log_every == 0 or last:
                now = time.perf_counter()
                rate = (run.step - step_last) / max(now - t_last, 1e-9)
                t_last, step_last = now, run.step
                log.write(METRICS_FILE, {"step": run.step, **vars(stats), "steps_per_s": rate})
                bar.set_postfix(loss=f"{stats.loss:.4g}", refresh=False)
            due = tc.eval_every and (run.step % tc.eval_every == 0 or last)
            if eval_hook is not None and due and info.is_main:
                log.write(EVAL_FILE, {"step": run.step, **evaluate(run, eval_hook)})
            # every rank stops after the same step, whichever rank saw the signal
            signalled = distributed.any_rank(stop.signum is not None, info)
            stopping = signalled and not last
            if run.step % tc.ckpt_every == 0 or last or stopping:
                ckpt = _save_main(run, {"loss": stats.loss})
            if stopping:
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, run.step, ckpt)
    return (stats.loss if stats else None), ckpt


def _save_main(run: Run, metrics: Mapping[str, float]) -> Path:
    """Rank 0 saves; the others wait for it (a rank exiting early must not cut the save)."""
    path = save(run, metrics) if run.dist.is_main else None
    distributed.barrier(run.dist)
    return path or run.run_dir / CKPT_DIR / f"step_{run.step:08d}.json"


def _plot(run_dir: Path) -> None:
    from sdelab.plots import plot_loss

    if (run_dir / METRICS_FILE).exists():
        plot_loss(run_dir / METRICS_FILE, run_dir / "loss.png")
