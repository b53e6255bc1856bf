"""hiermask's NUTS on targets with known moments, without the engines (issue 20).

Each target is a plain JAX log density (the sampler takes its gradient with
``jax.grad``); the draws are held to the target's exact mean and variance:

* means within 4 Monte Carlo standard errors, ``sd / sqrt(ESS)`` with the
  bulk ESS of each coordinate;
* variances within 10%: for a Gaussian the sample variance has a relative
  sd of ``sqrt(2 / ESS2)`` (ESS2: the ESS of the squared deviations), so 10%
  is at least 4 of them once ``ESS2 >= 3200``, which the test asserts (the
  Student-t, heavier-tailed, gets 4 of its own, from its kurtosis);
* ranks uniform across chains: each chain's share of the pooled draws in
  each quintile is 1/5 within 4.5 standard errors of a share (from the
  chain's ESS of the quintile's indicator), and the split R-hat is below
  1.01.

Two bugs of the issue make it fail (checked by hand and by
``benchmarks/mutation.py``): a top-level transition that always moves to
the new subtree's proposal (it drops the energy-error weighting between the
old tree and the new subtree: the standard normal's variance comes out
~1.3 and the Student-t's draws explode) and a sign flip of the multinomial
weight (every target fails).

The only use of hiermask is :func:`sample` (the diagnostics are NumPyro's),
so that only it changes when the sampler's interface does.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin

from hiermask._density import FlatDensity
from hiermask._runner import run_nuts


# --------------------------------------------------------------- the adapter
class _Target(NamedTuple):
    # run_nuts takes an engine whose density(data, hyper) builds the flat
    # density; the engine is a static argument of the compiled program (one
    # per target and metric).
    log_density: Callable
    dim: int
    dense: bool = False

    def density(self, data, hyper):
        return FlatDensity(
            self.dim,
            lambda z: -self.log_density(z, data),
            lambda z: {"z": z},
            dense_metric=self.dense,
        )


def sample(log_density, dim, data, *, seed, num_samples, num_chains=4, dense=False):
    """Draws ``(num_chains, num_samples, dim)`` of ``exp(log_density(z, data))``
    by hiermask's NUTS (500 warmup iterations, target acceptance 0.8), with a
    diagonal or a ``dense`` metric; and the run's statistics."""
    run = run_nuts(
        _Target(log_density, dim, dense),
        data,
        {},
        seed_value=seed,
        num_warmup=500,
        num_samples=num_samples,
        num_chains=num_chains,
        target_accept_prob=0.8,
    )
    return run.values["z"], run.stats


# --------------------------------------------------------------- the targets
def gaussian(z, data):
    r = data["chol_precision"].T @ (z - data["mean"])
    return -0.5 * r @ r


def student(z, data):
    nu = data["nu"]
    return jnp.sum(-0.5 * (nu + 1.0) * jnp.log1p(z * z / nu))


def _gaussian_target(scales, rho):
    # correlation rho^|i - j| between coordinates i and j
    index = np.arange(len(scales))
    cov = rho ** np.abs(np.subtract.outer(index, index)) * np.outer(scales, scales)
    data = {
        "mean": np.linspace(-1.0, 1.0, len(scales)) * scales,
        "chol_precision": np.linalg.cholesky(np.linalg.inv(cov)),
    }
    # excess kurtosis 0
    return gaussian, len(scales), data, data["mean"], np.diag(cov), 0.0


NU = 10.0
TARGETS = {
    "standard normal": _gaussian_target(np.ones(1), 0.0),
    "5-d correlated, scales 0.01-100": _gaussian_target(np.logspace(-2, 2, 5), 0.6),
    "50-d correlated, scales 0.1-10": _gaussian_target(np.logspace(-1, 1, 50), 0.3),
    # 2-d Student-t, nu = 10: variance nu / (nu - 2), excess kurtosis 6 / (nu - 4)
    "Student-t": (
        student,
        2,
        {"nu": np.asarray(NU)},
        np.zeros(2),
        np.full(2, NU / (NU - 2)),
        6 / (NU - 4),
    ),
}


#: Draws per chain (4 chains): enough for ESS2 >= 3200 (above).
NUM_SAMPLES = {"standard normal": 3000}


def _ess(x):
    # ESS of (chains, draws, k) values (NumPyro's, as Stan computes it)
    return np.asarray(effective_sample_size(np.asarray(x, dtype=np.float64)))


def _check_ranks(draws, n_bins=5, limit=4.5):
    """Each chain's share of every quintile of the pooled draws is 1/n_bins
    within ``limit`` standard errors, from that chain's ESS of the share."""
    n_chains, n_draws, dim = draws.shape
    pooled = draws.reshape(-1, dim)
    edges = np.quantile(pooled, np.linspace(0, 1, n_bins + 1)[1:-1], axis=0)
    bins = np.sum(draws[..., None] > edges.T[None, None], axis=-1)
    worst = 0.0
    for b in range(n_bins):
        hit = (bins == b).astype(np.float64)
        share = hit.mean(axis=1)  # (chains, dim)
        p = hit.mean(axis=(0, 1))
        ess = np.stack([_ess(hit[c : c + 1]) for c in range(n_chains)])
        se = np.sqrt(p * (1 - p) / np.minimum(ess, n_draws))
        worst = max(worst, float(np.max(np.abs(share - p) / se)))
    assert worst < limit, f"a chain's quintile share is {worst:.1f} se off"


