"""Block Lanczos for a few extreme eigenpairs of a symmetric operator, with certified results.

The Krylov basis Q (rows, orthonormal) and its images HQ are kept in float64. Each step applies the
operator to one block P (one data pass for b products), extends the projected matrix
T = Q H Qᵀ by its new block row, and takes Ritz pairs (θ, x = Qᵀy) from T. Because HQ is stored,
residuals r = Hx − θx are formed from the real products, not from a recurrence, and so they stay
honest even if orthogonality were lost. The next block is W = HP orthogonalized twice against Q
(full reorthogonalization, which prevents ghost eigenvalues), re-filled with random directions
where it deflates. When the basis reaches ``max_basis`` rows it is thick-restarted: the best Ritz
vectors and their images are kept, and T becomes diagonal.

Stopping rule: for every wanted θᵢ, |λᵢ − θᵢ| ≤ ‖rᵢ‖, and where the nearest other Ritz value θⱼ is
separated by more than its own residual, the Kato–Temple bound |λᵢ − θᵢ| ≤ ‖rᵢ‖²/gapᵢ with
gapᵢ = |θᵢ − θⱼ| − ‖rⱼ‖ (this assumes, as every Krylov method must, that no eigenvalue lies
unseen between them). The solve stops when every bound is ≤ max(tol·|θᵢ|, 10³ε·max|θ|) (the roundoff
floor only matters for eigenvalues at zero, whose relative accuracy is undefined). A claim that leans on a
Kato–Temple bound must survive one more pass: an unresolved cluster (a Ritz vector mixing two
close eigenvectors) looks separated until the next block splits it, and then θ jumps by more
than the claimed bound, which voids the claim.
"""
from __future__ import annotations

import math
import sys
import time

import torch

from fasthess import ops
from fasthess.errors import FasthessError
from fasthess.linop import fixed
from fasthess.results import EigResult

WHICH = ("LA", "SA", "LM")
BASIS_BUDGET_BYTES = 2 * 1024**3  # Q and HQ together, float64
MAX_BASIS = 360
ROUNDOFF = 1e3 * torch.finfo(torch.float64).eps  # an error this small relative to ‖T‖ is roundoff: converged


def default_block_size(k: int, device: torch.device | str | None = None, model_operator: bool = False) -> int:
    """Block size when none is given: k for a model operator on the CPU, otherwise max(k, 4).

    On an accelerator one data pass with b vmapped tangents costs far less than b passes, so a block of 4 shares
    each pass (and a block also resolves clustered or repeated eigenvalues). On the CPU a pass of a model's
    Hessian does not amortize: measured on 2 cores (benchmarks/PEERS.md) one pass with b = 4 cost 3-12× a pass
    with b = 1, so for λ_max (k = 1) plain Lanczos (b = 1) is fastest. Other operators (e.g. a dense
    :class:`MatrixOperator`) keep max(k, 4).
    """
    if model_operator and device is not None and torch.device(device).type == "cpu":
        return k
    return max(k, 4)


def _is_model_operator(op) -> bool:
    from fasthess.model_operator import ModelOperator

    return isinstance(op, ModelOperator)


def _order(theta: torch.Tensor, which: str) -> torch.Tensor:
    """Indices of the Ritz values from most to least wanted."""
    key = {"LA": theta, "SA": -theta, "LM": theta.abs()}[which]
    return torch.argsort(key, descending=True, stable=True)


def _check_v0(v0, n: int, device: torch.device) -> torch.Tensor:
    if not isinstance(v0, torch.Tensor):
        raise FasthessError(f"v0 must be a torch.Tensor of shape ({n},) or ({n}, j), got {type(v0).__name__}")
    if v0.dim() == 1:
        v0 = v0[:, None]
    if v0.dim() != 2 or v0.shape[0] != n or v0.shape[1] == 0:
        raise FasthessError(f"v0 has shape {tuple(v0.shape)}, but the operator has {n} parameters; pass a tensor of "
                            f"shape ({n},) or ({n}, j), e.g. the eigenvectors of an earlier result on the same model")
    if v0.shape[1] > n:
        raise FasthessError(f"v0 has {v0.shape[1]} columns, but only n = {n} can be independent; pass at most {n}")
    if not v0.is_floating_point():
        raise FasthessError(f"v0 has dtype {v0.dtype}; pass a floating-point tensor (float32 or float64)")
    if v0.device != device:
        raise FasthessError(f"v0 is on {v0.device} but the operator is on {device}; move it with v0.to('{device}')")
    if not bool(torch.isfinite(v0).all()):
        raise FasthessError("v0 contains NaN or Inf; pass finite starting vectors (or v0=None for a random start)")
    return v0.T.to(torch.float64)


