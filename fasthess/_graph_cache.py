"""Per-chunk gradient graphs kept between the data passes of one solve.

A double-backward Hessian-vector product of chunk c builds the graph of gᶜ = ∇_θ L_c(θ) (one forward and one
backward with ``create_graph``) and then differentiates gᶜ·v. The graph depends on θ, the model's buffers and
modes, and the chunk, but not on v. An eigensolver applies the same Hessian 5-20 times, so keeping the graphs
turns every product after the first pass into the second backward alone: measured on 2 CPU cores, 2.1 instead
of 3.9 gradient-equivalents per pass on an MLP and 1.3 instead of 2.4 on a CNN (benchmarks/PEERS.md).
The products are bitwise the same as without kept graphs: the same operations run on the same inputs.

Graphs are kept only inside :meth:`fasthess.HessianOperator.fixed_weights`, which every fasthess solver opens
for its duration and which frees them on exit: a solve assumes a fixed operator anyway, and state that no
snapshot can see (a Python attribute of the model, a tensor captured by a ``lambda`` loss) cannot go stale
between solves. Within a block, a :class:`ModelState` snapshot (parameters, buffers, modules' train/eval modes,
and a loss module's own state) still drops every graph if those change.

The price is memory: every tensor autograd saved for the two backward passes, and the gradients, stay alive.
:class:`GraphCache` keeps graphs for a prefix of the chunks, in pass order, until they reach a byte budget;
later chunks are rebuilt in every pass.

>>> import torch
>>> from torch import nn
>>> model = nn.Linear(2, 1)
>>> state = ModelState(model)
>>> state.matches(model)
True
>>> with torch.no_grad():
...     model.bias += 1
>>> state.matches(model)
False
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["ChunkGraph", "GraphCache", "GraphSize", "ModelState", "default_budget", "gradient_graph", "graph_products",
           "saved_bytes"]

CPU_SHARE = 0.25  # of the memory available when a solve starts
CUDA_SHARE = 0.5  # of the device memory free when a solve starts


def _cgroup_available() -> int | None:
    """Bytes left under this process's cgroup (v2) memory limit, or None without a limit."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def _host_available() -> int | None:
    """MemAvailable of /proc/meminfo (free plus reclaimable page cache), else free pages by sysconf, in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_budget(device: torch.device) -> int:
    """Bytes of graphs kept by default: on CUDA ½ of the free device memory; on the CPU ¼ of the available memory
    (the less of the host's MemAvailable and the cgroup's), shared among the ``LOCAL_WORLD_SIZE`` processes torchrun
    starts."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(CUDA_SHARE * free)
    available = _host_available()
    if available is None:  # neither /proc/meminfo nor sysconf: keep nothing rather than guess
        return 0
    limit = _cgroup_available()
    if limit is not None:
        available = min(available, limit)
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return int(CPU_SHARE * available / processes)


class ModelState:
    """A snapshot of the parameters, buffers and train/eval flags of a model and of a loss module.

    That is what a chunk's gradient graph depends on besides the chunk, except state no snapshot sees (a Python
    attribute read by ``forward``, a tensor captured by a ``lambda`` loss); hence graphs live within one solve.
    """

    def __init__(self, model: nn.Module, loss_fn=None) -> None:
        self._tensors = [t.detach().clone() for t in self._state(model, loss_fn)]
        self._modes = self._training(model, loss_fn)

    @staticmethod
    def _roots(model: nn.Module, loss_fn) -> list[nn.Module]:
        return [model] + ([loss_fn] if isinstance(loss_fn, nn.Module) else [])

    @classmethod
    def _state(cls, model: nn.Module, loss_fn) -> list[torch.Tensor]:
        return [t for m in cls._roots(model, loss_fn) for t in (*m.parameters(), *m.buffers())]

    @classmethod
    def _training(cls, model: nn.Module, loss_fn) -> tuple[bool, ...]:
        return tuple(m.training for root in cls._roots(model, loss_fn) for m in root.modules())

    def matches(self, model: nn.Module, loss_fn=None) -> bool:
        """Are the parameters, buffers and modes bitwise what they were at the snapshot?"""
        now = self._state(model, loss_fn)
        return (self._training(model, loss_fn) == self._modes and len(now) == len(self._tensors)
                and all(a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                        and torch.equal(a, b.detach()) for a, b in zip(self._tensors, now)))


class GraphSize:
    """What a block of autograd work left alive: distinct saved storages (hooks) and, on CUDA, allocator growth."""

    def __init__(self, skip: set[int]) -> None:
        self.skip, self.saved, self.grown = skip, {}, 0

    def total(self, outputs: Sequence[torch.Tensor | None] = ()) -> int:
        """Bytes kept alive, counting ``outputs`` (e.g. the gradients) too unless autograd saved them already."""
        extra = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in outputs if t is not None}
        counted = {**extra, **self.saved}
        return max(sum(n for ptr, n in counted.items() if ptr not in self.skip), self.grown)


