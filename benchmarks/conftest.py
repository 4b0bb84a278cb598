"""Lets `pytest benchmarks --benchmark-only` collect the bench_*.py modules, with the repository root importable."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_collect_file(parent, file_path):
    # files named on the command line are collected by pytest itself; only add the bench_*.py found by recursion
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
