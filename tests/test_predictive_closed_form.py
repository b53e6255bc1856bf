"""Every predictive quantity against a closed form and against draws (issue 20).

The oracle is written here from the model (DESIGN section 3) and the fitted
draws in ``posterior_``: for a row ``x`` of group ``g`` with intercept and
slope draws ``(a_d, b_d)``, NaN cells of applicable features replaced by
their expectation ``m_j`` (variance ``v_j``),

    E[y]   = mean_d(a_d + b_d . x)
    Var[y] = var_d(a_d + b_d . x) + mean_d(sigma_d^2)
             + sum_{NaN j} mean_d(b_dj^2) v_j

and a group not seen in fit takes the population draws plus a fresh group
effect, which adds ``mean_d(tau_a^2) + sum_j mean_d(tau_j^2) x_j^2`` (and
``mean_d(tau_j^2) v_j`` for a NaN cell); under ``pooling="none"`` it takes
the prior. ``m_j`` and ``v_j`` come from the training data (a seen group's
weighted mean and the pooled within-group variance; for an unseen group the
pooled weighted mean and variance), or from the imputation model's
posterior for a feature that had latent cells at fit (not in
``posterior_``: read from the fitted posterior object).

With the direct engine the estimator's moments are those of the draws, so
they equal the oracle to rounding (rtol 1e-6); the collapsed engine's seen
groups are Rao-Blackwellized, equal to it within the Monte Carlo error of
the draws. ``sample_y``'s 4,000 draws have the oracle's mean and variance
within 4.5 of their standard errors: ``sd / sqrt(4000)`` and ``sd((y -
ybar)^2) / sqrt(4000)`` (the draws' own fourth moment: the mixture is not
normal), plus, for a new group, the error of its effects' average over the
D kept draws (see :func:`_check_draws`).
"""

import warnings

import numpy as np
import pandas as pd
import pytest
from numpyro.diagnostics import effective_sample_size
from scipy.stats import norm

from hiermask import MaskedHierarchicalRegressor

from ._fitted import GROUP, manufacturing_fit
from .conftest import FAST, OLD_MODEL

FEATURES = ["a", "b"]
#: 1,000 kept draws: a new group's effects in sample_y are one fixed draw
#: per posterior draw, whose D-draw average error must stay small.
SETTINGS = {**FAST, "num_samples": 500}


def _data(latent=False, seed=0):
    # 3 groups; feature b is off in group A; non-unit weights; with latent,
    # 6 NaN cells of feature a in groups B and C (imputed at fit).
    rng = np.random.default_rng(seed)
    sizes = {"A": 30, "B": 50, "C": 40}
    g = np.repeat(list(sizes), list(sizes.values()))
    X = rng.normal(size=(g.size, 2)) * [1.0, 2.0] + [0.5, -1.0]
    coef = {"A": [1.0, 0.0], "B": [2.0, -0.5], "C": [1.5, -1.0]}
    base = {"A": 1.0, "B": 3.0, "C": 2.0}
    y = np.array([base[k] + X[i] @ coef[k] for i, k in enumerate(g)])
    y = y + rng.normal(0, 0.5, g.size)
    X[g == "A", 1] = np.nan
    if latent:
        X[[40, 45, 60, 90, 100, 110], 0] = np.nan
    frame = pd.DataFrame(X, columns=FEATURES)
    frame.insert(0, "g", g)
    w = rng.uniform(0.5, 2.0, g.size)
    return frame, y, w


def _rows():
    # seen full; a masked value (ignored); a NaN in an applicable feature of a
    # seen group; unseen full; unseen NaN (off for that row, though another
    # row of the group has the feature); an unseen group where b is NaN
    return pd.DataFrame(
        {
            "g": ["B", "A", "C", "new", "new", "new2"],
            "a": [1.0, 1.0, np.nan, 3.0, np.nan, 4.0],
            "b": [2.0, 5.0, -1.0, 4.0, 0.0, np.nan],
        }
    )


