"""hiermask's NUTS against NumPyro's NUTS on the very same density (issue 13).

Both engines run on hiermask's sampler, so neither can be the other's oracle
for the sampler itself. Here NumPyro's ``MCMC(NUTS(potential_fn=...))`` runs
on the engine's own :class:`~hiermask._density.FlatDensity` (the same
potential, the same constrain map), for every engine and pooling, and the
posterior means of every reported quantity must agree within Monte Carlo
error: ``|mean_a - mean_b| <= 5 sqrt(var_a / ess_a + var_b / ess_b)``, the
ESS being each sampler's bulk ESS (rank-normalized) of that quantity. Five
standard errors: about 30 quantities per case, so a false alarm has odds
below 1e-4 per case, while a sampler bias of a fraction of a posterior sd
(the usual symptom of a wrong kernel) fails it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer import MCMC, NUTS

from hiermask._diagnostics import parameter_diagnostics
from hiermask._fit import (
    ENGINES,
    FitRows,
    FitStatistics,
    LatentRows,
    _hyper,
    _prior_units,
)
from hiermask._runner import run_nuts
from hiermask._stats import cell_moments, compute_scaling, group_statistics

from ._fitted import fit_config

#: Both samplers' runs: compilation (NumPyro's especially) dominates the time.
RUN = {"num_warmup": 200, "num_samples": 400, "num_chains": 2}


def _engine_data(engine_name, pooling):
    # 3 groups, 2 features (the second off in group 2), weights, one latent
    # cell; the engine's data and prior scales.
    rng = np.random.default_rng(0)
    group_idx = np.repeat(np.arange(3), 12)
    X = rng.normal(size=(36, 2))
    y = 0.5 * group_idx + X @ np.array([1.0, -0.5]) + rng.normal(size=36)
    w = rng.uniform(0.5, 2.0, 36)
    mask = np.array([[True, True], [True, True], [True, False]])
    X[~mask[group_idx]] = np.nan
    X[3, 0] = np.nan
    scaling = compute_scaling(X, y, w, mask[group_idx])
    config = fit_config(pooling, engine_name, **RUN)
    engine = ENGINES[engine_name](pooling)
    if engine_name == "direct":
        statistics = FitRows(mask, scaling, LatentRows(X, y, w, group_idx))
    else:
        stats = group_statistics(X, y, w, group_idx, mask, scaling)
        rows = stats.incomplete_rows
        latent = LatentRows(X[rows], y[rows], w[rows], group_idx[rows])
        cells = cell_moments(X, w, group_idx, 3)
        statistics = FitStatistics(mask, scaling, stats, latent, cells)
    data = engine.prepare(statistics, _prior_units(scaling, True))
    return engine, data, _hyper(config, scaling)


def _numpyro_draws(engine, data, hyper):
    # NumPyro's NUTS on the engine's flat density, constrained like
    # hiermask's draws: dict of (chains, draws, ...).
    with jax.enable_x64(True):
        as_jax = jax.tree_util.tree_map(jnp.asarray, (data, hyper))
        density = engine.density(*as_jax)
        unit = np.random.default_rng(1).uniform(size=(RUN["num_chains"], density.size))
        mcmc = MCMC(
            NUTS(potential_fn=density.potential),
            chain_method="sequential",
            progress_bar=False,
            **RUN,
        )
        mcmc.run(jax.random.PRNGKey(1), init_params=density.initial_points(unit))
        z = mcmc.get_samples(group_by_chain=True)
        values = jax.vmap(jax.vmap(density.constrain))(z)
        return {k: np.asarray(v) for k, v in values.items()}


def _means_and_errors(draws):
    # Per quantity: mean, and its squared Monte Carlo standard error.
    x = draws.reshape(draws.shape[0], draws.shape[1], -1)
    _, ess, _ = parameter_diagnostics(x)
    flat = x.reshape(-1, x.shape[2])
    return flat.mean(axis=0), flat.var(axis=0) / ess


@pytest.mark.slow
@pytest.mark.parametrize("engine_name", ["collapsed", "direct"])
@pytest.mark.parametrize("pooling", ["partial", "none", "complete"])
def test_posterior_means_match_numpyro_nuts(engine_name, pooling):
    engine, data, hyper = _engine_data(engine_name, pooling)
    ours = run_nuts(engine, data, hyper, seed_value=0, target_accept_prob=0.8, **RUN)
    theirs = _numpyro_draws(engine, data, hyper)
    assert ours.values.keys() == theirs.keys()
    compared = 0
    for name in ours.values:
        mean_a, err_a = _means_and_errors(ours.values[name])
        mean_b, err_b = _means_and_errors(theirs[name])
        live = np.isfinite(err_a) & np.isfinite(err_b)  # constants: NaN ESS
        z = np.abs(mean_a - mean_b)[live] / np.sqrt(err_a + err_b)[live]
        assert np.all(z <= 5.0), (name, z)
        compared += int(live.sum())
    assert compared >= 3
