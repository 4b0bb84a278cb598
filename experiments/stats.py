"""Statistics for seeded sweeps: per-configuration summaries, paired contrasts over seeds, and the three-way
decision rules the verdicts use.

**Accuracy contrasts** (a weighted sum ``Σ_c w_c acc_c`` of configurations run with the same seeds, e.g. a
gain ``acc_A − acc_B``). Let ``D[s, i] = Σ_c w_c correct_c[s, i]`` for seed s = 1..n and test example
i = 1..m. The target is the expected contrast over *both* seeds and the test distribution; the model is the
two-way random-effects layout ``D[s, i] = μ + a_s + b_i + e_si`` (seed effect, test-example effect,
interaction). The estimate is the grand mean D̄, whose variance ``σ_a²/n + σ_b²/m + σ_e²/(nm)`` is estimated
without bias by

    V = V_seed + V_test − V_int,   V_seed = var_s(D̄_s·)/n,   V_test = var_i(D̄_·i)/m,
    V_int = MS_e/(nm),  MS_e = Σ (D − D̄_s· − D̄_·i + D̄)² / ((n−1)(m−1)),

(``V_seed`` alone already holds ``σ_e²/(nm)``, ``V_test`` alone holds it again); V is floored at
``V_test``. The interval is ``D̄ ± t_{df} √V`` with Satterthwaite's degrees of freedom. ``V_test`` is the
McNemar-type term: the test set is shared by every seed, so its sampling noise does not average out over
seeds. With one seed there is no interval.

**λ_max contrasts** are taken on log λ_max (effects are multiplicative), paired by seed, with a t-interval
over seeds (λ_max is a property of the training set, no test-sampling term).

**Decisions.** ``improves``: the 95 % interval lies above 0 (reproduced) or below 0 (contradicted).
``equivalent`` (TOST at 5 %): the 90 % interval lies inside (−margin, margin) (reproduced); the 95 %
interval lies wholly outside it (contradicted). Claims over several comparisons: "all of them" is an
intersection-union test (each at the nominal level), "at least one of them" uses Bonferroni-adjusted levels.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

REPRODUCED, CONTRADICTED, INCONCLUSIVE = "reproduced", "contradicted", "inconclusive"


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) by its continued fraction (modified Lentz), evaluated on the side
    where it converges fast: for x > (a+1)/(a+b+2), I_x(a, b) = 1 − I_{1−x}(b, a)."""
    if x <= 0.0 or x >= 1.0:
        return min(max(x, 0.0), 1.0)
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    f, c, d = 1.0, 1.0, 0.0
    for i in range(1000):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
        c = 1.0 + num / c
        c = c if abs(c) > 1e-300 else 1e-300
        f *= c * d
        if abs(1.0 - c * d) < 1e-16:
            return front * (f - 1.0)
    raise ArithmeticError(f"incomplete beta I_{x}({a}, {b}) did not converge")


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with real ``df`` > 0: the t with 1 − ½ I_{df/(df+t²)}(df/2, ½) = p for
    p > ½ (symmetric below), by bisection to 1e-14 relative."""
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    tail = lambda t: 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))  # noqa: E731  P(T > t)
    lo, hi = 0.0, 1.0
    while tail(hi) > 1.0 - p:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-14 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tail(mid) > 1.0 - p else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Interval:
    """An estimate with a two-sided confidence interval at ``level``; ``lo``/``hi`` are NaN when undefined."""

    estimate: float
    lo: float
    hi: float
    level: float
    n: int  # seeds
    df: float
    method: str

    @property
    def defined(self) -> bool:
        return math.isfinite(self.lo) and math.isfinite(self.hi)

    def as_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def _interval(est: float, var: float, df: float, level: float, n: int, method: str) -> Interval:
    if not (n >= 2 and var >= 0 and df > 0 and math.isfinite(var)):
        return Interval(est, math.nan, math.nan, level, n, df, method)
    h = t_quantile(0.5 + level / 2, df) * math.sqrt(var)
    return Interval(est, est - h, est + h, level, n, df, method)


@dataclass(frozen=True)
class Summary:
    """Mean, sample SD and a t-interval for the mean of per-seed values."""

    n: int
    mean: float
    sd: float
    lo: float
    hi: float


def summarize(values: Sequence[float], level: float = 0.95) -> Summary:
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    sd = float(x.std(ddof=1)) if n > 1 else math.nan
    iv = _interval(mean, sd * sd / n if n > 1 else math.nan, n - 1, level, n, "t")
    return Summary(n, mean, sd, iv.lo, iv.hi)


def summarize_log(values: Sequence[float], level: float = 0.95) -> Summary:
    """Geometric mean, the SD of log values, and the t-interval of the log mean mapped back (for λ_max)."""
    s = summarize(np.log(np.asarray(values, dtype=float)), level)
    return Summary(s.n, math.exp(s.mean) if s.n else math.nan, s.sd, math.exp(s.lo) if s.n > 1 else math.nan,
                   math.exp(s.hi) if s.n > 1 else math.nan)


def paired_t(values: Mapping[str, Mapping[int, float]], weights: Mapping[str, float], level: float = 0.95,
             log: bool = False) -> Interval:
    """t-interval of ``Σ_c w_c x_c`` paired by seed over the seeds every weighted configuration has."""
    seeds = _common_seeds(values, weights)
    f = np.log if log else np.asarray
    d = np.array([sum(w * float(f(values[c][s])) for c, w in weights.items() if w) for s in seeds])
    n = len(d)
    est = float(d.mean()) if n else math.nan
    var = float(d.var(ddof=1)) / n if n > 1 else math.nan
    return _interval(est, var, n - 1, level, n, "paired t over seeds" + (" (log λ)" if log else ""))


def contrast(correct: Mapping[str, Mapping[int, np.ndarray]], weights: Mapping[str, float],
             level: float = 0.95) -> Interval:
    """The accuracy contrast ``Σ_c w_c acc_c`` with the seed × test-example interval of the module docstring.

    ``correct[c][s]`` is the 0/1 vector of configuration c's run with seed s on the (shared) test set."""
    seeds = _common_seeds(correct, weights)
    n = len(seeds)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, level, 0, math.nan, "no common seeds")
    D = sum(w * np.stack([np.asarray(correct[c][s], dtype=float) for s in seeds]) for c, w in weights.items() if w)
    m = D.shape[1]
    grand = float(D.mean())
    if n < 2 or m < 2:
        return Interval(grand, math.nan, math.nan, level, n, math.nan, "needs 2 seeds")
    ds, di = D.mean(1), D.mean(0)
    v_seed = float(ds.var(ddof=1)) / n
    v_test = float(di.var(ddof=1)) / m
    resid = D - ds[:, None] - di[None, :] + grand
    v_int = float((resid ** 2).sum()) / ((n - 1) * (m - 1)) / (n * m)
    var = v_test + max(v_seed - v_int, 0.0)
    denom = v_seed ** 2 / (n - 1) + v_test ** 2 / (m - 1) + v_int ** 2 / ((n - 1) * (m - 1))
    df = var ** 2 / denom if denom > 0 else float(n - 1)
    return _interval(grand, var, max(df, 1.0), level, n, "seed x test-example t (Satterthwaite df)")


