"""Fingerprints of the draws of 14 small fits, to check that a refactor keeps them.

Every pooling, both engines, ``group_covariance="full"`` and ``"diagonal"``,
population-only slopes and imputed cells; each fit prints the md5 of every
array of ``posterior_``, of ``coef_``, ``intercept_`` and of
``predict(X, return_std=True)``. Run it before and after a change, on the same
machine, and compare::

    python benchmarks/draws_md5.py > before.txt   # on the old checkout
    python benchmarks/draws_md5.py > after.txt
    diff before.txt after.txt                     # empty: the same draws

The fingerprints depend on the platform and the jax/jaxlib versions: compare
runs of one machine and one environment only.
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np

from hiermask import MaskedHierarchicalRegressor, datasets


def md5(a):
    """md5 of an array's bytes, dtype and shape."""
    a = np.ascontiguousarray(np.asarray(a))
    data = a.tobytes() + str(a.dtype).encode() + str(a.shape).encode()
    return hashlib.md5(data).hexdigest()


def run(name, X, y, **params):
    """Fit and print the fingerprints of one model."""
    settings = dict(
        group_col="Product_Group", num_warmup=100, num_samples=100, num_chains=2,
        random_state=0, on_bad_convergence="ignore", progress_bar=False,
    )  # fmt: skip
    est = MaskedHierarchicalRegressor(**{**settings, **params}).fit(X, y)
    print(f"== {name}")
    for key in sorted(est.posterior_):
        values = est.posterior_[key]
        print(f"  posterior_[{key}] {np.shape(values)} {md5(values)}")
    print(f"  coef_ {md5(est.coef_)}")
    print(f"  intercept_ {md5(est.intercept_)}")
    mean, std = est.predict(X, return_std=True)
    print(f"  predict mean {md5(mean)} std {md5(std)}")


def main():
    warnings.simplefilter("ignore")
    X, y = datasets.make_manufacturing(200, random_state=0)
    run("partial diagonal", X, y, group_covariance="diagonal")
    run("partial full", X, y, group_covariance="full")
    run("complete", X, y, pooling="complete")
    run("none", X, y, pooling="none")
    run("direct partial", X, y, engine="direct")
    Xm = X.copy()
    Xm.iloc[5, Xm.columns.get_loc("Feed_Speed")] = np.nan
    Xm.iloc[150, Xm.columns.get_loc("Cutting_Wait_Time")] = np.nan
    run("missing impute full", Xm, y, group_covariance="full", missing="impute")
    run("missing impute diagonal", Xm, y, group_covariance="diagonal", missing="impute")
    # Two groups make "full" fall back to "diagonal": the general model needs more.
    G, gy = datasets.make_grouped_regression(
        300, 8, 3, mask_fraction=0.2, random_state=0
    )
    on = {"group_col": "group"}
    run("G partial full", G, gy, **on, group_covariance="full")
    diagonal = {"group_covariance": "diagonal", "varying": ["x0"]}
    run("G diagonal varying x0", G, gy, **on, **diagonal)
    run("G full varying x0", G, gy, **on, group_covariance="full", varying=["x0"])
    run("G none varying x0", G, gy, **on, pooling="none", varying=["x0"])
    run("G direct full", G, gy, **on, group_covariance="full", engine="direct")
    Gm = G.copy()
    Gm.iloc[[1, 3, 10], Gm.columns.get_loc("x1")] = np.nan
    run("G impute full", Gm, gy, **on, missing="impute")
    run("G impute full unscaled", Gm, gy, **on, missing="impute", standardize=False)


if __name__ == "__main__":
    main()
