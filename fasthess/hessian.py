"""The Hessian of the full-dataset training loss as a symmetric linear operator.

For L(θ) = (1/N) Σᵢ ℓ(f_θ(xᵢ), yᵢ) over the chosen parameters θ ∈ ℝⁿ,

    H V = Σ_c (n_c / N) ∇²_θ L_c(θ) V,      V ∈ ℝ^{n×b},

where L_c is the mean loss of chunk c (n_c examples). A block of b vectors costs one pass over
the data: per chunk, ``torch.func.jvp`` of ``torch.func.grad`` (forward-over-reverse) is vmapped
over the b tangents, so the forward and backward of the primal are shared by the whole block.
Models without forward-mode support fall back to double backward, with a warning naming why.

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

import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import grad, jvp, vmap

from fasthess.errors import FasthessError, StochasticModelError
from fasthess.model_operator import ModelOperator

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

HVP_METHODS = ("auto", "forward-over-reverse", "double-backward")
_HVP_CHOICE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {key: method}


class HessianOperator(ModelOperator):
    """Exact Hessian of the mean training loss over a whole data set.

    Args:
        model: the network; evaluated in its current mode (train/eval), which is never changed.
        loss_fn: a mean-reduced criterion ``loss_fn(output, target) -> scalar``.
        data: ``(X, y)`` tensors, a ``Dataset`` or an iterable of ``(x, y)`` batches (a DataLoader).
        batch_size: chunk size for tensors and datasets (default 1024); with train-mode BatchNorm it
            is the ghost-batch size and must be given.
        params: the parameters to differentiate (default: all with ``requires_grad``).
        allow_stochastic: accept train-mode dropout (a random operator).
        hvp: ``"auto"`` (on the CPU the faster of the two methods, timed once per model and block size; elsewhere
            forward-over-reverse; both fall back to double backward if forward mode fails), or force one.
        distributed: each process of the default ``torch.distributed`` group passes its own shard of the
            data (shards may be uneven); every process gets the products of the Hessian of all shards.
        process_group: like ``distributed=True`` on this group instead of the default one.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, data, *, batch_size: int | None = None,
                 params: Sequence[torch.Tensor] | None = None, allow_stochastic: bool = False,
                 hvp: str = "auto", distributed: bool = False, process_group: ProcessGroup | None = None) -> None:
        if hvp not in HVP_METHODS:
            raise FasthessError(f"hvp must be one of {HVP_METHODS}, got {hvp!r}")
        super().__init__(model, loss_fn, data, batch_size=batch_size, params=params,
                         allow_stochastic=allow_stochastic, distributed=distributed, process_group=process_group)
        self.hvp_method = "forward-over-reverse" if hvp == "auto" else hvp
        self._may_fall_back = hvp == "auto"
        # On the CPU neither HVP method wins everywhere (see _timed_choice), so "auto" measures both once
        self._autotune = hvp == "auto" and self.device.type == "cpu"

    def _chunk_products(self, x, y, tangents):
        if self._autotune:
            return self._timed_choice(x, y, tangents)
        return self._products(x, y, tangents)

    def _timed_choice(self, x, y, tangents):
        """``hvp="auto"`` on the CPU: time both methods on this chunk once per (model, parameters, block, chunk
        shape), keep the faster (the choice is cached on the model, so later operators skip the timing).

        Measured on 2 CPU cores (benchmarks/PEERS.md): for b = 1 double backward took 0.64× the time of
        forward-over-reverse on an 85k-parameter MLP and 0.95× on a 137k-parameter CNN; for b = 4 it took
        0.70-0.73×. The two results are the same matrix up to rounding, so either may be returned.
        """
        key = (tuple(self.names), tangents[0].shape[0], tuple(x.shape), str(self.dtype))
        cache = _HVP_CHOICE.setdefault(self.model, {})
        if key not in cache:
            self.hvp_method = "forward-over-reverse"
            out = self._products(x, y, tangents)  # first call: warms torch.func up, may fall back (warns)
            if self.hvp_method == "forward-over-reverse":
                self._double_backward(x, y, tangents)  # warm-up
                times = {}
                for method, fn in (("forward-over-reverse", self._forward_over_reverse),
                                   ("double-backward", self._double_backward)):
                    t0 = time.perf_counter()
                    out = fn(x, y, tangents)
                    times[method] = time.perf_counter() - t0
                cache[key] = min(times, key=times.get)
            else:
                cache[key] = self.hvp_method
            self.hvp_method = cache[key]
            return out
        self.hvp_method = cache[key]
        return self._products(x, y, tangents)

    def _products(self, x, y, tangents):
        if self.hvp_method == "forward-over-reverse":
            try:
                return self._forward_over_reverse(x, y, tangents)
            except FasthessError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure of forward-mode AD triggers the fallback
                if "randomness" in str(exc):
                    raise StochasticModelError(
                        "the model draws random numbers in its forward pass (e.g. functional dropout), so the Hessian "
                        "is not a fixed matrix; disable the randomness, or pass allow_stochastic=True") from exc
                if not self._may_fall_back:
                    raise
                warnings.warn(f"forward-mode AD failed for this model ({type(exc).__name__}: {str(exc)[:200]}); "
                              "falling back to double-backward Hessian-vector products", RuntimeWarning, stacklevel=4)
                self.hvp_method = "double-backward"
        return self._double_backward(x, y, tangents)

    def _forward_over_reverse(self, x, y, tangents):
        primals = {name: p.detach() for name, p in zip(self.names, self._params)}
        # A floating target travels as a primal with a materialized zero tangent: some PyTorch loss formulas
        # (mse_loss) fail in forward mode on the implicit ZeroTensor tangent of a constant target.
        y_tangent = torch.zeros_like(y) if y.is_floating_point() else None

        def loss_and_aux(p, target):
            loss = self._loss(p, x, target)
            return loss, loss

        grad_fn = grad(loss_and_aux, argnums=0, has_aux=True)

        def one(t):
            t = dict(zip(self.names, t))
            if y_tangent is None:
                _, hv, loss = jvp(lambda p: grad_fn(p, y), (primals,), (t,), has_aux=True)
            else:
                _, hv, loss = jvp(grad_fn, (primals, y), (t, y_tangent), has_aux=True)
            return [hv[name] for name in self.names], loss

        hv, loss = vmap(one, randomness="same" if self.allow_stochastic else "error")(tangents)
        return hv, loss[0]

    def _double_backward(self, x, y, tangents):
        leaves = [p.detach().requires_grad_(True) for p in self._params]
        with torch.enable_grad():
            loss = self._loss(dict(zip(self.names, leaves)), x, y)
            g = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
            g = [gi if gi is not None else torch.zeros_like(p) for gi, p in zip(g, leaves)]
            b = tangents[0].shape[0]
            cols = [torch.autograd.grad(g, leaves, [t[j] for t in tangents], retain_graph=j + 1 < b,
                                        allow_unused=True) for j in range(b)]
        hv = [torch.stack([c[i] if c[i] is not None else torch.zeros_like(leaves[i]) for c in cols])
              for i in range(len(leaves))]
        return hv, loss.detach()
