"""Verdicts: each claim of a finding decided as a test with three outcomes (reproduced / contradicted /
inconclusive) and the interval that decided it. Rules (see :mod:`experiments.stats` for the intervals):

* "improves": the 95 % interval of the accuracy gain excludes 0.
* "vanishes": the large-batch gain is equivalent to 0 within the preset's ``acc_margin`` (TOST) *and* the
  small-batch gain minus the large-batch gain is significantly positive. Contradicted when the large-batch gain
  is significantly above the margin or the difference significantly negative.
* "does not change": every pair of configurations equivalent within ``acc_margin`` (TOST); contradicted when
  some pair differs by significantly more (Bonferroni over the pairs).
* "lowers λ_max": monotone: every step up the hyperparameter lowers log λ_max significantly (95 %,
  intersection-union); contradicted when some step raises it significantly (Bonferroni over the steps).
* "not consistently lower" (finding 5): at some learning rate BN's λ_max is significantly *not* lower than
  no-BN's by more than ``lambda_margin`` (lower bound of the λ ratio above 1/(1 + margin), Bonferroni over
  the learning rates); contradicted when BN's λ_max is significantly lower at every learning rate.

A gain over a hyperparameter with several values is the least-squares line's rise across the range (all
values enter; no maximum over noisy runs). Runs that hit the step cap, diverged, lack a summary, or whose
final λ_max did not converge are excluded before anything is computed (:func:`usable`).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np

from . import stats
from .stats import CONTRADICTED, INCONCLUSIVE, REPRODUCED, Interval

LEVEL = 0.95


# ---------------------------------------------------------------------------- the data
def lam(summary: dict[str, Any]) -> float | None:
    """A run's sharpness: the between-iterates maximum when computed, else the final λ_max."""
    v = summary.get("lambda_between_iterates")
    return v if v is not None else summary.get("lambda_max")


def exclusion(run: dict[str, Any]) -> str | None:
    """Why a run cannot enter the statistics, or None when it can."""
    s = run.get("summary")
    if not s:
        return "unfinished (no summary.json)"
    if s["status"] == "diverged":
        return f"diverged at step {s.get('diverged_step')}"
    if s["status"] == "max_steps":
        return (f"capped at {s['steps']} steps with train accuracy {100 * s['train_acc']:.1f}% "
                f"(target {100 * s.get('target_train_acc', run['cfg'].get('target_train_acc', 0.99)):.0f}%)")
    if s.get("lambda_converged") is False:
        return f"final λ_max not converged (residual {s.get('lambda_residual')})"
    if s.get("lambda_between_converged") is False:
        return "λ_max between iterates not converged"
    if lam(s) is None or not lam(s) > 0:
        return "no λ_max"
    return None


@dataclass
class Config:
    """One configuration of a sweep: its hyperparameters (seed aside) and its usable runs by seed."""

    name: str
    cfg: dict[str, Any]
    runs: dict[int, dict[str, Any]] = field(default_factory=dict)

    def acc(self) -> dict[int, float]:
        return {s: r["summary"]["test_acc"] for s, r in self.runs.items()}

    def lam(self) -> dict[int, float]:
        return {s: lam(r["summary"]) for s, r in self.runs.items()}

    def correct(self) -> dict[int, np.ndarray] | None:
        out = {}
        for s, r in self.runs.items():
            bits = r["summary"].get("test_correct")
            if not bits:
                return None
            out[s] = np.frombuffer(bits.encode("ascii"), dtype=np.uint8) - ord("0")
        return out


class Evidence:
    """Usable runs grouped into configurations; the contrasts the rules use."""

    def __init__(self, configs: list[Config]):
        self.configs = configs
        self.by_name = {c.name: c for c in configs}

    def gain(self, weights: dict[str, float], level: float = LEVEL) -> Interval:
        """Accuracy contrast with the seed × test-example interval (seed-only t when per-example data is missing)."""
        weights = {k: w for k, w in weights.items() if w}
        correct = {k: self.by_name[k].correct() for k in weights}
        if all(v is not None for v in correct.values()):
            return stats.contrast(correct, weights, level)
        return stats.paired_t({k: self.by_name[k].acc() for k in weights}, weights, level)

    def log_lambda(self, weights: dict[str, float], level: float = LEVEL) -> Interval:
        weights = {k: w for k, w in weights.items() if w}
        return stats.paired_t({k: self.by_name[k].lam() for k in weights}, weights, level, log=True)


