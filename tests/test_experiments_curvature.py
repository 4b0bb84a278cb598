"""The runner logs the extra curvature measures (trace, GGN λ_max, minibatch sharpness) when asked."""
from __future__ import annotations

import json
import math

import pytest

from experiments.curvature import MEASURES
from experiments.config import resolve_config
from experiments.train import Trainer

TINY = {"dataset": "synthetic", "model": "mlp", "hidden": [16], "batch_size": 32, "lr": 0.1, "max_steps": 20,
        "train_subset": 128, "test_subset": 64, "track_every_evals": 1, "eval_every_epochs": 1,
        "lambda_tol": 1e-6}


def test_extra_measures_are_logged_and_consistent(tmp_path):
    cfg = resolve_config({**TINY, "track_extra": sorted(MEASURES)})
    summary = Trainer(cfg).run(tmp_path / "run")
    assert summary["status"] in ("completed", "max_steps")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    tracked = [r for r in records if "lambda_max" in r]
    assert tracked
    for r in tracked:
        for name in MEASURES:
            assert math.isfinite(r[name])
        # the GGN of a convex loss is PSD and λ_max(H_B) ≥ the curvature along g_B, batch by batch
        assert r["ggn_lambda_max"] > 0
        assert r["minibatch_lambda_max"] >= r["batch_sharpness"] - 1e-9
        assert r["trace"] > 0
        assert 0 <= r["gradient_fraction"] <= 1 + 1e-12


@pytest.mark.parametrize("bad", [["hessian_norm"], "trace", [3]])
def test_unknown_measures_are_refused(bad):
    with pytest.raises(ValueError, match="track_extra"):
        resolve_config({**TINY, "track_extra": bad})
