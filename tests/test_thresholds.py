"""Every size threshold of :mod:`hiermask._limits`, on both sides, through fit.

Each threshold switches between two code paths that compute the same
posterior. Each test fits (and predicts, summarizes, pickles) on both sides
of one threshold, lowered where its natural value needs large data, and
checks the fit against an oracle that does not depend on the path: per-group
least squares on data with little noise (posterior sd ~0.01, tolerance 0.05),
or, where the path only reorders exact arithmetic, the other side's result.
A test first asserts that each side really takes its path (for example that
the data make several blocks), so that a future threshold change cannot turn
a both-sides test into a one-side one unseen. The compile caches key on
``_limits.current()``, so a lowered value builds its own programs.

The fits with 12 or more features reproduce the crash of issue 12 (the
conditional draws' LAPACK wrapper dropped keyword arguments).
"""

import pickle

import numpy as np
import pandas as pd
import pytest

from hiermask import (
    MaskedHierarchicalRegressor,
    _collapsed,
    _fit,
    _general,
    _limits,
    _masks,
    _stats,
)

#: Small runs: the posterior here is narrow, so 2 x 100 draws suffice.
TINY = {"num_warmup": 100, "num_samples": 100, "num_chains": 2, "random_state": 0}

#: Tolerance of a posterior mean against per-group least squares: the
#: posterior sd is about 0.1 / sqrt(rows per group) <= 0.015, prior
#: shrinkage is negligible at that precision, 0.05 is > 3 sds.
OLS_ATOL = 0.05


def _data(n_groups, n_features, rows_per_group=60, seed=0):
    rng = np.random.default_rng(seed)
    n = n_groups * rows_per_group
    X = rng.normal(size=(n, n_features))
    groups = np.repeat(np.arange(n_groups), rows_per_group)
    coef = rng.normal(size=(n_groups, n_features))
    intercept = rng.normal(size=n_groups)
    y = intercept[groups] + np.einsum("ij,ij->i", X, coef[groups])
    y = y + 0.1 * rng.normal(size=n)
    return X, y, groups


def _ols(X, y, groups):
    # Per-group least squares with an intercept: (n_groups, 1 + n_features).
    out = []
    for g in np.unique(groups):
        rows = groups == g
        design = np.column_stack([np.ones(rows.sum()), X[rows]])
        out.append(np.linalg.lstsq(design, y[rows], rcond=None)[0])
    return np.array(out)


def _fit_and_check(X, y, groups, **params):
    """Fit, predict, summarize and pickle; check the fit against per-group OLS."""
    est = MaskedHierarchicalRegressor(
        on_bad_convergence="ignore", **{**TINY, **params}
    ).fit(X, y, groups=groups)
    ols = _ols(X, y, groups)
    np.testing.assert_allclose(est.intercept_, ols[:, 0], atol=OLS_ATOL)
    np.testing.assert_allclose(est.coef_, ols[:, 1:], atol=OLS_ATOL)
    mean, sd = est.predict(X, groups=groups, return_std=True)
    np.testing.assert_allclose(
        mean, est.intercept_[groups] + np.einsum("ij,ij->i", X, est.coef_[groups])
    )
    assert np.all(sd > 0.05) and np.all(sd < 0.2)  # noise sd 0.1
    assert len(est.summary()) > 0
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(
        again.predict(X, groups=groups, return_std=True)[0], mean
    )
    np.testing.assert_array_equal(
        again.predict(X, groups=groups), est.predict(X, groups=groups)
    )
    return est


@pytest.mark.parametrize("n_features", [11, 12])
def test_population_unroll_limit(n_features):
    # The population's matrix has size n_features + 1: 12 (unrolled) and
    # 13 (LAPACK, and the conditional draws run under the LAPACK lock).
    size = n_features + 1
    assert (size <= _limits.UNROLL_MAX_SIZE_POPULATION) == (n_features == 11)
    _fit_and_check(*_data(3, n_features, rows_per_group=80))


@pytest.mark.parametrize("n_features", [3, 4])
def test_group_unroll_limit(n_features, monkeypatch):
    # Groups' matrices of size 4 unrolled, of size 5 through LAPACK.
    monkeypatch.setattr(_limits, "UNROLL_MAX_SIZE", 4)
    assert _collapsed.is_unrolled(n_features + 1) == (n_features == 3)
    _fit_and_check(*_data(4, n_features))


