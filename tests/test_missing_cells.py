"""Latent cells in the collapsed engine (issue 17, "Missing cells").

Two exact rewrites, each against the computation it replaces:

- the statistics of the rows holding latent cells are added to the complete
  rows' prepared statistics in each evaluation (``_collapsed.split_prepared``,
  ``row_statistics``) instead of preparing every group's statistics again:
  checked against the statistics of all rows prepared from scratch (the
  former ``add_incomplete_rows`` + ``_prepare``, written out here);
- ``x_loc`` is integrated out of the imputation model
  (``_collapsed.imputation_loglik``): checked against the former density
  with ``x_loc`` sampled, integrated over ``x_loc`` exactly (it is Gaussian
  in ``x_loc``), and with unit weights against the normal density of each
  pair's cells with covariance ``s^2 I + L^2 11'`` (SciPy); its conditional
  (``loc_moments``) against quadrature on a grid.

The direct engine, which still samples ``x_loc`` and every row, is the
reference of whole fits (``tests/test_engines.py::test_collapsed_matches_direct``
with missing cells, and the imputed moments below).
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from scipy.stats import multivariate_normal

from hiermask import _collapsed as col
from hiermask import _fit, _general, _limits
from hiermask._model import IMPUTE_LOC_SCALE
from hiermask._stats import compute_scaling

from ._fitted import engine_data


def _problem(weights=True):
    # 7 groups of 5-12 rows, 3 features: c off in group 1, a off in group 4;
    # 6 latent cells in 5 rows (two in one row, two in one group and
    # feature), in two features.
    rng = np.random.default_rng(5)
    sizes = [5, 9, 12, 7, 8, 10, 6]
    group_idx = np.repeat(np.arange(len(sizes)), sizes)
    n = group_idx.size
    X = rng.normal(size=(n, 3)) * [1.0, 2.0, 0.5] + [0.5, -1.0, 3.0]
    y = X @ [1.0, -0.5, 2.0] + rng.normal(size=len(sizes))[group_idx]
    y = y + rng.normal(0, 0.7, size=n)
    mask = np.ones((len(sizes), 3), bool)
    mask[1, 2] = mask[4, 0] = False
    X[~mask[group_idx]] = np.nan
    X[[0, 0, 2, 20, 50, 51], [1, 2, 1, 1, 2, 2]] = np.nan
    w = rng.uniform(0.5, 2.0, size=n) if weights else np.ones(n)
    data, hyper, scaling = engine_data(X, y, w, group_idx, mask)
    assert data.miss_row.shape[0] == 6 and data.inc_group.shape[0] == 5
    design = np.where(mask[group_idx], (X - scaling.x_mean) / scaling.x_scale, 0.0)
    return data, hyper, (design, group_idx, w, mask)


def _as_jax(tree):
    return jax.tree_util.tree_map(jnp.asarray, tree)


def _all_rows(data, cells):
    # The former add_incomplete_rows: every group's statistics with the rows
    # holding latent cells added, given their cells.
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


CELLS = np.array([0.4, -1.1, 0.7, 1.9, -0.3, 0.05])


@pytest.mark.parametrize("block_groups", [None, 3])
@pytest.mark.parametrize("pooling", ["partial", "none", "complete"])
def test_rows_added_to_prepared_statistics_equal_all_rows_prepared(
    pooling, block_groups, monkeypatch
):
    # The fixed statistics plus the incomplete rows' outer products, in one
    # block and in blocks of 3 (7 groups: a ragged last block), equal the
    # statistics of all rows prepared and blocked from scratch; rtol 1e-12
    # (sums in another order).
    monkeypatch.setattr(_limits, "BLOCK_GROUPS", block_groups)
    data, _, _ = _problem()
    with jax.enable_x64(True):
        data = _as_jax(data)
        cells = jnp.asarray(CELLS)
        want = col._prepare(pooling, data, _all_rows(data, cells))
        want_blocks = col._group_blocks(want, data.on)
        fixed = col._fixed_stats(pooling, data)
        got, got_blocks = col._prepared_stats(pooling, data, fixed, cells)
        if pooling != "complete":
            # the general model's layout (groups last, unblocked)
            spec = _general.general_spec(pooling, (True, False, True), "full", 3)
            general = _general._statistics(spec, data, cells)
        else:
            general = None
        want, want_blocks, got, got_blocks, general = jax.tree_util.tree_map(
            np.asarray, (want, want_blocks, got, got_blocks, general)
        )

    def close(a, b):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)

    close(np.sum(got.n), np.sum(want.n))
    close(np.sum(got.yty), np.sum(want.yty))
    if pooling == "complete":
        close(got.pop_gram, want.pop_gram)
        close(got.pop_xty, want.pop_xty)
    else:
        close(got_blocks.gram, want_blocks.gram)
        close(got_blocks.xty, want_blocks.xty)
        for a, b in zip(
            general, (want.n, want.yty, want.dev_gram, want.dev_xty), strict=True
        ):
            close(a, b)


@pytest.mark.parametrize("pooling", ["partial", "none"])
def test_general_unit_is_not_batched_with_the_cells(pooling):
    # The general model's unit of materialize (_general._stats_unit) comes
    # from statistics the latent cells leave alone: under the sampler's vmap
    # it stays one scalar (out_axes=None fails if it depends on the mapped
    # cells); a unit batched with the chains made the gradient 5.5 times
    # slower (docs/performance.md, "Latent cells"). It is 1.0.
    data, _, _ = _problem()
    spec = _general.general_spec(pooling, (True, False, True), "full", 3)
    with jax.enable_x64(True):
        data = _as_jax(data)

        def unit(cells):
            return _general._stats_unit(data, _general._statistics(spec, data, cells))

        cells = jnp.stack([jnp.asarray(CELLS), 2.0 * jnp.asarray(CELLS)])
        got = jax.vmap(unit, out_axes=None)(cells)
    assert float(got) == 1.0


def _sampled_loc_loglik(data, loc, scale, cells):
    # The former density: x_loc sampled with its Normal(0, L) prior, the
    # observed cells' factor and the latent cells' prior of direct_model.
    quad = data.x_sumsq - 2.0 * loc * data.x_sum + data.x_count * loc**2
    observed = jnp.sum(
        -0.5 * data.x_count * jnp.log(2.0 * jnp.pi * scale**2) - 0.5 * quad / scale**2
    )
    miss_group = data.inc_group[data.miss_row]
    latent = dist.Normal(loc[miss_group, data.miss_slot], scale[data.miss_slot])
    prior = dist.Normal(0.0, IMPUTE_LOC_SCALE).log_prob(loc)
    return observed + jnp.sum(latent.log_prob(cells)) + jnp.sum(prior)


def _integrated_over_loc(data, scale, cells):
    # The former density integrated over x_loc exactly: it is a sum over
    # (group, column) of quadratics in each loc, so the integral is the
    # value at the maximum plus log sqrt(2 pi / curvature) per pair.
    def f(loc):
        return _sampled_loc_loglik(data, loc, scale, cells)

    start = jnp.zeros(data.x_count.shape)
    grad = jax.grad(f)(start)
    curv = jax.grad(lambda loc: jnp.sum(jax.grad(f)(loc)))(start)  # diagonal
    top = start - grad / curv
    return f(top) + jnp.sum(0.5 * jnp.log(2.0 * jnp.pi / -curv))


def test_imputation_loglik_is_the_sampled_loc_integrated_out():
    # Value and gradient (in the scales and the latent cells), weighted
    # observed cells; rtol 1e-10 in float64.
    data, _, _ = _problem()
    scale = np.array([0.7, 1.3])
    with jax.enable_x64(True):
        data = _as_jax(data)

        def new(x):
            return col.imputation_loglik(data, x[:2], x[2:])

        def old(x):
            return _integrated_over_loc(data, x[:2], x[2:])

        x = jnp.asarray(np.concatenate([scale, CELLS]))
        got, want = jax.jit(jax.value_and_grad(new))(x), jax.value_and_grad(old)(x)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-10)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-10, atol=1e-12)


def test_imputation_loglik_is_the_pairs_compound_symmetric_normal():
    # Unit weights: each (group, imputed column)'s cells, observed and latent,
    # are jointly normal with covariance s^2 I + L^2 11' (SciPy); rtol 1e-10.
    data, _, (design, group_idx, _, mask) = _problem(weights=False)
    scale = np.array([0.7, 1.3])
    cols = np.asarray(data.impute_cols)
    latent_group = np.asarray(data.inc_group)[np.asarray(data.miss_row)]
    want = 0.0
    for g in range(mask.shape[0]):
        for slot, j in enumerate(cols):
            rows = group_idx == g
            # NaN at the latent cells
            observed = design[rows, j][np.isfinite(design[rows, j])]
            if not mask[g, j]:
                observed = observed[:0]
            here = (latent_group == g) & (np.asarray(data.miss_slot) == slot)
            x = np.concatenate([observed, CELLS[here]])
            if x.size:
                cov = scale[slot] ** 2 * np.eye(x.size) + IMPUTE_LOC_SCALE**2
                want += multivariate_normal(np.zeros(x.size), cov).logpdf(x)
    with jax.enable_x64(True):
        got = col.imputation_loglik(_as_jax(data), jnp.asarray(scale), CELLS)
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_loc_moments_are_the_conditional_mixture():
    # The posterior mean and variance of x_loc over three draws of (scale,
    # cells): the mixture of the exact conditionals, against quadrature of
    # the former density on a grid over each loc (1e-8 relative).
    data, _, _ = _problem()
    rng = np.random.default_rng(0)
    scales = rng.uniform(0.5, 1.5, (3, 2))
    cells = rng.normal(size=(3, 6))
    mean, var = col.loc_moments(data, scales, cells, chunk=2)
    grid = np.linspace(-20.0, 20.0, 80_001)  # +-10 prior sds
    means, seconds = [], []
    with jax.enable_x64(True):
        jdata = _as_jax(data)
        for s, c in zip(scales, cells, strict=True):
            # (grid, G, P): each pair's terms at each loc
            one = np.asarray(
                jax.vmap(lambda v, s=s, c=c: _pairwise(jdata, v, s, c))(
                    jnp.asarray(grid)
                )
            )
            weight = np.exp(one - one.max(axis=0))
            weight /= weight.sum(axis=0)
            m = np.einsum("k,kgp->gp", grid, weight)
            means.append(m)
            seconds.append(np.einsum("k,kgp->gp", grid**2, weight))
    want_mean = np.mean(means, axis=0)
    want_var = np.mean(seconds, axis=0) - want_mean**2
    np.testing.assert_allclose(mean, want_mean, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(var, want_var, rtol=1e-8)


def _pairwise(data, v, scale, cells):
    # The former density's terms of each pair at loc = v (every pair at the
    # same value): (G, P).
    loc = jnp.full(data.x_count.shape, v)
    quad = data.x_sumsq - 2.0 * loc * data.x_sum + data.x_count * loc**2
    observed = -0.5 * data.x_count * jnp.log(scale**2) - 0.5 * quad / scale**2
    miss_group = data.inc_group[data.miss_row]
    latent = dist.Normal(v, scale[data.miss_slot]).log_prob(cells)
    n_groups, n_cols = data.x_count.shape
    pair = miss_group * n_cols + data.miss_slot
    latent = jax.ops.segment_sum(latent, pair, num_segments=n_groups * n_cols)
    prior = dist.Normal(0.0, IMPUTE_LOC_SCALE).log_prob(v)
    return observed + latent.reshape(n_groups, n_cols) + prior


def test_imputed_moments_from_loc_moments_equal_those_of_its_draws():
    # _fit._impute_moments in data units: from loc_moments (x_loc integrated
    # out) and from draws of x_loc (the direct engine's way), here 20,000
    # draws from its exact conditional given each of three (scale, cells)
    # draws. Means within 5 Monte Carlo standard errors, variances within 5
    # of their relative standard error sqrt(2 / n).
    data, _, (design, group_idx, w, mask) = _problem()
    rng = np.random.default_rng(1)
    scales = rng.uniform(0.5, 1.5, (3, 2))
    cells = rng.normal(size=(3, 6))
    n_loc = 20_000
    lam = IMPUTE_LOC_SCALE**2
    locs = []
    with jax.enable_x64(True):
        count, total, _ = (np.asarray(a) for a in col.cell_sums(_as_jax(data), cells))
    for d in range(3):
        denom = count[d] + scales[d] ** 2 / lam
        eps = rng.normal(size=(n_loc, *count[d].shape))
        locs.append(total[d] / denom + np.sqrt(scales[d] ** 2 / denom) * eps)
    sampled = {
        "x_loc": np.concatenate(locs),
        "x_scale": np.repeat(scales, n_loc, axis=0),
    }
    integrated = {"x_scale": scales}
    X = design  # any rows: only the observed cells' moments are read
    scaling = compute_scaling(X, np.zeros(len(w)), w, mask[group_idx])
    moments = _fit.cell_moments(X, w, group_idx, mask.shape[0])
    cols = np.asarray(data.impute_cols)
    want = _fit._impute_moments(sampled, cols, moments, mask, scaling)
    loc = col.loc_moments(data, scales, cells)
    got = _fit._impute_moments(integrated, cols, moments, mask, scaling, loc)
    n = 3 * n_loc
    sd = sampled["x_loc"].std(axis=0) * scaling.x_scale[cols]  # x_loc's, data units
    assert np.all(np.abs(got[0][:, cols] - want[0][:, cols]) < 5 * sd / np.sqrt(n))
    rtol = 5 * np.sqrt(2 / n)
    np.testing.assert_allclose(got[1][:, cols], want[1][:, cols], rtol=rtol)
    # the other columns and the population's moments do not involve x_loc
    others = np.setdiff1d(np.arange(mask.shape[1]), cols)
    np.testing.assert_array_equal(got[0][:, others], want[0][:, others])
    for a, b in zip(got[2:], want[2:], strict=True):
        np.testing.assert_array_equal(a, b)
