"""The sweep's figures (PNG), drawn from the usable runs only:

* ``effect.png``: test accuracy and λ_max against the varied hyperparameter, one column per batch size or
  setting; points are means over seeds with 95 % t-intervals (λ_max: geometric mean, interval on log λ);
* ``lambda_vs_test_acc.png``: λ_max against test accuracy, one small point per seed, a large one per mean;
* ``lambda_over_training.png``: λ_max during training, one line per seed, dashed 2/η per learning rate;
* ``geometry_over_training.png``: the tracker's geometry fields during training, one panel per field the runs
  logged (:data:`GEOMETRY`), one line per seed.
Titles state the claim; legends say what the error bars are."""
from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from pathlib import Path

from . import stats
from .verdicts import Evidence

AXES: dict[str, tuple[str, Callable[[dict], float], bool]] = {  # name: (label, value, log axis)
    "lr": ("learning rate η", lambda c: c["lr"], True),
    "rho": ("SAM ρ (0 = SGD)", lambda c: c["rho"] if c["optimizer"] in ("sam", "asam") else 0.0, False),
    "dropout": ("dropout p", lambda c: c["dropout"], False),
    "batch_size": ("batch size B (η/B fixed)", lambda c: c["batch_size"], True),
}
PANELS: dict[str, Callable[[dict], tuple[float, str]]] = {  # name: (sort key, label)
    "batch": lambda c: (math.inf, "full-batch GD") if c["optimizer"] == "gd" else (c["batch_size"], f"B={c['batch_size']}"),
    "batch_norm": lambda c: (float(c["batch_norm"]), "with BatchNorm" if c["batch_norm"] else "without BatchNorm"),
    "none": lambda c: (0.0, ""),
}


