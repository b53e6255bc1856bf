"""The collapsed engine's conditional draws against the conjugate posterior
(issue 20).

With the residual sd and the between-group sds fixed, the model is linear
and Gaussian in everything else: the population vector ``(ell, mu)`` and
the standardized group effects ``z``. Their posterior is written down here
from the model equations (``hiermask._model``: with ``standardize=True``,
``b_gj = (mu_j + tau_j z_gj) on_gj`` and ``a_g = ell - mu.k + tau_a z_ag +
b_g.k`` in the internal units, a row's mean ``a_g + b_g.c_i``) as a dense
Gaussian: prior precision plus ``A'WA / sigma^2``. The group coefficients are
a linear map of it. 20,000 draws, every one at the same fixed values, must
have that mean (within 4.5 standard errors, ``sd / sqrt(20000)``), those
variances (within 5%: the sample variance's relative sd is ``sqrt(2 / 20000)
= 1%``) and those correlations (within 0.04 absolute, about 5 standard
errors of a correlation, at most ``1 / sqrt(20000) = 0.007``). The
Rao-Blackwellized moments the engine returns must equal the closed form to
rounding.

The only call into the engine is :func:`conditional_coefficients`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiermask._collapsed import conditional_draws

from ._fitted import engine_data

N_DRAWS = 20_000
SIGMA, TAU_A, TAU = 0.6, 0.5, np.array([0.4, 0.3])


# --------------------------------------------------------------- the adapter
def conditional_coefficients(X, y, w, group_idx, mask, pooling, seed):
    """Group-coefficient draws (N_DRAWS, G, q) of the collapsed engine given
    fixed SIGMA (and TAU_A, TAU under partial pooling), in internal units,
    with its Rao-Blackwellized mean (G, q) and covariance (G, q, q); and the
    engine's data and prior scales."""
    data, hyper, scaling = engine_data(X, y, w, group_idx, mask, pooling, seed=seed)
    fixed = {"noise": np.full(N_DRAWS, SIGMA)}
    if pooling == "partial":
        fixed["intercept_scale"] = np.full(N_DRAWS, TAU_A)
        fixed["coef_scale"] = np.tile(TAU, (N_DRAWS, 1))
    as_jax = jax.tree_util.tree_map
    with jax.enable_x64(True):
        out, mean, cov = jax.jit(conditional_draws, static_argnames="pooling")(
            jax.random.PRNGKey(seed),
            as_jax(jnp.asarray, fixed),
            as_jax(jnp.asarray, data),
            as_jax(jnp.asarray, hyper),
            pooling,
        )
        draws = np.asarray(out["group_coef_internal"])
    return draws, np.asarray(mean), np.asarray(cov), scaling, hyper


# --------------------------------------------------------------- the oracle
def _problem():
    # 4 groups of 6-15 weighted rows, 2 features; feature 1 is off in group 0
    rng = np.random.default_rng(7)
    sizes = [6, 15, 10, 12]
    group_idx = np.repeat(np.arange(4), sizes)
    X = rng.normal(size=(group_idx.size, 2)) * [1.0, 3.0] + [2.0, -1.0]
    y = X @ [1.0, 0.3] + rng.normal(0, 0.5, 4)[group_idx]
    y = y + rng.normal(0, 0.6, group_idx.size)
    mask = np.ones((4, 2), bool)
    mask[0, 1] = False
    X[group_idx == 0, 1] = np.nan
    w = rng.uniform(0.5, 2.0, group_idx.size)
    return X, y, w, group_idx, mask


def _linear_map(pooling, on, k):
    """theta_g = L[g] @ gamma (internal units, standardize=True: K = k and
    e_y = 0); gamma's prior is independent with the returned variances
    relative to (intercept, coef) prior scales (see _closed_form)."""
    n_groups, p = on.shape
    q = p + 1
    if pooling == "none":
        # gamma = (ell_g, b_g) per group; a_g = ell_g + b_g.(k - K) = ell_g
        L = np.zeros((n_groups, q, n_groups * q))
        for g in range(n_groups):
            L[g, :, g * q : (g + 1) * q] = np.diag(np.concatenate([[1.0], on[g]]))
        return L
    # gamma = (ell, mu, then z_a, z_1.. z_p per group under "partial")
    n_latent = q + (n_groups * q if pooling == "partial" else 0)
    L = np.zeros((n_groups, q, n_latent))
    for g in range(n_groups):
        L[g, 1:, 1:q] = np.diag(on[g])
        L[g, 0, 0] = 1.0
        L[g, 0, 1:q] = -k
        if pooling == "partial":
            zs = q + q * g
            L[g, 0, zs] = TAU_A
            L[g, 1:, zs + 1 : zs + q] = np.diag(TAU * on[g])
        L[g, 0] += (k * on[g]) @ L[g, 1:]
    return L


