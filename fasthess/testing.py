"""Test parametrization shared by fasthess's test files: devices, dtypes and tolerances."""
from __future__ import annotations

import pytest
import torch

from fasthess import _ext

devices: list[str] = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
dtypes: list[torch.dtype] = [torch.float32, torch.float64]

_TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``rtol``/``atol`` keyword arguments of ``torch.testing.assert_close`` for results in ``dtype``."""
    return _TOLERANCES[dtype]


def require_native(op: str, device: str) -> None:
    """Skips the calling test when ``fasthess::op`` has no native kernel for ``device``."""
    key = "CUDA" if device == "cuda" else "CPU"
    if not _ext.has_kernel(op, key):
        pytest.skip(f"no native {key} kernel for fasthess::{op} (extension not built with it)")
