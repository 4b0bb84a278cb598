"""The model's outputs split over examples: a chunk's output rows are those of its halves.

The Hessian of the loss on the whole data assumes that example i's output depends on its own inputs only,
oᵢ = f(xᵢ; θ). A forward that mixes the examples of a batch (functional batch statistics, batch centring or
whitening, attention across the examples, in-forward mixup) gives oᵢ = f(x_c; θ)ᵢ on chunk c, so summing chunks
would be the Hessian of a ghost-batch loss, not of the loss on the whole data. On the first chunk, the output is
compared row by row with the outputs of the chunk's two halves, to roundoff (two forwards of half a chunk, once).

BatchNorm modules that normalize with batch statistics are the documented exception (ghost batches): during the
halves' forwards each normalizes with the statistics it computed on the whole chunk (recorded in a forward of the
chunk), so such a model agrees row by row unless something else mixes the examples.

Rows: an input or output tensor's example dimension is its first dimension of length ``rows`` (the targets'
leading dimension), or its second for sequence-first tensors (``batch_first=False`` RNNs: (T, N, ...)). An output
leaf with no such dimension, or halves that cannot be formed (a ``PackedSequence``), leave the check unable to
judge; it then passes rather than guessing.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence
from torch.utils import _pytree as pytree

from fasthess.errors import BatchDependentModelError

__all__ = ["check_model_splits"]


def _row_dim(t, rows: int) -> int | None:
    """The example dimension of an input tensor: the first of length ``rows``, else the second (sequence-first)."""
    if not isinstance(t, torch.Tensor):
        return None
    return next((d for d in (0, 1) if t.dim() > d and t.shape[d] == rows), None)


def _half_inputs(inputs, rows: int, lo: int, hi: int):
    """Examples ``lo:hi`` of every input tensor with an example dimension (None if none has one, or a packed
    sequence, whose rows cannot be cut)."""
    if any(isinstance(x, PackedSequence)
           for x in pytree.tree_leaves(inputs, is_leaf=lambda x: isinstance(x, PackedSequence))):
        return None
    leaves, spec = pytree.tree_flatten(inputs)
    dims = [_row_dim(t, rows) for t in leaves]
    if all(d is None for d in dims):
        return None
    cut = [t if d is None else t.narrow(d, lo, hi - lo) for t, d in zip(leaves, dims)]
    return pytree.tree_unflatten(cut, spec)


def _output_dim(full: torch.Tensor, halves: Sequence[torch.Tensor], sizes: Sequence[int]) -> int | None:
    """The dimension along which ``full`` is its halves stacked: length Σ sizes, halves' lengths ``sizes``, all
    other dimensions equal (None when there is none: the leaf is not per example)."""
    if any(h.dim() != full.dim() for h in halves):
        return None
    for d in range(full.dim()):
        if full.shape[d] != sum(sizes) or any(h.shape[d] != n for h, n in zip(halves, sizes)):
            continue
        others = [full.shape[:d] + full.shape[d + 1:]] + [h.shape[:d] + h.shape[d + 1:] for h in halves]
        if all(o == others[0] for o in others):
            return d
    return None


def _worst_row_gap(out, halves: Sequence, sizes: Sequence[int]) -> tuple[float, int] | None:
    """max over output leaves of max|o_rows − o_half| / max|o|, with the leaf's number (None: nothing to compare)."""
    full_leaves, spec = pytree.tree_flatten(out)
    half_leaves = []
    for h in halves:
        leaves, h_spec = pytree.tree_flatten(h)
        if h_spec != spec:
            return None
        half_leaves.append(leaves)
    worst = None
    for i, leaf in enumerate(full_leaves):
        parts = [hl[i] for hl in half_leaves]
        if not isinstance(leaf, torch.Tensor) or not all(isinstance(p, torch.Tensor) for p in parts):
            continue
        d = _output_dim(leaf, parts, sizes)
        if d is None:
            continue
        full = leaf.detach().double()
        scale = float(full.abs().max()) if full.numel() else 0.0
        gap = float((full - torch.cat([p.detach().double() for p in parts], d)).abs().max()) if full.numel() else 0.0
        rel = gap / scale if scale > 0 else gap
        if worst is None or not rel <= worst[0]:
            worst = (rel, i)
    return worst


