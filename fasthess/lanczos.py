"""Block Lanczos for a few extreme eigenpairs of a symmetric operator, with certified results.

The Krylov basis Q (rows, orthonormal) and its images HQ are kept in float64. Each step applies the
operator to one block P (one data pass for b products), extends the projected matrix
T = Q H Qᵀ by its new block row, and takes Ritz pairs (θ, x = Qᵀy) from T. Because HQ is stored,
residuals r = Hx − θx are formed from the real products, not from a recurrence, and so they stay
honest even if orthogonality were lost. The next block is W = HP orthogonalized twice against Q
(full reorthogonalization, which prevents ghost eigenvalues), re-filled with random directions
where it deflates. When the basis reaches ``max_basis`` rows it is thick-restarted: the best Ritz
vectors and their images are kept, and T becomes diagonal.

Stopping rule: every wanted θᵢ carries an error bound, the residual bound ‖rᵢ‖ or, where a resolved neighbour
within the block's reach allows it, the Kato–Temple bound ‖rᵢ‖²/gapᵢ, plus a floor for the products' own
rounding; :mod:`fasthess._certificate` states when each is trusted and why. The solve stops when every bound is
≤ max(tol·|θᵢ|, 10³ε·max|θ|) (the roundoff term only matters for eigenvalues at zero, whose relative accuracy is
undefined), no unresolved unwanted Ritz value reaches into the wanted range, and, for a gap-based claim, one
more pass has confirmed it. A start block always holds at least one fresh random column, warm starts included;
``EigResult.ritz_vectors`` (the top k + 1 Ritz vectors, and any tied with the (k+1)-th) is the warm start for a
later, nearby solve.

Every pass applies the operator to a full block. Narrow passes (only the k wanted residuals once a gap was
usable, one product instead of two) cut a cold MLP λ_max from 16 to 13 products, and were removed: they stop the
block's other columns from climbing, and a red-team battery found a top pair 10⁻³ apart above a dense bulk
certified as one eigenvalue, 2.6·10⁻⁴ below λ_max at tol 10⁻⁴ (2 false certificates in 4825 model solves; the
full block resolves the pair).
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Generator
from dataclasses import dataclass, replace

import torch

from fasthess import ops
from fasthess._deprecation import positional_until
from fasthess._certificate import (CHECK_BELOW, SKEW_FACTOR, Certificate, certify, climbing, distance,
                                   float64_reach, float64_widened, floor_suffices, rounding_floor)
from fasthess._progress import SolveProgress
from fasthess.errors import FasthessError
from fasthess.linop import fixed
from fasthess.results import EXPLORED_START, RANDOM_START, WARM_START, EigResult

WHICH = ("LA", "SA", "LM")
BASIS_BUDGET_BYTES = 2 * 1024**3  # Q and HQ together, float64
MAX_BASIS = 360
ROUNDOFF = 1e3 * torch.finfo(torch.float64).eps  # an error this small relative to ‖T‖ is roundoff: converged
SATURATION = 0.1  # a cluster this much tighter than its distance to the next Ritz value saturates the block
MAX_BLOCK = 16  # the block grows by one column per saturated pass, up to this width
MIN_DEPTH = 3  # passes before a claim that rests on random columns: they must have had the chance to climb
MAX_WARM_EXTRA = 2  # Ritz vectors tied with the (k+1)-th that ritz_vectors carries beyond the top k + 1


def default_block_size(k: int, op=None) -> int:
    """Block size when none is given: k + 1 where the products of a pass do not share its cost, else max(k + 1, 4).

    One random column more than the wanted eigenvalues: a single Krylov vector cannot tell a near-degenerate pair
    from one eigenvalue, so with b = k neither the gap nor even the residual bound is safe
    (:mod:`fasthess._certificate`). An operator says whether its b products share a pass
    (``products_share_a_pass``, default True): a model's Hessian on the CPU does not, a pass costs about b single
    products (measured on 2 cores, benchmarks/PEERS.md), so its block stays as small as honesty allows; on an
    accelerator the b vmapped tangents share one pass, and a dense matrix product shares it too.
    """
    if op is not None and not getattr(op, "products_share_a_pass", True):
        return k + 1
    return max(k + 1, 4)


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


def check_options(k, which: str = "LA", tol=1e-4, block_size=None, max_iters=None, max_basis=None,
                  random_columns=1) -> None:
    """Refuse the solver options that no operator would make valid, before any product (:func:`eigs`, and
    :class:`fasthess.SharpnessTracker` when it is built, not at its first update)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise FasthessError(f"k={k!r} must be an integer ≥ 1 (the number of eigenpairs)")
    if which not in WHICH:
        raise FasthessError(f"which={which!r} must be one of {WHICH} (largest algebraic, smallest algebraic, "
                            "largest magnitude)")
    if not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol <= 0:
        raise FasthessError(f"tol={tol!r} must be a positive finite relative accuracy, e.g. 1e-4")
    for name, val, lo in (("block_size", block_size, 1), ("max_iters", max_iters, 1), ("max_basis", max_basis, 2)):
        if val is not None and (not isinstance(val, int) or val < lo):
            raise FasthessError(f"{name}={val!r} must be an integer ≥ {lo} (or None for the default)")
    if isinstance(random_columns, bool) or not isinstance(random_columns, int) or random_columns < 0:
        raise FasthessError(f"random_columns={random_columns!r} must be an integer ≥ 0 (fresh random columns added "
                            "to v0; keep the default 1 unless v0 comes from a random-started solve)")