# The blocks of groups: the diagonal model's density (_collapsed) and the
# general one's groups' terms (_general._blocked_group_sums) use the same
# blocking, the general one with its own GENERAL_BLOCK_BYTES and only above
# GENERAL_BLOCK_MIN_BYTES (0 here).
@pytest.mark.parametrize("covariance", ["diagonal", "full"])
@pytest.mark.parametrize("n_groups", [8, 20])
def test_block_bytes(n_groups, covariance, monkeypatch):
    # BLOCK_BYTES = 1 gives the smallest block, 8 groups: 8 groups make one
    # block, 20 groups several (the last one padded).
    monkeypatch.setattr(_limits, "BLOCK_BYTES", 1)
    monkeypatch.setattr(_limits, "GENERAL_BLOCK_BYTES", 1)
    monkeypatch.setattr(_limits, "GENERAL_BLOCK_MIN_BYTES", 0)
    blocking = _general._blocking if covariance == "full" else _collapsed._blocking
    size, n_blocks = blocking(n_groups, 3)
    assert (n_blocks > 1) == (n_groups == 20) and size * n_blocks >= n_groups
    _fit_and_check(*_data(n_groups, 2, rows_per_group=40), group_covariance=covariance)


@pytest.mark.parametrize("covariance", ["diagonal", "full"])
@pytest.mark.parametrize("block_groups", [None, 3])
def test_block_groups_override(block_groups, covariance, monkeypatch):
    monkeypatch.setattr(_limits, "BLOCK_GROUPS", block_groups)
    monkeypatch.setattr(_limits, "GENERAL_BLOCK_MIN_BYTES", 0)
    assert (_collapsed._blocking(7, 3)[1] > 1) == (block_groups == 3)
    _fit_and_check(*_data(7, 2, rows_per_group=40), group_covariance=covariance)


@pytest.mark.parametrize("above", [False, True])
def test_general_block_min_bytes(above, monkeypatch):
    # 7 groups x 3 coefficients: one 3 x 3 matrix per group is 504 bytes; in
    # blocks of 3 groups when the limit is below that, else all at once.
    monkeypatch.setattr(_limits, "BLOCK_GROUPS", 3)
    monkeypatch.setattr(_limits, "GENERAL_BLOCK_MIN_BYTES", 504 - above)
    assert _general.uses_blocks(7, 3) == above
    _fit_and_check(*_data(7, 2, rows_per_group=40), group_covariance="full")


@pytest.mark.parametrize("keep_bytes", [0, _limits.KEEP_FACTORS_BYTES])
def test_keep_factors(keep_bytes, monkeypatch):
    # 0: the gradient's pass factorizes each block again; default: kept.
    monkeypatch.setattr(_limits, "BLOCK_GROUPS", 3)
    monkeypatch.setattr(_limits, "KEEP_FACTORS_BYTES", keep_bytes)
    _fit_and_check(*_data(7, 2, rows_per_group=40))


@pytest.mark.parametrize("chunk_draws", [None, 60])
def test_conditional_chunks_and_parts(chunk_draws, monkeypatch):
    # Default: all 200 draws in one chunk, one part. 60 draws per chunk:
    # 4 chunks (60, 60, 60, 20) in two parts of 120 draws, the second padded.
    n_groups, q = 3, 3
    if chunk_draws is not None:
        monkeypatch.setattr(
            _limits, "CONDITIONAL_CHUNK_FLOATS", chunk_draws * n_groups * q * q
        )
    chunk, length, parts = _fit._conditional_parts(200, n_groups, q)
    assert (len(parts) == 2) == (chunk_draws is not None)
    if chunk_draws is not None:
        assert (chunk, length) == (60, 120) and parts[1][:2] == (120, 200)
    _fit_and_check(*_data(n_groups, q - 1))


@pytest.mark.parametrize("tile_factor", [_limits.CONDITIONAL_TILE_FACTOR, 10**9])
def test_conditional_tiles(tile_factor, monkeypatch):
    default = _limits.CONDITIONAL_TILE_FACTOR
    # With the smallest blocks (BLOCK_BYTES = 1) a chunk of 200 draws by 20
    # groups is split into many tiles at the default factor, one tile at a
    # huge one.
    monkeypatch.setattr(_limits, "BLOCK_BYTES", 1)
    monkeypatch.setattr(_limits, "CONDITIONAL_TILE_FACTOR", tile_factor)
    n_tiles = _collapsed._draw_tiling(200, 20, 3)[1]
    assert (n_tiles > 1) == (tile_factor == default)
    _fit_and_check(*_data(20, 2, rows_per_group=40))


