"""Masking on the manufacturing data: a feature that does not apply to a group
==============================================================================

Production speed of product group 1 depends on feed speed and pull
acceleration; that of group 2 also on cutting wait time, which is not
measured (NaN) in any row of group 1. The hand-written NumPyro model of the
original analysis gave every group its own Normal(0, 5) coefficients and
intercept, a HalfNormal(5) noise sd, and forced the weight of
(group 1, cutting wait time) to zero. ``MaskedHierarchicalRegressor`` reads
that mask from the NaN pattern; with ``pooling="none"``, ``standardize=False``
and prior scales of 5 it fits exactly that model.

Run::

    python examples/manufacturing_masking.py
    python examples/manufacturing_masking.py --num-samples 2000 --num-chains 4
    python examples/manufacturing_masking.py --plot manufacturing.png
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from hiermask import MaskedHierarchicalRegressor
from hiermask.datasets import (
    MANUFACTURING_GROUPS,
    MANUFACTURING_TRUE_COEF,
    make_manufacturing,
)


def parse_args(argv=None):
    # The gallery runs the script without its docstring: no __doc__ here.
    parser = argparse.ArgumentParser(
        description="Masking on the manufacturing data: a feature that does not "
        "apply to a group."
    )
    parser.add_argument("--n-samples", type=int, default=500, help="rows to simulate")
    parser.add_argument("--num-warmup", type=int, default=300)
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--num-chains", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--plot", metavar="PATH", help="also save the mask and forest plots there"
    )
    return parser.parse_args(argv)


def main(argv=None):
    """Fit the hand-written model of the seed analysis and print what it learned.

    Parameters
    ----------
    argv : list of str, default=None
        Command-line arguments; None reads ``sys.argv``.

    Returns
    -------
    dict
        ``"estimator"`` (fitted), ``"coef"`` (estimated coefficients,
        DataFrame), ``"truth"`` (true coefficients) and ``"predictions"``
        (DataFrame of the two new rows with mean, sd and 90% interval).
    """
    args = parse_args(argv)
    X, y = make_manufacturing(args.n_samples, random_state=args.seed)
    print(f"{len(X)} rows; NaN count of each feature per group:")
    print(X.drop(columns="Product_Group").isna().groupby(X["Product_Group"]).sum())

    est = MaskedHierarchicalRegressor(
        group_col="Product_Group",
        pooling="none",  # every group has its own, independent priors
        standardize=False,  # prior scales in raw units ...
        coef_prior_scale=5.0,  # ... beta ~ Normal(0, 5)
        intercept_prior_scale=5.0,  # alpha ~ Normal(0, 5)
        noise_prior_scale=5.0,  # sigma ~ HalfNormal(5)
        num_warmup=args.num_warmup,
        num_samples=args.num_samples,
        num_chains=args.num_chains,
        random_state=args.seed,
        on_bad_convergence="warn",
    ).fit(X, y)

    print("\nMask read from the NaN pattern (True: the feature applies):")
    print(est.mask_)

    coef = pd.DataFrame(est.coef_, index=est.mask_.index, columns=est.mask_.columns)
    table = coef.stack().rename("estimate").to_frame()
    table["truth"] = MANUFACTURING_TRUE_COEF.to_numpy().ravel()
    table["applies"] = est.mask_.to_numpy().ravel()
    print("\nCoefficients (posterior means; the masked one is exactly 0):")
    print(table.round(3).to_string())
    print(
        f"\nIntercepts: {np.round(est.intercept_, 3)} (truth 0); noise sd "
        f"{est.noise_scale_:.3f} (truth 0.5)"
    )
    c = est.convergence_
    print(
        f"Convergence: max r_hat {c['max_r_hat']:.3f}, min bulk ESS "
        f"{c['min_ess_bulk']:.0f}, {c['n_divergences']} divergences"
    )

    # One new row per group, as in the original post: group 1 has no cutting
    # wait time (NaN: the feature is off for it and the value is ignored).
    new = pd.DataFrame(
        {
            "Product_Group": list(MANUFACTURING_GROUPS),
            "Feed_Speed": [3.0, 3.0],
            "Pull_Acceleration": [2.0, 2.0],
            "Cutting_Wait_Time": [np.nan, 2.0],
        }
    )
    mean, sd = est.predict(new, return_std=True)
    interval = est.predict_interval(new, coverage=0.9)
    truth = [2.5 * 3 + 3.0 * 2, 1.0 * 3 + 0.5 * 2 + 3.0 * 2]
    predictions = new.assign(
        mean=mean, sd=sd, lower=interval[:, 0], upper=interval[:, 1], truth=truth
    )
    print("\nPredictions with 90% predictive intervals:")
    print(predictions.round(3).to_string(index=False))

    # The mask, and every group's coefficients with 90% intervals: the masked
    # pair (group 1, Cutting_Wait_Time) has no estimate at all.
    import matplotlib.pyplot as plt

    from hiermask.plotting import plot_forest, plot_mask

    fig, (left, right) = plt.subplots(
        1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1.4]}
    )
    plot_mask(est, ax=left)
    plot_forest(est, coverage=0.9, ax=right)
    fig.tight_layout()
    if args.plot:
        fig.savefig(args.plot, dpi=100)
        print(f"\nPlots saved to {args.plot}")
    return {
        "estimator": est,
        "coef": coef,
        "truth": MANUFACTURING_TRUE_COEF,
        "predictions": predictions,
        "figure": fig,
    }


if __name__ == "__main__":
    main()
