"""The scikit-learn estimator: parameters and orchestration, no maths."""

from __future__ import annotations

import copy
import numbers
import warnings
from importlib import metadata
from typing import ClassVar

import numpy as np
import pandas as pd
from scipy.special import ndtri
from sklearn.base import BaseEstimator, RegressorMixin, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import r2_score
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from . import _dask
from ._fit import FitConfig, Posterior, fit_posterior, posterior_from_statistics
from ._masks import infer_mask
from ._predict import predictive_draws, predictive_moments, unseen_masks
from ._validation import (
    check_target,
    check_weights,
    encode_groups,
    lookup_groups,
    split_groups,
)

__all__ = ["ConvergenceError", "MaskedHierarchicalRegressor"]

#: Attributes set by fit (some only under some pooling modes); a refit
#: removes all of them before installing its own.
_FITTED_ATTRIBUTES = frozenset(
    {
        "_posterior",
        "_mask",
        "_feature_names",
        "_seed",
        "_fit_target",
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
    """


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
    noise_prior_scale : float, default=1.0
        HalfNormal scale of the residual sd.
    standardize : bool, default=True
        Whether the prior scales are in units of the data's sds (and the
        intercept prior sits at the means). False: raw units, centred at 0.
    mask_threshold : float in (0, 1], default=1.0
        A feature is off for a group when its NaN fraction there is at least
        this value.
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
        exceeded.
    max_latent_rows : int, default=100_000
        Dask input only: the most rows holding latent cells (NaN in a feature
        that applies to the row's group) that a fit brings to the client,
        where they stay rows of the sampled density; fit raises a ValueError
        beyond it. In-memory input has no such limit.
    progress_bar : bool, default=False
        Show a progress bar (tqdm, on stderr) over the warmup and sampling
        iterations of all chains. The sampler reports to Python about 100
        times per run; it is the same compiled program with or without the
        bar, so the draws are the same.
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
        Posterior-mean between-group sd of the intercept (partial pooling).
    noise_scale_ : float
        Posterior-mean residual sd.
    posterior_ : dict of ndarray
        Draws, chains concatenated: ``intercept`` (n_draws, n_groups),
        ``coef`` (n_draws, n_groups, n_features), ``noise`` and the
        population-level parameters.
    convergence_ : dict
        ``max_r_hat``, ``min_ess_bulk``, ``n_divergences`` and
        ``worst_parameter``.
    n_features_in_ : int
        Number of columns of ``X`` (the group column included).
    feature_names_in_ : ndarray of shape (n_features_in_,)
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
        "max_latent_rows": [Interval(numbers.Integral, 0, None, closed="left")],
        "progress_bar": ["boolean"],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        *,
        group_col=None,
        pooling="partial",
        coef_prior_scale=1.0,
        intercept_prior_scale=1.0,
        group_scale_prior=1.0,
        noise_prior_scale=1.0,
        standardize=True,
        mask_threshold=1.0,
        missing="impute",
        unseen_groups="population",
        engine="auto",
        num_warmup=500,
        num_samples=1000,
        num_chains=4,
        target_accept_prob=0.8,
        on_bad_convergence="warn",
        max_posterior_bytes=4_000_000_000,
        max_latent_rows=100_000,
        progress_bar=False,
        random_state=None,
    ):
        self.group_col = group_col
        self.pooling = pooling
        self.coef_prior_scale = coef_prior_scale
        self.intercept_prior_scale = intercept_prior_scale
        self.group_scale_prior = group_scale_prior
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
    def fit(self, X, y, groups=None, sample_weight=None):
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
        """
        saved = self.__dict__.copy()
        dask_input = any(
            _dask.is_dask_collection(v) for v in (X, y, groups, sample_weight)
        )
        try:
            fitter = self._fit_dask if dask_input else self._fit
            fitted = fitter(X, y, groups, sample_weight)
            # One assignment: drop the previous fit's attributes (those that
            # depend on pooling included) and install the new ones.
            state = {
                k: v for k, v in self.__dict__.items() if k not in _FITTED_ATTRIBUTES
            }
            state.update(fitted)
            self.__dict__ = state
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise
        return self

    def _fit(self, X, y, groups, sample_weight):
        """fit's work; returns the fitted attributes without setting them."""
        parsed = split_groups(X, self.group_col, groups)
        validate_data(self, X, y, reset=True, skip_check_array=True)
        features = parsed.features
        n_samples = features.shape[0]
        if n_samples < 2:
            raise ValueError(
                f"Found {n_samples} sample(s): n_samples=1 is too few; at least 2 "
                "rows are needed to fit."
            )
        target = check_target(y, n_samples)
        weights = check_weights(sample_weight, features)
        groups_, group_idx = encode_groups(parsed.labels, n_samples)
        names = parsed.feature_names
        mask = infer_mask(features, group_idx, len(groups_), self.mask_threshold)
        self._check_mask_and_missing(
            (mask[group_idx] & np.isnan(features)).sum(axis=0),
            np.bincount(group_idx, minlength=len(groups_)),
            groups_,
            mask,
            names,
        )
        self._check_memory(len(groups_), features.shape[1])
        config = self._fit_config()
        posterior = fit_posterior(features, target, weights, group_idx, mask, config)
        return self._fitted_state(posterior, mask, groups_, names, config.seed, target)

    def _fit_dask(self, X, y, groups, sample_weight):
        """fit's work on dask input: two passes over the partitions, then the
        sampler on the client; returns the fitted attributes."""
        if self.engine == "direct":
            raise ValueError(
                "engine='direct' needs every row in memory and cannot fit dask "
                "data; use engine='collapsed' (or 'auto'), or fit on X.compute()."
            )
        names = _dask.check_fit_inputs(X, y, groups, sample_weight, self.group_col)
        validate_data(self, X._meta, reset=True, skip_check_array=True)
        summary = _dask.summarize(X, y, groups, sample_weight, self.group_col)
        if summary.n_rows < 2:
            raise ValueError(
                f"Found {summary.n_rows} sample(s): n_samples=1 is too few; at "
                "least 2 rows are needed to fit."
            )
        if summary.weight_sum <= 0:
            raise ValueError("sample_weight sums to zero: nothing to fit.")
        groups_ = summary.labels
        # The rule of infer_mask, on the counts summed over the partitions.
        mask = summary.nans / summary.rows[:, None] < self.mask_threshold
        self._check_mask_and_missing(
            np.where(mask, summary.nans, 0).sum(axis=0),
            summary.rows,
            groups_,
            mask,
            names,
        )
        self._check_memory(len(groups_), len(names))
        config = self._fit_config()
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
        return self._fitted_state(posterior, mask, groups_, names, config.seed, None)

    def _fit_config(self):
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
            progress_bar=bool(self.progress_bar),
        )

    def _fitted_state(self, posterior, mask, groups_, names, seed, target):
        """The fitted attributes of a posterior (raises on bad convergence)."""
        convergence = self._convergence(posterior, groups_, names)
        self._gate(convergence)  # may raise: before any fitted state is set

        # Everything is computed: the caller sets the fitted state in one go.
        fitted = {
            "_posterior": posterior,
            "_mask": mask,
            "_feature_names": list(names),
            "_seed": seed,
            "_fit_target": target,
            "groups_": groups_,
            "intercept_": posterior.coef_mean[:, 0].copy(),
            "coef_": posterior.coef_mean[:, 1:] * mask,
            "noise_scale_": float(np.mean(posterior.draws["noise"])),
        }
        draws = posterior.draws
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

    def _check_memory(self, n_groups, n_features):
        n_draws = self.num_chains * self.num_samples
        need = n_draws * n_groups * (n_features + 1) * 8
        if need > self.max_posterior_bytes:
            raise ValueError(
                f"The posterior would keep {need / 1e9:.2f} GB of draws "
                f"({n_draws} draws x {n_groups} groups x {n_features + 1} "
                f"coefficients x 8 bytes), above max_posterior_bytes="
                f"{self.max_posterior_bytes}. Lower num_samples or num_chains, or "
                "raise max_posterior_bytes."
            )

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

    def _convergence(self, posterior: Posterior, groups_, names):
        diag = posterior.diagnostics
        label = self._diagnostic_labeler(groups_, names)
        r_hats = {k: v[0] for k, v in diag.items() if np.isfinite(v[0])}
        esses = {k: v[1] for k, v in diag.items() if np.isfinite(v[1])}
        worst = max(r_hats, key=r_hats.get) if r_hats else None
        return {
            "max_r_hat": float(max(r_hats.values())) if r_hats else float("nan"),
            "min_ess_bulk": float(min(esses.values())) if esses else float("nan"),
            "n_divergences": int(np.sum(posterior.diverging)),
            "worst_parameter": label(worst) if worst else None,
        }

    @staticmethod
    def _diagnostic_labeler(groups_, names):
        def label(key):
            if key is None:
                return None
            base, _, rest = key.partition("[")
            if not rest:
                return base
            idx = [int(i) for i in rest.rstrip("]").split(",")]
            if base in ("intercept",):
                return f"{base}[{groups_[idx[0]]}]"
            if base == "coef":
                return f"coef[{groups_[idx[0]]}, {names[idx[1]]}]"
            return f"{base}[{names[idx[0]]}]"

        return label

    def _gate(self, convergence):
        if self.on_bad_convergence == "ignore":
            return
        problems = []
        if convergence["max_r_hat"] > MAX_R_HAT:
            problems.append(
                f"max r_hat {convergence['max_r_hat']:.3f} > {MAX_R_HAT} "
                f"(worst: {convergence['worst_parameter']})"
            )
        if convergence["min_ess_bulk"] < MIN_ESS_PER_CHAIN * self.num_chains:
            problems.append(
                f"min bulk ESS {convergence['min_ess_bulk']:.0f} < "
                f"{MIN_ESS_PER_CHAIN * self.num_chains}"
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
    def mask_(self):
        """Group x feature mask as a labelled DataFrame (True: feature on)."""
        if not hasattr(self, "_mask"):
            raise AttributeError("mask_ is set by fit.")
        return pd.DataFrame(
            self._mask.copy(),
            index=pd.Index(self.groups_, name="group"),
            columns=pd.Index(self._feature_names, name="feature"),
        )

    def _prepare(self, X, groups, unseen_table=None):
        """Features, fitted group codes (-1: unseen) and unseen-group masks.

        ``unseen_table`` (dask partitions) gives the unseen groups' labels
        and masks read from every partition; without it they are read from
        ``X``'s own rows."""
        check_is_fitted(self)
        parsed = split_groups(X, self.group_col, groups, ensure_min_samples=0)
        validate_data(self, X, reset=False, skip_check_array=True)
        if parsed.features.shape[1] != self._mask.shape[1]:
            raise ValueError(
                f"X has {parsed.features.shape[1]} feature columns, but the model "
                f"was fitted with {self._mask.shape[1]}."
            )
        n = parsed.features.shape[0]
        group_idx = lookup_groups(self.groups_, parsed.labels, n)
        if (group_idx < 0).any() and self.unseen_groups == "error":
            unseen = pd.unique(parsed.labels[group_idx < 0])
            raise ValueError(
                f"{len(unseen)} group(s) were not seen in fit: "
                f"{', '.join(map(repr, unseen[:10]))}. Use "
                "unseen_groups='population' to predict them from the population."
            )
        if (group_idx < 0).any() and self.pooling == "none":
            warnings.warn(
                "Groups not seen in fit are predicted from the prior: under "
                "pooling='none' there is no population to draw them from.",
                UserWarning,
                stacklevel=4,
            )
        if unseen_table is not None:
            unseen = unseen_table.lookup(parsed.labels, group_idx)
        else:
            unseen = unseen_masks(
                parsed.features,
                group_idx,
                parsed.labels,
                self._mask.any(axis=0),
                self.mask_threshold,
            )
        return parsed.features, group_idx, unseen

    def _lazy(self, X, groups, what, extra=()):
        """Lazy dask DataFrame of per-row outputs (see _predict_partition)."""
        check_is_fitted(self)
        n_features = _dask.check_predict_inputs(X, groups, self.group_col)
        validate_data(self, X._meta, reset=False, skip_check_array=True)
        if n_features != self._mask.shape[1]:
            raise ValueError(
                f"X has {n_features} feature columns, but the model was fitted "
                f"with {self._mask.shape[1]}."
            )
        # A snapshot: a later refit of self does not change these results.
        return _dask.lazy_predictions(
            copy.copy(self),
            X,
            groups,
            what,
            extra,
            fitted=self.groups_,
            fitted_active=self._mask.any(axis=0),
        )

    def _predict_partition(self, X, groups, unseen_table, what, extra, number):
        """One pandas partition's outputs for :meth:`_lazy`, as an ndarray."""
        features, group_idx, unseen = self._prepare(X, groups, unseen_table)
        if what == "draws":
            n_samples, seed = extra
            return predictive_draws(
                features,
                group_idx,
                self._mask,
                self._posterior,
                unseen,
                n_samples,
                seed,
                number,
            )
        mean, sd = predictive_moments(
            features, group_idx, self._mask, self._posterior, unseen
        )
        if what == ("lower", "upper"):
            (z,) = extra
            return np.column_stack([mean - z * sd, mean + z * sd])
        return np.column_stack([mean, sd])[:, : len(what)]

    @staticmethod
    def _is_dask(X, groups):
        return _dask.is_dask_collection(X) or _dask.is_dask_collection(groups)

    def predict(self, X, groups=None, return_std=False):
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
        """
        if self._is_dask(X, groups):
            frame = self._lazy(X, groups, ("mean", "sd") if return_std else ("mean",))
            return (frame["mean"], frame["sd"]) if return_std else frame["mean"]
        features, group_idx, unseen = self._prepare(X, groups)
        mean, sd = predictive_moments(
            features, group_idx, self._mask, self._posterior, unseen
        )
        return (mean, sd) if return_std else mean

    def predict_interval(self, X, groups=None, coverage=0.9):
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
        """
        if not 0 < coverage < 1:
            raise ValueError(f"coverage must be in (0, 1), got {coverage!r}.")
        z = ndtri(0.5 + coverage / 2)
        if self._is_dask(X, groups):
            return self._lazy(X, groups, ("lower", "upper"), (float(z),))
        mean, sd = self.predict(X, groups=groups, return_std=True)
        return np.column_stack([mean - z * sd, mean + z * sd])

    def sample_y(self, X, groups=None, n_samples=1, random_state=None):
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
        """
        if not isinstance(n_samples, numbers.Integral) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive int, got {n_samples!r}.")
        dask_input = self._is_dask(X, groups)
        if dask_input:
            check_is_fitted(self)
        else:
            features, group_idx, unseen = self._prepare(X, groups)
        rs = self.random_state if random_state is None else random_state
        if rs is None:
            seed = self._seed
        else:
            seed = int(check_random_state(rs).randint(np.iinfo(np.int32).max))
        if dask_input:
            return self._lazy(X, groups, "draws", (int(n_samples), seed))
        return predictive_draws(
            features, group_idx, self._mask, self._posterior, unseen, n_samples, seed
        )

    def score(self, X, y, groups=None, sample_weight=None):
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
        """
        if any(_dask.is_dask_collection(v) for v in (X, y, groups, sample_weight)):
            raise TypeError(
                "score does not take dask input; compute R^2 from the lazy "
                "predict(X) with dask reductions, or score a computed sample."
            )
        return r2_score(y, self.predict(X, groups=groups), sample_weight=sample_weight)

    # ------------------------------------------------------------- results
    def summary(self, coverage=0.9):
        """Posterior summary of every parameter.

        Parameters
        ----------
        coverage : float in (0, 1), default=0.9
            Mass of the central interval reported.

        Returns
        -------
        pandas.DataFrame
            One row per parameter (``coef[group, feature]``, ...), with mean,
            sd, interval bounds, bulk and tail ESS and R-hat.
        """
        check_is_fitted(self)
        from ._summary import summary_frame

        return summary_frame(self, coverage=coverage)

    def to_arviz(self):
        """The posterior as an :class:`arviz.InferenceData`.

        Requires the optional extra ``hiermask[arviz]``.

        Returns
        -------
        arviz.InferenceData
            Posterior (coefficients labelled by group and feature; masked
            ones NaN), sample stats and the observed target.
        """
        check_is_fitted(self)
        if self._fit_target is None:
            raise ValueError(
                "to_arviz needs the target of the fit, which a fit on dask data "
                "does not collect; summary() and posterior_ hold the posterior."
            )
        from ._summary import to_inference_data

        return to_inference_data(self)

    # ------------------------------------------------------------ pickling
    def __getstate__(self):
        state = super().__getstate__()
        state["_hiermask_version"] = _version()
        return state

    def __setstate__(self, state):
        saved = state.pop("_hiermask_version", None)
        if saved is not None and saved.split(".")[:2] != _version().split(".")[:2]:
            raise ValueError(
                f"This model was saved with hiermask {saved}; the installed "
                f"version {_version()} cannot load it. Install hiermask=={saved}."
            )
        super().__setstate__(state)
