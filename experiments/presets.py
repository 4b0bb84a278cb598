"""Named sweeps for the paper's five findings, in three tiers.

* ``findingN-quick``: smoke tests on embedded data (MNIST-1D, scikit-learn digits), 2 seeds, a few minutes on
  a 2-core CPU; their verdicts may well be *inconclusive*.
* ``findingN-cpu``: decide the claims on a CPU: MNIST-1D generated offline (4000 train / 5000 test), 5 seeds,
  step caps that let every run reach 99 % train accuracy.
* ``findingN-paper``: the paper's setup (CIFAR-10 / Fashion-MNIST, VGG-11 / MLP, to 99 % train accuracy, 3
  seeds); they need the data sets in a local folder and a GPU. λ_max on the full training set by default;
  ``--paper-lambda-subset`` uses the paper's 1000-example strided subset instead.

Each preset: ``finding`` (1-5), ``description``, ``base`` (config shared by all runs), ``grid`` (a list of
per-run overrides), ``seeds``, ``vary`` (keys that name the configurations), ``claims`` (the margins the
verdicts use: ``acc_margin`` in accuracy, ``lambda_margin`` as a relative λ_max change), ``plot`` (x axis
and panels of effect.png), optionally ``lambda_paper_stride``, ``grid_note`` (where the paper's grid is not
known) and ``measured`` (a wall time measured on this project's 2-core CPU).
"""
from __future__ import annotations

import copy
import itertools
from typing import Any

from .config import did_you_mean

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


def gd(points: list[dict[str, Any]], eval_every_epochs: int) -> list[dict[str, Any]]:
    """Full-batch GD points: the 99 % stopping test on the training set after every step, a full evaluation
    (test set, λ_max tracking) every ``eval_every_epochs`` steps."""
    return [dict(p, optimizer="gd", stop_check_every=1, eval_every_epochs=eval_every_epochs) for p in points]


_PLOT_LR = {"x": "lr", "panel": "batch"}
_PLOT_SAM = {"x": "rho", "panel": "batch"}
_PLOT_P = {"x": "dropout", "panel": "none"}
_PLOT_B = {"x": "batch_size", "panel": "none"}
_PLOT_BN = {"x": "lr", "panel": "batch_norm"}

# ---------------------------------------------------------------------------- quick (smoke tests)
_M1D = {"dataset": "mnist1d", "train_subset": 1000, "model": "mlp", "hidden": [256, 256], "max_steps": 3000,
        "lambda_tol": 1e-3, "track_every_evals": 5}
_QUICK_SEEDS = [0, 1]

