"""Oracles for the collapsed engine's general model (issue 14).

Population-only slopes (``varying``) and correlated group effects
(``covariance="full"``), checked in the engine's internal units against dense
Gaussian computations written here from the model's definition (not from the
engine's ``A``, ``P`` and ``E`` maps): in internal units a row ``i`` of group
``g`` reads

    u_i = alpha_g + sum_{j on in g} b_gj x_ij / s_j + e_i,  e_i ~ N(0, sigma^2 / w_i)

with ``alpha_g = ell - mu.K - e_y + delta_0g`` (the intercept at ``x = 0``),
``b_gj = mu_j + delta_jg`` for a varying feature and ``mu_j`` for one that
does not vary; the deviations ``delta_g`` of the intercept and of the varying
features that are on in ``g`` follow the marginal of ``N(0, diag(tau) Omega
diag(tau))`` on them. Under no pooling ``u_i = ell_g - e_y + sum_j on coef_gj
(x_ij / s_j - K_j)`` with per-group ``ell_g`` and varying ``coef_gj`` and one
shared ``coef_j`` for each non-varying feature, all with their fixed prior sds.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from numpyro.distributions.transforms import CorrCholeskyTransform
from scipy.stats import multivariate_normal

from hiermask import _general, _limits
from hiermask._collapsed import CollapsedEngine, marginal_loglik
from hiermask._general import general_spec

from ._fitted import engine_data

# compiled once per spec and shape (faster than op by op)
general_loglik = jax.jit(_general.general_loglik, static_argnums=0)
general_conditional = jax.jit(
    _general.general_conditional, static_argnums=0, static_argnames="chunk"
)

# Three groups of 6-9 weighted rows, three features; feature 2 is off in
# group 1 and one cell of feature 1 in group 0 is latent.
SIZES = (6, 9, 7)
TAU = np.array([0.5, 0.3, 0.6])
SIGMA, TAU_A = 0.7, 0.8
LATENT = (0, 1)  # row, feature of the latent cell
CELL = 0.3  # its value in the centred internal design
PRIORS = {"coef_prior_scale": 1.3, "intercept_prior_scale": 0.9}


def _problem(standardize=True, latent=True):
    rng = np.random.default_rng(11)
    group_idx = np.repeat(np.arange(len(SIZES)), SIZES)
    n = group_idx.size
    X = rng.normal(size=(n, 3)) * [1.0, 2.0, 0.5] + [0.5, -1.0, 3.0]
    y = X @ [1.0, -0.5, 2.0] + rng.normal(size=len(SIZES))[group_idx]
    y = y + rng.normal(0, 0.7, size=n) + 4.0
    mask = np.ones((len(SIZES), 3), bool)
    mask[1, 2] = False
    X[~mask[group_idx]] = np.nan
    if latent:
        X[LATENT] = np.nan
    w = rng.uniform(0.5, 2.0, size=n)
    data, hyper, scaling = engine_data(
        X, y, w, group_idx, mask, standardize=standardize, **PRIORS
    )
    # x / s in internal units (0 where off), the latent cell filled in
    xs = np.where(mask[group_idx], X, 0.0) / scaling.x_scale
    if latent:
        xs[LATENT] = CELL + scaling.x_mean[1] / scaling.x_scale[1]
    u = (y - scaling.y_mean) / scaling.y_scale
    rows = dict(xs=xs, u=u, w=w, group_idx=group_idx, on=mask[group_idx])
    return _as_jax(data), _as_jax(hyper), rows


def _as_jax(tree):
    with jax.enable_x64(True):
        return jax.tree_util.tree_map(jnp.asarray, tree)


def _correlation(size, seed=5):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(size, size + 2))
    c = a @ a.T
    d = 1.0 / np.sqrt(np.diag(c))
    return c * d[:, None] * d[None]


def _latent_map(pooling, varying, omega, data, hyper, rows, tau_a=TAU_A, tau=TAU):
    """The linear map from standard normals to (u, theta): ``u = m_u + J xi +
    noise``, ``theta_g = m_t + T_g xi`` (internal basis), xi ~ N(0, I).

    ``omega``: the correlation of the group effects under "full", which sit
    at the reference point ``K``; None: "diagonal", effects at ``x = 0``."""
    xs, group_idx, on = rows["xs"], rows["group_idx"], rows["on"]
    n, p = xs.shape
    n_groups, q = len(SIZES), p + 1
    vary = np.asarray(varying, bool)
    k, K, e_y = (np.asarray(a) for a in (data.k, data.K, data.e_y))
    coef_sd, int_sd = np.asarray(hyper.coef), float(hyper.intercept)
    n_latent = q + n_groups * q
    # theta_g in the internal basis: intercept at the centring point a_g =
    # alpha_g + sum_j on b_gj k_j, then the slopes on b_gj
    theta = np.zeros((n_groups, q, n_latent))
    theta_mean = np.zeros((n_groups, q))
    on_g = np.asarray(data.on) > 0
    for g in range(n_groups):
        z = q + g * q  # this group's normals
        b = np.zeros((p, n_latent))
        alpha = np.zeros(n_latent)
        if pooling == "partial":
            alpha[0] = int_sd
            alpha[1:q] = -K * coef_sd
            b[:, 1:q] = np.diag(coef_sd)
            sds = np.concatenate([[tau_a], tau[vary]])
            idx = np.concatenate([[0], 1 + np.flatnonzero(vary)])
            dev = np.zeros((q, n_latent))
            if omega is None:
                dev[np.ix_(idx, z + idx)] = np.diag(sds)
                alpha = alpha + dev[0]
            else:
                dev[np.ix_(idx, z + idx)] = sds[:, None] * np.linalg.cholesky(omega)
                # effects at the reference point K: the intercept at x = 0
                # (an off feature enters as x = 0)
                alpha = alpha + dev[0] - K @ dev[1:]
            # the marginal on what applies to g: deviations of off features 0
            dev[1:][~on_g[g]] = 0.0
            b = b + dev[1:]
        else:
            alpha[z] = int_sd  # ell_g, the intercept at the reference point
            for j in range(p):
                b[j, z + 1 + j if vary[j] else 1 + j] = coef_sd[j]
            alpha = alpha - K @ (b * on_g[g][:, None])
        b = b * on_g[g][:, None]
        theta[g, 0] = alpha + k @ b
        theta[g, 1:] = b
        theta_mean[g, 0] = -e_y
    # rows: u_i = alpha_g + sum_j b_gj x_ij / s_j; alpha_g = theta0 - k.b
    J = np.zeros((n, n_latent))
    for i in range(n):
        g = group_idx[i]
        alpha = theta[g, 0] - k @ theta[g, 1:]
        J[i] = alpha + (xs[i] * on[i]) @ theta[g, 1:]
    return -e_y * np.ones(n), J, theta_mean, theta


def _dense(pooling, varying, omega, data, hyper, rows, sigma=SIGMA, **sds):
    m_u, J, _, _ = _latent_map(pooling, varying, omega, data, hyper, rows, **sds)
    return m_u, J @ J.T + np.diag(sigma**2 / rows["w"])


def _weight_term(w, sigma=SIGMA):
    # The engine's weighted likelihood, prod N(u | m, sigma)^w, against
    # N(u | m, sigma^2 / w): -(sum w - n)/2 log(2 pi sigma^2) - sum log w / 2.
    return -0.5 * (np.sum(w) - len(w)) * np.log(2 * np.pi * sigma**2) - 0.5 * np.sum(
        np.log(w)
    )


def _scales(pooling, varying, full):
    scales = {"sigma": SIGMA}
    if pooling == "partial":
        vary = np.asarray(varying, bool)
        scales["tau_a"] = TAU_A
        scales["tau"] = jnp.asarray(TAU[vary])
        if full:
            scales["corr_chol"] = jnp.asarray(
                np.linalg.cholesky(_correlation(1 + vary.sum()))
            )
    return scales


CASES = [
    ("partial", (True, True, True), "full"),
    ("partial", (True, False, True), "full"),
    ("partial", (False, True, False), "full"),
    ("partial", (False, False, False), "full"),
    ("partial", (True, False, True), "diagonal"),
    ("partial", (False, False, False), "diagonal"),
    ("none", (True, False, True), "diagonal"),
    ("none", (False, False, False), "full"),
]


@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize(("pooling", "varying", "covariance"), CASES)
def test_marginal_matches_dense_gaussian(pooling, varying, covariance, standardize):
    # every pooling that integrates something out ("complete" runs today's
    # code), full and diagonal, some and no varying features, a masked-off
    # feature, weights and a latent cell; rtol 1e-10
    data, hyper, rows = _problem(standardize)
    spec = general_spec(pooling, varying, covariance, 3)
    assert spec.full == (covariance == "full" and pooling == "partial")
    omega = _correlation(1 + sum(varying)) if spec.full else None
    mean, cov = _dense(pooling, varying, omega, data, hyper, rows)
    expected = multivariate_normal(mean, cov).logpdf(rows["u"])
    expected += _weight_term(rows["w"])
    with jax.enable_x64(True):
        got = general_loglik(
            spec,
            _scales(pooling, varying, spec.full),
            data,
            hyper,
            jnp.array([CELL]),
        )
    np.testing.assert_allclose(float(got), expected, rtol=1e-10)


@pytest.mark.parametrize("pooling", ["partial", "none"])
def test_everything_varying_diagonal_equals_hand_written(pooling):
    # the plain-JAX path on today's model against the hand-written one:
    # value and jax.grad against its hand-written gradient, rtol 1e-10
    data, hyper, _ = _problem()
    spec = general_spec(pooling, None, "diagonal", 3)

    def both(x):
        values = {"sigma": x[0], "tau_a": x[1], "tau": x[2:5]}
        cells = x[5:]
        return (
            general_loglik(spec, values, data, hyper, cells),
            marginal_loglik(pooling, values, data, hyper, cells),
        )

    with jax.enable_x64(True):
        x = jnp.concatenate(
            [jnp.array([SIGMA, TAU_A]), jnp.asarray(TAU), jnp.array([CELL])]
        )
        # each side compiled as one program (op by op, every operation of
        # the hand-written path compiles apart: minutes on 2 CPUs)
        general, g_general = jax.jit(jax.value_and_grad(lambda x: both(x)[0]))(x)
        hand, g_hand = jax.jit(jax.value_and_grad(lambda x: both(x)[1]))(x)
    np.testing.assert_allclose(float(general), float(hand), rtol=1e-10)
    if pooling == "none":
        # no sds are sampled: their gradients are 0 on both sides
        assert np.all(np.asarray(g_general[1:5]) == 0.0)
    np.testing.assert_allclose(
        np.asarray(g_general), np.asarray(g_hand), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("latent", [True, False])
@pytest.mark.parametrize(
    ("pooling", "varying", "covariance"),
    [
        ("partial", (True, False, True), "full"),
        ("partial", (True, True, True), "full"),
        ("partial", (False, True, False), "diagonal"),
        ("none", (True, False, True), "diagonal"),
    ],
)
def test_hand_written_gradient_equals_jax_grad(pooling, varying, covariance, latent):
    # The groups' terms with their hand-written gradient (the sampler's)
    # against jax.grad of the same plain-JAX terms: value and gradient with
    # respect to sigma, the sds, the correlation's unconstrained vector and
    # the latent cell (whose statistics take the gradient), rtol 1e-10.
    data, hyper, _ = _problem(latent=latent)
    spec = general_spec(pooling, varying, covariance, 3)
    n_vary = sum(varying)
    n_corr = n_vary * (n_vary + 1) // 2

    def loglik(x, hand_written):
        scales = {"sigma": x[0], "tau_a": x[1], "tau": x[2 : 2 + n_vary]}
        corr = x[2 + n_vary : 2 + n_vary + n_corr]
        scales["corr_chol"] = CorrCholeskyTransform()(corr)
        cells = x[2 + n_vary + n_corr :]
        return _general.general_loglik(spec, scales, data, hyper, cells, hand_written)

    rng = np.random.default_rng(4)
    with jax.enable_x64(True):
        x = jnp.asarray(
            np.concatenate(
                [
                    [SIGMA, TAU_A],
                    TAU[np.asarray(varying)],
                    rng.normal(size=n_corr),
                    [CELL] if latent else [],
                ]
            )
        )
        results = [
            jax.jit(jax.value_and_grad(loglik), static_argnums=1)(x, hand)
            for hand in (True, False)
        ]
    (value, grad), (ref_value, ref_grad) = results
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-10)
    assert np.all(np.asarray(ref_grad)[: 2 + n_vary] != 0.0) == (pooling == "partial")


@pytest.mark.parametrize("latent", [False, True])
def test_blocks_of_groups_give_the_sums_of_one_block(latent, monkeypatch):
    # _blocked_group_sums over 2 blocks of 2 groups (the second padded with
    # a zero group) against the 3 groups in one block, value and gradient
    # (with the latent cell: also through the statistics), rtol 1e-12; and
    # the blocked gradient against jax.grad of the plain-JAX terms.
    data, hyper, _ = _problem(latent=latent)
    spec = general_spec("partial", (True, False, True), "full", 3)

    def loglik(x, hand_written):
        scales = {"sigma": x[0], "tau_a": x[1], "tau": x[2:4]}
        scales["corr_chol"] = CorrCholeskyTransform()(x[4:7])  # 3 effects
        cells = x[7:]
        return _general.general_loglik(spec, scales, data, hyper, cells, hand_written)

    rng = np.random.default_rng(7)
    results = {}
    with jax.enable_x64(True):
        x = jnp.asarray(
            np.concatenate(
                [[SIGMA, TAU_A], TAU[[0, 2]], rng.normal(size=3)]
                + ([[CELL]] if latent else [])
            )
        )
        monkeypatch.setattr(_limits, "GENERAL_BLOCK_MIN_BYTES", 0)
        for block_groups, hand in ((None, True), (2, True), (2, False)):
            monkeypatch.setattr(_limits, "BLOCK_GROUPS", block_groups)
            assert _general.uses_blocks(len(SIZES), 4) == (block_groups == 2)
            # a new function per setting: the limits are read when traced
            program = jax.jit(
                jax.value_and_grad(lambda x, h: loglik(x, h)), static_argnums=1
            )
            results[block_groups, hand] = program(x, hand)
    (value, grad), (ref_value, ref_grad) = results[None, True], results[2, True]
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-12)
    _, plain_grad = results[2, False]
    np.testing.assert_allclose(np.asarray(grad), np.asarray(plain_grad), rtol=1e-10)
    assert np.all(np.asarray(grad) != 0.0)


@pytest.mark.parametrize("pooling", ["partial", "none"])
def test_one_pass_gradient_equals_recomputation_and_jax_grad(pooling, monkeypatch):
    # _fixed_group_sums (constant statistics: value and gradient in one pass
    # over the blocks, the gradient from the summed pieces) against
    # _blocked_group_sums (the pass that recomputes each block, the path
    # with latent cells; given the same prepared blocks, as
    # benchmarks/group_blocks.py --one-pass) and against jax.grad of the
    # plain-JAX sums
    # (_groups), all with respect to inv and E: 5 random groups of 4
    # coefficients in blocks of 2 (the last padded), rtol 1e-10. Under no
    # pooling P has zero columns (the varying features').
    monkeypatch.setattr(_limits, "BLOCK_GROUPS", 2)
    monkeypatch.setattr(_limits, "GENERAL_BLOCK_MIN_BYTES", 0)
    rng = np.random.default_rng(11)
    q, n_groups = 4, 5
    assert _general.uses_blocks(n_groups, q)
    with jax.enable_x64(True):
        rows = rng.normal(size=(n_groups, 6, q))
        gram = jnp.asarray(np.einsum("gni,gnj->ijg", rows, rows))
        xty = jnp.asarray(rng.normal(size=(q, n_groups)))
        left = (
            jnp.eye(q).at[0, 1:].set(rng.normal(size=q - 1))
            if pooling == "partial"
            else jnp.diag(jnp.array([1.0, 0.0, 1.0, 0.0]))
        )
        factor = jnp.asarray(np.tril(rng.normal(size=(q, q))) * 0.4)
        unit, blocks = jnp.ones(()), _general._stat_blocks(gram, xty, one_pass=True)
        weights = rng.normal(size=(2, q, q + 1))

        def total(sums):
            # a random linear function of the four sums: every cotangent
            def f(inv, factor):
                logdet, aa, bb, ba = sums(inv, factor)
                return (
                    logdet
                    + 2.0 * aa
                    + jnp.sum(weights[0, :, :q] * bb)
                    + ba @ weights[1, :, q]
                )

            return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(1.7, factor)

        def plain(inv, factor):
            grp = _general._groups(inv, factor, left, gram, xty, unit)
            return _general._plain_sums(grp)

        one_pass = total(
            lambda i, f: _general._fixed_group_sums(i, f, left, blocks, unit)
        )
        recomputed = total(
            lambda i, f: _general._blocked_group_sums(
                False, i, f, left, gram, xty, unit, blocks
            )
        )
        reference = total(plain)
    for other in (recomputed, reference):
        np.testing.assert_allclose(float(one_pass[0]), float(other[0]), rtol=1e-10)
        for got, want in zip(one_pass[1], other[1], strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10)
    assert np.all(np.asarray(one_pass[1][1])[np.tril_indices(q)] != 0.0)


@pytest.mark.parametrize("latent", [False, True])
def test_density_in_blocks_equals_one_block(latent, monkeypatch):
    # general_density in blocks of 2 groups against one block, value and
    # gradient at a random point: rtol 1e-12 and 1e-10 (sums in another
    # order; with the latent cell the gradient differed by 1.4e-12).
    # Without latent cells the density puts the statistics in blocks once,
    # outside the gradient (_stat_blocks); with one, at each evaluation
    # (_blocked_group_sums). Either way a block's Gram matrices are packed.
    data, hyper, _ = _problem(latent=latent)
    spec = general_spec("partial", (True, False, True), "full", 3)
    monkeypatch.setattr(_limits, "GENERAL_BLOCK_MIN_BYTES", 0)
    results = []
    with jax.enable_x64(True):
        for block_groups in (None, 2):
            monkeypatch.setattr(_limits, "BLOCK_GROUPS", block_groups)
            assert _general.uses_blocks(len(SIZES), 4) == (block_groups == 2)
            density = _general.general_density(spec, data, hyper)
            z = jnp.asarray(np.random.default_rng(3).normal(size=density.size)) * 0.5
            results.append(jax.jit(jax.value_and_grad(density.potential))(z))
    (value, grad), (ref_value, ref_grad) = results
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-10)
    assert np.all(np.asarray(grad) != 0.0)


def test_lkj_term_equals_closed_form():
    # For a 2 x 2 correlation, LKJ(eta) has density prop. to (1 - r^2)^(eta -
    # 1) and CorrCholeskyTransform maps z to r = tanh(z), dr/dz = 1 - r^2: in
    # z the log density is eta log(1 - tanh(z)^2) up to a constant.
    zs = np.array([-1.3, 0.2, 0.9])
    with jax.enable_x64(True):
        for eta in (0.7, 2.0, 5.0):
            got = [float(_general.lkj_log_density(jnp.array([z]), eta, 2)) for z in zs]
            want = eta * np.log(1.0 - np.tanh(zs) ** 2)
            np.testing.assert_allclose(np.diff(got), np.diff(want), rtol=1e-12)


def _oracle_log_density(values, engine, data, hyper, rows):
    # The log posterior density of the sampled sites on the unconstrained
    # space from numpyro's distributions and the dense marginal; softplus
    # transforms of the positive sites as the engine documents.
    q_v = 1 + sum(engine.varying)
    logp = 0.0
    for name in ("noise", "intercept_scale", "coef_scale"):
        z = np.atleast_1d(values[name])
        x = np.log1p(np.exp(z))
        scale = {
            "noise": hyper.noise,
            "intercept_scale": hyper.group_intercept,
            "coef_scale": np.asarray(hyper.group_coef)[np.asarray(engine.varying)],
        }[name]
        logp += float(jnp.sum(dist.HalfNormal(scale).log_prob(x)))
        logp += float(np.sum(-np.log1p(np.exp(-z))))  # log sigmoid
    zc = jnp.asarray(values["group_correlation"])
    chol = CorrCholeskyTransform()(zc)
    logp += float(dist.LKJCholesky(q_v, hyper.lkj).log_prob(chol))
    logp += float(CorrCholeskyTransform().log_abs_det_jacobian(zc, chol))
    return logp, np.asarray(chol @ chol.T)


def test_full_density_equals_numpyro_pieces():
    # The density of the flat vector (no latent cells): the dense marginal
    # plus numpyro's HalfNormal priors, LKJCholesky and CorrCholeskyTransform
    # log-Jacobian, at two points (constants cancel in the difference);
    # constrain reports coef_scale 0.0 for the non-varying feature and the
    # correlation matrix.
    data, hyper, rows = _problem(latent=False)
    engine = CollapsedEngine("partial", varying=[True, False, True], covariance="full")
    assert engine.general and hash(engine) == hash(
        CollapsedEngine("partial", (True, False, True), "full")
    )
    assert engine.conditional_sites[-1] == "group_correlation"
    with jax.enable_x64(True):
        hyper = hyper._replace(lkj=jnp.asarray(1.7))
        density = engine.density(data, hyper)
        assert density.size == 1 + 1 + 2 + 3
        diffs = []
        for seed in (1, 2):
            z = np.random.default_rng(seed).normal(size=density.size)
            values = {
                "noise": z[0],
                "intercept_scale": z[1],
                "coef_scale": z[2:4],
                "group_correlation": z[4:],
            }
            logp, omega = _oracle_log_density(values, engine, data, hyper, rows)
            sigma = np.log1p(np.exp(z[0]))
            sd = np.log1p(np.exp(z[1:4]))
            site = density.constrain(jnp.asarray(z))
            np.testing.assert_allclose(site["coef_scale"], [sd[1], 0.0, sd[2]])
            assert site["coef_scale"][1] == 0.0
            np.testing.assert_allclose(site["group_correlation"], omega, rtol=1e-12)
            tau = np.array([sd[1], 1.0, sd[2]])
            mean, cov = _dense(
                "partial",
                engine.varying,
                omega,
                data,
                hyper,
                rows,
                sigma,
                tau_a=sd[0],
                tau=tau,
            )
            logp += multivariate_normal(mean, cov).logpdf(rows["u"])
            logp += _weight_term(rows["w"], sigma)
            diffs.append((-float(density.potential(jnp.asarray(z))), logp))
    (a1, b1), (a2, b2) = diffs
    np.testing.assert_allclose(a1 - a2, b1 - b2, rtol=1e-9)


def _closed_form_conditional(pooling, varying, omega, data, hyper, rows):
    # Posterior mean and covariance of every theta_g given u at fixed scales.
    m_u, J, m_t, T = _latent_map(pooling, varying, omega, data, hyper, rows)
    c_uu = J @ J.T + np.diag(SIGMA**2 / rows["w"])
    gain = np.linalg.solve(c_uu, J)  # C_uu^-1 J
    resid = rows["u"] - m_u
    mean = m_t + np.einsum("gil,l->gi", T, J.T @ np.linalg.solve(c_uu, resid))
    cov = np.einsum("gil,gjl->gij", T, T) - np.einsum(
        "gil,lm,gjm->gij", T, J.T @ gain, T
    )
    return mean, cov


@pytest.mark.parametrize(
    ("pooling", "varying", "covariance"),
    [
        ("partial", (True, False, True), "full"),
        ("partial", (False, True, False), "diagonal"),
        ("none", (True, False, True), "diagonal"),
    ],
)
def test_conditional_draws_match_closed_form(pooling, varying, covariance):
    # At fixed scales (every posterior draw the same) the draws of theta_g
    # follow the Gaussian conditional: means within 5 Monte Carlo standard
    # errors, covariances within 5 standard errors of a Gaussian sample
    # covariance (sqrt((s_ii s_jj + s_ij^2) / D)); the Rao-Blackwellized
    # moments likewise. Non-varying slopes are the same in every group where
    # they apply and exactly 0 where off.
    data, hyper, rows = _problem(latent=False)
    engine = CollapsedEngine(pooling, varying=varying, covariance=covariance)
    spec = general_spec(pooling, varying, covariance, 3)
    omega = _correlation(1 + sum(varying)) if spec.full else None
    n_draws = 4000
    draws = {"noise": jnp.full(n_draws, SIGMA)}
    if pooling == "partial":
        draws["intercept_scale"] = jnp.full(n_draws, TAU_A)
        draws["coef_scale"] = jnp.broadcast_to(
            jnp.asarray(TAU * np.asarray(varying)), (n_draws, 3)
        )
        if spec.full:
            draws["group_correlation"] = jnp.broadcast_to(
                jnp.asarray(omega), (n_draws, *omega.shape)
            )
    with jax.enable_x64(True):
        out, rb_mean, rb_cov = engine.conditional(
            np.array([0, 7], np.uint32), draws, data, hyper, chunk=1000
        )
    coef = np.asarray(out["group_coef_internal"])
    mean, cov = _closed_form_conditional(pooling, varying, omega, data, hyper, rows)
    on = np.asarray(data.on) > 0
    onq = np.concatenate([np.ones((3, 1), bool), on], axis=1)
    sd = np.sqrt(np.einsum("gii->gi", cov))
    se_mean = sd / np.sqrt(n_draws)
    np.testing.assert_array_less(np.abs(coef.mean(0) - mean), 5 * se_mean + 1e-12)
    emp = np.einsum("dgi,dgj->gij", coef - coef.mean(0), coef - coef.mean(0)) / n_draws
    se_cov = np.sqrt((sd[:, :, None] ** 2 * sd[:, None, :] ** 2 + cov**2) / n_draws)
    np.testing.assert_array_less(np.abs(emp - cov), 5 * se_cov + 1e-12)
    np.testing.assert_array_less(
        np.abs(np.asarray(rb_mean) - mean), 5 * se_mean + 1e-12
    )
    np.testing.assert_array_less(np.abs(np.asarray(rb_cov) - cov), 5 * se_cov + 1e-12)
    # off: exactly 0; non-varying: one value shared by the groups
    assert np.all(coef[:, ~onq] == 0.0)
    for j in np.flatnonzero(~np.asarray(varying)):
        shared = coef[:, on[:, j], 1 + j]
        assert np.all(shared == shared[:, :1])
    if pooling == "partial":
        assert out["coef_mean"].shape == (n_draws, 3)


def test_conditional_draws_in_parts_match_one_run():
    # two parts, each starting at a whole chunk, give the draws of one run;
    # padding draws (beyond n_valid) are left out of the moments
    data, hyper, _ = _problem()
    spec = general_spec("partial", (True, False, True), "full", 3)
    rng = np.random.default_rng(3)
    n_draws = 12
    draws = {
        "noise": rng.uniform(0.5, 1.0, n_draws),
        "intercept_scale": rng.uniform(0.5, 1.0, n_draws),
        "coef_scale": rng.uniform(0.5, 1.0, (n_draws, 3)) * [1, 0, 1],
        "group_correlation": np.broadcast_to(_correlation(3), (n_draws, 3, 3)),
        "x_missing": rng.normal(size=(n_draws, 1)),
    }
    key = np.array([0, 3], np.uint32)
    with jax.enable_x64(True):
        whole, _, _ = general_conditional(spec, key, draws, data, hyper, chunk=3)
        first = {k: v[:6] for k, v in draws.items()}
        second = {k: v[6:] for k, v in draws.items()}
        a, mean_a, _ = general_conditional(spec, key, first, data, hyper, chunk=3)
        b, _, _ = general_conditional(
            spec, key, second, data, hyper, chunk=3, first_chunk=2
        )
        padded = {k: np.concatenate([v[:4], v[:2]]) for k, v in draws.items()}
        four = {k: v[:4] for k, v in draws.items()}
        _, mean_p, cov_p = general_conditional(
            spec, key, padded, data, hyper, chunk=3, n_valid=4
        )
        _, mean_4, cov_4 = general_conditional(spec, key, four, data, hyper, chunk=3)
    for name, value in whole.items():
        np.testing.assert_array_equal(value, np.concatenate([a[name], b[name]]))
    assert not np.allclose(mean_a, mean_p)
    np.testing.assert_allclose(mean_p, mean_4, rtol=1e-12)
    np.testing.assert_allclose(cov_p, cov_4, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    ("unroll", "unroll_population"), [(24, 12), (2, 12), (24, 2), (2, 2)]
)
def test_unroll_limits(unroll, unroll_population, monkeypatch):
    # Both sides of UNROLL_MAX_SIZE (the groups' 4 x 4 matrices) and of
    # UNROLL_MAX_SIZE_POPULATION (the population's): unrolled code and
    # LAPACK agree on the value and gradient (rtol 1e-10) and the dense
    # oracle holds.
    data, hyper, rows = _problem()
    spec = general_spec("partial", (True, False, True), "full", 3)

    def loglik(x, program=general_loglik):
        values = {
            "sigma": x[0],
            "tau_a": x[1],
            "tau": x[2:4],
            "corr_chol": jnp.asarray(np.linalg.cholesky(_correlation(3))),
        }
        return program(spec, values, data, hyper, x[4:])

    with jax.enable_x64(True):
        x = jnp.array([SIGMA, TAU_A, TAU[0], TAU[2], CELL])
        reference = loglik(x), jax.grad(loglik)(x)
        monkeypatch.setattr(_limits, "UNROLL_MAX_SIZE", unroll)
        monkeypatch.setattr(_limits, "UNROLL_MAX_SIZE_POPULATION", unroll_population)
        assert _general.col.is_unrolled(4) == (unroll >= 4)
        # traced anew under the patched limits: the module's jitted function
        # would reuse the program traced above with the default ones
        patched = functools.partial(
            loglik,
            program=jax.jit(
                functools.partial(_general.general_loglik), static_argnums=0
            ),
        )
        value, grad = patched(x), jax.grad(patched)(x)
    np.testing.assert_allclose(float(value), float(reference[0]), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(reference[1]), rtol=1e-10)
    mean, cov = _dense("partial", spec.varying, _correlation(3), data, hyper, rows)
    expected = multivariate_normal(mean, cov).logpdf(rows["u"]) + _weight_term(
        rows["w"]
    )
    np.testing.assert_allclose(float(value), expected, rtol=1e-10)


def test_dispatch_keeps_todays_model():
    # today's model (all varying and diagonal, or complete pooling, or no
    # pooling with every feature varying) runs the hand-written code
    assert not CollapsedEngine("partial").general
    assert not CollapsedEngine("partial", (True, True), "diagonal").general
    assert not CollapsedEngine("none", None, "full").general
    assert not CollapsedEngine("complete", (False, False), "full").general
    assert CollapsedEngine("partial", (True, False)).general
    assert CollapsedEngine("none", (True, False)).general
    assert CollapsedEngine("partial", None, "full").general
    with pytest.raises(ValueError, match="covariance"):
        _ = CollapsedEngine("partial", None, "Full").general
    with pytest.raises(ValueError, match="entries"):
        general_spec("partial", (True,), "full", 3)
