"""The model-mode rules of a curvature operator: BatchNorm with batch statistics, dropout, random draws.

* BatchNorm that normalizes with batch statistics (train mode, or no running statistics) makes each chunk a ghost
  batch; during a pass its running statistics are not updated (and :mod:`fasthess._buffers` restores every buffer).
* Train-mode dropout, or any random draw in a chunk's products, makes the operator random: refused unless
  ``allow_stochastic``.
* Products run under the math SDPA kernel, the only one with double and forward-mode derivatives on every device.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fasthess._contract import GeneratorWatch, random_draws
from fasthess.errors import StochasticModelError

__all__ = ["ModeRules"]

_BatchNorm = nn.modules.batchnorm._BatchNorm
_Dropout = nn.modules.dropout._DropoutNd


class ModeRules:
    """The mode rules for ``model`` (module docstring)."""

    def __init__(self, model: nn.Module, allow_stochastic: bool, device: torch.device) -> None:
        self.model, self.allow_stochastic, self.device = model, allow_stochastic, device
        self._batchnorms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
        self._dropouts = [m for m in model.modules() if isinstance(m, _Dropout)]

    def batch_statistics_modules(self) -> list[nn.Module]:
        """The BatchNorm modules that normalize with the chunk's own statistics (train mode, or no running
        statistics)."""
        return [m for m in self._batchnorms if m.training or m.running_mean is None]

    def batch_statistics(self) -> bool:
        """Does some BatchNorm normalize with the chunk's own statistics?"""
        return bool(self.batch_statistics_modules())

    def check(self) -> None:
        """Refuse train-mode dropout unless ``allow_stochastic``."""
        active = [m for m in self._dropouts if m.training and m.p > 0]
        if active and not self.allow_stochastic:
            raise StochasticModelError(
                f"the model has {len(active)} dropout layer(s) in train mode, so every product would use a new random "
                "mask and the Hessian is not a fixed matrix. Call model.eval() (dropout off), or pass "
                "allow_stochastic=True to accept a random operator (each chunk then shares one mask across the block)")

    @contextlib.contextmanager
    def frozen_batchnorm(self) -> Iterator[None]:
        """Train-mode BN uses per-chunk statistics and must not touch its running statistics."""
        saved = [(m, m.track_running_stats) for m in self._batchnorms if m.training]
        for m, _ in saved:
            m.track_running_stats = False
        try:
            yield
        finally:
            for m, flag in saved:
                m.track_running_stats = flag

    @contextlib.contextmanager
    def product_scope(self, index: int) -> Iterator[None]:
        """Around chunk ``index``'s products: the math SDPA kernel and, unless ``allow_stochastic``, a check that
        no default generator advanced."""
        watch = None if self.allow_stochastic else GeneratorWatch(self.device)
        with sdpa_kernel(SDPBackend.MATH):
            yield
        if watch is not None and watch.advanced():
            raise StochasticModelError(random_draws(f"the model's forward drew random numbers on chunk {index}",
                                                    self.model.training))