_PRESETS: dict[str, dict[str, Any]] = {
    "finding1-quick": {
        "finding": 1,
        "description": "Smoke test. MNIST-1D (first 1000 of 4000 train / 1000 test), MLP 40-256-256-10: SGD at B=32 "
                       "and full-batch GD, lr in {0.05, 0.15, 0.5}, to 99% train accuracy (cap 3000 steps), 2 seeds.",
        "base": dict(_M1D),
        "grid": grid(optimizer=["sgd"], batch_size=[32], lr=[0.05, 0.15, 0.5]) + gd(grid(lr=[0.05, 0.15, 0.5]), 10),
        "vary": ["optimizer", "batch_size", "lr"],
        "claims": {"acc_margin": 0.02},
        "plot": _PLOT_LR,
    },
    "finding2-quick": {
        "finding": 2,
        "description": "Smoke test. MNIST-1D (1000 train), MLP 40-256-256-10, SGD with η/B = 0.1/32 held constant: "
                       "(η, B) in {(0.025, 8), (0.1, 32), (0.4, 128)}, 2 seeds.",
        "base": dict(_M1D, max_steps=12000),
        "grid": [{"lr": 0.1 * b / 32, "batch_size": b} for b in (8, 32, 128)],
        "vary": ["lr", "batch_size"],
        "claims": {"acc_margin": 0.02, "lambda_margin": 0.1},
        "plot": _PLOT_B,
    },
    "finding3-quick": {
        "finding": 3,
        "description": "Smoke test. MNIST-1D (1000 train), MLP 40-256-256-10, lr 0.1: SAM rho in {0 (plain SGD), "
                       "0.05, 0.2} at B=32 and B=1000 (full batch), 2 seeds.",
        "base": dict(_M1D, lr=0.1, optimizer="sam"),
        "grid": [dict(g, eval_every_epochs=1 if g["batch_size"] < 1000 else 10, stop_check_every=int(g["batch_size"] >= 1000))
                 for g in sam_grid(batch_size=[32, 1000], rho=[0.0, 0.05, 0.2])],
        "vary": ["batch_size", "rho"],
        "claims": {"acc_margin": 0.02},
        "plot": _PLOT_SAM,
    },
    "finding4-quick": {
        "finding": 4,
        "description": "Smoke test. MNIST-1D (1000 train), MLP 40-256-256-10 with Dropout(p) after each hidden layer, "
                       "SGD lr 0.1, B=32, p in {0, 0.2, 0.5}, 2 seeds (p=0.5 may hit the 3000-step cap: excluded).",
        "base": dict(_M1D, lr=0.1, batch_size=32),
        "grid": grid(dropout=[0.0, 0.2, 0.5]),
        "vary": ["dropout"],
        "claims": {"acc_margin": 0.02, "dropout_reference": 0.0},
        "plot": _PLOT_P,
    },
    "finding5-quick": {
        "finding": 5,
        "description": "Smoke test. scikit-learn digits (1297 train / 500 test, 1x8x8), small CNN (16-32 channels) "
                       "with and without BatchNorm, SGD B=32, lr in {0.01, 0.05, 0.2}, 2 seeds; λ_max in train "
                       "mode with ghost batches of 32; for BN at lr 0.01 the max over 8 points between the last "
                       "two iterates.",
        "base": {"dataset": "digits", "model": "cnn", "channels": [16, 32], "batch_size": 32, "max_steps": 4000,
                 "lambda_tol": 1e-3},
        "grid": [dict(g, between_iterates=8 if g["batch_norm"] and g["lr"] <= 0.01 else 0)
                 for g in grid(batch_norm=[False, True], lr=[0.01, 0.05, 0.2])],
        "vary": ["batch_norm", "lr"],
        "claims": {"acc_margin": 0.02, "lambda_margin": 0.1},
        "plot": _PLOT_BN,
    },
}
for _p in _PRESETS.values():
    _p["seeds"] = list(_QUICK_SEEDS)

# ---------------------------------------------------------------------------- cpu (decide on a 2-core CPU)
# MNIST-1D: 9000 generated examples, the first 4000 for training and 5000 for testing (a test set that
# large keeps the sampling noise of a paired difference near 1 point)
_M1D_CPU = {"dataset": "mnist1d", "data_kwargs": {"num_samples": 9000, "num_train": 4000}, "model": "mlp",
            "hidden": [256, 256], "lambda_tol": 1e-3, "track_every_evals": 10, "eval_chunk_size": 5000}
_CPU_SEEDS = [0, 1, 2, 3, 4]

