"""The model's outputs split over examples: a chunk's rows are those of the same examples run in another batch.

The Hessian of the loss on the whole data assumes that example i's output depends on its own inputs only,
oᵢ = f(xᵢ; θ). A forward that mixes the examples of a batch (functional batch statistics, batch centring or
whitening, attention across the examples, in-forward mixup, mixture-of-experts routing with a capacity) gives
oᵢ = f(x_c; θ)ᵢ on chunk c, so summing chunks would be the Hessian of a ghost-batch loss, not of the loss on the
whole data. On the first chunk, k ≈ min(n // 2, 8) of its n examples (even when k > 1), spread over it (every
⌊n/k⌋-th), are run in batches of their own (:func:`_sub_batches`), and every output row of such a batch is compared
with the chunk's row of the same example, to roundoff (:meth:`_SubBatches.judge`). Any mixing makes an example's
output depend on which other examples share its batch; the spread breaks up neighbours and a causal order across
the examples as well as batch statistics. Only the output leaves the loss reads are judged (no other reaches the
Hessian); those with no example dimension are compared whole (one value per batch must not change with the batch).
All of it runs at θ and at a perturbed θ. Every later chunk of the first pass is judged at θ on its k spread
examples with copies, on k examples between them and on one of those alone (:func:`_later_sub_batches`): mixing
that only what those chunks hold sets off (a mode that ties in the first chunk, examples grouped by an id) shows
there. A first chunk of one example shows no mixing alone; it is judged joined with the next chunk, as one batch
(:mod:`fasthess._contract`).

BatchNorm modules that normalize with batch statistics are the documented exception (ghost batches): during the
sub-batch's forward each normalizes with the statistics it computed on the whole chunk (recorded in a forward of
the chunk), so such a model agrees row by row unless something else mixes the examples.

Where the examples are in the inputs and in each output leaf is :mod:`fasthess._examples`. Inputs that say
nothing of where the examples are (a graph batch: node features against one target per graph), an output leaf
with no example dimension that the loss does not read, or a sub-batch that cannot be formed (a
``PackedSequence``) or run at any size, leave the check unable to judge; it then passes rather than guessing.
Inputs with no example dimension are passed whole, so flat indices addressed by per-example offsets (an
embedding bag written out) are refused as mixing, or as unable to be judged when the sub-batch fails: the message
names the opt-in, ``BatchSpec(batch_loss=True)``, exact for a per-example model. A refusal names an input table
that was cut only because it has the chunk's number of rows when the outputs agree with it passed whole.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import replace

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils import _pytree as pytree

from fasthess._examples import Cut, Fits, Split, cuts, output_fits, roundoff, row_dim, sub_inputs, worst_row_gap
from fasthess.errors import BatchDependentModelError, NonFiniteError

__all__ = ["FORWARD_ERRORS", "check_model_splits", "example_layout"]

SUBSET = 8  # examples in the sub-batch: enough to differ from the chunk, cheap next to a pass
COPIES = 64  # at least this many copies of one example: above the capacity floors MoE layers set (DeepSpeed: 4)


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
                       read: Collection[int] | None = None, thorough: bool = True) -> Split | None:
    """Refuse a forward whose output rows on a chunk of ``rows`` examples differ from those of a spread sub-batch
    run alone beyond roundoff (module docstring). ``forward(args, kwargs)`` runs the model; ``out`` is
    its output on the chunk, or None to run it here; ``batchnorms`` are the BatchNorm modules that normalize with
    batch statistics; ``where`` names the chunk in the refusal; ``seq_first``: the model has a sequence-first
    module (see :func:`cuts`); ``read``: the output leaves the loss reads (None: all), the only ones judged (those
    with no example dimension must not change with the batch at all); ``thorough``: every sub-batch of
    :meth:`_SubBatches.judge`, else those of :func:`_later_sub_batches`. Returns the cut that showed
    no mixing, with the output leaves' example dimensions (None: nothing was judged)."""
    found = cuts((args, kwargs), rows, seq_first)
    if not found:
        return None
    tol = roundoff(dtype)
    with torch.enable_grad():  # as in the products: a forward may branch on the grad mode
        recorded: Statistics = {}
        if batchnorms or out is None:  # the chunk's own statistics, for the sub-batch
            try:
                out, recorded = _recorded_forward(forward, args, kwargs, batchnorms)
            except FORWARD_ERRORS:
                if thorough:
                    raise
                return None  # a later chunk the forward fails on: its products run it and name the failure
        run = _SubBatches(forward, (args, kwargs), out, recorded, read)
        verdicts = []
        for cut in found:
            if thorough:
                verdict, fits = run.judge(cut, _sub_batches(cut.n), _uncut_hint(args, kwargs, rows), where)
            else:
                batches, fallback = _later_sub_batches(cut.n)
                verdict, fits = run.judge(cut, batches, "", where)
                if verdict is None and fallback:
                    verdict, fits = run.judge(cut, fallback, "", where)
            if verdict is None:
                return None
            if verdict[0] <= tol:
                return Split(cut, fits, verdicts[0][0] if verdicts else None)
            verdicts.append((cut, verdict))
        cut, (gap, leaf, per_example, index) = verdicts[0]
        if gap != gap:  # NaN: the outputs themselves are not numbers, which is no evidence of mixing
            raise NonFiniteError(
                f"the model's output tensor {leaf} on {where} holds NaN although the data is finite (a log or square "
                "root of a negative number, 0/0 in the forward); the Hessian is undefined there: fix the forward")
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
        f"loss's Hessian{_uncut_hint(args, kwargs, rows)}{shared}{layout}{_subclass_hint(batchnorms)}")


