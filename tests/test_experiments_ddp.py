"""The runner under torch.distributed (gloo, CPU, float64): 2 and 3 processes spawned here.

Each rank trains with the data-parallel Trainer and compares its weights with a single-process Trainer
given the same configuration: SGD with momentum, full-batch GD in chunks and SAM / ASAM, on global batches
that split unevenly over the ranks (and one that leaves a rank with no example at all). With 2 processes a
short run (evaluations, λ_max tracking, λ between iterates, checkpoints) must give the single-process
summary, and only rank 0 may write files.
"""
from __future__ import annotations

import json
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from conftest import spawn_ranks

N_TRAIN, N_TEST = 37, 11
BASE = dict(dataset="synthetic", model="mlp", hidden=[8], lr=0.1, batch_size=16, chunk_size=5, max_steps=100,
            target_train_acc=1.01, track_every_evals=0)
# name -> (config overrides, steps). 37 examples, batches of 16 (or the full 37) split 8/8, 5/5/6, 18/19, 12/12/13
STEP_CASES = {
    "sgd": (dict(optimizer="sgd", momentum=0.9), 3),
    "gd": (dict(optimizer="gd", lr=0.5), 2),
    "sam": (dict(optimizer="sam", rho=0.3), 2),
    "asam": (dict(optimizer="asam", rho=0.5), 1),
    "tiny_batch": (dict(optimizer="sam", batch_size=2, chunk_size=None), 2),  # 2 examples: a rank gets none
}
RUN_CFG = dict(BASE, optimizer="sgd", momentum=0.5, batch_size=8, chunk_size=3, max_steps=12, track_every_evals=1,
               lambda_tol=1e-10, between_iterates=2)


def _data():
    from experiments.data import DataSplit, load_dataset

    d = load_dataset("synthetic", n_train=N_TRAIN, n_test=N_TEST, dim=5, num_classes=3)
    return DataSplit(d.X_train.double(), d.y_train, d.X_test.double(), d.y_test, d.name, d.num_classes,
                     d.input_shape, dict(d.meta))


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # the models are built in float64
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        torch.save(_checks(rank, world, out_dir), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _checks(rank: int, world: int, out_dir: str) -> dict:
    from experiments.train import Trainer

    data = _data()
    out: dict = {}
    for name, (extra, steps) in STEP_CASES.items():
        cfg = dict(BASE, **extra)
        ref, ddp = Trainer(cfg, data=data, distributed=False), Trainer(cfg, data=data)
        assert ddp.dist.world_size == world and ddp.ddp_model is not None and ref.ddp_model is None
        assert next(ddp.model.parameters()).dtype == torch.float64
        losses = []
        for _ in range(steps):
            losses.append((ref.train_step(), ddp.train_step()))
            ref.step += 1
            ddp.step += 1
        out[name] = (_flat(ref.model), _flat(ddp.model), losses)
        out[name + "_eval"] = (ref.evaluate(*data.train), ddp.evaluate(*data.train))
    if world == 2:
        out["run"] = _run(rank, out_dir, data)
    return out


def _run(rank: int, out_dir: str, data) -> dict:
    """A short run through ``run_one`` in a directory shared by the ranks; records who wrote what."""
    from experiments import sweep, train

    written: list[str] = []

    def recording(fn):
        def wrapper(obj_or_path, *args):
            written.append(str(obj_or_path if isinstance(obj_or_path, (str, os.PathLike)) else args[0]))
            return fn(obj_or_path, *args)
        return wrapper

    saved = {m: {k: getattr(m, k) for k in ("atomic_write_text", "atomic_write_json", "atomic_write_jsonl",
                                           "atomic_torch_save", "save_checkpoint")
                 if hasattr(m, k)} for m in (train, sweep)}
    for m, fns in saved.items():
        for k, fn in fns.items():
            setattr(m, k, recording(fn))
    try:
        if rank == 0:  # the single-process reference, in its own directory
            ref = train.Trainer(RUN_CFG, data=data, distributed=False).run(os.path.join(out_dir, "single"))
        else:
            ref = None
        ddp_dir = os.path.join(out_dir, "ddp")
        first = sweep.run_one(RUN_CFG, ddp_dir, data=data)
        again = sweep.run_one(RUN_CFG, ddp_dir, data=data)  # finished: rank 0 reads summary.json for everyone
    finally:
        for m, fns in saved.items():
            for k, fn in fns.items():
                setattr(m, k, fn)
    return {"ref": ref, "first": first, "again": again,
            "written": [w for w in written if "single" not in w]}


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def ranks(request, tmp_path_factory):
    world = request.param
    tmp = spawn_ranks(_worker, world, tmp_path_factory.mktemp(f"ddp{world}"))
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_ddp_steps_equal_single_process_steps(ranks, case):
    _, rs = ranks
    for r in rs:
        ref, ddp, losses = r[case]
        torch.testing.assert_close(ddp, ref, rtol=1e-12, atol=1e-12)
        assert torch.equal(ddp, rs[0][case][1])  # every rank holds the same weights
        for a, b in losses:  # the reported batch loss is the global batch's mean loss
            assert b == pytest.approx(a, rel=1e-12, abs=1e-14)
        (l_ref, a_ref), (l_ddp, a_ddp) = r[case + "_eval"]
        assert l_ddp == pytest.approx(l_ref, rel=1e-12) and a_ddp == a_ref  # all-reduced evaluation


def test_ddp_run_matches_single_process_and_only_rank0_writes(ranks):
    tmp, rs = ranks
    if len(rs) != 2:
        pytest.skip("the run is checked with 2 processes")
    ref = rs[0]["run"]["ref"]
    assert ref["status"] == "max_steps" and ref["steps"] == RUN_CFG["max_steps"]
    for r in rs:
        s = r["run"]["first"]
        assert set(s) == set(ref)
        for k, v in ref.items():
            if k == "wall_seconds":
                continue
            if isinstance(v, float):
                assert s[k] == pytest.approx(v, rel=1e-8, abs=1e-10), k
            else:
                assert s[k] == v, k
        assert r["run"]["again"] == json.loads((tmp / "ddp" / "summary.json").read_text())
    assert rs[0]["run"]["first"]["lambda_max"] == rs[1]["run"]["first"]["lambda_max"]  # identical on the ranks
    assert rs[1]["run"]["written"] == []  # rank 1 wrote nothing
    names = {os.path.basename(w) for w in rs[0]["run"]["written"]}
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "final_model.pt", "summary.json"} <= names
    single = [json.loads(x) for x in (tmp / "single" / "metrics.jsonl").read_text().splitlines()]
    ddp = [json.loads(x) for x in (tmp / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in ddp] == [m["step"] for m in single] and "lambda_max" in ddp[-1]
    for a, b in zip(single, ddp):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-9)
        if "lambda_max" in a:
            assert b["lambda_max"] == pytest.approx(a["lambda_max"], rel=1e-8)
    from experiments.storage import load_checkpoint

    ckpt = load_checkpoint(tmp / "ddp" / "checkpoint.pt")
    assert len(ckpt["rng_per_rank"]) == 2 and not list((tmp / "ddp").glob("*.tmp*"))