@pytest.mark.parametrize("lockstep_max", [0, _limits.LOCKSTEP_MAX_DATA])
def test_lockstep_pairs(lockstep_max, monkeypatch):
    # 0: one chain per compiled program; default: pairs of chains in
    # lockstep (the data here are small).
    monkeypatch.setattr(_limits, "LOCKSTEP_MAX_DATA", lockstep_max)
    _fit_and_check(*_data(3, 2))


@pytest.mark.parametrize("leaf_block", [2, _limits.LEAF_BLOCK])
def test_leaf_block(leaf_block, monkeypatch):
    # Blocks of 2 leaves: nearly every trajectory draws further blocks.
    monkeypatch.setattr(_limits, "LEAF_BLOCK", leaf_block)
    _fit_and_check(*_data(3, 2))


@pytest.mark.parametrize("dense_max", [0, _limits.DENSE_METRIC_MAX_SIZE])
def test_dense_metric_size(dense_max, monkeypatch):
    # group_covariance="full" with 2 varying features: a flat vector of 7
    # coordinates (noise, 3 scales, 3 correlations), under the default limit
    # a dense warmup metric, at 0 a diagonal one.
    from hiermask import _general, _runner

    monkeypatch.setattr(_limits, "DENSE_METRIC_MAX_SIZE", dense_max)
    # an empty compile cache: an earlier test's program of this shape would
    # skip the tracing that the spy watches
    monkeypatch.setattr(_runner, "_CACHE", _runner._ProgramCache(16))
    built = []
    real = _general.general_density

    def spy(*args, **kwargs):
        density = real(*args, **kwargs)
        built.append((density.size, density.dense_metric))
        return density

    monkeypatch.setattr(_general, "general_density", spy)
    _fit_and_check(*_data(7, 2), group_covariance="full", varying="all")
    assert built, "the fit reused a program: the spy saw no density"
    assert {b[0] for b in built} == {7}
    assert {b[1] for b in built} == {dense_max >= 7}


@pytest.fixture(scope="module")
def fitted():
    X, y, groups = _data(3, 2, rows_per_group=10)
    est = MaskedHierarchicalRegressor(on_bad_convergence="ignore", **TINY).fit(
        X, y, groups=groups
    )
    return est, X, groups


def _predictions(est, X, groups):
    mean, sd = est.predict(X, groups=groups, return_std=True)
    return {
        "mean": mean,
        "sd": sd,
        "interval": est.predict_interval(X, groups=groups),
        "draws": est.sample_y(X, groups=groups, n_samples=7, random_state=1),
    }


def test_predict_chunk_rows(fitted, monkeypatch):
    # 30 rows in one chunk (default) and in chunks of 7 rows: the same
    # means, sds and intervals.
    est, X, groups = fitted
    X_new = np.vstack([X, X[:5] + 1.0])
    g_new = np.concatenate([groups, [0, 1, 2, 7, 8]])  # 7, 8: unseen
    assert len(X_new) <= _limits.PREDICT_CHUNK_ROWS
    one = _predictions(est, X_new, g_new)
    monkeypatch.setattr(_limits, "PREDICT_CHUNK_ROWS", 7)
    chunked = _predictions(est, X_new, g_new)
    for name in ("mean", "sd", "interval"):
        np.testing.assert_allclose(chunked[name], one[name], rtol=1e-12, err_msg=name)
    # the draws' noise streams follow the chunks; their distribution per row
    # is checked against the closed form in test_predictive_closed_form
    assert chunked["draws"].shape == one["draws"].shape
    assert np.all(np.isfinite(chunked["draws"]))


def test_predict_mean_paths(fitted):
    # predict() without sd takes a path for chunks whose rows are all
    # complete and of fitted groups; any other chunk the general one. Both
    # give the means of predict(return_std=True) bit for bit: the same
    # rows alone (fast path), with an unseen group's row, with a NaN cell.
    est, X, groups = fitted
    mean, _ = est.predict(X, groups=groups, return_std=True)
    np.testing.assert_array_equal(est.predict(X, groups=groups), mean)
    X_unseen = np.vstack([X, X[:1]])
    g_unseen = np.concatenate([groups, [99]])
    np.testing.assert_array_equal(est.predict(X_unseen, groups=g_unseen)[:-1], mean)
    X_nan = X.copy()
    X_nan[0, 0] = np.nan
    both, _ = est.predict(X_nan, groups=groups, return_std=True)
    np.testing.assert_array_equal(est.predict(X_nan, groups=groups), both)
    np.testing.assert_array_equal(both[1:], mean[1:])


