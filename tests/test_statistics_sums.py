"""The collapsed engine's statistics against explicit weighted sums (issue 20).

The oracle is a plain loop over the rows written here from the definitions
(DESIGN section 4, ``hiermask._stats``): with non-unit weights ``w``, a
feature off in a group (all NaN there), and NaN cells in features that are
on (latent: their rows are left out of the group sums), per group ``g``

    n = sum w,  gram = sum w xt xt',  xty = sum w xt u,  yty = sum w u^2

over the complete rows, ``xt = [1, (x - m) / s]`` with 0 at off cells and
``u = (y - m_y) / s_y``; ``(m, s)`` the weighted mean and sd (ddof 0) of the
observed applicable cells of each feature and of ``y``; and the weighted
count, sum and sum of squares of each feature's observed applicable cells.
The in-memory fit, ``group_statistics`` chunked or not, and a dask fit over
unequal partitions (one empty) must all give these sums to float64
rounding: rtol 1e-12, with an absolute floor of 1e-12 times the largest
entry (for sums that cancel to near zero).
"""

import itertools

import numpy as np
import pandas as pd
import pytest

import hiermask._estimator as estimator_module
import hiermask._fit as fit_module
from hiermask import MaskedHierarchicalRegressor
from hiermask._stats import (
    cell_moments,
    compute_scaling,
    group_statistics,
    merge_moments,
    pool_moments,
    scaling_from_moments,
    vector_moments,
)

from .conftest import FAST

RTOL = 1e-12
FEATURES = ["a", "b", "c"]


def _frame(seed=0, n=300):
    # 5 groups in random order; c is off in g1; b has latent NaN cells
    rng = np.random.default_rng(seed)
    code = rng.integers(0, 5, n)
    X = rng.normal(size=(n, 3)) * [1.0, 2.0, 0.5] + [3.0, -1.0, 10.0]
    y = 2.0 + code + X @ [1.0, -0.5, 2.0] + rng.normal(0, 0.5, n)
    X[code == 1, 2] = np.nan
    X[rng.choice(np.flatnonzero(code != 1), 12, replace=False), 1] = np.nan
    frame = pd.DataFrame(X, columns=FEATURES)
    frame["g"] = [f"g{c}" for c in code]
    return frame, y, rng.uniform(0.5, 2.0, n)


def _close(actual, expected, name):
    floor = RTOL * max(float(np.max(np.abs(expected), initial=0.0)), 1.0)
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=floor, err_msg=name)


def explicit_sums(X, y, w, labels):
    """Every statistic by explicit loops over rows (module docstring)."""
    groups = sorted(set(labels))
    n_groups, p = len(groups), X.shape[1]
    g_of = np.array([groups.index(label) for label in labels])
    nan = np.isnan(X)
    mask = np.array(
        [[not nan[g_of == g, j].all() for j in range(p)] for g in range(n_groups)]
    )
    usable = mask[g_of] & ~nan
    m, s = np.zeros(p), np.zeros(p)
    for j in range(p):
        wj, xj = w[usable[:, j]], X[usable[:, j], j]
        m[j] = np.sum(wj * xj) / np.sum(wj)
        s[j] = np.sqrt(np.sum(wj * (xj - m[j]) ** 2) / np.sum(wj))
    m_y = np.sum(w * y) / np.sum(w)
    s_y = np.sqrt(np.sum(w * (y - m_y) ** 2) / np.sum(w))
    out = {
        "mask": mask,
        "x_mean": m,
        "x_scale": s,
        "y_mean": m_y,
        "y_scale": s_y,
        "n": np.zeros(n_groups),
        "gram": np.zeros((n_groups, p + 1, p + 1)),
        "xty": np.zeros((n_groups, p + 1)),
        "yty": np.zeros(n_groups),
        "x_count": np.zeros((n_groups, p)),
        "x_sum": np.zeros((n_groups, p)),
        "x_sumsq": np.zeros((n_groups, p)),
        "incomplete": [],
    }
    for i in range(len(y)):
        g = g_of[i]
        c = np.where(usable[i], (X[i] - m) / s, 0.0)
        for j in np.flatnonzero(usable[i]):
            out["x_count"][g, j] += w[i]
            out["x_sum"][g, j] += w[i] * c[j]
            out["x_sumsq"][g, j] += w[i] * c[j] ** 2
        if np.any(mask[g] & nan[i]):
            out["incomplete"].append(i)
            continue
        xt = np.concatenate([[1.0], c])
        u = (y[i] - m_y) / s_y
        out["n"][g] += w[i]
        out["gram"][g] += w[i] * np.outer(xt, xt)
        out["xty"][g] += w[i] * xt * u
        out["yty"][g] += w[i] * u * u
    return out


def explicit_cell_moments(X, w, labels):
    """Weighted count, mean and sum of squared deviations of the observed
    cells of each (group, feature), by loops."""
    groups = sorted(set(labels))
    shape = (len(groups), X.shape[1])
    count, mean, m2 = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    for g, label in enumerate(groups):
        for j in range(X.shape[1]):
            rows = (np.asarray(labels) == label) & ~np.isnan(X[:, j])
            if rows.any():
                wj, xj = w[rows], X[rows, j]
                count[g, j] = wj.sum()
                mean[g, j] = np.sum(wj * xj) / wj.sum()
                m2[g, j] = np.sum(wj * (xj - mean[g, j]) ** 2)
    return count, mean, m2


