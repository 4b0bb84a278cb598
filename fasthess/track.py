"""Track the sharpness λ_max of the full training loss during training, warm-started between calls.

Usage inside any training loop::

    tracker = SharpnessTracker(torch.nn.functional.cross_entropy, (X, y), batch_size=128, every=100)
    for step in range(num_steps):
        train_step(...)
        rec = tracker.maybe_update(model, step, lr=lr)   # λ_max every 100 steps, else None
    tracker.history[-1]["lambda_max"], tracker.history[-1]["two_over_lr"]

Each update builds a :class:`fasthess.HessianOperator` on the model's current weights and runs
:func:`fasthess.eigs` started from the eigenvectors of the previous update (when the parameter count
matches), which typically cuts the Hessian-vector products several-fold once training is slow.

The Hessian is taken in ``mode="train"`` by default (BatchNorm uses per-chunk "ghost batch"
statistics over chunks of ``batch_size``; running statistics are never changed) with dropout
switched off, so the operator is a fixed matrix. ``mode="eval"`` uses running statistics instead.
The model's train/eval flags are restored afterwards.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fasthess._data import is_batched_iterable
from fasthess.errors import FasthessError

__all__ = ["SharpnessTracker", "sharpness_mode"]


#: eigs arguments the tracker sets itself on every update
_OWN_EIGS_ARGS = ("op", "k", "which", "tol", "v0", "progress")


def _check_eigs_kwargs(k: int, tol: float, eigs_kwargs: dict[str, Any]) -> None:
    """Refuse, when the tracker is built, what :func:`fasthess.eigs` would refuse at the first update (possibly hours
    of training later): unknown or reserved names and invalid values; the first update is cold, so its block is
    ``block_size`` as given."""
    import inspect

    from fasthess.lanczos import check_block, check_options, eigs

    known = set(inspect.signature(eigs).parameters) - set(_OWN_EIGS_ARGS)
    bad = sorted(set(eigs_kwargs) - known)
    if bad:
        raise FasthessError(f"SharpnessTracker got unknown argument(s) {bad}; it passes to fasthess.eigs only "
                            f"{sorted(known)} (k, tol and progress are its own arguments)")
    opts = {name: eigs_kwargs[name] for name in ("block_size", "max_iters", "max_basis", "random_columns")
            if name in eigs_kwargs}
    check_options(k, "LA", tol, **opts)
    if opts.get("block_size") is not None:
        check_block(opts["block_size"], k, opts["block_size"])


@contextlib.contextmanager
def sharpness_mode(model: torch.nn.Module, mode: str = "train", disable_dropout: bool = True):
    """Put ``model`` in ``mode`` ("train" or "eval"), dropout off if asked, and restore every module's flag after."""
    if mode not in ("train", "eval"):
        raise FasthessError(f"mode must be 'train' or 'eval', got {mode!r}")
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.train(mode == "train")
        if disable_dropout:
            for m in model.modules():
                if isinstance(m, torch.nn.modules.dropout._DropoutNd):
                    m.eval()
        yield model
    finally:
        for m, f in flags:
            m.training = f


def _as_float(x) -> float:
    if isinstance(x, torch.Tensor):
        return float(x.detach().reshape(-1)[0].item()) if x.numel() else float("nan")
    return float(x)


