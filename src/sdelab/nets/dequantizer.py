r"""A Flow++-style variational dequantizer: a conditional flow q(u | k) on (0, 1)^D.

For integer images k ∈ {0..L−1}^{C×H×W} the dequantization noise is

    ε ~ N(0, I),   u = sigmoid(h_K ∘ … ∘ h_1(ε; k)) ∈ (0, 1)^D,
    log q(u | k) = log N(ε; 0, I) − Σ_j log|det ∂h_j| − Σ log σ'(·),

(Ho, Chen, Srinivas, Duan & Abbeel 2019, "Flow++", §3.1; the dequantizer ScoreFlow trains on
top of a frozen score model). The layout follows Flow++'s dequantizer as used by ScoreFlow:

- the image is split **checkerboard-wise along the width** into two halves (even and odd
  columns, each ``(C, H, W/2)``);
- each of ``couplings`` steps is an element-wise affine normalisation of both halves
  (ActNorm-like, started at the identity), an invertible 1×1 channel mixing per half (started
  at the identity), then a **mixture-of-logistics coupling** of the second half given the
  first: b ↦ exp(s)·logit(MixLogCDF(b)) + t, with (s, t, π, μ, log ς) from a network of the
  first half and the context, and finally the halves swap;
- the **context** is a shallow network on k/(L−1) − ½ (checkerboard halves stacked on the
  channel axis, a 3×3 convolution to ``context_channels`` then ``context_blocks`` gated
  convolutions); every coupling network adds a 1×1 projection of it in each gated block;
- a coupling network is a 3×3 input convolution to ``filters`` channels, then ``blocks`` ×
  [gated 1×1 block with the context, LayerNorm over channels, optional gated multi-head
  self-attention with a learned position embedding, LayerNorm], then a 3×3 convolution to
  ``C·(2 + 3·components)`` outputs (small initial weights, so the flow starts near
  u = sigmoid(ε));
- the merged halves go through a sigmoid onto (0, 1).

Every piece is invertible with a tractable log-determinant; :meth:`Dequantizer.log_prob`
inverts the flow (the mixture CDF by bisection) to evaluate q at a given u.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdelab.utils import sum_except_batch

__all__ = [
    "DEQUANTIZER_PRESETS",
    "Dequantizer",
    "DequantizerConfig",
    "DequantizerOutput",
]


@dataclass(frozen=True)
class DequantizerConfig:
    """Size of a :class:`Dequantizer` (Flow++ names).

    Attributes:
        couplings: mixture-of-logistics coupling steps (each transforms one half).
        filters: channels of each coupling network.
        blocks: gated blocks per coupling network.
        components: logistic mixture components per element.
        heads: attention heads per gated block (0: no attention).
        context_channels: channels of the context network on k.
        context_blocks: gated convolutions of the context network.
        dropout: dropout in the gated blocks (training mode only).
    """

    couplings: int = 4
    filters: int = 32
    blocks: int = 1
    components: int = 8
    heads: int = 0
    context_channels: int = 16
    context_blocks: int = 2
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("couplings", "filters", "blocks", "components", "context_channels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"dequantizer {name} must be an integer >= 1, got {v!r}")
        if isinstance(self.heads, bool) or not isinstance(self.heads, int) or self.heads < 0:
            raise ValueError(f"dequantizer heads must be an integer >= 0, got {self.heads!r}")
        if self.heads and self.filters % self.heads:
            raise ValueError(
                f"dequantizer filters ({self.filters}) must be divisible by heads ({self.heads})"
            )
        cb = self.context_blocks
        if isinstance(cb, bool) or not isinstance(cb, int) or cb < 0:
            raise ValueError(f"dequantizer context_blocks must be an integer >= 0, got {cb!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dequantizer dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict:
        return asdict(self)


#: Named sizes: ``"small"`` (CPU-sized, the default) and ``"flowpp"`` (ScoreFlow's CIFAR-10
#: dequantizer: 4 couplings, 96 filters, 2 blocks, 32 components, 4 attention heads, a context
#: of 3 gated convolutions with 32 channels, no dropout as the seed's ``deq.dropout = 0``;
#: 3.66 M parameters here at 3×32×32, the seed quotes ≈ 3.4 M).
DEQUANTIZER_PRESETS: dict[str, DequantizerConfig] = {
    "small": DequantizerConfig(),
    "flowpp": DequantizerConfig(
        couplings=4,
        filters=96,
        blocks=2,
        components=32,
        heads=4,
        context_channels=32,
        context_blocks=3,
        dropout=0.0,
    ),
}


@dataclass(frozen=True)
class DequantizerOutput:
    """A draw u ~ q(· | k) and its log-density.

    Attributes:
        u: dequantization noise in (0, 1), shaped like k.
        log_q: log q(u | k) in nats, ``(B,)`` (density w.r.t. Lebesgue measure on (0, 1)^D).
    """

    u: Tensor
    log_q: Tensor


# ---- element-wise pieces -------------------------------------------------------------------
def _concat_elu(x: Tensor) -> Tensor:
    return F.elu(torch.cat([x, -x], dim=1))


def _gate(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=1)
    return a * torch.sigmoid(b)


def _mixture(params: Tensor, min_logscale: float = -7.0) -> tuple[Tensor, Tensor, Tensor]:
    """Split ``(..., 3K)`` into log-weights, means, log-scales (clamped below)."""
    logits, means, logscales = params.chunk(3, dim=-1)
    return logits.log_softmax(-1), means, logscales.clamp(min=min_logscale)


def _mix_logcdf_logsf_logpdf(
    x: Tensor, log_w: Tensor, means: Tensor, logscales: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """log F(x), log(1 − F(x)) and log F'(x) of a logistic mixture, element-wise."""
    z = (x.unsqueeze(-1) - means) * torch.exp(-logscales)
    log_cdf = torch.logsumexp(log_w + F.logsigmoid(z), -1)
    log_sf = torch.logsumexp(log_w + F.logsigmoid(-z), -1)
    log_pdf = torch.logsumexp(log_w + z - logscales - 2 * F.softplus(z), -1)
    return log_cdf, log_sf, log_pdf


