"""Sweeps: expand a preset into runs (every grid point with every seed), give each run a directory named
from its hyperparameters and seed, skip finished runs, resume interrupted ones from their last checkpoint,
optionally run ``jobs`` of them at once in worker processes, then rebuild the report.

Seeds: a preset declares ``seeds``; run ``(point, s)`` uses ``init_seed = data_seed = s`` (initialization,
data order and dropout noise); ``seeds=`` (``--seeds``) replaces the preset's list.

Parallel runs (``jobs > 1``): each run trains in a spawned worker process with the run's own ``threads``
setting and its own copy of the data, so a run's result does not depend on ``jobs`` or on the order in which
runs finish. Workers end when the parent process dies (also on kill -9).

Several runners may share one sweep directory (e.g. one per GPU, or a second one started by mistake): each
run is trained under an exclusive lock on ``<run_dir>/.lock`` (see :func:`experiments.storage.run_lock`).
A runner skips runs that another one holds, does the rest, then waits for the skipped ones (and resumes
them itself if their holder died); the report is rebuilt under the sweep directory's lock. Nothing is
trained twice and no file is written by two processes at once."""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import ddp
from .config import config_name, data_args, data_key, resolve_config, run_name
from .storage import RunLockedError, _jsonable, atomic_write_json, clean_stale_tmp, run_lock
from .train import Trainer


def preset_seeds(preset: dict[str, Any], seeds: Sequence[int] | None = None) -> list[int]:
    """The seeds of a sweep: ``seeds`` when given, else the preset's (default ``[0]``); checked."""
    out = list(preset.get("seeds", [0]) if seeds is None else seeds)
    if not out:
        raise ValueError("the seed list is empty; give at least one seed, e.g. --seeds 0,1")
    bad = [s for s in out if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**31]
    if bad:
        raise ValueError(f"seeds must be integers in [0, 2**31), got {bad}")
    if len(set(out)) != len(out):
        raise ValueError(f"seeds must be distinct, got {out}")
    return out


