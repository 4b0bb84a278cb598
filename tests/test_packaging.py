"""The installed package: its metadata, its public surface, and the warning for a broken native extension.

These tests run against whatever ``import fasthess`` finds: the checkout in ``make test``, the installed wheel
in ``.ci/package_check.sh``.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fasthess
from fasthess import _ext

PACKAGE = Path(fasthess.__file__).parent
SOURCE = Path(__file__).resolve().parents[1]  # the checkout, or the unpacked sdist in .ci/package_check.sh


def test_version_and_typing_marker_are_installed() -> None:
    assert importlib.metadata.version("fasthess") == fasthess.__version__
    assert (PACKAGE / "py.typed").is_file()
    meta = importlib.metadata.metadata("fasthess")
    assert meta["Requires-Python"] == ">=3.10"
    assert {"demo", "experiments", "test", "docs", "integrations", "peers"} <= set(meta.get_all("Provides-Extra"))
    for requirement in meta.get_all("Requires-Dist"):  # no extra may pin a torch other than the user's
        assert not requirement.startswith("torch") or requirement.startswith("torch>=")


def test_console_script_points_at_the_namespaced_runner() -> None:
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts["fasthess-experiments"] == "fasthess_experiments.__main__:main"
    assert callable(importlib.import_module("fasthess_experiments.__main__").main)


def _requirement_names(path: Path) -> set[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {re.split(r"[<>=;\[ ]", line)[0].lower() for line in lines if line and not line.startswith("-")}


def test_make_demo_installs_the_demo_extra_and_the_build_tools_only() -> None:
    demo, dev = SOURCE / "requirements-demo.txt", SOURCE / "requirements-dev.txt"
    assert "torch==" in demo.read_text()  # an unpinned torch would pull a multi-GB CUDA build
    assert "-r requirements-demo.txt" in dev.read_text().splitlines()  # make test adds the rest on top
    requires = importlib.metadata.metadata("fasthess").get_all("Requires-Dist")
    extra = {re.split(r"[<>=;\[ ]", r)[0].lower() for r in requires if 'extra == "demo"' in r}
    assert _requirement_names(demo) == extra | {"torch", "numpy", "ninja", "setuptools", "wheel"}


def test_the_runner_ships_its_embedded_data() -> None:  # the demo's MNIST-1D: no mnist1d, no scikit-learn
    runner = importlib.resources.files("fasthess_experiments")
    assert (runner / "digits.npz").is_file() and (runner / "mnist1d.npz").is_file()


def test_readme_is_a_first_screen_naming_the_runner_once() -> None:
    text = (SOURCE / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert "fasthess-experiments" in text and "python -m experiments" not in text


def test_public_names_import_from_where_the_docs_say() -> None:
    for name in fasthess.__all__:
        assert getattr(fasthess, name) is not None, name
    assert fasthess.distributed.shard is importlib.import_module("fasthess.distributed").shard
    assert callable(fasthess.from_subset.eigs_subsampled)
    from fasthess.distributed import is_main_process, shard  # noqa: F401  (docs/guides/distributed.md)
    from fasthess.integrations import TensorBoardSink, WandbSink, record_scalars  # noqa: F401  (no framework needed)


def _python(code: str, path: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter that imports fasthess from ``path`` first."""
    env = {**os.environ, "PYTHONPATH": str(path)}
    return subprocess.run([sys.executable, "-c", code], cwd=path, env=env, capture_output=True, text=True,
                          timeout=120)


def test_integrations_import_without_their_frameworks(tmp_path: Path) -> None:
    blocked = ("lightning", "pytorch_lightning", "transformers", "tensorboard", "wandb")
    code = (f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
            "import fasthess, fasthess.integrations\nprint(sorted(fasthess.integrations.__all__))")
    done = _python(code, PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    assert "TensorBoardSink" in done.stdout


def _copy_package(tmp_path: Path) -> Path:
    """A copy of the fasthess package under ``tmp_path`` (importable from there), without bytecode."""
    shutil.copytree(PACKAGE, tmp_path / "fasthess", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


# An editable install's meta-path finder would serve fasthess._C from the checkout; the probe drops it.
PROBE = ("import sys, warnings\nwarnings.simplefilter('always')\n"
         "sys.meta_path = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]\n"
         "import fasthess, fasthess._ext as e\nfasthess.backend(); fasthess.build_info()\n"
         "print(fasthess.__file__); print(fasthess.backend())")


def test_a_corrupt_extension_warns_once_and_falls_back(tmp_path: Path) -> None:
    root = _copy_package(tmp_path)
    libraries = list((root / "fasthess").glob("_C*.so"))
    if not libraries:
        pytest.skip("no compiled extension to corrupt")
    libraries[0].write_bytes(b"not an ELF file")
    done = _python(PROBE, root)
    assert done.returncode == 0, done.stderr
    out = done.stdout.split()
    assert out[0] == str(root / "fasthess" / "__init__.py") and out[1] == "python"
    assert done.stderr.count("the native extension exists but failed to load") == 1, done.stderr
    assert "python -m fasthess" in done.stderr and libraries[0].name in done.stderr  # names the error and the fix


def test_no_extension_is_a_silent_fallback(tmp_path: Path) -> None:
    root = _copy_package(tmp_path)
    for library in (root / "fasthess").glob("_C*.so"):
        library.unlink()
    done = _python(PROBE, root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[1] == "python"
    assert "failed to load" not in done.stderr, done.stderr


def test_build_info_reports_the_load_error() -> None:
    info = fasthess.build_info()
    assert info["extension_error"] == _ext._LOAD_ERROR
    assert (info["backend"] == "python") == (_ext._LOAD_ERROR is not None or not info["native_ops"])
