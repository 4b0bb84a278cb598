"""Sharpness variants beyond λ_max(H): preconditioned sharpness and minibatch sharpness.

Preconditioned sharpness (Cohen et al., 2022, "Adaptive Gradient Methods at the Edge of Stability"):
an optimizer θ ← θ − P⁻¹(…) with a diagonal preconditioner P ≻ 0 is stable on a quadratic only while
λ_max(P⁻¹H) stays below a threshold. P⁻¹H is not symmetric, but it is similar to S = P^{-1/2} H P^{-1/2}
(P^{1/2} S P^{-1/2} = P⁻¹H), so both have the same real eigenvalues, and an eigenvector u of S gives the
eigenvector P^{-1/2}u of P⁻¹H. :class:`PreconditionedOperator` is S, on which :func:`fasthess.eigs` runs.

For Adam at step t (moments m_t, v_t of the gradients, decays β₁, β₂, step size η, ε), Cohen et al. write
the update as θ ← θ − η P_t⁻¹ m_t with

    P_t = (1 − β₁ᵗ) · diag(√(v_t / (1 − β₂ᵗ)) + ε),

and the stability threshold of λ_max(P_t⁻¹H) is (2 + 2β₁)/((1 − β₁)η) (38/η for β₁ = 0.9);
:func:`adam_preconditioner` and :func:`adam_stability_threshold` return the two.

Minibatch sharpness (Andreyev & Beneventano, 2024, "Edge of Stochastic Stability"), over random
minibatches B of the data with mean loss L_B, gradient g_B and Hessian H_B:

* :func:`batch_sharpness`, E_B[g_Bᵀ H_B g_B / ‖g_B‖²], the expected curvature of each minibatch's
  Hessian along its own gradient: the paper's "Batch Sharpness" (from its 2025 versions on), which SGD
  drives to 2/η. One gradient and one Hessian-vector product per minibatch.
* :func:`minibatch_lambda_max`, E_B[λ_max(H_B)], the quantity the paper's first version (2024) called
  "MiniBS"; it bounds the batch sharpness from above. One certified Lanczos solve per minibatch.

Both return the mean over ``num_batches`` minibatches drawn independently (each without replacement)
and its standard error s/√num_batches.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fasthess._data import is_tensor_pair
from fasthess._deprecation import renamed_keywords
from fasthess.errors import FasthessError
from fasthess.hessian import HessianOperator
from fasthess.lanczos import eigs
from fasthess.linop import SymmetricOperator, fixed
from fasthess._model_operator import ModelOperator
from fasthess.results import EigResult


class PreconditionedOperator(SymmetricOperator):
    """S = P^{-1/2} A P^{-1/2} for a symmetric operator A and a positive diagonal P (the flat vector ``precond_diag``).

    >>> from fasthess.linop import MatrixOperator
    >>> S = PreconditionedOperator(MatrixOperator(torch.eye(2, dtype=torch.float64)), torch.tensor([4.0, 1.0]))
    >>> S.matvec(torch.ones(2, dtype=torch.float64))
    tensor([0.2500, 1.0000], dtype=torch.float64)
    """

    def __init__(self, op, precond_diag: torch.Tensor) -> None:
        super().__init__()
        if not isinstance(precond_diag, torch.Tensor) or precond_diag.shape != (op.num_params,):
            raise FasthessError(f"precond_diag must be a tensor of shape ({op.num_params},), the diagonal of P in the "
                                f"operator's parameter order; got {getattr(precond_diag, 'shape', type(precond_diag))}")
        P = precond_diag.to(device=op.device, dtype=torch.float64)
        if not bool(torch.isfinite(P).all()) or not bool((P > 0).all()):
            raise FasthessError("precond_diag must be finite and strictly positive (a positive definite diagonal "
                                "preconditioner); for Adam, use adam_preconditioner, which adds ε")
        self.op, self.num_params, self.device = op, op.num_params, op.device
        self.inv_sqrt = P.rsqrt()[:, None]

    def fixed_weights(self):
        """The wrapped operator's block (its kept work, e.g. graphs, serves every product of S)."""
        return fixed(self.op)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.inv_sqrt * self.op.matmat(self.inv_sqrt * V)


