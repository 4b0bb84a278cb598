"""Per-chunk gradient graphs kept between data passes while the weights stay fixed.

A double-backward Hessian-vector product of chunk c builds the graph of gᶜ = ∇_θ L_c(θ) (one forward and one
backward with ``create_graph``) and then differentiates gᶜ·v. The graph depends on θ, the model's buffers and
modes, and the chunk, but not on v. An eigensolver applies the same Hessian 5-20 times, so keeping the graphs
turns every product after the first pass into the second backward alone: measured on 2 CPU cores, 1.94 instead
of 2.57 gradient-equivalents per product on an MLP and 1.31 instead of 2.10 on a CNN (benchmarks/PEERS.md).
The products are bitwise the same as without the cache: the same operations run on the same inputs.

The price is memory: every tensor autograd saved for the two backward passes stays alive. :class:`GraphCache`
keeps graphs for a prefix of the chunks, in pass order, until their saved tensors reach a byte budget; later
chunks are rebuilt in every pass. A :class:`ModelState` snapshot (parameters, buffers, modules' train/eval modes,
and the loss module's own state) detects any change of the weights between passes, after which every graph is
dropped and rebuilt at the new weights.

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["ChunkGraph", "GraphCache", "ModelState", "default_budget", "saved_bytes"]

CPU_SHARE = 0.25  # of the memory available when the first graph is built
CUDA_SHARE = 0.5  # of the device memory free when the first graph is built


def default_budget(device: torch.device) -> int:
    """Bytes of graphs kept by default: ¼ of available host memory on the CPU, ½ of free device memory on CUDA."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(CUDA_SHARE * free)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: keep nothing rather than guess
        return 0
    return int(CPU_SHARE * available)


class ModelState:
    """A snapshot of everything a chunk's gradient graph depends on besides the chunk itself."""

    def __init__(self, model: nn.Module, loss_fn=None) -> None:
        self._tensors = [t.detach().clone() for t in self._state(model, loss_fn)]
        self._modes = self._training(model, loss_fn)

    @staticmethod
    def _state(model: nn.Module, loss_fn) -> list[torch.Tensor]:
        modules = [model] + ([loss_fn] if isinstance(loss_fn, nn.Module) else [])
        return [t for m in modules for t in (*m.parameters(), *m.buffers())]

    @staticmethod
    def _training(model: nn.Module, loss_fn) -> tuple[bool, ...]:
        modules = [model] + ([loss_fn] if isinstance(loss_fn, nn.Module) else [])
        return tuple(m.training for root in modules for m in root.modules())

    def matches(self, model: nn.Module, loss_fn=None) -> bool:
        """Are the parameters, buffers and modes bitwise what they were at the snapshot?"""
        now = self._state(model, loss_fn)
        return (self._training(model, loss_fn) == self._modes and len(now) == len(self._tensors)
                and all(a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b.detach())
                        for a, b in zip(self._tensors, now)))


@contextlib.contextmanager
def saved_bytes(exclude: Sequence[torch.Tensor], device: torch.device) -> Iterator[list[int]]:
    """Count the bytes of the distinct storages autograd saves inside the block (``exclude``: already resident).

    Yields a one-element list that holds the total once the block has run. On CUDA the total is at least the
    growth of the caching allocator's live bytes over the block, which also covers tensors saved on the
    autograd engine's device threads and the gradients themselves.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            sizes[storage.data_ptr()] = storage.nbytes()
        return t

    total = [0]
    cuda = device.type == "cuda"
    before = torch.cuda.memory_allocated(device) if cuda else 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total
    grown = torch.cuda.memory_allocated(device) - before if cuda else 0
    total[0] = max(sum(sizes.values()), grown)


@dataclass
class ChunkGraph:
    """The graph of one chunk's gradient: leaves θ, gradients g (with graph) and the chunk's mean loss."""

    leaves: list[torch.Tensor]
    grads: list[torch.Tensor]
    live: list[int]  # indices of the gradients that depend on θ (others are constant: H v = 0 there)
    loss: torch.Tensor
    nbytes: int = 0


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

    def begin_pass(self, model: nn.Module, loss_fn) -> None:
        """Drop every graph if the weights, buffers or modes changed since they were built."""
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
