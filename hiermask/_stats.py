"""Scaling and per-group sufficient statistics (pure NumPy, chunked).

The engines work on an internal design that is an exact reparametrization of
the model on the data as given: every feature is centred and scaled,
``c_ij = (x_ij - m_j) / s_j``, and the target is ``(y - m_y) / s_y``, with the
weighted means and standard deviations of the observed cells. Cells of
features that are off for the row's group are set to zero, so their columns
of the per-group design vanish, and NaN in features that are on (latent cells)
are left out of the precomputed statistics and flagged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._masks import group_sum, row_chunks

__all__ = [
    "GroupStats",
    "Moments",
    "Scaling",
    "cell_moments",
    "centred_design",
    "compute_scaling",
    "group_statistics",
    "latent_layout",
    "merge_moments",
    "pool_moments",
    "reference_units",
    "scaling_from_moments",
    "vector_moments",
]


@dataclass(frozen=True)
class Scaling:
    """Weighted location and scale of the target and the features.

    Attributes
    ----------
    y_mean, y_scale : float
        Weighted mean and sd of y (sd 1.0 when y is constant).
    x_mean, x_scale : ndarray of shape (n_features,)
        Weighted mean and sd of the observed, applicable cells of each feature
        (sd 1.0 for a constant feature).
    """

    y_mean: float
    y_scale: float
    x_mean: np.ndarray
    x_scale: np.ndarray


def _safe_scale(sd):
    sd = np.asarray(sd, dtype=np.float64)
    return np.where(np.isfinite(sd) & (sd > 0), sd, 1.0)


def compute_scaling(X, y, w, on_rows) -> Scaling:
    """Weighted moments of y and of each feature over its usable cells.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
        Features, NaN where missing.
    y : ndarray of shape (n_samples,)
        Target.
    w : ndarray of shape (n_samples,)
        Frequency weights.
    on_rows : ndarray of shape (n_samples, n_features), bool
        Whether the feature applies to the row's group.

    Returns
    -------
    Scaling
    """
    wsum = w.sum()
    y_mean = float(np.dot(w, y) / wsum)
    y_scale = float(_safe_scale(np.sqrt(np.dot(w, (y - y_mean) ** 2) / wsum)))
    usable = on_rows & ~np.isnan(X)
    wx = np.where(usable, w[:, None], 0.0)
    xz = np.where(usable, X, 0.0)
    wj = wx.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        x_mean = np.where(wj > 0, (wx * xz).sum(axis=0) / wj, 0.0)
        var = (wx * (xz - x_mean) ** 2).sum(axis=0) / wj
    return Scaling(y_mean, y_scale, x_mean, _safe_scale(np.sqrt(var)))


def centred_design(X, on_rows, scaling: Scaling):
    """Centred, scaled design with off cells and missing cells set to zero.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
        Features, NaN where missing.
    on_rows : ndarray of shape (n_samples, n_features), bool
        Whether the feature applies to the row's group.
    scaling : Scaling
        Location and scale of the features.

    Returns
    -------
    design : ndarray of shape (n_samples, n_features)
        ``(x - m) / s`` on applicable observed cells, 0 elsewhere.
    latent : ndarray of shape (n_samples, n_features), bool
        Applicable cells that are NaN.
    """
    latent = on_rows & np.isnan(X)
    design = (X - scaling.x_mean) / scaling.x_scale
    design = np.where(on_rows & ~latent, design, 0.0)
    return design, latent


def reference_units(scaling: Scaling, ref):
    """The engines' internal units of the features and of the prior
    reference points.

    Parameters
    ----------
    scaling : Scaling
        Internal location and scale.
    ref : tuple
        Prior reference points ``(M_y, s_y, M, s)`` in data units.

    Returns
    -------
    k : ndarray of shape (n_features,)
        The feature means in internal units, ``m / s``.
    K : ndarray of shape (n_features,)
        The features' reference points in internal units, ``M / s``.
    e_y : ndarray of shape ()
        The target's mean less its reference point, in internal units.
    """
    return (
        scaling.x_mean / scaling.x_scale,
        ref[2] / scaling.x_scale,
        np.asarray((scaling.y_mean - ref[0]) / scaling.y_scale),
    )


def latent_layout(latent):
    """Positions of the latent cells and the features that hold any.

    Parameters
    ----------
    latent : ndarray of shape (n_rows, n_features), bool
        The latent cells (what :func:`centred_design` returns).

    Returns
    -------
    cols : ndarray
        The features that hold latent cells.
    miss_row, miss_col, miss_slot : ndarray of shape (n_cells,)
        Row, feature and position in ``cols`` of each latent cell.
    """
    cols = np.flatnonzero(latent.any(axis=0))
    slot_of = np.full(latent.shape[1], -1)
    slot_of[cols] = np.arange(cols.shape[0])
    miss_row, miss_col = np.nonzero(latent)
    return cols, miss_row, miss_col, slot_of[miss_col]


@dataclass(frozen=True)
class GroupStats:
    """Sufficient statistics of the complete rows of each group.

    With the internal design ``Xt = [1, c]`` of a group (c as in
    :func:`centred_design`), target ``u = (y - m_y) / s_y`` and weights ``W``.

    Attributes
    ----------
    n : ndarray of shape (n_groups,)
        Sum of weights.
    gram : ndarray of shape (n_groups, q, q)
        ``Xt' W Xt`` with ``q = n_features + 1``.
    xty : ndarray of shape (n_groups, q)
        ``Xt' W u``.
    yty : ndarray of shape (n_groups,)
        ``u' W u``.
    incomplete_rows : ndarray of shape (n_incomplete,), int64
        Rows left out because they hold latent cells.
    x_count, x_sum, x_sumsq : ndarray of shape (n_groups, n_features)
        Weighted count, sum and sum of squares of the observed applicable
        cells of each feature in the internal units, for the imputation model.
    """

    n: np.ndarray
    gram: np.ndarray
    xty: np.ndarray
    yty: np.ndarray
    incomplete_rows: np.ndarray
    x_count: np.ndarray
    x_sum: np.ndarray
    x_sumsq: np.ndarray


def group_statistics(
    X, y, w, group_idx, mask, scaling: Scaling, *, chunk_cells=None
) -> GroupStats:
    """One chunked float64 pass over the rows that sums per-group statistics.

    Peak extra memory is one chunk of outer products (about ``chunk_cells``
    floats) besides the inputs.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
        Features, NaN where missing.
    y : ndarray of shape (n_samples,)
        Target.
    w : ndarray of shape (n_samples,)
        Frequency weights.
    group_idx : ndarray of shape (n_samples,)
        Group code of each row.
    mask : ndarray of shape (n_groups, n_features), bool
        Which features apply to which group.
    scaling : Scaling
        Internal location and scale.
    chunk_cells : int
        Size of a chunk, in floats.

    Returns
    -------
    GroupStats
    """
    n_samples, n_features = X.shape
    n_groups = mask.shape[0]
    q = n_features + 1
    gram = np.zeros((n_groups, q * q))
    xty = np.zeros((n_groups, q))
    yty = np.zeros(n_groups)
    total = np.zeros(n_groups)
    x_count = np.zeros((n_groups, n_features))
    x_sum = np.zeros((n_groups, n_features))
    x_sumsq = np.zeros((n_groups, n_features))
    incomplete = []
    p = n_features
    for sl in row_chunks(n_samples, q * q, chunk_cells):
        g = group_idx[sl]
        wc = w[sl]
        on = mask[g]
        # C order: the group sums need row-major arrays; a chunk copies cheaply
        design, latent = centred_design(np.ascontiguousarray(X[sl]), on, scaling)
        observed = on & ~latent
        od = np.where(observed, design, 0.0)
        cells = group_sum(
            np.concatenate([observed, od, od * od], axis=1), g, n_groups, wc
        )
        x_count += cells[:, :p]
        x_sum += cells[:, p : 2 * p]
        x_sumsq += cells[:, 2 * p :]
        has_latent = latent.any(axis=1)
        if has_latent.any():
            incomplete.append(sl.start + np.flatnonzero(has_latent))
        wk = np.where(has_latent, 0.0, wc)
        u = (y[sl] - scaling.y_mean) / scaling.y_scale
        xt = np.concatenate([np.ones((design.shape[0], 1)), design], axis=1)
        outer = (xt[:, :, None] * xt[:, None, :]).reshape(-1, q * q)
        sums = group_sum(
            np.concatenate([outer, xt * u[:, None]], axis=1), g, n_groups, wk
        )
        gram += sums[:, : q * q]
        xty += sums[:, q * q :]
        yty += np.bincount(g, weights=wk * u * u, minlength=n_groups)
        total += np.bincount(g, weights=wk, minlength=n_groups)
    rows = np.concatenate(incomplete) if incomplete else np.zeros(0, dtype=np.int64)
    return GroupStats(
        n=total,
        gram=gram.reshape(n_groups, q, q),
        xty=xty,
        yty=yty,
        incomplete_rows=rows.astype(np.int64),
        x_count=x_count,
        x_sum=x_sum,
        x_sumsq=x_sumsq,
    )


@dataclass(frozen=True)
class Moments:
    """Weighted count, mean and sum of squared deviations, elementwise.

    Moments of disjoint sets of values merge exactly (up to rounding) with
    :func:`merge_moments`, so they can be computed per partition of the rows
    and combined in any tree.

    Attributes
    ----------
    count : ndarray
        Sum of the weights.
    mean : ndarray
        Weighted mean (0.0 where ``count`` is 0).
    m2 : ndarray
        Weighted sum of squared deviations from ``mean``.
    """

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Moments of the union of two disjoint sets (Chan, Golub and LeVeque).

    Parameters
    ----------
    a, b : Moments
        Moments of the two sets, of the same shape.

    Returns
    -------
    Moments
    """
    count = a.count + b.count
    delta = b.mean - a.mean
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(count > 0, b.count / count, 0.0)
    return Moments(
        count=count,
        mean=a.mean + delta * frac,
        m2=a.m2 + b.m2 + delta * delta * a.count * frac,
    )