_PRESETS.update({
    "finding1-cpu": {
        "finding": 1,
        "description": "MNIST-1D (4000 train / 5000 test), MLP 40-256-256-10: SGD at B=32 and full-batch GD, "
                       "lr in {0.05, 0.1, 0.2} (SGD) and {0.1, 0.2, 0.4} (GD), to 99% train accuracy, 5 seeds. "
                       "Single runs to 99%: GD lr 0.1 2769 steps, lr 0.4 847 steps; SGD lr 0.05 7125 steps.",
        "base": dict(_M1D_CPU, max_steps=40_000),
        "grid": grid(optimizer=["sgd"], batch_size=[32], lr=[0.05, 0.1, 0.2]) + gd(grid(lr=[0.1, 0.2, 0.4]), 25),
        "vary": ["optimizer", "batch_size", "lr"],
        "claims": {"acc_margin": 0.015},
        "plot": _PLOT_LR,
    },
    "finding2-cpu": {
        "finding": 2,
        "description": "MNIST-1D (4000 train / 5000 test), MLP 40-256-256-10, SGD with η/B = 0.1/32 held constant: "
                       "(η, B) in {(0.025, 8), (0.05, 16), (0.1, 32), (0.2, 64), (0.4, 128)}, 5 seeds.",
        "base": dict(_M1D_CPU, max_steps=60_000),
        "grid": [{"lr": 0.1 * b / 32, "batch_size": b} for b in (8, 16, 32, 64, 128)],
        "vary": ["lr", "batch_size"],
        "claims": {"acc_margin": 0.015, "lambda_margin": 0.1},
        "plot": _PLOT_B,
    },
    "finding3-cpu": {
        "finding": 3,
        "description": "MNIST-1D (4000 train / 5000 test), MLP 40-256-256-10: SAM rho in {0 (plain SGD / GD), 0.05, "
                       "0.1} at B=32 with lr 0.1 and at full batch with lr 0.4, 5 seeds. Each claim compares SAM "
                       "with SGD at the same batch size and lr; full batch takes lr 0.4 because at lr 0.1 one "
                       "full-batch SAM run needs about 2 x 2769 gradient steps (see finding1-cpu) and the preset "
                       "would not fit in 20 minutes.",
        "base": dict(_M1D_CPU, optimizer="sam", max_steps=40_000),
        "grid": [dict(g, lr=0.1) for g in sam_grid(batch_size=[32], rho=[0.0, 0.05, 0.1])]
        + [dict(g, lr=0.4, batch_size=4000, stop_check_every=1, eval_every_epochs=25)
           for g in sam_grid(rho=[0.0, 0.05, 0.1])],
        "vary": ["batch_size", "rho"],
        "claims": {"acc_margin": 0.015},
        "plot": _PLOT_SAM,
    },
    "finding4-cpu": {
        "finding": 4,
        "description": "MNIST-1D (4000 train / 5000 test), MLP 40-256-256-10 with Dropout(p) after each hidden "
                       "layer, SGD lr 0.1, B=32, p in {0, 0.1, 0.3, 0.5}, to 99% train accuracy, 5 seeds (p=0.7 "
                       "was at 81% train accuracy after 34,000 steps: it cannot finish on a CPU).",
        "base": dict(_M1D_CPU, lr=0.1, batch_size=32, max_steps=60_000),
        "grid": grid(dropout=[0.0, 0.1, 0.3, 0.5]),
        "vary": ["dropout"],
        "claims": {"acc_margin": 0.015, "dropout_reference": 0.0},
        "plot": _PLOT_P,
    },
    "finding5-cpu": {
        "finding": 5,
        "description": "MNIST-1D (4000 train / 5000 test), 1-D CNN (conv 32-64, max-pool, linear) with and without "
                       "BatchNorm after each convolution, SGD B=32, lr in {0.01, 0.02, 0.05, 0.1}, 5 seeds; "
                       "λ_max in train mode with ghost batches of 32; for BN at lr 0.01 the max over 8 points "
                       "between the last two iterates (the paper's treatment of BN networks at small η). Why this "
                       "setting: BN matters here (single runs at lr 0.005: 93.3% test accuracy with BN, 89.8% "
                       "without), and a CNN on 1-D signals is the smallest model where BN normalizes feature maps "
                       "as in VGG-11. lr 0.005 is left out: its no-BN run needs 35,625 steps.",
        "base": dict(_M1D_CPU, model="cnn", channels=[32, 64], batch_size=32, max_steps=60_000),
        "grid": [dict(g, between_iterates=8 if g["batch_norm"] and g["lr"] <= 0.01 else 0)
                 for g in grid(batch_norm=[False, True], lr=[0.01, 0.02, 0.05, 0.1])],
        "vary": ["batch_norm", "lr"],
        "claims": {"acc_margin": 0.015, "lambda_margin": 0.1},
        "plot": _PLOT_BN,
    },
})
for _name, _p in _PRESETS.items():
    if _name.endswith("-cpu"):
        _p["seeds"] = list(_CPU_SEEDS)

