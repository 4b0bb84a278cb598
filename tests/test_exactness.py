"""Eigenvalues of the full-dataset Hessian against dense float64 Hessians (torch.linalg.eigvalsh)."""
from __future__ import annotations

import warnings

import pytest
import torch

import fasthess
from conftest import LOSSES, dense_hessian, make_data, make_model

MODELS = ["tanh_mlp", "gelu_mlp", "relu_mlp", "cnn", "bn_eval", "layernorm", "residual"]


def _expected(evals: torch.Tensor, which: str, k: int) -> torch.Tensor:
    key = {"LA": -evals, "SA": evals, "LM": -evals.abs()}[which]
    return evals[torch.argsort(key, stable=True)[:k]]


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("hvp", ["forward-over-reverse", "double-backward"])
def test_matmat_equals_dense_hessian(kind, loss, hvp):
    model, shape = make_model(kind)
    X, y = make_data(shape, loss=loss)
    H = dense_hessian(model, LOSSES[loss], X, y, batch_size=10)  # 37 = 3·10 + 7: an uneven last chunk
    op = fasthess.HessianOperator(model, LOSSES[loss], (X, y), batch_size=10, hvp=hvp)
    V = torch.randn(op.num_params, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no model here needs the double-backward fallback
        torch.testing.assert_close(op.matmat(V), H @ V, rtol=1e-10, atol=1e-12)
    assert op.hvp_method == hvp


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_eigs_matches_eigvalsh(kind, which):
    model, shape = make_model(kind)
    X, y = make_data(shape)
    H = dense_hessian(model, LOSSES["ce"], X, y, batch_size=10)
    op = fasthess.HessianOperator(model, LOSSES["ce"], (X, y), batch_size=10)
    res = fasthess.eigs(op, k=3, which=which, tol=1e-10)
    expected = _expected(torch.linalg.eigvalsh(H), which, 3)
    assert res.all_converged
    torch.testing.assert_close(res.eigenvalues, expected, rtol=1e-8, atol=1e-10 * expected.abs().max().item())
    # the certificate is honest: the true error is within the reported bound (plus roundoff)
    assert bool(((res.eigenvalues - expected).abs() <= res.error_bounds + 1e-12 * expected.abs()).all())
    # eigenvectors satisfy H x = θ x up to the reported residual
    resid = (H @ res.eigenvectors - res.eigenvectors * res.eigenvalues).norm(dim=0)
    torch.testing.assert_close(resid, res.residuals, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_frozen_parameters_and_explicit_params(loss):
    model, shape = make_model("gelu_mlp")
    model[0].weight.requires_grad_(False)
    X, y = make_data(shape, loss=loss)
    H = dense_hessian(model, LOSSES[loss], X, y, batch_size=8)
    op = fasthess.HessianOperator(model, LOSSES[loss], (X, y), batch_size=8)
    assert op.num_params == H.shape[0] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    res = fasthess.eigs(op, k=2, tol=1e-10)
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:2], rtol=1e-8, atol=1e-12)
    last = [model[-1].weight, model[-1].bias]
    H_last = dense_hessian(model, LOSSES[loss], X, y, batch_size=8, params=last)
    op_last = fasthess.HessianOperator(model, LOSSES[loss], (X, y), batch_size=8, params=last)
    res = fasthess.eigs(op_last, k=1, tol=1e-10)
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(H_last)[-1:], rtol=1e-8, atol=1e-12)


def test_float32_model_agrees_with_float64():
    model, shape = make_model("tanh_mlp")
    X, y = make_data(shape)
    exact = fasthess.lambda_max(model, LOSSES["ce"], (X, y), tol=1e-10).eigenvalues
    res = fasthess.lambda_max(model.float(), LOSSES["ce"], (X.float(), y), tol=1e-4)
    assert res.all_converged
    torch.testing.assert_close(res.eigenvalues, exact, rtol=1e-4, atol=0)


def test_double_backward_equals_forward_over_reverse():
    model, shape = make_model("cnn")
    X, y = make_data(shape)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 4, dtype=torch.float64)
    fwd = fasthess.HessianOperator(model, LOSSES["ce"], (X, y), batch_size=16, hvp="forward-over-reverse")
    rev = fasthess.HessianOperator(model, LOSSES["ce"], (X, y), batch_size=16, hvp="double-backward")
    torch.testing.assert_close(fwd.matmat(V), rev.matmat(V), rtol=1e-10, atol=1e-12)
