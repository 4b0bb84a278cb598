"""A run killed with SIGKILL resumes from its last checkpoint and ends bit-identical to an uninterrupted run;
a rerun skips finished runs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CFG = dict(dataset="synthetic", data_kwargs={"n_train": 200, "n_test": 50, "dim": 6, "num_classes": 3},
           model="mlp", hidden=[16], dropout=0.1, optimizer="sgd", momentum=0.5, lr=0.05, batch_size=20,
           max_steps=160, target_train_acc=1.01, track_every_evals=1, lambda_tol=1e-6)
SCRIPT = "import json,sys; from experiments.sweep import run_one; run_one(json.loads(sys.argv[1]), sys.argv[2])"


def _start(run_dir, delay="0"):
    env = dict(os.environ, FASTHESS_EXP_STEP_DELAY=delay, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps(CFG), str(run_dir)], cwd=ROOT, env=env)


def _strip(rec):
    return {k: v for k, v in rec.items() if k not in ("lambda_seconds", "wall_seconds", "environment")}


def _results(d):
    metrics = [_strip(json.loads(x)) for x in (d / "metrics.jsonl").read_text().splitlines()]
    summary = _strip(json.loads((d / "summary.json").read_text()))
    return metrics, summary, torch.load(d / "final_model.pt")


def test_sigkill_then_resume_is_identical(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    p_ref = _start(ref)
    p = _start(killed, delay="0.03")  # 160 steps ≥ 4.8 s
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for a checkpoint with at least 2 evaluations (and λ_max warm starts)
        m = killed / "metrics.jsonl"
        if (killed / "checkpoint.pt").is_file() and m.is_file() and len(m.read_text().splitlines()) >= 2:
            break
        assert p.poll() is None, "the run finished before it could be killed; raise the delay"
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (killed / "summary.json").exists()
    n_before = len((killed / "metrics.jsonl").read_text().splitlines())
    assert n_before < 8  # really interrupted mid-run (8 evaluations in all)
    assert _start(killed).wait(timeout=300) == 0
    assert p_ref.wait(timeout=300) == 0
    m1, s1, w1 = _results(ref)
    m2, s2, w2 = _results(killed)
    assert s1 == s2 and s1["status"] == "max_steps" and s1["steps"] == 160
    assert m1 == m2
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    # a rerun skips the finished run (summary untouched)
    stamp = (killed / "summary.json").stat().st_mtime_ns
    assert _start(killed).wait(timeout=300) == 0
    assert (killed / "summary.json").stat().st_mtime_ns == stamp
    assert not list(killed.glob("*.tmp*"))  # atomic writes leave no temporaries
