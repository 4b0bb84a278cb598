"""Data parallelism over ``torch.distributed``: sharded curvature operators and data-parallel training helpers.

Math. Rank r of a process group of P ranks holds a shard S_r of the data set (n_r examples; shards may be
uneven, N = Σ_r n_r). The full-data curvature is

    H V = (1/W) Σ_r A_r,      A_r = Σ_{chunks c ∈ S_r} ∇²S_c V   (a (b, n) float64 buffer),

where S_c is chunk c's loss sum and W = Σ_r W_r the loss's normalizer (:mod:`fasthess._criteria`: the example
count for a mean, the summed class weights of the targets for a weighted cross-entropy, ...). Each rank
accumulates its own A_r, one all-reduce (SUM) of the flat buffer forms Σ_r A_r on every rank, and every rank
divides by the same W. The example count N is all-reduced once, at construction (when every rank knows it);
W (and N, when some rank passes an iterable of batches whose length is unknown) once, after the first pass.
Per data pass the payload is b·n·8 bytes in one collective, whatever the number of parameter tensors or
examples; a ring all-reduce sends and receives about 2(P−1)/P of it per rank.

Agreement. Every rank enters every collective. A rank whose part of a pass fails (an exception, changed
data, a non-finite loss) still enters the pass's all-reduce, with its buffer filled with NaN: the sum is
then NaN on every rank, so every rank raises and none is left waiting in a collective. The all-reduced
buffer is bitwise identical on all ranks, so the eigensolvers, fed the same seeded probes, take the same
float64 steps and the same convergence decisions everywhere (on ranks with the same hardware and libraries).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist

from fasthess.errors import FasthessError

if TYPE_CHECKING:  # torch builds without distributed support lack the class
    from torch.distributed import ProcessGroup

T = TypeVar("T")


def resolve_group(distributed: bool, process_group: ProcessGroup | None) -> ProcessGroup | None:
    """The process group of an operator: ``process_group`` if given, the default group if ``distributed``,
    else None (single process)."""
    if process_group is None and not distributed:
        return None
    if not dist.is_available() or not dist.is_initialized():
        raise FasthessError(
            "distributed=True (or a process_group) needs an initialized torch.distributed process group; run under "
            "torchrun and call torch.distributed.init_process_group('nccl' on GPUs, 'gloo' on CPUs) first")
    return process_group if process_group is not None else dist.group.WORLD


class ShardComm:
    """The collectives of one sharded operator on one process group, with byte counters.

    Attributes:
        group, rank, world_size: the process group and this process's place in it.
        num_examples: the global example count N (None until it is known, see the module docstring).
        normalizer: the global normalizer W of the loss (None before the first pass).
        pass_bytes: payload of the last data pass's all-reduce, b·n·8 bytes for a float64 (b, n) block.
        setup_bytes: payload of the one-time count agreements.
        total_bytes, num_collectives: all payload and collectives so far.
    """

    def __init__(self, group: ProcessGroup, device: torch.device) -> None:
        self.group, self.device = group, device
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.num_examples: int | None = None
        self.normalizer: float | None = None  # W, the loss's normalizer over all shards, agreed after the first pass
        self.pass_bytes = self.setup_bytes = self.total_bytes = self.num_collectives = 0

    def _all_reduce(self, t: torch.Tensor) -> int:
        """SUM over ranks in place; returns the payload in bytes."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        nbytes = t.numel() * t.element_size()
        self.total_bytes += nbytes
        self.num_collectives += 1
        return nbytes

    def _agree_count(self, local: int | None, failed: bool) -> bool:
        """All-reduce (n_r, rank has no count yet, rank failed); sets N when every rank knows its count.

        Returns False when some rank failed. ``local`` None means the count is known only after a pass."""
        buf = torch.tensor([local or 0, local is None, failed], dtype=torch.int64, device=self.device)
        self.setup_bytes += self._all_reduce(buf)
        total, unknown, failures = buf.tolist()
        if not failures and not unknown:
            self.num_examples = total
        return not failures

    def setup(self, build: Callable[[], T], local_count: Callable[[T], int | None]) -> T:
        """Run this rank's part of the construction, then the count agreement (entered even if ``build`` raised)."""
        try:
            built = build()
        except Exception:
            self._agree_count(None, failed=True)
            raise
        if not self._agree_count(local_count(built), failed=False):
            raise FasthessError("another rank failed while building the sharded operator (its own exception names "
                                "the cause); every rank must build the operator with a valid, non-empty shard")
        return built

    def run_pass(self, acc: torch.Tensor, local_pass: Callable[[], tuple[torch.Tensor, torch.Tensor | None]],
                 local_count: Callable[[], int | None]) -> torch.Tensor:
        """Run this rank's part of a data pass, accumulating A_r into ``acc``, then all-reduce ``acc`` to Σ_r A_r.

        ``local_pass`` returns this rank's chunk losses and, on the first pass, its part W_r of the loss's
        normalizer (None for a sum). If it raises, or a loss is not finite, ``acc`` is filled with NaN before the
        all-reduce (so every rank sees a non-finite result and raises); the exception is re-raised after the
        collectives. Returns the local chunk losses.
        """
        try:
            losses, part = local_pass()
        except Exception:
            acc.fill_(float("nan"))
            self._reduce(acc, None, None, failed=True)
            raise
        acc.masked_fill_(~torch.isfinite(losses).all(), float("nan"))
        self._reduce(acc, local_count(), part, failed=False)
        return losses

    def _reduce(self, acc: torch.Tensor, local_count: int | None, part: torch.Tensor | None, failed: bool) -> None:
        self.pass_bytes = self._all_reduce(acc)
        if self.normalizer is not None:
            return
        # the first pass agrees on W (and on N when some rank did not know its count); a rank that failed voids it
        failed = failed or local_count is None
        buf = torch.zeros(3, dtype=torch.float64, device=self.device)
        buf[0] = 0.0 if part is None else part.to(buf)
        buf[1], buf[2] = float(local_count or 0), float(failed)
        self.setup_bytes += self._all_reduce(buf)
        total, count, failures = buf.tolist()
        if failures:
            if not failed:
                raise FasthessError("another rank failed during the first data pass (its own exception names the "
                                    "cause); fix that rank's data, then build the operator again on every rank")
            return
        self.normalizer = total
        if self.num_examples is None:
            self.num_examples = int(count)


