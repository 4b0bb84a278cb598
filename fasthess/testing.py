"""Test parametrization shared by fasthess's test files: devices, dtypes, tolerances, and a float32 operator."""
from __future__ import annotations

import os

import pytest
import torch

from fasthess import _ext
from fasthess.linop import SymmetricOperator

devices: list[str] = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
dtypes: list[torch.dtype] = [torch.float32, torch.float64]

_TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``rtol``/``atol`` keyword arguments of ``torch.testing.assert_close`` for results in ``dtype``."""
    return _TOLERANCES[dtype]


def native_required(device: str) -> bool:
    """True when the build was asked for native kernels on ``device``: ``FASTHESS_REQUIRE_NATIVE=1`` (set by
    ``make test`` and CI) asks for the CPU kernels, together with ``FASTHESS_CUDA=1`` for the CUDA ones."""
    if os.environ.get("FASTHESS_REQUIRE_NATIVE", "0") != "1":
        return False
    return device != "cuda" or os.environ.get("FASTHESS_CUDA", "0") == "1"


def require_native(op: str, device: str) -> None:
    """Skips the calling test when ``fasthess::op`` has no native kernel for ``device``; fails it instead when
    that kernel was asked for (:func:`native_required`)."""
    key = "CUDA" if device == "cuda" else "CPU"
    if not _ext.has_kernel(op, key):
        reason = f"no native {key} kernel for fasthess::{op} (extension not built with it; {_ext._LOAD_ERROR})"
        if native_required(device):
            pytest.fail(reason + " although FASTHESS_REQUIRE_NATIVE=1")
        pytest.skip(reason)


class Float32MatrixOperator(SymmetricOperator):
    """A dense symmetric matrix whose products are computed in float32 (``dtype`` tells the solver so): a stand-in
    for a float32 model when testing the rounding floor of a certificate.

    >>> import torch
    >>> op = Float32MatrixOperator(torch.eye(3, dtype=torch.float64))
    >>> op.matvec(torch.ones(3, dtype=torch.float64)).dtype, op.dtype
    (torch.float64, torch.float32)
    """

    dtype = torch.float32

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__()
        self.A32, self.num_params, self.device = A.float(), A.shape[0], A.device

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return (self.A32 @ V.float()).double()

    def in_float64(self) -> SymmetricOperator:
        """The same (float32-rounded) matrix with float64 products: the reference a float32 claim is checked against."""
        from fasthess.linop import MatrixOperator

        return MatrixOperator(self.A32.double())
