"""Core benchmarks (pytest-benchmark): one full-data HVP pass (b = 1, 4, 8; and b = 1 by each HVP method, with
and without kept graphs), cold λ_max, warm λ_max, a tracker update (whose products are guarded against a cold solve's).

Run: ``PYTHONPATH=. .venv/bin/python -m pytest benchmarks/bench_core.py --benchmark-only``
(``FASTHESS_BENCH_PROBLEMS=mlp_digits,cnn_cifar`` picks the problems of benchmarks/problems.py, default both;
``FASTHESS_BENCH_THREADS=1`` pins torch's threads, advisable on a shared machine).

Every round is preceded, outside the timed region, by one full-data gradient pass that is timed too. Each
benchmark stores in ``extra_info``: ``grad_eq`` = min round time / min gradient time of the same benchmark (the
cost in gradient-equivalents, which a busy machine inflates far less than the seconds), and the HVPs and
passes of one round. At the end a table of these ratios is printed and, when ``FASTHESS_BENCH_TABLE`` names a
file, written there as markdown. See benchmarks/README.md for catching regressions on a noisy machine.
"""
from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterator

import pytest
import torch

import fasthess

from benchmarks import problems as P

PROBLEMS = [s for s in os.environ.get("FASTHESS_BENCH_PROBLEMS", "mlp_digits,cnn_cifar").split(",") if s]
DEVICE = os.environ.get("FASTHESS_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
TOL = float(os.environ.get("FASTHESS_BENCH_TOL", "1e-4"))
ROUNDS = int(os.environ.get("FASTHESS_BENCH_ROUNDS", "3"))
if os.environ.get("FASTHESS_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FASTHESS_BENCH_THREADS"]))
_rows: dict[tuple[str, str], dict] = {}


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


class _GradClock:
    def __init__(self, p: P.Problem) -> None:
        self.p, self.times = p, []

    def tick(self) -> None:
        _sync()
        t = time.perf_counter()
        P.full_gradient(self.p)
        _sync()
        self.times.append(time.perf_counter() - t)


@pytest.fixture(scope="module", params=PROBLEMS)
def problem(request) -> P.Problem:
    p = P.make(request.param, device=DEVICE)
    P.full_gradient(p)  # warm-up
    return p


def _record(benchmark, p: P.Problem, name: str, clock: _GradClock, **info) -> None:
    g = min(clock.times)
    best = benchmark.stats.stats.min
    benchmark.extra_info.update(grad_s=g, grad_eq=best / g, **info)
    _rows[(p.name, name)] = dict(s=best, grad_s=g, grad_eq=best / g, **info)


def _run(benchmark, p: P.Problem, fn, setup=None, rounds: int = ROUNDS):
    clock = _GradClock(p)

    def _setup():
        clock.tick()
        out = setup() if setup else None
        _sync()
        return ((out,) if setup else ()), {}

    def target(*args):
        r = fn(*args)
        _sync()
        return r

    benchmark.group = f"{p.name}"
    result = benchmark.pedantic(target, setup=_setup, rounds=rounds, iterations=1, warmup_rounds=0)
    return result, clock


def test_gradient_pass(benchmark, problem):
    """The unit: one full-data gradient (forward + backward over all chunks)."""
    result, clock = _run(benchmark, problem, lambda: P.full_gradient(problem))
    _record(benchmark, problem, "gradient pass", clock, hvps=0, passes=1)


@pytest.mark.parametrize("b", [1, 4, 8])
def test_hvp_pass(benchmark, problem, b):
    """One data pass of b HVPs with the default method: double backward on kept graphs on the CPU, vmapped
    forward-over-reverse tangents on a GPU (fasthess.hessian.default_hvp_method)."""
    op = fasthess.HessianOperator(problem.model, problem.loss_fn, problem.data, batch_size=problem.batch_size)
    V = torch.randn(op.num_params, b, dtype=torch.float64, device=op.device)
    rounds = ROUNDS if b == 1 or problem.name == "mlp_digits" else max(1, ROUNDS - 1)
    with op.fixed_weights():  # as inside a solve: the first product builds the kept graphs
        op.matmat(V[:, :1])  # warm-up (first-call overheads of torch.func; builds the kept graphs)
        _, clock = _run(benchmark, problem, lambda: op.matmat(V), rounds=rounds)
    _record(benchmark, problem, f"HVP pass b={b}", clock, hvps=b, passes=1)


METHODS = {"double-backward, kept graphs": dict(hvp="double-backward"),
           "double-backward, graphs rebuilt": dict(hvp="double-backward", graph_memory=0),
           "forward-over-reverse": dict(hvp="forward-over-reverse")}


