"""block_lambda_max: every diagonal block's top eigenvalues against a dense float64 Hessian, the shared passes, and
the refusals."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import LOSSES, dense_ggn, dense_hessian, make_data, make_model
from fasthess import FasthessError, HessianOperator, LossContractError, StochasticModelError
from fasthess.ggn import GGNOperator
from fasthess.blocks import block_lambda_max, module_blocks


class TinyTransformer(nn.Module):
    """One encoder layer (self-attention, feed-forward, two LayerNorms) over a sequence, mean-pooled into classes."""

    def __init__(self, d: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=6, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def _transformer():
    torch.manual_seed(0)
    return TinyTransformer().double().eval(), (3, 4)


def _positions(model: nn.Module) -> dict[int, torch.Tensor]:
    """Each trainable parameter's positions in the flat vector of all of them."""
    out, off = {}, 0
    for p in model.parameters():
        if p.requires_grad:
            out[id(p)] = torch.arange(off, off + p.numel())
            off += p.numel()
    return out


def _check_against_dense(results, blocks, H, positions, k):
    for name, res in results.items():
        index = torch.arange(H.shape[0]) if name == "full" else torch.cat([positions[id(p)] for p in blocks[name]])
        exact = torch.linalg.eigvalsh(H[index][:, index]).flip(0)[:k]
        assert res.all_converged, name
        assert res.eigenvalues.shape == (k,)
        # the certificate holds: every bound covers the true error (plus float64 rounding of the dense reference)
        assert bool(((res.eigenvalues - exact).abs() <= res.error_bounds + 1e-10).all()), (name, res, exact)
        assert bool(((res.eigenvalues - exact).abs() <= 1e-4 * exact.abs()).all()), (name, res, exact)
    top = results["full"].eigenvalues[0] + results["full"].error_bounds[0]
    assert all(float(r.eigenvalues[0]) <= float(top) + 1e-10 for r in results.values())  # Cauchy interlacing


@pytest.mark.parametrize("kind, hvp", [("cnn", "double-backward"), ("transformer", "double-backward"),
                                       ("cnn", "forward-over-reverse")])
@pytest.mark.parametrize("k", [1, 2])
def test_every_module_block_matches_dense(kind, hvp, k):
    """Double backward differentiates each block on its own (BlockDiagonalHessian); forward mode embeds."""
    model, shape = _transformer() if kind == "transformer" else make_model("cnn")
    X, y = make_data(shape, n=23)
    blocks = module_blocks(model)
    assert len(blocks) >= (7 if kind == "transformer" else 2)
    results = block_lambda_max(model, LOSSES["ce"], (X, y), batch_size=10, k=k, hvp=hvp)
    assert list(results) == [*blocks, "full"]
    with sdpa_kernel(SDPBackend.MATH):  # the only attention kernel with a double backward on the CPU
        H = dense_hessian(model, LOSSES["ce"], X, y, 10)
    _check_against_dense(results, blocks, H, _positions(model), k)


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
@pytest.mark.parametrize("k", [1, 2])
def test_every_ggn_block_matches_dense(kind, k, monkeypatch):
    """curvature="ggn": each block G_bb = J_bᵀ (∇²_o ℓ) J_b from the embedded GGN product's rows."""
    model, shape = _transformer() if kind == "transformer" else make_model("cnn")
    X, y = make_data(shape, n=23)
    blocks = module_blocks(model)
    # the eval-mode encoder's fused fast path has no forward-mode AD, which the GGN's J v needs
    monkeypatch.setattr(torch.backends.mha, "get_fastpath_enabled", lambda: False)
    results = block_lambda_max(model, LOSSES["ce"], (X, y), batch_size=10, k=k, curvature="ggn")
    assert list(results) == [*blocks, "full"]
    with sdpa_kernel(SDPBackend.MATH):
        G = dense_ggn(model, LOSSES["ce"], X, y)
    _check_against_dense(results, blocks, G, _positions(model), k)


def test_custom_blocks_and_union():
    model, shape = make_model("gelu_mlp")
    X, y = make_data(shape, loss="mse")
    lin = [m for m in model if isinstance(m, nn.Linear)]
    blocks = {"weights": [m.weight for m in lin], "first_layer": list(lin[0].parameters())}  # blocks may overlap
    results = block_lambda_max(model, LOSSES["mse"], (X, y), blocks=blocks, batch_size=37)
    params = list({id(p): p for ps in blocks.values() for p in ps}.values())
    union = [p for p in model.parameters() if any(p is q for q in params)]  # the full result is over their union
    H = dense_hessian(model, LOSSES["mse"], X, y, 37, params=union)
    positions, off = {}, 0
    for p in union:
        positions[id(p)] = torch.arange(off, off + p.numel())
        off += p.numel()
    _check_against_dense(results, blocks, H, positions, 1)


