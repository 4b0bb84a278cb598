"""One-call entry points."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from fasthess.hessian import HessianOperator
from fasthess.lanczos import eigs
from fasthess.results import EigResult


def lambda_max(model: nn.Module, loss_fn: Callable, data, *, batch_size: int | None = None,
               params: Sequence[torch.Tensor] | None = None, allow_stochastic: bool = False, hvp: str = "auto",
               distributed: bool = False, process_group=None, **eigs_kwargs) -> EigResult:
    """λ_max of the full-dataset training-loss Hessian: ``eigs(HessianOperator(...), k=1, which="LA", ...)``.

    Operator arguments are those of :class:`HessianOperator`; the rest (``tol``, ``v0``, ``block_size``,
    ``max_iters``, ``seed``, ``progress``) go to :func:`eigs`.
    """
    op = HessianOperator(model, loss_fn, data, batch_size=batch_size, params=params,
                         allow_stochastic=allow_stochastic, hvp=hvp, distributed=distributed,
                         process_group=process_group)
    return eigs(op, k=1, which="LA", **eigs_kwargs)
