"""Constructs whose curvature PyTorch cannot give, refused by name before any product.

* ``ctc_loss``: its backward has no derivative (``aten::_ctc_loss_backward``), in reverse or forward mode, and
  likewise the margin losses; found in the loss's own autograd graph on the first chunk.
* ``torch.utils.checkpoint(..., use_reentrant=True)``: its backward runs an inner, non-differentiable backward,
  and parameters inside the checkpointed region are not differentiated at all when its inputs do not require grad,
  so second derivatives through it are silently wrong (not an error). Found by watching its autograd Function
  while the first chunk's forward runs. ``use_reentrant=False`` is exact for the Hessian.
* ops whose backward PyTorch cannot differentiate (``embedding_bag``, ``cdist``, ...): PyTorch's raw
  ``NotImplementedError`` at the first product is replaced by one that names the op and the fix.
* saved-tensor hooks (``use_reentrant=False`` checkpointing, activation offloading) and in-place writes to buffers
  under ``torch.func``, which the GGN operator's products use: PyTorch's raw error is replaced by one that names the
  fix.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch.utils import checkpoint as _checkpoint

from fasthess.errors import FasthessError, LossContractError, UnsupportedModelError

__all__ = ["CTC_FIX", "ONE_VALUE_PER_CHANNEL", "refuse_reentrant_checkpoint", "refuse_without_second_derivative", "translated_errors"]

# autograd nodes whose backward PyTorch cannot differentiate again (nor has a forward-mode rule for)
_NO_SECOND_DERIVATIVE_NODES = {"CtcLossBackward": "ctc_loss", "MultiMarginLossBackward": "multi_margin_loss",
                               "MultilabelMarginLossBackward": "multilabel_margin_loss"}
CTC_FIX = ("PyTorch has no second derivative for ctc_loss (derivative for aten::_ctc_loss_backward is not "
           "implemented, in reverse or forward mode), so neither its Hessian nor its Gauss-Newton matrix can be "
           "formed, wrapped or not. Compute the curvature of a loss PyTorch can differentiate twice instead, e.g. a "
           "framewise cross-entropy against fixed alignments (nn.CrossEntropyLoss on the per-frame outputs)")


def refuse_without_second_derivative(value) -> None:
    """Refuse a loss whose graph (from the model's output to ``value``) holds an op without a second derivative."""
    seen, stack = set(), [value.grad_fn] if isinstance(value, torch.Tensor) else []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        op = next((o for name, o in _NO_SECOND_DERIVATIVE_NODES.items() if type(node).__name__.startswith(name)),
                  None)
        if op == "ctc_loss":
            raise LossContractError(f"the loss calls ctc_loss: {CTC_FIX}")
        if op is not None:
            raise LossContractError(f"the loss calls {op}, which has no second derivative in PyTorch (its backward "
                                    "is not differentiable); write it with elementary ops (e.g. torch.clamp of the "
                                    "margins)")
        stack.extend(next_fn for next_fn, _ in node.next_functions)


@contextlib.contextmanager
def refuse_reentrant_checkpoint() -> Iterator[None]:
    """Around a forward: refuse it if it called ``torch.utils.checkpoint`` with ``use_reentrant=True``."""
    function = _checkpoint.CheckpointFunction
    own = "apply" in function.__dict__
    original, calls = function.apply, []

    def watched(*args):
        calls.append(True)
        return original(*args)

    function.apply = watched
    try:
        yield
    finally:
        if own:
            function.apply = original
        else:
            del function.apply
    if calls:
        raise UnsupportedModelError(
            "the model's forward uses torch.utils.checkpoint with use_reentrant=True, whose second derivatives are "
            "silently wrong (its backward is not differentiable, and parameters inside the checkpointed region are "
            "not differentiated when its inputs do not require grad). Pass use_reentrant=False to checkpoint (exact "
            "Hessians; Hugging Face: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
            "{'use_reentrant': False})), or turn checkpointing off for the curvature")


#: why a BatchNorm in train mode cannot take a chunk of one value per channel, and the fix
ONE_VALUE_PER_CHANNEL = ("the model has BatchNorm with batch statistics, which are undefined for one value per channel; "
                         "choose a batch_size that leaves no remainder of 1, or call model.eval()")


@contextlib.contextmanager
def translated_errors() -> Iterator[None]:
    """Around a chunk's products: PyTorch's raw errors for known unsupported constructs, named with their fix."""
    try:
        yield
    except NotImplementedError as exc:
        missing = re.search(r"derivative for '?(?:aten::)?(\w+)'? is not implemented", str(exc))
        if missing is not None:
            raise UnsupportedModelError(
                f"an operation of the forward has no second derivative in PyTorch (the derivative for "
                f"{missing.group(1)} is not implemented), so no Hessian product can pass through it. Replace it with "
                "ops PyTorch differentiates twice (nn.EmbeddingBag: nn.Embedding and a mean or sum over the bag; "
                "torch.cdist: ((a[:, None] - b[None]) ** 2).sum(-1).sqrt()), or restrict the curvature to parameters "
                "whose products do not pass through it with params=[...]") from exc
        if "forward AD" not in str(exc):
            raise
        fused = "_transformer_encoder_layer_fwd" in str(exc) or "_native_multi_head_attention" in str(exc)
        raise UnsupportedModelError(
            f"an operation of the forward has no forward-mode derivative in PyTorch ({exc}), which the Gauss-Newton "
            "products and forward-over-reverse Hessian products need; "
            + ("it is the fused fast path of an eval-mode nn.TransformerEncoderLayer / nn.MultiheadAttention: turn "
               "it off with torch.backends.mha.set_fastpath_enabled(False), or " if fused else "")
            + "use the Hessian with double-backward products (HessianOperator(..., hvp='double-backward'))") from exc
    except ValueError as exc:
        if "Expected more than 1 value per channel when training" not in str(exc):
            raise
        raise FasthessError(f"a chunk gives a BatchNorm one value per channel and {ONE_VALUE_PER_CHANNEL}") from exc
    except RuntimeError as exc:
        if "saved tensor hooks" in str(exc):
            raise UnsupportedModelError(
                "the forward uses saved-tensor hooks (torch.utils.checkpoint with use_reentrant=False, or activation "
                "offloading), which the torch.func transforms of the Gauss-Newton products do not support; use "
                "curvature='hessian' / HessianOperator (exact with use_reentrant=False checkpointing), or turn "
                "checkpointing off for the curvature") from exc
        if "mutate a captured Tensor" in str(exc):
            raise UnsupportedModelError(
                "the forward writes a tensor it does not take as input in place (a buffer such as a counter, or a "
                "cache), which the torch.func transforms of the Gauss-Newton products do not allow; use "
                "curvature='hessian' / HessianOperator (the buffer is restored after each pass), or make the write "
                "depend on model.training and call model.eval()") from exc
        raise