def _closed_form(X, y, w, group_idx, mask, pooling, scaling, hyper):
    """Mean (G, q) and joint covariance (G q, G q) of the group coefficients."""
    n_groups, p = mask.shape
    on = mask.astype(float)
    k = scaling.x_mean / scaling.x_scale
    c = np.where(mask[group_idx], (X - scaling.x_mean) / scaling.x_scale, 0.0)
    design = np.column_stack([np.ones(len(y)), c])
    u = (y - scaling.y_mean) / scaling.y_scale
    L = _linear_map(pooling, on, k)
    A = np.einsum("ni,nil->nl", design, L[group_idx])  # u = A gamma + noise
    prior_coef = np.concatenate([[hyper.intercept**2], hyper.coef**2])
    if pooling == "none":
        prior_var = np.tile(prior_coef, n_groups)
    else:
        prior_var = np.concatenate([prior_coef, np.ones(L.shape[2] - p - 1)])
    precision = A.T @ (w[:, None] * A) / SIGMA**2 + np.diag(1 / prior_var)
    cov = np.linalg.inv(precision)
    mean = cov @ (A.T @ (w * u)) / SIGMA**2
    L_all = L.reshape(n_groups * (p + 1), -1)
    return (L_all @ mean).reshape(n_groups, p + 1), L_all @ cov @ L_all.T


@pytest.mark.parametrize("pooling", ["partial", "none", "complete"])
def test_conditional_draws_follow_the_conjugate_posterior(pooling):
    X, y, w, group_idx, mask = _problem()
    draws, rb_mean, rb_cov, scaling, hyper = conditional_coefficients(
        X, y, w, group_idx, mask, pooling, seed=3
    )
    mean, cov = _closed_form(X, y, w, group_idx, mask, pooling, scaling, hyper)
    n_groups, q = mean.shape
    blocks = cov.reshape(n_groups, q, n_groups, q)[
        np.arange(n_groups), :, np.arange(n_groups)
    ]
    if pooling == "none":
        # no population draw: the Rao-Blackwellized moments are the
        # conditional posterior's, to rounding
        np.testing.assert_allclose(rb_mean, mean, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(rb_cov, blocks, rtol=1e-8, atol=1e-10)
    else:
        # they average over the drawn population vector: within the Monte
        # Carlo error of the draws themselves (bounds as for the draws)
        sd = np.sqrt(np.diagonal(blocks, axis1=1, axis2=2))
        on = sd > 0
        z = (rb_mean - mean)[on] / (sd[on] / np.sqrt(N_DRAWS))
        assert np.all(np.abs(z) < 4.5), z
        ratio = np.diagonal(rb_cov, axis1=1, axis2=2)[on] / sd[on] ** 2
        assert np.all(np.abs(ratio - 1) < 0.05), ratio
    # the draws: all coefficients of all groups jointly (masked ones are 0)
    flat = draws.reshape(N_DRAWS, -1)
    keep = np.diag(cov) > 0
    assert np.all(flat[:, ~keep] == 0.0)
    flat, mean, cov = flat[:, keep], mean.ravel()[keep], cov[np.ix_(keep, keep)]
    sd = np.sqrt(np.diag(cov))
    z = (flat.mean(axis=0) - mean) / (sd / np.sqrt(N_DRAWS))
    assert np.all(np.abs(z) < 4.5), z
    ratio = flat.var(axis=0) / sd**2
    assert np.all(np.abs(ratio - 1) < 0.05), ratio
    corr = cov / np.outer(sd, sd)
    np.testing.assert_allclose(np.corrcoef(flat, rowvar=False), corr, atol=0.04)
