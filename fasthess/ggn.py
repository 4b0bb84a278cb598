"""The generalized Gauss–Newton matrix of the full-dataset training loss as a symmetric operator.

For L(θ) = (1/N) Σ_c n_c L_c(θ) with the chunk loss L_c(θ) = ℓ_c(f_θ(X_c)) of the chunk's stacked
outputs o = f_θ(X_c) (mean-reduced over the chunk), the Hessian splits as

    ∇²L_c = J_cᵀ (∇²_o ℓ_c) J_c + Σ_k (∂ℓ_c/∂o_k) ∇²_θ o_k,

where J_c = ∂o/∂θ. The GGN keeps the first term:

    G V = Σ_c (n_c / N) J_cᵀ (∇²_o ℓ_c) J_c V.

It is positive semi-definite whenever the loss is convex in the outputs (cross-entropy, MSE), and it
equals the Fisher information for those losses. Per chunk and for each column v of the block,
``torch.func.jvp`` of the model gives J_c v, a jvp of the output gradient ∇_oℓ_c gives (∇²_oℓ_c) J_c v,
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
from torch.func import functional_call, grad, jvp, vjp, vmap

from fasthess.errors import FasthessError, StochasticModelError
from fasthess.model_operator import ModelOperator


class GGNOperator(ModelOperator):
    """Generalized Gauss–Newton matrix of the mean training loss over a whole data set.

    Takes the arguments of :class:`fasthess.HessianOperator` except ``hvp``: ``model``, ``loss_fn``,
    ``data``, ``batch_size``, ``params``, ``allow_stochastic``. The loss must be a function of the model's
    output and the target. With ``allow_stochastic=True`` and active dropout, the output, J v and Jᵀu of
    one chunk may see different dropout masks.
    """

    def _chunk_products(self, index, x, y, tangents):
        primals = {name: p.detach() for name, p in zip(self.names, self._params)}

        def outputs(p):
            return functional_call(self.model, p, (x,), strict=False)

        out, pullback = vjp(outputs, primals)
        loss = self.loss_fn(out, y)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise FasthessError(f"loss_fn returned {getattr(loss, 'shape', type(loss).__name__)}, not a scalar tensor; "
                                "use a mean-reduced loss such as nn.CrossEntropyLoss() (reduction='mean')")
        loss_grad = grad(self.loss_fn)  # (o, y) -> ∇_o ℓ(o, y)
        if y.is_floating_point():  # the target travels as a primal with a zero tangent, as in HessianOperator
            y_zero = torch.zeros_like(y)

            def loss_hessian(u):
                return jvp(loss_grad, (out, y), (u, y_zero))[1]
        else:
            def loss_hessian(u):
                return jvp(lambda o: loss_grad(o, y), (out,), (u,))[1]

        def one(t):
            _, jv = jvp(outputs, (primals,), (dict(zip(self.names, t)),))
            (g,) = pullback(loss_hessian(jv))
            return [g[name] for name in self.names]

        try:
            products = vmap(one, randomness="same" if self.allow_stochastic else "error")(tangents)
        except RuntimeError as exc:
            if "randomness" in str(exc):
                raise StochasticModelError(
                    "the model draws random numbers in its forward pass (e.g. functional dropout), so the GGN is not "
                    "a fixed matrix; disable the randomness, or pass allow_stochastic=True") from exc
            raise
        return products, loss.detach()
