"""Benchmark: per-example ODE likelihood accuracy per CPU second (issue 17).

Run:
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_likelihood_speed.py \\
      [--digits-run RUN] [--scoresde PATH/TO/score_sde_pytorch] [--sdeflow PATH/TO/sdeflow-light]

Table 1 — every example within 0.01 nats of a tight reference (augmented exact trace,
tol = 1e-8 nats) at the lowest cost: D = 64 Gaussian oracle (VP and VE), a D = 64 random MLP
score (VP) and, with ``--digits-run``, a trained digits U-Net (VP, D = 64, float64 weights).
Rows: the augmented exact trace at tol = 1e-5 nats is speed 1.0×; the quadrature integrator
and its variants (time variable, forward-mode trace, Hutchinson at
the nodes); the Score-SDE design (bench_likelihood.py's scipy re-implementation, exact trace);
with ``--scoresde``, Score-SDE's own ``likelihood.py`` (one Rademacher probe), loaded from the
given checkout through a small adapter (never copied here).

Table 2 — one tail point in a batch (VE, D = 2, Mahalanobis radius 11 among 255 draws):
error in the batch and alone, per tolerance and integrator.

Table 3 — ELBO cost for equal standard error: ``elbo`` against sdeflow-light's
``elbo_random_t_slice`` (``--sdeflow``; its ``lib/sdes.py`` loaded from the path) on the
Gaussian oracle, D = 16: seconds per draw × variance = seconds to reach SE 1 nat (ratio).

Table 4 — with ``--digits-run``: test-set bits/dim of the digits model (uniform
dequantization): mean ± SE, CPU time, for today's default, the new default and Hutchinson
variants (the data-set question of item 2).

Table 5 — with ``--bpd-run``: test-set bits/dim of a trained image run, CPU time to SE ≤ 0.005
bpd at solver bias ≤ 0.002 bpd per estimator (the Score-SDE design, the randomized rule on
dopri5 and on DPM-Solver++(3M)), each paired with its tight twin (``table_dataset_bpd``).

Table 6 — with ``--bpd-run``: the fixed-grid forward solve's bias against its step count
(``--bpd-steps``), split into the prior term and the divergence integral.

Table 7 — with ``--digits-run``: how many exact-trace nodes Clenshaw–Curtis and
Gauss–Legendre rules in t and in λ need on the trained U-Net's divergence (item 1's bound).

Table 8 — trace estimators at the quadrature's nodes at equal matrix-vector products: the
exact trace, Rademacher probes and Hutch++ on table 1's cases (item 1's variance-reduction
lever).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_likelihood import RandomMLP, oracle, scoresde_likelihood
from sdelab.likelihood import elbo, log_likelihood, nats_to_bpd
from sdelab.likelihood.options import Augmented, Exact, Hutchinson, Quadrature, Randomized
from sdelab.oracle import GaussianData
from sdelab.sde import VESchedule, VPSchedule

F32, F64 = torch.float32, torch.float64


def emit(lines: list[str], line: str) -> None:
    """Record a table row and show it at once (long runs print as they go)."""
    lines.append(line)
    print(line, file=sys.stderr, flush=True)


def timed(fn, repeats: int):
    """Median CPU time of this process (not wall time: the machine is shared)."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.process_time()
        out = fn()
        times.append(time.process_time() - t0)
    return statistics.median(times), out


# ---- Score-SDE's own likelihood.py through an adapter -----------------------------------------
class _PeerSDE:
    """The attributes Score-SDE's likelihood.py reads from its ``sde`` object."""

    def __init__(self, schedule):
        self.schedule, self.T = schedule, schedule.T

    def prior_logp(self, z):
        return self.schedule.prior_logp(z.double())

    def reverse(self, score_fn, probability_flow=True):
        sched = self.schedule

        class _R:
            def sde(self, x, t):
                return sched.probability_flow(x, t, score_fn(x, t)), None

        return _R()


