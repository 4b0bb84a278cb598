"""The model's outputs split over examples: a chunk's rows are those of the same examples run in another batch.

The Hessian of the loss on the whole data assumes that example i's output depends on its own inputs only,
oᵢ = f(xᵢ; θ). A forward that mixes the examples of a batch (functional batch statistics, batch centring or
whitening, attention across the examples, in-forward mixup, mixture-of-experts routing with a capacity) gives
oᵢ = f(x_c; θ)ᵢ on chunk c, so summing chunks would be the Hessian of a ghost-batch loss, not of the loss on the
whole data. On the first chunk, k ≈ min(n // 2, 8) examples (even when k > 1) spread over its n examples (every
⌊n/k⌋-th) are run as a batch of their own followed by max(3k, 64) copies of the first of them, and every row of
that batch is compared with the chunk's row of the same example, to roundoff: extra forwards of
k + max(3k, 64) and of n examples per point at which the split is judged. Any mixing makes an example's output depend on
which other examples share its batch; the spread sub-batch breaks up neighbours and a causal order across the
examples as well as batch statistics, and the copies put most of the batch on one route, so a capacity measured
against the batch's load overflows (a sub-batch of distinct examples is too small to overflow one). The spread
examples followed by copies up to the chunk's own size n are judged too: a forward that takes only some batch
sizes (one that views the batch as groups of g examples), or mixes only at some (odd ones, large ones), takes
and mixes the chunk's. A first chunk of one example shows no mixing alone; it is judged
joined with the next chunk, as one batch (:mod:`fasthess._contract`).

BatchNorm modules that normalize with batch statistics are the documented exception (ghost batches): during the
sub-batch's forward each normalizes with the statistics it computed on the whole chunk (recorded in a forward of
the chunk), so such a model agrees row by row unless something else mixes the examples.

Examples (:func:`cuts`): an input tensor's example dimension is its first dimension of length ``rows`` (the
targets' leading dimension), or its second for sequence-first tensors (``batch_first=False`` RNNs: (T, N, ...)).
When no input has one but an input's first two dimensions multiply to ``rows``, the targets hold m rows per
example (tokens flattened to (N·T,)): the examples are that input's leading dimension (the second, first, in a
model with a sequence-first module), and an output dimension of n·m rows holds them in blocks of m. Inputs that
say nothing of where the examples are (a graph batch: node features against one target per graph), an output
leaf with no example dimension that the loss does not read, or a sub-batch that cannot be formed (a
``PackedSequence``) or run at either size, leave the check unable to judge; it then passes rather than guessing.
Inputs with no example dimension are passed whole, so flat indices addressed by per-example offsets (an
embedding bag written out) are refused as mixing, or as unable to be judged when the sub-batch fails: the message
names the opt-in, ``BatchSpec(batch_loss=True)``, exact for a per-example model. A refusal names an input table
that was cut only because it has the chunk's number of rows when the outputs agree with it passed whole.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence
from torch.utils import _pytree as pytree

from fasthess.errors import BatchDependentModelError

Fits = list  # per output leaf: (example dimension d, rows per example m), WHOLE, or None (not comparable)

__all__ = ["ITEMS", "WHOLE", "Cut", "Split", "check_model_splits", "cuts", "example_layout", "output_fits", "roundoff",
           "worst_row_gap"]


def roundoff(dtype: torch.dtype) -> float:
    """The relative gap between two forwards of the same examples that roundoff explains (another batch, another
    memory layout, another BLAS path)."""
    return 1e-9 if dtype == torch.float64 else 1e-3


def _row_dim(t, rows: int, order: tuple[int, int] = (0, 1)) -> int | None:
    """The example dimension of an input tensor: the first of length ``rows``, else the second (sequence-first)
    unless the first is 1 (one example, whose T tokens are the target rows); ``order`` (1, 0) tries the second
    first."""
    if not isinstance(t, torch.Tensor):
        return None
    return next((d for d in order if t.dim() > d and t.shape[d] == rows and (d == 0 or t.shape[0] > 1)), None)


SUBSET = 8  # examples in the sub-batch: enough to differ from the chunk, cheap next to a pass
COPIES = 64  # at least this many copies of one example: above the capacity floors MoE layers set (DeepSpeed: 4)


@dataclass(frozen=True)
class Split:
    """What the split check found for a forward that does not mix: the cut of the inputs into examples, and each
    output leaf's example dimension and rows per example (``fits``, None where none was found)."""

    cut: Cut
    fits: Fits | str | None


