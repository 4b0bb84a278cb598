"""Data sources as a re-iterable stream of chunks.

The operator needs to visit the whole data set once per Hessian-vector-product block, always in
the same order and with the same chunks. :class:`ChunkedData` turns the accepted inputs into
that stream of :class:`Chunk` objects (the raw batch and its :class:`fasthess._batch.Batch`):

* a tuple ``(X, y)`` or ``(X, y, w)`` of tensors (``w``: one weight per example), cut into chunks of
  ``batch_size`` rows (moved to the model's device once, so a pass makes no host copies);
* a ``torch.utils.data.Dataset``, read through a non-shuffling ``DataLoader`` of ``batch_size``;
* any re-iterable of batches, such as a ``DataLoader`` (its own batching is kept): ``(x, y)``, ``(x, y, w)``,
  dicts (Hugging Face style) or whatever a :class:`fasthess.BatchSpec` reads.

It also fingerprints every chunk on the first pass, so a later pass can prove it saw the same data: each tensor
of the batch, viewed as a (rows, features) matrix M, gives uᵀ M r for fixed Gaussian vectors u and r (float64, on
the device). Unlike a sum, this sees reordered rows and features; a shuffling loader or random augmentation is
detected instead of silently producing a wrong operator.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from fasthess._batch import Batch, BatchSpec, move, tensors_of
from fasthess.errors import DataChangedError, FasthessError

DEFAULT_CHUNK = 1024
FINGERPRINT_SEED = 0x5EED


def is_tensor_pair(data) -> bool:
    """True for a tuple/list ``(X, y)`` of two tensors."""
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)


def is_tensor_tuple(data) -> bool:
    """True for a tuple/list ``(X, y)`` or ``(X, y, w)`` of tensors: data held in memory."""
    return isinstance(data, (tuple, list)) and len(data) in (2, 3) and all(isinstance(t, torch.Tensor) for t in data)


def _data_tuple_problem(data) -> str | None:
    """What keeps a tuple or list that holds a data array from being a tuple (X, y) or (X, y, w) of tensors (None
    when it holds none: then it may be a list of batches)."""
    if not isinstance(data, (tuple, list)) or not any(isinstance(t, torch.Tensor) or _is_numpy(t) for t in data):
        return None
    if any(_is_numpy(t) for t in data):
        return "it holds numpy arrays; convert them with torch.as_tensor(X), torch.as_tensor(y)"
    if len(data) == 1:
        return "it has one entry (X,) and no targets; pass (X, y)"
    if len(data) > 3:
        return f"it has {len(data)} entries; pass (X, y) or (X, y, w), or a BatchSpec with a list of batches"
    entry = next(i for i, t in enumerate(data) if not isinstance(t, torch.Tensor))
    held = data[entry]
    rows = {t.shape[0] for t in data if isinstance(t, torch.Tensor) and t.dim() > 0}
    if isinstance(held, (tuple, list)) and held and \
            all(isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] in rows for t in held):
        part = "inputs" if entry == 0 else "targets"
        return (f"entry {entry} is a {type(held).__name__} of {len(held)} tensors (several {part}), which batch_size "
                "cannot cut; pass the batches yourself as a DataLoader or a list of batches, e.g. [((x, mask), y), "
                "...] (nested inputs are called as model(x, mask)), and name any extra targets with "
                "batch=fasthess.BatchSpec(targets=...)")
    return (f"entry {entry} is a {type(held).__name__}, not a tensor; stack its rows into one tensor "
            "(torch.stack(rows) for a list of row tensors, torch.as_tensor for numbers)")


def _is_numpy(t) -> bool:
    return type(t).__module__ == "numpy" and hasattr(t, "shape")


def _has_remainder(loader: DataLoader) -> bool:
    """A loader over a sized dataset whose length is not a multiple of its batch size (True when unknown)."""
    try:
        return loader.batch_size is None or len(loader.dataset) % loader.batch_size != 0
    except TypeError:
        return True


def is_batched_iterable(data) -> bool:
    """True for iterables of ready-made batches (a DataLoader), whose batches are the chunks."""
    return isinstance(data, DataLoader) or not (is_tensor_tuple(data) or isinstance(data, Dataset))


def _without_seed_draws(source: Iterable) -> Iterator:
    """Iterate ``source``, putting the default CPU generator back after its iterator is made and its first batch
    read. A DataLoader without a generator draws its base seed there (and a shuffling sampler its seed) from the
    caller's generator, and a computation must not change the caller's random state. Later batches are not wrapped:
    random augmentation must still change the data between passes, which the fingerprints then refuse."""
    state = torch.random.get_rng_state()
    try:
        iterator = iter(source)
        first = next(iterator, _END)
    finally:
        torch.random.set_rng_state(state)
    if first is _END:
        return
    yield first
    yield from iterator


_END = object()


@dataclass(frozen=True)
class Chunk:
    """One chunk of a pass: its number, the raw batch as the source gave it (on the device) and its reading."""

    index: int
    raw: Any
    batch: Batch


class Projection:
    """Fixed random vectors per length: the fingerprint uᵀ M r of a tensor viewed as a (rows, features) matrix."""

    def __init__(self, device: torch.device) -> None:
        self.device, self._vectors = device, {}

    def _vector(self, length: int, salt: int) -> torch.Tensor:
        key = (length, salt)
        if key not in self._vectors:
            gen = torch.Generator().manual_seed(FINGERPRINT_SEED + 2 * length + salt)
            self._vectors[key] = torch.randn(length, generator=gen, dtype=torch.float64).to(self.device)
        return self._vectors[key]

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        M = t.detach().reshape(t.shape[0] if t.dim() else 1, -1).to(device=self.device, dtype=torch.float64)
        if M.numel() == 0:
            return torch.zeros((), dtype=torch.float64, device=self.device)
        return self._vector(M.shape[0], 0) @ (M @ self._vector(M.shape[1], 1))

class ChunkedData:
    """A re-iterable stream of :class:`Chunk` objects with data-consistency checks.

    ``num_examples`` is N = Σ rows over one pass; it is known after construction for tensors and
    datasets, and after the first pass for other iterables.
    """

    def __init__(self, data, batch_size: int | None, device: torch.device, spec: BatchSpec | None = None) -> None:
        self.device, self.spec = device, spec or BatchSpec()
        self._fingerprints: torch.Tensor | None = None
        self._sizes: list[tuple] = []
        self._project = Projection(device)
        self._tensors: tuple[torch.Tensor, ...] | None = None
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise FasthessError(f"batch_size must be a positive integer, got {batch_size!r}")
        if is_tensor_tuple(data):
            if any(t.dim() == 0 for t in data):
                raise FasthessError("a data tensor is 0-dim, so there is no example dimension; give X and y a leading "
                                    "batch dimension (e.g. y.reshape(1)), one row per example")
            if len({t.shape[0] for t in data}) > 1:
                raise FasthessError(f"the data tensors have different lengths ({[t.shape[0] for t in data]}); pass "
                                    "matching tensors (X, y) or (X, y, w)")
            if data[0].shape[0] == 0:
                raise FasthessError("the data is empty (0 examples); pass at least one example")
            self._tensors = tuple(move(t, device) for t in data)
            self.batch_size = batch_size or min(DEFAULT_CHUNK, data[0].shape[0])
            self._source: Iterable | None = None
            self.num_examples: int | None = data[0].shape[0]
        elif isinstance(data, IterableDataset):  # no length: batched by a loader, counted on the first pass
            self.batch_size = batch_size or DEFAULT_CHUNK
            self._source = DataLoader(data, batch_size=self.batch_size)
            self.num_examples = None
        elif isinstance(data, DataLoader) or not isinstance(data, Dataset):
            if isinstance(data, torch.Tensor) or not isinstance(data, Iterable) or isinstance(data, (dict, str)):
                raise FasthessError(
                    f"data must be a tuple (X, y) or (X, y, w) of tensors, a torch Dataset or an iterable of batches; "
                    f"got {type(data).__name__}")
            if not isinstance(data, DataLoader) and iter(data) is data:  # iter() of a loader would start workers
                raise FasthessError(
                    "data is a one-shot iterator; the Hessian needs one pass per product. Pass a DataLoader, "
                    "a list of batches or a tuple (X, y)")
            bad_tuple = _data_tuple_problem(data)
            if batch_size is not None and bad_tuple is not None:
                raise FasthessError(f"data was given with batch_size, so it is read as a tuple (X, y) or (X, y, w) of "
                                    f"tensors, but {bad_tuple}")
            if batch_size is not None:
                raise FasthessError(
                    "batch_size was given together with an iterable of batches; the iterable's own batches are the "
                    "chunks. Drop batch_size, or pass a Dataset or a tuple (X, y) instead")
            if isinstance(data, DataLoader) and data.drop_last and _has_remainder(data):
                warnings.warn("the DataLoader drops its last, incomplete batch (drop_last=True), so the Hessian is "
                              "that of the examples it yields, not of the whole data set; pass a loader with "
                              "drop_last=False (and shuffle=False) for the whole data set", RuntimeWarning, stacklevel=4)
            self._source, self.batch_size, self.num_examples = data, None, None
        else:
            if len(data) == 0:
                raise FasthessError("the dataset is empty (0 examples); pass at least one example")
            self.batch_size = batch_size or min(DEFAULT_CHUNK, len(data))
            self._source = DataLoader(data, batch_size=self.batch_size, shuffle=False)
            self.num_examples = len(data)

    @property
    def one_chunk(self) -> bool:
        """Is the whole data one chunk (in-memory tensors within one ``batch_size``, a list of one batch, a loader or
        dataset of one batch)? Then the loss on the whole data as one batch is the one chunk's, whatever the forward
        mixes."""
        if self._tensors is not None:
            return self._tensors[0].shape[0] <= self.batch_size
        if isinstance(self._source, DataLoader) and not isinstance(self._source.dataset, IterableDataset):
            return len(self._source) == 1
        return isinstance(self._source, (list, tuple)) and len(self._source) == 1

    @property
    def resident(self) -> list[torch.Tensor]:
        """The in-memory data tensors (empty for a loader or dataset): alive anyway, so no kept graph owns them."""
        return list(self._tensors or ())

    def take(self, index: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The in-memory data restricted to the rows ``index`` (None for a loader or dataset)."""
        return None if self._tensors is None else tuple(t[index.to(t.device)] for t in self._tensors)

    def _raw(self) -> Iterator:
        if self._tensors is not None:
            for start in range(0, self._tensors[0].shape[0], self.batch_size):
                yield tuple(t[start:start + self.batch_size] for t in self._tensors)
            return
        for batch in _without_seed_draws(self._source):
            yield move(batch, self.device)

    def _fingerprint(self, raw, batch: Batch) -> tuple[list[torch.Tensor], tuple]:
        """The projections of the chunk's tensors (on the device) and its sizes (on the host)."""
        prints = [self._project(t) for t in tensors_of(raw)]
        count = batch.count
        if isinstance(count, torch.Tensor):
            prints.append(count.detach().double().reshape(()).to(self.device))
            count = None
        return prints, (batch.rows, count)

    def chunks(self) -> Iterator[Chunk]:
        """Yield the :class:`Chunk` objects of one pass, checking the data against the first pass.

        Empty batches are skipped and not numbered: ``index`` counts the chunks yielded.
        """
        prints, sizes = [], []
        for raw in self._raw():
            batch = self.spec.read(raw)
            if batch.rows == 0:
                continue
            values, size = self._fingerprint(raw, batch)
            prints += values
            sizes.append(size)
            yield Chunk(len(sizes) - 1, raw, batch)
        if not sizes:
            raise FasthessError("the data yielded no examples; pass a non-empty data set")
        self._check_same(torch.stack(prints) if prints else torch.zeros(0), sizes)

    def _check_same(self, prints: torch.Tensor, sizes: list[tuple]) -> None:
        """One host sync per pass: the fingerprints and sizes must be those of the first pass."""
        if self._fingerprints is None:
            self._fingerprints, self._sizes = prints, sizes
            self.num_examples = sum(rows for rows, _ in sizes)
            return
        same = sizes == self._sizes and prints.shape == self._fingerprints.shape and bool(torch.allclose(
            prints, self._fingerprints, rtol=1e-12, atol=0.0, equal_nan=True))
        if not same:
            raise DataChangedError(
                "the data changed between two passes (different batches, values or order); the Hessian is only "
                "defined on fixed data. Use shuffle=False and no random augmentation in the loader, or pass a tuple "
                "(X, y)")
