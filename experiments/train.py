"""One training loop for minibatch SGD, full-batch GD and SAM / ASAM, with λ_max tracking,
atomic checkpoints and bit-exact resumption.

Determinism: the model is built right after ``torch.manual_seed(init_seed)``; epoch ``e`` visits the
examples in ``randperm(N, seed=f(data_seed, e))`` (stateless, so resuming needs only the step);
dropout draws from the global torch RNG, whose state is checkpointed. Checkpoints hold the model,
the optimizer, the RNG state, the step, the metrics so far and the tracker's warm-start vectors.
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

from experiments.data import DataSplit, load_dataset
from experiments.models import build_model

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
    # misc
    "device": "cpu", "deterministic": True, "checkpoint_every_evals": 1,
    "threads": 1,  # CPU threads (0 = torch's default); small models run fastest on one
}


def resolve_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in and checked; unknown keys are an error (catches typos in --set)."""
    unknown = sorted(set(cfg) - set(DEFAULTS) - {"name", "group"})
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(DEFAULTS)}")
    out = dict(DEFAULTS)
    out.update(cfg)
    if out["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {out['optimizer']!r}")
    if not (out["lr"] > 0):
        raise ValueError(f"lr must be > 0, got {out['lr']}")
    if out["optimizer"] != "gd" and (out["batch_size"] is None or int(out["batch_size"]) < 1):
        raise ValueError(f"batch_size must be >= 1, got {out['batch_size']}")
    return out


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _bn_modules(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def has_batchnorm(model) -> bool:
    return bool(_bn_modules(model))


class Trainer:
    """Holds data, model, optimizer and tracker for one run; ``run(run_dir)`` trains with checkpoints."""

    def __init__(self, cfg: dict[str, Any], data: DataSplit | None = None, progress: bool = False):
        self.cfg = cfg = resolve_config(cfg)
        self.device = torch.device(cfg["device"])
        self.progress = progress
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
        torch.manual_seed(10_007 * int(cfg["data_seed"]) + 1)  # dropout noise
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=cfg["lr"], momentum=cfg["momentum"],
                                   weight_decay=cfg["weight_decay"])
        self.step = 0
        self.metrics: list[dict[str, Any]] = []
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
        model = self.model if model is None else model
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
        was = self.model.training
        self.model.eval()
        tot_loss, correct = 0.0, 0
        cs = int(self.cfg["eval_chunk_size"])
        for s in range(0, len(X), cs):
            out = self.model(X[s:s + cs])
            tot_loss += float(F.cross_entropy(out, y[s:s + cs], reduction="sum"))
            correct += int((out.argmax(1) == y[s:s + cs]).sum())
        self.model.train(was)
        n = max(1, len(X))
        return tot_loss / n, correct / n

    def lambda_between_iterates(self, n: int) -> dict[str, Any]:
        """λ_max at ``n`` points interpolating the current weights and those after one more step."""
        model = copy.deepcopy(self.model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=self.cfg["lr"],
                              momentum=self.cfg["momentum"], weight_decay=self.cfg["weight_decay"])
        opt.load_state_dict(self.opt.state_dict())
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
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                "rng": torch.get_rng_state(), "metrics": self.metrics, "tracker": self.tracker.state_dict(),
                "cfg": self.cfg}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        self.step = int(st["step"])
        torch.set_rng_state(st["rng"])
        self.metrics = list(st["metrics"])
        self.tracker.load_state_dict(st["tracker"])

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
        """
        cfg = self.cfg
        run_dir = Path(run_dir) if run_dir is not None else None
        ckpt = run_dir / "checkpoint.pt" if run_dir else None
        if run_dir:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run_dir / "config.json", cfg)
            if ckpt.is_file():
                self.load_state_dict(torch.load(ckpt, weights_only=False, map_location=self.device))
        delay = float(os.environ.get("FASTHESS_EXP_STEP_DELAY", "0") or 0)  # tests: make kill -9 land mid-run
        t_start = time.time()
        status, diverged_step = None, None
        evals_done = len(self.metrics)
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg["max_steps"], initial=self.step, desc=(run_dir.name if run_dir else "train")[:40],
                       leave=False, dynamic_ncols=True, mininterval=0.5)
        last_loss = float("nan")
        while status is None:
            if self.step >= cfg["max_steps"]:
                status = "max_steps"
                break
            loss = self.train_step()
            last_loss = loss
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
                    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(_jsonable(m)) + "\n" for m in self.metrics))
                    atomic_torch_save(self.state_dict(), ckpt)
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
            atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(_jsonable(m)) + "\n" for m in self.metrics))
            atomic_torch_save(self.state_dict(), ckpt)
            atomic_torch_save(self.model.state_dict(), run_dir / "final_model.pt")
            atomic_write_json(run_dir / "summary.json", summary)
        return _jsonable(summary)

    def _eval_record(self) -> dict[str, Any]:
        trl, tra = self.evaluate(*self.data.train)
        tel, tea = self.evaluate(*self.data.test)
        return {"step": self.step, "epoch": self.step / self.steps_per_epoch, "train_loss": trl, "train_acc": tra,
                "test_loss": tel, "test_acc": tea, "lr": self.cfg["lr"], "two_over_lr": 2.0 / self.cfg["lr"]}

    def _track(self, rec: dict[str, Any]) -> None:
        r = self.tracker.update(self.model, step=self.step)
        rec.update({"lambda_max": r["lambda_max"], "lambda_residual": r["residual"],
                    "lambda_error_bound": r["error_bound"], "lambda_hvps": r["num_hvps"],
                    "lambda_seconds": r["seconds"], "lambda_converged": r["converged"]})
