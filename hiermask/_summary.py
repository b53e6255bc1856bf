"""Posterior summaries and ArviZ conversion of a fitted estimator.

Every function reads the fitted model of a
:class:`~hiermask.MaskedHierarchicalRegressor` (a
:class:`~hiermask._fitted.FittedModel`: draws, mask, labels and sampler
statistics) and never refits anything. Parameters
that do not exist, the coefficients of (group, feature) pairs switched off by
the mask and the population parameters of features that are off in every
group, are left out of the summary and are NaN in the ArviZ posterior: they
are not silently reported as draws of 0.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ._diagnostics import parameter_diagnostics
from ._fit import GROUP_SITES
from ._parameters import row_name

__all__ = [
    "interval_labels",
    "pointwise_log_likelihood",
    "summary_frame",
    "to_inference_data",
    "varying_note",
]

#: Rows per chunk of the pointwise log-likelihood.
LOG_LIKELIHOOD_CHUNK = 256

#: The columns that name a row of ``summary(long=True)``.
LONG_COLUMNS = ("parameter", "group", "feature")

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


def varying_note(model):
    """One line that says which slopes vary by group and which are
    population-only, and why (``varying="auto"``).

    Parameters
    ----------
    model : FittedModel
        A fitted model (:func:`hiermask._fitted.fitted_model`).

    Returns
    -------
    str
    """
    if model.pooling == "complete":
        return "pooling='complete': one slope per feature, shared by every group."
    active = model.mask.any(axis=0)
    names = [str(n) for n in model.feature_names]
    yes = [n for n, v in zip(names, model.varying, strict=True) if v]
    no = [
        n for n, v, a in zip(names, model.varying, active, strict=True) if a and not v
    ]
    setting = model.varying_setting
    setting = setting if isinstance(setting, str) else list(setting)
    line = f"varying={setting!r}: group-specific slopes for " + (
        ", ".join(yes) if yes else "no feature (varying intercept only)"
    )
    if no:
        why = (
            " (constant within every group: group-level predictors)"
            if setting == "auto"
            else ""
        )
        line += "; population slope only for " + ", ".join(no) + why
    if model.pooling == "partial":
        line += f"; group_covariance={model.group_covariance!r}"
        if model.group_covariance == "full" and "group_correlation" not in (
            model.draws
        ):
            line += (
                " (fitted as 'diagonal': fewer groups than correlated effects, "
                "see the fit's warning)"
            )
    return line + "."


def _diagnostics(model, block):
    """R-hat, bulk and tail ESS of a block's rows: those the fit computed
    are reused, the others (group-level rows of large models) computed."""
    known = model.posterior.diagnostics
    keys = block.keys
    out = np.full((len(keys), 3), np.nan)
    missing = [i for i, key in enumerate(keys) if key not in known]
    for i, key in enumerate(keys):
        if key in known:
            out[i] = known[key]
    if missing:
        values = np.asarray(block.draws[:, missing], dtype=np.float64)
        chains = values.reshape(model.n_chains, -1, len(missing))
        out[missing] = np.column_stack(parameter_diagnostics(chains))
    return out


def _block_rows(values, tail):
    # mean, sd, interval bounds of a block's draws (n_draws, n_rows)
    n_draws = values.shape[0]
    mean = values.mean(axis=0)
    sd = values.std(axis=0, ddof=1) if n_draws > 1 else np.full(mean.shape, np.nan)
    lo, hi = np.quantile(values, [tail, 1.0 - tail], axis=0)
    return [mean, sd, lo, hi]


def _moment_rows(model, block, tail):
    # A group block's rows from each group's exact posterior moments: mean,
    # sd, a normal interval, no diagnostics (a fit without group draws).
    col = 0 if block.parameter == "intercept" else 1 + np.asarray(block.index[1])
    rows = model.moment_intervals(block.index[0], col, tail)
    nan = np.full(rows[0].shape, np.nan)
    return [*rows, nan, nan, nan]


def summary_frame(model, coverage=0.9, *, long=False, group_level=True):
    """Posterior summary of every parameter of a fitted model.

    Parameters
    ----------
    model : FittedModel
        A fitted model (:func:`hiermask._fitted.fitted_model`).
    coverage : float in (0, 1), default=0.9
        Mass of the central interval reported.
    long : bool, default=False
        Whether to index the rows by position, with columns ``parameter``,
        ``group`` and ``feature`` (None where a row has no group or feature)
        in front, ready for ``set_index`` or a groupby.
    group_level : bool, default=True
        Whether to include the rows of the group intercepts and
        coefficients; False gives the population-level rows only, in time
        independent of the number of groups.

    Returns
    -------
    pandas.DataFrame
        One row per parameter, indexed by readable names:
        ``intercept[<group>]``, ``coef[<group>, <feature>]`` (only the pairs
        that the mask switches on), ``population_intercept``,
        ``population_coef[<feature>]``, ``group_intercept_scale``,
        ``group_coef_scale[<feature>]`` (the population-level rows only where
        the pooling has them; ``group_coef_scale`` only for the features
        with a group-specific slope), ``group_correlation[<a>, <b>]`` (each
        pair of correlated group effects, under ``group_covariance="full"``)
        and ``noise``. ``attrs["varying"]`` holds one line that says which
        slopes vary by group (what ``varying="auto"`` chose). Columns:
        ``mean``, ``sd`` (with ``ddof=1``), the interval bounds named after
        their quantiles (``5%`` and ``95%`` for ``coverage=0.9``),
        ``ess_bulk``, ``ess_tail`` and ``r_hat`` (rank-normalized split
        R-hat, Vehtari et al. 2021; NaN for a parameter that is constant
        across draws).

    Raises
    ------
    ValueError
        If ``coverage`` is not in (0, 1).

    Notes
    -----
    Every column is computed from the draws in ``posterior_``; the
    diagnostics that fit computed for its convergence check are reused.
    When fit did not keep the group draws (``keep_group_draws``), the rows
    of the group intercepts and coefficients come from each group's exact
    posterior mean and covariance instead: ``mean`` and ``sd`` are exact
    (not Monte Carlo estimates), the interval is the normal one with that
    mean and sd, and ``ess_bulk``, ``ess_tail`` and ``r_hat`` are NaN; no
    group draw is made. The
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
    labels, parts = [], []
    kept = model.kept_group_draws
    for block in model.blocks(group_level, group_draws=kept):
        if not block.draws.shape[1]:
            continue
        labels += model.labels(block)
        if not kept and block.parameter in GROUP_SITES:
            parts.append(np.column_stack(_moment_rows(model, block, tail)))
            continue
        values = np.asarray(block.draws, dtype=np.float64)
        r_hat, ess_bulk, ess_tail = _diagnostics(model, block).T
        stats = _block_rows(values, tail) + [ess_bulk, ess_tail, r_hat]
        parts.append(np.column_stack(stats))
    columns = ["mean", "sd", lower, upper, "ess_bulk", "ess_tail", "r_hat"]
    table = np.concatenate(parts, axis=0) if parts else np.zeros((0, len(columns)))
    if long:
        ids = pd.DataFrame(labels, columns=list(LONG_COLUMNS), dtype=object)
        out = pd.concat([ids, pd.DataFrame(table, columns=columns)], axis=1)
    else:
        index = pd.Index([row_name(*label) for label in labels], name="parameter")
        out = pd.DataFrame(table, index=index, columns=columns)
    out.attrs["varying"] = varying_note(model)
    return out


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