def preconditioned_lambda_max(op, precond_diag: torch.Tensor, **eigs_kwargs) -> EigResult:
    """λ_max(P⁻¹A) = λ_max(P^{-1/2} A P^{-1/2}) by :func:`fasthess.eigs` (k=1, which="LA").

    The eigenvectors returned are those of the symmetric form S; multiply by P^{-1/2} for those of P⁻¹A.
    ``eigs_kwargs`` (``tol``, ``v0``, ``block_size``, ``max_iters``, ``seed``) go to :func:`fasthess.eigs`.
    """
    return eigs(PreconditionedOperator(op, precond_diag), k=1, which="LA", **eigs_kwargs)


def _param_list(params: ModelOperator | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return params.params if isinstance(params, ModelOperator) else list(params)


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: ModelOperator | Iterable[torch.Tensor]
                        ) -> torch.Tensor:
    """Adam's diagonal P_t = (1 − β₁ᵗ)(√(v_t/(1 − β₂ᵗ)) + ε) as one flat float64 vector (Cohen et al., 2022).

    Works for ``torch.optim.Adam`` and ``AdamW`` (with ``amsgrad`` it uses the running maximum of v).
    ``params`` fixes the order: pass the operator itself, or the parameters it differentiates. The step
    size η is not included; :func:`adam_stability_threshold` gives the threshold for λ_max(P⁻¹H).
    """
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    parts = []
    for p in _param_list(params):
        if id(p) not in groups:
            raise FasthessError("a parameter of the operator is not managed by the optimizer; pass the optimizer "
                                "that trains these parameters")
        group, state = groups[id(p)], optimizer.state.get(p, {})
        if "exp_avg_sq" not in state:
            raise FasthessError("the optimizer has no second-moment state for a parameter (it has not stepped yet, "
                                "or it is not Adam/AdamW); take the preconditioner after at least one optimizer.step()")
        beta1, beta2 = group["betas"]
        t = float(state["step"])
        v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        diag = (1 - beta1 ** t) * ((v.detach().double() / (1 - beta2 ** t)).sqrt() + group["eps"])
        parts.append(diag.reshape(-1))
    return torch.cat(parts)


def adam_stability_threshold(optimizer: torch.optim.Optimizer) -> float:
    """(2 + 2β₁)/((1 − β₁)η), the value at which λ_max(P⁻¹H) equilibrates for Adam (Cohen et al., 2022)."""
    groups = {(g["lr"], g["betas"][0]) for g in optimizer.param_groups}
    if len(groups) != 1:
        raise FasthessError("the optimizer's parameter groups use different lr or β₁, so no single threshold applies")
    (lr, beta1), = groups
    return (2 + 2 * beta1) / ((1 - beta1) * float(lr))


@dataclass(frozen=True)
class MinibatchEstimate:
    """The mean of a per-minibatch quantity, its standard error, the values and the minibatches' indices."""

    mean: float
    std_error: float
    values: torch.Tensor
    indices: list[torch.Tensor]
    num_hvps: int

    def __repr__(self) -> str:
        return (f"MinibatchEstimate(mean={self.mean:.6g}, std_error={self.std_error:.3g}, "
                f"num_batches={len(self.indices)}, num_hvps={self.num_hvps})")


def _minibatches(num_examples: int, minibatch_size: int, num_batches: int, seed: int) -> list[torch.Tensor]:
    if (isinstance(minibatch_size, bool) or not isinstance(minibatch_size, int)
            or not 1 <= minibatch_size <= num_examples):
        raise FasthessError(f"minibatch_size={minibatch_size!r} must be an integer between 1 and the {num_examples} "
                            "examples")
    if not isinstance(num_batches, int) or num_batches < 2:
        raise FasthessError(f"num_batches={num_batches!r} must be an integer ≥ 2 (to estimate a standard error)")
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(num_examples, generator=gen)[:minibatch_size] for _ in range(num_batches)]


