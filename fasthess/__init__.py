"""fasthess: exact full-dataset Hessian eigenvalues of PyTorch models, fast enough to track during training."""
__version__ = "0.1.0"

from fasthess._ext import backend, build_info
from fasthess.api import lambda_max
from fasthess.errors import DataChangedError, FasthessError, NonFiniteError, StochasticModelError
from fasthess.hessian import HessianOperator
from fasthess.lanczos import eigs
from fasthess.linop import MatrixOperator, SymmetricOperator
from fasthess.results import EigResult
from fasthess.track import SharpnessTracker, sharpness_mode

__all__ = [
    "DataChangedError", "EigResult", "FasthessError", "HessianOperator", "MatrixOperator", "NonFiniteError",
    "SharpnessTracker", "StochasticModelError", "SymmetricOperator", "backend", "build_info", "eigs", "lambda_max",
    "sharpness_mode",
]
