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
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from experiments import curvature
from experiments.data import DataSplit, load_dataset
from experiments.models import build_model
from experiments.storage import (_jsonable, atomic_torch_save, atomic_write_json,  # noqa: F401 (re-exported)
                                 atomic_write_text, load_checkpoint, save_checkpoint)
from fasthess.track import sharpness_mode

OPTIMIZERS = ("sgd", "gd", "sam", "asam")

DEFAULTS: dict[str, Any] = {
    # data
    "dataset": "digits", "data_root": None, "verify": True, "train_subset": None, "train_stride": None,
    "test_subset": None, "test_stride": None, "data_kwargs": {},
    # model
    "model": "mlp", "hidden": [256, 256], "channels": None, "width": 1.0, "batch_norm": False, "dropout": 0.0,
    # optimization
    "optimizer": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "batch_size": 32, "chunk_size": None,
    "rho": 0.05, "asam_eta": 0.01,
    "init_seed": 0, "data_seed": 0,
    # stopping / evaluation
    "target_train_acc": 0.99, "max_steps": 20000, "eval_every_epochs": 1, "eval_chunk_size": 2048,
    # sharpness
    "track_every_evals": 0, "lambda_subset": None, "lambda_stride": None, "lambda_tol": 1e-4, "lambda_k": 1,
    "lambda_batch_size": None, "lambda_max_iters": None, "between_iterates": 0,
    "track_extra": [],  # names from experiments.curvature.MEASURES, logged next to λ_max
    # misc
    "device": "cpu", "deterministic": True, "checkpoint_every_evals": 1,
    "threads": 1,  # CPU threads (0 = torch's default); small models run fastest on one
}


# key: (kind, minimum, None allowed); "int" accepts integral floats (1e3 from --set) and stores an int
_TYPES: dict[str, tuple[str, float | None, bool]] = {
    **{k: ("int", 1, True) for k in ("batch_size", "train_subset", "test_subset", "lambda_subset",
                                     "lambda_batch_size")},
    **{k: ("int", 0, True) for k in ("chunk_size", "train_stride", "test_stride", "lambda_stride",
                                     "lambda_max_iters")},
    **{k: ("int", 0, False) for k in ("init_seed", "data_seed", "max_steps", "track_every_evals",
                                      "between_iterates", "threads")},
    **{k: ("int", 1, False) for k in ("eval_every_epochs", "eval_chunk_size", "lambda_k", "checkpoint_every_evals")},
    **{k: ("float", 0, False) for k in ("lr", "momentum", "weight_decay", "rho", "asam_eta", "lambda_tol", "width",
                                        "dropout")},
    "target_train_acc": ("float", None, False),
    **{k: ("bool", None, False) for k in ("verify", "batch_norm", "deterministic")},
    **{k: ("str", None, False) for k in ("dataset", "model", "optimizer", "device")},
    "data_root": ("str", None, True),
    "hidden": ("ints", 1, False), "channels": ("ints", 1, True), "data_kwargs": ("dict", None, True),
    "track_extra": ("measures", None, False),
}


def _check_types(out: dict[str, Any]) -> None:
    """Types and ranges of the config values, in place; a ValueError naming the key otherwise."""
    for k, (kind, lo, none_ok) in _TYPES.items():
        v = out[k]
        if v is None:
            if none_ok:
                continue
            raise ValueError(f"{k} must not be null")
        what = "a list of ints" if kind == "ints" else f"{'an' if kind == 'int' else 'a'} {kind}"
        bad = ValueError(f"{k} must be {what}{'' if lo is None else f' >= {lo}'}"
                         f"{' and < 2**31' if kind in ('int', 'ints') else ''}, got {v!r}")
        if kind in ("int", "float"):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad
            if kind == "int":
                if v != int(v):
                    raise bad
                v = out[k] = int(v)
            if lo is not None and v < lo or kind == "int" and v >= 2**31:
                raise bad
        elif kind == "bool" and not isinstance(v, bool) or kind == "str" and not isinstance(v, str) \
                or kind == "dict" and not isinstance(v, dict):
            raise bad
        elif kind == "measures":
            if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) and x in curvature.MEASURES for x in v):
                raise ValueError(f"{k} must be a list of names from {sorted(curvature.MEASURES)}, got {v!r}")
        elif kind == "ints":
            if not isinstance(v, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool)
                                                           and lo <= x < 2**31 for x in v):
                raise bad
    if not out["dropout"] < 1:
        raise ValueError(f"dropout must be < 1, got {out['dropout']!r}")
    for k in ("lambda_tol", "width"):
        if not out[k] > 0:
            raise ValueError(f"{k} must be > 0, got {out[k]!r}")


