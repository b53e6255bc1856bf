"""Fitted estimators and engine inputs shared by several test modules.

Each fit runs once per test session (functools.cache) with the shared FAST
settings, so the compiled sampler is reused across modules. Tests must not
modify the returned objects.

:func:`fit_config` and :func:`engine_data` build the collapsed engine's data
and prior scales directly (no estimator, no sampler), for the oracle tests
of the engine's algebra.
"""

from functools import cache

from hiermask import MaskedHierarchicalRegressor
from hiermask._fit import FitConfig, _collapsed_data, _hyper, _prior_units
from hiermask._stats import compute_scaling
from hiermask.datasets import make_manufacturing, make_schools

from .conftest import FAST, OLD_MODEL

GROUP = "Product_Group"

#: Prior scales of :func:`fit_config` unless given.
UNIT_PRIORS = {
    "coef_prior_scale": 1.0,
    "intercept_prior_scale": 1.0,
    "group_scale_prior": 1.0,
    "noise_prior_scale": 1.0,
}


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


def fit_config(pooling="partial", engine="collapsed", *, standardize=True, **settings):
    """A :class:`~hiermask._fit.FitConfig` for calling an engine directly.

    Unit prior scales (:data:`UNIT_PRIORS`), a one-draw single-chain run and
    seed 0 unless ``settings`` says otherwise.
    """
    base = {
        **UNIT_PRIORS,
        "num_warmup": 1,
        "num_samples": 1,
        "num_chains": 1,
        "target_accept_prob": 0.8,
        "seed": 0,
    }
    return FitConfig(
        pooling=pooling, engine=engine, standardize=standardize, **{**base, **settings}
    )


def engine_data(X, y, w, group_idx, mask, pooling="partial", **settings):
    """The collapsed engine's data and prior scales of weighted rows.

    ``X`` holds NaN where a feature is off (``mask[group_idx]`` false) or a
    cell is latent. ``settings`` go to :func:`fit_config` (prior scales,
    ``standardize``). Returns ``(data, hyper, scaling)`` as NumPy arrays.
    """
    config = fit_config(pooling, **settings)
    scaling = compute_scaling(X, y, w, mask[group_idx])
    ref = _prior_units(scaling, config.standardize)
    data = _collapsed_data(X, y, w, group_idx, mask, scaling, ref)
    return data, _hyper(config, scaling), scaling
