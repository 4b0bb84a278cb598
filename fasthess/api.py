"""One-call entry points."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from fasthess.errors import FasthessError
from fasthess.ggn import GGNOperator
from fasthess.hessian import HessianOperator
from fasthess.lanczos import eigs
from fasthess.results import EigResult

CURVATURES = ("hessian", "ggn")


def lambda_max(model: nn.Module, loss_fn: Callable, data, *, batch_size: int | None = None,
               params: Sequence[torch.Tensor] | None = None, allow_stochastic: bool = False, hvp: str = "auto",
               distributed: bool = False, process_group=None, curvature: str = "hessian",
               **eigs_kwargs) -> EigResult:
    """λ_max of the full-dataset training-loss curvature: ``eigs(op, k=1, which="LA", ...)``.

    ``curvature="hessian"`` (default) builds a :class:`HessianOperator`, ``"ggn"`` a :class:`GGNOperator`
    (the generalized Gauss-Newton matrix). Operator arguments are theirs; the rest (``tol``, ``v0``,
    ``block_size``, ``max_iters``, ``seed``, ``progress``) go to :func:`eigs`.
    """
    if curvature not in CURVATURES:
        raise FasthessError(f"curvature={curvature!r} must be one of {CURVATURES}")
    common = dict(batch_size=batch_size, params=params, allow_stochastic=allow_stochastic,
                  distributed=distributed, process_group=process_group)
    if curvature == "ggn":
        if hvp != "auto":
            raise FasthessError("hvp selects how Hessian-vector products are formed and does not apply to "
                                "curvature='ggn'; leave it at 'auto'")
        op = GGNOperator(model, loss_fn, data, **common)
    else:
        op = HessianOperator(model, loss_fn, data, hvp=hvp, **common)
    return eigs(op, k=1, which="LA", **eigs_kwargs)
