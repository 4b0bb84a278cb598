"""Presets are valid; verdicts follow the numbers; the command line runs a sweep and rebuilds its report."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from experiments.__main__ import main, parse_set
from experiments.models import build_model
from experiments.presets import FINDINGS, get_preset, list_presets
from experiments.report import verdicts
from experiments.sweep import expand

SHAPES = {"digits": (1, 8, 8), "mnist1d": (1, 40), "synthetic": (20,), "cifar10": (3, 32, 32),
          "fashion_mnist": (1, 28, 28)}


def test_every_finding_has_a_quick_and_a_paper_preset():
    names = list_presets()
    for f in FINDINGS:
        assert f"finding{f}-quick" in names and f"finding{f}-paper" in names


@pytest.mark.parametrize("name", list_presets())
def test_preset_is_valid(name):
    p = get_preset(name)
    runs = expand(p)
    assert len(runs) == len(p["grid"]) >= 2
    assert len({n for n, _ in runs}) == len(runs)  # distinct run directories
    for _, cfg in runs:
        if name.endswith("-quick"):
            assert cfg["dataset"] in ("digits", "mnist1d", "synthetic") and cfg["device"] == "cpu"
        else:
            assert cfg["dataset"] in ("cifar10", "fashion_mnist")
            assert cfg["target_train_acc"] == 0.99
    _, cfg = runs[-1]
    with torch.device("meta"):
        build_model(cfg["model"], SHAPES[cfg["dataset"]], 10, batch_norm=cfg["batch_norm"], dropout=cfg["dropout"],
                    hidden=cfg["hidden"], channels=cfg["channels"], width=cfg["width"])


def test_unknown_keys_and_presets_are_errors():
    with pytest.raises(ValueError, match="unknown config keys"):
        expand(get_preset("finding1-quick"), {"learning_rate": 0.1})
    with pytest.raises(KeyError):
        get_preset("finding9-quick")
    assert parse_set(["lr=0.1", "hidden=[4,4]", "batch_norm=true", "dataset=digits"]) == {
        "lr": 0.1, "hidden": [4, 4], "batch_norm": True, "dataset": "digits"}


def _run(cfg, **s):
    return {"name": "x", "cfg": cfg, "metrics": [], "summary": dict(dict(status="completed", test_acc=0.9,
                                                                         lambda_max=1.0, batch_size=cfg.get("batch_size")), **s)}


def test_verdicts_follow_the_numbers():
    # finding 4: high dropout lowers λ_max and hurts accuracy
    runs = [_run({"dropout": 0.0}, lambda_max=10.0, test_acc=0.80), _run({"dropout": 0.5}, lambda_max=5.0, test_acc=0.85),
            _run({"dropout": 0.7}, lambda_max=2.0, test_acc=0.70)]
    assert [ok for _, ok, _ in verdicts(4, runs, {"acc_tol": 0.01})] == [True, True]
    runs[2]["summary"]["test_acc"] = 0.9
    assert [ok for _, ok, _ in verdicts(4, runs, {"acc_tol": 0.01})] == [True, False]
    # finding 5: BN better, λ_max not consistently lower
    bn = [_run({"lr": lr, "batch_norm": b}, test_acc=a, lambda_max=l)
          for lr, b, a, l in [(0.1, True, 0.9, 5.0), (0.1, False, 0.8, 3.0), (0.2, True, 0.9, 1.0), (0.2, False, 0.85, 2.0)]]
    assert [ok for _, ok, _ in verdicts(5, bn)] == [True, True]
    # diverged runs are left out
    runs.append(_run({"dropout": 0.9}, status="diverged", lambda_max=None))
    assert len(verdicts(4, runs)) == 2


def test_cli_list_run_report(tmp_path, capsys):
    assert main(["list"]) == 0
    assert "finding1-quick" in capsys.readouterr().out
    out = tmp_path / "sweep"
    args = ["run", "finding4-quick", "--out", str(out), "--no-progress", "--set", "max_steps=30",
            "--set", "train_subset=200", "--set", "lambda_tol=1e-2", "--set", "hidden=[16,16]"]
    assert main(args) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4 and all(r["status"] == "max_steps" for r in rows)
    for r in rows:
        d = out / r["name"]
        assert {"config.json", "metrics.jsonl", "summary.json", "checkpoint.pt"} <= {p.name for p in d.iterdir()}
        s = json.loads((d / "summary.json").read_text())
        assert {"train_acc", "test_acc", "train_loss", "lambda_max", "steps", "epochs", "status"} <= set(s)
    assert (out / "lambda_vs_test_acc.png").stat().st_size > 1000
    assert (out / "lambda_over_training.png").stat().st_size > 1000
    text = (out / "report.md").read_text()
    assert "Verdicts" in text and "Finding 4 reproduced" in text
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").is_file()
    # rerun: everything skipped
    assert main(args) == 0
    assert "done already" in capsys.readouterr().out
    # a different config into the same run directories is refused
    assert main(args[:-2] + ["--set", "hidden=[8]"]) == 2