def resolve_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in and checked; unknown keys are an error (catches typos in --set)."""
    unknown = sorted(set(cfg) - set(DEFAULTS) - {"name", "group"})
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(DEFAULTS)}")
    out = dict(DEFAULTS)
    out.update(cfg)
    _check_types(out)
    if out["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {out['optimizer']!r}")
    if not (out["lr"] > 0):
        raise ValueError(f"lr must be > 0, got {out['lr']}")
    if out["optimizer"] != "gd" and (out["batch_size"] is None or int(out["batch_size"]) < 1):
        raise ValueError(f"batch_size must be >= 1, got {out['batch_size']}")
    return out


def _bn_modules(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def has_batchnorm(model) -> bool:
    return bool(_bn_modules(model))


class Trainer:
    """Holds data, model, optimizer and tracker for one run; ``run(run_dir)`` trains with checkpoints."""

    def __init__(self, cfg: dict[str, Any], data: DataSplit | None = None, progress: bool = False,
                 distributed: bool | None = None):
        """``distributed``: None = data-parallel when torch.distributed is initialized (under torchrun),
        False = single process even then, True = require an initialized process group."""
        from experiments import ddp

        self.cfg = cfg = resolve_config(cfg)
        self.dist = ddp.context() if distributed is not False else ddp.DistContext()
        if distributed and not self.dist.enabled:
            raise ValueError("distributed=True needs an initialized torch.distributed process group (torchrun)")
        unsharded = [m for m in cfg["track_extra"] if m not in curvature.SHARDED]
        if self.dist.enabled and unsharded:
            raise ValueError(f"track_extra measures {unsharded} need the whole data set in one process; "
                             f"under torchrun use only {list(curvature.SHARDED)}")
        self.device = torch.device(cfg["device"])
        self.progress = progress and self.dist.is_main
        if data is None:
            data = load_dataset(cfg["dataset"], root=cfg["data_root"], verify=cfg["verify"],
                                train_subset=cfg["train_subset"], train_stride=cfg["train_stride"],
                                test_subset=cfg["test_subset"], test_stride=cfg["test_stride"],
                                device=self.device, **(cfg["data_kwargs"] or {}))
        self.data = data
        self.N = len(data.X_train)
        self.B = self.N if cfg["optimizer"] == "gd" or cfg["batch_size"] is None else min(int(cfg["batch_size"]), self.N)
        self.chunk = int(cfg["chunk_size"]) if cfg["chunk_size"] else self.B
        self.steps_per_epoch = math.ceil(self.N / self.B)
        torch.manual_seed(cfg["init_seed"])
        self.model = build_model(cfg["model"], data.input_shape, data.num_classes, batch_norm=cfg["batch_norm"],
                                 dropout=cfg["dropout"], width=cfg["width"], hidden=cfg["hidden"],
                                 channels=cfg["channels"]).to(self.device)
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
        from experiments.data import subset_indices

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
        if self.dist.enabled:
            return self._accumulate_grad_ddp(model, params, idx)
        for p in params:
            p.grad = None
        X, y = self.data.X_train, self.data.y_train
        b = len(idx)
        total = 0.0
        for s in range(0, b, self.chunk):
            j = idx[s:s + self.chunk]
            loss = F.cross_entropy(model(X[j]), y[j], reduction="sum") / b
            loss.backward()
            total += float(loss.detach())
        return total

    def _accumulate_grad_ddp(self, model, params, idx: torch.Tensor) -> float:
        """Data-parallel :meth:`_accumulate_grad`: this rank's part of the global batch ``idx`` in chunks,
        each chunk's summed loss times W/b, DDP's all-reduce on the last chunk only (``no_sync`` before);
        a model not wrapped in DDP has its gradients all-reduced here. Returns the global batch's mean loss
        (all-reduced, so every rank takes the same branch on a non-finite loss)."""
        import contextlib

        from torch.nn.parallel import DistributedDataParallel

        from experiments import ddp

        for p in params:
            p.grad = None
        X, y = self.data.X_train, self.data.y_train
        b, W = len(idx), self.dist.world_size
        mine = ddp.local_part(idx, self.dist)
        starts = list(range(0, len(mine), self.chunk)) or [0]  # an empty part still joins the all-reduce
        wrapped = isinstance(model, DistributedDataParallel)
        total = 0.0
        for i, s in enumerate(starts):
            j = mine[s:s + self.chunk]
            sync = i == len(starts) - 1
            with (model.no_sync() if wrapped and not sync else contextlib.nullcontext()):
                loss_sum = F.cross_entropy(model(X[j]), y[j], reduction="sum")
                (loss_sum * (W / b)).backward()
            total += float(loss_sum.detach()) / b
        if not wrapped:
            import torch.distributed as dist

            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=self.dist.group)
                p.grad.div_(W)
        return ddp.all_reduce_sum([total], self.dist, device=self.device)[0]

    def _sam_perturbation(self, params) -> list[torch.Tensor]:
        cfg = self.cfg
        rho = float(cfg["rho"])
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if cfg["optimizer"] == "asam":
            T = [p.detach().abs() + cfg["asam_eta"] for p in params]
            norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(T, grads)))
            return [rho * t * t * g / (norm + 1e-12) for t, g in zip(T, grads)]
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        return [rho * g / (norm + 1e-12) for g in grads]

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
            eps = self._sam_perturbation(params)
            saved = [p.detach().clone() for p in params]
            bn = _bn_modules(model)
            bn_state = [{k: v.clone() for k, v in m.state_dict().items() if k.startswith(("running_", "num_batches"))}
                        for m in bn]
            with torch.no_grad():
                for p, e in zip(params, eps):
                    p.add_(e)
            self._accumulate_grad(model, params, idx)  # gradient at the perturbed point
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)
                for m, st in zip(bn, bn_state):  # running stats updated once (by the first pass) only
                    for k, v in st.items():
                        getattr(m, k).copy_(v)
        opt.step()
        return loss

    @torch.no_grad()
    def evaluate(self, X, y) -> tuple[float, float]:
        tot_loss, correct = 0.0, 0
        cs = int(self.cfg["eval_chunk_size"])
        n_all = len(X)
        if self.dist.enabled:  # each rank its contiguous shard; the sums are all-reduced below
            from fasthess.distributed import shard

            X, y = shard((X, y), self.dist.rank, self.dist.world_size)
        with sharpness_mode(self.model, "eval", disable_dropout=False):  # every module's flag restored after
            for s in range(0, len(X), cs):
                out = self.model(X[s:s + cs])
                tot_loss += float(F.cross_entropy(out, y[s:s + cs], reduction="sum"))
                correct += int((out.argmax(1) == y[s:s + cs]).sum())
        if self.dist.enabled:
            from experiments import ddp

            tot_loss, correct = ddp.all_reduce_sum([tot_loss, correct], self.dist, device=self.device)
            correct = int(round(correct))
        n = max(1, n_all)
        return tot_loss / n, correct / n

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
        vals = []
        v0 = self.tracker.eigenvectors
        for t in torch.linspace(0, 1, n).tolist():
            with torch.no_grad():
                for p, a, b in zip(model.parameters(), w0, w1):
                    p.copy_((1 - t) * a + t * b)
            res = self.tracker.compute(model, v0=v0)
            vals.append(float(res.eigenvalues[0]))
        return {"lambda_between_iterates": max(vals), "lambda_between_values": vals}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        st = {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
              "rng": torch.get_rng_state(), "metrics": self.metrics, "tracker": self.tracker.state_dict(),
              "cfg": self.cfg, "last_loss": self.last_loss}
        if self.dist.enabled:  # a collective: every rank's dropout RNG, so a resumed run continues bit-exactly
            import torch.distributed as dist

            states = [None] * self.dist.world_size
            dist.all_gather_object(states, st["rng"], group=self.dist.group)
            st["rng_per_rank"] = states
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
            return self._run(run_dir)
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(det, warn_only=det_warn)

    def _run(self, run_dir: str | Path | None = None) -> dict[str, Any]:
        """Train until train accuracy >= target, divergence or ``max_steps``; return the summary.

        With ``run_dir``: resumes from ``run_dir/checkpoint.pt`` if present; writes config.json,
        metrics.jsonl (one line per evaluation), checkpoint.pt and, at the end, summary.json.
        Data-parallel: only rank 0 reads the checkpoint (and broadcasts it) and writes files.
        """
        from experiments import ddp

        cfg = self.cfg
        main = self.dist.is_main
        run_dir = Path(run_dir) if run_dir is not None else None
        ckpt = run_dir / "checkpoint.pt" if run_dir else None
        if run_dir and not self.dist.enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run_dir / "config.json", cfg)
            st = load_checkpoint(ckpt, map_location=self.device)  # verified; falls back to checkpoint.pt.prev
            if st is not None:
                self.load_state_dict(st)
        elif run_dir:
            def _read():
                run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_json(run_dir / "config.json", cfg)
                return load_checkpoint(ckpt, map_location="cpu")

            st = ddp.main_decides(_read, self.dist)
            if st is not None:
                self.load_state_dict(st)
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
            if self.step % self.steps_per_epoch == 0 and (self.step // self.steps_per_epoch) % cfg["eval_every_epochs"] == 0:
                rec = self._eval_record()
                evals_done += 1
                if cfg["track_every_evals"] and evals_done % cfg["track_every_evals"] == 0:
                    self._track(rec)
                self.metrics.append(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['train_loss']:.3g}", acc=f"{rec['train_acc']:.3f}",
                                    lam=("-" if self.tracker.latest is None else f"{self.tracker.lambda_max:.4g}"))
                if rec["train_acc"] >= cfg["target_train_acc"]:
                    status = "completed"
                elif run_dir and evals_done % cfg["checkpoint_every_evals"] == 0:
                    state = self.state_dict()  # (a collective when data-parallel)
                    if main:
                        atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(_jsonable(m)) + "\n" for m in self.metrics))
                        save_checkpoint(state, ckpt)
        if bar is not None:
            bar.close()
        # final evaluation and λ_max
        if status != "diverged":
            if not self.metrics or self.metrics[-1]["step"] != self.step:
                self.metrics.append(self._eval_record())
            final = self.metrics[-1]
            if "lambda_max" not in final:
                self._track(final)
            if cfg["between_iterates"]:
                final.update(self.lambda_between_iterates(int(cfg["between_iterates"])))
        else:
            final = self._eval_record()
            final["diverged"] = True
            self.metrics.append(final)
        summary = {
            "status": status, "steps": self.step, "epochs": self.step / self.steps_per_epoch,
            "diverged_step": diverged_step,
            "train_acc": final["train_acc"], "test_acc": final["test_acc"], "train_loss": final["train_loss"],
            "test_loss": final["test_loss"], "lambda_max": final.get("lambda_max"),
            "lambda_residual": final.get("lambda_residual"),
            "lambda_between_iterates": final.get("lambda_between_iterates"),
            "lr": cfg["lr"], "batch_size": self.B, "two_over_lr": 2.0 / cfg["lr"],
            "lambda_hvps_total": sum(r["num_hvps"] for r in self.tracker.history),
            "last_batch_loss": last_loss, "wall_seconds": time.time() - t_start,
        }
        if run_dir:
            state = self.state_dict()  # (a collective when data-parallel)
            state["summary"] = summary  # marks the run finished: a resume from it only rewrites the files below
        if run_dir and main:
            save_checkpoint(state, ckpt)
            self._write_final(run_dir, summary)
        return _jsonable(summary)

    def _write_final(self, run_dir: Path, summary: dict[str, Any]) -> None:
        atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(_jsonable(m)) + "\n" for m in self.metrics))
        atomic_torch_save(self.model.state_dict(), run_dir / "final_model.pt")
        atomic_write_json(run_dir / "summary.json", summary)  # last: its presence means the run is done

    def _eval_record(self) -> dict[str, Any]:
        if self.dist.enabled:  # BatchNorm running statistics: the mean over ranks, equal everywhere
            from experiments import ddp

            ddp.sync_buffers(self.model, self.dist)
        trl, tra = self.evaluate(*self.data.train)
        tel, tea = self.evaluate(*self.data.test)
        return {"step": self.step, "epoch": self.step / self.steps_per_epoch, "train_loss": trl, "train_acc": tra,
                "test_loss": tel, "test_acc": tea, "lr": self.cfg["lr"], "two_over_lr": 2.0 / self.cfg["lr"]}

    def _track(self, rec: dict[str, Any]) -> None:
        r = self.tracker.update(self.model, step=self.step)
        rec.update({"lambda_max": r["lambda_max"], "lambda_residual": r["residual"],
                    "lambda_error_bound": r["error_bound"], "lambda_hvps": r["num_hvps"],
                    "lambda_seconds": r["seconds"], "lambda_converged": r["converged"]})
        if self.cfg["track_extra"]:
            rec.update(curvature.measure(self.cfg["track_extra"], self.model, self.tracker, batch_size=self.B,
                                         seed=self.step))
