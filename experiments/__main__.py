"""fasthess-experiments: rerun the five findings of Kaur, Cohen & Lipton (2023) with λ_max tracked by fasthess.

The same command is "python -m fasthess_experiments" (in a checkout's venv or installed).

  fasthess-experiments list                      the presets, their grids and measured wall times
  fasthess-experiments run PRESET [options]      train a preset's sweep and decide its claims
  fasthess-experiments report DIR                rebuild a sweep's report, plots and verdicts

Data-parallel: "torchrun --nproc-per-node N -m fasthess_experiments run PRESET ..." trains each run with
DistributedDataParallel over N processes; only rank 0 writes and prints.
Every user error (unknown preset or key, malformed value, missing directory or data, unavailable device)
prints "error: ..." and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def parse_set(items) -> dict:
    """``key=value`` pairs; values parsed as JSON when they parse (numbers, true/false, null, lists), else strings.

    A malformed item raises ValueError with a message (the CLI prints it and exits with status 2)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k:
            raise ValueError(f"--set expects key=value with a non-empty key, got {item!r}")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            low = v.strip().lower()
            out[k] = {"true": True, "false": False, "none": None}.get(low, v)
        except RecursionError:
            raise ValueError(f"--set {k}: value nested too deeply") from None
    return out


def parse_seeds(text: str | None) -> list[int] | None:
    """``"10,11,12"`` → [10, 11, 12]; ``"0-4"`` → [0, 1, 2, 3, 4]; None → None (the preset's seeds)."""
    if text is None:
        return None
    seeds: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                seeds += range(lo, hi + 1)
            else:
                seeds.append(int(part))
    except ValueError:
        raise ValueError(f"--seeds expects comma-separated integers or ranges (e.g. 10,11,12 or 0-4), "
                         f"got {text!r}") from None
    return seeds


def _check_devices(overrides: dict, preset_name: str) -> None:
    """A CUDA device asked for on a torch without CUDA is a user error, found before any run starts."""
    import torch

    from .presets import get_preset

    p = get_preset(preset_name)
    devices = {str(overrides.get("device", g.get("device", p["base"].get("device", "cpu")))) for g in p["grid"]}
    cuda = sorted(d for d in devices if d.startswith("cuda"))
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"device {cuda[0]!r} requested, but this torch ({torch.__version__}) has no usable CUDA "
                         f"device; use --set device=cpu or install a CUDA build of torch")


def _list() -> None:
    from .presets import get_preset, list_presets
    from .sweep import expand

    for name in list_presets():
        p = get_preset(name)
        n_cfg = len(expand(p, seeds=[0]))
        if p["base"].get("device", "cpu").startswith("cuda"):
            wall = "needs a GPU and the data set, not measured"
        else:
            wall = ("measured wall time (2 shared CPU cores, --jobs 1 unless stated): "
                    f"{p['measured'] or 'not measured yet'}")
        print(f"{name:16s} finding {p['finding']}: {p['claim']}\n{'':16s} {n_cfg} configurations x "
              f"{len(p['seeds'])} seeds; {wall}.\n{'':16s} {p['description']}")
        if p.get("grid_note"):
            print(f"{'':16s} Note: {p['grid_note']}.")


def _set_keys_help() -> str:
    """The --set keys, one line each with its default."""
    from .config import DEFAULTS, HELP

    width = max(map(len, DEFAULTS))
    lines = [f"  {k:{width}s}  {HELP[k]} (default {json.dumps(v)})" for k, v in DEFAULTS.items()]
    return "config keys for --set KEY=VALUE (values are JSON; plain words are strings):\n" + "\n".join(lines)


def _subset_sizes(args) -> list[int] | None:
    from .subset_study import parse_sizes

    return None if args.subset_study is None else parse_sizes(args.subset_study)


def _subset_study(sweep_dir, sizes: list[int]) -> None:
    """Measure the subset study (experiments/subset_study.py) of the runs lacking it."""
    from .subset_study import study_sweep

    study_sweep(sweep_dir, sizes)


def _error(exc: BaseException) -> int:
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    print(f"error: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    plain = argparse.RawDescriptionHelpFormatter  # the texts below are laid out by hand
    ap = argparse.ArgumentParser(prog="fasthess-experiments", description=__doc__, formatter_class=plain)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="show the presets")
    r = sub.add_parser("run", help="run a preset's sweep (finished runs are skipped, interrupted ones resumed)",
                       formatter_class=plain, epilog=_set_keys_help())
    r.add_argument("preset")
    r.add_argument("--out", default=None, help="sweep directory (default runs/PRESET)")
    r.add_argument("--seeds", default=None, help="seeds replacing the preset's, e.g. 10,11,12,13,14 or 10-14")
    r.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process (default 1)")
    r.add_argument("--paper-lambda-subset", action="store_true",
                   help="λ_max on the paper's 1000-example strided subset instead of the full training set "
                        "(-paper presets)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every run (repeatable), e.g. --set max_steps=500")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--subset-study", default=None, metavar="SIZES",
                   help="after the sweep, λ_max of every run's final model on random and strided subsets of these "
                        "sizes (e.g. 100,1000), and per claim whether the verdict would change (report section)")
    rp = sub.add_parser("report", help="rebuild results.csv, the plots, report.md and verdicts.json of a sweep")
    rp.add_argument("dir")
    rp.add_argument("--subset-study", default=None, metavar="SIZES",
                    help="first add the subset study of these sizes (e.g. 100,1000) to the runs that lack it")
    args = ap.parse_args(argv)

    from . import ddp

    if args.cmd != "run" and ddp.launched_by_torchrun() and int(os.environ["RANK"]) != 0:
        return 0  # list / report under torchrun: rank 0 alone
    if args.cmd == "list":
        try:
            _list()
        except BrokenPipeError:  # `list | head` closed the pipe early; the exit flush must not fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if args.cmd == "run":
        from .presets import get_preset, paper_lambda_subset
        from .sweep import run_sweep

        try:
            overrides = parse_set(args.set)
            seeds = parse_seeds(args.seeds)
            sizes = _subset_sizes(args)
            if args.paper_lambda_subset:
                overrides = {**paper_lambda_subset(get_preset(args.preset)), **overrides}
            _check_devices(overrides, args.preset)
        except (KeyError, ValueError) as exc:
            return _error(exc)
        ddp.init()  # under torchrun: the process group (a no-op in a plain process)
        try:
            out = run_sweep(args.preset, args.out, overrides, progress=False if args.no_progress else None,
                            seeds=seeds, jobs=args.jobs)
            if sizes and ddp.is_main():
                from .report import build_report

                _subset_study(out, sizes)
                print(f"report with the subset study: {build_report(out)}")
        except (KeyError, ValueError, OSError) as exc:  # OSError: e.g. StorageError on a full disk, DataError
            return _error(exc) if ddp.is_main() else 2
        finally:
            ddp.teardown()
        return 0
    if args.cmd == "report":
        from .report import build_report

        try:
            sizes = _subset_sizes(args)
            if sizes:
                _subset_study(args.dir, sizes)
            path = build_report(args.dir)
        except (KeyError, ValueError, OSError) as exc:
            return _error(exc)
        print(path.read_text())
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