def _assert_stats(stats, want):
    for name in ("n", "gram", "xty", "yty", "x_count", "x_sum", "x_sumsq"):
        _close(getattr(stats, name), want[name], name)


def _assert_scaling(scaling, want):
    for name in ("x_mean", "x_scale", "y_mean", "y_scale"):
        _close(getattr(scaling, name), want[name], name)


@pytest.mark.parametrize("chunk_cells", [1 << 22, 16], ids=["one chunk", "chunks"])
def test_group_statistics_equal_explicit_sums(chunk_cells):
    # 16 cells: chunks of 256 rows (the minimum), so 300 rows take two
    frame, y, w = _frame()
    X, labels = frame[FEATURES].to_numpy(), frame["g"].to_numpy()
    want = explicit_sums(X, y, w, labels)
    g_of = np.searchsorted(sorted(set(labels)), labels)
    scaling = compute_scaling(X, y, w, want["mask"][g_of])
    _assert_scaling(scaling, want)
    stats = group_statistics(
        X, y, w, g_of, want["mask"], scaling, chunk_cells=chunk_cells
    )
    _assert_stats(stats, want)
    np.testing.assert_array_equal(np.sort(stats.incomplete_rows), want["incomplete"])


def test_moments_equal_explicit_sums():
    # per-group cell moments, their pooling over the groups where a feature
    # applies, a merge of two halves, and the scaling they give
    frame, y, w = _frame()
    X, labels = frame[FEATURES].to_numpy(), frame["g"].to_numpy()
    want = explicit_sums(X, y, w, labels)
    g_of = np.searchsorted(sorted(set(labels)), labels)
    count, mean, m2 = explicit_cell_moments(X, w, labels)
    cells = cell_moments(X, w, g_of, 5)
    for name, value in (("count", count), ("mean", mean), ("m2", m2)):
        _close(getattr(cells, name), value, name)
    half = len(y) // 3
    merged = merge_moments(
        cell_moments(X[:half], w[:half], g_of[:half], 5),
        cell_moments(X[half:], w[half:], g_of[half:], 5),
    )
    for name, value in (("count", count), ("mean", mean), ("m2", m2)):
        _close(getattr(merged, name), value, f"merged {name}")
    y_moments = merge_moments(
        vector_moments(y[:half], w[:half]), vector_moments(y[half:], w[half:])
    )
    _close(y_moments.count, np.sum(w), "y count")
    _close(y_moments.m2, want["y_scale"] ** 2 * np.sum(w), "y m2")
    pooled = pool_moments(cells, want["mask"])
    usable = want["mask"][g_of] & ~np.isnan(X)
    _close(pooled.count, np.sum(np.where(usable, w[:, None], 0.0), axis=0), "pooled")
    _assert_scaling(scaling_from_moments(pooled, y_moments), want)


class _Captured(Exception):
    pass


def _fit_statistics(monkeypatch, X, y, w):
    """What fit hands to the sampler (FitStatistics), without sampling."""
    seen = []

    def record(fit_stats, config):
        seen.append(fit_stats)
        raise _Captured

    monkeypatch.setattr(estimator_module, "posterior_from_statistics", record)
    monkeypatch.setattr(fit_module, "posterior_from_statistics", record)
    est = MaskedHierarchicalRegressor(group_col="g", **FAST)
    with pytest.raises(_Captured):
        est.fit(X, y, sample_weight=w)
    return seen[0]


def _check_fit_statistics(fit_stats, frame, y, w):
    X, labels = frame[FEATURES].to_numpy(), frame["g"].to_numpy()
    want = explicit_sums(X, y, w, labels)
    np.testing.assert_array_equal(fit_stats.mask, want["mask"])
    _assert_scaling(fit_stats.scaling, want)
    _assert_stats(fit_stats.stats, want)
    count, mean, m2 = explicit_cell_moments(X, w, labels)
    mask = want["mask"]
    for name, value in (("count", count), ("mean", mean), ("m2", m2)):
        got = np.where(mask, getattr(fit_stats.cells, name), 0.0)
        _close(got, np.where(mask, value, 0.0), name)
    latent = fit_stats.latent
    order = np.argsort(latent.y)
    rows = np.array(want["incomplete"])
    rows = rows[np.argsort(y[rows])]
    np.testing.assert_array_equal(latent.y[order], y[rows])
    np.testing.assert_array_equal(latent.w[order], w[rows])


def test_fit_statistics_in_memory_equal_explicit_sums(monkeypatch):
    frame, y, w = _frame()
    fit_stats = _fit_statistics(monkeypatch, frame, y, w)
    _check_fit_statistics(fit_stats, frame, y, w)


def test_fit_statistics_on_dask_equal_explicit_sums(monkeypatch):
    dask = pytest.importorskip("dask")
    dd = pytest.importorskip("dask.dataframe")
    frame, y, w = _frame()
    data = frame.assign(y=y, w=w)
    bounds = np.cumsum([0, 70, 0, 130, 100])
    parts = [data.iloc[a:b] for a, b in itertools.pairwise(bounds)]
    ddf = dd.from_delayed([dask.delayed(p) for p in parts], meta=data.iloc[:0])
    with dask.config.set(scheduler="synchronous"):
        fit_stats = _fit_statistics(
            monkeypatch, ddf[[*FEATURES, "g"]], ddf["y"], ddf["w"]
        )
    _check_fit_statistics(fit_stats, frame, y, w)
