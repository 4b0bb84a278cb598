"""Where the examples are: in a chunk's inputs (:func:`cuts`), in each leaf of its output (:func:`output_fits`),
and how far the output rows of a sub-batch run alone lie from the chunk's rows of the same examples
(:func:`worst_row_gap`). Used by the split check (:mod:`fasthess._model_split`), the loss-split halves
(:mod:`fasthess._contract`) and the stateful-forward check (:mod:`fasthess._buffers`).

An input tensor's example dimension is its first dimension of length ``rows`` (the targets' leading dimension), or
its second for sequence-first tensors ((T, N, ...)) unless the first is 1. When no input has one but an input's
first two dimensions multiply to ``rows``, the targets hold m rows per example (tokens flattened to (N·T,)). An
output leaf's example dimension is the one of length n·m in the chunk's output and k·m in a part of k examples;
a leaf of one shape at every batch size is one value per batch (:data:`WHOLE`); a list or tuple of n outputs is
one output per example (:data:`ITEMS`).
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import PackedSequence
from torch.utils import _pytree as pytree

__all__ = ["ITEMS", "WHOLE", "Cut", "Fits", "Split", "cuts", "output_fits", "roundoff", "row_dim", "sub_inputs",
           "worst_row_gap"]

Fits = list  # per output leaf: (example dimension d, rows per example m), WHOLE, or None (not comparable)


def roundoff(dtype: torch.dtype) -> float:
    """The relative gap between two forwards of the same examples that roundoff explains (another batch, another
    memory layout, another BLAS path)."""
    return 1e-9 if dtype == torch.float64 else 1e-3


def row_dim(t, rows: int, order: tuple[int, int] = (0, 1)) -> int | None:
    """The example dimension of an input tensor: the first of length ``rows``, else the second (sequence-first)
    unless the first is 1 (one example, whose T tokens are the target rows); ``order`` (1, 0) tries the second
    first."""
    if not isinstance(t, torch.Tensor):
        return None
    return next((d for d in order if t.dim() > d and t.shape[d] == rows and (d == 0 or t.shape[0] > 1)), None)


@dataclass(frozen=True)
class Split:
    """What the split check found for a forward that does not mix: the cut of the inputs into examples, each output
    leaf's example dimension and rows per example (``fits``, None where none was found), and a cut tried first
    along which the outputs mix (``mixing``: the inputs hold examples along either dimension, and only one reading
    is per-example), else None."""

    cut: Cut
    fits: Fits | str | None
    mixing: Cut | None = None


@dataclass(frozen=True)
class Cut:
    """How the inputs are cut into examples: ``n`` examples, each input leaf's example dimension (None: passed
    whole), and whether an output dimension of ``n·m`` rows holds the examples inner (``(m, n)``, sequence-first
    flattening) rather than outer (``(n, m)``)."""

    n: int
    dims: tuple[int | None, ...]
    inner: bool

    @property
    def axis(self) -> int:
        """The inputs' dimension that holds the examples (that of the first input cut)."""
        return next(d for d in self.dims if d is not None)


def cuts(inputs, rows: int, seq_first: bool) -> list[Cut]:
    """The cuts to judge, in order; the model splits if one of them shows no mixing. With an input dimension of
    ``rows`` (the targets' length) it is the one cut (with a sequence-first module in the model, an input whose
    first two dimensions both have ``rows`` is cut along the second, then along the first). Otherwise, when an
    input's first two dimensions multiply to ``rows`` (tokens (N, T, ...) against targets flattened to (N·T,)), the
    examples are its leading dimension, m = T target rows each; with a sequence-first module in the model, the
    second dimension first, then the leading one (the model may transpose its inputs for it). Empty for a
    ``PackedSequence``, whose rows cannot be cut, and when nothing says where the examples are (graph batches:
    node features against one target per graph)."""
    leaves = pytree.tree_leaves(inputs, is_leaf=lambda x: isinstance(x, PackedSequence))
    if any(isinstance(x, PackedSequence) for x in leaves):
        return []
    dims = tuple(row_dim(t, rows) for t in leaves)
    if any(d is not None for d in dims):
        found = [dims, tuple(row_dim(t, rows, (1, 0)) for t in leaves)] if seq_first else [dims]
        return [Cut(rows, d, next(e for e in d if e is not None) == 1) for d in dict.fromkeys(reversed(found))]
    grid = next((t.shape[:2] for t in leaves if isinstance(t, torch.Tensor) and t.dim() > 1
                 and t.shape[0] * t.shape[1] == rows and min(t.shape[:2]) > 1), None)
    if grid is None:
        return []
    return [Cut(n, tuple(axis if isinstance(t, torch.Tensor) and t.dim() > axis and t.shape[axis] == n else None
                         for t in leaves), axis == 1)
            for axis, n in (((1, grid[1]), (0, grid[0])) if seq_first else ((0, grid[0]),))]


def sub_inputs(inputs, cut: Cut, index: torch.Tensor):
    """Examples ``index`` of every input tensor with an example dimension, the others whole."""
    leaves, spec = pytree.tree_flatten(inputs)
    return pytree.tree_unflatten([t if d is None else t.index_select(d, index.to(t.device))
                                  for t, d in zip(leaves, cut.dims)], spec)


