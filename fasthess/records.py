"""One :class:`fasthess.SharpnessTracker` update as a typed, immutable record.

``record.lambda_max``, ``record.error_bound``, ... are the fields; :meth:`SharpnessRecord.to_dict` is the flat dict
a JSON sink writes (the keys are the field names, then the ``extra`` keys). Records were plain dicts before; the
dict reads ``record["lambda_max"]``, ``record.get(...)``, ``"x" in record``, ``keys()``/``items()`` still work for
one release and emit a :class:`FutureWarning` (shown by default, as every fasthess deprecation:
:mod:`fasthess._deprecation`), so old code keeps running and says what to change.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

from fasthess._deprecation import warn_deprecated
from fasthess.errors import FasthessError

__all__ = ["SharpnessRecord"]

_DEPRECATED = ("SharpnessRecord: reading a tracker record as a dict (record[key], .get, in, keys, items, values); "
               "read its fields (record.lambda_max, record.extra['epoch']) or record.to_dict()")


def _deprecated() -> None:
    warn_deprecated(_DEPRECATED, stacklevel=3)  # at the caller of the dict read


@dataclasses.dataclass(frozen=True, kw_only=True)
class SharpnessRecord(Mapping):
    """What one tracker update found: the certified λ_max of the full training loss at one training step.

    The claim is ``|lambda_max − λ_max(H)| ≤ error_bound`` when ``converged``; it rests on two things the record
    names: ``basis`` (why θ₁ is the top eigenvalue and not a lower one: the Krylov assumption, made to hold by the
    exploration it names) and ``precision`` (what the bound assumes about the products' rounding). Fields that
    histories saved by older versions lack are None when such a history is loaded.
    """

    lambda_max: float
    """θ₁, the largest Ritz value of the full-data Hessian: the certified λ_max."""
    eigenvalues: tuple[float, ...]
    """θ₁ ≥ … ≥ θₖ, the tracker's top k Ritz values (``eigenvalues[0] == lambda_max``)."""
    residual: float
    """‖Hx₁ − θ₁x₁‖ of the top Ritz pair, from the actual products."""
    error_bound: float
    """Bound on |λ_max − θ₁| (the residual or Kato–Temple gap bound plus the rounding floor; ``certificate``)."""
    converged: bool
    """Every one of the k bounds is within ``tol``·|θᵢ| and the claim passed its checks (:class:`fasthess.EigResult`);
    False means the values are estimates, not certified."""
    num_hvps: int
    """Hessian-vector products on the full data."""
    num_passes: int
    """Passes over the full data (one block of products each)."""
    seconds: float
    """Wall time of the solve(s)."""
    warm_started: bool
    """The solve started from the previous update's Ritz vectors."""
    step: int | None = None
    """The training step passed to ``update`` (None when none was)."""
    steps_since: int | None = None
    """Steps since the previous record (None for the first, or without steps)."""
    certificate: str | None = None
    """How ``error_bound`` was obtained for θ₁: ``"residual"``, ``"gap"`` or ``"exhausted"``
    (:class:`fasthess.EigResult`)."""
    certificates: tuple[str, ...] = ()
    """The same for each of the k values."""
    basis: str | None = None
    """What the claim that θ₁ is λ_max, not a lower eigenvalue, rests on: an exploration "on the full data at this
    update" (fresh random columns, as a cold solve), or "on a 0.125 subsample" (``explore="subsample"``). Neither
    is a proof: a direction deep in the bulk that rose past the top since the last update can be missed
    (docs/guides/tracking.md, "Known false records")."""
    precision: str | None = None
    """What the bound assumes about rounding (:attr:`fasthess.EigResult.precision`): float64 products; lower-precision
    products whose rounding the floor models; or such products checked against float64 products of the Ritz vectors."""
    contract: str | None = None
    """What the operator's being the Hessian of the loss on the whole data rests on
    (:attr:`fasthess.EigResult.contract`): the forward's split over the examples checked on each chunk, one chunk,
    ``batch_loss=True`` declared, or an assumption where the split could not be checked."""
    subset_hvps: int = 0
    """Products of the exploring subset solve (``explore="subsample"``), each over a fraction of the data."""
    hvp_equivalents: float | None = None
    """Cost in full-data products: ``num_hvps`` plus ``subset_hvps`` times the subset's fraction."""
    lr: float | None = None
    """Learning rate the threshold was computed for."""
    threshold: float | None = None
    """The optimizer's stability threshold on λ_max(H) (e.g. 2/η for SGD;
    :func:`fasthess.threshold.stability_threshold`), None when the optimizer has none on H."""
    threshold_rule: str | None = None
    """The threshold's formula in words (for a preconditioned optimizer, its threshold on λ_max(P⁻¹H))."""
    gradient_fraction: float | None = None
    """``geometry=True``: ‖Vₖᵀg‖²/‖g‖², the share of the full-data gradient in the top-k eigenspace."""
    top_overlap: float | None = None
    """|⟨x₁(t), x₁(t')⟩| with the previous update's top Ritz vector (None at the first, or after the parameter count
    changed)."""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    """The ``**extra`` keyword values given to ``update`` (e.g. ``epoch`` from the training-framework callbacks)."""

    def __post_init__(self) -> None:
        check_extra(self.extra)

    def to_dict(self) -> dict[str, Any]:
        """The flat dict of a JSON sink: each field by name (tuples as lists), then the ``extra`` keys."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out["eigenvalues"], out["certificates"] = list(self.eigenvalues), list(self.certificates)
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SharpnessRecord:
        """A record from :meth:`to_dict`'s dict, or from a dict record saved by an older version (missing later
        fields are None or 0; ``hvp_equivalents`` is then ``num_hvps``, as without a subset; unknown keys, e.g. the
        removed ``two_over_lr``, go to ``extra``)."""
        if isinstance(data, SharpnessRecord):
            return data
        missing = sorted(_REQUIRED - set(data))
        if missing:
            raise FasthessError(f"a tracker record lacks {missing}; it is not a SharpnessTracker record (the keys "
                                f"are {sorted(data)})")
        known = {k: v for k, v in data.items() if k in _FIELDS}
        known["eigenvalues"] = tuple(float(e) for e in known["eigenvalues"])
        known["certificates"] = tuple(known.get("certificates") or ())
        if known.get("hvp_equivalents") is None:
            known["hvp_equivalents"] = float(known["num_hvps"])
        return cls(**known, extra={k: v for k, v in data.items() if k not in _FIELDS})

    # ------------------------------------------------ the dict reads of a release ago, deprecated
    def __getitem__(self, key: str) -> Any:
        _deprecated()
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def __contains__(self, key: object) -> bool:
        _deprecated()
        return key in self.to_dict()

    def get(self, key: str, default: Any = None) -> Any:
        _deprecated()
        return self.to_dict().get(key, default)

    def keys(self):
        _deprecated()
        return self.to_dict().keys()

    def items(self):
        _deprecated()
        return self.to_dict().items()

    def values(self):
        _deprecated()
        return self.to_dict().values()


def check_extra(extra: Mapping[str, Any]) -> None:
    """Refuse ``extra`` names that are record fields (they would hide the field in :meth:`SharpnessRecord.to_dict`)."""
    clash = sorted(set(extra) & _FIELDS)
    if clash:
        raise FasthessError(f"extra record values {clash} have the names of record fields; rename them "
                            f"(the fields are {sorted(_FIELDS)})")


_FIELDS = frozenset(f.name for f in dataclasses.fields(SharpnessRecord)) - {"extra"}
_REQUIRED = frozenset(f.name for f in dataclasses.fields(SharpnessRecord)
                      if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