@dataclass(frozen=True)
class Cut:
    """How the inputs are cut into examples: ``n`` examples, each input leaf's example dimension (None: passed
    whole), and whether an output dimension of ``n·m`` rows holds the examples inner (``(m, n)``, sequence-first
    flattening) rather than outer (``(n, m)``)."""

    n: int
    dims: tuple[int | None, ...]
    inner: bool


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
    dims = tuple(_row_dim(t, rows) for t in leaves)
    if any(d is not None for d in dims):
        found = [dims, tuple(_row_dim(t, rows, (1, 0)) for t in leaves)] if seq_first else [dims]
        return [Cut(rows, d, next(e for e in d if e is not None) == 1) for d in dict.fromkeys(reversed(found))]
    grid = next((t.shape[:2] for t in leaves if isinstance(t, torch.Tensor) and t.dim() > 1
                 and t.shape[0] * t.shape[1] == rows and min(t.shape[:2]) > 1), None)
    if grid is None:
        return []
    return [Cut(n, tuple(axis if isinstance(t, torch.Tensor) and t.dim() > axis and t.shape[axis] == n else None
                         for t in leaves), axis == 1)
            for axis, n in (((1, grid[1]), (0, grid[0])) if seq_first else ((0, grid[0]),))]


def _sub_inputs(inputs, cut: Cut, index: torch.Tensor):
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


def worst_row_gap(out, part, n: int, index: torch.Tensor, inner: bool = False,
                  whole: Collection[int] | None = (), fits: Fits | str | None = None) -> tuple[float, int, bool] | None:
    """max over output leaves of max|o_index − o_part| / max|o|, with the leaf's number and whether it is per
    example (None: nothing to compare); ``out`` holds ``n`` examples (``inner``: see :class:`Cut`). Leaves with no
    example dimension (:data:`WHOLE`) are compared whole when their number is in ``whole`` (None: all): one value
    per batch (a load-balancing loss, a batch mean) must not change with the batch if the loss reads it. ``fits``:
    each leaf's fit, found on a part of another size (default: on this one; a part of the chunk's own size fits
    every dimension of length n), or :data:`ITEMS`."""
    fits = fits if fits is not None else output_fits(out, part, n, len(index), inner)
    if fits == ITEMS:
        return _items_gap(out, part, index) if isinstance(part, (list, tuple)) and len(part) == len(index) else None
    full_leaves, part_leaves = pytree.tree_leaves(out), pytree.tree_leaves(part)
    if fits is None or len(part_leaves) != len(full_leaves):
        return None
    worst = None
    for i, (leaf, p, fit) in enumerate(zip(full_leaves, part_leaves, fits)):
        if not (isinstance(leaf, torch.Tensor) and isinstance(p, torch.Tensor)) or leaf.numel() == 0:
            continue
        if fit == WHOLE:
            if not (whole is None or i in whole) or p.shape != leaf.shape:
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
                       out, batchnorms: Sequence[nn.Module], dtype: torch.dtype,
                       where: str = "the first chunk", seq_first: bool = False,
                       read: Collection[int] | None = None) -> Split | None:
    """Refuse a forward whose output rows on a chunk of ``rows`` examples differ from those of a spread sub-batch
    run alone beyond roundoff (module docstring). ``forward(args, kwargs)`` runs the model; ``out`` is
    its output on the chunk, or None to run it here; ``batchnorms`` are the BatchNorm modules that normalize with
    batch statistics; ``where`` names the chunk in the refusal; ``seq_first``: the model has a sequence-first
    module (see :func:`cuts`); ``read``: the output leaves the loss reads (None: all), whose values must not change
    with the batch when they have no example dimension. Returns the cut that showed no mixing (None: nothing was
    judged), with the output leaves' example dimensions."""
    found = cuts((args, kwargs), rows, seq_first)
    if not found:
        return None
    tol = roundoff(dtype)
    with torch.enable_grad():  # as in the products: a forward may branch on the grad mode
        recorded: Statistics = {}
        if batchnorms or out is None:  # the chunk's own statistics, for the sub-batch
            out, recorded = _recorded_forward(forward, args, kwargs, batchnorms)
        run = _SubBatches(forward, (args, kwargs), out, recorded, read)
        verdicts = []
        for cut in found:
            verdict, fits = run.judge(cut, _uncut_hint(args, kwargs, rows), where)
            if verdict is None:
                return None
            if verdict[0] <= tol:
                return Split(cut, fits)
            verdicts.append((cut, verdict))
        cut, (gap, leaf, per_example, index) = verdicts[0]
        shared = run.shared(cut, index, tol) if per_example else ""
    layout = ""
    if seq_first and not any(c.inner for c, _ in verdicts):
        layout = (". The model has a sequence-first module (batch_first=False) and the examples were read along the "
                  "inputs' first dimension, the length of the targets' leading one: if the targets are "
                  "sequence-first too ((T, N, ...)), pass them batch-first (y.T, the loss permuting the output to "
                  "match), so that their leading dimension counts the examples")
    k = len(set(index.tolist()))
    copies = f", {len(index) - k} copies of one of them added" if len(index) > k else ""
    grouped = f"; its {rows} target rows read as {cut.n} examples of {rows // cut.n} rows" if cut.n != rows else ""
    seen = (f"the outputs of {k} of its examples differ from those of the same examples run as a batch of their own"
            f"{copies} (relative difference {gap:.3g} in output tensor {leaf}"
            if per_example else
            f"output tensor {leaf}, which the loss reads and which has no example dimension (one value per batch), "
            f"changes when {k} of its examples are run as a batch of their own{copies} (relative difference {gap:.3g}")
    raise BatchDependentModelError(
        f"{'either an input table is shared by every example, or ' if shared else ''}"
        f"the model's forward mixes the examples of a batch: on {where} ({cut.n} examples{grouped}), {seen}; roundoff "
        f"would be below {tol:g}). "
        "Functional batch statistics (F.batch_norm(..., training=True) outside a BatchNorm module), batch centring or "
        "whitening, attention across the examples, in-forward mixup, mixture-of-experts routing with a capacity and "
        "batch-level outputs (a load-balancing loss, a batch mean, a loss computed inside the forward such as Hugging "
        "Face's out.loss: compute that one in loss_fn from the logits) do this; the Hessian of the loss on the whole "
        "data is then not a sum over chunks. Fix: call model.eval() if the mixing is train-mode only; or, if you "
        "mean the ghost-batch Hessian (the average over the training batches of each batch's loss), pass "
        "batch=fasthess.BatchSpec(batch_loss=True) with chunks equal to the training batches "
        "(batch_size=<the training batch size>, or a DataLoader of them): the result is then that ghost-batch "
        f"loss's Hessian{_uncut_hint(args, kwargs, rows)}{shared}{layout}")