GEOMETRY: dict[str, str] = {  # metrics.jsonl field: axis label
    "gradient_fraction": "‖Vₖᵀg‖² / ‖g‖²  (gradient in the top-k eigenspace)",
    "top_overlap": "|⟨x₁(t), x₁(t')⟩|  (top eigenvector vs the previous update's)",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, xlabel: str, ylabel: str, legend_title: str, title: str, path: Path) -> Path:
    """Axis labels, a legend that says what the marks are, the claim as title; saved to ``path``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=6, loc="best", title=legend_title, title_fontsize=6)
    _title(fig, title)
    return _save(fig, path)


def _title(fig, title: str) -> None:
    width = fig.get_size_inches()[0]
    fig.suptitle("\n".join(textwrap.wrap(title, int(12 * width))), fontsize=9)


def effect_plot(ev: Evidence, x: str, panel: str, title: str, path: Path) -> Path | None:
    """Test accuracy (top row) and λ_max (bottom row) against ``x``, one column per ``panel`` value."""
    xlabel, xval, xlog = AXES[x]
    cols: dict[tuple[float, str], list] = {}
    for c in ev.configs:
        if c.runs:
            cols.setdefault(PANELS[panel](c.cfg), []).append(c)
    if not cols:
        return None
    plt = _plt()
    fig, axes = plt.subplots(2, len(cols), figsize=(max(6.5, 3.6 * len(cols) + 0.8), 6.2), squeeze=False, sharey="row")
    n_max = 0
    for j, (key, cs) in enumerate(sorted(cols.items())):
        cs = sorted(cs, key=lambda c: xval(c.cfg))
        xs = [xval(c.cfg) for c in cs]
        acc = [stats.summarize([100 * a for a in c.acc().values()]) for c in cs]
        lm = [stats.summarize_log(list(c.lam().values())) for c in cs]
        n_max = max([n_max] + [s.n for s in acc])
        for row, (ss, ylabel) in enumerate(((acc, "test accuracy (%)"), (lm, "λ_max"))):
            ax = axes[row][j]
            means = [s.mean for s in ss]
            err = [[s.mean - s.lo if s.n > 1 else 0 for s in ss], [s.hi - s.mean if s.n > 1 else 0 for s in ss]]
            ax.errorbar(xs, means, yerr=err, fmt="o-", capsize=3, color="C0" if row == 0 else "C3",
                        label="mean ± 95% CI over seeds (t)" if row == 0 else "geometric mean ± 95% CI (t on log λ)")
            if row == 1:
                ax.plot(xs, [2 / c.cfg["lr"] for c in cs], "k--", lw=0.8, label="2/η")
                ax.set_yscale("log")
            if xlog:
                ax.set_xscale("log")
                ax.minorticks_off()
            ax.set_xticks(xs, [f"{v:g}" for v in xs])
            ax.set_xlabel(xlabel)
            if j == 0:
                ax.set_ylabel(ylabel)
            if row == 0:
                ax.set_title(key[1], fontsize=9)
            ax.legend(fontsize=6, loc="best")
    _title(fig, f"{title}  (n ≤ {n_max} seeds per point)")
    return _save(fig, path)


def scatter_plot(ev: Evidence, label: Callable[[dict], str], title: str, path: Path) -> Path | None:
    """λ_max against test accuracy: per-seed points and per-configuration means."""
    cs = [c for c in ev.configs if c.runs]
    if not cs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for i, c in enumerate(cs):
        col = plt.get_cmap("tab10")(i % 10)
        acc, lm = c.acc(), c.lam()
        seeds = sorted(acc)
        ax.scatter([lm[s] for s in seeds], [100 * acc[s] for s in seeds], color=col, s=14, alpha=0.6)
        ax.scatter([math.exp(stats.summarize([math.log(lm[s]) for s in seeds]).mean)],
                   [100 * stats.summarize([acc[s] for s in seeds]).mean], color=col, s=70, marker="D",
                   edgecolor="k", label=f"{label(c.cfg)} (n={len(seeds)})")
    ax.set_xscale("log")
    return _finish(fig, ax, "λ_max (final; between iterates where computed)", "test accuracy (%)",
                   "small dots: one per seed; diamonds: means", title, path)


def _logged(ev: Evidence, key: str) -> bool:
    return any(m.get(key) is not None for c in ev.configs for r in c.runs.values() for m in r["metrics"])


def _lines(ax, ev: Evidence, label: Callable[[dict], str], key: str) -> list[tuple[dict, tuple]]:
    """The metric ``key`` over steps on ``ax``, one line per run (seed), colour per configuration; returns the
    (configuration, colour) of each configuration drawn."""
    cmap = _plt().get_cmap("tab10")
    drawn = []
    for i, c in enumerate(ev.configs):
        col = cmap(i % 10)
        first = True
        for _, r in sorted(c.runs.items()):
            pts = [(m["step"], m[key]) for m in r["metrics"] if m.get(key) is not None]
            if not pts:
                continue
            ax.plot(*zip(*pts), "-", color=col, lw=0.9, alpha=0.8, label=label(c.cfg) if first else None)
            first = False
        if not first:
            drawn.append((c.cfg, col))
    return drawn


def training_plot(ev: Evidence, label: Callable[[dict], str], title: str,
                  path: Path) -> Path | None:
    """λ_max over training, one line per run (seed), colour per configuration; dashed 2/η."""
    if not _logged(ev, "lambda_max"):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for cfg, col in _lines(ax, ev, label, "lambda_max"):
        ax.axhline(2.0 / cfg["lr"], color=col, ls="--", lw=0.8)
    ax.set_yscale("log")
    return _finish(fig, ax, "step", "λ_max   (dashed: 2/η)", "one line per seed", title, path)


def geometry_plot(ev: Evidence, label: Callable[[dict], str], title: str, path: Path) -> Path | None:
    """Each :data:`GEOMETRY` field the runs logged over training, one panel per field (both lie in [0, 1]), one
    line per run (seed), colour per configuration; None when no run logged any."""
    fields = [key for key in GEOMETRY if _logged(ev, key)]
    if not fields:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(fields), 1, figsize=(7, 3.2 * len(fields) + 0.8), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], fields):
        _lines(ax, ev, label, key)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(GEOMETRY[key], fontsize=8)
        ax.legend(fontsize=6, loc="best", title="one line per seed", title_fontsize=6)
    axes[-1, 0].set_xlabel("step")
    _title(fig, title)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path
