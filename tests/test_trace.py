"""fasthess.trace against the traces of dense float64 Hessians and matrices."""
from __future__ import annotations

import math

import pytest
import torch

from fasthess.errors import FasthessError
from fasthess.hessian import HessianOperator
from fasthess.linop import MatrixOperator
from fasthess.trace import trace
from conftest import LOSSES, dense_hessian, make_data, make_model


@pytest.fixture(scope="module")
def hessian_problem():
    model, shape = make_model("tanh_mlp")
    X, y = make_data(shape)
    H = dense_hessian(model, LOSSES["ce"], X, y, batch_size=10)
    return HessianOperator(model, LOSSES["ce"], (X, y), batch_size=10), H


def _decaying(n: int = 60, seed: int = 3) -> torch.Tensor:
    """A symmetric matrix with eigenvalues 1/k² and a random orthogonal basis."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return U @ torch.diag(1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 2) @ U.T


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
def test_exact_when_budget_covers_n(hessian_problem, method):
    op, H = hessian_problem
    res = trace(op, num_matvecs=op.num_params + 5, method=method, block_size=32)
    assert res.method == "exact" and res.std_error == 0.0
    assert res.num_hvps == op.num_params and res.num_passes == math.ceil(op.num_params / 32)
    assert res.estimate == pytest.approx(float(H.trace()), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_within_three_standard_errors_of_dense_trace(hessian_problem, method, seed):
    op, H = hessian_problem
    res = trace(op, num_matvecs=30, method=method, seed=seed)
    assert res.num_hvps == 30 and res.std_error > 0
    assert abs(res.estimate - float(H.trace())) <= 3 * res.std_error


def test_hutchinson_is_unbiased_over_many_seeds():
    A = _decaying()
    ests = torch.tensor([trace(MatrixOperator(A), num_matvecs=8, method="hutchinson", seed=s).estimate for s in range(200)])
    assert abs(float(ests.mean()) - float(A.trace())) <= 3 * float(ests.std()) / math.sqrt(200)


def test_hutch_plus_plus_beats_hutchinson_on_a_decaying_spectrum():
    A, exact = _decaying(), float(_decaying().trace())
    err = {m: torch.tensor([trace(MatrixOperator(A), num_matvecs=30, method=m, seed=s).estimate - exact for s in range(20)]).abs().mean()
           for m in ("hutch++", "hutchinson")}
    assert err["hutch++"] < 0.2 * err["hutchinson"]


def test_hutch_plus_plus_is_exact_on_low_rank():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(50, 4, generator=g, dtype=torch.float64)
    A = B @ B.T
    res = trace(MatrixOperator(A), num_matvecs=15, method="hutch++")
    assert res.estimate == pytest.approx(float(A.trace()), rel=1e-10)
    assert res.std_error < 1e-9 * float(A.trace())


def test_block_size_changes_passes_not_estimate():
    A = MatrixOperator(_decaying())
    one, many = (trace(A, num_matvecs=24, method="hutchinson", block_size=24),
                  trace(A, num_matvecs=24, method="hutchinson", block_size=5))
    assert (one.num_passes, many.num_passes) == (1, 5)
    assert one.estimate == pytest.approx(many.estimate, rel=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "girard"}, "method"),
    ({"num_matvecs": 3}, "≥ 4"),
    ({"num_matvecs": 1, "method": "hutchinson"}, "≥ 2"),
    ({"block_size": 0}, "block_size"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(FasthessError, match=match):
        trace(MatrixOperator(_decaying()), **{"num_matvecs": 10, **kwargs})
