"""The progress display of long solves (fasthess._progress) and the tracker's per-update line."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fasthess import _progress
from fasthess._progress import EXPLORING, SolveProgress, passes_left
from fasthess.track import SharpnessTracker


def test_passes_left_follows_the_recent_geometric_rate():
    assert passes_left([(1, 1e-1), (2, 1e-2), (3, 1e-3)], 1e-6) == 3  # a decade per pass, three decades to go
    assert passes_left([(1, 1e-1), (3, 1e-2)], 1e-4) == 4  # half a decade per pass
    # the rate of the last three passes (log10(4)/2 a pass), not of all five (0.65): 2.4 decades to go
    assert passes_left([(1, 1.0), (2, 1e-1), (3, 1e-2), (4, 1e-2 / 2), (5, 1e-2 / 4)], 1e-5) == 8
    assert passes_left([(1, 1e-2), (2, 1e-2)], 1e-4) is None  # not falling: unknown
    assert passes_left([(1, 1e-2), (2, 3e-2)], 1e-4) is None
    assert passes_left([(1, 1e-2)], 1e-4) is None  # one pass gives no rate
    assert passes_left([], 1e-4) is None
    assert passes_left([(1, 1e-2), (2, 5e-5)], 1e-4) == 0


def _plain(monkeypatch):
    monkeypatch.setattr(_progress, "_tqdm_class", lambda: None)


def test_plain_writer_one_line_per_pass(monkeypatch, capsys):
    _plain(monkeypatch)
    bar = SolveProgress(True, "fasthess.eigs", 1e-4, 50)
    bar.step(1, 0.3, 8, exploring=True)
    bar.step(2, 1e-2, 16, exploring=False)
    bar.step(3, 1e-3, 24, exploring=False)
    bar.step(4, 1e-3, 32, exploring=False)
    bar.close(converged=False)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        f"fasthess.eigs: pass 1/50, bound 3.0e-01 of λ, target 1e-04, 8 HVPs, {EXPLORING}",
        ("fasthess.eigs: pass 2/50, bound 1.0e-02 of λ, target 1e-04, 16 HVPs, passes left: unknown (no "
         "steady decrease of the bound yet)"),
        "fasthess.eigs: pass 3/50, bound 1.0e-03 of λ, target 1e-04, 24 HVPs, about 1 pass left",
        "fasthess.eigs: pass 4/50, bound 1.0e-03 of λ, target 1e-04, 32 HVPs, about 2 passes left",
        lines[-1]]
    assert lines[-1].startswith("fasthess.eigs: not certified after 4 passes, 32 HVPs, bound 1.0e-03 of λ, target "
                                "1e-04, ")


def test_estimate_beyond_the_budget_and_target_met(monkeypatch, capsys):
    _plain(monkeypatch)
    bar = SolveProgress(True, "solve", 1e-8, 4)
    bar.step(1, 1e-1, 1, exploring=False)
    bar.step(2, 1e-2, 2, exploring=False)
    bar.step(3, float("inf"), 3, exploring=False)  # no bound: does not enter the rate
    bar.step(4, 1e-9, 4, exploring=False)
    err = capsys.readouterr().err
    assert "more passes needed than the 2 left in the budget" in err and "no bound yet (target 1e-08 of λ)" in err
    assert "target met; a further pass confirms it" in err


def test_tqdm_bar_on_stderr_when_forced(capsys):
    pytest.importorskip("tqdm")
    bar = SolveProgress(True, "fasthess.eigs", 1e-4, 20)
    bar.step(1, 1e-2, 4, exploring=False)
    bar.step(2, 1e-3, 8, exploring=False)
    bar.close(converged=True)
    out = capsys.readouterr()
    assert out.out == ""
    assert "pass 2/20" in out.err and "bound 1.0e-03 of λ, target 1e-04, 8 HVPs, about 1 pass left" in out.err
    assert "fasthess.eigs: certified after 2 passes, 8 HVPs" in out.err


def test_silent_unless_asked_or_on_a_terminal(monkeypatch, capsys):
    for enabled in (False, None):  # pytest's captured stderr is not a terminal
        bar = SolveProgress(enabled, "solve", 1e-4, 10)
        bar.step(1, 1e-2, 4, exploring=False)
        bar.close(converged=True)
    assert capsys.readouterr().err == ""

    class Terminal:
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stderr", Terminal())
    assert _progress.wanted(None) and not _progress.wanted(False)
    monkeypatch.setattr("sys.stderr", None)  # pythonw: no stderr at all
    assert not _progress.wanted(None)


def test_tracker_writes_one_line_per_update(monkeypatch, capsys):
    _plain(monkeypatch)
    torch.manual_seed(0)
    X, y = torch.randn(32, 3, dtype=torch.float64), torch.randint(0, 2, (32,))
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    tracker = SharpnessTracker(F.cross_entropy, (X, y), tol=1e-6, lr=0.5, progress=True)
    rec = tracker.update(model, step=7)
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith(f"SharpnessTracker at step 7: λ_max {rec.lambda_max:.6g} certified (bound ")
    assert "target 1e-06), threshold 4 (gd: 2/lr), " in line and f"{rec.num_hvps} HVPs" in line
    SharpnessTracker(F.cross_entropy, (X, y), tol=1e-6).update(model, step=7)  # progress off by default
    assert capsys.readouterr().err == ""


def test_eigs_shows_its_passes_and_the_certificate(monkeypatch, capsys):
    """eigs(progress=True) writes one plain line per pass (tqdm absent) and a closing line naming the outcome."""
    import torch

    import fasthess
    from fasthess import _progress

    monkeypatch.setattr(_progress, "_tqdm_class", lambda: None)
    op = fasthess.linop.MatrixOperator(torch.diag(torch.linspace(1, 2, 50, dtype=torch.float64)))
    res = fasthess.eigs(op, k=1, tol=1e-6, progress=True)
    err = capsys.readouterr().err
    assert "fasthess.eigs: pass 1/1000, " in err
    assert f"certified after {res.num_passes} passes" in err
