"""The scikit-learn estimator: parameters and orchestration, no maths."""

from __future__ import annotations

import copy
import numbers
import warnings
from importlib import metadata
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.special import ndtri
from sklearn.base import BaseEstimator, RegressorMixin, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import r2_score
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import validate_data

from . import _dask, _limits
from ._fit import FitConfig, fit_posterior, posterior_from_statistics
from ._fitted import FILE_FIELDS, fitted_model, from_fields
from ._masks import MIN_EVIDENCE, mask_from_counts, nan_counts, thin_evidence
from ._predict import predictive_draws, predictive_moments, unseen_codes
from ._validation import (
    check_target,
    check_unseen,
    check_weights,
    constant_target_message,
    encode_groups,
    lookup_groups,
    split_groups,
    target_note,
)

if TYPE_CHECKING:  # optional extras, for the annotations only
    import arviz
    import dask.dataframe as dd

__all__ = [
    "ConvergenceError",
    "InconsistentVersionWarning",
    "MaskedHierarchicalRegressor",
]

#: Attributes set by fit (some only under some pooling modes or inputs); a
#: refit removes those it does not set.
_FITTED_ATTRIBUTES = frozenset(
    {
        "_fitted",
        "n_features_in_",
        "feature_names_in_",
        "groups_",
        "intercept_",
        "coef_",
        "noise_scale_",
        "population_intercept_",
        "population_coef_",
        "group_intercept_scale_",
        "group_coef_scale_",
        "posterior_",
        "convergence_",
    }
)

#: Convergence thresholds of the ``on_bad_convergence`` gate.
MAX_R_HAT = 1.01
MIN_ESS_PER_CHAIN = 100


class _Options(StrOptions):
    """String options whose error message lists the valid values sorted."""

    def __str__(self):
        return "a str among {" + ", ".join(sorted(map(repr, self.options))) + "}"


class ConvergenceError(RuntimeError):
    """Raised by ``fit`` when ``on_bad_convergence="raise"`` and NUTS did not
    converge (R-hat above 1.01, bulk ESS below 100 per chain, or divergences).

    See Also
    --------
    sklearn.exceptions.ConvergenceWarning : Issued instead under
        ``on_bad_convergence="warn"``.

    Examples
    --------
    >>> from hiermask import ConvergenceError, MaskedHierarchicalRegressor
    >>> from hiermask.datasets import make_manufacturing
    >>> X, y = make_manufacturing(60, random_state=0)
    >>> est = MaskedHierarchicalRegressor(
    ...     group_col="Product_Group", num_warmup=5, num_samples=20,
    ...     num_chains=2, on_bad_convergence="raise", random_state=0,
    ... )
    >>> try:
    ...     est.fit(X, y)
    ... except ConvergenceError as exc:
    ...     print(str(exc).split(":")[0])
    NUTS may not have converged
    """


class InconsistentVersionWarning(UserWarning):
    """Warns that a model was saved by another hiermask version than the one
    loading it (from a pickle or a model file), like scikit-learn's warning
    of the same name. The model loads; its predictions may differ from those
    of a refit with the installed version.

    Parameters
    ----------
    original_version : str
        The hiermask version that saved the model.
    current_version : str
        The installed hiermask version.

    Examples
    --------
    >>> from hiermask import InconsistentVersionWarning
    >>> print(InconsistentVersionWarning(
    ...     original_version="0.0.1", current_version="0.1.0"))
    ... # doctest: +NORMALIZE_WHITESPACE
    This model was saved with hiermask 0.0.1 and is loaded with hiermask 0.1.0;
    it may not predict as it did. Refit it with this version, or install
    hiermask==0.0.1.
    """

    def __init__(self, *, original_version, current_version):
        self.original_version = original_version
        self.current_version = current_version

    def __str__(self):
        return (
            f"This model was saved with hiermask {self.original_version} and is "
            f"loaded with hiermask {self.current_version}; it may not predict as "
            "it did. Refit it with this version, or install "
            f"hiermask=={self.original_version}."
        )


def _version():
    try:
        return metadata.version("hiermask")
    except metadata.PackageNotFoundError:  # pragma: no cover - source checkout
        return "0+unknown"


