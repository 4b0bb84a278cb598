"""Typed results of the fasthess algorithms."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EigResult:
    """Eigenpairs with certificates.

    For each returned Ritz pair (θᵢ, xᵢ) with ‖xᵢ‖ = 1, ``residuals[i]`` is ‖H xᵢ − θᵢ xᵢ‖ computed from the
    actual products, and ``error_bounds[i]`` bounds |λᵢ − θᵢ|: the residual itself, or the Kato–Temple bound
    ‖r‖²/gap where the neighbouring Ritz value is well separated. ``converged[i]`` is true exactly when
    ``error_bounds[i] ≤ tol·|θᵢ|`` (or within roundoff, 10³ε·‖T‖, for eigenvalues at zero), after a
    Kato–Temple claim has survived one confirming pass.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    error_bounds: torch.Tensor
    converged: torch.Tensor
    num_hvps: int
    num_passes: int
    seconds: float
    which: str = "LA"
    tol: float = 1e-4

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    def __repr__(self) -> str:
        vals = ", ".join(f"{v:.6g}" for v in self.eigenvalues.tolist())
        rel = (self.error_bounds / self.eigenvalues.abs().clamp_min(1e-300)).max().item()
        return (f"EigResult(eigenvalues=[{vals}], max relative bound={rel:.1e}, converged={self.all_converged}, "
                f"num_hvps={self.num_hvps}, num_passes={self.num_passes}, seconds={self.seconds:.3f})")
