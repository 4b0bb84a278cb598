"""Cheaper starts for :func:`fasthess.eigs`: a Lanczos solve on a random subset of the data first.

A Krylov solve from a random vector spends most of its data passes finding the direction of the top
eigenvectors. The Hessian of a random fraction ``f`` of the examples has nearly the same top eigenvectors,
and one of its products costs about ``f`` of a full pass. :func:`eigs_subsampled` therefore

1. runs :func:`fasthess.eigs` on the subset to a loose tolerance (``sub_tol``), started from ``v0`` if given:
   this is where the random columns explore and where a block of k + 1 resolves near-degenerate pairs, cheaply;
2. runs :func:`fasthess.eigs` on the full data started from the subset's top k + 1 Ritz vectors, to ``tol``,
   without further random columns (``random_columns=0``) when the subset solve converged.

The answer is that of step 2: Ritz pairs of the full-data Hessian, certified by full-data residuals exactly as
in :func:`fasthess.eigs`; the subset only chooses where the Krylov space starts (its Krylov assumption rests on the
subset solve's random columns). On its own a subset's λ_max is
off by percents (measured 2–4 % here), which is why it is never returned.

Measured (benchmarks/PEERS.md, CPU): cold λ_max to 1e-4 needs about 40 % fewer full-data passes than a random
start. For a warm start during training (``v0`` = the previous eigenvectors) the previous vector is better than the
subset's, so with ``keep_v0=True`` (what :class:`fasthess.SharpnessTracker` does) step 2 starts from the top k
columns of ``v0`` and k more: the rest of ``v0`` (the (k+1)-th vector and its ties) added to the subset's top k
Ritz vectors (both projected off the top k). The carried vectors make the full-data step converge in two or three
passes, the carried (k+1)-th catches a swap with the top, the subset's vectors bring what its exploration found (a
direction that rose past the top shows in the subset's top Ritz vectors), and no fresh random column has to be
taken to depth on the full data.

>>> import torch
>>> from torch import nn
>>> import fasthess
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1)).double()
>>> X, y = torch.randn(400, 5, dtype=torch.float64), torch.randn(400, 1, dtype=torch.float64)
>>> op = fasthess.HessianOperator(model, nn.MSELoss(), (X, y), batch_size=100)
>>> res = eigs_subsampled(op, tol=1e-8)
>>> res.result.all_converged
True
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from fasthess._deprecation import positional_until
from fasthess.errors import FasthessError
from fasthess.lanczos import eigs
from fasthess.results import EigResult

__all__ = ["SubsampledEigResult", "eigs_subsampled", "subsample_operator"]

MIN_SUBSET = 64  # fewer examples than this give a Hessian too far from the full one to be worth a start


@dataclass(frozen=True)
class SubsampledEigResult:
    """The certified full-data result, and what the subset step cost.

    ``result`` is an ordinary :class:`EigResult` of the full-data operator (its ``num_hvps``, ``num_passes`` and
    ``seconds`` count the full-data step only). ``sub_result`` is the subset solve (None when no subset was
    used); each of its passes read ``fraction`` of the data.
    """

    result: EigResult
    sub_result: EigResult | None
    fraction: float
    seconds: float

    @property
    def eigenvalues(self) -> torch.Tensor:
        return self.result.eigenvalues

    @property
    def eigenvectors(self) -> torch.Tensor:
        return self.result.eigenvectors

    @property
    def full_pass_equivalents(self) -> float:
        """Data passes in units of one full pass: full passes + subset passes × fraction."""
        sub = 0.0 if self.sub_result is None else self.sub_result.num_passes * self.fraction
        return self.result.num_passes + sub

    @property
    def hvp_equivalents(self) -> float:
        sub = 0.0 if self.sub_result is None else self.sub_result.num_hvps * self.fraction
        return self.result.num_hvps + sub


def subsample_operator(op, fraction: float, seed: int = 0):
    """A :class:`fasthess.HessianOperator` like ``op`` on a random ``fraction`` of its examples, or None.

    Only operators built from in-memory tensors ``(X, y[, w])`` on one process can be subsampled; for any other the
    answer is None (and :func:`eigs_subsampled` then solves on the full data directly).
    """
    from fasthess.hessian import HessianOperator

    if not 0 < fraction < 1:
        raise FasthessError(f"fraction={fraction!r} must lie strictly between 0 and 1, e.g. 0.125")
    if type(op) is not HessianOperator or op.comm is not None or not op.data.resident:
        return None
    N = op.data.num_examples
    m = max(math.ceil(fraction * N), MIN_SUBSET)
    b = op.data.batch_size
    m += bool(b and b > 1 and m % b == 1)  # no chunk of one row: train-mode BatchNorm refuses it
    if m > N // 2:
        return None
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(N, generator=gen)[:m].sort().values
    return op.with_data(op.data.take(idx), batch_size=op.data.batch_size, params=op.params, hvp=op.hvp_method)


def _mixed(carried: torch.Tensor, found: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Columns that hold both the carried vectors below the top k and what the subset found, in as few columns as
    the longer of the two: each part is projected off span(top) and normalized, and the i-th columns are added.

    The sum keeps about 1/√2 of each part, so the Krylov space grown from it reaches both a carried vector that
    rises past the top (a swap; found by the tracker battery when the subset saw nothing of it: 59 of 120 swaps
    certified the old top when the carried (k+1)-th vector was dropped) and a direction the subset's exploration
    found, at the cost of one block of k columns, not two."""
    basis = torch.linalg.qr(top)[0]

    def unit_off_top(M: torch.Tensor) -> torch.Tensor:
        M = M - basis @ (basis.T @ M)
        return M / M.norm(dim=0, keepdim=True).clamp_min(1e-300)

    carried, found = unit_off_top(carried), unit_off_top(found)
    m = min(carried.shape[1], found.shape[1])
    longer = carried if carried.shape[1] > found.shape[1] else found
    # eigenvectors have no sign: a subset vector close to −(carried) would cancel it in the sum
    sign = torch.where((carried[:, :m] * found[:, :m]).sum(0) < 0, -1.0, 1.0).to(found.dtype)
    return torch.cat([carried[:, :m] + sign * found[:, :m], longer[:, m:]], 1)


