"""The collapsed engine against the direct one, and the compile cache (issue 3).

The direct engine (one likelihood term per row, NUTS over every group
coefficient) is the reference. Means are compared in units of their Monte
Carlo standard error (bulk ESS of each engine's draws), sds by ratio.
"""

import numpy as np
import pandas as pd
import pytest
from numpyro.diagnostics import effective_sample_size
from sklearn.model_selection import GridSearchCV, GroupKFold

from hiermask import MaskedHierarchicalRegressor
from hiermask._diagnostics import parameter_diagnostics
from hiermask._runner import cache_info

from .conftest import FAST, OLD_MODEL

#: Long enough runs for the direct engine to mix on these small problems.
LONG = {"num_warmup": 500, "num_samples": 500, "num_chains": 2, "random_state": 1}


def _grouped(seed, n_groups=6, n_per=40, missing=0.0):
    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(n_groups), n_per)
    X = rng.normal(size=(group.size, 2)) + [1.0, -0.5]
    coef = np.array([1.5, -1.0]) + rng.normal(0, 0.4, size=(n_groups, 2))
    intercept = 0.5 + rng.normal(0, 0.5, size=n_groups)
    off = np.zeros((n_groups, 2), bool)
    off[0, 1] = True  # group 0 has no second feature
    eff = np.where(off[group], 0.0, coef[group] * X)
    y = intercept[group] + eff.sum(axis=1) + rng.normal(0, 0.7, size=group.size)
    X[off[group]] = np.nan
    holes = (rng.random(X.shape) < missing) & ~off[group]
    X[holes] = np.nan
    frame = pd.DataFrame(X, columns=["a", "b"])
    frame["g"] = [f"G{i}" for i in group]
    w = 1.0 + (rng.random(group.size) < 0.3)  # some rows count twice
    return frame, y, w


def _mc_se(draws, n_chains):
    flat = draws.reshape(draws.shape[0], -1)
    x = flat.reshape(n_chains, -1, flat.shape[1])
    _, ess, _ = parameter_diagnostics(x)
    return flat.std(axis=0) / np.sqrt(np.where(np.isfinite(ess), ess, flat.shape[0]))


