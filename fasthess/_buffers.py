"""A data pass leaves the model's buffers as it found them.

Every normalization module's running statistics (any ``_NormBase``: BatchNorm, InstanceNorm with
``track_running_stats=True``, ...: running_mean, running_var, num_batches_tracked) are saved before each pass and
written back after it. Any other buffer the forward writes in place is found on the first pass (its version counter
or its value changed) and is saved and restored from then on. Restoring is a device copy, no host sync. A buffer
the forward reassigns (``self.ema = 0.9 * self.ema + ...``) replaces the tensor in its module's slot; every slot is
put back to the tensor it held before the pass (a pointer comparison per buffer), unless the new tensor has
another shape or dtype: a cache grown to the data's length (a rotary-embedding table), whose length the module
keeps in a Python attribute that fasthess cannot put back; it is left as the forward made it.

A buffer that the forward writes and also reads (spectral_norm's power-iteration vectors in train mode: each
forward takes one power step) makes the forward not a fixed function of θ (unless a second forward leaves it
alone: a cache filled once); it is refused on the first chunk
(:func:`refuse_stateful_forward`) before the split check could misread it as a forward that mixes the examples.
The running statistics of PyTorch's own normalization forwards are exempt (in train mode they are written, never
read); a subclass with its own forward is not: Batch Renormalization reads them in train mode, and each chunk's
forward would see the statistics the previous chunk wrote.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from fasthess._examples import worst_row_gap
from fasthess.errors import StatefulModelError

__all__ = ["KeptBuffers", "buffer_slots", "buffer_versions", "refuse_stateful_forward", "written_buffers"]

_NormBase = nn.modules.batchnorm._NormBase
#: normalization forwards known to read their running statistics only in eval mode
_STOCK_NORM_FORWARDS = {nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward,
                        nn.modules.instancenorm._InstanceNorm.forward}


def _stock_norm_buffers(model: nn.Module) -> set[int]:
    """The ids of the running statistics of every normalization module that runs PyTorch's own forward."""
    return {id(b) for m in model.modules()
            if isinstance(m, _NormBase) and type(m).forward in _STOCK_NORM_FORWARDS for b in m.buffers(recurse=False)}


class KeptBuffers:
    """The buffers of ``model`` that a pass must not change (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._norms = [b for m in model.modules() if isinstance(m, _NormBase) for b in m.buffers(recurse=False)]
        self._written: list[torch.Tensor] | None = None  # other buffers a forward writes; None before a first pass

    @contextlib.contextmanager
    def kept(self) -> Iterator[None]:
        """Around one pass: restore the watched buffers after it (on the first pass, watch every buffer), and put
        every reassigned buffer slot back."""
        first = self._written is None
        norm_ids = {id(b) for b in self._norms}
        watched = list(self._model.buffers()) if first else self._norms + self._written
        saved = [(b, b.detach().clone(), b._version) for b in watched]
        slots = buffer_slots(self._model)
        try:
            yield
        finally:
            for (module, name), b in slots.items():
                now = module._buffers.get(name)
                if now is not b and (b is None or now is None or (now.shape, now.dtype) == (b.shape, b.dtype)):
                    module._buffers[name] = b
            changed = [(b, copy) for b, copy, version in saved
                       if b._version != version or (first and not torch.equal(b, copy))]
            with torch.no_grad():
                for b, copy in (changed if first else [(b, copy) for b, copy, _ in saved]):
                    b.copy_(copy)
            if first:
                self._written = [b for b, _ in changed if id(b) not in norm_ids]


def buffer_slots(model: nn.Module) -> dict[tuple[nn.Module, str], torch.Tensor | None]:
    """Every buffer slot of ``model`` (module, name) with the tensor it holds."""
    return {(m, name): b for m in model.modules() for name, b in m._buffers.items()}


def buffer_versions(model: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """Each buffer of ``model`` by name with its version counter (bumped by every in-place write), the running
    statistics of PyTorch's own normalization forwards left out (kept by :class:`KeptBuffers` and replayed by the
    split check)."""
    norms = _stock_norm_buffers(model)
    return {n: (b, b._version) for n, b in model.named_buffers() if id(b) not in norms}


def written_buffers(model: nn.Module, versions: dict[str, tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    """The buffers of ``versions`` (taken before a forward) that it wrote in place or reassigned, by name, as they
    are now."""
    now = dict(model.named_buffers())
    return {n: now[n] for n, (b, version) in versions.items()
            if n in now and (now[n] is not b or b._version != version)}


def _nudged(b: torch.Tensor) -> torch.Tensor:
    """A copy of a buffer with every entry moved: by 0.1 (|b| + 1) if floating (not less: a power iteration's
    σ = uᵀWv is stationary in u and v, so a small move shows only at second order), by 1 if an integer, flipped if
    boolean."""
    if b.is_floating_point() or b.is_complex():
        return b.detach() + 0.1 * (b.detach().abs() + 1)
    return ~b if b.dtype == torch.bool else b + 1


def refuse_stateful_forward(written: dict[str, torch.Tensor], run: Callable[[dict], object], out, rows: int) -> None:
    """Refuse a forward that wrote the buffers ``written`` (:func:`written_buffers`) and reads one: its output ``out``
    on a chunk of ``rows`` examples changes when ``run(buffers)`` runs it again with the written buffers nudged
    (:func:`_nudged` copies), o = f(x; θ, u) with u moved by each forward. Whether u is read does not depend on how
    far it has converged (a converged power iteration rewrites u unchanged), so neither does the refusal; a buffer
    written and never read (a counter) leaves the output bitwise the same. One more forward, only when a buffer was
    written."""
    if not written:
        return
    worst = worst_row_gap(out, run({n: _nudged(b) for n, b in written.items()}), rows, torch.arange(rows))
    if worst is None or worst[0] == 0:
        return
    cause = ("A normalization module with its own train-mode forward that reads the running statistics it updates "
             "does this (Batch Renormalization: each chunk would see the statistics the previous one wrote): call "
             "model.eval(), or give the module a switch that stops the update during the curvature"
             if any(n.rsplit(".", 1)[-1].startswith("running_") for n in written) else
             "PyTorch's spectral_norm in train mode does this (each forward takes a power step on its vectors u, "
             "v): call model.eval() (torch.nn.utils.parametrizations.spectral_norm then keeps u and v fixed), or "
             "stop the forward from updating buffers it reads")
    raise StatefulModelError(
        f"the model's forward writes the buffer(s) {sorted(written)[:3]} and its output depends on them, so "
        f"it is not a fixed function of the parameters and has no fixed Hessian. {cause}")
