"""Native kernels of fasthess with pure-PyTorch references.

Each public op dispatches to ``torch.ops.fasthess.<name>`` when the extension has a kernel for the
input's device (see :func:`fasthess._ext.has_kernel`) and to its ``*_reference`` otherwise, so the
package works without the extension.  Schemas live in ``csrc/fasthess.cpp``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from fasthess import _ext


def _native(op: str, device: torch.device) -> bool:
    """True when ``fasthess::op`` has a native kernel for tensors on ``device``."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    return key is not None and _ext.has_kernel(op, key)


# ----------------------------------------------------------------------------------------------
# accumulate


def accumulate(acc: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """In place ``acc[j, o_i:o_i+n_i] += tensors[i][j].flatten()``: the per-chunk products of a pass, summed.

    ``acc`` is a contiguous (b, n) float32/float64 block whose row j is a flat vector over all
    parameters; ``tensors[i]`` has shape (b, *shape_i), the per-row numels n_i sum to n and the
    offsets o_i follow list order (an empty list is a no-op).  Tensors may be float32 or float64;
    the sum is formed in acc's dtype.  One pass over the data, without the concatenated copy.
    """
    if _native("accumulate", acc.device):
        torch.ops.fasthess.accumulate(acc, list(tensors))
    else:
        accumulate_reference(acc, tensors)


def _check_accumulate(acc: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Raises RuntimeError on the argument errors the native kernel refuses."""
    if acc.dim() != 2 or acc.dtype not in (torch.float32, torch.float64) or not acc.is_contiguous():
        raise RuntimeError(f"accumulate: acc must be a contiguous float32/float64 (b, n) tensor, got "
                           f"{acc.dtype} {tuple(acc.shape)}")
    b, n = acc.shape
    total = 0
    for i, t in enumerate(tensors):
        if t.device != acc.device:
            raise RuntimeError(f"accumulate: tensors[{i}] is on {t.device} but acc is on {acc.device}")
        if t.dtype not in (torch.float32, torch.float64):
            raise RuntimeError(f"accumulate: tensors[{i}] must be float32 or float64, got {t.dtype}")
        if t.dim() < 1 or t.shape[0] != b:
            raise RuntimeError(f"accumulate: tensors[{i}] has shape {tuple(t.shape)} but must have acc's "
                               f"{b} rows along dim 0")
        total += t[0].numel() if b else t.shape[1:].numel()
    if tensors and total != n:
        raise RuntimeError(f"accumulate: the tensors hold {total} elements per row but acc has {n} columns")


def accumulate_reference(acc: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Pure-PyTorch :func:`accumulate` (same math, one slice update per tensor)."""
    _check_accumulate(acc, tensors)
    b, offset = acc.shape[0], 0
    for t in tensors:
        flat = t.reshape(b, -1)
        acc[:, offset:offset + flat.shape[1]].add_(flat.to(acc.dtype))
        offset += flat.shape[1]


# ----------------------------------------------------------------------------------------------
# tridiag_eigh


def _check_tridiag(d: torch.Tensor, e: torch.Tensor) -> None:
    """Raises ValueError unless d is (..., m) and e is (..., m-1) of the same dtype and device."""
    if d.dim() < 1 or d.shape[-1] < 1 or e.shape != (*d.shape[:-1], d.shape[-1] - 1):
        raise ValueError(f"tridiag_eigh: need d of shape (..., m) with m >= 1 and e of shape (..., m-1), got "
                         f"{tuple(d.shape)} and {tuple(e.shape)}")
    if d.dtype != e.dtype or d.dtype not in (torch.float32, torch.float64) or d.device != e.device:
        raise ValueError(f"tridiag_eigh: d and e must share one float32/float64 dtype and device, got "
                         f"{d.dtype}/{e.dtype} on {d.device}/{e.device}")


def tridiag_eigh(d: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues w and first eigenvector components ``V[..., 0, :]`` of ``T = V diag(w) V^T``, T tridiagonal.

    ``d`` (..., m) is the diagonal, ``e`` (..., m-1) the off-diagonal; ``w`` (..., m) is ascending and
    the first components (..., m) have arbitrary signs.  Their squares are the weights of the Gauss
    quadrature rule of T (what SLQ needs), at O(m^2) per matrix instead of O(m^3) for all of V.  The
    native kernels run implicit QL with Wilkinson shifts in float64 for either input dtype.
    """
    _check_tridiag(d, e)
    if not _native("tridiag_eigh", d.device):
        return tridiag_eigh_reference(d, e)
    batch, m = d.shape[:-1], d.shape[-1]
    flat = batch.numel()
    w, first = torch.ops.fasthess.tridiag_eigh(d.reshape(flat, m), e.reshape(flat, m - 1))
    return w.reshape(*batch, m), first.reshape(*batch, m)


def tridiag_eigh_reference(d: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`tridiag_eigh` via ``torch.linalg.eigh`` of the dense tridiagonal matrices."""
    _check_tridiag(d, e)
    w, v = torch.linalg.eigh(torch.diag_embed(d) + torch.diag_embed(e, 1) + torch.diag_embed(e, -1))
    return w, v[..., 0, :]


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
    if "accumulate" in loaded:
        @torch.library.register_fake("fasthess::accumulate")
        def _(acc, tensors):  # noqa: ANN001, ANN202
            return None

    if "tridiag_eigh" in loaded:
        @torch.library.register_fake("fasthess::tridiag_eigh")
        def _(d, e):  # noqa: ANN001, ANN202
            return d.new_empty(d.shape), d.new_empty(d.shape)


_register_fakes()
