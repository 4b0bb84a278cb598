"""The model's outputs split over examples: a chunk's rows are those of the same examples run in another batch.

The Hessian of the loss on the whole data assumes that example i's output depends on its own inputs only,
oᵢ = f(xᵢ; θ). A forward that mixes the examples of a batch (functional batch statistics, batch centring or
whitening, attention across the examples, in-forward mixup, mixture-of-experts routing with a capacity) gives
oᵢ = f(x_c; θ)ᵢ on chunk c, so summing chunks would be the Hessian of a ghost-batch loss, not of the loss on the
whole data. On the first chunk, k ≈ min(rows // 2, 8) examples (even when k > 1) spread over it (every
⌊rows/k⌋-th) are run as a batch of their own followed by max(3k, 64) copies of the first of them, and every row
of that batch is compared with the chunk's row of the same example, to roundoff: one extra forward of
k + max(3k, 64) examples per point at which the split is judged. Any mixing makes an example's output depend on
which other examples share its batch; the spread sub-batch breaks up neighbours and a causal order across the
examples as well as batch statistics, and the copies put most of the batch on one route, so a capacity measured
against the batch's load overflows (a sub-batch of distinct examples is too small to overflow one). A first chunk
of one example shows no mixing alone; it is judged joined with the next chunk, as one batch
(:mod:`fasthess._contract`).

BatchNorm modules that normalize with batch statistics are the documented exception (ghost batches): during the
sub-batch's forward each normalizes with the statistics it computed on the whole chunk (recorded in a forward of
the chunk), so such a model agrees row by row unless something else mixes the examples.

Rows: an input or output tensor's example dimension is its first dimension of length ``rows`` (the targets'
leading dimension), or its second for sequence-first tensors (``batch_first=False`` RNNs: (T, N, ...)). An output
leaf with no such dimension, or a sub-batch that cannot be formed (a ``PackedSequence``) or run, leave the check
unable to judge; it then passes rather than guessing. Inputs with no example dimension are passed whole, so
flat indices addressed by per-example offsets (an embedding bag written out) are refused as mixing, or as unable
to be judged when the sub-batch fails: the message names the opt-in, ``BatchSpec(batch_loss=True)``, exact for a
per-example model.
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

__all__ = ["check_model_splits", "worst_row_gap"]


def _row_dim(t, rows: int) -> int | None:
    """The example dimension of an input tensor: the first of length ``rows``, else the second (sequence-first)."""
    if not isinstance(t, torch.Tensor):
        return None
    return next((d for d in (0, 1) if t.dim() > d and t.shape[d] == rows), None)


SUBSET = 8  # examples in the sub-batch: enough to differ from the chunk, cheap next to a pass
COPIES = 64  # at least this many copies of one example: above the capacity floors MoE layers set (DeepSpeed: 4)


def _sub_inputs(inputs, rows: int, index: torch.Tensor):
    """Examples ``index`` of every input tensor with an example dimension, the others whole (None if none has one,
    or a packed sequence, whose rows cannot be cut)."""
    if any(isinstance(x, PackedSequence)
           for x in pytree.tree_leaves(inputs, is_leaf=lambda x: isinstance(x, PackedSequence))):
        return None
    leaves, spec = pytree.tree_flatten(inputs)
    dims = [_row_dim(t, rows) for t in leaves]
    if all(d is None for d in dims):
        return None
    return pytree.tree_unflatten([t if d is None else t.index_select(d, index.to(t.device))
                                  for t, d in zip(leaves, dims)], spec)


def _output_dim(full: torch.Tensor, part: torch.Tensor, rows: int, k: int) -> int | None:
    """The example dimension of an output leaf: length ``rows`` in ``full``, ``k`` in ``part``, every other
    dimension equal (None when there is none: the leaf is not per example)."""
    if part.dim() != full.dim():
        return None
    for d in range(full.dim()):
        if full.shape[d] == rows and part.shape[d] == k and \
                full.shape[:d] + full.shape[d + 1:] == part.shape[:d] + part.shape[d + 1:]:
            return d
    return None


def worst_row_gap(out, part, rows: int, index: torch.Tensor) -> tuple[float, int] | None:
    """max over output leaves of max|o_index − o_part| / max|o|, with the leaf's number (None: nothing to
    compare)."""
    full_leaves, spec = pytree.tree_flatten(out)
    part_leaves, part_spec = pytree.tree_flatten(part)
    if part_spec != spec:
        return None
    worst = None
    for i, (leaf, p) in enumerate(zip(full_leaves, part_leaves)):
        if not (isinstance(leaf, torch.Tensor) and isinstance(p, torch.Tensor)):
            continue
        d = _output_dim(leaf, p, rows, len(index))
        if d is None or leaf.numel() == 0:
            continue
        full = leaf.detach().double()
        scale = float(full.abs().max())
        gap = float((full.index_select(d, index.to(full.device)) - p.detach().double()).abs().max())
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
                       out, batchnorms: Sequence[nn.Module], dtype: torch.dtype,
                       where: str = "the first chunk") -> None:
    """Refuse a forward whose output rows on a chunk of ``rows`` examples differ from those of a spread sub-batch
    run alone beyond roundoff (module docstring). ``forward(args, kwargs)`` runs the model (no grad); ``out`` is
    its output on the chunk, or None to run it here; ``batchnorms`` are the BatchNorm modules that normalize with
    batch statistics; ``where`` names the chunk in the refusal."""
    k = min(rows // 2, SUBSET)
    k -= k % 2 if k > 1 else 0  # an even sub-batch, for models that pair up their examples
    if k < 1:
        return
    spread = torch.arange(0, rows, rows // k)[:k]
    index = torch.cat([spread, spread[:1].repeat(max(3 * k, COPIES))])
    inputs = _sub_inputs((args, kwargs), rows, index)
    if inputs is None:
        return
    with torch.no_grad():
        recorded: Statistics = {}
        if batchnorms or out is None:  # the chunk's own statistics, for the sub-batch
            out, recorded = _recorded_forward(forward, args, kwargs, batchnorms)
        try:
            with _replayed(recorded):
                part = forward(*inputs)
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            hint = _uncut_hint(args, kwargs, rows)
            if hint:  # the failure is most likely the whole indices against cut offsets: nothing shows the split
                raise BatchDependentModelError(
                    f"fasthess cannot check that the model's outputs split over the examples: its forward failed on "
                    f"a sub-batch of {where} ({type(exc).__name__}: {str(exc)[:120]}){hint}") from exc
            return  # the sub-batch is not an input this model takes (rows that are not examples): nothing to judge
    worst = worst_row_gap(out, part, rows, index)
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    if worst is None or worst[0] <= tol:
        return
    raise BatchDependentModelError(
        f"the model's forward mixes the examples of a batch: on {where} ({rows} examples), the outputs of "
        f"{k} of its examples differ from those of the same examples run as a batch of their own, the "
        f"first copied {len(index) - k} times (relative difference {worst[0]:.3g} in output tensor {worst[1]}; "
        f"roundoff would be below {tol:g}). "
        "Functional batch statistics (F.batch_norm(..., training=True) outside a BatchNorm module), batch centring or "
        "whitening, attention across the examples, in-forward mixup and mixture-of-experts routing with a capacity "
        "do this; the Hessian of the loss on the whole data is then not a sum over chunks. Fix: call model.eval() if "
        "the mixing is train-mode only; or, if you mean the ghost-batch Hessian (the average over the training "
        "batches of each batch's loss), pass batch=fasthess.BatchSpec(batch_loss=True) with chunks equal to the "
        "training batches (batch_size=<the training batch size>, or a DataLoader of them): the result is then that "
        f"ghost-batch loss's Hessian{_uncut_hint(args, kwargs, rows)}")


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
