"""One training loop for minibatch SGD, full-batch GD and SAM / ASAM, with λ_max tracking,
atomic checkpoints and bit-exact resumption.

Determinism: the model is built right after ``torch.manual_seed(init_seed)``; epoch ``e`` visits the
examples in ``randperm(N, seed=f(data_seed, e))`` (stateless, so resuming needs only the step);
dropout draws from the global torch RNG, whose state is checkpointed. Checkpoints hold the model,
the optimizer, the RNG state, the step, the metrics so far and the tracker's warm-start vectors.

Under torchrun (see :mod:`experiments.ddp`) the model is wrapped in DistributedDataParallel: every rank
takes its contiguous part of each global batch, λ_max is computed by a sharded operator, evaluation sums
are all-reduced, and only rank 0 writes files. Dropout draws from a per-rank seed (rank 0's is the
single-process seed); BatchNorm normalizes by per-rank batch statistics (running statistics are averaged
over ranks before every evaluation).

The config schema is :mod:`experiments.config`, SAM :mod:`experiments.sam`, evaluation
:mod:`experiments.evaluation`, durable files :mod:`experiments.storage`.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fasthess import _progress
from fasthess.records import SharpnessRecord

from . import curvature, ddp, records, sam
from .config import data_args, resolve_config
from .data import DataSplit, load_dataset, subset_indices
from .evaluation import bitstring, evaluate
from .models import build_model
from .storage import (_jsonable, atomic_torch_save, atomic_write_json, atomic_write_jsonl, load_checkpoint,
                      save_checkpoint)


#: the metrics.jsonl name of each tracker record field the runner keeps (the one place they are renamed)
TRACKER_METRICS = {"lambda_max": "lambda_max", "lambda_residual": "residual", "lambda_error_bound": "error_bound",
                   "lambda_hvps": "num_hvps", "lambda_seconds": "seconds", "lambda_converged": "converged",
                   "top_overlap": "top_overlap"}


def tracker_metrics(record: SharpnessRecord) -> dict[str, Any]:
    """A tracker record's fields under their metrics.jsonl names (:data:`TRACKER_METRICS`)."""
    return {name: getattr(record, field) for name, field in TRACKER_METRICS.items()}


def has_batchnorm(model) -> bool:
    return bool(sam.bn_modules(model))


def config_record(cfg: dict[str, Any]) -> dict[str, Any]:
    """What config.json holds: the resolved config and, under ``environment``, what ran it."""
    return {**cfg, "environment": records.environment(cfg["device"])}


