"""Imputing a missing covariate against complete-case analysis
==============================================================

``y = 2 + 3 x + noise`` with 30% of the ``x`` values missing completely at
random. Complete-case least squares throws away every row with a missing
``x``. ``MaskedHierarchicalRegressor(missing="impute")`` keeps them: each
missing cell is a latent ``x ~ Normal(m, s)`` sampled jointly with the
regression. With values missing completely at random both estimates are
unbiased and about equally precise for the slope (a row without ``x`` says
little about it); the imputation model also uses those rows for the rest of
the model and predicts rows whose ``x`` is missing, with ``x`` integrated out
(hence their wider predictive sd).

Run::

    python examples/missing_x_imputation.py
    python examples/missing_x_imputation.py --missing-fraction 0.6
    python examples/missing_x_imputation.py --plot missing_x.png
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from hiermask import MaskedHierarchicalRegressor
from hiermask.datasets import make_missing_x

TRUE_INTERCEPT, TRUE_SLOPE = 2.0, 3.0


def parse_args(argv=None):
    # The gallery runs the script without its docstring: no __doc__ here.
    parser = argparse.ArgumentParser(
        description="Imputing a missing covariate against complete-case analysis."
    )
    parser.add_argument("--n-samples", type=int, default=100, help="rows")
    parser.add_argument(
        "--missing-fraction", type=float, default=0.3, help="fraction of x missing"
    )
    parser.add_argument("--num-warmup", type=int, default=300)
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--num-chains", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", metavar="PATH", help="also save the plot there")
    return parser.parse_args(argv)


def complete_case_ols(x, y):
    """Least squares on the rows where ``x`` is observed.

    Parameters
    ----------
    x, y : ndarray of shape (n,)

    Returns
    -------
    estimate, std_error : ndarray of shape (2,)
        Intercept and slope, and their classical standard errors.
    """
    keep = ~np.isnan(x)
    design = np.column_stack([np.ones(keep.sum()), x[keep]])
    beta, *_ = np.linalg.lstsq(design, y[keep], rcond=None)
    resid = y[keep] - design @ beta
    sigma2 = resid @ resid / (keep.sum() - 2)
    cov = sigma2 * np.linalg.inv(design.T @ design)
    return beta, np.sqrt(np.diag(cov))


def main(argv=None):
    """Fit both analyses and print their estimates next to the truth.

    Parameters
    ----------
    argv : list of str, default=None
        Command-line arguments; None reads ``sys.argv``.

    Returns
    -------
    dict
        ``"table"`` (DataFrame indexed by ``intercept`` and ``slope`` with
        columns ``truth``, ``complete_case``, ``complete_case_se``,
        ``imputation``, ``imputation_sd``), ``"n_complete"``,
        ``"estimator"`` and ``"figure"`` (a matplotlib Figure).
    """
    args = parse_args(argv)
    X, y = make_missing_x(
        args.n_samples,
        intercept=TRUE_INTERCEPT,
        slope=TRUE_SLOPE,
        missing_fraction=args.missing_fraction,
        random_state=args.seed,
    )
    x = X["x"].to_numpy()
    n_missing = int(np.isnan(x).sum())
    print(f"{len(X)} rows, x missing in {n_missing}")

    cc, cc_se = complete_case_ols(x, y.to_numpy())
    est = MaskedHierarchicalRegressor(
        missing="impute",
        num_warmup=args.num_warmup,
        num_samples=args.num_samples,
        num_chains=args.num_chains,
        random_state=args.seed,
    ).fit(X, y)
    summary = est.summary()
    rows = ["intercept[0]", "coef[0, x]"]
    table = pd.DataFrame(
        {
            "truth": [TRUE_INTERCEPT, TRUE_SLOPE],
            "complete_case": cc,
            "complete_case_se": cc_se,
            "imputation": summary.loc[rows, "mean"].to_numpy(),
            "imputation_sd": summary.loc[rows, "sd"].to_numpy(),
        },
        index=pd.Index(["intercept", "slope"], name="parameter"),
    )
    print(
        f"\nComplete-case OLS uses {len(X) - n_missing} rows; imputation all {len(X)}."
    )
    print(table.round(3).to_string())
    print(
        f"\nNoise sd: imputation {est.noise_scale_:.3f} (truth 1.0). Rows with a "
        "missing x are predicted with x integrated out:"
    )
    rows_missing = X[X["x"].isna()].head(3)
    mean, sd = est.predict(rows_missing, return_std=True)
    print(
        rows_missing.assign(y=y[rows_missing.index], mean=mean, sd=sd)
        .round(3)
        .to_string()
    )
    # Observed rows with the fitted line and its 90% predictive band; the rows
    # whose x is missing are drawn at the right, at their observed y, next to
    # their prediction with x integrated out.
    import matplotlib.pyplot as plt

    grid = pd.DataFrame({"x": np.linspace(np.nanmin(x), np.nanmax(x), 50)})
    band = est.predict_interval(grid, coverage=0.9)
    observed = ~np.isnan(x)
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 1]}, sharey=True
    )
    left.scatter(x[observed], y[observed], s=12, color="0.3", label="observed x")
    left.plot(grid["x"], est.predict(grid), color="C0", label="posterior mean")
    left.fill_between(grid["x"], band[:, 0], band[:, 1], alpha=0.2, color="C0")
    left.set(xlabel="x", ylabel="y", title="Rows with x observed")
    left.legend(loc="upper left")
    missing_rows = X[~observed]
    m_mean, m_sd = est.predict(missing_rows, return_std=True)
    order = np.argsort(m_mean)
    position = np.arange(len(order))
    right.errorbar(
        position,
        m_mean[order],
        yerr=1.645 * m_sd[order],
        fmt="o",
        ms=3,
        color="C1",
        label="prediction, 90%",
    )
    right.scatter(
        position, y[~observed].to_numpy()[order], s=10, color="0.3", label="observed y"
    )
    right.set(xlabel="rows with x missing", title="x integrated out")
    right.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    if args.plot:
        fig.savefig(args.plot, dpi=100)
        print(f"\nPlot saved to {args.plot}")
    return {
        "table": table,
        "n_complete": len(X) - n_missing,
        "estimator": est,
        "figure": fig,
    }


if __name__ == "__main__":
    main()
