"""hiermask.plotting renders every plot to PNG (issue 4)."""

import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from numpy.testing import assert_allclose

from hiermask import plotting

from ._fitted import manufacturing_fit, schools_fit


@pytest.fixture(scope="module")
def fitted():
    return manufacturing_fit()


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _render(ax, path):
    assert isinstance(ax, Axes)
    ax.figure.savefig(path, dpi=60)
    assert path.stat().st_size > 1000
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_mask(fitted, tmp_path):
    est, _, _ = fitted
    ax = plotting.plot_mask(est)
    _render(ax, tmp_path / "mask.png")
    texts = [t.get_text() for t in ax.texts]
    assert texts.count("off") == 1 and texts.count("on") == 5
    assert [t.get_text() for t in ax.get_yticklabels()] == list(est.groups_)


def test_plot_shrinkage(fitted, tmp_path):
    est, X, y = fitted
    ax = plotting.plot_shrinkage(est, X, y)
    _render(ax, tmp_path / "shrinkage.png")
    assert "Feed_Speed" in ax.get_ylabel()
    ax = plotting.plot_shrinkage(est, X, y, parameter="Cutting_Wait_Time")
    _render(ax, tmp_path / "shrinkage_cut.png")
    with pytest.raises(ValueError, match="Unknown parameter"):
        plotting.plot_shrinkage(est, X, y, parameter="nope")


def test_plot_shrinkage_without_population(tmp_path):
    est, X, y = manufacturing_fit("none")
    ax = plotting.plot_shrinkage(est, X, y, parameter="intercept")
    _render(ax, tmp_path / "shrinkage_none.png")
    assert ax.get_legend() is None  # no population mean under pooling="none"


def test_no_pooling_estimates_are_per_group_least_squares(fitted):
    est, X, y = fitted
    intercept, coef, n_rows = plotting.no_pooling_estimates(est, X, y)
    assert list(n_rows) == [100, 100]
    rows = (X["Product_Group"] == "Product_Group_1").to_numpy()
    design = np.column_stack(
        [np.ones(rows.sum()), X.loc[rows, ["Feed_Speed", "Pull_Acceleration"]]]
    )
    beta, *_ = np.linalg.lstsq(design, y[rows], rcond=None)
    assert_allclose(intercept[0], beta[0])
    assert_allclose(coef[0, :2], beta[1:])
    assert np.isnan(coef[0, 2])  # masked: no estimate
    assert np.isfinite(coef[1]).all()


def test_plot_shrinkage_intercept_only(tmp_path):
    est, X, y = schools_fit()
    ax = plotting.plot_shrinkage(est, X, y)
    _render(ax, tmp_path / "schools.png")
    assert ax.get_ylabel() == "group mean"
    ax = plotting.plot_mask(est)
    _render(ax, tmp_path / "schools_mask.png")
    ax = plotting.plot_forest(est)
    _render(ax, tmp_path / "schools_forest.png")


def test_plot_forest(fitted, tmp_path):
    est, _, _ = fitted
    ax = plotting.plot_forest(est)
    _render(ax, tmp_path / "forest.png")
    labels = [t.get_text() for t in ax.get_yticklabels()]
    # 3 population rows + 5 applicable (group, feature) pairs.
    assert len(labels) == 8
    assert "Cutting_Wait_Time: Product_Group_1" not in labels
    ax = plotting.plot_forest(est, feature="Feed_Speed", coverage=0.5)
    _render(ax, tmp_path / "forest_feed.png")
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "population mean",
        "Product_Group_1",
        "Product_Group_2",
    ]
    ax = plotting.plot_forest(est, feature="intercept")
    _render(ax, tmp_path / "forest_intercept.png")
    with pytest.raises(ValueError, match="coverage"):
        plotting.plot_forest(est, coverage=2)


def test_plot_ppc(fitted, tmp_path):
    est, X, y = fitted
    ax = plotting.plot_ppc(est, X, y, n_samples=20)
    _render(ax, tmp_path / "ppc.png")
    assert "20" in ax.get_title()


def test_plots_draw_on_given_axes(fitted, tmp_path):
    est, X, y = fitted
    _, axes = plt.subplots(2, 2, figsize=(12, 9))
    out = [
        plotting.plot_mask(est, ax=axes[0, 0]),
        plotting.plot_shrinkage(est, X, y, ax=axes[0, 1]),
        plotting.plot_forest(est, ax=axes[1, 0]),
        plotting.plot_ppc(est, X, y, n_samples=10, ax=axes[1, 1]),
    ]
    assert out == list(axes.ravel())
    _render(axes[0, 0], tmp_path / "all.png")


def test_unfitted_estimator_is_rejected():
    from sklearn.exceptions import NotFittedError

    from hiermask import MaskedHierarchicalRegressor

    with pytest.raises(NotFittedError):
        plotting.plot_mask(MaskedHierarchicalRegressor())