def _cell_moments(X, w, groups, mask):
    """Weighted mean per (group, feature) of the observed cells, the pooled
    within-group variance, and the pooled mean and variance over groups."""
    values = X.to_numpy(dtype=float)
    labels = list(mask.index)
    p = values.shape[1]
    mean = np.zeros((len(labels), p))
    within, count, n_on = np.zeros(p), np.zeros(p), np.zeros(p)
    for i, label in enumerate(labels):
        for j in range(p):
            rows = (groups == label) & ~np.isnan(values[:, j])
            if not mask.iloc[i, j] or not rows.any():
                continue
            wj, xj = w[rows], values[rows, j]
            mean[i, j] = np.sum(wj * xj) / np.sum(wj)
            within[j] += np.sum(wj * (xj - mean[i, j]) ** 2)
            count[j] += np.sum(wj)
            n_on[j] += 1
    usable = ~np.isnan(values)
    wx = np.where(usable, w[:, None], 0.0)
    pooled_mean = np.sum(wx * np.nan_to_num(values), axis=0) / wx.sum(axis=0)
    pooled_var = np.sum(wx * (np.nan_to_num(values) - pooled_mean) ** 2, axis=0)
    pooled_var = pooled_var / wx.sum(axis=0)
    return mean, within / (count - n_on), pooled_mean, pooled_var


def _row_draws(est, row, on, fill, var):
    """Per-draw terms of one row's predictive (arrays over the D draws).

    ``lin``: the linear predictor at the filled row; ``nan``: the variance
    the NaN cells add, ``sum_{NaN j} b_dj^2 v_j``; ``effect``: the variance
    of a new group's effect at the row, ``tau_a^2 + sum_j tau_j^2 (x_j^2 +
    v_j [j NaN])`` (0 for a seen group); ``cross``: ``sum_{NaN j} v_j^2 (4
    b_dj^2 tau_j^2 + 2 tau_j^4)``, the variance of the NaN term's part that
    depends on the new group's effect.
    """
    post = est.posterior_
    x = row[FEATURES].to_numpy(dtype=float)
    nan = np.isnan(x) & on
    xt = np.where(nan, fill, np.where(on, np.nan_to_num(x), 0.0))
    n_draws = post["noise"].shape[0]
    t_a2, t2 = np.zeros(n_draws), np.zeros((n_draws, len(on)))
    if row["g"] in list(est.groups_):
        g = list(est.groups_).index(row["g"])
        a, b = post["intercept"][:, g], post["coef"][:, g] * on
    elif "population_intercept" in post:
        a, b = post["population_intercept"], post["population_coef"] * on
        if "group_intercept_scale" in post:
            t_a2 = post["group_intercept_scale"] ** 2
            t2 = post["group_coef_scale"] ** 2 * on
    else:
        raise AssertionError("pooling='none' has its own oracle")
    v = np.where(nan, var, 0.0)
    return {
        "lin": a + b @ xt,
        "nan": b**2 @ v,
        "effect": t_a2 + t2 @ (xt**2 + v),
        "cross": (4 * b**2 * t2 + 2 * t2**2) @ v**2,
        "noise": post["noise"] ** 2,
    }


def _moments(terms):
    # E[y] and Var[y] of the row (module docstring)
    mean = terms["lin"].mean()
    var = terms["lin"].var() + sum(terms[k].mean() for k in ("nan", "effect", "noise"))
    return mean, var


def _oracle(est, X, w, rows):
    """Closed-form predictive mean and sd of ``rows``, and each row's
    per-draw terms (for Monte Carlo errors)."""
    mask = est.mask_
    groups = X["g"].to_numpy()
    fill_g, var_g, fill_pop, var_pop = _cell_moments(X[FEATURES], w, groups, mask)
    fitted = est._fitted.posterior  # the imputation model's moments, where used
    latent = X[FEATURES].isna().to_numpy() & mask.loc[groups].to_numpy()
    imputed = latent.any(axis=0)
    fill_g[:, imputed] = fitted.x_fill[:, imputed]
    var_g = np.where(imputed, fitted.x_var, var_g)
    terms = []
    for _, row in rows.iterrows():
        if row["g"] in list(est.groups_):
            i = list(est.groups_).index(row["g"])
            on, fill, var = mask.iloc[i].to_numpy(), fill_g[i], var_g[i]
        else:
            # an unseen group's NaN feature is off for that row (the row
            # alone decides, never the rest of the batch)
            own = row[FEATURES].to_numpy(dtype=float)
            on = ~np.isnan(own) & mask.any().to_numpy()
            fill, var = fill_pop, var_pop
        terms.append(_row_draws(est, row, on, fill, var))
    mean, var = np.array([_moments(t) for t in terms]).T
    return mean, np.sqrt(var), terms


