"""What λ_max on a subset of the data costs in accuracy: the subset estimator against the full-data value.

A common practice takes λ_max of the Hessian of the loss on a subset S of the training data (a fixed strided
subset of 1000 examples in Cohen et al.'s Edge-of-Stability code, a random batch elsewhere) in place of the full
data. :func:`subset_lambda_max` measures that estimator: for each subset size m, λ_max(H_S) on ``repeats`` random
subsets drawn without replacement (and, if asked, on the strided subset of every (N // m)-th example), each solve
certified, next to the certified full-data λ = λ_max(H). With d_i = λ_max(H_{S_i}) − λ over r repeats:

* bias = mean(d), with the Student-t interval bias ± t_{r−1} · s_d/√r at the given confidence;
* RMS error = √mean(d²), with the interval √(mean(d²) ± t_{r−1} · s_{d²}/√r) (the lower end clipped at 0);

both widened by the certified errors of the eigenvalues (each d_i is off by at most its subset bound plus the full
bound; the bias interval adds their mean, the RMS interval their largest). A size is *within* ``rtol`` when every
value measured at it (random and strided) lies within rtol·|λ| of λ. The intervals need no SciPy: the two-sided
Student-t quantile comes from the closed-form t distribution of integer degrees of freedom (Abramowitz & Stegun
26.7.3-4), inverted by bisection.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fasthess._api import lambda_max
from fasthess._data import is_tensor_tuple
from fasthess.errors import FasthessError
from fasthess.results import EigResult


def t_within(t: float, df: int) -> float:
    """P(|T| ≤ t) for Student's t with integer ``df`` ≥ 1 degrees of freedom (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: (2/π)(θ + sinθ cosθ Σ_{j} (2·4···2j)/(3·5···(2j+1)) cos^{2j}θ), j = 0 .. (df−3)/2
        term, total = math.cos(theta), 0.0
        for j in range((df - 1) // 2):
            total += term
            term *= c2 * (2 * j + 2) / (2 * j + 3)
        return 2 / math.pi * (theta + s * total)
    term, total = 1.0, 0.0  # even: sinθ Σ_{j} (1·3···(2j−1))/(2·4···2j) cos^{2j}θ, j = 0 .. (df−2)/2
    for j in range(df // 2):
        total += term
        term *= c2 * (2 * j + 1) / (2 * j + 2)
    return s * total


def t_two_sided(confidence: float, df: int) -> float:
    """The t with P(|T| ≤ t) = ``confidence`` for integer ``df`` (bisection to 1e-12 relative)."""
    lo, hi = 0.0, 1.0
    while t_within(hi, df) < confidence:
        hi *= 2
    while hi - lo > 1e-12 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_within(mid, df) < confidence else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class SubsetSize:
    """The subset estimator at one size: values, spread, bias and RMS error against the full value (module doc)."""

    size: int
    values: torch.Tensor
    indices: list[torch.Tensor]
    mean: float
    std: float
    bias: float
    bias_interval: tuple[float, float]
    rmse: float
    rmse_interval: tuple[float, float]
    strided: float | None
    within: bool
    num_hvps: int

    def __repr__(self) -> str:
        strided = "" if self.strided is None else f", strided={self.strided:.6g}"
        return (f"SubsetSize(size={self.size}, mean={self.mean:.6g}, std={self.std:.3g}, bias={self.bias:+.3g} "
                f"[{self.bias_interval[0]:+.3g}, {self.bias_interval[1]:+.3g}], rmse={self.rmse:.3g} "
                f"[{self.rmse_interval[0]:.3g}, {self.rmse_interval[1]:.3g}]{strided}, within={self.within})")


@dataclass(frozen=True)
class SubsetStudy:
    """The full-data λ_max and the subset estimator at every size; ``smallest_within`` is the smallest size from which
    on every tested size is within ``rtol`` (None if not even the largest is)."""

    full: EigResult
    sizes: tuple[SubsetSize, ...]
    rtol: float
    confidence: float
    smallest_within: int | None

    @property
    def full_value(self) -> float:
        return float(self.full.eigenvalues[0])

    def __repr__(self) -> str:
        head = (f"SubsetStudy(full λ_max={self.full_value:.6g}, rtol={self.rtol:g}, confidence={self.confidence:g}, "
                f"smallest size within rtol={self.smallest_within})")
        return "\n  ".join([head, *map(repr, self.sizes)])


def summarize_size(size: int, values: Sequence[float], bounds: Sequence[float], full: float, full_bound: float,
                   *, confidence: float, rtol: float, strided: float | None = None,
                   indices: list[torch.Tensor] | None = None, num_hvps: int = 0) -> SubsetSize:
    """The statistics of the module docstring from the subset values, their certified bounds and the full value."""
    r = len(values)
    v = torch.tensor(values, dtype=torch.float64)
    d = v - full
    t = t_two_sided(confidence, r - 1)
    slack = float(torch.tensor(bounds, dtype=torch.float64).mean()) + full_bound
    bias = float(d.mean())
    half = t * float(d.std()) / math.sqrt(r) + slack
    m2, half2 = float(d.square().mean()), t * float(d.square().std()) / math.sqrt(r)
    worst = max(bounds) + full_bound
    measured = [*values, *([] if strided is None else [strided])]
    return SubsetSize(size=size, values=v, indices=indices or [], mean=float(v.mean()), std=float(v.std()),
                      bias=bias, bias_interval=(bias - half, bias + half), rmse=math.sqrt(m2),
                      rmse_interval=(max(math.sqrt(max(m2 - half2, 0.0)) - worst, 0.0), math.sqrt(m2 + half2) + worst),
                      strided=strided, within=all(abs(x - full) <= rtol * abs(full) for x in measured),
                      num_hvps=num_hvps)


def smallest_within(sizes: Sequence[SubsetSize]) -> int | None:
    """The smallest size from which on every tested size is within the tolerance."""
    best = None
    for s in sorted(sizes, key=lambda s: s.size, reverse=True):
        if not s.within:
            break
        best = s.size
    return best


def _check(sizes, repeats, rtol, confidence, num_examples: int) -> list[int]:
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 2:
        raise FasthessError(f"repeats={repeats!r} must be an integer ≥ 2 (the spread and the intervals need two values)")
    if not isinstance(rtol, (int, float)) or not rtol > 0:
        raise FasthessError(f"rtol={rtol!r} must be a positive relative tolerance, e.g. 0.1")
    if not isinstance(confidence, float) or not 0 < confidence < 1:
        raise FasthessError(f"confidence={confidence!r} must be a probability strictly between 0 and 1, e.g. 0.95")
    if isinstance(sizes, int) or not isinstance(sizes, Sequence) or not sizes:
        raise FasthessError(f"sizes={sizes!r} must be a non-empty list of subset sizes, e.g. [100, 1000]")
    for m in sizes:
        if isinstance(m, bool) or not isinstance(m, int) or not 2 <= m <= num_examples:
            raise FasthessError(f"subset size {m!r} must be an integer between 2 and the {num_examples} examples")
    return sorted(set(sizes))


def _certified(result: EigResult, what: str) -> EigResult:
    if not result.all_converged:
        raise FasthessError(f"λ_max of {what} did not converge ({result!r}); raise max_iters or loosen tol")
    return result


def subset_lambda_max(model: nn.Module, loss_fn: Callable, data, *, sizes: Sequence[int], repeats: int = 8,
                      stride: bool = False, rtol: float = 0.1, confidence: float = 0.95, seed: int = 0,
                      batch_size: int | None = None, **lambda_max_options) -> SubsetStudy:
    """λ_max on ``repeats`` random subsets of each size in ``sizes`` against the full-data λ_max (module docstring).

    Args:
        data: ``(X, y)`` or ``(X, y, w)`` tensors, from which the subsets are drawn (rows).
        stride: also take the strided subset of each size, every (N // size)-th example from the first (the fixed
            subset of the Edge-of-Stability code); reported as ``strided``, and counted in ``within``.
        rtol: the relative tolerance of ``within`` and ``smallest_within``.
        confidence: level of the bias and RMS-error intervals.
        seed: seed of the subset draws (``SubsetSize.indices`` lists them) and of the solves.
        batch_size, lambda_max_options: as :func:`fasthess.lambda_max` (``tol``, ``params``, ``curvature``, ...),
            the same for every solve. Raises if a solve does not certify its value.
    """
    if not is_tensor_tuple(data):
        raise FasthessError("subset_lambda_max needs the data as a tuple (X, y) or (X, y, w) of tensors, to draw "
                            "subsets of its rows")
    n = data[0].shape[0]
    if any(t.shape[0] != n for t in data):
        raise FasthessError(f"the data tensors have different numbers of rows ({[t.shape[0] for t in data]})")
    chosen = _check(sizes, repeats, rtol, confidence, n)

    def solve(idx: torch.Tensor | None, what: str) -> EigResult:
        part = data if idx is None else tuple(t[idx.to(t.device)] for t in data)
        return _certified(lambda_max(model, loss_fn, part, batch_size=batch_size, seed=seed, **lambda_max_options),
                          what)

    full = solve(None, "the full data")
    lam, full_bound = float(full.eigenvalues[0]), float(full.error_bounds[0])
    gen = torch.Generator().manual_seed(seed)
    out = []
    for m in chosen:
        indices = [torch.randperm(n, generator=gen)[:m] for _ in range(repeats)]
        results = [solve(idx, f"a random subset of {m}") for idx in indices]
        strided = solve(torch.arange(0, n, n // m)[:m], f"the strided subset of {m}") if stride else None
        out.append(summarize_size(
            m, [float(r.eigenvalues[0]) for r in results], [float(r.error_bounds[0]) for r in results], lam,
            full_bound, confidence=confidence, rtol=rtol, indices=indices,
            strided=None if strided is None else float(strided.eigenvalues[0]),
            num_hvps=sum(r.num_hvps for r in results) + (0 if strided is None else strided.num_hvps)))
    return SubsetStudy(full=full, sizes=tuple(out), rtol=float(rtol), confidence=confidence,
                       smallest_within=smallest_within(out))
