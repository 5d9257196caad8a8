"""Config → objects: the one place where a :class:`~sdelab.train.config.RunConfig` or a run
folder becomes a dataset, a schedule, a network and a training :class:`Run`.

Everything above (the loop, ``runs``, the CLI) builds through here; everything below (maths,
networks, data) never sees a config.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdelab import streams
from sdelab.data import Dataset, make_dataset
from sdelab.data.toys import no_labels_error
from sdelab.discrete import CHAINS, DiscreteScoreModel
from sdelab.distributed import DistInfo
from sdelab.nets.mlp import MLP
from sdelab.nets.unet import ImageUNet
from sdelab.parametrization import ScoreModel
from sdelab.sde import Schedule, make_schedule
from sdelab.train.checkpoint import CheckpointError, load_checkpoint, prefixed
from sdelab.train.config import ConfigError, RunConfig
from sdelab.utils import derive_seed

__all__ = [
    "Run",
    "build_model",
    "build_resolved_run",
    "build_run",
    "check_world",
    "dequantization_options",
    "load_run",
    "load_state",
    "local_device",
    "make_run_dataset",
    "resolve_config",
    "resolve_device",
    "schedule_from",
]

# Seed streams of train.seed (the data test set uses stream 1, array splits stream 2).


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
    precision: str = "no"  # the autocast precision: no, bf16 or fp16 (auto resolved)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (CPU: AVX-512 BF16 / AMX through oneDNN;
    CUDA: compute capability 8.0 or newer), so that ``mixed_precision: auto`` picks bf16."""
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return False


def resolve_precision(name: str, device: torch.device) -> str:
    """``train.mixed_precision`` with ``auto`` resolved for ``device``: ``bf16`` where it
    computes bfloat16 natively (:func:`native_bf16`), else ``no``; other names unchanged."""
    if name == "auto":
        return "bf16" if native_bf16(device) else "no"
    return name


def resolve_device(name: str = "auto", info: DistInfo | None = None) -> torch.device:
    """The device a command runs on.

    ``auto`` means cuda if available else cpu; an unavailable device is a
    :class:`~sdelab.train.config.ConfigError`. Under a launcher (``info.enabled``) a CUDA
    device becomes ``cuda:LOCAL_RANK``.
    """
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available: use train.device=cpu")
    elif name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device=mps but MPS is not available: use train.device=cpu")
    else:
        device = torch.device(name)
    return device if info is None else local_device(device, info)


def local_device(device: torch.device, info: DistInfo) -> torch.device:
    """This process's device under a launcher: ``cuda:LOCAL_RANK`` for a CUDA device."""
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def make_run_dataset(config: RunConfig) -> Dataset:
    """The dataset a run trains on (its test set is fixed by ``train.seed``)."""
    options = dict(config.data.options)
    if config.data.path is not None:
        options["path"] = config.data.path
    return make_dataset(config.data.name, seed=config.train.seed, **options)


def resolve_config(config: RunConfig, dataset: Dataset | None = None) -> RunConfig:
    """Fill in what the data decides (``model.dim``), checking it against a set value, and
    check that a class-conditional net (``model.num_classes``) fits the data's labels.
    ``dataset``: the run's dataset if already built (default: built here)."""
    dataset = dataset if dataset is not None else make_run_dataset(config)
    k, have = config.model.num_classes, dataset.num_classes
    if k and not have:
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


def check_world(config: RunConfig, info: DistInfo) -> None:
    """The global batch must split evenly over processes and micro-batches."""
    tc = config.train
    parts = info.world_size * tc.grad_accum
    if tc.batch_size % parts:
        raise ConfigError(
            f"train.batch_size={tc.batch_size} does not split over {info.world_size} "
            f"process(es) x train.grad_accum={tc.grad_accum}: use a multiple of {parts}"
        )


def schedule_from(config: RunConfig) -> Schedule:
    """The schedule (SDE) of ``config.sde``."""
    return make_schedule(config.sde.name, **config.sde.kwargs)


