"""Sharpness-aware minimization (SAM, Foret et al. 2021) and its adaptive variant (ASAM, Kwon et al. 2021).

One SAM step: g = ∇L(w); ε = ρ g/‖g‖ (ASAM: ε = ρ T²g/‖Tg‖ with T = |w| + η); the update uses ∇L(w + ε).
BatchNorm running statistics are updated by the first gradient pass only."""
from __future__ import annotations

from collections.abc import Callable

import torch


def bn_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def perturbation(params, rho: float, adaptive: bool, eta: float) -> list[torch.Tensor]:
    """ε of SAM (``adaptive=False``) or ASAM from the gradients in ``p.grad`` (missing ones count as zero)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if adaptive:
        T = [p.detach().abs() + eta for p in params]
        norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(T, grads)))
        return [rho * t * t * g / (norm + 1e-12) for t, g in zip(T, grads)]
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    return [rho * g / (norm + 1e-12) for g in grads]


def perturbed_gradient(model: torch.nn.Module, params, accumulate: Callable[[], float], rho: float,
                       adaptive: bool, eta: float) -> None:
    """Replace ``p.grad`` (the gradient at w) by the gradient at w + ε; weights and BN statistics are restored."""
    eps = perturbation(params, rho, adaptive, eta)
    saved = [p.detach().clone() for p in params]
    bn = bn_modules(model)
    bn_state = [{k: v.clone() for k, v in m.state_dict().items() if k.startswith(("running_", "num_batches"))}
                for m in bn]
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.add_(e)
    accumulate()  # gradient at the perturbed point
    with torch.no_grad():
        for p, w in zip(params, saved):
            p.copy_(w)
        for m, st in zip(bn, bn_state):  # running stats updated once (by the first pass) only
            for k, v in st.items():
                getattr(m, k).copy_(v)
