"""Adapters to the tools models are trained with: Lightning, the Hugging Face ``Trainer``, TensorBoard, W&B.

Each adapter imports its framework when first used, so ``import fasthess.integrations`` needs none of them
(``pip install "fasthess[integrations]"`` installs them all).

- :class:`LightningSharpnessCallback`: a ``lightning.pytorch.Callback`` that tracks λ_max with a
  :class:`fasthess.SharpnessTracker` every k steps or epochs and logs it through the trainer's loggers.
- :class:`HFSharpnessCallback`: a ``transformers.TrainerCallback`` that does the same for ``Trainer``.
- :class:`TensorBoardSink` and :class:`WandbSink`: ``sink(record)`` writes a tracker record (λ_max, residual,
  HVPs, stability threshold) as scalars and its basis as text.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["HFSharpnessCallback", "LightningSharpnessCallback", "TensorBoardSink", "WandbSink", "record_scalars",
           "record_text"]

_HOMES = {
    "HFSharpnessCallback": "fasthess.integrations.huggingface",
    "LightningSharpnessCallback": "fasthess.integrations.lightning",
    "TensorBoardSink": "fasthess.integrations.tensorboard",
    "WandbSink": "fasthess.integrations.wandb",
    "record_scalars": "fasthess.integrations._records",
    "record_text": "fasthess.integrations._records",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'fasthess.integrations' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