def example_layout(forward: Callable[[tuple, dict], object], args: tuple, kwargs: dict, rows: int, out,
                   seq_first: bool = False) -> Split | None:
    """Where the examples are in the inputs and in each output leaf, without judging the split: the first cut's
    first sub-batch, for data that is one chunk (whose split does not matter, but whose loss is still cut in
    halves). None when nothing shows it."""
    found = cuts((args, kwargs), rows, seq_first)
    spread = _spread(found[0].n) if found else torch.zeros(0)
    if not len(spread):
        return None
    index = _with_copies(spread)
    try:
        with torch.enable_grad():
            part = forward(*sub_inputs((args, kwargs), found[0], index))
    except FORWARD_ERRORS:
        return None
    return Split(found[0], output_fits(out, part, found[0].n, len(index), found[0].inner))


def _with_copies(spread: torch.Tensor) -> torch.Tensor:
    """The first sub-batch: the k spread examples followed by max(3k, COPIES) copies of the first (its size is never
    the chunk's, so the output leaves' example dimensions are found on it)."""
    return torch.cat([spread, spread[:1].repeat(max(3 * len(spread), COPIES))])


def _to_size(spread: torch.Tensor, n: int) -> torch.Tensor:
    """The spread examples followed by copies of the first up to the chunk's size n (a forward that takes only some
    batch sizes takes the chunk's)."""
    return torch.cat([spread, spread[:1].repeat(n - len(spread))])


