"""Data-parallel training under ``torchrun``: the process group, this process's place in it, and the few
collectives the runner needs.

``torchrun --nproc-per-node W -m fasthess_experiments run PRESET ...`` starts W processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR/PORT`` set; :func:`init` turns those into the default
process group (gloo for CPU tensors, plus NCCL for CUDA tensors when GPUs are present, each process on GPU
``LOCAL_RANK``). Without those variables everything here is a no-op and the runner is single-process.

How a training step is split (see :class:`experiments.train.Trainer`): every rank draws the same global
batch of B examples (the epoch permutation comes from a seeded generator, identical on all ranks), keeps the
contiguous part ``shard_range(B, rank, W)`` of it (n_r examples; no DistributedSampler, whose padding
would duplicate examples) and back-propagates its summed loss times W/B, so DistributedDataParallel's
average over ranks is the gradient of the global batch's mean loss, also when the parts are uneven.

Only the main process (rank 0) writes files, prints and plots; decisions that depend on files (resume,
skip a finished run) are taken there and broadcast, so every rank takes the same branch and enters the
same collectives.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from fasthess.distributed import shard_range

T = TypeVar("T")

__all__ = ["DistContext", "launched_by_torchrun", "init", "teardown", "context", "is_main", "local_part",
           "all_reduce_sum", "all_gather_objects", "main_decides", "broadcast_from_main", "main_process_only",
           "sync_buffers", "accumulate_grad"]


@dataclass(frozen=True)
class DistContext:
    """This process's place in the data-parallel group; ``group`` None means a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Any = None

    @property
    def enabled(self) -> bool:
        return self.group is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_OWNED = False  # True when init() created the default group (then teardown() destroys it)


def launched_by_torchrun() -> bool:
    """True in a process started by torchrun (or any launcher that sets the same environment)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(backend: str | None = None, timeout_s: float | None = None) -> DistContext:
    """Initialize the default process group from torchrun's environment; return the context.

    A no-op returning the current context when a group already exists, and a single-process context when
    not launched by torchrun. ``backend`` defaults to ``"cpu:gloo,cuda:nccl"`` when CUDA is available
    (CPU tensors over gloo, GPU tensors over NCCL) and ``"gloo"`` otherwise. On GPUs the current device is
    set to ``LOCAL_RANK``, so ``device="cuda"`` in a config means this process's own GPU.
    """
    global _OWNED
    if dist.is_available() and dist.is_initialized():
        return context()
    if not launched_by_torchrun():
        return DistContext()
    if not dist.is_available():
        raise RuntimeError("launched by torchrun, but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if timeout_s is None:
        timeout_s = float(os.environ.get("FASTHESS_DIST_TIMEOUT", "1800"))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    _OWNED = True
    return context()


def teardown() -> None:
    """Destroy the default group if :func:`init` created it. No barrier: after a failure on one rank the
    others may be inside another collective (torchrun then stops them)."""
    global _OWNED
    if _OWNED and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False


def context(group=None) -> DistContext:
    """The current context: rank and size in ``group`` (default: the world) when torch.distributed is
    initialized, else the single-process context."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    group = group if group is not None else dist.group.WORLD
    return DistContext(rank=dist.get_rank(group), world_size=dist.get_world_size(group),
                       local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank(group))), group=group)


def is_main() -> bool:
    """True on rank 0 and in a single process."""
    return context().is_main


def local_part(idx: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's contiguous part ``shard_range(len(idx), rank, W)`` of a global batch (all of it when
    single-process). Parts differ in size by at most one and may be empty when ``len(idx) < W``."""
    if not ctx.enabled:
        return idx
    rows = shard_range(len(idx), ctx.rank, ctx.world_size)
    return idx[rows.start:rows.stop]


def _coll_device(ctx: DistContext, device: torch.device | str | None) -> torch.device:
    """CPU, unless the group's only backend is NCCL (then the current GPU)."""
    if device is not None:
        return torch.device(device)
    backend = str(dist.get_backend(ctx.group))
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def all_reduce_sum(values, ctx: DistContext, device=None) -> list[float]:
    """Element-wise sums over ranks of a list of numbers (float64, one collective); identity when single."""
    values = [float(v) for v in values]
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_coll_device(ctx, device))
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=ctx.group)
    return t.tolist()


