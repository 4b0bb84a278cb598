"""Native kernels of fasthess.ops against their pure-PyTorch references."""
from __future__ import annotations

import os

import pytest
import torch

from fasthess import _ext, ops
from fasthess.testing import devices, dtypes, native_required, require_native, tolerance

# per-row shapes of a parameter list: tiny, odd, multi-dimensional, and one spanning several chunks
SHAPES = [(7,), (3, 5), (1,), (2, 3, 4), (0,), (40_001,), (6, 1, 3)]


def _params(b: int, dtype: torch.dtype, device: str, seed: int = 0) -> list[torch.Tensor]:
    """Per-parameter HVP blocks (b, *shape); the second one is a non-contiguous view."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(b, *s, generator=g, dtype=dtype).to(device) for s in SHAPES]
    out[1] = torch.randn(b, 5, 3, generator=g, dtype=dtype).to(device).transpose(1, 2)
    return out


def _numel() -> int:
    return sum(torch.Size(s).numel() for s in SHAPES)


def _block(b: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    return torch.randn(b, _numel(), generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)


def test_native_ops_loaded_when_built() -> None:
    """A built extension must be the one in use: no silent fallback to the references."""
    if not _ext._built_files():
        if native_required("cpu"):
            pytest.fail(f"FASTHESS_REQUIRE_NATIVE=1 but there is no compiled fasthess._C next to {_ext.__file__}")
        pytest.skip("fasthess._C not built")
    assert _ext._LOAD_ERROR is None, _ext._LOAD_ERROR
    assert _ext.backend() != "python"
    assert set(_ext.native_ops()) == {"accumulate", "tridiag_eigh"}
    assert _ext.has_kernel("accumulate", "CPU") and _ext.has_kernel("tridiag_eigh", "CPU")
    if os.environ.get("FASTHESS_CUDA") == "1" and torch.cuda.is_available():  # built with CUDA on purpose
        assert _ext.has_kernel("accumulate", "CUDA") and _ext.has_kernel("tridiag_eigh", "CUDA")


# ----------------------------------------------------------------------------------------------
# accumulate


def _expected_sum(acc: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """acc + the row-wise concatenation of the tensors, computed in float64 (independent of both implementations)."""
    flat = torch.cat([t.reshape(acc.shape[0], -1).double() for t in tensors], dim=1)
    return acc.double() + flat


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("acc_dtype", dtypes)
@pytest.mark.parametrize("src_dtype", dtypes)
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("impl", ["native", "reference"])
def test_accumulate_adds_the_concatenation(device: str, acc_dtype: torch.dtype, src_dtype: torch.dtype, b: int,
                                           impl: str) -> None:
    if impl == "native":
        require_native("accumulate", device)
    tensors = _params(b, src_dtype, device)
    acc = _block(b, acc_dtype, device, seed=2)
    expected = _expected_sum(acc, tensors).to(acc_dtype)
    assert {"native": ops.accumulate, "reference": ops.accumulate_reference}[impl](acc, tensors) is None
    torch.testing.assert_close(acc, expected, **tolerance(acc_dtype))


@pytest.mark.parametrize("device", devices)
def test_accumulate_mixed_dtypes_in_one_list(device: str) -> None:
    require_native("accumulate", device)
    tensors = [t.float() if i % 2 else t for i, t in enumerate(_params(2, torch.float64, device))]
    acc = torch.zeros(2, _numel(), dtype=torch.float64, device=device)
    ops.accumulate(acc, tensors)
    torch.testing.assert_close(acc, _expected_sum(torch.zeros_like(acc), tensors), rtol=0, atol=0)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", dtypes)
def test_accumulate_empty_inputs(device: str, dtype: torch.dtype) -> None:
    require_native("accumulate", device)
    acc = _block(2, dtype, device, seed=0)
    before = acc.clone()
    ops.accumulate(acc, [])
    assert torch.equal(acc, before)
    no_rows = torch.zeros(0, _numel(), dtype=dtype, device=device)
    ops.accumulate(no_rows, _params(0, dtype, device))
    assert no_rows.shape == (0, _numel())


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("impl", [ops.accumulate, ops.accumulate_reference])
def test_accumulate_refuses_bad_arguments(device: str, impl) -> None:  # noqa: ANN001
    require_native("accumulate", device)
    acc = torch.zeros(2, 10, device=device)
    with pytest.raises(RuntimeError, match="elements per row"):
        impl(acc, [torch.zeros(2, 9, device=device)])
    with pytest.raises(RuntimeError, match="rows along dim 0"):
        impl(acc, [torch.zeros(3, 10, device=device)])
    with pytest.raises(RuntimeError, match="float32 or float64"):
        impl(acc, [torch.zeros(2, 10, dtype=torch.int64, device=device)])
    with pytest.raises(RuntimeError, match="contiguous"):
        impl(torch.zeros(10, 2, device=device).t(), [torch.zeros(2, 10, device=device)])
    if device != "cpu":
        with pytest.raises(RuntimeError, match="acc is on"):
            impl(acc, [torch.zeros(2, 10)])


@pytest.mark.parametrize("device", devices)
def test_accumulate_opcheck(device: str) -> None:
    require_native("accumulate", device)
    tensors = [torch.randn(2, 3, 4, device=device), torch.randn(2, 5, dtype=torch.float64, device=device)]
    acc = torch.zeros(2, 17, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.fasthess.accumulate.default, (acc, tensors))


# ----------------------------------------------------------------------------------------------
# tridiag_eigh


def _dense(d: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    return torch.diag_embed(d) + torch.diag_embed(e, 1) + torch.diag_embed(e, -1)


def _check_quadrature(d: torch.Tensor, e: torch.Tensor, w: torch.Tensor, first: torch.Tensor) -> None:
    """w ascending and the first components z exact for T's moments: Σ_k z_k² w_k^p = (T^p)[0, 0] for p = 0..4, in
    float64 relative to ||T||^p. The moments hold for every orthonormal eigenbasis, so near-degenerate pairs (whose
    individual eigenvectors are ill-conditioned) are checked too."""
    scale = 1e-12 if d.dtype == torch.float64 else 1e-5
    T = _dense(d, e).double()
    norm = max(torch.linalg.matrix_norm(T, ord=2).max().item(), 1.0)
    weights, nodes = first.double() ** 2, w.double()
    assert bool((w[..., 1:] >= w[..., :-1]).all())
    power = torch.eye(d.shape[-1], dtype=torch.float64, device=d.device).expand_as(T)
    for p in range(5):
        moment = (weights * nodes ** p).sum(-1)
        assert (moment - power[..., 0, 0]).abs().max().item() <= scale * 100 * norm ** p, p
        power = power @ T


def _wilkinson(m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W_m^+: nearly degenerate eigenvalue pairs."""
    return (torch.arange(m, dtype=torch.float64) - (m - 1) / 2).abs(), torch.ones(m - 1, dtype=torch.float64)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", dtypes)
