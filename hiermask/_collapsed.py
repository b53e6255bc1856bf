"""Collapsed engine: coefficients integrated out of the density (JAX).

Each group's coefficient vector in the internal basis (intercept at the
centring point, then the slopes; see :mod:`hiermask._model`) is
``theta_g = F_g phi + f_g + C_g v_g`` with ``v_g ~ Normal(0, I)``: ``phi =
(ell, mu)`` are the population means (Gaussian prior), ``C_g`` depends on the
between-group sds. The likelihood of a group's rows is Gaussian in
``theta_g`` with sufficient statistics ``S = Xt'WXt``, ``r = Xt'Wu``,
``u'Wu`` and ``n = sum w``, so ``v_g`` integrates out exactly, per group:

    log p(u_g | b0) = const_g - b0'H_g b0 / 2 + b0'eta_g,   b0 = F_g phi + f_g

with ``M = I + C'SC / sigma^2`` (always >= I, so well conditioned even as the
between-group sds go to zero), ``H = S/sigma^2 - S C M^-1 C' S / sigma^4``,
``eta = r/sigma^2 - S C M^-1 C' r / sigma^4`` and ``const = -n/2 log(2 pi
sigma^2) - log|M|/2 - (u'Wu/sigma^2 - r'C M^-1 C' r/sigma^4)/2``. The sum over
groups is then Gaussian in ``phi``, which integrates out too. NUTS samples
only the residual sd, the between-group sds and the imputation model: no
funnel is left (neither between group effects and their sds, nor between
the population means and the sds). Afterwards ``phi`` and every ``theta_g``
are drawn exactly from their Gaussian conditionals, one draw per posterior
draw. Cost per gradient: O(n_groups q^3), independent of the number of rows.
Everything here runs in float64 (the caller scopes ``jax.enable_x64``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpyro
import numpyro.distributions as dist

from ._model import Hyper, sample_imputation

__all__ = [
    "CollapsedData",
    "GroupTerms",
    "collapsed_model",
    "conditional_draws",
    "group_terms",
    "marginal_loglik",
    "none_factor",
]


class CollapsedData(NamedTuple):
    """Sufficient statistics and latent-cell rows of the collapsed engine."""

    on: jnp.ndarray  # (G, p)
    k: jnp.ndarray  # (p,)
    K: jnp.ndarray  # (p,)
    e_y: jnp.ndarray  # ()
    n: jnp.ndarray  # (G,)
    gram: jnp.ndarray  # (G, q, q)
    xty: jnp.ndarray  # (G, q)
    yty: jnp.ndarray  # (G,)
    inc_group: jnp.ndarray  # (R,) group of each row holding latent cells
    inc_design: jnp.ndarray  # (R, p) its centred design, 0 at latent cells
    inc_y: jnp.ndarray  # (R,)
    inc_w: jnp.ndarray  # (R,)
    miss_row: jnp.ndarray  # (M,) position of each latent cell's row in inc_*
    miss_col: jnp.ndarray  # (M,)
    miss_slot: jnp.ndarray  # (M,)
    impute_cols: jnp.ndarray  # (P,)
    x_count: jnp.ndarray  # (G, P) observed-cell statistics of impute_cols
    x_sum: jnp.ndarray  # (G, P)
    x_sumsq: jnp.ndarray  # (G, P)


def group_prior(pooling, values, data):
    """How each group's prior mean and spread depend on the population.

    The prior mean of group ``g``'s coefficients is ``F_g phi + f_g``, linear
    in the population vector ``phi = (ell, mu)``, and the group deviation is
    ``C_g v_g``.

    Parameters
    ----------
    pooling : {"partial", "none", "complete"}
        Pooling mode.
    values : dict
        Sampled between-group sds ``tau_a`` and ``tau`` (partial pooling).
    data : CollapsedData
        Data; only ``on``, ``k``, ``K`` and ``e_y`` are used.

    Returns
    -------
    F : array of shape (G, q, q) or None (no population under "none")
    f : array of shape (G, q)
    C : array of shape (G, q, q) or None (no group deviation under "complete")
    """
    on = data.on
    n_groups, n_features = on.shape
    q = n_features + 1
    f = jnp.zeros((n_groups, q)).at[:, 0].set(-data.e_y)
    if pooling == "none":
        return None, f, None
    F = jnp.zeros((n_groups, q, q))
    F = F.at[:, 0, 0].set(1.0)
    F = F.at[:, 0, 1:].set(on * data.k - data.K)
    F = F.at[:, jnp.arange(1, q), jnp.arange(1, q)].set(on)
    if pooling == "complete":
        return F, f, None
    intercept_sd = jnp.broadcast_to(values["tau_a"], (n_groups,))
    slope_sd = values["tau"] * on + (1.0 - on)
    return F, f, _deviation_factor(intercept_sd, slope_sd, on * data.k)


def _deviation_factor(intercept_sd, slope_sd, row):
    # C = A diag(d) where A is the identity with first row [1, row]
    d = jnp.concatenate([intercept_sd[:, None], slope_sd], axis=1)
    C = jnp.eye(d.shape[1]) * d[:, None, :]
    return C.at[:, 0, 1:].set(row * slope_sd)


def none_factor(data, hyper):
    """Group deviation factor ``C`` under no pooling (fixed by the prior).

    Parameters
    ----------
    data : CollapsedData
    hyper : Hyper

    Returns
    -------
    array of shape (G, q, q)
    """
    on = data.on
    intercept_sd = jnp.broadcast_to(hyper.intercept, (on.shape[0],))
    slope_sd = hyper.coef * on + (1.0 - on)
    return _deviation_factor(intercept_sd, slope_sd, on * (data.k - data.K))


def add_incomplete_rows(data, cells):
    """Statistics of every group with the rows holding latent cells added.

    Parameters
    ----------
    data : CollapsedData
        Data.
    cells : array of shape (M,)
        Values of the latent cells (internal units).

    Returns
    -------
    n, gram, xty, yty : arrays
        As in :class:`CollapsedData`, now over all rows.
    """
    if data.inc_group.shape[0] == 0:
        return data.n, data.gram, data.xty, data.yty
    n_groups = data.on.shape[0]
    design = data.inc_design.at[data.miss_row, data.miss_col].set(cells)
    xt = jnp.concatenate([jnp.ones((design.shape[0], 1)), design], axis=1)
    wxt = xt * data.inc_w[:, None]

    def seg(v):
        return jax.ops.segment_sum(v, data.inc_group, num_segments=n_groups)

    return (
        data.n + seg(data.inc_w),
        data.gram + seg(wxt[:, :, None] * xt[:, None, :]),
        data.xty + seg(wxt * data.inc_y[:, None]),
        data.yty + seg(data.inc_w * data.inc_y**2),
    )


class GroupTerms(NamedTuple):
    """Each group's log marginal likelihood as a quadratic in its prior mean.

    ``log p(u_g | b0) = const - b0'H b0 / 2 + b0'eta``.
    """

    const: jnp.ndarray  # (G,)
    H: jnp.ndarray  # (G, q, q)
    eta: jnp.ndarray  # (G, q)
    chol: jnp.ndarray | None  # (G, q, q) Cholesky factor of M
    proj: jnp.ndarray | None  # (G, q, q) L^-1 C'


def group_terms(C, sigma, stats):
    """Integrate every group's deviation out: quadratic form in its prior mean.

    Parameters
    ----------
    C : array of shape (G, q, q) or None
        Group deviation factor (None: no deviation).
    sigma : scalar
        Residual sd, internal units.
    stats : tuple
        ``(n, gram, xty, yty)``.

    Returns
    -------
    GroupTerms
    """
    n, gram, xty, yty = stats
    s2 = sigma**2
    const = -0.5 * n * jnp.log(2.0 * jnp.pi * s2) - 0.5 * yty / s2
    if C is None:
        return GroupTerms(const, gram / s2, xty / s2, None, None)
    q = gram.shape[-1]
    m = jnp.eye(q) + jnp.einsum("gki,gkl,glj->gij", C, gram, C) / s2
    chol = jnp.linalg.cholesky(m)
    proj = jsl.solve_triangular(chol, jnp.swapaxes(C, -1, -2), lower=True)
    ps = jnp.einsum("gij,gjk->gik", proj, gram) / s2  # L^-1 C'S / s2
    pr = jnp.einsum("gij,gj->gi", proj, xty) / s2  # L^-1 C'r / s2
    logdet = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    const = const - logdet + 0.5 * jnp.sum(pr**2, axis=-1)
    H = gram / s2 - jnp.einsum("gki,gkj->gij", ps, ps)
    eta = xty / s2 - jnp.einsum("gki,gk->gi", ps, pr)
    return GroupTerms(const, H, eta, chol, proj)


def _population_posterior(F, f, terms, hyper):
    # Gaussian in phi: precision lam, linear term h, and the constant.
    hf = jnp.einsum("gij,gj->gi", terms.H, f)
    const = jnp.sum(
        terms.const - 0.5 * jnp.sum(f * hf, -1) + jnp.sum(f * terms.eta, -1)
    )
    prior_var = jnp.concatenate([hyper.intercept[None] ** 2, hyper.coef**2])
    lam = jnp.einsum("gki,gkl,glj->ij", F, terms.H, F) + jnp.diag(1.0 / prior_var)
    h = jnp.einsum("gki,gk->i", F, terms.eta - hf)
    chol = jnp.linalg.cholesky(lam)
    v = jsl.solve_triangular(chol, h, lower=True)
    logp = (
        const
        - 0.5 * jnp.sum(jnp.log(prior_var))
        - jnp.sum(jnp.log(jnp.diagonal(chol)))
        + 0.5 * jnp.sum(v**2)
    )
    return logp, chol, v


def marginal_loglik(pooling, values, data, hyper, cells):
    """Log marginal likelihood with group coefficients and population out.

    Parameters
    ----------
    pooling : {"partial", "none", "complete"}
    values : dict
        ``sigma`` and, under partial pooling, ``tau_a`` and ``tau``.
    data : CollapsedData
    hyper : Hyper
    cells : array of shape (M,)
        Latent cells.

    Returns
    -------
    scalar
    """
    stats = add_incomplete_rows(data, cells)
    F, f, C = group_prior(pooling, values, data)
    if pooling == "none":
        C = none_factor(data, hyper)
    terms = group_terms(C, values["sigma"], stats)
    if F is None:
        hf = jnp.einsum("gij,gj->gi", terms.H, f)
        return jnp.sum(
            terms.const - 0.5 * jnp.sum(f * hf, -1) + jnp.sum(f * terms.eta, -1)
        )
    return _population_posterior(F, f, terms, hyper)[0]


def collapsed_model(data: CollapsedData, hyper: Hyper, pooling: str = "partial"):
    """NumPyro model of the collapsed engine.

    NUTS samples only the residual sd, the between-group sds (partial
    pooling) and the imputation model with its latent cells; the population
    means and every group's coefficients are integrated out exactly and drawn
    afterwards by :func:`conditional_draws`. Sites, priors and names match
    :func:`hiermask._model.direct_model`.

    Parameters
    ----------
    data : CollapsedData
        Statistics in internal units.
    hyper : Hyper
        Prior scales in internal units.
    pooling : {"partial", "none", "complete"}
        Pooling mode.
    """
    n_groups, n_features = data.on.shape
    cells = jnp.zeros(0)
    if data.miss_row.shape[0]:
        miss_group = data.inc_group[data.miss_row]
        loc, scale, cells = sample_imputation(
            n_groups, data.impute_cols, miss_group, data.miss_slot
        )
        quad = data.x_sumsq - 2.0 * loc * data.x_sum + data.x_count * loc**2
        numpyro.factor(
            "x_observed",
            jnp.sum(
                -0.5 * data.x_count * jnp.log(2.0 * jnp.pi * scale**2)
                - 0.5 * quad / scale**2
            ),
        )
    values = {"sigma": numpyro.sample("noise", dist.HalfNormal(hyper.noise))}
    if pooling == "partial":
        values["tau_a"] = numpyro.sample(
            "intercept_scale", dist.HalfNormal(hyper.group_intercept)
        )
        values["tau"] = numpyro.sample(
            "coef_scale",
            dist.HalfNormal(hyper.group_coef * jnp.ones(n_features)).to_event(1),
        )
    numpyro.factor(
        "marginal_likelihood", marginal_loglik(pooling, values, data, hyper, cells)
    )


def conditional_draws(rng_key, draws, data, hyper, pooling):
    """Exact draws of the population and group coefficients, one per draw.

    For each posterior draw of the sampled sites, the population vector
    ``phi = (ell, mu)`` is drawn from its Gaussian conditional, then every
    group's coefficients given ``phi``. Also returns the Rao-Blackwellized
    posterior mean and covariance of each group's coefficients (averages of
    the conditional moments given the drawn ``phi``).

    Parameters
    ----------
    rng_key : jax.random.PRNGKey
    draws : dict of arrays with leading dimension D
        Posterior draws of the sampled sites.
    data : CollapsedData
    hyper : Hyper
    pooling : {"partial", "none", "complete"}

    Returns
    -------
    out : dict
        ``group_coef_internal`` (D, G, q) and, unless ``pooling="none"``,
        ``intercept_at_means`` (D,) and ``coef_mean`` (D, p).
    mean : array of shape (G, q)
    cov : array of shape (G, q, q)
    """
    n_draws = draws["noise"].shape[0]
    n_groups, n_features = data.on.shape
    q = n_features + 1
    onq = jnp.concatenate([jnp.ones((n_groups, 1)), data.on], axis=1)
    keys = jax.random.split(rng_key, n_draws)
    fixed_C = none_factor(data, hyper) if pooling == "none" else None

    def one(carry, i):
        values = {"sigma": draws["noise"][i]}
        if pooling == "partial":
            values["tau_a"] = draws["intercept_scale"][i]
            values["tau"] = draws["coef_scale"][i]
        cells = draws["x_missing"][i] if "x_missing" in draws else jnp.zeros(0)
        stats = add_incomplete_rows(data, cells)
        F, f, C = group_prior(pooling, values, data)
        C = fixed_C if pooling == "none" else C
        terms = group_terms(C, values["sigma"], stats)
        key_pop, key_group = jax.random.split(keys[i])
        if F is None:
            phi = jnp.zeros(q)
            b0 = f
        else:
            _, chol, v = _population_posterior(F, f, terms, hyper)
            eps = jax.random.normal(key_pop, (q,))
            phi = jsl.solve_triangular(chol, v + eps, lower=True, trans=1)
            b0 = jnp.einsum("gij,j->gi", F, phi) + f
        if C is None:
            mean, factor = b0, jnp.zeros((n_groups, q, q))
        else:
            # v_g | rest ~ N(M^-1 C'(r - S b0)/s2, M^-1); theta = b0 + C v
            s2 = values["sigma"] ** 2
            resid = stats[2] - jnp.einsum("gij,gj->gi", stats[1], b0)
            white = jnp.einsum("gij,gj->gi", terms.proj, resid) / s2
            back = jsl.solve_triangular(
                terms.chol, white[..., None], lower=True, trans=1
            )[..., 0]
            mean = b0 + jnp.einsum("gij,gj->gi", C, back)
            eye = jnp.broadcast_to(jnp.eye(q), C.shape)
            factor = jnp.einsum(
                "gij,gjk->gik",
                C,
                jsl.solve_triangular(terms.chol, eye, lower=True, trans=1),
            )
        eps = jax.random.normal(key_group, (n_groups, q))
        coef = (mean + jnp.einsum("gij,gj->gi", factor, eps)) * onq
        cov = jnp.einsum("gik,gjk->gij", factor, factor)
        s_mean, s_cov, s_outer = carry
        carry = (
            s_mean + mean,
            s_cov + cov,
            s_outer + mean[:, :, None] * mean[:, None, :],
        )
        return carry, (coef, phi)

    init = (
        jnp.zeros((n_groups, q)),
        jnp.zeros((n_groups, q, q)),
        jnp.zeros((n_groups, q, q)),
    )
    (s_mean, s_cov, s_outer), (coef, phi) = jax.lax.scan(one, init, jnp.arange(n_draws))
    mean = s_mean / n_draws
    cov = s_cov / n_draws + s_outer / n_draws - mean[:, :, None] * mean[:, None, :]
    out = {"group_coef_internal": coef}
    if pooling != "none":
        out["intercept_at_means"] = phi[:, 0]
        out["coef_mean"] = phi[:, 1:]
    return out, mean * onq, cov * onq[:, :, None] * onq[:, None, :]
