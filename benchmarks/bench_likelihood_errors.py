"""Per-example accuracy and error bars of the ODE log-likelihood on Gaussian data.

    python benchmarks/bench_likelihood_errors.py [--baseline-src PATH/TO/OLD/src]

Gaussian data N(μ, Σ) (anisotropic Σ) has a closed-form probability-flow density
(:meth:`sdelab.oracle.GaussianData.ode_log_prob`: the prior pushed back through the exact flow),
so every example's error is known. For VE and VP, D = 2, 16, 64, 64 draws plus 6 far-tail
points at Mahalanobis radius 8–13, exact trace, and tol = 1e-1, 1e-2, 1e-3, the table gives the
worst error (tail / ordinary draw), whether every example lies within 3·tol, how often the
reported ``error`` covers the true error, the NFE and the CPU time.

``--baseline-src`` adds, in the same run, the rows of another sdelab source tree whose
``log_likelihood`` still takes ``rtol``/``atol`` (e.g. a checkout of the release before the
error bars, ``PATH/src``), called with ``rtol = atol = tol`` and run in a subprocess; it
reports no error estimate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

CASES = [(s, d) for s in ("VE", "VP") for d in (2, 16, 64)]
TOLS = (1e-1, 1e-2, 1e-3)
#: the baseline's own default tolerance (rtol = atol = 1e-5), one more row per case
BASE_DEFAULT = 1e-5


def problem(d: int, seed: int = 0):
    """Anisotropic Gaussian data: N(μ, Σ), its 64 draws and 6 tail points, ``(70, d)``."""
    from sdelab.oracle import GaussianData

    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    scales = torch.diag(torch.logspace(-1, 0.5, d, dtype=torch.float64))
    cov = scales @ (a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)) @ scales
    data = GaussianData(torch.randn(d, generator=g, dtype=torch.float64), cov)
    x = data.sample(64, generator=g)
    u = torch.randn(6, d, generator=g, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    radius = torch.linspace(8, 13, 6, dtype=torch.float64)[:, None]
    tail = data.mean + (radius * u) @ torch.linalg.cholesky(cov).T
    return data, torch.cat([x, tail])


def schedule(name: str):
    from sdelab.sde import VESchedule, VPSchedule

    return VESchedule() if name == "VE" else VPSchedule()


def solve_all(baseline: bool) -> list[dict]:
    """Every case's per-example logp (and error, where reported), NFE and CPU seconds."""
    from sdelab.likelihood import log_likelihood

    out = []
    for name, d in CASES:
        sched = schedule(name)
        data, x = problem(d)
        score = data.score_fn(sched)
        for tol in (*TOLS, BASE_DEFAULT) if baseline else TOLS:
            t = time.process_time()
            with torch.no_grad():
                if baseline:
                    res = log_likelihood(score, sched, x, rtol=tol, atol=tol)
                else:
                    from sdelab.likelihood.options import Exact

                    res = log_likelihood(score, sched, x, tol=tol, divergence=Exact())
            cpu = time.process_time() - t
            est = getattr(res, "error", None)
            out.append(
                dict(
                    logp=res.logp.tolist(),
                    error=None if est is None else est.tolist(),
                    nfe=res.nfe,
                    cpu=cpu,
                )
            )
    return out


def summarize(raw: list[dict], baseline: bool = False) -> list[dict]:
    """Errors against the exact ODE density (computed here, by this tree's oracle)."""
    rows, k = [], 0
    for name, d in CASES:
        sched = schedule(name)
        data, x = problem(d)
        truth = data.ode_log_prob(x, sched)
        for tol in (*TOLS, BASE_DEFAULT) if baseline else TOLS:
            r = raw[k]
            k += 1
            err = (torch.tensor(r["logp"], dtype=torch.float64) - truth).abs()
            est = None if r["error"] is None else torch.tensor(r["error"], dtype=torch.float64)
            rows.append(
                dict(
                    case=f"{name}, D={d}",
                    tol=tol,
                    tail=float(err[-6:].max()),
                    ordinary=float(err[:-6].max()),
                    within=bool((err <= 3 * tol).all()),
                    cover=None if est is None else float((est >= err).double().mean()),
                    nfe=r["nfe"],
                    cpu=r["cpu"],
                )
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline-src", default=None, help="another sdelab's src/ (rtol/atol API)")
    p.add_argument("--json-rows", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.json_rows:  # the subprocess of --baseline-src
        print(json.dumps(solve_all(args.baseline)))
        return
    base = None
    if args.baseline_src:
        env = dict(os.environ, PYTHONPATH=os.path.abspath(args.baseline_src))
        out = subprocess.run(
            [sys.executable, __file__, "--json-rows", "--baseline"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        base = summarize(json.loads(out.strip().splitlines()[-1]), baseline=True)
    new = summarize(solve_all(False))
    print(
        "| case | likelihood | tol (nats) | worst error: tail / ordinary (nats) | all within "
        "3·tol | `error` covers | NFE | CPU s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    per_case = len(TOLS)
    for c in range(len(CASES)):
        lines = [("default", r) for r in new[c * per_case : (c + 1) * per_case]]
        if base is not None:
            rows = base[c * (per_case + 1) : (c + 1) * (per_case + 1)]
            lines = [("before, rtol = atol = tol", r) for r in rows[:-1]] + lines
            lines.append(("before, its default rtol = atol = 1e-5", rows[-1]))
        for label, row in lines:
            cover = "—" if row["cover"] is None else f"{row['cover']:.0%}"
            tol = "—" if row["tol"] == BASE_DEFAULT else f"{row['tol']:g}"
            within = "—" if row["tol"] == BASE_DEFAULT else ("yes" if row["within"] else "no")
            print(
                f"| {row['case']} | {label} | {tol} | {row['tail']:.2g} / "
                f"{row['ordinary']:.2g} | {within} | {cover} | "
                f"{row['nfe']} | {row['cpu']:.2f} |"
            )


if __name__ == "__main__":
    main()