def _check_draws(est, rows, mean, sd, terms, n=4000):
    """``sample_y``'s draws against the closed form, within 4.5 standard
    errors of a mean and of a variance.

    The n draws pick posterior draws uniformly from the D kept ones and add
    fresh noise (and fresh values for NaN cells), so given the D draws they
    are iid: their mean has variance sd^2 / n, their variance the sample
    variance's (from their own fourth moment). A new group's effect is one
    fixed draw per posterior draw (it depends only on the seed and the
    label), which adds the error of a D-draw average: mean(effect) / D to
    the mean's variance and, for the variance, the D-average errors of the
    squared effect (3 mean(effect^2) - mean(effect)^2), its covariance with
    the linear predictor (4 mean((lin - m)^2 effect)) and the NaN term's
    dependence on it (cross), doubled as a bound for their correlation.
    """
    draws = est.sample_y(rows, n_samples=n, random_state=1)
    centred = draws - draws.mean(axis=1, keepdims=True)
    n_draws = terms[0]["lin"].shape[0]
    effect = np.array([t["effect"] for t in terms])
    lin_dev = np.array([t["lin"] - t["lin"].mean() for t in terms])
    cross = np.array([t["cross"] for t in terms])
    se_mean = np.sqrt(sd**2 / n + effect.mean(axis=1) / n_draws)
    per_draw = (
        3 * np.mean(effect**2, axis=1)
        - effect.mean(axis=1) ** 2
        + 4 * np.mean(lin_dev**2 * effect, axis=1)
        + cross.mean(axis=1)
    )
    se_var = np.sqrt(np.var(centred**2, axis=1) / n + 2 * per_draw / n_draws)
    z_mean = (draws.mean(axis=1) - mean) / se_mean
    z_var = (np.mean(centred**2, axis=1) - sd**2) / se_var
    assert np.all(np.abs(z_mean) < 4.5), z_mean
    assert np.all(np.abs(z_var) < 4.5), z_var


def _check_interval(est, rows, mean, sd):
    z = norm.ppf(0.95)
    interval = est.predict_interval(rows, coverage=0.9)
    np.testing.assert_allclose(interval[:, 0], mean - z * sd, rtol=1e-6)
    np.testing.assert_allclose(interval[:, 1], mean + z * sd, rtol=1e-6)
    np.testing.assert_allclose(interval[:, 1] - interval[:, 0], 2 * z * sd, rtol=1e-6)


def _fit(engine, latent=False):
    X, y, w = _data(latent)
    est = MaskedHierarchicalRegressor(
        group_col="g",
        engine=engine,
        on_bad_convergence="ignore",
        **OLD_MODEL,
        **SETTINGS,
    ).fit(X, y, sample_weight=w)
    return est, X, w


