"""Shared machinery of the curvature operators of a model: parameters, flat layout, the loss contract, data passes.

A curvature operator (Hessian, Gauss-Newton) is that of the training loss

    L(θ) = (1/W) Σ_c S_c(θ) + R(θ),

the user's loss called on the whole data set as one batch (:mod:`fasthess._criteria`: S_c is chunk c's loss
sum, W the global normalizer, e.g. the number of examples for a mean) plus an optional ``penalty`` R of the
parameters. :class:`ModelOperator` owns what is not specific to the curvature: which parameters θ are
differentiated and how they are laid out as one flat vector, the data stream and how its batches are read
(:mod:`fasthess._batch`), and the pass loop. It delegates by job: the loss contract, checked on the first pass
(:mod:`fasthess._contract`, whose :class:`FirstPass` state the loop passes along), the model-mode rules
(:mod:`fasthess._modes`), the buffers a pass must leave unchanged (:mod:`fasthess._buffers`) and the
finiteness checks of a pass (:mod:`fasthess._finite`).

A subclass supplies ``_chunk_products(chunk, state)``, the b products C_c·v_j of the chunk's loss sum for the
tangents of one pass (a :class:`PassState`). With ``distributed=True`` (or a ``process_group``) each process
passes its own shard; W and N are all-reduced once, and the per-pass sums as described in
:mod:`fasthess.distributed`.
"""
from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call

from fasthess import ops
from fasthess._batch import BatchSpec, cast_floating, takes_whole_dict
from fasthess._buffers import KeptBuffers
from fasthess._contract import ContractChecks, FirstPass, later_chunk_failure, scalar_value
from fasthess._criteria import contract_of
from fasthess._data import Chunk, ChunkedData, is_batched_iterable
from fasthess._finite import check_finite_pass
from fasthess._graph_cache import GraphCache, gradient_graph, graph_products
from fasthess._model_split import FORWARD_ERRORS
from fasthess._modes import ModeRules
from fasthess._unsupported import ONE_VALUE_PER_CHANNEL, translated_errors
from fasthess.distributed import ShardComm, resolve_group
from fasthess.errors import FasthessError, NonFiniteError, UnsupportedModelError
from fasthess.linop import SymmetricOperator

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

_HALF = (torch.float16, torch.bfloat16)


def _select_params(model: nn.Module, params: Sequence[torch.Tensor] | None) -> list[tuple[str, torch.Tensor]]:
    named = list(model.named_parameters())
    if params is None:
        chosen = [(name, p) for name, p in named if p.requires_grad]
        if not chosen:
            raise FasthessError(
                "the model has no trainable parameters (all have requires_grad=False); "
                "unfreeze some parameters or pass params=[...] explicitly")
        return chosen
    if isinstance(params, torch.Tensor):
        raise FasthessError("params is a single tensor; pass a list of parameters, e.g. params=[p] "
                            "(or params=list(module.parameters()))")
    by_id = {id(p): name for name, p in named}
    chosen = []
    for p in params:
        if id(p) not in by_id:
            raise FasthessError("params contains a tensor that is not a parameter of the model; "
                                "pass tensors from model.parameters()")
        chosen.append((by_id[id(p)], p))
    if not chosen:
        raise FasthessError("params is empty; pass at least one parameter of the model, or params=None for all")
    if len({name for name, _ in chosen}) != len(chosen):
        raise FasthessError("params lists the same parameter twice; pass each parameter once")
    return chosen


