"""experiments.stats on synthetic inputs with known answers: interval coverage of the paired accuracy
contrast (seed × test-example noise), TOST equivalence accepting and rejecting where it should, summaries."""
from __future__ import annotations

import math

import numpy as np
import pytest

from experiments import stats
from experiments.stats import CONTRADICTED, INCONCLUSIVE, REPRODUCED, Interval


def _coverage(draw, truth, reps, rng):
    hits = 0
    for _ in range(reps):
        table, weights = draw(rng)
        iv = stats.contrast(table, weights)
        hits += iv.lo < truth < iv.hi
    return hits / reps


def test_contrast_interval_covers_95_percent_gaussian_two_way_model():
    """D[s,i] = μ + a_s + b_i + e_si: seed effect, test-example effect shared by every seed, interaction."""
    mu, n, m = 0.03, 5, 800

    def draw(rng):
        D = mu + rng.normal(0, 0.02, n)[:, None] + rng.normal(0, 0.3, m)[None, :] + rng.normal(0, 0.5, (n, m))
        return {"A": dict(enumerate(D))}, {"A": 1.0}

    cov = _coverage(draw, mu, 600, np.random.default_rng(1))
    assert 0.93 <= cov <= 0.975, cov  # SE of a 95 % coverage over 600 draws: 0.9 points


def test_contrast_interval_covers_95_percent_for_paired_0_1_correctness():
    """Two configurations whose per-example correctness is Bernoulli(sigmoid(θ_i + effect + seed noise)); the
    truth is the expected accuracy difference over seeds *and* over the test distribution."""
    n, m, eff, sd_seed = 5, 600, 0.15, 0.15
    rng = np.random.default_rng(2)

    def probs(rng, n, m):
        th = rng.normal(0.3, 1.5, m)[None, :]
        pa = 1 / (1 + np.exp(-(th + eff + rng.normal(0, sd_seed, (n, 1)))))
        pb = 1 / (1 + np.exp(-(th + rng.normal(0, sd_seed, (n, 1)))))
        return pa, pb

    pa, pb = probs(rng, 4000, 4000)
    truth = float((pa - pb).mean())

    def draw(rng):
        pa, pb = probs(rng, n, m)
        ca, cb = (rng.random(pa.shape) < pa).astype(np.uint8), (rng.random(pb.shape) < pb).astype(np.uint8)
        return {"A": dict(enumerate(ca)), "B": dict(enumerate(cb))}, {"A": 1.0, "B": -1.0}

    cov = _coverage(draw, truth, 500, rng)
    assert 0.925 <= cov <= 0.98, cov


def test_seed_only_interval_undercovers_when_the_test_set_is_shared():
    """Why the test-sampling term exists: with a test set shared by all seeds, a t-interval over seeds alone
    misses the truth far more often than 5 % (the example effects do not average out over seeds)."""
    mu, n, m = 0.0, 5, 300
    rng = np.random.default_rng(3)
    miss_t, miss_c = 0, 0
    for _ in range(300):
        D = mu + rng.normal(0, 0.005, n)[:, None] + rng.normal(0, 0.5, m)[None, :] + rng.normal(0, 0.1, (n, m))
        t = stats.paired_t({"A": {s: float(D[s].mean()) for s in range(n)}}, {"A": 1.0})
        c = stats.contrast({"A": dict(enumerate(D))}, {"A": 1.0})
        miss_t += not (t.lo < mu < t.hi)
        miss_c += not (c.lo < mu < c.hi)
    assert miss_t > 0.3 * 300 and miss_c < 0.08 * 300, (miss_t, miss_c)


def test_contrast_pairs_by_common_seeds_and_needs_two():
    a = {0: np.ones(10), 1: np.ones(10), 2: np.zeros(10)}
    b = {1: np.zeros(10), 2: np.zeros(10)}
    iv = stats.contrast({"a": a, "b": b}, {"a": 1.0, "b": -1.0})
    assert iv.n == 2 and iv.estimate == pytest.approx(0.5)
    one = stats.contrast({"a": a, "b": {1: np.zeros(10)}}, {"a": 1.0, "b": -1.0})
    assert one.n == 1 and not one.defined and stats.decide_improves(one) == INCONCLUSIVE


