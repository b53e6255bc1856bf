"""Posterior predictive mean, sd and draws, for seen and unseen groups.

Pure NumPy, chunked over rows. Mean and sd use closed forms: with
``xt = [1, x]`` (off features 0, NaN in applicable features replaced by
their expectation) and a group's posterior coefficient mean ``m`` and
covariance ``S``,

    E[y]   = xt'm
    Var[y] = xt'S xt + E[sigma^2] + sum_{NaN j} E[beta_j^2] Var[x_j]

so no draws x rows matrix is ever formed. A group not seen in fit takes the
population mean and a covariance that includes the between-group variance
(or the prior under ``pooling="none"``); a feature applies to such a row
when the row gives its value, so every row's prediction depends only on the
row and the fitted model.
"""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd

from . import _limits

__all__ = [
    "label_seed",
    "predictive_draws",
    "predictive_moments",
    "row_mask",
    "unseen_codes",
    "unseen_moments",
]


def unseen_codes(group_idx, labels):
    """Number the groups not seen in fit, in order of first appearance.

    Parameters
    ----------
    group_idx : ndarray of shape (n_samples,)
        Fitted code of each row, -1 for unseen groups.
    labels : ndarray of shape (n_samples,) or None
        Labels of the rows.

    Returns
    -------
    codes : ndarray of shape (n_samples,)
        Index into ``unseen_labels`` for unseen rows, -1 elsewhere.
    unseen_labels : ndarray of shape (n_unseen,), object
    """
    rows = np.flatnonzero(group_idx < 0)
    codes = np.full(group_idx.shape[0], -1, dtype=np.int64)
    if rows.size == 0:
        return codes, np.zeros(0, dtype=object)
    inv, uniq = pd.factorize(labels[rows])
    codes[rows] = inv
    return codes, np.asarray(uniq, dtype=object)


def row_mask(X, group_idx, mask):
    """Which features apply to each row.

    A seen group's row follows the fitted mask. A row of a group not seen in
    fit has no mask of its own: a feature applies to it when the row gives
    a value (and the feature has a parameter at all), so a prediction never
    depends on the other rows of the batch.

    Parameters
    ----------
    X : ndarray of shape (n_rows, n_features)
    group_idx : ndarray of shape (n_rows,)
        Fitted code, -1 for unseen groups.
    mask : ndarray of shape (n_groups, n_features), bool
        Fitted mask.

    Returns
    -------
    ndarray of shape (n_rows, n_features), bool
    """
    seen = group_idx >= 0
    own = ~np.isnan(X) & mask.any(axis=0)
    return np.where(seen[:, None], mask[np.where(seen, group_idx, 0)], own)


def _design(X, on, fill):
    nan = np.isnan(X)
    x = np.where(nan, fill, X)
    x = np.where(on, x, 0.0)
    return np.concatenate([np.ones((X.shape[0], 1)), x], axis=1), nan & on


def _none_prior_moments(on, prior):
    """Prior mean and covariance of a new group's coefficients ("none"),
    for rows whose applicable features are ``on`` (n_rows, n_features)."""
    n, p = on.shape
    sd_l = prior["intercept_prior_scale"] * prior["y_unit"]
    sd_b = np.where(
        on, prior["coef_prior_scale"] * prior["y_unit"] / prior["x_unit"], 0.0
    )
    m_x = np.where(on, prior["x_ref"], 0.0)
    mean = np.zeros((n, p + 1))
    mean[:, 0] = prior["y_ref"]
    cov = np.zeros((n, p + 1, p + 1))
    cov[:, 0, 0] = sd_l**2 + np.sum((sd_b * m_x) ** 2, axis=1)
    cov[:, 0, 1:] = cov[:, 1:, 0] = -(sd_b**2) * m_x
    diag = np.arange(1, p + 1)
    cov[:, diag, diag] = sd_b**2
    return mean, cov


def unseen_moments(posterior, on):
    """Coefficient mean and covariance of rows of groups not seen in fit.

    Parameters
    ----------
    posterior : Posterior
    on : ndarray of shape (n_rows, n_features), bool
        The features that apply to each row (:func:`row_mask`).

    Returns
    -------
    mean : ndarray of shape (n_rows, q)
    cov : ndarray of shape (n_rows, q, q)
    """
    n, p = on.shape
    if posterior.unseen_mean is None:
        mean, cov = _none_prior_moments(on, posterior.prior_reference)
    else:
        mean = np.broadcast_to(posterior.unseen_mean, (n, p + 1))
        cov = np.broadcast_to(posterior.unseen_cov, (n, p + 1, p + 1))
    onq = np.concatenate([np.ones((n, 1), bool), on], axis=1)
    return mean * onq, cov * onq[:, :, None] * onq[:, None, :]


def _row_fields(X, rows, group_idx, mask, posterior):
    """Per-row group fields of a chunk: seen flag, fitted group code (0 for
    unseen rows), mask, and the expectation and variance used for NaN in
    applicable cells."""
    g = group_idx[rows]
    seen = g >= 0
    gs = np.where(seen, g, 0)
    on = row_mask(X[rows], g, mask)
    fill = np.where(seen[:, None], posterior.x_fill[gs], posterior.x_fill_population)
    xvar = np.where(seen[:, None], posterior.x_var[gs], posterior.x_var_population)
    return seen, gs, on, fill, xvar


