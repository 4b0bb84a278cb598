"""The finiteness checks of a data pass: one host sync per pass, and on failure a message that names the cause
(the penalty, a chunk's loss, the data by chunk, example and part, another rank, or an overflow of the products)."""
from __future__ import annotations

import torch

from fasthess._batch import nonfinite_data
from fasthess._data import ChunkedData
from fasthess.errors import NonFiniteError

__all__ = ["check_finite_pass"]


def _where_nonfinite(data: ChunkedData, index: int | None = None) -> str | None:
    """Error path only: where chunk ``index`` (None: any chunk) of the data holds NaN/Inf, as a phrase."""
    for chunk in data.chunks():
        if index is None or chunk.index == index:
            bad = nonfinite_data(chunk.batch)
            if bad is not None:
                return f"chunk {chunk.index}: {bad}"
    return None


def check_finite_pass(losses: torch.Tensor, indices: list[int], acc: torch.Tensor, data: ChunkedData,
                      sharded: bool) -> None:
    """The chunk losses ``losses`` (chunks ``indices``, then the penalty if there is one) and the products ``acc``
    of a pass must be finite; ``sharded``: ``acc`` was all-reduced over the ranks."""
    if bool(torch.isfinite(losses).all()) and bool(torch.isfinite(acc).all()):
        return
    bad = int((~torch.isfinite(losses)).nonzero()[0, 0]) if not bool(torch.isfinite(losses).all()) else None
    if bad is not None and bad >= len(indices):
        raise NonFiniteError(f"the penalty is not finite (value {float(losses[bad])}); check the penalty function")
    if bad is None and sharded:
        raise NonFiniteError("the all-reduced Hessian-vector products are Inf/NaN although this rank's chunk "
                             "losses are finite: another rank met a non-finite loss, changed data or an error in "
                             "this pass (its own exception names the cause), or the products overflowed")
    if bad is None:
        where = _where_nonfinite(data)
        if where is not None:
            raise NonFiniteError(f"the Hessian-vector products are Inf/NaN: {where}; clean the data")
        raise NonFiniteError("the Hessian-vector products overflowed to Inf/NaN although every chunk loss and "
                             "the data are finite; use a float64 model (model.double()) or rescale the loss")
    index = indices[bad]
    where = _where_nonfinite(data, index)
    where = f"{where}; clean the data" if where else \
        "check the inputs and weights for NaN/Inf, or lower the learning rate if training diverged"
    raise NonFiniteError(f"the loss is not finite on chunk {index} (value {float(losses[bad])}); {where}")
