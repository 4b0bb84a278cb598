"""Sweep report: results.csv (one row per run), the plots, report.md (per-configuration statistics, excluded
runs with reasons, one verdict per claim with the interval that decided it) and verdicts.json (the same
verdicts, machine-readable)."""
from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any

from . import plots, stats, subset_study
from .config import config_name, varied_values
from .storage import atomic_write_json, atomic_write_text
from .verdicts import Verdict, decide, lam, overall, usable

COLUMNS = ["name", "config", "seed", "optimizer", "lr", "batch_size", "rho", "dropout", "batch_norm", "model",
           "dataset", "status", "excluded", "steps", "epochs", "train_acc", "test_acc", "train_loss", "lambda_max",
           "lambda_converged", "lambda_between_iterates", "lambda_used", "two_over_lr", "lambda_residual",
           "lambda_hvps_total", "wall_seconds", "diverged_step"]

STATS_METHOD = (
    "Per configuration: mean ± SD over seeds and a 95% t-interval of the mean (λ_max: geometric mean, interval "
    "on log λ_max). Accuracy contrasts (gains, differences): paired by seed, with a t-interval whose variance "
    "is the two-way (seed × test example) random-effects estimate V = V_seed + V_test − V_interaction from the "
    "stored per-example test correctness, so it holds both the seed spread and the sampling noise of the "
    "shared test set (McNemar-type term); Satterthwaite degrees of freedom. λ_max contrasts: paired t-interval "
    "of log λ_max over seeds. Equivalence: TOST (90% interval inside ±margin). Claims over several "
    "comparisons: 'every one' needs each at 95%, 'some one' uses Bonferroni-adjusted levels.")


