"""The README's example output is what the example prints (all but the timings)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMINGS = re.compile(r"seconds=[0-9.]+|[0-9.]+ ms|= [0-9]+ gradient-equivalents")


def _shown_output(readme: str, command: str) -> list[str]:
    """The lines of the README's text block that follow ``$ command``."""
    block = readme.split(f"$ {command}\n", 1)[1].split("```", 1)[0]
    return block.strip().splitlines()


def test_readme_example_output_is_real():
    command = ".venv/bin/python examples/digits_lambda_max.py"
    shown = _shown_output((ROOT / "README.md").read_text(encoding="utf-8"), command)
    run = subprocess.run([sys.executable, "examples/digits_lambda_max.py"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, check=True)
    printed = run.stdout.strip().splitlines()
    assert [TIMINGS.sub("…", line) for line in printed] == [TIMINGS.sub("…", line) for line in shown]
