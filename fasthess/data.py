"""Data sources as a re-iterable stream of chunks ``(x, y)``.

The operator needs to visit the whole data set once per Hessian-vector-product block, always in
the same order and with the same chunks. :class:`ChunkedData` turns the three accepted inputs into
that stream:

* a tuple ``(X, y)`` of tensors, cut into chunks of ``batch_size`` rows (moved to the model's
  device once, so a pass makes no host copies);
* a ``torch.utils.data.Dataset``, read through a non-shuffling ``DataLoader`` of ``batch_size``;
* any re-iterable of ``(x, y)`` batches, such as a ``DataLoader`` (its own batching is kept).

It also fingerprints every chunk on the first pass (a sum over x and y, kept on the device) so a
later pass can prove it saw the same data; a shuffling loader or random augmentation is detected
instead of silently producing a wrong operator.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from fasthess.errors import DataChangedError, FasthessError

DEFAULT_CHUNK = 1024


def is_tensor_pair(data) -> bool:
    """True for a tuple/list ``(X, y)`` of two tensors."""
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)


def is_batched_iterable(data) -> bool:
    """True for iterables of ready-made batches (a DataLoader), whose batches are the chunks."""
    return isinstance(data, DataLoader) or not (is_tensor_pair(data) or isinstance(data, Dataset))


def _count(y: torch.Tensor) -> int:
    return y.shape[0] if y.dim() > 0 else 1


class ChunkedData:
    """A re-iterable stream of ``(x, y, count)`` chunks with data-consistency checks.

    ``num_examples`` is N = Σ count over one pass; it is known after construction for tensors and
    datasets, and after the first pass for other iterables.
    """

    def __init__(self, data, batch_size: int | None, device: torch.device) -> None:
        self.device = device
        self._fingerprints: torch.Tensor | None = None
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise FasthessError(f"batch_size must be a positive integer, got {batch_size!r}")
        if is_tensor_pair(data):
            X, y = data
            if X.shape[0] != y.shape[0]:
                raise FasthessError(
                    f"X and y have different lengths ({X.shape[0]} vs {y.shape[0]}); pass matching tensors (X, y)")
            if X.shape[0] == 0:
                raise FasthessError("the data is empty (0 examples); pass at least one example")
            self._X, self._y = X.to(device), y.to(device)
            self.batch_size = batch_size or min(DEFAULT_CHUNK, X.shape[0])
            self._source: Iterable | None = None
            self.num_examples: int | None = X.shape[0]
        elif isinstance(data, DataLoader) or not isinstance(data, Dataset):
            if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
                raise FasthessError(
                    f"data must be a tuple (X, y) of tensors, a torch Dataset or an iterable of (x, y) batches; "
                    f"got {type(data).__name__}")
            if not isinstance(data, DataLoader) and iter(data) is data:  # iter() of a loader would start workers
                raise FasthessError(
                    "data is a one-shot iterator; the Hessian needs one pass per product. Pass a DataLoader, "
                    "a list of batches or a tuple (X, y)")
            if batch_size is not None:
                raise FasthessError(
                    "batch_size was given together with an iterable of batches; the iterable's own batches are the "
                    "chunks. Drop batch_size, or pass a Dataset or a tuple (X, y) instead")
            self._source, self.batch_size, self.num_examples = data, None, None
        else:
            if len(data) == 0:
                raise FasthessError("the dataset is empty (0 examples); pass at least one example")
            self.batch_size = batch_size or min(DEFAULT_CHUNK, len(data))
            self._source = DataLoader(data, batch_size=self.batch_size, shuffle=False)
            self.num_examples = len(data)

    def _raw(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._source is None:
            for start in range(0, self._X.shape[0], self.batch_size):
                yield self._X[start:start + self.batch_size], self._y[start:start + self.batch_size]
            return
        for batch in self._source:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise FasthessError(
                    f"each batch must be a pair (x, y); got {type(batch).__name__}. Wrap the data so it yields (x, y)")
            x, y = batch[0], batch[1]
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def chunks(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, int]]:
        """Yield ``(index, x, y, count)`` for one pass, checking the data against the first pass.

        Empty batches are skipped and not numbered: ``index`` counts the chunks yielded.
        """
        prints = []
        total = 0
        for x, y in self._raw():
            n = _count(y)
            if n == 0:
                continue
            total += n
            prints.append(torch.stack([x.detach().double().sum(), y.detach().double().sum(), torch.tensor(
                float(n), dtype=torch.float64, device=x.device)]).to(self.device))
            yield len(prints) - 1, x, y, n
        if total == 0:
            raise FasthessError("the data yielded no examples; pass a non-empty data set")
        self._check_same(torch.stack(prints), total)

    def _check_same(self, prints: torch.Tensor, total: int) -> None:
        if self._fingerprints is None:
            self._fingerprints = prints
            self.num_examples = total
            return
        same = prints.shape == self._fingerprints.shape and bool(torch.allclose(
            prints, self._fingerprints, rtol=1e-12, atol=0.0, equal_nan=True))
        if not same:
            raise DataChangedError(
                "the data changed between two passes (different batches or values); the Hessian is only defined on "
                "fixed data. Use shuffle=False and no random augmentation in the loader, or pass a tuple (X, y)")
