"""Subset study of a sweep: would a claim's verdict change if λ_max had been taken on a subset of the training data?

For every usable run, :func:`study_run` reloads the final model (``final_model.pt``) and measures, with
:func:`fasthess.subset.subset_lambda_max` on the run's λ data, chunking, mode and tolerance, the certified λ_max on
``REPEATS`` random subsets of each size and on the strided subset (every (N // size)-th example, the paper's
practice), next to the full-data value; it writes ``subset_study.json`` in the run's directory. :func:`section` then
decides every claim again with each run's λ_max replaced by its value on draw j of each size (the j-th random subset
of every run, j = 1..REPEATS, and the strided subset), and reports per claim and size how many of those draws
give another verdict than the full data. A run whose sharpness is the maximum between iterates (BatchNorm at
small η, finding 5) is compared on its final λ_max: the study measures the final model only.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import fasthess
from fasthess.subset import subset_lambda_max, t_two_sided

from .storage import atomic_write_json
from .verdicts import decide, exclusion, usable

FILE = "subset_study.json"
REPEATS = 8
STRIDED = "strided"


def parse_sizes(text: str) -> list[int]:
    """``"100,1000"`` → [100, 1000]; ValueError (printed by the CLI) for anything else."""
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 2:
        raise ValueError(f"--subset-study expects comma-separated subset sizes ≥ 2, e.g. 100,1000; got {text!r}")
    return sizes


def study_run(run_dir: Path, sizes: Sequence[int], data=None, repeats: int = REPEATS, seed: int = 0) -> dict[str, Any]:
    """Measure and write ``run_dir/subset_study.json`` for one finished run (module docstring); returns the record."""
    from .train import Trainer

    cfg = json.loads((run_dir / "summary.json").read_text())["config"]
    trainer = Trainer(cfg, data=data, distributed=False)
    trainer.model.load_state_dict(torch.load(run_dir / "final_model.pt", map_location=trainer.device))
    t = trainer.tracker
    n = t.data[0].shape[0]
    usable_sizes = [m for m in sizes if m < n]
    if not usable_sizes:
        raise ValueError(f"the subset sizes {list(sizes)} are not below the run's {n} λ examples; choose smaller ones")
    with fasthess.sharpness_mode(trainer.model, t.mode, t.disable_dropout):
        study = subset_lambda_max(trainer.model, t.loss_fn, t.data, sizes=usable_sizes, repeats=repeats, stride=True,
                                  batch_size=t.batch_size, tol=t.tol, seed=seed)
    record = {"num_examples": n, "requested": list(sizes), "full": study.full_value,
              "full_bound": float(study.full.error_bounds[0]), "repeats": repeats, "seed": seed,
              "sizes": {str(s.size): {"values": s.values.tolist(), "strided": s.strided, "mean": s.mean, "std": s.std,
                                      "bias": s.bias, "bias_interval": list(s.bias_interval), "rmse": s.rmse,
                                      "rmse_interval": list(s.rmse_interval), "num_hvps": s.num_hvps}
                        for s in study.sizes}}
    atomic_write_json(run_dir / FILE, record)
    return record


def study_sweep(sweep_dir: str | Path, sizes: Sequence[int], log=print) -> None:
    """:func:`study_run` for every usable run of the sweep that has no study of exactly these sizes yet."""
    from .report import load_runs
    from .sweep import _data_for

    sweep_dir = Path(sweep_dir)
    for run in load_runs(sweep_dir):
        run_dir = sweep_dir / run["name"]
        old = run_dir / FILE
        if exclusion(run) or (old.is_file() and json.loads(old.read_text())["requested"] == list(sizes)):
            continue
        rec = study_run(run_dir, sizes, data=_data_for(run["summary"]["config"]))
        log(f"subset study {run['name']}: full λ_max {rec['full']:.4g}; " + ", ".join(
            f"{m}: {v['mean']:.4g} ± {v['std']:.2g} (strided {v['strided']:.4g})" for m, v in rec["sizes"].items()))


def _with_subset_lambda(runs: list[dict[str, Any]], size: str, draw: int | str) -> list[dict[str, Any]]:
    """The runs with each studied run's λ_max replaced by its value on ``draw`` (an index or "strided") of ``size``;
    runs without a study of that size are left out."""
    out = []
    for run in runs:
        rec = run.get("subset")
        if run["summary"] is None or rec is None or size not in rec["sizes"]:
            continue
        at = rec["sizes"][size]
        value = at["strided"] if draw == STRIDED else at["values"][draw]
        summary = {**run["summary"], "lambda_max": value, "lambda_between_iterates": None,
                   "lambda_between_converged": None}
        out.append({**run, "summary": summary})
    return out


def load(sweep_dir: Path, runs: list[dict[str, Any]]) -> bool:
    """Attach each run's ``subset_study.json`` (as ``run["subset"]``); True when some run has one."""
    found = False
    for run in runs:
        path = sweep_dir / run["name"] / FILE
        run["subset"] = json.loads(path.read_text()) if path.is_file() else None
        found |= run["subset"] is not None
    return found