def predictive_moments(X, group_idx, mask, posterior, *, return_sd=True):
    """Mean and sd of the posterior predictive of every row.

    Each row's moments depend only on the row and the fitted model.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    group_idx : ndarray of shape (n_samples,)
        Fitted code, -1 for unseen groups.
    mask : ndarray of shape (n_groups, n_features), bool
        Fitted mask.
    posterior : Posterior
    return_sd : bool, default=True
        Whether to compute the sd; without it, the second output is None
        and the coefficient covariances are never read.

    Returns
    -------
    mean : ndarray of shape (n_samples,)
    sd : ndarray of shape (n_samples,) or None
    """
    n = X.shape[0]
    mean = np.empty(n)
    var = np.empty(n) if return_sd else None
    # The fitted groups' coefficient means with off features exactly 0, so
    # that a complete row of a fitted group needs no mask (its fast path).
    onq = np.concatenate([np.ones((mask.shape[0], 1), bool), mask], axis=1)
    coef_on = np.where(onq, posterior.coef_mean, 0.0)
    for start in range(0, n, _limits.PREDICT_CHUNK_ROWS):
        sl = slice(start, min(start + _limits.PREDICT_CHUNK_ROWS, n))
        if not return_sd and _complete_seen(X[sl], group_idx[sl]):
            # the same products and sum as below, so the same bits: an off
            # cell's value meets a 0 coefficient instead of a 0 design entry
            xt = np.concatenate([np.ones((sl.stop - sl.start, 1)), X[sl]], axis=1)
            mean[sl] = np.einsum("ni,ni->n", xt, coef_on[group_idx[sl]])
            continue
        seen, gs, on, fill, xvar = _row_fields(X, sl, group_idx, mask, posterior)
        m = posterior.coef_mean[gs]
        c = posterior.coef_cov[gs] if return_sd else None
        if not seen.all():
            m_new, c_new = unseen_moments(posterior, on[~seen])
            m[~seen] = m_new
            if return_sd:
                c[~seen] = c_new
        xt, latent = _design(X[sl], on, fill)
        mean[sl] = np.einsum("ni,ni->n", xt, m)
        if return_sd:
            v = np.einsum("ni,nij,nj->n", xt, c, xt) + posterior.noise_var
            beta2 = m[:, 1:] ** 2 + np.diagonal(c, axis1=1, axis2=2)[:, 1:]
            var[sl] = v + np.sum(np.where(latent, beta2 * xvar, 0.0), axis=1)
    return mean, (np.sqrt(np.maximum(var, 0.0)) if return_sd else None)


def _complete_seen(X, group_idx):
    # Rows of fitted groups with every cell given (finite): their mean is
    # the group's masked coefficient means applied to the row as it is.
    return bool((group_idx >= 0).all()) and bool(np.isfinite(X).all())


def label_seed(seed, label):
    """Stable integer seed for an unseen group's effects.

    Parameters
    ----------
    seed : int
        Base seed (from ``random_state``).
    label : object
        The group label.

    Returns
    -------
    list of int
        Entropy for :func:`numpy.random.default_rng`.
    """
    return [int(seed), zlib.crc32(repr(label).encode("utf8"))]


def _unseen_draws(posterior, label, on, seed, draw_idx):
    """Coefficient draws (n_samples, q) of one unseen group at given draws."""
    draws = posterior.draws
    p = on.shape[0]
    n_draws = draws["noise"].shape[0]
    rng = np.random.default_rng(label_seed(seed, label))
    z = rng.standard_normal((n_draws, p + 1))[draw_idx]
    if "population_intercept" not in draws:
        prior = posterior.prior_reference
        sd_l = prior["intercept_prior_scale"] * prior["y_unit"]
        sd_b = prior["coef_prior_scale"] * prior["y_unit"] / prior["x_unit"]
        beta = z[:, 1:] * sd_b * on
        alpha = (
            prior["y_ref"] + sd_l * z[:, 0] - beta @ np.where(on, prior["x_ref"], 0.0)
        )
        return np.concatenate([alpha[:, None], beta], axis=1)
    alpha = draws["population_intercept"][draw_idx]
    beta = draws["population_coef"][draw_idx].copy()
    if "group_correlation" in draws:
        # jointly normal deviations of the intercept and the varying slopes:
        # diag(tau) L z with L L' = Omega, the draw's correlation matrix
        scales = np.concatenate(
            [
                draws["group_intercept_scale"][draw_idx][:, None],
                draws["group_coef_scale"][draw_idx],
            ],
            axis=1,
        )
        keep = np.flatnonzero(np.concatenate([[True], _varying(posterior)]))
        chol = _correlation_factor(draws["group_correlation"][draw_idx])
        dev = np.zeros((draw_idx.shape[0], p + 1))
        dev[:, keep] = scales[:, keep] * np.einsum("nij,nj->ni", chol, z[:, keep])
        alpha = alpha + dev[:, 0]
        beta = beta + dev[:, 1:]
    elif "group_intercept_scale" in draws:
        alpha = alpha + draws["group_intercept_scale"][draw_idx] * z[:, 0]
        beta = beta + draws["group_coef_scale"][draw_idx] * z[:, 1:]
    return np.concatenate([alpha[:, None], beta * on], axis=1)


