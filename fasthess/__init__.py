"""fasthess: exact full-dataset Hessian eigenvalues of PyTorch models, fast enough to track during training."""
__version__ = "0.1.0"

from fasthess._batch import BatchSpec
from fasthess._ext import backend, build_info
from fasthess._api import lambda_max
from fasthess.density import Density, spectral_density
from fasthess.errors import (DataChangedError, FasthessError, LossContractError, NonFiniteError,
                             StochasticModelError)
from fasthess.ggn import GGNOperator
from fasthess.hessian import HessianOperator
from fasthess.lanczos import eigs
from fasthess.linop import MatrixOperator, SymmetricOperator
from fasthess.results import EigResult
from fasthess.sharpness import (MinibatchEstimate, PreconditionedOperator, adam_preconditioner,
                                adam_stability_threshold, batch_sharpness, minibatch_lambda_max,
                                preconditioned_lambda_max)
from fasthess.trace import TraceResult, trace
from fasthess.track import SharpnessTracker, sharpness_mode

from fasthess import distributed, integrations, warm  # public submodules: fasthess.distributed.shard, ...

__all__ = [
    "BatchSpec", "DataChangedError", "Density", "EigResult", "FasthessError", "GGNOperator", "HessianOperator",
    "LossContractError",
    "MatrixOperator", "MinibatchEstimate", "NonFiniteError", "PreconditionedOperator", "SharpnessTracker",
    "StochasticModelError", "SymmetricOperator", "TraceResult", "adam_preconditioner", "adam_stability_threshold",
    "backend", "batch_sharpness", "build_info", "eigs", "lambda_max", "minibatch_lambda_max",
    "preconditioned_lambda_max", "sharpness_mode", "spectral_density", "trace",
]
