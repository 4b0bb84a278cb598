"""Certified threshold decisions: is λ_max above or below c, and which c fits an optimizer.

:func:`compare_lambda_max` runs the block Lanczos iteration of :func:`fasthess.eigs` and stops as soon as the
certified interval [θ₁ − ω, θ₁ + bound] excludes c. "Above" needs no gap argument and no Krylov assumption: θ₁ is a
Rayleigh quotient, so λ_max ≥ θ₁ − ω (ω the rounding floor). "Below" needs the full certificate of a claim converged
at ``tol`` (:mod:`fasthess._certificate`), so it costs what :func:`fasthess.eigs` does. When c lies inside the
interval at ``tol`` the answer is ``None`` (λ_max is within tol of c).

:func:`stability_threshold` gives the curvature at which an optimizer's iteration on a quadratic stops being stable
(with step size η): 2/η for gradient descent and SGD; (2 + 2β)/((1 − d)η) for heavy-ball momentum β with dampening d
(``torch.optim.SGD``, the eigenvalue a = ηλ of the iteration x' = x − ηv', v' = βv + (1 − d)λx is stable iff
a(1 − d) < 2 + 2β); (2 + 2β)/((1 + 2β)η) for Nesterov momentum (the same analysis of PyTorch's update
x' = x − η(λx + βv')); coupled weight decay w adds w to every curvature, so the threshold on λ_max(H) is lowered by w.
For Adam the threshold (2 + 2β₁)/((1 − β₁)η) (Cohen et al., 2022) applies to the preconditioned λ_max(P⁻¹H)
(:func:`fasthess.sharpness.adam_preconditioner`), not to λ_max(H). AdamW-type optimizers (decoupled weight decay),
and any other optimizer, get no threshold.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from fasthess.lanczos import (_check_operator, check_options, default_block_size, drive, lanczos_steps,
                               precision_checked, products_dtype)
from fasthess.errors import FasthessError
from fasthess.linop import fixed
from fasthess.results import EigResult

__all__ = ["Decision", "StabilityThreshold", "compare_lambda_max", "stability_threshold"]


@dataclass(frozen=True)
class Decision:
    """``above``: True (λ_max > c), False (λ_max < c) or None (c within the certified interval at tol).

    ``lower`` and ``upper`` bound λ_max (``upper`` is ∞ when the iteration stopped on "above", before any claim
    about the top was certified); ``result`` is the solve behind them."""

    above: bool | None
    threshold: float
    lower: float
    upper: float
    result: EigResult


def compare_lambda_max(op, c: float, *, tol: float = 1e-4, block_size: int | None = None,
                       max_iters: int | None = None, v0: torch.Tensor | None = None, seed: int = 0,
                       random_columns: int = 1) -> Decision:
    """Decide whether λ_max of ``op`` lies above or below ``c``, stopping once the certified interval excludes c.

    Arguments as in :func:`fasthess.eigs` (k = 1, ``which="LA"``); ``tol`` is the accuracy at which a c inside the
    interval is reported as undecided (``above=None``).
    """
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
        raise FasthessError(f"c={c!r} must be a finite number, the threshold λ_max is compared with (e.g. 2 / lr)")
    check_options(1, "LA", tol, block_size, max_iters, None, random_columns)
    n = _check_operator(op, 1)
    start_hvps, start_passes, t0 = op.num_hvps, op.num_passes, time.perf_counter()
    products = products_dtype(op)
    steps = lanczos_steps(n, op.device, products, k=1, which="LA", tol=tol,
                          block_size=block_size or default_block_size(1, op),
                          requested_block=block_size, max_iters=max_iters, v0=v0, seed=seed,
                          random_columns=random_columns, threshold=float(c))
    with fixed(op):
        out = drive(steps, lambda P: op.matmat(P.T).T)
    checked = precision_checked(op, out, products)  # as eigs: float64 products of the Ritz vector
    shift = float(checked.cert.bounds[0] - out.cert.bounds[0])  # what the float64 check added to the bound, else 0
    res = checked.result(op.num_hvps - start_hvps, op.num_passes - start_passes, time.perf_counter() - t0,
                         getattr(op, "contract", None))
    theta, bound = float(res.eigenvalues[0]), float(res.error_bounds[0])
    lower = theta - res.rounding_floor - shift
    upper = theta + bound if res.all_converged else float("inf")
    above = True if lower > c else False if upper < c else None
    return Decision(above=above, threshold=float(c), lower=lower, upper=upper, result=res)


@dataclass(frozen=True)
class StabilityThreshold:
    """The curvature c at which an optimizer's iteration becomes unstable; ``operator`` names what c bounds:
    ``"hessian"`` (λ_max(H)) or ``"preconditioned"`` (λ_max(P⁻¹H), Adam)."""

    value: float
    rule: str
    operator: str


def stability_threshold(optimizer: Any, lr: float | None = None) -> StabilityThreshold | None:
    """The threshold that fits ``optimizer`` (its first parameter group; every group must agree), or, with no
    optimizer, 2/lr for plain gradient descent; None where nothing fits (AdamW-type, other optimizers, lr ≤ 0,
    ``maximize=True``: gradient ascent is unstable at every positive curvature, and heavy-ball with dampening 1,
    whose gradient never enters the step)."""
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float))):
        raise FasthessError(f"lr={lr!r} must be a number (the learning rate), e.g. lr=0.1")
    if optimizer is None:
        return StabilityThreshold(2.0 / lr, "gd: 2/lr", "hessian") if lr is not None and lr > 0 else None
    groups = optimizer.param_groups
    keys = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "betas")
    if len({tuple(repr(g.get(key)) for key in keys) for g in groups}) != 1:
        return None  # groups that disagree on the step have no single threshold
    g = groups[0]
    eta = float(g["lr"])
    if eta <= 0 or g.get("maximize"):
        return None
    if type(optimizer) is torch.optim.SGD:
        beta, damp, wd = float(g.get("momentum", 0)), float(g.get("dampening", 0)), float(g.get("weight_decay", 0))
        if g.get("nesterov"):
            value, rule = (2 + 2 * beta) / ((1 + 2 * beta) * eta), "sgd nesterov: (2+2β)/((1+2β)lr)"
        elif beta and damp >= 1:
            return None
        elif beta:
            value, rule = (2 + 2 * beta) / ((1 - damp) * eta), "sgd heavy-ball: (2+2β)/((1-dampening)lr)"
        else:
            value, rule = 2 / eta, "sgd: 2/lr"
        if wd:
            value, rule = value - wd, rule + " - weight_decay"
        return StabilityThreshold(value, rule, "hessian")
    if type(optimizer) is torch.optim.Adam and not g.get("weight_decay"):
        beta1 = float(g["betas"][0])
        return StabilityThreshold((2 + 2 * beta1) / ((1 - beta1) * eta), "adam: (2+2β1)/((1-β1)lr)",
                                  "preconditioned")
    return None
