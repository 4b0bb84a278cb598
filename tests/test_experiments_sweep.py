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
