"""What tracking λ_max costs a training run, per problem: warm updates against cold solves, the loop's share, peers.

Run::

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/tracking_overhead.py            # every problem
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/tracking_overhead.py --problem mlp_digits --updates 4
    PYTHONPATH=. python benchmarks/tracking_overhead.py --device cuda --problem cnn_cifar      # benchmarks/gpu_check.sh

Per problem (benchmarks/problems.py: the finding-cpu MLP on MNIST-1D, the small CNN, the digits MLP), in one process:

1. **Warm against cold.** SGD with momentum 0.9 (lr = the problem's / 4) for ``--updates`` × ``--every`` steps; at
   every ``--every``-th step a :class:`fasthess.SharpnessTracker` with ``warm_start=True, explore="subsample"`` and one
   with ``explore="full"`` update on the same weights, next to a cold :func:`fasthess.eigs` (the cost unit) and a
   tight reference (tol 1e-6, near a float32 model's rounding floor) that checks every converged record (a record is false when |λ − θ| > max(bound, tol·λ)).
   Products: full-data HVPs + 1/8 of the subset's (``hvp_equivalents``).
2. **Threshold decisions.** :func:`fasthess.threshold.compare_lambda_max` at c = 0.95 λ and 1.05 λ: from a random
   start against the cold solve, and from the previous update's vectors against the ``explore="full"`` update.
3. **Peers on the same job.** The paper-style scipy ``eigsh(k=1, which="LA")`` on ``op.to_scipy()`` (its matvecs), and
   PyHessian's power iteration (its seconds: it counts no products) when it is installed (benchmarks/.peers),
   skipped otherwise.
4. **The loop's share.** ``--seconds`` of plain SGD with ``maybe_update`` at every step: with ``budget=0.1``, and at
   the runner's cadence (``--cadence`` steps, default one epoch: the finding-cpu preset computes every 10 epochs at
   tol 1e-3, this runs every epoch, the harder case). Reported: tracker seconds / loop seconds.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

import fasthess  # noqa: E402
from benchmarks import problems as P  # noqa: E402
from fasthess.threshold import compare_lambda_max  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _op(p: P.Problem):
    return fasthess.HessianOperator(p.model, p.loss_fn, p.data, batch_size=p.batch_size)


def _false(rec: dict, truth: float, tol: float) -> bool:
    return rec.converged and abs(rec.lambda_max - truth) > max(rec.error_bound, tol * abs(truth)) * (1 + 1e-9)


def _eigsh_matvecs(op, tol: float) -> int:
    from scipy.sparse.linalg import eigsh

    start = op.num_hvps
    eigsh(op.to_scipy(), k=1, which="LA", tol=tol)
    return op.num_hvps - start


def _pyhessian_seconds(p: P.Problem, tol: float) -> float | None:
    """Seconds of PyHessian's power iteration for the top eigenvalue at ``tol`` (it counts no products), or None
    when PyHessian is not installed."""
    try:
        from pyhessian import hessian
    except ImportError:
        return None
    t = time.perf_counter()
    h = hessian(p.model, p.loss_fn, dataloader=p.batches(), cuda=p.X.device.type == "cuda")
    h.eigenvalues(maxIter=100, tol=tol, top_n=1)
    _sync(p.X.device)
    return time.perf_counter() - t


def warm_vs_cold(p: P.Problem, updates: int, every: int, tol: float) -> dict:
    """Section 1-3 of the module docstring on one problem; returns lists per update."""
    opt = torch.optim.SGD(p.model.parameters(), lr=p.lr / 4, momentum=0.9)
    trackers = {mode: fasthess.SharpnessTracker(p.loss_fn, p.data, batch_size=p.batch_size, tol=tol, mode="eval",
                                                explore=mode, warm_start=True) for mode in ("subsample", "full")}
    out: dict[str, list] = {"cold": [], "subsample": [], "full": [], "false": [], "eigsh": [], "pyhessian": [],
                            "decide": [], "decide_warm": [], "seconds": {"cold": [], "subsample": [], "full": []}}
    for u in range(updates + 1):
        P.sgd_steps(p, every, seed=1000 + u, opt=opt)
        op = _op(p)
        t = time.perf_counter()
        cold = fasthess.eigs(op, tol=tol, seed=100 + u)
        out["seconds"]["cold"].append(time.perf_counter() - t)
        truth = float(fasthess.eigs(_op(p), tol=1e-6, seed=7).eigenvalues[0])  # float32: ~the rounding floor
        prev = trackers["full"].ritz_vectors
        for mode, tr in trackers.items():
            rec = tr.update(p.model, step=p.step, optimizer=opt)
            out["false"].append(_false(rec, truth, tol))
            if u:  # update 0 is cold for both trackers
                out[mode].append(rec.hvp_equivalents)
                out["seconds"][mode].append(rec.seconds)
        if u:
            out["cold"].append(cold.num_hvps)
            lam = float(cold.eigenvalues[0])
            for c in (0.95 * lam, 1.05 * lam):
                d = compare_lambda_max(_op(p), c, tol=tol, seed=200 + u)
                out["decide"].append((d.result.num_hvps, d.above == (truth > c)))
                d = compare_lambda_max(_op(p), c, tol=tol, seed=200 + u, v0=prev)
                out["decide_warm"].append((d.result.num_hvps, d.above == (truth > c)))
            if u == 1:
                out["eigsh"].append(_eigsh_matvecs(_op(p), tol))
                pyh = _pyhessian_seconds(p, tol)
                if pyh is not None:
                    out["pyhessian"].append(pyh)
    return out


def loop_share(p: P.Problem, seconds: float, tol: float, budget: float | None, cadence: int) -> tuple[float, int]:
    """(tracker seconds / loop seconds, records) of ``seconds`` of SGD with ``maybe_update`` at every step."""
    tr = fasthess.SharpnessTracker(p.loss_fn, p.data, batch_size=p.batch_size, tol=tol, mode="eval",
                                   budget=budget, every=1 if budget else cadence)
    opt = torch.optim.SGD(p.model.parameters(), lr=p.lr)
    t0, step = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        P.sgd_steps(p, 1, seed=step, opt=opt)
        tr.maybe_update(p.model, step, optimizer=opt)
        step += 1
    _sync(p.X.device)
    return tr._spent / (time.perf_counter() - t0), len(tr.history)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problem", action="append", choices=P.TRACKING_PROBLEMS + P.PROBLEMS + P.GPU_PROBLEMS)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--updates", type=int, default=8)
    ap.add_argument("--every", type=int, default=20, help="SGD steps between tracker updates")
    ap.add_argument("--tol", type=float, default=1e-4, help="the tracker's default")
    ap.add_argument("--seconds", type=float, default=120.0, help="length of each loop-share run (0: skip)")
    ap.add_argument("--loop-tol", type=float, default=1e-3, help="tol of the loop-share runs (the runner's)")
    a = ap.parse_args(argv)
    for name in a.problem or P.TRACKING_PROBLEMS:
        base = P.make(name, device=a.device)
        r = warm_vs_cold(copy.deepcopy(base), a.updates, a.every, a.tol)
        cold, sub, full = (statistics.median(r[m]) for m in ("cold", "subsample", "full"))
        dec = [h for h, _ in r["decide"]]
        print(f"## {name} on {a.device} ({base.num_params} parameters, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads), tol {a.tol:g}, updates every {a.every} SGD-momentum steps")
        print(f"- cold eigs HVPs: median {cold:g} {r['cold']}")
        print(f"- warm, explore='subsample': median {sub:g} ({sub / cold:.2f} of cold) {[round(x, 2) for x in r['subsample']]}")
        print(f"- warm, explore='full': median {full:g} ({full / cold:.2f} of cold) {r['full']}")
        print(f"- seconds, median: cold {statistics.median(r['seconds']['cold']):.2f}, subsample "
              f"{statistics.median(r['seconds']['subsample']):.2f}, full {statistics.median(r['seconds']['full']):.2f}")
        print(f"- false records: {sum(r['false'])} of {len(r['false'])}")
        print(f"- threshold decisions at 0.95λ and 1.05λ: median {statistics.median(dec):g} HVPs "
              f"({statistics.median(dec) / cold:.2f} of cold), correct {sum(ok for _, ok in r['decide'])} of "
              f"{len(r['decide'])}")
        dw = [h for h, _ in r["decide_warm"]]
        print(f"- the same decisions warm (v0 = the previous update's vectors + a random column): median "
              f"{statistics.median(dw):g} HVPs ({statistics.median(dw) / full:.2f} of a warm explore='full' update), "
              f"correct {sum(ok for _, ok in r['decide_warm'])} of {len(r['decide_warm'])}")
        pyh = f"{r['pyhessian'][0]:.2f} s" if r["pyhessian"] else "not installed"
        print(f"- scipy eigsh(k=1) on to_scipy(): {r['eigsh'][0]} matvecs; PyHessian power iteration: {pyh} "
              f"(cold eigs {r['seconds']['cold'][1]:.2f} s on the same weights)")
        if a.seconds > 0:
            steps_per_epoch = max(1, base.X.shape[0] // base.train_batch)
            share, n = loop_share(copy.deepcopy(base), a.seconds, a.loop_tol, 0.1, steps_per_epoch)
            print(f"- {a.seconds:g} s SGD loop, budget=0.1, tol {a.loop_tol:g}: tracker share {100 * share:.1f} % "
                  f"({n} records)")
            share, n = loop_share(copy.deepcopy(base), a.seconds, a.loop_tol, None, steps_per_epoch)
            print(f"- {a.seconds:g} s SGD loop, every epoch ({steps_per_epoch} steps), tol {a.loop_tol:g}: tracker "
                  f"share {100 * share:.1f} % ({n} records)")
        print(flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
