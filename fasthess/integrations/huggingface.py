"""A Hugging Face ``TrainerCallback`` that tracks the certified λ_max during ``Trainer.train``."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from fasthess.integrations._records import record_scalars
from fasthess.integrations._schedule import TrackingSchedule
from fasthess.records import SharpnessRecord

__all__ = ["HFSharpnessCallback"]


class HFSharpnessCallback(TrainerCallback):
    """λ_max of the full training loss every ``every_n_steps`` optimizer steps or ``every_n_epochs`` epochs.

    Args:
        loss_fn: ``loss_fn(model(x), y)`` (or, for dict batches, ``loss_fn(model(**inputs), labels)``), the mean
            loss of a batch; for a model returning a ``ModelOutput``, e.g. ``lambda out, y:
            F.cross_entropy(out.logits, y)``.
        data: the data the Hessian is taken over (what :class:`fasthess.HessianOperator` accepts).
        every_n_steps, every_n_epochs: exactly one (or ``budget``);
            steps count ``state.global_step`` (step 0, before training,
            included), epochs are counted when they end.
        budget: compute only while the tracker's time stays within this fraction of the training's wall time
            (:class:`fasthess.SharpnessTracker`), considering every step (or every ``every_n_steps``-th).
        sinks: ``sink(record)`` callables, e.g. :class:`fasthess.integrations.TensorBoardSink` or
            :class:`fasthess.integrations.WandbSink`.
        prefix: metric name prefix.
        tracker_kwargs: passed to :class:`fasthess.SharpnessTracker` (``batch_size``, ``k``, ``tol``, ``mode``, ...).

    A ``TrainerCallback`` cannot reach the ``Trainer`` that calls it, so records go to ``sinks`` and, as scalars
    with their step, into ``state.log_history`` (saved in every checkpoint's ``trainer_state.json``); the full
    records are in ``callback.tracker.history``.
    """

    def __init__(self, loss_fn: Callable, data: Any, *, every_n_steps: int | None = None,
                 every_n_epochs: int | None = None, budget: float | None = None,
                 sinks: Sequence[Callable[[SharpnessRecord], None]] = (),
                 prefix: str = "sharpness/", **tracker_kwargs: Any) -> None:
        self.schedule = TrackingSchedule(loss_fn, data, every_n_steps, every_n_epochs, sinks, tracker_kwargs,
                                         budget)
        self.prefix = prefix

    @property
    def tracker(self):
        """The :class:`fasthess.SharpnessTracker` (its ``history`` holds every record)."""
        return self.schedule.tracker

    def _update(self, state: TrainerState, model: Any, optimizer: Any, **extra: Any) -> None:
        record = self.schedule.update(model, state.global_step, optimizer, **extra)
        state.log_history.append({**record_scalars(record, self.prefix), "step": state.global_step})

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if self.schedule.step_due(state.global_step):
            self._update(state, model, optimizer, epoch=0)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None,
                    optimizer: Any = None, **kwargs: Any) -> None:
        if self.schedule.step_due(state.global_step):
            self._update(state, model, optimizer, epoch=state.epoch)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None,
                     optimizer: Any = None, **kwargs: Any) -> None:
        epochs_done = round(state.epoch or 0)
        if self.schedule.epoch_due(epochs_done):
            self._update(state, model, optimizer, epoch=epochs_done)