def build_model(config: RunConfig, schedule: Schedule) -> ScoreModel:
    """The :class:`~sdelab.parametrization.ScoreModel` a run config describes.

    The network is ``config.model`` (its ``dim`` must be resolved, as in every saved config):
    an :class:`~sdelab.nets.mlp.MLP`, or for ``arch: unet`` an
    :class:`~sdelab.nets.unet.ImageUNet` of ``model.image_shape``; its output kind is
    ``config.loss.parametrization`` (eps, score, x0, v or drift); for ``loss.objective`` ddpm or
    smld a :class:`~sdelab.discrete.DiscreteScoreModel`, the continuous view of a network on
    ``loss.discrete_steps`` integer steps (``model.at_step`` for the exact chain). Calling the
    returned model
    gives the score; ``model.predict(x, t, kind)`` any other kind. With ``model.num_classes: K``
    the network is class-conditional: ``model(x, t, y)``.
    """
    m = config.model
    if m.dim is None:
        raise ValueError("model.dim is unset: resolve it from the dataset before building")
    if m.arch == "unet":  # image data: the shape is in the (saved) config
        net = ImageUNet(**m.unet_kwargs())
        if math.prod(net.image_shape) != m.dim:
            raise ValueError(f"model.image_shape={m.image_shape} does not match model.dim={m.dim}")
    else:
        net = MLP(
            dim=m.dim,
            width=m.width,
            depth=m.depth,
            embedding=m.embedding,
            embedding_dim=m.embedding_dim,
            embedding_scale=m.embedding_scale,
            num_classes=m.num_classes,
        )
    objective = config.loss.objective
    if objective in CHAINS:  # discrete time: the continuous view of the chain's network
        chain = CHAINS[objective](schedule, config.loss.discrete_steps)
        return DiscreteScoreModel(net, chain, parametrization=config.loss.parametrization)
    return ScoreModel(net, schedule, parametrization=config.loss.parametrization)


def _allocate(config: RunConfig, schedule: Schedule, device: torch.device) -> ScoreModel:
    """:func:`build_model` on ``device``; a model too large for memory is a
    :class:`ConfigError` naming its size, not an allocator traceback."""
    try:
        return build_model(config, schedule).to(device)
    except (MemoryError, torch.OutOfMemoryError, RuntimeError) as e:
        memory = isinstance(e, MemoryError | torch.OutOfMemoryError)
        if not memory and "alloc" not in str(e) and "overflow" not in str(e):
            raise
        try:
            with torch.device("meta"):
                n = sum(p.numel() for p in build_model(config, schedule).parameters())
            count = f"{n:,} parameters, {4 * n / 2**30:.3g} GiB of weights before EMA and optimizer"
        except RuntimeError:  # too large even to count
            count = "more parameters than can be stored"
        m = config.model
        size = (
            f"model.width={m.width}, model.depth={m.depth}"
            if m.arch == "mlp"
            else (f"model.base_channels={m.base_channels}, model.channel_mults={m.channel_mults}")
        )
        raise ConfigError(
            f"cannot allocate the model on {device} ({size}: {count}): make it smaller"
        ) from None


def load_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """``model.load_state_dict(tensors)``; tensors that do not fit the model the checkpoint's
    config describes (a hand-edited config, a foreign file) are a :class:`CheckpointError`."""
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else "mismatch"
        raise CheckpointError(
            f"checkpoint {source} does not match the model its config describes ({detail}): "
            "its config or tensors were changed; use the run's own files or retrain"
        ) from None


def _generator(seed: int, stream: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, stream))


def _param_groups(model: ScoreModel) -> list[dict[str, Any]]:
    """The network's parameters, then a learned schedule's (if any) without weight decay: decay
    would pull γ's end points towards 0, which is no regularisation of the model."""
    schedule = list(model.schedule.parameters())
    if not schedule:
        return [{"params": list(model.parameters())}]
    ids = {id(p) for p in schedule}
    net = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": net}, {"params": schedule, "weight_decay": 0.0}]


