"""A tracker record as what a logger writes: scalars (λ_max, residual, products, threshold) and the basis text."""
from __future__ import annotations

import math
from typing import Any


def record_scalars(record: dict[str, Any], prefix: str = "sharpness/") -> dict[str, float]:
    """The scalars of one :meth:`fasthess.SharpnessTracker.update` record, keyed ``prefix + name``.

    ``lambda_max``, ``residual`` (‖Hx − θx‖ of the top pair), ``num_hvps`` (full-data products),
    ``hvp_equivalents`` (plus the exploring subset's products scaled by its fraction) and ``threshold`` (the
    optimizer's stability threshold on λ_max(H), e.g. 2/η; only when the record has one), ``gradient_fraction`` and
    ``top_overlap`` (a ``geometry=True`` tracker's, when set); for ``k > 1`` also
    ``lambda_2`` … ``lambda_k``.

    >>> record_scalars({"lambda_max": 4.0, "eigenvalues": [4.0, 1.0], "residual": 1e-6, "num_hvps": 7, "threshold": None})
    {'sharpness/lambda_max': 4.0, 'sharpness/residual': 1e-06, 'sharpness/num_hvps': 7.0, 'sharpness/lambda_2': 1.0}
    """
    out = {f"{prefix}lambda_max": float(record["lambda_max"]), f"{prefix}residual": float(record["residual"]),
           f"{prefix}num_hvps": float(record["num_hvps"])}
    for name in ("hvp_equivalents", "threshold", "gradient_fraction", "top_overlap"):
        value = record.get(name)
        if value is not None and math.isfinite(value):
            out[f"{prefix}{name}"] = float(value)
    for i, value in enumerate(record.get("eigenvalues", [])[1:], start=2):
        out[f"{prefix}lambda_{i}"] = float(value)
    return out


def record_text(record: dict[str, Any], prefix: str = "sharpness/") -> dict[str, str]:
    """The text fields of a record: ``basis`` (what the claim that θ₁ is λ_max rests on) and ``threshold_rule``.

    >>> record_text({"basis": "explored on the full data at this update", "threshold_rule": None})
    {'sharpness/basis': 'explored on the full data at this update'}
    """
    return {f"{prefix}{name}": str(record[name]) for name in ("basis", "precision", "threshold_rule") if record.get(name)}