def example_layout(forward: Callable[[tuple, dict], object], args: tuple, kwargs: dict, rows: int, out,
                   seq_first: bool = False) -> Split | None:
    """Where the examples are in the inputs and in each output leaf, without judging the split: the first cut's
    first sub-batch, for data that is one chunk (whose split does not matter, but whose loss is still cut in
    halves). None when nothing shows it."""
    found = cuts((args, kwargs), rows, seq_first)
    spread = _spread(found[0].n) if found else torch.zeros(0)
    if not len(spread):
        return None
    index = torch.cat([spread, spread[:1].repeat(max(3 * len(spread), COPIES))])
    try:
        with torch.enable_grad():
            part = forward(*_sub_inputs((args, kwargs), found[0], index))
    except FORWARD_ERRORS:
        return None
    return Split(found[0], output_fits(out, part, found[0].n, len(index), found[0].inner))


def _spread(n: int) -> torch.Tensor:
    """k = min(n // 2, SUBSET) examples (even when k > 1, for models that pair up their examples), every
    ⌊n/k⌋-th."""
    k = min(n // 2, SUBSET)
    k -= k % 2 if k > 1 else 0
    return torch.arange(0, n, n // k)[:k] if k else torch.zeros(0, dtype=torch.long)


#: what a forward raises on a batch it does not take (a size it cannot view, rows that are not examples)
FORWARD_ERRORS = (RuntimeError, ValueError, IndexError, TypeError, KeyError, AttributeError, AssertionError)


class _SubBatches:
    """Sub-batches of one chunk run through the forward and compared row by row with the chunk's ``out``."""

    def __init__(self, forward: Callable[[tuple, dict], object], inputs: tuple, out, recorded: Statistics,
                 read: Collection[int] | None) -> None:
        self.forward, self.inputs, self.out, self.recorded, self.read = forward, inputs, out, recorded, read

    def _run(self, cut: Cut, index: torch.Tensor):
        """The forward of the examples ``index`` (raises what the forward raises)."""
        with _replayed(self.recorded):
            return self.forward(*_sub_inputs(self.inputs, cut, index))

    def judge(self, cut: Cut, hint: str,
              where: str) -> tuple[tuple[float, int, bool, torch.Tensor] | None, Fits | str | None]:
        """The worst (gap, output leaf, per example, index) over sub-batches of the chunk run alone, and the output
        leaves' fits. The sub-batches: k spread examples followed by max(3k, COPIES) copies of the first (copies
        overflow a capacity); the same followed by copies up to the chunk's own size n (a forward that takes only
        some batch sizes, or mixes only at some, takes the chunk's); the other n − k examples followed by k copies
        of the first of them (a batch statistic that the spread examples hold, a maximum or a mode, is missing
        there); and each spread example alone (a statistic that ties across those batches, such as the longest
        length in a batch trimmed to it, is the example's own). Each output leaf's fit is found on the first
        sub-batch, whose size is not n. A worst of None: nothing to judge; when none runs, a failure with flat
        indices passed whole (``hint``) is refused, since it most likely comes from cutting their offsets."""
        spread = _spread(cut.n)
        k = len(spread)
        if k < 1:
            return None, None
        rest = torch.ones(cut.n, dtype=torch.bool)
        rest[spread] = False
        rest = rest.nonzero().squeeze(1)
        batches = [torch.cat([spread, spread[:1].repeat(max(3 * k, COPIES))]),
                   torch.cat([spread, spread[:1].repeat(cut.n - k)]), torch.cat([rest, rest[:1].repeat(k)]),
                   *spread.split(1)]
        fits, worst, failure = None, None, None
        for i, index in enumerate(batches):
            try:
                part = self._run(cut, index)
            except FORWARD_ERRORS as exc:
                failure = exc
                continue
            if i == 0:
                fits = output_fits(self.out, part, cut.n, len(index), cut.inner)  # None: found per sub-batch
            gap = worst_row_gap(self.out, part, cut.n, index, cut.inner, self.read, fits)
            if gap is not None and (worst is None or not gap[0] <= worst[0]):
                worst = (*gap, index)
        if worst is None and failure is not None and hint:
            raise BatchDependentModelError(
                f"fasthess cannot check that the model's outputs split over the examples: its forward failed on a "
                f"sub-batch of {where} ({type(failure).__name__}: {str(failure)[:120]}){hint}") from failure
        return worst, fits

    def shared(self, cut: Cut, index: torch.Tensor, tol: float) -> str:
        """The hint for an input table that was cut as examples only because it has as many rows as the chunk:
        the outputs agree when it alone is passed whole. One chunk cannot tell such a table from per-example
        data, which would make a model that attends over it mix the examples, so this is a hint, not a pass."""
        leaves = pytree.tree_leaves(self.inputs)
        for j, d in enumerate(cut.dims):
            if d is None or leaves[j].dim() < 2 or sum(e is not None for e in cut.dims) < 2:
                continue
            whole = replace(cut, dims=cut.dims[:j] + (None,) + cut.dims[j + 1:])
            try:
                worst = worst_row_gap(self.out, self._run(whole, index), cut.n, index, cut.inner, self.read)
            except FORWARD_ERRORS:
                continue
            if worst is not None and worst[0] <= tol:
                return (f". The outputs agree when input tensor {j} (shape {tuple(leaves[j].shape)}) is passed whole: "
                        "it has as many rows as the chunk, so it was cut as examples. If it is shared by every "
                        "example (a table of prototypes, a codebook), the model is per-example: make it a buffer "
                        "or attribute of the model instead of an input, or use a batch size other than its number "
                        "of rows (one chunk cannot tell a shared table from per-example data)")
        return ""


def _uncut_hint(args: tuple, kwargs: dict, rows: int) -> str:
    """For inputs the sub-batch passed whole (1-D integer tensors with no example dimension: flat indices with
    offsets), the opt-in that fits a model that is per-example after all."""
    uncut = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() == 1
             and not t.is_floating_point() and _row_dim(t, rows) is None]
    if not uncut:
        return ""
    return (f". An input of {uncut[0].numel()} integers has no example dimension, so the sub-batch passed it whole; "
            "if these are flat indices addressed by per-example offsets and the model is per-example, either give "
            "each example a row (indices padded to (N, L)) or pass batch=fasthess.BatchSpec(batch_loss=True), which "
            "takes each chunk's loss as given (exact for a per-example model)")
