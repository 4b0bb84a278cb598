"""One data batch as the curvature operators see it: model inputs, targets, per-example weights and a count.

A data source yields raw batches; :class:`BatchSpec` reads each into a :class:`Batch`. Without a spec:

* ``(x, y)`` and ``(x, y, w)`` (tuples or lists): the model is called as ``model(x)`` (``model(*x)`` when ``x`` is a
  tuple or list, ``model(**x)`` when it is a dict), ``y`` is the target and ``w`` holds one weight per example;
* a dict (Hugging Face style): ``labels`` is the target and every other entry a keyword input, ``model(**rest)``;
  or the whole rest as one argument, ``model(rest)``, when the forward takes one (:func:`takes_whole_dict`).

The count of a batch is its number of examples (the leading dimension of the target). It is the chunk's weight
for a loss callable that returns a mean; a language model's token mean needs the token count instead, e.g.
``BatchSpec(count=lambda b: (b["labels"][:, 1:] != -100).sum())``.

>>> import torch
>>> b = BatchSpec().read({"input_ids": torch.zeros(2, 5, dtype=torch.long), "labels": torch.zeros(2, 5)})
>>> sorted(b.kwargs), b.count
(['input_ids'], 2)
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils import _pytree as pytree

from fasthess._examples import ITEMS
from fasthess.errors import FasthessError

__all__ = ["Batch", "BatchSpec", "move", "rows_of", "take_rows", "tensors_of"]

LABELS = "labels"


@dataclass(frozen=True)
class Batch:
    """A read batch: ``model(*args, **kwargs)`` is scored against ``target``; ``weight`` is None or one weight per
    example (shape ``(rows,)``); ``count`` is the chunk's normalizer for a mean-valued loss callable."""

    args: tuple
    kwargs: dict
    target: Any
    weight: torch.Tensor | None
    count: int | float | torch.Tensor
    rows: int

    def with_target(self, target) -> Batch:
        """This batch with another target (e.g. the primal that forward mode differentiates through)."""
        return replace(self, target=target)


def tensors_of(tree) -> list[torch.Tensor]:
    """The tensor leaves of a nested batch or output (tuples, lists, dicts, Hugging Face outputs)."""
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def rows_of(tree) -> int | None:
    """The leading dimension of the first batched tensor leaf (None when no leaf has a dimension)."""
    return next((t.shape[0] for t in tensors_of(tree) if t.dim() > 0), None)


def take_rows(tree, lo: int, hi: int, rows: int):
    """Rows ``lo:hi`` of every tensor leaf whose leading dimension is ``rows``; other leaves unchanged."""
    return pytree.tree_map(lambda t: t[lo:hi] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == rows
                           else t, tree)


def _grid(t, rows: int) -> int | None:
    """B for a tensor whose first two dimensions (A, B) hold ``rows`` = A·B target rows in row-major order (an
    (N, T, C) output against targets flattened to (N·T,)), else None."""
    return t.shape[1] if isinstance(t, torch.Tensor) and t.dim() > 1 and t.shape[0] * t.shape[1] == rows else None


