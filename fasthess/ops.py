"""Native kernels of fasthess with pure-PyTorch references.

Each public op dispatches to ``torch.ops.fasthess.<name>`` when the extension has a kernel for the
input's device (see :func:`fasthess._ext.has_kernel`) and to its ``*_reference`` otherwise, so the
package works without the extension.  Schemas live in ``csrc/fasthess.cpp``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from fasthess import _ext

Vectors = Literal["none", "first", "full"]
_VECTOR_MODES: dict[str, int] = {"none": 0, "first": 1, "full": 2}


def _native(op: str, device: torch.device) -> bool:
    """True when ``fasthess::op`` has a native kernel for tensors on ``device``."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    return key is not None and _ext.has_kernel(op, key)


# ----------------------------------------------------------------------------------------------
# accumulate_dot


def accumulate_dot(
    acc: torch.Tensor, tensors: Sequence[torch.Tensor], alpha: float, other: torch.Tensor | None = None
) -> torch.Tensor:
    """In place ``acc[j, o_i:o_i+n_i] += alpha * tensors[i][j].flatten()``; returns the dots.

    ``acc`` is a contiguous (b, n) float32/float64 block whose row j is a flat vector over all
    parameters; ``tensors[i]`` has shape (b, *shape_i), the per-row numels n_i sum to n and the
    offsets o_i follow list order (an empty list is a no-op).  Tensors may be float32 or float64;
    the sum is formed in acc's dtype.  Returns the float64 (b,) vector
    ``dots[j] = sum_i alpha * <tensors[i][j], other[j, o_i:o_i+n_i]>`` (zeros when ``other`` is
    None), reduced in a fixed order, so repeated calls agree bit for bit.
    """
    if _native("accumulate_dot", acc.device):
        return torch.ops.fasthess.accumulate_dot(acc, list(tensors), float(alpha), other)
    return accumulate_dot_reference(acc, tensors, alpha, other)


def _check_accumulate(acc: torch.Tensor, tensors: Sequence[torch.Tensor], other: torch.Tensor | None) -> None:
    """Raises RuntimeError on the argument errors the native kernel refuses."""
    if acc.dim() != 2 or acc.dtype not in (torch.float32, torch.float64) or not acc.is_contiguous():
        raise RuntimeError(f"accumulate_dot: acc must be a contiguous float32/float64 (b, n) tensor, got "
                           f"{acc.dtype} {tuple(acc.shape)}")
    b, n = acc.shape
    total = 0
    for i, t in enumerate(tensors):
        if t.device != acc.device:
            raise RuntimeError(f"accumulate_dot: tensors[{i}] is on {t.device} but acc is on {acc.device}")
        if t.dtype not in (torch.float32, torch.float64):
            raise RuntimeError(f"accumulate_dot: tensors[{i}] must be float32 or float64, got {t.dtype}")
        if t.dim() < 1 or t.shape[0] != b:
            raise RuntimeError(f"accumulate_dot: tensors[{i}] has shape {tuple(t.shape)} but must have acc's "
                               f"{b} rows along dim 0")
        total += t[0].numel() if b else t.shape[1:].numel()
    if tensors and total != n:
        raise RuntimeError(f"accumulate_dot: the tensors hold {total} elements per row but acc has {n} columns")
    if other is not None and (other.shape != acc.shape or other.dtype != acc.dtype or other.device != acc.device):
        raise RuntimeError(f"accumulate_dot: other must match acc's shape, dtype and device, got "
                           f"{other.dtype} {tuple(other.shape)} on {other.device}")


def accumulate_dot_reference(
    acc: torch.Tensor, tensors: Sequence[torch.Tensor], alpha: float, other: torch.Tensor | None = None
) -> torch.Tensor:
    """Pure-PyTorch :func:`accumulate_dot` (same math, one slice update and one dot per tensor)."""
    _check_accumulate(acc, tensors, other)
    b = acc.shape[0]
    dots = torch.zeros(b, dtype=torch.float64, device=acc.device)
    offset = 0
    for t in tensors:
        flat = t.reshape(b, -1)
        width = flat.shape[1]
        acc[:, offset:offset + width].add_(flat.to(acc.dtype), alpha=alpha)
        if other is not None:
            dots += (flat.double() * other[:, offset:offset + width].double()).sum(dim=1)
        offset += width
    return dots * alpha


# ----------------------------------------------------------------------------------------------
# tridiag_eigh


