"""The embedded data sets (experiments/*.npz) equal their sources, and the runner loads them without the
packages that made them (so `make demo` installs neither scikit-learn nor mnist1d)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import data as D

ROOT = Path(__file__).resolve().parents[1]


def test_embedded_digits_equal_scikit_learns() -> None:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    d = sklearn_datasets.load_digits()
    Xtr, ytr, Xte, yte = D.read_digits()
    np.testing.assert_array_equal(np.concatenate([Xtr, Xte])[:, 0], d.images.astype(np.float32))
    np.testing.assert_array_equal(np.concatenate([ytr, yte]), d.target)
    assert (len(Xtr), len(Xte)) == (1297, 500) and ytr.dtype == np.int64


def test_embedded_mnist1d_equals_the_generated_one() -> None:
    pytest.importorskip("mnist1d")
    X, y = D.generate_mnist1d(**D.MNIST1D_EMBEDDED)
    Xtr, ytr, Xte, yte = D.read_mnist1d()
    np.testing.assert_array_equal(np.concatenate([Xtr, Xte]), X)
    np.testing.assert_array_equal(np.concatenate([ytr, yte]), y)
    assert (len(Xtr), len(Xte)) == (4000, 1000) and Xtr.dtype == np.float32 and ytr.dtype == np.int64


def test_the_runner_loads_embedded_data_without_the_generating_packages() -> None:
    blocked = ("sklearn", "mnist1d", "scipy", "matplotlib", "requests")
    code = (f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
            "from experiments import data as D\n"
            "assert D.load_dataset('digits').meta == {'n_train': 1297, 'n_test': 500}\n"
            "assert D.load_dataset('mnist1d', train_subset=1000).meta == {'n_train': 1000, 'n_test': 1000}\n"
            "try:\n    D.load_dataset('mnist1d', num_samples=9000)\nexcept D.DataError as e:\n    print(e)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "num_samples=9000" in out.stdout and "pip install mnist1d" in out.stdout