class SharpnessTracker:
    """λ_max (and optionally the top-k eigenvalues) of the training loss, computed every ``every`` steps.

    Args:
        loss_fn: ``loss_fn(outputs, targets)`` returning the mean loss of a batch.
        data: what :class:`fasthess.HessianOperator` accepts: an ``(X, y)`` tuple, a Dataset or an
            iterable of batches. The Hessian is that of the mean loss over all of it.
        batch_size: chunk size of the Hessian-vector products (also the BatchNorm ghost-batch size
            in train mode; use the training batch size to match the paper).
        k: number of top eigenvalues.
        tol: relative tolerance for :func:`fasthess.eigs`.
        every: ``maybe_update(model, step)`` computes when ``step % every == 0``.
        mode, disable_dropout: see :func:`sharpness_mode`.
        warm_start: start each solve from the previous top k + 1 Ritz vectors (plus a fresh random column).
        lr: default learning rate; records carry ``two_over_lr = 2/lr`` (edge-of-stability line).
        distributed, process_group: passed to :class:`fasthess.HessianOperator`: each process of the group
            passes its own shard as ``data`` and every process must call ``update``/``compute`` at the same
            steps (a collective; the results are identical on all processes).
        batch, penalty, graph_memory: passed to :class:`fasthess.HessianOperator` (the batch layout as a
            :class:`fasthess.BatchSpec`, a penalty added to the loss, the kept-graph budget).
        loggers: callables, each called with every new record dict after it is appended to the history (e.g.
            :class:`fasthess.integrations.tensorboard.TensorBoardSink`).
        eigs_kwargs: passed to :func:`fasthess.eigs` (``block_size``, ``max_iters``, ``seed``, ...).
    """

    def __init__(self, loss_fn, data, *, batch_size: int | None = None, k: int = 1, tol: float = 1e-4,
                 every: int = 1, mode: str = "train", disable_dropout: bool = True, warm_start: bool = True,
                 params=None, lr: float | None = None, allow_stochastic: bool = False, progress: bool = False,
                 distributed: bool = False, process_group=None, loggers: Sequence[Callable[[dict], None]] = (),
                 batch=None, penalty: Callable | None = None, graph_memory: int | None = None,
                 **eigs_kwargs: Any) -> None:
        if every < 1:
            raise FasthessError(f"every must be >= 1, got {every}")
        if mode not in ("train", "eval"):
            raise FasthessError(f"mode must be 'train' or 'eval', got {mode!r}")
        _check_eigs_kwargs(k, tol, eigs_kwargs)
        self.loss_fn = loss_fn
        self.data = data
        self.batch_size = batch_size
        self.k = k
        self.tol = tol
        self.every = every
        self.mode = mode
        self.disable_dropout = disable_dropout
        self.warm_start = warm_start
        self.params = params
        self.lr = lr
        self.allow_stochastic = allow_stochastic
        self.progress = progress
        self.distributed, self.process_group = distributed, process_group
        self.eigs_kwargs = eigs_kwargs
        self.loggers = list(loggers)
        self.operator_kwargs = {"batch": batch, "penalty": penalty, "graph_memory": graph_memory}
        self.history: list[dict[str, Any]] = []
        self._vectors: torch.Tensor | None = None  # (n, k + 1) float64 on CPU

    # ------------------------------------------------------------------ computing
    def should_update(self, step: int) -> bool:
        return step % self.every == 0

    def maybe_update(self, model: torch.nn.Module, step: int, **kw) -> dict[str, Any] | None:
        """``update(model, step)`` when ``step % every == 0``, else None."""
        return self.update(model, step=step, **kw) if self.should_update(step) else None

    def compute(self, model: torch.nn.Module, v0: torch.Tensor | None = None):
        """One eigen-solve on the model's current weights; returns the :class:`fasthess.EigResult`.

        Does not touch the history or the warm-start vectors.
        """
        import fasthess

        self._check_batchnorm_chunks(model)
        with sharpness_mode(model, self.mode, self.disable_dropout):
            kw = {}
            if self.params is not None:
                kw["params"] = self.params() if callable(self.params) else self.params
            op = fasthess.HessianOperator(model, self.loss_fn, self.data, batch_size=self.batch_size,
                                          allow_stochastic=self.allow_stochastic, distributed=self.distributed,
                                          process_group=self.process_group, **self.operator_kwargs, **kw)
            if v0 is not None and v0.shape[0] != op.num_params:
                v0 = None
            if v0 is not None:
                v0 = v0.to(device=getattr(op, "device", v0.device), dtype=torch.float64)
            kw = dict(self.eigs_kwargs)  # a new random column every update: the same one could miss the same crossing
            kw["seed"] = kw.get("seed", 0) + len(self.history)
            return fasthess.eigs(op, k=self.k, which="LA", tol=self.tol, v0=v0, progress=self.progress, **kw)

    def _check_batchnorm_chunks(self, model: torch.nn.Module) -> None:
        """Train mode normalizes each chunk by its own statistics, so the chunk size must be chosen."""
        has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
        if has_bn and self.mode == "train" and self.batch_size is None and not is_batched_iterable(self.data):
            raise FasthessError(
                "the model has BatchNorm and the tracker takes the Hessian in train mode, where each chunk is "
                "normalized by its own statistics; pass SharpnessTracker(..., batch_size=<the training batch size>), "
                "or mode='eval' to use the running statistics")

    def update(self, model: torch.nn.Module, step: int | None = None, *, lr: float | None = None,
               **extra: Any) -> dict[str, Any]:
        """Compute λ_max now, warm-started from the last eigenvectors; append and return the record.

        ``extra`` key/values are copied into the record (e.g. ``epoch=3``).
        """
        v0 = self._vectors if (self.warm_start and self._vectors is not None) else None
        res = self.compute(model, v0=v0)
        warm = v0 is not None and v0.shape[0] == res.eigenvectors.shape[0]
        self._vectors = res.ritz_vectors.detach().to("cpu", torch.float64).clone()
        lr = self.lr if lr is None else lr
        ev = res.eigenvalues.detach().cpu().double()
        rec: dict[str, Any] = {
            "step": step,
            "lambda_max": float(ev[0]),
            "eigenvalues": [float(e) for e in ev],
            "residual": _as_float(res.residuals),
            "error_bound": _as_float(res.error_bounds),
            "converged": bool(torch.as_tensor(res.converged).all()),
            "certificate": res.certificates[0],
            "certificates": list(res.certificates),
            "num_hvps": int(res.num_hvps),
            "num_passes": int(res.num_passes),
            "seconds": float(res.seconds),
            "warm_started": bool(warm),
            "lr": lr,
            "two_over_lr": (2.0 / lr) if lr else None,
        }
        rec.update(extra)
        self.history.append(rec)
        for log in self.loggers:
            log(rec)
        return rec

    # ------------------------------------------------------------------ access
    @property
    def latest(self) -> dict[str, Any] | None:
        return self.history[-1] if self.history else None

    @property
    def lambda_max(self) -> float:
        return self.history[-1]["lambda_max"] if self.history else math.nan

    @property
    def eigenvectors(self) -> torch.Tensor | None:
        """The top k + 1 Ritz vectors of the last update (n, k + 1; up to two more columns when they are tied with the
        (k+1)-th), float64 on the CPU: the eigenvectors and their neighbour, the next warm start, to which
        :func:`fasthess.eigs` adds a fresh random column. The neighbour
        makes a swap of the top two exact: with the eigenvectors alone the random column had to find the new top,
        and missed it at a 2 % gap (tests/test_certificate.py); it costs about 20 % more products."""
        return self._vectors

    def reset(self) -> None:
        """Forget the warm start (e.g. after the model's shape changes); history is kept."""
        self._vectors = None

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """History and warm-start vectors, for ``torch.save`` with the rest of a checkpoint."""
        return {"history": [dict(r) for r in self.history],
                "vectors": None if self._vectors is None else self._vectors.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [dict(r) for r in state.get("history", [])]
        v = state.get("vectors")
        self._vectors = None if v is None else v.detach().to("cpu", torch.float64).clone()