def check_block(b: int, k: int, block_size: int | None) -> None:
    """A block of b columns (``block_size`` as given, raised for a v0) must hold at least k + 1."""
    if b < k + 1:
        raise FasthessError(f"block_size={block_size} is below k + 1 = {k + 1}: a block of k columns cannot tell a "
                            "near-degenerate cluster from fewer eigenvalues, so no certificate would hold (its "
                            "residual bound can name the wrong member); pass block_size ≥ k + 1, or None for the "
                            "default (docs/guides/certificate.md, rule 1)")


def _check_operator(op, k: int) -> int:
    if not hasattr(op, "matmat") or not hasattr(op, "num_params"):
        raise FasthessError(f"op must be a fasthess operator (e.g. HessianOperator), got {type(op).__name__}")
    n = op.num_params
    if k >= n:
        raise FasthessError(f"k={k!r} must be below n = {n}; for all eigenvalues of a small problem build the dense "
                            "matrix instead")
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


@positional_until(2)
def eigs(op, k: int = 1, *, which: str = "LA", tol: float = 1e-4, block_size: int | None = None,
         max_iters: int | None = None, v0: torch.Tensor | None = None, seed: int = 0, progress: bool | None = None,
         max_basis: int | None = None, random_columns: int = 1) -> EigResult:
    """k extreme eigenpairs of a symmetric operator by block Lanczos (see the module docstring).

    Args:
        op: an operator with ``num_params``, ``device`` and ``matmat`` (e.g. :class:`HessianOperator`).
        k: number of eigenpairs.
        which: ``"LA"`` largest algebraic (λ_max), ``"SA"`` smallest, ``"LM"`` largest magnitude.
        tol: certified relative accuracy of each eigenvalue.
        block_size: products per data pass, at least k + 1 (default :func:`default_block_size`); always at least
            v0's column count plus ``random_columns``.
        max_iters: most data passes (default: until the Krylov space is exhausted, at most 1000).
        v0: warm start, (n,) or (n, j), e.g. ``previous_result.ritz_vectors``. Its claim that θ is the largest
            rests on the random columns having explored past v0 (``EigResult.start`` says so); over a plateau of
            eigenvalues that can fail (docs/guides/certificate.md): for a claim without it, start cold.
        seed: seed of the random start and refill directions.
        progress: show the passes on stderr (:class:`fasthess._progress.SolveProgress`): True always, False
            never, None (default) when stderr is a terminal.
        max_basis: most basis vectors kept before a thick restart (default from a 2 GiB budget); raised to
            k + 3·block_size, so that a restart keeps k + b Ritz vectors with room for two more blocks (with
            room for one, a red-team battery found a member of a cluster 10⁻³ wide certified as the largest).
        random_columns: fresh random columns added to v0 (the Krylov assumption of the certificate rests on them,
            :mod:`fasthess._certificate`). 0 only for a v0 that a random-started solve has already explored, such
            as the Ritz vectors of a subset solve (:func:`fasthess.from_subset.eigs_subsampled`).
    """
    check_options(k, which, tol, block_size, max_iters, max_basis, random_columns)
    n = _check_operator(op, k)
    start_hvps, start_passes, t0 = op.num_hvps, op.num_passes, time.perf_counter()
    products = products_dtype(op)
    steps = lanczos_steps(n, op.device, products, k=k, which=which, tol=tol,
                          block_size=block_size or default_block_size(k, op),
                          requested_block=block_size, max_iters=max_iters, v0=v0, seed=seed, progress=progress,
                          max_basis=max_basis, random_columns=random_columns)
    with fixed(op):
        out = drive(steps, lambda P: op.matmat(P.T).T)
    out = precision_checked(op, out, products)
    return out.result(op.num_hvps - start_hvps, op.num_passes - start_passes, time.perf_counter() - t0,
                      getattr(op, "contract", None))