def expand(preset: dict[str, Any], overrides: dict[str, Any] | None = None,
           seeds: Sequence[int] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The runs of a preset: base config, each grid point, each seed, then the command line's ``--set`` overrides."""
    overrides = overrides or {}
    runs, names = [], set()
    keys = preset["vary"]
    for point in preset["grid"]:
        for s in preset_seeds(preset, seeds):
            cfg = {**preset["base"], **point, "init_seed": s, "data_seed": s, **overrides}
            cfg = resolve_config(cfg)
            name = run_name(cfg, keys)
            if name in names:  # overrides collapsed two runs into one
                continue
            names.add(name)
            runs.append((name, cfg))
    return runs


def _same_config(prev: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """Keys whose values differ between a run directory's config.json and ``cfg`` (the environment aside)."""
    prev = {k: v for k, v in prev.items() if k != "environment"}
    new = _jsonable(cfg)
    return sorted(k for k in set(prev) | set(new) if prev.get(k) != new.get(k))


def run_one(cfg: dict[str, Any], run_dir: str | Path, *, data=None, progress: bool | None = False,
            wait: bool = True, info: dict | None = None) -> dict[str, Any]:
    """Run (or resume, or skip if finished) one configuration in ``run_dir``; returns its summary.

    Holds the run's lock throughout; when another process holds it, ``wait=True`` waits for it and
    ``wait=False`` raises :class:`~experiments.storage.RunLockedError`. ``info["trained"]`` (when given)
    tells whether this call trained, or found the run finished."""
    run_dir = Path(run_dir)
    cfg = resolve_config(cfg)
    summ = run_dir / "summary.json"
    old = run_dir / "config.json"

    held = contextlib.ExitStack()

    def finished():  # under torchrun rank 0 locks and checks the directory and every rank follows its verdict
        held.enter_context(run_lock(run_dir, wait=wait))
        clean_stale_tmp(run_dir)  # temporaries of killed writers
        if old.is_file():
            diff = _same_config(json.loads(old.read_text()), cfg)
            if diff:
                raise ValueError(f"{run_dir} holds a run with a different configuration (keys {diff}); "
                                 "choose another --out directory or delete it")
            if summ.is_file():
                return json.loads(summ.read_text())
        return None

    with held:
        done = ddp.main_decides(finished)
        if info is not None:
            info["trained"] = done is None
        if done is not None:
            return done
        return Trainer(cfg, data=data, progress=progress).run(run_dir)


# ---------------------------------------------------------------------------- one attempt, here or in a worker
_DATA: dict[str, Any] = {}  # this process's data set (one at a time)


def _data_for(cfg: dict[str, Any]):
    from .data import load_dataset

    key = data_key(cfg)
    if key not in _DATA:
        _DATA.clear()
        _DATA[key] = load_dataset(cfg["dataset"], **data_args(cfg))
    return _DATA[key]


def _attempt(cfg: dict[str, Any], run_dir: str, wait: bool, progress: bool | None = False) -> dict[str, Any]:
    """Train (or find finished) one run; ``{"summary", "trained", "seconds"}`` or ``{"holder"}`` if locked."""
    t = time.time()
    info: dict[str, Any] = {}
    finished = ddp.main_decides(lambda: (Path(run_dir) / "summary.json").is_file())
    try:  # (a finished run needs no data)
        s = run_one(cfg, run_dir, data=None if finished else _data_for(cfg), progress=progress, wait=wait,
                    info=info)
    except RunLockedError as exc:
        return {"holder": exc.holder}
    return {"summary": s, "trained": info["trained"], "seconds": time.time() - t}


def _watch_parent(parent: int) -> None:
    """Worker start-up: exit as soon as the process that started this one is gone (kill -9 included)."""
    def watch():
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _pool(jobs: int):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: a forked child inherits torch's thread pools in an undefined state
    return ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_watch_parent,
                               initargs=(os.getpid(),))


def _parse_jobs(jobs: int) -> int:
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs must be an integer >= 1, got {jobs!r}")
    if jobs > 1 and ddp.launched_by_torchrun():
        raise ValueError("--jobs > 1 cannot be combined with torchrun (each run is already data-parallel)")
    return jobs


def run_sweep(preset_name: str, out: str | Path | None = None, overrides: dict[str, Any] | None = None,
              progress: bool | None = None, report: bool = True, log=print, seeds: Sequence[int] | None = None,
              jobs: int = 1) -> Path:
    from .presets import get_preset

    preset = get_preset(preset_name)
    jobs = _parse_jobs(jobs)
    out = Path(out or Path("runs") / preset_name)
    main = ddp.is_main()  # under torchrun only rank 0 writes and logs
    log = log if main else (lambda *a, **k: None)
    runs = expand(preset, overrides, seeds)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        clean_stale_tmp(out)
        atomic_write_json(out / "sweep.json", {
            "preset": preset_name, "finding": preset["finding"], "overrides": overrides or {},
            "seeds": preset_seeds(preset, seeds), "jobs": jobs, "runs": [n for n, _ in runs],
            "configs": list(dict.fromkeys(config_name(c, preset["vary"]) for _, c in runs))})

    def log_run(i, name, res):
        s = res["summary"]
        if not res["trained"]:
            log(f"[{i + 1}/{len(runs)}] {name}: done already ({s['status']})")
            return
        lam = s.get("lambda_between_iterates") or s.get("lambda_max")
        at = f" at step {s['diverged_step']}" if s.get("diverged_step") is not None else ""
        log(f"[{i + 1}/{len(runs)}] {name}: {s['status']}{at} after {s['steps']} steps, "
            f"train_acc={s['train_acc']:.4f} test_acc={s['test_acc']:.4f} "
            f"lambda_max={'-' if lam is None else f'{lam:.4g}'} ({res['seconds']:.1f}s)")

    def deferred_note(i, name, res):
        log(f"[{i + 1}/{len(runs)}] {name}: held by another runner ({res['holder']}); coming back to it later")

    t0 = time.time()
    todo = [(i, name, cfg) for i, (name, cfg) in enumerate(runs)]
    if jobs == 1:
        deferred = []
        for i, name, cfg in todo:
            res = _attempt(cfg, str(out / name), wait=False, progress=progress)
            if "holder" in res:
                deferred_note(i, name, res)
                deferred.append((i, name, cfg))
            else:
                log_run(i, name, res)
        for i, name, cfg in deferred:
            log_run(i, name, _attempt(cfg, str(out / name), wait=True, progress=progress))
    else:
        _run_parallel(todo, out, jobs, log_run, deferred_note)
    wall = time.time() - t0
    log(f"sweep {preset_name}: {len(runs)} runs in {wall:.1f}s ({jobs} job{'s' if jobs > 1 else ''})")
    if report and main:
        from .report import build_report

        with run_lock(out, wait=True):  # two runners finishing together: one report at a time
            build_report(out)
        log(f"report: {out / 'report.md'}\nverdicts: {out / 'verdicts.json'}\n"
            f"plots:  {', '.join(str(p) for p in sorted(out.glob('*.png')))}\ntable:  {out / 'results.csv'}")
    return out


def _run_parallel(todo, out: Path, jobs: int, log_run, deferred_note) -> None:
    """``todo`` over ``jobs`` worker processes; locked runs are retried (waiting) once the others are done."""
    from concurrent.futures import FIRST_COMPLETED, wait

    pool = _pool(jobs)
    try:
        for waiting in (False, True):
            pending = {pool.submit(_attempt, cfg, str(out / name), waiting): (i, name, cfg)
                       for i, name, cfg in todo}
            todo = []
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in sorted(done, key=lambda f: pending[f][0]):
                    i, name, cfg = pending.pop(f)
                    res = f.result()
                    if "holder" in res:
                        deferred_note(i, name, res)
                        todo.append((i, name, cfg))
                    else:
                        log_run(i, name, res)
    except BaseException:  # an error or Ctrl-C: stop the workers now (their runs resume from checkpoints)
        for p in list(pool._processes.values()):  # (the executor has no public way to stop running tasks)
            p.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
