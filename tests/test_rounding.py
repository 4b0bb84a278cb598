"""Lower-precision products: the float64 reference operator, and what a float32 solve may claim against it."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fasthess
from tests.conftest import dense_hessian_of


def _float32_problem(seed: int = 0, weights: torch.Tensor | None = None):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    X, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    return model, nn.CrossEntropyLoss(weight=weights), X, y


def _dense64(model, loss_fn, X, y) -> torch.Tensor:
    """The Hessian of the float32 model's loss evaluated in float64 (the function at the same weights)."""
    m64, l64 = copy.deepcopy(model).double(), copy.deepcopy(loss_fn).double()
    return dense_hessian_of(m64, lambda p: l64(torch.func.functional_call(m64, p, (X.double(),)), y))


@pytest.mark.parametrize("weights", [None, torch.tensor([1.0, 2.0, 3.0])])
def test_float64_twin_gives_the_float64_hessian_of_a_float32_model(weights):
    model, loss_fn, X, y = _float32_problem(weights=weights)
    op = fasthess.HessianOperator(model, loss_fn, (X, y), batch_size=16)
    V = torch.randn(op.num_params, 3, dtype=torch.float64)
    op.matmat(V[:, :1])  # the first pass checks the contract and counts W; the twin shares both
    twin = op.in_float64()
    got = twin.matmat(V)
    H = _dense64(model, loss_fn, X, y)
    torch.testing.assert_close(got, H @ V, rtol=1e-11, atol=1e-13)
    assert twin.num_hvps == 3 and op.num_hvps == 1  # each counts its own products
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert loss_fn.weight is None or loss_fn.weight.dtype == torch.float32
    assert float((op.matmat(V) - got).norm() / got.norm()) > 1e-10  # the float32 products differ from it