def usable(runs: list[dict[str, Any]], name_of: Callable[[dict], str]) -> tuple[Evidence, list[tuple[str, str]]]:
    """(the evidence from the usable runs, [(run name, reason)] for the excluded ones)."""
    configs: dict[str, Config] = {}
    excluded = []
    for r in runs:
        name = name_of(r["cfg"])
        c = configs.setdefault(name, Config(name, {k: v for k, v in r["cfg"].items()
                                                   if k not in ("init_seed", "data_seed", "environment")}))
        why = exclusion(r)
        if why:
            excluded.append((r["name"], why))
        else:
            c.runs[int(r["cfg"]["init_seed"])] = r
    return Evidence(list(configs.values())), excluded


# ---------------------------------------------------------------------------- verdict records
@dataclass
class Test:
    statistic: str
    interval: Interval
    outcome: str

    def as_dict(self) -> dict[str, Any]:
        return {"statistic": self.statistic, "outcome": self.outcome, **self.interval.as_dict()}


@dataclass
class Verdict:
    claim: str
    outcome: str
    rule: str
    deciding: Test | None
    tests: list[Test]
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = self.deciding
        return {"claim": self.claim, "outcome": self.outcome, "rule": self.rule,
                "statistic": d.statistic if d else None, "estimate": _num(d.interval.estimate) if d else None,
                "interval": [_num(d.interval.lo), _num(d.interval.hi)] if d else None,
                "level": d.interval.level if d else None, "n_seeds": d.interval.n if d else 0,
                "method": d.interval.method if d else None, "note": self.note,
                "tests": [t.as_dict() for t in self.tests]}


def _num(x):
    return None if x is None or not math.isfinite(x) else x


def _missing(claim: str, rule: str, why: str) -> Verdict:
    return Verdict(claim, INCONCLUSIVE, rule, None, [], why)


def _deciding(outcome: str, tests: list[Test], prefer: Callable[[Test], float]) -> Test:
    """The test that decided: a contradicting one, else (reproduced or not) the weakest by ``prefer``."""
    bad = [t for t in tests if t.outcome == CONTRADICTED]
    if outcome == CONTRADICTED and bad:
        return bad[0]
    return max(tests, key=prefer)


def _hi(t: Test) -> float:
    return t.interval.hi if t.interval.defined else math.inf


# ---------------------------------------------------------------------------- rules
def monotone_lower(ev: Evidence, chains: dict[str, list[tuple[Any, str]]], claim: str, symbol: str) -> Verdict:
    """Every consecutive step up each chain [(value, config)] lowers log λ_max (see module docstring)."""
    rule = (f"every step up {symbol} lowers log λ_max: 95% paired-t interval of log(λ_hi/λ_lo) below 0 at every "
            f"step → reproduced; one above 0 (Bonferroni) → contradicted")
    steps = [(g, a, b) for g, ch in chains.items() for a, b in zip(ch, ch[1:])]
    if not steps:
        return _missing(claim, rule, f"needs two values of {symbol} with usable runs")
    wide = stats.bonferroni(LEVEL, len(steps))
    tests = []
    for g, (va, a), (vb, b) in steps:
        w = {b: 1.0, a: -1.0}
        iv = ev.log_lambda(w, LEVEL)
        up = ev.log_lambda(w, wide)
        outcome = (REPRODUCED if iv.defined and iv.hi < 0 else
                   CONTRADICTED if up.defined and up.lo > 0 else INCONCLUSIVE)
        tests.append(Test(f"{g}log(λ at {symbol}={vb:g} / λ at {symbol}={va:g})", iv if outcome != CONTRADICTED
                          else up, outcome))
    outcome = stats.all_of([t.outcome for t in tests])
    return Verdict(claim, outcome, rule, _deciding(outcome, tests, _hi), tests)


def slope_weights(values: dict[str, float], log: bool) -> dict[str, float]:
    """Weights giving the least-squares line's rise from the smallest to the largest value (2 values: b − a)."""
    x = {k: math.log(v) if log else float(v) for k, v in values.items()}
    mean = sum(x.values()) / len(x)
    ss = sum((v - mean) ** 2 for v in x.values())
    span = max(x.values()) - min(x.values())
    return {k: (v - mean) / ss * span for k, v in x.items()}


