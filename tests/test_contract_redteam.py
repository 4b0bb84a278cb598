"""Red-team findings on the loss contract (issue 21 follow-up): a mixing forward behind one-row first chunks, the
caller's random state, raw PyTorch errors and messages that name the wrong cause. Each form that answers is
checked against a dense float64 Hessian; each refusal by its class and the cause its message names."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import fasthess
from conftest import dense_hessian_of
from fasthess.errors import BatchDependentModelError, FasthessError, LossContractError, StatefulModelError

N = 10


def _data(n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


class Centred(nn.Module):
    """Batch centring inside the forward: example i's output depends on the other examples of its batch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.fc2(h - h.mean(0, keepdim=True))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _one_row_first(X, y):
    return {"batch_size=1": ((X, y), {"batch_size": 1}),
            "list, first batch of one row": ([(X[:1], y[:1]), (X[1:], y[1:])], {}),
            "DataLoader batch_size=1": (DataLoader(TensorDataset(X, y), batch_size=1), {})}


@pytest.mark.parametrize("form", ["batch_size=1", "list, first batch of one row", "DataLoader batch_size=1"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_mixing_forward_behind_one_row_first_chunk_is_refused(form, curvature):
    """A one-row first chunk shows no mixing alone; joined with the next chunk it does (a false certificate
    before)."""
    X, y = _data()
    torch.manual_seed(0)
    data, kwargs = _one_row_first(X, y)[form]
    with pytest.raises(BatchDependentModelError, match="chunks 0 and 1 joined"):
        fasthess.lambda_max(Centred().double(), nn.CrossEntropyLoss(), data, curvature=curvature, **kwargs)


@pytest.mark.parametrize("form", ["batch_size=1", "list, first batch of one row", "DataLoader batch_size=1"])
def test_clean_model_with_one_row_chunks_matches_dense(form):
    X, y = _data()
    model = _mlp()
    data, kwargs = _one_row_first(X, y)[form]
    op = fasthess.HessianOperator(model, nn.CrossEntropyLoss(), data, **kwargs)
    H = dense_hessian_of(model, lambda p: F.cross_entropy(functional_call(model, p, (X,)), y))
    V = torch.randn(op.num_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(op.matmat(V), H @ V, rtol=1e-9, atol=1e-12)


def test_single_example_overall_has_nothing_to_mix():
    X, y = _data(n=1)
    torch.manual_seed(0)
    model = Centred().double()
    op = fasthess.HessianOperator(model, nn.CrossEntropyLoss(), (X, y), batch_size=1)
    H = dense_hessian_of(model, lambda p: F.cross_entropy(functional_call(model, p, (X,)), y))
    V = torch.randn(op.num_params, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(op.matmat(V), H @ V, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("form", ["TensorDataset", "DataLoader", "tuple"])
def test_data_iteration_leaves_the_callers_random_state(form):
    """A DataLoader draws its base seed from the default generator; a computation must not advance it."""
    X, y = _data(n=12)
    data, kwargs = {"TensorDataset": (TensorDataset(X, y), {"batch_size": 4}),
                    "DataLoader": (DataLoader(TensorDataset(X, y), batch_size=4), {}),
                    "tuple": ((X, y), {"batch_size": 4})}[form]
    before = torch.random.get_rng_state()
    fasthess.lambda_max(_mlp(), nn.CrossEntropyLoss(), data, **kwargs)
    assert torch.equal(before, torch.random.get_rng_state())


def test_stochastic_forward_draws_advance_the_generator():
    """allow_stochastic=True: dropout draws from the caller's generator, as in training (documented choice)."""
    X, y = _data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.3), nn.Tanh(), nn.Linear(5, 3)).double().train()
    before = torch.random.get_rng_state()
    fasthess.HessianOperator(model, nn.CrossEntropyLoss(), (X, y), batch_size=5, allow_stochastic=True).matvec(
        torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.float64))
    assert not torch.equal(before, torch.random.get_rng_state())


def test_loss_on_a_detached_output_is_named():
    X, y = _data()
    with pytest.raises(LossContractError, match="does not depend on the model's output.*detach"):
        fasthess.lambda_max(_mlp(), lambda o, t: F.cross_entropy(o.detach(), t), (X, y), batch_size=4)


class Rows(IterableDataset):
    """A streaming dataset of (x, y) rows: no length."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
        self.X, self.y = X, y

    def __iter__(self):
        return iter(zip(self.X, self.y))


@pytest.mark.parametrize("batch_size", [4, None])
def test_iterable_dataset_is_batched_and_matches_dense(batch_size):
    X, y = _data()
    model = _mlp()
    op = fasthess.HessianOperator(model, nn.CrossEntropyLoss(), Rows(X, y), batch_size=batch_size)
    H = dense_hessian_of(model, lambda p: F.cross_entropy(functional_call(model, p, (X,)), y))
    V = torch.randn(op.num_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(op.matmat(V), H @ V, rtol=1e-9, atol=1e-12)
    assert op.num_examples == N


@pytest.mark.parametrize("form, cause", [
    ("numpy", "numpy arrays.*torch.as_tensor"),
    ("one-tuple", r"one entry \(X,\) and no targets"),
    ("four entries", "4 entries"),
    ("list of rows", "entry 0 is a list.*torch.stack"),
])
def test_malformed_data_tuple_names_what_is_wrong(form, cause):
    X, y = _data()
    data = {"numpy": (X.numpy(), y.numpy()), "one-tuple": (X,), "four entries": (X, y, y.double(), y),
            "list of rows": ([X[i] for i in range(N)], y)}[form]
    with pytest.raises(FasthessError, match=cause):
        fasthess.lambda_max(_mlp(), nn.CrossEntropyLoss(), data, batch_size=4)


def test_non_scalar_penalty_is_named_as_the_penalty():
    X, y = _data()
    with pytest.raises(FasthessError, match=r"the penalty gave \(5, 4\)"):
        fasthess.lambda_max(_mlp(), nn.CrossEntropyLoss(), (X, y), batch_size=4, penalty=lambda p: p["0.weight"] ** 2)


def test_float_class_indices_name_long():
    X, y = _data()
    with pytest.raises(LossContractError, match=r"y\.long\(\)"):
        fasthess.lambda_max(_mlp(), nn.CrossEntropyLoss(), (X, y.double()), batch_size=5)


class SpecNorm(nn.Module):
    """spectral_norm on the first layer: in train mode each forward takes a power step on its buffers u and v."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.utils.parametrizations.spectral_norm(nn.Linear(4, 5))
        self.h = nn.Linear(5, 3)

    def forward(self, x):
        return self.h(torch.tanh(self.a(x)))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_train_mode_spectral_norm_is_refused_as_stateful_on_every_seed(seed, dtype):
    torch.manual_seed(seed)
    model = SpecNorm().to(dtype).train()
    X, y = _data(seed=seed)
    with pytest.raises(StatefulModelError, match=r"_u.*model\.eval\(\)"):
        fasthess.lambda_max(model, nn.CrossEntropyLoss(), (X.to(dtype), y), batch_size=4)


def test_eval_mode_spectral_norm_matches_dense():
    torch.manual_seed(0)
    model = SpecNorm().double().eval()
    X, y = _data()
    op = fasthess.HessianOperator(model, nn.CrossEntropyLoss(), (X, y), batch_size=4)
    H = dense_hessian_of(model, lambda p: F.cross_entropy(functional_call(model, p, (X,)), y))
    V = torch.randn(op.num_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(op.matmat(V), H @ V, rtol=1e-9, atol=1e-12)


class InPlaceInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x.mul_(0.5)
        return self.fc(torch.tanh(x))


@pytest.mark.parametrize("form", ["tuple", "list"])
def test_forward_writing_its_input_is_refused_and_the_data_is_untouched(form):
    X, y = _data()
    X0 = X.clone()
    data, kwargs = {"tuple": ((X, y), {"batch_size": 4}), "list": ([(X[:5], y[:5]), (X[5:], y[5:])], {})}[form]
    with pytest.raises(StatefulModelError, match=r"changes its input in place.*x = x \* 0\.5"):
        fasthess.lambda_max(InPlaceInput().double(), nn.CrossEntropyLoss(), data, **kwargs)
    assert torch.equal(X, X0)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16])
def test_narrow_integer_class_indices_name_long(dtype):
    X, y = _data()
    with pytest.raises(LossContractError, match=r"y\.long\(\)"):
        fasthess.lambda_max(_mlp(), nn.CrossEntropyLoss(), (X, y.to(dtype)), batch_size=5)


class MeanPool(nn.Module):
    """Mean over a sequence's positions: padding would change it, so ragged chunks cannot be joined."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)).mean(1))


def test_ragged_one_row_first_chunk_is_not_misjudged_and_matches_dense():
    g = torch.Generator().manual_seed(2)
    X1, X2 = (torch.randn(n, t, 4, generator=g, dtype=torch.float64) for n, t in ((1, 3), (3, 5)))
    y1, y2 = torch.randint(0, 3, (1,), generator=g), torch.randint(0, 3, (3,), generator=g)
    torch.manual_seed(0)
    model = MeanPool().double()
    op = fasthess.HessianOperator(model, nn.CrossEntropyLoss(), [(X1, y1), (X2, y2)])

    def loss(p):
        return sum(F.cross_entropy(functional_call(model, p, (X,)), y, reduction="sum")
                   for X, y in ((X1, y1), (X2, y2))) / 4

    V = torch.randn(op.num_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(op.matmat(V), dense_hessian_of(model, loss) @ V, rtol=1e-9, atol=1e-12)
