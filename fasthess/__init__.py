"""fasthess: exact full-dataset Hessian eigenvalues of PyTorch models, fast enough to track during training."""
__version__ = "0.1.0"

import warnings as _warnings

from fasthess._batch import BatchSpec
from fasthess._ext import backend, build_info
from fasthess._api import lambda_max
from fasthess.blocks import block_lambda_max, module_blocks
from fasthess.density import Density, spectral_density
from fasthess.errors import (BatchDependentModelError, DataChangedError, FasthessError, LossContractError,
                             NonFiniteError, StatefulModelError, StochasticModelError, UnsupportedModelError)
from fasthess.ggn import GGNOperator
from fasthess.hessian import HessianOperator
from fasthess.lanczos import eigs
from fasthess.linop import SymmetricOperator
from fasthess.results import EigResult
from fasthess.sharpness import (MinibatchEstimate, PreconditionedOperator, adam_preconditioner,
                                adam_stability_threshold, batch_sharpness, minibatch_lambda_max,
                                preconditioned_lambda_max)
from fasthess.subset import SubsetSize, SubsetStudy, subset_lambda_max
from fasthess.threshold import Decision, StabilityThreshold, compare_lambda_max, stability_threshold
from fasthess.trace import TraceResult, trace
from fasthess.records import SharpnessRecord
from fasthess.track import SharpnessTracker, sharpness_mode
from fasthess.from_subset import SubsampledEigResult
from fasthess.from_subset import eigs_subsampled as eigs_from_subset

from fasthess import distributed, from_subset, integrations  # public submodules: fasthess.distributed.shard, ...

__all__ = [
    # one-call entry points (model, loss_fn, data)
    "lambda_max", "block_lambda_max", "subset_lambda_max", "batch_sharpness", "minibatch_lambda_max",
    # operators and how a batch is read
    "HessianOperator", "GGNOperator", "PreconditionedOperator", "SymmetricOperator", "BatchSpec",
    "adam_preconditioner", "module_blocks",
    # solvers on an operator
    "eigs", "eigs_from_subset", "compare_lambda_max", "preconditioned_lambda_max", "trace", "spectral_density",
    # tracking during training
    "SharpnessTracker", "SharpnessRecord", "sharpness_mode", "stability_threshold", "adam_stability_threshold",
    # results
    "EigResult", "SubsampledEigResult", "Decision", "StabilityThreshold", "TraceResult", "Density",
    "MinibatchEstimate", "SubsetStudy", "SubsetSize",
    # errors
    "FasthessError", "LossContractError", "BatchDependentModelError", "UnsupportedModelError",
    "StochasticModelError", "StatefulModelError", "NonFiniteError", "DataChangedError",
    # build
    "backend", "build_info",
]


def __getattr__(name: str):
    """Deprecated top-level names, kept for one release."""
    if name == "MatrixOperator":
        from fasthess._deprecation import warn_deprecated

        warn_deprecated("fasthess.MatrixOperator is a test helper and leaves the top-level API; import it from "
                        "fasthess.linop", stacklevel=2)
        from fasthess.linop import MatrixOperator

        return MatrixOperator
    if name == "warm":
        import importlib

        return importlib.import_module("fasthess.warm")  # warns: the module's former name
    raise AttributeError(f"module 'fasthess' has no attribute {name!r}")
