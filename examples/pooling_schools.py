"""Partial vs complete vs no pooling on simulated school test scores
===================================================================

Eight schools, 15 to 25 students each; every school has its own true mean
score. Three ways to estimate the school means:

- no pooling (``pooling="none"``): each school on its own, close to its
  sample mean;
- complete pooling (``pooling="complete"``): one mean for every school;
- partial pooling (``pooling="partial"``, the default): school means drawn
  from a population whose spread is learned, so that each estimate is pulled
  towards the population mean, the more so the fewer students it has.

The model has no features: ``X`` holds only the group column. The script
prints the three estimates next to the truth with their errors and draws the
shrinkage plot of the partial-pooling fit (``--plot`` saves it).

Run::

    python examples/pooling_schools.py --plot schools_shrinkage.png
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from hiermask import MaskedHierarchicalRegressor
from hiermask.datasets import make_schools


def parse_args(argv=None):
    # The gallery runs the script without its docstring: no __doc__ here.
    parser = argparse.ArgumentParser(
        description="Partial vs complete vs no pooling on simulated school test scores."
    )
    parser.add_argument(
        "--plot",
        metavar="PATH",
        help="also save the shrinkage plot there",
    )
    parser.add_argument("--num-warmup", type=int, default=300)
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--num-chains", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    """Fit the three poolings and compare their school means with the truth.

    Parameters
    ----------
    argv : list of str, default=None
        Command-line arguments; None reads ``sys.argv``.

    Returns
    -------
    dict
        ``"estimates"`` (DataFrame: one row per school, columns ``n``,
        ``sample_mean``, ``none``, ``partial``, ``complete``, ``truth``),
        ``"rmse"`` (Series: root-mean-square error of each pooling against
        the true means), ``"estimators"`` (dict of fitted estimators),
        ``"figure"`` (the shrinkage plot, a matplotlib Figure) and ``"plot"``
        (path of the saved plot or None).
    """
    args = parse_args(argv)
    X, y, truth = make_schools(random_state=args.seed, return_truth=True)
    print(f"{len(X)} students in {X['school'].nunique()} schools")

    estimators = {}
    for pooling in ("none", "partial", "complete"):
        estimators[pooling] = MaskedHierarchicalRegressor(
            group_col="school",
            pooling=pooling,
            num_warmup=args.num_warmup,
            num_samples=args.num_samples,
            num_chains=args.num_chains,
            random_state=args.seed,
        ).fit(X, y)

    schools = estimators["partial"].groups_
    table = pd.DataFrame(
        {
            "n": X["school"].value_counts().reindex(schools).to_numpy(),
            "sample_mean": y.groupby(X["school"]).mean().reindex(schools).to_numpy(),
        },
        index=pd.Index(schools, name="school"),
    )
    for pooling, est in estimators.items():
        table[pooling] = est.intercept_
    table["truth"] = truth.reindex(schools).to_numpy()
    rmse = pd.Series(
        {
            col: float(np.sqrt(np.mean((table[col] - table["truth"]) ** 2)))
            for col in ("sample_mean", "none", "partial", "complete")
        },
        name="rmse",
    )
    partial = estimators["partial"]
    print("\nSchool means: sample mean, the three poolings and the truth")
    print(table.round(2).to_string())
    print("\nRoot-mean-square error against the true school means:")
    print(rmse.round(2).to_string())
    print(
        f"\nPartial pooling: population mean {partial.population_intercept_:.2f}, "
        f"between-school sd {partial.group_intercept_scale_:.2f}, "
        f"within-school sd {partial.noise_scale_:.2f}"
    )

    # Each school's sample mean (no pooling) against its partially pooled
    # estimate: small schools move most towards the population mean.
    import matplotlib.pyplot as plt

    from hiermask.plotting import plot_shrinkage

    fig, ax = plt.subplots(figsize=(7, 5))
    plot_shrinkage(partial, X, y, ax=ax)
    fig.tight_layout()
    plot = None
    if args.plot:
        fig.savefig(args.plot, dpi=100)
        plot = args.plot
        print(f"\nShrinkage plot saved to {plot}")
    return {
        "estimates": table,
        "rmse": rmse,
        "estimators": estimators,
        "figure": fig,
        "plot": plot,
    }


if __name__ == "__main__":
    main()
