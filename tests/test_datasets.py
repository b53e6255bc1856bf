"""Tests of the simulators in ``hiermask.datasets``."""

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose
from pandas.testing import assert_frame_equal, assert_series_equal

from hiermask.datasets import (
    MANUFACTURING_TRUE_COEF,
    MANUFACTURING_TRUE_INTERCEPT,
    make_grouped_regression,
    make_manufacturing,
    make_missing_x,
    make_schools,
)

FEATURES = ["Feed_Speed", "Pull_Acceleration", "Cutting_Wait_Time"]
GROUPS = ["Product_Group_1", "Product_Group_2"]


def _ols_with_intercept(X, y):
    """Least squares of ``y`` on ``[1, X]``; returns (intercept, coef)."""
    design = np.column_stack([np.ones(len(X)), X])
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    return beta[0], beta[1:]


def _assert_same_data(a, b):
    for left, right in zip(a, b, strict=True):
        if isinstance(left, pd.DataFrame):
            assert_frame_equal(left, right)
        else:
            assert_series_equal(left, right)


# make_manufacturing ------------------------------------------------------------


@pytest.mark.parametrize("n_samples", [2, 7, 500])
def test_manufacturing_shape_and_dtypes(n_samples):
    X, y = make_manufacturing(n_samples, random_state=0)
    assert X.shape == (n_samples, 4)
    assert list(X.columns) == ["Product_Group", *FEATURES]
    assert pd.api.types.is_string_dtype(X["Product_Group"])
    assert all(X[c].dtype == np.float64 for c in FEATURES)
    assert y.shape == (n_samples,)
    assert y.name == "Production_Speed"
    assert y.dtype == np.float64
    assert not y.isna().any()
    n_first = n_samples // 2
    expected = [GROUPS[0]] * n_first + [GROUPS[1]] * (n_samples - n_first)
    assert X["Product_Group"].tolist() == expected


def test_manufacturing_nan_pattern_and_ranges():
    X, _ = make_manufacturing(1000, random_state=1)
    group1 = X["Product_Group"] == GROUPS[0]
    assert X.loc[group1, "Cutting_Wait_Time"].isna().all()
    assert X.loc[~group1, "Cutting_Wait_Time"].notna().all()
    assert X[["Feed_Speed", "Pull_Acceleration"]].notna().all().all()
    assert X["Feed_Speed"].between(1, 10).all()
    assert X["Pull_Acceleration"].between(0.5, 5).all()
    assert X["Cutting_Wait_Time"].dropna().between(0.1, 2).all()


def test_manufacturing_deterministic():
    _assert_same_data(
        make_manufacturing(50, random_state=3), make_manufacturing(50, random_state=3)
    )
    _assert_same_data(
        make_manufacturing(50, random_state=np.random.default_rng(3)),
        make_manufacturing(50, random_state=np.random.default_rng(3)),
    )
    _assert_same_data(
        make_manufacturing(50, random_state=np.random.RandomState(3)),
        make_manufacturing(50, random_state=np.random.RandomState(3)),
    )
    _, y0 = make_manufacturing(50, random_state=3)
    _, y1 = make_manufacturing(50, random_state=4)
    assert not np.allclose(y0, y1)


def test_manufacturing_truth_constants():
    assert list(MANUFACTURING_TRUE_COEF.index) == GROUPS
    assert list(MANUFACTURING_TRUE_COEF.columns) == FEATURES
    assert not MANUFACTURING_TRUE_COEF.isna().any().any()
    assert MANUFACTURING_TRUE_COEF.loc[GROUPS[0], "Cutting_Wait_Time"] == 0.0
    assert MANUFACTURING_TRUE_INTERCEPT == dict.fromkeys(GROUPS, 0.0)


