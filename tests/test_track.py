"""SharpnessTracker: correct λ_max, warm starts, history, checkpoint state, mode handling."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import fasthess
from fasthess.track import SharpnessTracker, sharpness_mode


def _setup(dropout=0.0, bn=False, seed=0):
    torch.manual_seed(seed)
    X = torch.randn(64, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (64,))
    layers = [nn.Linear(5, 6)]
    if bn:
        layers.append(nn.BatchNorm1d(6))
    layers += [nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(6, 3))
    model = nn.Sequential(*layers).double()
    return model, X, y


def _dense_top(model, X, y):
    from torch.func import functional_call

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat):
        parts, off = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = flat[off:off + s.numel()].reshape(s)
            off += s.numel()
        return F.cross_entropy(functional_call(model, parts, (X,)), y)

    H = torch.autograd.functional.hessian(f, theta)
    return torch.linalg.eigvalsh((H + H.T) / 2)[-1].item()


def test_lambda_max_matches_dense_hessian_and_logs_record():
    model, X, y = _setup()
    logged = []
    tr = SharpnessTracker(F.cross_entropy, (X, y), batch_size=16, tol=1e-8, lr=0.1, loggers=[logged.append])
    rec = tr.update(model, step=0, epoch=0)
    assert logged == [rec] and rec.certificate in ("gap", "residual", "exhausted")
    assert rec.lambda_max == pytest.approx(_dense_top(model, X, y), rel=1e-6)
    assert rec.threshold == pytest.approx(20.0) and rec.threshold_rule == "gd: 2/lr"
    assert rec.extra["epoch"] == 0 and rec.step == 0
    for key in ("residual", "error_bound", "num_hvps", "num_passes", "seconds", "converged", "certificates"):
        assert getattr(rec, key) is not None
    assert rec.num_hvps > 0 and rec.warm_started is False
    # the top eigenvector, and the warm start for the next update: the eigenvector and its neighbour
    n = sum(p.numel() for p in model.parameters())
    assert tr.eigenvectors.shape == (n, 1) and tr.ritz_vectors.shape == (n, 2)
    assert torch.equal(tr.eigenvectors, tr.ritz_vectors[:, :1])


def test_warm_start_every_and_state_dict_roundtrip():
    model, X, y = _setup()
    tr = SharpnessTracker(F.cross_entropy, (X, y), tol=1e-6, every=3, warm_start=True)
    recs = [tr.maybe_update(model, s) for s in range(7)]
    assert [r is not None for r in recs] == [True, False, False, True, False, False, True]
    assert [r.warm_started for r in tr.history] == [False, True, True]
    # warm start from an exact eigenvector converges in no more products than the cold start
    assert tr.history[1].num_hvps <= tr.history[0].num_hvps
    st = tr.state_dict()
    tr2 = SharpnessTracker(F.cross_entropy, (X, y), tol=1e-6, every=3, warm_start=True)
    tr2.load_state_dict(st)
    assert torch.equal(tr2.ritz_vectors, tr.ritz_vectors) and tr2.history == tr.history
    assert tr2.update(model, 9).warm_started
    # a different parameter count: falls back to a cold start instead of failing
    tr2.load_state_dict({"history": [], "vectors": torch.ones(3, 1, dtype=torch.float64)})
    assert tr2.update(model, 10).warm_started is False
    tr2.reset()
    assert tr2.eigenvectors is None and len(tr2.history) == 1


def test_dropout_switched_off_and_modes_restored():
    model, X, y = _setup(dropout=0.5, bn=True)
    model.train()
    model[-2].eval()  # an odd mix of flags must survive
    flags = [m.training for m in model.modules()]
    tr = SharpnessTracker(F.cross_entropy, (X, y), batch_size=32, tol=1e-6)
    r1 = tr.update(model).lambda_max
    r2 = tr.update(model).lambda_max
    assert r1 == pytest.approx(r2, rel=1e-5)  # deterministic: dropout was off
    assert [m.training for m in model.modules()] == flags
    bn = model[1]
    mean = bn.running_mean.clone()
    tr.update(model)
    assert torch.equal(bn.running_mean, mean)  # running stats untouched
    with sharpness_mode(model, "eval"):
        assert not model.training
    assert [m.training for m in model.modules()] == flags


def test_bad_arguments():
    model, X, y = _setup()
    with pytest.raises(ValueError):
        SharpnessTracker(F.cross_entropy, (X, y), every=0)
    with pytest.raises(ValueError):
        SharpnessTracker(F.cross_entropy, (X, y), mode="test")
    tr = SharpnessTracker(F.cross_entropy, (X, y))
    assert tr.latest is None and math.isnan(tr.lambda_max)


@pytest.mark.parametrize("kwargs, match", [
    ({"block_size": 1}, "below k [+] 1 = 2"), ({"k": 2, "block_size": 2}, "below k [+] 1 = 3"),
    ({"max_iter": 10}, r"unknown argument\(s\) \['max_iter'\]"), ({"which": "SA"}, "unknown argument"),
    ({"tol": 0.0}, "tol=0.0"), ({"k": 0}, "k=0"), ({"max_basis": 1}, "max_basis=1"),
])
def test_solver_options_are_refused_when_the_tracker_is_built(kwargs, match):
    """Not at the first update, after the first ``every`` steps of somebody's training."""
    model, X, y = _setup()
    with pytest.raises(fasthess.FasthessError, match=match):
        SharpnessTracker(F.cross_entropy, (X, y), **kwargs)