def products_dtype(op) -> torch.dtype:
    """The precision the operator's products are computed in (a model operator's ``compute_dtype``: float32 for a
    bf16/fp16 model), which sizes the rounding floor; float64 when the operator does not say."""
    return getattr(op, "compute_dtype", getattr(op, "dtype", torch.float64))


def check_span(out: Outcome) -> torch.Tensor:
    """The rows the float64 check multiplies: the wanted Ritz vectors and the next ones (``ritz_vectors``, most
    wanted first; see :func:`~fasthess._certificate.float64_reach`)."""
    k = out.cert.vectors.shape[0]
    return torch.cat([out.cert.vectors, out.ritz_vectors.T[k:].to(out.cert.vectors.dtype)])


def precision_checked(op, out: Outcome, products: torch.dtype) -> Outcome:
    """``out`` with its bounds checked against float64 products of its Ritz vectors when its products are below
    float64 (:mod:`fasthess._certificate`, :func:`~fasthess._certificate.floor_suffices`); ``precision`` names what
    the claim rests on, and ``check_products`` counts the float64 products the check took."""
    name = str(products).removeprefix("torch.")
    if products == torch.float64:
        return out
    images, used = None, 0
    k = out.cert.vectors.shape[0]
    span = check_span(out)
    if not hasattr(op, "in_float64"):
        why = "the operator has no float64 products"
    else:
        twin = op.in_float64()
        try:
            with fixed(twin):
                images = twin.matmat(span.T).T
        except FasthessError:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. a loss closure holding float32 tensors: say so, keep the answer
            why = f"float64 products failed ({type(exc).__name__}: {str(exc)[:120]})"
        used = twin.num_hvps
    if images is None:
        if floor_suffices(out.tol):
            return replace(out, precision=f"{name} products; rounding within the modelled floor (tol ≥ "
                                          f"{CHECK_BELOW:g}), not checked: {why}", check_products=used)
        return replace(_unchecked(out, f"{name} products, not checked: {why}"), check_products=used)
    values = out.cert.values
    bounds, shift = float64_widened(values, out.cert.vectors, images[:k], out.cert.bounds)
    beyond, loose = float64_reach(values, span, images, out.which)
    reordered = beyond > bounds  # the claim names the wrong eigenvalue: bound the one float64 products show instead
    bounds = torch.where(reordered, beyond + loose, bounds)
    target = torch.maximum(out.tol * values.abs(), ROUNDOFF * values.abs().max())
    converged = out.converged & (bounds <= target)
    scale = values.abs().clamp_min(1e-300)
    rel, past = float((shift / scale).max()), float((beyond / scale).max())
    if bool(out.converged.any()) and not bool(converged.all()):
        moved = (f"put an eigenvalue {past:.1e} of it beyond the claimed one (the rounding reorders the top "
                 "eigenvalues)") if bool(reordered.any()) else f"moved the eigenvalue by {rel:.1e} of it"
        warnings.warn(f"the {name} products {moved}, measured against float64 products: more than tol={out.tol:g} "
                      "allows; the result is not converged. Use a float64 model (model.double()) or a looser tol",
                      RuntimeWarning, stacklevel=3)
    return replace(out, cert=replace(out.cert, bounds=bounds), converged=converged,
                   precision=f"{name} products, checked against float64 products (shift {rel:.1e} of λ)",
                   check_products=used)