def vector_moments(v, w) -> Moments:
    """Weighted moments of one vector.

    Parameters
    ----------
    v : ndarray of shape (n_samples,)
        Values.
    w : ndarray of shape (n_samples,)
        Weights.

    Returns
    -------
    Moments
        Scalar (0-d) moments.
    """
    count = np.asarray(w.sum(), dtype=np.float64)
    mean = np.asarray(np.dot(w, v) / count if count > 0 else 0.0)
    return Moments(count, mean, np.asarray(np.dot(w, (v - mean) ** 2)))


def cell_moments(X, w, group_idx, n_groups) -> Moments:
    """Weighted moments of the observed cells of each feature within each group.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
        Features, NaN where missing.
    w : ndarray of shape (n_samples,)
        Frequency weights.
    group_idx : ndarray of shape (n_samples,)
        Group code of each row.
    n_groups : int
        Number of groups.

    Returns
    -------
    Moments
        Arrays of shape (n_groups, n_features).
    """
    n_features = X.shape[1]
    chunks = row_chunks(X.shape[0], 2 * n_features)
    sums = np.zeros((n_groups, 2 * n_features))
    for sl in chunks:  # weighted counts and sums of the observed cells
        x = np.ascontiguousarray(X[sl])  # row-major, as the group sums need
        observed = ~np.isnan(x)
        both = np.concatenate([observed, np.where(observed, x, 0.0)], axis=1)
        sums += group_sum(both, group_idx[sl], n_groups, w[sl])
    count, total = sums[:, :n_features], sums[:, n_features:]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / count, 0.0)
    m2 = np.zeros((n_groups, n_features))
    for sl in chunks:  # squared deviations from the group means: two passes
        x, g = np.ascontiguousarray(X[sl]), group_idx[sl]
        resid = np.where(np.isnan(x), 0.0, x - mean[g])
        m2 += group_sum(resid * resid, g, n_groups, w[sl])
    return Moments(count, mean, m2)


