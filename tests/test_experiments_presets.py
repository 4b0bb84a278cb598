"""Presets are valid; verdicts follow the numbers; the command line runs a sweep and rebuilds its report."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from experiments.__main__ import main, parse_seeds, parse_set
from experiments.models import build_model
from experiments.presets import FINDINGS, get_preset, list_presets, paper_lambda_subset
from experiments.sweep import expand

SHAPES = {"digits": (1, 8, 8), "mnist1d": (1, 40), "synthetic": (20,), "cifar10": (3, 32, 32),
          "fashion_mnist": (1, 28, 28)}


def test_every_finding_has_a_quick_a_cpu_and_a_paper_preset():
    names = list_presets()
    for f in FINDINGS:
        assert {f"finding{f}-quick", f"finding{f}-cpu", f"finding{f}-paper"} <= set(names)


@pytest.mark.parametrize("name", list_presets())
def test_preset_is_valid(name):
    p = get_preset(name)
    runs = expand(p)
    tier = name.rsplit("-", 1)[1]
    assert len(p["seeds"]) == {"quick": 2, "cpu": 5, "paper": 3}[tier]
    assert len(runs) == len(p["grid"]) * len(p["seeds"]) >= 4
    assert len({n for n, _ in runs}) == len(runs)  # distinct run directories
    for _, cfg in runs:
        if tier in ("quick", "cpu"):
            assert cfg["dataset"] in ("digits", "mnist1d", "synthetic") and cfg["device"] == "cpu"
        else:
            assert cfg["dataset"] in ("cifar10", "fashion_mnist") and p["grid_note"]
            assert cfg["target_train_acc"] == 0.99
        if cfg["optimizer"] == "gd" and tier != "quick":
            assert cfg["stop_check_every"] == 1  # GD: the 99 % test after every step
        if cfg["between_iterates"]:
            assert cfg["batch_norm"] and cfg["lr"] <= 0.01  # the paper's use: BN networks at small η
    if tier == "cpu":
        assert all(c["data_kwargs"] == {"num_samples": 9000, "num_train": 4000} for _, c in runs)
    assert p["plot"]["x"] in ("lr", "rho", "dropout", "batch_size")
    assert {"acc_margin"} <= set(p["claims"])
    _, cfg = runs[-1]
    with torch.device("meta"):
        build_model(cfg["model"], SHAPES[cfg["dataset"]], 10, batch_norm=cfg["batch_norm"], dropout=cfg["dropout"],
                    hidden=cfg["hidden"], channels=cfg["channels"], width=cfg["width"])


def test_seeds_are_an_axis_and_overridable():
    p = get_preset("finding4-quick")
    runs = expand(p, seeds=[10, 11, 12])
    assert len(runs) == 3 * len(p["grid"])
    assert {c["init_seed"] for _, c in runs} == {10, 11, 12} and all(c["init_seed"] == c["data_seed"] for _, c in runs)
    assert runs[0][0] == "p=0_seed=10"
    with pytest.raises(ValueError, match="distinct"):
        expand(p, seeds=[1, 1])
    with pytest.raises(ValueError, match="empty"):
        expand(p, seeds=[])


def test_paper_lambda_subset_is_one_flag():
    assert paper_lambda_subset(get_preset("finding1-paper")) == {"lambda_stride": 50}  # 50000 / 50 = 1000
    assert paper_lambda_subset(get_preset("finding4-paper")) == {"lambda_stride": 60}  # 60000 / 60 = 1000
    with pytest.raises(ValueError, match="no paper"):
        paper_lambda_subset(get_preset("finding1-cpu"))


def test_unknown_keys_and_presets_are_errors():
    with pytest.raises(ValueError, match="unknown config keys"):
        expand(get_preset("finding1-quick"), {"learning_rate": 0.1})
    with pytest.raises(KeyError):
        get_preset("finding9-quick")
    assert parse_set(["lr=0.1", "hidden=[4,4]", "batch_norm=true", "dataset=digits"]) == {
        "lr": 0.1, "hidden": [4, 4], "batch_norm": True, "dataset": "digits"}
    assert parse_seeds("10,11, 12") == [10, 11, 12] and parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds(None) is None
    for bad in ("", "a", "1,,2", "3-1", "1.5"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


@pytest.mark.parametrize("args,message", [
    (["report", "/nonexistent/sweep"], "does not exist"),
    (["run", "finding1-paper", "--no-progress"], "no usable CUDA"),
    (["run", "finding1-quick", "--set", "device=cuda", "--no-progress"], "no usable CUDA"),
    (["run", "finding1-quick", "--seeds", "1,x"], "--seeds"),
    (["run", "finding1-quick", "--jobs", "0"], "--jobs"),
    (["run", "finding1-quick", "--set", "lr=abc"], "lr must be"),
    (["run", "finding1-quick", "--set", "nokey"], "key=value"),
    (["run", "finding1-quick", "--paper-lambda-subset"], "no paper"),
    (["run", "finding9-quick"], "unknown preset"),
])
def test_cli_user_errors_are_a_message_and_status_2(args, message, capsys, tmp_path):
    if "CUDA" in message:
        pytest.importorskip("torch")
        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    if args[0] == "run":
        args = args + ["--out", str(tmp_path / "s")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_cli_list_run_report(tmp_path, capsys):
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "finding1-quick" in listing and "finding4-cpu" in listing and "measured wall time" in listing
    assert "is not stated" in listing  # the paper presets say where the paper's grids are unknown
    out = tmp_path / "sweep"
    args = ["run", "finding4-quick", "--out", str(out), "--no-progress", "--set", "max_steps=200",
            "--set", "train_subset=200", "--set", "lambda_tol=1e-2", "--set", "hidden=[16,16]",
            "--set", "target_train_acc=0.3", "--set", 'track_extra=["gradient_fraction"]', "--seeds", "3,4"]
    assert main(args) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 6 and {r["seed"] for r in rows} == {"3", "4"}
    for r in rows:
        d = out / r["name"]
        assert {"config.json", "metrics.jsonl", "summary.json", "checkpoint.pt"} <= {p.name for p in d.iterdir()}
        s = json.loads((d / "summary.json").read_text())
        assert {"train_acc", "test_acc", "train_loss", "lambda_max", "lambda_converged", "steps", "epochs",
                "status", "test_correct", "config", "environment"} <= set(s)
        assert len(s["test_correct"]) == 1000 and set(s["test_correct"]) <= {"0", "1"}
        assert s["test_correct"].count("1") == round(s["test_acc"] * 1000)
        env = json.loads((d / "config.json").read_text())["environment"]
        assert env["torch"] == torch.__version__ and env["python"] and env["fasthess"] and env["device"] == "cpu"
        assert env["git"] is None or len(env["git"]["commit"]) == 40
    verdicts = json.loads((out / "verdicts.json").read_text())
    assert verdicts["seeds"] == [3, 4] and len(verdicts["claims"]) == 2
    for v in verdicts["claims"]:
        assert v["outcome"] in ("reproduced", "contradicted", "inconclusive") and v["claim"]
    text = (out / "report.md").read_text()
    assert "## Verdicts" in text and "Finding 4:" in text and "## Statistics" in text
    if any(not r["excluded"] for r in rows):
        assert (out / "effect.png").stat().st_size > 1000
        assert (out / "lambda_vs_test_acc.png").stat().st_size > 1000
        assert (out / "geometry_over_training.png").stat().st_size > 1000  # gradient_fraction over training
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").is_file()
    # rerun: everything skipped
    assert main(args) == 0
    assert "done already" in capsys.readouterr().out
    # a different config into the same run directories is refused
    assert main(args[:-4] + ["--set", "hidden=[8]", "--seeds", "3,4"]) == 2
