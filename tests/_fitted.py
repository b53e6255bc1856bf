"""Fitted estimators shared by the result, plotting, CLI and example tests.

Each fit runs once per test session (functools.cache) with the shared FAST
settings, so the compiled sampler is reused across modules. Tests must not
modify the returned objects.
"""

from functools import cache

from hiermask import MaskedHierarchicalRegressor
from hiermask.datasets import make_manufacturing, make_schools

from .conftest import FAST, OLD_MODEL

GROUP = "Product_Group"


@cache
def manufacturing_fit(pooling="partial"):
    """The manufacturing example (200 rows) fitted with ``pooling``."""
    X, y = make_manufacturing(200, random_state=0)
    est = MaskedHierarchicalRegressor(
        group_col=GROUP,
        pooling=pooling,
        on_bad_convergence="ignore",
        **OLD_MODEL,
        **FAST,
    ).fit(X, y)
    return est, X, y


@cache
def schools_fit():
    """The eight-schools data (intercept-only model), partial pooling."""
    X, y = make_schools(random_state=0)
    est = MaskedHierarchicalRegressor(
        group_col="school", on_bad_convergence="ignore", **FAST
    ).fit(X, y)
    return est, X, y