def test_summaries_known_values():
    s = stats.summarize([1.0, 2.0, 3.0, 4.0])
    assert (s.n, s.mean) == (4, 2.5) and s.sd == pytest.approx(math.sqrt(5 / 3))
    h = stats.t_quantile(0.975, 3) * s.sd / 2
    assert (s.lo, s.hi) == (pytest.approx(2.5 - h), pytest.approx(2.5 + h))
    g = stats.summarize_log([1.0, 100.0])
    assert g.mean == pytest.approx(10.0) and g.lo < 10 < g.hi
    assert math.isnan(stats.summarize([3.0]).lo)


def _iv(lo, hi, level):
    return Interval((lo + hi) / 2, lo, hi, level, 5, 4.0, "test")


@pytest.mark.parametrize("iv90,iv95,expected", [
    ((-0.01, 0.012), (-0.013, 0.015), REPRODUCED),     # inside ±0.02
    ((-0.01, 0.025), (-0.013, 0.03), INCONCLUSIVE),    # 90 % interval crosses the margin
    ((0.03, 0.05), (0.025, 0.055), CONTRADICTED),      # significantly beyond +margin
    ((-0.06, -0.03), (-0.065, -0.025), CONTRADICTED),  # ... or beyond −margin
    ((-0.03, 0.03), (-0.04, 0.04), INCONCLUSIVE),
])
def test_equivalence_decision(iv90, iv95, expected):
    assert stats.decide_equivalent(_iv(*iv90, 0.9), _iv(*iv95, 0.95), 0.02) == expected


def test_tost_accepts_true_equivalence_and_rejects_a_real_effect():
    """On simulated accuracy data: a null effect with enough data is declared equivalent within 2 points in
    most draws and never contradicted; a 5-point effect is never declared equivalent."""
    rng = np.random.default_rng(4)
    n, m = 5, 3000

    def outcome(effect):
        th = rng.normal(0.5, 1.2, m)[None, :]
        pa = 1 / (1 + np.exp(-(th + rng.normal(0, 0.05, (n, 1)))))
        ca = (rng.random((n, m)) < pa).astype(np.uint8)
        cb = (rng.random((n, m)) < np.clip(pa + effect, 0, 1)).astype(np.uint8)
        table, w = {"a": dict(enumerate(ca)), "b": dict(enumerate(cb))}, {"b": 1.0, "a": -1.0}
        return stats.decide_equivalent(stats.contrast(table, w, 0.90), stats.contrast(table, w, 0.95), 0.02)

    null = [outcome(0.0) for _ in range(40)]
    real = [outcome(0.05) for _ in range(40)]
    assert null.count(REPRODUCED) >= 30 and CONTRADICTED not in null
    assert REPRODUCED not in real and real.count(CONTRADICTED) >= 35


def test_three_way_decisions_and_combinations():
    assert stats.decide_improves(_iv(0.01, 0.03, 0.95)) == REPRODUCED
    assert stats.decide_improves(_iv(-0.03, -0.01, 0.95)) == CONTRADICTED
    assert stats.decide_improves(_iv(-0.01, 0.03, 0.95)) == INCONCLUSIVE
    assert stats.decide_lowers(_iv(-0.3, -0.1, 0.95)) == REPRODUCED
    assert stats.all_of([REPRODUCED, REPRODUCED]) == REPRODUCED
    assert stats.all_of([REPRODUCED, INCONCLUSIVE]) == INCONCLUSIVE
    assert stats.all_of([INCONCLUSIVE, CONTRADICTED]) == CONTRADICTED
    assert stats.bonferroni(0.95, 5) == pytest.approx(0.99)


@pytest.mark.parametrize("df", [0.5, 1, 2, 3.7, 9, 30, 1000, 1e5])
@pytest.mark.parametrize("p", [1e-6, 0.025, 0.3, 0.5, 0.8, 0.975, 0.999999])
def test_t_quantile_matches_scipy(p, df):
    """The scipy-free Student-t quantile (the demo installs no scipy) against scipy.stats.t.ppf."""
    scipy_stats = pytest.importorskip("scipy.stats")
    assert stats.t_quantile(p, df) == pytest.approx(float(scipy_stats.t.ppf(p, df)), rel=1e-9, abs=1e-12)
