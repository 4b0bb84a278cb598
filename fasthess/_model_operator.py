"""Shared machinery of the curvature operators of a model: parameters, flat layout, the loss contract, data passes.

A curvature operator (Hessian, Gauss-Newton) is that of the training loss

    L(θ) = (1/W) Σ_c S_c(θ) + R(θ),

the user's loss called on the whole data set as one batch (:mod:`fasthess._criteria`: S_c is chunk c's loss
sum, W the global normalizer, e.g. the number of examples for a mean) plus an optional ``penalty`` R of the
parameters. :class:`ModelOperator` owns everything that is not specific to the curvature: which parameters θ
are differentiated and how they are laid out as one flat vector, the data stream and how its batches are read
(:mod:`fasthess._batch`), the checks of the loss contract on the first pass (the loss splits over examples,
reads the parameters only through the model's output, and the forward draws no random numbers, the last on
every pass), the model-mode rules (BatchNorm with batch statistics, dropout) and the finiteness checks.

A subclass supplies ``_chunk_products(chunk, state)``, the b products C_c·v_j of the chunk's loss sum for the
tangents of one pass (a :class:`PassState`). With ``distributed=True`` (or a ``process_group``) each process
passes its own shard; W and N are all-reduced once, and the per-pass sums as described in
:mod:`fasthess.distributed`.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import _pytree as pytree

from fasthess import ops
from fasthess._batch import Batch, BatchSpec, join_rows, nonfinite_data, take_rows, takes_whole_dict
from fasthess._buffers import KeptBuffers
from fasthess._criteria import contract_of
from fasthess._unsupported import refuse_reentrant_checkpoint, refuse_without_second_derivative, translated_errors
from fasthess._data import Chunk, ChunkedData, is_batched_iterable
from fasthess._model_split import check_model_splits
from fasthess.distributed import ShardComm, resolve_group
from fasthess.errors import (BatchDependentModelError, FasthessError, LossContractError, NonFiniteError,
                             StochasticModelError)
from fasthess._graph_cache import GraphCache, gradient_graph, graph_products
from fasthess.linop import SymmetricOperator

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

_BatchNorm = nn.modules.batchnorm._BatchNorm
_Dropout = nn.modules.dropout._DropoutNd
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


def _generator_states(device: torch.device) -> list[torch.Tensor]:
    """The default random generators' states (CPU, and the device's on CUDA): a random draw changes them."""
    states = [torch.random.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _finite(value) -> bool:
    """Every element of a tensor loss value is finite (non-tensors count as finite)."""
    return not isinstance(value, torch.Tensor) or bool(torch.isfinite(value).all())


def _same(a, b) -> bool:
    """Two loss values (scalars or per-example tensors) agree to float64 roundoff of the loss's dtype."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return False
    rtol = 1e-10 if a.dtype == torch.float64 else 1e-5
    return bool(torch.allclose(a.double(), b.double(), rtol=rtol, atol=0.0))


def _cast_floating(tree, dtype: torch.dtype):
    return pytree.tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                           tree)


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


