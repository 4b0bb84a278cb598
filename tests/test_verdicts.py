"""Verdicts on synthetic sweeps with known effects: each rule says reproduced, contradicted or inconclusive
where it should, with the deciding interval; capped, diverged and unconverged runs are excluded with reasons."""
from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.config import config_name, resolve_config
from experiments.verdicts import decide, exclusion, overall, usable

M, SEEDS = 3000, range(5)
THETA = np.random.default_rng(0).normal(0.4, 1.3, M)  # per-test-example difficulty, shared by every run


def _bits(rng, shift):
    p = 1 / (1 + np.exp(-(THETA + shift)))
    return "".join("1" if x else "0" for x in rng.random(M) < p)


def _runs(configs, vary, rng_seed=1, **summary):
    """configs: [(overrides, accuracy shift on the logit scale, λ_max)] → fake finished runs over 5 seeds."""
    rng = np.random.default_rng(rng_seed)
    runs = []
    for over, shift, lam in configs:
        for s in SEEDS:
            cfg = resolve_config({"dataset": "synthetic", **over, "init_seed": s, "data_seed": s})
            bits = _bits(rng, shift + rng.normal(0, 0.03))
            summ = {"status": "completed", "steps": 100, "train_acc": 1.0, "test_acc": bits.count("1") / M,
                    "lambda_max": lam * float(np.exp(rng.normal(0, 0.05))), "lambda_converged": True,
                    "batch_size": cfg["batch_size"], "test_correct": bits, "target_train_acc": 0.99, **summary}
            runs.append({"name": f"{config_name(cfg, vary)}_seed={s}", "cfg": cfg, "summary": summ, "metrics": []})
    return runs


def _decide(finding, runs, vary, **th):
    ev, excluded = usable(runs, lambda c: config_name(c, vary))
    return decide(finding, ev, th), excluded


F1_VARY = ["optimizer", "batch_size", "lr"]


def _f1(gain_small, gain_large, lams=(10.0, 5.0, 2.0)):
    cfgs = []
    for opt, gain in (("sgd", gain_small), ("gd", gain_large)):
        for k, (lr, lam) in enumerate(zip((0.05, 0.1, 0.2), lams)):
            cfgs.append(({"optimizer": opt, "batch_size": 32, "lr": lr}, gain * k / 2, lam))
    return _runs(cfgs, F1_VARY)


def test_finding1_reproduced_when_the_gain_is_real_and_vanishes():
    vs, _ = _decide(1, _f1(0.4, 0.0), F1_VARY, acc_margin=0.02)
    assert [v.outcome for v in vs] == ["reproduced"] * 3 and overall(vs) == "reproduced"
    gain = vs[1].deciding.interval
    assert gain.lo > 0 and gain.level == 0.95 and gain.n == 5
    eq = vs[2].deciding.interval  # the TOST interval decided "vanishes"
    assert eq.level == 0.90 and -0.02 < eq.lo < eq.hi < 0.02


def test_finding1_contradicted_when_the_gain_persists_at_large_batch():
    vs, _ = _decide(1, _f1(0.4, 0.4), F1_VARY, acc_margin=0.02)
    assert vs[1].outcome == "reproduced" and vs[2].outcome == "contradicted"
    assert vs[2].deciding.interval.lo > 0.02 and overall(vs) == "contradicted"


def test_lambda_not_monotone_is_contradicted_and_flat_is_inconclusive():
    vs, _ = _decide(1, _f1(0.4, 0.0, lams=(5.0, 10.0, 2.0)), F1_VARY, acc_margin=0.02)
    assert vs[0].outcome == "contradicted" and vs[0].deciding.interval.lo > 0
    vs, _ = _decide(1, _f1(0.4, 0.0, lams=(5.0, 5.0, 5.0)), F1_VARY, acc_margin=0.02)
    assert vs[0].outcome == "inconclusive"


def test_finding2_equivalence_across_configurations():
    vary = ["lr", "batch_size"]
    same = _runs([({"lr": 0.1 * b / 32, "batch_size": b}, 0.0, 10.0 / b) for b in (8, 32, 128)], vary)
    vs, _ = _decide(2, same, vary, acc_margin=0.02, lambda_margin=0.1)
    assert [v.outcome for v in vs] == ["reproduced", "reproduced"]
    diff = _runs([({"lr": 0.1 * b / 32, "batch_size": b}, 0.5 * (b == 128), 10.0) for b in (8, 32, 128)], vary)
    vs, _ = _decide(2, diff, vary, acc_margin=0.02, lambda_margin=0.1)
    assert [v.outcome for v in vs] == ["contradicted", "contradicted"]  # λ equal within 10 %; accuracy differs