def test_batchnorm_without_batch_size_names_the_tracker_fix():
    import fasthess

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)).double().eval()
    X, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    tracker = SharpnessTracker(torch.nn.functional.cross_entropy, (X, y))
    with pytest.raises(fasthess.FasthessError, match=r"SharpnessTracker\(\.\.\., batch_size="):
        tracker.update(model)
    assert not model.training
    eval_tracker = SharpnessTracker(torch.nn.functional.cross_entropy, (X, y), mode="eval")
    assert eval_tracker.update(model).converged


def _big_setup(seed=0):
    """Enough examples (512) for the 1/8 subsample exploration (at least 64 examples, at most half the data)."""
    torch.manual_seed(seed)
    X = torch.randn(512, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (512,))
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return model, X, y


@pytest.mark.parametrize("explore", ["subsample", "full"])
def test_warm_updates_match_the_dense_hessian_and_name_their_basis(explore):
    model, X, y = _big_setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    tr = SharpnessTracker(F.cross_entropy, (X, y), batch_size=128, tol=1e-6, explore=explore, warm_start=True)
    for step in (0, 20, 40, 60):
        rec = tr.update(model, step=step, optimizer=opt)
        truth = _dense_top(model, X, y)
        assert rec.converged and abs(rec.lambda_max - truth) <= max(rec.error_bound, 1e-6 * truth)
        if step:
            assert rec.warm_started and rec.steps_since == 20
            if explore == "subsample":
                assert rec.basis == "explored at this update on a 0.125 subsample" and rec.subset_hvps > 0
                assert rec.hvp_equivalents == pytest.approx(rec.num_hvps + 0.125 * rec.subset_hvps)
            else:
                assert rec.basis.startswith("explored on the full data at this update from a warm start")
                assert rec.subset_hvps == 0
        else:
            assert rec.steps_since is None and rec.basis == "explored on the full data at this update"
        assert rec.threshold == pytest.approx(3.8 / 0.5) and rec.threshold_rule.startswith("sgd heavy-ball")
        assert rec.precision == "float64 products"
        for _ in range(20):
            opt.zero_grad()
            F.cross_entropy(model(X[:64]), y[:64]).backward()
            opt.step()


def test_threshold_none_for_adam_and_adamw():
    model, X, y = _setup()
    tr = SharpnessTracker(F.cross_entropy, (X, y), lr=0.1)
    rec = tr.update(model, optimizer=torch.optim.Adam(model.parameters(), lr=0.01))
    assert rec.threshold is None and "preconditioned" in rec.threshold_rule and rec.lr == 0.01
    rec = tr.update(model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.01))
    assert rec.threshold is None and rec.threshold_rule is None
    assert tr.update(model, lr=0.0).threshold is None


def test_budget_keeps_the_trackers_share_of_wall_time(monkeypatch):
    """A fake clock: every update costs 1 s, every training step 0.1 s; with budget 0.2 the tracker's share of the
    wall time stays at or below 0.2 and does not fall far below it."""
    import fasthess.track as track

    now = [0.0]
    monkeypatch.setattr(track.time, "perf_counter", lambda: now[0])
    model, X, y = _setup()
    tr = SharpnessTracker(F.cross_entropy, (X, y), tol=1e-6, budget=0.2)
    real_compute = tr._explore_and_certify

    def compute(*a, **kw):
        now[0] += 1.0
        return real_compute(*a, **kw)

    monkeypatch.setattr(tr, "_explore_and_certify", compute)
    for step in range(300):
        now[0] += 0.1
        tr.maybe_update(model, step)
    assert 0.15 <= tr.time_share <= 0.2 + 1e-9
    assert len(tr.history) > 3 and all(r.steps_since >= 1 for r in tr.history[1:])
    assert sum(r.steps_since for r in tr.history[1:]) == tr.history[-1].step