def _sign_test(ev: Evidence, weights: dict[str, float], claim: str, statistic: str, rule: str, decide) -> Verdict:
    """A verdict on the sign of the weighted accuracy gain: ``decide(interval)`` gives the outcome."""
    if len(weights) < 2:
        return _missing(claim, rule, "needs two configurations with usable runs")
    iv = ev.gain(weights)
    t = Test(statistic, iv, decide(iv))
    return Verdict(claim, t.outcome, rule, t, [t], "" if iv.defined else "needs ≥ 2 common seeds")


def improves(ev: Evidence, weights: dict[str, float], claim: str, statistic: str) -> Verdict:
    return _sign_test(ev, weights, claim, statistic, "95% interval of the gain above 0 → reproduced; below 0 → "
                      "contradicted", stats.decide_improves)


def hurts(ev: Evidence, weights: dict[str, float], claim: str, statistic: str) -> Verdict:
    return _sign_test(ev, weights, claim, statistic, "95% interval of the accuracy change below 0 → reproduced; "
                      "above 0 → contradicted", stats.decide_lowers)


def vanishes(ev: Evidence, small: dict[str, float], large: dict[str, float], margin: float, claim: str,
             small_name: str, large_name: str) -> Verdict:
    rule = (f"gain at {large_name} equivalent to 0 within ±{100 * margin:g} pts (TOST, 90% interval) and "
            f"gain({small_name}) − gain({large_name}) > 0 (95%) → reproduced; the gain at {large_name} "
            f"significantly beyond the margin or the difference significantly < 0 → contradicted")
    if len(small) < 2 or len(large) < 2:
        return _missing(claim, rule, "needs usable runs at two settings of both batch sizes")
    g90, g95 = ev.gain(large, 0.90), ev.gain(large, LEVEL)
    eq = Test(f"gain at {large_name} (TOST ±{100 * margin:g} pts)", g90, stats.decide_equivalent(g90, g95, margin))
    diff_w = dict(small)
    for k, w in large.items():
        diff_w[k] = diff_w.get(k, 0.0) - w
    d = ev.gain(diff_w)
    dt = Test(f"gain({small_name}) − gain({large_name})", d, stats.decide_improves(d))
    if eq.outcome == CONTRADICTED and g95.defined:
        eq = Test(eq.statistic, g95, CONTRADICTED)
    outcome = stats.all_of([eq.outcome, dt.outcome])
    deciding = next(t for t in (eq, dt) if (t.outcome == outcome if outcome != INCONCLUSIVE
                                            else t.outcome != REPRODUCED))
    return Verdict(claim, outcome, rule, deciding, [eq, dt])


def equivalent_all(ev: Evidence, names: list[tuple[str, str]], margin: float, claim: str) -> Verdict:
    """Every pair of configurations [(label, config)] equivalent in test accuracy within ``margin``."""
    rule = (f"every pair's accuracy difference equivalent to 0 within ±{100 * margin:g} pts (TOST, 90% "
            f"intervals) → reproduced; some pair beyond the margin (95%, Bonferroni) → contradicted")
    pairs = list(combinations(names, 2))
    if not pairs:
        return _missing(claim, rule, "needs two configurations with usable runs")
    wide = stats.bonferroni(LEVEL, len(pairs))
    tests = []
    for (la, a), (lb, b) in pairs:
        w = {b: 1.0, a: -1.0}
        iv90, ivw = ev.gain(w, 0.90), ev.gain(w, wide)
        outcome = stats.decide_equivalent(iv90, ivw, margin)
        tests.append(Test(f"acc({lb}) − acc({la})", ivw if outcome == CONTRADICTED else iv90, outcome))
    outcome = stats.all_of([t.outcome for t in tests])

    def excursion(t: Test) -> float:
        return max(abs(t.interval.lo), abs(t.interval.hi)) if t.interval.defined else math.inf

    return Verdict(claim, outcome, rule, _deciding(outcome, tests, excursion), tests)


def changes_lambda(ev: Evidence, a: str, b: str, margin: float, claim: str, statistic: str) -> Verdict:
    rule = (f"95% interval of log(λ ratio) excludes 0 → reproduced; ratio equivalent to 1 within "
            f"±{100 * margin:g}% (TOST) → contradicted")
    iv = ev.log_lambda({b: 1.0, a: -1.0})
    iv90 = ev.log_lambda({b: 1.0, a: -1.0}, 0.90)
    lm = math.log1p(margin)
    if iv.defined and (iv.lo > 0 or iv.hi < 0):
        t = Test(statistic, iv, REPRODUCED)
    elif iv90.defined and -lm < iv90.lo and iv90.hi < lm:
        t = Test(statistic + " (TOST)", iv90, CONTRADICTED)
    else:
        t = Test(statistic, iv, INCONCLUSIVE)
    return Verdict(claim, t.outcome, rule, t, [t])


