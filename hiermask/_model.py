"""The reference NumPyro model (direct engine): one likelihood term per row.

The model is the one of the design document, written on the internal centred
and scaled design of :mod:`hiermask._stats` (an exact reparametrization):

* ``u_i = (y_i - m_y) / s_y`` and ``c_ij = (x_ij - m_j) / s_j``;
* slopes ``b_gj = beta_gj * s_j / s_y`` and the intercept at the centring
  point ``a_g = (alpha_g + sum_j beta_gj m_j - m_y) / s_y`` (sums over the
  features that are on for ``g``);
* the intercept prior sits on ``ell = (alpha + sum_j beta_j M_j - M_y) / s_y``
  where ``M`` are the prior reference points (the data means when
  ``standardize=True``, zero otherwise), so that
  ``a_g = ell - e_y - sum_j mu_j K_j + tau_a z_ag + sum_{j on} b_gj k_j`` with
  ``k = m / s``, ``K = M / s`` and ``e_y = (m_y - M_y) / s_y``.

Every prior scale arrives already converted to these internal units
(:class:`Hyper`), so the same compiled program serves any prior scale.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from ._density import numpyro_density
from ._stats import centred_design, latent_layout, reference_units

__all__ = [
    "IMPUTE_LOC_SCALE",
    "IMPUTE_SCALE_SCALE",
    "DirectData",
    "DirectEngine",
    "Hyper",
    "direct_model",
    "sample_group_deviations",
    "sample_imputation",
    "sample_population",
    "sample_unpooled_slopes",
    "varying_index",
]

#: Prior sd of a group's mean of a feature in internal (standardized) units.
IMPUTE_LOC_SCALE = 2.0
#: HalfNormal scale of the within-group sd of a feature, internal units.
IMPUTE_SCALE_SCALE = 2.0


class Hyper(NamedTuple):
    """Prior scales in internal units (traced, never static)."""

    coef: jnp.ndarray  # (p,) sd of population slopes (slopes under "none")
    intercept: jnp.ndarray  # () sd of the intercept at the reference point
    group_coef: jnp.ndarray  # (p,) HalfNormal scale of between-group slope sd
    group_intercept: jnp.ndarray  # () HalfNormal scale of between-group intercept sd
    noise: jnp.ndarray  # () HalfNormal scale of the residual sd
    # () LKJ concentration of the group correlation (covariance "full");
    # the default serves callers that build a Hyper without it
    lkj: jnp.ndarray = 2.0


class DirectData(NamedTuple):
    """Row-level data of the direct engine (internal units)."""

    on: jnp.ndarray  # (G, p) 1.0 where the feature applies to the group
    k: jnp.ndarray  # (p,) centring points m / s
    K: jnp.ndarray  # (p,) prior reference points M / s
    e_y: jnp.ndarray  # () (m_y - M_y) / s_y
    group_idx: jnp.ndarray  # (n,)
    design: jnp.ndarray  # (n, p) centred design, 0 at off and latent cells
    y: jnp.ndarray  # (n,)
    w: jnp.ndarray  # (n,)
    miss_row: jnp.ndarray  # (M,) row of each latent cell
    miss_col: jnp.ndarray  # (M,) feature of each latent cell
    miss_slot: jnp.ndarray  # (M,) position of that feature in impute_cols
    impute_cols: jnp.ndarray  # (P,) features that hold latent cells
    impute_observed: jnp.ndarray  # (n, P) weight of observed applicable cells


def varying_index(varying, n_features):
    """Positions of the features with a group-specific slope.

    Parameters
    ----------
    varying : tuple of bool or None
        One flag per active feature; None: every feature varies.
    n_features : int
        Number of active features.

    Returns
    -------
    tuple of int
    """
    if varying is None:
        return tuple(range(n_features))
    return tuple(j for j, v in enumerate(varying) if v)


def sample_population(pooling, n_features, hyper, varying=None):
    """Sample the population-level sites shared by both engines.

    Parameters
    ----------
    pooling : {"partial", "complete"}
        Pooling mode.
    n_features : int
        Number of active features.
    hyper : Hyper
        Prior scales in internal units.
    varying : tuple of bool or None, default=None
        Which active features have a group-specific slope (None: all). Only
        their between-group sds are sampled; ``coef_scale`` is exactly 0.0
        for the others.

    Returns
    -------
    dict
        ``ell``, ``mu`` and, under partial pooling, ``tau_a`` and ``tau``.
    """
    out = {
        "ell": numpyro.sample("intercept_at_means", dist.Normal(0.0, hyper.intercept)),
        "mu": numpyro.sample(
            "coef_mean", dist.Normal(jnp.zeros(n_features), hyper.coef).to_event(1)
        ),
    }
    if pooling == "partial":
        out["tau_a"] = numpyro.sample(
            "intercept_scale", dist.HalfNormal(hyper.group_intercept)
        )
        idx = varying_index(varying, n_features)
        if len(idx) == n_features:
            out["tau"] = numpyro.sample(
                "coef_scale",
                dist.HalfNormal(hyper.group_coef * jnp.ones(n_features)).to_event(1),
            )
            return out
        tau = jnp.zeros(n_features)
        if idx:
            scales = (hyper.group_coef * jnp.ones(n_features))[jnp.asarray(idx)]
            tau_v = numpyro.sample(
                "coef_scale_varying", dist.HalfNormal(scales).to_event(1)
            )
            tau = tau.at[jnp.asarray(idx)].set(tau_v)
        out["tau"] = numpyro.deterministic("coef_scale", tau)
    return out


def sample_group_deviations(
    n_groups, n_features, pop, hyper, varying, covariance, reference
):
    """Each group's deviations from the population (partial pooling).

    Non-centred: under ``"diagonal"`` a deviation is ``tau * z``; under
    ``"full"`` the deviations of the intercept and the varying slopes are
    ``diag(tau) L z`` with ``L`` the Cholesky factor of the correlation
    matrix ``Omega ~ LKJ(hyper.lkj)``, so they are jointly normal with
    covariance ``diag(tau) Omega diag(tau)``. Every group gets the whole
    vector; the caller uses only the features that apply to it, which is
    exactly the marginal on them. Under ``"full"`` the correlated effects
    sit at ``reference`` (the internal reference point ``K``: the feature
    means when ``standardize``), so that where a feature's zero lies does
    not change the model; the intercept's deviation returned is the one at
    ``x = 0``, ``d_0 - sum_j d_j K_j`` (over all features: one that is off
    in a group enters as ``x = 0`` there).

    Parameters
    ----------
    n_groups, n_features : int
    pop : dict
        What :func:`sample_population` returned.
    hyper : Hyper
    varying : tuple of bool or None
    covariance : {"diagonal", "full"}
    reference : array of shape (n_features,)
        ``K`` of :class:`DirectData` (0 when ``standardize=False``: the
        effects at ``x = 0``).

    Returns
    -------
    dev_a : array of shape (n_groups,)
        Deviations of the intercept (at x = 0).
    dev_b : array of shape (n_groups, n_features)
        Deviations of the slopes (0 for the features that do not vary).
    """
    idx = varying_index(varying, n_features)
    if len(idx) == n_features and covariance == "diagonal":
        # today's model, with today's sites
        z_a = numpyro.sample(
            "intercept_offset", dist.Normal(jnp.zeros(n_groups), 1.0).to_event(1)
        )
        z = numpyro.sample(
            "coef_offset",
            dist.Normal(jnp.zeros((n_groups, n_features)), 1.0).to_event(2),
        )
        return pop["tau_a"] * z_a, pop["tau"] * z
    q = 1 + len(idx)
    cols = jnp.asarray(idx, dtype=jnp.int32)
    scales = jnp.concatenate([pop["tau_a"][None], pop["tau"][cols]])
    z = numpyro.sample(
        "group_offset", dist.Normal(jnp.zeros((n_groups, q)), 1.0).to_event(2)
    )
    if covariance == "full":
        if q > 1:
            chol = numpyro.sample(
                "group_correlation_cholesky", dist.LKJCholesky(q, hyper.lkj)
            )
            z = z @ chol.T
            numpyro.deterministic("group_correlation", chol @ chol.T)
        else:
            numpyro.deterministic("group_correlation", jnp.ones((1, 1)))
    dev = z * scales
    dev_b = jnp.zeros((n_groups, n_features)).at[:, cols].set(dev[:, 1:])
    if covariance == "full":
        return dev[:, 0] - dev_b @ reference, dev_b
    return dev[:, 0], dev_b


def sample_unpooled_slopes(n_groups, n_features, hyper, varying):
    """Slopes under no pooling: per group for varying features, one shared
    value for the others (prior sd ``hyper.coef`` for both).

    Returns
    -------
    array of shape (n_groups, n_features)
    """
    idx = varying_index(varying, n_features)
    if len(idx) == n_features:
        return numpyro.sample(
            "coef",
            dist.Normal(jnp.zeros((n_groups, n_features)), hyper.coef).to_event(2),
        )
    sd = hyper.coef * jnp.ones(n_features)
    shared = tuple(j for j in range(n_features) if j not in idx)
    out = jnp.zeros((n_groups, n_features))
    if idx:
        cols = jnp.asarray(idx)
        own = numpyro.sample(
            "coef", dist.Normal(jnp.zeros((n_groups, len(idx))), sd[cols]).to_event(2)
        )
        out = out.at[:, cols].set(own)
    cols = jnp.asarray(shared)
    one = numpyro.sample(
        "coef_shared", dist.Normal(sd[cols] * 0.0, sd[cols]).to_event(1)
    )
    return out.at[:, cols].set(jnp.broadcast_to(one, (n_groups, len(shared))))


def sample_imputation(n_groups, impute_cols, miss_group, miss_slot):
    """Sample the imputation model and the latent cells.

    A latent cell of feature ``j`` in group ``g`` is ``Normal(loc_gj,
    scale_j)`` in internal units; ``loc`` and ``scale`` are learned from the
    observed cells (the caller adds their likelihood).

    Parameters
    ----------
    n_groups : int
        Number of groups.
    impute_cols : array of shape (P,)
        Features that hold latent cells.
    miss_group, miss_slot : array of shape (M,)
        Group and position in ``impute_cols`` of each latent cell.

    Returns
    -------
    loc : array of shape (n_groups, P)
    scale : array of shape (P,)
    cells : array of shape (M,)
    """
    n_cols = impute_cols.shape[0]
    loc = numpyro.sample(
        "x_loc",
        dist.Normal(jnp.zeros((n_groups, n_cols)), IMPUTE_LOC_SCALE).to_event(2),
    )
    scale = numpyro.sample(
        "x_scale", dist.HalfNormal(IMPUTE_SCALE_SCALE * jnp.ones(n_cols)).to_event(1)
    )
    cells = numpyro.sample(
        "x_missing",
        dist.Normal(loc[miss_group, miss_slot], scale[miss_slot]).to_event(1),
    )
    return loc, scale, cells


def direct_model(
    data: DirectData,
    hyper: Hyper,
    pooling: str = "partial",
    varying=None,
    covariance: str = "diagonal",
):
    """Reference model: non-centred hierarchy, one likelihood term per row.

    Parameters
    ----------
    data : DirectData
        Row-level data in internal units.
    hyper : Hyper
        Prior scales in internal units.
    pooling : {"partial", "none", "complete"}
        Pooling mode.
    varying : tuple of bool or None, default=None
        Which active features have a group-specific slope (None: all).
    covariance : {"diagonal", "full"}, default="diagonal"
        Independent group deviations, or jointly normal ones with an LKJ
        prior on their correlation (partial pooling).
    """
    n_groups, n_features = data.on.shape
    design = data.design
    if data.miss_row.shape[0]:
        miss_group = data.group_idx[data.miss_row]
        loc, scale, cells = sample_imputation(
            n_groups, data.impute_cols, miss_group, data.miss_slot
        )
        design = design.at[data.miss_row, data.miss_col].set(cells)
        observed = design[:, data.impute_cols]
        logp = dist.Normal(loc[data.group_idx], scale).log_prob(observed)
        numpyro.factor("x_observed", jnp.sum(data.impute_observed * logp))

    sigma = numpyro.sample("noise", dist.HalfNormal(hyper.noise))
    on = data.on
    if pooling == "none":
        ell = numpyro.sample(
            "intercept_at_means",
            dist.Normal(jnp.zeros(n_groups), hyper.intercept).to_event(1),
        )
        slopes = sample_unpooled_slopes(n_groups, n_features, hyper, varying) * on
        intercept = ell - data.e_y + jnp.sum(slopes * (data.k - data.K), axis=-1)
    else:
        pop = sample_population(pooling, n_features, hyper, varying)
        intercept = pop["ell"] - data.e_y - jnp.sum(pop["mu"] * data.K)
        if pooling == "partial":
            dev_a, dev_b = sample_group_deviations(
                n_groups, n_features, pop, hyper, varying, covariance, data.K
            )
            slopes = (pop["mu"] + dev_b) * on
            intercept = intercept + dev_a
        else:
            slopes = pop["mu"] * on
        intercept = intercept + jnp.sum(slopes * data.k, axis=-1)
    coef = jnp.concatenate([intercept[:, None], slopes], axis=1)
    numpyro.deterministic("group_coef_internal", coef)

    mean = coef[data.group_idx, 0] + jnp.sum(coef[data.group_idx, 1:] * design, axis=-1)
    with (
        numpyro.plate("rows", data.y.shape[0]),
        numpyro.handlers.scale(scale=data.w),
    ):
        numpyro.sample("y", dist.Normal(mean, sigma), obs=data.y)


@dataclass(frozen=True)
class DirectEngine:
    """The direct engine: :func:`direct_model`, one likelihood term per row.

    The same contract as :class:`hiermask._collapsed.CollapsedEngine`: it
    prepares its data (:meth:`prepare`) and gives the sampler NumPyro's
    density of the model over a flat vector (:meth:`density`); nothing is
    integrated out, so :meth:`conditional` returns no draws.

    Parameters
    ----------
    pooling : {"partial", "none", "complete"}
    varying : tuple of bool or None, default=None
        One flag per active feature: True for a group-specific slope. None:
        every feature varies (the model of version 0.1).
    covariance : {"diagonal", "full"}, default="diagonal"
        Independent group deviations, or jointly normal with an LKJ prior on
        their correlation (partial pooling only).
    """

    pooling: str = "partial"
    varying: tuple | None = None
    covariance: str = "diagonal"

    #: Sampled sites that :meth:`conditional` takes: none.
    conditional_sites: ClassVar[tuple] = ()

    def prepare(self, statistics, ref):
        """The engine's data from the rows.

        Parameters
        ----------
        statistics : FitRows
            ``mask`` (all features), ``scaling`` and ``rows`` (every row,
            over the active features), as :mod:`hiermask._fit` gathers them.
        ref : tuple
            Prior reference points ``(M_y, s_y, M, s)`` in data units.

        Returns
        -------
        DirectData
        """
        mask, scaling, rows = statistics.mask, statistics.scaling, statistics.rows
        on = mask[:, mask.any(axis=0)]
        on_rows = on[rows.group_idx]
        design, latent = centred_design(rows.X, on_rows, scaling)
        cols, miss_row, miss_col, miss_slot = latent_layout(latent)
        k, K, e_y = reference_units(scaling, ref)
        return DirectData(
            on=on.astype(np.float64),
            k=k,
            K=K,
            e_y=e_y,
            group_idx=rows.group_idx,
            design=design,
            y=(rows.y - scaling.y_mean) / scaling.y_scale,
            w=rows.w,
            miss_row=miss_row,
            miss_col=miss_col,
            miss_slot=miss_slot,
            impute_cols=cols,
            impute_observed=(on_rows & ~latent)[:, cols] * rows.w[:, None],
        )

    def density(self, data, hyper):
        """NumPyro's density of :func:`direct_model` over a flat vector.

        Returns
        -------
        FlatDensity
        """
        model = functools.partial(
            direct_model,
            pooling=self.pooling,
            varying=self.varying,
            covariance=self.covariance,
        )
        return numpyro_density(model, (data, hyper))

    def conditional(self, rng_key, draws, data, hyper, **chunking):
        """Nothing is integrated out: no draws, and no moments."""
        del rng_key, draws, data, hyper, chunking
        return {}, None, None