def test_manufacturing_per_group_ols_recovers_truth():
    X, y = make_manufacturing(500, noise=1e-6, random_state=0)
    for label in GROUPS:
        rows = (X["Product_Group"] == label).to_numpy()
        on = [c for c in FEATURES if X.loc[rows, c].notna().all()]
        intercept, coef = _ols_with_intercept(X.loc[rows, on].to_numpy(), y[rows])
        expected = MANUFACTURING_TRUE_COEF.loc[label]
        assert_allclose(coef, expected[on], atol=1e-4)
        assert_allclose(expected.drop(on), 0.0)
        assert_allclose(intercept, MANUFACTURING_TRUE_INTERCEPT[label], atol=1e-4)


def test_manufacturing_noise_level():
    X, y = make_manufacturing(20_000, noise=0.5, random_state=0)
    coef = MANUFACTURING_TRUE_COEF.loc[X["Product_Group"]].to_numpy()
    resid = y.to_numpy() - np.sum(coef * X[FEATURES].fillna(0.0).to_numpy(), axis=1)
    assert_allclose(resid.std(), 0.5, rtol=0.03)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"n_samples": 1}, ValueError),
        ({"n_samples": 2.5}, TypeError),
        ({"noise": -1.0}, ValueError),
        ({"random_state": "seed"}, ValueError),
    ],
)
def test_manufacturing_invalid(kwargs, error):
    with pytest.raises(error):
        make_manufacturing(**kwargs)


# make_schools ------------------------------------------------------------------


def test_schools_default_layout():
    X, y, truth = make_schools(random_state=0, return_truth=True)
    sizes = [20, 15, 25, 18, 22, 16, 19, 21]
    labels = [f"School_{k}" for k in range(1, 9)]
    assert list(X.columns) == ["school"]
    assert len(X) == len(y) == sum(sizes)
    assert y.name == "score"
    assert y.dtype == np.float64
    assert X["school"].value_counts().reindex(labels).tolist() == sizes
    assert list(truth.index) == labels
    assert truth.dtype == np.float64


def test_schools_other_sizes():
    X, y = make_schools(30, random_state=0)
    counts = X["school"].value_counts()
    assert len(counts) == 30
    assert counts.between(3, 60).all()
    assert len(y) == len(X)
    X, _ = make_schools(4, n_students=5, random_state=0)
    assert X["school"].value_counts().tolist() == [5] * 4
    X, _ = make_schools(3, n_students=[1, 2, 3], random_state=0)
    assert X["school"].tolist() == ["School_1"] + ["School_2"] * 2 + ["School_3"] * 3
    with pytest.raises(ValueError, match="n_students"):
        make_schools(3, n_students=[1, 2])


def test_schools_truth_consistent():
    X, y, truth = make_schools(
        12, n_students=4, within_sd=0.0, random_state=5, return_truth=True
    )
    assert_allclose(y.to_numpy(), truth.loc[X["school"]].to_numpy())
    _, _, truth = make_schools(500, between_sd=8.0, random_state=5, return_truth=True)
    assert abs(truth.mean() - 75.0) < 4 * 8.0 / np.sqrt(500)


def test_schools_deterministic():
    _assert_same_data(
        make_schools(10, random_state=2, return_truth=True),
        make_schools(10, random_state=2, return_truth=True),
    )


# make_missing_x ----------------------------------------------------------------


def test_missing_x_layout():
    X, y = make_missing_x(200, missing_fraction=0.25, random_state=0)
    assert list(X.columns) == ["x"]
    assert X["x"].dtype == np.float64
    assert y.name == "y"
    assert len(X) == len(y) == 200
    assert X["x"].isna().sum() == 50
    assert not y.isna().any()


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.77, 1.0])
def test_missing_x_fraction(fraction):
    X, _ = make_missing_x(1000, missing_fraction=fraction, random_state=1)
    assert abs(X["x"].isna().mean() - fraction) <= 1e-3


def test_missing_x_truth_consistent():
    X, y = make_missing_x(
        300, intercept=-1.5, slope=0.7, noise=0.0, missing_fraction=0.4, random_state=0
    )
    observed = X["x"].notna()
    assert_allclose(y[observed], -1.5 + 0.7 * X.loc[observed, "x"])
    # The missing values are missing completely at random: y has the same
    # distribution in both parts.
    X, y = make_missing_x(20_000, random_state=0)
    missing = X["x"].isna()
    assert abs(y[missing].mean() - y[~missing].mean()) < 0.15


