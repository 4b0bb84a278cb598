"""The runner's command line: one name (fasthess-experiments, python -m fasthess_experiments), plain-text help,
every --set key described, and "did you mean" for a misspelt preset or key."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.__main__ import main
from experiments.config import DEFAULTS, HELP

ROOT = Path(__file__).resolve().parents[1]
MARKUP = ("``", ":mod:", ":func:", ":class:", ".. ")


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_help_is_plain_text_under_one_name(capsys):
    text = _help(["--help"], capsys)
    assert text.startswith("usage: fasthess-experiments ")
    assert "python -m fasthess_experiments" in text and "python -m experiments" not in text
    assert not [m for m in MARKUP if m in text], text


def test_run_help_lists_every_set_key_on_one_line(capsys):
    assert set(HELP) == set(DEFAULTS)
    text = _help(["run", "--help"], capsys)
    assert not [m for m in MARKUP if m in text], text
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and line.split()}
    for key in DEFAULTS:
        assert key in lines and HELP[key] in lines[key], key


@pytest.mark.parametrize("args,hint", [
    (["run", "finding1-quik"], "did you mean 'finding1-quick'?"),
    (["run", "finding1-quick", "--set", "lamda_tol=1e-3"], "did you mean 'lambda_tol'?"),
    (["run", "finding1-quick", "--set", "max_step=10"], "did you mean 'max_steps'?"),
])
def test_misspelt_preset_or_key_gets_did_you_mean(args, hint, capsys, tmp_path):
    assert main(args + ["--out", str(tmp_path / "s"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and hint in err and "Traceback" not in err


def test_no_guess_for_a_name_unlike_any_key(capsys, tmp_path):
    assert main(["run", "finding1-quick", "--set", "zzzz=1", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "unknown config keys ['zzzz']" in err and "did you mean" not in err


def test_python_m_fasthess_experiments_works_in_the_checkout_venv():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "fasthess_experiments", "list"], capture_output=True, text=True,
                         cwd=ROOT / "tests", env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("finding1-quick ")


def test_list_into_a_closed_pipe_is_not_an_error():
    shell = f"{sys.executable} -m fasthess_experiments list | head -n 1"
    out = subprocess.run(["bash", "-o", "pipefail", "-c", shell], capture_output=True, text=True, cwd=ROOT / "tests",
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("finding1-quick ") and "Traceback" not in out.stderr, out.stderr