@contextlib.contextmanager
def saved_bytes(exclude: Sequence[torch.Tensor], device: torch.device) -> Iterator[GraphSize]:
    """Record the storages autograd saves inside the block (``exclude``: resident anyway, e.g. the parameters and
    an in-memory data set, so not counted; a batch from a loader is counted, since the graph keeps it alive).

    On CUDA the allocator's growth over the block is recorded too: it also covers tensors saved on the
    autograd engine's device threads.
    """
    size = GraphSize({t.untyped_storage().data_ptr() for t in exclude})

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        size.saved[storage.data_ptr()] = storage.nbytes()
        # Detached, not t itself: a node that saves its own output (tanh, log_softmax) would otherwise hold that
        # output, whose grad_fn is the node, and the graph could never be freed. Autograd restores the grad_fn
        # when it unpacks, so double backward is unchanged (bitwise, tested).
        return t.detach()

    cuda = device.type == "cuda"
    before = torch.cuda.memory_allocated(device) if cuda else 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield size
    size.grown = torch.cuda.memory_allocated(device) - before if cuda else 0


@dataclass
class ChunkGraph:
    """The graph of one chunk's gradient: leaves θ, gradients g (with graph) and the chunk's loss sum."""

    leaves: list[torch.Tensor]
    grads: list[torch.Tensor]
    live: list[int]  # indices of the gradients that depend on θ (others are constant: H v = 0 there)
    loss: torch.Tensor
    nbytes: int = 0


def gradient_graph(value_of: Callable[[dict[str, torch.Tensor]], torch.Tensor], names: Sequence[str],
                   primals: Sequence[torch.Tensor]) -> ChunkGraph:
    """Forward and backward of the scalar ``value_of(params)`` with ``create_graph``: g = ∇ value and its graph."""
    leaves = [p.detach().requires_grad_(True) for p in primals]
    with torch.enable_grad():
        value = value_of(dict(zip(names, leaves)))
        grads = torch.autograd.grad(value, leaves, create_graph=True, allow_unused=True)
    live = [i for i, gi in enumerate(grads) if gi is not None and gi.requires_grad]
    return ChunkGraph(leaves, list(grads), live, value.detach())


def graph_products(graph: ChunkGraph, tangents: Sequence[torch.Tensor], keep: bool) -> list[torch.Tensor]:
    """(∇²value) v_j for the b rows of ``tangents`` (one per parameter, shape (b, *shape)) by b backward passes of
    g·v_j; ``keep`` retains the graph after the last. Parameters whose gradient is constant get H v = 0."""
    b = tangents[0].shape[0]
    hv = [torch.zeros_like(t) for t in tangents]
    if not graph.live:
        return hv
    with torch.enable_grad():
        for j in range(b):
            cols = torch.autograd.grad([graph.grads[i] for i in graph.live], graph.leaves,
                                       [tangents[i][j] for i in graph.live], retain_graph=keep or j + 1 < b,
                                       allow_unused=True)
            for i, c in enumerate(cols):
                if c is not None:
                    hv[i][j] = c
    return hv


@dataclass
class GraphCache:
    """Chunk graphs kept for a prefix of the chunks, within ``budget`` bytes, valid for one :class:`ModelState`."""

    budget: int
    graphs: dict[int, ChunkGraph] = field(default_factory=dict)
    full: bool = False  # a chunk did not fit: no later chunk is kept either, so the cached prefix is stable
    state: ModelState | None = None

    @property
    def nbytes(self) -> int:
        return sum(g.nbytes for g in self.graphs.values())

    def begin_pass(self, model: nn.Module, loss_fn=None) -> None:
        """Drop every graph if the weights, buffers or modes changed since they were built (within one block)."""
        if self.state is not None and not self.state.matches(model, loss_fn):
            self.clear()
        if self.state is None:
            self.state = ModelState(model, loss_fn)

    def wants(self, index: int) -> bool:
        """Should the graph of chunk ``index`` be measured and offered?"""
        return not self.full and index not in self.graphs and self.budget > 0

    def offer(self, index: int, graph: ChunkGraph) -> bool:
        """Keep ``graph`` if it fits the budget; returns whether it was kept."""
        if self.full or self.nbytes + graph.nbytes > self.budget:
            self.full = True
            return False
        self.graphs[index] = graph
        return True

    def clear(self) -> None:
        self.graphs.clear()
        self.full, self.state = False, None
