"""Preconditioned and minibatch sharpness against dense float64 Hessians."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fasthess.errors import FasthessError
from fasthess.hessian import HessianOperator
from fasthess.sharpness import (PreconditionedOperator, adam_preconditioner, adam_stability_threshold,
                                batch_sharpness, minibatch_lambda_max, preconditioned_lambda_max)
from conftest import LOSSES, dense_hessian, make_data, make_model


@pytest.fixture(scope="module")
def trained():
    """A tanh MLP after three Adam steps on cross-entropy, with its optimizer."""
    model, shape = make_model("tanh_mlp")
    X, y = make_data(shape)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-6)
    for _ in range(3):
        opt.zero_grad()
        LOSSES["ce"](model(X), y).backward()
        opt.step()
    return model, opt, X, y


def _expected_adam_diag(model: nn.Module, opt: torch.optim.Optimizer, key: str = "exp_avg_sq") -> torch.Tensor:
    (beta1, beta2), eps = opt.param_groups[0]["betas"], opt.param_groups[0]["eps"]
    parts = []
    for p in model.parameters():
        st = opt.state[p]
        t = float(st["step"])
        parts.append(((1 - beta1 ** t) * ((st[key] / (1 - beta2 ** t)).sqrt() + eps)).reshape(-1))
    return torch.cat(parts).double()


def test_adam_preconditioner_formula(trained):
    model, opt, X, y = trained
    op = HessianOperator(model, LOSSES["ce"], (X, y))
    expected = _expected_adam_diag(model, opt)
    torch.testing.assert_close(adam_preconditioner(opt, op), expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(adam_preconditioner(opt, model.parameters()), expected, rtol=1e-14, atol=0)
    assert adam_stability_threshold(opt) == pytest.approx(38 / 0.01)


def test_adam_preconditioner_amsgrad_and_errors():
    model, shape = make_model("tanh_mlp")
    X, y = make_data(shape)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, amsgrad=True)
    with pytest.raises(FasthessError, match="optimizer.step"):
        adam_preconditioner(opt, model.parameters())
    for _ in range(2):
        opt.zero_grad()
        LOSSES["ce"](model(X), y).backward()
        opt.step()
    torch.testing.assert_close(adam_preconditioner(opt, model.parameters()),
                               _expected_adam_diag(model, opt, "max_exp_avg_sq"), rtol=1e-14, atol=0)
    other = nn.Linear(2, 2).double()
    with pytest.raises(FasthessError, match="not managed"):
        adam_preconditioner(opt, other.parameters())


def test_preconditioned_lambda_max_matches_dense(trained):
    model, opt, X, y = trained
    op = HessianOperator(model, LOSSES["ce"], (X, y), batch_size=37)
    P = adam_preconditioner(opt, op)
    H = dense_hessian(model, LOSSES["ce"], X, y, batch_size=37)
    S = H / P.sqrt()[:, None] / P.sqrt()[None, :]
    expected = float(torch.linalg.eigvalsh(S)[-1])
    res = preconditioned_lambda_max(op, P, tol=1e-8)
    assert res.all_converged
    assert float(res.eigenvalues[0]) == pytest.approx(expected, rel=1e-7)
    # P^{-1/2}u is an eigenvector of P⁻¹H with the same eigenvalue.
    w = res.eigenvectors[:, 0] / P.sqrt()
    torch.testing.assert_close((H @ w) / P, expected * w, rtol=1e-5, atol=1e-5 * float(w.abs().max()) * expected)


def test_preconditioned_operator_rejects_bad_diagonals():
    model, shape = make_model("tanh_mlp")
    op = HessianOperator(model, LOSSES["ce"], make_data(shape))
    for bad in (torch.ones(3), -torch.ones(op.num_params), torch.full((op.num_params,), math.nan)):
        with pytest.raises(FasthessError, match="precond_diag"):
            PreconditionedOperator(op, bad)


def _minibatch_reference(model, X, y, idx):
    H = dense_hessian(model, LOSSES["ce"], X[idx], y[idx], batch_size=len(idx))
    model.zero_grad()
    LOSSES["ce"](model(X[idx]), y[idx]).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    return H, g


def test_batch_sharpness_and_minibatch_lambda_max_match_dense():
    model, shape = make_model("tanh_mlp")
    X, y = make_data(shape, n=40)
    bs = batch_sharpness(model, LOSSES["ce"], (X, y), minibatch_size=8, num_batches=4, seed=3)
    mb = minibatch_lambda_max(model, LOSSES["ce"], (X, y), minibatch_size=8, num_batches=4, seed=3, tol=1e-8)
    assert [i.tolist() for i in bs.indices] == [i.tolist() for i in mb.indices]
    assert all(len(set(i.tolist())) == 8 for i in bs.indices)
    quotients, tops = [], []
    for idx in bs.indices:
        H, g = _minibatch_reference(model, X, y, idx)
        quotients.append(float(g @ H @ g / (g @ g)))
        tops.append(float(torch.linalg.eigvalsh(H)[-1]))
    torch.testing.assert_close(bs.values, torch.tensor(quotients, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mb.values, torch.tensor(tops, dtype=torch.float64), rtol=1e-7, atol=0)
    assert bs.mean == pytest.approx(sum(quotients) / 4)
    assert bs.std_error == pytest.approx(float(torch.tensor(quotients).std()) / 2)
    assert bool((bs.values <= mb.values + 1e-10).all())
    assert bs.num_hvps == 4


def test_batch_sharpness_leaves_batchnorm_statistics_alone():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double().train()
    X, y = make_data((6,))
    before = [b.clone() for b in model.buffers()]
    batch_sharpness(model, LOSSES["ce"], (X, y), minibatch_size=8, num_batches=2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))


@pytest.mark.parametrize("kwargs, match", [
    ({"num_batches": 1}, "num_batches"),
    ({"minibatch_size": 100}, "minibatch_size"),
    ({"minibatch_size": True}, "minibatch_size"),
])
def test_minibatch_arguments(kwargs, match):
    model, shape = make_model("tanh_mlp")
    X, y = make_data(shape)
    with pytest.raises(FasthessError, match=match):
        batch_sharpness(model, LOSSES["ce"], (X, y), **{"minibatch_size": 8, "num_batches": 4, **kwargs})
    with pytest.raises(FasthessError, match="tuple"):
        batch_sharpness(model, LOSSES["ce"], [(X, y)], minibatch_size=8)


@pytest.mark.parametrize("fn", [batch_sharpness, minibatch_lambda_max])
def test_minibatch_batch_size_is_the_deprecated_name_of_minibatch_size(fn):
    """batch_size= (the chunk size everywhere else) still selects the minibatch size, with a FutureWarning naming
    minibatch_size=, and gives the same draws and values; giving both names is refused."""
    model, shape = make_model("tanh_mlp")
    X, y = make_data(shape, n=24)
    new = fn(model, LOSSES["ce"], (X, y), minibatch_size=6, num_batches=2, seed=1)
    with pytest.warns(FutureWarning, match="minibatch_size="):
        old = fn(model, LOSSES["ce"], (X, y), batch_size=6, num_batches=2, seed=1)
    assert [i.tolist() for i in old.indices] == [i.tolist() for i in new.indices]
    assert torch.equal(old.values, new.values)
    with pytest.raises(TypeError, match="only minibatch_size="):
        fn(model, LOSSES["ce"], (X, y), batch_size=6, minibatch_size=6)
