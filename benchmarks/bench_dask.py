"""Fit on a Dask data frame generated lazily per partition (issue 6).

Measures, on a ``distributed.LocalCluster`` of this machine:

- the statistics passes of a dask fit (pass 1: labels, counts, moments;
  pass 2: per-group sufficient statistics), in rows per second, against one
  single-process NumPy pass over the same rows (each chunk generated in
  process, then :func:`hiermask._stats.group_statistics`);
- the whole fit time (both passes, NUTS and post-processing on the client);
- the peak resident memory of every worker process and of the client.

No data is stored: every partition is generated from its seed when a task
needs it, so the two passes generate it twice, as they would read a Parquet
file twice. Run it niced on a shared machine::

    nice -n 10 python benchmarks/bench_dask.py            # 1e8 rows
    nice -n 10 python benchmarks/bench_dask.py --rows 2_000_000 --partitions 8

Results go to ``benchmarks/results/<name>.json`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results"


def design(n_groups, n_features, seed):
    """Group-level truth: coefficients, intercepts and the structural mask."""
    rng = np.random.default_rng([seed, 2**31])
    coef = rng.normal(1.0, 0.5, size=(n_groups, n_features))
    intercept = rng.normal(0.0, 1.0, size=n_groups)
    off = rng.random((n_groups, n_features)) < 0.1
    off[:, 0] = False  # every group keeps feature 0
    return coef, intercept, off


def make_partition(number, n_rows, n_features, n_groups, seed):
    """One partition: int group labels, features (NaN where off), target."""
    coef, intercept, off = design(n_groups, n_features, seed)
    rng = np.random.default_rng([seed, number])
    group = rng.integers(0, n_groups, size=n_rows)
    X = rng.standard_normal((n_rows, n_features))
    X *= np.linspace(0.5, 2.0, n_features)
    X += np.linspace(-3.0, 3.0, n_features)
    on = ~off[group]
    y = intercept[group] + np.einsum("ij,ij->i", np.where(on, X, 0.0), coef[group])
    y += rng.normal(0.0, 1.0, size=n_rows)
    X[~on] = np.nan
    frame = pd.DataFrame(X, columns=[f"x{j}" for j in range(n_features)])
    frame["group"] = group.astype(np.int32)
    frame["y"] = y
    return frame


def partition_sizes(rows, partitions):
    base, extra = divmod(rows, partitions)
    return [base + (i < extra) for i in range(partitions)]


def peak_rss_bytes():
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds():
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_dask_fit(args, sizes):
    import dask.dataframe as dd
    from distributed import Client, LocalCluster

    import hiermask._dask as hdask
    import hiermask._estimator as hestimator
    from hiermask import MaskedHierarchicalRegressor

    timings = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timings[name] = time.perf_counter() - start

        return wrapper

    # Time the two passes inside the estimator's fit.
    hdask.summarize = timed("pass1_s", hdask.summarize)
    hdask.fit_statistics = timed("pass2_s", hdask.fit_statistics)
    statistics = {}
    real_fit_statistics = hdask.fit_statistics

    def keep(*a, **k):
        out = real_fit_statistics(*a, **k)
        statistics["value"] = out
        return out

    hdask.fit_statistics = keep
    hestimator.posterior_from_statistics = timed(
        "sampling_s", hestimator.posterior_from_statistics
    )

    meta = make_partition(0, 0, args.features, args.groups, args.seed)
    with (
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        frame = dd.from_map(
            make_partition,
            list(range(len(sizes))),
            sizes,
            args=(args.features, args.groups, args.seed),
            meta=meta,
            enforce_metadata=False,
        )
        features = [f"x{j}" for j in range(args.features)] + ["group"]
        est = MaskedHierarchicalRegressor(
            group_col="group",
            num_warmup=args.num_warmup,
            num_samples=args.num_samples,
            num_chains=args.num_chains,
            on_bad_convergence="ignore",
            random_state=args.seed,
        )
        # Workers import hiermask (and JAX) once, before the clock starts.
        client.run(lambda: __import__("hiermask._dask"))
        worker_cpu = client.run(cpu_seconds)
        timings["load_average_fit_start"] = os.getloadavg()
        start = time.perf_counter()
        est.fit(frame[features], frame["y"])
        timings["fit_s"] = time.perf_counter() - start
        timings["load_average_fit_end"] = os.getloadavg()
        # Workers are idle while the client samples: their CPU time is the
        # two passes' (generation included).
        after = client.run(cpu_seconds)
        timings["worker_cpu_s"] = sum(after[k] - worker_cpu[k] for k in after)
        worker_peak = client.run(peak_rss_bytes)
    timings["worker_peak_rss_bytes"] = sorted(worker_peak.values())
    timings["client_peak_rss_bytes"] = peak_rss_bytes()
    timings["convergence"] = est.convergence_
    timings["n_groups_fitted"] = len(est.groups_)
    timings["mask_on_share"] = float(est.mask_.to_numpy().mean())
    return timings, statistics["value"], est


def run_numpy_pass(args, sizes, fit_stats, groups_):
    """One single-process pass: generate each chunk, then group_statistics."""
    from hiermask._stats import group_statistics

    active = fit_stats.mask.any(axis=0)
    mask = fit_stats.mask[:, active]
    index = pd.Index(groups_.astype(np.int64))
    gram = np.zeros_like(fit_stats.stats.gram)
    generate_s = stats_s = 0.0
    load_start, cpu_start = os.getloadavg(), time.process_time()
    for number, n_rows in enumerate(sizes):
        start = time.perf_counter()
        part = make_partition(number, n_rows, args.features, args.groups, args.seed)
        X = part.iloc[:, : args.features].to_numpy()[:, active]
        y = part["y"].to_numpy()
        group_idx = index.get_indexer(part["group"].to_numpy(np.int64))
        w = np.ones(n_rows)
        middle = time.perf_counter()
        gram += group_statistics(X, y, w, group_idx, mask, fit_stats.scaling).gram
        stats_s += time.perf_counter() - middle
        generate_s += middle - start
    scale = np.max(np.abs(gram))
    max_diff = float(np.max(np.abs(gram - fit_stats.stats.gram)) / scale)
    return {
        "load_average_numpy_start": load_start,
        "load_average_numpy_end": os.getloadavg(),
        "numpy_cpu_s": time.process_time() - cpu_start,
        "numpy_generate_s": generate_s,
        "numpy_stats_s": stats_s,
        "numpy_total_s": generate_s + stats_s,
        "gram_max_rel_diff_vs_dask": max_diff,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000_000)
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--groups", type=int, default=1000)
    parser.add_argument(
        "--partitions", type=int, default=None, help="default: rows / 500,000"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--num-warmup", type=int, default=200)
    parser.add_argument("--num-samples", type=int, default=200)
    # One chain: the sampler's cost (client side, O(groups x features^3) per
    # gradient) dominates the fit at 1,000 groups x 20 features here. (Two
    # chains of this model once hung: jaxlib's batched LAPACK kernels in two
    # programs at once; fixed by hiermask._xla.exclusive.)
    parser.add_argument("--num-chains", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--skip-numpy", action="store_true", help="skip the single-process pass"
    )
    parser.add_argument("--name", default="dask", help="results file name")
    args = parser.parse_args(argv)
    partitions = args.partitions or max(1, args.rows // 500_000)
    sizes = partition_sizes(args.rows, partitions)

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    load_before = os.getloadavg()
    dask_result, fit_stats, est = run_dask_fit(args, sizes)
    numpy_result = {}
    if not args.skip_numpy:
        numpy_result = run_numpy_pass(args, sizes, fit_stats, est.groups_)
    rows = args.rows
    stats_s = dask_result["pass1_s"] + dask_result["pass2_s"]
    result = {
        "rows": rows,
        "features": args.features,
        "groups": args.groups,
        "partitions": partitions,
        "workers": args.workers,
        "threads_per_worker": 1,
        "num_warmup": args.num_warmup,
        "num_samples": args.num_samples,
        "num_chains": args.num_chains,
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        **dask_result,
        "stats_passes_s": stats_s,
        "other_s": dask_result["fit_s"] - stats_s - dask_result["sampling_s"],
        "dask_stats_rows_per_s": rows / stats_s,
        "dask_pass2_rows_per_s": rows / dask_result["pass2_s"],
        "dask_stats_rows_per_worker_cpu_s": rows / dask_result["worker_cpu_s"],
        **numpy_result,
    }
    if numpy_result:
        result["numpy_rows_per_s"] = rows / numpy_result["numpy_total_s"]
        result["numpy_stats_only_rows_per_s"] = rows / numpy_result["numpy_stats_s"]
        result["numpy_rows_per_cpu_s"] = rows / numpy_result["numpy_cpu_s"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    flat = {k: v for k, v in result.items() if not isinstance(v, dict | list | tuple)}
    flat["worker_peak_rss_mb_max"] = max(result["worker_peak_rss_bytes"]) / 2**20
    with open(RESULTS / f"{args.name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat))
        writer.writeheader()
        writer.writerow(flat)

    mb = 2**20
    lines = [
        ("rows x features, groups", f"{rows:,} x {args.features}, {args.groups:,}"),
        ("partitions, workers", f"{partitions}, {args.workers} x 1 thread"),
        ("dask pass 1 (labels, counts, moments)", f"{dask_result['pass1_s']:.1f} s"),
        ("dask pass 2 (group statistics)", f"{dask_result['pass2_s']:.1f} s"),
        ("dask statistics, both passes", f"{rows / stats_s:,.0f} rows/s"),
        ("dask pass 2 alone", f"{rows / dask_result['pass2_s']:,.0f} rows/s"),
        (
            "dask, per worker CPU second",
            f"{result['dask_stats_rows_per_worker_cpu_s']:,.0f} rows "
            f"({dask_result['worker_cpu_s']:.0f} CPU s in all)",
        ),
    ]
    if numpy_result:
        lines += [
            (
                "NumPy, 1 process (generate + statistics)",
                f"{result['numpy_rows_per_s']:,.0f} rows/s "
                f"({numpy_result['numpy_total_s']:.1f} s)",
            ),
            (
                "NumPy, per CPU second",
                f"{result['numpy_rows_per_cpu_s']:,.0f} rows",
            ),
            (
                "NumPy, statistics only",
                f"{result['numpy_stats_only_rows_per_s']:,.0f} rows/s",
            ),
            (
                "gram: max |dask - NumPy| / max |gram|",
                f"{numpy_result['gram_max_rel_diff_vs_dask']:.1e}",
            ),
        ]
    conv = dask_result["convergence"]
    lines += [
        ("whole fit", f"{dask_result['fit_s']:.1f} s"),
        ("  NUTS and post-processing (client)", f"{dask_result['sampling_s']:.1f} s"),
        ("  the rest (checks, scheduling)", f"{result['other_s']:.1f} s"),
        (
            "peak RSS per worker",
            ", ".join(f"{b / mb:,.0f} MiB" for b in result["worker_peak_rss_bytes"]),
        ),
        ("peak RSS client", f"{result['client_peak_rss_bytes'] / mb:,.0f} MiB"),
        (
            "1-min load average (fit start/end)",
            "{:.1f} / {:.1f}".format(
                dask_result["load_average_fit_start"][0],
                dask_result["load_average_fit_end"][0],
            ),
        ),
        (
            "convergence",
            f"max r_hat {conv['max_r_hat']:.3f}, min ESS {conv['min_ess_bulk']:.0f}, "
            f"{conv['n_divergences']} divergences",
        ),
    ]
    if numpy_result:
        lines.append(
            (
                "1-min load average (NumPy start/end)",
                "{:.1f} / {:.1f}".format(
                    numpy_result["load_average_numpy_start"][0],
                    numpy_result["load_average_numpy_end"][0],
                ),
            )
        )
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key:<{width}}  {value}")
    return result


if __name__ == "__main__":
    main()
