"""The contract's last holes (issue 21): forwards that mix examples, ragged batches, CTC, checkpointing, running
statistics and errors that name the real cause. Each form that answers is checked against a dense float64
Hessian; each refusal by its class and the fix its message names."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fasthess
from conftest import dense_hessian, dense_hessian_of
from fasthess.errors import BatchDependentModelError

N, CHUNK = 40, 10


def _check(op, H, cols=3, rtol=1e-9):
    V = torch.randn(op.num_params, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(op.matmat(V), H @ V, rtol=rtol, atol=1e-11 * float(H.abs().max()) + 1e-14)


def _data(d_in=4, classes=3, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


class FunctionalBN(nn.Module):
    """MAML-style: batch statistics by F.batch_norm, not a BatchNorm module."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.w, self.b = nn.Parameter(torch.ones(6)), nn.Parameter(torch.zeros(6))

    def forward(self, x):
        h = F.batch_norm(self.fc1(x), None, None, self.w, self.b, training=True)
        return self.fc2(torch.tanh(h))


class Centred(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.fc2(h - h.mean(0, keepdim=True))


class AcrossBatchAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        q = self.q(x)
        return self.out(torch.softmax(q @ x.T, dim=1) @ x)


class Mixup(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(0.7 * x + 0.3 * x.flip(0))


class TupleOut(nn.Module):
    """Mixing hidden in the second element of a tuple output, and a dict output."""

    def __init__(self, mix: bool, as_dict: bool = False) -> None:
        super().__init__()
        self.fc, self.mix, self.as_dict = nn.Linear(4, 3), mix, as_dict

    def forward(self, x):
        z = self.fc(x)
        other = z - z.mean(0) if self.mix else z * 2
        return {"logits": z, "other": other} if self.as_dict else (z, other)


@pytest.mark.parametrize("cls", [FunctionalBN, Centred, AcrossBatchAttention, Mixup])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_forward_that_mixes_examples_is_refused_before_any_product(cls, curvature):
    torch.manual_seed(0)
    model = cls().double()
    X, y = _data()
    Op = fasthess.HessianOperator if curvature == "hessian" else fasthess.GGNOperator
    op = Op(model, nn.CrossEntropyLoss(), (X, y), batch_size=CHUNK)
    with pytest.raises(fasthess.LossContractError, match=r"mixes the examples.*model\.eval\(\).*batch_loss=True"):
        op.matmat(torch.randn(op.num_params, 1, dtype=torch.float64))
    with pytest.raises(fasthess.LossContractError, match="mixes the examples"):
        fasthess.lambda_max(model, nn.CrossEntropyLoss(), (X, y), batch_size=CHUNK)


@pytest.mark.parametrize("as_dict", [False, True])
def test_mixing_in_any_output_leaf_is_seen_and_a_clean_structured_output_answers(as_dict):
    torch.manual_seed(0)
    X, y = _data()

    def loss(out, t):
        z = out["logits"] if as_dict else out[0]
        return F.cross_entropy(z, t)

    with pytest.raises(fasthess.LossContractError, match="mixes the examples"):
        fasthess.HessianOperator(TupleOut(True, as_dict).double(), loss, (X, y), batch_size=CHUNK).matvec(
            torch.zeros(15, dtype=torch.float64))
    model = TupleOut(False, as_dict).double()
    op = fasthess.HessianOperator(model, loss, (X, y), batch_size=CHUNK)
    _check(op, dense_hessian(model, loss, X, y, batch_size=N))


def test_batch_loss_opt_in_gives_the_ghost_batch_hessian_of_a_mixing_forward():
    torch.manual_seed(0)
    model = FunctionalBN().double()
    X, y = _data()
    loss = nn.CrossEntropyLoss()
    op = fasthess.HessianOperator(model, loss, (X, y), batch_size=CHUNK, batch=fasthess.BatchSpec(batch_loss=True))
    _check(op, dense_hessian(model, loss, X, y, batch_size=CHUNK))


class BNNet(nn.Module):
    """BatchNorm modules (the documented ghost batches) and nothing else that mixes examples."""

    def __init__(self, extra_mix: bool = False) -> None:
        super().__init__()
        self.fc1, self.bn1, self.fc2, self.bn2, self.fc3 = (nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 5),
                                                            nn.BatchNorm1d(5), nn.Linear(5, 3))
        self.extra_mix = extra_mix

    def forward(self, x):
        h = torch.tanh(self.bn1(self.fc1(x)))
        h = self.bn1(h[:, :6]) if h.shape[1] == 6 else h  # the same module called twice
        h = torch.tanh(self.bn2(self.fc2(h)))
        if self.extra_mix:
            h = h - h.mean(0)
        return self.fc3(h)


def test_train_mode_batchnorm_modules_are_the_documented_ghost_batches_and_other_mixing_still_shows():
    torch.manual_seed(0)
    model = BNNet().double().train()
    X, y = _data()
    loss = nn.CrossEntropyLoss()
    op = fasthess.HessianOperator(model, loss, (X, y), batch_size=CHUNK)
    _check(op, dense_hessian(model, loss, X, y, batch_size=CHUNK))
    mixed = BNNet(extra_mix=True).double().train()
    with pytest.raises(BatchDependentModelError, match="mixes the examples"):
        fasthess.HessianOperator(mixed, loss, (X, y), batch_size=CHUNK).matvec(torch.zeros(op.num_params,
                                                                                           dtype=torch.float64))


class SeqFirstLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.fc = nn.LSTM(3, 4), nn.Linear(4, 2)

    def forward(self, x):  # x: (T, N, 3)
        out, _ = self.rnn(x)
        return self.fc(out[-1])


def test_sequence_first_lstm_is_not_taken_for_a_mixing_forward():
    torch.manual_seed(0)
    model = SeqFirstLSTM().double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 6, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (6,), generator=g))
               for _ in range(3)]
    loss = nn.CrossEntropyLoss()
    op = fasthess.HessianOperator(model, loss, batches)
    def full(p):
        return sum(loss(functional_call(model, p, (x,)), t) * 6 for x, t in batches) / 18
    _check(op, dense_hessian_of(model, full))