class MaskedHierarchicalRegressor(RegressorMixin, BaseEstimator):
    """Bayesian hierarchical linear regression with per-group feature masks.

    Which features apply to which group is read from the NaN pattern of
    ``X``: a feature whose cells are all NaN within a group (more precisely,
    whose NaN fraction there is at least ``mask_threshold``) has no
    coefficient for that group. Other NaN are imputed as latent variables.
    The model is fitted with hiermask's own JAX-compiled NUTS (NumPyro's
    algorithm) on a density it writes itself, and partially pools the
    groups' intercepts and slopes; NumPyro supplies the direct engine's
    model and its distributions.

    Parameters
    ----------
    group_col : str, int or None, default=None
        Column label (DataFrame) or position (any array) of the group column
        in ``X``; it is never used as a feature. None: groups come from
        ``fit(..., groups=...)``, or all rows form one group.
    pooling : {"partial", "none", "complete"}, default="partial"
        ``"partial"``: group intercepts and slopes are drawn from population
        distributions whose means and sds are learned. ``"none"``: every
        group has its own independent priors. ``"complete"``: one intercept
        and one slope vector shared by all groups (masks still apply).
    coef_prior_scale : float, default=1.0
        Prior sd of the population slopes (of every group's slopes under
        ``"none"``), in units of ``sd(y) / sd(x_j)`` when ``standardize``.
    intercept_prior_scale : float, default=1.0
        Prior sd of the intercept at the feature means (``standardize``) or
        at zero, in units of ``sd(y)`` when ``standardize``.
    group_scale_prior : float, default=1.0
        HalfNormal scale of the between-group sds (partial pooling only).
    varying : {"auto", "all"} or list, default="auto"
        Which features get a group-specific slope (the others get one
        population slope, shared by the groups where the feature applies
        and still exactly 0 where it is off). ``"auto"``: every feature but
        the group-level predictors, whose observed values are constant
        within every group where they apply (their group-specific slope is
        not identified apart from the intercept); what it chose is in
        ``varying_``, the summary and the CLI output. ``"all"``: every
        feature (version 0.1's model). A list: column labels (DataFrame) or
        positions in ``X`` (arrays); ``[]`` gives the varying-intercept
        model. Under ``pooling="none"`` the features not listed get one
        shared slope; under ``"complete"`` nothing varies.
    group_covariance : {"full", "diagonal"}, default="full"
        ``"full"``: a group's intercept and varying slopes are jointly normal
        with covariance ``diag(tau) Omega diag(tau)``, ``Omega ~
        LKJ(lkj_concentration)`` (lme4's ``(1 + x | g)``); a group where a
        feature is off follows the marginal on the features that apply.
        With ``standardize`` the model places them at the feature means, so
        a shift of a feature's origin leaves predictions unchanged (the
        priors of the intercept's sd and of ``Omega`` apply there);
        ``group_intercept_scale_`` and ``group_correlation_`` are reported
        at ``x = 0``, as lme4 reports them.
        ``"diagonal"``: independent deviations at ``x = 0`` (lme4's ``(1 +
        x || g)``), so, as in lme4, the fit depends on where each feature's
        zero lies.
        Partial pooling only. With fewer groups than correlated effects (the
        intercept and the varying slopes: 2 groups for 4 effects), the
        groups cannot inform the correlations beyond their prior: ``"full"``
        is then fitted as ``"diagonal"`` (no ``group_correlation_``), with a
        warning that gives the counts.
    lkj_concentration : float, default=2.0
        Concentration of the LKJ prior on the group correlation matrix
        (``"full"``): 1 is uniform over correlation matrices, larger values
        favour weaker correlations.
    noise_prior_scale : float, default=1.0
        HalfNormal scale of the residual sd.
    standardize : bool, default=True
        Whether the prior scales are in units of the data's sds (and the
        intercept prior sits at the means). False: raw units, centred at 0.
    mask_threshold : float in (0, 1], default=1.0
        A feature is off for a group when its NaN fraction there is at least
        this value. A small group is judged on its few rows: with 10% of
        radon's basement values missing at random, a one-house county whose
        value is missing has basement switched off. Fit warns with the count
        and examples of the pairs switched off on fewer than 3 rows; fill
        such values before fit when they are missing, not "does not apply".
    missing : {"impute", "error"}, default="impute"
        What to do with NaN in a feature that is on for the row's group.
    unseen_groups : {"population", "error"}, default="population"
        What ``predict`` does for a group not seen in fit.
    engine : {"auto", "collapsed", "direct"}, default="auto"
        ``"collapsed"`` integrates the coefficients out and samples only the
        scales (cost independent of the number of rows); ``"direct"`` is the
        reference per-row NumPyro model. ``"auto"`` is ``"collapsed"``,
        which supports every option.
    num_warmup : int, default=500
        NUTS warmup iterations per chain.
    num_samples : int, default=1000
        Draws kept per chain.
    num_chains : int, default=4
        Number of chains.
    target_accept_prob : float, default=0.8
        Step-size adaptation target.
    on_bad_convergence : {"warn", "raise", "ignore"}, default="warn"
        What to do when R-hat exceeds 1.01, the bulk ESS is below 100 per
        chain, or a transition diverged.
    max_posterior_bytes : int, default=4_000_000_000
        Memory budget for the draws of every group's coefficients that fit
        keeps (``num_chains * num_samples * n_groups * (n_features + 1) * 8``
        bytes); fit raises a ValueError before sampling when it would be
        exceeded. Draws that fit does not keep (``keep_group_draws``) do
        not count. ``to_arviz(X)`` holds its log-likelihood (8 bytes per
        draw and row) to the same budget.
    keep_group_draws : bool or "auto", default="auto"
        Whether fit keeps the draws of every group's intercept and
        coefficients in ``posterior_`` (``num_chains * num_samples *
        n_groups * (n_features + 1) * 8`` bytes). ``coef_``,
        ``intercept_``, ``predict`` (with ``return_std``) and
        ``predict_interval`` use each group's exact posterior mean and
        covariance, which the collapsed engine computes in closed form at
        fit whatever this setting. Without the draws, ``posterior_`` makes
        ``posterior_["intercept"]`` and ``posterior_["coef"]`` on first
        access (and ``to_arviz()``, ``sample_y`` and ``plot_ppc`` through
        it), from the hyperparameter draws and the exact
        conditionals with the fit's random key: the same draws, bit for
        bit, as a fit that kept them; ``summary()`` then reports the group
        rows from the moments (exact mean and sd, a normal interval, no
        R-hat or ESS) and makes no draw, as ``plot_forest`` does, and
        ``save`` writes the moments without the draws (see ``save``).
        "auto" keeps them while they take
        at most 256 MiB (``hiermask._limits.KEEP_GROUP_DRAWS_BYTES``). The
        direct engine samples the group coefficients, so it always keeps
        them, and False with ``engine="direct"`` raises a ValueError.
    max_latent_rows : int, default=100_000
        Dask input only: the most rows holding latent cells (NaN in a feature
        that applies to the row's group) that a fit brings to the client,
        where they stay rows of the sampled density; fit raises a ValueError
        beyond it. In-memory input has no such limit.
    progress_bar : bool or "auto", default="auto"
        Show a progress bar (tqdm, on stderr) over the warmup and sampling
        iterations of all chains, moved after each of the run's 16 segments;
        the segments are the same with or without the bar, so the draws are
        the same. ``"auto"`` opens it only for a long run: at the end of the
        first segment from which the sampler is projected to run for 15 s
        or more in all (a fit with thousands of groups or many imputed
        cells); short fits, tests and grid searches stay quiet.
    random_state : int, RandomState instance or None, default=None
        Seed of the sampler and of predictive draws.

    Attributes
    ----------
    groups_ : ndarray of shape (n_groups,)
        Group labels seen in fit.
    mask_ : pandas.DataFrame of shape (n_groups, n_features)
        True where a feature applies to a group.
    coef_ : ndarray of shape (n_groups, n_features)
        Posterior-mean slopes in original units; exactly 0.0 where masked.
    intercept_ : ndarray of shape (n_groups,)
        Posterior-mean intercepts (value at x = 0).
    population_coef_ : ndarray of shape (n_features,)
        Posterior-mean population slopes (not set under ``pooling="none"``).
    population_intercept_ : float
        Posterior-mean population intercept (not set under ``"none"``).
    group_coef_scale_ : ndarray of shape (n_features,)
        Posterior-mean between-group sd of each slope (partial pooling).
    group_intercept_scale_ : float
        Posterior-mean between-group sd of the intercept at ``x = 0``
        (partial pooling), lme4's convention.
    varying_ : pandas.Series of bool
        Indexed by feature name: True where the feature has a group-specific
        slope (False for features off in every group).
    group_correlation_ : pandas.DataFrame
        Posterior-mean correlation matrix of the group effects, labelled
        ``intercept`` (at ``x = 0``, lme4's convention) and the varying
        features (partial pooling with ``group_covariance="full"``).
    noise_scale_ : float
        Posterior-mean residual sd.
    posterior_ : dict of ndarray
        Draws, chains concatenated: ``intercept`` (n_draws, n_groups),
        ``coef`` (n_draws, n_groups, n_features), ``noise`` and the
        population-level parameters; under ``group_covariance="full"``
        ``group_correlation`` (n_draws, q, q) over the intercept and the
        varying features.
    convergence_ : dict
        ``max_r_hat``, ``min_ess_bulk``, ``n_divergences`` and
        ``worst_parameter``.
    n_features_in_ : int
        Number of columns of ``X`` (the group column included).
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Column names of ``X`` when it is a DataFrame with string columns.

    See Also
    --------
    sklearn.linear_model.BayesianRidge : One-group Bayesian linear regression.

    Notes
    -----
    Features that are off for every group are dropped with a warning
    (their coefficients are 0.0). Latent cells at fit are sampled jointly
    with the regression from ``x ~ Normal(m_gj, s_j)``; at predict a NaN in
    an applicable feature is integrated out with the posterior (or, for
    features that had no missing cells at fit, the group's observed mean and
    the pooled within-group variance). ``predict_interval`` is the central
    interval of the moment-matched normal predictive distribution; use
    ``sample_y`` for the exact mixture.

    ``fit``, ``predict``, ``predict_interval`` and ``sample_y`` also accept a
    ``dask.dataframe.DataFrame`` (with ``y``, ``groups`` and
    ``sample_weight`` as dask Series partitioned like it; extra
    ``hiermask[dask]``): fit sums the statistics over the partitions on the
    workers and gives the posterior of the in-memory fit of the same rows;
    the predict methods return lazy dask objects. Only the collapsed engine
    fits dask data.

    Examples
    --------
    >>> import numpy as np
    >>> from hiermask import MaskedHierarchicalRegressor
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(60, 2))
    >>> y = 1.0 + X @ [2.0, -1.0] + rng.normal(scale=0.1, size=60)
    >>> est = MaskedHierarchicalRegressor(
    ...     num_warmup=200, num_samples=200, num_chains=2, random_state=0
    ... ).fit(X, y)
    >>> np.round(est.coef_, 1)
    array([[ 2., -1.]])
    """

    _parameter_constraints: ClassVar[dict] = {
        "group_col": "no_validation",  # any column label or position
        "pooling": [_Options({"partial", "none", "complete"})],
        "coef_prior_scale": [Interval(numbers.Real, 0, None, closed="neither")],
        "intercept_prior_scale": [Interval(numbers.Real, 0, None, closed="neither")],
        "group_scale_prior": [Interval(numbers.Real, 0, None, closed="neither")],
        "varying": [_Options({"auto", "all"}), "array-like"],
        "group_covariance": [_Options({"full", "diagonal"})],
        "lkj_concentration": [Interval(numbers.Real, 0, None, closed="neither")],
        "noise_prior_scale": [Interval(numbers.Real, 0, None, closed="neither")],
        "standardize": ["boolean"],
        "mask_threshold": [Interval(numbers.Real, 0, 1, closed="right")],
        "missing": [_Options({"impute", "error"})],
        "unseen_groups": [_Options({"population", "error"})],
        "engine": [_Options({"auto", "collapsed", "direct"})],
        "num_warmup": [Interval(numbers.Integral, 1, None, closed="left")],
        "num_samples": [Interval(numbers.Integral, 1, None, closed="left")],
        "num_chains": [Interval(numbers.Integral, 1, None, closed="left")],
        "target_accept_prob": [Interval(numbers.Real, 0, 1, closed="neither")],
        "on_bad_convergence": [_Options({"warn", "raise", "ignore"})],
        "max_posterior_bytes": [Interval(numbers.Integral, 1, None, closed="left")],
        "keep_group_draws": ["boolean", _Options({"auto"})],
        "max_latent_rows": [Interval(numbers.Integral, 0, None, closed="left")],
        "progress_bar": ["boolean", _Options({"auto"})],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        *,
        group_col: str | int | None = None,
        pooling: Literal["partial", "none", "complete"] = "partial",
        coef_prior_scale: float = 1.0,
        intercept_prior_scale: float = 1.0,
        group_scale_prior: float = 1.0,
        varying: Literal["auto", "all"] | list = "auto",
        group_covariance: Literal["full", "diagonal"] = "full",
        lkj_concentration: float = 2.0,
        noise_prior_scale: float = 1.0,
        standardize: bool = True,
        mask_threshold: float = 1.0,
        missing: Literal["impute", "error"] = "impute",
        unseen_groups: Literal["population", "error"] = "population",
        engine: Literal["auto", "collapsed", "direct"] = "auto",
        num_warmup: int = 500,
        num_samples: int = 1000,
        num_chains: int = 4,
        target_accept_prob: float = 0.8,
        on_bad_convergence: Literal["warn", "raise", "ignore"] = "warn",
        max_posterior_bytes: int = 4_000_000_000,
        keep_group_draws: bool | Literal["auto"] = "auto",
        max_latent_rows: int = 100_000,
        progress_bar: bool | Literal["auto"] = "auto",
        random_state: int | np.random.RandomState | None = None,
    ) -> None:
        self.group_col = group_col
        self.pooling = pooling
        self.coef_prior_scale = coef_prior_scale
        self.intercept_prior_scale = intercept_prior_scale
        self.group_scale_prior = group_scale_prior
        self.varying = varying
        self.group_covariance = group_covariance
        self.lkj_concentration = lkj_concentration
        self.noise_prior_scale = noise_prior_scale
        self.standardize = standardize
        self.mask_threshold = mask_threshold
        self.missing = missing
        self.unseen_groups = unseen_groups
        self.engine = engine
        self.num_warmup = num_warmup
        self.num_samples = num_samples
        self.num_chains = num_chains
        self.target_accept_prob = target_accept_prob
        self.on_bad_convergence = on_bad_convergence
        self.max_posterior_bytes = max_posterior_bytes
        self.keep_group_draws = keep_group_draws
        self.max_latent_rows = max_latent_rows
        self.progress_bar = progress_bar
        self.random_state = random_state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True
        tags.non_deterministic = self.random_state is None
        return tags

    # ------------------------------------------------------------------ fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(
        self,
        X: ArrayLike | pd.DataFrame | dd.DataFrame,
        y: ArrayLike | dd.Series,
        *,
        groups: ArrayLike | dd.Series | None = None,
        sample_weight: ArrayLike | dd.Series | None = None,
    ) -> MaskedHierarchicalRegressor:
        """Fit the model with NUTS.

        Parameters
        ----------
        X : {array-like, DataFrame, dask DataFrame} of shape \
                (n_samples, n_features_in)
            Features, with the group column when ``group_col`` is set. NaN
            marks a missing cell; a feature that is NaN in (a fraction
            ``mask_threshold`` of) every row of a group is off for it. A
            dask DataFrame is fitted without collecting it (collapsed engine
            only): the statistics are summed over its partitions on the
            workers, in two passes over the data.
        y : array-like or dask Series of shape (n_samples,)
            Target; NaN or inf raise a ValueError. A dask Series, partitioned
            like ``X``, when ``X`` is a dask DataFrame.
        groups : array-like or dask Series of shape (n_samples,), default=None
            Group labels, when they are not a column of ``X``.
        sample_weight : array-like or dask Series of shape (n_samples,), \
                default=None
            Frequency weights.

        Returns
        -------
        self : MaskedHierarchicalRegressor
            The fitted estimator.

        Examples
        --------
        >>> from hiermask import MaskedHierarchicalRegressor
        >>> from hiermask.datasets import make_manufacturing
        >>> X, y = make_manufacturing(60, random_state=0)
        >>> est = MaskedHierarchicalRegressor(
        ...     group_col="Product_Group", num_warmup=100, num_samples=100,
        ...     num_chains=2, on_bad_convergence="ignore", random_state=0,
        ... ).fit(X, y)
        >>> est.mask_.loc["Product_Group_1"].tolist()  # Cutting_Wait_Time is off
        [True, True, False]
        >>> float(est.coef_[0, 2])
        0.0
        """
        dask_input = any(
            _dask.is_dask_collection(v) for v in (X, y, groups, sample_weight)
        )
        fitter = self._fit_dask if dask_input else self._fit
        # Plain attribute assignments, as in BayesianRidge, but only once
        # everything is computed: a fit that fails leaves the estimator as it was.
        fitted = fitter(X, y, groups, sample_weight)
        for name in (_FITTED_ATTRIBUTES - fitted.keys()) & vars(self).keys():
            delattr(self, name)
        for name, value in fitted.items():
            setattr(self, name, value)
        return self

    def _input_attributes(self, X, y="no_validation"):
        """``n_features_in_`` and ``feature_names_in_`` of ``X`` as
        ``validate_data(reset=True)`` sets them, set on a copy: fit installs
        every attribute at its end."""
        probe = copy.copy(self)
        validate_data(probe, X, y, reset=True, skip_check_array=True)
        names = ("n_features_in_", "feature_names_in_")
        return {name: vars(probe)[name] for name in names if name in vars(probe)}

    def _fit(self, X, y, groups, sample_weight):
        """fit's work; returns the fitted attributes without setting them."""
        parsed = split_groups(X, self.group_col, groups, ensure_min_samples=2)
        inputs = self._input_attributes(X, y)
        features = parsed.features
        n_samples = features.shape[0]
        target = check_target(y, n_samples)
        note = target_note(target)
        if note:
            warnings.warn(note, UserWarning, stacklevel=4)
        weights = check_weights(sample_weight, features)
        groups_, group_idx = encode_groups(parsed.labels, n_samples)
        names = parsed.feature_names
        nans = nan_counts(features, group_idx, len(groups_))
        rows = np.bincount(group_idx, minlength=len(groups_))
        mask = mask_from_counts(nans, rows, self.mask_threshold)
        self._check_mask_and_missing(
            np.where(mask, nans, 0).sum(axis=0), rows, groups_, mask, names
        )
        self._warn_thin_masks(nans, mask, groups_, names)
        keep = self._keep_group_draws(len(groups_), features.shape[1])
        config = self._fit_config(
            names, isinstance(X, pd.DataFrame), inputs["n_features_in_"], keep
        )
        posterior = fit_posterior(features, target, weights, group_idx, mask, config)
        model = self._model(posterior, mask, groups_, names, config.seed, target)
        return {**inputs, **self._fitted_state(model)}

    def _fit_dask(self, X, y, groups, sample_weight):
        """fit's work on dask input: two passes over the partitions, then the
        sampler on the client; returns the fitted attributes."""
        if self.engine == "direct":
            raise ValueError(
                "engine='direct' needs every row in memory and cannot fit dask "
                "data; use engine='collapsed' (or 'auto'), or fit on X.compute()."
            )
        names = _dask.check_fit_inputs(X, y, groups, sample_weight, self.group_col)
        inputs = self._input_attributes(X._meta)
        summary = _dask.summarize(X, y, groups, sample_weight, self.group_col)
        if summary.n_rows < 2:
            raise ValueError(
                f"Found {summary.n_rows} sample(s) while a minimum of 2 is required."
            )
        if summary.weight_sum <= 0:
            raise ValueError("sample_weight sums to zero: nothing to fit.")
        if float(summary.y.m2) == 0.0:
            raise ValueError(constant_target_message(float(summary.y.mean)))
        groups_ = summary.labels
        mask = mask_from_counts(summary.nans, summary.rows, self.mask_threshold)
        self._check_mask_and_missing(
            np.where(mask, summary.nans, 0).sum(axis=0),
            summary.rows,
            groups_,
            mask,
            names,
        )
        self._warn_thin_masks(summary.nans, mask, groups_, names)
        keep = self._keep_group_draws(len(groups_), len(names))
        config = self._fit_config(names, True, inputs["n_features_in_"], keep)
        fit_stats = _dask.fit_statistics(
            X,
            y,
            groups,
            sample_weight,
            self.group_col,
            summary,
            mask,
            self.max_latent_rows,
        )
        posterior = posterior_from_statistics(fit_stats, config)
        model = self._model(posterior, mask, groups_, names, config.seed, None)
        return {**inputs, **self._fitted_state(model)}

    def _varying_setting(self, names, frame, n_columns):
        """``varying`` as FitConfig takes it: "auto", "all" or one flag per
        feature (labels for a DataFrame, positions among the ``n_columns``
        columns of X for arrays)."""
        if isinstance(self.varying, str):
            return self.varying
        flags = [False] * len(names)
        for item in list(np.asarray(self.varying, dtype=object).ravel()):
            if frame:
                key = str(item)
                if key not in names:
                    raise ValueError(
                        f"varying lists {item!r}, which is not a feature column of "
                        f"X; the features are {list(names)}."
                    )
            else:
                if not isinstance(item, numbers.Integral) or isinstance(item, bool):
                    raise ValueError(
                        f"varying lists {item!r}: when X is not a DataFrame, "
                        "varying lists column positions (ints)."
                    )
                if not -n_columns <= item < n_columns:
                    raise ValueError(
                        f"varying lists position {item}, out of range for X with "
                        f"{n_columns} columns."
                    )
                key = f"x{int(item) % n_columns}"
                if key not in names:
                    raise ValueError(
                        f"varying lists position {item}, the group column; it "
                        "lists feature columns."
                    )
            flags[list(names).index(key)] = True
        return tuple(flags)

    def _fit_config(self, names=None, frame=False, n_columns=None, keep=True):
        engine = "collapsed" if self.engine == "auto" else self.engine
        seed = int(
            check_random_state(self.random_state).randint(np.iinfo(np.int32).max)
        )
        return FitConfig(
            pooling=self.pooling,
            engine=engine,
            standardize=bool(self.standardize),
            coef_prior_scale=float(self.coef_prior_scale),
            intercept_prior_scale=float(self.intercept_prior_scale),
            group_scale_prior=float(self.group_scale_prior),
            noise_prior_scale=float(self.noise_prior_scale),
            num_warmup=int(self.num_warmup),
            num_samples=int(self.num_samples),
            num_chains=int(self.num_chains),
            target_accept_prob=float(self.target_accept_prob),
            seed=seed,
            progress_bar=(
                "auto" if self.progress_bar == "auto" else bool(self.progress_bar)
            ),
            varying=(
                self._varying_setting(names, frame, n_columns) if names else "all"
            ),
            group_covariance=self.group_covariance,
            lkj_concentration=float(self.lkj_concentration),
            feature_names=tuple(names) if names else None,
            keep_group_draws=keep,
        )

    def _model(self, posterior, mask, groups_, names, seed, target):
        """The frozen fitted model of a posterior and this estimator's settings."""
        values = (posterior, mask, names, seed, target)
        fields = dict(zip(FILE_FIELDS, values, strict=True))
        return from_fields({"groups_": groups_, **fields}, self.get_params(deep=False))

    def _fitted_state(self, model):
        """The fitted attributes of a model (raises on bad convergence)."""
        convergence = model.convergence()
        self._gate(convergence)  # may raise: before any fitted state is set
        posterior, draws = model.posterior, model.draws
        fitted = {
            "_fitted": model,
            "groups_": model.groups,
            "intercept_": posterior.coef_mean[:, 0].copy(),
            "coef_": posterior.coef_mean[:, 1:] * model.mask,
            "noise_scale_": float(np.mean(draws["noise"])),
        }
        if "population_intercept" in draws:
            fitted["population_intercept_"] = float(
                np.mean(draws["population_intercept"])
            )
            fitted["population_coef_"] = np.mean(draws["population_coef"], axis=0)
        if "group_intercept_scale" in draws:
            fitted["group_intercept_scale_"] = float(
                np.mean(draws["group_intercept_scale"])
            )
            fitted["group_coef_scale_"] = np.mean(draws["group_coef_scale"], axis=0)
        fitted["posterior_"] = draws
        fitted["convergence_"] = convergence
        return fitted

    def _keep_group_draws(self, n_groups, n_features):
        """Whether fit keeps the group draws (``keep_group_draws``); raises
        when kept draws would exceed ``max_posterior_bytes``."""
        n_draws = self.num_chains * self.num_samples
        need = n_draws * n_groups * (n_features + 1) * 8
        direct = self.engine == "direct"
        if direct and self.keep_group_draws is False:
            raise ValueError(
                "keep_group_draws=False needs the collapsed engine: "
                "engine='direct' samples every group's coefficients and keeps "
                "their draws. Use engine='collapsed' (or 'auto')."
            )
        keep = self.keep_group_draws
        if keep == "auto":
            keep = direct or need <= _limits.KEEP_GROUP_DRAWS_BYTES
        if not keep:
            return False
        if need > self.max_posterior_bytes:
            raise ValueError(
                f"The posterior would keep {need / 1e9:.2f} GB of draws "
                f"({n_draws} draws x {n_groups} groups x {n_features + 1} "
                f"coefficients x 8 bytes), above max_posterior_bytes="
                f"{self.max_posterior_bytes}. Lower num_samples or num_chains, "
                "raise max_posterior_bytes, or set keep_group_draws=False."
            )
        return True

    def _check_mask_and_missing(self, latent_counts, row_counts, groups_, mask, names):
        """Warn about dropped features and single-row groups; refuse latent
        cells under ``missing="error"``. ``latent_counts`` (n_features,)
        counts NaN in applicable cells, ``row_counts`` (n_groups,) rows."""
        dropped = ~mask.any(axis=0)
        if dropped.any():
            warnings.warn(
                "Feature(s) "
                + ", ".join(repr(names[j]) for j in np.flatnonzero(dropped))
                + " are off (NaN) in every group and are dropped; their "
                "coefficients are 0.",
                UserWarning,
                stacklevel=4,
            )
        latent_counts = np.asarray(latent_counts)
        if self.missing == "error" and latent_counts.any():
            cols = [
                f"{names[j]!r} ({int(latent_counts[j])} cell(s))"
                for j in np.flatnonzero(latent_counts)
            ]
            raise ValueError(
                "X has NaN in features that apply to the row's group, in column(s) "
                + ", ".join(cols)
                + ". Use missing='impute' to impute them, or fill them."
            )
        if self.pooling == "none":
            single = groups_[np.asarray(row_counts) == 1]
            if len(single):
                warnings.warn(
                    f"{len(single)} group(s) have a single row "
                    f"({', '.join(map(repr, single[:5]))}); under pooling='none' "
                    "their coefficients are determined by the prior.",
                    UserWarning,
                    stacklevel=4,
                )

    def _warn_thin_masks(self, nans, mask, groups_, names):
        """Warn about (group, feature) pairs switched off on the NaN of fewer
        than MIN_EVIDENCE rows: a value or two missing at random looks the
        same as "does not apply"."""
        g, j = thin_evidence(nans, mask)
        if not len(g):
            return
        shown = ", ".join(
            f"({groups_[a]!r}, {names[b]!r}: {int(nans[a, b])} row(s))"
            for a, b in zip(g[:5], j[:5], strict=True)
        )
        more = f", ... ({len(g)} in all)" if len(g) > 5 else ""
        warnings.warn(
            f"{len(g)} (group, feature) pair(s) are switched off on the evidence "
            f"of fewer than {MIN_EVIDENCE} rows with NaN: {shown}{more}. mask_ "
            f"follows the rule (mask_threshold={self.mask_threshold}); if these "
            "values are missing rather than not applicable, the coefficient is "
            "still 0 there: fill them before fit to keep the feature on.",
            UserWarning,
            stacklevel=4,
        )

    def _gate(self, convergence):
        if self.on_bad_convergence == "ignore":
            return
        problems = []
        r_hat, ess = convergence["max_r_hat"], convergence["min_ess_bulk"]
        if np.isnan(r_hat) or np.isnan(ess):  # fewer than 4 draws per chain
            problems.append(
                "r_hat and ESS could not be computed (too few draws: "
                f"{self.num_chains} chain(s) x {self.num_samples})"
            )
        if r_hat > MAX_R_HAT:
            problems.append(
                f"max r_hat {r_hat:.3f} > {MAX_R_HAT} "
                f"(worst: {convergence['worst_parameter']})"
            )
        if ess < MIN_ESS_PER_CHAIN * self.num_chains:
            problems.append(
                f"min bulk ESS {ess:.0f} < {MIN_ESS_PER_CHAIN * self.num_chains}"
            )
        if convergence["n_divergences"]:
            problems.append(f"{convergence['n_divergences']} divergent transition(s)")
        if not problems:
            return
        msg = (
            "NUTS may not have converged: "
            + "; ".join(problems)
            + ". Increase num_warmup/num_samples or target_accept_prob."
        )
        if self.on_bad_convergence == "raise":
            raise ConvergenceError(msg)
        warnings.warn(msg, ConvergenceWarning, stacklevel=4)

    # -------------------------------------------------------------- predict
    @property
    def mask_(self) -> pd.DataFrame:
        """Group x feature mask as a labelled DataFrame (True: feature on).

        Feature ``j`` is off for group ``g`` when the fraction of NaN in
        column ``j`` among ``g``'s rows is at least ``mask_threshold``.

        Examples
        --------
        >>> from hiermask import MaskedHierarchicalRegressor
        >>> from hiermask.datasets import make_manufacturing
        >>> X, y = make_manufacturing(60, random_state=0)
        >>> est = MaskedHierarchicalRegressor(
        ...     group_col="Product_Group", num_warmup=100, num_samples=100,
        ...     num_chains=2, on_bad_convergence="ignore", random_state=0,
        ... ).fit(X, y)
        >>> est.mask_.to_numpy().tolist()
        [[True, True, False], [True, True, True]]
        """
        model = self._model_or_raise("mask_")
        return pd.DataFrame(
            model.mask.copy(),
            index=pd.Index(model.groups, name="group"),
            columns=pd.Index(model.feature_names, name="feature"),
        )

    @property
    def varying_(self) -> pd.Series:
        """Which features have a group-specific slope (True) after fit.

        ``varying="auto"`` leaves out the group-level predictors (features
        constant within every group where they apply).

        Examples
        --------
        >>> import numpy as np
        >>> from hiermask import MaskedHierarchicalRegressor
        >>> rng = np.random.default_rng(0)
        >>> g = np.repeat(np.arange(6), 10)
        >>> u = np.repeat(rng.normal(size=6), 10)  # a group-level predictor
        >>> X = np.column_stack([rng.normal(size=60), u])
        >>> y = X @ [1.0, 2.0] + rng.normal(size=6)[g] + rng.normal(size=60)
        >>> est = MaskedHierarchicalRegressor(
        ...     num_warmup=100, num_samples=100, num_chains=2,
        ...     on_bad_convergence="ignore", random_state=0,
        ... ).fit(X, y, groups=g)
        >>> est.varying_.to_dict()
        {'x0': True, 'x1': False}
        """
        model = self._model_or_raise("varying_")
        return pd.Series(
            model.varying,
            index=pd.Index(model.feature_names, name="feature"),
            name="varying",
        )

    @property
    def group_correlation_(self) -> pd.DataFrame:
        """Posterior-mean correlation of the group effects (``"full"``).

        Labelled ``intercept`` and the varying features; set under partial
        pooling with ``group_covariance="full"`` when there are at least as
        many groups as correlated effects.

        Examples
        --------
        >>> import numpy as np
        >>> from hiermask import MaskedHierarchicalRegressor
        >>> rng = np.random.default_rng(0)
        >>> g = np.repeat(np.arange(8), 10)
        >>> X = rng.normal(size=(80, 1))
        >>> y = X[:, 0] * (1 + rng.normal(size=8)[g]) + rng.normal(size=80)
        >>> est = MaskedHierarchicalRegressor(
        ...     num_warmup=100, num_samples=100, num_chains=2,
        ...     on_bad_convergence="ignore", random_state=0,
        ... ).fit(X, y, groups=g)
        >>> list(est.group_correlation_.columns)
        ['intercept', 'x0']
        """
        model = vars(self).get("_fitted")
        if model is None or "group_correlation" not in model.draws:
            raise AttributeError(
                "group_correlation_ is set by fit under pooling='partial' with "
                "group_covariance='full' and at least as many groups as correlated "
                "effects."
            )
        mean = np.mean(model.draws["group_correlation"], axis=0)
        index = pd.Index(model.effects, name="coefficient")
        return pd.DataFrame(mean, index=index, columns=index.copy())

    def _model_or_raise(self, attribute):
        # The fitted model, or the AttributeError that hasattr expects.
        model = vars(self).get("_fitted")
        if model is None:
            raise AttributeError(f"{attribute} is set by fit.")
        return model

    def _prepare(self, X, groups, unseen_table=None):
        """Features, fitted group codes (-1: unseen) and unseen-group codes.

        ``unseen_table`` (dask partitions) numbers the unseen groups of every
        partition (checked and warned about once, at compute); without it
        they are numbered, checked and warned about here."""
        model = fitted_model(self)
        parsed = split_groups(X, self.group_col, groups, ensure_min_samples=0)
        validate_data(self, X, reset=False, skip_check_array=True)
        if parsed.features.shape[1] != model.mask.shape[1]:
            raise ValueError(
                f"X has {parsed.features.shape[1]} feature columns, but the model "
                f"was fitted with {model.mask.shape[1]}."
            )
        n = parsed.features.shape[0]
        group_idx = lookup_groups(self.groups_, parsed.labels, n)
        if unseen_table is not None:  # checked once over all partitions
            return (
                parsed.features,
                group_idx,
                unseen_table.lookup(parsed.labels, group_idx),
            )
        unseen = unseen_codes(group_idx, parsed.labels)
        check_unseen(
            self.groups_,
            unseen[1],
            int(np.sum(group_idx < 0)),
            policy=self.unseen_groups,
            pooling=self.pooling,
        )
        return parsed.features, group_idx, unseen

    def _lazy(self, X, groups, what, extra=()):
        """Lazy dask DataFrame of per-row outputs (see _predict_partition)."""
        model = fitted_model(self)
        n_features = _dask.check_predict_inputs(X, groups, self.group_col)
        validate_data(self, X._meta, reset=False, skip_check_array=True)
        if n_features != model.mask.shape[1]:
            raise ValueError(
                f"X has {n_features} feature columns, but the model was fitted "
                f"with {model.mask.shape[1]}."
            )
        # A snapshot: a later refit of self does not change these results.
        return _dask.lazy_predictions(
            copy.copy(self),
            X,
            groups,
            what,
            extra,
            fitted=self.groups_,
        )

    def _predict_partition(self, X, groups, unseen_table, what, extra, number):
        """One pandas partition's outputs for :meth:`_lazy`, as an ndarray."""
        features, group_idx, unseen = self._prepare(X, groups, unseen_table)
        model = fitted_model(self)
        if what == "draws":
            n_samples, seed = extra
            return predictive_draws(
                features,
                group_idx,
                model.mask,
                model.posterior,
                unseen,
                n_samples,
                seed,
                number,
            )
        mean, sd = predictive_moments(
            features,
            group_idx,
            model.mask,
            model.posterior,
            return_sd=what != ("mean",),
        )
        if what == ("lower", "upper"):
            (z,) = extra
            return np.column_stack([mean - z * sd, mean + z * sd])
        return mean[:, None] if sd is None else np.column_stack([mean, sd])

    @staticmethod
    def _is_dask(X, groups):
        return _dask.is_dask_collection(X) or _dask.is_dask_collection(groups)

    def predict(
        self,
        X: ArrayLike | pd.DataFrame | dd.DataFrame,
        *,
        groups: ArrayLike | dd.Series | None = None,
        return_std: bool = False,
    ) -> (
        np.ndarray
        | tuple[np.ndarray, np.ndarray]
        | dd.Series
        | tuple[dd.Series, dd.Series]
    ):
        """Posterior-predictive mean (and sd) of each row.

        Parameters
        ----------
        X : {array-like, DataFrame, dask DataFrame} of shape \
                (n_samples, n_features_in)
            Rows to predict, laid out as in fit. Values of features that are
            off for a row's group are ignored; NaN in features that are on is
            integrated out.
        groups : array-like or dask Series of shape (n_samples,), default=None
            Group labels, when they are not a column of ``X``.
        return_std : bool, default=False
            Whether to return the predictive sd (noise included).

        Returns
        -------
        y_mean : ndarray of shape (n_samples,)
            A lazy dask Series named ``"mean"`` with ``X``'s index when ``X``
            is a dask DataFrame.
        y_std : ndarray of shape (n_samples,)
            Only with ``return_std=True``; a lazy dask Series named ``"sd"``
            for dask input (computing both together reads ``X`` once).

        Examples
        --------
        >>> from hiermask import MaskedHierarchicalRegressor
        >>> from hiermask.datasets import make_manufacturing
        >>> X, y = make_manufacturing(60, random_state=0)
        >>> est = MaskedHierarchicalRegressor(
        ...     group_col="Product_Group", num_warmup=100, num_samples=100,
        ...     num_chains=2, on_bad_convergence="ignore", random_state=0,
        ... ).fit(X, y)
        >>> mean, sd = est.predict(X.head(3), return_std=True)
        >>> mean.shape, bool((sd > 0).all())
        ((3,), True)
        """
        if self._is_dask(X, groups):
            frame = self._lazy(X, groups, ("mean", "sd") if return_std else ("mean",))
            return (frame["mean"], frame["sd"]) if return_std else frame["mean"]
        features, group_idx, _ = self._prepare(X, groups)
        model = fitted_model(self)
        mean, sd = predictive_moments(
            features, group_idx, model.mask, model.posterior, return_sd=return_std
        )
        return (mean, sd) if return_std else mean

    def predict_interval(
        self,
        X: ArrayLike | pd.DataFrame | dd.DataFrame,
        *,
        groups: ArrayLike | dd.Series | None = None,
        coverage: float = 0.9,
    ) -> np.ndarray | dd.DataFrame:
        """Central posterior-predictive interval of each row.

        The interval is ``mean +/- z sd`` of the moment-matched normal
        predictive distribution.

        Parameters
        ----------
        X : {array-like, DataFrame, dask DataFrame} of shape \
                (n_samples, n_features_in)
            Rows to predict.
        groups : array-like or dask Series of shape (n_samples,), default=None
            Group labels, when they are not a column of ``X``.
        coverage : float in (0, 1), default=0.9
            Probability mass inside the interval.

        Returns
        -------
        ndarray of shape (n_samples, 2)
            Lower and upper bounds; a lazy dask DataFrame with columns
            ``"lower"`` and ``"upper"`` and ``X``'s index for dask input.

        Examples
        --------
        >>> from hiermask import MaskedHierarchicalRegressor
        >>> from hiermask.datasets import make_manufacturing
        >>> X, y = make_manufacturing(60, random_state=0)
        >>> est = MaskedHierarchicalRegressor(
        ...     group_col="Product_Group", num_warmup=100, num_samples=100,
        ...     num_chains=2, on_bad_convergence="ignore", random_state=0,
        ... ).fit(X, y)
        >>> bounds = est.predict_interval(X.head(3), coverage=0.9)
        >>> bounds.shape, bool((bounds[:, 0] < bounds[:, 1]).all())
        ((3, 2), True)
        """
        if not 0 < coverage < 1:
            raise ValueError(f"coverage must be in (0, 1), got {coverage!r}.")
        z = ndtri(0.5 + coverage / 2)
        if self._is_dask(X, groups):
            return self._lazy(X, groups, ("lower", "upper"), (float(z),))
        features, group_idx, _ = self._prepare(X, groups)
        model = fitted_model(self)
        mean, sd = predictive_moments(features, group_idx, model.mask, model.posterior)
        return np.column_stack([mean - z * sd, mean + z * sd])

    def sample_y(
        self,
        X: ArrayLike | pd.DataFrame | dd.DataFrame,
        *,
        groups: ArrayLike | dd.Series | None = None,
        n_samples: int = 1,
        random_state: int | np.random.RandomState | None = None,
    ) -> np.ndarray | dd.DataFrame:
        """Draws from the posterior predictive distribution.

        Column ``k`` uses one posterior draw for every row; a group not seen
        in fit gets group effects that depend only on the seed and its label.

        Parameters
        ----------
        X : {array-like, DataFrame, dask DataFrame} of shape \
                (n_rows, n_features_in)
            Rows to predict.
        groups : array-like or dask Series of shape (n_rows,), default=None
            Group labels, when they are not a column of ``X``.
        n_samples : int, default=1
            Draws per row.
        random_state : int, RandomState instance or None, default=None
            Seed; None uses the estimator's ``random_state``.

        Returns
        -------
        ndarray of shape (n_rows, n_samples)
            A lazy dask DataFrame with integer columns ``0 .. n_samples - 1``
            and ``X``'s index for dask input. Column ``k`` uses the same
            posterior draw, and an unseen group the same effects, in every
            partition; the noise is drawn per partition (the first partition
            continues the in-memory stream), so the values equal those for
            the computed frame only when it has one partition.

        Notes
        -----
        Column ``k`` uses one posterior draw for every row.

        Examples
        --------
        >>> from hiermask import MaskedHierarchicalRegressor
        >>> from hiermask.datasets import make_manufacturing
        >>> X, y = make_manufacturing(60, random_state=0)
        >>> est = MaskedHierarchicalRegressor(
        ...     group_col="Product_Group", num_warmup=100, num_samples=100,
        ...     num_chains=2, on_bad_convergence="ignore", random_state=0,
        ... ).fit(X, y)
        >>> est.sample_y(X.head(3), n_samples=5, random_state=0).shape
        (3, 5)
        """
        if not isinstance(n_samples, numbers.Integral) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive int, got {n_samples!r}.")
        dask_input = self._is_dask(X, groups)
        model = fitted_model(self)
        if not dask_input:
            features, group_idx, unseen = self._prepare(X, groups)
        rs = self.random_state if random_state is None else random_state
        if rs is None:
            seed = model.seed
        else:
            seed = int(check_random_state(rs).randint(np.iinfo(np.int32).max))
        if dask_input:
            return self._lazy(X, groups, "draws", (int(n_samples), seed))
        return predictive_draws(
            features, group_idx, model.mask, model.posterior, unseen, n_samples, seed
        )

    def score(
        self,
        X: ArrayLike | pd.DataFrame,
        y: ArrayLike,
        *,
        groups: ArrayLike | None = None,
        sample_weight: ArrayLike | None = None,
    ) -> float:
        """Coefficient of determination R^2 of the posterior-mean prediction.

        Parameters
        ----------
        X : {array-like, DataFrame} of shape (n_samples, n_features_in)
            Rows.
        y : array-like of shape (n_samples,)
            True targets.
        groups : array-like of shape (n_samples,), default=None
            Group labels, when they are not a column of ``X``.
        sample_weight : array-like of shape (n_samples,), default=None
            Weights.

        Returns
        -------
        float

        Examples
        --------
        >>> from hiermask import MaskedHierarchicalRegressor
        >>> from hiermask.datasets import make_manufacturing
        >>> X, y = make_manufacturing(60, random_state=0)
        >>> est = MaskedHierarchicalRegressor(
        ...     group_col="Product_Group", num_warmup=100, num_samples=100,
        ...     num_chains=2, on_bad_convergence="ignore", random_state=0,
        ... ).fit(X, y)
        >>> est.score(X, y) > 0.9
        True
        """
        if any(_dask.is_dask_collection(v) for v in (X, y, groups, sample_weight)):
            raise TypeError(
                "score does not take dask input; compute R^2 from the lazy "
                "predict(X) with dask reductions, or score a computed sample."
            )
        return r2_score(y, self.predict(X, groups=groups), sample_weight=sample_weight)

    # ------------------------------------------------------------- results
    def summary(
        self, coverage: float = 0.9, *, long: bool = False, group_level: bool = True
    ) -> pd.DataFrame:
        """Posterior summary of every parameter.

        Parameters
        ----------
        coverage : float in (0, 1), default=0.9
            Mass of the central interval reported.
        long : bool, default=False
            Whether to give each row's ``parameter``, ``group`` and
            ``feature`` as columns (None where a row has none) instead of a
            readable index, ready for ``set_index`` or ``groupby``.
        group_level : bool, default=True
            Whether to include the group intercepts and coefficients; False
            gives the population-level rows only (fast for many groups).

        Returns
        -------
        pandas.DataFrame
            One row per parameter (``coef[group, feature]``, ...), with mean,
            sd, interval bounds, bulk and tail ESS and R-hat (those computed
            at fit for the convergence check are reused).

        Examples
        --------
        >>> from hiermask import MaskedHierarchicalRegressor
        >>> from hiermask.datasets import make_manufacturing
        >>> X, y = make_manufacturing(60, random_state=0)
        >>> est = MaskedHierarchicalRegressor(
        ...     group_col="Product_Group", num_warmup=100, num_samples=100,
        ...     num_chains=2, on_bad_convergence="ignore", random_state=0,
        ... ).fit(X, y)
        >>> table = est.summary(coverage=0.9)
        >>> list(table.columns)
        ['mean', 'sd', '5%', '95%', 'ess_bulk', 'ess_tail', 'r_hat']
        >>> "coef[Product_Group_1, Cutting_Wait_Time]" in table.index  # masked
        False
        """
        model = fitted_model(self)
        from ._summary import summary_frame

        return summary_frame(
            model, coverage=coverage, long=long, group_level=group_level
        )

    def coefficients(self) -> pd.DataFrame:
        """Posterior-mean intercepts and slopes as a labelled table.

        Returns
        -------
        pandas.DataFrame of shape (n_groups, n_features + 1)
            Index ``group`` (the labels of ``groups_``), columns
            ``intercept`` and the feature names: ``intercept_`` and
            ``coef_``, with NaN where a feature does not apply to a group
            (``coef_`` holds 0.0 there).

        Examples
        --------
        >>> from hiermask import MaskedHierarchicalRegressor
        >>> from hiermask.datasets import make_manufacturing
        >>> X, y = make_manufacturing(60, random_state=0)
        >>> est = MaskedHierarchicalRegressor(
        ...     group_col="Product_Group", num_warmup=100, num_samples=100,
        ...     num_chains=2, on_bad_convergence="ignore", random_state=0,
        ... ).fit(X, y)
        >>> table = est.coefficients()
        >>> list(table.columns)
        ['intercept', 'Feed_Speed', 'Pull_Acceleration', 'Cutting_Wait_Time']
        >>> bool(table.isna().loc["Product_Group_1", "Cutting_Wait_Time"])
        True
        """
        model = fitted_model(self)
        table = pd.DataFrame(
            np.where(model.mask, self.coef_, np.nan),
            index=pd.Index(model.groups, name="group"),
            columns=pd.Index(model.feature_names, name="feature"),
        )
        table.insert(0, "intercept", self.intercept_)
        return table

    def to_arviz(
        self,
        X: ArrayLike | pd.DataFrame | None = None,
        y: ArrayLike | None = None,
        *,
        groups: ArrayLike | None = None,
    ) -> arviz.InferenceData:
        """The posterior as an :class:`arviz.InferenceData`.

        Requires the optional extra ``hiermask[arviz]``.

        Parameters
        ----------
        X : {array-like, DataFrame} of shape (n_samples, n_features_in), \
                default=None
            Rows whose pointwise log-likelihood is added (group
            ``log_likelihood``, variable ``y``), so that ``arviz.loo`` and
            ``arviz.compare`` work: usually the fit's ``X``. Every group must
            have been seen in fit. None: no log-likelihood.
        y : array-like of shape (n_samples,), default=None
            Targets of ``X``'s rows; None: the fit's target (``X`` must then
            be the fit's rows).
        groups : array-like of shape (n_samples,), default=None
            Group labels, when they are not a column of ``X``.

        Returns
        -------
        arviz.InferenceData
            Posterior (coefficients labelled by group and feature; masked
            ones NaN), sample stats, the observed target and, with ``X``,
            the log-likelihood.

        Examples
        --------
        >>> from hiermask import MaskedHierarchicalRegressor
        >>> from hiermask.datasets import make_manufacturing
        >>> X, y = make_manufacturing(60, random_state=0)
        >>> est = MaskedHierarchicalRegressor(
        ...     group_col="Product_Group", num_warmup=100, num_samples=100,
        ...     num_chains=2, on_bad_convergence="ignore", random_state=0,
        ... ).fit(X, y)
        >>> idata = est.to_arviz()
        >>> "posterior" in idata.groups()
        True
        """
        model = fitted_model(self)
        if model.target is None:
            raise ValueError(
                "to_arviz needs the target of the fit, which a fit on dask data "
                "does not collect; summary() and posterior_ hold the posterior."
            )
        from ._summary import pointwise_log_likelihood, to_inference_data

        if X is None:
            if y is not None:
                raise ValueError("to_arviz: y was given without X.")
            return to_inference_data(model)
        features, group_idx, target = self._log_likelihood_rows(X, y, groups)
        values = pointwise_log_likelihood(model, features, group_idx, target)
        return to_inference_data(model, log_likelihood=(values, target))

    def _log_likelihood_rows(self, X, y, groups):
        """Features, group codes and targets of to_arviz's rows, checked."""
        parsed = split_groups(X, self.group_col, groups, ensure_min_samples=1)
        validate_data(self, X, reset=False, skip_check_array=True)
        n = parsed.features.shape[0]
        group_idx = lookup_groups(self.groups_, parsed.labels, n)
        if (group_idx < 0).any():
            unseen = pd.unique(parsed.labels[group_idx < 0])
            raise ValueError(
                f"to_arviz: {len(unseen)} group(s) of X were not seen in fit "
                f"({', '.join(map(repr, unseen[:5]))}); the log-likelihood is "
                "that of the fit's groups."
            )
        fit_target = fitted_model(self).target
        if y is None and n != len(fit_target):
            raise ValueError(
                f"to_arviz: X has {n} rows and the fit had {len(fit_target)}; "
                "give y for other rows than the fit's."
            )
        target = fit_target if y is None else check_target(y, n)
        need = 8 * n * self.posterior_["noise"].shape[0]
        if need > self.max_posterior_bytes:
            raise ValueError(
                f"to_arviz: the log-likelihood of {n} rows would take "
                f"{need / 1e9:.2f} GB, above max_posterior_bytes="
                f"{self.max_posterior_bytes}; pass fewer rows or raise it."
            )
        return parsed.features, group_idx, target

    # ------------------------------------------------------------ pickling
    def __getstate__(self):
        # a copy: on Python 3.11+ BaseEstimator's state is the instance's own
        # __dict__, and pickling must not change the estimator
        state = dict(super().__getstate__())
        state["_hiermask_version"] = _version()
        return state

    def __setstate__(self, state):
        saved = state.pop("_hiermask_version", None)
        if saved is not None and saved != _version():
            warnings.warn(
                InconsistentVersionWarning(
                    original_version=saved, current_version=_version()
                ),
                stacklevel=2,
            )
        if "_posterior" in state:  # pickled by hiermask 0.1: one model object
            state["_fitted"] = from_fields(state, state)
        super().__setstate__(state)

    # ---------------------------------------------------------- model files
    def save(self, path):
        """Write the fitted model to a file that runs no code when loaded.

        The file is a zip archive of ``.npy`` arrays (written without pickle)
        and one JSON document holding the parameters, the feature names, the
        group labels with their types, the mask, every fitted attribute, the
        hiermask version and the file format version. Read it back with
        :func:`hiermask.load`; unlike a pickle, loading it never runs code
        from the file.

        The group draws are written when fit kept them
        (``keep_group_draws``), in format 1. A fit that did not keep them is
        written in format 2, with every group's exact posterior mean and
        covariance but without the group draws, and saving it makes none (at
        100,000 groups of 3 features they would be 12.8 GB): the loaded
        model predicts, gives intervals, ``coef_``, ``summary()`` and
        ``plot_forest`` as the fit did, while ``posterior_["coef"]``,
        ``posterior_["intercept"]``, ``sample_y``, ``to_arviz()`` and
        ``plot_ppc`` raise a ValueError on it. A pickle of the fit keeps
        what makes the draws instead.

        Parameters
        ----------
        path : str or path-like
            The file to write, replaced atomically if it exists; the suffix
            ``.hmz`` is suggested.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            If the estimator is not fitted.
        ValueError
            If a group label is not a str, int, float or bool, or a parameter
            is not None, a bool, an int, a finite float or a str (for example
            a ``RandomState`` instance as ``random_state``).

        See Also
        --------
        hiermask.load : Read a model file.

        Notes
        -----
        Metadata-routing requests (``set_fit_request`` and the like) are
        settings of a search, not of the model, and are not saved.

        Examples
        --------
        >>> import numpy as np
        >>> import hiermask
        >>> from hiermask import MaskedHierarchicalRegressor
        >>> rng = np.random.default_rng(0)
        >>> X = rng.normal(size=(40, 2))
        >>> y = X @ [1.0, -1.0] + rng.normal(scale=0.1, size=40)
        >>> est = MaskedHierarchicalRegressor(
        ...     num_warmup=100, num_samples=100, num_chains=2, random_state=0,
        ...     on_bad_convergence="ignore",
        ... ).fit(X, y)
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "model.hmz")
        >>> est.save(path)
        >>> loaded = hiermask.load(path)
        >>> bool((loaded.predict(X) == est.predict(X)).all())
        True
        """
        from ._files import save

        save(self, path)
