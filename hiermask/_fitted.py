"""What fit learned, as one frozen object.

``fit`` builds a :class:`FittedModel` and installs it, with the public fitted
attributes derived from it, at its very end. ``summary()``, ``to_arviz()``,
the plots and model files read this object (through :func:`fitted_model`),
never the estimator's other private attributes, and a later ``set_params``
does not change what it describes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtri
from sklearn.utils.validation import check_is_fitted

from ._fit import GroupDraws, Posterior
from ._parameters import parameter_blocks, row_name

__all__ = ["FILE_FIELDS", "FittedModel", "file_fields", "fitted_model", "from_fields"]

#: The attributes under which model files (and pickles of hiermask 0.1)
#: hold a fitted model's fields; :func:`file_fields` and :func:`from_fields`
#: convert.
FILE_FIELDS = ("_posterior", "_mask", "_feature_names", "_seed", "_fit_target")


@dataclass(frozen=True, eq=False)
class FittedModel:
    """The fitted state of a :class:`~hiermask.MaskedHierarchicalRegressor`.

    Parameters
    ----------
    posterior : Posterior
        Draws, closed-form moments and sampler statistics.
    mask : ndarray of shape (n_groups, n_features)
        True where a feature applies to a group.
    groups : ndarray of shape (n_groups,)
        The group labels, in the order of every group axis.
    feature_names : tuple of str
        The feature columns, in the order of every feature axis.
    seed : int
        The seed that fit drew from ``random_state``.
    target : ndarray of shape (n_samples,) or None
        The fit's target (None for a dask fit).
    pooling : str
        The pooling fitted.
    varying_setting : str or tuple
        The ``varying`` parameter at fit.
    group_covariance : str
        The ``group_covariance`` parameter at fit.
    """

    posterior: Posterior
    mask: np.ndarray
    groups: np.ndarray
    feature_names: tuple
    seed: int
    target: np.ndarray | None
    pooling: str
    varying_setting: object
    group_covariance: str

    @property
    def draws(self):
        """``posterior_``: the draws, chains concatenated."""
        return self.posterior.draws

    @property
    def kept_group_draws(self):
        """Whether fit kept the group draws (else ``draws`` makes them when
        asked for: ``keep_group_draws``)."""
        return not isinstance(self.posterior.draws, GroupDraws)

    def moment_intervals(self, groups, cols, tail):
        """Group coefficients' exact posterior mean and sd, and the central
        normal interval with that mean and sd (no draw is made).

        Parameters
        ----------
        groups, cols : int or array of int
            Group positions, and coefficient positions (0: the intercept,
            ``1 + j``: feature ``j``), broadcast against each other.
        tail : float
            Mass left out on each side of the interval.

        Returns
        -------
        mean, sd, lo, hi : ndarray
        """
        post = self.posterior
        mean = post.coef_mean[groups, cols]
        sd = np.sqrt(post.coef_cov[groups, cols, cols])
        half = ndtri(1.0 - tail) * sd
        return mean, sd, mean - half, mean + half

    @property
    def n_chains(self):
        """The number of chains."""
        return int(self.posterior.n_chains)

    @property
    def varying(self):
        """(n_features,) bool: True for a feature with a group-specific slope."""
        if self.pooling == "complete":
            return np.zeros(len(self.feature_names), dtype=bool)
        flags = self.posterior.varying
        if flags is None:  # a model file of version 1 without it: "all"
            flags = self.mask.any(axis=0)
        return np.asarray(flags, dtype=bool)

    @property
    def effects(self):
        """Labels of the correlated group effects: intercept, varying features."""
        return ["intercept"] + [
            str(n) for n, v in zip(self.feature_names, self.varying, strict=True) if v
        ]

    def blocks(self, group_level=True, group_draws=True):
        """The reported parameters (:func:`hiermask._parameters.parameter_blocks`).

        Parameters
        ----------
        group_level : bool, default=True
            Whether to include the group intercepts and coefficients.
        group_draws : bool, default=True
            Whether their blocks hold their draws (made if not kept).

        Returns
        -------
        iterator of Block
        """
        return parameter_blocks(
            self.draws, self.mask, self.varying, group_level, group_draws
        )

    def labels(self, block):
        """``(parameter, group, feature)`` of each row of ``block``; a
        correlation's two effects share the feature column: ``"a, b"``.

        Parameters
        ----------
        block : Block

        Returns
        -------
        list of tuple
        """
        names = {
            "group": self.groups,
            "feature": self.feature_names,
            "effect": self.effects,
        }
        n_rows = block.draws.shape[1]
        columns = {"group": [None] * n_rows, "feature": [None] * n_rows}
        first_effect = None
        for axis, positions in zip(block.axes, block.index, strict=True):
            values = [names[axis][i] for i in positions]
            if axis == "effect" and first_effect is not None:
                pairs = zip(first_effect, values, strict=True)
                values = [f"{a}, {b}" for a, b in pairs]
            elif axis == "effect":
                first_effect = values
            columns["group" if axis == "group" else "feature"] = values
        group, feature = columns["group"], columns["feature"]
        return [(block.parameter, g, f) for g, f in zip(group, feature, strict=True)]

    def name_of(self, key):
        """The readable name of a diagnostics key (``"coef[3, 2]"``).

        Parameters
        ----------
        key : str

        Returns
        -------
        str

        Raises
        ------
        KeyError
            If no reported parameter has this key.
        """
        group_level = key.startswith(("intercept[", "coef["))
        for block in self.blocks(group_level):
            keys = block.keys if block.parameter == key.partition("[")[0] else []
            if key in keys:
                return row_name(*self.labels(block)[keys.index(key)])
        raise KeyError(key)

    def convergence(self):
        """``convergence_``: max R-hat, min bulk ESS, divergences, and the
        readable name of the parameter with the largest R-hat.

        Returns
        -------
        dict
        """
        diag = self.posterior.diagnostics
        r_hats = {k: v[0] for k, v in diag.items() if np.isfinite(v[0])}
        esses = {k: v[1] for k, v in diag.items() if np.isfinite(v[1])}
        worst = max(r_hats, key=r_hats.get) if r_hats else None
        return {
            "max_r_hat": float(max(r_hats.values())) if r_hats else float("nan"),
            "min_ess_bulk": float(min(esses.values())) if esses else float("nan"),
            "n_divergences": int(np.sum(self.posterior.diverging)),
            "worst_parameter": self.name_of(worst) if worst else None,
        }


def fitted_model(est):
    """The :class:`FittedModel` of a fitted estimator.

    Parameters
    ----------
    est : MaskedHierarchicalRegressor

    Returns
    -------
    FittedModel

    Raises
    ------
    sklearn.exceptions.NotFittedError
        If ``est`` is not fitted.
    TypeError
        If ``est`` is not a hiermask estimator.
    """
    check_is_fitted(est)
    model = vars(est).get("_fitted")
    if not isinstance(model, FittedModel):
        raise TypeError(
            f"Expected a fitted MaskedHierarchicalRegressor, got {type(est).__name__}."
        )
    return model


def _setting(value):
    # a parameter as the model keeps it: str, or a tuple of the list's items
    if isinstance(value, str):
        return value
    return tuple(np.asarray(value, dtype=object).ravel().tolist())


def file_fields(model):
    """The model's fields under the names of :data:`FILE_FIELDS`.

    Parameters
    ----------
    model : FittedModel

    Returns
    -------
    dict
    """
    values = (
        model.posterior,
        model.mask,
        list(model.feature_names),
        model.seed,
        model.target,
    )
    return dict(zip(FILE_FIELDS, values, strict=True))


def from_fields(attributes, params):
    """A :class:`FittedModel` from attributes stored under
    :data:`FILE_FIELDS` (a model file, an old pickle) and the estimator's
    parameters; those entries are removed from ``attributes``.

    Parameters
    ----------
    attributes : dict
        Fitted attributes, with ``groups_`` and the :data:`FILE_FIELDS`.
    params : dict
        The estimator's parameters (``pooling``, ``varying``,
        ``group_covariance``).

    Returns
    -------
    FittedModel
    """
    posterior, mask, names, seed, target = (attributes.pop(k) for k in FILE_FIELDS)
    return FittedModel(
        posterior=posterior,
        mask=np.asarray(mask, dtype=bool),
        groups=attributes["groups_"],
        feature_names=tuple(names),
        seed=int(seed),
        target=target,
        pooling=params["pooling"],
        varying_setting=_setting(params.get("varying", "all")),
        group_covariance=params.get("group_covariance", "diagonal"),
    )
