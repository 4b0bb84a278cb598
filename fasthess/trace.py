"""Stochastic and exact trace estimation of a symmetric operator from block products.

Hutchinson: for Rademacher probes z (entries ±1 with probability ½), E[zᵀAz] = tr(A). With m probes,

    t̂ = (1/m) Σⱼ zⱼᵀ A zⱼ,      std. error = s/√m,

where s is the sample standard deviation of the m values zⱼᵀAzⱼ.

Hutch++ (Meyer, Musco, Musco & Woodruff, 2021): split the m products into a sketch of k = ⌊m/3⌋, a
projection of k and l = m − 2k Hutchinson probes. With S an n×k Rademacher matrix, Q = orth(AS), and
the probes G projected to the complement, G' = (I − QQᵀ)G,

    t̂ = tr(QᵀAQ) + (1/l) Σⱼ g'ⱼᵀ A g'ⱼ,

since tr(A) = tr(QᵀAQ) + tr((I − QQᵀ)A(I − QQᵀ)). The first term is exact; only the deflated remainder,
which no longer holds the dominant eigenvalues, is estimated, so the error falls as 1/m rather than
1/√m for matrices with decaying spectra. The standard error is that of the remainder term (given Q).

Exact: when ``num_matvecs ≥ n`` either method spends n products on the unit vectors instead and
returns tr(A) = Σᵢ eᵢᵀAeᵢ with ``std_error = 0``, so a budget that covers the dimension is never
wasted on a random estimate.

Products go through ``op.matmat`` in blocks of ``block_size`` columns: one data pass per block.

>>> import torch
>>> from fasthess.linop import MatrixOperator
>>> A = MatrixOperator(torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64)))
>>> trace(A, num_matvecs=5)
TraceResult(estimate=15, std_error=0, num_hvps=5, num_passes=1, method='exact')
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fasthess._deprecation import positional_until
from fasthess.errors import FasthessError
from fasthess.linop import fixed

METHODS = ("hutch++", "hutchinson")
DEFAULT_BLOCK = 32


@dataclass(frozen=True)
class TraceResult:
    """An estimate of tr(A), its standard error (0 when exact) and the products it cost."""

    estimate: float
    std_error: float
    num_hvps: int
    num_passes: int
    method: str

    def __repr__(self) -> str:
        return (f"TraceResult(estimate={self.estimate:.6g}, std_error={self.std_error:.3g}, "
                f"num_hvps={self.num_hvps}, num_passes={self.num_passes}, method={self.method!r})")


def rademacher(n: int, b: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """An n×b float64 matrix of independent ±1 entries (drawn on the CPU for reproducibility across devices)."""
    return (torch.randint(0, 2, (n, b), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1).to(device)


def _apply_in_blocks(op, V: torch.Tensor, block_size: int) -> torch.Tensor:
    """A V for V of shape (n, m), computed ``block_size`` columns (one data pass) at a time."""
    return torch.cat([op.matmat(V[:, s:s + block_size]) for s in range(0, V.shape[1], block_size)], dim=1)


def _quadratic_forms(op, V: torch.Tensor, block_size: int) -> torch.Tensor:
    """The m values vⱼᵀAvⱼ for the columns of V."""
    return (V * _apply_in_blocks(op, V, block_size)).sum(dim=0)


def _exact(op, block_size: int) -> tuple[float, float]:
    n, total = op.num_params, 0.0
    for s in range(0, n, block_size):
        E = torch.zeros(n, min(block_size, n - s), dtype=torch.float64, device=op.device)
        E[s:s + E.shape[1]].fill_diagonal_(1.0)
        total += float(op.matmat(E)[s:s + E.shape[1]].diagonal().sum())
    return total, 0.0


def _hutchinson(op, m: int, gen: torch.Generator, block_size: int) -> tuple[float, float]:
    vals = _quadratic_forms(op, rademacher(op.num_params, m, gen, op.device), block_size)
    return float(vals.mean()), float(vals.std() / math.sqrt(m))


def _hutch_plus_plus(op, m: int, gen: torch.Generator, block_size: int) -> tuple[float, float]:
    n, k = op.num_params, m // 3
    Q, _ = torch.linalg.qr(_apply_in_blocks(op, rademacher(n, k, gen, op.device), block_size))
    G = rademacher(n, m - 2 * k, gen, op.device)
    G = G - Q @ (Q.T @ G)
    vals = _quadratic_forms(op, torch.cat([Q, G], dim=1), block_size)  # tr(QᵀAQ) and the probes share passes
    rest = vals[k:]
    return float(vals[:k].sum() + rest.mean()), float(rest.std() / math.sqrt(rest.shape[0]))


def _check(op, num_matvecs, method, block_size) -> None:
    if not hasattr(op, "matmat") or not hasattr(op, "num_params"):
        raise FasthessError(f"op must be a fasthess operator (e.g. HessianOperator), got {type(op).__name__}")
    if method not in METHODS:
        raise FasthessError(f"method={method!r} must be one of {METHODS}")
    least = 4 if method == "hutch++" else 2
    if not isinstance(num_matvecs, int) or num_matvecs < min(least, op.num_params):
        raise FasthessError(f"num_matvecs={num_matvecs!r} must be an integer ≥ {least} for {method} (enough probes "
                            f"to estimate an error), or ≥ n = {op.num_params} for the exact trace")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise FasthessError(f"block_size={block_size!r} must be a positive integer (products per data pass)")


@positional_until(1)
def trace(op, *, num_matvecs: int = 99, method: str = "hutch++", seed: int = 0,
          block_size: int | None = None) -> TraceResult:
    """Estimate tr(A) of a symmetric operator with ``num_matvecs`` products (see the module docstring).

    Args:
        op: an operator with ``num_params``, ``device`` and ``matmat`` (e.g. :class:`HessianOperator`).
        num_matvecs: the product budget; ``≥ n`` gives the exact trace with n products.
        method: ``"hutch++"`` (default; lower variance for decaying spectra) or ``"hutchinson"``.
        seed: seed of the Rademacher probes (drawn on the CPU, so results repeat across devices).
        block_size: products per data pass (default 32).
    """
    _check(op, num_matvecs, method, block_size)
    start_hvps, start_passes = op.num_hvps, op.num_passes
    block_size = block_size or DEFAULT_BLOCK
    gen = torch.Generator().manual_seed(seed)
    with fixed(op):
        if num_matvecs >= op.num_params:
            (est, err), used = _exact(op, block_size), "exact"
        elif method == "hutchinson":
            (est, err), used = _hutchinson(op, num_matvecs, gen, block_size), method
        else:
            (est, err), used = _hutch_plus_plus(op, num_matvecs, gen, block_size), method
    return TraceResult(estimate=est, std_error=err, num_hvps=op.num_hvps - start_hvps,
                       num_passes=op.num_passes - start_passes, method=used)
