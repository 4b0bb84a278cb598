"""Property tests: eigs on random symmetric matrices with clustered, repeated and negative eigenvalues."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fasthess


@st.composite
def spectra(draw):
    """A random symmetric matrix with a drawn spectrum: clusters, exact repeats, both signs."""
    n = draw(st.integers(6, 40))
    kind = draw(st.sampled_from(["random", "clustered", "repeated", "negative", "indefinite"]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g, dtype=torch.float64)
    if kind == "clustered":
        base = torch.round(base * 2) / 2 + 1e-6 * torch.randn(n, generator=g, dtype=torch.float64)
    elif kind == "repeated":
        base = torch.round(base)
    elif kind == "negative":
        base = -base.abs() - 0.1
    elif kind == "indefinite":
        base = base * 10
    Qm, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Qm * base) @ Qm.T, base


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(spec=spectra(), k=st.integers(1, 3), which=st.sampled_from(["LA", "SA", "LM"]),
       extra=st.sampled_from([None, 1, 2]), tol=st.sampled_from([1e-3, 1e-6, 1e-10]))
def test_certificates_are_honest(spec, k, which, extra, tol):
    """What the result certifies always holds: the residuals are the true ones, each Ritz value has an eigenvalue
    within its residual, and a converged claim is within tol of an eigenvalue."""
    A, _ = spec
    A = (A + A.T) / 2
    exact = torch.linalg.eigvalsh(A)
    block = None if extra is None else k + extra
    res = fasthess.eigs(fasthess.MatrixOperator(A), k=k, which=which, tol=tol, block_size=block, seed=1)
    scale = exact.abs().max().item()
    X = res.eigenvectors
    true_res = (A @ X - X * res.eigenvalues).norm(dim=0)
    torch.testing.assert_close(res.residuals, true_res, rtol=1e-6, atol=1e-12 * scale)
    dist = (res.eigenvalues[:, None] - exact[None, :]).abs().min(dim=1).values
    assert bool((dist <= res.residuals + 1e-12 * scale).all())
    assert bool((res.error_bounds <= res.residuals + 1e-15 * scale).all())
    for i in range(k):
        if bool(res.converged[i]) and bool(res.error_bounds[i] == res.residuals[i]):
            assert dist[i].item() <= tol * abs(res.eigenvalues[i].item()) + 1e-12 * scale


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(spec=spectra(), k=st.integers(1, 3), which=st.sampled_from(["LA", "SA", "LM"]),
       extra=st.sampled_from([None, 1, 2]))
def test_tight_tolerance_agrees_with_eigvalsh_and_converged_never_lies(spec, k, which, extra):
    """A block of at least k + 1 vectors resolves k-fold repeated eigenvalues (a single vector cannot)."""
    A, _ = spec
    block = None if extra is None else k + extra
    A = (A + A.T) / 2
    exact = torch.linalg.eigvalsh(A)
    res = fasthess.eigs(fasthess.MatrixOperator(A), k=k, which=which, tol=1e-10, block_size=block, seed=1)
    key = {"LA": -exact, "SA": exact, "LM": -exact.abs()}[which]
    want = exact[torch.argsort(key, stable=True)[:k]]
    scale = exact.abs().max().item()
    assert res.all_converged
    err = (res.eigenvalues - want).abs()
    if which == "LM":  # ±λ ties in magnitude may come in either order
        err = (res.eigenvalues.abs() - want.abs()).abs()
    assert bool((err <= 1e-8 * scale).all()), (res.eigenvalues, want)


def test_tiny_operator_exhausts_the_krylov_space():
    A = torch.diag(torch.tensor([5.0, 5.0, 1.0, -2.0], dtype=torch.float64))
    res = fasthess.eigs(fasthess.MatrixOperator(A), k=2, which="LA", tol=1e-12)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([5.0, 5.0], dtype=torch.float64))
    assert res.all_converged


def test_thick_restart_keeps_exactness():
    g = torch.Generator().manual_seed(3)
    n = 300
    Qm, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.linspace(0, 1, n, dtype=torch.float64) ** 3 * 10
    A = (Qm * lam) @ Qm.T
    res = fasthess.eigs(fasthess.MatrixOperator(A), k=3, tol=1e-10, block_size=4, max_basis=16)
    assert res.all_converged
    torch.testing.assert_close(res.eigenvalues, lam.flip(0)[:3], rtol=1e-9, atol=0)


def test_unconverged_is_reported_honestly():
    g = torch.Generator().manual_seed(4)
    n = 400
    Qm, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.linspace(0, 1, n, dtype=torch.float64)  # no gap at the top: slow convergence
    A = (Qm * lam) @ Qm.T
    res = fasthess.eigs(fasthess.MatrixOperator(A), k=1, tol=1e-12, block_size=2, max_iters=5)
    assert not res.all_converged and res.num_passes == 5
    assert abs(res.eigenvalues.item() - 1.0) <= res.error_bounds.item() + 1e-12
