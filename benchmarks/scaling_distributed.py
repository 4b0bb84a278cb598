"""Time of one Hessian-vector-product pass of a sharded HessianOperator on 1, 2, … processes, and its traffic.

A small CNN on N CIFAR-shaped examples (random, seeded; the time of a pass does not depend on the values)
is split into W contiguous shards (``fasthess.distributed.shard``). Each rank runs the operator with
``distributed=True``; a pass is timed from a barrier to the return of ``matmat`` on the slowest rank
(median over ``--passes`` after one warm-up); the CPU seconds of the busiest rank are reported too, since
on a shared machine the wall time also measures the other users. The collective alone is timed as an all-reduce of a
(b, n) float64 buffer, and the payload per pass is checked against n·b·8 bytes.

    python benchmarks/scaling_distributed.py --worlds 1 2 3                  # CPU, gloo
    python benchmarks/scaling_distributed.py --worlds 1 --device cuda        # one GPU, nccl
    torchrun --nproc-per-node 8 benchmarks/scaling_distributed.py --device cuda --torchrun   # a node of GPUs
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fasthess
from fasthess.distributed import shard


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 8 * 8, 10))


def _timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``fn()``, started together after a barrier."""
    dist.barrier()
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - w0, time.process_time() - c0


def _slowest(times: list[tuple[float, float]], device: torch.device) -> tuple[float, float]:
    """Median over repetitions of the slowest rank's (wall, CPU) seconds."""
    t = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return statistics.median(t[:, 0].tolist()), statistics.median(t[:, 1].tolist())


def measure(args: argparse.Namespace) -> dict | None:
    """Run on every rank of an initialized group; returns the row on rank 0."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{torch.cuda.current_device()}")
    torch.manual_seed(0)
    model = small_cnn().to(device)
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(args.examples, 3, 32, 32, generator=g), torch.randint(0, 10, (args.examples,), generator=g)
    Xs, ys = shard((X, y))
    op = fasthess.HessianOperator(model, nn.CrossEntropyLoss(), (Xs, ys), batch_size=args.chunk, distributed=True)
    V = torch.randn(op.num_params, args.block, generator=g, dtype=torch.float64).to(device)
    op.matmat(V)  # warm-up
    passes = _slowest([_timed(lambda: op.matmat(V), device) for _ in range(args.passes)], device)
    buf = torch.zeros(args.block, op.num_params, dtype=torch.float64, device=device)
    comm, _ = _slowest([_timed(lambda: dist.all_reduce(buf), device) for _ in range(args.passes)], device)
    if rank != 0:
        return None
    return {"world": world, "device": device.type, "threads_per_rank": torch.get_num_threads(),
            "examples": args.examples, "examples_per_rank_max": -(-args.examples // world), "n": op.num_params,
            "b": args.block, "pass_s": passes[0], "pass_cpu_s": passes[1], "allreduce_s": comm,
            "bytes_per_pass": op.comm.pass_bytes, "bytes_check": op.comm.pass_bytes == op.num_params * args.block * 8}


def _init(rank: int, world: int, init_method: str, args: argparse.Namespace) -> None:
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", init_method=init_method,
                            rank=rank, world_size=world, timeout=timedelta(minutes=10))


def _spawned(rank: int, world: int, store: str, args: argparse.Namespace, out: str) -> None:
    _init(rank, world, f"file://{store}", args)
    try:
        row = measure(args)
        if row is not None:
            with open(out, "w") as f:
                json.dump(row, f)
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 3], help="process counts to spawn")
    p.add_argument("--examples", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=256, help="batch_size of the operator")
    p.add_argument("--block", type=int, default=4, help="products per pass (b)")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--torchrun", action="store_true", help="run under torchrun instead of spawning")
    args = p.parse_args()
    if args.torchrun:
        _init(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", args)
        row = measure(args)
        dist.destroy_process_group()
        rows = [row] if row is not None else []
    else:
        rows = []
        for world in args.worlds:
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "row.json")
                mp.spawn(_spawned, args=(world, os.path.join(tmp, "store"), args, out), nprocs=world, join=True)
                with open(out) as f:
                    rows.append(json.load(f))
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