class Trainer:
    """Holds data, model, optimizer and tracker for one run; ``run(run_dir)`` trains with checkpoints."""

    def __init__(self, cfg: dict[str, Any], data: DataSplit | None = None, progress: bool | None = False,
                 distributed: bool | None = None):
        """``distributed``: None = data-parallel when torch.distributed is initialized (under torchrun),
        False = single process even then, True = require an initialized process group."""
        self.cfg = cfg = resolve_config(cfg)
        self.dist = ddp.context() if distributed is not False else ddp.DistContext()
        if distributed and not self.dist.enabled:
            raise ValueError("distributed=True needs an initialized torch.distributed process group (torchrun)")
        unsharded = [m for m in cfg["track_extra"] if m not in curvature.SHARDED]
        if self.dist.enabled and unsharded:
            raise ValueError(f"track_extra measures {unsharded} need the whole data set in one process; "
                             f"under torchrun use only {list(curvature.SHARDED)}")
        self.device = torch.device(cfg["device"])
        self.progress = _progress.wanted(progress) and self.dist.is_main  # None: when stderr is a terminal
        self.data = data if data is not None else load_dataset(cfg["dataset"], **data_args(cfg))
        self.N = len(self.data.X_train)
        self.B = self.N if cfg["optimizer"] == "gd" or cfg["batch_size"] is None else min(int(cfg["batch_size"]), self.N)
        self.chunk = int(cfg["chunk_size"]) if cfg["chunk_size"] else self.B
        self.steps_per_epoch = math.ceil(self.N / self.B)
        torch.manual_seed(cfg["init_seed"])
        self.model = build_model(cfg["model"], self.data.input_shape, self.data.num_classes,
                                 batch_norm=cfg["batch_norm"], dropout=cfg["dropout"], width=cfg["width"],
                                 hidden=cfg["hidden"], channels=cfg["channels"]).to(self.device)
        torch.manual_seed(10_007 * int(cfg["data_seed"]) + 1 + 1_000_033 * self.dist.rank)  # dropout noise
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ddp_model = None  # the DistributedDataParallel wrapper that training steps go through
        if self.dist.enabled:
            import inspect

            from torch.nn.parallel import DistributedDataParallel

            # no buffer broadcast in forward: ranks may run different numbers of chunks (buffers are synced
            # before each evaluation instead, see _eval_record)
            no_fwd_sync = ({"forward_sync_buffers": False}
                           if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                           else {"broadcast_buffers": False})
            self.ddp_model = DistributedDataParallel(self.model, process_group=self.dist.group, **no_fwd_sync)
        self.opt = torch.optim.SGD(self.params, lr=cfg["lr"], momentum=cfg["momentum"],
                                   weight_decay=cfg["weight_decay"])
        self.step = 0
        self.metrics: list[dict[str, Any]] = []
        self.last_loss = float("nan")  # the last batch loss (checkpointed: the summary reports it)
        self.finished: dict[str, Any] | None = None  # the summary, once loaded from a finished run's checkpoint
        self.tracker = self._make_tracker()

    # ------------------------------------------------------------------ pieces
    def _make_tracker(self):
        from fasthess.track import SharpnessTracker

        cfg = self.cfg
        idx = subset_indices(self.N, cfg["lambda_subset"], cfg["lambda_stride"])
        X, y = self.data.X_train, self.data.y_train
        if len(idx) != self.N:
            idx_t = torch.as_tensor(idx, device=X.device)
            X, y = X[idx_t], y[idx_t]
        bs = cfg["lambda_batch_size"]
        if bs is None:
            # BatchNorm in train mode: ghost batches of the training batch size (the paper's choice).
            # Without BatchNorm the chunking does not change the Hessian; use big chunks.
            bs = self.B if has_batchnorm(self.model) else max(self.B, min(len(X), cfg["eval_chunk_size"]))
        kw = {}
        if cfg["lambda_max_iters"]:
            kw["max_iters"] = cfg["lambda_max_iters"]
        if self.dist.enabled:  # each rank its contiguous shard of the λ data; one all-reduce per pass
            from fasthess.distributed import shard

            X, y = shard((X, y), self.dist.rank, self.dist.world_size)
            kw.update(distributed=True, process_group=self.dist.group)
        return SharpnessTracker(F.cross_entropy, (X, y), batch_size=int(bs), k=int(cfg["lambda_k"]),
                                tol=cfg["lambda_tol"], mode="train", disable_dropout=True, lr=cfg["lr"], **kw)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1_000_003 * int(self.cfg["data_seed"]) + int(epoch))
        return torch.randperm(self.N, generator=g).to(self.data.X_train.device)

    def batch_indices(self, step: int) -> torch.Tensor:
        if self.B == self.N:
            return torch.arange(self.N, device=self.data.X_train.device)
        epoch, pos = divmod(step, self.steps_per_epoch)
        return self.epoch_order(epoch)[pos * self.B:(pos + 1) * self.B]

    def _accumulate_grad(self, model, params, idx: torch.Tensor) -> float:
        """Mean loss over the batch ``idx``; its gradient accumulated into ``.grad`` in physical chunks."""
        X, y = self.data.X_train, self.data.y_train
        if self.dist.enabled:
            return ddp.accumulate_grad(model, params, X, y, idx, self.chunk, self.dist, device=self.device)
        for p in params:
            p.grad = None
        b = len(idx)
        total = 0.0
        for s in range(0, b, self.chunk):
            j = idx[s:s + self.chunk]
            loss = F.cross_entropy(model(X[j]), y[j], reduction="sum") / b
            loss.backward()
            total += float(loss.detach())
        return total

    def train_step(self, model=None, opt=None, step: int | None = None) -> float:
        """One optimizer step on the batch of ``step``; returns the batch loss (before the step)."""
        model = (self.ddp_model or self.model) if model is None else model
        opt = self.opt if opt is None else opt
        params = [p for p in model.parameters() if p.requires_grad]
        idx = self.batch_indices(self.step if step is None else step)
        model.train()
        loss = self._accumulate_grad(model, params, idx)
        if not math.isfinite(loss):
            return loss
        if self.cfg["optimizer"] in ("sam", "asam"):
            sam.perturbed_gradient(model, params, lambda: self._accumulate_grad(model, params, idx),
                                   float(self.cfg["rho"]), self.cfg["optimizer"] == "asam", self.cfg["asam_eta"])
        opt.step()
        return loss

    def evaluate(self, X, y) -> tuple[float, float]:
        """(mean loss, accuracy) of the current model on ``(X, y)``, in eval mode."""
        loss, acc, _ = evaluate(self.model, X, y, int(self.cfg["eval_chunk_size"]), self.dist, self.device)
        return loss, acc

    def lambda_between_iterates(self, n: int) -> dict[str, Any]:
        """λ_max at ``n`` points interpolating the current weights and those after one more step."""
        model = copy.deepcopy(self.model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=self.cfg["lr"],
                              momentum=self.cfg["momentum"], weight_decay=self.cfg["weight_decay"])
        opt.load_state_dict(copy.deepcopy(self.opt.state_dict()))  # a copy: the momentum buffers would be shared
        rng = torch.get_rng_state()
        w0 = [p.detach().clone() for p in model.parameters()]
        self.train_step(model, opt, self.step)
        torch.set_rng_state(rng)
        w1 = [p.detach().clone() for p in model.parameters()]
        vals, converged = [], True
        v0 = self.tracker.ritz_vectors
        for t in torch.linspace(0, 1, n).tolist():
            with torch.no_grad():
                for p, a, b in zip(model.parameters(), w0, w1):
                    p.copy_((1 - t) * a + t * b)
            res = self.tracker.compute(model, v0=v0)
            vals.append(float(res.eigenvalues[0]))
            converged &= bool(torch.as_tensor(res.converged).all())
        return {"lambda_between_iterates": max(vals), "lambda_between_values": vals,
                "lambda_between_converged": converged}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        st = {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
              "rng": torch.get_rng_state(), "metrics": self.metrics, "tracker": self.tracker.state_dict(),
              "cfg": self.cfg, "last_loss": self.last_loss}
        if self.dist.enabled:  # a collective: every rank's dropout RNG, so a resumed run continues bit-exactly
            st["rng_per_rank"] = ddp.all_gather_objects(st["rng"], self.dist)
        return st

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        self.step = int(st["step"])
        per_rank = st.get("rng_per_rank")
        if self.dist.enabled and per_rank is not None and len(per_rank) == self.dist.world_size:
            torch.set_rng_state(per_rank[self.dist.rank])
        else:
            torch.set_rng_state(st["rng"])
        self.metrics = list(st["metrics"])
        self.tracker.load_state_dict(st["tracker"])
        self.last_loss = float(st.get("last_loss", float("nan")))
        self.finished = st.get("summary")

    # ------------------------------------------------------------------ main loop
    def run(self, run_dir: str | Path | None = None) -> dict[str, Any]:
        """Train until train accuracy >= target, divergence or ``max_steps``; see :meth:`_run`.

        The process-wide settings ``threads`` and ``deterministic`` apply during the run and are restored after.
        """
        cfg = self.cfg
        threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
        det_warn = torch.is_deterministic_algorithms_warn_only_enabled()
        try:
            if cfg["deterministic"]:
                torch.use_deterministic_algorithms(True, warn_only=True)
            if cfg["threads"] and self.device.type == "cpu":
                torch.set_num_threads(int(cfg["threads"]))
            with self._tensorboard(run_dir):
                return self._run(run_dir)
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(det, warn_only=det_warn)

    @contextlib.contextmanager
    def _tensorboard(self, run_dir: str | Path | None):
        """With ``tensorboard=true``: a :class:`fasthess.integrations.tensorboard.TensorBoardSink` writing every
        tracker record (λ_max, residual, HVPs, 2/η) to ``<run_dir>/tensorboard`` (rank 0 only) during the run."""
        if not (self.cfg["tensorboard"] and run_dir is not None and self.dist.is_main):
            yield
            return
        from fasthess.integrations.tensorboard import TensorBoardSink

        sink = TensorBoardSink(Path(run_dir) / "tensorboard")
        self.tracker.loggers.append(sink)
        try:
            yield
        finally:
            self.tracker.loggers.remove(sink)
            sink.close()

    def _resume(self, run_dir: Path) -> None:
        """Write config.json and load the newest intact checkpoint (rank 0 reads it and broadcasts it)."""
        def read(map_location):
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run_dir / "config.json", config_record(self.cfg))
            return load_checkpoint(run_dir / "checkpoint.pt", map_location=map_location)

        st = read(self.device) if not self.dist.enabled else ddp.main_decides(lambda: read("cpu"), self.dist)
        if st is not None:
            self.load_state_dict(st)

    def _stop_check_due(self) -> bool:
        k = self.cfg["stop_check_every"]
        return bool(k) and self.step % k == 0

    def _eval_due(self) -> bool:
        spe, every = self.steps_per_epoch, self.cfg["eval_every_epochs"]
        return self.step % spe == 0 and (self.step // spe) % every == 0

    def _run(self, run_dir: str | Path | None = None) -> dict[str, Any]:
        """Train until train accuracy >= target, divergence or ``max_steps``; return the summary.

        The stopping test runs at every evaluation and, with ``stop_check_every = k``, on the training set
        every k steps in between. With ``run_dir``: resumes from ``run_dir/checkpoint.pt`` if present; writes
        config.json, metrics.jsonl (one line per evaluation), checkpoint.pt and, at the end, summary.json.
        """
        cfg = self.cfg
        main = self.dist.is_main
        run_dir = Path(run_dir) if run_dir is not None else None
        if run_dir:
            self._resume(run_dir)
        if self.finished is not None:  # killed after the final checkpoint: only files derived from it may be missing
            if run_dir and main:
                self._write_final(run_dir, self.finished)
            return _jsonable(self.finished)
        delay = float(os.environ.get("FASTHESS_EXP_STEP_DELAY", "0") or 0)  # tests: make kill -9 land mid-run
        t_start = time.time()
        status, diverged_step = None, None
        evals_done = len(self.metrics)
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg["max_steps"], initial=self.step, desc=(run_dir.name if run_dir else "train")[:40],
                       leave=False, dynamic_ncols=True, mininterval=0.5)
        last_loss = self.last_loss
        while status is None:
            if self.step >= cfg["max_steps"]:
                status = "max_steps"
                break
            loss = self.train_step()
            last_loss = self.last_loss = loss
            if not math.isfinite(loss) or not all(torch.isfinite(p).all() for p in self.params):
                status, diverged_step = "diverged", self.step
                break
            self.step += 1
            if delay:
                time.sleep(delay)
            if bar is not None:
                bar.update(1)
            if not self._eval_due():
                if self._stop_check_due() and self.evaluate(*self.data.train)[1] >= cfg["target_train_acc"]:
                    status = "completed"  # the final evaluation below records this step
                continue
            rec = self._eval_record()
            evals_done += 1
            if cfg["track_every_evals"] and evals_done % cfg["track_every_evals"] == 0:
                if bar is not None:  # a large model's update takes a while: say why the bar stands still
                    bar.set_postfix_str("certifying λ_max on the full data", refresh=True)
                self._track(rec)
            self.metrics.append(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{rec['train_loss']:.3g}", acc=f"{rec['train_acc']:.3f}",
                                lam=_lambda_text(self.tracker.latest))
            if rec["train_acc"] >= cfg["target_train_acc"]:
                status = "completed"
            elif run_dir and evals_done % cfg["checkpoint_every_evals"] == 0:
                state = self.state_dict()  # (a collective when data-parallel)
                if main:
                    atomic_write_jsonl(run_dir / "metrics.jsonl", self.metrics)
                    save_checkpoint(state, ckpt_path(run_dir))
        if bar is not None:
            bar.close()
        summary = self._summary(status, diverged_step, last_loss, time.time() - t_start)
        if run_dir:
            state = self.state_dict()  # (a collective when data-parallel)
            state["summary"] = summary  # marks the run finished: a resume from it only rewrites the files below
        if run_dir and main:
            save_checkpoint(state, ckpt_path(run_dir))
            self._write_final(run_dir, summary)
        return _jsonable(summary)

    def _summary(self, status: str, diverged_step: int | None, last_loss: float, seconds: float) -> dict[str, Any]:
        """The final evaluation (with per-example test correctness), λ_max, and the run's summary."""
        cfg = self.cfg
        final = self._eval_record(per_example=True)
        correct = final.pop("test_correct")
        if status == "diverged":
            final["diverged"] = True
            self.metrics.append(final)
        else:
            if self.metrics and self.metrics[-1]["step"] == self.step:
                final = self.metrics[-1]
            else:
                self.metrics.append(final)
            if "lambda_max" not in final:
                self._track(final)
            if cfg["between_iterates"]:
                final.update(self.lambda_between_iterates(int(cfg["between_iterates"])))
        return {
            "status": status, "steps": self.step, "epochs": self.step / self.steps_per_epoch,
            "diverged_step": diverged_step,
            "train_acc": final["train_acc"], "test_acc": final["test_acc"], "train_loss": final["train_loss"],
            "test_loss": final["test_loss"], "lambda_max": final.get("lambda_max"),
            "lambda_residual": final.get("lambda_residual"), "lambda_converged": final.get("lambda_converged"),
            "lambda_between_iterates": final.get("lambda_between_iterates"),
            "lambda_between_converged": final.get("lambda_between_converged"),
            "lr": cfg["lr"], "batch_size": self.B, "two_over_lr": 2.0 / cfg["lr"],
            "target_train_acc": cfg["target_train_acc"],
            "lambda_hvps_total": sum(r.num_hvps for r in self.tracker.history),
            "last_batch_loss": last_loss, "wall_seconds": seconds,
            "test_correct": correct,  # '0'/'1' per test example, in test-set order
            "config": cfg, "environment": records.environment(cfg["device"]),
        }

    def _write_final(self, run_dir: Path, summary: dict[str, Any]) -> None:
        atomic_write_jsonl(run_dir / "metrics.jsonl", self.metrics)
        atomic_torch_save(self.model.state_dict(), run_dir / "final_model.pt")
        atomic_write_json(run_dir / "summary.json", summary)  # last: its presence means the run is done

    def _eval_record(self, per_example: bool = False) -> dict[str, Any]:
        if self.dist.enabled:  # BatchNorm running statistics: the mean over ranks, equal everywhere
            ddp.sync_buffers(self.model, self.dist)
        cs = int(self.cfg["eval_chunk_size"])
        trl, tra, _ = evaluate(self.model, *self.data.train, cs, self.dist, self.device)
        tel, tea, correct = evaluate(self.model, *self.data.test, cs, self.dist, self.device)
        rec = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "train_loss": trl, "train_acc": tra,
               "test_loss": tel, "test_acc": tea, "lr": self.cfg["lr"], "two_over_lr": 2.0 / self.cfg["lr"]}
        if per_example:
            rec["test_correct"] = bitstring(correct)
        return rec

    def _track(self, rec: dict[str, Any]) -> None:
        rec.update(tracker_metrics(self.tracker.update(self.model, step=self.step, optimizer=self.opt)))
        if self.cfg["track_extra"]:
            rec.update(curvature.measure(self.cfg["track_extra"], self.model, self.tracker, batch_size=self.B,
                                         seed=self.step))


def _lambda_text(record: SharpnessRecord | None) -> str:
    """The progress bar's λ_max: "-" before the first update, marked when not certified."""
    if record is None:
        return "-"
    return f"{record.lambda_max:.4g}" + ("" if record.converged else " (not certified)")


def ckpt_path(run_dir: Path) -> Path:
    return run_dir / "checkpoint.pt"