def _unchecked(out: Outcome, why: str) -> Outcome:
    """A claim from products below float64 that could not be checked in float64 is not certified."""
    warnings.warn(f"{why}; the result is not converged at tol={out.tol:g}. Use a float64 model (model.double()) or "
                  f"tol ≥ {CHECK_BELOW:g}", RuntimeWarning, stacklevel=4)
    return replace(out, converged=torch.zeros_like(out.converged), precision=why)


def drive(steps, apply):
    """Run a :func:`lanczos_steps` solve: each block P (rows) it yields is answered with ``apply(P)`` = (H Pᵀ)ᵀ;
    returns its :class:`Outcome`. Several solves can be driven in lockstep by answering their blocks together."""
    try:
        P = next(steps)
        while True:
            P = steps.send(apply(P))
    except StopIteration as stop:
        return stop.value


@dataclass(frozen=True)
class Outcome:
    """The final state of a solve, before the operator's counters are read into an :class:`EigResult`."""

    cert: Certificate
    converged: torch.Tensor
    kinds: tuple[str, ...]
    floor: float
    ritz_vectors: torch.Tensor
    which: str
    tol: float
    precision: str = "float64 products"
    start: str = RANDOM_START
    check_products: int = 0  # float64 products of the precision check (:func:`precision_checked`), one pass

    def result(self, num_hvps: int, num_passes: int, seconds: float, contract: str | None = None) -> EigResult:
        """The result, its counters those of the solve (``num_hvps``, ``num_passes``) and of the precision check;
        ``contract``: the operator's (:attr:`EigResult.contract`)."""
        return EigResult(eigenvalues=self.cert.values, eigenvectors=self.cert.vectors.T.contiguous(),
                         residuals=self.cert.residuals, error_bounds=self.cert.bounds, converged=self.converged,
                         num_hvps=num_hvps + self.check_products,
                         num_passes=num_passes + (self.check_products > 0), seconds=seconds, which=self.which, tol=self.tol,
                         certificates=self.kinds, rounding_floor=self.floor, ritz_vectors=self.ritz_vectors,
                         precision=self.precision, start=self.start, contract=contract)


