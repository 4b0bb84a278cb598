"""Weights & Biases logging of tracker records: ``WandbSink(run)(record)``."""
from __future__ import annotations

from typing import Any

from fasthess.errors import FasthessError
from fasthess.integrations._records import record_scalars, record_text
from fasthess.records import SharpnessRecord

__all__ = ["WandbSink"]


class WandbSink:
    """Logs each :class:`fasthess.SharpnessTracker` record to a W&B run, against its own x-axis ``prefix + "step"``.

    Args:
        run: a ``wandb`` run (``wandb.init(...)``); default the current ``wandb.run``.
        prefix: metric prefix, as in :class:`fasthess.integrations.TensorBoardSink`.

    The metrics are declared with ``define_metric(prefix + "*", step_metric=prefix + "step")``, so they plot
    against the training step of the record whatever else the run logs and at whatever pace. Works offline
    (``WANDB_MODE=offline``) like any W&B logging. The record's ``basis`` and ``threshold_rule`` are logged as
    strings next to the scalars.
    """

    def __init__(self, run: Any = None, prefix: str = "sharpness/") -> None:
        if run is None:
            import wandb

            run = wandb.run
        if run is None:
            raise FasthessError("WandbSink needs a W&B run: call wandb.init(...) first, or pass WandbSink(run)")
        self.run, self.prefix = run, prefix
        run.define_metric(f"{prefix}step")
        run.define_metric(f"{prefix}*", step_metric=f"{prefix}step")
        self._count = 0

    def __call__(self, record: SharpnessRecord) -> None:
        step = self._count if record.step is None else int(record.step)
        self._count += 1
        self.run.log({f"{self.prefix}step": step, **record_scalars(record, self.prefix),
                      **record_text(record, self.prefix)})