def changes(runs: list[dict[str, Any]], finding: int, claims: dict | None, name_of: Callable[[dict], str],
            full_outcomes: dict[str, str]) -> dict[str, Any]:
    """Per size: the subset λ's relative error over the runs, and per claim the outcomes of every draw and how many
    differ from the full-data outcome."""
    studied = [r for r in runs if r.get("subset")]
    sizes = sorted({m for r in studied for m in r["subset"]["sizes"]}, key=int)
    out: dict[str, Any] = {}
    for m in sizes:
        have = [r["subset"] for r in studied if m in r["subset"]["sizes"]]
        rel = [(v - rec["full"]) / rec["full"] for rec in have for v in rec["sizes"][m]["values"]]
        rel_strided = [(rec["sizes"][m]["strided"] - rec["full"]) / rec["full"] for rec in have]
        repeats = min(len(rec["sizes"][m]["values"]) for rec in have)
        per_claim: dict[str, dict[str, Any]] = {}
        for draw in [*range(repeats), STRIDED]:
            ev, _ = usable(_with_subset_lambda(runs, m, draw), name_of)
            for v in decide(finding, ev, claims):
                row = per_claim.setdefault(v.claim, {"full": full_outcomes.get(v.claim), "random": [], "deciding": []})
                row["deciding"].append(v.as_dict() | {"draw": draw, "tests": None})
                if draw == STRIDED:
                    row["strided"] = v.outcome
                else:
                    row["random"].append(v.outcome)
        for row in per_claim.values():
            row["random_changed"] = sum(o != row["full"] for o in row["random"])
        out[m] = {"runs": len(have), "repeats": repeats, "relative_error_mean": sum(rel) / len(rel),
                  "relative_error_max": max(map(abs, rel)), "strided_relative_error_max": max(map(abs, rel_strided)),
                  "relative_bias": _relative_bias([rec["sizes"][m]["bias"] / rec["full"] for rec in have]),
                  "claims": per_claim}
    return out


def _relative_bias(per_run: list[float], confidence: float = 0.95) -> dict[str, float]:
    """The mean over runs of each run's relative bias (bias / full λ_max) with its t-interval over the runs."""
    n = len(per_run)
    mean = sum(per_run) / n
    if n < 2:
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "confidence": confidence}
    half = t_two_sided(confidence, n - 1) * math.sqrt(sum((x - mean) ** 2 for x in per_run) / (n - 1) / n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "confidence": confidence}


def section(study: dict[str, Any]) -> list[str]:
    """The report's markdown section for :func:`changes`' result."""
    lines = ["## Subset study", "",
             "λ_max of each usable run's final model, certified, on random subsets of the λ data (and on the strided "
             "subset, every (N // size)-th example) instead of the full data; every claim decided again with those "
             "values (each run's j-th random subset for draw j). A run whose sharpness is the maximum between "
             "iterates is compared on its final λ_max.", "",
             "| size | runs | relative bias, mean over runs [95% CI over runs] | largest absolute relative error, "
             "random / strided | claim | full-data verdict | random draws that change it | strided |",
             "|---|---|---|---|---|---|---|---|"]
    for m, s in study.items():
        b = s["relative_bias"]
        for claim, row in s["claims"].items():
            lines.append(f"| {m} | {s['runs']} | {100 * b['mean']:+.1f}% [{100 * b['lo']:+.1f}%, {100 * b['hi']:+.1f}%] | "
                         f"{100 * s['relative_error_max']:.1f}% / {100 * s['strided_relative_error_max']:.1f}% | "
                         f"{claim} | {row['full']} | {row['random_changed']}/{len(row['random'])} | "
                         f"{row.get('strided')} |")
    return lines + [""]
