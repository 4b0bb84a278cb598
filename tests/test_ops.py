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
    assert {"accumulate_dot", "tridiag_eigh"} <= set(_ext.native_ops())
    assert _ext.has_kernel("accumulate_dot", "CPU") and _ext.has_kernel("tridiag_eigh", "CPU")
    if os.environ.get("FASTHESS_CUDA") == "1" and torch.cuda.is_available():  # built with CUDA on purpose
        assert _ext.has_kernel("accumulate_dot", "CUDA") and _ext.has_kernel("tridiag_eigh", "CUDA")


# ----------------------------------------------------------------------------------------------
# accumulate_dot


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("acc_dtype", dtypes)
@pytest.mark.parametrize("src_dtype", dtypes)
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("with_other", [False, True])
def test_accumulate_matches_reference(device: str, acc_dtype: torch.dtype, src_dtype: torch.dtype, b: int,
                                      with_other: bool) -> None:
    require_native("accumulate_dot", device)
    tensors = _params(b, src_dtype, device)
    other = _block(b, acc_dtype, device, seed=1) if with_other else None
    acc, expected_acc = _block(b, acc_dtype, device, seed=2), _block(b, acc_dtype, device, seed=2)
    dots = ops.accumulate_dot(acc, tensors, -0.75, other)
    expected = ops.accumulate_dot_reference(expected_acc, tensors, -0.75, other)
    torch.testing.assert_close(acc, expected_acc, **tolerance(acc_dtype))
    assert dots.dtype == torch.float64 and dots.shape == (b,)
    torch.testing.assert_close(dots, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", devices)
def test_accumulate_mixed_dtypes_in_one_list(device: str) -> None:
    require_native("accumulate_dot", device)
    tensors = [t.float() if i % 2 else t for i, t in enumerate(_params(2, torch.float64, device))]
    acc, expected_acc = torch.zeros(2, _numel(), dtype=torch.float64, device=device), torch.zeros(
        2, _numel(), dtype=torch.float64, device=device)
    other = _block(2, torch.float64, device, seed=3)
    dots = ops.accumulate_dot(acc, tensors, 2.0, other)
    torch.testing.assert_close(dots, ops.accumulate_dot_reference(expected_acc, tensors, 2.0, other))
    torch.testing.assert_close(acc, expected_acc)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", dtypes)
def test_accumulate_empty_inputs(device: str, dtype: torch.dtype) -> None:
    require_native("accumulate_dot", device)
    acc = _block(2, dtype, device, seed=0)
    before = acc.clone()
    dots = ops.accumulate_dot(acc, [], 1.0, acc.clone())
    assert torch.equal(acc, before) and torch.equal(dots, torch.zeros(2, dtype=torch.float64, device=device))
    no_rows = torch.zeros(0, _numel(), dtype=dtype, device=device)
    assert ops.accumulate_dot(no_rows, _params(0, dtype, device), 1.0, no_rows).shape == (0,)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", dtypes)
def test_accumulate_is_deterministic(device: str, dtype: torch.dtype) -> None:
    require_native("accumulate_dot", device)
    tensors = [torch.randn(4, 300_000, dtype=dtype, device=device), torch.randn(4, 123, dtype=dtype, device=device)]
    other = torch.randn(4, 300_123, dtype=dtype, device=device)
    runs = []
    for _ in range(2):
        acc = torch.ones(4, 300_123, dtype=dtype, device=device)
        runs.append((ops.accumulate_dot(acc, tensors, 0.3, other), acc))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("impl", [ops.accumulate_dot, ops.accumulate_dot_reference])
def test_accumulate_refuses_bad_arguments(device: str, impl) -> None:  # noqa: ANN001
    require_native("accumulate_dot", device)
    acc = torch.zeros(2, 10, device=device)
    with pytest.raises(RuntimeError, match="elements per row"):
        impl(acc, [torch.zeros(2, 9, device=device)], 1.0)
    with pytest.raises(RuntimeError, match="rows along dim 0"):
        impl(acc, [torch.zeros(3, 10, device=device)], 1.0)
    with pytest.raises(RuntimeError, match="other"):
        impl(acc, [torch.zeros(2, 10, device=device)], 1.0, torch.zeros(2, 10, dtype=torch.float64, device=device))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        impl(acc, [torch.zeros(2, 10, dtype=torch.int64, device=device)], 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        impl(torch.zeros(10, 2, device=device).t(), [torch.zeros(2, 10, device=device)], 1.0)
    if device != "cpu":
        with pytest.raises(RuntimeError, match="acc is on"):
            impl(acc, [torch.zeros(2, 10)], 1.0)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("with_other", [False, True])
def test_accumulate_opcheck(device: str, with_other: bool) -> None:
    require_native("accumulate_dot", device)
    tensors = [torch.randn(2, 3, 4, device=device), torch.randn(2, 5, dtype=torch.float64, device=device)]
    other = torch.randn(2, 17, dtype=torch.float64, device=device) if with_other else None
    acc = torch.zeros(2, 17, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.fasthess.accumulate_dot.default, (acc, tensors, 0.5, other))


# ----------------------------------------------------------------------------------------------
# tridiag_eigh


def _dense(d: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    return torch.diag_embed(d) + torch.diag_embed(e, 1) + torch.diag_embed(e, -1)


def _check_decomposition(d: torch.Tensor, e: torch.Tensor, w: torch.Tensor, v: torch.Tensor) -> None:
    """w ascending, V orthonormal and T V = V diag(w), in float64 to 1e-12 relative to ||T||."""
    scale = 1e-12 if d.dtype == torch.float64 else 1e-5
    T, v64 = _dense(d, e).double(), v.double()
    norm = max(T.abs().amax().item(), 1.0)
    eye = torch.eye(d.shape[-1], dtype=torch.float64, device=d.device)
    assert bool((w[..., 1:] >= w[..., :-1]).all())
    assert (v64.mT @ v64 - eye).abs().max().item() <= scale * 10
    assert (T @ v64 - v64 * w.double()[..., None, :]).abs().max().item() <= scale * 10 * norm


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
    w, v = ops.tridiag_eigh(d, e)
    w_ref, _ = ops.tridiag_eigh_reference(d.double(), e.double(), "none")
    torch.testing.assert_close(w.double(), w_ref, **tolerance(dtype))
    assert w.dtype == v.dtype == dtype
    _check_decomposition(d, e, w, v)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", dtypes)
def test_tridiag_modes_agree(device: str, dtype: torch.dtype) -> None:
    """"first" is row 0 of "full", bit for bit; eigenvalues agree across modes and runs."""
    require_native("tridiag_eigh", device)
    d, e = torch.randn(9, 33, dtype=dtype, device=device), torch.randn(9, 32, dtype=dtype, device=device)
    w, v = ops.tridiag_eigh(d, e, "full")
    w1, first = ops.tridiag_eigh(d, e, "first")
    w0, none = ops.tridiag_eigh(d, e, "none")
    assert none is None and torch.equal(w, w1) and torch.equal(w, w0) and torch.equal(first, v[:, 0, :])
    torch.testing.assert_close((first.double() ** 2).sum(-1), torch.ones(9, dtype=torch.float64, device=device))
    w2, v2 = ops.tridiag_eigh(d, e, "full")
    assert torch.equal(w, w2) and torch.equal(v, v2)


@pytest.mark.parametrize("device", devices)
def test_tridiag_large_m_orthonormal(device: str) -> None:
    require_native("tridiag_eigh", device)
    d, e = torch.randn(3, 512, dtype=torch.float64, device=device), torch.randn(3, 511, dtype=torch.float64,
                                                                              device=device)
    w, v = ops.tridiag_eigh(d, e)
    torch.testing.assert_close(w, ops.tridiag_eigh_reference(d, e, "none")[0], rtol=1e-12, atol=1e-12)
    _check_decomposition(d, e, w, v)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", dtypes)
def test_tridiag_diagonal_and_repeated(device: str, dtype: torch.dtype) -> None:
    require_native("tridiag_eigh", device)
    d = torch.tensor([[3.0, 1.0, 2.0, 1.0, 3.0], [1.0, 2.0, 1.0, 2.0, 5.0]], dtype=dtype, device=device)
    e = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0]], dtype=dtype, device=device)
    w, v = ops.tridiag_eigh(d, e)
    torch.testing.assert_close(w[0], torch.tensor([1.0, 1.0, 2.0, 3.0, 3.0], dtype=dtype, device=device))
    assert torch.equal(v[0].abs().sum(0), torch.ones(5, dtype=dtype, device=device))  # a permutation
    torch.testing.assert_close(w.double(), ops.tridiag_eigh_reference(d.double(), e.double(), "none")[0])
    _check_decomposition(d, e, w, v)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("vectors", ["none", "first", "full"])
