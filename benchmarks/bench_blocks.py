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
The script also times those graph builds alone, which is the saving to expect.

glibc's malloc hands freed heap memory back to the system and faults it in again, and how often depends on the
order of earlier allocations: on the CNN a lockstep call (blocks only) took 1.2-1.4 million minor page faults, the
separate calls 0.3-1.6 million, seconds of CPU either way. To compare the work itself, run with an allocator that
keeps freed memory:
``MALLOC_TRIM_THRESHOLD_=4000000000 MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TOP_PAD_=536870912`` (the header
names the ``MALLOC_`` settings a table was measured with).
"""
from __future__ import annotations

import argparse
import os
import time

import pytest
import torch

import fasthess
from fasthess.blocks import block_lambda_max, module_blocks

from benchmarks import problems as P

TOL = 1e-4


def lockstep(p: P.Problem, full: bool = True) -> dict[str, fasthess.EigResult]:
    return block_lambda_max(p.model, p.loss_fn, p.data, batch_size=p.batch_size, tol=TOL, full=full)


def separate(p: P.Problem, clock: dict[str, tuple[float, float]] | None = None) -> dict[str, fasthess.EigResult]:
    """One ``lambda_max(params=block)`` per module block and one of the full Hessian; ``clock`` gets each call's
    times (:func:`timed`)."""
    calls = {**module_blocks(p.model), "full": None}
    return {name: timed(clock, name, lambda: fasthess.lambda_max(p.model, p.loss_fn, p.data, batch_size=p.batch_size,
                                                                 params=params, tol=TOL))
            for name, params in calls.items()}


def timed(clock: dict[str, tuple[float, float]] | None, label: str, fn):
    """``fn()``, keeping in ``clock[label]`` the least wall and the least CPU seconds (:func:`keep_least`)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if clock is not None:
        keep_least(clock, label, (time.perf_counter() - wall, time.process_time() - cpu))
    return out


def keep_least(clock: dict[str, tuple[float, float]], label: str, times: tuple[float, float]) -> None:
    """``clock[label]`` becomes the least (wall, CPU) seconds seen (process time: with one torch thread it is the
    work done, which other processes on a shared machine inflate far less than the wall time)."""
    old = clock.get(label, (float("inf"), float("inf")))
    clock[label] = (min(old[0], times[0]), min(old[1], times[1]))


def graph_builds(p: P.Problem, params: list[torch.Tensor]) -> None:
    """What one solve builds once per chunk and keeps: the forward and the ``create_graph`` backward of the chunk's
    loss to ``params`` (the lockstep builds one over all parameters, separate solves one per block)."""
    for X, y in p.batches():
        torch.autograd.grad(p.loss_fn(p.model(X), y), params, create_graph=True)


def compare(problem: str = "cnn_cifar", rounds: int = 3) -> str:
    """A markdown table of the two sides on one problem, run alternately ``rounds`` times (the least time of each
    kept, so that a load spike on a shared machine hits both sides alike), and the ratios of their times."""
    p = P.make(problem)
    P.full_gradient(p)  # warm-up
    clock: dict[str, tuple[float, float]] = {}
    lock, sep = {}, {}
    blocks = module_blocks(p.model)
    for _ in range(rounds):
        timed(clock, "gradient", lambda: P.full_gradient(p))
        for name, params in [*blocks.items(), ("full", list(p.model.parameters()))]:
            timed(clock, f"graph {name}", lambda: graph_builds(p, params))
        lock = timed(clock, "lockstep", lambda: lockstep(p))
        timed(clock, "lockstep, blocks only", lambda: lockstep(p, full=False))
        calls: dict[str, tuple[float, float]] = {}
        sep = separate(p, calls)
        for name, times in calls.items():
            keep_least(clock, name, times)
        # a side's time is its least total over the rounds, as for the lockstep: summing each call's least time
        # would favour the separate side on a loaded machine
        for what, names in (("", calls), (", blocks only", blocks)):
            keep_least(clock, f"separate{what}", tuple(sum(calls[n][i] for n in names) for i in (0, 1)))
    grad_wall, grad_cpu = clock["gradient"]
    allocator = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")) or "default"
    lines = [f"problem {problem}, {len(blocks)} blocks + full, tol {TOL:g}, torch threads {torch.get_num_threads()}, "
             f"least of {rounds} alternating rounds; one gradient {grad_wall:.3f} s wall, {grad_cpu:.3f} s CPU; "
             f"glibc malloc settings: {allocator}", "",
             "| block | λ_max lockstep | λ_max separate | HVPs lock/sep | passes lock/sep | certified lock/sep |"
             " separate call wall / CPU (s) |",
             "|---|---|---|---|---|---|---|"]
    for name in lock:
        a, b = lock[name], sep[name]
        lines.append(f"| {name} | {float(a.eigenvalues[0]):.6g} | {float(b.eigenvalues[0]):.6g} | "
                     f"{a.num_hvps}/{b.num_hvps} | {a.num_passes}/{b.num_passes} | "
                     f"{a.all_converged}/{b.all_converged} | {clock[name][0]:.2f} / {clock[name][1]:.2f} |")
    lines += ["", "| side | wall s | CPU s | CPU in gradients | data passes | HVPs |", "|---|---|---|---|---|---|",
              f"| lockstep, B blocks + full | {_row(clock['lockstep'], grad_cpu)} | "
              f"{max(r.num_passes for r in lock.values())} | {sum(r.num_hvps for r in lock.values())} |",
              f"| separate, B blocks + full | {_row(clock['separate'], grad_cpu)} | "
              f"{sum(r.num_passes for r in sep.values())} | {sum(r.num_hvps for r in sep.values())} |",
              f"| lockstep, blocks only (full=False) | {_row(clock['lockstep, blocks only'], grad_cpu)} | "
              f"{max(r.num_passes for n, r in lock.items() if n != 'full')} | "
              f"{sum(r.num_hvps for n, r in lock.items() if n != 'full')} |",
              f"| separate, blocks only | {_row(clock['separate, blocks only'], grad_cpu)} | "
              f"{sum(sep[n].num_passes for n in blocks)} | {sum(sep[n].num_hvps for n in blocks)} |", ""]
    builds = {name: clock[f"graph {name}"][1] for name in [*blocks, "full"]}
    block_builds = sum(builds[n] for n in blocks)
    lines.append("graph builds over all chunks (forward + create_graph backward, CPU s): "
                 + ", ".join(f"{n} {t:.2f}" for n, t in builds.items())
                 + f"; the lockstep builds the full one once instead of one per solve, which saves "
                 f"{block_builds:.2f} s with the full Hessian and {block_builds - builds['full']:.2f} s without")
    for what in ("", ", blocks only"):
        a, b = clock[f"lockstep{what}"], clock[f"separate{what}"]
        lines.append(f"ratio lockstep / separate{what or ' (B blocks + full)'}: wall {a[0] / b[0]:.2f}, "
                     f"CPU {a[1] / b[1]:.2f} (saved {b[1] - a[1]:.2f} s CPU)")
    return "\n".join(lines)


def _row(times: tuple[float, float], grad_cpu: float) -> str:
    return f"{times[0]:.2f} | {times[1]:.2f} | {times[1] / grad_cpu:.1f}"


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
