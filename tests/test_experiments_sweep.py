"""Seeds as a sweep axis and parallel jobs: a tiny preset with 2 seeds run with 2 worker processes equals the
same runs made one by one; a 2-job sweep killed with SIGKILL (workers die with it) resumes to the same results."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import experiments.presets as presets
from experiments.storage import RunLockedError, run_lock
from experiments.sweep import expand, run_one, run_sweep
from test_runner_faults import _run_results, _same

ROOT = Path(__file__).resolve().parents[1]
TINY = {"finding": 4, "description": "tiny seeded sweep", "claims": {"acc_margin": 0.05}, "vary": ["dropout"],
        "plot": {"x": "dropout", "panel": "none"}, "seeds": [0, 1],
        "base": {"dataset": "synthetic", "data_kwargs": {"n_train": 120, "n_test": 60, "dim": 6, "num_classes": 3},
                 "model": "mlp", "hidden": [12], "momentum": 0.5, "batch_size": 20, "lr": 0.1, "max_steps": 48,
                 "target_train_acc": 1.01, "track_every_evals": 2, "lambda_tol": 1e-6},
        "grid": [{"dropout": 0.0}, {"dropout": 0.3}]}
NAMES = ["p=0_seed=0", "p=0_seed=1", "p=0.3_seed=0", "p=0.3_seed=1"]


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """The reference: every run made one by one with run_one, each in its own directory."""
    out = tmp_path_factory.mktemp("serial")
    runs = expand(TINY)
    assert [n for n, _ in runs] == NAMES
    for name, cfg in runs:
        run_one(cfg, out / name)
    return {n: _run_results(out / n) for n in NAMES}


def _check(out: Path, ref) -> None:
    for n in NAMES:
        got = _run_results(out / n)
        _same(ref[n][1], got[1], where=f"{n} summary")
        _same(ref[n][0], got[0], where=f"{n} metrics")
        _same(ref[n][2], got[2], where=f"{n} weights")


def test_two_seeds_two_jobs_equal_the_runs_made_one_by_one(tmp_path, serial, monkeypatch, capsys):
    monkeypatch.setitem(presets._PRESETS, "tiny", TINY)
    out = run_sweep("tiny", tmp_path / "sweep", progress=False, jobs=2)
    _check(out, serial)
    seeds = {json.loads((out / n / "config.json").read_text())["init_seed"] for n in NAMES}
    assert seeds == {0, 1}
    v = json.loads((out / "verdicts.json").read_text())
    assert v["seeds"] == [0, 1] and len(v["claims"]) == 2
    assert "(2 jobs)" in capsys.readouterr().out
    # the seeds differ: different weights
    assert serial["p=0_seed=0"][2] != serial["p=0_seed=1"][2]


SCRIPT = r"""
import json, sys
import experiments.presets as P
P._PRESETS["tiny"] = json.loads(sys.argv[1])
from experiments.sweep import run_sweep
run_sweep("tiny", sys.argv[2], progress=False, jobs=2)
"""


def _start(out, log, **env):
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env)
    return subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps(TINY), str(out)], cwd=ROOT, env=e,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def test_sigkill_of_a_two_job_sweep_then_resume_is_identical(tmp_path, serial):
    out = tmp_path / "sweep"
    p = _start(out, tmp_path / "log1", FASTHESS_EXP_STEP_DELAY="0.05")  # 48 steps ≥ 2.4 s per run
    deadline = time.time() + 180
    while time.time() < deadline:  # both workers have checkpointed a run mid-way
        ck = [n for n in NAMES if (out / n / "checkpoint.pt").is_file()]
        if len(ck) >= 2:
            break
        assert p.poll() is None, (tmp_path / "log1").read_text()
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert sum((out / n / "summary.json").is_file() for n in NAMES) < len(NAMES)  # really interrupted
    deadline = time.time() + 20  # the workers notice their parent is gone and exit: every lock comes free
    for n in NAMES:
        while True:
            try:
                with run_lock(out / n, wait=False):
                    break
            except RunLockedError:
                assert time.time() < deadline, f"a worker of the killed sweep still holds {n}"
                time.sleep(0.1)
    p = _start(out, tmp_path / "log2")
    assert p.wait(timeout=300) == 0, (tmp_path / "log2").read_text()
    _check(out, serial)


FINISHING = {**TINY, "base": {**TINY["base"], "target_train_acc": 0.5, "max_steps": 400}}  # runs that finish


def test_subset_study_reports_per_claim_changes(tmp_path, monkeypatch):
    """--subset-study measures every usable run's final model on subsets (each value against a fresh certified solve
    on the same rows), and the report decides the λ claim again on each draw."""
    import torch
    import fasthess
    from experiments.__main__ import main
    from experiments.subset_study import FILE, _with_subset_lambda, changes
    from experiments.train import Trainer
    from experiments.verdicts import decide, usable

    monkeypatch.setitem(presets._PRESETS, "tiny", FINISHING)
    out = tmp_path / "sweep"
    assert main(["run", "tiny", "--out", str(out), "--no-progress", "--subset-study", "30,500"]) == 0
    verdicts = json.loads((out / "verdicts.json").read_text())
    assert set(verdicts["subset_study"]) == {"30"}  # 500 is not below the 120 λ examples: skipped
    study = verdicts["subset_study"]["30"]
    lam_claim = next(c["claim"] for c in verdicts["claims"] if "λ" in c["claim"])
    row = study["claims"][lam_claim]
    assert len(row["random"]) == 8 and row["full"] == next(c["outcome"] for c in verdicts["claims"]
                                                            if c["claim"] == lam_claim)
    assert row["random_changed"] == sum(o != row["full"] for o in row["random"])
    assert "## Subset study" in (out / "report.md").read_text()

    # one run's record against an independent solve on the subset it names (strided: every 4th of 120)
    name = NAMES[0]
    rec = json.loads((out / name / FILE).read_text())
    trainer = Trainer(json.loads((out / name / "summary.json").read_text())["config"], distributed=False)
    trainer.model.load_state_dict(torch.load(out / name / "final_model.pt"))
    t = trainer.tracker
    X, y = t.data
    with fasthess.sharpness_mode(trainer.model, t.mode, t.disable_dropout):
        full = fasthess.lambda_max(trainer.model, t.loss_fn, (X, y), batch_size=t.batch_size, tol=1e-6)
        strided = fasthess.lambda_max(trainer.model, t.loss_fn, (X[::4][:30], y[::4][:30]), batch_size=t.batch_size,
                                      tol=1e-6)
    assert rec["full"] == pytest.approx(float(full.eigenvalues[0]), rel=1e-5)
    assert rec["sizes"]["30"]["strided"] == pytest.approx(float(strided.eigenvalues[0]), rel=1e-5)

    # a draw whose values are the full-data ones changes no verdict; one that reverses the λ ordering does
    from experiments.config import config_name
    from experiments.report import load_runs
    from experiments.subset_study import load

    runs = load_runs(out)
    load(out, runs)
    name_of = lambda cfg: config_name(cfg, FINISHING["vary"])  # noqa: E731
    full_outcomes = {v.claim: v.outcome for v in decide(4, usable(runs, name_of)[0], FINISHING["claims"])}
    for r in runs:
        r["subset"]["sizes"]["30"]["values"] = [r["subset"]["full"]] * 8
    same = changes(runs, 4, FINISHING["claims"], name_of, full_outcomes)["30"]["claims"]
    assert all(row["random_changed"] == 0 for row in same.values())
    for r in runs:  # λ_max of dropout 0.3 made 100× that of dropout 0: "high dropout lowers λ_max" is contradicted
        r["subset"]["sizes"]["30"]["values"] = [r["subset"]["full"] * (100 if r["cfg"]["dropout"] else 1)] * 8
    flipped = changes(runs, 4, FINISHING["claims"], name_of, full_outcomes)["30"]["claims"][lam_claim]
    assert flipped["random"] == ["contradicted"] * 8
    assert flipped["random_changed"] == (8 if full_outcomes[lam_claim] != "contradicted" else 0)
    assert len(_with_subset_lambda(runs, "30", 0)) == len(runs)


@pytest.mark.parametrize("text", ["", "x", "1000,abc", "1", "0,100"])
def test_subset_study_sizes_are_checked_before_any_run(text, tmp_path, capsys):
    from experiments.__main__ import main

    assert main(["run", "finding2-quick", "--out", str(tmp_path / "s"), "--subset-study", text]) == 2
    assert "--subset-study expects comma-separated subset sizes" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
