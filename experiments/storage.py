"""Durable files for the runner: atomic writes, checksummed checkpoints with a previous good copy, run locks.

* Atomic writes: a temporary file in the same directory (``NAME.tmp<pid>``), flushed and fsynced, then
  ``os.replace``-d over the target and the directory fsynced. A reader sees the old file or the new one,
  never a torn one. Any ``OSError`` on the way (a full disk: ``ENOSPC``/``EDQUOT``) removes the
  temporary file, leaves the previous file untouched and raises :class:`StorageError` naming the path
  and the fix. Temporaries of killed processes are removed by :func:`clean_stale_tmp`.
* Checkpoints: ``torch.save`` bytes followed by a footer line with their SHA-256 and length (``torch.load``
  ignores trailing bytes, so the file still loads directly). Saving keeps the previous checkpoint as
  ``NAME.prev``. Loading verifies the checksum; a truncated, garbled or mismatching file is moved aside
  to ``NAME.corrupt`` with a warning and the previous good one is used; when none is good the run
  restarts from scratch (with a warning), it never continues from bad bytes.
* Locks: ``fcntl.flock`` on ``<run_dir>/.lock``; the kernel drops the lock when its process dies (also on
  kill -9), so a lock is never stale. See :func:`run_lock`.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import re
import warnings
from pathlib import Path

try:  # POSIX only; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_TMP = re.compile(r"\.tmp(\d+)$")


class StorageError(OSError):
    """A runner file could not be written (full disk, quota, permissions); the previous file is intact."""


class CheckpointWarning(UserWarning):
    """A checkpoint was corrupt or missing and an older one (or a fresh start) was used instead."""


class RunLockedError(RuntimeError):
    """Another process holds the run directory's lock."""

    def __init__(self, msg: str, holder: str = "?"):
        super().__init__(msg)
        self.holder = holder


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# ---------------------------------------------------------------------------- atomic writes
def _storage_error(path: Path, exc: OSError) -> StorageError:
    if exc.errno in _NO_SPACE:
        msg = (f"no space left on device while writing {path} ({exc.strerror or exc}); free disk space (or point "
               f"--out at another disk) and rerun: the previous {path.name} is intact and interrupted runs resume "
               f"from their last checkpoint")
    else:
        msg = (f"could not write {path}: {exc}; the previous {path.name} is intact; fix the cause (permissions, "
               f"disk) and rerun")
    return StorageError(exc.errno or errno.EIO, msg)


def _unlink_quiet(p: Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def _write_tmp(path: Path, data: bytes) -> Path:
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        _unlink_quiet(tmp)
        raise _storage_error(path, exc) from exc
    return tmp


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = _write_tmp(path, data)
    try:
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quiet(tmp)
        raise _storage_error(path, exc) from exc
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")


def atomic_write_jsonl(path: str | Path, records) -> None:
    """One JSON object per line (e.g. a run's metrics.jsonl), replacing the file atomically."""
    atomic_write_text(path, "".join(json.dumps(_jsonable(r)) + "\n" for r in records))


def atomic_torch_save(obj, path: str | Path) -> None:
    import torch

    buf = io.BytesIO()  # serialize first: a write error is then a plain OSError, not torch's RuntimeError
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def clean_stale_tmp(directory: str | Path) -> list[Path]:
    """Remove ``*.tmp<pid>`` files left in ``directory`` by processes that no longer run; return them."""
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TMP.search(p.name)
        if not m or not p.is_file():
            continue
        pid = int(m.group(1))
        alive = pid == os.getpid()
        if not alive:
            try:
                os.kill(pid, 0)
                alive = True
            except ProcessLookupError:
                alive = False
            except OSError:  # e.g. EPERM: someone else's live process
                alive = True
        if not alive:
            _unlink_quiet(p)
            removed.append(p)
    return removed


# ---------------------------------------------------------------------------- checkpoints
_MAGIC = b"\nFASTHESS-CHECKPOINT sha256="
_FOOTER = re.compile(rb"\nFASTHESS-CHECKPOINT sha256=([0-9a-f]{64}) bytes=(\d+)\n\Z")


class CheckpointCorrupt(Exception):
    pass


def prev_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".prev")