def _output_dim(full: torch.Tensor, part: torch.Tensor, n: int, k: int,
                inner: bool = False) -> tuple[int, int] | None:
    """The example dimension d of an output leaf and its rows per example m: length ``n·m`` in ``full``, ``k·m``
    in ``part``; first where every other dimension is equal, then where another differs too (a batch trimmed to
    its longest sequence), m = 1 first, and the second dimension first when the inputs were cut along theirs
    (``inner``; a sub-batch of the chunk's size fits every dimension of length n). None when there is none: the
    leaf is not per example."""
    if part.dim() != full.dim():
        return None
    order = [1, 0, *range(2, full.dim())] if inner and full.dim() > 1 else range(full.dim())
    fits = [(full.shape[:d] + full.shape[d + 1:] != part.shape[:d] + part.shape[d + 1:], full.shape[d] // n != 1,
             i, d, full.shape[d] // n) for i, d in enumerate(order)
            if full.shape[d] % n == 0 and full.shape[d] >= n and part.shape[d] * n == full.shape[d] * k]
    if not fits:
        return None
    *_, d, m = min(fits)
    return d, m


def _examples(t: torch.Tensor, d: int, n: int, m: int, index: torch.Tensor, inner: bool) -> torch.Tensor:
    """The rows of examples ``index`` along dimension d of ``t`` (n examples of m rows: (n, m) or, inner,
    (m, n))."""
    if m == 1:
        return t.index_select(d, index.to(t.device))
    shape = (m, n) if inner else (n, m)
    grouped = t.reshape(t.shape[:d] + shape + t.shape[d + 1:]).index_select(d + inner, index.to(t.device))
    return grouped.reshape(t.shape[:d] + (-1,) + t.shape[d + 1:])


WHOLE = "whole"  # a leaf with no example dimension and one shape at every batch size: one value per batch
ITEMS = "items"  # the output is a list or tuple of one output per example


def _leaf_fit(leaf, p, n: int, k: int, inner: bool):
    """(d, m) of a per-example leaf, :data:`WHOLE` for one of the same shape in both, None otherwise."""
    if not (isinstance(leaf, torch.Tensor) and isinstance(p, torch.Tensor)):
        return None
    return _output_dim(leaf, p, n, k, inner) or (WHOLE if p.shape == leaf.shape else None)


def output_fits(out, part, n: int, k: int, inner: bool = False) -> Fits | str | None:
    """Each output leaf's fit (:func:`_leaf_fit`) for a part of k of the n examples; :data:`ITEMS` when the output
    is a sequence of n outputs and the part one of k; None when the structures differ otherwise."""
    full_leaves, spec = pytree.tree_flatten(out)
    part_leaves, part_spec = pytree.tree_flatten(part)
    if part_spec == spec:
        return [_leaf_fit(leaf, p, n, k, inner) for leaf, p in zip(full_leaves, part_leaves)]
    if isinstance(out, (list, tuple)) and isinstance(part, (list, tuple)) and (len(out), len(part)) == (n, k):
        return ITEMS
    return None


def _relative_gap(rows: torch.Tensor, p: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """max|rows − p| / max|scale| in float64 (``scale`` defaults to ``rows``: the chunk's leaf)."""
    if rows.numel() == 0:
        return 0.0
    top = float((rows if scale is None else scale).detach().double().abs().max())
    gap = float((rows.detach().double() - p.detach().double()).abs().max())
    return gap / top if top > 0 else gap


def _items_gap(out, part, index: torch.Tensor) -> tuple[float, int, bool] | None:
    """The worst relative gap between output ``index[j]`` of the chunk and output j of the part (sequences of one
    output per example), with j."""
    worst = None
    for j, e in enumerate(index.tolist()):
        pairs = zip(pytree.tree_leaves(out[e]), pytree.tree_leaves(part[j]))
        for a, b in pairs:
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
                rel = _relative_gap(a, b)
                if worst is None or not rel <= worst[0]:
                    worst = (rel, j, True)
    return worst


def worst_row_gap(out, part, n: int, index: torch.Tensor, inner: bool = False, read: Collection[int] | None = None,
                  fits: Fits | str | None = None) -> tuple[float, int, bool] | None:
    """max over output leaves of max|o_index − o_part| / max|o|, with the leaf's number and whether it is per
    example (None: nothing to compare); ``out`` holds ``n`` examples (``inner``: see :class:`Cut`). Only the leaves
    the loss reads (``read``, None: all) are compared, since no other reaches the Hessian; those with no example
    dimension (:data:`WHOLE`) are compared whole: one value per batch (a load-balancing loss, a batch mean) must not
    change with the batch. ``fits``: each leaf's fit, found on a part of another size (default: on this one; a part
    of the chunk's own size fits every dimension of length n), or :data:`ITEMS`."""
    fits = fits if fits is not None else output_fits(out, part, n, len(index), inner)
    if fits == ITEMS:
        return _items_gap(out, part, index) if isinstance(part, (list, tuple)) and len(part) == len(index) else None
    full_leaves, part_leaves = pytree.tree_leaves(out), pytree.tree_leaves(part)
    if fits is None or len(part_leaves) != len(full_leaves):
        return None
    worst = None
    for i, (leaf, p, fit) in enumerate(zip(full_leaves, part_leaves, fits)):
        if not (isinstance(leaf, torch.Tensor) and isinstance(p, torch.Tensor)) or leaf.numel() == 0 or \
                read is not None and i not in read:
            continue
        if fit == WHOLE:
            if p.shape != leaf.shape:
                continue
            rows = leaf
        elif fit is not None:
            rows = _examples(leaf.detach().double(), fit[0], n, fit[1], index, inner)
        else:
            continue
        if rows.shape != p.shape:
            continue
        rel = _relative_gap(rows, p, leaf)
        if worst is None or not rel <= worst[0]:
            worst = (rel, i, fit != WHOLE)
    return worst
