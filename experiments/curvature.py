"""Curvature measures beyond λ_max that a run can log at each tracking point (config key ``track_extra``).

Each measure takes the model in its sharpness mode (train mode, dropout off; see
:func:`fasthess.sharpness_mode`) on the tracker's data and chunking, and returns one float:

* ``trace``: tr(H) by Hutch++ with ``TRACE_MATVECS`` products;
* ``ggn_lambda_max``: λ_max of the generalized Gauss-Newton matrix, to the run's ``lambda_tol``;
* ``batch_sharpness``: E_B[g_Bᵀ H_B g_B / ‖g_B‖²] over ``NUM_BATCHES`` minibatches of the training batch size;
* ``minibatch_lambda_max``: E_B[λ_max(H_B)] over the same minibatches;
* ``gradient_fraction``: ‖Vₖᵀg‖²/‖g‖², the share of the full-data gradient in the span of the tracker's top-k
  eigenvectors of this tracking point (one gradient pass).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import fasthess

TRACE_MATVECS = 30
NUM_BATCHES = 8


def _trace(ctx: dict[str, Any]) -> float:
    op = fasthess.HessianOperator(ctx["model"], ctx["loss_fn"], ctx["data"], batch_size=ctx["chunk"], **ctx["comm"])
    return float(fasthess.trace(op, num_matvecs=TRACE_MATVECS, seed=ctx["seed"]).estimate)


def _ggn_lambda_max(ctx: dict[str, Any]) -> float:
    res = fasthess.lambda_max(ctx["model"], ctx["loss_fn"], ctx["data"], batch_size=ctx["chunk"], curvature="ggn",
                              tol=ctx["tol"], seed=ctx["seed"], **ctx["comm"])
    return float(res.eigenvalues[0])


def _minibatch(fn: Callable) -> Callable[[dict[str, Any]], float]:
    def measure(ctx: dict[str, Any]) -> float:
        return float(fn(ctx["model"], ctx["loss_fn"], ctx["data"], minibatch_size=ctx["batch_size"],
                        num_batches=NUM_BATCHES, seed=ctx["seed"]).mean)
    return measure


def _gradient_fraction(ctx: dict[str, Any]) -> float:
    op = fasthess.HessianOperator(ctx["model"], ctx["loss_fn"], ctx["data"], batch_size=ctx["chunk"], **ctx["comm"])
    g = op.gradient()
    V = ctx["tracker"].eigenvectors.to(g.device)  # the top k of the update just taken
    return float((V.T @ g).pow(2).sum() / (g @ g))


MEASURES: dict[str, Callable[[dict[str, Any]], float]] = {
    "trace": _trace,
    "ggn_lambda_max": _ggn_lambda_max,
    "batch_sharpness": _minibatch(fasthess.batch_sharpness),
    "minibatch_lambda_max": _minibatch(fasthess.minibatch_lambda_max),
    "gradient_fraction": _gradient_fraction,
}
SHARDED = ("trace", "ggn_lambda_max", "gradient_fraction")  # the minibatch measures need the whole data set in one process


def measure(names: list[str], model: torch.nn.Module, tracker, *, batch_size: int, seed: int) -> dict[str, float]:
    """The measures ``names`` of ``model`` on ``tracker``'s data, in its sharpness mode; the model is unchanged."""
    comm = {"distributed": True, "process_group": tracker.process_group} if tracker.distributed else {}
    with fasthess.sharpness_mode(model, tracker.mode, tracker.disable_dropout):
        ctx = {"model": model, "loss_fn": tracker.loss_fn, "data": tracker.data, "chunk": tracker.batch_size,
               "batch_size": batch_size, "tol": tracker.tol, "seed": seed, "comm": comm, "tracker": tracker}
        return {name: MEASURES[name](ctx) for name in names}