def _mix_inverse_cdf(
    y: Tensor, log_w: Tensor, means: Tensor, logscales: Tensor, iters: int = 64
) -> Tensor:
    """x with F(x) = y (0 < y < 1) by bisection on a bracket that holds every component."""
    span = 40.0 * logscales.exp().sum(-1)
    lo = means.min(-1).values - span
    hi = means.max(-1).values + span
    w, inv_scale = log_w.exp(), torch.exp(-logscales)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        cdf = (w * torch.sigmoid((mid.unsqueeze(-1) - means) * inv_scale)).sum(-1)
        above = cdf > y
        hi = torch.where(above, mid, hi)
        lo = torch.where(above, lo, mid)
    return 0.5 * (lo + hi)


def _split(x: Tensor) -> tuple[Tensor, Tensor]:
    """Checkerboard split along the width: even and odd columns."""
    return x[..., 0::2], x[..., 1::2]


def _merge(a: Tensor, b: Tensor) -> Tensor:
    return torch.stack([a, b], dim=-1).flatten(-2)


# ---- networks -------------------------------------------------------------------------------
class _GatedConv(nn.Module):
    """x + gate(conv₂(concat_elu(conv₁(concat_elu(x)) [+ nin(concat_elu(context))])))."""

    def __init__(self, channels: int, context: int | None, kernel2: int, dropout: float) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2 * channels, channels, 3, padding=1)
        self.ctx = None if context is None else nn.Conv2d(2 * context, channels, 1)
        self.dropout = nn.Dropout(dropout)
        self.c2 = nn.Conv2d(2 * channels, 2 * channels, kernel2, padding=kernel2 // 2)
        with torch.no_grad():
            self.c2.weight.mul_(0.1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = self.c1(_concat_elu(x))
        if self.ctx is not None:
            h = h + self.ctx(_concat_elu(context))
        h = self.dropout(_concat_elu(h))
        return x + _gate(self.c2(h))


class _ChannelNorm(nn.Module):
    """LayerNorm over the channel axis of ``(B, C, H, W)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class _GatedAttention(nn.Module):
    """x + gate(proj(MHSA(x + position embedding))) over the H·W positions."""

    def __init__(self, channels: int, heads: int, size: tuple[int, int], dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.pos = nn.Parameter(0.01 * torch.randn(1, channels, *size))
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Conv2d(channels, 2 * channels, 1)
        with torch.no_grad():
            self.out.weight.mul_(0.1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(x + self.pos).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, HW, c/heads)
        a = F.scaled_dot_product_attention(q, k, v)
        a = a.transpose(-1, -2).reshape(b, c, h, w)
        return x + _gate(self.out(self.dropout(a)))


class _CouplingNet(nn.Module):
    """(first half, context) -> (s, t, mixture parameters) for the second half."""

    def __init__(self, cfg: DequantizerConfig, channels: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.channels, self.components = channels, cfg.components
        self.proj_in = nn.Conv2d(channels, cfg.filters, 3, padding=1)
        layers = []
        for _ in range(cfg.blocks):
            block = nn.ModuleDict(
                {
                    "conv": _GatedConv(cfg.filters, cfg.context_channels, 1, cfg.dropout),
                    "ln1": _ChannelNorm(cfg.filters),
                }
            )
            if cfg.heads:
                block["attn"] = _GatedAttention(cfg.filters, cfg.heads, size, cfg.dropout)
                block["ln2"] = _ChannelNorm(cfg.filters)
            layers.append(block)
        self.layers = nn.ModuleList(layers)
        self.proj_out = nn.Conv2d(cfg.filters, channels * (2 + 3 * cfg.components), 3, padding=1)
        with torch.no_grad():
            self.proj_out.weight.mul_(0.1)
            self.proj_out.bias.zero_()

    def forward(self, a: Tensor, context: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.proj_in(a)
        for block in self.layers:
            x = block["ln1"](block["conv"](x, context))
            if "attn" in block:
                x = block["ln2"](block["attn"](x))
        out = self.proj_out(x)  # (B, C·(2 + 3K), H, W')
        b, _, h, w = out.shape
        out = out.reshape(b, self.channels, 2 + 3 * self.components, h, w).movedim(2, -1)
        return torch.tanh(out[..., 0]), out[..., 1], out[..., 2:]  # s, t, mixture (…, 3K)


class _Coupling(nn.Module):
    """ActNorm + 1×1 mixing on both halves, then the mixture-of-logistics coupling."""

    def __init__(self, cfg: DequantizerConfig, half: tuple[int, int, int]) -> None:
        super().__init__()
        c = half[0]
        self.log_scale = nn.Parameter(torch.zeros(2, *half))
        self.bias = nn.Parameter(torch.zeros(2, *half))
        self.mix = nn.Parameter(torch.eye(c).repeat(2, 1, 1))  # (2, C, C)
        self.net = _CouplingNet(cfg, c, half[1:])
        self.spatial = half[1] * half[2]

    def _pointwise(self, x: Tensor, i: int, inverse: bool) -> tuple[Tensor, Tensor]:
        w = self.mix[i]
        logdet = self.spatial * torch.linalg.slogdet(w)[1]
        if inverse:
            w, logdet = torch.linalg.inv(w), -logdet
        return torch.einsum("oc,bchw->bohw", w, x), logdet

    def forward(self, a: Tensor, b: Tensor, context: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logdet = self.log_scale.sum()
        a = a * self.log_scale[0].exp() + self.bias[0]
        b = b * self.log_scale[1].exp() + self.bias[1]
        a, ld_a = self._pointwise(a, 0, False)
        b, ld_b = self._pointwise(b, 1, False)
        s, t, params = self.net(a, context)
        log_w, means, logscales = _mixture(params)
        log_cdf, log_sf, log_pdf = _mix_logcdf_logsf_logpdf(b, log_w, means, logscales)
        # b -> F(b) -> logit F(b) -> exp(s)·logit + t, with log-det log F' − log F − log(1−F) + s
        b = (log_cdf - log_sf) * s.exp() + t
        ld_c = sum_except_batch(log_pdf - log_cdf - log_sf + s)
        return b, a, logdet + ld_a + ld_b + ld_c  # halves swapped

    def inverse(self, b_new: Tensor, a_new: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """Undo :meth:`forward` (which returned ``(b_new, a_new, logdet)``); returns the halves
        before it (the log-determinant is recomputed by the caller's forward)."""
        a = a_new
        s, t, params = self.net(a, context)
        log_w, means, logscales = _mixture(params)
        y = torch.sigmoid((b_new - t) * torch.exp(-s))
        b = _mix_inverse_cdf(y, log_w, means, logscales)
        a, _ = self._pointwise(a, 0, True)
        b, _ = self._pointwise(b, 1, True)
        a = (a - self.bias[0]) * torch.exp(-self.log_scale[0])
        b = (b - self.bias[1]) * torch.exp(-self.log_scale[1])
        return a, b


class _Context(nn.Module):
    def __init__(self, cfg: DequantizerConfig, channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(2 * channels, cfg.context_channels, 3, padding=1)
        c = cfg.context_channels
        self.blocks = nn.ModuleList(
            _GatedConv(c, None, 3, cfg.dropout) for _ in range(cfg.context_blocks)
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(torch.cat(_split(x - 0.5), dim=1))
        for block in self.blocks:
            h = block(h)
        return h


class Dequantizer(nn.Module):
    """Conditional flow q(u | k) on (0, 1)^D for integer images k (module docstring).

    Args:
        image_shape: ``(C, H, W)`` of the data; W must be even (checkerboard split).
        levels: the number of levels L of the data (k ∈ {0..L−1}); the context sees k/(L−1).
        config: a :class:`DequantizerConfig`, or a preset name of :data:`DEQUANTIZER_PRESETS`
            (``"small"`` default, ``"flowpp"`` the seed's size).
        seed: seed of the parameter initialisation (drawn from a private generator state, so
            building a dequantizer never touches torch's global random stream).

    Raises:
        ValueError: a bad shape, odd width, ``levels`` < 2 or an unknown preset.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        levels: int,
        config: DequantizerConfig | str = "small",
        *,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(config, str):
            if config not in DEQUANTIZER_PRESETS:
                raise ValueError(
                    f"unknown dequantizer preset {config!r}: choose one of "
                    f"{', '.join(DEQUANTIZER_PRESETS)}"
                )
            config = DEQUANTIZER_PRESETS[config]
        shape = tuple(int(s) for s in image_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(
                f"image_shape must be (C, H, W) with positive sizes, got {image_shape}"
            )
        if shape[2] % 2:
            raise ValueError(
                f"the dequantizer splits the width checkerboard-wise: W must be even, got "
                f"image shape {shape} (pad or crop the images to an even width)"
            )
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
            raise ValueError(f"levels must be an integer >= 2, got {levels!r}")
        self.image_shape: tuple[int, int, int] = shape  # type: ignore[assignment]
        self.levels = levels
        self.config = config
        half = (shape[0], shape[1], shape[2] // 2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.context = _Context(config, shape[0])
            self.steps = nn.ModuleList(_Coupling(config, half) for _ in range(config.couplings))

    @property
    def dim(self) -> int:
        """D = C·H·W."""
        return math.prod(self.image_shape)

    def _check(self, k: Tensor) -> Tensor:
        if tuple(k.shape[1:]) != self.image_shape:
            raise ValueError(
                f"this dequantizer was built for images of shape {self.image_shape}, got data of "
                f"shape {tuple(k.shape[1:])}"
            )
        return k.to(self.steps[0].bias.dtype) / (self.levels - 1)

    def transform(self, eps: Tensor, k: Tensor) -> DequantizerOutput:
        """The flow's forward map: base noise ε (shaped like k) to u and log q(u | k)."""
        context = self.context(self._check(k))
        a, b = _split(eps)
        logdet = torch.zeros(eps.shape[0], dtype=eps.dtype, device=eps.device)
        for step in self.steps:
            a, b, ld = step(a, b, context)
            logdet = logdet + ld
        h = _merge(a, b)
        log_base = -0.5 * sum_except_batch(eps**2) - 0.5 * self.dim * math.log(2 * math.pi)
        log_sigmoid_grad = sum_except_batch(-F.softplus(h) - F.softplus(-h))
        return DequantizerOutput(torch.sigmoid(h), log_base - logdet - log_sigmoid_grad)

    def forward(self, k: Tensor, generator: torch.Generator | None = None) -> DequantizerOutput:
        """Draw u ~ q(· | k): ``k`` integer levels ``(B, C, H, W)``; returns u and log q(u | k)
        ``(B,)``; differentiable w.r.t. the parameters (reparameterised)."""
        dtype = self.steps[0].bias.dtype
        eps = torch.randn(k.shape, generator=generator, dtype=dtype, device=k.device)
        return self.transform(eps, k)

    def inverse(self, u: Tensor, k: Tensor) -> Tensor:
        """The base noise ε that :meth:`transform` maps to ``u`` ∈ (0, 1)^D given ``k``."""
        context = self.context(self._check(k))
        h = torch.logit(u)
        a, b = _split(h)
        for step in reversed(self.steps):
            a, b = step.inverse(a, b, context)
        return _merge(a, b)

    def log_prob(self, u: Tensor, k: Tensor) -> Tensor:
        """log q(u | k) at given u ∈ (0, 1)^D, ``(B,)`` (inverts the flow, then re-runs it)."""
        return self.transform(self.inverse(u, k), k).log_q
