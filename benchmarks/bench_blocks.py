"""Lockstep block solve against separate solves: ``block_lambda_max`` (every module block of the CNN of
benchmarks/problems.py, and the full Hessian, in one lockstep) against B separate ``lambda_max(params=block)`` calls
and one ``lambda_max`` of the full Hessian, in the same process.

Run as a script: ``OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/bench_blocks.py [--rounds 3]``
(prints a table: seconds, products, passes, the ratio). Or with pytest-benchmark:
``PYTHONPATH=. .venv/bin/python -m pytest benchmarks/bench_blocks.py --benchmark-only``.

Both sides solve the same problems with the same tolerance and must certify every eigenvalue; the products are
the same in number (each block's solve takes the same path). On the CPU each column still costs about one
Hessian-vector product, so what the lockstep saves is per round, not per column: one data pass instead of B + 1,
one forward and one gradient graph per chunk (built on the first pass, kept after) instead of B + 1 of each.
"""
from __future__ import annotations

import argparse
import time

import pytest
import torch

import fasthess
from fasthess.blocks import block_lambda_max, module_blocks

from benchmarks import problems as P

TOL = 1e-4


def lockstep(p: P.Problem, full: bool = True) -> dict[str, fasthess.EigResult]:
    return block_lambda_max(p.model, p.loss_fn, p.data, batch_size=p.batch_size, tol=TOL, full=full)


def separate(p: P.Problem, clock: dict[str, float] | None = None) -> dict[str, fasthess.EigResult]:
    """One ``lambda_max(params=block)`` per module block and one of the full Hessian; ``clock`` gets each call's
    seconds."""
    calls = {**module_blocks(p.model), "full": None}
    out = {}
    for name, params in calls.items():
        t = time.perf_counter()
        out[name] = fasthess.lambda_max(p.model, p.loss_fn, p.data, batch_size=p.batch_size, params=params, tol=TOL)
        if clock is not None:
            clock[name] = min(clock.get(name, float("inf")), time.perf_counter() - t)
    return out


def compare(problem: str = "cnn_cifar", rounds: int = 3) -> str:
    """A markdown table of the two sides on one problem, run alternately ``rounds`` times (fastest of each kept, so
    that a load spike on a shared machine hits both sides alike), and the ratios of their times."""
    p = P.make(problem)
    P.full_gradient(p)  # warm-up
    t_grad = t_lock = t_blocks_lock = float("inf")
    clock: dict[str, float] = {}
    for _ in range(rounds):
        t_grad = min(t_grad, _time(lambda: P.full_gradient(p)))
        t = time.perf_counter()
        lock = lockstep(p)
        t_lock = min(t_lock, time.perf_counter() - t)
        t_blocks_lock = min(t_blocks_lock, _time(lambda: lockstep(p, full=False)))
        sep = separate(p, clock)
    blocks = [name for name in lock if name != "full"]
    t_sep, t_blocks = sum(clock.values()), sum(clock[n] for n in blocks)
    lines = [f"problem {problem}, {len(blocks)} blocks + full, tol {TOL:g}, torch threads {torch.get_num_threads()}, "
             f"fastest of {rounds} alternating rounds; one gradient {t_grad:.3f} s", "",
             "| block | λ_max lockstep | λ_max separate | HVPs lock/sep | passes lock/sep | certified lock/sep |"
             " separate call (s) |",
             "|---|---|---|---|---|---|---|"]
    for name in lock:
        a, b = lock[name], sep[name]
        lines.append(f"| {name} | {float(a.eigenvalues[0]):.6g} | {float(b.eigenvalues[0]):.6g} | "
                     f"{a.num_hvps}/{b.num_hvps} | {a.num_passes}/{b.num_passes} | "
                     f"{a.all_converged}/{b.all_converged} | {clock[name]:.2f} |")
    lines += ["", f"lockstep (B blocks + full): {t_lock:.2f} s ({t_lock / t_grad:.1f} gradients), "
              f"{max(r.num_passes for r in lock.values())} data passes, {sum(r.num_hvps for r in lock.values())} HVPs",
              f"separate, B blocks + full: {t_sep:.2f} s ({t_sep / t_grad:.1f} gradients), "
              f"{sum(r.num_passes for r in sep.values())} data passes, {sum(r.num_hvps for r in sep.values())} HVPs",
              f"ratio lockstep / (B + 1 separate) = {t_lock / t_sep:.2f}",
              f"blocks only: lockstep (full=False) {t_blocks_lock:.2f} s, B separate {t_blocks:.2f} s, "
              f"ratio {t_blocks_lock / t_blocks:.2f}"]
    return "\n".join(lines)


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@pytest.mark.parametrize("solve, passes", [(lockstep, max), (separate, sum)], ids=["lockstep", "separate"])
def test_blocks(benchmark, solve, passes):
    """Rounds of one side; ``passes`` counts its data passes (shared by the lockstep's solves, not by separate ones)."""
    p = P.make("cnn_cifar")
    out = benchmark.pedantic(solve, args=(p,), rounds=3, iterations=1)
    assert all(r.all_converged for r in out.values())
    benchmark.extra_info.update(hvps=sum(r.num_hvps for r in out.values()),
                                passes=passes(r.num_passes for r in out.values()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", default="cnn_cifar")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(compare(args.problem, args.rounds))
