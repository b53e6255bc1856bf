"""Posterior predictive mean, sd and draws, for seen and unseen groups.

Pure NumPy, chunked over rows. Mean and sd use closed forms: with
``xt = [1, x]`` (off features 0, NaN in applicable features replaced by
their expectation) and a group's posterior coefficient mean ``m`` and
covariance ``S``,

    E[y]   = xt'm
    Var[y] = xt'S xt + E[sigma^2] + sum_{NaN j} E[beta_j^2] Var[x_j]

so no draws x rows matrix is ever formed. A group not seen in fit takes the
population mean and a covariance that includes the between-group variance
(or the prior under ``pooling="none"``).
"""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd

from . import _limits
from ._masks import group_sum

__all__ = ["label_seed", "predictive_draws", "predictive_moments", "unseen_masks"]


def unseen_masks(X, group_idx, labels, fitted_active, threshold):
    """Masks of unseen groups, read from their own rows.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    group_idx : ndarray of shape (n_samples,)
        Fitted code of each row, -1 for unseen groups.
    labels : ndarray of shape (n_samples,) or None
        Labels of the rows.
    fitted_active : ndarray of shape (n_features,), bool
        Features that have a parameter at all.
    threshold : float
        NaN fraction at which a feature is off.

    Returns
    -------
    codes : ndarray of shape (n_samples,)
        Index into ``unseen_labels`` for unseen rows, -1 elsewhere.
    unseen_labels : ndarray of shape (n_unseen,)
    mask : ndarray of shape (n_unseen, n_features), bool
    """
    rows = np.flatnonzero(group_idx < 0)
    codes = np.full(group_idx.shape[0], -1, dtype=np.int64)
    if rows.size == 0:
        return codes, np.zeros(0, dtype=object), np.zeros((0, X.shape[1]), bool)
    codes_rows, unseen_labels = pd.factorize(labels[rows])
    inv = codes_rows.astype(np.int64)
    uniq = np.asarray(unseen_labels, dtype=object)
    unseen_labels = uniq
    codes[rows] = inv
    n = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
    frac = group_sum(np.isnan(X[rows]), inv, len(uniq)) / n[:, None]
    return codes, unseen_labels, (frac < threshold) & fitted_active


def _design(X, on, fill):
    nan = np.isnan(X)
    x = np.where(nan, fill, X)
    x = np.where(on, x, 0.0)
    return np.concatenate([np.ones((X.shape[0], 1)), x], axis=1), nan & on


def _none_prior_moments(on, prior):
    """Prior mean and covariance of a new group's coefficients ("none")."""
    p = on.shape[0]
    sd_l = prior["intercept_prior_scale"] * prior["y_unit"]
    sd_b = np.where(
        on, prior["coef_prior_scale"] * prior["y_unit"] / prior["x_unit"], 0.0
    )
    m_x = np.where(on, prior["x_ref"], 0.0)
    mean = np.zeros(p + 1)
    mean[0] = prior["y_ref"]
    cov = np.zeros((p + 1, p + 1))
    cov[0, 0] = sd_l**2 + np.sum((sd_b * m_x) ** 2)
    cov[0, 1:] = cov[1:, 0] = -(sd_b**2) * m_x
    cov[1:, 1:] = np.diag(sd_b**2)
    return mean, cov


def group_moments(posterior, unseen_mask):
    """Coefficient mean and covariance of every unseen group.

    Parameters
    ----------
    posterior : Posterior
    unseen_mask : ndarray of shape (n_unseen, n_features), bool

    Returns
    -------
    mean : ndarray of shape (n_unseen, q)
    cov : ndarray of shape (n_unseen, q, q)
    """
    n_unseen, p = unseen_mask.shape
    mean = np.zeros((n_unseen, p + 1))
    cov = np.zeros((n_unseen, p + 1, p + 1))
    onq = np.concatenate([np.ones((n_unseen, 1), bool), unseen_mask], axis=1)
    for u in range(n_unseen):
        if posterior.unseen_mean is None:
            m, c = _none_prior_moments(unseen_mask[u], posterior.prior_reference)
        else:
            m, c = posterior.unseen_mean, posterior.unseen_cov
        mean[u] = m * onq[u]
        cov[u] = c * onq[u][:, None] * onq[u][None, :]
    return mean, cov


