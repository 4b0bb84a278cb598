"""The former name of :mod:`fasthess.from_subset` (a solve explored on a data subset, certified on all of it; "warm"
suggested the tracker's warm start). Importing it warns; it goes in the next release."""
from fasthess._deprecation import warn_deprecated
from fasthess.from_subset import SubsampledEigResult, eigs_subsampled, subsample_operator

__all__ = ["SubsampledEigResult", "eigs_subsampled", "subsample_operator"]

warn_deprecated("fasthess.warm is now fasthess.from_subset (eigs_subsampled is also fasthess.eigs_from_subset)",
                stacklevel=2)