def _sd_rel_se(draws, n_chains):
    # Relative standard error of a sd estimated from autocorrelated draws:
    # the variance is the mean of d = (x - mean)^2, whose relative error is
    # sd(d) / (mean(d) sqrt(ESS_d)) with ESS_d the ESS of d (its own
    # autocorrelation, and its own tails: sd(d) / mean(d) is sqrt(2) for a
    # normal, more for the scales' skewed posteriors); a sd's is half that.
    # The log of a ratio of two independent sds has the root sum of squares.
    flat = draws.reshape(draws.shape[0], -1)
    dev2 = (flat - flat.mean(axis=0)) ** 2
    chains = dev2.reshape(n_chains, -1, dev2.shape[1])
    ess = np.asarray(effective_sample_size(chains))
    ess = np.where(np.isfinite(ess) & (ess > 0), ess, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = dev2.std(axis=0) / dev2.mean(axis=0) / np.sqrt(ess)
    return 0.5 * rel


@pytest.mark.parametrize(
    "pooling, missing, model",
    [
        ("partial", 0.0, {}),  # the defaults: "full", every slope varies here
        ("partial", 0.0, OLD_MODEL),
        ("partial", 0.0, {"varying": ["a"], "group_covariance": "diagonal"}),
        ("partial", 0.0, {"varying": ["b"]}),  # b is off in group 0
        ("none", 0.0, {"varying": ["a"]}),
        ("complete", 0.0, {}),
        ("partial", 0.1, {}),
    ],
)
def test_collapsed_matches_direct(pooling, missing, model):
    X, y, w = _grouped(0, missing=missing)
    fits = {
        engine: MaskedHierarchicalRegressor(
            group_col="g",
            pooling=pooling,
            engine=engine,
            target_accept_prob=0.95,
            on_bad_convergence="ignore",
            **model,
            **LONG,
        ).fit(X, y, sample_weight=w)
        for engine in ("collapsed", "direct")
    }
    c, d = fits["collapsed"], fits["direct"]
    assert d.convergence_["max_r_hat"] < 1.05
    for name in c.posterior_:
        a, b = c.posterior_[name], d.posterior_[name]
        keep = (a.std(axis=0) > 0).ravel()
        mean_a, mean_b = a.mean(axis=0).ravel()[keep], b.mean(axis=0).ravel()[keep]
        se = np.hypot(_mc_se(a, 2)[keep], _mc_se(b, 2)[keep])
        # means agree within 4.5 Monte Carlo standard errors
        z = np.abs(mean_a - mean_b) / se
        assert np.all(z < 4.5), (name, z.max())
        # sds agree within 4.5 standard errors of their log ratio (below)
        ratio = a.std(axis=0).ravel()[keep] / b.std(axis=0).ravel()[keep]
        se = np.hypot(_sd_rel_se(a, 2)[keep], _sd_rel_se(b, 2)[keep])
        assert np.all(np.abs(np.log(ratio)) < 4.5 * se), (name, ratio, 4.5 * se)
    if missing:
        # The imputation model's predictive moments of a NaN cell: the
        # collapsed engine integrates x_loc out and takes its moments from the
        # exact conditional, the direct engine samples it. Means within a
        # tenth of the cell's predictive sd (Monte Carlo error about 0.02 here:
        # sd / sqrt(40 rows x ESS); observed 0.009), variances within 5%
        # (observed 0.9%).
        # (Where a feature is off, G0's b, x_loc has only its prior: left out.)
        pc, pd_ = c._fitted.posterior, d._fitted.posterior
        on = np.ones(pc.x_fill.shape, bool)
        on[0, 1] = False
        sd = np.sqrt(pd_.x_var[on])
        assert np.all(np.abs(pc.x_fill[on] - pd_.x_fill[on]) < 0.1 * sd)
        np.testing.assert_allclose(pc.x_var[on], pd_.x_var[on], rtol=0.05)


def test_refit_reuses_compiled_program():
    X, y, _ = _grouped(1)
    est = MaskedHierarchicalRegressor(group_col="g", **FAST).fit(X, y)
    before = cache_info().misses
    est.set_params(coef_prior_scale=3.0, group_scale_prior=0.5).fit(X, y)
    X2, y2, _ = _grouped(2)  # other rows, same shape (6 groups, 2 features)
    est.fit(X2, y2)
    X3, y3, _ = _grouped(3, n_per=55)  # more rows: statistics keep their shape
    est.fit(X3, y3)
    assert cache_info().misses == before


def test_gridsearch_compiles_once_per_fold_shape():
    X, y, _ = _grouped(4, n_groups=9)
    est = MaskedHierarchicalRegressor(group_col="g", **FAST)
    est.fit(X[X["g"].isin([f"G{i}" for i in range(6)])], y[:240])  # warm 6 groups
    before = cache_info().misses
    search = GridSearchCV(
        est, {"coef_prior_scale": [0.3, 1.0, 3.0, 10.0]}, cv=GroupKFold(n_splits=3)
    )
    search.fit(X, y, groups=X["g"])
    # every training fold has 6 groups (compiled above); the final refit on
    # all 9 groups is the one new shape
    assert cache_info().misses - before == 1


def test_gridsearch_over_lkj_concentration_compiles_nothing_new():
    # issue 14: the LKJ concentration is a traced prior setting
    X, y, _ = _grouped(4, n_groups=9)
    est = MaskedHierarchicalRegressor(group_col="g", **FAST)
    est.fit(X[X["g"].isin([f"G{i}" for i in range(6)])], y[:240])  # warm 6 groups
    est.fit(X, y)  # and 9
    before = cache_info().misses
    search = GridSearchCV(
        est, {"lkj_concentration": [1.0, 2.0, 8.0]}, cv=GroupKFold(n_splits=3)
    )
    search.fit(X, y, groups=X["g"])
    assert cache_info().misses == before
    assert search.best_estimator_.group_correlation_.shape == (3, 3)


#: Two threads each running a loop of batched Cholesky factorizations (100
#: matrices of size 21): with jax 0.10.2 on 2 CPUs, unguarded, this hangs
#: (jaxlib's LAPACK kernels wait on XLA's intra-op pool from inside it). A
#: single matrix is factorized in the calling thread: no guard needed.
_LAPACK_THREADS = """
import sys, threading
import jax, jax.numpy as jnp, numpy as np
from hiermask._xla import exclusive, runs_alone
m = np.eye(21) * 3.0 + 0.1
batch = np.broadcast_to(m, (100, 21, 21)).copy()
with jax.enable_x64(True):
    def loop(m, s):
        def body(i, c):
            chol = jnp.linalg.cholesky(m * (1.0 + 1e-3 * c))
            return c + 1e-9 * jnp.sum(jnp.log(jnp.diagonal(chol, 0, 1, 2)))
        return jax.lax.fori_loop(0, 200, body, s)
    # lowered, and called, with a keyword argument as the fit's conditional
    # draws are: the wrapper forwards keyword arguments (issue 12)
    program = exclusive(jax.jit(loop).lower(batch, s=0.0).compile())
    plain = exclusive(jax.jit(lambda m: m * 2.0).lower(batch).compile())
    single = exclusive(jax.jit(jnp.linalg.cholesky).lower(m).compile())
    assert runs_alone(program)
    assert not runs_alone(plain) and not runs_alone(single)
    done = []
    def run():
        with jax.enable_x64(True):
            done.append(float(program(batch, s=0.0)))
    threads = [threading.Thread(target=run) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(done) == 2, "a thread raised"
print("ok")
"""


def test_programs_calling_lapack_run_one_at_a_time():
    # Regression test for a deadlock: in a subprocess, so that a hang fails
    # the test after the timeout instead of stopping the suite.
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _LAPACK_THREADS],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


