"""From validated arrays to a posterior in original units (no estimator here).

This module prepares the internal data of either engine, runs NUTS, draws
what the collapsed engine integrated out, and converts every draw back to the
units of the data. It takes and returns arrays and small dataclasses only.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace

import jax
import numpy as np

from . import _export, _identify, _limits
from ._collapsed import (
    CollapsedData,
    CollapsedEngine,
    conditional_chunk,
    loc_moments,
)
from ._diagnostics import parameter_diagnostics
from ._model import DirectEngine, Hyper, varying_index
from ._parameters import parameter_blocks
from ._runner import compiled_in_background, map_parts, run_nuts
from ._stats import (
    GroupStats,
    Moments,
    Scaling,
    cell_moments,
    group_statistics,
    pool_moments,
    scaling_from_moments,
    vector_moments,
)
from ._xla import compiler_options, exclusive

__all__ = [
    "FitConfig",
    "FitRows",
    "FitStatistics",
    "GroupDraws",
    "LatentRows",
    "NotInFile",
    "Posterior",
    "fit_posterior",
    "posterior_from_statistics",
]

#: The engines by name.
ENGINES = {"collapsed": CollapsedEngine, "direct": DirectEngine}


@dataclass(frozen=True)
class FitConfig:
    """Settings of one fit, as resolved by the estimator."""

    pooling: str
    engine: str
    standardize: bool
    coef_prior_scale: float
    intercept_prior_scale: float
    group_scale_prior: float
    noise_prior_scale: float
    num_warmup: int
    num_samples: int
    num_chains: int
    target_accept_prob: float
    seed: int
    progress_bar: bool | str = False  # True, False or "auto"
    varying: str | tuple = "all"  # "auto", "all" or one bool per feature
    group_covariance: str = "diagonal"
    lkj_concentration: float = 2.0
    feature_names: tuple | None = None  # for the messages of fit's warnings
    keep_group_draws: bool = True  # collapsed engine: keep group draws at fit


@dataclass(frozen=True)
class LatentRows:
    """The rows that hold latent cells, over the active features.

    Attributes
    ----------
    X : ndarray of shape (n_rows, n_active)
        Their features, NaN where missing or off.
    y, w, group_idx : ndarray of shape (n_rows,)
        Their target, weight and group code.
    """

    X: np.ndarray
    y: np.ndarray
    w: np.ndarray
    group_idx: np.ndarray


@dataclass(frozen=True)
class FitStatistics:
    """Everything the collapsed engine needs from the rows; nothing row-sized
    except the rows that hold latent cells.

    ``n_active`` counts the features that apply to at least one group.

    Attributes
    ----------
    mask : ndarray of shape (n_groups, n_features), bool
        Which features apply to which group (all features).
    scaling : Scaling
        Internal location and scale of the active features and the target.
    stats : GroupStats
        Per-group statistics of the complete rows over the active features,
        computed with ``scaling``; ``incomplete_rows`` is not used.
    latent : LatentRows
        The rows left out of ``stats`` because they hold latent cells.
    cells : Moments
        Per-group moments of the observed cells of the active features,
        shape (n_groups, n_active); entries of off pairs are ignored.
    """

    mask: np.ndarray
    scaling: Scaling
    stats: GroupStats
    latent: LatentRows
    cells: Moments


@dataclass(frozen=True)
class FitRows:
    """What the direct engine needs: every row.

    Attributes
    ----------
    mask : ndarray of shape (n_groups, n_features), bool
        Which features apply to which group (all features).
    scaling : Scaling
        Internal location and scale of the active features and the target.
    rows : LatentRows
        Every row, over the active features.
    """

    mask: np.ndarray
    scaling: Scaling
    rows: LatentRows


@dataclass
class Posterior:
    """A fitted posterior in original units over all input features.

    ``q = n_features + 1``; vectors of length ``q`` hold the intercept first.
    """

    draws: Mapping  # name -> (n_draws, ...) float64: a dict, or GroupDraws
    n_chains: int
    coef_mean: np.ndarray  # (G, q) posterior means
    coef_cov: np.ndarray  # (G, q, q) posterior covariances
    unseen_mean: np.ndarray | None  # (q,) population mean of a new group
    unseen_cov: np.ndarray | None  # (q, q) its covariance (tau^2 included)
    noise_var: float  # E[sigma^2]
    x_fill: np.ndarray  # (G, p) E[x] for a NaN in an applicable cell
    x_var: np.ndarray  # (G, p) Var[x] for such a cell
    x_fill_population: np.ndarray  # (p,) same for unseen groups
    x_var_population: np.ndarray  # (p,)
    prior_reference: dict  # prior location/scale in original units ("none")
    diagnostics: dict  # name -> (r_hat, ess_bulk, ess_tail) arrays
    diverging: np.ndarray  # (n_chains, n_draws)
    tree_steps: np.ndarray  # (n_chains, n_draws)
    timings: dict  # the sampler's seconds (RunResult.timings)
    varying: np.ndarray | None = None  # (p,) bool: group-specific slope


def _prior_units(scaling: Scaling, standardize: bool):
    if standardize:
        return scaling.y_mean, scaling.y_scale, scaling.x_mean, scaling.x_scale
    p = scaling.x_mean.shape[0]
    return 0.0, 1.0, np.zeros(p), np.ones(p)


def _hyper(config: FitConfig, scaling: Scaling) -> Hyper:
    _, py, _, px = _prior_units(scaling, config.standardize)
    r_y = py / scaling.y_scale
    r = (py / px) * (scaling.x_scale / scaling.y_scale)
    return Hyper(
        coef=config.coef_prior_scale * r,
        intercept=np.asarray(config.intercept_prior_scale * r_y),
        group_coef=config.group_scale_prior * r,
        group_intercept=np.asarray(config.group_scale_prior * r_y),
        noise=np.asarray(config.noise_prior_scale * r_y),
        lkj=np.asarray(float(config.lkj_concentration)),
    )


def _collapsed_data(X, y, w, group_idx, mask, scaling, ref) -> CollapsedData:
    # The collapsed engine's data of rows X (active features) and mask (active).
    stats = group_statistics(X, y, w, group_idx, mask, scaling)
    rows = stats.incomplete_rows
    latent = LatentRows(X[rows], y[rows], w[rows], group_idx[rows])
    fit_stats = FitStatistics(mask, scaling, stats, latent, None)
    return CollapsedEngine().prepare(fit_stats, ref)


def _to_original(coef_internal, on, scaling):
    """Internal group coefficients (..., G, q) -> intercept (..., G), slopes."""
    s_y = scaling.y_scale
    b0 = coef_internal[..., 0]
    b = coef_internal[..., 1:] * on
    k = scaling.x_mean / scaling.x_scale
    slopes = b * (s_y / scaling.x_scale)
    intercept = scaling.y_mean + s_y * (b0 - np.sum(b * k, axis=-1))
    return intercept, slopes


def _linear_maps(on, scaling):
    """Per-group matrices T with original = offset + T @ internal."""
    n_groups, p = on.shape
    s_y = scaling.y_scale
    T = np.zeros((n_groups, p + 1, p + 1))
    T[:, 0, 0] = s_y
    T[:, 0, 1:] = -s_y * on * (scaling.x_mean / scaling.x_scale)
    idx = np.arange(1, p + 1)
    T[:, idx, idx] = on * (s_y / scaling.x_scale)
    return T


def _expand(values, active, axis=-1):
    """Put values over active features back into all features (0 elsewhere)."""
    shape = list(values.shape)
    shape[axis] = active.shape[0]
    out = np.zeros(shape)
    index = [slice(None)] * len(shape)
    index[axis] = np.flatnonzero(active)
    out[tuple(index)] = values
    return out


def _impute_moments(draws, data_cols, cells, mask, scaling, loc=None):
    """E[x] and Var[x] for NaN in applicable cells, per group and for new ones.

    ``loc``: the posterior mean and variance of ``x_loc`` (internal units),
    when it was integrated out (:func:`hiermask._collapsed.loc_moments`);
    else from its draws, when there are any.
    """
    n_groups, p = mask.shape
    count = np.where(mask, cells.count, 0.0)
    fill = np.where(count > 0, cells.mean, scaling.x_mean)
    dof = np.maximum(count.sum(axis=0) - (count > 0).sum(axis=0), 1.0)
    pooled_var = np.where(mask, cells.m2, 0.0).sum(axis=0) / dof
    var = np.broadcast_to(pooled_var, (n_groups, p)).copy()
    if loc is None and "x_loc" in draws:
        loc = draws["x_loc"].mean(axis=0), draws["x_loc"].var(axis=0)  # (G, P)
    if loc is not None and len(data_cols):
        s = scaling.x_scale[data_cols]
        scale2 = (s * draws["x_scale"]) ** 2  # (D, P)
        fill[:, data_cols] = scaling.x_mean[data_cols] + s * loc[0]
        var[:, data_cols] = scale2.mean(axis=0) + s**2 * loc[1]
    return fill, var, scaling.x_mean.copy(), scaling.x_scale**2


def fit_posterior(X, y, w, group_idx, mask, config: FitConfig) -> Posterior:
    """Fit the model and return its posterior in original units.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
        Features, NaN where missing or not applicable.
    y : ndarray of shape (n_samples,)
        Target.
    w : ndarray of shape (n_samples,)
        Frequency weights.
    group_idx : ndarray of shape (n_samples,)
        Group code of each row.
    mask : ndarray of shape (n_groups, n_features), bool
        Which features apply to which group.
    config : FitConfig
        Settings.

    Returns
    -------
    Posterior
    """
    active = mask.any(axis=0)
    Xa = X if active.all() else X[:, active]  # no copy of all the rows
    ma = mask[:, active]
    # The scaling as the distributed path computes it (from per-group
    # moments): it equals compute_scaling's to rounding.
    cells = cell_moments(Xa, w, group_idx, mask.shape[0])
    scaling = scaling_from_moments(pool_moments(cells, ma), vector_moments(y, w))
    if config.engine == "collapsed":
        stats = group_statistics(Xa, y, w, group_idx, ma, scaling)
        rows = stats.incomplete_rows
        latent = LatentRows(Xa[rows], y[rows], w[rows], group_idx[rows])
        return posterior_from_statistics(
            FitStatistics(mask, scaling, stats, latent, cells), config
        )
    fit_rows = FitRows(mask, scaling, LatentRows(Xa, y, w, group_idx))
    return _sample(fit_rows, cells, config)


def posterior_from_statistics(fit_stats: FitStatistics, config: FitConfig):
    """Fit the collapsed model from precomputed statistics.

    This is everything :func:`fit_posterior` does after its pass over the
    rows, so the statistics may come from anywhere (e.g. summed over the
    partitions of a distributed data frame).

    Parameters
    ----------
    fit_stats : FitStatistics
        Statistics of the rows, mask and scaling.
    config : FitConfig
        Settings; ``config.engine`` must be ``"collapsed"``.

    Returns
    -------
    Posterior
    """
    if config.engine != "collapsed":
        raise ValueError(
            f"Statistics can only be fitted by the collapsed engine, not "
            f"{config.engine!r}."
        )
    return _sample(fit_stats, fit_stats.cells, config)


def _sample(statistics, cells, config: FitConfig) -> Posterior:
    """Run the engine on the statistics; the posterior in data units."""
    mask, scaling = statistics.mask, statistics.scaling
    active = mask.any(axis=0)
    ref = _prior_units(scaling, config.standardize)
    varying = _identify.resolve_varying(config.varying, cells, mask, scaling)
    _identify.warn_unidentified(
        config, varying, cells, mask, scaling, _group_grams(statistics)
    )
    config = covariance_for_groups(config, int(np.sum(varying & active)), len(mask))
    engine = make_engine(config, varying[active])
    data = engine.prepare(statistics, ref)
    hyper = _hyper(config, scaling)
    run, flat, moments = _run_engine(engine, data, hyper, config)
    on = mask[:, active].astype(np.float64)
    draws = {}
    if "group_coef_internal" in flat:  # kept (always by the direct engine)
        intercept, slopes = _to_original(flat["group_coef_internal"], on, scaling)
        draws = {"intercept": intercept, "coef": _expand(slopes, active)}
    if moments is None:
        mean, cov = _draw_moments(intercept, slopes)
    else:
        mean, cov = _original_moments(*moments, on, scaling)
    draws["noise"] = flat["noise"] * scaling.y_scale
    unseen = _population(draws, flat, config, scaling, ref, active, varying)
    cols = np.asarray(data.impute_cols)
    loc = None
    if "x_missing" in flat and "x_loc" not in flat:  # integrated out
        loc = loc_moments(data, flat["x_scale"], flat["x_missing"])
    fill = _impute_moments(flat, cols, cells, mask[:, active], scaling, loc)
    diagnostics = _diagnose(draws, config.num_chains, mask, varying)
    if "intercept" not in draws:  # made when asked for
        sites = {k: flat[k] for k in engine.conditional_sites if k in flat}
        arrays = jax.tree_util.tree_map(np.asarray, (data, hyper))
        source = _GroupDrawSource(engine, config, sites, *arrays, on, scaling, active)
        draws = GroupDraws(draws, source)
    return Posterior(
        draws=draws,
        n_chains=config.num_chains,
        **_expand_moments(mean, cov, *unseen, active),
        noise_var=float(np.mean(draws["noise"] ** 2)),
        **dict(zip(_FILL_FIELDS, (_expand(m, active) for m in fill), strict=True)),
        prior_reference=_prior_reference(ref, config, active),
        diagnostics=diagnostics,
        diverging=run.stats["diverging"],
        tree_steps=run.stats["n_steps"],
        timings=run.timings,
        varying=varying & active,
    )


#: The sites of ``posterior_`` that hold every group's coefficients.
GROUP_SITES = ("intercept", "coef")


@dataclass(frozen=True, eq=False)
class _GroupDrawSource:
    # What makes a fit's group draws again: its engine, settings, sampled
    # sites (internal units) and engine data, and the map to data units.
    engine: object
    config: FitConfig
    sites: dict
    data: object
    hyper: Hyper
    on: np.ndarray
    scaling: Scaling
    active: np.ndarray

    def make(self):
        """The draws of ``intercept`` and ``coef``, as fit would have kept them."""
        program = _conditional_program(
            self.config, self.data, self.hyper, self.engine, keep=True
        ).result()
        with jax.enable_x64(True):
            out, _, _ = _conditional(
                program,
                _conditional_key(self.config.seed),
                self.sites,
                self.data,
                self.hyper,
            )
        coef = np.asarray(out["group_coef_internal"])
        intercept, slopes = _to_original(coef, self.on, self.scaling)
        return {"intercept": intercept, "coef": _expand(slopes, self.active)}


class NotInFile:
    """The group draws' source of a model loaded from a file without them.

    A fit that did not keep its group draws is saved with their exact
    posterior means and covariances only (model file format 2), so the
    loaded model predicts and summarizes as the fit did; asking it for the
    draws themselves raises.
    """

    def make(self):
        """Raise: the file holds no group draws, nor what makes them."""
        raise ValueError(
            "This model was loaded from a file written by a fit that did not keep "
            "its group draws (keep_group_draws), so the file holds each group's "
            "exact posterior mean and covariance but no group draws: predict, "
            "predict_interval, coef_, intercept_, summary() and plot_forest work, "
            "while posterior_['intercept'], posterior_['coef'], sample_y, "
            "to_arviz and plot_ppc need the draws. Refit with "
            "keep_group_draws=True and save again, or pickle a fitted estimator "
            "instead of saving it (a pickle keeps what makes the draws)."
        )


class GroupDraws(Mapping):
    """``posterior_`` of a fit that did not keep its group draws.

    A read-only mapping like the dict a fit that kept them holds, with the
    same keys in the same order. ``intercept`` and ``coef`` are made on
    first access: the fit's compiled conditional draws run again, with the
    fit's random key, on the hyperparameter draws it kept, so they equal,
    bit for bit, the draws the fit would have kept. They are then held
    until the object is pickled or copied: a pickle holds what makes them
    (numpy arrays), not them.

    Parameters
    ----------
    draws : dict of ndarray
        Every other site's draws.
    source : object
        Its ``make()`` returns the group sites' draws.
    """

    def __init__(self, draws, source):
        self._draws = draws
        self._source = source
        self._made = None
        self._lock = threading.Lock()

    @property
    def others(self):
        """The draws of every site but the group coefficients (a dict)."""
        return self._draws

    @property
    def made(self):
        """Whether the group draws are held now (asked for before)."""
        return self._made is not None

    def _group(self):
        with self._lock:
            if self._made is None:
                self._made = self._source.make()
            return self._made

    def __getitem__(self, key):
        if key in GROUP_SITES:
            return self._group()[key]
        return self._draws[key]

    def __iter__(self):
        yield from GROUP_SITES
        yield from self._draws

    def __len__(self):
        return len(GROUP_SITES) + len(self._draws)

    def __contains__(self, key):
        return key in GROUP_SITES or key in self._draws

    def __getstate__(self):
        return {"draws": self._draws, "source": self._source}

    def __setstate__(self, state):
        self.__init__(state["draws"], state["source"])

    def __repr__(self):
        return f"GroupDraws({sorted(self)}, group draws made on access)"


def covariance_for_groups(config: FitConfig, n_varying, n_groups):
    """The fit's settings, with ``"full"`` fitted as ``"diagonal"`` when
    there are fewer groups than correlated effects (warns).

    Under partial pooling with ``group_covariance="full"``, the intercept and
    the ``n_varying`` varying slopes (``q = n_varying + 1`` effects) share a
    q x q correlation matrix. Fewer than q groups give fewer effect vectors
    than the matrix has dimensions (even with the population mean known):
    the data leave directions of it, and so its ``q (q - 1) / 2``
    correlations, to the LKJ prior, whose many coordinates the sampler then
    explores (one group of 15 rows with 30 features: 465 correlations). The
    correlations are then not estimated: the effects are independent, as
    under ``"diagonal"``, and a warning gives the counts.

    Parameters
    ----------
    config : FitConfig
    n_varying : int
        Active features with a group-specific slope.
    n_groups : int

    Returns
    -------
    FitConfig
    """
    q = n_varying + 1
    if config.pooling != "partial" or config.group_covariance != "full":
        return config
    if q < 2 or n_groups >= q:
        return config
    warnings.warn(
        f"group_covariance='full' with {n_groups} group(s) for {q} correlated "
        f"group effects (the intercept and {n_varying} varying slope(s)): fewer "
        f"groups than effects leave their {q * (q - 1) // 2} correlations to the "
        "LKJ prior, so they are not estimated and the group effects are fitted "
        "as independent (group_covariance='diagonal'). Fit at least "
        f"{q} groups, fewer varying slopes (varying=...), or "
        "group_covariance='diagonal' to choose this yourself.",
        UserWarning,
        stacklevel=6,
    )
    return replace(config, group_covariance="diagonal")


def make_engine(config: FitConfig, varying_active):
    """The engine of a fit.

    Parameters
    ----------
    config : FitConfig
    varying_active : ndarray of shape (n_active,), bool
        Which active features have a group-specific slope.

    Returns
    -------
    CollapsedEngine or DirectEngine
        Today's model (every slope varies, independent deviations) is built
        as ``ENGINES[name](pooling)``; any other with ``varying`` (a tuple of
        bools, None when every slope varies) and ``covariance``.
    """
    varying = tuple(bool(v) for v in varying_active)
    covariance = config.group_covariance
    if config.pooling == "complete":
        varying, covariance = None, "diagonal"
    elif all(varying):
        varying = None
    if config.pooling == "none":
        covariance = "diagonal"
    if varying is None and covariance == "diagonal":
        return ENGINES[config.engine](config.pooling)
    return ENGINES[config.engine](
        config.pooling, varying=varying, covariance=covariance
    )


def _group_grams(statistics):
    # Per-group Gram matrices [1, c]'W[1, c] of the internal design (the
    # complete rows of the collapsed engine's statistics, every row for the
    # direct engine).
    if isinstance(statistics, FitStatistics):
        return statistics.stats.gram
    rows = statistics.rows
    active = statistics.mask.any(axis=0)
    return group_statistics(
        rows.X,
        rows.y,
        rows.w,
        rows.group_idx,
        statistics.mask[:, active],
        statistics.scaling,
    ).gram


#: Posterior's fields of the imputation moments, in _impute_moments' order.
_FILL_FIELDS = ("x_fill", "x_var", "x_fill_population", "x_var_population")


def _run_engine(engine, data, hyper, config):
    """NUTS on the engine's density, then its conditional draws.

    Returns the run (:class:`hiermask._runner.RunResult`), the draws of
    every site with chains flattened (the conditional draws included) and
    the Rao-Blackwellized internal moments ``(mean, cov)`` of the group
    coefficients (None when nothing was integrated out).
    """
    conditional_program = []

    def compile_conditional():
        # The conditional draws compile while the sampler compiles and runs
        # (started after the sampler's tracing, which holds the GIL).
        if engine.conditional_sites:
            conditional_program.append(
                _conditional_program(
                    config, data, hyper, engine, keep=config.keep_group_draws
                )
            )

    run = run_nuts(
        engine,
        data,
        hyper,
        seed_value=config.seed,
        num_warmup=config.num_warmup,
        num_samples=config.num_samples,
        num_chains=config.num_chains,
        target_accept_prob=config.target_accept_prob,
        progress_bar=config.progress_bar,
        before_compile=compile_conditional,
    )
    flat = {
        k: v.reshape(v.shape[0] * v.shape[1], *v.shape[2:])
        for k, v in run.values.items()
    }
    full = engine.pooling == "partial" and getattr(engine, "covariance", "") == "full"
    if full and "group_correlation" not in flat:  # only the intercept varies
        flat["group_correlation"] = np.ones((flat["noise"].shape[0], 1, 1))
    if not conditional_program:
        return run, flat, None
    sites = {k: flat[k] for k in engine.conditional_sites if k in flat}
    program = conditional_program[0].result()
    with jax.enable_x64(True):
        extra, rb_mean, rb_cov = _conditional(
            program,
            _conditional_key(config.seed),
            sites,
            jax.tree_util.tree_map(np.asarray, data),
            jax.tree_util.tree_map(np.asarray, hyper),
        )
        flat.update({k: np.asarray(v) for k, v in extra.items()})
        return run, flat, (np.asarray(rb_mean), np.asarray(rb_cov))


def _draw_moments(intercept, slopes):
    # Mean and covariance of each group's (intercept, slopes) over the draws.
    both = np.concatenate([intercept[..., None], slopes], axis=-1)
    mean = both.mean(axis=0)
    centred = both - mean
    return mean, np.einsum("dgi,dgj->gij", centred, centred) / both.shape[0]


def _original_moments(mean, cov, on, scaling):
    # Internal moments of each group's coefficients in data units.
    T = _linear_maps(on, scaling)
    offset = np.zeros(on.shape[1] + 1)
    offset[0] = scaling.y_mean
    return (
        offset + np.einsum("gij,gj->gi", T, mean),
        np.einsum("gij,gjk,glk->gil", T, cov, T),
    )


def _population(draws, flat, config, scaling, ref, active, varying):
    """Add the population parameters' draws to ``draws``; return the mean
    and covariance of an unseen group's coefficients (None, None under no
    pooling)."""
    pooling = config.pooling
    if pooling == "none":
        return None, None
    s_y = scaling.y_scale
    pop_coef = flat["coef_mean"] * (s_y / scaling.x_scale)
    pop_int = ref[0] + s_y * flat["intercept_at_means"] - pop_coef @ ref[2]
    draws["population_intercept"] = pop_int
    draws["population_coef"] = _expand(pop_coef, active)
    both = np.concatenate([pop_int[:, None], pop_coef], axis=1)
    unseen_mean = both.mean(axis=0)
    unseen_cov = np.cov(both, rowvar=False, bias=True).reshape(
        both.shape[1], both.shape[1]
    )
    if pooling == "partial":
        tau_a = flat["intercept_scale"] * s_y
        tau = flat["coef_scale"] * (s_y / scaling.x_scale)
        intercept_sd, corr, between = _between_groups(
            tau_a, tau, flat, config, ref, active, varying
        )
        draws["group_intercept_scale"] = intercept_sd
        draws["group_coef_scale"] = _expand(tau, active)
        if corr is not None:
            draws["group_correlation"] = corr
        unseen_cov = unseen_cov + between
    return unseen_mean, unseen_cov


def _between_groups(tau_a, tau, flat, config, ref, active, varying):
    """The between-group part of the population, in data units.

    Parameters
    ----------
    tau_a : ndarray of shape (n_draws,)
        Each draw's between-group sd of the intercept (at the reference
        point under ``group_covariance="full"``, at ``x = 0`` otherwise).
    tau : ndarray of shape (n_draws, n_active)
        Each draw's between-group sds of the active slopes.
    flat : dict of ndarray
        The sampled sites (``group_correlation`` under ``"full"``).
    config : FitConfig
    ref : tuple
        The reference point: ``ref[2]`` holds the features'.
    active, varying : ndarray of bool
        Active features, and features with a group-specific slope.

    Returns
    -------
    intercept_sd : ndarray of shape (n_draws,)
        Between-group sd of the intercept at ``x = 0``.
    corr : ndarray of shape (n_draws, r, r) or None
        Under ``"full"``, the correlations of the intercept at ``x = 0`` and
        the ``r - 1`` varying slopes; None under ``"diagonal"``.
    between : ndarray of shape (1 + n_active, 1 + n_active)
        The draws' mean covariance of a group's deviations.
    """
    scales = np.concatenate([tau_a[:, None], tau], axis=1)
    if config.group_covariance != "full":
        return tau_a, None, np.diag(np.mean(scales**2, axis=0))
    # over [intercept, varying features]
    keep = np.concatenate([[True], varying[active]])
    n_kept = int(keep.sum())
    corr = np.asarray(flat["group_correlation"]).reshape(-1, n_kept, n_kept)
    cov = _covariance_at_zero(scales[:, keep], corr, ref[2][keep[1:]])
    sd = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
    between = np.zeros((scales.shape[1], scales.shape[1]))
    between[np.ix_(keep, keep)] = np.mean(cov, axis=0)
    return sd[:, 0], cov / (sd[:, :, None] * sd[:, None, :]), between


def _covariance_at_zero(scales, corr, reference):
    """Each draw's covariance of a group's intercept at ``x = 0`` and its
    varying slopes, in data units (lme4's convention).

    Under ``group_covariance="full"`` the model places the correlated
    effects at the reference point (the feature means when ``standardize``;
    ``scales`` and ``corr`` are theirs there): the intercept at ``x = 0`` is
    ``d_0 - sum_j d_j M_j``, so the covariance is ``R Sigma R'`` with ``R``
    the identity with first row ``[1, -M]``.

    Parameters
    ----------
    scales : array of shape (n_draws, r)
        Between-group sds of the intercept (at the reference point) and of
        the varying slopes.
    corr : array of shape (n_draws, r, r)
        Their correlation matrices.
    reference : array of shape (r - 1,)
        The reference point of the varying features.

    Returns
    -------
    array of shape (n_draws, r, r)
    """
    cov = scales[:, :, None] * corr * scales[:, None, :]
    r = np.eye(cov.shape[1])
    r[0, 1:] = -np.asarray(reference, dtype=float)
    return np.einsum("ij,djk,lk->dil", r, cov, r)


def _expand_moments(mean, cov, unseen_mean, unseen_cov, active):
    # The Posterior's moment fields over all features (0 where inactive).
    with_intercept = np.concatenate([[True], active])

    def expand_square(m):
        return _expand(_expand(m, with_intercept, axis=-1), with_intercept, axis=-2)

    if unseen_mean is not None:
        unseen_mean = _expand(unseen_mean, with_intercept)
        unseen_cov = expand_square(unseen_cov)
    return {
        "coef_mean": _expand(mean, with_intercept),
        "coef_cov": expand_square(cov),
        "unseen_mean": unseen_mean,
        "unseen_cov": unseen_cov,
    }


def _prior_reference(ref, config, active):
    # Prior location and scale in data units (for "none"'s unseen groups).
    return {
        "y_ref": ref[0],
        "y_unit": ref[1],
        "x_ref": _expand(ref[2], active),
        "x_unit": _expand(ref[3], active),
        "coef_prior_scale": config.coef_prior_scale,
        "intercept_prior_scale": config.intercept_prior_scale,
    }


def _conditional_with_limits(*args, engine, limits, keep, **kwargs):
    # engine.conditional with the size thresholds (:mod:`hiermask._limits`)
    # as a static argument, so that the jit cache keys on them too. Without
    # keep, the group draws are not returned: the program computes only
    # the population draws and the groups' moments.
    del limits
    out, mean, cov = engine.conditional(*args, **kwargs)
    if not keep:
        out = {k: v for k, v in out.items() if k != "group_coef_internal"}
    return out, mean, cov


_conditional_jit = jax.jit(
    _conditional_with_limits, static_argnames=("engine", "chunk", "limits", "keep")
)


def _conditional_parts(n_draws, n_groups, q):
    """How the conditional draws are split into parts that run in parallel.

    Two parts of equal length (the second padded) when the draws make at
    least two chunks, each starting at a whole chunk: the same draws as one
    run (:func:`hiermask._collapsed.conditional_draws`), one compiled
    program for both. The split depends on the run only, never on the
    machine.

    Returns
    -------
    chunk, length : int
        Draws per chunk and per part.
    parts : list of (start, stop, first_chunk)
    """
    chunk = conditional_chunk(n_draws, n_groups, q)
    n_chunks = -(-n_draws // chunk)
    if n_chunks < 2:
        return chunk, n_draws, [(0, n_draws, 0)]
    per_part = -(-n_chunks // 2)
    length = per_part * chunk
    return chunk, length, [(0, length, 0), (length, n_draws, per_part)]


def _conditional_spec(engine, data, hyper, length):
    # Shapes and dtypes of the conditional draws' arguments, known before
    # sampling: one value per draw of a part (length draws) of each sampled
    # site it takes.
    n_features = np.shape(data.on)[1]
    sites = {"noise": (length,)}
    if engine.pooling == "partial":
        sites["intercept_scale"] = (length,)
        sites["coef_scale"] = (length, n_features)
        if getattr(engine, "covariance", "diagonal") == "full":
            q = 1 + len(varying_index(engine.varying, n_features))
            sites["group_correlation"] = (length, q, q)
    if np.shape(data.miss_row)[0]:
        sites["x_missing"] = (length, np.shape(data.miss_row)[0])
    sites = {k: v for k, v in sites.items() if k in engine.conditional_sites}

    def struct(x):
        x = np.asarray(x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype)

    scalar = jax.ShapeDtypeStruct((), np.int32)
    return (
        jax.ShapeDtypeStruct((2,), np.uint32),
        {k: jax.ShapeDtypeStruct(v, np.float64) for k, v in sites.items()},
        jax.tree_util.tree_map(struct, data),
        jax.tree_util.tree_map(struct, hyper),
        scalar,
        scalar,
    )


def _conditional_key(seed):
    # Key words of the conditional draws: jax.random.PRNGKey(seed + 1)'s value
    # (the program only mixes the words), built without running JAX.
    return np.array([0, (seed + 1) % 2**32], dtype=np.uint32)


def _conditional_program(config, data, hyper, engine=None, keep=True):
    """Future of the compiled conditional draws for this fit's shapes.

    Compiled in a background thread, so that it overlaps the sampler's
    compilation and run; cached per shape like the sampler. ``engine``
    defaults to today's model's (every slope varies, diagonal); without
    ``keep`` the program returns no group draws.
    """
    if engine is None:
        engine = ENGINES[config.engine](config.pooling)
    n_groups, n_features = np.shape(data.on)
    n_draws = config.num_chains * config.num_samples
    chunk, length, _ = _conditional_parts(n_draws, n_groups, n_features + 1)
    spec = _conditional_spec(engine, data, hyper, length)
    leaves, treedef = jax.tree_util.tree_flatten(spec)
    shapes = tuple((x.shape, x.dtype) for x in leaves)
    key = (engine, chunk, keep, treedef, shapes, _limits.current())

    def compile_now():
        with jax.enable_x64(True):
            lowered = _conditional_lowered(spec, engine, chunk, key)
            return exclusive(lowered.compile(compiler_options()))

    return compiled_in_background(key, compile_now)


def _conditional_lowered(spec, engine, chunk, key):
    # The lowered conditional draws: read back from their stored program
    # while JAX's persistent cache is on (hiermask._export), else traced.
    engine_key, chunk, keep, treedef, shapes, limits = key
    kwargs = {"first_chunk": spec[4], "n_valid": spec[5]}
    lowered, _, _ = _export.lowered(
        "_conditional_with_limits",
        (engine_key, chunk, keep, str(treedef), shapes, limits),
        _conditional_jit,
        {"engine": engine, "chunk": chunk, "limits": limits, "keep": keep},
        lambda stored: (spec[:4], kwargs),
    )
    return lowered


def _conditional(program, rng_key, sites, data, hyper):
    """Run the compiled conditional draws, its parts in parallel threads.

    The parts (:func:`_conditional_parts`) run in threads (one after the
    other for a program that calls LAPACK, see
    :func:`hiermask._xla.exclusive`); their draws are concatenated and
    their moments pooled. The profiler in benchmarks times this function.
    """
    n_draws = sites["noise"].shape[0]
    n_groups, n_features = np.shape(data.on)
    _, length, parts = _conditional_parts(n_draws, n_groups, n_features + 1)

    def run_part(part):
        start, stop, first = part
        # the part's draws, padded to the program's length by repeating
        # its last draw (excluded from the moments)
        take = np.minimum(np.arange(start, start + length), stop - 1)
        part_sites = {k: v[take] for k, v in sites.items()}
        with jax.enable_x64(True):
            out, mean, cov = program(
                rng_key,
                part_sites,
                data,
                hyper,
                first_chunk=np.int32(first),
                n_valid=np.int32(stop - start),
            )
            out = {k: np.asarray(v)[: stop - start] for k, v in out.items()}
            return out, np.asarray(mean), np.asarray(cov)

    results = map_parts(program, run_part, parts)
    if len(results) == 1:
        return results[0]
    weights = [(stop - start) / n_draws for start, stop, _ in parts]
    out = {k: np.concatenate([r[0][k] for r in results]) for k in results[0][0]}
    mean = sum(w * r[1] for w, r in zip(weights, results, strict=True))
    # pooled covariance: the average second moment minus the pooled mean's
    second = sum(
        w * (r[2] + r[1][:, :, None] * r[1][:, None, :])
        for w, r in zip(weights, results, strict=True)
    )
    return out, mean, second - mean[:, :, None] * mean[:, None, :]


def _diagnose(draws, n_chains, mask, varying=None):
    """Convergence diagnostics per reported parameter
    (:func:`hiermask._parameters.parameter_blocks`), keyed ``"coef[3, 2]"``.

    Population-level parameters and the noise are always diagnosed; group
    intercepts and coefficients too while there are at most
    ``_limits.MAX_GROUP_PARAMS_DIAGNOSED`` and their draws were kept.
    """
    n_groups, p = mask.shape
    small = n_groups * (p + 1) <= _limits.MAX_GROUP_PARAMS_DIAGNOSED
    group_level = small and "intercept" in draws
    out = {}
    for block in parameter_blocks(draws, mask, varying, group_level):
        n_rows = block.draws.shape[1]
        if not n_rows:
            continue
        x = block.draws.reshape(n_chains, -1, n_rows)
        values = zip(*parameter_diagnostics(x), strict=True)
        out.update(zip(block.keys, values, strict=True))
    return out