def _row_fields(rows, group_idx, codes, mask, umask, posterior):
    """Per-row group fields of a chunk: seen flag, fitted or unseen group code,
    mask, and the expectation and variance used for NaN in applicable cells."""
    g = group_idx[rows]
    seen = g >= 0
    gs = np.where(seen, g, 0)
    uc = np.where(seen, 0, codes[rows])
    on = np.where(seen[:, None], mask[gs], umask[uc] if len(umask) else False)
    fill = np.where(seen[:, None], posterior.x_fill[gs], posterior.x_fill_population)
    xvar = np.where(seen[:, None], posterior.x_var[gs], posterior.x_var_population)
    return seen, gs, uc, on, fill, xvar


def predictive_moments(X, group_idx, mask, posterior, unseen):
    """Mean and sd of the posterior predictive of every row.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    group_idx : ndarray of shape (n_samples,)
        Fitted code, -1 for unseen groups.
    mask : ndarray of shape (n_groups, n_features), bool
        Fitted mask.
    posterior : Posterior
    unseen : tuple
        ``(codes, labels, mask)`` from :func:`unseen_masks`.

    Returns
    -------
    mean, sd : ndarray of shape (n_samples,)
    """
    codes, _, umask = unseen
    umean, ucov = group_moments(posterior, umask)
    n = X.shape[0]
    mean = np.empty(n)
    var = np.empty(n)
    for start in range(0, n, _limits.PREDICT_CHUNK_ROWS):
        sl = slice(start, min(start + _limits.PREDICT_CHUNK_ROWS, n))
        seen, gs, uc, on, fill, xvar = _row_fields(
            sl, group_idx, codes, mask, umask, posterior
        )
        m = np.where(
            seen[:, None], posterior.coef_mean[gs], umean[uc] if len(umean) else 0
        )
        c = np.where(
            seen[:, None, None], posterior.coef_cov[gs], ucov[uc] if len(ucov) else 0
        )
        xt, latent = _design(X[sl], on, fill)
        mean[sl] = np.einsum("ni,ni->n", xt, m)
        v = np.einsum("ni,nij,nj->n", xt, c, xt) + posterior.noise_var
        beta2 = m[:, 1:] ** 2 + np.diagonal(c, axis1=1, axis2=2)[:, 1:]
        var[sl] = v + np.sum(np.where(latent, beta2 * xvar, 0.0), axis=1)
    return mean, np.sqrt(np.maximum(var, 0.0))


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
    if "group_intercept_scale" in draws:
        alpha = alpha + draws["group_intercept_scale"][draw_idx] * z[:, 0]
        beta = beta + draws["group_coef_scale"][draw_idx] * z[:, 1:]
    return np.concatenate([alpha[:, None], beta * on], axis=1)


def predictive_draws(X, group_idx, mask, posterior, unseen, n_samples, seed, number=0):
    """Draws from the posterior predictive, one posterior draw per column.

    Also serves the partitions of a dask frame, numbered by ``number``:
    column ``k`` uses the same posterior draw in every partition and a group
    not seen in fit gets the same effects wherever its rows are, because
    both depend only on ``seed`` (and the label). The noise of partition 0
    is the in-memory stream, so a one-partition frame gets exactly the
    in-memory draws; partition ``k > 0`` draws its noise from a stream
    seeded by ``(seed, 0, k)``.

    Parameters
    ----------
    X : ndarray of shape (n_rows, n_features)
    group_idx : ndarray of shape (n_rows,)
        Fitted code, -1 for unseen groups.
    mask : ndarray of shape (n_groups, n_features), bool
    posterior : Posterior
    unseen : tuple
        ``(codes, labels, mask)`` from :func:`unseen_masks` (or
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
    codes, ulabels, umask = unseen
    draws = posterior.draws
    rng = np.random.default_rng([int(seed), 0])
    n_draws = draws["noise"].shape[0]
    draw_idx = rng.integers(0, n_draws, size=n_samples)
    if number:
        rng = np.random.default_rng([int(seed), 0, int(number)])
    n, p = X.shape
    out = np.empty((n, n_samples))
    sigma = draws["noise"][draw_idx]
    # each unseen group's draws depend only on the seed and its label
    unseen_coef = {
        u: _unseen_draws(posterior, ulabels[u], umask[u], seed, draw_idx)
        for u in np.unique(codes[codes >= 0])
    }
    step = max(1, _limits.PREDICT_CHUNK_ROWS // n_samples)
    for start in range(0, n, step):
        sl = slice(start, min(start + step, n))
        seen, gs, uc, on, fill, xvar = _row_fields(
            sl, group_idx, codes, mask, umask, posterior
        )
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
            coef[r] = unseen_coef[uc[r]]
        mean = coef[..., 0] + np.sum(coef[..., 1:] * x, axis=-1)
        out[sl] = mean + sigma * rng.standard_normal((Xc.shape[0], n_samples))
    return out