def pointwise_log_likelihood(model, features, group_idx, y):
    """Log density of each row's target under each posterior draw.

    ``log N(y_i | alpha_g + x_i'beta_g, sigma)`` per draw, with the draws of
    the row's group. A NaN in a feature that applies to the row's group is
    integrated out at its fitted distribution (mean ``x_fill``, variance
    ``x_var``), which adds ``beta_j^2 Var(x_j)`` to the variance. Sample
    weights are not applied: each row is one observation.

    Parameters
    ----------
    model : FittedModel
        A fitted model.
    features : ndarray of shape (n_rows, n_features)
    group_idx : ndarray of shape (n_rows,)
        Fitted group code of each row (every group seen in fit).
    y : ndarray of shape (n_rows,)

    Returns
    -------
    ndarray of shape (n_draws, n_rows)
    """
    draws, post = model.draws, model.posterior
    on = model.mask[group_idx]
    latent = np.isnan(features) & on
    x = np.where(on, np.where(latent, post.x_fill[group_idx], features), 0.0)
    xvar = np.where(latent, post.x_var[group_idx], 0.0)
    sigma2 = draws["noise"][:, None] ** 2
    out = np.empty((sigma2.shape[0], len(y)))
    for start in range(0, len(y), LOG_LIKELIHOOD_CHUNK):
        rows = slice(start, start + LOG_LIKELIHOOD_CHUNK)
        coef = draws["coef"][:, group_idx[rows]]  # (n_draws, rows, p)
        mean = draws["intercept"][:, group_idx[rows]] + np.einsum(
            "drp,rp->dr", coef, x[rows]
        )
        var = sigma2 + np.einsum("drp,rp->dr", coef**2, xvar[rows])
        out[:, rows] = -0.5 * (np.log(2 * np.pi * var) + (y[rows] - mean) ** 2 / var)
    return out


