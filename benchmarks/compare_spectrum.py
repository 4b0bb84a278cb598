"""Trace and spectral density: fasthess against PyHessian on one small float64 model, with an exact reference.

PyHessian is a peer, not a dependency: ``bash benchmarks/install_peers.sh`` puts it in benchmarks/.peers
(``--peers DIR`` points elsewhere), then

    PYTHONPATH=. .venv/bin/python -W ignore benchmarks/compare_spectrum.py

PyHessian 0.1's ``density()`` calls ``torch.eig``, which PyTorch removed in 2.0; the script installs a
labelled stand-in (``torch.linalg.eigh``, returning torch.eig's (n, 2) value layout) only so that the
comparison can run, and says so in its output.

Reference: the dense Hessian from n unit-vector products (fasthess.trace with num_matvecs ≥ n is the
exact trace; eigvalsh of the dense matrix gives the spectrum). Reported per estimate: the error against
the reference (mean over ``--repeats`` seeds), the Hessian-vector products (HVPs), the data passes and
the wall time (noisy on a shared machine). The comparison runs at initialization and after training, where
the spectrum has a few outliers (the regime Hutch++ is built for).

PyHessian's ``trace(tol=...)`` stops when |mean − previous mean| / (previous mean + 1e-6) < tol, without an
absolute value in the denominator, so a negative running mean stops it after two probes. The fixed-budget
rows pass ``tol=-inf`` to spend the whole budget; the default-settings row shows what users get.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from fasthess import HessianOperator
from fasthess.linop import MatrixOperator
from fasthess.density import spectral_density
from fasthess.trace import trace


def problem(n_examples: int = 512, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 4)).double()
    X = torch.randn(n_examples, 10, dtype=torch.float64)
    y = (X[:, :4] @ torch.randn(4, 4, dtype=torch.float64)).argmax(dim=1)
    return model, nn.CrossEntropyLoss(), X, y


def reference(op: HessianOperator) -> torch.Tensor:
    """The dense Hessian from n unit-vector products."""
    H = torch.cat([op.matmat(torch.eye(op.num_params, dtype=torch.float64)[:, s:s + 128])
                   for s in range(0, op.num_params, 128)], dim=1)
    return (H + H.T) / 2


def many_seeds(H: torch.Tensor, budgets: list[int], seeds: int) -> None:
    """RMS relative error of both estimators over many seeds, on the dense H as a MatrixOperator (cheap).

    PyHessian's trace() is the same Rademacher Hutchinson estimator, so its row is fasthess's Hutchinson row.
    """
    exact = float(H.trace())
    print(f"\nRMS relative error over {seeds} seeds (dense H as a MatrixOperator; Hutchinson = PyHessian's estimator):\n")
    print("| products | hutch++ | hutchinson (= PyHessian trace) |")
    print("| --- | --- | --- |")
    for m in budgets:
        rms = [math.sqrt(statistics.mean(
            ((trace(MatrixOperator(H), num_matvecs=m, method=method, seed=s).estimate - exact) / exact) ** 2
            for s in range(seeds))) for method in ("hutch++", "hutchinson")]
        print(f"| {m} | {rms[0]:.2e} | {rms[1]:.2e} |")


def smoothed(nodes: torch.Tensor, weights: torch.Tensor, grid: torch.Tensor, sigma: float) -> torch.Tensor:
    z = (grid[:, None] - nodes.reshape(-1)[None]) / sigma
    return (torch.exp(-0.5 * z * z) * weights.reshape(-1)[None]).sum(1) / (sigma * math.sqrt(2 * math.pi))


def density_error(nodes, weights, eigvals, sigma) -> float:
    """L1 distance between the σ-smoothed estimate and the σ-smoothed true density (1/n) Σ δ(λᵢ)."""
    lo, hi = float(eigvals[0]) - 6 * sigma, float(eigvals[-1]) + 6 * sigma
    grid = torch.linspace(lo, hi, 4001, dtype=torch.float64)
    exact = smoothed(eigvals, torch.full_like(eigvals, 1 / eigvals.numel()), grid, sigma)
    est = smoothed(nodes, weights / nodes.shape[0], grid, sigma)
    return float(torch.trapezoid((est - exact).abs(), grid))


def _torch_eig_works() -> bool:
    try:
        torch.eig(torch.eye(1))
    except (AttributeError, RuntimeError):
        return False
    return True


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def row(name, errs, hvps, passes, secs) -> str:
    return (f"| {name} | {statistics.mean(errs):.2e} | {max(errs):.2e} | {statistics.mean(hvps):.0f} | "
            f"{statistics.mean(passes):.0f} | {statistics.mean(secs):.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", default=str(Path(__file__).parent / ".peers"), help="folder holding pyhessian")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budgets", type=int, nargs="+", default=[30, 99])
    ap.add_argument("--train-steps", type=int, nargs="+", default=[0, 300],
                    help="compare at these cumulative numbers of Adam steps (0 = initialization)")
    ap.add_argument("--seeds", type=int, default=200, help="seeds of the dense-matrix error study")
    ap.add_argument("--probes", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(2)
    sys.path.insert(0, args.peers)
    try:
        from pyhessian import hessian as pyhessian
    except ImportError as exc:
        pyhessian = None
        print(f"PyHessian not importable from {args.peers} ({exc}); fasthess rows only")
    if pyhessian is not None and not _torch_eig_works():
        def eig_standin(A, eigenvectors=False):
            w, V = torch.linalg.eigh(A)
            return torch.stack([w, torch.zeros_like(w)], dim=1), V
        torch.eig = eig_standin
        print("note: torch.eig is gone from PyTorch >= 2.0; PyHessian.density() runs on a torch.linalg.eigh stand-in")

    model, loss_fn, X, y = problem()
    print(f"model: MLP 10-24-24-4 (tanh), float64, N = {X.shape[0]} examples in one chunk, cross-entropy")
    done = 0
    for steps in sorted(args.train_steps):
        train(model, loss_fn, X, y, steps - done)
        done = steps
        compare(model, loss_fn, X, y, pyhessian, args, f"after {steps} Adam steps" if steps else "at initialization")


def train(model: nn.Module, loss_fn, X: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    """Full-batch Adam (lr 3e-3) from the current weights; a trained net has a few outlying eigenvalues."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)


