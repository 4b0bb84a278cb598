"""TensorBoard logging of tracker records: ``TensorBoardSink(log_dir_or_writer)(record)``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fasthess.integrations._records import record_scalars, record_text
from fasthess.records import SharpnessRecord

__all__ = ["TensorBoardSink"]


class TensorBoardSink:
    """Writes each :class:`fasthess.SharpnessTracker` record as TensorBoard scalars at the record's step.

    Args:
        log_dir_or_writer: a directory (a ``torch.utils.tensorboard.SummaryWriter`` is opened there and closed by
            :meth:`close`) or an open ``SummaryWriter`` (left open: its owner closes it).
        prefix: tag prefix; the scalar tags are ``prefix + "lambda_max"``, ``"residual"``, ``"num_hvps"``,
            ``"hvp_equivalents"``, ``"threshold"`` (see :func:`fasthess.integrations.record_scalars`); the record's
            ``basis`` and ``threshold_rule`` are written as text (:func:`fasthess.integrations.record_text`).

    Pass it as ``SharpnessTracker(..., loggers=[sink])``, or call ``sink(record)`` yourself. Records without a
    step are written at the number of records seen so far. Each call flushes, so TensorBoard shows it at once.
    """

    def __init__(self, log_dir_or_writer: str | Path | Any, prefix: str = "sharpness/") -> None:
        if isinstance(log_dir_or_writer, (str, Path)):
            from torch.utils.tensorboard import SummaryWriter

            self.writer, self._owned = SummaryWriter(log_dir=str(log_dir_or_writer)), True
        else:
            self.writer, self._owned = log_dir_or_writer, False
        self.prefix = prefix
        self._count = 0

    def __call__(self, record: SharpnessRecord) -> None:
        step = self._count if record.step is None else int(record.step)
        self._count += 1
        for tag, value in record_scalars(record, self.prefix).items():
            self.writer.add_scalar(tag, value, global_step=step)
        for tag, text in record_text(record, self.prefix).items():
            self.writer.add_text(tag, text, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        """Close the writer if this sink opened it."""
        if self._owned:
            self.writer.close()
