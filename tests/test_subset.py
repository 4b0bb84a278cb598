"""subset_lambda_max: every subset value against a dense float64 Hessian of that subset, the interval arithmetic
against a hand computation, and the refusals."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import LOSSES, dense_hessian, make_data, make_model
from fasthess import FasthessError
from fasthess.subset import smallest_within, subset_lambda_max, summarize_size, t_two_sided, t_within


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 10, 31])
@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.95, 0.99])
def test_t_quantile_matches_scipy(df, confidence):
    from scipy.stats import t

    assert t_two_sided(confidence, df) == pytest.approx(t.ppf((1 + confidence) / 2, df), rel=1e-9)
    assert t_within(1.3, df) == pytest.approx(t.cdf(1.3, df) - t.cdf(-1.3, df), rel=1e-12)


def test_every_subset_value_matches_dense():
    model, shape = make_model("tanh_mlp")
    X, y = make_data(shape, n=40)
    study = subset_lambda_max(model, LOSSES["ce"], (X, y), sizes=[20, 8], repeats=3, stride=True, batch_size=7,
                              tol=1e-8)

    def dense_top(idx):
        return float(torch.linalg.eigvalsh(dense_hessian(model, LOSSES["ce"], X[idx], y[idx], 7))[-1])

    assert study.full_value == pytest.approx(dense_top(torch.arange(40)), rel=1e-7)
    assert [s.size for s in study.sizes] == [8, 20]
    for s in study.sizes:
        assert len(s.indices) == 3 and all(len(set(i.tolist())) == s.size for i in s.indices)
        for value, idx in zip(s.values.tolist(), s.indices):
            assert value == pytest.approx(dense_top(idx), rel=1e-7)
        assert s.strided == pytest.approx(dense_top(torch.arange(0, 40, 40 // s.size)[:s.size]), rel=1e-7)
        assert s.mean == pytest.approx(float(s.values.mean())) and s.bias == pytest.approx(s.mean - study.full_value)
    assert "SubsetStudy(full λ_max=" in repr(study) and "SubsetSize(size=8" in repr(study)


def test_intervals_by_hand():
    from scipy.stats import t

    values, bounds, full, full_bound = [1.0, 1.4, 0.9, 1.3], [1e-3, 2e-3, 0.0, 1e-3], 1.2, 5e-4
    s = summarize_size(100, values, bounds, full, full_bound, confidence=0.9, rtol=0.2, strided=1.1)
    d = [v - full for v in values]  # -0.2, 0.2, -0.3, 0.1
    mean = sum(d) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 3)
    q = t.ppf(0.95, 3)
    half = q * sd / 2 + (sum(bounds) / 4 + full_bound)
    assert s.bias == pytest.approx(-0.05) and s.bias_interval == pytest.approx((-0.05 - half, -0.05 + half))
    sq = [x * x for x in d]
    m2 = sum(sq) / 4
    sd2 = math.sqrt(sum((x - m2) ** 2 for x in sq) / 3)
    worst = 2e-3 + full_bound
    assert s.rmse == pytest.approx(math.sqrt(m2))
    assert s.rmse_interval == pytest.approx((max(math.sqrt(max(m2 - q * sd2 / 2, 0)) - worst, 0),
                                             math.sqrt(m2 + q * sd2 / 2) + worst))
    assert s.std == pytest.approx(sd) and s.mean == pytest.approx(1.15)
    assert s.within is False  # 0.9 is 0.3 below 1.2, beyond 0.2 · 1.2
    assert summarize_size(100, values, bounds, full, full_bound, confidence=0.9, rtol=0.25).within is True


def test_smallest_within_needs_every_larger_size():
    def size(m, within):
        return summarize_size(m, [1.0, 2.0], [0.0, 0.0], 1.5, 0.0, confidence=0.9, rtol=1.0 if within else 0.1)

    assert smallest_within([size(10, True), size(100, False), size(1000, True)]) == 1000
    assert smallest_within([size(10, True), size(100, True), size(1000, True)]) == 10
    assert smallest_within([size(10, True), size(1000, False)]) is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(sizes=[]), "non-empty list"),
    (dict(sizes=5), "non-empty list"),
    (dict(sizes=[1]), "between 2 and"),
    (dict(sizes=[41]), "between 2 and"),
    (dict(sizes=[5], repeats=1), "repeats=1"),
    (dict(sizes=[5], rtol=0), "rtol=0"),
    (dict(sizes=[5], confidence=1.0), "confidence=1.0"),
])
def test_refusals(kwargs, match):
    model, shape = make_model("tanh_mlp")
    X, y = make_data(shape, n=40)
    with pytest.raises(FasthessError, match=match):
        subset_lambda_max(model, LOSSES["ce"], (X, y), **kwargs)
    with pytest.raises(FasthessError, match="tuple"):
        subset_lambda_max(model, LOSSES["ce"], [(X, y)], sizes=[5])