def save_checkpoint(obj, path: str | Path) -> None:
    """Atomically write ``obj`` with a checksum footer; the checkpoint it replaces becomes ``NAME.prev``.

    A kill at any point leaves an intact ``NAME`` or (between the two renames) an intact ``NAME.prev``.
    """
    import torch

    path = Path(path)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    footer = _MAGIC + hashlib.sha256(data).hexdigest().encode() + b" bytes=%d\n" % len(data)
    tmp = _write_tmp(path, data + footer)
    try:
        if path.exists():
            os.replace(path, prev_path(path))
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quiet(tmp)
        raise _storage_error(path, exc) from exc
    _fsync_dir(path.parent)


def read_checkpoint(path: str | Path, map_location=None):
    """Load a checkpoint after verifying its checksum; raises :class:`CheckpointCorrupt` if it is bad."""
    import torch

    path = Path(path)
    data = path.read_bytes()
    base = max(0, len(data) - 200)
    m = _FOOTER.search(data, base)
    if m is None:
        if _MAGIC[1:20] in data[base:]:
            raise CheckpointCorrupt("its checksum footer is damaged")
        # no footer: a file truncated before its end, garbage, or a checkpoint of an older version
        try:
            state = torch.load(io.BytesIO(data), weights_only=False, map_location=map_location)
        except Exception as exc:
            raise CheckpointCorrupt(f"unreadable ({len(data)} bytes, no checksum footer: {type(exc).__name__})") from None
        warnings.warn(f"{path} has no checksum (written by an older version); loaded it unverified",
                      CheckpointWarning, stacklevel=3)
    else:
        payload = data[:m.start()]
        if len(payload) != int(m.group(2)):
            raise CheckpointCorrupt(f"truncated or padded: {len(payload)} bytes, the footer says {int(m.group(2))}")
        if hashlib.sha256(payload).hexdigest().encode() != m.group(1):
            raise CheckpointCorrupt("checksum mismatch (the bytes were changed after writing)")
        try:
            state = torch.load(io.BytesIO(payload), weights_only=False, map_location=map_location)
        except Exception as exc:  # pragma: no cover - a matching checksum over bytes torch cannot read
            raise CheckpointCorrupt(f"unreadable despite a matching checksum: {exc}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointCorrupt("not a runner checkpoint (no 'step')")
    return state


def load_checkpoint(path: str | Path, map_location=None):
    """The newest intact checkpoint among ``NAME`` and ``NAME.prev``, or None (start from scratch).

    A corrupt candidate is renamed to ``NAME.corrupt`` / ``NAME.prev.corrupt`` (kept for inspection, and so
    that the next save does not rotate it over the good previous copy) and a :class:`CheckpointWarning` is
    issued; so is one when falling back to ``NAME.prev`` or restarting from scratch after a corrupt file.
    """
    path = Path(path)
    bad = []
    for cand in (path, prev_path(path)):
        if not cand.is_file():
            continue
        try:
            state = read_checkpoint(cand, map_location)
        except (CheckpointCorrupt, OSError) as exc:
            dest = cand.with_name(cand.name + ".corrupt")
            try:
                os.replace(cand, dest)
            except OSError:
                dest = cand
            bad.append(cand)
            warnings.warn(f"checkpoint {cand} is corrupt ({exc}); moved to {dest.name}", CheckpointWarning,
                          stacklevel=2)
            continue
        if cand != path:
            why = "was corrupt" if bad else "is missing (interrupted while rotating)"
            warnings.warn(f"resuming {path.parent} from the previous checkpoint {cand.name} (step {state['step']}) "
                          f"because {path.name} {why}", CheckpointWarning, stacklevel=2)
        return state
    if bad:
        warnings.warn(f"no intact checkpoint in {path.parent}: restarting the run from scratch", CheckpointWarning,
                      stacklevel=2)
    return None


# ---------------------------------------------------------------------------- locks
@contextlib.contextmanager
def run_lock(run_dir: str | Path, wait: bool = True):
    """Hold the exclusive lock of ``run_dir`` (``run_dir/.lock``) for the ``with`` block.

    ``wait=False``: raise :class:`RunLockedError` (naming the holder's pid and host) if another process holds
    it; ``wait=True``: block until it is free. The lock dies with its process, so kill -9 leaves none behind.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield
        return
    f = open(run_dir / ".lock", "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise RunLockedError(f"{run_dir} is being run by another process (pid/host {holder}); it is skipped "
                                 "here, or wait for that process to finish", holder) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()} {os.uname().nodename if hasattr(os, 'uname') else ''}\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the lock
