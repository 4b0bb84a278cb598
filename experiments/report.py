"""Sweep report: results.csv, PNG plots (λ_max vs test accuracy; λ_max over training with 2/η) and
report.md with a verdict, computed from the numbers, for each of the paper's claims."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from experiments.sweep import varied_values
from experiments.train import atomic_write_text

COLUMNS = ["name", "optimizer", "lr", "batch_size", "rho", "dropout", "batch_norm", "model", "dataset", "status",
           "steps", "epochs", "train_acc", "test_acc", "train_loss", "lambda_max", "lambda_between_iterates",
           "lambda_used", "two_over_lr", "lambda_residual", "lambda_hvps_total", "wall_seconds", "diverged_step"]


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


def lam(run) -> float | None:
    """The run's sharpness: the between-iterates maximum when computed, else the final λ_max."""
    s = run["summary"] or {}
    v = s.get("lambda_between_iterates")
    return v if v is not None else s.get("lambda_max")


def _ok(run) -> bool:
    s = run["summary"]
    return bool(s) and s["status"] != "diverged" and lam(run) is not None and s.get("test_acc") is not None


def _row(run) -> dict[str, Any]:
    c, s = run["cfg"], run["summary"] or {}
    row = {"name": run["name"], **{k: c.get(k) for k in ("optimizer", "lr", "rho", "dropout", "batch_norm", "model", "dataset")}}
    row["batch_size"] = s.get("batch_size", c.get("batch_size"))
    for k in ("status", "steps", "epochs", "train_acc", "test_acc", "train_loss", "lambda_max",
              "lambda_between_iterates", "two_over_lr", "lambda_residual", "lambda_hvps_total", "wall_seconds",
              "diverged_step"):
        row[k] = s.get(k)
    row["lambda_used"] = lam(run) if s else None
    if not s:
        row["status"] = "incomplete"
    return row


def _f(x, nd=4):
    return "-" if x is None else (f"{x:.{nd}g}" if isinstance(x, float) else str(x))


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


# ---------------------------------------------------------------------------- verdicts
def _by(runs, key):
    out: dict[Any, list] = {}
    for r in runs:
        out.setdefault(r["cfg"].get(key) if key != "batch_size" else r["summary"]["batch_size"], []).append(r)
    return out


def _acc(r):
    return r["summary"]["test_acc"]


def _verdict_f1(runs, th):
    claims = []
    groups = sorted(_by(runs, "batch_size").items())
    lam_ok, parts, gains = True, [], {}
    for B, rs in groups:
        rs = sorted(rs, key=lambda r: r["cfg"]["lr"])
        if len(rs) < 2:
            continue
        lo, hi = rs[0], rs[-1]
        lam_ok &= lam(hi) < lam(lo)
        parts.append(f"B={B}: λ_max {lam(lo):.3g} (η={lo['cfg']['lr']:g}) → {lam(hi):.3g} (η={hi['cfg']['lr']:g})")
        gains[B] = (max(_acc(r) for r in rs[1:]) - _acc(lo), lo, rs)
    if not gains:
        return [("Larger η lowers λ_max", None, "needs at least two learning rates per batch size")]
    claims.append(("A larger learning rate lowers λ_max (at every batch size)", lam_ok, "; ".join(parts)))
    Bs = sorted(gains)
    g_small, g_large = gains[Bs[0]][0], gains[Bs[-1]][0]
    tol = th.get("acc_tol", 0.01)
    claims.append((f"A larger learning rate improves test accuracy at small batch (B={Bs[0]})", g_small > tol,
                   f"best gain over η={gains[Bs[0]][1]['cfg']['lr']:g}: {100 * g_small:+.1f} pts (threshold {100 * tol:.1f})"))
    if len(Bs) > 1:
        vanish = g_large < max(g_small / 2, tol) and g_large < g_small
        claims.append((f"…and the gain vanishes at large batch (B={Bs[-1]})", vanish,
                       f"gain at B={Bs[-1]}: {100 * g_large:+.1f} pts vs {100 * g_small:+.1f} pts at B={Bs[0]}"))
    return claims


def _verdict_f2(runs, th):
    if len(runs) < 2:
        return [("η/B constant", None, "needs at least two runs")]
    rs = sorted(runs, key=lambda r: r["summary"]["batch_size"])
    lams = [lam(r) for r in rs]
    accs = [_acc(r) for r in rs]
    ratio = max(lams) / max(min(lams), 1e-12)
    spread = max(accs) - min(accs)
    desc = ", ".join(f"(η={r['cfg']['lr']:g}, B={r['summary']['batch_size']}): λ={lam(r):.3g}, acc={100 * _acc(r):.1f}%" for r in rs)
    return [
        ("λ_max changes with the scale at fixed η/B", ratio >= th.get("lambda_ratio", 1.25),
         f"max/min λ_max = {ratio:.2f} (threshold {th.get('lambda_ratio', 1.25):.2f}); {desc}"),
        ("Test accuracy does not change", spread <= th.get("acc_tol", 0.01),
         f"test-accuracy range {100 * spread:.1f} pts (tolerance {100 * th.get('acc_tol', 0.01):.1f})"),
    ]