def pyhessian_trace_row(name, pyhessian, model, loss_fn, X, y, exact_trace, repeats, **trace_kwargs) -> str:
    """One table row for PyHessian's trace(**trace_kwargs), seeded 0…repeats−1 (each probe is one HVP and one pass)."""
    errs, hvps, secs = [], [], []
    for seed in range(repeats):
        torch.manual_seed(seed)
        ph = pyhessian(model, loss_fn, data=(X, y), cuda=False)
        vals, s = timed(lambda: ph.trace(**trace_kwargs))
        errs.append(abs(statistics.mean(vals) - exact_trace) / abs(exact_trace))
        hvps.append(len(vals)), secs.append(s)
    return row(name, errs, hvps, hvps, secs)


def compare(model, loss_fn, X, y, pyhessian, args, state: str) -> None:
    op = HessianOperator(model, loss_fn, (X, y), batch_size=X.shape[0])
    H = reference(op)
    exact_trace, eigvals = float(H.trace()), torch.linalg.eigvalsh(H)
    n = op.num_params
    print(f"\n# {state}: n = {n}, loss = {float(loss_fn(model(X), y)):.4f}, exact trace = {exact_trace:.6f}, "
          f"λ_min = {float(eigvals[0]):.6f}, λ_max = {float(eigvals[-1]):.6f}\n")

    print("## Trace: relative error |t̂ − tr H| / |tr H|\n")
    print("| estimator | mean rel. error | max rel. error | HVPs | data passes | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    for m in args.budgets:
        for method in ("hutch++", "hutchinson"):
            errs, hvps, passes, secs = [], [], [], []
            for seed in range(args.repeats):
                res, s = timed(lambda: trace(op, num_matvecs=m, method=method, seed=seed))
                errs.append(abs(res.estimate - exact_trace) / abs(exact_trace))
                hvps.append(res.num_hvps), passes.append(res.num_passes), secs.append(s)
            print(row(f"fasthess {method}, {m} products", errs, hvps, passes, secs))
        if pyhessian is not None:
            print(pyhessian_trace_row(f"PyHessian trace(maxIter={m}, tol=-inf)", pyhessian, model, loss_fn, X, y,
                                      exact_trace, args.repeats, maxIter=m, tol=-math.inf))
    if pyhessian is not None:
        print(pyhessian_trace_row("PyHessian trace() defaults (maxIter=100, tol=1e-3)", pyhessian, model, loss_fn,
                                  X, y, exact_trace, args.repeats))
    res, s = timed(lambda: trace(op, num_matvecs=n))
    print(row(f"fasthess exact ({n} products)", [abs(res.estimate - exact_trace) / abs(exact_trace)],
              [res.num_hvps], [res.num_passes], [s]))
    many_seeds(H, sorted({*args.budgets, 300}), args.seeds)

    p, m = args.probes, args.steps
    sigma = 0.01 * float(eigvals[-1] - eigvals[0])
    print(f"\n## Density: {p} probes × {m} Lanczos steps; errors of λ_max, λ_min, first moment vs tr/n, "
          f"and L1 distance of the σ-smoothed densities (σ = {sigma:.2e})\n")
    print("| estimator | λ_max rel. err | λ_min abs. err | |mean − tr/n| / (tr/n) | L1 density | HVPs | passes | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    runs = []
    for seed in range(args.repeats):
        d, s = timed(lambda: spectral_density(op, num_probes=p, lanczos_steps=m, seed=seed))
        runs.append(("fasthess spectral_density", d.nodes, d.weights, d.num_hvps, d.num_passes, s))
        if pyhessian is not None:
            torch.manual_seed(seed)
            ph = pyhessian(model, loss_fn, data=(X, y), cuda=False)
            (ev, w), s = timed(lambda: ph.density(iter=m, n_v=p))
            ev, w = torch.tensor(ev, dtype=torch.float64), torch.tensor(w, dtype=torch.float64)
            runs.append(("PyHessian density", ev, w, p * m, p * m, s))
    for name in dict.fromkeys(r[0] for r in runs):
        mine = [r for r in runs if r[0] == name]
        top = statistics.mean(abs(float(r[1].max()) - float(eigvals[-1])) / float(eigvals[-1]) for r in mine)
        bot = statistics.mean(abs(float(r[1].min()) - float(eigvals[0])) for r in mine)
        mean = statistics.mean(abs(float((r[1] * r[2]).sum()) / r[1].shape[0] - exact_trace / n) / abs(exact_trace / n)
                               for r in mine)
        l1 = statistics.mean(density_error(r[1], r[2], eigvals, sigma) for r in mine)
        print(f"| {name} | {top:.2e} | {bot:.2e} | {mean:.2e} | {l1:.3f} | {mine[0][3]} | {mine[0][4]} | "
              f"{statistics.mean(r[5] for r in mine):.2f} |")


if __name__ == "__main__":
    main()
