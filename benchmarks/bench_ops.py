"""Native kernels against their PyTorch equivalents (pytest-benchmark).

Run: ``pytest benchmarks/bench_ops.py --benchmark-only -s``.  Each group times the native op and the
PyTorch equivalent in the same run; at the end a table of min times and ratios (native / torch) is
printed and, when FASTHESS_BENCH_TABLE names a file, written there as markdown.  Accumulate rows also
report the achieved bandwidth (bytes that must move / min time) in extra_info["GBps"].
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch

from fasthess import _ext, ops
from fasthess.testing import devices

CNN = [(16, 3, 3, 3), (16,), (32, 16, 3, 3), (32,), (64, 32, 3, 3), (64,), (256, 1024), (256,), (10, 256), (10,)]
LARGE = [(2_000_000,)] * 8  # 16M parameters: bandwidth-bound on a GPU
BASELINES = ("torch", "read_Q")  # the PyTorch equivalent; for block_orthogonalize the one-read-of-Q roofline
_results: dict[tuple[str, str], dict[str, float]] = {}


def _timed(benchmark, group: str, impl: str, fn: Callable[[], object], device: str, rounds: int | None = None,
           nbytes: int = 0) -> None:  # noqa: ANN001
    """Benchmarks fn (synchronizing CUDA) and records its min time under (group, impl)."""
    def run() -> None:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.group = group
    if rounds is None:
        benchmark(run)
    else:
        benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    best = benchmark.stats.stats.min
    row = {"s": best}
    if nbytes:
        row["GBps"] = benchmark.extra_info["GBps"] = nbytes / best / 1e9
    _results[(group, impl)] = row


@pytest.fixture(scope="module", autouse=True)
def ratio_table() -> Iterator[None]:
    """Prints (and optionally writes) native/torch ratios once the module's benchmarks ran."""
    yield
    lines = ["| group [impl] | impl (ms) | baseline (ms) | ratio impl/baseline | impl GB/s |", "|---|---|---|---|---|"]
    for (group, impl), row in _results.items():
        base = next((_results[(group, b)] for b in BASELINES if (group, b) in _results), None)
        if impl in BASELINES or base is None:
            continue
        gbps = f"{row['GBps']:.1f}" if "GBps" in row else ""
        lines.append(f"| {group} [{impl}] | {row['s'] * 1e3:.3f} | {base['s'] * 1e3:.3f} | {row['s'] / base['s']:.3f} | {gbps} |")
    table = "\n".join(lines)
    print(f"\nbackend={_ext.backend()} threads={torch.get_num_threads()}\n{table}")
    if path := os.environ.get("FASTHESS_BENCH_TABLE"):
        with open(path, "a") as f:
            f.write(table + "\n")


def _param_blocks(shapes: list[tuple[int, ...]], b: int, device: str) -> list[torch.Tensor]:
    return [torch.randn(b, *s, device=device) for s in shapes]


def _torch_accumulate(acc: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Best plain-PyTorch equivalent: one cat, one in-place add."""
    acc.add_(torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1))


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("params", ["cnn", "large"])
@pytest.mark.parametrize("b", [1, 4, 8])
@pytest.mark.parametrize("impl", ["native", "torch", "reference"])
def test_accumulate(benchmark, device: str, params: str, b: int, impl: str) -> None:  # noqa: ANN001
    if params == "large" and device == "cpu":
        pytest.skip("large parameter list is for GPU bandwidth")
    shapes = CNN if params == "cnn" else LARGE
    tensors = _param_blocks(shapes, b, device)
    n = sum(t[0].numel() for t in tensors)
    acc = torch.zeros(b, n, device=device)
    fn = {"native": ops.accumulate, "torch": _torch_accumulate, "reference": ops.accumulate_reference}[impl]
    nbytes = 3 * b * n * 4  # read tensors, read + write acc (float32)
    _timed(benchmark, f"accumulate {device} {params} n={n} b={b}", impl, lambda: fn(acc, tensors), device,
           nbytes=nbytes)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("B,m", [(1, 16), (1, 64), (1, 128), (64, 16), (64, 64), (64, 128), (1024, 16), (1024, 64)])
@pytest.mark.parametrize("impl", ["native", "torch"])
def test_tridiag_eigh(benchmark, device: str, B: int, m: int, impl: str) -> None:  # noqa: ANN001
    """Eigenvalues and first eigenvector components (what spectral_density needs) against dense torch.linalg.eigh."""
    d = torch.randn(B, m, dtype=torch.float64, device=device)
    e = torch.randn(B, m - 1, dtype=torch.float64, device=device)
    fn = {"native": ops.tridiag_eigh, "torch": ops.tridiag_eigh_reference}[impl]
    rounds = 3 if B * m * m >= 64 * 128 * 128 else None
    _timed(benchmark, f"tridiag_eigh {device} B={B} m={m}", impl, lambda: fn(d, e), device, rounds=rounds)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("n,m,b", [(100_000, 16, 1), (100_000, 256, 16), (1_000_000, 16, 1), (1_000_000, 64, 8)])
@pytest.mark.parametrize("impl", ["matmul", "read_Q"])
def test_block_orthogonalize(benchmark, device: str, n: int, m: int, b: int, impl: str) -> None:  # noqa: ANN001
    """block_orthogonalize against the memory roofline: one full read of Q (it needs four)."""
    Q = torch.linalg.qr(torch.randn(n, m, device=device))[0].mT.contiguous()
    W = torch.randn(b, n, device=device)
    fn = (lambda: ops.block_orthogonalize(Q, W)) if impl == "matmul" else (lambda: Q.sum())  # noqa: E731
    nbytes = 4 * (4 * m * n + 6 * b * n)  # 4 passes over Q, W read 4x and written 2x
    _timed(benchmark, f"block_orthogonalize {device} n={n} m={m} b={b}", impl, fn, device,
           nbytes=nbytes if impl == "matmul" else 4 * m * n)