def _rho(r):
    return r["cfg"]["rho"] if r["cfg"]["optimizer"] in ("sam", "asam") else 0.0


def _verdict_f3(runs, th):
    groups = sorted(_by(runs, "batch_size").items())
    lam_ok, parts, gains = True, [], {}
    for B, rs in groups:
        base = [r for r in rs if _rho(r) == 0]
        sam = [r for r in rs if _rho(r) > 0]
        if not base or not sam:
            continue
        b = base[0]
        top = max(sam, key=_rho)
        lam_ok &= all(lam(r) < lam(b) for r in sam)
        parts.append(f"B={B}: λ_max {lam(b):.3g} (SGD) → " + ", ".join(f"{lam(r):.3g} (ρ={_rho(r):g})" for r in sorted(sam, key=_rho)))
        gains[B] = max(_acc(r) for r in sam) - _acc(b)
    if not gains:
        return [("SAM lowers λ_max", None, "needs ρ=0 and ρ>0 runs at one batch size")]
    tol = th.get("acc_tol", 0.01)
    Bs = sorted(gains)
    out = [("SAM lowers λ_max (every ρ>0, every batch size)", lam_ok, "; ".join(parts)),
           (f"SAM improves test accuracy at small batch (B={Bs[0]})", gains[Bs[0]] > tol,
            f"best gain {100 * gains[Bs[0]]:+.1f} pts (threshold {100 * tol:.1f})")]
    if len(Bs) > 1:
        g_s, g_l = gains[Bs[0]], gains[Bs[-1]]
        out.append((f"…and the gain vanishes at large batch (B={Bs[-1]})", g_l < max(g_s / 2, tol) and g_l < g_s,
                    f"gain at B={Bs[-1]}: {100 * g_l:+.1f} pts vs {100 * g_s:+.1f} pts at B={Bs[0]}"))
    return out


def _verdict_f4(runs, th):
    rs = sorted(runs, key=lambda r: r["cfg"]["dropout"])
    if len(rs) < 2:
        return [("dropout", None, "needs at least two dropout rates")]
    p0, ph = rs[0], rs[-1]
    best = max(rs, key=_acc)
    desc = ", ".join(f"p={r['cfg']['dropout']:g}: λ={lam(r):.3g}, acc={100 * _acc(r):.1f}%" for r in rs)
    tol = th.get("acc_tol", 0.01)
    return [
        (f"High dropout (p={ph['cfg']['dropout']:g}) lowers λ_max", lam(ph) < lam(p0),
         f"λ_max {lam(p0):.3g} at p={p0['cfg']['dropout']:g} → {lam(ph):.3g} at p={ph['cfg']['dropout']:g}; {desc}"),
        (f"…yet hurts test accuracy (below the best p={best['cfg']['dropout']:g})", _acc(best) - _acc(ph) > tol,
         f"{100 * _acc(ph):.1f}% at p={ph['cfg']['dropout']:g} vs {100 * _acc(best):.1f}% best (tolerance {100 * tol:.1f} pts)"),
    ]


def _verdict_f5(runs, th):
    by_lr: dict[float, dict[bool, Any]] = {}
    for r in runs:
        by_lr.setdefault(r["cfg"]["lr"], {})[bool(r["cfg"]["batch_norm"])] = r
    pairs = sorted((lr, d[True], d[False]) for lr, d in by_lr.items() if True in d and False in d)
    if not pairs:
        return [("BatchNorm", None, "needs BN and no-BN runs at a common learning rate")]
    dacc = [_acc(b) - _acc(n) for _, b, n in pairs]
    lower = [lam(b) < lam(n) for _, b, n in pairs]
    desc = "; ".join(f"η={lr:g}: acc {100 * _acc(b):.1f}% (BN) vs {100 * _acc(n):.1f}% (no BN), λ_max {lam(b):.3g} vs {lam(n):.3g}"
                     for lr, b, n in pairs)
    mean = sum(dacc) / len(dacc)
    return [
        ("BatchNorm improves test accuracy", mean > th.get("acc_tol", 0.0) and sum(d > 0 for d in dacc) * 2 > len(dacc),
         f"mean gain {100 * mean:+.1f} pts, better at {sum(d > 0 for d in dacc)}/{len(dacc)} learning rates; {desc}"),
        ("…without consistently lowering λ_max", not all(lower),
         f"BN has the lower λ_max at {sum(lower)}/{len(lower)} learning rates"),
    ]


VERDICTS = {1: _verdict_f1, 2: _verdict_f2, 3: _verdict_f3, 4: _verdict_f4, 5: _verdict_f5}


def verdicts(finding: int, runs, thresholds=None):
    """[(claim, True/False/None, numbers)] for the finished, non-diverged runs."""
    good = [r for r in runs if _ok(r)]
    if not good:
        return [(f"Finding {finding}", None, "no finished runs")]
    return VERDICTS[finding](good, thresholds or {})


