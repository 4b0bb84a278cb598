"""A loss as chunk sums and normalizers: L(θ) = (1/W) Σ_c S_c(θ), the user's loss on the whole data as one batch.

For a per-example loss ℓᵢ with weights wᵢ, S_c = Σ_{i∈c} wᵢ ℓᵢ and W = Σ_c W_c, where W_c is what the loss
divides by on chunk c (W = 1 for a sum). Two kinds of loss are accepted:

* :class:`Criterion`, a ``torch.nn`` criterion (or its functional form, e.g. ``F.cross_entropy``). Its
  ``reduction``, ``weight``, ``ignore_index`` and ``pos_weight`` are read: S_c is the criterion with
  ``reduction="sum"`` (or the weighted sum of its ``reduction="none"`` elements), W_c its normalizer: the number
  of elements for a mean, Σ weight[yᵢ] over the non-ignored targets for CrossEntropy/NLL, the number of examples
  for KLDiv's ``"batchmean"``; ``reduction="none"`` means the average of the elements. On the first chunk the
  rule is checked against the criterion itself.
* :class:`LossCallable`, any ``loss(output, target)``. On the first chunk of two or more examples, the loss of
  the chunk is compared with its halves (in float64): a scalar that is the count-weighted mean of its halves'
  (``S_c = count·loss``, ``W_c = count``) or their sum (``S_c = loss``, W = 1), or per-example losses of shape
  ``(rows,)`` that are the halves' concatenated (averaged with the example weights). Anything else depends on
  the batch and is refused.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils import _pytree as pytree

from fasthess._batch import Batch
from fasthess._unsupported import CTC_FIX
from fasthess.errors import FasthessError, LossContractError

__all__ = ["Criterion", "LossCallable", "contract_of"]

# element shape of the reduction="none" output, per criterion: "target" (the target's), "rows" (one per example)
_ELEMENTWISE = (nn.L1Loss, nn.MSELoss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCELoss, nn.BCEWithLogitsLoss,
                nn.SoftMarginLoss, nn.PoissonNLLLoss, nn.HingeEmbeddingLoss, nn.KLDivLoss)
_PER_ROW = (nn.MultiLabelSoftMarginLoss,)
_NO_SECOND_DERIVATIVE = (nn.MultiMarginLoss, nn.MultiLabelMarginLoss)  # PyTorch has no double backward for them
_CLASS_INDEXED = (nn.CrossEntropyLoss, nn.NLLLoss)
_REFUSED = (nn.GaussianNLLLoss, nn.CosineEmbeddingLoss, nn.MarginRankingLoss, nn.TripletMarginLoss,
            nn.TripletMarginWithDistanceLoss)
_FUNCTIONAL = {F.cross_entropy: nn.CrossEntropyLoss, F.nll_loss: nn.NLLLoss, F.mse_loss: nn.MSELoss,
               F.l1_loss: nn.L1Loss, F.smooth_l1_loss: nn.SmoothL1Loss, F.huber_loss: nn.HuberLoss,
               F.binary_cross_entropy: nn.BCELoss, F.binary_cross_entropy_with_logits: nn.BCEWithLogitsLoss,
               F.kl_div: nn.KLDivLoss}


def _rtol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-4


def _close(a: float, b: float, rtol: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= rtol * max(abs(a), abs(b), 1e-30)


def _rows_weight(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-example weights broadcast along the trailing dimensions of ``like``."""
    return w.reshape(w.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


class Criterion:
    """A ``torch.nn`` criterion as chunk sums and normalizers (see the module docstring)."""

    kind = "criterion"

    def __init__(self, loss: nn.Module) -> None:
        self.loss, self.name = loss, type(loss).__name__
        self.reduction = loss.reduction
        if self.reduction not in ("mean", "sum", "none", "batchmean"):
            raise LossContractError(f"{self.name}(reduction={self.reduction!r}) is not supported; use 'mean', "
                                    "'sum' or 'none'")
        self._sum = copy.copy(loss)
        self._sum.reduction = "sum"
        self._none = copy.copy(loss)
        self._none.reduction = "none"

    @property
    def sums(self) -> bool:
        """W = 1: the loss is a sum over the data."""
        return self.reduction == "sum"

    def _elements(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self._none(out, batch.target)

    def chunk_sum(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        """S_c: Σ of the (example-weighted) per-element losses of the chunk."""
        if batch.weight is None and self.reduction != "none":
            return self._sum(out, batch.target)
        E = self._elements(out, batch)
        return E.sum() if batch.weight is None else (E * _rows_weight(batch.weight, E)).sum()

    def _denominators(self, batch: Batch) -> torch.Tensor:
        """Per-element denominators of the mean, shaped like the reduction="none" output (ones for "none": the
        plain average of the elements)."""
        y = batch.target
        indexed = isinstance(self.loss, _CLASS_INDEXED) and not y.is_floating_point()
        if indexed and self.reduction != "none":
            kept = y != self.loss.ignore_index
            if self.loss.weight is None:
                return kept.to(torch.float64)
            return torch.where(kept, self.loss.weight.to(torch.float64)[y.clamp(0, self.loss.weight.numel() - 1)], 0.0)
        if isinstance(self.loss, nn.CrossEntropyLoss) and not indexed:  # class probabilities: no class dimension
            shape = y.shape[:1] + y.shape[2:]
        else:
            shape = y.shape[:1] if isinstance(self.loss, _PER_ROW) else y.shape
        per_element = 1.0 / max(1, y[0].numel()) if self.reduction == "batchmean" else 1.0
        return torch.full(shape, per_element, dtype=torch.float64, device=y.device)

    def normalizer(self, batch: Batch) -> torch.Tensor | None:
        """W_c as a float64 0-dim tensor on the target's device, or None for a sum."""
        if self.sums:
            return None
        D = self._denominators(batch)
        return (D if batch.weight is None else D * _rows_weight(batch.weight, D).double()).sum()

    def check_shapes(self, out, target) -> None:
        """Refuse an output and target whose shapes the criterion would broadcast or misread (before calling it)."""
        if not (isinstance(out, torch.Tensor) and isinstance(target, torch.Tensor)) or out.dim() < 1:
            return
        indexed = isinstance(self.loss, _CLASS_INDEXED) and not target.is_floating_point()
        expected = out.shape[:1] + out.shape[2:] if indexed else out.shape
        if indexed and target.shape == expected and target.dtype not in (torch.long, torch.uint8):
            raise LossContractError(f"{self.name} got class indices of dtype {target.dtype}; PyTorch takes int64 "
                                    "(or uint8) class indices: pass y.long()")
        if target.shape == expected:
            return
        if isinstance(self.loss, _CLASS_INDEXED) and target.shape == out.shape[:1] + out.shape[2:]:
            raise LossContractError(f"{self.name} got floating targets of shape {tuple(target.shape)}, one per "
                                    f"example: class indices stored as {target.dtype}; pass y.long() (floating "
                                    "targets of the output's shape are read as class probabilities)")
        if indexed:
            if target.shape == expected + (1,) or target.shape[1:2] == (1,):
                fix = f"class indices need shape {tuple(expected)} (one index per example); pass y.squeeze(1)"
            elif out.dim() >= 3 and target.shape == out.shape[:-1]:
                fix = (f"the classes are the last dimension of the output, but {self.name} reads them from "
                       "dimension 1 (outputs (N, C, L...), targets (N, L...)); pass loss_fn=lambda out, y: "
                       "crit(out.movedim(-1, 1), y) with crit your criterion, or return the output as (N, C, L)")
            else:
                fix = f"pass class indices of shape {tuple(expected)}"
            raise LossContractError(f"{self.name} got class-index targets of shape {tuple(target.shape)} for outputs "
                                    f"of shape {tuple(out.shape)}: {fix}")
        try:
            joint = f", which broadcast to {tuple(torch.broadcast_shapes(out.shape, target.shape))}"
        except RuntimeError:
            joint = ""
        raise LossContractError(
            f"{self.name} got outputs of shape {tuple(out.shape)} and targets of shape {tuple(target.shape)}{joint}; "
            "the targets must have the output's shape, e.g. y.view_as(out) (y.unsqueeze(1) for a (N,) target and "
            "(N, 1) outputs) or out.squeeze(1) in the model")

    def check(self, value_of: Callable, out, batch: Batch, halves) -> None:
        """The chunk sum and normalizer reproduce the criterion itself on this chunk (``value_of(out, batch)``)."""
        plain = Batch(batch.args, batch.kwargs, batch.target, None, batch.count, batch.rows)
        value = value_of(out, plain)
        if self.reduction == "none":
            if value.shape[:1] != (batch.rows,):
                raise LossContractError(f"{self.name}(reduction='none') returned shape {tuple(value.shape)}, not one "
                                        f"or more losses per example ({batch.rows} rows); check the target's shape")
            return
        got = float(self.chunk_sum(out, plain))
        den = self.normalizer(plain)
        if den is not None:
            if float(den) == 0.0:
                return  # every target ignored: the criterion's own mean is NaN; this chunk contributes 0
            got /= float(den)
        if not _close(got, float(value), _rtol(out.dtype)):
            raise LossContractError(
                f"{self.name} with these options ({self.reduction!r}, target shape {tuple(batch.target.shape)}, "
                f"output shape {tuple(out.shape)}) is not a mean or sum of its elements that fasthess can split "
                f"into chunks ({got} vs {float(value)}); pass targets of the output's shape, or a loss callable "
                "returning per-example losses of shape (rows,)")


class LossCallable:
    """Any ``loss(output, target)``, checked once to be a mean, a sum or per-example losses (module docstring)."""

    kind = "callable"

    def __init__(self, loss: Callable, batch_loss: bool = False) -> None:
        self.loss, self.name = loss, getattr(loss, "__name__", type(loss).__name__)
        #: "mean", "sum" or "elements", set by check; "mean" from the start for a declared per-batch loss
        self.mode: str | None = "mean" if batch_loss else None

    @property
    def sums(self) -> bool:
        return self.mode == "sum"

    def chunk_sum(self, out, batch: Batch) -> torch.Tensor:
        value = self.loss(out, batch.target)
        if self.mode == "mean":
            return value * batch.count
        if self.mode == "elements":
            if value.shape != (batch.rows,):
                raise LossContractError(f"the loss returned shape {tuple(value.shape)} on a chunk of {batch.rows} "
                                        "examples; a per-example loss must return shape (rows,) on every chunk")
            return value.sum() if batch.weight is None else (value * batch.weight.to(value.dtype)).sum()
        return value

    def normalizer(self, batch: Batch) -> torch.Tensor | None:
        if self.mode == "sum":
            return None
        if self.mode == "elements" and batch.weight is not None:
            return batch.weight.double().sum()
        n = batch.count if self.mode == "mean" else batch.rows
        return n.double() if isinstance(n, torch.Tensor) else torch.tensor(float(n), dtype=torch.float64)

    def check(self, value_of: Callable, out, batch: Batch, halves) -> None:
        """Decide the mode on a chunk and its two halves ``halves = ((out1, batch1), (out2, batch2))``."""
        v = value_of(out, batch)
        try:
            v1, v2 = (value_of(o, b) for o, b in halves)
        except (RuntimeError, ValueError, IndexError) as exc:
            opaque = [type(t).__name__ for t in pytree.tree_leaves(out) if dataclasses.is_dataclass(t)]
            if opaque:
                raise LossContractError(
                    f"the model returns a {opaque[0]} dataclass, which fasthess cannot open to cut its rows into the "
                    f"halves of the first chunk ({type(exc).__name__}: {str(exc)[:120]}); return a dict or a tuple, "
                    f"or register the class as a pytree: torch.utils._pytree.register_dataclass({opaque[0]}) (Hugging "
                    "Face's ModelOutput is one already)") from exc
            raise LossContractError(
                f"the loss failed on half of the first chunk ({type(exc).__name__}: {str(exc)[:160]}): cut at example "
                f"{batch.rows // 2} of {batch.rows}, the output and the targets no longer match, so the output's "
                "leading dimension is not the examples (e.g. logits flattened to (N·T, C) in the forward). Return "
                "the output with the examples first, (N, T, C), and flatten inside the loss") from exc
        fix = ("use a per-example loss (a mean or sum over the examples of a function of each example's output, or "
               "reduction='none'); or, if you mean the average over training batches of each batch's loss, pass "
               "batch=fasthess.BatchSpec(batch_loss=True) with chunks equal to the training batches "
               "(batch_size=<the training batch size>)")
        if not isinstance(v, torch.Tensor):
            raise LossContractError(f"the loss returned {type(v).__name__}, not a tensor; return a scalar tensor or "
                                    "per-example losses of shape (rows,)")
        rtol = _rtol(v.dtype)
        if v.dim() == 0:
            if batch.weight is not None:
                raise LossContractError("per-example weights were given but the loss returns one scalar per batch; "
                                        "return per-example losses (reduction='none') so that each can be weighted")
            n, n1, n2 = (float(b.count) for b in (batch, halves[0][1], halves[1][1]))
            parts = [float(vi) * ni for vi, ni in ((v1, n1), (v2, n2)) if ni != 0.0]
            if _close(float(v) * n, sum(parts), rtol) or (n == 0.0 and not parts):
                self.mode = "mean"
            elif _close(float(v), float(v1) + float(v2), rtol):
                self.mode = "sum"
            else:
                raise LossContractError(
                    f"the loss is neither the count-weighted mean nor the sum of the losses of its halves on a chunk "
                    f"of {batch.rows} examples ({float(v)} vs halves {float(v1)} and {float(v2)} with counts "
                    f"{n1:g} and {n2:g}): it depends on the batch (e.g. in-batch similarities, batch centring), or "
                    f"its normalizer is not the count (for a token mean pass batch=fasthess.BatchSpec(count=...); "
                    f"for a class-weighted or ignore_index criterion pass the torch.nn criterion itself, not wrapped, "
                    f"so that its normalizer is read). Fix: {fix}")
        elif v.shape == (batch.rows,):
            if not torch.allclose(torch.cat([v1, v2]), v, rtol=rtol, atol=1e-30):
                raise LossContractError(f"the per-example losses of a chunk differ from those of its halves: the loss "
                                        f"depends on the batch. Fix: {fix}")
            self.mode = "elements"
        else:
            raise LossContractError(f"the loss returned shape {tuple(v.shape)} on a chunk of {batch.rows} examples; "
                                    "return a scalar (a mean or sum over the batch) or per-example losses of shape "
                                    "(rows,)")


def contract_of(loss_fn: Callable, batch_loss: bool = False) -> Criterion | LossCallable:
    """The chunk-sum form of ``loss_fn``; refuses the ``torch.nn`` criteria that are not a loss of (output, target).

    ``batch_loss``: the loss is declared to be defined per batch (no decomposition check; chunks are weighted by
    their count)."""
    if not callable(loss_fn):
        raise FasthessError(f"loss_fn must be callable (e.g. nn.CrossEntropyLoss()), got {type(loss_fn).__name__}")
    if loss_fn is F.ctc_loss or isinstance(loss_fn, nn.CTCLoss):
        raise LossContractError(f"{getattr(loss_fn, '__name__', type(loss_fn).__name__)}: {CTC_FIX}")
    kind = _FUNCTIONAL.get(loss_fn)
    if batch_loss:
        return LossCallable(loss_fn, batch_loss=True)
    if kind is not None:
        return Criterion(kind())
    if type(loss_fn) in _REFUSED:
        raise LossContractError(
            f"{type(loss_fn).__name__} takes more than (output, target) or scores pairs of examples, so fasthess "
            "cannot split it into chunks; wrap it in a loss(output, target) callable that returns per-example losses "
            "(reduction='none'), e.g. by packing the extra inputs into the model's output or the target")
    if type(loss_fn) in _NO_SECOND_DERIVATIVE:
        raise LossContractError(
            f"{type(loss_fn).__name__} has no second derivative in PyTorch (its backward is not differentiable); "
            "write the margin loss with elementary ops in a loss(output, target) callable (e.g. torch.clamp of the "
            "margins), or use the GGN operator's loss with a differentiable criterion")
    known = next((k for k in (*_ELEMENTWISE, *_PER_ROW, *_CLASS_INDEXED)
                  if isinstance(loss_fn, k) and type(loss_fn).forward is k.forward), None)
    if known is not None:  # a known criterion, or a subclass that keeps its forward
        return Criterion(loss_fn)
    return LossCallable(loss_fn, batch_loss)
