"""Batch and model forms: dict and nested batches, BatchSpec, a tiny Hugging Face GPT-2, compiled models, CPU
attention, half precision, stats-free BatchNorm; and the clear errors for the forms that are refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import fasthess
from conftest import dense_hessian, dense_hessian_of, make_data, make_model

N = 23


def _check(op, H, cols=2, rtol=1e-10):
    V = torch.randn(op.num_params, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    HV = H @ V
    torch.testing.assert_close(op.matmat(V), HV, rtol=rtol, atol=rtol * 1e-2 * float(HV.abs().max()) + 1e-14)


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 5).double(), nn.Linear(2, 5).double()
        self.head = nn.Linear(5, 3).double()

    def forward(self, features, extra, scale=None):
        h = torch.tanh(self.a(features) + self.b(extra))
        return self.head(h if scale is None else h * scale[:, None])


def _two_input_data():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(N, 4, generator=g, dtype=torch.float64), torch.randn(N, 2, generator=g, dtype=torch.float64),
            torch.rand(N, generator=g, dtype=torch.float64) + 0.5, torch.randint(0, 3, (N,), generator=g))


@pytest.mark.parametrize("form", ["dict", "nested_tuple", "spec"])
def test_dict_nested_and_spec_batches(form):
    model = _TwoInputs()
    A, B, S, y = _two_input_data()
    ce = nn.CrossEntropyLoss()
    H = dense_hessian_of(model, lambda p: ce(functional_call(model, p, (A, B), {"scale": S}), y))
    cuts = [(0, 8), (8, 16), (16, N)]
    spec = None
    if form == "dict":
        data = [{"features": A[a:b], "extra": B[a:b], "scale": S[a:b], "labels": y[a:b]} for a, b in cuts]
    elif form == "nested_tuple":
        data = [((A[a:b], B[a:b], S[a:b]), y[a:b]) for a, b in cuts]
    else:
        data = [{"x": (A[a:b], B[a:b]), "s": S[a:b], "target": y[a:b]} for a, b in cuts]
        spec = fasthess.BatchSpec(inputs=lambda b: {"features": b["x"][0], "extra": b["x"][1], "scale": b["s"]},
                                  targets=lambda b: b["target"])
    _check(fasthess.HessianOperator(model, ce, data, batch=spec), H)
    _check(fasthess.HessianOperator(model, ce, data, batch=spec, hvp="forward-over-reverse"), H)


def test_dict_batch_without_labels_names_batch_spec():
    model = _TwoInputs()
    A, B, _, y = _two_input_data()
    op = fasthess.HessianOperator(model, nn.CrossEntropyLoss(), [{"features": A, "extra": B, "y": y}])
    with pytest.raises(fasthess.FasthessError, match=r"'labels'.*BatchSpec\(inputs=..., targets=...\)"):
        op.matvec(torch.ones(op.num_params, dtype=torch.float64))


@pytest.mark.parametrize("case, match", [
    ("zero_dim_y", "0-dim"), ("lone_parameter", r"params=\[p\]"), ("sparse_embedding", "sparse = False"),
    ("meta_params", "to_empty"), ("meta_data", "meta tensors"), ("bad_weights", "per-example weights"),
    ("count_with_criterion", "drop count="), ("compiled_submodule", "_orig_mod"),
])
def test_refused_forms_name_the_fix(case, match):
    model, shape = make_model("tanh_mlp")
    X, y = make_data(shape, n=N)
    kw, data = {}, (X, y)
    if case == "zero_dim_y":
        data = [(X[:1], y[0])]
    elif case == "lone_parameter":
        kw["params"] = model[0].weight
    elif case == "sparse_embedding":
        model = nn.Sequential(nn.Embedding(10, 3, sparse=True), nn.Flatten(), nn.Linear(6, 3)).double()
        data = (torch.randint(0, 10, (N, 2)), y)
    elif case == "meta_params":
        model = nn.Linear(6, 3, device="meta")
    elif case == "meta_data":
        data = [(X.to("meta"), y.to("meta"))]
    elif case == "bad_weights":
        data = (X, y, torch.ones(N, 2, dtype=torch.float64))
    elif case == "count_with_criterion":
        kw["batch"] = fasthess.BatchSpec(count=lambda b: 1)
    elif case == "compiled_submodule":
        model = nn.Sequential(torch.compile(model[0]), model[1], model[2])
    with pytest.raises(fasthess.FasthessError, match=match):
        op = fasthess.HessianOperator(model, nn.CrossEntropyLoss(), data, **kw)
        op.matvec(torch.ones(op.num_params, dtype=torch.float64))


@pytest.mark.parametrize("hvp", ["double-backward", "forward-over-reverse"])
def test_compiled_model_gives_the_eager_answer(hvp):
    model, shape = make_model("gelu_mlp")
    X, y = make_data(shape, n=N)
    compiled = torch.compile(model)
    H = dense_hessian(model, nn.CrossEntropyLoss(), X, y, batch_size=N)
    op = fasthess.HessianOperator(compiled, nn.CrossEntropyLoss(), (X, y), batch_size=8, hvp=hvp)
    assert op.names[0] == "0.weight"  # the underlying module's names
    _check(op, H)


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


@pytest.mark.parametrize("hvp", ["double-backward", "forward-over-reverse"])
def test_cpu_attention_uses_a_differentiable_kernel(hvp):
    model = _Encoder().double().eval()
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(12, 5, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)
    with sdpa_kernel(SDPBackend.MATH):  # the reference itself needs the math kernel for second derivatives
        H = dense_hessian(model, nn.CrossEntropyLoss(), X, y, batch_size=12)
    _check(fasthess.HessianOperator(model, nn.CrossEntropyLoss(), (X, y), batch_size=5, hvp=hvp), H)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_products_run_in_float32(dtype):
    model, shape = make_model("tanh_mlp")
    X, y = make_data(shape, n=N)
    half = model.to(dtype)
    exact = dense_hessian(half.double(), nn.CrossEntropyLoss(), X.to(dtype).double(), y, batch_size=N)
    half.to(dtype)
    op = fasthess.HessianOperator(half, nn.CrossEntropyLoss(), (X.to(dtype), y), batch_size=8)
    assert op.compute_dtype == torch.float32 and next(half.parameters()).dtype == dtype
    _check(op, exact, rtol=1e-5)


def test_stats_free_batchnorm_needs_a_batch_size_and_is_exact_with_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Tanh(),
                          nn.Linear(8, 3)).double().eval()
    X, y = make_data((6,), n=N)
    with pytest.raises(fasthess.FasthessError, match=r"track_running_stats=False.*batch_size"):
        fasthess.HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    H = dense_hessian(model, nn.CrossEntropyLoss(), X, y, batch_size=8)  # ghost batches 8, 8, 7
    _check(fasthess.HessianOperator(model, nn.CrossEntropyLoss(), (X, y), batch_size=8), H)


# ---- a tiny Hugging Face causal LM (randomly initialized, no download) ---------------------------------------------
IGNORE = -100


def _gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 50, (6, 8), generator=g)
    lengths = torch.tensor([8, 5, 3, 8, 6, 2])
    mask = (torch.arange(8)[None] < lengths[:, None]).long()
    ids = ids * mask  # padding id 0
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[4:] = IGNORE  # the last chunk (sequences 4, 5) has no target token at all
    h = model.transformer.h
    params = [h[0].mlp.c_proj.bias, h[1].attn.c_attn.bias, model.transformer.ln_f.weight,
              model.transformer.ln_f.bias]  # in the model's order, as the dense reference lays them out
    return model, ids, mask, labels, params


def _lm_loss(out, labels):
    """The token mean of next-token cross-entropy, ignoring -100 labels."""
    return F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_hugging_face_gpt2_token_mean_on_padded_sequences(curvature):
    model, ids, mask, labels, params = _gpt2()
    batches = [{"input_ids": ids[a:b], "attention_mask": mask[a:b], "labels": labels[a:b]}
               for a, b in ((0, 2), (2, 4), (4, 6))]
    spec = fasthess.BatchSpec(count=lambda b: (b["labels"][:, 1:] != IGNORE).sum())

    def full(p):  # the token-mean loss of all the data as one batch
        return _lm_loss(functional_call(model, p, (), {"input_ids": ids, "attention_mask": mask,
                                                        "use_cache": False}), labels)

    if curvature == "ggn":
        op = fasthess.GGNOperator(model, _lm_loss, batches, batch=spec, params=params)
        G = op.matmat(torch.eye(op.num_params, dtype=torch.float64))
        torch.testing.assert_close(G, G.T, rtol=1e-10, atol=1e-12)
        assert float(torch.linalg.eigvalsh(G)[0]) > -1e-10  # cross-entropy: positive semi-definite
        return
    with sdpa_kernel(SDPBackend.MATH):
        H = dense_hessian_of(model, full, params)
    op = fasthess.HessianOperator(model, _lm_loss, batches, batch=spec, params=params)
    _check(op, H)
    assert op.normalizer == float((labels[:, 1:] != IGNORE).sum())
    wrong = fasthess.HessianOperator(model, torch.nn.CrossEntropyLoss(), batches, params=params)
    with pytest.raises(fasthess.FasthessError, match=r"CausalLMOutput.*out\.logits"):
        wrong.matvec(torch.ones(wrong.num_params, dtype=torch.float64))
    plain = fasthess.HessianOperator(model, _lm_loss, batches, params=params)  # counting sequences, not tokens
    with pytest.raises(fasthess.LossContractError, match=r"count=\.\.\."):
        plain.matvec(torch.ones(plain.num_params, dtype=torch.float64))


def test_bad_batch_spec_arguments_are_refused():
    with pytest.raises(fasthess.FasthessError, match=r"BatchSpec\(count=...\) must be a function"):
        fasthess.BatchSpec(count=3)
    model, shape = make_model("tanh_mlp")
    with pytest.raises(fasthess.FasthessError, match="fasthess.BatchSpec"):
        fasthess.HessianOperator(model, nn.CrossEntropyLoss(), make_data(shape), batch={"count": 1})
