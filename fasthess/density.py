"""Spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

The spectral density of A ∈ ℝ^{n×n} with eigenpairs (λᵢ, uᵢ) is φ(t) = (1/n) Σᵢ δ(t − λᵢ). For a unit
probe v = z/√n with Rademacher z, the measure μ_v = Σᵢ (uᵢᵀv)² δ(t − λᵢ) satisfies E[μ_v] = φ.
m steps of Lanczos started at v produce a tridiagonal T = tridiag(β, α, β) whose eigenvalues θₖ
(the *nodes*) and squared first eigenvector components τₖ = (Sₖ₁)² (the *weights*, Σₖ τₖ = 1) form the
m-point Gauss quadrature of μ_v:

    ∫ p dμ_v = vᵀ p(A) v = Σₖ τₖ p(θₖ)     exactly for every polynomial p of degree ≤ 2m − 1.

In particular the first moment Σₖ τₖθₖ = α₁ = vᵀAv is Hutchinson's estimate of tr(A)/n, and the extreme
nodes converge to the extreme eigenvalues fastest. Averaging over probes estimates φ; a Gaussian of
width σ at each node gives a smooth density.

All probes run together: each Lanczos step applies the operator to the (n, num_probes) block of the
current vectors, one data pass for all probes, and every probe's new vector is fully reorthogonalized
(two Gram–Schmidt passes) against that probe's own basis, so no ghost eigenvalues appear. The basis
costs num_probes · steps · n · 8 bytes. One batched call to :func:`fasthess.ops.tridiag_eigh` gives every
tridiagonal's nodes and the first components of its eigenvectors (the weights are their squares). If a probe's
Krylov space closes early (βₖ = 0, the quadrature is already exact) its recurrence continues from a fresh Gaussian
vector orthogonal to its basis with βₖ = 0, so T decouples and the extra nodes get weight exactly 0.

>>> import torch
>>> from fasthess.linop import MatrixOperator
>>> A = MatrixOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)))
>>> dens = spectral_density(A, num_probes=3, lanczos_steps=4)
>>> dens.nodes.shape, round(dens.mean, 12)
(torch.Size([3, 4]), 2.5)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fasthess import ops
from fasthess._deprecation import positional_until
from fasthess.errors import FasthessError
from fasthess.linop import fixed
from fasthess.trace import rademacher

BREAKDOWN = 1e-10  # βₖ/‖A vₖ‖ below which a probe's Krylov space counts as exhausted


@dataclass(frozen=True)
class Density:
    """Gauss quadratures of the spectral measures of ``num_probes`` random probes.

    ``nodes[j]`` and ``weights[j]`` (each of shape (num_probes, steps)) are probe j's quadrature:
    Ritz values ascending and their weights, which sum to 1. ``num_params`` is n.
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    num_params: int
    num_hvps: int
    num_passes: int

    def probe_moments(self, order: int) -> torch.Tensor:
        """Each probe's Σₖ τₖ θₖ^order = vᵀA^order v (exact for order ≤ 2·steps − 1), shape (num_probes,)."""
        return (self.weights * self.nodes ** order).sum(dim=1)

    def moment(self, order: int) -> float:
        """The estimate (1/n) tr(A^order) = ∫ t^order φ(t) dt, the mean over probes."""
        return float(self.probe_moments(order).mean())

    def moment_std_error(self, order: int) -> float:
        """Standard error of :meth:`moment` over the probes (NaN for one probe)."""
        vals = self.probe_moments(order)
        return float(vals.std() / math.sqrt(vals.shape[0])) if vals.shape[0] > 1 else math.nan

    @property
    def mean(self) -> float:
        """First moment, the estimate of tr(A)/n."""
        return self.moment(1)

    @property
    def trace(self) -> float:
        """n times the first moment: the Hutchinson estimate of tr(A) carried by the probes."""
        return self.num_params * self.mean

    def pdf(self, grid: torch.Tensor, sigma: float) -> torch.Tensor:
        """The density smoothed by a Gaussian of width σ: (1/P) Σⱼ Σₖ τⱼₖ N(t; θⱼₖ, σ²) at each t in ``grid``.

        It integrates to 1 over the real line.
        """
        if not sigma > 0:
            raise FasthessError(f"sigma={sigma!r} must be a positive width")
        t = torch.as_tensor(grid, dtype=torch.float64, device=self.nodes.device)
        z = (t[..., None, None] - self.nodes) / sigma
        kernel = torch.exp(-0.5 * z * z) / (sigma * math.sqrt(2 * math.pi))
        return (kernel * self.weights).sum(dim=(-2, -1)) / self.nodes.shape[0]

    @positional_until(2)
    def plot(self, ax=None, *, sigma: float | None = None, num_points: int = 1000, log: bool = True):
        """Draw :meth:`pdf` on a grid padded around the nodes (σ defaults to 1% of their range); returns the axes."""
        import matplotlib.pyplot as plt

        lo, hi = float(self.nodes.min()), float(self.nodes.max())
        width = max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0))
        sigma = sigma or 0.01 * width
        grid = torch.linspace(lo - 0.05 * width - 3 * sigma, hi + 0.05 * width + 3 * sigma, num_points,
                              dtype=torch.float64)
        dens = self.pdf(grid, sigma).cpu()
        ax = ax if ax is not None else plt.gca()
        ax.plot(grid.numpy(), dens.numpy())
        if log:
            ax.set_yscale("log")
            ax.set_ylim(bottom=max(float(dens.max()) * 1e-8, 1e-300))
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        return ax


