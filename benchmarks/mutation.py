"""Mutation testing: small plausible bugs that the test suite must catch.

Each mutant is an exact-text replacement in one file of the package (not a
line-number diff, so that it survives small refactors) and the tests that
must fail with it. For each mutant the script copies the repository's
working tree to a temporary directory, applies the replacement (the old text
must occur exactly once), runs the named tests there with a timeout and
reports ``killed`` (the tests failed), ``survived`` (they passed) or
``error`` (the old text is gone, or the run timed out). An unmutated run of
the union of the named tests comes first: it must pass, or every verdict
would be meaningless.

Not run in CI. Run ``python benchmarks/mutation.py`` (all mutants), ``--list``
or ``--only NAME [NAME ...]``; results go to
``benchmarks/results/mutation.json``. Add a mutant for every bug found later.
"""

from __future__ import annotations

__all__ = ["MUTANTS", "Mutant", "run_mutant"]

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "mutation.json"
PREDICT = "tests/test_predictive_closed_form.py"
TARGETS = "tests/test_sampler_targets.py"
CONJUGATE = "tests/test_conditional_conjugate.py"
SUMS = "tests/test_statistics_sums.py"
MATH = "tests/test_collapsed_math.py"


@dataclass(frozen=True)
class Mutant:
    """One bug: replace ``old`` (exactly once in ``path``) by ``new``."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str


MUTANTS = [
    # ------------------------------------------------ the ten of issue 20
    Mutant(
        "unseen_cov_without_tau2",
        "hiermask/_fit.py",
        "unseen_cov = unseen_cov + np.diag(",
        "unseen_cov = unseen_cov + 0.0 * np.diag(",
        (PREDICT,),
        "unseen groups' predictive sd without the between-group variance",
    ),
    Mutant(
        "nuts_always_moves",
        "hiermask/_nuts.py",
        "move = (valid & (_pick(traj.top_u, tree.depth) < gain)) | traj.first_gradient",
        "move = valid | traj.first_gradient",
        (TARGETS,),
        "top-level transition always takes the new subtree's proposal",
    ),
    Mutant(
        "multinomial_weight_sign",
        "hiermask/_nuts.py",
        "sub_log_weight = jnp.logaddexp(tree.sub_log_weight, -delta)",
        "sub_log_weight = jnp.logaddexp(tree.sub_log_weight, delta)",
        (TARGETS,),
        "sign flip of a leaf's multinomial weight",
    ),
    Mutant(
        "conditional_noise_x1.41",
        "hiermask/_collapsed.py",
        "jnp.stack([w, w + eps], axis=1)",
        "jnp.stack([w, w + 1.41 * eps], axis=1)",
        (CONJUGATE,),
        "group coefficient draws with their noise scaled by 1.41",
    ),
    Mutant(
        "collapsed_loglik_normalizer",
        "hiermask/_collapsed.py",
        "logp = 0.5 * jnp.sum(prep.n) * jnp.log(inv / (2.0 * jnp.pi))",
        "logp = jnp.sum(prep.n) * jnp.log(inv / (2.0 * jnp.pi))",
        (f"{MATH}::test_partial_pooling_marginal_matches_dense_gaussian",),
        "collapsed algebra: the residual's normalizer counted twice",
    ),
    Mutant(
        "prior_units_y_scale",
        "hiermask/_fit.py",
        "r_y = py / scaling.y_scale",
        "r_y = py",
        (f"{MATH}::test_one_group_no_pooling_fixed_noise_is_conjugate",),
        "prior units: intercept and noise priors not converted to internal units",
    ),
    Mutant(
        "mask_rule_inclusive",
        "hiermask/_masks.py",
        "    return frac < threshold",
        "    return frac <= threshold",
        (SUMS, "tests/test_estimator.py::test_mask_threshold"),
        "mask rule: a feature all NaN in a group stays on",
    ),
    Mutant(
        "statistics_ignore_weights",
        "hiermask/_stats.py",
        "wk = np.where(has_latent, 0.0, wc)",
        "wk = np.where(has_latent, 0.0, 1.0)",
        (SUMS,),
        "weights: group sums of the complete rows unweighted",
    ),
    Mutant(
        "seen_sd_without_coef_uncertainty",
        "hiermask/_predict.py",
        "c = posterior.coef_cov[gs]",
        "c = 0.0 * posterior.coef_cov[gs]",
        (f"{PREDICT}::test_direct_engine_predictive_equals_the_draws_closed_form",),
        "seen groups' predictive sd without the coefficients' uncertainty",
    ),
    Mutant(
        "nan_variance_sd",
        "hiermask/_predict.py",
        "np.where(latent, beta2 * xvar, 0.0)",
        "np.where(latent, beta2 * np.sqrt(xvar), 0.0)",
        (f"{PREDICT}::test_direct_engine_predictive_equals_the_draws_closed_form",),
        "a NaN cell at predict adds beta^2 sd(x) instead of beta^2 Var(x)",
    ),
    # ------------------------------------------------ added in issue 20
    Mutant(
        "pooled_variance_dof",
        "hiermask/_fit.py",
        "dof = np.maximum(count.sum(axis=0) - (count > 0).sum(axis=0), 1.0)",
        "dof = np.maximum(count.sum(axis=0), 1.0)",
        (f"{PREDICT}::test_direct_engine_predictive_equals_the_draws_closed_form",),
        "pooled within-group variance without the groups' degrees of freedom",
    ),
    Mutant(
        "none_prior_cross_sign",
        "hiermask/_predict.py",
        "cov[:, 0, 1:] = cov[:, 1:, 0] = -(sd_b**2) * m_x",
        "cov[:, 0, 1:] = cov[:, 1:, 0] = (sd_b**2) * m_x",
        (f"{PREDICT}::test_unseen_group_under_no_and_complete_pooling",),
        "pooling='none' unseen prior: intercept-slope covariance sign",
    ),
    Mutant(
        "unseen_draws_without_tau",
        "hiermask/_predict.py",
        'beta = beta + draws["group_coef_scale"][draw_idx] * z[:, 1:]',
        "beta = beta + 0.0 * z[:, 1:]",
        (f"{PREDICT}::test_direct_engine_predictive_equals_the_draws_closed_form",),
        "sample_y for unseen groups without the slopes' group effects",
    ),
    Mutant(
        "interval_one_sided_z",
        "hiermask/_estimator.py",
        "z = ndtri(0.5 + coverage / 2)",
        "z = ndtri(coverage)",
        (f"{PREDICT}::test_direct_engine_predictive_equals_the_draws_closed_form",),
        "predict_interval with a one-sided quantile",
    ),
    Mutant(
        "merge_moments_no_between",
        "hiermask/_stats.py",
        "m2=a.m2 + b.m2 + delta * delta * a.count * frac,",
        "m2=a.m2 + b.m2,",
        (SUMS,),
        "merged moments lose the between-part sum of squares",
    ),
    Mutant(
        "cell_m2_unweighted",
        "hiermask/_stats.py",
        "m2 = group_sum(resid * resid, group_idx, n_groups, w)",
        "m2 = group_sum(resid * resid, group_idx, n_groups)",
        (SUMS,),
        "weights: cell sums of squares unweighted",
    ),
    Mutant(
        "leapfrog_full_second_kick",
        "hiermask/_nuts.py",
        "potential, grad = value_and_grad(z)\n    r = r - 0.5 * step * grad",
        "potential, grad = value_and_grad(z)\n    r = r - step * grad",
        (TARGETS,),
        "leapfrog's second half-step a full step (not reversible)",
    ),
    Mutant(
        "momentum_times_mass",
        "hiermask/_nuts.py",
        "r0 = normal(u[:, :dim]) / jnp.sqrt(inv_mass)",
        "r0 = normal(u[:, :dim]) * jnp.sqrt(inv_mass)",
        (TARGETS,),
        "momentum drawn with the inverse mass matrix's covariance",
    ),
    Mutant(
        "population_draw_noise_x1.41",
        "hiermask/_collapsed.py",
        "return t.T @ (t @ (inv * h_total) + eps)",
        "return t.T @ (t @ (inv * h_total) + 1.41 * eps)",
        (CONJUGATE,),
        "population draws with their noise scaled by 1.41",
    ),
    Mutant(
        "rao_blackwell_cov_uncentred",
        "hiermask/_collapsed.py",
        "cov = jnp.moveaxis(cov, -1, 0) - mean[:, :, None] * mean[:, None, :]",
        "cov = jnp.moveaxis(cov, -1, 0)",
        (CONJUGATE,),
        "Rao-Blackwellized covariance not centred",
    ),
    # ------------------------------------------------ the tightened tests
    Mutant(
        "conditional_noise_x1.41_ols",
        "hiermask/_collapsed.py",
        "jnp.stack([w, w + eps], axis=1)",
        "jnp.stack([w, w + 1.41 * eps], axis=1)",
        ("tests/test_estimator.py::test_one_group_wide_prior_matches_ols",),
        "the same bug, seen by the one-group OLS test (sds)",
    ),
    Mutant(
        "conditional_noise_x1.41_imputation",
        "hiermask/_collapsed.py",
        "jnp.stack([w, w + eps], axis=1)",
        "jnp.stack([w, w + 1.41 * eps], axis=1)",
        ("tests/test_estimator.py::test_imputation_recovers_slope_and_covers_truth",),
        "the same bug, seen by the imputation test (interval widths)",
    ),
    Mutant(
        "conditional_noise_x1.41_engines",
        "hiermask/_collapsed.py",
        "jnp.stack([w, w + eps], axis=1)",
        "jnp.stack([w, w + 1.41 * eps], axis=1)",
        ("tests/test_engines.py::test_collapsed_matches_direct[partial-0.0]",),
        "the same bug, seen by the engines' sd ratios (bound from the ESS)",
    ),
    Mutant(
        "unseen_cov_without_tau2_estimator",
        "hiermask/_fit.py",
        "unseen_cov = unseen_cov + np.diag(",
        "unseen_cov = unseen_cov + 0.0 * np.diag(",
        ("tests/test_estimator.py::test_unseen_group_uses_population",),
        "the same bug, seen by the estimator's unseen-group test",
    ),
    # ------------------------------------------------ the dense metric (#14)
    Mutant(
        "dense_momentum_factor_untransposed",
        "hiermask/_nuts.py",
        "return jnp.swapaxes(inverse_chol, -1, -2)",
        "return inverse_chol",
        (TARGETS,),
        "dense metric: momenta drawn with L^-1 instead of L^-T (wrong covariance)",
    ),
]


def _copy_tree(destination):
    # The working tree (tracked and untracked, not ignored) as it is now.
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / name.decode()
        if source.is_file():
            target = destination / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def _pytest(tree, tests, timeout):
    env = {**os.environ, "PYTHONPATH": str(tree), "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [*command, *tests],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None, "", time.perf_counter() - start
    return done.returncode, done.stdout[-2000:], time.perf_counter() - start


def run_mutant(mutant, timeout):
    """Apply ``mutant`` to a copy of the tree and run its tests.

    Returns
    -------
    dict
        ``verdict`` (killed, survived or error), ``seconds`` and the tail of
        the tests' output.
    """
    with tempfile.TemporaryDirectory(prefix="hiermask-mutant-") as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        path = tree / mutant.path
        text = path.read_text()
        if text.count(mutant.old) != 1:
            n = text.count(mutant.old)
            return {"verdict": "error", "seconds": 0.0, "output": f"old text {n}x"}
        path.write_text(text.replace(mutant.old, mutant.new))
        rc, output, seconds = _pytest(tree, mutant.tests, timeout)
    if rc is None:
        verdict = "error"
        output = f"timed out after {timeout} s"
    elif rc == 1:
        verdict = "killed"
    elif rc == 0:
        verdict = "survived"
    else:  # collection errors, no tests: not a verdict on the tests
        verdict = "error"
    return {"verdict": verdict, "seconds": round(seconds, 1), "output": output}


def _baseline(mutants, timeout):
    tests = sorted({t for m in mutants for t in m.tests})
    with tempfile.TemporaryDirectory(prefix="hiermask-baseline-") as tmp:
        _copy_tree(Path(tmp))
        rc, output, seconds = _pytest(Path(tmp), tests, timeout * len(tests))
    if rc != 0:
        raise SystemExit(f"the unmutated tests do not pass (rc {rc}):\n{output}")
    print(f"baseline: {len(tests)} test selections pass in {seconds:.0f} s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants")
    parser.add_argument("--timeout", type=float, default=600.0, help="s per mutant")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list:
        for m in mutants:
            print(f"{m.name:34s} {m.path:24s} {m.why}")
        return
    if not args.no_baseline:
        _baseline(mutants, args.timeout)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for m in mutants:
        result = run_mutant(m, args.timeout)
        print(f"{m.name:34s} {result['verdict']:9s} {result['seconds']:6.1f} s")
        results[m.name] = {**asdict(m), **result}
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    survived = [n for n, r in results.items() if r["verdict"] != "killed"]
    print("all killed" if not survived else f"not killed: {', '.join(survived)}")


if __name__ == "__main__":
    main()