def not_consistently_lower(ev: Evidence, pairs: list[tuple[float, str, str]], margin: float, claim: str) -> Verdict:
    """Finding 5's second claim over [(lr, BN config, no-BN config)]."""
    rule = (f"at some η the lower bound of log(λ_BN/λ_noBN) is above log(1/(1+{margin:g})) (Bonferroni over η): "
            f"BN's λ_max not meaningfully lower there → reproduced; BN's λ_max significantly lower at every η "
            f"(95% each) → contradicted")
    if not pairs:
        return _missing(claim, rule, "needs BN and no-BN runs at a common learning rate")
    wide = stats.bonferroni(LEVEL, len(pairs))
    floor = -math.log1p(margin)
    tests = []
    for lr, bn, nobn in pairs:
        w = {bn: 1.0, nobn: -1.0}
        ivw, iv = ev.log_lambda(w, wide), ev.log_lambda(w, LEVEL)
        if ivw.defined and ivw.lo > floor:
            tests.append(Test(f"log(λ_BN/λ_noBN) at η={lr:g}", ivw, REPRODUCED))
        elif iv.defined and iv.hi < 0:
            tests.append(Test(f"log(λ_BN/λ_noBN) at η={lr:g}", iv, CONTRADICTED))
        else:
            tests.append(Test(f"log(λ_BN/λ_noBN) at η={lr:g}", ivw, INCONCLUSIVE))
    outs = [t.outcome for t in tests]
    outcome = (REPRODUCED if REPRODUCED in outs else
               CONTRADICTED if all(o == CONTRADICTED for o in outs) else INCONCLUSIVE)
    deciding = next(t for t in tests if t.outcome == outcome) if outcome != INCONCLUSIVE else \
        max(tests, key=lambda t: t.interval.lo if t.interval.defined else -math.inf)
    return Verdict(claim, outcome, rule, deciding, tests)


# ---------------------------------------------------------------------------- per finding
def _rho(cfg) -> float:
    return cfg["rho"] if cfg["optimizer"] in ("sam", "asam") else 0.0


def _batch_label(cfg) -> str:
    return "GD" if cfg["optimizer"] == "gd" else f"B={cfg['batch_size']}"


def _batch_key(cfg) -> float:
    return math.inf if cfg["optimizer"] == "gd" else cfg["batch_size"]


def _groups(ev: Evidence, key: Callable, label: Callable, x: Callable) -> list[tuple[str, list[tuple[float, str]]]]:
    """Configurations with usable runs grouped by ``key`` (sorted), each sorted by ``x``: [(label, [(x, name)])]."""
    out: dict[Any, tuple[str, list]] = {}
    for c in ev.configs:
        if c.runs:
            out.setdefault(key(c.cfg), (label(c.cfg), []))[1].append((x(c.cfg), c.name))
    return [(lab, sorted(v)) for _, (lab, v) in sorted(out.items())]


def _batch_effect(ev: Evidence, th: dict, x: Callable, symbol: str, lam_claim: str, what: str,
                  weights: Callable[[list[tuple[float, str]]], dict[str, float]], gain_name: str) -> list[Verdict]:
    """Findings 1 and 3: λ_max monotone in ``x`` at every batch size; the gain improves at the smallest batch
    size and vanishes at the largest."""
    groups = _groups(ev, lambda c: _batch_key(c), _batch_label, x)
    groups = [(g, ch) for g, ch in groups if len(ch) >= 2]
    out = [monotone_lower(ev, {f"{g}: ": ch for g, ch in groups}, lam_claim, symbol)]
    if not groups:
        return out + [_missing(f"{what} improves test accuracy at small batch size", "", "no usable runs")]
    (g_s, ch_s), (g_l, ch_l) = groups[0], groups[-1]
    out.append(improves(ev, weights(ch_s), f"{what} improves test accuracy at small batch size ({g_s})",
                        f"{gain_name} at {g_s}"))
    if len(groups) > 1:
        out.append(vanishes(ev, weights(ch_s), weights(ch_l), th["acc_margin"],
                            f"…and the gain vanishes at large batch size ({g_l})", g_s, g_l))
    else:
        out.append(_missing("…and the gain vanishes at large batch size", "", "needs two batch sizes with usable runs"))
    return out