def _checked_layout(model: nn.Module, named: list[tuple[str, torch.Tensor]]) -> tuple[torch.device, torch.dtype]:
    """The one device and one floating dtype of the chosen parameters; refuses meta parameters and sparse
    embeddings (no second derivative)."""
    devices = {p.device for _, p in named}
    if len(devices) > 1:
        raise FasthessError(f"the parameters live on several devices ({sorted(map(str, devices))}); "
                            "move the model to one device with model.to(device)")
    if next(iter(devices)).type == "meta":
        raise FasthessError("the parameters are meta tensors (shapes without values); materialize the model "
                            "first, e.g. model.to_empty(device='cpu') and then load its weights")
    dtypes = {p.dtype for _, p in named}
    complex_ = [name for name, p in named if p.is_complex()]
    if complex_:
        raise UnsupportedModelError(
            f"the parameters {complex_[:3]} are complex; the Hessian here is that of a real loss over real "
            "parameters (model.double() leaves complex tensors as they are). Store each complex parameter as its "
            "real and imaginary parts, e.g. nn.Parameter(torch.view_as_real(w)) read as "
            "torch.view_as_complex(self.w) in the forward; the Hessian is then over (Re, Im)")
    if len(dtypes) > 1 or not next(iter(dtypes)).is_floating_point:
        raise FasthessError(f"the parameters must share one floating dtype, got {sorted(map(str, dtypes))}; "
                            "convert the model with model.float() or model.double()")
    sparse = [name for name, m in model.named_modules()
              if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
    if sparse:
        raise FasthessError(f"the embedding(s) {sparse[:3]} have sparse=True, whose sparse gradients have no "
                            "second derivative in PyTorch; set module.sparse = False for the curvature (the "
                            "Hessian is the same)")
    return next(iter(devices)), next(iter(dtypes))


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module under a ``torch.compile`` wrapper (the same parameters; products need double or forward-mode AD,
    which compiled graphs do not provide). A compiled submodule inside an eager model is refused."""
    compiled = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    wrapper = getattr(compiled, "OptimizedModule", None)
    if wrapper is None:
        return model
    while isinstance(model, wrapper):
        model = model._orig_mod
    inner = [name for name, m in model.named_modules() if isinstance(m, wrapper)]
    if inner:
        raise FasthessError(f"the submodule(s) {inner[:3]} are torch.compile'd, and compiled graphs support neither "
                            "double backward nor forward-mode AD; pass the model with the uncompiled submodules "
                            "(each compiled module's ._orig_mod), or compile the whole model (fasthess unwraps it)")
    return model


def _gradient_rows(value: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """∇value for each leaf as a (1, *shape) row; zeros where value does not depend on the leaf."""
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return [(torch.zeros_like(p) if g is None else g)[None] for p, g in zip(leaves, grads)]


@dataclass
class PassState:
    """What one data pass needs besides the chunks: the tangents (one (b, *shape) tensor per parameter) and the kept
    chunk-gradient graphs it may use (None: build every graph and keep none)."""

    tangents: list[torch.Tensor]
    graphs: GraphCache | None = None
    losses: list[torch.Tensor] = field(default_factory=list)  # S_c of the chunks with products, in pass order
    indices: list[int] = field(default_factory=list)  # their chunk numbers

    def stacked_losses(self, like: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.losses) if self.losses else like.new_zeros(0)

    def abort(self) -> None:
        """Drop the kept graphs of an interrupted pass (they may belong to data that is about to change)."""
        if self.graphs is not None:
            self.graphs.clear()


class ModelOperator(ContractChecks, SymmetricOperator):
    """Base of the model-curvature operators; see the module docstring for the math."""

    def __init__(self, model: nn.Module, loss_fn: Callable, data, *, batch_size: int | None = None,
                 params: Sequence[torch.Tensor] | None = None, allow_stochastic: bool = False,
                 distributed: bool = False, process_group: ProcessGroup | None = None,
                 batch: BatchSpec | None = None, penalty: Callable | None = None) -> None:
        super().__init__()
        group = resolve_group(distributed, process_group)
        if not isinstance(model, nn.Module):
            raise FasthessError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if batch is not None and not isinstance(batch, BatchSpec):
            raise FasthessError(f"batch must be a fasthess.BatchSpec, got {type(batch).__name__}")
        if penalty is not None and not callable(penalty):
            raise FasthessError(f"penalty must be a function of the parameters dict, got {type(penalty).__name__}")
        self._options = dict(batch_size=batch_size, params=params, allow_stochastic=allow_stochastic,
                             distributed=distributed, process_group=process_group, batch=batch, penalty=penalty)
        model = _uncompiled(model)
        spec = batch or BatchSpec()
        self.loss = contract_of(loss_fn, batch_loss=spec.batch_loss)
        if spec.counts_itself and self.loss.kind == "criterion":
            raise FasthessError(f"BatchSpec(count=...) sets the normalizer of a loss callable, but {self.loss.name} "
                                "counts its own (reduction, weight, ignore_index); drop count=")
        self.model, self.loss_fn, self.allow_stochastic, self.penalty = model, loss_fn, allow_stochastic, penalty
        named = _select_params(model, params)
        self.device, self.dtype = _checked_layout(model, named)
        self.names = [name for name, _ in named]
        self._params = [p for _, p in named]
        self.shapes = [p.shape for p in self._params]
        self.numels = [p.numel() for p in self._params]
        self.num_params = sum(self.numels)
        #: products run in this dtype: float32 for float16/bfloat16 models (parameters, floating buffers and inputs
        #: are cast for the products; the model is not changed), else the model's
        self.compute_dtype = torch.float32 if self.dtype in _HALF else self.dtype
        self.modes = ModeRules(model, allow_stochastic, self.device)
        try:  # how a dict batch is passed (takes_whole_dict)
            self._signature: inspect.Signature | None = inspect.signature(model.forward)
        except (TypeError, ValueError):
            self._signature = None
        self._buffers = KeptBuffers(model)  # a pass leaves running statistics and other buffers as it found them
        self.modes.check()
        if batch_size is None and self.modes.batch_statistics() and not is_batched_iterable(data):
            raise FasthessError(
                "the model has BatchNorm that normalizes each chunk with its own statistics (train mode, or "
                "track_running_stats=False), so the chunk size is part of the loss; pass batch_size=<the training "
                "batch size>, or call model.eval() on a BatchNorm with running statistics")
        self._normalizer: float | None = None  # W, counted on the first pass (which also checks the contract)
        #: what this operator's equality with the Hessian of the loss on the whole data rests on, set by the first
        #: pass (:data:`fasthess._contract.CONTRACT_BASES`; None before it)
        self.contract: str | None = None

        def build() -> ChunkedData:
            chunked = ChunkedData(data, batch_size, self.device, spec)
            self._check_finite_weights()
            return chunked

        #: the collectives of a sharded operator (None in a single process); see :mod:`fasthess.distributed`
        self.comm = None if group is None else ShardComm(group, self.device)
        self.data = build() if self.comm is None else self.comm.setup(build, lambda d: d.num_examples)

    @property
    def params(self) -> list[torch.Tensor]:
        """The differentiated parameters θ, in the operator's layout order."""
        return list(self._params)

    @property
    def num_examples(self) -> int | None:
        """N, the number of examples over all shards (None before the first pass over an iterable of batches)."""
        return self.data.num_examples if self.comm is None else self.comm.num_examples

    @property
    def normalizer(self) -> float | None:
        """W, what the loss on the whole data divides by (1 for a sum); None before the first pass."""
        return self._normalizer

    @property
    def products_share_a_pass(self) -> bool:
        """Do the b products of a pass share its cost? Not on the CPU, where each tangent is its own backward pass;
        on an accelerator the b tangents are vmapped into one (:func:`fasthess.lanczos.default_block_size`)."""
        return self.device.type != "cpu"

    def in_float64(self) -> ModelOperator:
        """This operator with its products computed in float64 (parameters, floating buffers, inputs and floating
        targets are cast for the products; the model is not changed): the reference against which a solve checks
        what lower-precision products did to its answer (:mod:`fasthess._certificate`, rounding). It shares the
        data, the checked contract and W, and counts its own products."""
        twin = copy.copy(self)
        twin.compute_dtype = torch.float64
        if (self.loss.kind == "criterion" and isinstance(self.loss_fn, nn.Module)
                and any(t.is_floating_point() for t in self.loss_fn.buffers())):
            # a criterion's class weights must meet float64 outputs in float64
            twin.loss = contract_of(copy.deepcopy(self.loss_fn).double(), batch_loss=self.data.spec.batch_loss)
        twin.num_hvps = twin.num_passes = 0
        return twin

    def with_data(self, data, **changes) -> ModelOperator:
        """An operator of the same kind and options (``changes`` override them) on other data."""
        return type(self)(self.model, self.loss_fn, data, **{**self._options, **changes})

    # ---- layout -----------------------------------------------------------------------------------
    def unflatten(self, V: torch.Tensor) -> list[torch.Tensor]:
        """Split the columns of V (n, b) into per-parameter tangents (b, *shape_i) in the compute dtype."""
        out, off = [], 0
        for shape, numel in zip(self.shapes, self.numels):
            # contiguous: a strided view of V (b = 1) makes the backward passes slower than this one copy
            out.append(V[off:off + numel].T.reshape(V.shape[1], *shape).to(self.compute_dtype).contiguous())
            off += numel
        return out

    def param_vector(self) -> torch.Tensor:
        """The current parameters θ as one flat float64 vector in the operator's layout."""
        return torch.cat([p.detach().reshape(-1).double() for p in self._params])

    def _primals(self) -> list[torch.Tensor]:
        return [p.detach().to(self.compute_dtype) for p in self._params]

    def _check_finite_weights(self) -> None:
        bad = [name for name, p in zip(self.names, self._params) if not bool(torch.isfinite(p.detach()).all())]
        if bad:
            raise NonFiniteError(f"parameters {bad[:5]} contain NaN or Inf; the Hessian is undefined there. "
                                 "Restore finite weights (e.g. from a checkpoint before divergence)")

    # ---- the loss contract ------------------------------------------------------------------------
    def _forward(self, params: dict[str, torch.Tensor], batch):
        """The model's output on the batch with the differentiated parameters ``params`` substituted."""
        args, kwargs = batch.args, batch.kwargs
        if not args and takes_whole_dict(self._signature, kwargs):
            args, kwargs = (kwargs,), {}
        if self.compute_dtype != self.dtype:  # a half-precision model runs in float32, the float64 twin in float64
            others = [(n, t) for n, t in [*self.model.named_buffers(), *self.model.named_parameters()]
                      if n not in params]  # buffers, and parameters left out by params=
            params = {**{n: t.detach().to(self.compute_dtype) for n, t in others if t.is_floating_point()},
                      **{n: t.to(self.compute_dtype) if t.is_floating_point() else t for n, t in params.items()}}
            args, kwargs = cast_floating((args, kwargs), self.compute_dtype)
        return functional_call(self.model, params, args, kwargs, strict=False)

    def _chunk_sum(self, params: dict[str, torch.Tensor], batch) -> torch.Tensor:
        """S_c, the chunk's loss sum, as a function of the differentiated parameters (others come from the model)."""
        if self.compute_dtype != self.dtype:  # targets at the products' precision, as the inputs
            batch = batch.with_target(cast_floating(batch.target, self.compute_dtype))
        return scalar_value(self.loss.chunk_sum(self._forward(params, batch), batch))

    # ---- one pass over the data -------------------------------------------------------------------
    def _chunk_products(self, chunk: Chunk, state: PassState) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(C_c v_j for each parameter tensor, batched over j; the chunk's loss sum S_c). Implemented by subclasses."""
        raise NotImplementedError

    def _start_pass(self, tangents: list[torch.Tensor]) -> PassState:
        """The state of a pass (subclasses add what they may reuse, e.g. kept graphs)."""
        return PassState(tangents)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        tangents = self.unflatten(V)
        acc = V.new_zeros(V.shape[1], V.shape[0])
        state = self._start_pass(tangents)
        losses = self._run_pass(acc, state, lambda chunk: self._chunk_products(chunk, state))
        if self.penalty is not None:
            losses = torch.cat([losses, self._penalty_products(acc, tangents)[None]])
        check_finite_pass(losses, state.indices, acc, self.data, self.comm is not None)
        return acc.T

    def gradient(self) -> torch.Tensor:
        """∇L(θ) = (1/W) Σ_c ∇S_c + ∇R as one flat float64 vector in the operator's layout (one data pass)."""
        acc = torch.zeros(1, self.num_params, dtype=torch.float64, device=self.device)
        state = PassState([])
        losses = self._run_pass(acc, state, self._chunk_gradient)
        if self.penalty is not None:
            leaves = [p.requires_grad_(True) for p in self._primals()]
            with torch.enable_grad():
                value = scalar_value(self.penalty(dict(zip(self.names, leaves))), penalty=True)
                ops.accumulate(acc, _gradient_rows(value, leaves))
            losses = torch.cat([losses, value.detach().double()[None]])
        check_finite_pass(losses, state.indices, acc, self.data, self.comm is not None)
        return acc[0]

    def _chunk_gradient(self, chunk: Chunk) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(∇S_c for each parameter tensor as a (1, *shape) row; S_c)."""
        leaves = [p.requires_grad_(True) for p in self._primals()]
        with torch.enable_grad():
            value = self._chunk_sum(dict(zip(self.names, leaves)), chunk.batch)
            return _gradient_rows(value, leaves), value.detach()

    def _run_pass(self, acc: torch.Tensor, state: PassState, per_chunk: Callable) -> torch.Tensor:
        """One data pass: Σ_c of ``per_chunk(chunk)``'s rows into ``acc`` (all-reduced over the ranks), divided by W
        (counted on the first pass); returns the chunk sums."""
        if torch.is_inference_mode_enabled():
            raise FasthessError(
                "fasthess was called inside torch.inference_mode(), which switches autograd off (Lightning runs "
                "validation_step and on_validation_* hooks under it); Hessian products need autograd. Call it outside "
                "inference mode (a training hook such as on_train_epoch_end, or under torch.no_grad(), which is "
                "fine), with data created outside it")
        self.modes.check()
        first = FirstPass() if self._normalizer is None else None
        try:
            with self._buffers.kept():
                self._pass(acc, state, per_chunk, first)
        except BaseException:
            state.abort()
            raise
        acc /= self._normalizer
        return state.stacked_losses(acc)

    def _pass(self, acc: torch.Tensor, state: PassState, per_chunk: Callable, first: FirstPass | None) -> None:
        """The pass of :meth:`_run_pass` before the division by W; on the first pass (``first``) it checks the
        contract and sets W."""
        if self.comm is None:
            self._accumulate(acc, state, per_chunk, first)
            if first is not None:
                self._set_normalizer(None if first.total is None else float(first.total))
                self.contract = first.contract
        else:  # one all-reduce of acc (b, n) per pass, entered by every rank even when its part fails
            def local() -> tuple[torch.Tensor, torch.Tensor | None]:
                self._accumulate(acc, state, per_chunk, first)
                return state.stacked_losses(acc), None if first is None else first.total
            self.comm.run_pass(acc, local, lambda: self.data.num_examples)
            if first is not None:
                self._set_normalizer(self.comm.normalizer)
                self.contract = first.contract

    def _set_normalizer(self, total: float | None) -> None:
        if self.loss.sums:
            self._normalizer = 1.0
        elif not total:
            raise FasthessError("the loss's normalizer over the whole data is 0 (every target is ignored, or every "
                                "weight or count is 0), so the loss is undefined; check ignore_index and the weights")
        else:
            self._normalizer = total

    def _accumulate(self, acc: torch.Tensor, state: PassState, per_chunk: Callable, first: FirstPass | None) -> None:
        """Add Σ_c of ``per_chunk(chunk)``'s rows (e.g. the products C_c v_j) over this process's chunks to ``acc``
        (b, n); the chunk sums go to ``state.losses``. On the first pass (``first``), each chunk is checked first and
        counted into ``first.total``."""
        # BatchNorm1d's statistics over one example are undefined; BatchNorm2d/3d's run over its positions, and
        # PyTorch's own error for a 1×1 map is named by translated_errors
        one_value = any(isinstance(m, nn.BatchNorm1d) for m in self.modes.batch_statistics_modules())
        with self.modes.frozen_batchnorm():
            for chunk in self.data.chunks():
                if one_value and chunk.batch.rows == 1:
                    raise FasthessError(f"chunk {chunk.index} has a single example and {ONE_VALUE_PER_CHANNEL}")
                if first is not None:
                    self._check_first_pass(chunk, first)
                if self.loss.kind == "callable" and self.loss.mode == "mean" and float(chunk.batch.count) == 0:
                    continue  # nothing to average in this chunk (e.g. every token ignored): it contributes 0
                try:
                    with self.modes.product_scope(chunk.index), translated_errors():
                        products, loss = per_chunk(chunk)
                except FasthessError:
                    raise
                except FORWARD_ERRORS as exc:
                    if first is None or chunk.index == first.index:
                        raise  # a later pass, or the first chunk, whose checks ran the forward and name a failure
                    raise later_chunk_failure(chunk, first.rows, exc) from exc
                ops.accumulate(acc, [p if p.dtype in (torch.float32, torch.float64) else p.float()
                                     for p in products])
                state.losses.append(loss.detach().to(torch.float64))
                state.indices.append(chunk.index)

    def _penalty_products(self, acc: torch.Tensor, tangents: list[torch.Tensor]) -> torch.Tensor:
        """Add (∇²R) v_j to row j of ``acc``, once per pass; returns R(θ)."""
        graph = gradient_graph(lambda p: scalar_value(self.penalty(p), penalty=True), self.names, self._primals())
        ops.accumulate(acc, graph_products(graph, tangents, keep=False))
        return graph.loss.to(torch.float64)