@pytest.mark.parametrize("method", list(METHODS))
def test_hvp_pass_method(benchmark, problem, method):
    """One data pass of one HVP by each method (kept graphs vs rebuilding them every pass; forward mode)."""
    op = fasthess.HessianOperator(problem.model, problem.loss_fn, problem.data, batch_size=problem.batch_size,
                                  **METHODS[method])
    v = torch.randn(op.num_params, 1, dtype=torch.float64, device=op.device)
    with op.fixed_weights():  # as inside a solve
        op.matmat(v)  # warm-up (and the first pass that builds kept graphs)
        _, clock = _run(benchmark, problem, lambda: op.matmat(v))
    _record(benchmark, problem, f"HVP pass b=1, {method}", clock, hvps=1, passes=1)


def test_lambda_max_cold(benchmark, problem):
    """λ_max to TOL from a random start with the default settings (fasthess.eigs)."""
    op = fasthess.HessianOperator(problem.model, problem.loss_fn, problem.data, batch_size=problem.batch_size)
    res, clock = _run(benchmark, problem, lambda: fasthess.eigs(op, k=1, tol=TOL, seed=0))
    assert res.all_converged
    _record(benchmark, problem, "λ_max cold (eigs)", clock, hvps=res.num_hvps, passes=res.num_passes)


def test_lambda_max_cold_subsampled(benchmark, problem):
    """λ_max to TOL: Lanczos on 1/8 of the data, then certified on the full data (fasthess.from_subset)."""
    from fasthess.from_subset import eigs_subsampled

    op = fasthess.HessianOperator(problem.model, problem.loss_fn, problem.data, batch_size=problem.batch_size)
    res, clock = _run(benchmark, problem, lambda: eigs_subsampled(op, k=1, tol=TOL, seed=0))
    assert res.result.all_converged
    _record(benchmark, problem, "λ_max cold (subsampled start)", clock, hvps=round(res.hvp_equivalents, 2),
            passes=round(res.full_pass_equivalents, 2))


def test_lambda_max_warm(benchmark, problem):
    """λ_max to TOL after 10 SGD steps, started from the previous eigenvector (the tracking update)."""
    p = copy.deepcopy(problem)
    op0 = fasthess.HessianOperator(p.model, p.loss_fn, p.data, batch_size=p.batch_size)
    state = {"v": fasthess.eigs(op0, k=1, tol=TOL, seed=0).eigenvectors, "hvps": [], "passes": []}

    def setup():
        P.sgd_steps(p, 10)
        return fasthess.HessianOperator(p.model, p.loss_fn, p.data, batch_size=p.batch_size)

    def solve(op):
        r = fasthess.eigs(op, k=1, tol=TOL, v0=state["v"], seed=0)
        state["v"] = r.eigenvectors
        state["hvps"].append(r.num_hvps)
        state["passes"].append(r.num_passes)
        return r

    res, clock = _run(benchmark, p, solve, setup=setup)
    assert res.all_converged
    _record(benchmark, p, "λ_max warm (10 SGD steps)", clock, hvps=state["hvps"], passes=state["passes"])


WARM_GUARD = 0.8  # a tracker update may cost at most this share of a cold solve's products (measured 0.5-0.7)


def test_tracker_update(benchmark, problem):
    """A SharpnessTracker update with explore="subsample" after 10 SGD steps; guards its products: the median
    hvp_equivalents (full-data HVPs + 1/8 of the subset's) must stay ≤ WARM_GUARD × a cold solve's HVPs."""
    p = copy.deepcopy(problem)
    tracker = fasthess.SharpnessTracker(p.loss_fn, p.data, batch_size=p.batch_size, tol=TOL, mode="eval",
                                        explore="subsample", warm_start=True)
    tracker.update(p.model, step=0)
    cold = []

    def setup():
        P.sgd_steps(p, 10)
        op = fasthess.HessianOperator(p.model, p.loss_fn, p.data, batch_size=p.batch_size)
        cold.append(fasthess.eigs(op, k=1, tol=TOL, seed=len(cold)).num_hvps)
        return ()

    rec, clock = _run(benchmark, p, lambda _: tracker.update(p.model, step=p.step), setup=setup)
    warm = sorted(r["hvp_equivalents"] for r in tracker.history[1:])
    assert rec.converged
    assert warm[len(warm) // 2] <= WARM_GUARD * sorted(cold)[len(cold) // 2], (warm, cold)
    _record(benchmark, p, "tracker update (10 SGD steps)", clock, hvps=[round(w, 2) for w in warm],
            passes=[r["num_passes"] for r in tracker.history[1:]])


@pytest.fixture(scope="session", autouse=True)
def ratio_table() -> Iterator[None]:
    """Prints (and optionally writes) the gradient-equivalents of every benchmark once the session ends."""
    yield
    if not _rows:
        return
    lines = ["| problem | benchmark | min s | grad s (same benchmark) | grad-eq | HVPs | passes |",
             "|---|---|---:|---:|---:|---|---|"]
    for (prob, name), r in _rows.items():
        lines.append(f"| {prob} | {name} | {r['s']:.3f} | {r['grad_s']:.3f} | {r['grad_eq']:.1f} | {r['hvps']} | "
                     f"{r['passes']} |")
    text = "\n".join(lines)
    print("\n" + text)
    out = os.environ.get("FASTHESS_BENCH_TABLE")
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
