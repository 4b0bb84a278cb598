"""Sweeps: expand a preset into runs, give each run a directory named from its hyperparameters,
skip finished runs, resume interrupted ones from their last checkpoint, then rebuild the report.

Several runners may share one sweep directory (e.g. one per GPU, or a second one started by mistake): each
run is trained under an exclusive lock on ``<run_dir>/.lock`` (see :func:`experiments.storage.run_lock`).
A runner skips runs that another one holds, does the rest, then waits for the skipped ones (and resumes
them itself if their holder died); the report is rebuilt under the sweep directory's lock. Nothing is
trained twice and no file is written by two processes at once."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from experiments import ddp
from experiments.storage import RunLockedError, clean_stale_tmp, run_lock
from experiments.train import Trainer, _jsonable, atomic_write_json, resolve_config

_SHORT = {"optimizer": "opt", "batch_size": "bs", "dropout": "p", "batch_norm": "bn", "init_seed": "seed",
          "data_seed": "dseed", "momentum": "mom", "model": "model", "dataset": "data"}


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "-".join(_fmt(x) for x in v)
    if v is None:
        return "none"
    return str(v).replace("/", "-").replace(" ", "")


def varied_values(cfg: dict[str, Any], keys, full_batch: str) -> list[tuple[str, Any]]:
    """(key, value) of the hyperparameters that vary in a sweep; a GD run's batch size shows as ``full_batch``."""
    return [(k, full_batch if k == "batch_size" and cfg.get("optimizer") == "gd" else cfg.get(k)) for k in keys]


def run_name(cfg: dict[str, Any], keys) -> str:
    """Directory name from the hyperparameters that vary in the sweep, e.g. ``opt=sgd_lr=0.1_bs=32``."""
    return "_".join(f"{_SHORT.get(k, k)}={_fmt(v)}" for k, v in varied_values(cfg, keys, "full")) or "run"


def expand(preset: dict[str, Any], overrides: dict[str, Any] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The runs of a preset: base config, each grid point, then the command line's ``--set`` overrides."""
    overrides = overrides or {}
    runs, names = [], set()
    keys = preset["vary"]
    for point in preset["grid"]:
        cfg = dict(preset["base"])
        cfg.update(point)
        cfg.update(overrides)
        cfg = resolve_config(cfg)
        name = run_name(cfg, keys)
        if name in names:  # overrides collapsed two grid points into one
            continue
        names.add(name)
        runs.append((name, cfg))
    return runs


def _data_key(cfg):
    return json.dumps({k: cfg[k] for k in ("dataset", "data_root", "verify", "train_subset", "train_stride",
                                            "test_subset", "test_stride", "data_kwargs", "device")}, sort_keys=True)


def run_one(cfg: dict[str, Any], run_dir: str | Path, *, data=None, progress: bool = False,
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
            prev = json.loads(old.read_text())
            if prev != _jsonable(cfg):
                diff = sorted(k for k in set(prev) | set(cfg) if prev.get(k) != _jsonable(cfg).get(k))
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


def run_sweep(preset_name: str, out: str | Path | None = None, overrides: dict[str, Any] | None = None,
              progress: bool = True, report: bool = True, log=print) -> Path:
    from experiments.data import load_dataset
    from experiments.presets import get_preset

    preset = get_preset(preset_name)
    out = Path(out or Path("runs") / preset_name)
    main = ddp.is_main()  # under torchrun only rank 0 writes and logs
    log = log if main else (lambda *a, **k: None)
    runs = expand(preset, overrides)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        clean_stale_tmp(out)
        atomic_write_json(out / "sweep.json", {"preset": preset_name, "finding": preset["finding"],
                                               "overrides": overrides or {}, "runs": [n for n, _ in runs]})
    cache: dict[str, Any] = {}

    def data_for(cfg):
        key = _data_key(cfg)
        if key not in cache:
            cache.clear()
            cache[key] = load_dataset(cfg["dataset"], root=cfg["data_root"], verify=cfg["verify"],
                                      train_subset=cfg["train_subset"], train_stride=cfg["train_stride"],
                                      test_subset=cfg["test_subset"], test_stride=cfg["test_stride"],
                                      device=cfg["device"], **(cfg["data_kwargs"] or {}))
        return cache[key]

    def log_run(i, name, s, t, note=""):
        lam = s.get("lambda_between_iterates") or s.get("lambda_max")
        at = f" at step {s['diverged_step']}" if s.get("diverged_step") is not None else ""
        log(f"[{i + 1}/{len(runs)}] {name}: {note}{s['status']}{at} after {s['steps']} steps, "
            f"train_acc={s['train_acc']:.4f} test_acc={s['test_acc']:.4f} "
            f"lambda_max={'-' if lam is None else f'{lam:.4g}'} ({time.time() - t:.1f}s)")

    t0 = time.time()
    deferred = []
    for i, (name, cfg) in enumerate(runs):
        d = out / name
        if ddp.main_decides(lambda: (d / "summary.json").is_file()):
            s = run_one(cfg, d)
            log(f"[{i + 1}/{len(runs)}] {name}: done already ({s['status']})")
            continue
        t = time.time()
        info: dict[str, Any] = {}
        try:
            s = run_one(cfg, d, data=data_for(cfg), progress=progress, wait=False, info=info)
        except RunLockedError as exc:  # another runner trains it: do the others first, then wait for it
            log(f"[{i + 1}/{len(runs)}] {name}: held by another runner ({exc.holder}); coming back to it later")
            deferred.append((i, name, cfg))
            continue
        log_run(i, name, s, t, note="" if info["trained"] else "done by another runner: ")
    for i, name, cfg in deferred:
        t = time.time()
        info = {}
        s = run_one(cfg, out / name, data=data_for(cfg), progress=progress, wait=True, info=info)
        log_run(i, name, s, t, note="" if info["trained"] else "done by another runner: ")
    log(f"sweep {preset_name}: {len(runs)} runs in {time.time() - t0:.1f}s")
    if report and main:
        from experiments.report import build_report

        with run_lock(out, wait=True):  # two runners finishing together: one report at a time
            build_report(out)
        log(f"report: {out / 'report.md'}\nplots:  {', '.join(str(p) for p in sorted(out.glob('*.png')))}\n"
            f"table:  {out / 'results.csv'}")
    return out