def _check_args(op, k, which, tol, block_size, max_iters, max_basis) -> int:
    if not hasattr(op, "matmat") or not hasattr(op, "num_params"):
        raise FasthessError(f"op must be a fasthess operator (e.g. HessianOperator), got {type(op).__name__}")
    n = op.num_params
    if not isinstance(k, int) or k < 1 or k >= n:
        raise FasthessError(f"k={k!r} must be an integer with 1 ≤ k < n = {n}; for all eigenvalues of a small "
                            "problem build the dense matrix instead")
    if which not in WHICH:
        raise FasthessError(f"which={which!r} must be one of {WHICH} (largest algebraic, smallest algebraic, "
                            "largest magnitude)")
    if not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol <= 0:
        raise FasthessError(f"tol={tol!r} must be a positive finite relative accuracy, e.g. 1e-4")
    for name, val, lo in (("block_size", block_size, 1), ("max_iters", max_iters, 1), ("max_basis", max_basis, 2)):
        if val is not None and (not isinstance(val, int) or val < lo):
            raise FasthessError(f"{name}={val!r} must be an integer ≥ {lo} (or None for the default)")
    return n


def _random_rows(count: int, n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randn(count, n, generator=gen, dtype=torch.float64).to(device)


def _orthonormal_rows(W: torch.Tensor, Q: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Rows of W orthonormalized against the rows of Q and each other; deflated rows become random."""
    scale = W.norm(dim=1).clamp_min(1e-300)
    W, _ = ops.block_orthogonalize(Q, W)
    out: list[torch.Tensor] = []
    for j in range(W.shape[0]):
        w, ref = W[j], scale[j]
        for _attempt in range(3):
            if out:
                B = torch.stack(out)
                w = w - (B @ w) @ B
                w = w - (B @ w) @ B
            norm = w.norm()
            if norm > 1e-10 * ref:
                out.append(w / norm)
                break
            w = _random_rows(1, W.shape[1], gen, W.device)
            w, _ = ops.block_orthogonalize(Q, w)
            w, ref = w[0], w.norm()
        else:
            break  # the space is exhausted: no direction is left outside Q
    return torch.stack(out) if out else W[:0]


def eigs(op, k: int = 1, which: str = "LA", tol: float = 1e-4, block_size: int | None = None,
         max_iters: int | None = None, v0: torch.Tensor | None = None, seed: int = 0, progress: bool = False,
         max_basis: int | None = None) -> EigResult:
    """k extreme eigenpairs of a symmetric operator by block Lanczos (see the module docstring).

    Args:
        op: an operator with ``num_params``, ``device`` and ``matmat`` (e.g. :class:`HessianOperator`).
        k: number of eigenpairs.
        which: ``"LA"`` largest algebraic (λ_max), ``"SA"`` smallest, ``"LM"`` largest magnitude.
        tol: certified relative accuracy of each eigenvalue.
        block_size: products per data pass (default: k for a model's Hessian/GGN on the CPU, else ``max(k, 4)``;
            at least v0's column count).
        max_iters: most data passes (default: until the Krylov space is exhausted, at most 1000).
        v0: warm start, (n,) or (n, j), e.g. the eigenvectors of the previous result.
        seed: seed of the random start and refill directions.
        progress: print one line per pass to stderr.
        max_basis: most basis vectors kept before a thick restart (default from a 2 GiB budget).
    """
    n = _check_args(op, k, which, tol, block_size, max_iters, max_basis)
    start_hvps, start_passes, t0 = op.num_hvps, op.num_passes, time.perf_counter()
    device = op.device
    gen = torch.Generator().manual_seed(seed)
    V0 = _check_v0(v0, n, device) if v0 is not None else None
    b = block_size or default_block_size(k, device, _is_model_operator(op))
    b = min(n, max(b, V0.shape[0] if V0 is not None else 0))
    cap = max_basis or max(min(MAX_BASIS, BASIS_BUDGET_BYTES // (16 * n)), 2 * k + 2 * b)
    cap = min(max(cap, k + 2 * b), n + b)
    max_iters = max_iters or 1000

    Q = torch.empty(0, n, dtype=torch.float64, device=device)
    HQ = torch.empty_like(Q)
    T = torch.empty(0, 0, dtype=torch.float64, device=device)
    start = _random_rows(b, n, gen, device)
    if V0 is not None:
        start[: V0.shape[0]] = V0
    P = _orthonormal_rows(start, Q, gen)
    vals = rn = bounds = conv = X = last_claim = None
    with fixed(op):
        for it in range(max_iters):
            W = op.matmat(P.T).T
            C, D = Q @ W.T, P @ W.T
            D = (D + D.T) / 2
            T = torch.cat([torch.cat([T, C], 1), torch.cat([C.T, D], 1)], 0)
            Q, HQ = torch.cat([Q, P]), torch.cat([HQ, W])
            theta, Y = torch.linalg.eigh(T)
            order = _order(theta, which)
            vals, X, rn, bounds = _certify(theta, Y, order, k, Q, HQ)
            conv = bounds <= torch.maximum(tol * vals.abs(), ROUNDOFF * theta.abs().max())
            claim = bool(conv.all())
            # A Kato–Temple bound leans on the gap estimate, which an unresolved cluster fools; such a claim stands
            # only once the next pass confirms it (the Ritz values moved by no more than the claimed bounds).
            leans_on_gap = bool((bounds < rn).any())
            exhausted = Q.shape[0] >= n  # every eigenvalue is then a Ritz value, and the gaps are exact
            confirmed = claim and (not leans_on_gap or exhausted or (last_claim is not None and bool(
                ((vals - last_claim[0]).abs() <= last_claim[1] + 1e-13 * vals.abs()).all())))
            conv = conv & confirmed
            last_claim = (vals, bounds) if claim else None
            if progress:
                print(f"[fasthess.eigs] pass {it + 1}: basis {Q.shape[0]}, θ={vals.tolist()}, "
                      f"rel. bound={(bounds / vals.abs().clamp_min(1e-300)).max().item():.2e}", file=sys.stderr)
            if confirmed or exhausted:
                break
            P = _orthonormal_rows(W, Q, gen)
            if P.shape[0] == 0:
                break
            if Q.shape[0] + P.shape[0] > cap:
                keep = order[: max(k + b, (cap - b) // 2)]
                Yk = Y[:, keep]
                Q, HQ, T = Yk.T @ Q, Yk.T @ HQ, torch.diag(theta[keep])
    return EigResult(eigenvalues=vals, eigenvectors=X.T.contiguous(), residuals=rn, error_bounds=bounds,
                     converged=conv, num_hvps=op.num_hvps - start_hvps, num_passes=op.num_passes - start_passes,
                     seconds=time.perf_counter() - t0, which=which, tol=float(tol))


def _neighbours(i: int, pos: torch.Tensor, asc: torch.Tensor) -> list[int]:
    """Indices of the Ritz values just below and above θᵢ (``asc`` sorts θ, ``pos`` inverts it)."""
    p = int(pos[i])
    return [int(asc[q]) for q in (p - 1, p + 1) if 0 <= q < asc.shape[0]]


def _certify(theta, Y, order, k, Q, HQ):
    """Wanted Ritz values, vectors (rows), residual norms and error bounds (see the module docstring)."""
    asc = torch.argsort(theta)
    pos = torch.empty_like(asc)
    pos[asc] = torch.arange(asc.shape[0], device=asc.device)
    want = order[:k].tolist()
    nbrs = {i: _neighbours(i, pos, asc) for i in want}
    idx = sorted(set(want).union(*nbrs.values()))
    row = {j: r for r, j in enumerate(idx)}
    Yi = Y[:, idx]
    X, HX = Yi.T @ Q, Yi.T @ HQ
    norms = X.norm(dim=1, keepdim=True)
    X, HX = X / norms, HX / norms
    res = (HX - theta[idx][:, None] * X).norm(dim=1)
    bounds = []
    for i in want:
        r = res[row[i]]
        # Kato–Temple needs a separated neighbour; a lone Ritz value says nothing about the rest of the spectrum
        gap = min((abs(theta[i] - theta[j]) - res[row[j]] for j in nbrs[i]), default=None)
        bounds.append(torch.minimum(r, r * r / gap) if gap is not None and gap > 0 else r)
    w = [row[i] for i in want]
    return theta[want], X[w], res[w], torch.stack(bounds).to(theta.device)
