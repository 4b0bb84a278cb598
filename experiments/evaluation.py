"""Evaluation of a model on a data split: mean loss, accuracy and the per-example correctness (0/1) that the
report's test-set sampling term needs. Under torchrun each rank evaluates its contiguous shard."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fasthess.track import sharpness_mode

from . import ddp


@torch.no_grad()
def evaluate(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, chunk_size: int,
             ctx: ddp.DistContext, device=None) -> tuple[float, float, torch.Tensor]:
    """(mean cross-entropy, accuracy, correct) in eval mode (every module's flag restored after);
    ``correct`` is a uint8 CPU tensor with one entry per example of ``X`` (gathered over ranks)."""
    n_all = len(X)
    if ctx.enabled:
        from fasthess.distributed import shard

        X, y = shard((X, y), ctx.rank, ctx.world_size)
    tot_loss, hits = 0.0, []
    with sharpness_mode(model, "eval", disable_dropout=False):
        for s in range(0, len(X), chunk_size):
            out = model(X[s:s + chunk_size])
            tot_loss += float(F.cross_entropy(out, y[s:s + chunk_size], reduction="sum"))
            hits.append((out.argmax(1) == y[s:s + chunk_size]).to("cpu", torch.uint8))
    correct = torch.cat(hits) if hits else torch.zeros(0, dtype=torch.uint8)
    if ctx.enabled:
        tot_loss = ddp.all_reduce_sum([tot_loss], ctx, device=device)[0]
        correct = torch.cat(ddp.all_gather_objects(correct, ctx))
    n = max(1, n_all)
    return tot_loss / n, int(correct.sum()) / n, correct


def bitstring(correct: torch.Tensor) -> str:
    """Per-example correctness as a string of '0'/'1' (compact in JSON)."""
    return (correct.to(torch.uint8).numpy() + ord("0")).tobytes().decode("ascii")