def build_run(
    config: RunConfig,
    run_dir: str | Path,
    info: DistInfo | None = None,
    dataset: Dataset | None = None,
) -> Run:
    """Dataset, schedule, model, EMA, optimizer and generators at step 0 for ``config``.

    ``info``: this process's place in a process group (:func:`sdelab.distributed.init`); with
    more than one process the network is wrapped in ``DistributedDataParallel`` and a CUDA
    device becomes ``cuda:LOCAL_RANK``. ``dataset``: the run's dataset when the caller has
    built it already (:func:`make_run_dataset`). The config is resolved against the data and
    the process group checked here; :func:`build_resolved_run` skips both.
    """
    info = info or DistInfo()
    dataset = dataset if dataset is not None else make_run_dataset(config)
    config = resolve_config(config, dataset)
    check_world(config, info)
    return build_resolved_run(
        config, run_dir, info, dataset, resolve_device(config.train.device, info)
    )


def build_resolved_run(
    config: RunConfig,
    run_dir: str | Path,
    info: DistInfo,
    dataset: Dataset,
    device: torch.device,
) -> Run:
    """:func:`build_run` for a config already resolved (:func:`resolve_config`) and checked
    (:func:`check_world`) on ``device`` (:func:`resolve_device`)."""
    precision = resolve_precision(config.train.mixed_precision, device)
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"train.mixed_precision=fp16 needs CUDA, but the run is on {device}: use bf16 or no"
        )
    schedule = schedule_from(config).to(device)
    seed = config.train.seed
    with torch.random.fork_rng(devices=[]):  # initialise from the run seed, leave global RNG be
        torch.manual_seed(derive_seed(seed, streams.TRAIN_INIT))
        model = _allocate(config, schedule, device)
    if config.train.channels_last:  # 4-D weights NHWC: the convs then keep activations NHWC
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False)
    if config.train.compile:  # in place: the state dict and the EMA's copy stay plain
        model.net.compile()
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
        data_gen=_generator(seed, streams.TRAIN_DATA, torch.device("cpu")),
        loss_gen=_generator(seed, streams.TRAIN_LOSS, device),
        dist=info,
        ddp=ddp,
        scaler=torch.amp.GradScaler("cuda") if precision == "fp16" else None,
        precision=precision,
    )


def load_run(
    run_dir: str | Path,
    which: str = "ema",
    *,
    step: int | str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[RunConfig, ScoreModel, Schedule]:
    """Load a trained run for sampling and likelihood: ``(config, model, schedule)``.

    The checkpoint is read (and its hash checked) once.

    Args:
        run_dir: a run folder written by ``sdelab train``.
        which: ``"ema"`` (the exponential moving average, usually better) or ``"raw"``.
        step: which checkpoint (default: the newest; ``"best"``: the one kept by
            ``eval.select_best``).
        device: where to put the model.

    Returns:
        ``config`` (:class:`~sdelab.train.config.RunConfig`, from the checkpoint), ``model``
        (a :class:`~sdelab.parametrization.ScoreModel` in eval mode with frozen parameters —
        call ``model.requires_grad_(True)`` to fine-tune; call it for the score,
        ``model.predict(x, t, kind)`` for eps/x0/v/drift) and ``schedule`` (its SDE).

    Raises:
        CheckpointError: no checkpoint or a corrupt one. ValueError: bad ``which``.
    """
    if which not in ("ema", "raw"):
        raise ValueError(f"unknown weights {which!r}: choose one of ema, raw")
    ckpt = load_checkpoint(run_dir, step)
    try:
        config = ckpt.config
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {ckpt.path} holds an invalid config: {e}") from None
    schedule = schedule_from(config)
    model = build_model(config, schedule)
    load_state(model, prefixed(ckpt.tensors, "ema" if which == "ema" else "model"), ckpt.path)
    # for inference: frozen, so likelihood and samplers build no graph over the parameters
    model.requires_grad_(False)
    return config, model.to(device).eval(), schedule


def dequantization_options(dataset: Dataset) -> dict[str, Any]:
    """``levels``/``scale``/``shift``/``dequantization`` for
    :func:`~sdelab.likelihood.bpd.evaluate_likelihood` when ``dataset`` serves integer levels
    (image data), else ``{}``."""
    if dataset.num_levels is None:
        return {}
    return dict(
        levels=dataset.num_levels,
        scale=dataset.scale,
        shift=dataset.shift,
        dequantization="uniform",
    )
