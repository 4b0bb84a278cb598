"""Run configuration: the schema (defaults, types, ranges), its validation, run-directory names and the
data-set arguments a config selects. Nothing here trains or touches files."""
from __future__ import annotations

import difflib
import json
import math
from typing import Any

from . import curvature

OPTIMIZERS = ("sgd", "gd", "sam", "asam")

DEFAULTS: dict[str, Any] = {
    # data
    "dataset": "digits", "data_root": None, "verify": True, "train_subset": None, "train_stride": None,
    "test_subset": None, "test_stride": None, "data_kwargs": {},
    # model
    "model": "mlp", "hidden": [256, 256], "channels": None, "width": 1.0, "batch_norm": False, "dropout": 0.0,
    # optimization
    "optimizer": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "batch_size": 32, "chunk_size": None,
    "rho": 0.05, "asam_eta": 0.01,
    "init_seed": 0, "data_seed": 0,
    # stopping / evaluation
    "target_train_acc": 0.99, "max_steps": 20000, "eval_every_epochs": 1, "eval_chunk_size": 2048,
    "stop_check_every": 0,  # steps between train-accuracy checks for stopping (0 = at each evaluation)
    # sharpness
    "track_every_evals": 0, "lambda_subset": None, "lambda_stride": None, "lambda_tol": 1e-4, "lambda_k": 1,
    "lambda_batch_size": None, "lambda_max_iters": None, "between_iterates": 0,
    "track_extra": [],  # names from experiments.curvature.MEASURES, logged next to λ_max
    # misc
    "device": "cpu", "deterministic": True, "checkpoint_every_evals": 1,
    "threads": 1,  # CPU threads (0 = torch's default); small models run fastest on one
    "tensorboard": False,  # TensorBoard event files of every λ_max record in <run>/tensorboard
}

# one line per key, printed by `fasthess-experiments run --help`
HELP: dict[str, str] = {
    "dataset": "data set: digits, mnist1d, cifar10, fashion_mnist or synthetic",
    "data_root": "folder holding the -paper data sets (torchvision layout)",
    "verify": "check the md5 sums of the CIFAR-10 / Fashion-MNIST files",
    "train_subset": "use only the first N training examples",
    "train_stride": "use every k-th training example",
    "test_subset": "use only the first N test examples",
    "test_stride": "use every k-th test example",
    "data_kwargs": "extra keyword arguments of the data loader (a JSON object)",
    "model": "architecture: mlp, cnn, resnet or vgg11",
    "hidden": "hidden layer widths of the MLP, e.g. [256,256]",
    "channels": "convolution channels of the CNN, e.g. [32,64]",
    "width": "width multiplier of the model",
    "batch_norm": "BatchNorm after each hidden layer or convolution",
    "dropout": "dropout probability after each hidden layer",
    "optimizer": "sgd, gd (full batch), sam or asam",
    "lr": "learning rate η",
    "momentum": "SGD momentum",
    "weight_decay": "L2 weight decay of the optimizer",
    "batch_size": "minibatch size B (ignored by gd)",
    "chunk_size": "examples per forward pass of a training step (memory only; null = the batch)",
    "rho": "SAM / ASAM neighbourhood radius ρ",
    "asam_eta": "ASAM's η (adaptive scale offset)",
    "init_seed": "seed of the initialization",
    "data_seed": "seed of the data order and dropout noise",
    "target_train_acc": "stop when train accuracy reaches this (0.99)",
    "max_steps": "step cap; a run that hits it is excluded from the verdicts",
    "eval_every_epochs": "epochs between evaluations (train/test loss and accuracy)",
    "eval_chunk_size": "examples per forward pass when evaluating",
    "stop_check_every": "steps between train-accuracy stopping checks (0 = at each evaluation)",
    "track_every_evals": "evaluations between λ_max computations (0 = only at the end)",
    "lambda_subset": "λ_max on the first N training examples only",
    "lambda_stride": "λ_max on every k-th training example only",
    "lambda_tol": "relative tolerance of the certified λ_max",
    "lambda_k": "number of top eigenvalues tracked",
    "lambda_batch_size": "chunk size of the Hessian operator (ghost batch size for train-mode BatchNorm)",
    "lambda_max_iters": "cap on eigensolver iterations (null = the solver's default)",
    "between_iterates": "points between the last two iterates at which λ is taken, the max kept (0 = off)",
    "track_extra": "more curvature measures logged next to λ_max, e.g. [\"trace\"]",
    "device": "cpu or cuda[:i]",
    "deterministic": "deterministic torch algorithms",
    "checkpoint_every_evals": "evaluations between checkpoints",
    "threads": "CPU threads per run (0 = torch's default)",
    "tensorboard": "write TensorBoard event files of every λ_max record",
}


