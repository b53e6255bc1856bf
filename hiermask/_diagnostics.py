"""Convergence diagnostics: rank-normalized split R-hat and bulk/tail ESS.

Vehtari, Gelman, Simpson, Carpenter and Buerkner (2021), "Rank-normalization,
folding, and localization: an improved R-hat", on top of NumPyro's split
Gelman-Rubin statistic and effective sample size.
"""

from __future__ import annotations

import numpy as np
import scipy.special
import scipy.stats
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin

__all__ = ["parameter_diagnostics"]


def _rank_normalize(x):
    # x: (chains, draws, k) -> normal scores of the pooled ranks
    chains, draws = x.shape[:2]
    flat = x.reshape(chains * draws, -1)
    ranks = scipy.stats.rankdata(flat, axis=0, method="average")
    z = scipy.special.ndtri((ranks - 0.375) / (flat.shape[0] + 0.25))
    return z.reshape(x.shape)


def _split_rhat(x):
    if x.shape[1] < 4:
        return np.full(x.shape[2:], np.nan)
    return np.asarray(split_gelman_rubin(x))


def _tail_ess(x):
    # The smaller ESS of the indicators of the 5% and 95% tails.
    flat = x.reshape(-1, x.shape[2])
    lo, hi = np.quantile(flat, [0.05, 0.95], axis=0)
    return np.fmin(
        np.asarray(effective_sample_size((x <= lo).astype(np.float64))),
        np.asarray(effective_sample_size((x >= hi).astype(np.float64))),
    )


def parameter_diagnostics(x):
    """Rank-normalized split R-hat and bulk/tail ESS (Vehtari et al., 2021).

    Parameters
    ----------
    x : ndarray of shape (n_chains, n_draws, n_params)
        Draws.

    Returns
    -------
    r_hat, ess_bulk, ess_tail : ndarray of shape (n_params,)
        NaN for a constant parameter, and for all when there are fewer than
        4 draws per chain.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.shape[2] == 0:
        empty = np.zeros(0)
        return empty, empty, empty
    if x.shape[1] < 4:
        nan = np.full(x.shape[2], np.nan)
        return nan, nan, nan
    z = _rank_normalize(x)
    folded = _rank_normalize(np.abs(x - np.median(x.reshape(-1, x.shape[2]), axis=0)))
    r_hat = np.fmax(_split_rhat(z), _split_rhat(folded))
    ess_bulk = np.asarray(effective_sample_size(z))
    ess_tail = _tail_ess(x)
    constant = np.ptp(x.reshape(-1, x.shape[2]), axis=0) == 0
    r_hat[constant] = np.nan
    ess_bulk[constant] = np.nan
    ess_tail[constant] = np.nan
    return r_hat, ess_bulk, ess_tail
