"""Command line: ``python -m experiments list | run PRESET [--out DIR] [--set key=value ...] | report DIR``.

Data-parallel: ``torchrun --nproc-per-node N -m experiments run PRESET ...`` trains each run with
DistributedDataParallel over N processes (see :mod:`experiments.ddp`); only rank 0 writes and prints."""
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="show the presets")
    r = sub.add_parser("run", help="run a preset's sweep (finished runs are skipped, interrupted ones resumed)")
    r.add_argument("preset")
    r.add_argument("--out", default=None, help="sweep directory (default runs/PRESET)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every run (repeatable), e.g. --set max_steps=500")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    rp = sub.add_parser("report", help="rebuild results.csv, the plots and report.md of a sweep directory")
    rp.add_argument("dir")
    args = ap.parse_args(argv)

    from experiments import ddp

    if args.cmd != "run" and ddp.launched_by_torchrun() and int(os.environ["RANK"]) != 0:
        return 0  # list / report under torchrun: rank 0 alone
    if args.cmd == "list":
        from experiments.presets import get_preset, list_presets

        for name in list_presets():
            p = get_preset(name)
            print(f"{name:16s} finding {p['finding']}: {p['claim']}\n{'':16s} {len(p['grid'])} runs. {p['description']}")
        return 0
    if args.cmd == "run":
        from experiments.sweep import run_sweep

        ddp.init()  # under torchrun: the process group (a no-op in a plain process)
        try:
            run_sweep(args.preset, args.out, parse_set(args.set), progress=not args.no_progress)
        except (KeyError, ValueError, OSError) as exc:  # OSError: e.g. StorageError on a full disk
            if ddp.is_main():
                print(f"error: {exc}", file=sys.stderr)
            return 2
        finally:
            ddp.teardown()
        return 0
    if args.cmd == "report":
        from experiments.report import build_report

        path = build_report(args.dir)
        print(path.read_text())
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
