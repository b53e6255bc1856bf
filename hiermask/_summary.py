"""Posterior summaries and ArviZ conversion of a fitted estimator.

Both functions read the fitted state of a
:class:`~hiermask.MaskedHierarchicalRegressor` (``groups_``, ``posterior_``,
the mask and the sampler statistics) and never refit anything. Parameters
that do not exist, the coefficients of (group, feature) pairs switched off by
the mask and the population parameters of features that are off in every
group, are left out of the summary and are NaN in the ArviZ posterior: they
are not silently reported as draws of 0.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ._diagnostics import parameter_diagnostics

__all__ = ["interval_labels", "summary_frame", "to_inference_data"]

#: Install hint given when the optional ArviZ extra is missing.
ARVIZ_HINT = 'to_arviz() needs ArviZ: pip install "hiermask[arviz]"'


def _check_coverage(coverage):
    try:
        ok = 0.0 < float(coverage) < 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"coverage must be a number in (0, 1), got {coverage!r}.")
    return float(coverage)


def _percent(q):
    # 0.05 -> "5%", 0.025 -> "2.5%", 0.95 -> "95%"
    return f"{round(100.0 * q, 6):g}%"


def interval_labels(coverage):
    """Column names of the central interval of mass ``coverage``.

    Parameters
    ----------
    coverage : float in (0, 1)
        Mass of the central interval.

    Returns
    -------
    lower, upper : str
        For example ``"5%"`` and ``"95%"`` for ``coverage=0.9``.
    """
    coverage = _check_coverage(coverage)
    tail = (1.0 - coverage) / 2.0
    return _percent(tail), _percent(1.0 - tail)


def _blocks(est):
    """Yield ``(row names, draws of shape (n_draws, k))`` per parameter block.

    Only parameters that exist are yielded: masked coefficients and the
    population parameters of features that are off in every group are left
    out.
    """
    draws = est.posterior_
    groups = [str(g) for g in est.groups_]
    names = list(est._feature_names)
    mask = np.asarray(est._mask, dtype=bool)
    active = np.flatnonzero(mask.any(axis=0))

    yield [f"intercept[{g}]" for g in groups], draws["intercept"]
    gs, js = np.nonzero(mask)
    yield (
        [f"coef[{groups[g]}, {names[j]}]" for g, j in zip(gs, js, strict=True)],
        draws["coef"][:, gs, js],
    )
    if "population_intercept" in draws:
        yield ["population_intercept"], draws["population_intercept"][:, None]
    if "population_coef" in draws:
        yield (
            [f"population_coef[{names[j]}]" for j in active],
            draws["population_coef"][:, active],
        )
    if "group_intercept_scale" in draws:
        yield ["group_intercept_scale"], draws["group_intercept_scale"][:, None]
    if "group_coef_scale" in draws:
        yield (
            [f"group_coef_scale[{names[j]}]" for j in active],
            draws["group_coef_scale"][:, active],
        )
    yield ["noise"], draws["noise"][:, None]


def summary_frame(est, coverage=0.9):
    """Posterior summary of every parameter of a fitted estimator.

    Parameters
    ----------
    est : MaskedHierarchicalRegressor
        A fitted estimator.
    coverage : float in (0, 1), default=0.9
        Mass of the central interval reported.

    Returns
    -------
    pandas.DataFrame
        One row per parameter, indexed by readable names:
        ``intercept[<group>]``, ``coef[<group>, <feature>]`` (only the pairs
        that the mask switches on), ``population_intercept``,
        ``population_coef[<feature>]``, ``group_intercept_scale``,
        ``group_coef_scale[<feature>]`` (the population-level rows only where
        the pooling has them) and ``noise``. Columns: ``mean``, ``sd`` (with
        ``ddof=1``), the interval bounds named after their quantiles (``5%``
        and ``95%`` for ``coverage=0.9``), ``ess_bulk``, ``ess_tail`` and
        ``r_hat`` (rank-normalized split R-hat, Vehtari et al. 2021; NaN for
        a parameter that is constant across draws).

    Raises
    ------
    ValueError
        If ``coverage`` is not in (0, 1).

    Notes
    -----
    Every column is computed from the draws in ``est.posterior_``. The
    fitted attributes ``coef_`` and ``intercept_`` of the collapsed engine
    are Rao-Blackwellized (averages of exact conditional means), so they can
    differ from the ``mean`` column by a fraction of the Monte Carlo error.

    Examples
    --------
    >>> from hiermask import MaskedHierarchicalRegressor
    >>> from hiermask.datasets import make_manufacturing
    >>> X, y = make_manufacturing(200, random_state=0)
    >>> est = MaskedHierarchicalRegressor(
    ...     group_col="Product_Group", num_warmup=150, num_samples=150,
    ...     num_chains=2, random_state=0, on_bad_convergence="ignore",
    ... ).fit(X, y)
    >>> round(float(est.summary().loc["coef[Product_Group_1, Feed_Speed]", "mean"]), 1)
    2.5
    >>> "coef[Product_Group_1, Cutting_Wait_Time]" in est.summary().index
    False
    """
    lower, upper = interval_labels(coverage)
    tail = (1.0 - float(coverage)) / 2.0
    n_chains = int(est._posterior.n_chains)
    index, parts = [], []
    for names, values in _blocks(est):
        if not names:
            continue
        values = np.asarray(values, dtype=np.float64)
        n_draws = values.shape[0]
        mean = values.mean(axis=0)
        sd = values.std(axis=0, ddof=1) if n_draws > 1 else np.full(len(names), np.nan)
        lo, hi = np.quantile(values, [tail, 1.0 - tail], axis=0)
        chains = values.reshape(n_chains, n_draws // n_chains, len(names))
        r_hat, ess_bulk, ess_tail = parameter_diagnostics(chains)
        index.extend(names)
        parts.append(np.column_stack([mean, sd, lo, hi, ess_bulk, ess_tail, r_hat]))
    columns = ["mean", "sd", lower, upper, "ess_bulk", "ess_tail", "r_hat"]
    table = np.concatenate(parts, axis=0) if parts else np.zeros((0, len(columns)))
    return pd.DataFrame(table, index=pd.Index(index, name="parameter"), columns=columns)


def _import_arviz():
    try:
        import arviz
    except ImportError as exc:
        raise ImportError(ARVIZ_HINT) from exc
    return arviz


def _coord_values(labels):
    # Numbers stay numbers; anything else (or a mix) becomes str so that the
    # InferenceData can be written to netCDF.
    values = list(labels)
    if values and all(
        isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
        for v in values
    ):
        return np.asarray(values)
    return np.asarray([str(v) for v in values], dtype=str)


def _version():
    from . import __version__

    return __version__


def to_inference_data(est):
    """The posterior of a fitted estimator as an :class:`arviz.InferenceData`.

    Parameters
    ----------
    est : MaskedHierarchicalRegressor
        A fitted estimator.

    Returns
    -------
    arviz.InferenceData
        With groups

        - ``posterior``: ``intercept`` (chain, draw, group), ``coef`` (chain,
          draw, group, feature; NaN where the mask switches the feature off
          for the group), ``noise`` (chain, draw) and, where the pooling has
          them, ``population_intercept``, ``population_coef`` (chain, draw,
          feature), ``group_intercept_scale`` and ``group_coef_scale``
          (chain, draw, feature); population-level values of features that
          are off in every group are NaN. Coordinates ``group`` and
          ``feature`` hold the group labels and feature names.
        - ``sample_stats``: ``diverging`` (bool), ``n_steps`` (leapfrog
          steps) and ``tree_depth`` (``ceil(log2(n_steps + 1))``), all
          (chain, draw).
        - ``observed_data``: ``y`` (obs_id), the target used in fit.
        - ``constant_data``: ``mask`` (group, feature), True where the
          feature applies to the group.

        With ArviZ 1.x, whose containers are :class:`xarray.DataTree`, a
        DataTree with the same groups.

    Raises
    ------
    ImportError
        If ArviZ is not installed; the message says
        ``pip install "hiermask[arviz]"``.
    """
    az = _import_arviz()
    import xarray as xr

    draws = est.posterior_
    n_chains = int(est._posterior.n_chains)
    n_draws = draws["noise"].shape[0] // n_chains
    mask = np.asarray(est._mask, dtype=bool)
    active = mask.any(axis=0)
    coords = {
        "chain": np.arange(n_chains),
        "draw": np.arange(n_draws),
        "group": _coord_values(est.groups_),
        "feature": np.asarray([str(n) for n in est._feature_names], dtype=str),
    }

    def per_chain(values):
        values = np.asarray(values, dtype=np.float64)
        return values.reshape(n_chains, n_draws, *values.shape[1:])

    coef = np.where(mask, draws["coef"], np.nan)
    variables = {
        "intercept": (("chain", "draw", "group"), per_chain(draws["intercept"])),
        "coef": (("chain", "draw", "group", "feature"), per_chain(coef)),
    }
    if "population_intercept" in draws:
        variables["population_intercept"] = (
            ("chain", "draw"),
            per_chain(draws["population_intercept"]),
        )
    if "population_coef" in draws:
        variables["population_coef"] = (
            ("chain", "draw", "feature"),
            per_chain(np.where(active, draws["population_coef"], np.nan)),
        )
    if "group_intercept_scale" in draws:
        variables["group_intercept_scale"] = (
            ("chain", "draw"),
            per_chain(draws["group_intercept_scale"]),
        )
    if "group_coef_scale" in draws:
        variables["group_coef_scale"] = (
            ("chain", "draw", "feature"),
            per_chain(np.where(active, draws["group_coef_scale"], np.nan)),
        )
    variables["noise"] = (("chain", "draw"), per_chain(draws["noise"]))

    attrs = {
        # hiermask's own NUTS (NumPyro's algorithm) on its own density;
        # NumPyro supplies the direct engine's model and distributions
        "inference_library": "hiermask (NUTS: NumPyro's algorithm)",
        "inference_library_version": _version(),
        "model_library": "numpyro",
        "model_library_version": _library_version("numpyro"),
        "creation_library": "hiermask",
        "creation_library_version": _version(),
        "pooling": str(est.pooling),
    }
    sample_coords = {k: coords[k] for k in ("chain", "draw")}
    posterior = xr.Dataset(variables, coords=coords, attrs=attrs)

    steps = np.asarray(est._posterior.tree_steps).reshape(n_chains, n_draws)
    diverging = np.asarray(est._posterior.diverging, dtype=bool).reshape(
        n_chains, n_draws
    )
    sample_stats = xr.Dataset(
        {
            "diverging": (("chain", "draw"), diverging),
            "n_steps": (("chain", "draw"), steps.astype(np.int64)),
            "tree_depth": (
                ("chain", "draw"),
                np.ceil(np.log2(steps.astype(np.float64) + 1.0)).astype(np.int64),
            ),
        },
        coords=sample_coords,
        attrs=attrs,
    )
    y = np.asarray(est._fit_target, dtype=np.float64)
    observed = xr.Dataset(
        {"y": (("obs_id",), y)}, coords={"obs_id": np.arange(y.shape[0])}, attrs=attrs
    )
    constant = xr.Dataset(
        {"mask": (("group", "feature"), mask)},
        coords={k: coords[k] for k in ("group", "feature")},
        attrs=attrs,
    )
    groups = {
        "posterior": posterior,
        "sample_stats": sample_stats,
        "observed_data": observed,
        "constant_data": constant,
    }
    if hasattr(az, "InferenceData"):
        return az.InferenceData(**groups)
    return xr.DataTree.from_dict(groups)  # pragma: no cover - ArviZ >= 1.0


def _library_version(name):
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"