def test_missing_x_deterministic_and_invalid():
    _assert_same_data(make_missing_x(random_state=9), make_missing_x(random_state=9))
    with pytest.raises(ValueError, match="missing_fraction"):
        make_missing_x(missing_fraction=1.5)


# make_grouped_regression -------------------------------------------------------


def test_grouped_regression_layout():
    X, y, truth = make_grouped_regression(
        1003, 10, 4, mask_fraction=0.3, random_state=0, return_truth=True
    )
    labels = [f"g{k}" for k in range(10)]
    features = [f"x{j}" for j in range(4)]
    assert list(X.columns) == ["group", *features]
    assert all(X[c].dtype == np.float64 for c in features)
    assert y.dtype == np.float64
    assert y.name == "y"
    assert set(X["group"].astype(str)) == set(labels)
    counts = X["group"].value_counts()
    assert counts.max() - counts.min() <= 1
    assert counts.sum() == 1003
    assert list(truth["coef"].index) == labels
    assert list(truth["coef"].columns) == features
    assert list(truth["intercept"].index) == labels
    assert list(truth["population_coef"].index) == features
    assert isinstance(truth["population_intercept"], float)


def test_grouped_regression_small_groups():
    X, _ = make_grouped_regression(40, 20, 2, random_state=0)
    assert X["group"].value_counts().min() == 2
    with pytest.raises(ValueError, match="n_samples"):
        make_grouped_regression(39, 20, 2)


def test_grouped_regression_deterministic():
    a = make_grouped_regression(500, 7, 3, mask_fraction=0.4, random_state=11)
    b = make_grouped_regression(500, 7, 3, mask_fraction=0.4, random_state=11)
    _assert_same_data(a, b)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("mask_fraction", [0.5, 0.9, 1.0])
def test_grouped_regression_mask_keeps_a_feature(seed, mask_fraction):
    X, _, truth = make_grouped_regression(
        60, 6, 3, mask_fraction=mask_fraction, random_state=seed, return_truth=True
    )
    mask = truth["mask"]
    assert mask.any(axis=1).all()
    if mask_fraction == 1.0:
        assert (mask.sum(axis=1) == 1).all()
    # The NaN pattern of X is the mask: a feature is all-NaN in a group
    # exactly when it is switched off, and never NaN otherwise.
    observed = X.drop(columns="group").notna().groupby(X["group"].astype(str))
    assert_frame_equal(observed.all(), mask, check_names=False)
    assert_frame_equal(observed.any(), mask, check_names=False)
    assert (truth["coef"].to_numpy()[~mask.to_numpy()] == 0.0).all()


def test_grouped_regression_no_mask_by_default():
    X, _, truth = make_grouped_regression(200, 5, 3, random_state=0, return_truth=True)
    assert truth["mask"].all().all()
    assert not X.isna().any().any()


def test_grouped_regression_truth_consistent():
    X, y, truth = make_grouped_regression(
        400, 8, 3, noise=0.0, mask_fraction=0.3, random_state=4, return_truth=True
    )
    groups = X["group"].astype(str)
    coef = truth["coef"].loc[groups].to_numpy()
    features = X.drop(columns="group").fillna(0.0).to_numpy()
    expected = truth["intercept"].loc[groups].to_numpy() + np.sum(coef * features, 1)
    assert_allclose(y.to_numpy(), expected, atol=1e-12)


def test_grouped_regression_pooling_sd():
    _, _, truth = make_grouped_regression(
        4000, 2000, 2, pooling_sd=0.3, random_state=0, return_truth=True
    )
    deviations = truth["coef"] - truth["population_coef"]
    assert_allclose(deviations.std().to_numpy(), 0.3, rtol=0.1)
    spread = (truth["intercept"] - truth["population_intercept"]).std()
    assert_allclose(spread, 0.3, rtol=0.1)
