"""One-call entry points."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from fasthess._batch import BatchSpec
from fasthess.errors import FasthessError
from fasthess.ggn import GGNOperator
from fasthess.hessian import HessianOperator
from fasthess.lanczos import eigs
from fasthess.results import EigResult

CURVATURES = ("hessian", "ggn")


def lambda_max(model: nn.Module, loss_fn: Callable, data, *, batch_size: int | None = None,
               params: Sequence[torch.Tensor] | None = None, allow_stochastic: bool = False, hvp: str = "auto",
               distributed: bool = False, process_group=None, curvature: str = "hessian",
               graph_memory: int | None = None, batch: BatchSpec | None = None, penalty: Callable | None = None,
               **eigs_kwargs) -> EigResult:
    """λ_max of the full-dataset training-loss curvature: ``eigs(op, k=1, which="LA", ...)``.

    ``curvature="hessian"`` (default) builds a :class:`HessianOperator`, ``"ggn"`` a :class:`GGNOperator`
    (the generalized Gauss-Newton matrix). Operator arguments (``batch_size``, ``params``, ``allow_stochastic``,
    ``hvp``, ``distributed``, ``process_group``, ``graph_memory``, ``batch``, ``penalty``) are theirs; the rest
    (``tol``, ``v0``, ``block_size``, ``max_iters``, ``seed``, ``progress``) go to :func:`eigs`.
    """
    fixed = sorted(set(eigs_kwargs) & {"k", "which"})
    if fixed:
        raise FasthessError(f"lambda_max computes the largest eigenvalue only (k=1, which='LA'), so {fixed} cannot be "
                            "given; for several eigenvalues call fasthess.eigs(fasthess.HessianOperator(model, loss_fn, "
                            "data, ...), k=2) (or GGNOperator), which takes k and which")
    if curvature not in CURVATURES:
        raise FasthessError(f"curvature={curvature!r} must be one of {CURVATURES}")
    common = dict(batch_size=batch_size, params=params, allow_stochastic=allow_stochastic,
                  distributed=distributed, process_group=process_group, batch=batch, penalty=penalty)
    if curvature == "ggn":
        if hvp != "auto" or graph_memory is not None:
            raise FasthessError("hvp and graph_memory select how Hessian-vector products are formed and do not apply "
                                "to curvature='ggn'; leave them at their defaults")
        op = GGNOperator(model, loss_fn, data, **common)
    else:
        op = HessianOperator(model, loss_fn, data, hvp=hvp, graph_memory=graph_memory, **common)
    return eigs(op, k=1, which="LA", **eigs_kwargs)
