"""hiermask: Bayesian hierarchical regression with NaN-inferred feature masks.

The one public estimator, :class:`MaskedHierarchicalRegressor`, reads which
features apply to which group from the NaN pattern of ``X``, fits a
partially pooled linear model and predicts posterior means, sds, intervals
and draws, also for groups never seen in fit.

The sampler is hiermask's own NUTS, compiled with JAX: NumPyro's algorithm
(multinomial trajectory sampling, the generalized U-turn criterion, Stan's
warmup windows, dual averaging restarted from the current step size after
each window as NumPyro does by default) on a density hiermask writes itself
(:mod:`hiermask._nuts`, :mod:`hiermask._runner`). NumPyro supplies the
direct engine's model and its distributions.
"""

from importlib import metadata as _metadata

from ._cache import enable_compilation_cache, restore_compilation_cache
from ._estimator import (
    ConvergenceError,
    InconsistentVersionWarning,
    MaskedHierarchicalRegressor,
)
from ._files import ModelFileError, load
from ._validation import UnseenGroupWarning

try:
    __version__ = _metadata.version("hiermask")
except _metadata.PackageNotFoundError:  # pragma: no cover - source checkout
    __version__ = "0+unknown"

__all__ = [
    "ConvergenceError",
    "InconsistentVersionWarning",
    "MaskedHierarchicalRegressor",
    "ModelFileError",
    "UnseenGroupWarning",
    "__version__",
    "enable_compilation_cache",
    "load",
    "restore_compilation_cache",
]
