"""What produced a run: fasthess, torch and Python versions, the device, the host's CPU thread count and the
git commit of the checkout (with a ``dirty`` flag), recorded in every run's config.json and summary.json."""
from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch


@functools.lru_cache(maxsize=1)
def git_commit() -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": bool}`` of the checkout holding this package, or None outside one."""
    root = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if sha.returncode != 0:
            return None
        st = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": sha.stdout.strip(), "dirty": bool(st.stdout.strip()) if st.returncode == 0 else None}


def device_name(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    return platform.processor() or platform.machine() or dev.type


def environment(device: str) -> dict[str, Any]:
    """The software and hardware record of a run on ``device``."""
    import fasthess

    return {"fasthess": getattr(fasthess, "__version__", None), "torch": torch.__version__,
            "python": platform.python_version(), "device": device, "device_name": device_name(device),
            "git": git_commit()}