def test_one_data_pass_per_round(monkeypatch):
    model, shape = make_model("cnn")
    X, y = make_data(shape)
    calls = []
    original = HessianOperator._matmat
    monkeypatch.setattr(HessianOperator, "_matmat", lambda self, V: calls.append(V.shape[1]) or original(self, V))
    results = block_lambda_max(model, LOSSES["ce"], (X, y), batch_size=10)
    assert len(calls) == max(r.num_passes for r in results.values())
    assert sum(calls) == sum(r.num_hvps for r in results.values())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(params=[]), FasthessError, "blocks="),
    (dict(v0=torch.zeros(3)), FasthessError, "unsupported option"),
    (dict(which="SA"), FasthessError, "unsupported option"),
    (dict(k=0), FasthessError, "k=0"),
    (dict(tol=-1.0), FasthessError, "tol="),
    (dict(block_size=1), FasthessError, "block_size=1 is below"),
    (dict(blocks={"full": None}), FasthessError, "other than 'full'"),
    (dict(blocks={"a": []}), FasthessError, "non-empty list"),
    (dict(blocks={"a": torch.zeros(2)}), FasthessError, "non-empty list"),
    (dict(k=3), FasthessError, "not more than k = 3"),
    (dict(curvature="fisher"), FasthessError, "curvature="),
    (dict(curvature="ggn", hvp="double-backward"), FasthessError, "do not apply to curvature='ggn'"),
])
def test_refusals_before_any_product(kwargs, error, match, monkeypatch):
    model, shape = make_model("cnn")  # its last Linear's bias has 3 entries: k=3 leaves that block no room
    X, y = make_data(shape)
    if "blocks" not in kwargs:
        kwargs.setdefault("blocks", {"conv": list(model[0].parameters()), "bias": [model[4].bias]})
    for operator in (HessianOperator, GGNOperator):
        monkeypatch.setattr(operator, "_matmat", lambda self, V: pytest.fail("a product ran"))
    with pytest.raises(error, match=match):
        block_lambda_max(model, LOSSES["ce"], (X, y), batch_size=10, **kwargs)


def test_operator_refusals_apply():
    model, shape = make_model("tanh_mlp")
    X, y = make_data(shape)
    with pytest.raises(LossContractError):
        block_lambda_max(model, lambda out, t: LOSSES["ce"](out, t) + model[0].weight.square().sum(), (X, y))
    dropped = nn.Sequential(model, nn.Dropout(0.5)).train()
    with pytest.raises(StochasticModelError):
        block_lambda_max(dropped, LOSSES["ce"], (X, y))


def test_module_blocks_names_and_frozen():
    model, _ = _transformer()
    model.head.bias.requires_grad_(False)
    blocks = module_blocks(model)
    assert blocks["head"] == [model.head.weight]
    assert blocks["encoder.self_attn"] == [model.encoder.self_attn.in_proj_weight, model.encoder.self_attn.in_proj_bias]
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(FasthessError, match="no trainable parameters"):
        module_blocks(model)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_float32_blocks_below_1e4_are_checked_against_float64_products(curvature):
    """A float32 model at tol 1e-6: every block's bound is widened by the shift float64 products of its Ritz vectors
    measure (as eigs does; a red team found float32 answers certified past their rounding at tol 1e-6), and holds
    against the dense float64 curvature of the same weights."""
    model, shape = make_model("cnn")
    X, y = make_data(shape, n=23)
    model32 = model.float()
    results = block_lambda_max(model32, LOSSES["ce"], (X.float(), y), batch_size=10, tol=1e-6, curvature=curvature)
    model64 = model32.double()
    M = (dense_hessian(model64, LOSSES["ce"], X, y, 10) if curvature == "hessian"
         else dense_ggn(model64, LOSSES["ce"], X, y))
    positions, blocks = _positions(model64), module_blocks(model64)
    for name, res in results.items():
        assert res.precision.startswith("float32 products, checked against float64 products"), (name, res.precision)
        index = torch.arange(M.shape[0]) if name == "full" else torch.cat([positions[id(p)] for p in blocks[name]])
        exact = torch.linalg.eigvalsh(M[index][:, index])[-1]
        if res.all_converged:
            assert abs(float(res.eigenvalues[0] - exact)) <= float(res.error_bounds[0]) + 1e-9, (name, res, exact)
