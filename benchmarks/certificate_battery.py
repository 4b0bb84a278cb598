"""How often does ``eigs`` certify a false answer? A battery of hard symmetric spectra against dense float64 truth.

Run::

    PYTHONPATH=. .venv/bin/python benchmarks/certificate_battery.py            # 1020 solves, a few minutes
    PYTHONPATH=. .venv/bin/python benchmarks/certificate_battery.py --seeds 3  # a quick look

Families (each over several sizes, relative gaps and seeds; default settings of :func:`fasthess.eigs` unless the
family says otherwise):

* ``cluster-c`` — the top c ∈ {2, 3, 4} eigenvalues within a relative gap of 10⁻²…10⁻⁵ of each other, over a
  uniform bulk or a Hessian-like one (a few outliers and many eigenvalues near zero);
* ``model-block`` — the same with ``block_size=2``, the default of a model operator on the CPU;
* ``warm-orthogonal`` — ``v0`` is the second eigenvector, with a leak of 0, 10⁻⁸, 10⁻⁴ or 10⁻² of the first;
* ``float32`` — products computed in float32, tol 10⁻⁴…10⁻⁹, truth = the float64 eigenvalues of the float32 matrix.
* ``explored-start`` — the tracker's ``explore="subsample"`` start: a full-data solve with no random column, from a
  warm v0 (the second eigenvector, leaking 10⁻⁴ of the first), block 2 as a model operator's on the CPU, and the
  top Ritz vector of a stand-in subset solve
  (A + E, ‖E‖ = 5 % of ‖A‖, or *blind*: A with its top eigenvalue moved below the cluster, a subset that does
  not see the top) — the assumption that the subset's exploration carries the Krylov assumption;
* ``threshold`` — :func:`fasthess.threshold.compare_lambda_max` at c = λ_max·(1 ± 5 %) and (1 ± 10⁻³); false when
  it decides the wrong side (above needs no gap; below rests on the certificate, and on its residual bound
  without a confirming pass).

A result is *false* when ``converged`` is True but |λ − θ| > max(error bound, tol·|λ|) (a decision: when it names
the wrong side). Printed: a markdown table of
solves, converged solves (decided, for thresholds), false certificates and median products per family.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
import zlib

import torch

import fasthess
from fasthess.testing import Float32MatrixOperator
from fasthess.threshold import compare_lambda_max
from fasthess.from_subset import eigs_subsampled

GAPS = (1e-2, 1e-3, 3e-4, 1e-4, 1e-5)


def spectrum(n: int, cluster: int, gap: float, bulk: str, g: torch.Generator) -> torch.Tensor:
    """Eigenvalues: a top cluster of ``cluster`` values spread over ``gap`` below 1, then the bulk."""
    if bulk == "uniform":
        lam = torch.rand(n, generator=g, dtype=torch.float64) * 1.4 - 0.5
    else:  # Hessian-like: outliers, then many eigenvalues near zero of both signs
        lam = torch.randn(n, generator=g, dtype=torch.float64) ** 3 * 0.01
        lam[:8] = torch.tensor([0.7, 0.55, 0.4, 0.3, 0.22, 0.15, 0.1, 0.07], dtype=torch.float64)
    lam = lam.clamp(max=0.9)  # the bulk stays below the cluster
    lam[:cluster] = 1.0 - gap * torch.linspace(0, 1, cluster, dtype=torch.float64)
    return lam


def matrix(lam: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    R = torch.linalg.qr(torch.randn(lam.shape[0], lam.shape[0], generator=g, dtype=torch.float64))[0]
    return (R * lam) @ R.T, R


def _gen(*key) -> torch.Generator:
    """A generator seeded from the case's parameters (stable across processes, unlike hash())."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def cases(seeds: int):
    """(family, operator, eigs keywords, true λ_max) for every solve of the battery."""
    for seed in range(seeds):
        for n in (60, 200):
            for bulk in ("uniform", "hessian"):
                for gap in GAPS:
                    for c in (2, 3, 4):
                        g = _gen(seed, n, bulk, gap, c)
                        lam = spectrum(n, c, gap, bulk, g)
                        A, R = matrix(lam, g)
                        top = float(lam.max())
                        yield f"cluster-{c}", fasthess.linop.MatrixOperator(A), dict(seed=seed), top
                        if c == 2:
                            yield "model-block", fasthess.linop.MatrixOperator(A), dict(seed=seed, block_size=2), top
                    g = _gen(seed, n, bulk, gap, "explored")
                    lam = spectrum(n, 2, gap, bulk, g)
                    A, R = matrix(lam, g)
                    top = int(lam.argmax())
                    v0 = R[:, 1] + 1e-4 * R[:, top]
                    for sub in ("noisy", "blind"):
                        if sub == "noisy":
                            E = torch.randn(n, n, generator=g, dtype=torch.float64)
                            E = (E + E.T) * (0.05 * float(lam.abs().max()) / float(torch.linalg.matrix_norm(E + E.T, 2)))
                            S = A + E
                        else:
                            low = lam.clone()
                            low[top] = float(lam.sort().values[-3]) - 0.05
                            S = (R * low) @ R.T
                        kw = dict(seed=seed, v0=v0[:, None], block_size=2, sub=fasthess.linop.MatrixOperator(S))
                        yield "explored-start", fasthess.linop.MatrixOperator(A), kw, float(lam.max())
                    for rel in (-0.05, -1e-3, 1e-3, 0.05):
                        yield "threshold", fasthess.linop.MatrixOperator(A), dict(seed=seed, c=float(lam.max()) * (1 + rel)), \
                            float(lam.max())
                for leak in (0.0, 1e-8, 1e-4, 1e-2):
                    g = _gen(seed, n, bulk, leak)
                    lam = spectrum(n, 2, 1e-2, bulk, g)
                    A, R = matrix(lam, g)
                    top = int(lam.argmax())
                    v0 = R[:, 1] + leak * R[:, top]
                    yield "warm-orthogonal", fasthess.linop.MatrixOperator(A), dict(seed=seed, tol=1e-8, v0=v0), float(lam.max())
            for tol in (1e-4, 1e-6, 1e-9):
                g = _gen(seed, n, tol)
                A32 = matrix(spectrum(n, 1, 0.0, "uniform", g), g)[0].float()
                truth = float(torch.linalg.eigvalsh(A32.double()).max())
                yield "float32", Float32MatrixOperator(A32.double()), dict(seed=seed, tol=tol), truth


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=10)
    a = ap.parse_args(argv)
    rows: dict[str, list] = {}
    t0 = time.perf_counter()
    for family, op, kw, truth in cases(a.seeds):
        tol = kw.setdefault("tol", 1e-4)
        sub, c = kw.pop("sub", None), kw.pop("c", None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the float32 floor warning at tol 1e-9
            if c is not None:
                d = compare_lambda_max(op, c, **kw)
                rows.setdefault(family, []).append((d.above is not None, d.above not in (None, truth > c),
                                                    d.result.num_hvps))
                continue
            if sub is not None:
                both = eigs_subsampled(op, v0=kw.pop("v0"), keep_v0=True, sub_op=sub, **kw)
                res = both.result
            else:
                res = fasthess.eigs(op, k=1, **kw)
        err = abs(float(res.eigenvalues[0]) - truth)
        false = res.all_converged and err > max(float(res.error_bounds[0]), tol * abs(truth)) * (1 + 1e-9) + 1e-12
        rows.setdefault(family, []).append((res.all_converged, false, res.num_hvps))
    print(f"{sum(len(r) for r in rows.values())} solves in {time.perf_counter() - t0:.0f} s (fasthess "
          f"{fasthess.__version__}, torch {torch.__version__})\n")
    print("| family | solves | converged | false certificates | median products |\n|---|---:|---:|---:|---:|")
    for family, r in rows.items():
        print(f"| {family} | {len(r)} | {sum(c for c, _, _ in r)} | {sum(f for _, f, _ in r)} | "
              f"{statistics.median(h for _, _, h in r):g} |")
    total = [x for r in rows.values() for x in r]
    print(f"| **all** | {len(total)} | {sum(c for c, _, _ in total)} | {sum(f for _, f, _ in total)} | "
          f"{statistics.median(h for _, _, h in total):g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