def test_missing_matplotlib_says_how_to_install(fitted, monkeypatch):
    est, _, _ = fitted
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r'pip install "hiermask\[plot\]"'):
        plotting.plot_mask(est)


# ------------------------------------------------- readable plots (#15)
def _many_groups(n_groups):
    """n_groups groups of 4 rows, one feature; group "g0" has 2 rows whose
    slope (no pooling) is 50, far out of the others' spread."""
    from hiermask import MaskedHierarchicalRegressor

    rng = np.random.default_rng(n_groups)
    labels = np.repeat([f"g{i}" for i in range(n_groups)], 4)
    x = rng.normal(size=labels.size)
    slope = 1.0 + 0.5 * rng.normal(size=n_groups)
    y = np.repeat(slope, 4) * x + 0.3 * rng.normal(size=labels.size)
    X = pd.DataFrame({"g": labels, "x": x})
    X, y = X.iloc[2:], y[2:]  # "g0" keeps 2 rows
    y[:2] = 50.0 * X["x"].to_numpy()[:2]
    est = MaskedHierarchicalRegressor(
        group_col="g",
        num_warmup=50,
        num_samples=50,
        num_chains=2,
        random_state=0,
        on_bad_convergence="ignore",
    ).fit(X, y)
    return est, X, y


@pytest.fixture(scope="module")
def many():
    return _many_groups(61)


def test_new_figures_keep_their_labels_in_a_plain_savefig(fitted, tmp_path):
    est, X, y = fitted
    for ax in (
        plotting.plot_mask(est),
        plotting.plot_forest(est),
        plotting.plot_shrinkage(est, X, y),
        plotting.plot_ppc(est, X, y, n_samples=5),
    ):
        fig = ax.figure
        assert fig.get_layout_engine() is not None
        fig.savefig(tmp_path / "plot.png")  # plain: lays the figure out
        box, drawn = fig.bbox, ax.get_tightbbox()  # every drawn label
        assert box.x0 - 1 <= drawn.x0 and drawn.x1 <= box.x1 + 1, drawn
        assert box.y0 - 1 <= drawn.y0 and drawn.y1 <= box.y1 + 1, drawn


def _forest_labels(ax):
    return [t.get_text() for t in ax.get_yticklabels()]


def test_plot_forest_groups_subset(fitted):
    est, _, _ = fitted
    ax = plotting.plot_forest(est, feature="Feed_Speed", groups=["Product_Group_2"])
    assert _forest_labels(ax) == ["population mean", "Product_Group_2"]
    with pytest.raises(ValueError, match=r"1 group\(s\) not seen in fit: 'nope'"):
        plotting.plot_forest(est, groups=["nope"])


def test_plot_forest_shows_the_extremes_above_60_groups(many):
    """61 groups: the 30 whose posterior means are farthest from the median
    (oracle: computed here from the draws), ordered by mean, with a note;
    60 groups (both sides of MAX_FOREST_GROUPS): every group, no note."""
    est, _, _ = many
    ax = plotting.plot_forest(est)
    means = est.posterior_["coef"][:, :, 0].mean(axis=0)
    far = np.argsort(-np.abs(means - np.median(means)), kind="stable")[:30]
    far = far[np.argsort(means[far], kind="stable")]
    labels = _forest_labels(ax)
    assert labels[0] == "population mean" and len(labels) == 31
    assert labels[1:] == [str(est.groups_[g]) for g in far]
    assert "61 groups: the 30 farthest from the median" in ax.get_title()
    est60, _, _ = _many_groups(60)
    ax = plotting.plot_forest(est60)
    n_rows = round(ax.get_ylim()[1] + 0.3)  # one row per group + population
    assert n_rows == 61 and "groups:" not in ax.get_title()


def test_plot_shrinkage_clips_one_outlying_group(many, tmp_path):
    """Oracle for the axis: 3 interquartile ranges beyond the quartiles of the
    no-pooling slopes (plus a 4% margin); clip=False holds every value."""
    est, X, y = many
    raw = plotting.no_pooling_estimates(est, X, y)[1][:, 0]
    assert raw.max() > 40  # "g0"
    q1, q3 = np.quantile(raw, [0.25, 0.75])
    lo, hi = q1 - 3 * (q3 - q1), q3 + 3 * (q3 - q1)
    ax = plotting.plot_shrinkage(est, X, y)
    margin = 0.04 * (hi - lo)
    assert_allclose(ax.get_ylim(), (lo - margin, hi + margin), rtol=1e-12)
    assert "beyond the axis (triangles)" in ax.get_xlabel()
    _render(ax, tmp_path / "clipped.png")
    ax = plotting.plot_shrinkage(est, X, y, clip=False)
    assert ax.get_ylim()[1] > raw.max()
    assert "beyond the axis" not in ax.get_xlabel()
