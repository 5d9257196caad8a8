"""Maximum-likelihood fine-tuning of the probability-flow ODE against more DSM, at equal CPU time
(issue 33, item 4).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ode_finetune.py [--toy moons]
        [--pretrain-steps 5000] [--budget-s 60] [--seed 0]

A small score model (sdelab's MLP, width 64, depth 2, ε-output, VP schedule with t_min = 1e-3)
is trained on a 2-D toy with likelihood-weighted DSM (importance-sampled time) for
``--pretrain-steps`` Adam steps. From that checkpoint two branches run for the same CPU time
(``time.process_time``, one torch thread):

- *DSM*: the same objective and optimizer state, continued;
- *ODE NLL*: :func:`sdelab.likelihood.ode_nll_loss` (exact 2-D trace, ``Augmented(check=False)``,
  tol 1e-2 nats, backpropagation through dopri5), fresh Adam at a smaller learning rate.

Each model is scored by the exact ODE log-likelihood (default policy, tol 1e-2 nats) of the same
held-out points: mean NLL in nats ± its standard error, and the paired difference to the
pre-trained model (± s.e. of the per-example differences). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import time

import torch

from sdelab.data.toys import sample_toy
from sdelab.likelihood import log_likelihood, ode_nll_loss
from sdelab.likelihood.options import Augmented
from sdelab.losses import dsm_loss
from sdelab.nets.mlp import MLP
from sdelab.parametrization import ScoreModel
from sdelab.sde import VPSchedule


def dsm_step(model, sde, opt, x, gen) -> float:
    loss = dsm_loss(model.eps, sde, x, weighting="likelihood", time_sampling="importance",
                    generator=gen).loss.mean()  # fmt: skip
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def nll_step(model, sde, opt, x, tol) -> float:
    loss = ode_nll_loss(model, sde, x, tol=tol, integrator=Augmented(check=False)).mean()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


def held_out_nll(model, sde, x) -> torch.Tensor:
    with torch.no_grad():
        return log_likelihood(model, sde, x).nll  # default policy: exact trace, tol 1e-2


def run_for(budget_s: float, step) -> int:
    """Call ``step()`` until ``budget_s`` CPU seconds have passed; returns the step count."""
    start, n = time.process_time(), 0
    while time.process_time() - start < budget_s:
        step()
        n += 1
    return n


def mean_se(v: torch.Tensor) -> tuple[float, float]:
    return float(v.mean()), float(v.std() / v.numel() ** 0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--toy", default="moons")
    ap.add_argument("--pretrain-steps", type=int, default=5000)
    ap.add_argument("--budget-s", type=float, default=60.0, help="CPU seconds per branch")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--nll-batch", type=int, default=64)
    ap.add_argument("--nll-lr", type=float, default=5e-4)
    ap.add_argument("--nll-tol", type=float, default=1e-2)
    ap.add_argument("--test", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    sde = VPSchedule(t_min=1e-3)
    model = ScoreModel(MLP(dim=2, width=64, depth=2), sde, "eps")
    test = sample_toy(args.toy, args.test, torch.Generator().manual_seed(10_000 + args.seed))

    def batch(n: int) -> torch.Tensor:
        return sample_toy(args.toy, n, gen)

    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    t0 = time.process_time()
    for _ in range(args.pretrain_steps):
        dsm_step(model, sde, opt, batch(args.batch), gen)
    pre_cpu = time.process_time() - t0
    base = held_out_nll(model, sde, test)

    dsm_model = copy.deepcopy(model)
    dsm_opt = torch.optim.Adam(dsm_model.parameters(), lr=2e-3)
    dsm_opt.load_state_dict(opt.state_dict())  # the same optimizer state, continued
    n_dsm = run_for(
        args.budget_s, lambda: dsm_step(dsm_model, sde, dsm_opt, batch(args.batch), gen)
    )
    nll_model = copy.deepcopy(model)
    nll_opt = torch.optim.Adam(nll_model.parameters(), lr=args.nll_lr)
    n_nll = run_for(
        args.budget_s,
        lambda: nll_step(nll_model, sde, nll_opt, batch(args.nll_batch), args.nll_tol),
    )
    after = {"DSM, continued": (dsm_model, n_dsm), "ODE NLL (ode_nll_loss)": (nll_model, n_nll)}

    print(f"# ODE-NLL fine-tuning vs continued DSM — {args.toy}, {datetime.date.today()}")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"1 thread; pre-training {args.pretrain_steps} DSM steps ({pre_cpu:.0f} CPU s); "
          f"each branch {args.budget_s:.0f} CPU s; held-out n = {args.test}")  # fmt: skip
    print()
    print("| model | steps in the budget | held-out ODE NLL (nats) | change vs pre-trained |")
    print("|---|---|---|---|")
    m, se = mean_se(base)
    print(f"| pre-trained (DSM, {args.pretrain_steps} steps) | — | {m:.3f} ± {se:.3f} | — |")
    for name, (mdl, n) in after.items():
        nll = held_out_nll(mdl, sde, test)
        m, se = mean_se(nll)
        dm, dse = mean_se(nll - base)
        print(f"| {name} | {n} | {m:.3f} ± {se:.3f} | {dm:+.3f} ± {dse:.3f} |")


if __name__ == "__main__":
    main()
