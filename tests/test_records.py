"""SharpnessRecord: the tracker's typed record, its JSON dict, old dict histories, and the deprecated dict reads."""
from __future__ import annotations

import dataclasses
import io
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import dense_hessian
from fasthess import FasthessError
from fasthess.integrations import record_scalars, record_text
from fasthess.records import SharpnessRecord
from fasthess.track import SharpnessTracker

# a record as the first tracker release saved it (before basis, certificates, thresholds and subsets)
OLD_RECORD = {"step": 0, "lambda_max": 2.5, "eigenvalues": [2.5], "residual": 1e-9, "error_bound": 1e-12,
              "converged": True, "num_hvps": 12, "num_passes": 4, "seconds": 0.25, "warm_started": False,
              "lr": 0.1, "two_over_lr": 20.0}


def _problem():
    torch.manual_seed(0)
    X, y = torch.randn(48, 4, dtype=torch.float64), torch.randint(0, 3, (48,))
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    return model, X, y


def _dense_top(model, X, y) -> float:
    H = dense_hessian(model, F.cross_entropy, X, y, batch_size=len(X))
    return float(torch.linalg.eigvalsh(H)[-1])


def test_tracker_records_are_typed_frozen_and_certified_against_the_dense_hessian():
    model, X, y = _problem()
    tracker = SharpnessTracker(F.cross_entropy, (X, y), tol=1e-8, lr=0.1)
    rec = tracker.update(model, step=3, epoch=1)
    assert isinstance(rec, SharpnessRecord) and tracker.latest is rec and tracker.history == [rec]
    assert rec.converged and abs(rec.lambda_max - _dense_top(model, X, y)) <= rec.error_bound + 1e-12
    assert rec.eigenvalues[0] == rec.lambda_max and rec.extra == {"epoch": 1} and rec.threshold == pytest.approx(20)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.lambda_max = 0.0
    flat = rec.to_dict()
    assert json.loads(json.dumps(flat)) == flat  # a JSON sink writes it as it is
    assert flat["epoch"] == 1 and flat["eigenvalues"] == list(rec.eigenvalues)
    assert SharpnessRecord.from_dict(flat) == rec


def test_extra_values_named_like_a_field_are_refused_before_any_product():
    model, X, y = _problem()
    tracker = SharpnessTracker(F.cross_entropy, (X, y), loggers=[pytest.fail])
    with pytest.raises(FasthessError, match=r"\['lambda_max'\] have the names of record fields"):
        tracker.update(model, step=0, lambda_max=1.0)
    assert tracker.history == [] and tracker.eigenvectors is None


def test_old_dict_histories_load_and_checkpoints_stay_plain():
    model, X, y = _problem()
    tracker = SharpnessTracker(F.cross_entropy, (X, y), tol=1e-8)
    tracker.load_state_dict({"history": [OLD_RECORD], "vectors": None})
    old = tracker.latest
    assert old.lambda_max == 2.5 and old.eigenvalues == (2.5,) and old.hvp_equivalents == 12.0
    assert old.basis is None and old.precision is None and old.extra == {"two_over_lr": 20.0}
    new = tracker.update(model, step=5)
    assert new.steps_since == 5 and len(tracker.history) == 2
    buf = io.BytesIO()
    torch.save(tracker.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # records are saved as plain dicts, which weights_only reads
    restored = SharpnessTracker(F.cross_entropy, (X, y), tol=1e-8)
    restored.load_state_dict(state)
    assert restored.history == tracker.history and state["history"][0] == old.to_dict()
    with pytest.raises(FasthessError, match=r"lacks \['converged'"):
        SharpnessRecord.from_dict({k: v for k, v in OLD_RECORD.items() if k != "converged"})


def test_dict_reads_still_work_and_warn():
    rec = SharpnessRecord.from_dict(OLD_RECORD)
    with pytest.warns(FutureWarning, match="record.lambda_max"):
        assert rec["lambda_max"] == 2.5
    with pytest.warns(FutureWarning):
        assert rec.get("threshold") is None and rec.get("missing", 7) == 7
    with pytest.warns(FutureWarning):
        assert "two_over_lr" in rec and "missing" not in rec
    with pytest.warns(FutureWarning):
        assert dict(rec) == rec.to_dict() and rec["eigenvalues"] == [2.5]
    with pytest.raises(KeyError), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        rec["missing"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the typed reads never warn
        assert rec.lambda_max == 2.5 and rec.extra["two_over_lr"] == 20.0 and len(rec) == len(rec.to_dict())


def test_sink_helpers_read_records_and_old_dicts_alike():
    rec = SharpnessRecord.from_dict({**OLD_RECORD, "eigenvalues": [2.5, 1.0], "threshold": 20.0,
                                     "basis": "explored on the full data at this update"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scalars = record_scalars(rec, "s/")
        assert record_scalars(rec.to_dict(), "s/") == scalars
        assert record_text(rec.to_dict(), "s/") == record_text(rec, "s/") == {"s/basis": rec.basis}
    assert scalars == {"s/lambda_max": 2.5, "s/residual": 1e-9, "s/num_hvps": 12.0, "s/hvp_equivalents": 12.0,
                       "s/threshold": 20.0, "s/lambda_2": 1.0}