#: Imports the package and reports whether JAX started a backend (which any
#: compilation, such as probing XLA options, does).
_IMPORT_ONLY = """
import hiermask, hiermask.cli, hiermask.plotting
from jax._src import xla_bridge
print(xla_bridge.backends_are_initialized())
"""


def test_import_compiles_nothing_and_starts_no_backend():
    # In a subprocess: this test process has long started JAX's backend.
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_ONLY],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_chain_does_not_stick_at_a_million_rows():
    # Regression: with 1e6 rows the residual sd is known to 0.1%; a chain
    # started anywhere in +-2 (unconstrained) spent its warmup walking the
    # residual sd in, its mass matrix collapsed (1e-11 for the between-group
    # sds) and it stayed at a between-group intercept sd of 0.94 instead of
    # 0.18, at 1023 leapfrog steps per draw. This seed and chain did so
    # before the residual sd started near its least-squares value.
    # Oracle: with 10,000 rows per group the group intercepts are known
    # almost exactly, so the between-group sd is that of per-group least
    # squares intercepts (100 groups: its posterior sd is ~7%).
    from hiermask.datasets import make_grouped_regression

    X, y = make_grouped_regression(1_000_000, 100, 10, random_state=0)
    est = MaskedHierarchicalRegressor(
        group_col="group", random_state=3, num_chains=1, num_samples=50
    ).fit(X, y)
    features, target = X.drop(columns="group").to_numpy(), np.asarray(y)
    intercepts = []
    for rows in X.groupby("group").indices.values():
        design = np.column_stack([np.ones(len(rows)), features[rows]])
        intercepts.append(np.linalg.lstsq(design, target[rows], rcond=None)[0][0])
    expected = np.std(intercepts, ddof=1)
    assert abs(est.group_intercept_scale_ / expected - 1) < 0.25
    assert np.max(est._fitted.posterior.tree_steps) < 1023
