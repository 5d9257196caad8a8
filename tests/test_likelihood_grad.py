"""Gradients of the ODE log-likelihood with respect to a network's parameters, by backpropagation
through the solver and by the adjoint method, against central finite differences; and the
maximum-likelihood objective :func:`~sdelab.likelihood.ode_nll_loss` built on them.

A directional derivative checks every parameter at once: for a random direction u in parameter
space, ⟨∇_θ L, u⟩ must equal (L(θ + h u) − L(θ − h u)) / 2h. The solves run in float64 at a
tight tolerance (1e-4 nats) without the two-tolerance check, so the finite difference
differentiates a smooth function of θ (the solver's step sequence does not change over ±h).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdelab.likelihood import log_likelihood, ode_nll_loss
from sdelab.likelihood.options import Augmented, Hutchinson, Quadrature
from sdelab.sde import VPSchedule

D64 = torch.float64
TOL = 1e-4  # nats; measured agreement with the finite differences ~1e-6 relative
H = 1e-4


class TinyScore(nn.Module):
    """s(x, t) = MLP([x, t]) − x: a 2-16-2 tanh network around the standard normal's score."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).to(D64)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t[:, None].to(x.dtype)], dim=1)) - x


def tiny_model(seed: int = 0) -> tuple[nn.Module, VPSchedule]:
    torch.manual_seed(seed)
    return TinyScore(), VPSchedule()


def data() -> torch.Tensor:
    return torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=D64)


def directions(model: nn.Module, n: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [
        [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in model.parameters()]
        for _ in range(n)
    ]


def loss_at(model, sde, x, direction, step, **kw) -> float:
    """Σ NLL at θ + step·u, under no_grad (evaluation), parameters restored afterwards."""
    with torch.no_grad():
        for p, u in zip(model.parameters(), direction):
            p.add_(step * u)
        try:
            return float(ode_nll_loss(model, sde, x, **kw).sum())
        finally:
            for p, u in zip(model.parameters(), direction):
                p.sub_(step * u)


@pytest.mark.parametrize("adjoint", [False, True], ids=["backprop", "adjoint"])
def test_parameter_gradient_matches_finite_differences(adjoint):
    model, sde = tiny_model()
    x = data()
    kw = dict(tol=TOL, integrator=Augmented(adjoint=adjoint, check=False))
    loss = ode_nll_loss(model, sde, x, **kw).sum()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    fd_kw = dict(tol=TOL, integrator=Augmented(check=False))
    for u in directions(model, 2):
        analytic = sum(float((g * d).sum()) for g, d in zip(grads, u))
        fd = (loss_at(model, sde, x, u, H, **fd_kw) - loss_at(model, sde, x, u, -H, **fd_kw)) / (
            2 * H
        )
        assert analytic == pytest.approx(fd, rel=1e-4, abs=1e-6)


def test_hutchinson_gradient_matches_finite_differences():
    """With fixed probes (the same generator seed) Hutchinson's NLL is a smooth function of θ:
    its gradient is the finite difference too (an unbiased estimate of the exact one)."""
    model, sde = tiny_model(1)
    x = data()

    def kw():
        return dict(
            tol=TOL,
            divergence=Hutchinson(n_probes=2),
            integrator=Augmented(check=False),
            generator=torch.Generator().manual_seed(3),
        )

    grads = torch.autograd.grad(ode_nll_loss(model, sde, x, **kw()).sum(), list(model.parameters()))
    (u,) = directions(model, 1)
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, u))
    fd = (loss_at(model, sde, x, u, H, **kw()) - loss_at(model, sde, x, u, -H, **kw())) / (2 * H)
    assert analytic == pytest.approx(fd, rel=1e-4, abs=1e-6)


def test_ode_nll_loss_is_the_negative_log_likelihood():
    model, sde = tiny_model()
    x = data()
    loss = ode_nll_loss(model, sde, x, tol=1e-3)
    assert loss.shape == (3,) and loss.requires_grad
    with torch.no_grad():
        ref = log_likelihood(model, sde, x, tol=1e-3, integrator=Augmented())
    torch.testing.assert_close(loss.detach(), -ref.logp)


def test_a_small_gradient_step_lowers_the_nll():
    """First order: θ − η ∇L lowers L for a small enough η (here η‖∇L‖ = 1e-3)."""
    model, sde = tiny_model()
    x = data()
    kw = dict(tol=1e-4, integrator=Augmented(check=False))
    loss = ode_nll_loss(model, sde, x, **kw).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p.sub_(1e-3 * g / norm)
        after = ode_nll_loss(model, sde, x, **kw).mean()
    assert float(after) < float(loss.detach())


def test_ode_nll_loss_refuses_an_integrator_without_gradients():
    model, sde = tiny_model()
    with pytest.raises(ValueError, match="Augmented"):
        ode_nll_loss(model, sde, data(), integrator=Quadrature())
