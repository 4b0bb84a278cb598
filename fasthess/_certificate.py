"""What a Lanczos result may honestly claim about each eigenvalue, and on which bound the claim rests.

Setting: an orthonormal basis Q (rows) of a block Krylov space grown from a start block of b columns, at least
one of them random; the images HQ of its rows, as computed; the projection T = Q H Qᵀ and its Ritz pairs
(θᵢ, xᵢ = Qᵀyᵢ) with residuals rᵢ = H xᵢ − θᵢ xᵢ formed from the stored products.

Two bounds are available for a wanted θᵢ:

* **residual** (Krylov–Bogoliubov): some eigenvalue λ of H satisfies |λ − θᵢ| ≤ ‖rᵢ‖. It needs no gap.
* **gap** (Kato–Temple): if the interval between θᵢ and its neighbouring Ritz value θⱼ holds no eigenvalue other
  than λ, then |λ − θᵢ| ≤ ‖rᵢ‖² / gᵢ with gᵢ = |θᵢ − θⱼ| − ‖rⱼ‖. Quadratic in the residual, so it certifies
  about twice the digits for the same Krylov depth; but it rests on an assumption that no Krylov method can
  check: that no eigenvalue hides in the gap, unseen by the basis.

Neither bound says that λ is the i-th *wanted* eigenvalue (λ_max, say) rather than some other one; that is the
Krylov assumption: the start block has a component along the wanted eigenvector. A random column has one with
probability 1, a warm start (v0) need not, which is why every start block carries at least one fresh random
column (:func:`fasthess.lanczos.eigs`).

When is the gap assumption safe? A block Krylov space grown from b random columns captures, once the rest of the
spectrum is damped, a b-dimensional random subspace of any cluster of nearby eigenvalues. If the cluster around
λᵢ has c ≤ b members, all of them appear as Ritz values and the gap to the neighbour is real. If c > b (with b = 1
this is any near-degenerate pair), the Ritz vector is a mixture of cluster members, its residual is small
(≈ sin φ cos φ·δ for a pair δ apart mixed at angle φ) while its error is sin²φ·δ, and the neighbouring Ritz value
is far away, outside the cluster: the Kato–Temple bound ‖r‖²/g is then smaller than the error by the ratio of
the cluster width to g. Measured on pairs 5·10⁻⁴ apart (b = 1): false claims in 10 of 12 seeds. So a gap is
used only when

1. the neighbour θⱼ ranks within the block (among the b most wanted Ritz values): then a cluster large enough to
   hide an eigenvalue next to θᵢ would have pulled θⱼ into the cluster, and the gap would be as small as the
   cluster (which the next rule and the quadratic bound handle);
2. the neighbour is itself resolved: ‖rⱼ‖ ≤ |θᵢ − θⱼ| / 2 (an unresolved θⱼ gives no gap);
3. the claim survives one confirming pass: the Ritz values move by no more than the claimed bounds (an
   unresolved cluster looks separated until the next block splits it; found by a hypothesis search).

Otherwise the residual bound is the certificate. With b = 1 that is always the case, and even the residual bound
can then name the wrong eigenvalue of a near-degenerate pair (the Ritz vector may be mostly the second
eigenvector), which is why the default block is k + 1, one random column more than the wanted eigenvalues.

A third guard concerns the Krylov assumption itself. Scan the unwanted Ritz values from the wanted end down to
the first resolved one (‖rₚ‖ ≤ |θₖ − θₚ|/2). If one of them is so unresolved that θₚ + 3‖rₚ‖ reaches past the
last wanted θₖ (for ``which="LA"``; mirrored for the others), its Ritz vector may still carry spectral mass beyond
the wanted values (by Cantelli's inequality up to a tenth of it): the space is still exploring, and nothing is
certified. (With a reach of 2‖rₚ‖, a fifth, a red-team tracker battery found one certified miss in 7362 updates:
a bulk eigenvalue rising 5 % past an exact pair of warm eigenvectors; with full blocks a reach of 3 leaves the
MLP tracker's updates at 15, 12, 12, 15, 12, 12, 12 products, as with 2.) The typical case is a warm start that is
an exact eigenvector below λ_max, next to random columns that have not yet climbed. In a cold solve, unresolved
Ritz values below a resolved one are the ordinary frontier of the Krylov space and do not count; after a warm start every unwanted Ritz value counts, because exact lower
eigenvectors in v0 are resolved at once and would otherwise hide the random columns' Ritz values below them
(found by a red-team battery: v0 = the eigenvectors of λ₂ and λ₃ was certified as λ_max in 18–20 of 20 seeds).
Together with a minimum depth of three passes before a claim that rests on random columns
(:data:`fasthess.lanczos.MIN_DEPTH`), this kept every warm start of benchmarks/certificate_battery.py from being
certified before the random columns had found the top. It was not enough in wide spaces: a random column holds a
~1/√n share of an eigenvector that rose from deep in the bulk, and three passes do not amplify it into a threat (at
n = 20000, the old top certified in 3 to 20 of 20 seeds). So a warm start also waits until its frontier has stopped
climbing (:func:`climbing`), as a cold solve's Ritz values have by the time its top converges.

A start without a fresh random column (``random_columns=0``: the Ritz vectors of a subset solve that carried one,
:func:`fasthess.from_subset.eigs_subsampled`, as a tracker update with ``explore="subsample"`` does) takes its Krylov
assumption from that earlier exploration: no minimum depth applies, and the unwanted Ritz values are scanned as in a
cold solve (``warm=False``), since no random columns are there to be hidden by exact lower eigenvectors. The
tracker battery (benchmarks/tracking_battery.py): 0 false for swaps, rises and rotations even with a subset that
saw nothing of them (the carried (k+1)-th vector is in the start); a direction rising from deep in the bulk is
found only if the subset sees it (0 of 240 at a subset error ≤ 5 %, 1 of 120 at 20 %, 57 of 120 blind).

For ``which="LM"`` the scan measures distance in magnitude, ||θₚ| − |θₖ||: a Ritz value near −1.00001 is the
neighbour of a wanted +1, and is resolved only when its residual is small next to 10⁻⁵, not next to 2 (a red-team
battery found +1 certified as the largest magnitude in 1 of 3085 solves, and 3 of 3121 while the solver had
narrow passes, which stopped refining the far end).

Rounding: the products are computed in the operator's dtype, so the matrix the solver sees differs from H by a
perturbation E, and every eigenvalue may move by ‖E‖ (Weyl). Each bound therefore adds a floor
ω = max(√b·u·‖T‖, 4·‖skew(T)‖) where u is the unit roundoff of the operator's dtype and skew(T) is the
antisymmetric part of the projected matrix as computed from both sides (qᵢ·H qⱼ against qⱼ·H qᵢ), a direct
measurement of the products' rounding from stored blocks (one extra block product per pass, no operator
product). For float64 operators ω is negligible; for float32 models it is what keeps a bound at tol 1e-9 true.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

#: the certificate kinds an eigenvalue can carry (``EigResult.certificates``)
KINDS = ("gap", "residual", "exhausted")
RESOLVED = 0.5  # a neighbour is resolved when its residual is at most this share of the distance
SKEW_FACTOR = 4.0  # ω ≥ this × the measured antisymmetric part of T
REACH = 3.0  # an unresolved unwanted θₚ threatens when θₚ + REACH·‖rₚ‖ reaches the last wanted θ
CLIMB = 0.1  # after a warm start, the frontier still explores while it rose by more than this share of its distance


@dataclass(frozen=True)
class Certificate:
    """The wanted Ritz pairs of one pass and what may be claimed about them (rows are eigenvectors)."""

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    bounds: torch.Tensor
    kinds: tuple[str, ...]
    threatened: bool


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = ε/2 of a floating dtype (float64 when the operator does not say)."""
    return torch.finfo(dtype).eps / 2