def _fraction(sub_op, op, fraction: float) -> float:
    """Share of a full pass that one subset pass reads: the example ratio, or ``fraction`` for a stand-in."""
    try:
        return sub_op.data.num_examples / op.data.num_examples
    except AttributeError:
        return fraction


@positional_until(2, formerly=("which", "tol"))
def eigs_subsampled(op, k: int = 1, *, which: str = "LA", tol: float = 1e-4, fraction: float = 0.125,
                    sub_tol: float = 1e-2, v0: torch.Tensor | None = None, seed: int = 0,
                    block_size: int | None = None, max_iters: int | None = None, sub_max_iters: int = 40,
                    progress: bool | None = None, keep_v0: bool = False, sub_op=None,
                    max_basis: int | None = None) -> SubsampledEigResult:
    """:func:`fasthess.eigs` started from a solve on a random ``fraction`` of the data (see the module docstring).

    Args:
        op: a :class:`fasthess.HessianOperator` on an ``(X, y)`` pair (other operators are solved directly).
        k, which, tol, block_size, max_iters, seed, progress, max_basis: as in :func:`fasthess.eigs` (the final
            solve; ``block_size`` and ``max_basis`` also the subset's).
        fraction: share of the examples in the subset (at least 64 examples, at most half the data).
        sub_tol: relative tolerance of the subset solve; it only has to point in the right direction (the subset's own
            λ_max lies 2–3 % from the full one on the benchmark problems, so 1e-2 is already below its bias).
        v0: start of the subset solve (e.g. the previous eigenvectors).
        sub_max_iters: most passes over the subset.
        keep_v0: start the full-data step from the top k columns of ``v0`` and k more that mix the rest of ``v0``
            with the subset's top k Ritz vectors (:func:`_mixed`), instead of the subset's top k + 1 alone.
        sub_op: the operator the exploration runs on (default: :func:`subsample_operator` of ``op``); a stand-in
            for a subset in tests and batteries that have no examples to draw.
    """
    t0 = time.perf_counter()
    sub_op = subsample_operator(op, fraction, seed) if sub_op is None else sub_op
    sub = None
    start, fresh = v0, 1
    if sub_op is not None:  # the exploration (random columns, a block that resolves pairs) runs on the cheap subset
        if start is not None:
            start = start.to(sub_op.device)
        sub = eigs(sub_op, k=k, which=which, tol=sub_tol, block_size=block_size, v0=start, seed=seed,
                   max_iters=sub_max_iters, progress=progress, max_basis=max_basis)
        # explored: its top Ritz vectors carry the randomness, unless the subset solve stopped unconverged
        start, fresh = sub.ritz_vectors.to(op.device), 0 if sub.all_converged else 1
        if keep_v0 and v0 is not None:
            V = (v0 if v0.dim() == 2 else v0[:, None]).to(op.device, torch.float64)
            start = torch.cat([V[:, :k], _mixed(V[:, k:], start[:, :k].to(torch.float64), V[:, :k])], 1)
    res = eigs(op, k=k, which=which, tol=tol, block_size=block_size, max_iters=max_iters, v0=start, seed=seed + 1,
               progress=progress, random_columns=fresh, max_basis=max_basis)
    frac = 0.0 if sub_op is None else _fraction(sub_op, op, fraction)
    return SubsampledEigResult(result=res, sub_result=sub, fraction=frac, seconds=time.perf_counter() - t0)