# ---------------------------------------------------------------------------- paper (GPU, CIFAR-10 / Fashion-MNIST)
_CIFAR = {"dataset": "cifar10", "model": "vgg11", "device": "cuda", "threads": 0, "max_steps": 500_000,
          "chunk_size": 1000, "eval_chunk_size": 5000, "lambda_tol": 1e-3, "lambda_batch_size": None}
_FMNIST = {"dataset": "fashion_mnist", "model": "mlp", "hidden": [256, 256], "device": "cuda", "threads": 0,
           "max_steps": 500_000, "eval_chunk_size": 10000, "lambda_tol": 1e-3}
_UNKNOWN = "the paper's exact {what} is not stated in the text we follow; this grid is our choice"

_PRESETS.update({
    "finding1-paper": {
        "finding": 1,
        "description": "CIFAR-10 (50k), VGG-11 without BN, SGD at B in {100, 1000} and full-batch GD (chunks of 1000, "
                       "99% test after every step), lr in {0.005, 0.01, 0.02, 0.04}, to 99% train accuracy, 3 seeds.",
        "base": dict(_CIFAR),
        "grid": grid(optimizer=["sgd"], batch_size=[100, 1000], lr=[0.005, 0.01, 0.02, 0.04])
        + gd(grid(lr=[0.005, 0.01, 0.02, 0.04]), 10),
        "vary": ["optimizer", "batch_size", "lr"],
        "claims": {"acc_margin": 0.005},
        "plot": _PLOT_LR,
        "lambda_paper_stride": 50,
        "grid_note": _UNKNOWN.format(what="learning-rate grid"),
    },
    "finding2-paper": {
        "finding": 2,
        "description": "CIFAR-10, VGG-11 without BN, SGD with η/B = 0.01/100 held constant, B in {50, 100, 200, 400, "
                       "800}, 3 seeds.",
        "base": dict(_CIFAR),
        "grid": [{"lr": 0.01 * b / 100, "batch_size": b} for b in (50, 100, 200, 400, 800)],
        "vary": ["lr", "batch_size"],
        "claims": {"acc_margin": 0.005, "lambda_margin": 0.1},
        "plot": _PLOT_B,
        "lambda_paper_stride": 50,
        "grid_note": _UNKNOWN.format(what="(η, B) grid"),
    },
    "finding3-paper": {
        "finding": 3,
        "description": "CIFAR-10, VGG-11 without BN, lr 0.01: SAM rho in {0, 0.05, 0.1} at B in {100, 1000, 5000}, "
                       "3 seeds.",
        "base": dict(_CIFAR, optimizer="sam", lr=0.01),
        "grid": sam_grid(batch_size=[100, 1000, 5000], rho=[0.0, 0.05, 0.1]),
        "vary": ["batch_size", "rho"],
        "claims": {"acc_margin": 0.005},
        "plot": _PLOT_SAM,
        "lambda_paper_stride": 50,
        "grid_note": _UNKNOWN.format(what="ρ and batch-size grid"),
    },
    "finding4-paper": {
        "finding": 4,
        "description": "Fashion-MNIST (60k), MLP 784-256-256-10 with Dropout(p), SGD lr 0.05, B=128, "
                       "p in {0, 0.1, 0.2, 0.5, 0.6, 0.7}, 3 seeds.",
        "base": dict(_FMNIST, lr=0.05, batch_size=128),
        "grid": grid(dropout=[0.0, 0.1, 0.2, 0.5, 0.6, 0.7]),
        "vary": ["dropout"],
        "claims": {"acc_margin": 0.005, "dropout_reference": 0.0},
        "plot": _PLOT_P,
        "lambda_paper_stride": 60,
        "grid_note": _UNKNOWN.format(what="learning rate and batch size"),
    },
    "finding5-paper": {
        "finding": 5,
        "description": "CIFAR-10, VGG-11 with and without BN, SGD B=100, lr in {0.005, 0.01, 0.02, 0.05}, 3 seeds; "
                       "λ_max in train mode with ghost batches of 100; for BN at lr <= 0.01 the max over 8 points "
                       "between the last two iterates.",
        "base": dict(_CIFAR, batch_size=100),
        "grid": [dict(g, between_iterates=8 if g["batch_norm"] and g["lr"] <= 0.01 else 0)
                 for g in grid(batch_norm=[False, True], lr=[0.005, 0.01, 0.02, 0.05])],
        "vary": ["batch_norm", "lr"],
        "claims": {"acc_margin": 0.005, "lambda_margin": 0.1},
        "plot": _PLOT_BN,
        "lambda_paper_stride": 50,
        "grid_note": _UNKNOWN.format(what="learning-rate grid, and the η below which BN runs use λ between "
                                     "iterates,"),
    },
})
for _name, _p in _PRESETS.items():
    if _name.endswith("-paper"):
        _p["seeds"] = [0, 1, 2]

