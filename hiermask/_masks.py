"""NaN pattern -> group x feature mask (pure NumPy)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from . import _limits

__all__ = [
    "MIN_EVIDENCE",
    "group_sum",
    "infer_mask",
    "mask_from_counts",
    "nan_counts",
    "row_chunks",
    "thin_evidence",
]

#: Fit warns about (group, feature) pairs switched off on the NaN of fewer
#: rows than this: one or two missing values look the same as "does not
#: apply".
MIN_EVIDENCE = 3


def group_sum(values, group_idx, n_groups, weights=None):
    """Sum the rows of ``values`` within each group.

    Parameters
    ----------
    values : ndarray of shape (n_samples, k)
        Values to sum.
    group_idx : ndarray of shape (n_samples,)
        Group code of each row, in ``range(n_groups)``.
    n_groups : int
        Number of groups.
    weights : ndarray of shape (n_samples,), default=None
        Row weights.

    Returns
    -------
    ndarray of shape (n_groups, k)
    """
    n = group_idx.shape[0]
    w = np.ones(n) if weights is None else weights
    # One entry per column (row of values): built as CSC directly, so no
    # sort or format conversion; the product is one scatter-add pass.
    onehot = sp.csc_matrix((w, group_idx, np.arange(n + 1)), shape=(n_groups, n))
    return np.asarray(onehot @ np.ascontiguousarray(values, dtype=np.float64))


def row_chunks(n_samples: int, width: int, cells: int | None = None):
    """Slices of at most about ``cells`` floats of a ``width``-wide array.

    The passes over the rows work chunk by chunk, so that their temporaries
    stay small (:data:`hiermask._limits.STATS_CHUNK_CELLS`).

    Parameters
    ----------
    n_samples : int
        Number of rows.
    width : int
        Floats per row of the widest temporary.
    cells : int, default=None
        Floats per chunk; ``STATS_CHUNK_CELLS`` when None.

    Returns
    -------
    list of slice
    """
    if cells is None:
        cells = _limits.STATS_CHUNK_CELLS
    step = max(256, cells // max(width, 1))
    return [slice(i, min(i + step, n_samples)) for i in range(0, n_samples, step)]


def nan_counts(X: np.ndarray, group_idx: np.ndarray, n_groups: int) -> np.ndarray:
    """Number of NaN cells of each feature within each group.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
        Features with NaN for missing cells.
    group_idx : ndarray of shape (n_samples,)
        Group code of each row.
    n_groups : int
        Number of groups.

    Returns
    -------
    ndarray of shape (n_groups, n_features), int64
    """
    counts = np.zeros((n_groups, X.shape[1]))
    for sl in row_chunks(X.shape[0], X.shape[1]):
        nan = np.isnan(X[sl])
        rows = np.flatnonzero(nan.any(axis=1))  # only rows with a NaN count
        if rows.size:
            counts += group_sum(nan[rows], group_idx[sl][rows], n_groups)
    return np.rint(counts).astype(np.int64)


def mask_from_counts(
    nans: np.ndarray, rows: np.ndarray, threshold: float = 1.0
) -> np.ndarray:
    """The mask rule: feature ``j`` is off for group ``g`` when the fraction
    of NaN in column ``j`` among the rows of ``g`` is at least ``threshold``.

    Parameters
    ----------
    nans : ndarray of shape (n_groups, n_features)
        NaN cells per group and feature.
    rows : ndarray of shape (n_groups,)
        Rows per group; a group without rows has every feature off.
    threshold : float, default=1.0
        NaN fraction at which a feature is switched off for a group.

    Returns
    -------
    ndarray of shape (n_groups, n_features), bool
        True where the feature applies to the group.
    """
    rows = np.asarray(rows, dtype=np.float64)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(rows > 0, nans / rows, 1.0)
    return frac < threshold


def thin_evidence(nans: np.ndarray, mask: np.ndarray, limit: int = MIN_EVIDENCE):
    """(group, feature) pairs switched off on the NaN of fewer than ``limit``
    rows, features off in every group left out (they are dropped).

    Parameters
    ----------
    nans : ndarray of shape (n_groups, n_features)
        NaN cells per group and feature.
    mask : ndarray of shape (n_groups, n_features), bool
        The mask.
    limit : int, default=MIN_EVIDENCE
        Fewest NaN rows that switch a feature off without a warning.

    Returns
    -------
    groups, features : ndarray of int
        Codes of the pairs, in group order.
    """
    thin = ~mask & (nans < limit) & mask.any(axis=0)
    return np.nonzero(thin)


def infer_mask(
    X: np.ndarray, group_idx: np.ndarray, n_groups: int, threshold: float = 1.0
) -> np.ndarray:
    """Which features apply to which group, read from the NaN pattern.

    Feature ``j`` is off for group ``g`` when the fraction of NaN in column
    ``j`` among the rows of ``g`` is at least ``threshold``
    (:func:`mask_from_counts`).

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
        Features with NaN for missing cells.
    group_idx : ndarray of shape (n_samples,)
        Group code of each row.
    n_groups : int
        Number of groups.
    threshold : float, default=1.0
        NaN fraction at which a feature is switched off for a group.

    Returns
    -------
    ndarray of shape (n_groups, n_features), bool
        True where the feature applies to the group.
    """
    rows = np.bincount(group_idx, minlength=n_groups)
    return mask_from_counts(nan_counts(X, group_idx, n_groups), rows, threshold)
