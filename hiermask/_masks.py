"""NaN pattern -> group x feature mask (pure NumPy)."""

from __future__ import annotations

import numpy as np

__all__ = ["infer_mask", "nan_fraction"]


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
    isnan = np.isnan(X)
    counts = np.stack(
        [
            np.bincount(group_idx, weights=isnan[:, j], minlength=n_groups)
            for j in range(X.shape[1])
        ],
        axis=1,
    ).reshape(n_groups, X.shape[1])
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
