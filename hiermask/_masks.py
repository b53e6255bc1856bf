"""NaN pattern -> group x feature mask (pure NumPy)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["group_sum", "infer_mask", "nan_fraction"]


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
    onehot = sp.csr_matrix((w, (group_idx, np.arange(n))), shape=(n_groups, n))
    return np.asarray(onehot @ np.asarray(values, dtype=np.float64))


def nan_fraction(X: np.ndarray, group_idx: np.ndarray, n_groups: int) -> np.ndarray:
    """Fraction of NaN cells of each feature within each group.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
        Features with NaN for missing cells.
    group_idx : ndarray of shape (n_samples,)
        Group code of each row, in ``range(n_groups)``.
    n_groups : int
        Number of groups.

    Returns
    -------
    ndarray of shape (n_groups, n_features)
        NaN fraction; 1.0 for a group without rows.
    """
    rows = np.bincount(group_idx, minlength=n_groups).astype(np.float64)
    counts = group_sum(np.isnan(X), group_idx, n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = counts / rows[:, None]
    return np.where(rows[:, None] > 0, frac, 1.0)


def infer_mask(
    X: np.ndarray, group_idx: np.ndarray, n_groups: int, threshold: float = 1.0
) -> np.ndarray:
    """Which features apply to which group, read from the NaN pattern.

    Feature ``j`` is off for group ``g`` when the fraction of NaN in column
    ``j`` among the rows of ``g`` is at least ``threshold``.

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
    return nan_fraction(X, group_idx, n_groups) < threshold
