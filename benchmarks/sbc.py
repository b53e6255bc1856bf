"""Simulation-based calibration (SBC) of hiermask's posterior.

For each simulated dataset the parameters are drawn from the priors that
hiermask itself uses with ``standardize=False`` (so that the priors do not
depend on the data), ``y`` is simulated from the model, the estimator is
fitted, and the rank of the true value among ``n_ranks`` posterior draws
(thinned evenly over the chains, so that they are roughly independent) is
recorded. If the sampler computes the posterior of the stated model, every
rank is uniform on ``0 .. n_ranks`` (Talts et al., 2018, "Validating Bayesian
inference algorithms with simulation-based calibration"). Uniformity is
tested with a chi-square test over ``n_bins`` equal bins.

The model (README, "The model"), with ``standardize=False`` and unit prior
scales::

    mu_a ~ Normal(0, intercept_prior_scale)      mu_j ~ Normal(0, coef_prior_scale)
    tau_a, tau_j ~ HalfNormal(group_scale_prior) sigma ~ HalfNormal(noise_prior_scale)
    partial:  alpha_g = mu_a + tau_a z_ag,  beta_gj = mu_j + tau_j z_gj,  z ~ N(0, 1)
              (group_covariance="diagonal")
    full:     (alpha_g, beta_g over the varying features)
                = (mu_a, mu) + diag(tau) L z_g,  z_g ~ N(0, I),
              L L' = Omega ~ LKJ(lkj_concentration = 2)
              (group_covariance="full"); a feature not in ``varying`` has
              beta_gj = mu_j in every group
    none:     alpha_g ~ N(0, intercept_prior_scale), beta_gj ~ N(0, coef_prior_scale)
    complete: alpha_g = mu_a, beta_gj = mu_j
    y_gi ~ Normal(alpha_g + sum_{j on for g} beta_gj x_gij, sigma)

Feature ``x1`` is switched off (all NaN) in group 0, so the masks are part of
what is calibrated: under "full" group 0's effects follow the marginal of the
joint normal on the intercept and ``x0`` (the simulator draws the whole vector
and drops ``x1``'s). Features are drawn from ``Normal(0.5, 1)``: not centred,
so the engines' internal centring is exercised too.

Under "full" the correlation entries are ranked too, and with
``--varying x0`` the slope of ``x1`` is population-only (a 2 x 2 correlation
over the intercept and ``x0``). The group deviations sit at x = 0: with
``standardize=False`` that is hiermask's model.

Run ``python benchmarks/sbc.py`` (every engine and pooling mode, 200 datasets
each, ``group_covariance="diagonal"``) or e.g. ``python benchmarks/sbc.py
--engine collapsed --pooling partial --n-datasets 100``, and
``python benchmarks/sbc.py --engine collapsed --pooling partial --covariance
full [--varying x0]`` for the correlated model. Results are printed and merged
into ``benchmarks/results/sbc.json`` (one entry per engine and pooling mode,
keyed ``engine/pooling``, with ``/full`` and ``/varying=x0`` appended for those
settings).
"""

from __future__ import annotations

__all__ = [
    "TRACKED",
    "result_key",
    "run_sbc",
    "simulate",
    "tracked",
    "uniformity_test",
]

import argparse
import json
import os
import subprocess
import time
import warnings
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
import pandas as pd
import scipy.stats
from numpyro.distributions import LKJCholesky

import hiermask
from hiermask import MaskedHierarchicalRegressor

#: Prior scales of the simulation and of the fit (standardize=False).
PRIOR = {
    "coef_prior_scale": 1.0,
    "intercept_prior_scale": 1.0,
    "group_scale_prior": 1.0,
    "noise_prior_scale": 1.0,
}

#: Concentration of the LKJ prior of the group correlation (``"full"``).
LKJ_CONCENTRATION = 2.0

#: Parameters ranked, per pooling mode (diagonal covariance, every slope
#: varying): name -> (posterior_ key, index). See :func:`tracked`.
TRACKED = {
    "partial": {
        "population_intercept": ("population_intercept", ()),
        "population_coef[x0]": ("population_coef", (0,)),
        "population_coef[x1]": ("population_coef", (1,)),
        "group_intercept_scale": ("group_intercept_scale", ()),
        "group_coef_scale[x0]": ("group_coef_scale", (0,)),
        "noise": ("noise", ()),
    },
    "none": {
        "intercept[g0]": ("intercept", (0,)),
        "coef[g0, x0]": ("coef", (0, 0)),
        "coef[g1, x1]": ("coef", (1, 1)),
        "noise": ("noise", ()),
    },
    "complete": {
        "population_intercept": ("population_intercept", ()),
        "population_coef[x0]": ("population_coef", (0,)),
        "population_coef[x1]": ("population_coef", (1,)),
        "noise": ("noise", ()),
    },
}