def lanczos_steps(n: int, device: torch.device, dtype: torch.dtype, *, k: int, which: str, tol: float,
                  block_size: int, requested_block: int | None = None, max_iters: int | None = None,
                  v0: torch.Tensor | None = None, seed: int = 0, progress: bool | None = False,
                  max_basis: int | None = None, random_columns: int = 1,
                  threshold: float | None = None) -> Generator[torch.Tensor, torch.Tensor, Outcome]:
    """The block Lanczos iteration of :func:`eigs` as a generator: it yields each block P (b, n) float64 rows and is
    sent back W = (H Pᵀ)ᵀ; its return value is the :class:`Outcome`. ``dtype`` is the precision of the products
    (sizes the rounding floor); ``requested_block`` is the user's block_size, for the error message.

    ``threshold`` c (``which="LA"`` only, :func:`fasthess.compare_lambda_max`): stop as soon as the certified
    interval excludes c. Above: θ₁ − ω > c, since a Ritz value is a Rayleigh quotient, a lower bound on λ_max up to
    the rounding floor ω, whatever the Krylov space has missed. Below: only a claim converged at ``tol``, as in
    :func:`eigs` (a bound loosened to c − θ₁ let an early, unresolved Ritz value stand for λ_max: a red-team battery
    found "below 0.9" for a λ_max of 1.0 in 2 of 12 seeds)."""
    # One function over 60 lines on purpose: every step reads and extends the same state (Q, HQ, T, G, the block
    # width and the previous pass's claim); split, that state would travel through every call.
    gen = torch.Generator().manual_seed(seed)
    V0 = _check_v0(v0, n, device) if v0 is not None else None
    b = min(n, max(block_size, V0.shape[0] + random_columns if V0 is not None else 0))
    check_block(b, k, requested_block)
    cap = max_basis or min(MAX_BASIS, BASIS_BUDGET_BYTES // (16 * n))
    cap = min(max(cap, k + 3 * b), n + b)
    max_iters = max_iters or 1000

    Q = torch.empty(0, n, dtype=torch.float64, device=device)
    HQ = torch.empty_like(Q)
    first_rows = min(cap + b, 32)
    rows = _Rows(Q, first_rows), _Rows(HQ, first_rows)  # grown in place (see _Rows)
    T = torch.empty(0, 0, dtype=torch.float64, device=device)
    G = torch.empty_like(T)  # HQ·HQᵀ: the residual of every Ritz pair without forming its vector
    start = _random_rows(b, n, gen, device)
    if V0 is not None:
        start[: V0.shape[0]] = V0
    P = _orthonormal_rows(start, Q, gen)
    explored = V0 is not None and V0.shape[0] >= b  # no random column: the start was explored by an earlier solve
    warm = V0 is not None and not explored
    skew = 0.0
    cert = conv = theta = Y = order = last_claim = previous = None
    display, products = SolveProgress(progress, "fasthess.eigs", tol, max_iters), 0
    for it in range(max_iters):
        W = yield P
        C, D = Q @ W.T, P @ W.T
        skew = max(skew, _skew(C, HQ @ P.T, D))
        D = (D + D.T) / 2
        HW = HQ @ W.T
        T = torch.cat([torch.cat([T, C], 1), torch.cat([C.T, D], 1)], 0)
        G = torch.cat([torch.cat([G, HW], 1), torch.cat([HW.T, W @ W.T], 1)], 0)
        Q, HQ = rows[0].append(P), rows[1].append(W)
        theta, Y = torch.linalg.eigh(T)
        order = _order(theta, which)
        floor = rounding_floor(T, skew, b, dtype)
        cert = certify(theta, Y, order, k, b, Q, HQ, G, floor, which, warm=warm)
        basis = Q  # the basis of this pass's Ritz pairs, before a restart replaces Q
        exhausted = Q.shape[0] >= n  # every eigenvalue is then a Ritz value, and the gaps are exact
        target = torch.maximum(tol * cert.values.abs(), ROUNDOFF * theta.abs().max())
        meets = cert.bounds <= target
        ready = exhausted or (not cert.threatened and (explored or it + 1 >= MIN_DEPTH)
                              and not (warm and climbing(theta[order], previous, k, b, which)))
        previous = theta[order]
        # A gap-based claim stands only once the next pass confirms it (the Ritz values moved by no more than
        # the claimed bounds): an unresolved cluster looks separated until the next block splits it.
        confirmed = bool(meets.all()) and ready and (exhausted or "gap" not in cert.kinds or (
            last_claim is not None and bool(((cert.values - last_claim[0]).abs()
                                             <= last_claim[1] + 1e-13 * cert.values.abs()).all())))
        conv = meets & confirmed
        last_claim = (cert.values, cert.bounds) if bool(meets.all()) else None
        products += P.shape[0]
        display.step(it + 1, float((cert.bounds / cert.values.abs().clamp_min(1e-300)).max()), products,
                     exploring=not ready)
        above = threshold is not None and float(cert.values[0]) - floor > threshold
        if confirmed or exhausted or above or _below_floor(cert.bounds, floor, target, dtype, tol, skew):
            break
        if _saturated(theta[order], k, b) and b < min(n - Q.shape[0], MAX_BLOCK):
            b += 1  # the block is one tight cluster, which may have more members than columns: add a column
            W = torch.cat([W, _random_rows(1, n, gen, device)])
        P = _orthonormal_rows(W, Q, gen)
        if P.shape[0] == 0:
            break
        if Q.shape[0] + P.shape[0] > cap:
            keep = order[: max(k + b, (cap - b) // 2)]
            Yk = Y[:, keep]
            Q, HQ, T, G = Yk.T @ Q, Yk.T @ HQ, torch.diag(theta[keep]), Yk.T @ G @ Yk
            rows = _Rows(Q, cap + b), _Rows(HQ, cap + b)  # new buffers: ``basis`` still views the old ones
    display.close(bool(conv.all()))
    kinds = tuple("exhausted" if exhausted else kind for kind in cert.kinds)
    ritz = Y[:, order[: _warm_count(theta[order], k, which)]].T @ basis
    return Outcome(cert=cert, converged=conv, kinds=kinds, floor=floor, which=which, tol=float(tol),
                   ritz_vectors=(ritz / ritz.norm(dim=1, keepdim=True)).T.contiguous(),
                   start=EXPLORED_START if explored else WARM_START if warm else RANDOM_START)


class _Rows:
    """A stack of rows that grows in place: appends copy only the new rows, into a buffer of ``capacity`` rows that
    doubles when full (concatenating the basis anew every pass cost 7 % of an MLP solve, mostly fresh memory)."""

    def __init__(self, rows: torch.Tensor, capacity: int) -> None:
        self._buf = rows.new_empty(max(capacity, rows.shape[0]), rows.shape[1])
        self._m = rows.shape[0]
        self._buf[: self._m] = rows

    def append(self, new: torch.Tensor) -> torch.Tensor:
        """Add ``new`` below the stored rows; returns a view of all of them."""
        m = self._m + new.shape[0]
        if m > self._buf.shape[0]:
            buf = self._buf.new_empty(max(m, 2 * self._buf.shape[0]), self._buf.shape[1])
            buf[: self._m] = self._buf[: self._m]
            self._buf = buf
        self._buf[self._m: m] = new
        self._m = m
        return self._buf[:m]


def _warm_count(ordered: torch.Tensor, k: int, which: str) -> int:
    """How many of the most wanted Ritz vectors a later solve starts from: the top k + 1, and the next ones while
    they and the (k+1)-th form a cluster far tighter than the distance to the Ritz value after them (at most
    MAX_WARM_EXTRA more). The eigenvectors of a near-tie are defined only as a span: a red-team tracker battery found
    the tracker carrying one member of a tie at the second eigenvalue while the other rose past the top in one
    update, and the old top certified (1 in 24288 updates); carrying the tied vector found the new top."""
    c = min(k + 1, ordered.shape[0])
    edge = ordered[c - 1]
    while (c + 1 < ordered.shape[0] and c < k + 1 + MAX_WARM_EXTRA
           and bool(distance(edge, ordered[c], which) <= SATURATION * distance(ordered[c], ordered[c + 1], which))):
        c += 1
    return c


def _saturated(ordered: torch.Tensor, k: int, b: int) -> bool:
    """The block's b most wanted Ritz values form one cluster around the wanted ones, far tighter than the distance
    to the next Ritz value: a cluster of more than b eigenvalues would look the same, and one of its members can
    hide from a b-column block (:mod:`fasthess._certificate`)."""
    if b < 2 or ordered.shape[0] <= b:
        return False
    last = ordered[k - 1]
    return bool((last - ordered[b - 1]).abs() <= SATURATION * (last - ordered[b]).abs())


def _skew(C: torch.Tensor, C_other: torch.Tensor, D: torch.Tensor) -> float:
    """Spectral-norm estimate of the antisymmetric part of this pass's new block column of T, as computed from
    both sides (q·Hp against p·Hq): a measurement of the products' rounding (zero in exact arithmetic)."""
    parts = [(C - C_other).norm() / 2 ** 0.5, (D - D.T).norm() / 2]
    return float(max(parts))


def _below_floor(bounds: torch.Tensor, floor: float, target: torch.Tensor, dtype: torch.dtype, tol: float,
                 skew: float) -> bool:
    """The rounding floor exceeds what tol asks for and already dominates the bounds, so more passes cannot
    certify the result: warn and stop. The warning names the floor's source: the dtype's roundoff, or (when
    SKEW_FACTOR·skew dominates) products that are measurably asymmetric, which a float64 model does not cure."""
    if floor <= float(target.min()) or float((bounds - floor).max()) > floor:
        return False
    if dtype == torch.float64 and SKEW_FACTOR * skew >= floor:  # in float32 a skew this size is plain rounding
        cause = (f"the products are not symmetric: q·Hp and p·Hq differ by {skew:.2e} (measured skew), which a "
                 "Hessian's products should not; it can come from double backward through a reparametrization "
                 "(weight_norm, spectral_norm), a loss that upcasts part of the graph (.float() inside a float64 "
                 "model), or a nondeterministic kernel. Make the forward pass one dtype and deterministic, or use a "
                 "looser tol")
    else:
        cause = f"{dtype} products cannot resolve it. Use a float64 model (model.double()) or a looser tol"
    warnings.warn(f"tol={tol:g} is below what can be certified here (rounding floor {floor:.2e} of the eigenvalues); "
                  f"the result is not converged: {cause}", RuntimeWarning, stacklevel=3)
    return True
