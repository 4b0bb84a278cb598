"""The loss contract: the operator is the Hessian of the user's loss called on all the data as one batch, or it
refuses by name. Every supported form against a dense float64 Hessian; every refusal names its fix."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import Dataset

import fasthess
from conftest import dense_hessian, dense_hessian_of, make_data, make_model

N, CHUNK = 37, 10  # chunks of 10, 10, 10, 7


def _full(model, loss_fn, X, y, w=None, reduce_none="mean"):
    """loss_of(params) for the dense reference: the loss on all the data as one batch (weights: Σwℓ/Σw·…)."""
    def loss_of(p):
        value = loss_fn(functional_call(model, p, (X,)), y)
        if w is not None:
            return (value * w.reshape(-1, *([1] * (value.dim() - 1)))).sum() / (w.sum() * value[0].numel())
        return value.mean() if value.dim() else value
    return loss_of


def _check(op, H, cols=3, rtol=1e-10):
    V = torch.randn(op.num_params, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(op.matmat(V), H @ V, rtol=rtol, atol=1e-12 * float(H.abs().max()) + 1e-14)


def _targets(kind: str, n: int = N, c: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    if kind == "index":
        return torch.randint(0, c, (n,), generator=g)
    if kind == "ignored":  # a whole chunk of ignored labels, and a few more
        y = torch.randint(0, c, (n,), generator=g)
        y[:CHUNK] = -100
        y[25] = -100
        return y
    if kind == "probs":
        return torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64), 1)
    if kind == "binary":
        return torch.randint(0, 2, (n, c), generator=g).double()
    if kind == "signs":
        return torch.randint(0, 2, (n, c), generator=g).double() * 2 - 1
    if kind == "multilabel":
        return torch.randint(0, 2, (n, c), generator=g)
    if kind == "counts":
        return torch.poisson(torch.full((n, c), 2.0, dtype=torch.float64), generator=g)
    return torch.randn(n, c, generator=g, dtype=torch.float64)


CW = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
CRITERIA = {
    "ce_mean": (nn.CrossEntropyLoss(), "index", None),
    "ce_sum": (nn.CrossEntropyLoss(reduction="sum"), "index", None),
    "ce_none": (nn.CrossEntropyLoss(reduction="none"), "index", None),
    "ce_none_weight_ignore": (nn.CrossEntropyLoss(weight=CW, reduction="none"), "ignored", None),
    "ce_weight": (nn.CrossEntropyLoss(weight=CW), "index", None),
    "ce_ignore": (nn.CrossEntropyLoss(), "ignored", None),
    "ce_weight_ignore_smooth": (nn.CrossEntropyLoss(weight=CW, label_smoothing=0.1), "ignored", None),
    "ce_probs": (nn.CrossEntropyLoss(), "probs", None),
    "ce_functional": (F.cross_entropy, "index", None),
    "nll_weight": (nn.NLLLoss(weight=CW), "ignored", "log_softmax"),
    "mse_mean": (nn.MSELoss(), "real", None),
    "mse_sum": (nn.MSELoss(reduction="sum"), "real", None),
    "mse_none": (nn.MSELoss(reduction="none"), "real", None),
    "l1": (nn.L1Loss(), "real", None),
    "smooth_l1": (nn.SmoothL1Loss(beta=0.5), "real", None),
    "huber_sum": (nn.HuberLoss(delta=0.7, reduction="sum"), "real", None),
    "bce": (nn.BCELoss(weight=CW), "binary", "sigmoid"),
    "bce_logits": (nn.BCEWithLogitsLoss(pos_weight=CW, weight=CW.flip(0)), "binary", None),
    "kl_batchmean": (nn.KLDivLoss(reduction="batchmean"), "probs", "log_softmax"),
    "soft_margin": (nn.SoftMarginLoss(), "signs", None),
    "hinge_embedding": (nn.HingeEmbeddingLoss(margin=2.0), "signs", None),
    "multilabel_soft_margin": (nn.MultiLabelSoftMarginLoss(weight=CW), "binary", None),
    "poisson_nll": (nn.PoissonNLLLoss(), "counts", None),
}


def _model(head: str | None):
    model, shape = make_model("tanh_mlp")
    if head == "log_softmax":
        model = nn.Sequential(model, nn.LogSoftmax(1))
    elif head == "sigmoid":
        model = nn.Sequential(model, nn.Sigmoid())
    return model, shape


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_criterion_is_the_loss_on_all_the_data(name):
    loss_fn, target, head = CRITERIA[name]
    model, shape = _model(head)
    X, _ = make_data(shape, n=N)
    y = _targets(target)
    H = dense_hessian_of(model, _full(model, loss_fn, X, y))
    _check(fasthess.HessianOperator(model, loss_fn, (X, y), batch_size=CHUNK), H)


@pytest.mark.parametrize("name", ["ce_weight_ignore_smooth", "mse_sum", "bce_logits", "ce_probs"])
def test_criterion_forward_over_reverse_and_ggn(name):
    loss_fn, target, _ = CRITERIA[name]
    model, shape = make_model("tanh_mlp")
    X, _ = make_data(shape, n=N)
    y = _targets(target)
    H = dense_hessian_of(model, _full(model, loss_fn, X, y))
    _check(fasthess.HessianOperator(model, loss_fn, (X, y), batch_size=CHUNK, hvp="forward-over-reverse"), H)
    torch.manual_seed(0)
    linear = nn.Linear(6, 3).double()  # a linear model has no second term: its GGN is its Hessian
    _check(fasthess.GGNOperator(linear, loss_fn, (X, y), batch_size=CHUNK),
           dense_hessian_of(linear, _full(linear, loss_fn, X, y)))


@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), nn.CrossEntropyLoss(weight=CW),
                                     nn.MSELoss(), lambda o, t: F.cross_entropy(o, t, reduction="none")],
                         ids=["ce", "ce_class_weights", "mse", "callable_none"])
def test_per_example_weights(loss_fn):
    model, shape = make_model("tanh_mlp")
    X, _ = make_data(shape, n=N)
    y = _targets("real" if isinstance(loss_fn, nn.MSELoss) else "index")
    w = torch.rand(N, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.1
    if isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.weight is not None:
        def loss_of(p):  # Σ wᵢ cw[yᵢ] ℓᵢ / Σ wᵢ cw[yᵢ]
            e = F.cross_entropy(functional_call(model, p, (X,)), y, weight=CW, reduction="none")
            return (w * e).sum() / (w * CW[y]).sum()
    else:
        none = nn.MSELoss(reduction="none") if isinstance(loss_fn, nn.MSELoss) else \
            nn.CrossEntropyLoss(reduction="none")
        loss_of = _full(model, none, X, y, w)
    H = dense_hessian_of(model, loss_of)
    _check(fasthess.HessianOperator(model, loss_fn, (X, y, w), batch_size=CHUNK), H)
    batches = [(X[s:s + 8], y[s:s + 8], w[s:s + 8]) for s in range(0, N, 8)]  # a loader's (x, y, w) triples
    _check(fasthess.HessianOperator(model, loss_fn, batches), H)


@pytest.mark.parametrize("loss_fn, match", [
    (nn.MultiMarginLoss(), "no second derivative"), (nn.MultiLabelMarginLoss(), "no second derivative"),
    (nn.GaussianNLLLoss(), "wrap it in a loss"), (nn.CosineEmbeddingLoss(), "wrap it in a loss"),
    (nn.TripletMarginLoss(), "wrap it in a loss"), (nn.CTCLoss(), "no second derivative for ctc_loss"),
])
def test_criteria_that_cannot_be_split_are_refused_by_name(loss_fn, match):
    model, shape = make_model("tanh_mlp")
    with pytest.raises(fasthess.LossContractError, match=f"{type(loss_fn).__name__}.*{match}"):
        fasthess.HessianOperator(model, loss_fn, make_data(shape))


def test_every_target_ignored_is_refused_by_name():
    model, shape = make_model("tanh_mlp")
    X, _ = make_data(shape, n=N)
    op = fasthess.HessianOperator(model, nn.CrossEntropyLoss(), (X, torch.full((N,), -100)), batch_size=CHUNK)
    with pytest.raises(fasthess.FasthessError, match="every target is ignored"):
        op.matvec(torch.ones(op.num_params, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["mean", "sum", "per_example"])
def test_callables_that_split_over_examples(kind):
    model, shape = make_model("gelu_mlp")
    X, y = make_data(shape, n=N, loss="mse")
    loss_fn = {"mean": lambda o, t: (o - t).pow(2).sum(1).mean(), "sum": lambda o, t: (o - t).pow(2).sum(),
               "per_example": lambda o, t: (o - t).abs().pow(3).sum(1)}[kind]
    H = dense_hessian_of(model, _full(model, loss_fn, X, y))
    op = fasthess.HessianOperator(model, loss_fn, (X, y), batch_size=CHUNK)
    _check(op, H)
    assert op.loss.mode == {"mean": "mean", "sum": "sum", "per_example": "elements"}[kind]


def _contrastive(o, t):
    logits = o @ o.T
    return F.cross_entropy(logits, torch.arange(o.shape[0]))


def _centred_mse(o, t):
    return ((o - o.mean(0)) - t).pow(2).mean()


@pytest.mark.parametrize("loss_fn", [_contrastive, _centred_mse])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_batch_dependent_loss_is_refused_and_batch_loss_is_the_mean_of_chunk_losses(loss_fn, curvature):
    model, shape = make_model("tanh_mlp")
    X, y = make_data(shape, n=N, loss="mse")
    Op = fasthess.HessianOperator if curvature == "hessian" else fasthess.GGNOperator
    op = Op(model, loss_fn, (X, y), batch_size=CHUNK)
    with pytest.raises(fasthess.LossContractError, match=r"depends on the batch.*BatchSpec\(batch_loss=True\)"):
        op.matvec(torch.ones(op.num_params, dtype=torch.float64))
    if curvature == "hessian":
        declared = Op(model, loss_fn, (X, y), batch_size=CHUNK, batch=fasthess.BatchSpec(batch_loss=True))
        _check(declared, dense_hessian(model, loss_fn, X, y, batch_size=CHUNK))  # Σ_c n_c L_c / N


class _Tempered(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, _ = make_model("tanh_mlp")
        self.temperature = nn.Parameter(torch.tensor(1.3, dtype=torch.float64))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("hvp", ["double-backward", "forward-over-reverse"])
def test_parameters_read_outside_the_forward_are_refused(hvp):
    model, shape = make_model("tanh_mlp")
    X, y = make_data(shape, n=N)

    def l2_inside(o, t):
        return F.cross_entropy(o, t) + 0.1 * sum(p.pow(2).sum() for p in model.parameters())

    op = fasthess.HessianOperator(model, l2_inside, (X, y), batch_size=CHUNK, hvp=hvp)
    with pytest.raises(fasthess.LossContractError, match=r"outside the model's forward.*penalty="):
        op.matvec(torch.ones(op.num_params, dtype=torch.float64))
    assert op.num_hvps == 0
    tempered = _Tempered()
    op = fasthess.HessianOperator(tempered, lambda o, t: F.cross_entropy(o / tempered.temperature, t), (X, y),
                                  hvp=hvp)
    with pytest.raises(fasthess.LossContractError, match="temperature"):
        op.matvec(torch.ones(op.num_params, dtype=torch.float64))


@pytest.mark.parametrize("hvp", ["double-backward", "forward-over-reverse"])
def test_penalty_hessian_is_added_once_per_product(hvp):
    model, shape = make_model("tanh_mlp")
    X, y = make_data(shape, n=N)
    ce = nn.CrossEntropyLoss()

    def penalty(p):
        return 0.1 * sum(t.pow(2).sum() for t in p.values()) + p["0.weight"].pow(4).sum()

    H = dense_hessian_of(model, lambda p: ce(functional_call(model, p, (X,)), y) + penalty(p))
    op = fasthess.HessianOperator(model, ce, (X, y), batch_size=CHUNK, hvp=hvp, penalty=penalty)
    _check(op, H)
    res = fasthess.lambda_max(model, ce, (X, y), batch_size=CHUNK, penalty=penalty, tol=1e-10)
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(H)[-1:], rtol=1e-8, atol=0)
    G = fasthess.GGNOperator(model, ce, (X, y), batch_size=CHUNK, penalty=penalty)
    G0 = fasthess.GGNOperator(model, ce, (X, y), batch_size=CHUNK)
    eye = torch.eye(op.num_params, dtype=torch.float64)
    H_pen = dense_hessian_of(model, penalty)
    torch.testing.assert_close(G.matmat(eye), G0.matmat(eye) + H_pen, rtol=1e-10, atol=1e-12)


def test_penalty_that_ignores_its_argument_is_refused():
    model, shape = make_model("tanh_mlp")
    X, y = make_data(shape, n=N)
    for penalty, match in ((lambda p: sum(q.pow(2).sum() for q in model.parameters()), "reads the model's"),
                           (lambda p: torch.tensor(1.0, dtype=torch.float64), "does not depend")):
        op = fasthess.HessianOperator(model, nn.CrossEntropyLoss(), (X, y), penalty=penalty)
        with pytest.raises(fasthess.LossContractError, match=rf"{match}.*penalty=lambda params"):
            op.matvec(torch.ones(op.num_params, dtype=torch.float64))


def test_a_forward_that_fails_on_the_inputs_names_the_fix():
    model, shape = make_model("tanh_mlp")
    X, y = make_data(shape, n=N)
    op = fasthess.HessianOperator(model, nn.CrossEntropyLoss(), (X.float(), y))
    with pytest.raises(fasthess.FasthessError, match=r"forward failed.*dtype and device"):
        op.matvec(torch.ones(op.num_params, dtype=torch.float64))


class _RandomForward(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.body, _ = make_model("tanh_mlp")
        self.how = how

    def forward(self, x):
        h = self.body(x)
        return F.dropout(h, 0.3, training=True) if self.how == "dropout" else h + 0.1 * torch.randn_like(h)


@pytest.mark.parametrize("how", ["dropout", "randn"])
@pytest.mark.parametrize("hvp", ["double-backward", "forward-over-reverse", "ggn"])
def test_random_forward_is_refused_on_every_path(how, hvp):
    model = _RandomForward(how)
    X, y = make_data((6,), n=N)
    Op = fasthess.GGNOperator if hvp == "ggn" else fasthess.HessianOperator
    kw = {} if hvp == "ggn" else {"hvp": hvp}
    op = Op(model, nn.CrossEntropyLoss(), (X, y), batch_size=CHUNK, **kw)
    with op.fixed_weights(), pytest.raises(fasthess.StochasticModelError, match="allow_stochastic=True"):
        op.matvec(torch.ones(op.num_params, dtype=torch.float64))
    assert getattr(op, "graph_bytes", 0) == 0  # no graph of a random forward is kept
    allowed = Op(model, nn.CrossEntropyLoss(), (X, y), batch_size=CHUNK, allow_stochastic=True, **kw)
    with allowed.fixed_weights():
        assert torch.isfinite(allowed.matvec(torch.ones(allowed.num_params, dtype=torch.float64))).all()
        assert getattr(allowed, "graph_bytes", 0) == 0


def test_random_loss_is_refused_as_random():
    model, shape = make_model("tanh_mlp")
    X, y = make_data(shape, n=N)
    op = fasthess.HessianOperator(model, lambda o, t: F.cross_entropy(o + 0.01 * torch.randn_like(o), t), (X, y))
    with pytest.raises(fasthess.StochasticModelError, match="allow_stochastic=True"):
        op.matvec(torch.ones(op.num_params, dtype=torch.float64))


class _Flipping(Dataset):
    """Half of the examples have their features reversed, anew at every access: the sums never change."""

    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        flip = bool(torch.rand(()) < 0.5)
        return (self.X[i].flip(0) if flip else self.X[i]), self.y[i]


def test_reordered_features_and_rows_are_detected():
    model, shape = make_model("tanh_mlp")
    X, y = make_data(shape, n=N)
    torch.manual_seed(0)
    op = fasthess.HessianOperator(model, nn.CrossEntropyLoss(), _Flipping(X, y), batch_size=CHUNK)
    op.matvec(torch.ones(op.num_params, dtype=torch.float64))
    with pytest.raises(fasthess.DataChangedError, match="order"):
        op.matvec(torch.ones(op.num_params, dtype=torch.float64))
    batches = [(X[:20].clone(), y[:20].clone()), (X[20:], y[20:])]
    op = fasthess.HessianOperator(model, nn.CrossEntropyLoss(), batches)
    op.matvec(torch.ones(op.num_params, dtype=torch.float64))
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(1))
    batches[0][0].copy_(batches[0][0][perm].clone())
    batches[0][1].copy_(batches[0][1][perm].clone())  # the same examples, in another order within the chunk
    with pytest.raises(fasthess.DataChangedError):
        op.matvec(torch.ones(op.num_params, dtype=torch.float64))


def test_lambda_max_forwards_the_operator_keywords():
    model, shape = make_model("tanh_mlp")
    X, y = make_data(shape, n=N, loss="mse")
    spec = fasthess.BatchSpec(batch_loss=True)
    res = fasthess.lambda_max(model, _centred_mse, (X, y), batch_size=CHUNK, batch=spec, graph_memory=0, tol=1e-10)
    H = dense_hessian(model, _centred_mse, X, y, batch_size=CHUNK)
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(H)[-1:], rtol=1e-8, atol=0)
    with pytest.raises(fasthess.FasthessError, match="graph_memory"):
        fasthess.lambda_max(model, _centred_mse, (X, y), curvature="ggn", graph_memory=0)


@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(weight=CW), nn.CrossEntropyLoss(reduction="sum")],
                         ids=["weighted", "sum"])
def test_gradient_is_that_of_the_loss_on_all_the_data(loss_fn):
    model, shape = make_model("tanh_mlp")
    X, _ = make_data(shape, n=N)
    y = _targets("ignored")

    def penalty(p):
        return 0.1 * p["0.weight"].pow(2).sum()

    loss_of = _full(model, loss_fn, X, y)
    params = dict(model.named_parameters())
    expected = torch.autograd.grad(loss_of(params) + penalty(params), list(params.values()))
    op = fasthess.HessianOperator(model, loss_fn, (X, y), batch_size=CHUNK, penalty=penalty)
    torch.testing.assert_close(op.gradient(), torch.cat([g.reshape(-1) for g in expected]), rtol=1e-12, atol=1e-14)
    assert op.num_passes == 0 and all(p.grad is None for p in model.parameters())


# ---- callables whose first chunk splits like a plain mean by accident (found by a red-team battery) -----------


def test_class_weighted_callable_on_class_sorted_data_is_refused():
    """The first chunk holds one class, so its halves look like a count-weighted mean; chunk 0 joined with another
    chunk does not."""
    torch.manual_seed(0)
    X, y = torch.randn(24, 4, dtype=torch.float64), torch.arange(24) // 8
    cw = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    model = nn.Linear(4, 3).double()
    with pytest.raises(fasthess.LossContractError, match="torch.nn criterion itself"):
        fasthess.lambda_max(model, lambda o, t: F.cross_entropy(o, t, weight=cw), (X, y), batch_size=8)
    # the supported form: the criterion itself, whose weights are read
    res = fasthess.lambda_max(model, nn.CrossEntropyLoss(weight=cw), (X, y), batch_size=8, tol=1e-8)
    full = fasthess.lambda_max(model, nn.CrossEntropyLoss(weight=cw), (X, y), tol=1e-8)
    torch.testing.assert_close(res.eigenvalues, full.eigenvalues, rtol=1e-9, atol=0)


def test_masked_mean_callable_with_an_unmasked_first_chunk_is_refused():
    torch.manual_seed(0)
    X, Y = torch.randn(24, 4, dtype=torch.float64), torch.randn(24, 3, dtype=torch.float64)
    M = torch.ones(24, 3, dtype=torch.float64)
    M[12:, 0] = 0

    def masked_mse(o, t):
        return ((o - t[:, :3]) ** 2 * t[:, 3:]).sum() / t[:, 3:].sum()

    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with pytest.raises(fasthess.LossContractError):
        fasthess.lambda_max(model, masked_mse, (X, torch.cat([Y, M], 1)), batch_size=8)


def test_a_loader_that_drops_its_last_batch_is_named():
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    X, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    model = nn.Linear(4, 3).double()
    with pytest.warns(RuntimeWarning, match="drop_last"):
        fasthess.HessianOperator(model, nn.CrossEntropyLoss(), DataLoader(TensorDataset(X, y), batch_size=4,
                                                                         drop_last=True))