@pytest.mark.parametrize("m", [1, 2, 7, 21, 64])
def test_tridiag_matches_dense_eigh(device: str, dtype: torch.dtype, m: int) -> None:
    require_native("tridiag_eigh", device)
    g = torch.Generator().manual_seed(m)
    d = torch.randn(6, m, generator=g, dtype=torch.float64)
    e = torch.randn(6, 2 * m, generator=g, dtype=torch.float64)[:, : 2 * (m - 1) : 2]  # non-contiguous
    d[0], e[0] = _wilkinson(m)
    d, e = d.to(device, dtype), e.to(device, dtype)
    w, first = ops.tridiag_eigh(d, e)
    w_ref, first_ref = ops.tridiag_eigh_reference(d.double(), e.double())
    torch.testing.assert_close(w.double(), w_ref, **tolerance(dtype))
    assert w.dtype == first.dtype == dtype
    # rows 1..5 are random, so their eigenvalues are separated and each |z_k| is well defined
    close = {"rtol": 1e-8, "atol": 1e-8} if dtype == torch.float64 else tolerance(dtype)
    torch.testing.assert_close(first[1:].double().abs(), first_ref[1:].abs(), **close)
    _check_quadrature(d, e, w, first)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", dtypes)
def test_tridiag_repeats_bit_for_bit(device: str, dtype: torch.dtype) -> None:
    require_native("tridiag_eigh", device)
    d, e = torch.randn(9, 33, dtype=dtype, device=device), torch.randn(9, 32, dtype=dtype, device=device)
    w, first = ops.tridiag_eigh(d, e)
    w2, first2 = ops.tridiag_eigh(d, e)
    assert torch.equal(w, w2) and torch.equal(first, first2)
    torch.testing.assert_close((first.double() ** 2).sum(-1), torch.ones(9, dtype=torch.float64, device=device))


