"""What the contract's first-pass model checks cost a full solve, per benchmark problem.

Run::

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. .venv/bin/python benchmarks/contract_cost.py --reps 3

The model checks are the split checks (:meth:`fasthess._contract.ContractChecks._check_model_splits`: on the first
chunk at θ and at a perturbed θ, on each later chunk at θ, with the later chunk's own forward,
:meth:`~fasthess._contract.ContractChecks._later_output`) and the stateful-forward check
(:func:`fasthess._buffers.refuse_stateful_forward`). Each is timed
inside one :func:`fasthess.lambda_max` with process time, and reported as a share of the rest of the solve: both
parts run in the same process at the same moment, so a loaded machine slows them alike and the share stays put
(a side-by-side timing of solves with the checks on and off differs by less than its run-to-run noise).
The figures live in ``docs/guides/loss_contract.md`` (Costs).
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import fasthess
from benchmarks.problems import make
from fasthess import _contract


def _timed(f: Callable, spent: list[float]) -> Callable:
    """``f`` with its process time added to ``spent[0]``."""
    def timed(*args, **kwargs):
        start = time.process_time()
        try:
            return f(*args, **kwargs)
        finally:
            spent[0] += time.process_time() - start
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--problem", action="append", help="default: mlp_digits and cnn_cifar")
    args = parser.parse_args()
    spent = [0.0]
    for name in ("_check_model_splits", "_later_output"):
        setattr(_contract.ContractChecks, name, _timed(getattr(_contract.ContractChecks, name), spent))
    _contract.refuse_stateful_forward = _timed(_contract.refuse_stateful_forward, spent)
    for name in args.problem or ["mlp_digits", "cnn_cifar"]:
        p = make(name)
        shares, checks, totals = [], [], []
        for _ in range(args.reps):
            spent[0] = 0.0
            start = time.process_time()
            fasthess.lambda_max(p.model, p.loss_fn, p.data, batch_size=p.batch_size)
            total = time.process_time() - start
            shares.append(spent[0] / (total - spent[0]))
            checks.append(spent[0])
            totals.append(total)
        print(f"{name}: model checks {statistics.median(checks) * 1e3:.1f} ms = "
              f"{100 * statistics.median(shares):.2f} % of the rest of the solve (range "
              f"{100 * min(shares):.2f}–{100 * max(shares):.2f} %, {args.reps} runs); solve "
              f"{statistics.median(totals):.2f} s", flush=True)


if __name__ == "__main__":
    main()