# ---- data-parallel training helpers ----------------------------------------------------------------


def _rank_and_size(rank: int | None, world_size: int | None, group: ProcessGroup | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        if not dist.is_available() or not dist.is_initialized():
            raise FasthessError("pass rank and world_size, or initialize torch.distributed first")
        rank = dist.get_rank(group) if rank is None else rank
        world_size = dist.get_world_size(group) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise FasthessError(f"rank={rank} must satisfy 0 ≤ rank < world_size={world_size}")
    return rank, world_size


def shard_range(num_examples: int, rank: int | None = None, world_size: int | None = None,
                group: ProcessGroup | None = None) -> range:
    """Rows ⌊rN/W⌋ … ⌊(r+1)N/W⌋−1 of rank r: contiguous, sizes differ by at most one, and the shards of
    ranks 0…W−1 concatenated give all N rows in order."""
    rank, world_size = _rank_and_size(rank, world_size, group)
    return range(rank * num_examples // world_size, (rank + 1) * num_examples // world_size)


def shard(data: tuple[torch.Tensor, torch.Tensor], rank: int | None = None, world_size: int | None = None,
          group: ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous shard (see :func:`shard_range`) of ``(X, y)``; views, no copies."""
    X, y = data
    rows = shard_range(X.shape[0], rank, world_size, group)
    return X[rows.start:rows.stop], y[rows.start:rows.stop]


def ddp_loss_scale(local_count: int, global_count: int, world_size: int) -> float:
    """Factor s_r = n_r·W/B for rank r's mean loss on n_r of a global batch of B examples.

    DistributedDataParallel averages gradients over the W ranks: (1/W) Σ_r s_r ∇L_r = Σ_r (n_r/B) ∇L_r,
    the gradient of the global batch's mean loss, also when the shards are uneven (s_r = 1 when even)."""
    return local_count * world_size / global_count


def is_main_process(group: ProcessGroup | None = None) -> bool:
    """True on rank 0, and in a process without torch.distributed: the process that writes outputs."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank(group) == 0
