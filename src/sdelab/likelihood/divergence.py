r"""The divergence ∇·v of a per-example map: exact trace or Hutchinson's estimator — one copy.

Every integrator and bound takes its divergence from here. Products εᵀ(∂v/∂x) are computed by one
batched backward pass over all cotangents (``is_grads_batched``); where a network's backward has
operations the batched (vmap) pass lacks (diffusers' ``UNet2DModel``), the same products are taken
one at a time — same numbers, slower. Examples must not interact inside the network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sdelab.sde import Schedule
from sdelab.utils import ScoreFn, check_int

__all__ = ["PROBES", "TRACE_MODES", "exact_trace", "hutchinson_trace", "sample_probes"]

#: Hutchinson probe distributions.
PROBES: tuple[str, ...] = ("rademacher", "gaussian")
#: exact-trace implementations: batched reverse mode (one backward pass with D cotangents)
#: or forward mode (torch.func.vmap over D Jacobian-vector products).
TRACE_MODES: tuple[str, ...] = ("reverse", "forward")


# ---- divergence estimators ----------------------------------------------------------------
def sample_probes(
    x: Tensor, n_probes: int, probe: str = "rademacher", generator: torch.Generator | None = None
) -> Tensor:
    """Hutchinson probes ε with E[ε εᵀ] = I, shape ``(n_probes, *x.shape)``.

    ``"rademacher"``: entries ±1 (the lower-variance choice, Var = 2 Σ_{i≠j} A_ij² for symmetric
    A); ``"gaussian"``: N(0, 1) entries (Var = 2 ‖A‖_F²).
    """
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}: choose one of {', '.join(PROBES)}")
    check_int("n_probes", n_probes, 1)
    shape = (n_probes, *x.shape)
    if probe == "gaussian":
        return torch.randn(shape, generator=generator, dtype=x.dtype, device=x.device)
    bits = torch.randint(0, 2, shape, generator=generator, device=x.device)
    return (2 * bits - 1).to(x.dtype)


def _basis(x: Tensor) -> Tensor:
    """The D unit vectors e_i, each for every example: shape ``(D, *x.shape)``."""
    d = x[0].numel()
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    return eye.reshape(d, 1, *x.shape[1:]).expand(d, *x.shape)


def vjp_rows(v: Tensor, x: Tensor, cotangents: Tensor, create_graph: bool = False) -> Tensor:
    """The K vector-Jacobian products c_kᵀ(∂v/∂x), ``(K, *x.shape)``, for cotangents ``(K, ...)``.

    All K in one vectorised backward pass; where the network's backward has operations the
    batched (vmap) pass lacks (diffusers' ``UNet2DModel``: "querying is_contiguous inside of
    vmap"), the same K products one at a time — the same numbers, slower.
    """
    if cotangents.shape[0] == 1:
        return torch.autograd.grad(v, x, cotangents[0], create_graph=create_graph)[0][None]
    try:
        return torch.autograd.grad(
            v, x, cotangents, create_graph=create_graph, retain_graph=True, is_grads_batched=True
        )[0]
    except RuntimeError:
        return torch.stack(
            [
                torch.autograd.grad(v, x, c, create_graph=create_graph, retain_graph=True)[0]
                for c in cotangents
            ]
        )


def _contract(rows: Tensor, cotangents: Tensor) -> Tensor:
    """Σ over dimensions of rows ⊙ cotangents: ``(K, B)``."""
    k, b = cotangents.shape[:2]
    return (rows * cotangents).reshape(k, b, -1).sum(dim=2)


@dataclass(frozen=True)
class _Divergence:
    """∇·v as Σ_k c_k εᵀ (∂v/∂x) ε over cotangents ε: the D unit vectors with c = 1 (exact
    trace) or K Hutchinson probes with c = 1/K. Examples must not interact in the network
    (true for every per-example score model; batch norm in training mode breaks it)."""

    cotangents: Tensor  # (K, B, ...)
    exact: bool

    @classmethod
    def make(
        cls,
        x: Tensor,
        exact: bool,
        n_probes: int = 1,
        probe: str = "rademacher",
        generator: torch.Generator | None = None,
    ) -> _Divergence:
        if exact:
            return cls(_basis(x), True)
        return cls(sample_probes(x, n_probes, probe, generator), False)

    @property
    def n_columns(self) -> int:
        """Columns of :meth:`per_probe`: 1 for the exact trace, K for Hutchinson."""
        return 1 if self.exact else self.cotangents.shape[0]

    def per_probe(self, v: Tensor, x: Tensor, create_graph: bool) -> Tensor:
        """``(B, n_columns)``: the exact trace, or each probe's estimate εᵀ(∂v/∂x)ε."""
        terms = _contract(vjp_rows(v, x, self.cotangents, create_graph), self.cotangents)
        return terms.sum(0, keepdim=True).T if self.exact else terms.T

    def __call__(self, v: Tensor, x: Tensor, create_graph: bool) -> Tensor:
        """Divergence of ``v`` (computed from ``x`` under autograd) per example, ``(B,)``."""
        return self.per_probe(v, x, create_graph).mean(dim=1)


def _leaf(x: Tensor, create_graph: bool) -> Tensor:
    """``x`` ready for a vector-Jacobian product: kept in the graph only when gradients flow."""
    return x if create_graph and x.requires_grad else x.detach().requires_grad_(True)


def _score_requires_grad(score_fn: ScoreFn, schedule: Schedule, x: Tensor) -> bool:
    """Whether the score function's output carries gradients (module parameters, or tensors a
    plain callable closes over): one evaluation on the first example, under the current grad
    mode."""
    if not torch.is_grad_enabled():
        return False
    t = torch.full((1,), schedule.T, dtype=x.dtype, device=x.device)
    return bool(score_fn(x[:1].detach(), t).requires_grad)


def _tracks_grad(score_fn: ScoreFn, schedule: Schedule, x: Tensor) -> bool:
    """Whether the result must carry gradients: grad mode is on and ``x``, the schedule or the
    score function requires grad."""
    return torch.is_grad_enabled() and (
        x.requires_grad
        or any(p.requires_grad for p in schedule.parameters())
        or _score_requires_grad(score_fn, schedule, x)
    )


def _check_batch(x: Tensor) -> None:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise ValueError(
            "x must be a floating-point tensor of shape (B, ...); for integer data use "
            "sdelab.likelihood.bpd.bits_per_dim, which dequantizes it"
        )
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch of shape (B, ...), got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf")


def exact_trace(fn: Callable[[Tensor], Tensor], x: Tensor, mode: str = "reverse") -> Tensor:
    """tr(∂fn/∂x) per example, ``(B,)``, for a per-example map ``fn: (B, ...) -> (B, ...)``.

    ``"reverse"``: the D unit cotangents in one batched backward pass (:func:`vjp_rows`);
    ``"forward"``: ``torch.func.vmap`` over D forward-mode Jacobian-vector products (no graph
    is stored); where the network has no forward-mode rule (CPU flash attention), reverse.
    """
    if mode not in TRACE_MODES:
        raise ValueError(f"unknown trace mode {mode!r}: choose one of {', '.join(TRACE_MODES)}")
    basis = _basis(x)
    if mode == "forward":

        def jvp_row(e: Tensor) -> Tensor:
            return torch.func.jvp(fn, (x,), (e,))[1]

        try:
            rows = torch.func.vmap(jvp_row)(basis.contiguous())  # (D, B, ...)
            return _contract(rows, basis).sum(0)
        except (RuntimeError, NotImplementedError):
            pass
    with torch.enable_grad():
        xl = x.detach().requires_grad_(True)
        return _contract(vjp_rows(fn(xl), xl, basis), basis).sum(0)


def hutchinson_trace(fn: Callable[[Tensor], Tensor], x: Tensor, probes: Tensor) -> Tensor:
    """Hutchinson's estimate (1/K) Σ_k ε_kᵀ (∂fn/∂x) ε_k per example, ``(B,)``; ``probes`` is
    ``(K, *x.shape)`` with E[ε εᵀ] = I (:func:`sample_probes`)."""
    with torch.enable_grad():
        xl = x.detach().requires_grad_(True)
        return _contract(vjp_rows(fn(xl), xl, probes), probes).mean(0)
