"""Which slopes vary by group, and designs the data cannot identify.

Pure NumPy on the statistics that fit already holds: the per-group moments of
the observed cells (``"auto"``: a feature whose observed values are constant
within every group where it applies is a group-level predictor) and the
per-group Gram matrices of the internal design (collinear columns within a
group).
"""

from __future__ import annotations

import warnings

import numpy as np

from ._stats import pool_moments

__all__ = [
    "collinear_sets",
    "constant_within_groups",
    "resolve_varying",
    "warn_unidentified",
]

#: A feature is constant within a group when its sd there is below this
#: fraction of its overall scale (or of its magnitude).
CONSTANT_RTOL = 1e-9
#: Eigenvalues of a group's within-group correlation matrix below this are
#: an exact linear dependence between its columns.
COLLINEAR_TOL = 1e-9


def constant_within_groups(cells, mask, scaling):
    """Whether each active feature is constant within every group where it
    applies.

    Parameters
    ----------
    cells : Moments
        Per-group moments of the observed cells, shape (n_groups, n_active),
        in data units.
    mask : ndarray of shape (n_groups, n_active), bool
        Which features apply to which group.
    scaling : Scaling
        Overall location and scale of the active features.

    Returns
    -------
    ndarray of shape (n_active,), bool
        True for a feature whose observed values do not vary within any
        group (groups with one observed value count as constant).
    """
    count = np.asarray(cells.count, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.where(count > 0, np.asarray(cells.m2) / count, 0.0)
    size = np.maximum(np.asarray(scaling.x_scale), np.abs(np.asarray(cells.mean)))
    flat = (var <= (CONSTANT_RTOL * size) ** 2) | ~mask | (count <= 0)
    return flat.all(axis=0)


def resolve_varying(setting, cells, mask, scaling):
    """The features with a group-specific slope, over all features.

    Parameters
    ----------
    setting : {"auto", "all"} or tuple of bool
        The fit's ``varying`` (a tuple: one flag per feature).
    cells : Moments
        Per-group moments of the active features' observed cells.
    mask : ndarray of shape (n_groups, n_features), bool
        The mask over all features.
    scaling : Scaling
        Scaling of the active features.

    Returns
    -------
    ndarray of shape (n_features,), bool
        False for features off in every group.
    """
    active = mask.any(axis=0)
    if isinstance(setting, str) and setting == "all":
        return active.copy()
    if isinstance(setting, str) and setting == "auto":
        out = np.zeros(mask.shape[1], dtype=bool)
        out[active] = ~constant_within_groups(cells, mask[:, active], scaling)
        return out
    out = np.asarray(setting, dtype=bool)
    if out.shape != (mask.shape[1],):
        raise ValueError(
            f"varying has {out.shape[0]} flags for {mask.shape[1]} features."
        )
    return out & active


def collinear_sets(gram, mask):
    """Columns that are exactly collinear within groups.

    For each group with more rows than applicable non-constant columns plus
    one, the within-group correlation matrix of those columns is
    decomposed; the columns of its null vectors are one collinear set
    (duplicated columns, or one a linear combination of others).

    Parameters
    ----------
    gram : ndarray of shape (n_groups, q, q)
        ``[1, c]' W [1, c]`` per group, ``c`` the internal design of the
        active features (0 where off).
    mask : ndarray of shape (n_groups, q - 1), bool
        Which active features apply to which group.

    Returns
    -------
    dict
        ``{tuple of active positions: number of groups}``.
    """
    gram = np.asarray(gram, dtype=np.float64)
    n_groups, q, _ = gram.shape
    p = q - 1
    if p < 2 or n_groups == 0:
        return {}
    n_w = gram[:, 0, 0]
    safe_n = np.where(n_w > 0, n_w, 1.0)
    cross = gram[:, 1:, 0]
    within = (
        gram[:, 1:, 1:] - cross[:, :, None] * cross[:, None, :] / safe_n[:, None, None]
    )
    dd = np.diagonal(within, axis1=1, axis2=2)
    varies = mask & (dd > 1e-12 * safe_n[:, None])
    k = varies.sum(axis=1)
    checked = (n_w > k + 1) & (k >= 2)
    if not checked.any():
        return {}
    sd = np.sqrt(np.where(varies, dd, 1.0))
    corr = within / (sd[:, :, None] * sd[:, None, :])
    both = varies[:, :, None] & varies[:, None, :]
    eye = np.broadcast_to(np.eye(p), corr.shape)
    corr = np.where(both, corr, eye)
    values, vectors = np.linalg.eigh(corr[checked])
    out = {}
    for vals, vecs in zip(values, vectors, strict=True):
        null = vecs[:, vals < COLLINEAR_TOL]
        if null.shape[1] == 0:
            continue
        cols = tuple(int(j) for j in np.flatnonzero(np.abs(null).max(axis=1) > 1e-6))
        if len(cols) >= 2:
            out[cols] = out.get(cols, 0) + 1
    return out


def _names(names, positions):
    return ", ".join(repr(str(names[j])) for j in positions)


def warn_unidentified(config, varying, cells, mask, scaling, gram):
    """Warn about designs the data cannot identify, naming the columns.

    * a varying feature constant within every group where it applies (its
      group-specific slope and the group's intercept move together);
    * a feature that takes one value in every row of every group (its slope
      and the intercept move together);
    * under no pooling, a group-level predictor (each group's own intercept
      absorbs it);
    * columns exactly collinear within groups.

    Parameters
    ----------
    config : FitConfig
        The fit's settings (``pooling``, ``feature_names``).
    varying : ndarray of shape (n_features,), bool
        Resolved ``varying`` over all features.
    cells : Moments
        Per-group moments of the active features' observed cells.
    mask : ndarray of shape (n_groups, n_features), bool
    scaling : Scaling
        Scaling of the active features.
    gram : ndarray of shape (n_groups, n_active + 1, n_active + 1)
        Per-group Gram matrices of the internal design.
    """
    active = mask.any(axis=0)
    positions = np.flatnonzero(active)
    names = config.feature_names
    if names is None:
        names = [f"x{j}" for j in range(mask.shape[1])]
    pooled = pool_moments(cells, mask[:, active])
    with np.errstate(invalid="ignore", divide="ignore"):
        sd = np.sqrt(np.where(pooled.count > 0, pooled.m2 / pooled.count, 0.0))
    # one value in every row of every group (a feature that applies to some
    # groups only is identified by the groups where it does not)
    single = (sd == 0) | (sd <= CONSTANT_RTOL * np.abs(pooled.mean))
    single &= mask[:, active].all(axis=0)
    if single.any():
        warnings.warn(
            f"Feature(s) {_names(names, positions[single])} take a single value "
            "in every row where they apply: their slope is not identified apart "
            "from the intercept, and the model determines it by its prior only. "
            "Drop such columns.",
            UserWarning,
            stacklevel=5,
        )
    flat = constant_within_groups(cells, mask[:, active], scaling) & ~single
    bad = flat & varying[active]
    if config.pooling != "complete" and bad.any():
        warnings.warn(
            f"Feature(s) {_names(names, positions[bad])} are constant within every "
            "group where they apply (group-level predictors) but have a "
            "group-specific slope: within a group such a slope is not identified "
            "apart from the group's intercept, and the model separates the two by "
            "the prior (and, under partial pooling, the other groups) only. Give "
            "them a population slope only: varying='auto', or leave them out of "
            "varying.",
            UserWarning,
            stacklevel=5,
        )
    shared = flat & ~varying[active]
    if config.pooling == "none" and shared.any():
        warnings.warn(
            f"Feature(s) {_names(names, positions[shared])} are constant within "
            "every group where they apply (group-level predictors): under "
            "pooling='none' every group has its own intercept, which absorbs "
            "them, so their shared slope is determined by the prior only. Use "
            "pooling='partial' to learn it from the differences between groups.",
            UserWarning,
            stacklevel=5,
        )
    for cols, n_bad in collinear_sets(gram, mask[:, active]).items():
        warnings.warn(
            f"Columns {_names(names, positions[list(cols)])} are exactly collinear "
            f"within {n_bad} of {mask.shape[0]} group(s) (duplicated, or one a "
            "linear combination of the others): there the data determine only a "
            "combination of their slopes, and the model splits it between them by "
            "the prior"
            + (" and the other groups" if config.pooling == "partial" else "")
            + ". Drop one of them or combine them.",
            UserWarning,
            stacklevel=5,
        )