def _common_seeds(table: Mapping[str, Mapping[int, object]], weights: Mapping[str, float]) -> list[int]:
    sets = [set(table.get(c, {})) for c, w in weights.items() if w]
    return sorted(set.intersection(*sets)) if sets else []


# ---------------------------------------------------------------------------- decisions
def decide_improves(iv: Interval) -> str:
    """The effect is positive: the interval above 0 (reproduced), below 0 (contradicted), else inconclusive."""
    if not iv.defined:
        return INCONCLUSIVE
    return REPRODUCED if iv.lo > 0 else CONTRADICTED if iv.hi < 0 else INCONCLUSIVE


def decide_lowers(iv: Interval) -> str:
    """The effect is negative (``decide_improves`` mirrored)."""
    if not iv.defined:
        return INCONCLUSIVE
    return REPRODUCED if iv.hi < 0 else CONTRADICTED if iv.lo > 0 else INCONCLUSIVE


def decide_equivalent(iv90: Interval, iv95: Interval, margin: float) -> str:
    """TOST: the 90 % interval inside (−margin, margin) → reproduced; the 95 % interval wholly outside
    [−margin, margin] → contradicted (the effect is significantly larger than the margin); else inconclusive."""
    if not (iv90.defined and iv95.defined):
        return INCONCLUSIVE
    if -margin < iv90.lo and iv90.hi < margin:
        return REPRODUCED
    if iv95.lo > margin or iv95.hi < -margin:
        return CONTRADICTED
    return INCONCLUSIVE


def all_of(outcomes: Sequence[str]) -> str:
    """A claim that needs every part: any part contradicted → contradicted, all reproduced → reproduced."""
    if not outcomes:
        return INCONCLUSIVE
    if CONTRADICTED in outcomes:
        return CONTRADICTED
    return REPRODUCED if all(o == REPRODUCED for o in outcomes) else INCONCLUSIVE


def bonferroni(level: float, k: int) -> float:
    """The per-comparison confidence level keeping the family-wise error at ``1 − level`` over ``k`` comparisons."""
    return 1 - (1 - level) / max(k, 1)