def _f1(ev: Evidence, th: dict) -> list[Verdict]:
    return _batch_effect(ev, th, lambda c: c["lr"], "η", "A larger learning rate lowers λ_max (every batch size)",
                         "A larger learning rate", lambda ch: slope_weights({n: v for v, n in ch}, log=True),
                         "fitted gain over the η range (line in log η)")


def _f3(ev: Evidence, th: dict) -> list[Verdict]:
    def sam_vs_sgd(ch):
        base = [n for v, n in ch if v == 0]
        sam = [n for v, n in ch if v > 0]
        if not base or not sam:
            return {}
        return {base[0]: -1.0, **{n: 1.0 / len(sam) for n in sam}}

    return _batch_effect(ev, th, _rho, "ρ", "SAM lowers λ_max (every batch size, monotone in ρ)", "SAM",
                         sam_vs_sgd, "mean over ρ>0 − SGD")


def _f2(ev: Evidence, th: dict) -> list[Verdict]:
    ch = [(c.cfg["batch_size"], c.name, c.cfg["lr"]) for c in ev.configs if c.runs]
    ch.sort()
    if len(ch) < 2:
        return [_missing("η/B constant", "", "needs two configurations with usable runs")]
    (b0, a, l0), (b1, b, l1) = ch[0], ch[-1]
    return [changes_lambda(ev, a, b, th["lambda_margin"], "λ_max changes with the scale at fixed η/B",
                           f"log(λ at η={l1:g},B={b1} / λ at η={l0:g},B={b0})"),
            equivalent_all(ev, [(f"η={lr:g},B={bs}", n) for bs, n, lr in ch], th["acc_margin"],
                           "Test accuracy does not change")]


def _f4(ev: Evidence, th: dict) -> list[Verdict]:
    ch = sorted((c.cfg["dropout"], c.name) for c in ev.configs if c.runs)
    out = [monotone_lower(ev, {"": ch}, "Higher dropout lowers λ_max (monotone in p)", "p")]
    if len(ch) < 2:
        return out + [_missing("…yet high dropout hurts test accuracy", "", "needs two dropout rates")]
    every = sorted((c.cfg["dropout"], c.name) for c in ev.configs)  # the claim is about the grid's highest p
    ref = th.get("dropout_reference", every[0][0])
    base = next((n for v, n in ch if v == ref), None)
    (ph, high) = every[-1]
    if base is None or base == high or not ev.by_name[high].runs:
        return out + [_missing(f"…yet high dropout (p={ph:g}) hurts test accuracy", "",
                               f"no usable runs at p={ph if base else ref:g}")]
    out.append(hurts(ev, {high: 1.0, base: -1.0}, f"…yet high dropout (p={ph:g}) hurts test accuracy (vs p={ref:g})",
                     f"acc(p={ph:g}) − acc(p={ref:g})"))
    return out


def _f5(ev: Evidence, th: dict) -> list[Verdict]:
    by_lr: dict[float, dict[bool, str]] = {}
    for c in ev.configs:
        if c.runs:
            by_lr.setdefault(c.cfg["lr"], {})[bool(c.cfg["batch_norm"])] = c.name
    pairs = [(lr, d[True], d[False]) for lr, d in sorted(by_lr.items()) if True in d and False in d]
    if not pairs:
        return [_missing("BatchNorm improves test accuracy", "", "needs BN and no-BN runs at a common learning rate")]
    w: dict[str, float] = {}
    for _, bn, nobn in pairs:
        w[bn], w[nobn] = 1.0 / len(pairs), -1.0 / len(pairs)
    return [improves(ev, w, "BatchNorm improves test accuracy", f"mean over η∈{{{', '.join(f'{p[0]:g}' for p in pairs)}}} "
                     "of acc(BN) − acc(no BN)"),
            not_consistently_lower(ev, pairs, th["lambda_margin"], "…without consistently lowering λ_max")]


RULES: dict[int, Callable[[Evidence, dict], list[Verdict]]] = {1: _f1, 2: _f2, 3: _f3, 4: _f4, 5: _f5}
DEFAULT_THRESHOLDS = {"acc_margin": 0.02, "lambda_margin": 0.1}


def decide(finding: int, ev: Evidence, thresholds: dict | None = None) -> list[Verdict]:
    """The verdicts of a finding's claims from the usable runs."""
    th = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    return RULES[finding](ev, th)


def overall(verdicts: list[Verdict]) -> str:
    return stats.all_of([v.outcome for v in verdicts])