Statistics = dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]


def _recorded_forward(forward: Callable, args: tuple, kwargs: dict,
                      batchnorms: Sequence[nn.Module]) -> tuple[object, Statistics]:
    """The output of one forward and the batch statistics (mean, biased variance over every dimension but the
    channels) each batch-statistics BatchNorm computed in it, per call in call order."""
    recorded: Statistics = {m: [] for m in batchnorms}

    def record(m: nn.Module, inputs) -> None:
        x = inputs[0]
        dims = [d for d in range(x.dim()) if d != 1]
        recorded[m].append((x.mean(dims), x.var(dims, unbiased=False)))

    handles = [m.register_forward_pre_hook(record) for m in batchnorms]
    try:
        return forward(args, kwargs), recorded
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _replayed(recorded: Statistics) -> Iterator[None]:
    """Each recorded BatchNorm normalizes with the recorded statistics of its n-th call at its n-th call."""
    calls = {m: 0 for m in recorded}

    def normalize(m: nn.Module, inputs, output):
        mean, var = recorded[m][calls[m]]
        calls[m] += 1
        return F.batch_norm(inputs[0], mean, var, m.weight, m.bias, False, 0.0, m.eps)

    handles = [m.register_forward_hook(normalize) for m in recorded]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def check_model_splits(forward: Callable[[tuple, dict], object], args: tuple, kwargs: dict, rows: int,
                       out, batchnorms: Sequence[nn.Module], dtype: torch.dtype) -> None:
    """Refuse a forward whose output rows on a chunk of ``rows`` examples differ from those of the chunk's halves
    beyond roundoff (module docstring). ``forward(args, kwargs)`` runs the model (no grad); ``out`` is its output
    on the chunk; ``batchnorms`` are the BatchNorm modules that normalize with batch statistics."""
    if rows < 2:
        return
    h = rows // 2
    sizes = (h, rows - h)
    halves_in = [_half_inputs((args, kwargs), rows, lo, hi) for lo, hi in ((0, h), (h, rows))]
    if any(x is None for x in halves_in):
        return
    with torch.no_grad():
        recorded: Statistics = {}
        if batchnorms:  # the chunk's own statistics, for the halves
            out, recorded = _recorded_forward(forward, args, kwargs, batchnorms)
        try:
            halves = []
            for x in halves_in:
                with _replayed(recorded):
                    halves.append(forward(*x))
        except (RuntimeError, ValueError, IndexError, TypeError):
            return  # the halves are not inputs this model takes (rows that are not examples): nothing to judge
    worst = _worst_row_gap(out, halves, sizes)
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    if worst is None or worst[0] <= tol:
        return
    raise BatchDependentModelError(
        f"the model's forward mixes the examples of a batch: on the first chunk ({rows} examples), the outputs "
        f"differ from those of the same examples run as two halves (relative difference {worst[0]:.3g} in output "
        f"tensor {worst[1]}; roundoff would be below {tol:g}). Functional batch statistics "
        "(F.batch_norm(..., training=True) outside a BatchNorm module), batch centring or whitening, attention "
        "across the examples and in-forward mixup do this; the Hessian of the loss on the whole data is then not "
        "a sum over chunks. Fix: call model.eval() if the mixing is train-mode only; or, if you mean the "
        "ghost-batch Hessian (the average over the training batches of each batch's loss), pass "
        "batch=fasthess.BatchSpec(batch_loss=True) with chunks equal to the training batches (batch_size=<the "
        "training batch size>, or a DataLoader of them): the result is then that ghost-batch loss's Hessian")
