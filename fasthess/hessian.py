"""The Hessian of the full-dataset training loss as a symmetric linear operator.

The loss is the user's loss on the whole data set as one batch (the loss contract, :mod:`fasthess._criteria`):
for a per-example loss, L(θ) = (1/W) Σᵢ wᵢ ℓ(f_θ(xᵢ), yᵢ) + R(θ) over the chosen parameters θ ∈ ℝⁿ, with W the
loss's normalizer (N for a mean, the summed class weights for a weighted cross-entropy, the non-ignored
targets with ``ignore_index``, 1 for a sum) and R an optional ``penalty``. Then

    H V = (1/W) Σ_c ∇²_θ S_c(θ) V + ∇²R(θ) V,      V ∈ ℝ^{n×b},

where S_c is the loss sum of chunk c, so chunking never changes the matrix. A block of b vectors costs one
pass over the data. Per chunk, either ``torch.func.jvp`` of ``torch.func.grad`` (forward-over-reverse) is
vmapped over the b tangents, so the forward and backward of the primal are shared by the whole
block, or one graph of the gradient is differentiated b times (double backward). ``hvp="auto"``
picks by device (:func:`default_hvp_method`); forward mode falls back to double backward, with a
warning naming why, for models without forward-mode rules. With double backward, inside a solve
(:meth:`HessianOperator.fixed_weights`) the graphs of the chunk gradients are kept between passes
(:mod:`fasthess._graph_cache`, within ``graph_memory`` bytes), so every pass after the first runs only the
second backward.

>>> import torch
>>> from torch import nn
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = nn.Linear(3, 1).double()
>>> X, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
>>> H = HessianOperator(model, nn.MSELoss(), (X, y))
>>> H.num_params
4
>>> # For least squares the Hessian is (2/N) [X 1]ᵀ[X 1]; compare the first column:
>>> A = torch.cat([X, torch.ones(10, 1, dtype=torch.float64)], 1)
>>> e0 = torch.zeros(4, dtype=torch.float64); e0[0] = 1
>>> torch.allclose(H.matvec(e0), (2 / 10) * A.T @ A[:, 0])
True
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import grad, jvp, vmap

from fasthess._batch import Batch, BatchSpec
from fasthess._data import Chunk
from fasthess.errors import FasthessError, StochasticModelError
from fasthess._graph_cache import ChunkGraph, GraphCache, default_budget, gradient_graph, graph_products, saved_bytes
from fasthess._contract import random_draws
from fasthess._model_operator import ModelOperator, PassState

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

HVP_METHODS = ("auto", "forward-over-reverse", "double-backward")


def default_hvp_method(device: torch.device) -> str:
    """The HVP method ``hvp="auto"`` uses: double backward on the CPU, forward-over-reverse elsewhere.

    Measured on 2 CPU cores, per chunk against a gradient of the same chunk (benchmarks/PEERS.md): double backward
    costs 1.92 vs 2.98 gradients (MLP, b = 1), 2.43 vs 2.56 (CNN, b = 1) and 6.6 vs 9.4 (CNN, b = 4); vmapped
    tangents do not amortize on the CPU. On an accelerator the vmapped block shares one pass. A fixed rule, not a
    timing, so that the same inputs give the same bits in every process.
    """
    return "double-backward" if device.type == "cpu" else "forward-over-reverse"


def forward_over_reverse(chunk_sum: Callable[[dict, Batch], torch.Tensor], primals: dict[str, torch.Tensor],
                         batch: Batch, tangents: list[torch.Tensor],
                         randomness: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(H_c v_j for each parameter, batched over the b tangents (b, *shape) in ``primals``' order; S_c): the jvp of
    ∇_θ S_c along each v_j, vmapped over j with ``randomness`` ("error" or "same")."""
    names = list(primals)
    y = batch.target
    # A floating target travels as a primal with a materialized zero tangent: some PyTorch loss formulas
    # (mse_loss) fail in forward mode on the implicit ZeroTensor tangent of a constant target.
    floating = isinstance(y, torch.Tensor) and y.is_floating_point()
    y_tangent = torch.zeros_like(y) if floating else None

    def loss_and_aux(p, target):
        loss = chunk_sum(p, batch if target is None else batch.with_target(target))
        return loss, loss

    grad_fn = grad(loss_and_aux, argnums=0, has_aux=True)

    def one(t):
        t = dict(zip(names, t))
        if y_tangent is None:
            _, hv, loss = jvp(lambda p: grad_fn(p, None), (primals,), (t,), has_aux=True)
        else:
            _, hv, loss = jvp(grad_fn, (primals, y), (t, y_tangent), has_aux=True)
        return [hv[name] for name in names], loss

    hv, loss = vmap(one, randomness=randomness)(tangents)
    return hv, loss[0]


