"""Deprecation helpers: positional options that became keyword-only, renamed keywords."""
from __future__ import annotations

import warnings

import pytest
import torch

from fasthess import spectral_density, trace
from fasthess._deprecation import positional_until, renamed_keywords
from fasthess.linop import MatrixOperator


@positional_until(2, formerly=("which", "tol"))
def _solve(op, k=1, *, which="LA", tol=1e-4, fraction=0.5):
    return op, k, which, tol, fraction


def test_positional_options_still_work_with_a_future_warning_at_the_call_site():
    with pytest.warns(FutureWarning, match=r"_solve\(\): pass which=\.\.\., tol=\.\.\. as keyword") as record:
        assert _solve("A", 2, "SA", 1e-6) == ("A", 2, "SA", 1e-6, 0.5)
    assert record[0].filename == __file__  # points at the caller, not at the helper
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _solve("A", 2, which="SA", tol=1e-6) == ("A", 2, "SA", 1e-6, 0.5)
        assert _solve("A") == ("A", 1, "LA", 1e-4, 0.5)


def test_positional_options_beyond_the_old_signature_or_given_twice_are_refused():
    with pytest.raises(TypeError, match="at most 2 positional"):
        _solve("A", 2, "SA", 1e-6, 0.25)  # fraction was keyword-only before, too
    with pytest.raises(TypeError, match="multiple values for argument 'which'"):
        _solve("A", 2, "SA", which="LA")


def test_helpers_refuse_signatures_they_do_not_fit():
    with pytest.raises(TypeError, match="does not fit"):
        positional_until(1)(lambda op, k, *, tol: None)
    with pytest.raises(TypeError, match="does not fit"):
        positional_until(1, formerly=("tol",))(lambda op, *, which: None)
    with pytest.raises(TypeError, match="does not fit"):
        renamed_keywords(batch_size="minibatch_size")(lambda *, size: None)
    with pytest.raises(TypeError, match="does not fit"):
        renamed_keywords(batch_size="minibatch_size")(lambda *, batch_size, minibatch_size: None)


def _spd(n: int) -> MatrixOperator:
    g = torch.Generator().manual_seed(n)
    B = torch.randn(n, n, generator=g, dtype=torch.float64)
    return MatrixOperator(B @ B.T)


def test_trace_and_density_take_their_options_by_keyword():
    op = _spd(12)
    with pytest.warns(FutureWarning, match="num_matvecs=..., method=..., seed=..."):
        old = trace(op, 8, "hutchinson", 3)
    assert old == trace(op, num_matvecs=8, method="hutchinson", seed=3)
    with pytest.warns(FutureWarning, match="num_probes=..., lanczos_steps=..."):
        old_density = spectral_density(op, 3, 5)
    new_density = spectral_density(op, num_probes=3, lanczos_steps=5)
    assert torch.equal(old_density.nodes, new_density.nodes) and torch.equal(old_density.weights, new_density.weights)
