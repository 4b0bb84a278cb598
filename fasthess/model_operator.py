"""Shared machinery of the curvature operators of a model: parameters, flat layout, data passes.

A curvature operator (Hessian, Gauss-Newton) of the training loss

    L(θ) = (1/N) Σᵢ ℓ(f_θ(xᵢ), yᵢ)

is a sum over data chunks c of size n_c of (n_c/N)·C_c, where C_c is the curvature of the chunk's
mean loss. :class:`ModelOperator` owns everything that is not specific to C: which parameters θ
are differentiated and how they are laid out as one flat vector, the data stream, the weighting
n_c/N, the model-mode rules (train-mode BatchNorm, dropout) and the finiteness checks. A subclass
supplies ``_chunk_products(index, x, y, tangents)``, the b products C_c·v_j of chunk number ``index``. With ``distributed=True``
(or a ``process_group``) each process passes its own shard and N counts the examples of all shards; the
per-pass sums are all-reduced as described in :mod:`fasthess.distributed`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call

from fasthess import ops
from fasthess.data import ChunkedData, is_batched_iterable
from fasthess.distributed import ShardComm, resolve_group
from fasthess.errors import FasthessError, NonFiniteError, StochasticModelError
from fasthess.linop import SymmetricOperator

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

_BatchNorm = nn.modules.batchnorm._BatchNorm
_Dropout = nn.modules.dropout._DropoutNd


def _select_params(model: nn.Module, params: Sequence[torch.Tensor] | None) -> list[tuple[str, torch.Tensor]]:
    named = list(model.named_parameters())
    if params is None:
        chosen = [(name, p) for name, p in named if p.requires_grad]
        if not chosen:
            raise FasthessError(
                "the model has no trainable parameters (all have requires_grad=False); "
                "unfreeze some parameters or pass params=[...] explicitly")
        return chosen
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


class ModelOperator(SymmetricOperator):
    """Base of the model-curvature operators; see the module docstring for the math."""

    def __init__(self, model: nn.Module, loss_fn: Callable, data, *, batch_size: int | None = None,
                 params: Sequence[torch.Tensor] | None = None, allow_stochastic: bool = False,
                 distributed: bool = False, process_group: ProcessGroup | None = None) -> None:
        super().__init__()
        group = resolve_group(distributed, process_group)
        if not isinstance(model, nn.Module):
            raise FasthessError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise FasthessError(f"loss_fn must be callable (e.g. nn.CrossEntropyLoss()), got {type(loss_fn).__name__}")
        self.model, self.loss_fn, self.allow_stochastic = model, loss_fn, allow_stochastic
        named = _select_params(model, params)
        devices = {p.device for _, p in named}
        if len(devices) > 1:
            raise FasthessError(f"the parameters live on several devices ({sorted(map(str, devices))}); "
                                "move the model to one device with model.to(device)")
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) > 1 or not next(iter(dtypes)).is_floating_point:
            raise FasthessError(f"the parameters must share one floating dtype, got {sorted(map(str, dtypes))}; "
                                "convert the model with model.float() or model.double()")
        self.names = [name for name, _ in named]
        self._params = [p for _, p in named]
        self.shapes = [p.shape for p in self._params]
        self.numels = [p.numel() for p in self._params]
        self.num_params = sum(self.numels)
        self.device = next(iter(devices))
        self.dtype = next(iter(dtypes))
        self._batchnorms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
        self._dropouts = [m for m in model.modules() if isinstance(m, _Dropout)]
        self._check_mode()
        if batch_size is None and self._train_mode_bn() and not is_batched_iterable(data):
            raise FasthessError(
                "the model has BatchNorm in train mode, which normalizes each chunk with its own statistics; "
                "pass batch_size=<the training batch size>, or call model.eval() to use the running statistics")

        def build() -> ChunkedData:
            chunked = ChunkedData(data, batch_size, self.device)
            self._check_finite_weights()
            return chunked

        #: the collectives of a sharded operator (None in a single process); see :mod:`fasthess.distributed`
        self.comm = None if group is None else ShardComm(group, self.device)
        self.data = build() if self.comm is None else self.comm.setup(build, lambda d: d.num_examples)

    @property
    def num_examples(self) -> int | None:
        """N, the number of examples over all shards (None before the first pass over an iterable of batches)."""
        return self.data.num_examples if self.comm is None else self.comm.num_examples

    # ---- layout -----------------------------------------------------------------------------------
    def unflatten(self, Vt: torch.Tensor) -> list[torch.Tensor]:
        """Split rows of Vt (b, n) into per-parameter tensors (b, *shape_i) in the model's dtype."""
        out, off = [], 0
        for shape, numel in zip(self.shapes, self.numels):
            out.append(Vt[:, off:off + numel].reshape(Vt.shape[0], *shape).to(self.dtype, copy=True))
            off += numel
        return out

    def param_vector(self) -> torch.Tensor:
        """The current parameters θ as one flat float64 vector in the operator's layout."""
        return torch.cat([p.detach().reshape(-1).double() for p in self._params])

    # ---- mode rules -------------------------------------------------------------------------------
    def _train_mode_bn(self) -> bool:
        return any(m.training for m in self._batchnorms)

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

    def _check_finite_weights(self) -> None:
        bad = [name for name, p in zip(self.names, self._params) if not bool(torch.isfinite(p.detach()).all())]
        if bad:
            raise NonFiniteError(f"parameters {bad[:5]} contain NaN or Inf; the Hessian is undefined there. "
                                 "Restore finite weights (e.g. from a checkpoint before divergence)")

    # ---- one pass over the data -------------------------------------------------------------------
    def _loss(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The chunk's mean loss as a function of the differentiated parameters (others come from the model)."""
        loss = self.loss_fn(functional_call(self.model, params, (x,), strict=False), y)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise FasthessError(f"loss_fn returned {shape}, not a scalar tensor; use a mean-reduced loss such as "
                                "nn.CrossEntropyLoss() (reduction='mean')")
        return loss

    def _chunk_products(self, index: int, x: torch.Tensor, y: torch.Tensor, tangents: list[torch.Tensor]
                        ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(C_c v_j for each parameter tensor, batched over j; the chunk's mean loss) of chunk number ``index``.

        Implemented by subclasses.
        """
        raise NotImplementedError

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        self._check_mode()
        Vt = V.T.contiguous()
        tangents = self.unflatten(Vt)
        acc = torch.zeros_like(Vt)
        if self.comm is None:
            losses = self._accumulate(acc, tangents)
        else:  # one all-reduce of acc (b, n) per pass, entered by every rank even when its part fails
            losses = self.comm.run_pass(acc, lambda: self._accumulate(acc, tangents), lambda: self.data.num_examples)
        acc /= self.num_examples
        self._check_finite_pass(losses, acc)
        return acc.T

    def _accumulate(self, acc: torch.Tensor, tangents: list[torch.Tensor]) -> torch.Tensor:
        """Add Σ_c n_c·C_c v_j over this process's chunks to row j of ``acc`` (b, n); returns the chunk losses."""
        losses = []
        train_bn = self._train_mode_bn()
        with self._frozen_batchnorm():
            for i, x, y, count in self.data.chunks():
                if train_bn and count == 1:
                    raise FasthessError(
                        f"chunk {i} has a single example and the model has train-mode BatchNorm, whose batch "
                        "statistics are undefined for one example; choose a batch_size that leaves no remainder of 1, "
                        "or call model.eval()")
                products, loss = self._chunk_products(i, x, y, tangents)
                ops.accumulate_dot(acc, products, float(count))
                losses.append(loss.detach())
        return torch.stack(losses)

    def _check_finite_pass(self, losses: torch.Tensor, acc: torch.Tensor) -> None:
        """One host sync per pass: the chunk losses and the products must be finite."""
        if bool(torch.isfinite(losses).all()) and bool(torch.isfinite(acc).all()):
            return
        bad = int((~torch.isfinite(losses)).nonzero()[0, 0]) if not bool(torch.isfinite(losses).all()) else None
        if bad is None and self.comm is not None:
            raise NonFiniteError("the all-reduced Hessian-vector products are Inf/NaN although this rank's chunk "
                                 "losses are finite: another rank met a non-finite loss, changed data or an error in "
                                 "this pass (its own exception names the cause), or the products overflowed")
        if bad is None:
            raise NonFiniteError("the Hessian-vector products overflowed to Inf/NaN although every chunk loss is "
                                 "finite; use a float64 model (model.double()) or rescale the loss")
        x_bad = self._chunk_inputs_nonfinite(bad)
        where = "its inputs contain NaN/Inf; clean the data" if x_bad else \
            "check the inputs and weights for NaN/Inf, or lower the learning rate if training diverged"
        raise NonFiniteError(f"the loss is not finite on chunk {bad} (value {float(losses[bad])}); {where}")

    def _chunk_inputs_nonfinite(self, index: int) -> bool:
        """Error path only: does chunk ``index`` of the data hold NaN/Inf inputs?"""
        for i, x, _, _ in self.data.chunks():
            if i == index:
                return x.is_floating_point() and not bool(torch.isfinite(x).all())
        return False
