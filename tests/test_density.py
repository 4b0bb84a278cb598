"""fasthess.spectral_density (SLQ) against the eigenvalues of dense float64 Hessians and matrices."""
from __future__ import annotations

import pytest
import torch

from fasthess.density import spectral_density
from fasthess.errors import FasthessError
from fasthess.hessian import HessianOperator
from fasthess.linop import MatrixOperator
from conftest import LOSSES, dense_hessian, make_data, make_model


@pytest.fixture(scope="module")
def problem():
    model, shape = make_model("tanh_mlp")
    X, y = make_data(shape)
    H = dense_hessian(model, LOSSES["ce"], X, y, batch_size=37)
    return model, X, y, H


@pytest.fixture(scope="module")
def hessian_density(problem):
    """SLQ through real Hessian-vector products: 6 probes share each of the 20 data passes."""
    model, X, y, _ = problem
    op = HessianOperator(model, LOSSES["ce"], (X, y), batch_size=37)
    return spectral_density(op, num_probes=6, lanczos_steps=20, seed=0)


def test_shapes_costs_and_normalized_weights(hessian_density):
    d = hessian_density
    assert d.nodes.shape == d.weights.shape == (6, 20)
    assert (d.num_hvps, d.num_passes) == (120, 20)
    torch.testing.assert_close(d.weights.sum(dim=1), torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-12)
    assert bool((d.weights >= 0).all()) and bool((d.nodes.diff(dim=1) >= 0).all())


def test_extreme_nodes_match_extreme_eigenvalues(problem, hessian_density):
    ev = torch.linalg.eigvalsh(problem[3])
    torch.testing.assert_close(hessian_density.nodes[:, -1], ev[-1].expand(6), rtol=1e-6, atol=0)
    torch.testing.assert_close(hessian_density.nodes[:, 0], ev[0].expand(6), rtol=1e-6, atol=0)
    assert bool((hessian_density.nodes >= ev[0] - 1e-10).all() and (hessian_density.nodes <= ev[-1] + 1e-10).all())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_moments_match_dense_traces_within_three_standard_errors(problem, seed, order):
    H = problem[3]
    d = spectral_density(MatrixOperator(H), num_probes=20, lanczos_steps=10, seed=seed)
    exact = float(torch.linalg.matrix_power(H, order).trace()) / H.shape[0]
    assert abs(d.moment(order) - exact) <= 3 * d.moment_std_error(order)
    if order == 1:
        assert d.trace == pytest.approx(H.shape[0] * d.mean)


def test_gauss_quadrature_is_exact_per_probe():
    """With m = n steps each probe's quadrature is the exact spectral measure of v = z/√n."""
    A = torch.diag(torch.tensor([-2.0, 0.5, 1.0, 3.0, 7.0], dtype=torch.float64))
    d = spectral_density(MatrixOperator(A), num_probes=4, lanczos_steps=5, seed=1)
    # A Rademacher probe divided by √n has (uᵢᵀv)² = 1/n for the standard basis: every node has weight 1/5.
    torch.testing.assert_close(d.weights, torch.full((4, 5), 0.2, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(d.nodes, torch.linalg.eigvalsh(A).expand(4, 5), rtol=0, atol=1e-12)


def test_breakdown_keeps_weights_exact():
    """Three distinct eigenvalues: each Krylov space closes after 3 steps; the extra nodes get weight 0."""
    A = torch.diag(torch.tensor([1.0, 1.0, 1.0, 5.0, 5.0, 7.0, 7.0, 7.0], dtype=torch.float64))
    d = spectral_density(MatrixOperator(A), num_probes=3, lanczos_steps=8, seed=0)
    torch.testing.assert_close(d.weights.sum(dim=1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    heavy = d.weights > 1e-12
    assert bool((heavy.sum(dim=1) == 3).all())
    assert set(d.nodes[heavy].round(decimals=10).tolist()) == {1.0, 5.0, 7.0}
    assert bool(torch.isfinite(d.nodes).all())
    assert bool(((d.nodes > 1 - 1e-10) & (d.nodes < 7 + 1e-10)).all())


def test_steps_are_clamped_to_n():
    d = spectral_density(MatrixOperator(torch.eye(3, dtype=torch.float64)), num_probes=2, lanczos_steps=10)
    assert d.nodes.shape == (2, 3) and d.num_passes == 3


def test_pdf_integrates_to_one(hessian_density):
    d = hessian_density
    lo, hi = float(d.nodes.min()), float(d.nodes.max())
    grid = torch.linspace(lo - 1, hi + 1, 20001, dtype=torch.float64)
    dens = d.pdf(grid, sigma=0.02)
    assert bool((dens >= 0).all())
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(FasthessError, match="sigma"):
        d.pdf(grid, sigma=0.0)


def test_plot_draws_a_line(hessian_density):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    assert hessian_density.plot(ax=ax) is ax
    assert len(ax.lines) == 1 and ax.get_yscale() == "log"
    plt.close(fig)


@pytest.mark.parametrize("kwargs", [{"num_probes": 0}, {"lanczos_steps": 0}, {"num_probes": 2.5}])
def test_bad_arguments(kwargs):
    with pytest.raises(FasthessError):
        spectral_density(MatrixOperator(torch.eye(3, dtype=torch.float64)), **kwargs)