def _reorthogonalize(W: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Rows of W (p, n) minus their projections on each probe's basis rows (p, k, n), twice."""
    for _ in range(2):
        W = W - torch.einsum("pk,pkn->pn", torch.einsum("pkn,pn->pk", basis, W), basis)
    return W


def _fresh(basis: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Unit rows (p, n), each orthogonal to its probe's basis rows (p, k, n) with k < n: Gaussian, projected twice."""
    p, _, n = basis.shape
    W = _reorthogonalize(torch.randn(p, n, generator=gen, dtype=torch.float64).to(basis.device), basis)
    W = _reorthogonalize(W / W.norm(dim=1, keepdim=True), basis)
    return W / W.norm(dim=1, keepdim=True)


def _lanczos(op, V: torch.Tensor, steps: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonals (p, steps) and off-diagonals (p, steps − 1) of the p Lanczos tridiagonals started at rows of V."""
    p, n = V.shape
    basis = torch.empty(p, steps, n, dtype=torch.float64, device=V.device)
    alpha = torch.empty(p, steps, dtype=torch.float64, device=V.device)
    beta = torch.zeros(p, max(steps - 1, 0), dtype=torch.float64, device=V.device)
    basis[:, 0] = V
    for k in range(steps):
        W = op.matmat(basis[:, k].T).T
        alpha[:, k] = (W * basis[:, k]).sum(dim=1)
        if k + 1 == steps:
            break
        scale = W.norm(dim=1)
        W = _reorthogonalize(W, basis[:, : k + 1])
        norms = W.norm(dim=1)
        closed = norms <= BREAKDOWN * scale
        beta[:, k] = torch.where(closed, torch.zeros_like(norms), norms)
        W = W / norms[:, None]
        if bool(closed.any()):
            W = torch.where(closed[:, None], _fresh(basis[:, : k + 1], gen), W)
        basis[:, k + 1] = W
    return alpha, beta


@positional_until(1)
def spectral_density(op, *, num_probes: int = 10, lanczos_steps: int = 80, seed: int = 0) -> Density:
    """Estimate the spectral density of a symmetric operator by SLQ (see the module docstring).

    Args:
        op: an operator with ``num_params``, ``device`` and ``matmat`` (e.g. :class:`HessianOperator`).
        num_probes: independent Rademacher probes; all share each data pass (one matmat of this width per step).
        lanczos_steps: Lanczos steps m per probe (clamped to n); the cost is m data passes, m·num_probes products.
        seed: seed of the probes.
    """
    if not hasattr(op, "matmat") or not hasattr(op, "num_params"):
        raise FasthessError(f"op must be a fasthess operator (e.g. HessianOperator), got {type(op).__name__}")
    for name, val in (("num_probes", num_probes), ("lanczos_steps", lanczos_steps)):
        if not isinstance(val, int) or val < 1:
            raise FasthessError(f"{name}={val!r} must be a positive integer")
    n = op.num_params
    steps = min(lanczos_steps, n)
    start_hvps, start_passes = op.num_hvps, op.num_passes
    gen = torch.Generator().manual_seed(seed)
    V = rademacher(n, num_probes, gen, op.device).T / math.sqrt(n)
    with fixed(op):
        alpha, beta = _lanczos(op, V, steps, gen)
    nodes, first = ops.tridiag_eigh(alpha, beta)
    return Density(nodes=nodes, weights=first * first, num_params=n, num_hvps=op.num_hvps - start_hvps,
                   num_passes=op.num_passes - start_passes)
