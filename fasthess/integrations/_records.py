"""A tracker record as the scalars a logger writes: λ_max, residual, HVPs and 2/η."""
from __future__ import annotations

import math
from typing import Any


def record_scalars(record: dict[str, Any], prefix: str = "sharpness/") -> dict[str, float]:
    """The scalars of one :meth:`fasthess.SharpnessTracker.update` record, keyed ``prefix + name``.

    ``lambda_max``, ``residual`` (‖Hx − θx‖ of the top pair), ``num_hvps`` and ``two_over_lr`` (2/η, the
    edge-of-stability line; only when the record has a learning rate); for ``k > 1`` also ``lambda_2`` … ``lambda_k``.

    >>> record_scalars({"lambda_max": 4.0, "eigenvalues": [4.0, 1.0], "residual": 1e-6, "num_hvps": 7, "two_over_lr": None})
    {'sharpness/lambda_max': 4.0, 'sharpness/residual': 1e-06, 'sharpness/num_hvps': 7.0, 'sharpness/lambda_2': 1.0}
    """
    out = {f"{prefix}lambda_max": float(record["lambda_max"]), f"{prefix}residual": float(record["residual"]),
           f"{prefix}num_hvps": float(record["num_hvps"])}
    two_over_lr = record.get("two_over_lr")
    if two_over_lr is not None and math.isfinite(two_over_lr):
        out[f"{prefix}two_over_lr"] = float(two_over_lr)
    for i, value in enumerate(record.get("eigenvalues", [])[1:], start=2):
        out[f"{prefix}lambda_{i}"] = float(value)
    return out
