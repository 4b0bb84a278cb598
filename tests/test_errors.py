"""Bad input fails fast with a FasthessError that names the problem and the fix; nothing returns a number."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fasthess
from fasthess import FasthessError, NonFiniteError
from conftest import make_data, make_model

CE = nn.CrossEntropyLoss()


def _op(model=None, data=None, **kw):
    if model is None:
        model, shape = make_model("tanh_mlp")
        data = data if data is not None else make_data(shape)
    return fasthess.HessianOperator(model, CE, data, **kw)


def _vec(op):
    return torch.randn(op.num_params, dtype=torch.float64)


def test_nan_in_data_names_the_chunk():
    model, shape = make_model("tanh_mlp")
    X, y = make_data(shape, n=40)
    X[25, 2] = float("nan")
    op = _op(model, (X, y), batch_size=10)
    with pytest.raises(NonFiniteError, match=r"chunk 2 .*inputs of example 5 of the chunk hold NaN"):
        op.matvec(_vec(op))


def test_inf_in_weights_is_refused():
    model, shape = make_model("tanh_mlp")
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="0.weight"):
        _op(model, make_data(shape))


def test_loss_that_turns_non_finite_names_the_chunk():
    model, shape = make_model("tanh_mlp")
    X, y = make_data(shape, n=30)

    def loss(out, target):  # finite inputs, but the loss is infinite on the second (7-example) chunk
        return CE(out, target) * (float("inf") if out.shape[0] == 7 else 1.0)

    op = fasthess.HessianOperator(model, loss, (X[:17], y[:17]), batch_size=10)
    with pytest.raises(NonFiniteError, match="chunk 1"):
        op.matvec(_vec(op))


@pytest.mark.parametrize("data, match", [
    ((torch.zeros(0, 6, dtype=torch.float64), torch.zeros(0, dtype=torch.long)), "empty"),
    ((torch.zeros(5, 6, dtype=torch.float64), torch.zeros(4, dtype=torch.long)), "different lengths"),
    (TensorDataset(torch.zeros(0, 6), torch.zeros(0)), "empty"),
    (iter([(torch.zeros(2, 6), torch.zeros(2))]), "one-shot iterator"),
    (torch.zeros(5, 6), "tuple"),
])
def test_bad_data(data, match):
    model, _ = make_model("tanh_mlp")
    with pytest.raises(FasthessError, match=match):
        fasthess.HessianOperator(model, CE, data)


def test_empty_loader_is_refused_on_first_pass():
    op = _op(data=DataLoader(TensorDataset(torch.zeros(0, 6, dtype=torch.float64), torch.zeros(0, dtype=torch.long))))
    with pytest.raises(FasthessError, match="no examples"):
        op.matvec(_vec(op))


def test_batch_size_with_loader_is_refused():
    X, y = make_data((6,))
    with pytest.raises(FasthessError, match="batch_size was given"):
        _op(data=DataLoader(TensorDataset(X, y), batch_size=8), batch_size=8)


@pytest.mark.parametrize("batch_size", [0, -3, 2.5])
def test_bad_batch_size(batch_size):
    with pytest.raises(FasthessError, match="batch_size"):
        _op(batch_size=batch_size)


def test_model_without_trainable_parameters():
    model, shape = make_model("tanh_mlp")
    model.requires_grad_(False)
    with pytest.raises(FasthessError, match="no trainable parameters"):
        _op(model, make_data(shape))


def test_params_not_of_the_model():
    with pytest.raises(FasthessError, match="not a parameter of the model"):
        _op(params=[nn.Parameter(torch.zeros(3))])


def test_mixed_devices_are_refused():
    model, shape = make_model("tanh_mlp")
    model[2].weight = nn.Parameter(torch.zeros_like(model[2].weight, device="meta"))
    with pytest.raises(FasthessError, match="several devices"):
        _op(model, make_data(shape))


def test_loss_that_is_neither_scalar_nor_per_example_is_refused():
    model, shape = make_model("tanh_mlp")
    op = fasthess.HessianOperator(model, lambda out, target: out.pow(2), make_data(shape))
    with pytest.raises(fasthess.LossContractError, match="per-example losses of shape"):
        op.matvec(_vec(op))


@pytest.mark.parametrize("kwargs, match", [
    ({"k": 0}, "k=0"), ({"k": 10_000}, "k=10000"), ({"k": 1.5}, "k=1.5"),
    ({"tol": 0}, "tol=0"), ({"tol": -1e-3}, "tol="), ({"tol": float("nan")}, "tol="),
    ({"which": "BE"}, "which="), ({"block_size": 0}, "block_size"), ({"max_iters": -1}, "max_iters"),
    ({"block_size": 1}, "below k [+] 1 = 2"), ({"k": 3, "block_size": 3}, "below k [+] 1 = 4"),
    ({"v0": torch.zeros(7, dtype=torch.float64)}, "shape"), ({"v0": torch.zeros(1, 1)}, "shape"),
    ({"v0": "start"}, "torch.Tensor"),
])
def test_bad_eigs_arguments(kwargs, match):
    op = _op()
    with pytest.raises(FasthessError, match=match):
        fasthess.eigs(op, **kwargs)
    assert op.num_hvps == 0  # refused before any work


def test_v0_wrong_dtype_device_or_values():
    op = _op()
    n = op.num_params
    with pytest.raises(FasthessError, match="dtype"):
        fasthess.eigs(op, v0=torch.ones(n, dtype=torch.long))
    with pytest.raises(FasthessError, match="is on meta"):
        fasthess.eigs(op, v0=torch.ones(n, device="meta"))
    with pytest.raises(FasthessError, match="NaN"):
        fasthess.eigs(op, v0=torch.full((n,), float("nan")))


def test_shuffling_loader_is_detected():
    X, y = make_data((6,), n=40)
    loader = DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    op = _op(data=loader)
    op.matvec(_vec(op))
    with pytest.raises(fasthess.DataChangedError, match="shuffle=False"):
        op.matvec(_vec(op))


class _Augmenting(torch.utils.data.Dataset):
    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i] + 0.1 * torch.randn_like(self.X[i]), self.y[i]


def test_random_augmentation_is_detected():
    op = _op(data=_Augmenting(*make_data((6,))))
    op.matvec(_vec(op))
    with pytest.raises(fasthess.DataChangedError, match="random augmentation"):
        op.matvec(_vec(op))


def test_bad_model_and_loss_types():
    X, y = make_data((6,))
    with pytest.raises(FasthessError, match="torch.nn.Module"):
        fasthess.HessianOperator(lambda x: x, CE, (X, y))
    model, _ = make_model("tanh_mlp")
    with pytest.raises(FasthessError, match="callable"):
        fasthess.HessianOperator(model, "cross_entropy", (X, y))
    with pytest.raises(FasthessError, match="hvp must be"):
        fasthess.HessianOperator(model, CE, (X, y), hvp="finite-differences")


def test_matmat_shape_errors():
    op = _op()
    with pytest.raises(FasthessError, match="matmat expects shape"):
        op.matmat(torch.zeros(3, 2))
    with pytest.raises(FasthessError, match="matvec expects a vector"):
        op.matvec(torch.zeros(op.num_params, 1))


def test_failed_calls_leave_the_model_unchanged():
    model, shape = make_model("bn_eval")
    model.train()
    X, y = make_data(shape, n=9)
    before = copy.deepcopy(model.state_dict())
    op = fasthess.HessianOperator(model, CE, (X, y), batch_size=4)  # last chunk has one example
    with pytest.raises(FasthessError):
        fasthess.eigs(op)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert model.training and all(m.track_running_stats for m in model.modules()
                                  if isinstance(m, nn.BatchNorm1d))


def test_nan_chunk_is_named_when_empty_batches_come_first():
    X, y = make_data((6,), n=20)
    X[15, 0] = float("nan")
    batches = [(X[:0], y[:0]), (X[:10], y[:10]), (X[10:], y[10:])]
    op = _op(data=batches)
    with pytest.raises(NonFiniteError, match=r"chunk 1 .*inputs of example 5 of the chunk hold NaN"):
        op.matvec(_vec(op))


def test_v0_with_more_columns_than_parameters():
    op = fasthess.linop.MatrixOperator(torch.eye(5, dtype=torch.float64))
    with pytest.raises(FasthessError, match="at most 5"):
        fasthess.eigs(op, v0=torch.randn(5, 7, dtype=torch.float64))