def all_gather_objects(obj: T, ctx: DistContext) -> list[T]:
    """Every rank's ``obj``, in rank order (``[obj]`` when single-process)."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj, group=ctx.group)
    return out


def broadcast_from_main(obj: T, ctx: DistContext) -> T:
    """Rank 0's ``obj`` on every rank (pickled; tensors should be on the CPU)."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(ctx.group, 0) if ctx.group is not dist.group.WORLD
                               else 0, group=ctx.group)
    return box[0]


def main_decides(fn: Callable[[], T], ctx: DistContext | None = None) -> T:
    """``fn()`` evaluated on rank 0 only and its result broadcast, so every rank takes the same branch.

    An exception raised by ``fn`` on rank 0 is re-raised on every rank (same type when it can be rebuilt
    from its message, else RuntimeError)."""
    ctx = context() if ctx is None else ctx
    if not ctx.enabled:
        return fn()
    result: tuple[bool, Any] = (True, None)
    if ctx.is_main:
        try:
            result = (True, fn())
        except Exception as exc:  # noqa: BLE001 - forwarded to every rank
            result = (False, exc)
    ok, value = broadcast_from_main(result, ctx)
    if ok:
        return value
    if ctx.is_main:
        raise value
    raise value if isinstance(value, BaseException) else RuntimeError(str(value))


def main_process_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Decorator: call ``fn`` on rank 0 (and in a single process); return None elsewhere."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if is_main() else None

    return wrapper


@torch.no_grad()
def sync_buffers(module: torch.nn.Module, ctx: DistContext) -> None:
    """Make the module's buffers equal on all ranks: floating ones (BatchNorm running statistics) become
    their mean over ranks, the others (``num_batches_tracked``) rank 0's. No-op when single-process or
    when the module has no buffers. A collective: every rank must call it."""
    if not ctx.enabled:
        return
    for b in module.buffers():
        if b.is_floating_point():
            dist.all_reduce(b, op=dist.ReduceOp.SUM, group=ctx.group)
            b.div_(ctx.world_size)
        else:
            dist.broadcast(b, src=dist.get_global_rank(ctx.group, 0) if ctx.group is not dist.group.WORLD
                           else 0, group=ctx.group)


def accumulate_grad(model: torch.nn.Module, params, X: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
                    chunk: int, ctx: DistContext, device=None) -> float:
    """This rank's part of the global batch ``idx`` in chunks of ``chunk``: each chunk's summed loss times W/b
    is back-propagated, DDP's all-reduce on the last chunk only (``no_sync`` before); a model not wrapped in
    DDP has its gradients all-reduced here. ``.grad`` then holds the gradient of the global batch's mean loss;
    returns that loss (all-reduced, so every rank takes the same branch on a non-finite loss)."""
    import contextlib

    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    for p in params:
        p.grad = None
    b, W = len(idx), ctx.world_size
    mine = local_part(idx, ctx)
    starts = list(range(0, len(mine), chunk)) or [0]  # an empty part still joins the all-reduce
    wrapped = isinstance(model, DistributedDataParallel)
    total = 0.0
    for i, s in enumerate(starts):
        j = mine[s:s + chunk]
        sync = i == len(starts) - 1
        with (model.no_sync() if wrapped and not sync else contextlib.nullcontext()):
            loss_sum = F.cross_entropy(model(X[j]), y[j], reduction="sum")
            (loss_sum * (W / b)).backward()
        total += float(loss_sum.detach()) / b
    if not wrapped:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=ctx.group)
            p.grad.div_(W)
    return all_reduce_sum([total], ctx, device=device)[0]