# wall times measured on this project's 2-core CPU (OMP_NUM_THREADS=1, --jobs 1 unless an entry says otherwise),
# filled in from real runs (2026-12-01, load average 2-10 from other jobs on the same 2 cores: an idle machine is
# faster)
MEASURED: dict[str, str] = {
    "finding1-quick": "112 s at load 1, 405 s at load 5 (12 runs)", "finding2-quick": "127 s (6 runs)", "finding3-quick": "461 s (12 runs)",
    "finding4-quick": "119 s (6 runs)", "finding5-quick": "233 s (12 runs)",
    "finding2-cpu": "175 s with seeds 0-4, 275 s with seeds 10-14, both with --jobs 2 (25 runs)",
    "finding4-cpu": "1664 s with seeds 0-4, 932 s with seeds 10-14 on a less loaded machine (20 runs)",
    "finding3-cpu": "876 s with seeds 0-4, 732 s with seeds 10-14, both with --jobs 2 (30 runs)",
    "finding1-cpu": "1444 s with seeds 0-4, 1345 s with seeds 10-14, both with --jobs 2 and load 3-4 from other "
                    "work (30 runs)",
    "finding5-cpu": "about 2660 s with seeds 0-4 (load 3-4 from other work), 1532 s with seeds 10-14, both with "
                    "--jobs 2 (40 runs; BN λ_max in train mode takes ghost batches of 32, 125 chunks a pass)",
}


_TIERS = ("quick", "cpu", "paper")


def list_presets() -> list[str]:
    def tier(n: str) -> int:
        t = n.rsplit("-", 1)[-1]
        return _TIERS.index(t) if t in _TIERS else len(_TIERS)

    return sorted(_PRESETS, key=lambda n: (tier(n), n))


def get_preset(name: str) -> dict[str, Any]:
    if name not in _PRESETS:
        raise KeyError(f"unknown preset {name!r}{did_you_mean(name, _PRESETS)}; "
                       f"available: {', '.join(list_presets())}")
    p = copy.deepcopy(_PRESETS[name])
    p["name"] = name
    p["claim"] = FINDINGS[p["finding"]]
    p["measured"] = MEASURED.get(name)
    return p


def paper_lambda_subset(preset: dict[str, Any]) -> dict[str, Any]:
    """The overrides computing λ_max on the paper's 1000-example strided subset (every 50th CIFAR-10 or every
    60th Fashion-MNIST training image) instead of the full training set."""
    stride = preset.get("lambda_paper_stride")
    if stride is None:
        raise ValueError(f"preset {preset['name']!r} has no paper λ subset (only the -paper presets do)")
    return {"lambda_stride": stride}
