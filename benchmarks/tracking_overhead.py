"""What tracking λ_max costs a training run: the same SGD epochs with and without a SharpnessTracker.

Run::

    PYTHONPATH=. .venv/bin/python benchmarks/tracking_overhead.py --problem cnn_cifar --epochs 4
    PYTHONPATH=. python benchmarks/tracking_overhead.py --device cuda --problem vgg11_cifar --epochs 3

Both runs start from the same weights and take the same mini-batches (benchmarks/problems.py: plain SGD at the
problem's learning rate and training batch). The tracked run calls ``SharpnessTracker.maybe_update`` at the end
of every ``--every`` epochs: full-dataset λ_max to ``--tol``, warm-started from the previous eigenvector (the
first update is cold). Reported: seconds of training alone, seconds of the tracked run, the overhead
(tracked / untracked − 1), and per update the HVPs and the cost in full-gradient equivalents (update seconds /
median seconds of one full-data gradient, timed in the same process).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

import fasthess  # noqa: E402
from benchmarks import problems as P  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train(p: P.Problem, epochs: int, tracker: fasthess.SharpnessTracker | None, every: int) -> dict:
    """``epochs`` epochs of SGD (with a λ_max update after every ``every`` epochs when tracking)."""
    steps_per_epoch = max(1, p.X.shape[0] // p.train_batch)
    dev = p.X.device
    p.model.train()
    _sync(dev)
    t0, tracking = time.perf_counter(), []
    for epoch in range(1, epochs + 1):
        P.sgd_steps(p, steps_per_epoch, seed=epoch)
        if tracker is not None and epoch % every == 0:
            _sync(dev)
            t = time.perf_counter()
            rec = tracker.update(p.model, step=epoch)
            _sync(dev)
            tracking.append(dict(seconds=time.perf_counter() - t, hvps=rec["num_hvps"], lam=rec["lambda_max"]))
    _sync(dev)
    return dict(seconds=time.perf_counter() - t0, steps=epochs * steps_per_epoch, updates=tracking)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problem", default="mlp_digits", choices=P.PROBLEMS + P.GPU_PROBLEMS)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--every", type=int, default=1, help="λ_max after every this many epochs")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    base = P.make(a.problem, device=a.device)
    grads = []
    for _ in range(5):
        _sync(base.X.device)
        t = time.perf_counter()
        P.full_gradient(base)
        _sync(base.X.device)
        grads.append(time.perf_counter() - t)
    g = statistics.median(grads)
    plain = train(copy.deepcopy(base), a.epochs, None, a.every)
    p = copy.deepcopy(base)
    tracker = fasthess.SharpnessTracker(p.loss_fn, p.data, batch_size=p.batch_size, tol=a.tol, mode="eval")
    tracked = train(p, a.epochs, tracker, a.every)
    ups = tracked["updates"]
    lines = [f"{a.problem} on {a.device} (torch {torch.__version__}, {torch.get_num_threads()} threads): "
             f"{a.epochs} epochs of {tracked['steps'] // a.epochs} SGD steps (batch {base.train_batch}), "
             f"λ_max to {a.tol:g} every {a.every} epoch(s); one full-data gradient {g:.3f} s",
             f"training alone {plain['seconds']:.2f} s; with tracking {tracked['seconds']:.2f} s; overhead "
             f"**{100 * (tracked['seconds'] / plain['seconds'] - 1):.0f} %**",
             "| update | λ_max | HVPs | seconds | grad-eq |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {i + 1}{' (cold)' if i == 0 else ''} | {u['lam']:.5f} | {u['hvps']} | {u['seconds']:.2f} | "
              f"{u['seconds'] / g:.1f} |" for i, u in enumerate(ups)]
    warm = [u["seconds"] / g for u in ups[1:]]
    if warm:
        lines.append(f"median warm update: {statistics.median(warm):.1f} grad-eq; an epoch of training: "
                     f"{plain['seconds'] / a.epochs / g:.1f} grad-eq")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
