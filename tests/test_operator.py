"""HessianOperator behaviour: block products, data inputs, BatchNorm, dropout, scipy interop, warm starts."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fasthess
from conftest import LOSSES, dense_hessian, make_data, make_model


def test_matmat_equals_separate_matvecs(small_problem):
    model, loss, X, y = small_problem
    op = fasthess.HessianOperator(model, loss, (X, y), batch_size=9)
    V = torch.randn(op.num_params, 5, dtype=torch.float64)
    block = op.matmat(V)
    cols = torch.stack([op.matvec(V[:, j]) for j in range(5)], 1)
    torch.testing.assert_close(block, cols, rtol=1e-12, atol=1e-14)
    assert op.num_hvps == 10 and op.num_passes == 6


@pytest.mark.parametrize("form", ["tuple", "dataset", "loader"])
def test_data_forms_agree(small_problem, form):
    model, loss, X, y = small_problem
    data = {"tuple": (X, y), "dataset": TensorDataset(X, y),
            "loader": DataLoader(TensorDataset(X, y), batch_size=10)}[form]
    op = fasthess.HessianOperator(model, loss, data, batch_size=None if form == "loader" else 10)
    v = torch.randn(op.num_params, dtype=torch.float64)
    H = dense_hessian(model, loss, X, y, batch_size=10)
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-10, atol=1e-12)


def test_chunk_size_does_not_change_eval_mode_hessian(small_problem):
    model, loss, X, y = small_problem
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    a = fasthess.HessianOperator(model, loss, (X, y), batch_size=37).matvec(v)
    b = fasthess.HessianOperator(model, loss, (X, y), batch_size=4).matvec(v)  # 9 chunks of 4 and one of 1
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_to_scipy_eigsh_agrees(small_problem):
    from scipy.sparse.linalg import eigsh

    model, loss, X, y = small_problem
    op = fasthess.HessianOperator(model, loss, (X, y))
    ours = fasthess.eigs(op, k=2, tol=1e-10)
    theirs = np.sort(eigsh(op.to_scipy(), k=2, which="LA", tol=1e-12)[0])[::-1]
    np.testing.assert_allclose(ours.eigenvalues.numpy(), theirs, rtol=1e-8)


def test_warm_start_from_exact_eigenvector_converges_after_the_random_column_has_climbed(small_problem):
    """The answer is there after one pass; the claim waits for the random column's minimum depth, until its Ritz
    value no longer reaches the top (θ + 3‖r‖) and until it has stopped climbing: 6 passes here, against 12 cold."""
    model, loss, X, y = small_problem
    H = dense_hessian(model, loss, X, y, batch_size=1024)
    evals, evecs = torch.linalg.eigh(H)
    op = fasthess.HessianOperator(model, loss, (X, y))
    res = fasthess.eigs(op, k=1, tol=1e-8, v0=evecs[:, -1])
    assert res.all_converged and fasthess.lanczos.MIN_DEPTH <= res.num_passes <= 6
    torch.testing.assert_close(res.eigenvalues, evals[-1:], rtol=1e-8, atol=0)
    cold = fasthess.eigs(op, k=1, tol=1e-8)
    assert cold.num_passes >= 2 * res.num_passes


def _bn_train_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    X = torch.randn(30, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))
    return model.train(), X, y


def test_train_mode_batchnorm_ghost_batches_match_double_backward_and_dense():
    model, X, y = _bn_train_model()
    state = copy.deepcopy(model.state_dict())
    loss = nn.CrossEntropyLoss()
    fwd = fasthess.HessianOperator(model, loss, (X, y), batch_size=8, hvp="forward-over-reverse")
    rev = fasthess.HessianOperator(model, loss, (X, y), batch_size=8, hvp="double-backward")
    V = torch.randn(fwd.num_params, 3, dtype=torch.float64)
    torch.testing.assert_close(fwd.matmat(V), rev.matmat(V), rtol=1e-9, atol=1e-12)
    bn_saved = [m.track_running_stats for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.apply(lambda m: setattr(m, "track_running_stats", False)
                if isinstance(m, nn.modules.batchnorm._BatchNorm) else None)
    H = dense_hessian(model, loss, X, y, batch_size=8)  # ghost batches: 8, 8, 8, 6
    for m, flag in zip([m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)], bn_saved):
        m.track_running_stats = flag
    torch.testing.assert_close(fwd.matmat(V), H @ V, rtol=1e-9, atol=1e-12)
    for key, value in model.state_dict().items():  # running statistics and counters untouched
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert model.training


def test_train_mode_batchnorm_requires_batch_size():
    model, X, y = _bn_train_model()
    with pytest.raises(fasthess.FasthessError, match="batch_size"):
        fasthess.HessianOperator(model, nn.CrossEntropyLoss(), (X, y))


def test_train_mode_batchnorm_refuses_chunk_of_one():
    model, X, y = _bn_train_model()
    op = fasthess.HessianOperator(model, nn.CrossEntropyLoss(), (X[:9], y[:9]), batch_size=4)
    with pytest.raises(fasthess.FasthessError, match="single example"):
        op.matvec(torch.randn(op.num_params, dtype=torch.float64))


def test_dropout_in_train_mode_is_refused_unless_allowed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)).double().train()
    X, y = make_data((6,))
    with pytest.raises(fasthess.StochasticModelError, match="allow_stochastic"):
        fasthess.HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    op = fasthess.HessianOperator(model, nn.CrossEntropyLoss(), (X, y), allow_stochastic=True)
    v = torch.randn(op.num_params, dtype=torch.float64)
    assert torch.isfinite(op.matvec(v)).all()
    model.eval()
    H = dense_hessian(model, nn.CrossEntropyLoss(), X, y, batch_size=1024)
    op = fasthess.HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-10, atol=1e-12)


class _NoForwardAD(torch.autograd.Function):
    """tanh with a backward but no forward-mode rule (forces the double-backward fallback)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _CustomTanh(nn.Module):
    def forward(self, x):
        return _NoForwardAD.apply(x)


