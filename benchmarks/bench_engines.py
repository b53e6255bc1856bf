"""Engine benchmarks of issue 3, with a profile of where each fit's time goes.

Every benchmark runs in its own Python process (so that "first fit" really is
the first fit after ``import hiermask``, compilation included, and memory is
returned between benchmarks), prints a table, and saves its rows to
``benchmarks/results/<name>.csv``; all results, with the load average before
and after each benchmark, go to ``benchmarks/results/bench_engines.json`` and
the scaling curves to ``benchmarks/results/scaling.png``. The machine is shared
and noisy: compare by ratios within one run and read the load averages.

    python benchmarks/bench_engines.py --all              # everything
    python benchmarks/bench_engines.py --all --quick      # small sizes, minutes
    python benchmarks/bench_engines.py --manufacturing --million   # some
    python benchmarks/bench_engines.py --coldstart --baseline ../main

Benchmarks (targets of issue 3 in brackets):

--manufacturing  500 rows, 2 groups, 3 features: first fit [<= 3 s] and refits
                 with other prior scales [<= 0.5 s].
--coldstart      fresh processes (issue 19), each case also for the checkout
                 given by --baseline DIR, in the same run: the manufacturing
                 example's first fit without JAX's persistent cache, with it
                 empty and warm [warm <= 1.0 s]; `hiermask fit` on a 500-row
                 CSV, first and second invocation [second <= 2 s];
                 GridSearchCV 5 folds x 4 prior scales, n_jobs=2, cache off
                 and on; sampling time at 1e6 rows and at 10,000 groups
                 (4 x (100 + 100) draws there) [<= 5% slower than baseline].
--ess            10,000 rows of the manufacturing example: ESS per second of
                 the hand-written per-row NumPyro model (benchmarks/baseline.py),
                 the direct engine and the collapsed engine [>= 100x baseline].
--million        1,000,000 rows, 100 groups, 10 features, partial pooling
                 [fit <= 20 s, max r_hat <= 1.01, no divergences]; predict on
                 the 1,000,000 rows [<= 2 s].
--groups         10,000 groups of 20 rows, 5 features [fit <= 60 s].
--manygroups     10,000 and 100,000 groups of 10 rows, 3 features, at the
                 default settings (issue 17) [100,000 within 16 GB and 10x
                 the 10,000-group time]; with peak memory, what
                 posterior_ holds (group draws kept or not), leapfrog steps
                 per kept draw and per warmup iteration, and sampling time
                 per group and gradient (every chain's gradients, warmup
                 included, the chains two at a time).
--gridsearch     GridSearchCV, 5 folds x 4 prior scales, 10,000 rows, 20
                 groups [<= 30 s in all].
--scaling        fit time against rows (1e3 to 1e7; 10 groups, 3 features)
                 and against groups (2 to 10,000; 20 rows each, 3 features).
--covariance     100 groups x 3 features x 100,000 rows with correlated group
                 effects (issue 14): group_covariance "full" against
                 "diagonal" (varying="all"), each first fit in a fresh
                 process through the estimator: fit time and min bulk ESS
                 (over every diagnosed parameter) per second of the fit
                 [full within 2x of diagonal on both]; two data sets, the
                 effects' correlations drawn at x = 0 and at the means.
--fewgroups      1, 2 and 20 groups of 20 rows x 10 features (11 correlated
                 effects): group_covariance "full" against "diagonal", each
                 first fit in a fresh process (2 chains x (300 + 300)), also
                 for the checkout given by --baseline DIR: CPU seconds
                 (process_time), compile and sampling time, mean leapfrog
                 steps per draw, divergences (issue 14); and the compile
                 time of the conditional draws' factorization of an 11 x 11
                 and a 21 x 21 correlation matrix (100 draws), unrolled
                 against a loop over columns.
--missing        50,000 rows, 200 groups, 8 features, 1 chain x (100 + 100)
                 draws (issue 17): the complete data against the same rows
                 with 0.1% of the feature cells NaN (400 latent cells,
                 imputed), at the default group_covariance ("full", the
                 general model) and at "diagonal", all first fits in one
                 process: first fit and sampling time (warmup included),
                 leapfrog steps of the kept draws, sampling time over those
                 steps, and the ratios to the complete data [missing within
                 2x of complete].

The profile columns split a fit into: ``validate_s`` (input checks, masks,
everything of the estimator outside the engine), ``stats_s`` (scaling and the
sufficient statistics or row design), ``trace_s`` and ``compile_s`` (the
sampler program; 0 when a compiled program was reused), ``sample_s`` (NUTS),
``draws_s`` (the collapsed engine's exact conditional draws, compilation of
that program included the first time), ``diag_s`` (R-hat and ESS) and
``post_s`` (everything else: conversion of draws to original units).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

BENCHMARKS = (
    "manufacturing",
    "coldstart",
    "ess",
    "million",
    "groups",
    "manygroups",
    "gridsearch",
    "scaling",
    "datapass",
    "covariance",
    "fewgroups",
    "missing",
)
PHASES = (
    "validate_s",
    "stats_s",
    "trace_s",
    "compile_s",
    "sample_s",
    "draws_s",
    "diag_s",
    "post_s",
)


# --------------------------------------------------------------------------
# Instrumentation


class Profiler:
    """Times the phases of ``fit`` by wrapping the engine's module functions."""

    def __init__(self):
        from hiermask import _estimator, _fit

        self._fit, self._estimator = _fit, _estimator
        self.times = {}
        self.run_timings = {}
        self.warmup_steps = None

    def _wrap(self, name, phase, module=None):
        module = self._fit if module is None else module
        original = getattr(module, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = original(*args, **kwargs)
            if name == "run_nuts":  # the sampler's own timings, with its result
                self.run_timings = dict(out.timings)
                self.warmup_steps = np.asarray(out.stats["warmup_steps"])
            self.times[phase] = self.times.get(phase, 0.0) + (
                time.perf_counter() - start
            )
            return out

        setattr(module, name, timed)
        return module, name, original

    @contextlib.contextmanager
    def fit(self):
        """Profile one fit; ``self.row()`` then holds its phases."""
        self.times = {}
        patched = [
            self._wrap("cell_moments", "stats_s"),
            self._wrap("group_statistics", "stats_s"),
            self._wrap("prepare", "stats_s", self._fit.CollapsedEngine),
            self._wrap("prepare", "stats_s", self._fit.DirectEngine),
            self._wrap("run_nuts", "nuts_s"),
            self._wrap("_conditional", "draws_s"),
            self._wrap("_diagnose", "diag_s"),
            self._wrap("fit_posterior", "engine_s", self._estimator),
        ]
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield self
        finally:
            self.times["fit_s"] = time.perf_counter() - start
            for module, name, original in patched:
                setattr(module, name, original)
            last = self.run_timings
            self.times["trace_s"] = last.get("trace", 0.0)
            self.times["compile_s"] = last.get("compile", 0.0)
            self.times["sample_s"] = last.get("run", 0.0)

    def row(self):
        t = self.times
        engine = t.get("engine_s", 0.0)
        nuts_other = (
            t.get("nuts_s", 0.0) - t["trace_s"] - t["compile_s"] - t["sample_s"]
        )
        accounted = sum(
            t.get(k, 0.0) for k in ("stats_s", "nuts_s", "draws_s", "diag_s")
        )
        out = {"fit_s": t["fit_s"], "validate_s": t["fit_s"] - engine}
        for phase in PHASES[1:-1]:
            out[phase] = t.get(phase, 0.0)
        out["post_s"] = engine - accounted + max(nuts_other, 0.0)
        return out


def convergence(est):
    conv = est.convergence_
    return {
        "max_r_hat": conv["max_r_hat"],
        "min_ess_bulk": conv["min_ess_bulk"],
        "divergences": conv["n_divergences"],
    }


def load_average():
    return os.getloadavg()[0]


# --------------------------------------------------------------------------
# Benchmarks (each returns a list of row dicts)


def bench_manufacturing(quick):
    """First fit (compilation included) and refits with other prior scales."""
    from hiermask import MaskedHierarchicalRegressor
    from hiermask.datasets import make_manufacturing

    X, y = make_manufacturing(500, random_state=0)
    prof = Profiler()
    rows = []
    scales = (1.0, 2.0, 0.5, 5.0) if not quick else (1.0, 2.0, 0.5)
    for i, scale in enumerate(scales):
        est = MaskedHierarchicalRegressor(
            group_col="Product_Group", random_state=0, coef_prior_scale=scale
        )
        with prof.fit():
            est.fit(X, y)
        rows.append(
            {
                "case": "first fit" if i == 0 else "refit",
                "coef_prior_scale": scale,
                **prof.row(),
                **convergence(est),
                "coef": np.round(est.coef_, 3).tolist(),
                "intercept": np.round(est.intercept_, 3).tolist(),
                "noise_scale": round(est.noise_scale_, 4),
            }
        )
    start = time.perf_counter()
    est.predict(X)
    rows.append({"case": "predict 500 rows", "fit_s": time.perf_counter() - start})
    return rows


_FIRST_FIT = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
t0 = time.perf_counter()
import hiermask
from hiermask import MaskedHierarchicalRegressor
from hiermask.datasets import make_manufacturing
if sys.argv[1]:
    hiermask.enable_compilation_cache(sys.argv[1])
X, y = make_manufacturing(500, random_state=0)
t1 = time.perf_counter()
est = MaskedHierarchicalRegressor(group_col="Product_Group", random_state=0).fit(X, y)
t2 = time.perf_counter()
post = est._fitted.posterior if hasattr(est, "_fitted") else est._posterior
timings = {f"{k}_s": v for k, v in post.timings.items()}
means = {k: float(v.mean()) for k, v in est.posterior_.items()}
print(json.dumps({"import_s": t1 - t0, "fit_s": t2 - t1, **timings, "means": means}))
"""

_GRIDSEARCH = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
import hiermask
from sklearn.model_selection import GridSearchCV, KFold
from hiermask.datasets import make_grouped_regression
if sys.argv[1]:
    hiermask.enable_compilation_cache(sys.argv[1])
X, y = make_grouped_regression(10_000, 20, 3, random_state=0)
search = GridSearchCV(
    hiermask.MaskedHierarchicalRegressor(group_col="group", random_state=0),
    {"coef_prior_scale": [0.25, 0.5, 1.0, 2.0]},
    cv=KFold(5, shuffle=True, random_state=0), n_jobs=2,
)
t0 = time.perf_counter()
search.fit(X, y)
print(json.dumps({"fit_s": time.perf_counter() - t0,
                  "best": search.best_params_["coef_prior_scale"]}))
"""

_SAMPLING = """
import json, sys, warnings
warnings.simplefilter("ignore")
from hiermask import MaskedHierarchicalRegressor
from hiermask.datasets import make_grouped_regression
n_rows, n_groups, n_features, warmup, samples = map(int, sys.argv[1:6])
X, y = make_grouped_regression(n_rows, n_groups, n_features, random_state=0)
# version 0.1's model on every checkout (a baseline from before issue 14 has
# no such parameters), so that only the sampler's code differs
old_model = {"varying": "all", "group_covariance": "diagonal"}
if "varying" not in MaskedHierarchicalRegressor().get_params():
    old_model = {}
est = MaskedHierarchicalRegressor(
    group_col="group", random_state=0, num_warmup=warmup, num_samples=samples,
    **old_model,
).fit(X, y)
post = est._fitted.posterior if hasattr(est, "_fitted") else est._posterior
timings = {f"{k}_s": v for k, v in post.timings.items()}
means = {k: float(v.mean()) for k, v in est.posterior_.items()}
print(json.dumps({**timings, "means": means}))
"""


def _fresh(code, root, *args, env=None):
    """Run ``code`` in a fresh Python on ``root``'s hiermask: (wall s, its JSON)."""
    env = {**os.environ, "PYTHONPATH": str(root), **(env or {})}
    env.pop("HIERMASK_NO_CACHE", None)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=root,  # python -c puts the working folder first on sys.path
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return time.perf_counter() - start, json.loads(done.stdout.splitlines()[-1])


def _checkouts(baseline):
    # (label, root): this checkout, then the baseline's when given.
    roots = [("this", HERE.parent)]
    if baseline:
        commit = subprocess.run(
            ["git", "-C", baseline, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        roots.append((f"baseline {commit or baseline}", Path(baseline)))
    return roots


def _same_draws(rows):
    # Whether each row's posterior means equal those of the first row of its
    # benchmark and case (this checkout's): the same draws.
    first = {}
    for row in rows:
        if "means" in row:
            means = row.pop("means")
            row["same_draws"] = means == first.setdefault(
                (row["bench"], row["case"]), means
            )


def bench_coldstart(quick, baseline=None):
    """Fresh processes: first fit, the command line, parallel model selection.

    Every case runs this checkout and, with ``--baseline DIR``, another
    checkout (main) in the same run, one after the other.
    """
    rows = []
    roots = _checkouts(baseline)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # The manufacturing example's first fit: no cache, cold, warm.
        for case in ("no persistent cache", "cache cold (empty)", "cache warm"):
            for label, root in roots:
                folder = tmp / f"fit-{label}"
                wall, out = _fresh(_FIRST_FIT, root, "" if case[0] == "n" else folder)
                rows.append(
                    {
                        "bench": "first fit",
                        "code": label,
                        "case": case,
                        "wall_s": wall,
                        **out,
                    }
                )
        # `hiermask fit` on a 500-row CSV, twice (the cache in XDG_CACHE_HOME).
        from hiermask.datasets import make_manufacturing

        X, y = make_manufacturing(500, random_state=0)
        X.assign(y=y).to_csv(tmp / "rows.csv", index=False)
        command = [
            "-m",
            "hiermask",
            "fit",
            str(tmp / "rows.csv"),
            "--target",
            "y",
            "--group",
            "Product_Group",
            "--quiet",
            "--out",
            str(tmp / "m.hmz"),
        ]
        for label, root in roots:
            env = {"PYTHONPATH": str(root), "XDG_CACHE_HOME": str(tmp / f"xdg-{label}")}
            for case in ("first invocation", "second invocation"):
                start = time.perf_counter()
                subprocess.run(
                    [sys.executable, *command],
                    cwd=root,  # python -m, too, puts the working folder first
                    env={**os.environ, **env},
                    check=True,
                    capture_output=True,
                )
                rows.append(
                    {
                        "bench": "hiermask fit 500-row CSV",
                        "code": label,
                        "case": case,
                        "wall_s": time.perf_counter() - start,
                    }
                )
        # GridSearchCV, 5 folds x 4 prior scales, n_jobs=2: cache off, then on
        # (cold: the workers fill it and share it).
        for label, root in roots:
            for case, folder in (("cache off", ""), ("cache on", tmp / f"gs-{label}")):
                wall, out = _fresh(_GRIDSEARCH, root, folder)
                rows.append(
                    {
                        "bench": "GridSearchCV 5x4 n_jobs=2",
                        "code": label,
                        "case": case,
                        "wall_s": wall,
                        **out,
                    }
                )
        # Sampling time, segments against the baseline's single program.
        sizes = [
            ("1e6 rows, 100 groups, 10 features", 1_000_000, 100, 10, 500, 1000),
            ("10,000 groups, 5 features", 200_000, 10_000, 5, 100, 100),
        ]
        if quick:
            sizes = [(c, n // 10, g // 10, f, w, s) for c, n, g, f, w, s in sizes]
        for case, *size in sizes:
            for label, root in roots:
                wall, out = _fresh(_SAMPLING, root, *size)
                rows.append(
                    {
                        "bench": "sampling",
                        "code": label,
                        "case": case,
                        "draws": f"4 x ({size[3]} + {size[4]})",
                        "wall_s": wall,
                        **out,
                    }
                )
    _same_draws(rows)
    return rows


def _min_ess(chains_draws):
    from numpyro.diagnostics import effective_sample_size

    return float(np.min(effective_sample_size(chains_draws)))


def bench_ess(quick):
    """ESS/s of the hand-written model, the direct and the collapsed engine.

    The same data (manufacturing example) and the same model: independent
    Normal(0, 5) priors per group, HalfNormal(5) noise, in raw units, which
    is hiermask's ``pooling="none", standardize=False`` with prior scales 5.
    The minimum ESS is NumPyro's (not rank-normalized) over the same
    parameters for all: intercepts, applicable coefficients, noise scale.
    """
    from baseline import _manufacturing_inputs, fit_baseline

    from hiermask import MaskedHierarchicalRegressor
    from hiermask.datasets import make_manufacturing

    n_rows = 2_000 if quick else 10_000
    X, y = make_manufacturing(n_rows, random_state=0)
    feats, target, group_idx, mask = _manufacturing_inputs(n_rows, 0)
    rows = []
    base = fit_baseline(feats, target, group_idx, mask, seed=0)
    rows.append(
        {
            "case": "baseline per-row NumPyro (float32)",
            "draws": "4 x (200 + 300)",
            "fit_s": base["wall_s"],
            "min_ess": base["min_ess"],
            "ess_per_s": base["ess_per_s"],
            "max_r_hat": base["max_r_hat"],
            "divergences": base["n_divergences"],
        }
    )
    model = {
        "pooling": "none",
        "standardize": False,
        "coef_prior_scale": 5.0,
        "intercept_prior_scale": 5.0,
        "noise_prior_scale": 5.0,
    }
    prof = Profiler()
    on = mask.astype(bool)
    for engine in ("direct", "collapsed"):
        est = MaskedHierarchicalRegressor(
            group_col="Product_Group", engine=engine, random_state=0, **model
        )
        with prof.fit():
            est.fit(X, y)
        post = est.posterior_
        n_chains = est.num_chains
        params = [post["intercept"], post["coef"][:, on], post["noise"][:, None]]
        ess = min(
            _min_ess(p.reshape(n_chains, -1, p.shape[-1]).astype(np.float64))
            for p in params
        )
        row = prof.row()
        rows.append(
            {
                "case": f"{engine} engine (float64)",
                "draws": f"4 x ({est.num_warmup} + {est.num_samples})",
                "fit_s": row["fit_s"],
                "min_ess": ess,
                "ess_per_s": ess / row["fit_s"],
                "max_r_hat": est.convergence_["max_r_hat"],
                "divergences": est.convergence_["n_divergences"],
                **{k: v for k, v in row.items() if k != "fit_s"},
            }
        )
    for row in rows:
        row["vs_baseline"] = row["ess_per_s"] / rows[0]["ess_per_s"]
    return rows


def _profiled_fit(X, y, label, predict=False, profiler=None, **params):
    # profiler: a Profiler to read more from after the fit (a new one if None)
    from hiermask import MaskedHierarchicalRegressor

    est = MaskedHierarchicalRegressor(group_col="group", random_state=0, **params)
    prof = Profiler() if profiler is None else profiler
    with prof.fit():
        est.fit(X, y)
    row = {"case": label, "rows": len(y), **prof.row(), **convergence(est)}
    if predict:
        start = time.perf_counter()
        est.predict(X)
        row["predict_s"] = time.perf_counter() - start
        start = time.perf_counter()
        est.predict(X, return_std=True)
        row["predict_std_s"] = time.perf_counter() - start
    return row, est


def bench_million(quick):
    """1e6 rows, 100 groups, 10 features, partial pooling; predict 1e6 rows."""
    from hiermask.datasets import make_grouped_regression

    n_rows = 100_000 if quick else 1_000_000
    X, y = make_grouped_regression(n_rows, 100, 10, random_state=0)
    row, _ = _profiled_fit(X, y, "100 groups x 10 features", predict=True)
    return [row]


def bench_groups(quick):
    """10,000 groups of 20 rows, 5 features."""
    from hiermask.datasets import make_grouped_regression

    n_groups = 1_000 if quick else 10_000
    X, y = make_grouped_regression(20 * n_groups, n_groups, 5, random_state=0)
    row, est = _profiled_fit(X, y, f"{n_groups} groups x 5 features", predict=True)
    return [{**row, **_held(est)}]


def _held(est):
    """Whether fit kept the group draws, and the MB its posterior_ holds now."""
    model = est._fitted
    draws = model.draws if model.kept_group_draws else model.draws.others
    return {
        "group_draws_kept": model.kept_group_draws,
        "posterior_mb": sum(np.asarray(v).nbytes for v in draws.values()) / 1e6,
    }


def bench_manygroups(quick):
    """10,000 and 100,000 groups of 10 rows, 3 features (issue 17)."""
    import resource

    from hiermask.datasets import make_grouped_regression

    rows = []
    for n_groups in (1_000, 10_000) if quick else (10_000, 100_000):
        X, y = make_grouped_regression(10 * n_groups, n_groups, 3, random_state=0)
        prof = Profiler()
        row, est = _profiled_fit(
            X, y, f"{n_groups} groups x 3 features", predict=True, profiler=prof
        )
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        # leapfrog steps per kept draw and per warmup iteration, and the
        # sampling time per group and gradient: the chains (one per
        # program at these sizes) run two at a time on the 2 cores
        kept = np.asarray(est._fitted.posterior.tree_steps)
        warm = prof.warmup_steps
        gradients = (kept.sum() + warm.sum()) / 2
        rows.append(
            {
                **row,
                **_held(est),
                "peak_rss_mb": peak,
                "steps_per_draw": float(kept.mean()),
                "steps_per_warmup": float(warm.mean() / est.num_warmup),
                "us_per_group_gradient": row["sample_s"] / gradients / n_groups * 1e6,
            }
        )
        del X, y, est
    rows[-1]["fit_vs_first"] = rows[-1]["fit_s"] / rows[0]["fit_s"]
    return rows


def bench_gridsearch(quick):
    """GridSearchCV over 4 prior scales, 5 folds, 10,000 rows and 20 groups."""
    from sklearn.model_selection import GridSearchCV, KFold

    from hiermask import MaskedHierarchicalRegressor
    from hiermask._runner import cache_info
    from hiermask.datasets import make_grouped_regression

    X, y = make_grouped_regression(10_000, 20, 3, random_state=0)
    search = GridSearchCV(
        MaskedHierarchicalRegressor(group_col="group", random_state=0),
        {"coef_prior_scale": [0.25, 0.5, 1.0, 2.0]},
        cv=KFold(3 if quick else 5, shuffle=True, random_state=0),
    )
    traces = cache_info().misses
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        search.fit(X, y)
        seconds = time.perf_counter() - start
    n_fits = len(search.cv_results_["params"]) * search.n_splits_ + 1
    return [
        {
            "case": f"{search.n_splits_} folds x 4 prior scales + refit",
            "fits": n_fits,
            "fit_s": seconds,
            "per_fit_s": seconds / n_fits,
            "compilations": cache_info().misses - traces,
            "best": search.best_params_["coef_prior_scale"],
        }
    ]


def bench_scaling(quick):
    """Fit time against rows (10 groups) and against groups (20 rows each)."""
    from hiermask.datasets import make_grouped_regression

    row_sizes = [1_000, 10_000, 100_000, 1_000_000] + ([] if quick else [10_000_000])
    group_sizes = [2, 10, 100, 1_000] + ([] if quick else [10_000])
    rows = []
    for n_rows in row_sizes:
        X, y = make_grouped_regression(n_rows, 10, 3, random_state=0)
        row, _ = _profiled_fit(X, y, "rows", predict=True)
        rows.append({"axis": "rows", "size": n_rows, **row})
        del X, y
    for n_groups in group_sizes:
        X, y = make_grouped_regression(20 * n_groups, n_groups, 3, random_state=0)
        row, _ = _profiled_fit(X, y, "groups", predict=True)
        rows.append({"axis": "groups", "size": n_groups, **row})
        del X, y
    return rows


def plot_scaling(rows, path):
    """Fit time (and its main phases) against rows and against groups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, axis, label in (
        (axes[0], "rows", "rows (10 groups, 3 features)"),
        (axes[1], "groups", "groups (20 rows each, 3 features)"),
    ):
        pts = sorted(
            (r for r in rows if r.get("axis") == axis), key=lambda r: r["size"]
        )
        if not pts:
            continue
        size = [r["size"] for r in pts]
        for key, style in (
            ("fit_s", "o-"),
            ("sample_s", "s--"),
            ("stats_s", "^:"),
            ("validate_s", "v:"),
            ("predict_s", "d-."),
        ):
            ax.loglog(size, [max(r.get(key, 0.0), 1e-3) for r in pts], style, label=key)
        ax.set_xlabel(label)
        ax.set_ylabel("seconds")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        "hiermask collapsed engine, 4 chains x (500 + 1000) iterations "
        "(first fit of each shape: compile included)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _memory_kb():
    # (peak, current) resident memory of this process, kB (Linux).
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmHWM"].split()[0]), int(status["VmRSS"].split()[0])


def _reset_peak_memory():
    # Linux: writing 5 to clear_refs resets the peak resident size.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _numpy_pass(X, y, g, n_groups):
    # The reference: sort the rows by group, then every group's Gram matrix
    # and X'y with BLAS.
    order = np.argsort(g, kind="stable")
    xt = np.column_stack([np.ones(len(y)), X])[order]
    ys = y[order]
    bounds = np.searchsorted(g[order], np.arange(n_groups + 1))
    return [
        (xt[a:b].T @ xt[a:b], xt[a:b].T @ ys[a:b])
        for a, b in itertools.pairwise(bounds)
    ]


def bench_datapass(quick):
    """1e7 rows x 10 groups x 3 features: fit and predict against NumPy passes.

    The sampler is compiled first (a fit of 10,000 rows with the same groups
    and features), so the fit's time is its pass over the data plus a short
    run. Peak memory is the resident high-water mark during the fit, above
    what the process held before it, against the input's size.
    """
    from hiermask import MaskedHierarchicalRegressor

    n_rows, n_groups, n_features = (1_000_000 if quick else 10_000_000), 10, 3
    rng = np.random.default_rng(0)
    g = rng.integers(0, n_groups, n_rows)
    X = rng.normal(size=(n_rows, n_features))
    y = X @ np.array([1.0, -0.5, 0.2]) + 0.1 * g + rng.normal(size=n_rows)
    Xg = np.column_stack([g, X])
    del X
    params = dict(
        group_col=0,
        num_warmup=50,
        num_samples=50,
        num_chains=1,
        on_bad_convergence="ignore",
        random_state=0,
    )
    MaskedHierarchicalRegressor(**params).fit(Xg[:10_000], y[:10_000])
    start = time.perf_counter()
    _numpy_pass(Xg[:, 1:], y, g, n_groups)
    numpy_s = time.perf_counter() - start
    _reset_peak_memory()
    before = _memory_kb()[1]
    est = MaskedHierarchicalRegressor(**params)
    prof = Profiler()
    with prof.fit():
        est.fit(Xg, y)
    peak = _memory_kb()[0] - before
    timing = prof.row()
    start = time.perf_counter()
    est.predict(Xg)
    predict_s = time.perf_counter() - start
    ic, cf, Xf = est.intercept_, est.coef_, Xg[:, 1:]
    start = time.perf_counter()
    _ = ic[g] + (Xf * cf[g]).sum(1)
    numpy_predict_s = time.perf_counter() - start
    input_mb = (Xg.nbytes + y.nbytes) / 1e6
    return [
        {
            "rows": n_rows,
            "numpy_pass_s": numpy_s,
            "fit_s": timing["fit_s"],
            "fit_vs_numpy": timing["fit_s"] / numpy_s,
            "validate_s": timing["validate_s"],
            "stats_s": timing["stats_s"],
            "sampler_s": timing["sample_s"] + timing["trace_s"] + timing["compile_s"],
            "predict_s": predict_s,
            "numpy_predict_s": numpy_predict_s,
            "predict_vs_numpy": predict_s / numpy_predict_s,
            "input_mb": input_mb,
            "fit_peak_extra_mb": peak / 1e3,
            "peak_vs_input": peak / 1e3 / input_mb,
        }
    ]


def _covariance_data(quick, at="zero"):
    # 100 groups x 3 features, intercept and slopes correlated across groups;
    # the intercept's effect and the correlations hold at x = 0 ("zero") or
    # at the feature means 3, -1, 10 ("means", where "full" places them).
    rng = np.random.default_rng(14)
    n_groups, p = 100, 3
    n_rows = 20_000 if quick else 100_000
    group_idx = np.sort(rng.integers(0, n_groups, size=n_rows))
    X = rng.normal(size=(n_rows, p)) * [1.0, 2.0, 0.5] + [3.0, -1.0, 10.0]
    sd = np.array([1.0, 0.5, 0.3, 0.4])
    corr = np.full((p + 1, p + 1), 0.3) + 0.7 * np.eye(p + 1)
    corr[0, 1] = corr[1, 0] = -0.6
    effects = rng.multivariate_normal(
        np.zeros(p + 1), sd[:, None] * corr * sd, n_groups
    )
    coef = np.array([1.0, -0.5, 2.0]) + effects[:, 1:]
    intercept = effects[:, 0]
    if at == "means":
        intercept = intercept - effects[:, 1:] @ np.array([3.0, -1.0, 10.0])
    y = 5.0 + intercept[group_idx] + np.sum(coef[group_idx] * X, axis=1)
    return X, y + rng.normal(0.0, 1.0, size=n_rows), group_idx, n_groups


def covariance_fit(covariance, quick, at="zero"):
    """One first fit through the estimator (fresh process); a result row."""
    import pandas as pd

    X, y, group_idx, _ = _covariance_data(quick, at)
    frame = pd.DataFrame(X, columns=["x0", "x1", "x2"]).assign(group=group_idx)
    row, est = _profiled_fit(
        frame, y, covariance, group_covariance=covariance, varying="all"
    )
    diverging = est.convergence_["n_divergences"]
    return {
        "case": covariance,
        "rows": len(y),
        "first_fit_s": row["fit_s"],
        **{k: row[k] for k in ("stats_s", "trace_s", "compile_s", "sample_s")},
        "draws_s": row["draws_s"],
        "min_ess_bulk": row["min_ess_bulk"],
        "ess_per_s": row["min_ess_bulk"] / row["fit_s"],
        "ess_per_sample_s": row["min_ess_bulk"] / row["sample_s"],
        "max_r_hat": row["max_r_hat"],
        "divergences": diverging,
    }


def bench_covariance(quick):
    """group_covariance "full" against "diagonal": first fit and ESS/s.

    Two data sets: the group effects' correlations hold at x = 0 (far from
    the data: x2's mean is 20 of its sds from 0, so at the means, where
    "full" places the effects, they correlate at about 0.87), or at the
    feature means.
    """
    rows = []
    for at in ("zero", "means"):
        pair = []
        for covariance in ("diagonal", "full"):
            done = subprocess.run(
                [sys.executable, __file__, "--covariance-fit", covariance]
                + ["--covariance-at", at]
                + (["--quick"] if quick else []),
                capture_output=True,
                text=True,
                check=True,
            )
            pair.append({"effects_at": at, **json.loads(done.stdout.splitlines()[-1])})
        for row in pair:
            row["fit_vs_diagonal"] = row["first_fit_s"] / pair[0]["first_fit_s"]
            row["ess_per_s_vs_diagonal"] = row["ess_per_s"] / pair[0]["ess_per_s"]
        rows += pair
    return rows


FEWGROUPS_CODE = """
import json, sys, time, warnings
import numpy as np, pandas as pd
cpu0 = time.process_time()
from hiermask import MaskedHierarchicalRegressor
n_groups, covariance = int(sys.argv[1]), sys.argv[2]
p, n = 10, 20
rng = np.random.default_rng(0)
names = [f"x{j}" for j in range(p)]
X = pd.DataFrame(rng.normal(size=(n_groups * n, p)), columns=names)
X["g"] = np.repeat(np.arange(n_groups), n)
coef = rng.normal(size=(n_groups, p))
y = np.sum(X.drop(columns="g").to_numpy() * coef[X["g"]], axis=1)
y = y + rng.normal(size=n_groups * n)
est = MaskedHierarchicalRegressor(
    group_col="g", group_covariance=covariance, num_warmup=300, num_samples=300,
    num_chains=2, random_state=0, on_bad_convergence="ignore",
)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    cpu = time.process_time()
    est.fit(X, y)
    cpu = time.process_time() - cpu
post = est._fitted.posterior if hasattr(est, "_fitted") else est._posterior
print(json.dumps({
    "fit_cpu_s": cpu,
    "process_cpu_s": time.process_time() - cpu0,
    **{f"{k}_s": post.timings[k] for k in ("trace", "compile", "run")},
    "mean_steps": float(np.mean(post.tree_steps)),
    "divergences": int(np.sum(post.diverging)),
    "max_r_hat": est.convergence_["max_r_hat"],
    "min_ess_bulk": est.convergence_["min_ess_bulk"],
    "correlation": "group_correlation" in est.posterior_,
    "warnings": len({str(w.message) for w in caught}),
}))
"""


CHOLESKY_CODE = """
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from hiermask import _collapsed, _general
from hiermask._xla import compiler_options
q = int(sys.argv[1])

def unrolled(m):  # the conditional draws' factorization before issue 14's fix
    chol = _collapsed._cholesky_entries(m)
    zero = jnp.zeros(())
    return jnp.stack([jnp.stack([chol.get((i, j), zero) for j in range(q)])
                      for i in range(q)])

a = np.random.default_rng(0).normal(size=(100, q, q))
m = a @ np.swapaxes(a, 1, 2) + q * np.eye(q)
out = {}
with jax.enable_x64(True):
    for name, fn in (("unrolled", unrolled), ("loop", _general._small_cholesky)):
        start = time.perf_counter()
        jax.jit(jax.vmap(fn)).lower(m).compile(compiler_options())
        out[f"{name}_compile_s"] = time.perf_counter() - start
print(json.dumps(out))
"""


def bench_fewgroups(quick, baseline=None):
    """Covariance "full" against "diagonal": few groups, 11 correlated effects;
    and the compile time of the conditional draws' factorization of the
    correlation matrix (one per draw, 100 draws), unrolled against a loop."""
    rows = []
    for q in (11,) if quick else (11, 21):
        _, out = _fresh(CHOLESKY_CODE, HERE.parent, q)
        rows.append({"checkout": "this", "case": f"factorize {q} x {q}", **out})
    for label, root in _checkouts(baseline):
        for n_groups in (1, 2) if quick else (1, 2, 20):
            for covariance in ("diagonal", "full"):
                wall, out = _fresh(FEWGROUPS_CODE, root, n_groups, covariance)
                rows.append(
                    {
                        "checkout": label,
                        "case": f"{n_groups} groups, {covariance}",
                        "wall_s": wall,
                        **out,
                    }
                )


def _missing_data(quick):
    # 50,000 rows x 200 groups x 8 features, and a copy with 0.1% of the
    # feature cells NaN (at random).
    from hiermask.datasets import make_grouped_regression

    n_rows = 10_000 if quick else 50_000
    X, y = make_grouped_regression(n_rows, 200, 8, random_state=0)
    rng = np.random.default_rng(17)
    features = [c for c in X.columns if c != "group"]
    values = X[features].to_numpy(copy=True)
    holes = rng.choice(values.size, size=values.size // 1000, replace=False)
    values.flat[holes] = np.nan
    holed = X.copy()
    holed[features] = values
    return X, holed, y, len(holes)


def bench_missing(quick):
    """Complete data against 0.1% NaN cells: first fit, sampling, per step."""
    X, holed, y, n_cells = _missing_data(quick)
    settings = {"num_warmup": 100, "num_samples": 100, "num_chains": 1}
    rows = []
    for covariance in ("full", "diagonal"):
        for label, frame in (("complete", X), (f"{n_cells} NaN cells", holed)):
            cpu = time.process_time()
            row, est = _profiled_fit(
                frame,
                y,
                f"{covariance}, {label}",
                group_covariance=covariance,
                **settings,
            )
            steps = int(np.sum(est._fitted.posterior.tree_steps))
            rows.append(
                {
                    "case": row["case"],
                    "latent_cells": 0 if frame is X else n_cells,
                    "first_fit_s": row["fit_s"],
                    "fit_cpu_s": time.process_time() - cpu,
                    **{k: row[k] for k in ("compile_s", "sample_s", "draws_s")},
                    "steps": steps,
                    "us_per_step": 1e6 * row["sample_s"] / steps,
                    "divergences": row["divergences"],
                }
            )
        complete, missing = rows[-2], rows[-1]
        for key in ("first_fit_s", "sample_s", "us_per_step"):
            missing[f"{key[:-2] if key.endswith('_s') else key}_vs_complete"] = (
                missing[key] / complete[key]
            )
    return rows


RUNNERS = {
    "manufacturing": bench_manufacturing,
    "coldstart": bench_coldstart,
    "ess": bench_ess,
    "million": bench_million,
    "groups": bench_groups,
    "manygroups": bench_manygroups,
    "gridsearch": bench_gridsearch,
    "scaling": bench_scaling,
    "datapass": bench_datapass,
    "covariance": bench_covariance,
    "fewgroups": bench_fewgroups,
    "missing": bench_missing,
}


# --------------------------------------------------------------------------
# Output


def _fmt(value):
    if isinstance(value, float):
        if value != value:  # nan
            return "nan"
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def print_table(name, rows):
    keys = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    width = {k: max(len(k), *(len(_fmt(r.get(k, ""))) for r in rows)) for k in keys}
    print(f"\n== {name}")
    print("  ".join(k.rjust(width[k]) for k in keys))
    for row in rows:
        print("  ".join(_fmt(row.get(k, "")).rjust(width[k]) for k in keys))


def save_csv(name, rows):
    keys = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(RESULTS / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()}
            )


def run_child(name, quick, out, baseline=None):
    """Run one benchmark in this process and write its result as JSON."""
    start_load = load_average()
    start = time.perf_counter()
    rows = RUNNERS[name](quick, **({"baseline": baseline} if baseline else {}))
    payload = {
        "rows": rows,
        "seconds": time.perf_counter() - start,
        "load_average_start": start_load,
        "load_average_end": load_average(),
    }
    Path(out).write_text(json.dumps(payload, default=float))


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for name in BENCHMARKS:
        parser.add_argument(f"--{name}", action="store_true", help=f"run {name}")
    parser.add_argument("--all", action="store_true", help="run every benchmark")
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="--coldstart, --fewgroups: also run the checkout in DIR (e.g. main), "
        "in the same run",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--covariance-fit", help=argparse.SUPPRESS)
    parser.add_argument("--covariance-at", default="zero", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.covariance_fit:
        print(
            json.dumps(
                covariance_fit(args.covariance_fit, args.quick, args.covariance_at)
            )
        )
        return
    if args.child:
        run_child(args.child, args.quick, args.out, args.baseline)
        return
    names = [n for n in BENCHMARKS if args.all or getattr(args, n)]
    if not names:
        parser.error("choose benchmarks (--manufacturing ... or --all)")
    RESULTS.mkdir(exist_ok=True)
    summary_path = RESULTS / "bench_engines.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            command = [sys.executable, __file__, "--child", name, "--out", str(out)]
            if args.quick:
                command.append("--quick")
            if args.baseline:
                command += ["--baseline", args.baseline]
            subprocess.run(command, check=True)
            payload = json.loads(out.read_text())
        payload["quick"] = args.quick
        summary[name] = payload
        print_table(
            f"{name} (load average {payload['load_average_start']:.2f} -> "
            f"{payload['load_average_end']:.2f}, {payload['seconds']:.0f} s)",
            payload["rows"],
        )
        save_csv(name, payload["rows"])
        if name == "scaling":
            plot_scaling(payload["rows"], RESULTS / "scaling.png")
        summary_path.write_text(json.dumps(summary, indent=1, default=float))


if __name__ == "__main__":
    main()