def _spread(n: int) -> torch.Tensor:
    """k = min(n // 2, SUBSET) examples (even when k > 1, for models that pair up their examples), every
    ⌊n/k⌋-th."""
    k = min(n // 2, SUBSET)
    k -= k % 2 if k > 1 else 0
    return torch.arange(0, n, n // k)[:k] if k else torch.zeros(0, dtype=torch.long)


def _sub_batches(n: int) -> list[torch.Tensor]:
    """The sub-batches that judge the first chunk (n examples, k of them spread): the k followed by max(3k, COPIES)
    copies of the first (copies overflow a capacity); the same followed by copies up to n (a forward that takes
    only some batch sizes, or mixes only at some, takes the chunk's); the other n − k examples followed by k copies
    of the first of them (a batch statistic that the spread examples hold, a maximum or a mode, is missing there);
    and each spread example alone (a statistic that ties across those batches, such as the longest length in a
    batch trimmed to it, is the example's own). Empty when n < 2."""
    spread = _spread(n)
    k = len(spread)
    if k < 1:
        return []
    rest = torch.ones(n, dtype=torch.bool)
    rest[spread] = False
    rest = rest.nonzero().squeeze(1)
    return [_with_copies(spread), _to_size(spread, n), torch.cat([rest, rest[:1].repeat(k)]), *spread.split(1)]


def _later_sub_batches(n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The sub-batches that judge every later chunk of the first pass, and the fallback run when none of them runs.
    The k spread examples followed by max(3k, COPIES) copies of the first (the first of :func:`_sub_batches`); k
    examples between them, which leave out both ends of the chunk (sorted data holds a batch maximum or the longest
    length there); and the last of those alone (a statistic that ties across the chunk's examples is its own):
    forwards of k + max(3k, 64), k and 1 rows beside the chunk's own. The fallback, for a forward that takes only
    some batch sizes: the spread followed by copies up to n. Mixing set off by what a later chunk holds (a mode,
    examples grouped by an id, a maximum) shows in those rows."""
    spread = _spread(n)
    if not len(spread):
        return [], []
    between = torch.clamp(spread + max(n // len(spread) // 2, 1), max=n - 1).unique()
    return [_with_copies(spread), between, between[-1:]], [_to_size(spread, n)]


#: what a forward raises on a batch it does not take (a size it cannot view, rows that are not examples)
FORWARD_ERRORS = (RuntimeError, ValueError, IndexError, TypeError, KeyError, AttributeError, AssertionError,
                  ArithmeticError)


class _SubBatches:
    """Sub-batches of one chunk run through the forward and compared row by row with the chunk's ``out``."""

    def __init__(self, forward: Callable[[tuple, dict], object], inputs: tuple, out, recorded: Statistics,
                 read: Collection[int] | None) -> None:
        self.forward, self.inputs, self.out, self.recorded, self.read = forward, inputs, out, recorded, read

    def _run(self, cut: Cut, index: torch.Tensor):
        """The forward of the examples ``index`` (raises what the forward raises)."""
        with _replayed(self.recorded):
            return self.forward(*sub_inputs(self.inputs, cut, index))

    def judge(self, cut: Cut, batches: list[torch.Tensor], hint: str,
              where: str) -> tuple[tuple[float, int, bool, torch.Tensor] | None, Fits | str | None]:
        """The worst (gap, output leaf, per example, index) over the sub-batches ``batches`` (example indices) of the
        chunk run alone, and the output leaves' fits, found on the first sub-batch, whose size is not the chunk's.
        A worst of None: nothing to judge; when none runs, a failure with flat indices passed whole (``hint``) is
        refused, since it most likely comes from cutting their offsets."""
        if not batches:
            return None, None
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


def _subclass_hint(batchnorms: Sequence[nn.Module]) -> str:
    """For a BatchNorm subclass with a forward of its own: the sub-batch replays only PyTorch's normalization, so
    the rest of that forward is missing from it, and the opt-in that gives its ghost-batch Hessian."""
    own = [type(m).__name__ for m in batchnorms if type(m).forward is not nn.modules.batchnorm._BatchNorm.forward]
    if not own:
        return ""
    return (f". The model has a BatchNorm subclass with a forward of its own ({own[0]}): the check replays only "
            "PyTorch's normalization with the chunk's statistics, not the rest of that forward, so it may be the "
            "cause; if that forward only adds per-example operations, its ghost-batch Hessian is "
            "batch=fasthess.BatchSpec(batch_loss=True) with chunks equal to the training batches")


def _uncut_hint(args: tuple, kwargs: dict, rows: int) -> str:
    """For inputs the sub-batch passed whole (1-D integer tensors with no example dimension: flat indices with
    offsets), the opt-in that fits a model that is per-example after all."""
    uncut = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() == 1
             and not t.is_floating_point() and row_dim(t, rows) is None]
    if not uncut:
        return ""
    return (f". An input of {uncut[0].numel()} integers has no example dimension, so the sub-batch passed it whole; "
            "if these are flat indices addressed by per-example offsets and the model is per-example, either give "
            "each example a row (indices padded to (N, L)) or pass batch=fasthess.BatchSpec(batch_loss=True), which "
            "takes each chunk's loss as given (exact for a per-example model)")
