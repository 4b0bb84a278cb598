"""Exceptions raised by fasthess.

Every error names the problem and the fix. ``FasthessError`` subclasses ``ValueError`` so code
that already guards against bad arguments keeps working.
"""
from __future__ import annotations


class FasthessError(ValueError):
    """Bad input or a state in which fasthess cannot return a correct number."""


class NonFiniteError(FasthessError):
    """A loss, a weight, a data value or a Hessian-vector product is NaN or infinite."""


class DataChangedError(FasthessError):
    """The data iterable yielded different batches on two passes (shuffling or random augmentation)."""


class StochasticModelError(FasthessError):
    """The model is random in its current mode (dropout in train mode), so its Hessian is not a fixed matrix."""


class LossContractError(FasthessError):
    """The loss is not the Hessian's loss contract: an average (or sum) over examples of a function of the model's
    output alone (it depends on the batch, reads the parameters outside the forward, or is an unsupported form)."""


class BatchDependentModelError(LossContractError):
    """The model's forward mixes the examples of a batch (an example's output depends on the other examples of its
    chunk), so the chunked operator would be a ghost-batch Hessian, not that of the loss on the whole data."""


class StatefulModelError(FasthessError):
    """The model's forward changes state it reads (a buffer or its own input, in place), so its output is not a
    fixed function of θ on fixed data, e.g. spectral_norm's power-iteration vector in train mode."""


class UnsupportedModelError(FasthessError):
    """The model's forward uses a construct whose second derivatives PyTorch does not give (correctly), e.g.
    ``torch.utils.checkpoint(..., use_reentrant=True)``."""
