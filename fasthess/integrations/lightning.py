"""A Lightning callback that tracks the certified λ_max during ``Trainer.fit`` and logs it through the trainer's loggers."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch

from fasthess.integrations._records import record_scalars
from fasthess.integrations._schedule import TrackingSchedule
from fasthess.records import SharpnessRecord

__all__ = ["LightningSharpnessCallback"]


class LightningSharpnessCallback(pl.Callback):
    """λ_max of the full training loss every ``every_n_steps`` optimizer steps or ``every_n_epochs`` epochs.

    Args:
        loss_fn: ``loss_fn(model(x), y)``, the mean loss of a batch.
        data: the data the Hessian is taken over (what :class:`fasthess.HessianOperator` accepts: an ``(X, y)``
            tuple, a Dataset, a DataLoader); usually the training set or a fixed subset of it.
        every_n_steps, every_n_epochs: exactly one (or ``budget``);
            steps count ``trainer.global_step`` (step 0, before the
            first update, included), epochs are counted when they end.
        module: name of the attribute of the LightningModule that is the network (default: the LightningModule
            itself, whose ``forward(x)`` must then give the outputs ``loss_fn`` expects).
        budget: compute only while the tracker's time stays within this fraction of the training's wall time
            (:class:`fasthess.SharpnessTracker`), considering every step (or every ``every_n_steps``-th).
        sinks: extra ``sink(record)`` callables (e.g. :class:`fasthess.integrations.TensorBoardSink`).
        prefix: metric name prefix.
        tracker_kwargs: passed to :class:`fasthess.SharpnessTracker` (``batch_size``, ``k``, ``tol``, ``mode``, ...).

    Every record's scalars (:func:`fasthess.integrations.record_scalars`) go to each of ``trainer.loggers`` at
    ``trainer.global_step``; the full records are in ``callback.tracker.history`` and in checkpoints.
    """

    def __init__(self, loss_fn: Callable, data: Any, *, every_n_steps: int | None = None,
                 every_n_epochs: int | None = None, budget: float | None = None,
                 module: str | None = None,
                 sinks: Sequence[Callable[[SharpnessRecord], None]] = (), prefix: str = "sharpness/",
                 **tracker_kwargs: Any) -> None:
        super().__init__()
        self.schedule = TrackingSchedule(loss_fn, data, every_n_steps, every_n_epochs, sinks, tracker_kwargs,
                                         budget)
        self.module, self.prefix = module, prefix

    @property
    def tracker(self):
        """The :class:`fasthess.SharpnessTracker` (its ``history`` holds every record)."""
        return self.schedule.tracker

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, **extra: Any) -> None:
        model: torch.nn.Module = pl_module if self.module is None else getattr(pl_module, self.module)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        record = self.schedule.update(model, trainer.global_step, optimizer, **extra)
        scalars = record_scalars(record, self.prefix)
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule.step_due(trainer.global_step):
            self._update(trainer, pl_module, epoch=trainer.current_epoch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.schedule.step_due(trainer.global_step):
            self._update(trainer, pl_module, epoch=trainer.current_epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule.epoch_due(trainer.current_epoch + 1):
            self._update(trainer, pl_module, epoch=trainer.current_epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        return self.tracker.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict)
