"""Typed results of the fasthess algorithms."""
from __future__ import annotations

from dataclasses import dataclass

import torch


#: ``EigResult.start``: what the claim that θᵢ is the i-th wanted eigenvalue rests on
RANDOM_START = "random start: the start has a component along every eigenvector (with probability 1)"
WARM_START = ("warm start v0 beside fresh random columns: assumes the random columns explored past v0 (can fail "
              "when a direction they have not yet amplified rose above v0, e.g. over a plateau of eigenvalues; "
              "docs/guides/certificate.md)")
EXPLORED_START = "start explored by an earlier random-started solve (no fresh random column)"


@dataclass(frozen=True)
class EigResult:
    """Eigenpairs with certificates.

    For each returned Ritz pair (θᵢ, xᵢ) with ‖xᵢ‖ = 1, ``residuals[i]`` is ‖H xᵢ − θᵢ xᵢ‖ computed from the
    actual products, and ``error_bounds[i]`` bounds |λᵢ − θᵢ|; ``certificates[i]`` names the bound:

    * ``"residual"``: ‖rᵢ‖ plus the rounding floor; some eigenvalue lies that close, no gap assumed;
    * ``"gap"``: the Kato–Temple bound ‖rᵢ‖²/gap plus the floor, which assumes that no eigenvalue hides between
      θᵢ and its resolved neighbour (:mod:`fasthess._certificate` says when that is trusted);
    * ``"exhausted"``: the Krylov space is the whole space, so the Ritz values are the eigenvalues up to the floor.

    ``converged[i]`` is true exactly when ``error_bounds[i] ≤ tol·|θᵢ|`` (or within roundoff, 10³ε·‖T‖, for
    eigenvalues at zero), no unresolved Ritz value reaches into the wanted range, and a gap-based claim has
    survived one confirming pass. ``rounding_floor`` is ω, the error the products' rounding alone may cause
    (included in every bound). That θᵢ is the i-th *wanted* eigenvalue (not another one) is the Krylov
    assumption, which the random columns of every start block make hold with high probability; ``start`` names
    what it rests on: a random start (:data:`RANDOM_START`), a warm start ``v0`` beside random columns
    (:data:`WARM_START`, an assumption that can fail: a direction the random columns have not yet amplified, e.g.
    above a plateau of eigenvalues, is not seen), or a start explored by an earlier random-started solve
    (:data:`EXPLORED_START`).
    ``precision`` says what the claim rests on about the products' rounding: float64 products; products in a
    lower precision checked against float64 products of the Ritz vectors, the measured shift added to the bound; or,
    for an operator without float64 products and tol ≥ 10⁻⁴ only, the floor ω (:mod:`fasthess._certificate`).
    ``contract`` says, for a model operator, what its being the Hessian of the loss on the whole data rests on:
    the forward's split over the examples checked on each chunk of the first pass (with train-mode BatchNorm as
    ghost batches), the data being one chunk, ``BatchSpec(batch_loss=True)`` declared, or an assumption where the split
    could not be checked (docs/guides/loss_contract.md); None for other operators.
    ``ritz_vectors`` (n, k + 1), or a few more columns when the (k+1)-th is tied with the next ones, are the most
    wanted Ritz vectors, converged or not: the warm start ``v0`` of a later solve on a nearby operator.
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
    certificates: tuple[str, ...] = ()
    rounding_floor: float = 0.0
    ritz_vectors: torch.Tensor | None = None
    precision: str = "float64 products"
    start: str = RANDOM_START
    contract: str | None = None

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    def __repr__(self) -> str:
        vals = ", ".join(f"{v:.6g}" for v in self.eigenvalues.tolist())
        rel = (self.error_bounds / self.eigenvalues.abs().clamp_min(1e-300)).max().item()
        return (f"EigResult(eigenvalues=[{vals}], max relative bound={rel:.1e}, converged={self.all_converged}, "
                f"num_hvps={self.num_hvps}, num_passes={self.num_passes}, seconds={self.seconds:.3f})")