RESULTS = Path(__file__).resolve().parent / "results" / "sbc.json"


def tracked(pooling, covariance="diagonal", varying=None, n_features=2):
    """Parameters ranked for one setting: name -> (posterior_ key, index).

    Parameters
    ----------
    pooling : {"partial", "none", "complete"}
    covariance : {"diagonal", "full"}
        Under ``"full"`` (partial pooling) the scales of the varying slopes
        and every correlation entry above the diagonal are added.
    varying : list of int or None
        Positions of the features with a group-specific slope (None: all).
    n_features : int

    Returns
    -------
    dict
    """
    if pooling != "partial" or (covariance == "diagonal" and varying is None):
        return TRACKED[pooling]
    idx = list(range(n_features)) if varying is None else list(varying)
    out = {"population_intercept": ("population_intercept", ())}
    for j in range(n_features):
        out[f"population_coef[x{j}]"] = ("population_coef", (j,))
    out["group_intercept_scale"] = ("group_intercept_scale", ())
    for j in idx:
        out[f"group_coef_scale[x{j}]"] = ("group_coef_scale", (j,))
    if covariance == "full":
        names = ["intercept"] + [f"x{j}" for j in idx]
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                out[f"group_correlation[{names[a]}, {names[b]}]"] = (
                    "group_correlation",
                    (a, b),
                )
    out["noise"] = ("noise", ())
    return out


def simulate(
    rng,
    pooling,
    n_groups=4,
    n_per_group=10,
    n_features=2,
    *,
    covariance="diagonal",
    varying=None,
):
    """One dataset drawn from the prior predictive distribution.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness.
    pooling : {"partial", "none", "complete"}
        Pooling mode of the model simulated from.
    n_groups, n_per_group, n_features : int
        Data shape. Feature 1 (if any) is off in group 0.
    covariance : {"diagonal", "full"}
        Group deviations independent, or jointly normal with an
        ``LKJ(LKJ_CONCENTRATION)`` correlation (partial pooling).
    varying : list of int or None
        Positions of the features with a group-specific slope (partial
        pooling; None: all). The others have ``beta_gj = mu_j``.

    Returns
    -------
    X : DataFrame
        Group column ``"g"`` (labels ``g0, g1, ...``) and features
        ``x0, x1, ...`` (NaN where off).
    y : ndarray of shape (n_groups * n_per_group,)
    truth : dict
        True values, keyed like :data:`TRACKED` (all of them).
    """
    p = n_features
    on = np.ones((n_groups, p), dtype=bool)
    if p > 1:
        on[0, 1] = False
    sigma = abs(rng.normal(0.0, PRIOR["noise_prior_scale"]))
    truth = {"noise": sigma}
    if pooling == "none":
        alpha = rng.normal(0.0, PRIOR["intercept_prior_scale"], size=n_groups)
        beta = rng.normal(0.0, PRIOR["coef_prior_scale"], size=(n_groups, p))
    else:
        mu_a = rng.normal(0.0, PRIOR["intercept_prior_scale"])
        mu = rng.normal(0.0, PRIOR["coef_prior_scale"], size=p)
        truth["population_intercept"] = mu_a
        truth.update({f"population_coef[x{j}]": mu[j] for j in range(p)})
        if pooling == "partial" and covariance == "diagonal" and varying is None:
            tau_a = abs(rng.normal(0.0, PRIOR["group_scale_prior"]))
            tau = np.abs(rng.normal(0.0, PRIOR["group_scale_prior"], size=p))
            truth["group_intercept_scale"] = tau_a
            truth.update({f"group_coef_scale[x{j}]": tau[j] for j in range(p)})
            alpha = mu_a + tau_a * rng.normal(size=n_groups)
            beta = mu + tau * rng.normal(size=(n_groups, p))
        elif pooling == "partial":
            idx = list(range(p)) if varying is None else list(varying)
            names = ["intercept"] + [f"x{j}" for j in idx]
            q = len(names)
            scales = np.abs(rng.normal(0.0, PRIOR["group_scale_prior"], size=q))
            truth["group_intercept_scale"] = scales[0]
            truth.update(
                {f"group_coef_scale[x{j}]": scales[k + 1] for k, j in enumerate(idx)}
            )
            chol = np.eye(q)
            if covariance == "full" and q > 1:
                key = jax.random.PRNGKey(int(rng.integers(2**31)))
                chol = np.asarray(
                    LKJCholesky(q, LKJ_CONCENTRATION).sample(key), dtype=float
                )
                omega = chol @ chol.T
                for a in range(q):
                    for b in range(a + 1, q):
                        name = f"group_correlation[{names[a]}, {names[b]}]"
                        truth[name] = omega[a, b]
            # (alpha_g, beta_g over idx) ~ N((mu_a, mu[idx]), diag(s) Omega diag(s))
            dev = rng.normal(size=(n_groups, q)) @ chol.T * scales
            alpha = mu_a + dev[:, 0]
            beta = np.tile(mu, (n_groups, 1))
            beta[:, idx] += dev[:, 1:]
        else:
            alpha = np.full(n_groups, mu_a)
            beta = np.tile(mu, (n_groups, 1))
    beta = np.where(on, beta, 0.0)
    for g in range(n_groups):
        truth[f"intercept[g{g}]"] = alpha[g]
        for j in range(p):
            truth[f"coef[g{g}, x{j}]"] = beta[g, j]
    group = np.repeat(np.arange(n_groups), n_per_group)
    x = rng.normal(0.5, 1.0, size=(group.size, p))
    y = alpha[group] + np.sum(beta[group] * x, axis=1)
    y = y + sigma * rng.normal(size=group.size)
    x[~on[group]] = np.nan
    X = pd.DataFrame(x, columns=[f"x{j}" for j in range(p)])
    X.insert(0, "g", [f"g{g}" for g in group])
    return X, y, truth