class ModelOperator(SymmetricOperator):
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
        devices = {p.device for _, p in named}
        if len(devices) > 1:
            raise FasthessError(f"the parameters live on several devices ({sorted(map(str, devices))}); "
                                "move the model to one device with model.to(device)")
        if next(iter(devices)).type == "meta":
            raise FasthessError("the parameters are meta tensors (shapes without values); materialize the model "
                                "first, e.g. model.to_empty(device='cpu') and then load its weights")
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) > 1 or not next(iter(dtypes)).is_floating_point:
            raise FasthessError(f"the parameters must share one floating dtype, got {sorted(map(str, dtypes))}; "
                                "convert the model with model.float() or model.double()")
        sparse = [name for name, m in model.named_modules()
                  if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
        if sparse:
            raise FasthessError(f"the embedding(s) {sparse[:3]} have sparse=True, whose sparse gradients have no "
                                "second derivative in PyTorch; set module.sparse = False for the curvature (the "
                                "Hessian is the same)")
        self.names = [name for name, _ in named]
        self._params = [p for _, p in named]
        self.shapes = [p.shape for p in self._params]
        self.numels = [p.numel() for p in self._params]
        self.num_params = sum(self.numels)
        self.device = next(iter(devices))
        self.dtype = next(iter(dtypes))
        #: products run in this dtype: float32 for float16/bfloat16 models (parameters, floating buffers and inputs
        #: are cast for the products; the model is not changed), else the model's
        self.compute_dtype = torch.float32 if self.dtype in _HALF else self.dtype
        self._batchnorms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
        try:  # how a dict batch is passed (takes_whole_dict)
            self._signature: inspect.Signature | None = inspect.signature(model.forward)
        except (TypeError, ValueError):
            self._signature = None
        self._buffers = KeptBuffers(model)  # a pass leaves running statistics and other buffers as it found them
        self._dropouts = [m for m in model.modules() if isinstance(m, _Dropout)]
        self._check_mode()
        if batch_size is None and self._batch_stat_bn() and not is_batched_iterable(data):
            raise FasthessError(
                "the model has BatchNorm that normalizes each chunk with its own statistics (train mode, or "
                "track_running_stats=False), so the chunk size is part of the loss; pass batch_size=<the training "
                "batch size>, or call model.eval() on a BatchNorm with running statistics")
        self._checked = False  # the loss contract is checked on the first pass
        self._first: tuple | None = None  # (output, chunk) of the first chunk, for a callable's joined-chunk checks
        self._normalizer: float | None = None  # W, counted on the first pass

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

    # ---- mode rules -------------------------------------------------------------------------------
    def _batch_stat_bn(self) -> bool:
        """Does some BatchNorm normalize with the chunk's own statistics (train mode, or no running statistics)?"""
        return any(m.training or m.running_mean is None for m in self._batchnorms)

    def _check_mode(self) -> None:
        active = [m for m in self._dropouts if m.training and m.p > 0]
        if active and not self.allow_stochastic:
            raise StochasticModelError(
                f"the model has {len(active)} dropout layer(s) in train mode, so every product would use a new random "
                "mask and the Hessian is not a fixed matrix. Call model.eval() (dropout off), or pass "
                "allow_stochastic=True to accept a random operator (each chunk then shares one mask across the block)")

    @contextlib.contextmanager
    def _frozen_batchnorm(self) -> Iterator[None]:
        """Train-mode BN uses per-chunk statistics and must not touch its running statistics."""
        saved = [(m, m.track_running_stats) for m in self._batchnorms if m.training]
        for m, _ in saved:
            m.track_running_stats = False
        try:
            yield
        finally:
            for m, flag in saved:
                m.track_running_stats = flag

    @contextlib.contextmanager
    def _product_scope(self, index: int) -> Iterator[None]:
        """Around one chunk's products: the math SDPA kernel (the only one with double and forward-mode derivatives
        on every device) and, unless ``allow_stochastic``, a check that no default generator advanced."""
        before = None if self.allow_stochastic else _generator_states(self.device)
        with sdpa_kernel(SDPBackend.MATH):
            yield
        if before is not None and not all(torch.equal(a, b) for a, b in zip(before, _generator_states(self.device))):
            raise StochasticModelError(self._random_draws(f"the model's forward drew random numbers on chunk {index}"))

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
        if self.compute_dtype != self.dtype:  # a half-precision model runs in float32 for the products
            params = {**{n: b.to(self.compute_dtype) for n, b in self.model.named_buffers()
                         if b.is_floating_point()}, **params}
            args, kwargs = _cast_floating((args, kwargs), self.compute_dtype)
        return functional_call(self.model, params, args, kwargs, strict=False)

    def _chunk_sum(self, params: dict[str, torch.Tensor], batch) -> torch.Tensor:
        """S_c, the chunk's loss sum, as a function of the differentiated parameters (others come from the model)."""
        return self._scalar(self.loss.chunk_sum(self._forward(params, batch), batch))

    @staticmethod
    def _scalar(value) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise FasthessError(f"the loss gave {shape}, not a scalar tensor; return a scalar (a mean or sum over "
                                "the batch) or per-example losses of shape (rows,)")
        return value

    def _check_contract(self, chunk: Chunk) -> None:
        """Once, on the first chunk: the loss reads θ only through the output, and splits over the examples; a
        refusal caused by random draws (in the forward or the loss) is reported as such."""
        before = _generator_states(self.device)
        try:
            self._check_chunk(chunk)
        except LossContractError as exc:
            self._refuse_random(before, exc)
            raise
        self._refuse_random(before, None)
        self._checked = True

    def _refuse_random(self, before: list[torch.Tensor], cause: Exception | None) -> None:
        if self.allow_stochastic or all(torch.equal(a, b) for a, b in zip(before, _generator_states(self.device))):
            return
        raise StochasticModelError(
            self._random_draws("the model's forward or the loss drew random numbers on the first chunk")) from cause

    def _random_draws(self, what: str) -> str:
        """The refusal of a random forward, with the fix that fits the model's mode."""
        fix = ("the model is in train mode, so this is most likely dropout that is not an nn.Dropout module (e.g. "
               "Hugging Face attention dropout, F.dropout(training=self.training)): call model.eval()"
               if self.model.training else "remove the randomness (e.g. label noise, torch.randn_like)")
        return (f"{what}, so the Hessian is not a fixed matrix; {fix}, or pass allow_stochastic=True to accept a "
                "random operator (each chunk then shares one draw across the block)")

    def _check_chunk(self, chunk: Chunk) -> None:
        batch = chunk.batch
        bad = nonfinite_data(batch)
        if bad is not None:  # before the split tests, whose refusals would name the loss instead
            raise NonFiniteError(f"chunk {chunk.index}: {bad}; clean the data (the Hessian is undefined there)")
        names_primals = dict(zip(self.names, self._primals()))
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), refuse_reentrant_checkpoint():
            try:
                out = self._forward(names_primals, batch)
            except (TypeError, RuntimeError, ValueError, IndexError, KeyError, AttributeError) as exc:
                raise FasthessError(
                    f"the model's forward failed on the first chunk ({type(exc).__name__}: {str(exc)[:200]}) when "
                    f"called with {len(batch.args)} positional input(s) and keyword inputs {sorted(batch.kwargs)}; "
                    "check that the inputs have the model's dtype and device, or say which parts of a batch are the "
                    "inputs with batch=fasthess.BatchSpec(inputs=...): e.g. BatchSpec(inputs=lambda b: (b,), "
                    "targets=lambda b: b['labels']) passes a dict batch whole as model(b)") from exc
        if self.loss.kind == "criterion":
            self.loss.check_shapes(out, batch.target)
        # the output as leaves with gradients: the loss's own graph shows ops without a second derivative
        probe = pytree.tree_map(lambda t: t.detach().requires_grad_(True).clone() if isinstance(t, torch.Tensor)
                                and t.is_floating_point() else t, out)
        with torch.enable_grad():
            try:
                value = self.loss_fn(probe, batch.target)
            except (TypeError, AttributeError, RuntimeError, ValueError, IndexError) as exc:
                raise FasthessError(
                    f"loss_fn(output, target) failed on the first chunk ({type(exc).__name__}: {str(exc)[:200]}); the "
                    f"model's output is a {type(out).__name__} and the target a {type(batch.target).__name__}. Pass a "
                    "loss that takes them (e.g. lambda out, y: ce(out.logits, y) for a Hugging Face output), or name "
                    "the targets with batch=fasthess.BatchSpec(targets=...)") from exc
        refuse_without_second_derivative(value)
        reached = self._reads_parameters(value)
        if reached:
            raise LossContractError(
                f"the loss reads the parameters {reached[:3]} outside the model's forward (e.g. an L2 penalty or "
                "a temperature inside the loss closure); fasthess substitutes θ only in the forward, so their "
                "curvature would be dropped. Move them into the model's forward, or pass the penalty as "
                "penalty=lambda params: ... (a function of the dict of parameters by name), whose Hessian is "
                "added exactly")
        if self.penalty is not None:
            self._check_penalty()
        rows = batch.rows
        if not self.data.spec.batch_loss:
            self._check_model_splits(batch, out)
        if self.loss.kind == "callable" and self.loss.mode is not None:
            return
        if self.loss.kind == "callable" and rows < 2:
            raise LossContractError(
                "the first chunk has a single example, so fasthess cannot check that the loss splits over examples "
                "(a mean, a sum or per-example losses); use chunks of two or more examples (batch_size >= 2)")
        h = rows // 2
        halves = [(take_rows(out, lo, hi, rows), self.data.spec.read(take_rows(chunk.raw, lo, hi, rows)))
                  for lo, hi in ((0, h), (h, rows))] if rows >= 2 else None

        if self.loss.kind == "callable":
            self._first = (out, chunk)
            self.loss.check(self._value64, out, batch, halves)
            return

        def value_of(o, b):
            with torch.no_grad():
                return self.loss_fn(o, b.target)

        self.loss.check(value_of, out, batch, halves)

    def _check_model_splits(self, batch: Batch, out) -> None:
        """The forward's output rows on the first chunk are those of its halves (:mod:`fasthess._model_split`);
        a forward that draws random numbers cannot be judged this way when ``allow_stochastic`` accepts it."""
        before = _generator_states(self.device)
        params = dict(zip(self.names, self._primals()))
        batch_stats = [m for m in self._batchnorms if m.training or m.running_mean is None]
        with sdpa_kernel(SDPBackend.MATH):
            try:
                check_model_splits(lambda a, k: self._forward(params, replace(batch, args=a, kwargs=k)), batch.args,
                                   batch.kwargs, batch.rows, out, batch_stats, self.compute_dtype)
            except BatchDependentModelError:
                if self.allow_stochastic and not all(
                        torch.equal(a, b) for a, b in zip(before, _generator_states(self.device))):
                    return  # random outputs differ anyway; allow_stochastic accepts a random operator
                raise

    def _value64(self, out, batch):
        """The loss of a callable in float64 where it allows it, so that split tests are sharp."""
        with torch.no_grad():
            try:
                return self.loss_fn(_cast_floating(out, torch.float64), _cast_floating(batch.target, torch.float64))
            except (RuntimeError, TypeError):
                return self.loss_fn(out, batch.target)

    def _check_joined(self, chunk: Chunk) -> None:
        """First pass, callable loss: the first chunk and this one, joined, must split as the first chunk did.

        The first chunk's halves can agree with a count-weighted mean by accident (a class-weighted or masked mean
        whose first chunk holds one class, or no masked rows); two different chunks rarely do. Chunks of different
        widths (each batch padded to its own longest sequence) are padded to the longer (:func:`join_rows`); the
        test runs only if that padding leaves each chunk's own loss unchanged, i.e. the loss ignores it. Costs one
        forward of each chunk on the first pass."""
        out0, first = self._first
        before = _generator_states(self.device)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            out = self._forward(dict(zip(self.names, self._primals())), chunk.batch)
        b0, b1 = first.batch, chunk.batch
        rows = b0.rows + b1.rows
        joined_out, target = join_rows(out0, out, b0.rows, b1.rows), join_rows(b0.target, b1.target, b0.rows, b1.rows)
        if joined_out is None or target is None or (b0.weight is None) != (b1.weight is None) \
                or not _finite(self._value64(out, b1)):
            return  # nothing to join, or a non-finite loss, which the pass's own finiteness check names
        weight = None if b0.weight is None else torch.cat([b0.weight, b1.weight])
        joined = Batch((), {}, target, weight, b0.count + b1.count, rows)
        parts = [(take_rows(joined_out, lo, hi, rows), replace(b, target=take_rows(target, lo, hi, rows),
                                                               weight=None if weight is None else weight[lo:hi]))
                 for b, lo, hi in ((b0, 0, b0.rows), (b1, b0.rows, rows))]
        mode = self.loss.mode
        try:
            try:
                if not all(_same(self._value64(o, b), self._value64(po, pb))
                           for (o, b), (po, pb) in zip(((out0, b0), (out, b1)), parts)):
                    return  # the loss reads the padding: the joined chunks are not a batch it was given
                self.loss.check(self._value64, joined_out, joined, parts)
            except FasthessError:
                raise
            except (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError):
                self.loss.mode = mode  # the loss does not take the joined structure: this extra check cannot run
                return
            if self.loss.mode != mode:
                raise LossContractError(
                    f"the loss splits over examples as a {mode} on the first chunk but as a {self.loss.mode} over "
                    f"chunks 0 and {chunk.index} joined: its normalizer depends on the batch (a class-weighted or "
                    "masked mean, say); pass the torch.nn criterion itself (its weight/ignore_index are read), or "
                    "return per-example losses (reduction='none')")
        except LossContractError as exc:
            self._refuse_random(before, exc)
            raise
        self._refuse_random(before, None)

    def _check_penalty(self) -> None:
        """The penalty must be a function of the parameters dict it is given, not of the model's own tensors."""
        with torch.enable_grad():
            leaves = {n: p.detach().to(self.compute_dtype).requires_grad_(True)
                      for n, p in zip(self.names, self._params)}
            value = self._scalar(self.penalty(leaves))
        reached = self._reads_parameters(value)
        if reached or not value.requires_grad:
            what = f"reads the model's parameters {reached[:3]}" if reached else "does not depend on its argument"
            raise LossContractError(
                f"the penalty {what}; it must be a function of the dict it is given (the differentiated parameters "
                "by name), e.g. penalty=lambda params: 1e-4 * sum(p.pow(2).sum() for p in params.values())")

    def _reads_parameters(self, value) -> list[str]:
        """The names of the model's own differentiated parameters that ``value``'s graph reaches."""
        trainable = [(n, p) for n, p in zip(self.names, self._params) if p.requires_grad]
        if not (isinstance(value, torch.Tensor) and value.requires_grad and trainable):
            return []
        grads = torch.autograd.grad(value.sum(), [p for _, p in trainable], allow_unused=True, retain_graph=True)
        return [n for (n, _), g in zip(trainable, grads) if g is not None]

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
        self._check_finite_pass(losses, state.indices, acc)
        return acc.T

    def gradient(self) -> torch.Tensor:
        """∇L(θ) = (1/W) Σ_c ∇S_c + ∇R as one flat float64 vector in the operator's layout (one data pass)."""
        acc = torch.zeros(1, self.num_params, dtype=torch.float64, device=self.device)
        state = PassState([])
        losses = self._run_pass(acc, state, self._chunk_gradient)
        if self.penalty is not None:
            leaves = [p.requires_grad_(True) for p in self._primals()]
            with torch.enable_grad():
                value = self._scalar(self.penalty(dict(zip(self.names, leaves))))
                ops.accumulate_dot(acc, _gradient_rows(value, leaves), 1.0)
            losses = torch.cat([losses, value.detach().double()[None]])
        self._check_finite_pass(losses, state.indices, acc)
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
        self._check_mode()
        try:
            with self._buffers.kept():
                self._pass(acc, state, per_chunk)
        except BaseException:
            state.abort()
            raise
        acc /= self._normalizer
        return state.stacked_losses(acc)

    def _pass(self, acc: torch.Tensor, state: PassState, per_chunk: Callable) -> None:
        """The pass of :meth:`_run_pass` before the division by W; counts W on the first pass."""
        if self.comm is None:
            local = self._accumulate(acc, state, per_chunk)
            if self._normalizer is None:
                self._set_normalizer(None if local is None else float(local))
        else:  # one all-reduce of acc (b, n) per pass, entered by every rank even when its part fails
            def local() -> tuple[torch.Tensor, torch.Tensor | None]:
                part = self._accumulate(acc, state, per_chunk)
                return state.stacked_losses(acc), part
            self.comm.run_pass(acc, local, lambda: self.data.num_examples)
            if self._normalizer is None:
                self._set_normalizer(self.comm.normalizer)

    def _set_normalizer(self, total: float | None) -> None:
        self._first = None  # the first pass is over: no more joined-chunk checks
        if self.loss.sums:
            self._normalizer = 1.0
        elif not total:
            raise FasthessError("the loss's normalizer over the whole data is 0 (every target is ignored, or every "
                                "weight or count is 0), so the loss is undefined; check ignore_index and the weights")
        else:
            self._normalizer = total

    def _accumulate(self, acc: torch.Tensor, state: PassState, per_chunk: Callable) -> torch.Tensor | None:
        """Add Σ_c of ``per_chunk(chunk)``'s rows (e.g. the products C_c v_j) over this process's chunks to ``acc``
        (b, n); the chunk sums go to ``state.losses``. Returns this process's part of W on the first pass (None for
        a sum or later passes)."""
        total = None
        batch_stats = self._batch_stat_bn()
        with self._frozen_batchnorm():
            for chunk in self.data.chunks():
                if batch_stats and chunk.batch.rows == 1:
                    raise FasthessError(
                        f"chunk {chunk.index} has a single example and the model has BatchNorm with batch statistics, "
                        "which are undefined for one example; choose a batch_size that leaves no remainder of 1, or "
                        "call model.eval()")
                if not self._checked:
                    self._check_contract(chunk)
                elif self._first is not None and self._normalizer is None:
                    self._check_joined(chunk)
                if self._normalizer is None and not self.loss.sums:
                    part = self.loss.normalizer(chunk.batch).to(self.device)
                    total = part if total is None else total + part
                if self.loss.kind == "callable" and self.loss.mode == "mean" and float(chunk.batch.count) == 0:
                    continue  # nothing to average in this chunk (e.g. every token ignored): it contributes 0
                with self._product_scope(chunk.index), translated_errors():
                    products, loss = per_chunk(chunk)
                ops.accumulate_dot(acc, [p if p.dtype in (torch.float32, torch.float64) else p.float()
                                         for p in products], 1.0)
                state.losses.append(loss.detach().to(torch.float64))
                state.indices.append(chunk.index)
        return total

    def _penalty_products(self, acc: torch.Tensor, tangents: list[torch.Tensor]) -> torch.Tensor:
        """Add (∇²R) v_j to row j of ``acc``, once per pass; returns R(θ)."""
        graph = gradient_graph(lambda p: self._scalar(self.penalty(p)), self.names, self._primals())
        ops.accumulate_dot(acc, graph_products(graph, tangents, keep=False), 1.0)
        return graph.loss.to(torch.float64)

    def _check_finite_pass(self, losses: torch.Tensor, indices: list[int], acc: torch.Tensor) -> None:
        """One host sync per pass: the chunk losses and the products must be finite."""
        if bool(torch.isfinite(losses).all()) and bool(torch.isfinite(acc).all()):
            return
        bad = int((~torch.isfinite(losses)).nonzero()[0, 0]) if not bool(torch.isfinite(losses).all()) else None
        if bad is not None and bad >= len(indices):
            raise NonFiniteError(f"the penalty is not finite (value {float(losses[bad])}); check the penalty function")
        if bad is None and self.comm is not None:
            raise NonFiniteError("the all-reduced Hessian-vector products are Inf/NaN although this rank's chunk "
                                 "losses are finite: another rank met a non-finite loss, changed data or an error in "
                                 "this pass (its own exception names the cause), or the products overflowed")
        if bad is None:
            data = self._nonfinite_data()
            if data is not None:
                raise NonFiniteError(f"the Hessian-vector products are Inf/NaN: {data}; clean the data")
            raise NonFiniteError("the Hessian-vector products overflowed to Inf/NaN although every chunk loss and "
                                 "the data are finite; use a float64 model (model.double()) or rescale the loss")
        index = indices[bad]
        where = self._nonfinite_data(index)
        where = f"{where}; clean the data" if where else \
            "check the inputs and weights for NaN/Inf, or lower the learning rate if training diverged"
        raise NonFiniteError(f"the loss is not finite on chunk {index} (value {float(losses[bad])}); {where}")

    def _nonfinite_data(self, index: int | None = None) -> str | None:
        """Error path only: where chunk ``index`` (None: any chunk) of the data holds NaN/Inf, as a phrase."""
        for chunk in self.data.chunks():
            if index is None or chunk.index == index:
                bad = nonfinite_data(chunk.batch)
                if bad is not None:
                    return f"chunk {chunk.index}: {bad}"
        return None