# ---------------------------------------------------------------------------- plots
_SYMBOL = {"batch_size": "B", "dropout": "p", "batch_norm": "BN", "lr": "η", "rho": "ρ"}


def _label(run, vary) -> str:
    """Legend text of a run, e.g. ``sgd B=32 η=0.1``."""
    return " ".join(str(v) if k == "optimizer" else f"{_SYMBOL.get(k, k)}={v}"
                    for k, v in varied_values(run["cfg"], vary, "GD"))


def make_plots(sweep_dir: Path, runs, vary, title) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    good = [r for r in runs if _ok(r)]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    cmap = plt.get_cmap("tab10")
    for i, r in enumerate(good):
        ax.scatter(lam(r), 100 * _acc(r), color=cmap(i % 10), s=50, label=_label(r, vary))
    ax.set_xscale("log")
    ax.set_xlabel("λ_max (final)")
    ax.set_ylabel("test accuracy (%)")
    paths.append(_save(fig, ax, title, sweep_dir / "lambda_vs_test_acc.png"))

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, r in enumerate(runs):
        pts = [(m["step"], m["lambda_max"]) for m in r["metrics"] if m.get("lambda_max") is not None]
        if not pts:
            continue
        col = cmap(i % 10)
        ax.plot(*zip(*pts), "o-", color=col, ms=3, label=_label(r, vary))
        ax.axhline(2.0 / r["cfg"]["lr"], color=col, ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("λ_max   (dashed: 2/η)")
    paths.append(_save(fig, ax, title, sweep_dir / "lambda_over_training.png"))
    return paths


def _save(fig, ax, title: str, path: Path) -> Path:
    """Title, legend (when anything is labelled), tight layout; write the PNG and free the figure."""
    import matplotlib.pyplot as plt

    ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- report
def build_report(sweep_dir: str | Path) -> Path:
    """Write results.csv, the plots and report.md for ``sweep_dir``; return report.md's path."""
    from experiments.presets import FINDINGS, get_preset

    sweep_dir = Path(sweep_dir)
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
    rows = [_row(r) for r in runs]

    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
    atomic_write_text(sweep_dir / "results.csv", buf.getvalue())
    title = f"{meta.get('preset', sweep_dir.name)}: finding {finding}" if finding else sweep_dir.name
    plots = make_plots(sweep_dir, runs, vary, title)

    L = [f"# {meta.get('preset', sweep_dir.name)}", ""]
    if preset:
        L += [f"**Finding {finding}** (Kaur, Cohen & Lipton 2023): {FINDINGS[finding]}", "", f"Setup: {preset['description']}", ""]
        if meta.get("overrides"):
            L += [f"Overrides: `{json.dumps(meta['overrides'])}`", ""]
    L += ["## Runs", "", "| run | status | steps | train acc | test acc | λ_max | λ_max between iterates | 2/η | HVPs | time (s) |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        st = row["status"] + (f" @ {row['diverged_step']}" if row.get("diverged_step") is not None else "")
        L.append(f"| {row['name']} | {st} | {_f(row['steps'])} | {_pct(row['train_acc'])} | {_pct(row['test_acc'])} | "
                 f"{_f(row['lambda_max'])} | {_f(row['lambda_between_iterates'])} | {_f(row['two_over_lr'])} | "
                 f"{_f(row['lambda_hvps_total'])} | {_f(row['wall_seconds'], 3)} |")
    L.append("")
    n_div = sum(1 for r in rows if r["status"] == "diverged")
    n_inc = sum(1 for r in rows if r["status"] == "incomplete")
    if n_div or n_inc:
        L += [f"{n_div} diverged and {n_inc} unfinished runs are left out of the verdicts.", ""]
    if finding:
        L += ["## Verdicts", "", "| claim | reproduced | numbers |", "|---|---|---|"]
        vs = verdicts(finding, runs, (preset or {}).get("claims"))
        for claim, ok, nums in vs:
            L.append(f"| {claim} | {'yes' if ok else ('n/a' if ok is None else 'no')} | {nums} |")
        decided = [ok for _, ok, _ in vs if ok is not None]
        overall = "yes" if decided and all(decided) else ("partly" if any(decided) else "no")
        L += ["", f"**Finding {finding} reproduced: {overall}** ({sum(decided)}/{len(decided)} claims).", ""]
    L += ["## Files", "", "- `results.csv`: one row per run"] + [f"- `{p.name}`" + (
        ": λ_max against test accuracy" if "vs" in p.name else ": λ_max over training, dashed lines at 2/η") for p in plots]
    L.append("- `<run>/config.json`, `metrics.jsonl`, `summary.json`, `checkpoint.pt`, `final_model.pt`")
    for p in plots:
        L += ["", f"![{p.stem}]({p.name})"]
    out = sweep_dir / "report.md"
    atomic_write_text(out, "\n".join(L) + "\n")
    return out


def overall_verdict(sweep_dir) -> str:
    text = (Path(sweep_dir) / "report.md").read_text()
    for line in text.splitlines():
        if line.startswith("**Finding") and "reproduced" in line:
            return line
    return ""