def uniformity_test(ranks, n_ranks, n_bins):
    """Chi-square test that ranks in ``0 .. n_ranks`` are uniform.

    Parameters
    ----------
    ranks : array of int
        Rank statistics.
    n_ranks : int
        Number of posterior draws ranked against (ranks take ``n_ranks + 1``
        values).
    n_bins : int
        Number of equal bins; must divide ``n_ranks + 1``.

    Returns
    -------
    counts : ndarray of shape (n_bins,)
    statistic, p_value : float
    """
    if (n_ranks + 1) % n_bins:
        raise ValueError(f"n_bins={n_bins} must divide n_ranks + 1 = {n_ranks + 1}.")
    width = (n_ranks + 1) // n_bins
    counts = np.bincount(np.asarray(ranks) // width, minlength=n_bins)
    statistic, p_value = scipy.stats.chisquare(counts)
    return counts, float(statistic), float(p_value)


def _draws(est, key, index):
    arr = est.posterior_[key]
    return arr[(slice(None), *index)]


def _source():
    # The commit the run used (and whether the checkout had changes).
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return "git " + done.stdout.strip()


def run_sbc(
    engine="collapsed",
    pooling="partial",
    n_datasets=100,
    *,
    seed=0,
    n_groups=4,
    n_per_group=10,
    num_warmup=300,
    num_samples=1000,
    num_chains=2,
    n_ranks=99,
    n_bins=10,
    covariance="diagonal",
    varying=None,
    verbose=False,
):
    """Run SBC for one engine and pooling mode.

    ``covariance`` and ``varying`` (positions of the features with a
    group-specific slope, None for all) choose the partially pooled model
    simulated and fitted (``group_covariance``, ``varying``; see
    :func:`simulate`).

    Returns
    -------
    dict
        Settings, per-parameter rank counts, chi-square statistic and p-value,
        the ranks themselves, convergence summaries and the wall time.
    """
    params_ranked = tracked(pooling, covariance, varying)
    ranks = {name: [] for name in params_ranked}
    model = {
        "group_covariance": covariance,
        "varying": "all" if varying is None else [f"x{j}" for j in varying],
        "lkj_concentration": LKJ_CONCENTRATION,
    }
    max_r_hat, min_ess, divergent = [], [], []
    idx = np.linspace(0, num_chains * num_samples - 1, n_ranks).round().astype(int)
    start = time.perf_counter()
    for i in range(n_datasets):
        rng = np.random.default_rng([seed, i])
        X, y, truth = simulate(
            rng,
            pooling,
            n_groups,
            n_per_group,
            covariance=covariance,
            varying=varying,
        )
        est = MaskedHierarchicalRegressor(
            **model,
            group_col="g",
            pooling=pooling,
            engine=engine,
            standardize=False,
            num_warmup=num_warmup,
            num_samples=num_samples,
            num_chains=num_chains,
            on_bad_convergence="ignore",
            random_state=i,
            **PRIOR,
        ).fit(X, y)
        for name, (key, index) in params_ranked.items():
            draws = _draws(est, key, index)[idx]
            ranks[name].append(int(np.sum(draws < truth[name])))
        conv = est.convergence_
        max_r_hat.append(conv["max_r_hat"])
        min_ess.append(conv["min_ess_bulk"])
        divergent.append(conv["n_divergences"])
        if verbose and (i + 1) % 25 == 0:
            print(
                f"  {engine}/{pooling}: {i + 1}/{n_datasets} datasets, "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )
    elapsed = time.perf_counter() - start
    params = {}
    for name, r in ranks.items():
        counts, stat, p_value = uniformity_test(r, n_ranks, n_bins)
        params[name] = {
            "counts": counts.tolist(),
            "chi2": stat,
            "p_value": p_value,
            "ranks": r,
        }
    divergent = np.asarray(divergent)
    return {
        "hiermask_version": hiermask.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "source": _source(),
        "engine": engine,
        "pooling": pooling,
        "group_covariance": covariance,
        "varying": model["varying"],
        "lkj_concentration": LKJ_CONCENTRATION,
        "n_datasets": n_datasets,
        "seed": seed,
        "n_groups": n_groups,
        "n_per_group": n_per_group,
        "num_warmup": num_warmup,
        "num_samples": num_samples,
        "num_chains": num_chains,
        "n_ranks": n_ranks,
        "n_bins": n_bins,
        "chi2_df": n_bins - 1,
        "params": params,
        "max_r_hat_median": float(np.nanmedian(max_r_hat)),
        "max_r_hat_max": float(np.nanmax(max_r_hat)),
        "min_ess_bulk_median": float(np.nanmedian(min_ess)),
        "min_ess_bulk_min": float(np.nanmin(min_ess)),
        "datasets_with_divergences": int(np.sum(divergent > 0)),
        "seconds": elapsed,
    }


def result_key(engine, pooling, covariance="diagonal", varying=None):
    """The key of a run in ``sbc.json``: ``engine/pooling``, then ``/full``
    and ``/varying=x0,...`` when those settings are not the defaults."""
    key = f"{engine}/{pooling}"
    if pooling == "partial" and covariance == "full":
        key += "/full"
    if pooling == "partial" and varying is not None:
        key += "/varying=" + ",".join(f"x{j}" for j in varying)
    return key


def _print(result, alpha):
    n_params = len(result["params"])
    label = result_key(
        result["engine"],
        result["pooling"],
        result.get("group_covariance", "diagonal"),
        _positions(result.get("varying", "all")),
    )
    print(
        f"\n{label}: {result['n_datasets']} datasets, "
        f"{result['n_ranks']} draws ranked, chi-square df {result['chi2_df']}, "
        f"{result['seconds']:.0f} s"
    )
    print(
        f"  max r_hat median {result['max_r_hat_median']:.3f} "
        f"(max {result['max_r_hat_max']:.3f}); min bulk ESS median "
        f"{result['min_ess_bulk_median']:.0f} (min {result['min_ess_bulk_min']:.0f}); "
        f"datasets with divergences: {result['datasets_with_divergences']}"
    )
    for name, r in result["params"].items():
        verdict = "ok" if r["p_value"] > alpha / n_params else "NOT UNIFORM"
        print(
            f"  {name:24s} chi2 {r['chi2']:6.2f}  p {r['p_value']:.4f}  "
            f"{verdict:11s} counts {r['counts']}"
        )


def _positions(varying):
    # "all" -> None; ["x0", ...] -> [0, ...]
    if varying == "all" or varying is None:
        return None
    return [int(str(v).removeprefix("x")) for v in varying]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--engine", choices=["collapsed", "direct"], action="append", default=None
    )
    parser.add_argument(
        "--pooling", choices=["partial", "none", "complete"], action="append"
    )
    parser.add_argument(
        "--covariance",
        choices=["diagonal", "full"],
        default="diagonal",
        help="group_covariance of the model simulated and fitted (partial pooling)",
    )
    parser.add_argument(
        "--varying",
        nargs="+",
        choices=["x0", "x1"],
        default=None,
        help="features with a group-specific slope (partial pooling; default all)",
    )
    parser.add_argument("--n-datasets", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-groups", type=int, default=4)
    parser.add_argument("--n-per-group", type=int, default=10)
    parser.add_argument("--num-warmup", type=int, default=300)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--num-chains", type=int, default=2)
    parser.add_argument("--n-ranks", type=int, default=99)
    parser.add_argument("--n-bins", type=int, default=10)
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.01,
        help="family-wise level per engine/pooling (Bonferroni over parameters)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)
    existing = {}
    if args.out.exists():
        existing = json.loads(args.out.read_text())
    for engine in args.engine or ["collapsed", "direct"]:
        for pooling in args.pooling or ["partial", "none", "complete"]:
            result = run_sbc(
                engine,
                pooling,
                args.n_datasets,
                seed=args.seed,
                n_groups=args.n_groups,
                n_per_group=args.n_per_group,
                num_warmup=args.num_warmup,
                num_samples=args.num_samples,
                num_chains=args.num_chains,
                n_ranks=args.n_ranks,
                n_bins=args.n_bins,
                covariance=args.covariance,
                varying=_positions(args.varying),
                verbose=True,
            )
            _print(result, args.alpha)
            key = result_key(engine, pooling, args.covariance, _positions(args.varying))
            existing[key] = result
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(existing, indent=1))
            tmp.replace(args.out)


if __name__ == "__main__":
    main()