def pool_moments(cells: Moments, mask) -> Moments:
    """Moments of each feature over the groups where it applies.

    Parameters
    ----------
    cells : Moments
        Per-group moments of shape (n_groups, n_features).
    mask : ndarray of shape (n_groups, n_features), bool
        Which features apply to which group.

    Returns
    -------
    Moments
        Arrays of shape (n_features,).
    """
    count_g = np.where(mask, cells.count, 0.0)
    count = count_g.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, (count_g * cells.mean).sum(axis=0) / count, 0.0)
    between = (count_g * (cells.mean - mean) ** 2).sum(axis=0)
    m2 = np.where(mask, cells.m2, 0.0).sum(axis=0) + between
    return Moments(count, mean, m2)


def scaling_from_moments(x: Moments, y: Moments) -> Scaling:
    """The :class:`Scaling` that :func:`compute_scaling` gives, from moments.

    Parameters
    ----------
    x : Moments
        Moments of the observed applicable cells of each feature, shape
        (n_features,) (see :func:`pool_moments`).
    y : Moments
        Scalar moments of the target.

    Returns
    -------
    Scaling
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        x_sd = np.sqrt(x.m2 / x.count)
        y_sd = np.sqrt(y.m2 / y.count)
    x_mean = np.where(x.count > 0, x.mean, 0.0)
    return Scaling(float(y.mean), float(_safe_scale(y_sd)), x_mean, _safe_scale(x_sd))
