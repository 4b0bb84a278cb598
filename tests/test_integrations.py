"""fasthess.integrations with the real frameworks: Lightning and Hugging Face training loops log the certified
λ_max to TensorBoard through the callbacks, read back from the event files; W&B in offline mode."""
from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import transformers
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from conftest import dense_hessian
from fasthess import FasthessError, SharpnessTracker
from fasthess.integrations import (HFSharpnessCallback, LightningSharpnessCallback, TensorBoardSink, WandbSink,
                                   record_scalars)
from fasthess.records import SharpnessRecord

N, D, C, BATCH = 64, 6, 3, 16
loss_fn = nn.CrossEntropyLoss()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D, generator=g, dtype=torch.float64), torch.randint(0, C, (N,), generator=g)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C)).double()


def _scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every ``tag`` event under ``log_dir`` (TensorBoard's own reader)."""
    events = [p.parent for p in log_dir.rglob("events.out.tfevents.*")]
    assert events, f"no event file under {log_dir}"
    out = []
    for folder in sorted(set(events)):
        acc = EventAccumulator(str(folder))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            out += [(e.step, e.value) for e in acc.Scalars(tag)]
    return sorted(out)


def _texts(log_dir: Path, tag: str) -> list[tuple[int, str]]:
    """(step, text) of every text summary ``tag`` under ``log_dir``."""
    out = []
    for folder in sorted({p.parent for p in log_dir.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(folder))
        acc.Reload()
        if tag in acc.Tags()["tensors"]:
            out += [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]
    return sorted(out)


def _dense_lambda_max(net: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh(dense_hessian(net, loss_fn, X, y, batch_size=N))[-1])


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return loss_fn(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def test_lightning_callback_logs_lambda_max_through_the_trainers_logger(tmp_path: Path) -> None:
    X, y = _data()
    callback = LightningSharpnessCallback(loss_fn, (X, y), every_n_steps=4, tol=1e-8)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="lightning")
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=logger, callbacks=[callback],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=BATCH)
    module = Classifier()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(module, loader)

    history = callback.tracker.history
    assert [r.step for r in history] == [0, 4, 8]  # 4 steps per epoch, 2 epochs, step 0 before training
    assert all(r.converged and r.lr == 0.2 and r.threshold == 10.0 and r.threshold_rule == "sgd: 2/lr"
               for r in history)
    assert history[-1].lambda_max == pytest.approx(_dense_lambda_max(module.net, X, y), rel=1e-7)
    logged = _scalars(Path(logger.log_dir), "sharpness/lambda_max")
    assert [s for s, _ in logged] == [0, 4, 8]
    assert [v for _, v in logged] == pytest.approx([r.lambda_max for r in history], rel=1e-6)  # float32 events
    assert [s for s, _ in _scalars(Path(logger.log_dir), "sharpness/threshold")] == [0, 4, 8]


class DictDataset(torch.utils.data.Dataset):
    """Hugging Face style examples: ``{"x": ..., "labels": ...}``."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.X[i], "labels": self.y[i]}


class HFClassifier(nn.Module):
    """The ``Trainer`` contract: ``forward(x, labels)`` returns the loss; ``forward(x)`` the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.net(x)
        return logits if labels is None else {"loss": loss_fn(logits, labels), "logits": logits}


def test_hf_trainer_callback_logs_lambda_max_to_tensorboard(tmp_path: Path) -> None:
    X, y = _data()
    sink = TensorBoardSink(tmp_path / "tb")
    train = DictDataset(X, y)  # the Hessian over the Trainer's own dict batches: model(x=...) scored against labels
    callback = HFSharpnessCallback(loss_fn, torch.utils.data.DataLoader(train, batch_size=BATCH), every_n_epochs=1,
                                   sinks=[sink], tol=1e-8)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH,
                                          num_train_epochs=2, learning_rate=0.2, lr_scheduler_type="constant",
                                          optim="sgd", report_to=[], use_cpu=True, save_strategy="no",
                                          logging_strategy="no", disable_tqdm=True, dataloader_drop_last=False,
                                          seed=0)
    model = HFClassifier()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train, callbacks=[callback])
    trainer.train()
    sink.close()

    history = callback.tracker.history
    assert [(r.step, r.extra["epoch"]) for r in history] == [(4, 1), (8, 2)]
    assert all(r.converged and r.lr == pytest.approx(0.2) for r in history)
    assert history[-1].lambda_max == pytest.approx(_dense_lambda_max(model.net, X, y), rel=1e-7)
    logged = _scalars(tmp_path / "tb", "sharpness/lambda_max")
    assert logged == [(4, pytest.approx(history[0].lambda_max, rel=1e-6)),
                      (8, pytest.approx(history[1].lambda_max, rel=1e-6))]
    in_state = [e for e in trainer.state.log_history if "sharpness/lambda_max" in e]
    assert [e["step"] for e in in_state] == [4, 8]