def _check_tridiag(d: torch.Tensor, e: torch.Tensor, vectors: str) -> None:
    """Raises ValueError unless d is (..., m), e is (..., m-1) of the same dtype/device and mode is known."""
    if vectors not in _VECTOR_MODES:
        raise ValueError(f"tridiag_eigh: vectors must be one of {sorted(_VECTOR_MODES)}, got {vectors!r}")
    if d.dim() < 1 or d.shape[-1] < 1 or e.shape != (*d.shape[:-1], d.shape[-1] - 1):
        raise ValueError(f"tridiag_eigh: need d of shape (..., m) with m >= 1 and e of shape (..., m-1), got "
                         f"{tuple(d.shape)} and {tuple(e.shape)}")
    if d.dtype != e.dtype or d.dtype not in (torch.float32, torch.float64) or d.device != e.device:
        raise ValueError(f"tridiag_eigh: d and e must share one float32/float64 dtype and device, got "
                         f"{d.dtype}/{e.dtype} on {d.device}/{e.device}")


def tridiag_eigh(
    d: torch.Tensor, e: torch.Tensor, vectors: Vectors = "full"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eigen-decomposition ``T = V diag(w) V^T`` of symmetric tridiagonal matrices.

    ``d`` (..., m) is the diagonal, ``e`` (..., m-1) the off-diagonal.  Returns ``w`` (..., m)
    ascending and, by ``vectors``: ``"full"`` -> V (..., m, m) with eigenvectors as columns,
    ``"first"`` -> V[..., 0, :] (the first components; Gauss quadrature weights are their squares,
    at O(m^2) instead of O(m^3) cost), ``"none"`` -> None.  Eigenvector signs are arbitrary.
    The native kernels run implicit QL with Wilkinson shifts in float64 for either input dtype.
    """
    _check_tridiag(d, e, vectors)
    if not _native("tridiag_eigh", d.device):
        return tridiag_eigh_reference(d, e, vectors)
    batch, m = d.shape[:-1], d.shape[-1]
    flat = batch.numel()
    w, v = torch.ops.fasthess.tridiag_eigh(d.reshape(flat, m), e.reshape(flat, m - 1), _VECTOR_MODES[vectors])
    w = w.reshape(*batch, m)
    if vectors == "none":
        return w, None
    return w, v.reshape(*batch, *v.shape[1:])


def tridiag_eigh_reference(
    d: torch.Tensor, e: torch.Tensor, vectors: Vectors = "full"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`tridiag_eigh` via ``torch.linalg.eigh`` of the dense tridiagonal matrices."""
    _check_tridiag(d, e, vectors)
    dense = torch.diag_embed(d) + torch.diag_embed(e, 1) + torch.diag_embed(e, -1)
    if vectors == "none":
        return torch.linalg.eigvalsh(dense), None
    w, v = torch.linalg.eigh(dense)
    return w, (v if vectors == "full" else v[..., 0, :])


# ----------------------------------------------------------------------------------------------
# block_orthogonalize (torch.matmul is at the memory roofline; see benchmarks/OPS_RESULTS.md)


def block_orthogonalize(Q: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two passes of block classical Gram-Schmidt ``W <- W - (W Q^T) Q``; returns (W, row norms of W).

    ``Q`` (m, n) has orthonormal rows, ``W`` (b, n) holds b vectors as rows; W is not modified.
    """
    for _ in range(2):
        W = torch.addmm(W, W @ Q.mT, Q, alpha=-1)
    return W, torch.linalg.vector_norm(W, dim=1)


# ----------------------------------------------------------------------------------------------
# shape functions for FakeTensor / torch.compile


def _register_fakes() -> None:
    """Registers shape functions for the native ops that are loaded."""
    loaded = set(_ext.native_ops()) if _ext._LOAD_ERROR is None else set()
    if "accumulate_dot" in loaded:
        @torch.library.register_fake("fasthess::accumulate_dot")
        def _(acc, tensors, alpha, other=None):  # noqa: ANN001, ANN202
            return acc.new_empty((acc.shape[0],), dtype=torch.float64)

    if "tridiag_eigh" in loaded:
        @torch.library.register_fake("fasthess::tridiag_eigh")
        def _(d, e, vectors):  # noqa: ANN001, ANN202
            b, m = d.shape
            shape = {0: (b, 0), 1: (b, m), 2: (b, m, m)}[vectors]
            return d.new_empty((b, m)), d.new_empty(shape)


_register_fakes()