def take_output_rows(tree, lo: int, hi: int, rows: int, seq_first: bool = False, fits: list | str | None = None):
    """Rows ``lo:hi`` of every tensor leaf along its first dimension of length ``rows``, else its second (a
    sequence-first output (T, N, ...)); ``seq_first``: the second first. ``fits`` from the split check
    (:func:`fasthess._examples.output_fits`: per leaf (example dimension, rows per example), or a marker for a
    leaf with none, which is left whole; or :data:`~fasthess._examples.ITEMS`, one output per example in a
    sequence, which is sliced)
    overrides that order. A leaf whose first two dimensions (A, B) hold the rows (:func:`_grid`) is cut along the
    first at lo/B:hi/B (``lo`` and ``hi`` multiples of B, see :func:`halfway`). Without ``fits``, a list of ``rows``
    outputs is sliced. Other leaves unchanged."""
    if fits == ITEMS or fits is None and isinstance(tree, list) and len(tree) == rows:
        return tree[lo:hi]
    leaves, spec = pytree.tree_flatten(tree)
    fits = fits if isinstance(fits, list) and len(fits) == len(leaves) else None

    def cut(t, fit):
        if not isinstance(t, torch.Tensor):
            return t
        if fits is not None and not isinstance(fit, tuple):
            return t
        order = (fit[0],) if fit is not None else ((1, 0) if seq_first else (0, 1))
        d = next((d for d in order if t.dim() > d and t.shape[d] == rows), None)
        if d is not None:
            return t.narrow(d, lo, hi - lo)
        b = _grid(t, rows)
        return t.narrow(0, lo // b, (hi - lo) // b) if b and lo % b == 0 and hi % b == 0 else t
    return pytree.tree_unflatten([cut(t, None if fits is None else fits[i]) for i, t in enumerate(leaves)], spec)


def halfway(out, rows: int) -> int:
    """Where to cut ``rows`` target rows in two for :func:`take_output_rows`: ⌊rows/2⌋, or, when no output leaf has
    a dimension of ``rows`` but one holds them as (A, B), ⌊A/2⌋·B (a whole number of examples)."""
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    if any(rows in t.shape[:2] for t in leaves):
        return rows // 2
    b = next(filter(None, (_grid(t, rows) for t in leaves)), None)
    return rows // 2 if b is None else rows // b // 2 * b


IGNORE_INDEX = -100  # the padding label of torch.nn's class-indexed criteria and of Hugging Face collators


def _pad_to(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``t`` padded at the end of each trailing dimension to ``shape[1:]``: floats with 0, integers with
    ``IGNORE_INDEX``, booleans with False (what a padded language-model batch holds there)."""
    if tuple(t.shape[1:]) == tuple(shape[1:]):
        return t
    fill = 0.0 if t.is_floating_point() else (False if t.dtype == torch.bool else IGNORE_INDEX)
    out = t.new_full((t.shape[0], *shape[1:]), fill)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def join_rows(a, b, rows_a: int, rows_b: int, whole: Collection[int] = (), dims: list[int] | None = None):
    """Two trees of one structure joined along the rows (tensor leaves whose leading dimensions, or dimension
    ``dims[i]`` for leaf i, are ``rows_a`` and ``rows_b``; other leaves, and those numbered in ``whole``, from ``a``),
    ragged other dimensions padded to the longer (see :func:`_pad_to`), or None when the structures or a joined
    pair's ranks differ, or nothing can be joined."""
    leaves_a, spec = pytree.tree_flatten(a)
    leaves_b, spec_b = pytree.tree_flatten(b)
    if spec != spec_b:
        return None

    def rows(t, n: int, d: int) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() > d and t.shape[d] == n

    joined = []
    for i, (x, y) in enumerate(zip(leaves_a, leaves_b)):
        d = dims[i] if dims is not None and i < len(dims) else 0
        if i in whole or not (rows(x, rows_a, d) and rows(y, rows_b, d)):
            joined.append(x)
            continue
        if x.dim() != y.dim():
            return None
        x, y = x.movedim(d, 0), y.movedim(d, 0)
        shape = (0, *(max(m, n) for m, n in zip(x.shape[1:], y.shape[1:])))
        joined.append(torch.cat([_pad_to(x, shape), _pad_to(y, shape)]).movedim(0, d))
    if all(j is x for j, x in zip(joined, leaves_a)):
        return None  # nothing had rows to join (an output type pytree cannot open)
    return pytree.tree_unflatten(joined, spec)


def takes_whole_dict(signature: inspect.Signature | None, kwargs: dict) -> bool:
    """Does a forward with this signature take a dict batch as one argument, ``model(batch)`` (e.g. ``def
    forward(self, batch)``), rather than as keywords, ``model(**batch)``? Yes when it has no ``**kwargs``, does not
    name every key, and has exactly one parameter without a default that can be passed by position."""
    if signature is None or not kwargs:
        return False
    params = list(signature.parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params) or set(kwargs) <= {p.name for p in params}:
        return False
    required = [p for p in params if p.default is p.empty and p.kind is not p.VAR_POSITIONAL]
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return len(required) == 1 and required[0].kind in positional


def nonfinite_data(batch: Batch) -> str | None:
    """Where a batch's floating data holds NaN/Inf ("the inputs of example 3 hold NaN"), or None when it is finite.
    One host sync per part (inputs, targets, weights)."""
    for part, tree in (("inputs", (batch.args, batch.kwargs)), ("targets", batch.target), ("weights", batch.weight)):
        for t in tensors_of(tree):
            if not t.is_floating_point() or bool(torch.isfinite(t).all()):
                continue
            bad = ~torch.isfinite(t)
            kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            if t.dim() > 0 and t.shape[0] == batch.rows:
                row = int(bad.reshape(batch.rows, -1).any(1).nonzero()[0, 0])
                return f"the {part} of example {row} of the chunk hold {kind}"
            return f"the {part} hold {kind}"
    return None


def cast_floating(tree, dtype: torch.dtype):
    """Every floating tensor leaf of ``tree`` in ``dtype`` (other leaves unchanged)."""
    return pytree.tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                           tree)


def move(tree, device: torch.device):
    """Every tensor leaf on ``device`` (no copy when it is there already); meta tensors are refused."""
    def to(t):
        if not isinstance(t, torch.Tensor):
            return t
        if t.is_meta:
            raise FasthessError("the data holds meta tensors, which have no values; load the real data (meta "
                                "tensors only describe shapes)")
        return t.to(device, non_blocking=True)
    return pytree.tree_map(to, tree)


def _inputs(x) -> tuple[tuple, dict]:
    if isinstance(x, Mapping):
        return (), dict(x)
    if isinstance(x, (tuple, list)):
        return tuple(x), {}
    return (x,), {}


class BatchSpec:
    """How to read a raw batch; each argument is a function of the raw batch (None: the default of the module
    docstring).

    Args:
        inputs: returns the model's input: a tensor (``model(x)``), a tuple (``model(*x)``) or a dict (``model(**x)``).
        targets: returns what the loss gets as its second argument.
        weights: returns one weight per example, shape ``(rows,)``, or None.
        count: returns the batch's normalizer for a loss callable that returns a mean (default: the number of
            examples); e.g. the number of non-ignored tokens for a language model's token-mean loss.
        batch_loss: the loss is defined per batch (e.g. contrastive): L is the count-weighted mean of the chunks'
            losses, with no check that it splits over examples; the chunks must then be the training batches.
    """

    def __init__(self, *, inputs: Callable | None = None, targets: Callable | None = None,
                 weights: Callable | None = None, count: Callable | None = None, batch_loss: bool = False) -> None:
        for name, fn in (("inputs", inputs), ("targets", targets), ("weights", weights), ("count", count)):
            if fn is not None and not callable(fn):
                raise FasthessError(f"BatchSpec({name}=...) must be a function of the raw batch, got "
                                    f"{type(fn).__name__}")
        self.inputs, self.targets, self.weights, self.count = inputs, targets, weights, count
        self.batch_loss = bool(batch_loss)

    @property
    def counts_itself(self) -> bool:
        """Was a ``count`` given (the normalizer of a mean-valued loss callable)?"""
        return self.count is not None

    def _default(self, raw) -> tuple[Any, Any, Any]:
        if isinstance(raw, Mapping):
            if LABELS not in raw and (self.targets is None or self.inputs is None):
                raise FasthessError(f"a dict batch needs a {LABELS!r} entry (the targets), got keys {sorted(raw)}; "
                                    "or pass batch=fasthess.BatchSpec(inputs=..., targets=...) to name them")
            return {k: v for k, v in raw.items() if k != LABELS}, raw.get(LABELS), None
        if isinstance(raw, (tuple, list)) and len(raw) in (2, 3):
            return raw[0], raw[1], raw[2] if len(raw) == 3 else None
        raise FasthessError(f"each batch must be (x, y), (x, y, weights) or a dict with {LABELS!r}; got "
                            f"{type(raw).__name__}{f' of length {len(raw)}' if isinstance(raw, (tuple, list)) else ''}"
                            ". Wrap the data, or pass batch=fasthess.BatchSpec(inputs=..., targets=...)")

    def read(self, raw) -> Batch:
        """The :class:`Batch` of a raw batch."""
        if self.inputs is not None and self.targets is not None:
            x, y, w = self.inputs(raw), self.targets(raw), None
        else:
            x, y, w = self._default(raw)
            x = x if self.inputs is None else self.inputs(raw)
            y = y if self.targets is None else self.targets(raw)
        if self.weights is not None:
            w = self.weights(raw)
        args, kwargs = _inputs(x)
        rows = rows_of(y) if isinstance(y, torch.Tensor) else rows_of((y, args, kwargs))
        if isinstance(y, torch.Tensor) and y.dim() == 0:
            raise FasthessError("the targets are a 0-dim tensor, so there is no example dimension; give y a leading "
                                "batch dimension (y.reshape(1) or y[None]) so that each example has its target")
        if rows is None:
            raise FasthessError("no tensor in the batch has a leading example dimension; pass batched tensors")
        if w is not None:
            if not isinstance(w, torch.Tensor) or w.shape != (rows,) or not w.is_floating_point():
                got = f"{getattr(w, 'dtype', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}"
                hint = ("" if self.weights is not None else
                        "; a batch of three entries is read as (inputs, targets, weights): if yours is (x, mask, y) "
                        "or another layout, name its parts with batch=fasthess.BatchSpec(inputs=lambda b: (b[0], "
                        "b[1]), targets=lambda b: b[2])")
                raise FasthessError(f"per-example weights must be a floating tensor of shape ({rows},), got {got}"
                                    f"{hint}")
        count = rows if self.count is None else self.count(raw)
        return Batch(args, kwargs, y, w, count, rows)