def rounding_floor(T: torch.Tensor, skew: float, b: int, dtype: torch.dtype) -> float:
    """ω = max(√b·u·‖T‖₂, SKEW_FACTOR·‖skew(T)‖): the eigenvalue error the products' rounding alone may cause."""
    norm = float(torch.linalg.matrix_norm(T, ord=2)) if T.numel() else 0.0
    return max(b ** 0.5 * unit_roundoff(dtype) * norm, SKEW_FACTOR * skew)


#: without float64 products to check against, a claim from products below float64 rests on ω down to this tol only
CHECK_BELOW = 1e-4


def floor_suffices(tol: float) -> bool:
    """Whether a claim from products below float64 may rest on the modelled floor ω alone, for an operator that has
    no float64 products to check it against (with them, every such claim is checked: :func:`float64_widened`).

    ω models rounding as a backward-stable perturbation of size u·‖T‖. A saturated float32 classifier breaks that
    model: its backward computes σ' as σ(1 − σ) (tanh' as 1 − y²), whose relative error grows like u/(1 − σ) and
    is a fixed factor per example, a symmetric perturbation JᵀΔDJ that the skew of T does not show. Red teams found
    float32 answers 2·10⁻⁶ to 8.5·10⁻⁶ off certified at tol 10⁻⁶, and, with a tanh MLP trained by Adam to a loss of
    3·10⁻⁶, the tracker at its defaults (tol 10⁻⁴) certifying answers 2.4–3.6·10⁻⁴ off in 11 of 42 updates. So
    model operators check every claim of lower-precision products; an operator without float64 products (a user's
    own float32 operator) is trusted on ω down to CHECK_BELOW, and not certified below it."""
    return tol >= CHECK_BELOW