class HessianOperator(ModelOperator):
    """Exact Hessian of the training loss over a whole data set: the user's loss called on all the data as one batch.

    Args:
        model: the network; evaluated in its current mode (train/eval), which is never changed, nor are its
            running statistics or other buffers. A ``torch.compile``'d model is differentiated through its
            underlying module (the same parameters). Each example's output must depend on its own inputs only
            (checked on the first chunk against its halves); train-mode BatchNorm modules are the exception
            (ghost batches of ``batch_size``).
        loss_fn: ``loss_fn(output, target)``. A ``torch.nn`` criterion (or ``F.cross_entropy`` and the like) with
            any ``reduction``, ``weight``, ``ignore_index`` or ``pos_weight``; or any callable returning a mean or
            sum over the batch, or per-example losses of shape (rows,), which is checked on the first pass to split
            over examples. See docs/guides/loss_contract.md.
        data: ``(X, y)`` or ``(X, y, w)`` tensors (``w``: per-example weights), a ``Dataset`` or an iterable of
            batches (a DataLoader): tuples ``(x, y[, w])`` or dicts with ``labels``, or what ``batch`` reads.
        batch_size: chunk size for tensors and datasets (default 1024); with BatchNorm that uses batch statistics
            (train mode, or ``track_running_stats=False``) it is the ghost-batch size and must be given.
        params: the parameters to differentiate, a list (default: all with ``requires_grad``).
        allow_stochastic: accept a random forward (train-mode dropout, random draws): a random operator. Its
            draws come from the default generators and advance them, as a training step does (putting them back
            would give every call the same masks); without random draws the caller's random state is unchanged.
        hvp: ``"auto"`` (:func:`default_hvp_method` of the device), ``"forward-over-reverse"`` (falls back to
            double backward, with a warning naming the reason, where the model has no forward-mode rules) or
            ``"double-backward"``. Both give the same matrix up to rounding; the choice is deterministic.
        distributed: each process of the default ``torch.distributed`` group passes its own shard of the
            data (shards may be uneven); every process gets the products of the Hessian of all shards.
        process_group: like ``distributed=True`` on this group instead of the default one.
        graph_memory: bytes of chunk-gradient graphs kept between the passes of one solve (double backward
            only; see :mod:`fasthess._graph_cache` and :meth:`fixed_weights`). None: ¼ of the available host memory
            (divided among the processes of a torchrun host) on the CPU, ½ of the free device memory on CUDA,
            taken when the solve starts; 0 keeps none. Never used with ``allow_stochastic=True`` (a kept graph
            would freeze the dropout masks).
        batch: a :class:`fasthess.BatchSpec` naming the inputs, targets, per-example weights and count of each
            batch (default: ``(x, y[, w])`` tuples and dicts with ``labels``).
        penalty: ``penalty(params) -> scalar``, a function of the dict of the differentiated parameters by name
            (e.g. an L2 term); its Hessian is added once per product, exactly.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, data, *, batch_size: int | None = None,
                 params: Sequence[torch.Tensor] | None = None, allow_stochastic: bool = False,
                 hvp: str = "auto", distributed: bool = False, process_group: ProcessGroup | None = None,
                 graph_memory: int | None = None, batch: BatchSpec | None = None,
                 penalty: Callable | None = None) -> None:
        if hvp not in HVP_METHODS:
            raise FasthessError(f"hvp must be one of {HVP_METHODS}, got {hvp!r}")
        if graph_memory is not None and (isinstance(graph_memory, bool) or not isinstance(graph_memory, int)
                                         or graph_memory < 0):
            raise FasthessError(f"graph_memory={graph_memory!r} must be a number of bytes ≥ 0 (0 keeps no graphs), "
                                "or None for the default budget")
        super().__init__(model, loss_fn, data, batch_size=batch_size, params=params,
                         allow_stochastic=allow_stochastic, distributed=distributed, process_group=process_group,
                         batch=batch, penalty=penalty)
        self._options.update(hvp=hvp, graph_memory=graph_memory)
        self.hvp_method = default_hvp_method(self.device) if hvp == "auto" else hvp
        self.graph_memory = graph_memory
        self._graphs: GraphCache | None = None
        self._scopes = 0

    @property
    def graph_bytes(self) -> int:
        """Bytes of chunk-gradient graphs currently kept (what autograd saved, plus the gradients)."""
        return 0 if self._graphs is None else self._graphs.nbytes

    def clear_graphs(self) -> None:
        """Free the kept chunk-gradient graphs now (a pass inside a :meth:`fixed_weights` block rebuilds them)."""
        if self._graphs is not None:
            self._graphs.clear()

    @contextlib.contextmanager
    def fixed_weights(self) -> Iterator[None]:
        """Keep chunk-gradient graphs between the products of this block (the solvers open one per solve).

        Inside, the caller must not change anything the loss depends on (which every solve assumes anyway); a
        snapshot of parameters, buffers and modes still drops the graphs if those change. The graphs are freed
        when the outermost block exits, also on an error.
        """
        if self._scopes == 0:  # whether a product may use it is decided per pass, by _start_pass
            self._graphs = GraphCache(default_budget(self.device) if self.graph_memory is None else self.graph_memory)
        self._scopes += 1
        try:
            yield
        finally:
            self._scopes -= 1
            if self._scopes == 0:
                self._graphs = None

    def _start_pass(self, tangents: list[torch.Tensor]) -> PassState:
        """The pass may use the graph cache inside a block, with double backward, for a deterministic model; a pass
        that starts in forward mode keeps none even if it falls back to double backward."""
        usable = self.hvp_method == "double-backward" and not self.allow_stochastic and self.graph_memory != 0
        cache = self._graphs if usable else None
        if cache is not None:
            cache.begin_pass(self.model, self.loss_fn)
        return PassState(tangents, cache)

    def _chunk_products(self, chunk: Chunk, state: PassState):
        if self.hvp_method == "forward-over-reverse":
            try:
                return forward_over_reverse(self._chunk_sum, dict(zip(self.names, self._primals())), chunk.batch,
                                            state.tangents, "same" if self.allow_stochastic else "error")
            except FasthessError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure of forward-mode AD triggers the fallback
                if "randomness" in str(exc):
                    raise StochasticModelError(random_draws("the model draws random numbers in its forward pass",
                                                            self.model.training)) from exc
                warnings.warn(f"forward-mode AD failed for this model ({type(exc).__name__}: {str(exc)[:200]}); "
                              "falling back to double-backward Hessian-vector products", RuntimeWarning, stacklevel=5)
                self.hvp_method = "double-backward"
        graph, keep = self._chunk_graph(chunk, state.graphs)
        return graph_products(graph, state.tangents, keep), graph.loss

    def _gradient_graph(self, batch) -> ChunkGraph:
        """Forward and backward of the chunk's loss sum with ``create_graph``: g = ∇_θ S_c and its graph."""
        return gradient_graph(lambda p: self._chunk_sum(p, batch), self.names, self._primals())

    def _measured_graph(self, batch) -> ChunkGraph | None:
        """The chunk's gradient graph with its size, or None when the model refuses saved-tensor hooks (its forward
        runs a torch.func transform such as ``grad``), which the size measurement needs."""
        try:
            with saved_bytes([*self._params, *self.data.resident], self.device) as size:
                graph = self._gradient_graph(batch)
        except RuntimeError as exc:
            if "saved tensor hooks" not in str(exc):
                raise
            return None
        graph.nbytes = size.total(graph.grads)
        return graph

    def _chunk_graph(self, chunk: Chunk, cache: GraphCache | None) -> tuple[ChunkGraph, bool]:
        """The chunk's gradient graph and whether it is kept: this solve's, or built now (kept if it fits)."""
        index = chunk.index
        if cache is not None and index in cache.graphs:
            return cache.graphs[index], True
        if cache is None or not cache.wants(index):
            return self._gradient_graph(chunk.batch), False
        graph = self._measured_graph(chunk.batch)
        if graph is None:  # its size cannot be measured: keep no graphs in this solve
            cache.full = True
            return self._gradient_graph(chunk.batch), False
        return graph, cache.offer(index, graph)
