"""The training loop: every optimizer lowers the loss; SAM and GD steps equal hand-written references;
SAM updates BatchNorm running statistics once; same seed, same bits; divergence is a result."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from experiments.data import load_dataset
from experiments.train import Trainer

DATA = load_dataset("synthetic", n_train=96, n_test=48, dim=6, num_classes=3)
BASE = dict(dataset="synthetic", model="mlp", hidden=[8], lr=0.1, batch_size=16, max_steps=30,
            target_train_acc=1.01, track_every_evals=0)


def _trainer(**kw):
    cfg = dict(BASE)
    cfg.update(kw)
    return Trainer(cfg, data=DATA)


def _full_loss(tr):
    with torch.no_grad():
        return float(F.cross_entropy(tr.model(DATA.X_train), DATA.y_train))


@pytest.mark.parametrize("opt,extra", [("sgd", {}), ("sgd", {"momentum": 0.9, "lr": 0.02}), ("gd", {"lr": 0.5}),
                                       ("sam", {}), ("asam", {"rho": 0.5})])
def test_each_optimizer_lowers_the_loss(opt, extra):
    tr = _trainer(optimizer=opt, **extra)
    before = _full_loss(tr)
    for _ in range(30):
        tr.train_step()
        tr.step += 1
    assert _full_loss(tr) < 0.8 * before


def test_gd_step_equals_one_step_on_the_full_batch_with_chunks():
    tr = _trainer(optimizer="gd", lr=0.3, chunk_size=10)  # 96 = 9 chunks of 10 + 6
    assert tr.B == 96
    ref = [p.detach().clone().requires_grad_(True) for p in tr.model.parameters()]
    model = tr.model
    loss = F.cross_entropy(torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()], ref)),
                                                      (DATA.X_train,)), DATA.y_train)
    grads = torch.autograd.grad(loss, ref)
    ref = [r.detach() for r in ref]
    tr.train_step()
    for p, w, g in zip(model.parameters(), ref, grads):
        torch.testing.assert_close(p.detach(), w - 0.3 * g, rtol=1e-5, atol=1e-6)


def _ref_sam(model, X, y, lr, rho, adaptive=False, eta=0.01):
    names = [n for n, _ in model.named_parameters()]
    w = [p.detach().clone() for p in model.parameters()]

    def grad_at(ws):
        ws = [t.clone().requires_grad_(True) for t in ws]
        loss = F.cross_entropy(torch.func.functional_call(model, dict(zip(names, ws)), (X,)), y)
        return torch.autograd.grad(loss, ws)

    g = grad_at(w)
    if adaptive:
        T = [t.abs() + eta for t in w]
        n = torch.sqrt(sum(((a * b) ** 2).sum() for a, b in zip(T, g)))
        e = [rho * a * a * b / n for a, b in zip(T, g)]
    else:
        n = torch.sqrt(sum((b ** 2).sum() for b in g))
        e = [rho * b / n for b in g]
    g2 = grad_at([a + b for a, b in zip(w, e)])
    return [a - lr * b for a, b in zip(w, g2)]


@pytest.mark.parametrize("opt", ["sam", "asam"])
def test_sam_step_equals_two_step_reference(opt):
    tr = _trainer(optimizer=opt, rho=0.3, lr=0.2, batch_size=96)
    expected = _ref_sam(tr.model, DATA.X_train, DATA.y_train, 0.2, 0.3, adaptive=opt == "asam")
    tr.train_step()
    for p, e in zip(tr.model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)


def test_sam_updates_batchnorm_running_stats_once():
    d = load_dataset("digits", train_subset=64, test_subset=16)
    cfg = dict(BASE, dataset="digits", model="cnn", channels=[4], batch_norm=True, batch_size=64)
    sgd = Trainer(dict(cfg, optimizer="sgd"), data=d)
    sam = Trainer(dict(cfg, optimizer="sam", rho=0.5), data=d)
    sgd.train_step()
    sam.train_step()
    bn_sgd, bn_sam = sgd.model.features[1], sam.model.features[1]
    assert int(bn_sam.num_batches_tracked) == 1
    torch.testing.assert_close(bn_sam.running_mean, bn_sgd.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(bn_sam.running_var, bn_sgd.running_var, rtol=0, atol=0)


def test_same_seed_same_bits_and_seeds_matter(tmp_path):
    a = _trainer(optimizer="sgd", dropout=0.2, track_every_evals=2).run(tmp_path / "a")
    b = _trainer(optimizer="sgd", dropout=0.2, track_every_evals=2).run(tmp_path / "b")
    c = _trainer(optimizer="sgd", dropout=0.2, track_every_evals=2, data_seed=1).run(tmp_path / "c")
    a.pop("wall_seconds"), b.pop("wall_seconds"), c.pop("wall_seconds")
    assert a == b
    assert a != c
    sa = torch.load(tmp_path / "a" / "final_model.pt")
    sb = torch.load(tmp_path / "b" / "final_model.pt")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_divergence_is_a_result(tmp_path):
    s = _trainer(optimizer="gd", lr=1e6, max_steps=50).run(tmp_path / "div")
    assert s["status"] == "diverged" and s["diverged_step"] is not None and s["diverged_step"] < 50
    assert (tmp_path / "div" / "summary.json").is_file()


def test_stops_at_target_accuracy_and_tracks_lambda(tmp_path):
    s = _trainer(optimizer="sgd", lr=0.2, target_train_acc=0.9, max_steps=2000, track_every_evals=1,
                 between_iterates=3).run(tmp_path / "r")
    assert s["status"] == "completed" and s["train_acc"] >= 0.9
    assert s["lambda_max"] > 0 and s["lambda_between_iterates"] >= s["lambda_max"] * (1 - 1e-6)
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 1 and '"lambda_max"' in lines[-1] and '"two_over_lr"' in lines[-1]


def test_tensorboard_option_writes_lambda_records(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    s = _trainer(optimizer="sgd", track_every_evals=1, max_steps=18, tensorboard=True).run(tmp_path / "r")
    acc = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("sharpness/lambda_max")
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    tracked = [m for m in lines if "lambda_max" in m]
    assert [e.step for e in events] == [m["step"] for m in tracked] and len(events) == 3
    assert events[-1].value == pytest.approx(s["lambda_max"], rel=1e-6)
    assert acc.Scalars("sharpness/threshold")[0].value == pytest.approx(2 / 0.1)  # 2/η of SGD


def test_gd_stopping_test_runs_every_step(tmp_path):
    """stop_check_every=1: GD stops at the first step whose train accuracy reaches the target, although full
    evaluations come only every 50 steps."""
    cfg = dict(optimizer="gd", lr=0.5, target_train_acc=0.8, max_steps=400, eval_every_epochs=50)
    every = _trainer(stop_check_every=1, **cfg).run(tmp_path / "a")
    coarse = _trainer(**cfg).run(tmp_path / "b")
    assert every["status"] == coarse["status"] == "completed"
    assert every["steps"] % 50 != 0 and coarse["steps"] % 50 == 0 and every["steps"] < coarse["steps"]
    ref = _trainer(**dict(cfg, max_steps=every["steps"] - 1, target_train_acc=1.01))
    ref.run(tmp_path / "c")
    assert ref.evaluate(*DATA.train)[1] < 0.8 <= every["train_acc"]  # one step earlier it had not reached it