def _statistics(X, y, w, groups):
    on_rows = np.ones(X.shape, bool)
    scaling = _stats.compute_scaling(X, y, w, on_rows)
    mask = np.ones((groups.max() + 1, X.shape[1]), bool)
    return _stats.group_statistics(X, y, w, groups, mask, scaling)


@pytest.mark.parametrize("chunk_cells", [None, 1])
def test_statistics_chunks(chunk_cells, monkeypatch):
    # 1 cell per chunk gives the smallest chunk, 256 rows: 600 rows make 3
    # chunks; by default one. Chunking only reorders exact sums: the
    # statistics agree to rounding (rtol 1e-12) with one pass.
    X, y, groups = _data(3, 2, rows_per_group=200)
    w = np.random.default_rng(1).uniform(0.5, 2.0, len(y))
    whole = _statistics(X, y, w, groups)
    if chunk_cells is not None:
        monkeypatch.setattr(_limits, "STATS_CHUNK_CELLS", chunk_cells)
    chunked = _statistics(X, y, w, groups)
    for name in ("n", "gram", "xty", "yty", "x_count", "x_sum", "x_sumsq"):
        np.testing.assert_allclose(
            getattr(chunked, name), getattr(whole, name), rtol=1e-12, atol=1e-9
        )
    _fit_and_check(X, y, groups, num_chains=1)


@pytest.mark.parametrize("chunk_cells", [None, 1])
def test_cell_passes_chunks(chunk_cells, monkeypatch):
    # The NaN counts and the cells' moments (the scaling's pass) chunk rows
    # by the same limit: 600 rows x 2 features are 3 chunks of 256 rows at 1
    # cell, one by default. Oracle: the same sums on all rows at once with
    # np.bincount (exact counts; moments to rtol 1e-12).
    X, _, groups = _data(3, 2, rows_per_group=200)
    X[::7, 0] = np.nan
    X[500:, 1] = np.nan  # the third chunk only
    w = np.random.default_rng(2).uniform(0.5, 2.0, len(X))
    if chunk_cells is not None:
        monkeypatch.setattr(_limits, "STATS_CHUNK_CELLS", chunk_cells)
        assert len(_masks.row_chunks(*X.shape)) == 3
    nan = np.isnan(X)
    expected = np.stack(
        [np.bincount(groups, weights=nan[:, j], minlength=3) for j in range(2)], 1
    )
    np.testing.assert_array_equal(_masks.nan_counts(X, groups, 3), expected)
    moments = _stats.cell_moments(X, w, groups, 3)
    for g in range(3):
        for j in range(2):
            keep = (groups == g) & ~nan[:, j]
            x, wk = X[keep, j], w[keep]
            mean = np.average(x, weights=wk)
            np.testing.assert_allclose(moments.count[g, j], wk.sum(), rtol=1e-12)
            np.testing.assert_allclose(moments.mean[g, j], mean, rtol=1e-12)
            m2 = np.sum(wk * (x - mean) ** 2)
            np.testing.assert_allclose(moments.m2[g, j], m2, rtol=1e-12)


@pytest.mark.parametrize("chunk_cells", [None, 1])
def test_value_check_chunks(chunk_cells, monkeypatch):
    # The check for infinite and too large cells reads the rows chunk by
    # chunk; a bad cell in the last chunk is found either way, and the error
    # names the column and the count.
    X, y, groups = _data(3, 2, rows_per_group=200)
    X[599, 1] = np.inf
    if chunk_cells is not None:
        monkeypatch.setattr(_limits, "STATS_CHUNK_CELLS", chunk_cells)
        assert len(_masks.row_chunks(*X.shape)) == 3
    est = MaskedHierarchicalRegressor(num_warmup=5, num_samples=5, num_chains=1)
    with pytest.raises(
        ValueError, match=r"infinity in feature column\(s\) 'x1' \(1 cell"
    ):
        est.fit(X, y, groups=groups)
    X[599, 1] = 1e200
    with pytest.raises(ValueError, match=r"above 1e\+150 .* 'x1' \(1 cell"):
        est.fit(X, y, groups=groups)


