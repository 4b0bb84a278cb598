"""GGNOperator against J^T H_loss J built densely from per-example Jacobians and output Hessians."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import hessian

from fasthess.errors import FasthessError, StochasticModelError
from fasthess.ggn import GGNOperator
from fasthess.lanczos import eigs
from conftest import LOSSES, dense_ggn, dense_hessian, flat_outputs, make_data, make_model


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("kind", ["tanh_mlp", "cnn", "residual", "bn_eval", "layernorm"])
def test_matches_dense_ggn(kind, loss):
    model, shape = make_model(kind)
    X, y = make_data(shape, n=23, loss=loss)
    op = GGNOperator(model, LOSSES[loss], (X, y), batch_size=10)  # chunks of 10, 10, 3
    G = dense_ggn(model, LOSSES[loss], X, y)
    torch.testing.assert_close(op.matmat(torch.eye(op.num_params, dtype=torch.float64)), G, rtol=1e-10, atol=1e-12)
    assert op.num_passes == 1


def test_equals_hessian_for_linear_least_squares():
    torch.manual_seed(0)
    model = nn.Linear(4, 2).double()
    X, y = make_data((4,), n=15, classes=2, loss="mse")
    op = GGNOperator(model, nn.MSELoss(), (X, y), batch_size=7)
    H = dense_hessian(model, nn.MSELoss(), X, y, batch_size=7)
    torch.testing.assert_close(op.matmat(torch.eye(op.num_params, dtype=torch.float64)), H, rtol=1e-12, atol=1e-14)


def test_lambda_max_of_ggn_and_positive_semidefinite():
    model, shape = make_model("gelu_mlp")
    X, y = make_data(shape)
    op = GGNOperator(model, LOSSES["ce"], (X, y), batch_size=37)
    ev = torch.linalg.eigvalsh(dense_ggn(model, LOSSES["ce"], X, y))
    assert float(ev[0]) > -1e-12
    res = eigs(op, k=1, which="LA", tol=1e-8)
    assert float(res.eigenvalues[0]) == pytest.approx(float(ev[-1]), rel=1e-7)


def test_train_mode_dropout_is_refused():
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 3)).double().train()
    X, y = make_data((6,))
    with pytest.raises(StochasticModelError):
        GGNOperator(model, LOSSES["ce"], (X, y))


def test_unreduced_loss_is_averaged_and_a_matrix_valued_loss_refused():
    model, shape = make_model("tanh_mlp")
    X, y = make_data(shape, n=23)
    op = GGNOperator(model, nn.CrossEntropyLoss(reduction="none"), (X, y), batch_size=10)
    G = dense_ggn(model, LOSSES["ce"], X, y)
    torch.testing.assert_close(op.matmat(torch.eye(op.num_params, dtype=torch.float64)), G, rtol=1e-10, atol=1e-12)
    bad = GGNOperator(model, lambda o, t: o.pow(2), (X, y))
    with pytest.raises(FasthessError, match=r"shape \(23, 3\)"):
        bad.matvec(torch.ones(op.num_params, dtype=torch.float64))


def test_lambda_max_with_ggn_curvature_matches_the_ggn_operator():
    from fasthess._api import lambda_max

    model, shape = make_model("tanh_mlp")
    X, y = make_data(shape)
    via_api = lambda_max(model, LOSSES["ce"], (X, y), curvature="ggn", tol=1e-10)
    direct = eigs(GGNOperator(model, LOSSES["ce"], (X, y)), k=1, tol=1e-10)
    torch.testing.assert_close(via_api.eigenvalues, direct.eigenvalues, rtol=1e-10, atol=0)
    with pytest.raises(FasthessError, match="curvature"):
        lambda_max(model, LOSSES["ce"], (X, y), curvature="fisher")


def dense_ggn_of(model: nn.Module, loss_of_outputs, X: torch.Tensor) -> torch.Tensor:
    """Jᵀ (∇²_o L) J for a loss L(o) of all the data's stacked outputs o = f(X) (the loss on all the data as one
    batch), J = ∂o/∂θ."""
    theta, outputs = flat_outputs(model, X)
    out = outputs(theta).detach()
    J = torch.autograd.functional.jacobian(outputs, theta, vectorize=True).reshape(out.numel(), -1)
    Ho = hessian(lambda o: loss_of_outputs(o.reshape(out.shape)))(out.reshape(-1))
    return J.T @ Ho @ J


@pytest.mark.parametrize("form", ["weighted_ignored_ce", "sum_mse", "example_weights"])
def test_matches_dense_ggn_of_the_loss_on_all_the_data(form):
    model, shape = make_model("gelu_mlp")
    X, y = make_data(shape, n=23, loss="mse" if form == "sum_mse" else "ce")
    w = torch.rand(23, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.2
    cw = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    if form == "weighted_ignored_ce":
        y[:10] = -100  # the whole first chunk is ignored
        loss, data = nn.CrossEntropyLoss(weight=cw), (X, y)
        full = lambda o: loss(o, y)  # noqa: E731
    elif form == "sum_mse":
        loss, data = nn.MSELoss(reduction="sum"), (X, y)
        full = lambda o: loss(o, y)  # noqa: E731
    else:
        loss, data = nn.CrossEntropyLoss(), (X, y, w)
        full = lambda o: (w * nn.functional.cross_entropy(o, y, reduction="none")).sum() / w.sum()  # noqa: E731
    op = GGNOperator(model, loss, data, batch_size=10)
    torch.testing.assert_close(op.matmat(torch.eye(op.num_params, dtype=torch.float64)),
                               dense_ggn_of(model, full, X), rtol=1e-10, atol=1e-12)


def test_fused_attention_fast_path_is_named_with_its_fix():
    """An eval-mode nn.TransformerEncoderLayer runs a fused kernel with no forward-mode derivative: the GGN's
    products cannot run through it; the error names the switch that turns the fast path off."""
    from fasthess.errors import UnsupportedModelError

    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0), nn.Flatten(),
                          nn.Linear(40, 3)).eval()
    X, y = torch.randn(20, 5, 8), torch.randint(0, 3, (20,))
    op = GGNOperator(model, nn.CrossEntropyLoss(), (X, y), batch_size=10)
    with pytest.raises(UnsupportedModelError, match="set_fastpath_enabled"):
        op.matvec(torch.ones(op.num_params, dtype=torch.float64))
