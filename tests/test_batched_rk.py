"""The per-example Runge–Kutta solver (sdelab.likelihood.batched_rk) against closed-form
solutions: the order of the method, batch = alone and outputs in both directions (the
probability-flow tail point solved in a batch as alone: tests/test_quadrature.py)."""

from __future__ import annotations

import math

import pytest
import torch

from sdelab.likelihood.batched_rk import solve_per_example

D64 = torch.float64
RATES = torch.tensor([0.5, 3.0, 30.0], dtype=D64)


def rhs(t, y, rows):
    """y' = −k y + cos t with a rate k of its own per example (k = 30 is stiff-ish)."""
    return -RATES[rows][:, None] * y + torch.cos(t)[:, None]


def exact(t_out):
    k, t = RATES[:, None, None], t_out[None, :, None]
    y = torch.exp(-k * t) * (1 - k / (1 + k**2)) + (k * torch.cos(t) + torch.sin(t)) / (1 + k**2)
    return y.permute(1, 0, 2).expand(-1, -1, 2)


T_OUT = torch.tensor([0.0, 0.1, 0.5, 1.0, 2.0], dtype=D64)


@pytest.mark.parametrize("tol", [1e-4, 1e-7, 1e-10])
def test_matches_the_closed_form_to_its_tolerance(tol):
    sol = solve_per_example(rhs, torch.ones(3, 2, dtype=D64), 0.0, T_OUT, rtol=tol, atol=tol)
    err = float((sol.ys - exact(T_OUT)).abs().max())
    assert err < 30 * tol, err  # global error: a modest multiple of the local tolerance
    # a stiffer example takes more steps of its own
    assert sol.evals[0] < sol.evals[1] < sol.evals[2]
    assert sol.calls == int(sol.evals.max())


def test_fifth_order_on_fixed_work():
    """Halving the tolerance's 5th root halves the step: the error falls ~32× per 32× tol."""
    errs = []
    for tol in (1e-5, 1e-5 / 32**2):
        sol = solve_per_example(rhs, torch.ones(3, 2, dtype=D64), 0.0, T_OUT, rtol=tol, atol=tol)
        errs.append(float((sol.ys - exact(T_OUT)).abs().max()))
    assert errs[1] < errs[0] / 100, errs  # (32²)^(≈ 5/5) = 1024 in theory; ≥ 100 asserted


def test_a_batch_solves_every_example_exactly_as_alone():
    y0 = torch.ones(3, 2, dtype=D64)
    batch = solve_per_example(rhs, y0, 0.0, T_OUT, rtol=1e-3, atol=1e-3)
    for i in range(3):
        alone = solve_per_example(
            lambda t, y, rows, i=i: rhs(t, y, rows * 0 + i), y0[i : i + 1], 0.0, T_OUT,
            rtol=1e-3, atol=1e-3,
        )  # fmt: skip
        assert torch.equal(alone.ys[:, 0], batch.ys[:, i])
        assert int(alone.evals[0]) == int(batch.evals[i])


def test_backwards_in_time_and_per_example_outputs():
    """t may decrease, and every example may ask for its own output times: y' = c·cos(t)·y,
    y(t) = y(2)·exp(c (sin t − sin 2)), well conditioned in both directions."""
    c = torch.tensor([0.5, 1.0, 2.0], dtype=D64)

    def f(t, y, rows):
        return (c[rows] * torch.cos(t))[:, None] * y

    t_out = torch.tensor([[1.5, 1.0, 0.0], [1.2, 0.3, 0.0], [1.9, 0.5, -1.0]], dtype=D64)
    sol = solve_per_example(f, torch.ones(3, 1, dtype=D64), 2.0, t_out, rtol=1e-9, atol=1e-9)
    want = torch.exp(c[:, None] * (torch.sin(t_out) - math.sin(2.0))).T[..., None]
    assert float((sol.ys - want).abs().max()) < 1e-7


def test_refuses_a_hopeless_step_budget():
    with pytest.raises(RuntimeError, match="more than 3 steps"):
        solve_per_example(
            rhs, torch.ones(3, 2, dtype=D64), 0.0, T_OUT, rtol=1e-9, atol=1e-9, max_steps=3
        )
