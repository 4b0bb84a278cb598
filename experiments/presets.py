"""Named sweeps for the paper's five findings.

``findingN-quick`` run on embedded data (scikit-learn digits, MNIST-1D) on a 2-core CPU in a few
minutes; ``findingN-paper`` follow the paper's setup (CIFAR-10 / Fashion-MNIST, VGG-11 / MLP,
train to 99% train accuracy) and need the data sets in a local folder and a GPU.

Each preset: ``finding`` (1-5), ``description``, ``base`` (config shared by all runs), ``grid``
(a list of per-run overrides), ``vary`` (keys that name the run directories) and ``claims``
(thresholds the report uses for its verdicts).
"""
from __future__ import annotations

import copy
import itertools
from typing import Any

FINDINGS = {
    1: "A larger learning rate lowers λ_max, but its test-accuracy gain vanishes at large batch size (incl. GD).",
    2: "Scaling learning rate and batch size together (η/B constant) changes λ_max but not test accuracy.",
    3: "SAM lowers λ_max, but its test-accuracy gain vanishes at large batch size.",
    4: "High dropout lowers λ_max yet hurts test accuracy.",
    5: "BatchNorm improves test accuracy without consistently lowering λ_max.",
}


def grid(**axes) -> list[dict[str, Any]]:
    keys = list(axes)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(axes[k] for k in keys))]


def sam_grid(**axes) -> list[dict[str, Any]]:
    """:func:`grid` over SAM settings; ρ = 0 is plain SGD (the baseline each ρ is compared against)."""
    return [dict(g, optimizer="sgd" if g["rho"] == 0 else "sam") for g in grid(**axes)]


# ---------------------------------------------------------------------------- quick (CPU, embedded data)
_M1D = {"dataset": "mnist1d", "train_subset": 1000, "model": "mlp", "hidden": [256, 256], "max_steps": 3000,
        "lambda_tol": 1e-3, "track_every_evals": 5}

_PRESETS: dict[str, dict[str, Any]] = {
    "finding1-quick": {
        "finding": 1,
        "description": "MNIST-1D (first 1000 of 4000 train / 1000 test), MLP 40-256-256-10: SGD at B=32 and "
                       "full-batch GD, lr in {0.05, 0.15, 0.5}, to 99% train accuracy (cap 3000 steps).",
        "base": dict(_M1D),
        "grid": grid(optimizer=["sgd"], batch_size=[32], lr=[0.05, 0.15, 0.5])
        + grid(optimizer=["gd"], lr=[0.05, 0.15, 0.5], eval_every_epochs=[10]),
        "vary": ["optimizer", "batch_size", "lr"],
        "claims": {"acc_tol": 0.01},
    },
    "finding2-quick": {
        "finding": 2,
        "description": "MNIST-1D (1000 train), MLP 40-256-256-10, SGD with η/B = 0.1/32 held constant: (η, B) in "
                       "{(0.025, 8), (0.05, 16), (0.1, 32), (0.2, 64), (0.4, 128)}.",
        "base": dict(_M1D, max_steps=12000),
        "grid": [{"lr": 0.1 * b / 32, "batch_size": b} for b in (8, 16, 32, 64, 128)],
        "vary": ["lr", "batch_size"],
        "claims": {"acc_tol": 0.02, "lambda_ratio": 1.25},
    },
    "finding3-quick": {
        "finding": 3,
        "description": "MNIST-1D (1000 train), MLP 40-256-256-10, lr 0.1: SAM rho in {0 (plain SGD), 0.05, 0.2} at B=32 and B=1000 (full batch).",
        "base": dict(_M1D, lr=0.1, optimizer="sam"),
        "grid": [dict(g, eval_every_epochs=1 if g["batch_size"] < 1000 else 10)
                 for g in sam_grid(batch_size=[32, 1000], rho=[0.0, 0.05, 0.2])],
        "vary": ["batch_size", "rho"],
        "claims": {"acc_tol": 0.01},
    },
    "finding4-quick": {
        "finding": 4,
        "description": "MNIST-1D (1000 train), MLP 40-256-256-10 with Dropout(p) after each hidden layer, SGD lr 0.1, B=32, "
                       "p in {0, 0.2, 0.5, 0.7}.",
        "base": dict(_M1D, lr=0.1, batch_size=32),
        "grid": grid(dropout=[0.0, 0.2, 0.5, 0.7]),
        "vary": ["dropout"],
        "claims": {"acc_tol": 0.01},
    },
    "finding5-quick": {
        "finding": 5,
        "description": "scikit-learn digits (1297 train / 500 test, 1x8x8), small CNN (16-32 channels) with and "
                       "without BatchNorm, SGD B=32, lr in {0.01, 0.05, 0.2}; λ_max in train mode with ghost "
                       "batches of 32, max over 8 points between the last two iterates.",
        "base": {"dataset": "digits", "model": "cnn", "channels": [16, 32], "batch_size": 32, "max_steps": 4000,
                 "between_iterates": 8, "lambda_tol": 1e-3},
        "grid": grid(batch_norm=[False, True], lr=[0.01, 0.05, 0.2]),
        "vary": ["batch_norm", "lr"],
        "claims": {"acc_tol": 0.0},
    },
}

