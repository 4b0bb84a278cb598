"""Benchmark problems shared by bench_core.py and compare_peers.py: a model, its data, a loss, a chunk size.

Every problem is deterministic (fixed seeds) and needs no download:

* ``mlp_digits``: scikit-learn's digits (1797 × 64, standardized), MLP 64-256-256-10 (85k parameters),
  chunk 599 (3 equal chunks).
* ``cnn_cifar``: 2000 CIFAR-shaped (3×32×32) synthetic images whose class is a smooth template plus noise,
  CNN conv3→16, conv16→32 (each 3×3, ReLU, max-pool 2), FC 2048→64→10 (137k parameters), chunk 250.
* ``mlp_mnist1d``: the finding-cpu problem of experiments/presets.py: MNIST-1D generated offline (the first 4000 of
  9000 examples, 40 features), MLP 40-256-256-10 (77k parameters), chunk 1000, SGD at lr 0.05, batch 32.
* ``vgg11_cifar`` (GPU only): VGG-11 (config A, no BatchNorm) on 50k synthetic CIFAR-shaped images, chunk 1000.

Each model is first trained for a few SGD steps (``pretrain_steps``) so that the Hessian is not that of a
random initialization; :func:`sgd_steps` continues the same training (used by the warm-start benchmarks).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class Problem:
    name: str
    model: nn.Module
    X: torch.Tensor
    y: torch.Tensor
    batch_size: int
    lr: float
    train_batch: int
    loss_fn: nn.Module = field(default_factory=nn.CrossEntropyLoss)
    step: int = 0

    @property
    def data(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.X, self.y

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def batches(self):
        """The data as a list of (x, y) batches of ``batch_size`` (for the peers that want a data loader)."""
        return [(self.X[s:s + self.batch_size], self.y[s:s + self.batch_size])
                for s in range(0, self.X.shape[0], self.batch_size)]


class SmallCNN(nn.Module):
    def __init__(self, channels=(16, 32), hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c2 * 8 * 8, hidden), nn.ReLU(),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def mlp(sizes=(64, 256, 256, 10)) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i + 2 < len(sizes):
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / 16.0
    X = (X - X.mean(0)) / X.std(0).clamp_min(1e-3)
    return X, torch.tensor(d.target, dtype=torch.long)


def synthetic_cifar(n: int, seed: int = 0, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """n CIFAR-shaped images: a smooth per-class template (upsampled 4×4 noise) plus pixel noise."""
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.randn(num_classes, 3, 4, 4, generator=g), size=32, mode="bilinear",
                              align_corners=False)
    y = torch.randint(0, num_classes, (n,), generator=g)
    X = templates[y] + 1.5 * torch.randn(n, 3, 32, 32, generator=g)
    return ((X - X.mean()) / X.std()).contiguous(), y


def sgd_steps(p: Problem, steps: int, seed: int | None = None, opt: torch.optim.Optimizer | None = None) -> None:
    """``steps`` SGD steps on random mini-batches of the problem's data (continues the training); ``opt`` replaces
    plain SGD at the problem's learning rate (e.g. SGD with momentum, kept across calls)."""
    g = torch.Generator().manual_seed(p.step if seed is None else seed)
    opt = opt or torch.optim.SGD(p.model.parameters(), lr=p.lr)
    for _ in range(steps):
        idx = torch.randint(0, p.X.shape[0], (p.train_batch,), generator=g).to(p.X.device)
        opt.zero_grad(set_to_none=True)
        p.loss_fn(p.model(p.X[idx]), p.y[idx]).backward()
        opt.step()
        p.step += 1
    opt.zero_grad(set_to_none=True)


def make(name: str, device: str | torch.device = "cpu", pretrain_steps: int | None = None,
         dtype: torch.dtype = torch.float32) -> Problem:
    torch.manual_seed(0)
    if name == "mlp_digits":
        X, y = _digits()
        p = Problem(name, mlp(), X, y, batch_size=599, lr=0.1, train_batch=64)
        steps = 200 if pretrain_steps is None else pretrain_steps
    elif name == "cnn_cifar":
        X, y = synthetic_cifar(2000)
        p = Problem(name, SmallCNN(), X, y, batch_size=250, lr=0.05, train_batch=64)
        steps = 100 if pretrain_steps is None else pretrain_steps
    elif name == "mlp_mnist1d":
        from experiments.data import read_mnist1d

        X, y = read_mnist1d(9000, num_train=4000)[:2]
        p = Problem(name, mlp((40, 256, 256, 10)), torch.as_tensor(X, dtype=torch.float32).reshape(len(X), -1),
                    torch.as_tensor(y, dtype=torch.long), batch_size=1000, lr=0.05, train_batch=32)
        steps = 200 if pretrain_steps is None else pretrain_steps
    elif name == "vgg11_cifar":
        from experiments.models import VGG

        X, y = synthetic_cifar(50_000)
        p = Problem(name, VGG(), X, y, batch_size=1000, lr=0.02, train_batch=128)
        steps = 100 if pretrain_steps is None else pretrain_steps
    else:
        raise ValueError(f"unknown problem {name!r}; choose from {PROBLEMS + GPU_PROBLEMS}")
    p.model.to(device=device, dtype=dtype)
    p.X, p.y = p.X.to(device=device, dtype=dtype), p.y.to(device)
    sgd_steps(p, steps, seed=1234)
    p.model.eval()
    return p


def full_gradient(p: Problem) -> torch.Tensor:
    """One full-data gradient pass in the problem's chunks (the unit of cost: one gradient-equivalent)."""
    params = [q for q in p.model.parameters() if q.requires_grad]
    for q in params:
        q.grad = None
    N = p.X.shape[0]
    for s in range(0, N, p.batch_size):
        xb, yb = p.X[s:s + p.batch_size], p.y[s:s + p.batch_size]
        (p.loss_fn(p.model(xb), yb) * (yb.shape[0] / N)).backward()
    g = torch.cat([q.grad.reshape(-1) for q in params])
    for q in params:
        q.grad = None
    return g


PROBLEMS = ("mlp_digits", "cnn_cifar")
TRACKING_PROBLEMS = ("mlp_mnist1d", "cnn_cifar", "mlp_digits")
GPU_PROBLEMS = ("vgg11_cifar",)
