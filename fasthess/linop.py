"""The symmetric linear-operator interface that every fasthess algorithm consumes.

An operator A of size n×n exposes ``matmat(V) -> A V`` for V of shape (n, b). The algorithms
(``eigs``, ``trace``, ``spectral_density``) see nothing else, so they work the same on a Hessian,
a Gauss-Newton matrix, a preconditioned Hessian or a plain dense matrix.

>>> import torch
>>> A = MatrixOperator(torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)))
>>> A.matvec(torch.tensor([1.0, 1.0], dtype=torch.float64))
tensor([3., 1.], dtype=torch.float64)
"""
from __future__ import annotations

import contextlib

import torch

from fasthess.errors import FasthessError


class SymmetricOperator:
    """Base class: a symmetric n×n operator with counters of the products it has computed.

    Subclasses implement ``_matmat(V)`` for a float64 V of shape (n, b) on ``self.device``.
    """

    num_params: int
    device: torch.device

    def __init__(self) -> None:
        self.num_hvps = 0
        self.num_passes = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_params, self.num_params)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """A V for V of shape (n, b); returns float64 on ``self.device``. One data pass for all b columns."""
        V = self._check_block(V)
        out = self._matmat(V)
        self.num_hvps += V.shape[1]
        self.num_passes += 1
        return out

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """A v for v of shape (n,)."""
        if v.dim() != 1:
            raise FasthessError(f"matvec expects a vector of shape ({self.num_params},), got {tuple(v.shape)}; use matmat for blocks")
        return self.matmat(v[:, None])[:, 0]

    def fixed_weights(self) -> contextlib.AbstractContextManager:
        """A block in which the caller keeps the operator fixed (the model, its data and whatever the loss reads
        do not change), so the operator may reuse work between products. Every fasthess solver runs inside one;
        this base operator has nothing to reuse."""
        return contextlib.nullcontext()

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` view (float64 numpy in and out)."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def mm(X):
            X = np.asarray(X, dtype=np.float64)
            vec = X.ndim == 1
            V = torch.from_numpy(np.ascontiguousarray(X.reshape(self.num_params, -1))).to(self.device)
            out = self.matmat(V).cpu().numpy()
            return out[:, 0] if vec else out

        return LinearOperator(self.shape, matvec=mm, matmat=mm, rmatvec=mm, dtype=np.float64)

    def _check_block(self, V: torch.Tensor) -> torch.Tensor:
        if not isinstance(V, torch.Tensor):
            raise FasthessError(f"matmat expects a torch.Tensor of shape ({self.num_params}, b), got {type(V).__name__}")
        if V.dim() != 2 or V.shape[0] != self.num_params:
            raise FasthessError(
                f"matmat expects shape ({self.num_params}, b), got {tuple(V.shape)}; "
                "stack vectors as columns (use matvec for a single vector)")
        if not V.is_floating_point():
            raise FasthessError(f"matmat expects a floating-point tensor, got {V.dtype}")
        return V.to(device=self.device, dtype=torch.float64)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class MatrixOperator(SymmetricOperator):
    """A dense symmetric matrix as an operator (tests, small problems, property checks)."""

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__()
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise FasthessError(f"MatrixOperator needs a square matrix, got shape {tuple(A.shape)}")
        self.A = A.to(torch.float64)
        self.num_params = A.shape[0]
        self.device = A.device

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.A @ V


def fixed(op) -> contextlib.AbstractContextManager:
    """``op.fixed_weights()`` for fasthess operators, a no-op context for other duck-typed operators."""
    scope = getattr(op, "fixed_weights", None)
    return scope() if callable(scope) else contextlib.nullcontext()