def did_you_mean(word: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to a misspelt ``word``, else ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# the keys that select and preprocess the data set (the same data for every run that agrees on them)
DATA_KEYS = ("dataset", "data_root", "verify", "train_subset", "train_stride", "test_subset", "test_stride",
             "data_kwargs", "device")

# key: (kind, minimum, None allowed); "int" accepts integral floats (1e3 from --set) and stores an int
TYPES: dict[str, tuple[str, float | None, bool]] = {
    **{k: ("int", 1, True) for k in ("batch_size", "train_subset", "test_subset", "lambda_subset",
                                     "lambda_batch_size")},
    **{k: ("int", 0, True) for k in ("chunk_size", "train_stride", "test_stride", "lambda_stride",
                                     "lambda_max_iters")},
    **{k: ("int", 0, False) for k in ("init_seed", "data_seed", "max_steps", "track_every_evals",
                                      "between_iterates", "threads", "stop_check_every")},
    **{k: ("int", 1, False) for k in ("eval_every_epochs", "eval_chunk_size", "lambda_k", "checkpoint_every_evals")},
    **{k: ("float", 0, False) for k in ("lr", "momentum", "weight_decay", "rho", "asam_eta", "lambda_tol", "width",
                                        "dropout")},
    "target_train_acc": ("float", None, False),
    **{k: ("bool", None, False) for k in ("verify", "batch_norm", "deterministic", "tensorboard")},
    **{k: ("str", None, False) for k in ("dataset", "model", "optimizer", "device")},
    "data_root": ("str", None, True),
    "hidden": ("ints", 1, False), "channels": ("ints", 1, True), "data_kwargs": ("dict", None, True),
    "track_extra": ("measures", None, False),
}


def _check_types(out: dict[str, Any]) -> None:
    """Types and ranges of the config values, in place; a ValueError naming the key otherwise."""
    for k, (kind, lo, none_ok) in TYPES.items():
        v = out[k]
        if v is None:
            if none_ok:
                continue
            raise ValueError(f"{k} must not be null")
        what = "a list of ints" if kind == "ints" else f"{'an' if kind == 'int' else 'a'} {kind}"
        bad = ValueError(f"{k} must be {what}{'' if lo is None else f' >= {lo}'}"
                         f"{' and < 2**31' if kind in ('int', 'ints') else ''}, got {v!r}")
        if kind in ("int", "float"):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad
            if kind == "int":
                if v != int(v):
                    raise bad
                v = out[k] = int(v)
            if lo is not None and v < lo or kind == "int" and v >= 2**31:
                raise bad
        elif kind == "bool" and not isinstance(v, bool) or kind == "str" and not isinstance(v, str) \
                or kind == "dict" and not isinstance(v, dict):
            raise bad
        elif kind == "measures":
            if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) and x in curvature.MEASURES for x in v):
                raise ValueError(f"{k} must be a list of names from {sorted(curvature.MEASURES)}, got {v!r}")
        elif kind == "ints":
            if not isinstance(v, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool)
                                                           and lo <= x < 2**31 for x in v):
                raise bad
    if not out["dropout"] < 1:
        raise ValueError(f"dropout must be < 1, got {out['dropout']!r}")
    for k in ("lambda_tol", "width"):
        if not out[k] > 0:
            raise ValueError(f"{k} must be > 0, got {out[k]!r}")


def resolve_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in and checked; unknown keys are an error (catches typos in --set)."""
    unknown = sorted(set(cfg) - set(DEFAULTS) - {"name", "group"})
    if unknown:
        hints = "".join(did_you_mean(k, DEFAULTS) for k in unknown)
        raise ValueError(f"unknown config keys {unknown}{hints}; 'fasthess-experiments run --help' lists the keys")
    out = dict(DEFAULTS)
    out.update(cfg)
    _check_types(out)
    if out["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {out['optimizer']!r}")
    if not (out["lr"] > 0):
        raise ValueError(f"lr must be > 0, got {out['lr']}")
    if out["optimizer"] != "gd" and (out["batch_size"] is None or int(out["batch_size"]) < 1):
        raise ValueError(f"batch_size must be >= 1, got {out['batch_size']}")
    return out


def data_args(cfg: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :func:`experiments.data.load_dataset` for ``cfg`` (written once, used everywhere)."""
    return {"root": cfg["data_root"], "verify": cfg["verify"], "train_subset": cfg["train_subset"],
            "train_stride": cfg["train_stride"], "test_subset": cfg["test_subset"],
            "test_stride": cfg["test_stride"], "device": cfg["device"], **(cfg["data_kwargs"] or {})}


def data_key(cfg: dict[str, Any]) -> str:
    """Equal for two configs exactly when they load the same data."""
    return json.dumps({k: cfg[k] for k in DATA_KEYS}, sort_keys=True)


# ---------------------------------------------------------------------------- names
_SHORT = {"optimizer": "opt", "batch_size": "bs", "dropout": "p", "batch_norm": "bn", "init_seed": "seed",
          "data_seed": "dseed", "momentum": "mom", "model": "model", "dataset": "data"}


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "-".join(_fmt(x) for x in v)
    if v is None:
        return "none"
    return str(v).replace("/", "-").replace(" ", "")


def varied_values(cfg: dict[str, Any], keys, full_batch: str) -> list[tuple[str, Any]]:
    """(key, value) of the hyperparameters that vary in a sweep; a GD run's batch size shows as ``full_batch``."""
    return [(k, full_batch if k == "batch_size" and cfg.get("optimizer") == "gd" else cfg.get(k)) for k in keys]


def config_name(cfg: dict[str, Any], keys) -> str:
    """Name of a configuration (all seeds) from the hyperparameters that vary, e.g. ``opt=sgd_lr=0.1_bs=32``."""
    return "_".join(f"{_SHORT.get(k, k)}={_fmt(v)}" for k, v in varied_values(cfg, keys, "full")) or "run"


def seed_suffix(cfg: dict[str, Any]) -> str:
    """``seed=S`` (init and data-order seed), plus ``dseed=D`` when the data-order seed differs."""
    s = f"seed={cfg['init_seed']}"
    return s if cfg["data_seed"] == cfg["init_seed"] else f"{s}_dseed={cfg['data_seed']}"


def run_name(cfg: dict[str, Any], keys) -> str:
    """Directory name of one run: the configuration's name and its seed, e.g. ``opt=sgd_lr=0.1_seed=3``."""
    return f"{config_name(cfg, keys)}_{seed_suffix(cfg)}"
