"""Shared fixtures: small float64 models and a dense-Hessian reference."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, vmap


def dense_hessian(model: nn.Module, loss_fn, X: torch.Tensor, y: torch.Tensor, batch_size: int,
                  params: list[nn.Parameter] | None = None) -> torch.Tensor:
    """The n×n Hessian of (1/N) Σ_c n_c L_c by autograd on a flat parameter vector (the reference)."""
    named = [(n, p) for n, p in model.named_parameters() if (p.requires_grad if params is None else
                                                              any(p is q for q in params))]
    names, shapes = [n for n, _ in named], [p.shape for _, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        parts, off = {}, 0
        for name, shape in zip(names, shapes):
            parts[name] = flat[off:off + shape.numel()].reshape(shape)
            off += shape.numel()
        total = 0.0
        for s in range(0, X.shape[0], batch_size):
            xb, yb = X[s:s + batch_size], y[s:s + batch_size]
            total = total + yb.shape[0] * loss_fn(functional_call(model, parts, (xb,), strict=False), yb)
        return total / X.shape[0]

    H = torch.autograd.functional.hessian(loss_of, theta)
    return (H + H.T) / 2


class Residual(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d))

    def forward(self, x):
        return x + self.f(x)


def make_model(kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A tiny float64 model and its input shape (without the batch dimension)."""
    torch.manual_seed(0)
    d, c = 6, 3
    models = {
        "tanh_mlp": (nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, c)), (d,)),
        "gelu_mlp": (nn.Sequential(nn.Linear(d, 8), nn.GELU(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, c)), (d,)),
        "relu_mlp": (nn.Sequential(nn.Linear(d, 10), nn.ReLU(), nn.Linear(10, c)), (d,)),
        "cnn": (nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, c)),
                (1, 6, 6)),
        "bn_eval": (nn.Sequential(nn.Linear(d, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, c)), (d,)),
        "layernorm": (nn.Sequential(nn.Linear(d, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, c)), (d,)),
        "residual": (nn.Sequential(nn.Linear(d, 5), Residual(5), nn.Linear(5, c)), (d,)),
    }
    model, shape = models[kind]
    model = model.double()
    if kind == "bn_eval":  # give the running statistics non-trivial values, then freeze them
        model.train()
        with torch.no_grad():
            model(torch.randn(64, d, dtype=torch.float64))
        model.eval()
    return model, shape


def make_data(shape: tuple[int, ...], n: int = 37, classes: int = 3, loss: str = "ce", seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g) if loss == "ce" else \
        torch.randn(n, classes, generator=g, dtype=torch.float64)
    return X, y


LOSSES = {"ce": nn.CrossEntropyLoss(), "mse": nn.MSELoss()}


@pytest.fixture
def small_problem():
    model, shape = make_model("tanh_mlp")
    X, y = make_data(shape)
    return model, LOSSES["ce"], X, y


def spawn_ranks(worker, world: int, tmp, attempts: int = 3) -> Path:
    """``mp.spawn(worker, (world, store_file, out_dir))`` in a fresh folder under ``tmp``; returns that folder.

    A worker killed by a signal gets another try (at most ``attempts`` in all), in a new folder, after a pause and
    with a warning: on this 2-core box a spawned worker has aborted in start-up ("terminate called without an
    active exception", SIGABRT, no Python frame, only numpy and torch loaded) in about 1 of 15 runs of these
    fixtures, twice in a row once. A Python exception in a worker, i.e. a failed check, is never retried.
    """
    import time
    import warnings

    import torch.multiprocessing as mp

    for attempt in range(1, attempts + 1):
        out = tmp / f"attempt{attempt}"
        out.mkdir()
        try:
            mp.spawn(worker, args=(world, str(out / "store"), str(out)), nprocs=world, join=True)
            return out
        except mp.ProcessExitedException as exc:
            if attempt == attempts or exc.signal_name is None:
                raise
            warnings.warn(f"a worker died by {exc.signal_name}; spawning the {world} processes once more",
                          RuntimeWarning)
            time.sleep(2.0)
    raise AssertionError("unreachable")


def flat_parameters(model: nn.Module, params: list[nn.Parameter] | None = None):
    """θ, the chosen parameters (default: those with ``requires_grad``) as one flat vector, and the map from such a
    vector back to the parameters by name."""
    named = [(n, p) for n, p in model.named_parameters() if (p.requires_grad if params is None else
                                                              any(p is q for q in params))]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def by_name(flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts, off = {}, 0
        for name, p in named:
            parts[name] = flat[off:off + p.numel()].reshape(p.shape)
            off += p.numel()
        return parts

    return theta, by_name


def dense_hessian_of(model: nn.Module, loss_of, params: list[nn.Parameter] | None = None) -> torch.Tensor:
    """The n×n Hessian of ``loss_of(parameters by name)`` (any full-data loss, e.g. the loss called on all the data
    as one batch, plus a penalty) over ``params`` (default: those with ``requires_grad``), by autograd."""
    theta, by_name = flat_parameters(model, params)
    H = torch.autograd.functional.hessian(lambda flat: loss_of(by_name(flat)), theta)
    return (H + H.T) / 2


def flat_outputs(model: nn.Module, X: torch.Tensor):
    """θ (the trainable parameters as one flat vector) and θ ↦ f_θ(X)."""
    theta, by_name = flat_parameters(model)
    return theta, lambda flat: functional_call(model, by_name(flat), (X,), strict=False)


def dense_ggn(model: nn.Module, loss_fn, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(1/N) Σᵢ Jᵢᵀ (∇²_o ℓᵢ) Jᵢ with Jᵢ = ∂f(xᵢ)/∂θ and ℓᵢ(o) = loss_fn(o[None], yᵢ[None]).

    For a mean-reduced loss, chunk c contributes (n_c/N)(1/n_c) Σ_{i∈c} = (1/N) Σ_{i∈c}, so chunks drop out.
    """
    theta, outputs = flat_outputs(model, X)
    out = outputs(theta).detach()
    J = torch.autograd.functional.jacobian(outputs, theta, vectorize=True)  # (N, C, n)
    h = vmap(hessian(lambda o, t: loss_fn(o[None], t[None])))(out, y)  # (N, C, C)
    G = torch.einsum("icn,icd,idm->nm", J, h, J)
    return G / X.shape[0]