def test_tensorboard_sink_as_tracker_logger(tmp_path: Path) -> None:
    X, y = _data()
    net = _net()
    sink = TensorBoardSink(tmp_path, prefix="h/")
    tracker = SharpnessTracker(loss_fn, (X, y), k=2, lr=0.5, loggers=[sink])
    tracker.update(net, step=3)
    tracker.update(net)  # no step: written at the count of records so far
    sink.close()
    assert _scalars(tmp_path, "h/lambda_max") == [(1, pytest.approx(tracker.lambda_max, rel=1e-6)),
                                                  (3, pytest.approx(tracker.lambda_max, rel=1e-6))]
    assert _scalars(tmp_path, "h/threshold") == [(1, 4.0), (3, 4.0)]
    assert _texts(tmp_path, "h/basis/text_summary") == [(1, tracker.history[1].basis), (3, tracker.history[0].basis)]
    first = tracker.history[0]  # the update at step 3
    assert dict(_scalars(tmp_path, "h/lambda_2"))[3] == pytest.approx(first.eigenvalues[1], rel=1e-6)
    assert dict(_scalars(tmp_path, "h/num_hvps"))[3] == first.num_hvps


def test_wandb_sink_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    X, y = _data()
    run = wandb.init(project="fasthess-tests", dir=str(tmp_path), mode="offline")
    try:
        tracker = SharpnessTracker(loss_fn, (X, y), lr=0.1, loggers=[WandbSink(run)])
        tracker.update(_net(), step=5)
        assert run.summary["sharpness/lambda_max"] == pytest.approx(tracker.lambda_max)
        assert run.summary["sharpness/step"] == 5 and run.summary["sharpness/threshold"] == pytest.approx(20.0)
        assert run.summary["sharpness/basis"] == tracker.latest.basis
    finally:
        run.finish()
    assert list(tmp_path.rglob("*.wandb")), "no offline run file written"


def test_wandb_sink_needs_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    monkeypatch.setattr(wandb, "run", None)
    with pytest.raises(FasthessError, match="wandb.init"):
        WandbSink()


def test_callbacks_need_one_schedule() -> None:
    X, y = _data()
    for kwargs in ({}, {"every_n_steps": 2, "every_n_epochs": 1}, {"every_n_steps": 0}):
        with pytest.raises(FasthessError, match="every_n"):
            LightningSharpnessCallback(loss_fn, (X, y), **kwargs)
    record = SharpnessRecord(lambda_max=1.0, eigenvalues=(1.0,), residual=0.0, error_bound=0.0, converged=True,
                             num_hvps=3, num_passes=1, seconds=0.0, warm_started=False)
    assert record_scalars(record) == {"sharpness/lambda_max": 1.0, "sharpness/residual": 0.0,
                                      "sharpness/num_hvps": 3.0}


def test_budget_schedule_considers_every_step_and_refuses_epochs() -> None:
    X, y = _data()
    with pytest.raises(FasthessError, match="budget= chooses among optimizer steps"):
        LightningSharpnessCallback(loss_fn, (X, y), every_n_epochs=1, budget=0.1)
    callback = HFSharpnessCallback(loss_fn, (X, y), budget=0.5)
    assert callback.schedule.every_n_steps == 1 and callback.tracker.budget == 0.5
    assert callback.schedule.step_due(0)
    callback.schedule.update(_net(), 0)
    callback.tracker._born -= 1e6  # as if a long loop had run since: the budget allows the next step
    assert callback.schedule.step_due(1)
    callback.tracker._spent += 1e7  # and as if the tracker had taken all of it: it does not
    assert not callback.schedule.step_due(2)


def test_hf_callback_refuses_batch_size_with_dict_batches_when_built() -> None:
    X, y = _data()
    batches = [{"x": X[i:i + BATCH], "labels": y[i:i + BATCH]} for i in range(0, N, BATCH)]
    with pytest.raises(FasthessError, match="drop batch_size"):
        HFSharpnessCallback(loss_fn, batches, every_n_steps=1, batch_size=8)
    callback = HFSharpnessCallback(loss_fn, batches, every_n_steps=1)  # the batches are the chunks
    record = callback.schedule.update(HFClassifier(), 0)
    assert record.lambda_max == pytest.approx(_dense_lambda_max(_net(), X, y), rel=1e-6)