def _estimate(model, loss_fn, data, minibatch_size, num_batches, seed, params, per_batch) -> MinibatchEstimate:
    """Apply ``per_batch(op, x, y) -> value`` to the HessianOperator of each random minibatch (one chunk each)."""
    if not is_tensor_pair(data):
        raise FasthessError("minibatch sharpness needs the data as a tuple (X, y) of tensors, to draw random minibatches")
    X, y = data
    if X.shape[0] != y.shape[0]:
        raise FasthessError(f"X and y have different lengths ({X.shape[0]} vs {y.shape[0]})")
    indices = _minibatches(X.shape[0], minibatch_size, num_batches, seed)
    values, hvps = [], 0
    for idx in indices:
        xb, yb = X[idx], y[idx]
        op = HessianOperator(model, loss_fn, (xb, yb), batch_size=minibatch_size, params=params)
        values.append(per_batch(op, xb.to(op.device), yb.to(op.device)))
        hvps += op.num_hvps
    vals = torch.tensor(values, dtype=torch.float64)
    return MinibatchEstimate(mean=float(vals.mean()), std_error=float(vals.std() / math.sqrt(len(values))),
                             values=vals, indices=indices, num_hvps=hvps)


@renamed_keywords(batch_size="minibatch_size")
def batch_sharpness(model: nn.Module, loss_fn: Callable, data, *, minibatch_size: int, num_batches: int = 32,
                    seed: int = 0, params: Sequence[torch.Tensor] | None = None) -> MinibatchEstimate:
    """Batch sharpness E_B[g_Bᵀ H_B g_B / ‖g_B‖²] over random minibatches B (see the module docstring).

    Args:
        data: a tuple ``(X, y)`` of tensors from which the minibatches are drawn.
        minibatch_size: examples per minibatch |B| (the training batch size whose sharpness is measured; each
            minibatch's products run as one chunk). Formerly ``batch_size``, which elsewhere in fasthess is the
            chunk size of an operator; ``batch_size=`` still works, with a FutureWarning, for one release.
        num_batches: minibatches averaged (≥ 2); the cost is one gradient and one HVP each.
        seed: seed of the minibatch draws (``indices`` of the result lists them).
        params: the parameters to differentiate (default: all with ``requires_grad``).
    """
    def along_gradient(op, x, y):
        g = op.gradient()
        gg = float(g @ g)
        if gg == 0.0:
            raise FasthessError("a minibatch gradient is exactly zero, so its direction is undefined; use larger "
                                "minibatches or evaluate away from an exact minimum")
        return float(g @ op.matvec(g)) / gg

    return _estimate(model, loss_fn, data, minibatch_size, num_batches, seed, params, along_gradient)


@renamed_keywords(batch_size="minibatch_size")
def minibatch_lambda_max(model: nn.Module, loss_fn: Callable, data, *, minibatch_size: int, num_batches: int = 32,
                         seed: int = 0, params: Sequence[torch.Tensor] | None = None, **eigs_kwargs
                         ) -> MinibatchEstimate:
    """E_B[λ_max(H_B)] over random minibatches of ``minibatch_size``, each λ_max certified by :func:`fasthess.eigs`.

    Arguments as :func:`batch_sharpness`; ``eigs_kwargs`` (``tol``, ``block_size``, ...) go to ``eigs``.
    Each solve is warm-started from the previous minibatch's top eigenvector. Raises if a solve does not
    converge within its ``max_iters``.
    """
    state: dict[str, torch.Tensor] = {}

    def top(op, x, y):
        res = eigs(op, k=1, which="LA", v0=state.get("v0"), **eigs_kwargs)
        if not res.all_converged:
            raise FasthessError(f"λ_max of a minibatch Hessian did not converge ({res!r}); raise max_iters or tol")
        state["v0"] = res.eigenvectors[:, 0]
        return float(res.eigenvalues[0])

    return _estimate(model, loss_fn, data, minibatch_size, num_batches, seed, params, top)