def to_inference_data(model, log_likelihood=None):
    """The posterior of a fitted estimator as an :class:`arviz.InferenceData`.

    Parameters
    ----------
    model : FittedModel
        A fitted model.
    log_likelihood : tuple or None, default=None
        ``(values, y)``: the pointwise log-likelihood, (n_draws, n_rows) as
        :func:`pointwise_log_likelihood` returns it, and the targets of its
        rows; they become the ``log_likelihood`` group (variable ``y``) and
        the observed data.

    Returns
    -------
    arviz.InferenceData
        With groups

        - ``posterior``: ``intercept`` (chain, draw, group), ``coef`` (chain,
          draw, group, feature; NaN where the mask switches the feature off
          for the group), ``noise`` (chain, draw) and, where the pooling has
          them, ``population_intercept``, ``population_coef`` (chain, draw,
          feature), ``group_intercept_scale``, ``group_coef_scale``
          (chain, draw, feature; NaN for the features without a
          group-specific slope) and ``group_correlation`` (chain, draw,
          effect, effect_; coordinates ``intercept`` and the varying
          features, under ``group_covariance="full"``); population-level
          values of features that are off in every group are NaN.
          Coordinates ``group`` and ``feature`` hold the group labels and
          feature names.
        - ``sample_stats``: ``diverging`` (bool), ``n_steps`` (leapfrog
          steps) and ``tree_depth`` (``ceil(log2(n_steps + 1))``), all
          (chain, draw).
        - ``observed_data``: ``y`` (obs_id), the target used in fit (or the
          rows of ``log_likelihood``).
        - ``log_likelihood``: ``y`` (chain, draw, obs_id), with
          ``log_likelihood`` only.
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

    n_chains = model.n_chains
    n_draws = model.draws["noise"].shape[0] // n_chains
    coords = {
        "chain": np.arange(n_chains),
        "draw": np.arange(n_draws),
        "group": _coord_values(model.groups),
        "feature": np.asarray([str(n) for n in model.feature_names], dtype=str),
    }
    attrs = _attributes(model)
    sample = {k: coords[k] for k in ("chain", "draw")}
    y = np.asarray(model.target, dtype=np.float64)
    groups = {
        "posterior": _posterior_dataset(model, coords, attrs),
        "sample_stats": _sample_stats(model, sample, attrs),
    }
    if log_likelihood is not None:
        values, y = log_likelihood
        groups["log_likelihood"] = xr.Dataset(
            {"y": (("chain", "draw", "obs_id"), _per_chain(values, n_chains))},
            coords={**sample, "obs_id": np.arange(y.shape[0])},
            attrs=attrs,
        )
    groups["observed_data"] = xr.Dataset(
        {"y": (("obs_id",), y)}, coords={"obs_id": np.arange(y.shape[0])}, attrs=attrs
    )
    groups["constant_data"] = xr.Dataset(
        {"mask": (("group", "feature"), model.mask)},
        coords={k: coords[k] for k in ("group", "feature")},
        attrs=attrs,
    )
    if hasattr(az, "InferenceData"):
        return az.InferenceData(**groups)
    return xr.DataTree.from_dict(groups)  # pragma: no cover - ArviZ >= 1.0


def _per_chain(values, n_chains):
    # (n_chains * n_draws, ...) -> (n_chains, n_draws, ...), float64
    values = np.asarray(values, dtype=np.float64)
    return values.reshape(n_chains, -1, *values.shape[1:])


def _attributes(model):
    # hiermask's own NUTS (NumPyro's algorithm) on its own density; NumPyro
    # supplies the direct engine's model and distributions
    return {
        "inference_library": "hiermask (NUTS: NumPyro's algorithm)",
        "inference_library_version": _version(),
        "model_library": "numpyro",
        "model_library_version": _library_version("numpyro"),
        "creation_library": "hiermask",
        "creation_library_version": _version(),
        "pooling": str(model.pooling),
    }


def _posterior_dataset(model, coords, attrs):
    """The ``posterior`` group: NaN where a parameter does not exist (a
    switched-off coefficient, the population value of a feature off in
    every group, the between-group sd of a slope that does not vary)."""
    import xarray as xr

    draws, n_chains = model.draws, model.n_chains
    active = model.mask.any(axis=0)
    absent = {
        "coef": model.mask,
        "population_coef": active,
        "group_coef_scale": model.varying & active,
    }
    dims = {
        "intercept": ("group",),
        "coef": ("group", "feature"),
        "population_intercept": (),
        "population_coef": ("feature",),
        "group_intercept_scale": (),
        "group_coef_scale": ("feature",),
        "group_correlation": ("effect", "effect_"),
        "noise": (),
    }
    variables = {}
    for name, dim in dims.items():
        if name not in draws:
            continue
        values = draws[name]
        if name in absent:
            values = np.where(absent[name], values, np.nan)
        variables[name] = (("chain", "draw", *dim), _per_chain(values, n_chains))
    if "group_correlation" in draws:
        effects = np.asarray(model.effects, dtype=str)
        coords = {**coords, "effect": effects, "effect_": effects.copy()}
    return xr.Dataset(variables, coords=coords, attrs=attrs)


def _sample_stats(model, coords, attrs):
    """The ``sample_stats`` group: divergences, leapfrog steps, tree depth."""
    import xarray as xr

    shape = (model.n_chains, -1)
    steps = np.asarray(model.posterior.tree_steps).reshape(shape).astype(np.int64)
    diverging = np.asarray(model.posterior.diverging, dtype=bool).reshape(shape)
    depth = np.ceil(np.log2(steps.astype(np.float64) + 1.0)).astype(np.int64)
    return xr.Dataset(
        {
            "diverging": (("chain", "draw"), diverging),
            "n_steps": (("chain", "draw"), steps),
            "tree_depth": (("chain", "draw"), depth),
        },
        coords=coords,
        attrs=attrs,
    )


def _library_version(name):
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"
