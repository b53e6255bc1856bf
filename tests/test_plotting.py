"""hiermask.plotting renders every plot to PNG (issue 4)."""

import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
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