def _varying(posterior):
    # The features with a group-specific slope (all active ones for a
    # posterior that does not say).
    if posterior.varying is not None:
        return np.asarray(posterior.varying, dtype=bool)
    return np.asarray(posterior.draws["group_coef_scale"] > 0).any(axis=0)


def _correlation_factor(corr):
    """Lower factors L with L L' = corr, for a stack of correlation matrices
    (through the symmetric square root where one is numerically singular)."""
    try:
        return np.linalg.cholesky(corr)
    except np.linalg.LinAlgError:
        values, vectors = np.linalg.eigh(corr)
        root = np.sqrt(np.maximum(values, 0.0))
        return np.einsum("nij,nj,nkj->nik", vectors, root, vectors)


def _unseen_coef(X, group_idx, mask, posterior, unseen, seed, draw_idx):
    """Coefficient draws (n_rows, n_samples, q) of the unseen rows of ``X``
    (zeros elsewhere), one computation per (label, row mask) pair."""
    codes, labels = unseen
    rows = np.flatnonzero(group_idx < 0)
    if rows.size == 0:
        return rows, []
    on = row_mask(X[rows], group_idx[rows], mask)
    keys, inverse = np.unique(
        np.column_stack([codes[rows], on]), axis=0, return_inverse=True
    )
    table = [
        _unseen_draws(posterior, labels[key[0]], key[1:].astype(bool), seed, draw_idx)
        for key in keys
    ]
    return rows, [table[k] for k in np.ravel(inverse)]


def predictive_draws(X, group_idx, mask, posterior, unseen, n_samples, seed, number=0):
    """Draws from the posterior predictive, one posterior draw per column.

    Also serves the partitions of a dask frame, numbered by ``number``:
    column ``k`` uses the same posterior draw in every partition and a group
    not seen in fit gets the same effects wherever its rows are, because
    both depend only on ``seed`` (and the label); an unseen row's mask is its
    own (:func:`row_mask`). The noise of partition 0 is the in-memory stream,
    so a one-partition frame gets exactly the in-memory draws; partition
    ``k > 0`` draws its noise from a stream seeded by ``(seed, 0, k)``.

    Parameters
    ----------
    X : ndarray of shape (n_rows, n_features)
    group_idx : ndarray of shape (n_rows,)
        Fitted code, -1 for unseen groups.
    mask : ndarray of shape (n_groups, n_features), bool
    posterior : Posterior
    unseen : tuple
        ``(codes, labels)`` from :func:`unseen_codes` (or
        :meth:`hiermask._dask.UnseenTable.lookup`).
    n_samples : int
        Number of draws per row.
    seed : int
        Seed; unseen groups' effects depend only on it and their label.
    number : int, default=0
        Position of the partition (0 in memory).

    Returns
    -------
    ndarray of shape (n_rows, n_samples)
    """
    draws = posterior.draws
    rng = np.random.default_rng([int(seed), 0])
    n_draws = draws["noise"].shape[0]
    draw_idx = rng.integers(0, n_draws, size=n_samples)
    if number:
        rng = np.random.default_rng([int(seed), 0, int(number)])
    n, p = X.shape
    out = np.empty((n, n_samples))
    sigma = draws["noise"][draw_idx]
    unseen_rows, unseen_coef = _unseen_coef(
        X, group_idx, mask, posterior, unseen, seed, draw_idx
    )
    where_unseen = dict(zip(unseen_rows.tolist(), unseen_coef, strict=True))
    step = max(1, _limits.PREDICT_CHUNK_ROWS // n_samples)
    for start in range(0, n, step):
        sl = slice(start, min(start + step, n))
        seen, gs, on, fill, xvar = _row_fields(X, sl, group_idx, mask, posterior)
        Xc = X[sl]
        latent = np.isnan(Xc) & on
        # x: (rows, samples, p), latent cells drawn from their predictive
        noise_x = rng.standard_normal((Xc.shape[0], n_samples, p))
        x = np.where(latent, fill, np.where(on, np.nan_to_num(Xc), 0.0))[:, None, :]
        x = x + np.where(latent[:, None, :], np.sqrt(xvar)[:, None, :] * noise_x, 0.0)
        coef = np.empty((Xc.shape[0], n_samples, p + 1))
        if seen.any():
            rows = np.flatnonzero(seen)
            coef[rows, :, 0] = draws["intercept"][draw_idx][:, gs[rows]].T
            coef[rows, :, 1:] = np.transpose(
                draws["coef"][draw_idx][:, gs[rows]], (1, 0, 2)
            )
        for r in np.flatnonzero(~seen):
            coef[r] = where_unseen[start + r]
        mean = coef[..., 0] + np.sum(coef[..., 1:] * x, axis=-1)
        out[sl] = mean + sigma * rng.standard_normal((Xc.shape[0], n_samples))
    return out
