"""Loading of the native extension ``fasthess._C`` and a report of what is loaded."""
from __future__ import annotations

import platform
import sys
import sysconfig

import torch

try:  # the extension registers its ops with torch.ops.fasthess on import
    from fasthess import _C  # noqa: F401

    _LOAD_ERROR: str | None = None
except ImportError as exc:  # pure-PyTorch fallback
    _LOAD_ERROR = str(exc)


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