def test_tridiag_shapes(device: str, vectors: str) -> None:
    require_native("tridiag_eigh", device)
    w, v = ops.tridiag_eigh(torch.zeros(0, 4, device=device), torch.zeros(0, 3, device=device), vectors)
    assert w.shape == (0, 4) and (v is None or v.shape[0] == 0)
    w, v = ops.tridiag_eigh(torch.ones(2, 3, 5, device=device), torch.ones(2, 3, 4, device=device), vectors)
    assert w.shape == (2, 3, 5) and (v is None or v.shape == {"first": (2, 3, 5), "full": (2, 3, 5, 5)}[vectors])
    w, _ = ops.tridiag_eigh(torch.tensor([2.0, 2.0], device=device), torch.tensor([1.0], device=device), vectors)
    torch.testing.assert_close(w, torch.tensor([1.0, 3.0], device=device))
    with pytest.raises(ValueError, match="m-1"):
        ops.tridiag_eigh(torch.ones(2, 5, device=device), torch.ones(2, 5, device=device), vectors)
    with pytest.raises(RuntimeError, match="m-1"):
        torch.ops.fasthess.tridiag_eigh(torch.ones(2, 5, device=device), torch.ones(2, 5, device=device), 2)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("vectors", [0, 1, 2])
def test_tridiag_opcheck(device: str, vectors: int) -> None:
    require_native("tridiag_eigh", device)
    d, e = torch.randn(3, 6, dtype=torch.float64, device=device), torch.randn(3, 5, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.fasthess.tridiag_eigh.default, (d, e, vectors))


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