def load_scoresde_likelihood(path: str):
    """Score-SDE's ``likelihood.py`` with ``models.utils`` replaced by the three helpers it
    uses (score function pass-through, numpy flattening)."""
    mutils = types.ModuleType("models.utils")
    mutils.get_score_fn = lambda sde, model, train=False, continuous=True: model
    mutils.to_flattened_numpy = lambda x: x.detach().cpu().numpy().reshape((-1,))
    mutils.from_flattened_numpy = lambda x, shape: torch.from_numpy(x.reshape(shape))
    models = types.ModuleType("models")
    models.utils = mutils
    sys.modules.setdefault("models", models)
    sys.modules["models.utils"] = mutils
    spec = importlib.util.spec_from_file_location(
        "scoresde_likelihood", Path(path) / "likelihood.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- table 1 -----------------------------------------------------------------------------------
def cases(args):
    d, b = 64, args.batch
    data = oracle(d, seed=d)
    x = data.sample(b, generator=torch.Generator().manual_seed(0))
    mlp = RandomMLP(d).double().eval().requires_grad_(False)
    out = [
        ("Gaussian VP", data.score_fn(VPSchedule()), VPSchedule(), x),
        ("Gaussian VE", data.score_fn(VESchedule()), VESchedule(), x),
        ("random MLP VP", mlp, VPSchedule(), x),
    ]
    if args.only_digits:
        out = []
    if args.digits_run:
        from sdelab.data.images import levels_to_model, load_digits
        from sdelab.train.build import load_run

        _, model, sched = load_run(args.digits_run)
        model = model.double()
        test = load_digits(split="test")
        u = torch.rand(
            test.levels[: args.digits_batch].shape, generator=torch.Generator().manual_seed(0)
        )
        xd = levels_to_model(test.levels[: args.digits_batch], 17, u=u).double()
        out.append(("digits U-Net VP", model, sched.double(), xd))
    return out


def _opts(integrator, divergence=None, tol=1e-5) -> dict:
    """log_likelihood's options for one row (exact trace unless a Hutchinson estimator)."""
    return dict(integrator=integrator, divergence=divergence or Exact(), tol=tol)


def method_rows(peer):
    hutch8 = Hutchinson(n_probes=8)
    rows = [
        ("augmented exact, tol 1e-5", _opts(Augmented())),
        ("quadrature exact, t, dopri8", _opts(Quadrature())),
        ("quadrature exact, dopri5", _opts(Quadrature(method="dopri5"))),
        ("quadrature exact, log-SNR", _opts(Quadrature(time_variable="log_snr"))),
        ("quadrature exact, forward-mode trace", _opts(Quadrature(), Exact(mode="forward"))),
        ("quadrature exact, tol 1e-4", _opts(Quadrature(), tol=1e-4)),
        ("quadrature exact, tol 1e-3", _opts(Quadrature(), tol=1e-3)),
        ("quadrature exact, dopri5, tol 1e-3", _opts(Quadrature(method="dopri5"), tol=1e-3)),
        (
            "quadrature exact, DPM-Solver++(3M) 64 steps, tol 0.01",
            _opts(Quadrature(method="dpm3m", steps=64, solve_in="log_snr"), tol=1e-2),
        ),
        ("quadrature Hutchinson 8 probes fixed per example", _opts(Quadrature(), hutch8)),
        (
            "quadrature Hutchinson 8 fresh probes × 17 nodes",
            _opts(Quadrature(refresh_probes=True, min_nodes=16, max_nodes=16), hutch8),
        ),
        (
            "augmented Hutchinson 1 probe (the field's default)",
            _opts(Augmented(), Hutchinson()),
        ),
    ]
    return rows


def case_rows(args, peer, name, score, sched, x) -> list[str]:
    lines = []
    tol = args.digits_ref_tol if name.startswith("digits") else 1e-8
    with torch.no_grad():
        ref = log_likelihood(score, sched, x, tol=tol, integrator=Augmented())
    t_today = None
    results = []
    rows = method_rows(peer)
    if name.startswith("digits") and args.digits_rows:
        rows = [rows[int(i)] for i in args.digits_rows.split(",")]
    for label, kw in rows:

        def run(kw=kw):
            with torch.no_grad():
                return log_likelihood(
                    score, sched, x, generator=torch.Generator().manual_seed(1), **kw
                )

        t, res = timed(run, args.repeats)
        t_today = t if t_today is None else t_today
        results.append((label, t, res.nfe, float(res.divergence_evals.float().mean()), res.logp))
    if name != "digits U-Net VP":

        def score32(xx, tt):  # the design runs its model in float32
            return score(xx.double(), tt.double()).float()

        t, (lp, nfe) = timed(
            lambda: scoresde_likelihood(score32, sched, x.float(), 1e-5, 1e-5), args.repeats
        )
        results.append(
            ("Score-SDE design (scipy, exact trace, float32)", t, nfe, float(nfe), lp.double())
        )
    if peer is not None:
        psde = _PeerSDE(sched)

        def peer_run():
            fn = peer.get_likelihood_fn(psde, lambda v: v, eps=sched.t_min)
            torch.manual_seed(1)
            bpd, _, nfe = fn(
                lambda xx, tt: score(xx.to(x.dtype), tt.to(x.dtype)).float(), x.float()
            )
            dim = x[0].numel()
            # undo the peer's bits/dim "offset" hack (7 - inverse_scaler(-1) = 8 here)
            return -(bpd.double() - 8.0) / nats_to_bpd(1.0, dim), nfe

        t, (lp, nfe) = timed(peer_run, args.repeats)
        results.append(("Score-SDE's likelihood.py (1 probe)", t, nfe, float(nfe), lp))
    for label, t, nfe, evals, lp in results:
        err = (lp - ref.logp).abs()
        emit(
            lines,
            f"| {name} | {label} | {t:.2f} | {t_today / t:.1f}× | {nfe} | {evals:.0f} "
            f"| {float(err.max()):.1e} | {float(err.mean()):.1e} |",
        )
    return lines


def table_accuracy(args, peer) -> list[str]:
    lines = [
        "| case | method | s | speed vs today | NFE | div. evals / example | max err (nats) "
        "| mean err (nats) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases(args):
        lines += case_rows(args, peer, *case)
    return lines


# ---- table 2 -----------------------------------------------------------------------------------
def tail_setup():
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=F64)
    data = GaussianData(torch.tensor([0.3, -0.2], dtype=F64), cov)
    x = data.sample(255, generator=torch.Generator().manual_seed(0))
    chol = torch.linalg.cholesky(cov)
    tail = data.mean + 11 * (chol @ torch.tensor([0.6, 0.8], dtype=F64))
    return data, torch.cat([x, tail[None]])


def table_tail() -> list[str]:
    data, xb = tail_setup()
    sde = VESchedule()
    sf = data.score_fn(sde)
    with torch.no_grad():
        ref = log_likelihood(sf, sde, xb, tol=1e-9, integrator=Augmented()).logp
    lines = [
        "| integrator | tol (nats) | tail err in batch | tail err alone | max err of the 255 "
        "| NFE batch / alone |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    variants = [
        ("augmented", dict(integrator=Augmented())),
        ("quadrature (dopri8, one step sequence)", dict(integrator=Quadrature())),
        (
            "quadrature, dopri5, steps per example",
            dict(integrator=Quadrature(method="dopri5", step_control="example")),
        ),
    ]
    for integ, kw in variants:
        for tol in (1e-2, 1e-3, 1e-4):
            with torch.no_grad():
                rb = log_likelihood(sf, sde, xb, tol=tol, divergence=Exact(), **kw)
                ra = log_likelihood(sf, sde, xb[-1:], tol=tol, divergence=Exact(), **kw)
            eb = (rb.logp - ref).abs()
            alone = float((ra.logp[0] - ref[-1]).abs())
            lines.append(
                f"| {integ} | {tol:g} | {float(eb[-1]):.3f} | {alone:.3f} "
                f"| {float(eb[:-1].max()):.3f} | {rb.nfe} / {ra.nfe} |"
            )
    return lines


# ---- table 3 -----------------------------------------------------------------------------------
def load_sdeflow(path: str):
    spec = importlib.util.spec_from_file_location("sdeflow_sdes", Path(path) / "lib" / "sdes.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(Path(path)))
    spec.loader.exec_module(mod)
    return mod


def table_elbo(args) -> list[str]:
    d, b, n = 16, 256, 32
    data = oracle(d, seed=3)
    sde = VPSchedule(t_min=1e-3)
    sf = data.score_fn(sde)
    x = data.sample(b, generator=torch.Generator().manual_seed(0))
    lines = [
        "| estimator | s per draw (B = 256) | per-example SD of one draw (nats) | s for SE = 0.1 "
        "nats | cost vs sdeflow-light |",
        "|---|---:|---:|---:|---:|",
    ]
    rows = []
    for label, kw in (
        ("sdelab elbo, uniform t (default, as sdeflow-light)", dict(time_sampling="uniform")),
        ("sdelab elbo, importance t", dict(time_sampling="importance")),
    ):

        def run(kw=kw):
            with torch.no_grad():
                return elbo(
                    sf, sde, x, n_samples=n, generator=torch.Generator().manual_seed(2), **kw
                )

        run()  # warm-up: the first call pays one-off costs
        t, res = timed(run, args.repeats)
        sd = float((res.se * math.sqrt(n)).mean())
        rows.append((label, t / n, sd))
    if args.sdeflow:
        lib = load_sdeflow(args.sdeflow)
        peer = _sdeflow_model(lib, sf, sde)

        def run_peer():
            with torch.no_grad():
                torch.manual_seed(2)
                return torch.stack(
                    [-peer.elbo_random_t_slice(x.float()).double() for _ in range(n)]
                )

        run_peer()
        t, draws = timed(run_peer, args.repeats)
        rows.append(("sdeflow-light elbo_random_t_slice", t / n, float(draws.std(0).mean())))
    base = rows[-1][1] * (rows[-1][2] / 0.1) ** 2 if args.sdeflow else None
    for label, tpd, sd in rows:
        cost = tpd * (sd / 0.1) ** 2
        rel = f"{cost / base:.2f}×" if base else "–"
        lines.append(f"| {label} | {tpd * 1e3:.1f} ms | {sd:.2f} | {cost:.2f} | {rel} |")
    return lines


def _sdeflow_model(lib, score_fn, sde):
    """sdeflow-light's PluginReverseSDE over its VariancePreservingSDE with the oracle's drift
    a = g·s (its parameterisation), so both estimate the same ELBO of the same model."""
    base = lib.VariancePreservingSDE(beta_min=0.1, beta_max=20.0, T=1.0, t_epsilon=sde.t_min)

    class Drift(torch.nn.Module):
        def forward(self, y, t):
            t = t.reshape(-1).double().clamp(min=sde.t_min)  # it draws t on [0, T]
            g = sde(t).g2.sqrt()[:, None]
            return (g * score_fn(y.double(), t)).float()

    model = lib.PluginReverseSDE(base, Drift(), T=1.0, vtype="rademacher", debias=False)
    return model.eval()


# ---- table 4 -----------------------------------------------------------------------------------
def table_digits_bpd(args) -> list[str]:
    from sdelab.data.images import load_digits
    from sdelab.likelihood.bpd import bits_per_dim
    from sdelab.train.build import load_run

    _, model, sched = load_run(args.digits_run)
    test = load_digits(split="test")
    k = test.levels[: args.bpd_n].to(torch.int64)
    lines = [
        "| estimator | bpd mean ± SE (images) | estimator-noise SE | CPU s | speed vs today "
        "| bias vs reference (bpd) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rows = [
        ("reference: quadrature exact, tol 1e-6", _opts(Quadrature(), tol=1e-6)),
        ("today: augmented exact, tol 1e-5", _opts(Augmented())),
        ("quadrature exact, tol 1e-5", _opts(Quadrature())),
        ("quadrature exact, dopri8, tol 1e-4", _opts(Quadrature(), tol=1e-4)),
        (
            "quadrature Hutchinson 1 probe fixed per example",
            _opts(Quadrature(), Hutchinson()),
        ),
        (
            "quadrature Hutchinson 1 fresh probe × 17 nodes",
            _opts(Quadrature(refresh_probes=True, min_nodes=16, max_nodes=16), Hutchinson()),
        ),
        (
            "augmented Hutchinson 1 probe (Score-SDE design)",
            _opts(Augmented(check=False), Hutchinson()),
        ),
    ]
    ref, t_today = None, None
    for label, kw in rows:
        t0 = time.process_time()
        with torch.no_grad():
            res = bits_per_dim(
                model,
                k,
                17,
                2.0,
                -1.0,
                schedule=sched,
                generator=torch.Generator().manual_seed(5),
                **kw,
            )
        cpu = time.process_time() - t0
        bpd = res.bpd
        mean, se = float(bpd.mean()), float(bpd.std() / math.sqrt(bpd.numel()))
        ref = bpd if ref is None else ref  # the same dequantization noise in every row (seed)
        noise_se = float((bpd - ref).std() / math.sqrt(bpd.numel()))
        if label.startswith("today"):
            t_today = cpu
        speed = f"{t_today / cpu:.1f}×" if t_today else "–"
        emit(
            lines,
            f"| {label} | {mean:.4f} ± {se:.4f} | {noise_se:.4f} | {cpu:.1f} | {speed} "
            f"| {float((bpd - ref).mean()):+.4f} |",
        )
    return lines


# ---- table 5 -----------------------------------------------------------------------------------
SE_TARGET, BIAS_TARGET = 0.005, 0.002  # bpd: issue 17, item 2


def _run_test_levels(run: str, n: int, start: int = 0):
    """(model, schedule, k, dequantization options) of a trained image run: its test images
    ``start .. start + n`` as integer levels (the model in float32, as a user runs it)."""
    from sdelab.runs.core import split_levels
    from sdelab.train.build import dequantization_options, load_run, make_run_dataset

    config, model, sched = load_run(run)
    dataset = make_run_dataset(config)
    k = split_levels(dataset, "test", start + n).to(torch.int64)[start:]
    return model, sched, k, dequantization_options(dataset)


def _run_images(run: str, n: int, start: int = 0):
    """(model, schedule, y, D): :func:`_run_test_levels`' images uniformly dequantized with
    seed 5."""
    from sdelab.likelihood.dequantization import dequantize

    model, sched, k, deq = _run_test_levels(run, n, start)
    g = torch.Generator().manual_seed(5)
    y = dequantize(k, deq["levels"], deq["scale"], deq["shift"], generator=g).y
    return model, sched, y, k[0].numel()


def table_dataset_bpd(args, peer=None) -> list[str]:
    """Test-set mean bits/dim of a trained image run: CPU time to SE ≤ 0.005 bpd with solver
    bias ≤ 0.002 bpd, per estimator.

    Every estimator runs twice (seeds 5 and 6: dequantization noise, probes and shifts), on the
    first ``--bpd-n`` test images, the model in float32 as a user runs it. Its *noise SD per
    image* is std(run₅ − run₆)/√2 (dequantization + probes + quadrature shift: the estimator's
    own randomness; the images' spread is the test set's, not the estimator's). Its *solver
    bias* is the paired mean difference to its own tight twin (same integrator, same random
    numbers, dopri8: the augmented one at tol = 1e-3 nats, the randomized ones' forward solve at
    1e-7), so only the solver's error is left in it. A pass
    over the ``--bpd-target-n`` images of the evaluation then has estimator SE = SD/√N; the
    passes needed for SE ≤ 0.005 are max(1, (SE/0.005)²), and the CPU time to the target is
    the measured CPU per image × N × passes. Speeds are ratios to the first augmented row that
    meets the bias target: Score-SDE's own likelihood.py when ``--scoresde`` is given, else
    the design as sdelab runs it (all in this one run). The last column is the
    other standard error, that of the test-set mean as an estimate of the population mean:
    the images' spread std(bpd)/√N, which no estimator setting reduces."""
    from sdelab.likelihood.bpd import ODE, Levels, bits_per_dim

    model, sched, k, deq = _run_test_levels(args.bpd_run, args.bpd_n)
    n, dim = k.shape[0], k[0].numel()
    n_target = args.bpd_target_n or n
    hutch = Hutchinson()
    # the Score-SDE design: one augmented solve (no tolerance check) with one probe
    aug = Augmented(check=False)

    def rnd(nodes: int, tol: float | None = None, **solver) -> dict:
        return dict(integrator=Randomized(nodes=nodes, **solver), divergence=hutch, tol=tol)

    # (label, options, twin): the twin is the key of the tight run it is paired with
    rows = [
        (
            "augmented (the Score-SDE design in sdelab), 1 probe, dopri5, tol 1e-5",
            dict(integrator=aug, divergence=hutch, tol=1e-5),
            "aug",
        ),
        (
            "augmented (the Score-SDE design in sdelab), tol 1e-6",
            dict(integrator=aug, divergence=hutch, tol=1e-6),
            "aug",
        ),
    ]
    for nodes in args.bpd_nodes:
        rows += [
            (
                f"randomized, {nodes} nodes, dopri5 in λ, tol 1e-5"
                + (" (the previous default)" if nodes == 32 else ""),
                rnd(nodes, 1e-5, method="dopri5"),
                f"rnd{nodes}",
            ),
            (
                f"randomized, {nodes} nodes, dopri5 in λ, tol 3e-5",
                rnd(nodes, 3e-5, method="dopri5"),
                f"rnd{nodes}",
            ),
            (
                f"randomized, {nodes} nodes, dopri5 in t, tol 1e-5",
                rnd(nodes, 1e-5, method="dopri5", solve_in="t"),
                f"rnd{nodes}",
            ),
        ]
        rows += [
            (
                f"randomized, {nodes} nodes, DPM-Solver++(3M) {steps} steps in λ"
                + (" (the default)" if (nodes, steps) == (32, 64) else ""),
                rnd(nodes, method="dpm3m", steps=steps),
                f"rnd{nodes}",
            )
            for steps in args.bpd_steps
        ]
    if peer is not None:  # the speed reference: Score-SDE's own code
        rows.insert(0, ("Score-SDE's likelihood.py (RK45, 1e-5, 1 probe)", {"peer": True}, "peer"))
    if args.bpd_rows:  # the base row (the first) always, then those matching a substring
        keep = args.bpd_rows.split("|")
        rows = rows[:1] + [r for r in rows[1:] if any(k in r[0] for k in keep)]
    # tight twins, each with the same random numbers as its rows: the augmented one solved once
    # by dopri8 at tol 1e-3 nats (the log-density columns to tol/8, x to tol/(8q) with
    # q ≥ D: errors ≤ 1e-4 nats, 1e-6 bpd or less, against a 0.002 bpd budget; tighter only
    # multiplies the cost), the randomized ones' forward solve by dopri8 at 1e-7
    twins = {
        "aug": dict(integrator=Augmented(method="dopri8", check=False), divergence=hutch, tol=1e-3)
    }
    twins.update({f"rnd{m}": rnd(m, 1e-7, method="dopri8") for m in args.bpd_nodes})
    # the peer's own twin: its code with the same probe (the same global seed), DOP853 at 1e-7
    twins["peer"] = {"peer": True, "rtol": 1e-7, "method": "DOP853", "n": args.bpd_twin_n or n}
    twins = {key: kw for key, kw in twins.items() if any(r[2] == key for r in rows)}

    levels = Levels(deq["levels"], deq["scale"], deq["shift"])

    def run(kw: dict, seed: int) -> tuple[torch.Tensor, float, int]:
        t0 = time.process_time()
        with torch.no_grad():
            if kw.get("peer"):  # Score-SDE's likelihood.py as the log-density of y
                logp = peer_logp(seed, kw.get("rtol", 1e-5), kw.get("method", "RK45"))
                # its twin on the first images only: u (our generator) and the probe (torch's
                # global stream) of an image are the same in any prefix of the batch
                kk = k[: kw["n"]] if "n" in kw else k
                res = bits_per_dim(logp, kk, levels, generator=torch.Generator().manual_seed(seed))
                return res.bpd.double(), time.process_time() - t0, peer_nfe[0]
            res = bits_per_dim(
                model,
                k,
                levels,
                schedule=sched,
                estimator=ODE(**kw),
                generator=torch.Generator().manual_seed(seed),
            )
        return res.bpd.double(), time.process_time() - t0, res.nfe

    peer_nfe = [0]

    def peer_logp(seed: int, tol: float = 1e-5, method: str = "RK45"):
        """log p(y) in nats by Score-SDE's own get_likelihood_fn (``method`` at rtol = atol =
        ``tol``, one Rademacher probe from torch's global stream, seeded here), the model in
        float32."""
        fn = peer.get_likelihood_fn(
            _PeerSDE(sched), lambda v: v, rtol=tol, atol=tol, method=method, eps=sched.t_min
        )

        def logp(y: torch.Tensor) -> torch.Tensor:
            torch.manual_seed(seed)
            bpd, _, nfe = fn(lambda xx, tt: model(xx.float(), tt.float()), y.float())
            peer_nfe[0] = nfe
            # undo the peer's bits/dim offset (7 − inverse_scaler(−1) = 8 with the identity)
            return -(bpd.double() - 8.0) / nats_to_bpd(1.0, dim)

        return logp

    lines = [
        f"{dim}-dimensional images: the first {n} test images of `{args.bpd_run}`, the model in "
        f"float32; SE and CPU time extrapolated to a pass over N = {n_target} images. Bias: "
        "paired difference to the estimator's tight twin (dopri8, same random "
        f"numbers) ± its SE. Targets: SE ≤ {SE_TARGET}, bias ≤ {BIAS_TARGET} bpd.",
        "",
        "| estimator | bpd (seed 5) | solver bias (bpd) | noise SD / image (bpd) | NFE "
        f"| CPU s / {n} images | SE of one pass (N) | passes | CPU s to target (N) | speed "
        "| SE over images (N) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ref = {}
    for key, kw in twins.items():
        bpd, cpu, nfe = run(kw, 5)
        ref[key] = bpd
        subset = "" if len(bpd) == n else f", first {len(bpd)} images"
        what = (
            f"Score-SDE's code, {kw['method']}, rtol = atol = {kw['rtol']:g}"
            if kw.get("peer")
            else f"{kw['integrator'].tag}, tol {kw['tol']:g}"
        )
        emit(
            lines,
            f"| tight twin `{key}` ({what}{subset}) | "
            f"{float(bpd.mean()):.4f} | – | – | {nfe} | {cpu:.1f} | – | – | – | – | – |",
        )
    keys = list(ref)
    if len(keys) >= 2:
        diff = ref[keys[0]] - ref[keys[1]]
        emit(
            lines,
            f"| (tight twins `{keys[0]}` and `{keys[1]}` differ by {float(diff.mean()):+.4f} ± "
            f"{float(diff.std() / math.sqrt(n)):.4f} bpd: probe noise) | | | | | | | | | | |",
        )
    base = None
    for label, kw, twin in rows:
        b5, cpu5, nfe = run(kw, 5)
        b6, cpu6, _ = run(kw, 6)
        cpu = 0.5 * (cpu5 + cpu6)
        d = b5[: len(ref[twin])] - ref[twin]
        bias, bias_se = float(d.mean()), float(d.std() / math.sqrt(len(d)))
        sd = float((b5 - b6).std() / math.sqrt(2))
        se_pass = sd / math.sqrt(n_target)
        passes = max(1.0, (se_pass / SE_TARGET) ** 2)
        to_target = cpu / n * n_target * passes
        ok = abs(bias) + 2 * bias_se <= BIAS_TARGET
        if twin in ("peer", "aug") and ok and base is None:  # the peer (or the design) first
            base = to_target
        speed = f"{base / to_target:.1f}×" if base else "–"
        flag = "" if ok else " (bias target missed)"
        emit(
            lines,
            f"| {label}{flag} | {float(b5.mean()):.4f} | {bias:+.4f} ± {bias_se:.4f} "
            f"| {sd:.4f} | {nfe} | {cpu:.1f} | {se_pass:.4f} | {passes:.1f} "
            f"| {to_target:.0f} | {speed} | {float(b5.std()) / math.sqrt(n_target):.4f} |",
        )
    return lines


def table_steps_bias(args) -> list[str]:
    """Solver bias of the fixed-grid forward solve (DPM-Solver++ 3M / 2M) against its step
    count, split into the prior term log π(x_T) and the divergence integral.

    The randomized rule (``--steps-nodes`` nodes, one probe) on the first ``--bpd-n`` test
    images from ``--steps-start``; each row is paired with the same estimator, same random
    numbers, solved by dopri8 at tol = 1e-7 (its tight twin), so every difference is
    the fixed grid's error alone; ± is the SE of the paired mean over images."""
    model, sched, y, dim = _run_images(args.bpd_run, args.bpd_n, args.steps_start)
    n, c = y.shape[0], nats_to_bpd(1.0, dim)

    def run(tol: float | None = None, **solver):
        t0 = time.process_time()
        with torch.no_grad():
            res = log_likelihood(
                model,
                sched,
                y,
                tol=tol,
                divergence=Hutchinson(),
                integrator=Randomized(nodes=args.steps_nodes, **solver),
                generator=torch.Generator().manual_seed(7),
            )
        return res, time.process_time() - t0

    ref, cpu_ref = run(1e-7, method="dopri8")
    lines = [
        f"{dim}-dimensional images {args.steps_start}–{args.steps_start + n - 1} of the test "
        f"split of `{args.bpd_run}`, randomized rule with {args.steps_nodes} nodes; tight twin "
        f"(dopri8, tol 1e-7): {ref.nfe} evaluations, {cpu_ref:.0f} CPU s. Bias in bpd "
        "(estimate − twin, mean ± SE over images).",
        "",
        "| solver | steps | NFE | bias (bpd) | of it: log π(x_T) | of it: ∫∇·v dt | CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def pm(v: torch.Tensor) -> str:
        return f"{float(v.mean()):+.4f} ± {float(v.std() / math.sqrt(n)):.4f}"

    for method in args.steps_methods:
        for steps in args.bpd_steps:
            res, cpu = run(method=method, steps=steps)
            total = -(res.logp - ref.logp) * c
            prior = -(res.prior_logp - ref.prior_logp) * c
            integral = -(res.delta_logp - ref.delta_logp) * c
            emit(
                lines,
                f"| {method} | {steps} | {res.nfe} | {pm(total)} | {pm(prior)} "
                f"| {pm(integral)} | {cpu:.1f} |",
            )
    return lines


def table_unet_nodes(args) -> list[str]:
    """How many exact-trace nodes a quadrature rule needs on a trained model's divergence.

    For ``--nodes-n`` dequantized test images of ``--digits-run`` (float64 weights), x(t) is
    solved once by DPM-Solver++(3M) on 1024 steps; the exact divergence is evaluated on the
    nested Clenshaw–Curtis grids up to ``--nodes-max`` intervals in t and in λ and on
    Gauss–Legendre rules of 8–64 nodes in both; each rule's integral is compared with the
    finest Clenshaw–Curtis rule in t. The target of item 1 (every example within 0.01 nats)
    then says how many traces any of these rules needs, against the augmented solve's steps."""
    import numpy as np

    from sdelab.likelihood.divergence import exact_trace
    from sdelab.likelihood.forward import forward_path
    from sdelab.likelihood.quadrature import node_divergence, quadrature_grid

    model, sched, y, _ = _run_images(args.digits_run, args.nodes_n)
    model, sched, y = model.double(), sched.double(), y.double()
    n, t0, T = y.shape[0], float(sched.t_min), float(sched.T)
    levels = [8]
    while levels[-1] < args.nodes_max:
        levels.append(2 * levels[-1])
    rules: list[tuple[str, str, int, torch.Tensor, torch.Tensor]] = []  # kind, var, m, t, w
    for var in ("t", "log_snr"):
        grid = quadrature_grid(sched, t0, levels, var)
        for m, w in grid.weights.items():
            rules.append(("Clenshaw–Curtis", var, m + 1, grid.times, w))
        lam0, lam1 = sched.log_snr(torch.tensor([t0, T], dtype=F64)).tolist()
        for m in (8, 12, 16, 24, 32, 48, 64):
            u, w = (torch.tensor(a, dtype=F64) for a in np.polynomial.legendre.leggauss(m))
            if var == "t":
                tt, ww = t0 + (u + 1) * 0.5 * (T - t0), w * 0.5 * (T - t0)
            else:
                tt = sched.t_of_log_snr(lam0 + (u + 1) * 0.5 * (lam1 - lam0)).to(F64)
                ww = w * 0.5 * (lam1 - lam0) / sched.d_log_snr(tt).to(F64)
            rules.append(("Gauss–Legendre", var, m, tt, ww))
    times, inverse = torch.unique(torch.cat([r[3] for r in rules]), return_inverse=True)
    t_start = time.process_time()
    with torch.no_grad():
        path, _ = forward_path(
            model, sched, y, t0, times, method="dpm3m", rtol=0.0, atol=0.0,
            options={"steps": 1024}, wide=F64, solve_in="log_snr",
        )  # fmt: skip
    h = torch.empty(times.numel(), n, dtype=F64)
    chunk = max(1, 64 // n)

    def trace(fn, xx, rows, nodes):
        return exact_trace(fn, xx)

    for s in range(0, times.numel(), chunk):
        ks = torch.arange(s, min(s + chunk, times.numel())).repeat_interleave(n)
        rs = torch.arange(n).repeat(ks.numel() // n)
        with torch.no_grad():
            h[ks, rs] = node_divergence(model, sched, y, path, times, ks, rs, trace)
    cpu = time.process_time() - t_start
    values, offset = [], 0
    for kind, var, m, tt, ww in rules:
        idx = inverse[offset : offset + tt.numel()]
        offset += tt.numel()
        values.append((kind, var, m, (ww[:, None] * h[idx]).sum(0)))
    ref = next(v for k, var, m, v in values if var == "t" and m == levels[-1] + 1)
    with torch.no_grad():
        aug = log_likelihood(model, sched, y, tol=1e-5, divergence=Exact(), integrator=Augmented())
    lines = [
        f"{n} dequantized test images of `{args.digits_run}` (float64), {times.numel()} exact "
        f"traces in {cpu:.0f} CPU s. Reference: Clenshaw–Curtis in t with {levels[-1] + 1} "
        f"nodes. Today's per-example default (augmented exact trace, tol 1e-5) takes "
        f"{aug.nfe} traced evaluations per example.",
        "",
        "| rule | variable | nodes (= exact traces) | max error (nats) | errors per example |",
        "|---|---|---:|---:|---|",
    ]
    for kind, var, m, q in values:
        err = (q - ref).abs()
        per = ", ".join(f"{float(e):.3f}" for e in (q - ref))
        var_name = "λ" if var == "log_snr" else "t"
        emit(lines, f"| {kind} | {var_name} | {m} | {float(err.max()):.4f} | {per} |")
    return lines


def hutchpp_trace(fn, x: torch.Tensor, matvecs: int, generator: torch.Generator) -> torch.Tensor:
    """Hutch++ (Meyer et al. 2021) per example with ``matvecs`` products in two batched
    backward passes: a sketch Q = orth(Jᵀ S) of m/3 Rademacher columns, tr(Qᵀ J Q) exactly,
    and Hutchinson with the rest on (I − QQᵀ) J (I − QQᵀ). (A benchmark estimator: measured
    below against the plain Rademacher estimator at equal matvecs, not used by the library.)"""
    b, d = x.shape[0], x[0].numel()
    k = matvecs // 3

    def rademacher(n: int) -> torch.Tensor:
        draw = torch.randint(0, 2, (n, b, d), generator=generator, dtype=torch.int64)
        return draw.to(x.dtype) * 2 - 1

    with torch.enable_grad():
        xl = x.detach().requires_grad_(True)
        out = fn(xl)
        sketch = rademacher(k).reshape(k, *x.shape)
        y = torch.autograd.grad(out, xl, sketch, is_grads_batched=True, retain_graph=True)[0]
        q = torch.linalg.qr(y.reshape(k, b, d).permute(1, 2, 0))[0]  # (B, D, k)
        g = rademacher(matvecs - 2 * k).permute(1, 2, 0)
        g = g - q @ (q.transpose(1, 2) @ g)
        cot = torch.cat([q, g], dim=2).permute(2, 0, 1)  # (k + g, B, D)
        rows = torch.autograd.grad(out, xl, cot.reshape(-1, *x.shape), is_grads_batched=True)[
            0
        ].reshape(-1, b, d)
    prod = (rows * cot).sum(2)
    return prod[:k].sum(0) + prod[k:].mean(0)


def table_trace_estimators(args) -> list[str]:
    """Trace estimators at the quadrature's nodes, at equal matrix-vector products.

    On table 1's three D = 64 cases, x(t) is solved once (dopri8, tol 1e-8) and ∫∇·v dt is the
    17-node Clenshaw–Curtis rule in t with, at every node, the exact trace (D = 64 products),
    the Rademacher estimator (fresh probes per node) or Hutch++ with m products. The error is
    the integral's against the exact trace at the same nodes, so only the estimator's error is
    in it; CPU is the whole call's (the same forward solve in every row)."""
    from sdelab.likelihood.divergence import exact_trace, hutchinson_trace
    from sdelab.likelihood.forward import ForwardSolve
    from sdelab.likelihood.quadrature import divergence_integral

    solve = ForwardSolve(method="dopri8", rtol=1e-8, atol=1e-8, wide=F64)
    lines = [
        "| case | estimator at the 17 nodes | products per node | CPU s | max error (nats) "
        "| mean error (nats) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, score, sched, x in cases(args):
        gen = torch.Generator().manual_seed(11)

        def rad(fn, xx, m, gen=gen):
            draw = torch.randint(0, 2, (m, *xx.shape), generator=gen, dtype=torch.int64)
            return hutchinson_trace(fn, xx, draw.to(xx.dtype) * 2 - 1)

        estimators = [("exact trace", 64, lambda fn, xx, rows, nodes: exact_trace(fn, xx))]
        for m in (8, 24, 48):
            estimators.append(
                (f"Rademacher, {m} probes", m, lambda fn, xx, rows, nodes, m=m: rad(fn, xx, m))
            )
        for m in (24, 48):
            estimators.append(
                (
                    f"Hutch++, {m} products",
                    m,
                    lambda fn, xx, rows, nodes, m=m, gen=gen: hutchpp_trace(fn, xx, m, gen),
                )
            )
        ref = None
        for label, m, trace in estimators:
            t0 = time.process_time()
            with torch.no_grad():
                out = divergence_integral(
                    score, sched, x, float(sched.t_min), trace=trace, solve=solve,
                    min_nodes=16, max_nodes=16, time_variable="t",
                )  # fmt: skip
            cpu = time.process_time() - t0
            ref = out.delta if ref is None else ref
            err = (out.delta - ref).abs()
            emit(
                lines,
                f"| {name} | {label} | {m} | {cpu:.2f} | {float(err.max()):.2e} "
                f"| {float(err.mean()):.2e} |",
            )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--digits-run", default=None, help="a trained images/digits run folder")
    p.add_argument("--digits-batch", type=int, default=16)
    p.add_argument("--bpd-run", default=None, help="a trained image run for table 5")
    p.add_argument("--bpd-n", dest="bpd_n", type=int, default=64, help="test images (tables 4, 5)")
    p.add_argument(
        "--bpd-twin-n",
        dest="bpd_twin_n",
        type=int,
        default=None,
        help="table 5: images of the Score-SDE code's own tight twin (default --bpd-n)",
    )
    p.add_argument(
        "--bpd-target-n",
        dest="bpd_target_n",
        type=int,
        default=None,
        help="table 5: images of the evaluation the SE refers to (default --bpd-n)",
    )
    p.add_argument(
        "--bpd-nodes",
        dest="bpd_nodes",
        type=lambda v: [int(a) for a in v.split(",")],
        default=[16, 64],
        help="table 5: node counts of the randomized rule",
    )
    p.add_argument(
        "--bpd-steps",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[32, 64],
        help="table 5: DPM-Solver++(3M) step counts of the randomized rows (default 32,64)",
    )
    p.add_argument(
        "--bpd-rows",
        default=None,
        help="table 5: |-separated substrings of the row labels to run (the Score-SDE "
        "design at tol 1e-5, the base of the speeds, always runs)",
    )
    p.add_argument("--steps-start", type=int, default=0, help="table 6: first test image")
    p.add_argument("--steps-nodes", type=int, default=16, help="table 6: nodes of the rule")
    p.add_argument(
        "--steps-methods",
        type=lambda v: v.split(","),
        default=["dpm3m"],
        help="table 6: fixed-grid methods (dpm3m,dpm2m)",
    )
    p.add_argument("--nodes-n", type=int, default=2, help="table 7: test images")
    p.add_argument("--nodes-max", type=int, default=512, help="table 7: finest grid intervals")
    p.add_argument("--scoresde", default=None, help="a score_sde_pytorch checkout")
    p.add_argument("--sdeflow", default=None, help="a sdeflow-light checkout")
    p.add_argument("--tables", default="1234")
    p.add_argument("--only-digits", action="store_true", help="table 1: the digits case only")
    p.add_argument("--digits-ref-tol", type=float, default=1e-8, help="digits reference tol")
    p.add_argument("--digits-rows", default=None, help="comma-separated row numbers (from 0)")
    args = p.parse_args()
    torch.set_num_threads(1)
    peer = load_scoresde_likelihood(args.scoresde) if args.scoresde else None
    print(
        f"## Likelihood speed (issue 17)\n\n`{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} "
        f"UTC`, {platform.processor() or 'cpu'}, torch {torch.__version__}, 1 thread, median of "
        f"{args.repeats} run(s); errors against the augmented exact trace at tol = 1e-8 nats\n"
    )
    if "1" in args.tables:
        print(
            f"### Per-example accuracy per second (D = 64, B = {args.batch}; digits "
            f"B = {args.digits_batch})\n"
        )
        print("\n".join(table_accuracy(args, peer)) + "\n")
    if "2" in args.tables:
        print("### A tail point in a batch (VE, D = 2, radius 11 among 255)\n")
        print("\n".join(table_tail()) + "\n")
    if "3" in args.tables:
        print("### ELBO: cost to a standard error of 0.1 nats (oracle, VP, D = 16)\n")
        print("\n".join(table_elbo(args)) + "\n")
    if "4" in args.tables and args.digits_run:
        print(
            f"### Digits test bits/dim, first {args.bpd_n} test images (uniform dequantization)\n"
        )
        print("\n".join(table_digits_bpd(args)) + "\n")
    if "5" in args.tables and args.bpd_run:
        print("### Test-set bits/dim of a trained image run: estimators side by side\n")
        print("\n".join(table_dataset_bpd(args, peer)) + "\n")
    if "6" in args.tables and args.bpd_run:
        print("### Fixed-grid solver bias against its steps, term by term\n")
        print("\n".join(table_steps_bias(args)) + "\n")
    if "7" in args.tables and args.digits_run:
        print("### Exact-trace nodes a quadrature rule needs on the trained U-Net\n")
        print("\n".join(table_unet_nodes(args)) + "\n")
    if "8" in args.tables:
        print("### Trace estimators at the nodes, at equal matrix-vector products (D = 64)\n")
        print("\n".join(table_trace_estimators(args)) + "\n")


if __name__ == "__main__":
    main()