def test_params_generator_is_materialized_once():
    model, X, y = _setup()
    tr = SharpnessTracker(F.cross_entropy, (X, y), params=model.parameters())
    first, second = tr.update(model), tr.update(model)
    assert second.lambda_max == pytest.approx(first.lambda_max, rel=1e-4)
    with pytest.raises(fasthess.FasthessError, match=r"params=\[p\]"):
        SharpnessTracker(F.cross_entropy, (X, y), params=next(model.parameters()))


class _FunctionalDropout(nn.Module):
    """Dropout the way Hugging Face attention applies it: F.dropout on self.training, no nn.Dropout module."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x):
        return F.dropout(self.lin(x), p=0.5, training=self.training)


def test_functional_dropout_error_names_mode_eval():
    _, X, y = _setup()
    model = _FunctionalDropout().double()
    with pytest.raises(fasthess.StochasticModelError, match="mode='eval'"):
        SharpnessTracker(F.cross_entropy, (X, y)).update(model)
    assert SharpnessTracker(F.cross_entropy, (X, y), mode="eval").update(model).converged


@pytest.mark.parametrize("kwargs, match", [({"explore": "never"}, "explore='never'"), ({"budget": 0}, "budget=0"),
                                           ({"budget": 1.5}, "budget=1.5"), ({"random_columns": 0}, "unknown")])
def test_tracker_options_refused_when_built(kwargs, match):
    _, X, y = _setup()
    with pytest.raises(fasthess.FasthessError, match=match):
        SharpnessTracker(F.cross_entropy, (X, y), **kwargs)


def test_geometry_fields_match_dense_eigenvectors_and_gradient():
    """gradient_fraction = ‖Vₖᵀg‖²/‖g‖² and top_overlap = |⟨u₁(t), u₁(t')⟩| against the dense Hessian and gradient."""
    from tests.conftest import dense_hessian_of

    model, X, y = _big_setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tr = SharpnessTracker(F.cross_entropy, (X, y), batch_size=128, k=2, tol=1e-10, geometry=True)

    def dense():
        loss_of = lambda p: F.cross_entropy(torch.func.functional_call(model, p, (X,)), y)  # noqa: E731
        H = dense_hessian_of(model, loss_of)
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(F.cross_entropy(model(X), y),
                                                                  list(model.parameters()))])
        return torch.linalg.eigh(H)[1][:, -2:], g

    previous = None
    for step in (0, 20):
        rec = tr.update(model, step=step)
        U, g = dense()
        assert rec.converged
        assert rec.gradient_fraction == pytest.approx(float((U.T @ g).pow(2).sum() / (g @ g)), abs=1e-7)
        if previous is None:
            assert rec.top_overlap is None
        else:
            assert rec.top_overlap == pytest.approx(abs(float(previous @ U[:, -1])), abs=1e-7)
            assert rec.top_overlap < 1 - 1e-6  # the sharp direction turned
        previous = U[:, -1].clone()
        for _ in range(20):
            opt.zero_grad()
            F.cross_entropy(model(X[:64]), y[:64]).backward()
            opt.step()
    plain = SharpnessTracker(F.cross_entropy, (X, y), batch_size=128)
    first = plain.update(model)
    assert first.gradient_fraction is None and first.top_overlap is None
    second = plain.update(model)  # top_overlap needs no gradient pass: every record has it
    assert second.gradient_fraction is None and second.top_overlap == pytest.approx(1.0, abs=1e-6)


def test_bad_arguments_and_state_are_refused_before_any_product():
    model, X, y = _setup()
    tr = SharpnessTracker(F.cross_entropy, (X, y))
    with pytest.raises(fasthess.FasthessError, match="must be an integer"):
        tr.maybe_update(model, None)
    with pytest.raises(fasthess.FasthessError, match="must be a number"):
        SharpnessTracker(F.cross_entropy, (X, y), lr="0.1")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(fasthess.FasthessError, match="pass one of them"):
        tr.update(model, 0, optimizer=opt, lr=0.5)
    state = tr.state_dict()
    state["vectors"] = torch.full((5, 2), float("nan"))
    with pytest.raises(fasthess.FasthessError, match="reset"):
        tr.load_state_dict(state)
    assert tr.history == []