@pytest.mark.parametrize("metric", ["diagonal", "dense"])
@pytest.mark.parametrize("name", list(TARGETS))
def test_nuts_draws_have_the_targets_moments(name, metric):
    log_density, dim, data, mean, var, kurtosis = TARGETS[name]
    draws, stats = sample(
        log_density,
        dim,
        data,
        seed=1,
        num_samples=NUM_SAMPLES.get(name, 2000),
        dense=metric == "dense",
    )
    assert not stats["diverging"].any()
    flat = draws.reshape(-1, dim)
    r_hat, ess = split_gelman_rubin(draws), _ess(draws)
    assert np.all(r_hat < 1.01), r_hat.max()
    # means: within 4 Monte Carlo standard errors
    z = (flat.mean(axis=0) - mean) / (np.sqrt(var / ess))
    assert np.all(np.abs(z) < 4.0), np.abs(z).max()
    # variances: sd of the sample variance / variance = sqrt((2 + kurtosis) /
    # ESS2); 10% must be at least 4 of them for the check to mean something
    ess2 = _ess((draws - mean) ** 2)
    rel_se = np.sqrt((2.0 + kurtosis) / ess2)
    tolerance = 0.10 if kurtosis == 0.0 else 4 * rel_se
    assert np.all(tolerance >= 4 * rel_se), ess2.min()
    ratio = flat.var(axis=0) / var
    assert np.all(np.abs(ratio - 1) < tolerance), (ratio.min(), ratio.max())
    _check_ranks(draws)


def test_dense_metric_learns_the_covariance():
    # A 10-d Gaussian with correlations 0.95^|i - j| and scales 0.1-10: a
    # dense metric adapted to its covariance whitens it, so that trajectories
    # are as short as for a standard normal (about 3-7 leapfrog steps); a
    # diagonal one leaves the correlations, and trajectories several times
    # longer. Measured (seed 1): 6.6 dense against 19.8 diagonal steps per
    # draw, and the dense run's moments pass the checks above.
    log_density, dim, data, mean, var, _ = _gaussian_target(
        np.logspace(-1, 1, 10), 0.95
    )
    steps = {}
    for dense in (False, True):
        draws, stats = sample(
            log_density, dim, data, seed=1, num_samples=1000, dense=dense
        )
        steps[dense] = float(np.mean(stats["n_steps"]))
    assert steps[True] < 8.0, steps
    assert steps[False] > 2.0 * steps[True], steps
    flat = draws.reshape(-1, dim)
    z = (flat.mean(axis=0) - mean) / np.sqrt(var / _ess(draws))
    assert np.all(np.abs(z) < 4.0), np.abs(z).max()


def test_momentum_factor_and_cholesky_are_exact():
    # The dense metric's loops against NumPy (rtol 1e-10): F F' = M, F = L^-T
    # with L L' = M^-1 the lower Cholesky factor.
    import jax

    from hiermask import _nuts

    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 6, 6))
    inv_mass = a @ np.swapaxes(a, 1, 2) + 0.1 * np.eye(6)
    with jax.enable_x64(True):
        factor = np.asarray(_nuts.momentum_factor(jnp.asarray(inv_mass)))
        chol = np.asarray(_nuts.cholesky(jnp.asarray(inv_mass[0])))
    np.testing.assert_allclose(chol, np.linalg.cholesky(inv_mass[0]), rtol=1e-10)
    mass = factor @ np.swapaxes(factor, 1, 2)
    np.testing.assert_allclose(mass, np.linalg.inv(inv_mass), rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(np.tril(factor, -1), 0.0)  # upper: L^-T


@pytest.mark.parametrize(("num_warmup", "max_tree_depth"), [(30, 1), (0, 10), (30, 10)])
def test_run_counts_the_warmup_leapfrog_steps(num_warmup, max_tree_depth):
    # warmup_steps: each chain's gradient evaluations before its first kept
    # draw, the starting point's (iteration 0) one of them. Trees of depth 1
    # take one leapfrog step per iteration: 30 warmup iterations are 31
    # evaluations per chain, whatever the segments (50 iterations after the
    # start, in segments of 4: the warmup ends inside one); no warmup, 1.
    # Deeper trees: at least one step per iteration.
    data = {"mean": jnp.zeros(2), "chol_precision": jnp.eye(2)}
    run = run_nuts(
        _Target(gaussian, 2),
        data,
        {},
        seed_value=0,
        num_warmup=num_warmup,
        num_samples=20,
        num_chains=2,
        target_accept_prob=0.8,
        max_tree_depth=max_tree_depth,
    )
    warmup = run.stats["warmup_steps"]
    assert warmup.shape == (2,) and warmup.dtype == np.int64
    if max_tree_depth == 1 or num_warmup == 0:
        np.testing.assert_array_equal(warmup, num_warmup + 1)
    else:
        assert np.all(warmup > 31) and np.all(warmup < 30 * 1023)
    if max_tree_depth == 1:
        np.testing.assert_array_equal(run.stats["n_steps"], 1)