def test_direct_engine_predictive_equals_the_draws_closed_form():
    # The direct engine's moments are the draws' own: equal to rounding, for
    # seen and unseen groups, full rows, masked values and NaN cells.
    est, X, w = _fit("direct")
    rows = _rows()
    mean, sd, terms = _oracle(est, X, w, rows)
    got_mean, got_sd = est.predict(rows, return_std=True)
    np.testing.assert_allclose(got_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(got_sd, sd, rtol=1e-6)
    _check_interval(est, rows, mean, sd)
    _check_draws(est, rows, mean, sd, terms)


@pytest.mark.parametrize("latent", [False, True], ids=["complete", "imputed"])
def test_collapsed_engine_predictive_against_closed_form(latent):
    # Unseen groups come from the population draws in both engines: equal to
    # rounding. Seen groups are Rao-Blackwellized: within the Monte Carlo
    # error of the draws' estimate, 4.5 standard errors from the ESS of the
    # linear predictor: sd(lin) / sqrt(ESS) for the mean; for the variance,
    # var(lin) sqrt(2 / ESS) and sd(nan) / sqrt(ESS), doubled as a bound for
    # their correlation.
    est, X, w = _fit("collapsed", latent)
    rows = _rows()
    mean, sd, terms = _oracle(est, X, w, rows)
    got_mean, got_sd = est.predict(rows, return_std=True)
    unseen = ~rows["g"].isin(est.groups_).to_numpy()
    np.testing.assert_allclose(got_mean[unseen], mean[unseen], rtol=1e-6)
    np.testing.assert_allclose(got_sd[unseen], sd[unseen], rtol=1e-6)
    lins = np.array([t["lin"] for t in terms])
    nans = np.array([t["nan"] for t in terms])
    chains = lins.T.reshape(SETTINGS["num_chains"], -1, lins.shape[0])
    ess = np.asarray(effective_sample_size(chains))
    seen = ~unseen
    z = (got_mean - mean) / (lins.std(axis=1) / np.sqrt(ess))
    assert np.all(np.abs(z[seen]) < 4.5), z
    se_var = np.sqrt(2 * (2 * lins.var(axis=1) ** 2 + nans.var(axis=1)) / ess)
    z = (got_sd**2 - sd**2) / se_var
    assert np.all(np.abs(z[seen]) < 4.5), z
    _check_interval(est, rows, got_mean, got_sd)
    _check_draws(est, rows, mean, sd, terms)


def _prior_terms(est, X, y, rows):
    # pooling="none": a new group's coefficients are the prior's; with
    # standardize=True, beta_j ~ N(0, (c s_y / s_j)^2) and the intercept at
    # the feature means ~ N(m_y, (c_0 s_y)^2), independent, so the linear
    # predictor at x has mean m_y and variance
    # (c_0 s_y)^2 + sum_{j on} (c s_y / s_j)^2 (x_j - m_j)^2.
    values = X.drop(columns=GROUP).to_numpy(dtype=float)
    m_x, s_x = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
    m_y, s_y = np.mean(np.asarray(y)), np.std(np.asarray(y))
    noise2 = est.posterior_["noise"] ** 2
    terms = []
    for x in rows.drop(columns=GROUP).to_numpy(dtype=float):
        sd_b = est.coef_prior_scale * s_y / s_x
        prior_var = (est.intercept_prior_scale * s_y) ** 2 + np.sum(
            (sd_b * (x - m_x)) ** 2
        )
        zero = np.zeros_like(noise2)
        terms.append(
            {
                "lin": zero + m_y,
                "nan": zero,
                "effect": zero + prior_var,
                "cross": zero,
                "noise": noise2,
            }
        )
    return terms


def _shared_terms(est, rows):
    # pooling="complete": the shared coefficients, no group effect
    post = est.posterior_
    x = rows.drop(columns=GROUP).to_numpy(dtype=float)
    lin = post["population_intercept"][:, None] + post["population_coef"] @ x.T
    zero = np.zeros_like(post["noise"])
    return [
        {
            "lin": v,
            "nan": zero,
            "effect": zero,
            "cross": zero,
            "noise": post["noise"] ** 2,
        }
        for v in lin.T
    ]


@pytest.mark.parametrize("pooling", ["none", "complete"])
def test_unseen_group_under_no_and_complete_pooling(pooling):
    # "none": the prior, from the data's moments and the prior scales alone;
    # "complete": the shared coefficients, no group effect.
    est, X, y = manufacturing_fit(pooling)
    rows = pd.DataFrame(
        {
            GROUP: ["brand_new", "brand_new"],
            "Feed_Speed": [3.0, 8.0],
            "Pull_Acceleration": [2.0, 4.5],
            "Cutting_Wait_Time": [0.5, 1.0],
        }
    )
    if pooling == "none":
        terms = _prior_terms(est, X, y, rows)
    else:
        terms = _shared_terms(est, rows)
    mean, var = np.array([_moments(t) for t in terms]).T
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unseen group (and the prior)
        got_mean, got_sd = est.predict(rows, return_std=True)
        _check_draws(est, rows, mean, np.sqrt(var), terms)
    np.testing.assert_allclose(got_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(got_sd, np.sqrt(var), rtol=1e-6)
