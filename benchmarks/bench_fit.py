"""Fit-time, ESS and scaling benchmarks of the engines (issues 2 and 3).

Each benchmark is selectable; results are printed as tables and saved to
``benchmarks/results/<name>.json`` (plus ``scaling.png``). Wall times include
compilation unless the column says otherwise. The machine is shared and noisy:
compare engines by their ratio within one run, and read the load average
stored with every result.

    python benchmarks/bench_fit.py manufacturing        # 500 rows: first fit, refit
    python benchmarks/bench_fit.py ess --rows 10000     # ESS/s vs baseline
    python benchmarks/bench_fit.py large                # 1e6 rows x 10 features
    python benchmarks/bench_fit.py many-groups          # 10,000 groups x 20 rows
    python benchmarks/bench_fit.py gridsearch           # 5 folds x 4 prior scales
    python benchmarks/bench_fit.py scaling              # fit time vs rows and vs groups
    python benchmarks/bench_fit.py all --quick          # everything, small sizes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline import fit_baseline

from hiermask import MaskedHierarchicalRegressor
from hiermask.datasets import make_grouped_regression, make_manufacturing

RESULTS = Path(__file__).resolve().parent / "results"
GROUP = "Product_Group"


def _load():
    return os.getloadavg()[0]


def _save(name, rows):
    RESULTS.mkdir(exist_ok=True)
    payload = {"load_average_1min": _load(), "rows": rows}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=float))


def _table(rows):
    if not rows:
        return
    keys = list(rows[0])
    width = {k: max(len(k), *(len(_fmt(r.get(k))) for r in rows)) for k in keys}
    print("  ".join(k.rjust(width[k]) for k in keys))
    for r in rows:
        print("  ".join(_fmt(r.get(k)).rjust(width[k]) for k in keys))


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def _fit(est, X, y, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        est.fit(X, y, **kw)
        return time.perf_counter() - t


def _row(label, est, seconds, n_rows):
    conv = est.convergence_
    return {
        "case": label,
        "rows": n_rows,
        "wall_s": seconds,
        "min_ess": conv["min_ess_bulk"],
        "ess_per_s": conv["min_ess_bulk"] / seconds,
        "max_r_hat": conv["max_r_hat"],
        "divergences": conv["n_divergences"],
    }


def bench_manufacturing(args):
    """First fit (compile included) and refits with other prior scales."""
    X, y = make_manufacturing(500, random_state=0)
    est = MaskedHierarchicalRegressor(group_col=GROUP, random_state=0)
    rows = [_row("collapsed first fit", est, _fit(est, X, y), 500)]
    for scale in (2.0, 0.5):
        est.set_params(coef_prior_scale=scale)
        rows.append(
            _row(f"collapsed refit coef_prior_scale={scale}", est, _fit(est, X, y), 500)
        )
    _table(rows)
    _save("manufacturing", rows)


def _manufacturing_arrays(n):
    X, y = make_manufacturing(n, random_state=0)
    group_idx = (X[GROUP] == "Product_Group_2").to_numpy().astype(int)
    feats = X.drop(columns=GROUP).to_numpy(dtype=float)
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    return X, y, feats, group_idx, mask


def bench_ess(args):
    """ESS per second: collapsed and direct engines vs the hand-written model.

    All three use 4 chains x (200 warmup + 300 draws), the baseline's settings.
    """
    rows = []
    for n in args.rows:
        X, y, feats, gidx, mask = _manufacturing_arrays(n)
        settings = {"num_warmup": 200, "num_samples": 300, "num_chains": 4}
        for engine in ("collapsed", "direct"):
            if engine == "direct" and n > args.max_direct_rows:
                continue
            est = MaskedHierarchicalRegressor(
                group_col=GROUP, engine=engine, random_state=0, **settings
            )
            rows.append(_row(f"{engine} (partial pooling)", est, _fit(est, X, y), n))
        if n <= args.max_baseline_rows:
            base = fit_baseline(feats, y.to_numpy(), gidx, mask, seed=0, **settings)
            rows.append(
                {
                    "case": "baseline per-row NumPyro",
                    "rows": n,
                    "wall_s": base["wall_s"],
                    "min_ess": base["min_ess"],
                    "ess_per_s": base["ess_per_s"],
                    "max_r_hat": base["max_r_hat"],
                    "divergences": base["n_divergences"],
                }
            )
    _table(rows)
    _save("ess", rows)


def _profile(est, X, y, n_rows, label):
    """Wall time of fit, then predict on the same rows."""
    seconds = _fit(est, X, y)
    row = _row(label, est, seconds, n_rows)
    t = time.perf_counter()
    est.predict(X)
    row["predict_s"] = time.perf_counter() - t
    return row


def bench_large(args):
    """1e6 rows, 100 groups, 10 features, partial pooling (defaults)."""
    n = 100_000 if args.quick else 1_000_000
    X, y = make_grouped_regression(n, 100, 10, random_state=0)
    est = MaskedHierarchicalRegressor(group_col="group", random_state=0)
    rows = [_profile(est, X, y, n, "first fit")]
    rows.append(_profile(est, X, y, n, "refit (compiled)"))
    _table(rows)
    _save("large", rows)


def bench_many_groups(args):
    """10,000 groups of 20 rows, 5 features."""
    n_groups = 1000 if args.quick else 10_000
    X, y = make_grouped_regression(20 * n_groups, n_groups, 5, random_state=0)
    est = MaskedHierarchicalRegressor(group_col="group", random_state=0)
    rows = [_profile(est, X, y, 20 * n_groups, f"{n_groups} groups")]
    _table(rows)
    _save("many_groups", rows)


def bench_gridsearch(args):
    """GridSearchCV, 5 folds x 4 prior scales, 10,000 rows, 20 groups."""
    from sklearn.model_selection import GridSearchCV, GroupKFold

    X, y = make_grouped_regression(10_000, 20, 3, random_state=0)
    est = MaskedHierarchicalRegressor(group_col="group", random_state=0)
    search = GridSearchCV(
        est, {"coef_prior_scale": [0.3, 1.0, 3.0, 10.0]}, cv=GroupKFold(5)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        search.fit(X, y, groups=X["group"])
        seconds = time.perf_counter() - t
    rows = [{"case": "20 fits + refit", "wall_s": seconds, "best": search.best_params_}]
    _table(rows)
    _save("gridsearch", rows)


def bench_scaling(args):
    """Fit time against rows (10 groups, 5 features) and against groups."""
    row_sizes = [1_000, 10_000, 100_000, 1_000_000] + (
        [] if args.quick else [10_000_000]
    )
    group_sizes = [2, 10, 100, 1_000] + ([] if args.quick else [10_000])
    settings = {"num_warmup": 500, "num_samples": 1000, "num_chains": 4}
    rows = []
    for n in row_sizes:
        X, y = make_grouped_regression(n, 10, 5, random_state=0)
        est = MaskedHierarchicalRegressor(group_col="group", random_state=0, **settings)
        _fit(est, X, y)  # compile this shape once
        rows.append({"axis": "rows", "size": n, "fit_s": _fit(est, X, y)})
    for g in group_sizes:
        X, y = make_grouped_regression(20 * g, g, 5, random_state=0)
        est = MaskedHierarchicalRegressor(group_col="group", random_state=0, **settings)
        first = _fit(est, X, y)
        rows.append(
            {"axis": "groups", "size": g, "fit_s": _fit(est, X, y), "first_s": first}
        )
    _table(rows)
    _save("scaling", rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, axis, label in (
        (axes[0], "rows", "rows (10 groups)"),
        (axes[1], "groups", "groups (20 rows each)"),
    ):
        pts = [(r["size"], r["fit_s"]) for r in rows if r["axis"] == axis]
        ax.loglog(*zip(*pts, strict=True), "o-")
        ax.set_xlabel(label)
        ax.set_ylabel("fit time, compiled (s)")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("hiermask collapsed engine, 4 chains x (500 + 1000) iterations")
    fig.tight_layout()
    fig.savefig(RESULTS / "scaling.png", dpi=110)


BENCHES = {
    "manufacturing": bench_manufacturing,
    "ess": bench_ess,
    "large": bench_large,
    "many-groups": bench_many_groups,
    "gridsearch": bench_gridsearch,
    "scaling": bench_scaling,
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", choices=[*BENCHES, "all"])
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--rows", type=int, nargs="+", default=[500, 10_000])
    parser.add_argument("--max-direct-rows", type=int, default=10_000)
    parser.add_argument("--max-baseline-rows", type=int, default=10_000)
    args = parser.parse_args(argv)
    names = list(BENCHES) if args.bench == "all" else [args.bench]
    for name in names:
        print(f"\n== {name} (load average {_load():.2f})")
        BENCHES[name](args)


if __name__ == "__main__":
    main()