def float64_widened(values: torch.Tensor, vectors: torch.Tensor, images64: torch.Tensor,
                    bounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds widened by what the products' rounding did to each eigenvalue, measured in float64.

    ``images64`` are H xᵢ from float64 products (rows). ρᵢ = xᵢ·H xᵢ is the float64 Rayleigh quotient of the Ritz
    vector; θᵢ − ρᵢ = xᵢᵀ E xᵢ is the first-order shift of λᵢ by the rounding E of the lower-precision products. The
    bound becomes bound + 2|θᵢ − ρᵢ| (twice the first-order shift, for the second-order term). Returns the widened
    bounds and the measured shifts |θᵢ − ρᵢ|."""
    rho = (vectors * images64).sum(dim=1)
    shift = (values - rho).abs()
    return bounds + 2 * shift, shift


def float64_reach(values: torch.Tensor, span: torch.Tensor, images64: torch.Tensor,
                  which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """How far past each wanted θᵢ the float64 operator provably reaches, and how loosely: (max(0, μᵢ − θᵢ) in the
    wanted direction, ‖H zᵢ − μᵢ zᵢ‖).

    ``span`` (rows) holds the wanted Ritz vectors and the next ones, ``images64`` their float64 images; (μᵢ, zᵢ) are
    the Ritz pairs of H on span(``span``), from the float64 products. By Cauchy interlacing the i-th wanted
    eigenvalue of H lies at or beyond μᵢ (for ``"LM"``: |λ|ᵢ ≥ |μ|ᵢ, as singular values of a compression), and some
    eigenvalue lies within ‖H zᵢ − μᵢ zᵢ‖ of μᵢ. The Rayleigh quotients of :func:`float64_widened` cannot see rounding
    that *reorders* a near-degenerate top pair: the lower-precision Ritz vector is then an exact float64 eigenvector
    of the second eigenvalue, its shift is zero, and the claim names the wrong eigenvalue; the next Ritz vector's
    float64 product shows the higher one."""
    L = torch.linalg.cholesky(span @ span.T)  # the span's rows are orthonormal only to the products' precision
    basis = torch.linalg.solve_triangular(L, span, upper=False)
    images = torch.linalg.solve_triangular(L, images64, upper=False)
    projected = basis @ images.T
    mu, C = torch.linalg.eigh((projected + projected.T) / 2)
    order = torch.argsort(_toward(mu, which) * mu, descending=True)[: values.shape[0]]  # most wanted first
    mu, C = mu[order], C[:, order]
    residual = (C.T @ images - mu[:, None] * (C.T @ basis)).norm(dim=1)
    beyond = _toward(mu, which) * mu - _toward(values, which) * values
    return beyond.clamp_min(0), residual


def _all_residuals(theta: torch.Tensor, Y: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """‖H xₚ − θₚ xₚ‖ for every Ritz pair from the Gram matrix G = HQ·HQᵀ: ‖r‖² = yᵀGy − θ² (accurate to √ε·|θ|,
    enough to tell an unresolved Ritz value from a resolved one)."""
    r2 = torch.einsum("ip,ij,jp->p", Y, G, Y) - theta * theta
    return r2.clamp_min(0).sqrt()


def _beyond(x: torch.Tensor, y: torch.Tensor, which: str) -> torch.Tensor:
    """x lies at or beyond y in the wanted direction."""
    if which == "LA":
        return x >= y
    if which == "SA":
        return x <= y
    return x.abs() >= y.abs()


def certify(theta: torch.Tensor, Y: torch.Tensor, order: torch.Tensor, k: int, b: int, Q: torch.Tensor,
            HQ: torch.Tensor, G: torch.Tensor, floor: float, which: str, warm: bool) -> Certificate:
    """Wanted Ritz pairs with residuals, error bounds (floor included) and their kinds (see the module docstring).

    ``order`` ranks the Ritz values from most to least wanted; ``b`` is the current block width (the start block's,
    plus the columns a saturated block has gained). ``warm``: the start block held a v0 next to random columns, so
    every unwanted Ritz value is scanned.
    """
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.shape[0], device=order.device)
    asc = torch.argsort(theta)
    pos = torch.empty_like(asc)
    pos[asc] = torch.arange(asc.shape[0], device=asc.device)
    want = order[:k].tolist()
    nbrs = {i: [int(asc[q]) for q in (int(pos[i]) - 1, int(pos[i]) + 1) if 0 <= q < asc.shape[0]] for i in want}
    idx = sorted(set(want).union(*nbrs.values()))
    row = {j: r for r, j in enumerate(idx)}
    X, HX = Y[:, idx].T @ Q, Y[:, idx].T @ HQ
    norms = X.norm(dim=1, keepdim=True)
    X, HX = X / norms, HX / norms
    res = (HX - theta[idx][:, None] * X).norm(dim=1)
    bounds, kinds = [], []
    for i in want:
        r = res[row[i]]
        gaps = [abs(theta[i] - theta[j]) - res[row[j]] for j in nbrs[i]
                if int(rank[j]) < b and res[row[j]] <= RESOLVED * abs(theta[i] - theta[j])]
        # a gap needs every neighbour usable: an unusable one (beyond the block, unresolved) may hide an eigenvalue
        gap = min(gaps) if len(gaps) == len(nbrs[i]) and gaps else None
        if gap is not None and gap > 0 and r * r / gap < r:
            bounds.append(r * r / gap + floor)
            kinds.append("gap")
        else:
            bounds.append(r + floor)
            kinds.append("residual")
    w = [row[i] for i in want]
    last = theta[want[-1]]
    others = order[k:]
    threatened = False
    if others.numel():  # scan the unwanted Ritz values from the wanted end (cold: down to the first resolved one)
        r_all = _all_residuals(theta[others], Y[:, others], G)
        dist = distance(theta[others], last, which)
        reach = theta[others] + REACH * _toward(theta[others], which) * r_all
        resolved = (r_all <= RESOLVED * dist).nonzero()
        stop = int(resolved[0]) if resolved.numel() and not warm else others.numel()
        threatened = bool(_beyond(reach[:stop], last, which).any())
    return Certificate(theta[want], X[w], res[w], torch.stack(bounds).to(theta.device), tuple(kinds), threatened)


def climbing(ordered: torch.Tensor, previous: torch.Tensor | None, k: int, b: int, which: str) -> bool:
    """The frontier of a warm-started space is still climbing: one of the b unwanted Ritz values next to the wanted
    ones (ranks k … k + b − 1, ``ordered`` from most to least wanted) moved toward the last wanted θₖ, in the last
    pass, by more than CLIMB times its remaining distance to θₖ (``previous``: the last pass's ordered values).

    Why: exact lower eigenvectors in v0 are resolved at once, so a warm start's claim is ready as soon as the random
    columns do not threaten (the REACH scan). Those columns find an eigenvalue that rose from deep in the bulk only
    when the Krylov polynomial has amplified its ~1/√n share of a random vector, and while they are still climbing
    toward the top, that has not happened: at n = 20000, v0 = the exact eigenvectors of λ₂ and λ₃ and a new top 2 % or
    50 % above them, the frontier rose by 40 % of its distance per pass when the minimum depth was reached, and the
    old top was certified in 3 to 20 of 20 seeds; once the new top is found the frontier settles to 1–3 % a pass.
    Rising Ritz values are what any Krylov space shows while it explores (by Cauchy interlacing the j-th most
    wanted Ritz value only moves toward the wanted end as the space grows), so a space that has stopped climbing
    has done what a cold solve does before it may converge."""
    if previous is None:
        return True
    m = min(k + b, previous.shape[0], ordered.shape[0])
    if m <= k:
        return False
    now, before, last = ordered[k:m], previous[k:m], ordered[k - 1]
    rise = distance(before, last, which) - distance(now, last, which)
    return bool((rise > CLIMB * distance(now, last, which)).any())


def distance(x: torch.Tensor, y: torch.Tensor, which: str) -> torch.Tensor:
    """How far x lies from y along the order of ``which``: |x − y|, or ||x| − |y|| for LM, where −1.00001 and
    +1 are neighbours (a Ritz value at the other end is resolved only when its residual is small next to that)."""
    return (x.abs() - y.abs()).abs() if which == "LM" else (x - y).abs()


def _toward(x: torch.Tensor, which: str) -> torch.Tensor:
    """The sign that moves x toward the wanted end (+1 for LA, −1 for SA, sign(x) for LM)."""
    if which == "LA":
        return torch.ones_like(x)
    if which == "SA":
        return -torch.ones_like(x)
    return torch.sign(x) + (x == 0).to(x.dtype)