@pytest.mark.parametrize("device", devices)
def test_tridiag_large_m(device: str) -> None:
    require_native("tridiag_eigh", device)
    d, e = torch.randn(3, 512, dtype=torch.float64, device=device), torch.randn(3, 511, dtype=torch.float64,
                                                                              device=device)
    w, first = ops.tridiag_eigh(d, e)
    torch.testing.assert_close(w, ops.tridiag_eigh_reference(d, e)[0], rtol=1e-12, atol=1e-12)
    _check_quadrature(d, e, w, first)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", dtypes)
def test_tridiag_diagonal_and_repeated(device: str, dtype: torch.dtype) -> None:
    require_native("tridiag_eigh", device)
    d = torch.tensor([[3.0, 1.0, 2.0, 1.0, 3.0], [1.0, 2.0, 1.0, 2.0, 5.0]], dtype=dtype, device=device)
    e = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0]], dtype=dtype, device=device)
    w, first = ops.tridiag_eigh(d, e)
    torch.testing.assert_close(w[0], torch.tensor([1.0, 1.0, 2.0, 3.0, 3.0], dtype=dtype, device=device))
    # diagonal T: e_0 is the eigenvector of d[0] = 3, so z is one 1 (at a 3) and zeros
    assert sorted(first[0].abs().tolist()) == [0.0, 0.0, 0.0, 0.0, 1.0] and float(w[0][first[0].abs() == 1]) == 3.0
    torch.testing.assert_close(w.double(), ops.tridiag_eigh_reference(d.double(), e.double())[0])
    _check_quadrature(d, e, w, first)


@pytest.mark.parametrize("device", devices)
def test_tridiag_shapes(device: str) -> None:
    require_native("tridiag_eigh", device)
    w, first = ops.tridiag_eigh(torch.zeros(0, 4, device=device), torch.zeros(0, 3, device=device))
    assert w.shape == first.shape == (0, 4)
    w, first = ops.tridiag_eigh(torch.ones(2, 3, 5, device=device), torch.ones(2, 3, 4, device=device))
    assert w.shape == first.shape == (2, 3, 5)
    w, first = ops.tridiag_eigh(torch.ones(2, 1, device=device), torch.ones(2, 0, device=device))
    assert torch.equal(first, torch.ones(2, 1, device=device))
    w, _ = ops.tridiag_eigh(torch.tensor([2.0, 2.0], device=device), torch.tensor([1.0], device=device))
    torch.testing.assert_close(w, torch.tensor([1.0, 3.0], device=device))
    with pytest.raises(ValueError, match="m-1"):
        ops.tridiag_eigh(torch.ones(2, 5, device=device), torch.ones(2, 5, device=device))
    with pytest.raises(RuntimeError, match="m-1"):
        torch.ops.fasthess.tridiag_eigh(torch.ones(2, 5, device=device), torch.ones(2, 5, device=device))


@pytest.mark.parametrize("device", devices)
def test_tridiag_opcheck(device: str) -> None:
    require_native("tridiag_eigh", device)
    d, e = torch.randn(3, 6, dtype=torch.float64, device=device), torch.randn(3, 5, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.fasthess.tridiag_eigh.default, (d, e))


# ----------------------------------------------------------------------------------------------
# block_orthogonalize


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", dtypes)
@pytest.mark.parametrize("m,b", [(0, 2), (1, 1), (16, 4)])
def test_block_orthogonalize(device: str, dtype: torch.dtype, m: int, b: int) -> None:
    n = 1000
    q = torch.linalg.qr(torch.randn(n, max(m, 1), dtype=torch.float64))[0].mT[:m].to(device, dtype)
    w = torch.randn(b, n, dtype=dtype, device=device)
    before = w.clone()
    out, norms = ops.block_orthogonalize(q, w)
    assert torch.equal(w, before)
    if m:
        assert (q @ out.mT).abs().max().item() <= 100 * torch.finfo(dtype).eps * n ** 0.5
    expected = w - (w @ q.mT) @ q
    torch.testing.assert_close(out, expected, **tolerance(dtype))
    torch.testing.assert_close(norms, torch.linalg.vector_norm(expected, dim=1), **tolerance(dtype))
