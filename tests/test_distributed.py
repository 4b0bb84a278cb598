"""Sharded operators over torch.distributed (gloo, CPU): 2 and 3 processes spawned here, uneven shards, float64.

Each world size is spawned once (module-scoped fixture); every rank records what it computed and the
tests below compare the ranks with each other and with the single-process operator on all the data.
"""
from __future__ import annotations

import copy
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

import fasthess
from conftest import LOSSES, make_data, make_model, spawn_ranks
from fasthess.distributed import ddp_loss_scale, is_main_process, shard, shard_range

N, CHUNK, BLOCK = 37, 8, 4
BOUNDS = {2: [0, 25, N], 3: [0, 5, 25, N]}  # deliberately uneven shards: 25/12 and 5/20/12 examples
EIG_KW = dict(k=2, which="LA", tol=1e-12, block_size=BLOCK, seed=0)
LR, RHO = 0.1, 0.05


def _problem():
    model, shape = make_model("tanh_mlp")
    X, y = make_data(shape, n=N)
    return model, LOSSES["ce"], X, y


def _error(fn) -> tuple[str, str] | None:
    """(exception type, message) of ``fn()``, or None if it returned."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - recorded for the parent to check
        return type(exc).__name__, str(exc)
    return None


def _train_step(model: nn.Module, X, y, sam: bool, scale: float = 1.0) -> None:
    """One SGD step, or one SAM step (ascend to θ + ρ g/‖g‖, descend with the gradient there), on (X, y)."""
    loss_fn = LOSSES["ce"]
    params = list(model.parameters())

    def backward() -> None:
        for p in params:
            p.grad = None
        (scale * loss_fn(model(X), y)).backward()

    backward()
    if sam:
        with torch.no_grad():
            norm = torch.cat([p.grad.reshape(-1) for p in params]).norm()
            eps = [RHO * p.grad / norm for p in params]
            for p, e in zip(params, eps):
                p.add_(e)
        backward()
        with torch.no_grad():
            for p, e in zip(params, eps):
                p.sub_(e)
    with torch.no_grad():
        for p in params:
            p.sub_(LR * p.grad)


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        torch.save(_checks(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _checks(rank: int, world: int) -> dict:
    model, loss, X, y = _problem()
    lo, hi = BOUNDS[world][rank], BOUNDS[world][rank + 1]
    Xs, ys = X[lo:hi], y[lo:hi]
    out: dict = {"main": is_main_process()}

    single = fasthess.HessianOperator(model, loss, (X, y), batch_size=CHUNK)
    V = torch.randn(single.num_params, BLOCK, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out["n"], out["ref_hv"], out["ref_eig"] = single.num_params, single.matmat(V), fasthess.eigs(single, **EIG_KW)

    op = fasthess.HessianOperator(model, loss, (Xs, ys), batch_size=CHUNK, distributed=True)
    out["setup"] = (op.num_examples, op.comm.setup_bytes, op.comm.num_collectives)
    out["hv"] = op.matmat(V)
    out["pass_bytes"] = op.comm.pass_bytes
    out["eig"] = fasthess.eigs(op, **EIG_KW)
    out["collectives_per_pass"] = (op.comm.num_collectives - 2) / op.num_passes  # N at construction, W once

    # class-weighted cross-entropy with ignored targets and per-example weights: W is all-reduced
    cw = torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64)
    yi = y.clone()
    yi[[3, 20, 30]] = -100
    w = torch.rand(N, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.2
    wce = nn.CrossEntropyLoss(weight=cw, ignore_index=-100)
    ref = fasthess.HessianOperator(model, wce, (X, yi, w), batch_size=CHUNK)
    sharded = fasthess.HessianOperator(model, wce, (Xs, yi[lo:hi], w[lo:hi]), batch_size=CHUNK, distributed=True)
    out["weighted"], out["ref_weighted"] = sharded.matmat(V), ref.matmat(V)
    out["normalizers"] = (sharded.normalizer, ref.normalizer, float((w * cw[yi.clamp_min(0)])[yi != -100].sum()))

    def penalty(p):  # added once, after the all-reduce, on every rank
        return 0.05 * sum(t.pow(2).sum() for t in p.values())

    out["penalized"] = fasthess.HessianOperator(model, wce, (Xs, yi[lo:hi], w[lo:hi]), batch_size=CHUNK,
                                                distributed=True, penalty=penalty).matmat(V) - out["weighted"]

    # rank 0 passes a DataLoader (count unknown until its first pass), the others tensors
    local = DataLoader(TensorDataset(Xs, ys), batch_size=CHUNK) if rank == 0 else (Xs, ys)
    mixed = fasthess.HessianOperator(model, loss, local, batch_size=None if rank == 0 else CHUNK, distributed=True)
    out["mixed_before"] = mixed.num_examples
    out["mixed_hv"] = mixed.matmat(V)
    out["mixed_setup_bytes"] = mixed.comm.setup_bytes

    # a NaN input on the last rank: every rank raises, and the group is still usable afterwards
    Xn = Xs.clone()
    Xn[-1, 0] = float("nan")
    poisoned = fasthess.HessianOperator(model, loss, (Xn if rank == world - 1 else Xs, ys), batch_size=CHUNK,
                                        distributed=True)
    out["nan_error"] = _error(lambda: poisoned.matmat(V))
    out["hv_after_nan"] = op.matmat(V)

    # rank 0's batches change between passes: every rank raises
    batches = [(Xs[s:s + CHUNK].clone(), ys[s:s + CHUNK]) for s in range(0, Xs.shape[0], CHUNK)]
    changing = fasthess.HessianOperator(model, loss, batches if rank == 0 else (Xs, ys),
                                        batch_size=None if rank == 0 else CHUNK, distributed=True)
    changing.matmat(V)
    batches[0][0].mul_(2)
    out["changed_error"] = _error(lambda: changing.matmat(V))

    # an empty shard on the last rank fails its construction: the other ranks raise instead of waiting
    empty = (Xs[:0], ys[:0]) if rank == world - 1 else (Xs, ys)
    out["build_error"] = _error(
        lambda: fasthess.HessianOperator(model, loss, empty, batch_size=CHUNK, distributed=True))

    # data-parallel SGD and SAM steps on a global batch of N examples, sharded unevenly
    for sam in (False, True):
        ref = copy.deepcopy(model)
        _train_step(ref, X, y, sam)
        ddp = DistributedDataParallel(copy.deepcopy(model))
        _train_step(ddp, Xs, ys, sam, scale=ddp_loss_scale(hi - lo, N, world))
        out[f"step_sam={sam}"] = (torch.cat([p.detach().reshape(-1) for p in ref.parameters()]),
                                  torch.cat([p.detach().reshape(-1) for p in ddp.module.parameters()]))
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def ranks(request, tmp_path_factory) -> list[dict]:
    world = request.param
    tmp = spawn_ranks(_worker, world, tmp_path_factory.mktemp(f"world{world}"))
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


def test_matmat_equals_single_process(ranks):
    for r in ranks:
        torch.testing.assert_close(r["hv"], r["ref_hv"], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(r["mixed_hv"], r["ref_hv"], rtol=1e-12, atol=1e-14)
        assert torch.equal(r["hv"], ranks[0]["hv"])  # bitwise identical on every rank


def _block() -> torch.Tensor:
    """The block every rank multiplies (seeded as in _checks)."""
    model, _, _, _ = _problem()
    n = sum(p.numel() for p in model.parameters())
    return torch.randn(n, BLOCK, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def test_weighted_loss_normalizer_is_all_reduced(ranks):
    for r in ranks:
        torch.testing.assert_close(r["weighted"], r["ref_weighted"], rtol=1e-10, atol=1e-12)
        sharded, single, expected = r["normalizers"]
        assert sharded == pytest.approx(single, rel=1e-14) and single == pytest.approx(expected, rel=1e-14)
        assert torch.equal(r["weighted"], ranks[0]["weighted"])
        torch.testing.assert_close(r["penalized"], 0.1 * _block(), rtol=1e-10, atol=1e-12)


def test_one_collective_of_n_b_8_bytes_per_pass(ranks):
    for r in ranks:
        assert r["pass_bytes"] == r["n"] * BLOCK * 8
        assert r["setup"] == (N, 3 * 8, 1)  # the count agreement at construction: one int64 triple
        assert r["collectives_per_pass"] == 1
        assert r["mixed_before"] is None and r["mixed_setup_bytes"] == 2 * 3 * 8  # counted once, after pass 1


def test_eigs_identical_on_every_rank_and_equal_to_single_process(ranks):
    first = ranks[0]["eig"]
    for r in ranks:
        eig = r["eig"]
        for field in ("eigenvalues", "eigenvectors", "residuals", "error_bounds", "converged"):
            assert torch.equal(getattr(eig, field), getattr(first, field)), field
        assert (eig.num_passes, eig.num_hvps) == (first.num_passes, first.num_hvps)
        assert eig.all_converged
        torch.testing.assert_close(eig.eigenvalues, r["ref_eig"].eigenvalues, rtol=1e-10, atol=0)


def test_failures_are_collective(ranks):
    world = len(ranks)
    for rank, r in enumerate(ranks):
        kind, msg = r["nan_error"]
        assert kind == "NonFiniteError"
        assert ("chunk" in msg) if rank == world - 1 else ("another rank" in msg)
        torch.testing.assert_close(r["hv_after_nan"], r["hv"], rtol=0, atol=0)
        assert r["changed_error"][0] == ("DataChangedError" if rank == 0 else "NonFiniteError")
        kind, msg = r["build_error"]
        assert kind == "FasthessError" and (("empty" in msg) if rank == world - 1 else ("another rank" in msg))
    assert [r["main"] for r in ranks] == [True] + [False] * (world - 1)


@pytest.mark.parametrize("sam", [False, True])
def test_ddp_step_equals_single_process_step(ranks, sam):
    for r in ranks:
        ref, ddp = r[f"step_sam={sam}"]
        torch.testing.assert_close(ddp, ref, rtol=1e-12, atol=1e-14)


def test_shard_is_contiguous_balanced_and_complete():
    X, y = torch.arange(10.0)[:, None], torch.arange(10)
    parts = [shard((X, y), r, 3) for r in range(3)]
    assert [p[0].shape[0] for p in parts] == [3, 3, 4]
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
    assert shard_range(2, 0, 3) == range(0, 0)
    assert ddp_loss_scale(12, 37, 2) == pytest.approx(24 / 37)


def test_distributed_needs_an_initialized_group(small_problem):
    model, loss, X, y = small_problem
    with pytest.raises(fasthess.FasthessError, match="init_process_group"):
        fasthess.HessianOperator(model, loss, (X, y), distributed=True)