def test_finding5_not_consistently_lower():
    vary = ["batch_norm", "lr"]
    # BN: +0.3 logit at every η; λ_max lower with BN at η=0.01, higher at η=0.1
    cfgs = [({"batch_norm": bn, "lr": lr}, 0.3 * bn, lam) for bn, lr, lam in
            [(False, 0.01, 10.0), (True, 0.01, 5.0), (False, 0.1, 3.0), (True, 0.1, 6.0)]]
    vs, _ = _decide(5, _runs(cfgs, vary), vary, acc_margin=0.02, lambda_margin=0.1)
    assert [v.outcome for v in vs] == ["reproduced", "reproduced"]
    assert "η=0.1" in vs[1].deciding.statistic
    lower = [({"batch_norm": bn, "lr": lr}, 0.3 * bn, lam) for bn, lr, lam in
             [(False, 0.01, 10.0), (True, 0.01, 5.0), (False, 0.1, 6.0), (True, 0.1, 3.0)]]
    vs, _ = _decide(5, _runs(lower, vary), vary, acc_margin=0.02, lambda_margin=0.1)
    assert vs[1].outcome == "contradicted"


def test_finding4_hurts_is_decided_by_the_high_p_contrast():
    vary = ["dropout"]
    up = _runs([({"dropout": p}, s, lam) for p, s, lam in [(0.0, 0.0, 9.0), (0.3, 0.1, 6.0), (0.6, 0.3, 3.0)]], vary)
    vs, _ = _decide(4, up, vary, acc_margin=0.02, dropout_reference=0.0)
    assert [v.outcome for v in vs] == ["reproduced", "contradicted"]  # λ falls, but accuracy rises with p
    assert vs[1].deciding.interval.lo > 0


def test_capped_diverged_and_unconverged_runs_are_excluded_with_reasons():
    vary = ["dropout"]
    runs = _runs([({"dropout": 0.0}, 0.0, 5.0), ({"dropout": 0.5}, 0.0, 2.0)], vary)
    runs[0]["summary"].update(status="max_steps", train_acc=0.97, steps=3000)
    runs[1]["summary"].update(status="diverged", diverged_step=12)
    runs[2]["summary"]["lambda_converged"] = False
    runs[3]["summary"]["lambda_between_converged"] = False
    runs[4]["summary"] = None
    ev, excluded = usable(runs, lambda c: config_name(c, vary))
    why = dict(excluded)
    assert len(why) == 5
    assert "capped at 3000 steps" in why[runs[0]["name"]] and "97.0%" in why[runs[0]["name"]]
    assert why[runs[1]["name"]] == "diverged at step 12"
    assert "not converged" in why[runs[2]["name"]] and "between iterates" in why[runs[3]["name"]]
    assert "unfinished" in why[runs[4]["name"]]
    assert exclusion(runs[5]) is None
    assert len(ev.by_name["p=0"].runs) == 0 and len(ev.by_name["p=0.5"].runs) == 5
    vs = decide(4, ev, {"acc_margin": 0.02})
    assert all(v.outcome == "inconclusive" for v in vs)  # p=0 has no usable run: nothing to compare


def test_verdict_records_are_json():
    vs, _ = _decide(1, _f1(0.4, 0.0), F1_VARY, acc_margin=0.02)
    d = json.loads(json.dumps([v.as_dict() for v in vs]))
    assert {"claim", "outcome", "statistic", "interval", "level", "tests"} <= set(d[0])
    assert d[1]["interval"][0] < d[1]["interval"][1]


@pytest.mark.parametrize("finding", [1, 2, 3, 4, 5])
def test_no_runs_is_inconclusive_everywhere(finding):
    ev, _ = usable([], lambda c: "x")
    assert all(v.outcome == "inconclusive" for v in decide(finding, ev))


def test_finding3_sam_gain_against_sgd_at_each_batch_size():
    vary = ["batch_size", "rho"]
    cfgs = []
    for B, gain in ((32, 0.4), (1000, 0.0)):
        for rho, lam in ((0.0, 8.0), (0.05, 5.0), (0.1, 3.0)):
            cfgs.append(({"optimizer": "sgd" if rho == 0 else "sam", "rho": rho, "batch_size": B},
                         gain * (rho > 0), lam))
    vs, _ = _decide(3, _runs(cfgs, vary), vary, acc_margin=0.02)
    assert [v.outcome for v in vs] == ["reproduced"] * 3
    assert vs[1].deciding.statistic == "mean over ρ>0 − SGD at B=32" and vs[1].deciding.interval.lo > 0
