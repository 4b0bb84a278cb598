"""The generalized Gauss–Newton matrix of the full-dataset training loss as a symmetric operator.

For the loss of the contract (:mod:`fasthess._criteria`), L(θ) = (1/W) Σ_c S_c(θ) + R(θ), with the chunk's loss
sum S_c(θ) = s_c(f_θ(X_c)) a function of the chunk's stacked outputs o = f_θ(X_c), the Hessian splits as

    ∇²S_c = J_cᵀ (∇²_o s_c) J_c + Σ_k (∂s_c/∂o_k) ∇²_θ o_k,

where J_c = ∂o/∂θ. The GGN keeps the first term (and the penalty's Hessian ∇²R, exactly):

    G V = (1/W) Σ_c J_cᵀ (∇²_o s_c) J_c V + ∇²R V.

It is positive semi-definite whenever the loss is convex in the outputs (cross-entropy, MSE), and it
equals the Fisher information for those losses. Per chunk and for each column v of the block,
``torch.func.jvp`` of the model gives J_c v, a jvp of the output gradient ∇_o s_c gives (∇²_o s_c) J_c v,
and the model's ``vjp`` applies J_cᵀ; the whole chain is vmapped over the b columns, so one forward
(for the vjp) and one batched forward/backward cover the block.

>>> import torch
>>> from torch import nn
>>> _ = torch.manual_seed(0)
>>> model = nn.Linear(3, 1).double()
>>> X, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
>>> G = GGNOperator(model, nn.MSELoss(), (X, y))
>>> # A linear model with MSE has no second term: G equals the Hessian (2/N) [X 1]ᵀ[X 1].
>>> A = torch.cat([X, torch.ones(10, 1, dtype=torch.float64)], 1)
>>> torch.allclose(G.matmat(torch.eye(4, dtype=torch.float64)), (2 / 10) * A.T @ A)
True
"""
from __future__ import annotations

import torch
from torch.func import grad, jvp, vjp, vmap
from torch.utils import _pytree as pytree

from fasthess._data import Chunk
from fasthess.errors import StochasticModelError, UnsupportedModelError
from fasthess._contract import scalar_value
from fasthess._model_operator import ModelOperator, PassState


class GGNOperator(ModelOperator):
    """Generalized Gauss–Newton matrix of the training loss over a whole data set (the loss contract of
    :class:`fasthess.HessianOperator`).

    Takes the arguments of :class:`fasthess.HessianOperator` except ``hvp`` and ``graph_memory``: ``model``,
    ``loss_fn``, ``data``, ``batch_size``, ``params``, ``allow_stochastic``, ``distributed``, ``process_group``,
    ``batch``, ``penalty``. With ``allow_stochastic=True`` and active dropout, the output, J v and Jᵀu of one
    chunk may see different dropout masks.
    """

    def _chunk_products(self, chunk: Chunk, state: PassState):
        batch = chunk.batch
        primals = dict(zip(self.names, self._primals()))
        structure = []

        def outputs(p):  # the output's tensors (a Hugging Face output also holds e.g. a cache object)
            leaves, spec = pytree.tree_flatten(self._forward(p, batch))
            structure[:] = [spec, [isinstance(t, torch.Tensor) for t in leaves]]
            return tuple(t for t in leaves if isinstance(t, torch.Tensor))

        def rebuilt(tensors):  # the output as the loss sees it; its other leaves are None
            spec, is_tensor = structure
            it = iter(tensors)
            return pytree.tree_unflatten([next(it) if flag else None for flag in is_tensor], spec)

        out, pullback = vjp(outputs, primals)
        loss = scalar_value(self.loss.chunk_sum(rebuilt(out), batch))
        y = batch.target
        if isinstance(y, torch.Tensor) and y.is_floating_point():  # the target travels as a primal with a zero
            y_zero = torch.zeros_like(y)                               # tangent, as in HessianOperator
            loss_grad = grad(lambda o, t: self.loss.chunk_sum(rebuilt(o), batch.with_target(t)))

            def loss_hessian(u):
                return jvp(loss_grad, (out, y), (u, y_zero))[1]
        else:
            loss_grad = grad(lambda o: self.loss.chunk_sum(rebuilt(o), batch))

            def loss_hessian(u):
                return jvp(loss_grad, (out,), (u,))[1]

        def one(t):
            _, jv = jvp(outputs, (primals,), (dict(zip(self.names, t)),))
            (g,) = pullback(loss_hessian(jv))
            return [g[name] for name in self.names]

        try:
            products = vmap(one, randomness="same" if self.allow_stochastic else "error")(state.tangents)
        except RuntimeError as exc:
            if "randomness" in str(exc):
                raise StochasticModelError(
                    "the model draws random numbers in its forward pass (e.g. functional dropout), so the GGN is not "
                    "a fixed matrix; disable the randomness, or pass allow_stochastic=True") from exc
            if "ZeroTensors are immutable" not in str(exc):
                raise  # the operator names the other known causes (a fused attention kernel, saved-tensor hooks)
            raise UnsupportedModelError(
                f"the GGN's products (torch.func's jvp and vjp under vmap) failed ({str(exc)[:160]}); a loss that "
                "builds tensors from the targets inside it (F.one_hot(y), torch.eye(C)[y], scatter) does this. Build "
                "such targets in the data (one-hot float targets), or use curvature='hessian' (HessianOperator), "
                "which does not use these transforms") from exc
        return products, loss.detach()
