"""What the training-framework callbacks share: a tracker, when it is due, and the learning rate to record."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from fasthess.errors import FasthessError
from fasthess.records import SharpnessRecord
from fasthess.track import SharpnessTracker


class TrackingSchedule:
    """A :class:`fasthess.SharpnessTracker` updated every ``every_n_steps`` optimizer steps (step 0, before
    training, included) or at the end of every ``every_n_epochs``-th epoch; each record goes to ``sinks``.

    With ``budget`` (a fraction of the wall time, :class:`fasthess.SharpnessTracker`), steps are considered every
    ``every_n_steps`` (default every step) and taken while the tracker stays within the budget."""

    def __init__(self, loss_fn: Callable, data: Any, every_n_steps: int | None, every_n_epochs: int | None,
                 sinks: Sequence[Callable[[SharpnessRecord], None]], tracker_kwargs: dict[str, Any],
                 budget: float | None = None) -> None:
        if budget is not None:
            if every_n_epochs is not None:
                raise FasthessError("budget= chooses among optimizer steps; pass it with every_n_steps (or alone, "
                                    "for every step), not with every_n_epochs")
            every_n_steps = 1 if every_n_steps is None else every_n_steps
        if (every_n_steps is None) == (every_n_epochs is None):
            raise FasthessError("pass exactly one of every_n_steps and every_n_epochs (how often to compute λ_max), "
                                "or budget=")
        every = every_n_steps if every_n_epochs is None else every_n_epochs
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise FasthessError(f"every_n_steps / every_n_epochs must be a positive int, got {every!r}")
        self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs
        self.tracker = SharpnessTracker(loss_fn, data, loggers=list(sinks), budget=budget, **tracker_kwargs)
        self._last_step: int | None = None

    def step_due(self, step: int) -> bool:
        """True once per optimizer step ``step`` that is a multiple of ``every_n_steps`` (gradient accumulation
        calls the batch hooks several times per step)."""
        return (self.every_n_steps is not None and step % self.every_n_steps == 0 and step != self._last_step
                and self.tracker.should_update(step))

    def epoch_due(self, epochs_done: int) -> bool:
        return self.every_n_epochs is not None and epochs_done % self.every_n_epochs == 0

    def update(self, model: torch.nn.Module, step: int, optimizer: Any = None, **extra: Any) -> SharpnessRecord:
        """λ_max now; the record carries ``step``, the optimizer's learning rate and stability
        threshold, and ``extra``."""
        self._last_step = step
        return self.tracker.update(model, step=step, optimizer=optimizer, **extra)
