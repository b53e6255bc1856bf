"""Closed-form oracles for the collapsed engine's algebra (issue 3).

Everything is compared in the engine's internal units (centred and scaled
design, standardized target), where the model's priors are written down
independently here from the model equations of ``hiermask._model``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import multivariate_normal

from hiermask import _collapsed as collapsed
from hiermask import _fit, _limits
from hiermask._collapsed import conditional_draws, marginal_loglik

from ._fitted import engine_data, fit_config


def _prepare(X, y, group_idx, n_groups, pooling, w=None, mask=None, **priors):
    # Engine data of (X, y); by default unit weights and every feature on.
    w = np.ones(len(y)) if w is None else w
    mask = np.ones((n_groups, X.shape[1]), bool) if mask is None else mask
    data, hyper, scaling = engine_data(X, y, w, group_idx, mask, pooling, **priors)
    design = np.column_stack([np.ones(len(y)), (X - scaling.x_mean) / scaling.x_scale])
    u = (y - scaling.y_mean) / scaling.y_scale
    return data, hyper, design, u


def _as_jax(tree):
    return jax.tree_util.tree_map(jnp.asarray, tree)


# The engine's functions compiled as one program, as the fit runs them:
# dispatched operation by operation they compile each piece apart, several
# times slower (the same arithmetic either way).
def _marginal(pooling, values, data, hyper, cells):
    return jax.jit(functools.partial(marginal_loglik, pooling))(
        values, data, hyper, cells
    )


def _conditional(key, draws, data, hyper, pooling, **options):
    run = functools.partial(conditional_draws, pooling=pooling, **options)
    return jax.jit(run)(key, draws, data, hyper)


def test_one_group_no_pooling_fixed_noise_is_conjugate():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 2)) * [2.0, 0.5] + [1.0, -3.0]
    y = 0.3 + X @ [1.0, 2.0] + rng.normal(0, 0.8, size=50)
    data, hyper, Xt, u = _prepare(
        X, y, np.zeros(50, int), 1, "none", coef_prior_scale=0.7
    )
    sigma = 0.4
    # prior in internal units (standardize=True): intercept ~ N(0, 1),
    # slopes ~ N(0, 0.7^2), independent
    prior_var = np.array([1.0, 0.49, 0.49])
    precision = Xt.T @ Xt / sigma**2 + np.diag(1 / prior_var)
    cov = np.linalg.inv(precision)
    mean = cov @ (Xt.T @ u / sigma**2)
    with jax.enable_x64(True):
        draws = {"noise": jnp.full(7, sigma)}
        _, rb_mean, rb_cov = _conditional(
            jax.random.PRNGKey(0), draws, _as_jax(data), _as_jax(hyper), "none"
        )
        loglik = _marginal(
            "none", {"sigma": sigma}, _as_jax(data), _as_jax(hyper), jnp.zeros(0)
        )
    # every draw has the same noise: the Rao-Blackwellized moments are the
    # conjugate posterior itself (float64 round-off only)
    np.testing.assert_allclose(np.asarray(rb_mean)[0], mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(rb_cov)[0], cov, rtol=1e-9, atol=1e-12)
    marginal = multivariate_normal(
        np.zeros(50), sigma**2 * np.eye(50) + Xt @ np.diag(prior_var) @ Xt.T
    ).logpdf(u)
    np.testing.assert_allclose(float(loglik), marginal, rtol=1e-10)


def test_partial_pooling_marginal_matches_dense_gaussian():
    rng = np.random.default_rng(1)
    n_groups, n_per = 4, 12
    group_idx = np.repeat(np.arange(n_groups), n_per)
    X = rng.normal(size=(group_idx.size, 2)) + [2.0, -1.0]
    y = (
        X @ [1.0, -0.5]
        + rng.normal(size=n_groups)[group_idx]
        + rng.normal(size=group_idx.size)
    )
    data, hyper, Xt, u = _prepare(X, y, group_idx, n_groups, "partial")
    tau_a, tau, sigma = 0.6, np.array([0.3, 0.2]), 0.5
    k = np.asarray(data.k)
    # Gaussian vector (ell, mu_1, mu_2, then z_a, z_1, z_2 per group); with
    # standardize=True the model reads, per group g:
    #   b_g = mu + tau * z_g
    #   a_g = ell - mu.k + tau_a z_ag + b_g.k
    n_latent = 3 + 3 * n_groups
    prior_sd = np.concatenate([[1.0, 1.0, 1.0], np.ones(3 * n_groups)])
    L = np.zeros((n_groups, 3, n_latent))  # theta_g = L[g] @ latent
    for g in range(n_groups):
        zs = 3 + 3 * g
        L[g, 1:, 1:3] = np.eye(2)
        L[g, 1:, zs + 1 : zs + 3] = np.diag(tau)
        L[g, 0, 0] = 1.0
        L[g, 0, zs] = tau_a
        L[g, 0, :] += k @ L[g, 1:, :] - np.concatenate([[0], k, np.zeros(n_latent - 3)])
    A = np.einsum("ni,nil->nl", Xt, L[group_idx])  # u = A latent + noise
    cov = A @ np.diag(prior_sd**2) @ A.T + sigma**2 * np.eye(len(u))
    expected = multivariate_normal(np.zeros(len(u)), cov).logpdf(u)
    with jax.enable_x64(True):
        got = _marginal(
            "partial",
            {"sigma": sigma, "tau_a": tau_a, "tau": jnp.asarray(tau)},
            _as_jax(data),
            _as_jax(hyper),
            jnp.zeros(0),
        )
    np.testing.assert_allclose(float(got), expected, rtol=1e-10)


def test_float64_accuracy_at_a_million_rows():
    rng = np.random.default_rng(2)
    n, n_groups = 1_000_000, 10
    group_idx = rng.integers(0, n_groups, size=n)
    X = rng.normal(size=(n, 3)) * [1.0, 100.0, 0.01] + [5.0, 1000.0, 0.0]
    coef = np.array([2.0, -0.03, 300.0]) + rng.normal(0, 0.01, size=(n_groups, 3))
    y = 10.0 + np.sum(coef[group_idx] * X, axis=1) + rng.normal(0, 1e-3, size=n)
    data, hyper, Xt, u = _prepare(X, y, group_idx, n_groups, "none")
    sigma = 1e-3 / float(np.std(y))  # internal units; R^2 ~ 1 - 1e-7
    with jax.enable_x64(True):
        got = float(
            _marginal(
                "none", {"sigma": sigma}, _as_jax(data), _as_jax(hyper), jnp.zeros(0)
            )
        )
    # Oracle from the rows, free of the u'u cancellation: for each group, at
    # the conditional mode theta*, log p(u) = sum_i log N(u_i | x_i theta*, s)
    # + log N(theta* | 0, V0) + log|2 pi Sigma*| / 2.
    prior_var = np.array([1.0, 1.0, 1.0, 1.0])
    expected = 0.0
    for g in range(n_groups):
        rows = group_idx == g
        Xg, ug = Xt[rows], u[rows]
        precision = Xg.T @ Xg / sigma**2 + np.diag(1 / prior_var)
        chol = np.linalg.cholesky(precision)
        theta = np.linalg.solve(precision, Xg.T @ ug / sigma**2)
        resid = ug - Xg @ theta
        expected += (
            -0.5 * len(ug) * np.log(2 * np.pi * sigma**2)
            - 0.5 * resid @ resid / sigma**2
            - 0.5 * np.sum(theta**2 / prior_var)
            - 0.5 * np.sum(np.log(prior_var))
            - np.sum(np.log(np.diag(chol)))
        )
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert jax.config.jax_enable_x64 is False


def _masked_problem():
    # 7 groups of 5-12 weighted rows, 3 features: feature c is off in group 1
    # and feature a in group 4 (all NaN there), and 3 scattered NaN cells in
    # features that are on are latent.
    rng = np.random.default_rng(3)
    sizes = [5, 9, 12, 7, 8, 10, 6]
    group_idx = np.repeat(np.arange(len(sizes)), sizes)
    n = group_idx.size
    X = rng.normal(size=(n, 3)) * [1.0, 2.0, 0.5] + [0.5, -1.0, 3.0]
    y = X @ [1.0, -0.5, 2.0] + rng.normal(size=len(sizes))[group_idx]
    y = y + rng.normal(0, 0.7, size=n)
    mask = np.ones((len(sizes), 3), bool)
    mask[1, 2] = mask[4, 0] = False
    X[~mask[group_idx]] = np.nan
    X[[0, 20, 50], [1, 0, 2]] = np.nan
    w = rng.uniform(0.5, 2.0, size=n)
    data, hyper, _, _ = _prepare(X, y, group_idx, len(sizes), "partial", w, mask)
    assert data.miss_row.shape[0] == 3
    return data, hyper


def _loglik_of(pooling, data, hyper):
    # The log marginal likelihood as a function of one flat vector: sigma,
    # then tau_a and tau (partial pooling), then the latent cells.
    p = data.on.shape[1]

    def f(x):
        values = {"sigma": x[0]}
        if pooling == "partial":
            values.update(tau_a=x[1], tau=x[2 : 2 + p])
        cells = x[-data.miss_row.shape[0] :]
        return marginal_loglik(pooling, values, data, hyper, cells)

    x = [0.8] + ([0.6, 0.3, 0.9, 0.2] if pooling == "partial" else [])
    return f, np.array(x + [0.4, -1.1, 0.7])


@pytest.mark.parametrize("block_groups", [None, 2, 3])
@pytest.mark.parametrize("pooling", ["partial", "none", "complete"])
def test_gradient_matches_finite_differences(pooling, block_groups, monkeypatch):
    # The hand-written gradient (custom VJP, blockwise over groups) against
    # central differences of the value, which the dense-Gaussian tests above
    # check. Masks, weights and latent cells included; blocks of 2 and 3
    # groups (7 groups: a ragged last block; the factorizations kept between
    # the passes with 2, factorized again with 3) as well as one block, the
    # last with LAPACK factors.
    monkeypatch.setattr(_limits, "BLOCK_GROUPS", block_groups)
    if block_groups is None:
        monkeypatch.setattr(_limits, "UNROLL_MAX_SIZE", 1)
    if block_groups == 3:
        monkeypatch.setattr(_limits, "KEEP_FACTORS_BYTES", 0)
    data, hyper = _masked_problem()
    with jax.enable_x64(True):
        f, x = _loglik_of(pooling, _as_jax(data), _as_jax(hyper))
        grad = np.asarray(jax.jit(jax.grad(f))(jnp.asarray(x)))
        f = jax.jit(f)  # compiled once: op-by-op dispatch compiles far more
        fd = np.empty_like(x)
        for i in range(x.size):
            h = 1e-5 * max(1.0, abs(x[i]))
            up, down = x.copy(), x.copy()
            up[i] += h
            down[i] -= h
            fd[i] = (float(f(jnp.asarray(up))) - float(f(jnp.asarray(down)))) / (2 * h)
    # truncation ~h^2 |f'''|, rounding ~1e-16 |f| / h: both far below 1e-6
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-6 * np.max(np.abs(fd)))


@pytest.mark.parametrize("pooling", ["partial", "none", "complete"])
def test_blocking_over_groups_changes_nothing(pooling, monkeypatch):
    # Value, gradient and conditional draws are sums or maps over groups:
    # splitting the groups into blocks changes them by round-off only, and
    # so does factorizing each group's matrix by LAPACK instead of unrolled
    # code (last case) and factorizing again in the gradient's pass instead
    # of keeping the factorizations (third case).
    data, hyper = _masked_problem()
    results = []
    cases = ((None, 16, 1 << 26), (2, 16, 1 << 26), (3, 16, 0), (3, 1, 1 << 26))
    for block_groups, unroll, keep in cases:
        monkeypatch.setattr(_limits, "BLOCK_GROUPS", block_groups)
        monkeypatch.setattr(_limits, "UNROLL_MAX_SIZE", unroll)
        monkeypatch.setattr(_limits, "KEEP_FACTORS_BYTES", keep)
        with jax.enable_x64(True):
            f, x = _loglik_of(pooling, _as_jax(data), _as_jax(hyper))
            value, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(x))
            draws = {
                "noise": jnp.linspace(0.5, 1.0, 5),
                "x_missing": jnp.tile(jnp.asarray(x[-3:]), (5, 1)),
            }
            if pooling == "partial":
                draws["intercept_scale"] = jnp.linspace(0.2, 0.9, 5)
                draws["coef_scale"] = jnp.linspace(0.1, 1.5, 15).reshape(5, 3)
            out = _conditional(
                jax.random.PRNGKey(1), draws, _as_jax(data), _as_jax(hyper), pooling
            )
        results.append(jax.tree_util.tree_map(np.asarray, (value, grad, out)))
    for other in results[1:]:
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12),
            results[0],
            other,
        )


@pytest.mark.parametrize("pooling", ["partial", "none", "complete"])
def test_conditional_draws_in_parts_match_one_run(pooling, monkeypatch):
    # The fit runs the conditional draws in two parts (in parallel threads),
    # each starting at a whole chunk: the draws are those of one run over
    # all draws (the chunks' random streams depend on their index only),
    # and the pooled moments equal one run's. 7 draws in chunks of 2: parts
    # of 4 draws, the second padded by one.
    data, hyper = _masked_problem()
    n_groups, n_features = data.on.shape
    q = n_features + 1
    monkeypatch.setattr(_limits, "CONDITIONAL_CHUNK_FLOATS", 2 * n_groups * q * q)
    assert _fit._conditional_parts(7, n_groups, q) == (2, 4, [(0, 4, 0), (4, 7, 2)])
    rng = np.random.default_rng(3)
    draws = {
        "noise": rng.uniform(0.5, 1.0, 7),
        "x_missing": rng.normal(size=(7, data.miss_row.shape[0])),
    }
    if pooling == "partial":
        draws["intercept_scale"] = rng.uniform(0.2, 0.9, 7)
        draws["coef_scale"] = rng.uniform(0.1, 1.5, (7, n_features))
    key = _fit._conditional_key(4)
    with jax.enable_x64(True):
        whole = _conditional(
            key, draws, _as_jax(data), _as_jax(hyper), pooling, chunk=2
        )
        # the fit's program: compiled for one part's length
        config = fit_config(pooling, num_chains=7)
        program = _fit._conditional_program(config, data, hyper).result()
        parts = _fit._conditional(program, key, draws, data, hyper)
    whole = jax.tree_util.tree_map(np.asarray, whole)
    assert whole[0].keys() == parts[0].keys()
    for name in whole[0]:
        assert parts[0][name].shape[0] == 7
        np.testing.assert_allclose(parts[0][name], whole[0][name], rtol=1e-12)
    # the moments: one run's, from pooled parts (the padding draw excluded)
    for a, b in zip(parts[1:], whole[1:], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_residual_sd_guess_matches_per_group_least_squares():
    # Oracle: each group's weighted least squares by np.linalg.lstsq (its
    # rank from the SVD), residual sums of squares pooled over the groups
    # with more rows than coefficients. Group 1 has a feature switched off
    # (zero column, as in the engine's statistics), group 2 two identical
    # columns (rank 3 of 4), group 3 three rows for four coefficients
    # (left out: no residual degrees of freedom).
    rng = np.random.default_rng(5)
    sizes = [40, 25, 30, 3]
    n, gram, xty, yty = [], [], [], []
    rss = dof = 0.0
    for g, size in enumerate(sizes):
        X = np.column_stack([np.ones(size), rng.normal(size=(size, 3))])
        if g == 1:
            X[:, 2] = 0.0
        if g == 2:
            X[:, 3] = X[:, 1]
        w = rng.uniform(0.5, 2.0, size)
        y = X @ rng.normal(size=4) + rng.normal(scale=0.7, size=size)
        n.append(w.sum())
        gram.append(X.T @ (w[:, None] * X))
        xty.append(X.T @ (w * y))
        yty.append(np.sum(w * y**2))
        sw = np.sqrt(w)
        coef, _, rank, _ = np.linalg.lstsq(X * sw[:, None], y * sw, rcond=None)
        if w.sum() > rank:
            rss += np.sum(w * (y - X @ coef) ** 2)
            dof += w.sum() - rank
    guess = collapsed.residual_sd_guess(
        np.array(n), np.array(gram), np.array(xty), np.array(yty)
    )
    sd = np.sqrt(rss / dof)
    np.testing.assert_allclose(guess, [sd, sd / np.sqrt(2 * dof)], rtol=1e-8)
    # nothing to go on: the default start
    one = collapsed.residual_sd_guess(
        np.array(n[3:]), np.array(gram[3:]), np.array(xty[3:]), np.array(yty[3:])
    )
    np.testing.assert_array_equal(one, [1.0, 0.0])