def load_runs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every run directory (with config.json) under ``sweep_dir``: config, summary (or None) and metrics."""
    runs = []
    for d in sorted(Path(sweep_dir).iterdir()):
        if not (d.is_dir() and (d / "config.json").is_file()):
            continue
        cfg = json.loads((d / "config.json").read_text())
        summ = json.loads((d / "summary.json").read_text()) if (d / "summary.json").is_file() else None
        metrics = []
        if (d / "metrics.jsonl").is_file():
            metrics = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
        runs.append({"name": d.name, "cfg": cfg, "summary": summ, "metrics": metrics})
    return runs


def _row(run, cname: str, why: str | None) -> dict[str, Any]:
    c, s = run["cfg"], run["summary"] or {}
    row = {"name": run["name"], "config": cname, "seed": c.get("init_seed"), "excluded": why or "",
           **{k: c.get(k) for k in ("optimizer", "lr", "rho", "dropout", "batch_norm", "model", "dataset")}}
    row["batch_size"] = s.get("batch_size", c.get("batch_size"))
    for k in ("status", "steps", "epochs", "train_acc", "test_acc", "train_loss", "lambda_max", "lambda_converged",
              "lambda_between_iterates", "two_over_lr", "lambda_residual", "lambda_hvps_total", "wall_seconds",
              "diverged_step"):
        row[k] = s.get(k)
    row["lambda_used"] = lam(s) if s else None
    if not s:
        row["status"] = "incomplete"
    return row


def _f(x, nd=4):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else (
        f"{x:.{nd}g}" if isinstance(x, float) else str(x))


def _pm(s: stats.Summary, scale: float = 1.0, nd: int = 3) -> str:
    if s.n == 0:
        return "-"
    if s.n == 1:
        return f"{_f(scale * s.mean, nd)} (1 seed)"
    return f"{_f(scale * s.mean, nd)} ± {_f(scale * s.sd, 2)} [{_f(scale * s.lo, nd)}, {_f(scale * s.hi, nd)}]"


def _interval_text(v: Verdict) -> tuple[str, str, str]:
    """(statistic, estimate, interval) columns; accuracy in points, λ contrasts as ratios."""
    t = v.deciding
    if t is None:
        return "-", "-", "-"
    iv = t.interval
    if "log(" in t.statistic:  # a log λ_max contrast, shown as a ratio
        est, lo, hi = (math.exp(x) if math.isfinite(x) else math.nan for x in (iv.estimate, iv.lo, iv.hi))
        name = re.sub(r"log\((.*)\)", r"ratio \1", t.statistic)
        return name, _f(est, 3), f"[{_f(lo, 3)}, {_f(hi, 3)}] ({100 * iv.level:.1f}%)"
    pts = [100 * x for x in (iv.estimate, iv.lo, iv.hi)]
    return t.statistic, f"{pts[0]:+.2f} pts", f"[{pts[1]:+.2f}, {pts[2]:+.2f}] pts ({100 * iv.level:.1f}%)" \
        if iv.defined else "undefined (needs ≥ 2 seeds)"


def build_report(sweep_dir: str | Path) -> Path:
    """Write results.csv, the plots, report.md and verdicts.json for ``sweep_dir``; return report.md's path."""
    from .presets import FINDINGS, get_preset

    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist; give the --out directory of a "
                                f"'fasthess-experiments run' (default runs/PRESET)")
    meta = json.loads((sweep_dir / "sweep.json").read_text()) if (sweep_dir / "sweep.json").is_file() else {}
    preset = None
    if meta.get("preset"):
        try:
            preset = get_preset(meta["preset"])
        except KeyError:
            preset = None
    runs = load_runs(sweep_dir)
    if meta.get("runs"):
        names = set(meta["runs"])
        runs = [r for r in runs if r["name"] in names] or runs
    finding = meta.get("finding") or (preset or {}).get("finding")
    vary = (preset or {}).get("vary", ["optimizer", "lr", "batch_size"])
    cname = lambda cfg: config_name(cfg, vary)  # noqa: E731
    ev, excluded = usable(runs, cname)
    order = {n: i for i, n in enumerate(meta.get("configs", []))}  # the preset's grid order
    ev.configs.sort(key=lambda c: order.get(c.name, len(order)))
    why = dict(excluded)
    rows = [_row(r, cname(r["cfg"]), why.get(r["name"])) for r in runs]

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
    atomic_write_text(sweep_dir / "results.csv", buf.getvalue())

    claim = FINDINGS[finding] if finding else sweep_dir.name
    title = f"{meta.get('preset', sweep_dir.name)}: {claim}"
    label = lambda cfg: " ".join(  # noqa: E731
        str(v) if k == "optimizer" else f"{plots_symbol(k)}={v}" for k, v in varied_values(cfg, vary, "GD"))
    spec = (preset or {}).get("plot", {"x": "lr", "panel": "none"})
    made = [plots.effect_plot(ev, spec["x"], spec["panel"], title, sweep_dir / "effect.png"),
            plots.scatter_plot(ev, label, title, sweep_dir / "lambda_vs_test_acc.png"),
            plots.training_plot(ev, label, title, sweep_dir / "lambda_over_training.png"),
            plots.geometry_plot(ev, label, title, sweep_dir / "geometry_over_training.png")]
    figures = [p for p in made if p is not None]

    vs = decide(finding, ev, (preset or {}).get("claims")) if finding else []
    verdict_all = overall(vs) if vs else None
    subset = (subset_study.changes(runs, finding, (preset or {}).get("claims"), cname, {v.claim: v.outcome for v in vs})
              if finding and subset_study.load(sweep_dir, runs) else None)
    atomic_write_json(sweep_dir / "verdicts.json", {
        "preset": meta.get("preset"), "finding": finding, "claim": claim if finding else None,
        "seeds": meta.get("seeds"), "overall": verdict_all, "claims": [v.as_dict() for v in vs],
        "excluded": [{"run": n, "reason": r} for n, r in excluded], "statistics": STATS_METHOD,
        **({"subset_study": subset} if subset else {})})

    L = [f"# {meta.get('preset', sweep_dir.name)}", ""]
    if preset:
        L += [f"**Finding {finding}** (Kaur, Cohen & Lipton 2023): {FINDINGS[finding]}", "",
              f"Setup: {preset['description']}", "", f"Seeds: {meta.get('seeds')}", ""]
        if meta.get("overrides"):
            L += [f"Overrides: `{json.dumps(meta['overrides'])}`", ""]
    if vs:
        L += ["## Verdicts", "", "| claim | outcome | deciding statistic | estimate | interval | rule |",
              "|---|---|---|---|---|---|"]
        for v in vs:
            st, est, iv = _interval_text(v)
            note = f" ({v.note})" if v.note else ""
            L.append(f"| {v.claim} | **{v.outcome}**{note} | {st} | {est} | {iv} | {v.rule} |")
        n_rep = sum(v.outcome == "reproduced" for v in vs)
        L += ["", f"**Finding {finding}: {verdict_all}** ({n_rep}/{len(vs)} claims reproduced, "
              f"{sum(v.outcome == 'contradicted' for v in vs)} contradicted).", "",
              "<details><summary>every test</summary>", "", "| claim | statistic | outcome | estimate | interval |",
              "|---|---|---|---|---|"]
        for v in vs:
            for t in v.tests:
                st, est, iv = _interval_text(Verdict(v.claim, t.outcome, "", t, []))
                L.append(f"| {v.claim} | {st} | {t.outcome} | {est} | {iv} |")
        L += ["", "</details>", ""]
    if subset:
        L += subset_study.section(subset)
    L += ["## Statistics", "", STATS_METHOD, ""]
    L += ["## Configurations (usable runs)", "",
          "| configuration | seeds | test acc % (mean ± SD [95% CI]) | λ_max (geo. mean ± SD of log [95% CI]) | steps (mean) |",
          "|---|---|---|---|---|"]
    for c in ev.configs:
        steps = stats.summarize([r["summary"]["steps"] for r in c.runs.values()])
        L.append(f"| {c.name} | {len(c.runs)} | {_pm(stats.summarize(list(c.acc().values())), 100)} | "
                 f"{_pm(stats.summarize_log(list(c.lam().values())))} | {_f(steps.mean, 5)} |")
    L.append("")
    if excluded:
        L += [f"## Excluded runs ({len(excluded)})", "", "| run | reason |", "|---|---|"]
        L += [f"| {n} | {r} |" for n, r in excluded] + [""]
    L += ["## Runs", "", "| run | status | steps | train acc | test acc | λ_max | λ between iterates | 2/η | HVPs | time (s) |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        st = row["status"] + (f" @ {row['diverged_step']}" if row.get("diverged_step") is not None else "")
        L.append(f"| {row['name']} | {st} | {_f(row['steps'])} | {_pct(row['train_acc'])} | {_pct(row['test_acc'])} | "
                 f"{_f(row['lambda_max'])} | {_f(row['lambda_between_iterates'])} | {_f(row['two_over_lr'])} | "
                 f"{_f(row['lambda_hvps_total'])} | {_f(row['wall_seconds'], 3)} |")
    env = next((r["summary"].get("environment") for r in runs if r["summary"] and r["summary"].get("environment")), None)
    L += ["", "## Files", "", "- `verdicts.json`: the verdicts above, machine-readable",
          "- `results.csv`: one row per run (with the exclusion reason)"]
    L += [f"- `{p.name}`" for p in figures]
    L.append("- `<run>/config.json` (config and environment), `metrics.jsonl`, `summary.json` (with per-example "
             "test correctness), `checkpoint.pt`, `final_model.pt`")
    if env:
        git = env.get("git") or {}
        L += ["", f"Environment: fasthess {env.get('fasthess')}, torch {env.get('torch')}, Python {env.get('python')}, "
              f"device {env.get('device')} ({env.get('device_name')}), commit "
              f"{git.get('commit', 'n/a')}{' (dirty)' if git.get('dirty') else ''}."]
    for p in figures:
        L += ["", f"![{p.stem}]({p.name})"]
    out = sweep_dir / "report.md"
    atomic_write_text(out, "\n".join(L) + "\n")
    return out


_SYMBOL = {"batch_size": "B", "dropout": "p", "batch_norm": "BN", "lr": "η", "rho": "ρ"}


def plots_symbol(key: str) -> str:
    return _SYMBOL.get(key, key)


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"