@pytest.mark.parametrize("max_params", [0, _limits.MAX_GROUP_PARAMS_DIAGNOSED])
def test_group_parameters_diagnosed(max_params, monkeypatch):
    # Above the limit the diagnostics cover only the population parameters.
    monkeypatch.setattr(_limits, "MAX_GROUP_PARAMS_DIAGNOSED", max_params)
    est = _fit_and_check(*_data(3, 2))
    keys = est._fitted.posterior.diagnostics
    assert any(k.startswith("coef[") for k in keys) == (max_params > 0)
    assert "noise" in keys


@pytest.mark.parametrize(
    ("split_every", "n_features"), [(2, 2), (_limits.DASK_SPLIT_EVERY, 13)]
)
def test_dask_split_every(split_every, n_features, monkeypatch):
    # 5 partitions: a tree of depth 3 when 2 are combined per task, a single
    # combination by default. 13 features: the population's matrix and the
    # conditional draws take the LAPACK paths (the 1e8-row dask benchmark
    # has 20 features).
    dd = pytest.importorskip("dask.dataframe")
    monkeypatch.setattr(_limits, "DASK_SPLIT_EVERY", split_every)
    X, y, groups = _data(3, n_features, rows_per_group=80)
    names = [f"x{j}" for j in range(n_features)]
    frame = pd.DataFrame(X, columns=names).assign(g=groups, y=y)
    ddf = dd.from_pandas(frame, npartitions=5)
    est = MaskedHierarchicalRegressor(
        group_col="g", on_bad_convergence="ignore", **TINY
    ).fit(ddf[["g", *names]], ddf["y"])
    ols = _ols(X, y, groups)
    np.testing.assert_allclose(est.coef_, ols[:, 1:], atol=OLS_ATOL)
    pred = est.predict(ddf[["g", *names]]).compute()
    np.testing.assert_allclose(pred, est.predict(frame[["g", *names]]), rtol=1e-12)


#: (engine, pooling, n_features, n_groups, weights, latent cells): each engine
#: and pooling, feature counts on both sides of the unroll limits (11/12 for
#: the population, 24/25 for the groups' matrices), 1 to 50 groups.
SHAPES = [
    ("collapsed", "partial", 12, 3, False, False),
    ("collapsed", "partial", 25, 50, True, True),
    ("collapsed", "none", 13, 1, True, False),
    ("collapsed", "none", 24, 6, False, True),
    ("collapsed", "complete", 12, 50, False, True),
    ("collapsed", "complete", 25, 3, True, False),
    ("direct", "partial", 13, 6, True, True),
    ("direct", "none", 12, 3, False, False),
    ("direct", "complete", 25, 1, True, True),
]


@pytest.mark.parametrize(
    ("engine", "pooling", "n_features", "n_groups", "weights", "latent"), SHAPES
)
def test_every_shape_fits_predicts_summarizes_and_pickles(
    engine, pooling, n_features, n_groups, weights, latent
):
    rng = np.random.default_rng(n_features * 100 + n_groups)
    X, y, groups = _data(n_groups, n_features, rows_per_group=40, seed=n_groups)
    if n_groups > 1:
        X[groups == 0, 0] = np.nan  # feature 0 off for group 0
    if latent:
        X[
            rng.choice(
                np.flatnonzero(groups != 0) if n_groups > 1 else len(y),
                3,
                replace=False,
            ),
            1,
        ] = np.nan
    w = rng.uniform(0.5, 2.0, len(y)) if weights else None
    est = MaskedHierarchicalRegressor(
        engine=engine,
        pooling=pooling,
        on_bad_convergence="ignore",
        # a short run: this test checks that each shape's programs compile and
        # run through every method, not the draws (the 25-feature, 50-group
        # case costs ~1 s of sampling per 5 iterations on the CI machine)
        num_warmup=10,
        num_samples=10,
        num_chains=1,
        random_state=0,
    ).fit(X, y, groups=groups, sample_weight=w)
    if n_groups > 1:
        assert not est.mask_.iloc[0, 0] and est.coef_[0, 0] == 0.0
    assert est.mask_.to_numpy().sum() == n_groups * n_features - (n_groups > 1)
    mean, sd = est.predict(X, groups=groups, return_std=True)
    assert np.all(np.isfinite(mean)) and np.all(sd > 0)
    assert est.predict_interval(X, groups=groups).shape == (len(y), 2)
    assert len(est.summary()) > n_features
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(again.predict(X, groups=groups), mean)
