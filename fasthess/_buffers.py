"""A data pass leaves the model's buffers as it found them.

Every normalization module's running statistics (any ``_NormBase``: BatchNorm, InstanceNorm with
``track_running_stats=True``, ...: running_mean, running_var, num_batches_tracked) are saved before each pass and
written back after it. Any other buffer the forward writes in place is found on the first pass (its version counter
or its value changed) and is saved and restored from then on. Restoring is a device copy, no host sync.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["KeptBuffers"]

_NormBase = nn.modules.batchnorm._NormBase


class KeptBuffers:
    """The buffers of ``model`` that a pass must not change (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._norms = [b for m in model.modules() if isinstance(m, _NormBase) for b in m.buffers(recurse=False)]
        self._written: list[torch.Tensor] | None = None  # other buffers a forward writes; None before a first pass

    @contextlib.contextmanager
    def kept(self) -> Iterator[None]:
        """Around one pass: restore the watched buffers after it (on the first pass, watch every buffer)."""
        first = self._written is None
        norm_ids = {id(b) for b in self._norms}
        watched = list(self._model.buffers()) if first else self._norms + self._written
        saved = [(b, b.detach().clone(), b._version) for b in watched]
        try:
            yield
        finally:
            changed = [(b, copy) for b, copy, version in saved
                       if b._version != version or (first and not torch.equal(b, copy))]
            with torch.no_grad():
                for b, copy in (changed if first else [(b, copy) for b, copy, _ in saved]):
                    b.copy_(copy)
            if first:
                self._written = [b for b, _ in changed if id(b) not in norm_ids]
