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

__all__ = [
    "DIVERGENCES",
    "PROBES",
    "TRACE_MODES",
    "exact_trace",
    "hutchinson_trace",
    "sample_probes",
]

#: divergence estimators: the exact trace, or Hutchinson's unbiased estimate.
DIVERGENCES: tuple[str, ...] = ("exact", "hutchinson")
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


@dataclass(frozen=True)
class _Divergence:
    """∇·v as Σ_k c_k εᵀ (∂v/∂x) ε over cotangents ε: the D unit vectors with c = 1 (exact
    trace) or K Hutchinson probes with c = 1/K. Examples must not interact in the network
    (true for every per-example score model; batch norm in training mode breaks it)."""

    cotangents: Tensor  # (K, B, ...)
    scale: float

    @classmethod
    def make(
        cls,
        x: Tensor,
        divergence: str,
        n_probes: int,
        probe: str,
        generator: torch.Generator | None,
    ) -> _Divergence:
        if divergence not in DIVERGENCES:
            raise ValueError(
                f"unknown divergence {divergence!r}: choose one of {', '.join(DIVERGENCES)}"
            )
        if divergence == "exact":
            if n_probes != 1:
                raise ValueError(
                    "n_probes applies to divergence='hutchinson' only; the exact trace uses "
                    "all D directions"
                )
            return cls(_basis(x), 1.0)
        return cls(sample_probes(x, n_probes, probe, generator), 1.0 / n_probes)

    def __call__(self, v: Tensor, x: Tensor, create_graph: bool) -> Tensor:
        """Divergence of ``v`` (computed from ``x`` under autograd) per example, shape ``(B,)``."""
        cot = self.cotangents
        if cot.shape[0] == 1:
            rows = torch.autograd.grad(v, x, cot[0], create_graph=create_graph)[0].unsqueeze(0)
        else:  # all K vector-Jacobian products in one vectorised backward pass
            try:
                rows = torch.autograd.grad(
                    v, x, cot, create_graph=create_graph, retain_graph=True, is_grads_batched=True
                )[0]
            except RuntimeError:
                # some networks' backward has ops the batched (vmap) pass lacks (e.g. diffusers'
                # UNet2DModel): the same K products one at a time
                rows = torch.stack(
                    [
                        torch.autograd.grad(v, x, c, create_graph=create_graph, retain_graph=True)[
                            0
                        ]
                        for c in cot
                    ]
                )
        k, b = cot.shape[:2]
        return self.scale * (rows * cot).reshape(k, b, -1).sum(dim=(0, 2))


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

    ``"reverse"``: one backward pass with the D unit cotangents batched (``is_grads_batched``);
    ``"forward"``: ``torch.func.vmap`` over D forward-mode Jacobian-vector products (no graph
    is stored, one pass of dual numbers per direction).
    """
    if mode not in TRACE_MODES:
        raise ValueError(f"unknown trace mode {mode!r}: choose one of {', '.join(TRACE_MODES)}")
    b, d = x.shape[0], x[0].numel()
    eye = torch.eye(d, dtype=x.dtype, device=x.device).reshape(d, 1, *x.shape[1:])
    basis = eye.expand(d, *x.shape)
    if mode == "forward":

        def jvp_row(e: Tensor) -> Tensor:
            return torch.func.jvp(fn, (x,), (e,))[1]

        rows = torch.func.vmap(jvp_row)(basis.contiguous())  # (D, B, ...)
    else:
        with torch.enable_grad():
            xl = x.detach().requires_grad_(True)
            out = fn(xl)
            rows = torch.autograd.grad(out, xl, basis, is_grads_batched=True)[0]
    return (rows * basis).reshape(d, b, -1).sum(dim=(0, 2))


def hutchinson_trace(fn: Callable[[Tensor], Tensor], x: Tensor, probes: Tensor) -> Tensor:
    """Hutchinson's estimate (1/K) Σ_k ε_kᵀ (∂fn/∂x) ε_k per example, ``(B,)``; ``probes`` is
    ``(K, *x.shape)`` with E[ε εᵀ] = I. All K products in one batched backward pass."""
    k, b = probes.shape[:2]
    with torch.enable_grad():
        xl = x.detach().requires_grad_(True)
        out = fn(xl)
        if k == 1:
            rows = torch.autograd.grad(out, xl, probes[0])[0].unsqueeze(0)
        else:
            rows = torch.autograd.grad(out, xl, probes, is_grads_batched=True)[0]
    return (rows * probes).reshape(k, b, -1).sum(dim=(0, 2)) / k