def test_fallback_to_double_backward_warns_and_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), _CustomTanh(), nn.Linear(8, 3)).double()
    X, y = make_data((6,))
    op = fasthess.HessianOperator(model, nn.CrossEntropyLoss(), (X, y), hvp="forward-over-reverse")
    v = torch.randn(op.num_params, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="falling back to double-backward"):
        hv = op.matvec(v)
    assert op.hvp_method == "double-backward"
    ref = nn.Sequential(model[0], nn.Tanh(), model[2])
    H = dense_hessian(ref, nn.CrossEntropyLoss(), X, y, batch_size=1024)
    torch.testing.assert_close(hv, H @ v, rtol=1e-10, atol=1e-12)


def test_model_is_left_unchanged(small_problem):
    model, loss, X, y = small_problem
    before = copy.deepcopy(model.state_dict())
    flags = [p.requires_grad for p in model.parameters()]
    fasthess.lambda_max(model, loss, (X, y), tol=1e-6)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


class _WithUnused(nn.Module):
    """A network with a parameter the loss never sees and one the loss is linear in."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.unused = nn.Linear(4, 2)
        self.shift = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return self.body(x) + self.shift


@pytest.mark.parametrize("hvp", ["forward-over-reverse", "double-backward"])
def test_unused_and_linear_parameters_have_zero_curvature(hvp):
    torch.manual_seed(0)
    model = _WithUnused().double()
    X, y = make_data((6,), loss="mse")
    H = dense_hessian(model, nn.MSELoss(), X, y, batch_size=10)
    op = fasthess.HessianOperator(model, nn.MSELoss(), (X, y), batch_size=10, hvp=hvp)
    V = torch.randn(op.num_params, 2, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), H @ V, rtol=1e-10, atol=1e-12)