# ---------------------------------------------------------------------------- paper (GPU, CIFAR-10 / Fashion-MNIST)
_CIFAR = {"dataset": "cifar10", "model": "vgg11", "device": "cuda", "threads": 0, "max_steps": 500_000,
          "chunk_size": 1000, "eval_chunk_size": 5000, "lambda_tol": 1e-3, "lambda_batch_size": None}
_FMNIST = {"dataset": "fashion_mnist", "model": "mlp", "hidden": [256, 256], "device": "cuda", "threads": 0,
           "max_steps": 500_000, "eval_chunk_size": 10000, "lambda_tol": 1e-3}

_PRESETS.update({
    "finding1-paper": {
        "finding": 1,
        "description": "CIFAR-10 (50k), VGG-11 without BN, SGD at B in {100, 1000} and full-batch GD (chunks of 1000), "
                       "lr in {0.005, 0.01, 0.02, 0.04}, to 99% train accuracy.",
        "base": dict(_CIFAR),
        "grid": grid(optimizer=["sgd"], batch_size=[100, 1000], lr=[0.005, 0.01, 0.02, 0.04])
        + grid(optimizer=["gd"], lr=[0.005, 0.01, 0.02, 0.04]),
        "vary": ["optimizer", "batch_size", "lr"],
        "claims": {"acc_tol": 0.005},
    },
    "finding2-paper": {
        "finding": 2,
        "description": "CIFAR-10, VGG-11 without BN, SGD with η/B = 0.01/100 held constant, B in {50, 100, 200, 400, 800}.",
        "base": dict(_CIFAR),
        "grid": [{"lr": 0.01 * b / 100, "batch_size": b} for b in (50, 100, 200, 400, 800)],
        "vary": ["lr", "batch_size"],
        "claims": {"acc_tol": 0.01, "lambda_ratio": 1.25},
    },
    "finding3-paper": {
        "finding": 3,
        "description": "CIFAR-10, VGG-11 without BN, lr 0.01: SAM rho in {0, 0.05, 0.1} at B in {100, 1000, 5000}.",
        "base": dict(_CIFAR, optimizer="sam", lr=0.01),
        "grid": sam_grid(batch_size=[100, 1000, 5000], rho=[0.0, 0.05, 0.1]),
        "vary": ["batch_size", "rho"],
        "claims": {"acc_tol": 0.005},
    },
    "finding4-paper": {
        "finding": 4,
        "description": "Fashion-MNIST (60k), MLP 784-256-256-10 with Dropout(p), SGD lr 0.05, B=128, "
                       "p in {0, 0.1, 0.2, 0.5, 0.6, 0.7}.",
        "base": dict(_FMNIST, lr=0.05, batch_size=128),
        "grid": grid(dropout=[0.0, 0.1, 0.2, 0.5, 0.6, 0.7]),
        "vary": ["dropout"],
        "claims": {"acc_tol": 0.005},
    },
    "finding5-paper": {
        "finding": 5,
        "description": "CIFAR-10, VGG-11 with and without BN, SGD B=100, lr in {0.005, 0.01, 0.02, 0.05}; λ_max in "
                       "train mode with ghost batches of 100, max over 8 points between the last two iterates.",
        "base": dict(_CIFAR, batch_size=100, between_iterates=8),
        "grid": grid(batch_norm=[False, True], lr=[0.005, 0.01, 0.02, 0.05]),
        "vary": ["batch_norm", "lr"],
        "claims": {"acc_tol": 0.0},
    },
})


def list_presets() -> list[str]:
    return sorted(_PRESETS, key=lambda n: (n.split("-")[1] != "quick", n))


def get_preset(name: str) -> dict[str, Any]:
    if name not in _PRESETS:
        raise KeyError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    p = copy.deepcopy(_PRESETS[name])
    p["name"] = name
    p["claim"] = FINDINGS[p["finding"]]
    return p
