"""Loading of the native extension ``fasthess._C`` and a report of what is loaded."""
from __future__ import annotations

import importlib
import importlib.machinery
import platform
import sys
import sysconfig
import warnings
from pathlib import Path

import torch


def _built_files() -> list[Path]:
    """The compiled ``_C`` libraries next to this file (none in a pure-Python install)."""
    here = Path(__file__).parent
    return sorted(p for suffix in importlib.machinery.EXTENSION_SUFFIXES for p in here.glob(f"_C{suffix}"))


def _load() -> str | None:
    """Import ``fasthess._C`` (it registers its ops with ``torch.ops.fasthess``); the error text if that fails.

    Without a compiled library fasthess runs on its pure-PyTorch path silently; a library that exists but
    does not load (corrupt, or built against another torch) warns, once, at import.
    """
    try:
        importlib.import_module("fasthess._C")
        return None
    except (ImportError, OSError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    if _built_files():
        warnings.warn(f"fasthess: the native extension exists but failed to load ({error}); running on the slower "
                      "pure-PyTorch path. `python -m fasthess` shows the build information; rebuilding with "
                      "`pip install --no-build-isolation .` against the installed torch usually fixes it.",
                      RuntimeWarning, stacklevel=2)
    return error


_LOAD_ERROR: str | None = _load()


def native_ops() -> list[str]:
    """Names of the ``fasthess::*`` ops registered with the PyTorch dispatcher."""
    names = torch._C._dispatch_get_all_op_names()
    return sorted(n.split("::", 1)[1] for n in names if n.startswith("fasthess::"))


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when ``fasthess::op`` has a kernel for ``dispatch_key`` (``"CPU"`` or ``"CUDA"``)."""
    return _LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(f"fasthess::{op}", dispatch_key)


def backend() -> str:
    """The native code that is loaded: ``"cuda"``, ``"cpu"`` or ``"python"`` (no extension)."""
    ops = native_ops() if _LOAD_ERROR is None else []
    if any(has_kernel(op, "CUDA") for op in ops):
        return "cuda"
    if any(has_kernel(op, "CPU") for op in ops):
        return "cpu"
    return "python"


def build_info() -> dict[str, object]:
    """Versions of everything fasthess runs on, and why the extension did not load if it did not."""
    from fasthess import __version__

    return {
        "fasthess": __version__,
        "backend": backend(),
        "native_ops": native_ops() if _LOAD_ERROR is None else [],
        "extension_error": _LOAD_ERROR,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "python": sys.version.split()[0],
        "compiler": platform.python_compiler(),
        "platform": sysconfig.get_platform(),
    }
