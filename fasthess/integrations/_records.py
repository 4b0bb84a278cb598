"""A tracker record as what a logger writes: scalars (λ_max, residual, products, threshold) and the basis text."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fasthess.records import SharpnessRecord


def _as_record(record: SharpnessRecord | Mapping[str, Any]) -> SharpnessRecord:
    """The record itself, or one read from a dict (a history saved by an older version)."""
    return record if isinstance(record, SharpnessRecord) else SharpnessRecord.from_dict(record)


def record_scalars(record: SharpnessRecord | Mapping[str, Any], prefix: str = "sharpness/") -> dict[str, float]:
    """The scalars of one :meth:`fasthess.SharpnessTracker.update` record, keyed ``prefix + name``.

    ``lambda_max``, ``residual`` (‖Hx − θx‖ of the top pair), ``num_hvps`` (full-data products),
    ``hvp_equivalents`` (plus the exploring subset's products scaled by its fraction) and ``threshold`` (the
    optimizer's stability threshold on λ_max(H), e.g. 2/η; only when the record has one), ``gradient_fraction`` and
    ``top_overlap`` (a ``geometry=True`` tracker's, when set); for ``k > 1`` also
    ``lambda_2`` … ``lambda_k``.

    >>> rec = SharpnessRecord(lambda_max=4.0, eigenvalues=(4.0, 1.0), residual=1e-6, error_bound=1e-9,
    ...                       converged=True, num_hvps=7, num_passes=2, seconds=0.1, warm_started=False)
    >>> record_scalars(rec)
    {'sharpness/lambda_max': 4.0, 'sharpness/residual': 1e-06, 'sharpness/num_hvps': 7.0, 'sharpness/lambda_2': 1.0}
    """
    rec = _as_record(record)
    out = {f"{prefix}lambda_max": float(rec.lambda_max), f"{prefix}residual": float(rec.residual),
           f"{prefix}num_hvps": float(rec.num_hvps)}
    for name in ("hvp_equivalents", "threshold", "gradient_fraction", "top_overlap"):
        value = getattr(rec, name)
        if value is not None and math.isfinite(value):
            out[f"{prefix}{name}"] = float(value)
    for i, value in enumerate(rec.eigenvalues[1:], start=2):
        out[f"{prefix}lambda_{i}"] = float(value)
    return out


def record_text(record: SharpnessRecord | Mapping[str, Any], prefix: str = "sharpness/") -> dict[str, str]:
    """The text fields of a record: ``basis`` (what the claim that θ₁ is λ_max rests on), ``precision`` (what it
    assumes about rounding), ``contract`` (what the operator's being the whole-data Hessian rests on) and
    ``threshold_rule``, those that are set.

    >>> rec = SharpnessRecord(lambda_max=4.0, eigenvalues=(4.0,), residual=1e-6, error_bound=1e-9, converged=True,
    ...                       num_hvps=7, num_passes=2, seconds=0.1, warm_started=False,
    ...                       basis="explored on the full data at this update")
    >>> record_text(rec)
    {'sharpness/basis': 'explored on the full data at this update'}
    """
    rec = _as_record(record)
    return {f"{prefix}{name}": str(getattr(rec, name)) for name in ("basis", "precision", "contract", "threshold_rule")
            if getattr(rec, name)}
