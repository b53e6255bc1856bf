"""summary() and to_arviz() (issue 4)."""

import sys

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from ._fitted import manufacturing_fit

G1, G2 = "Product_Group_1", "Product_Group_2"
FEATURES = ["Feed_Speed", "Pull_Acceleration", "Cutting_Wait_Time"]


@pytest.fixture(scope="module")
def fitted():
    return manufacturing_fit()


# ------------------------------------------------------------------ summary
def test_summary_rows_and_columns(fitted):
    est, _, _ = fitted
    table = est.summary()
    assert list(table.columns) == [
        "mean",
        "sd",
        "5%",
        "95%",
        "ess_bulk",
        "ess_tail",
        "r_hat",
    ]
    expected = (
        [f"intercept[{g}]" for g in (G1, G2)]
        + [f"coef[{G1}, {f}]" for f in FEATURES[:2]]
        + [f"coef[{G2}, {f}]" for f in FEATURES]
        + ["population_intercept"]
        + [f"population_coef[{f}]" for f in FEATURES]
        + ["group_intercept_scale"]
        + [f"group_coef_scale[{f}]" for f in FEATURES]
        + ["noise"]
    )
    assert list(table.index) == expected
    # The masked pair has no parameter: no row, not a row of zeros.
    assert f"coef[{G1}, Cutting_Wait_Time]" not in table.index
    assert np.isfinite(table.to_numpy()).all()


def test_summary_values_are_those_of_the_draws(fitted):
    est, _, _ = fitted
    table = est.summary()
    post = est.posterior_
    for g, group in enumerate((G1, G2)):
        for j, feature in enumerate(FEATURES):
            name = f"coef[{group}, {feature}]"
            if not est.mask_.loc[group, feature]:
                continue
            draws = post["coef"][:, g, j]
            assert_allclose(table.loc[name, "mean"], np.mean(draws), rtol=1e-12)
            assert_allclose(table.loc[name, "sd"], np.std(draws, ddof=1), rtol=1e-12)
            assert_allclose(
                table.loc[name, ["5%", "95%"]].to_numpy(float),
                np.quantile(draws, [0.05, 0.95]),
                rtol=1e-12,
            )
        assert_allclose(
            table.loc[f"intercept[{group}]", "mean"], post["intercept"][:, g].mean()
        )
    assert_allclose(table.loc["noise", "mean"], post["noise"].mean())
    assert_allclose(
        table.loc["population_coef[Feed_Speed]", "mean"],
        post["population_coef"][:, 0].mean(),
    )
    assert_allclose(
        table.loc["group_coef_scale[Cutting_Wait_Time]", "mean"],
        post["group_coef_scale"][:, 2].mean(),
    )
    # The group coefficients recover the truth of the simulator.
    assert abs(table.loc[f"coef[{G1}, Feed_Speed]", "mean"] - 2.5) < 0.1
    assert abs(table.loc[f"coef[{G2}, Cutting_Wait_Time]", "mean"] - 3.0) < 0.3


def test_summary_diagnostics_agree_with_convergence(fitted):
    est, _, _ = fitted
    table = est.summary()
    assert_allclose(table["r_hat"].max(), est.convergence_["max_r_hat"], rtol=1e-10)
    assert_allclose(
        table["ess_bulk"].min(), est.convergence_["min_ess_bulk"], rtol=1e-10
    )
    assert (table["ess_tail"] > 0).all()


@pytest.mark.parametrize(
    ("coverage", "lower", "upper"),
    [(0.9, "5%", "95%"), (0.95, "2.5%", "97.5%"), (0.5, "25%", "75%")],
)
def test_summary_interval_columns_follow_coverage(fitted, coverage, lower, upper):
    est, _, _ = fitted
    table = est.summary(coverage=coverage)
    assert list(table.columns[2:4]) == [lower, upper]
    assert (table[lower] < table[upper]).all()
    tail = (1 - coverage) / 2
    assert_allclose(
        table.loc["noise", [lower, upper]].to_numpy(float),
        np.quantile(est.posterior_["noise"], [tail, 1 - tail]),
        rtol=1e-12,
    )


@pytest.mark.parametrize("coverage", [0, 1, 1.5, -0.1, "a"])
def test_summary_rejects_bad_coverage(fitted, coverage):
    est, _, _ = fitted
    with pytest.raises(ValueError, match="coverage"):
        est.summary(coverage=coverage)


def test_summary_without_pooling_has_no_population_rows():
    est, _, _ = manufacturing_fit("none")
    table = est.summary()
    assert not table.index.str.startswith(("population", "group_")).any()
    assert len(table) == 2 + 5 + 1


# ------------------------------------------------------------------- arviz
def test_to_arviz_without_pooling_has_no_population_variables():
    est, _, _ = manufacturing_fit("none")
    post = est.to_arviz().posterior
    assert set(post.data_vars) == {"intercept", "coef", "noise"}
    assert np.isnan(
        post["coef"].sel(group=G1, feature="Cutting_Wait_Time").values
    ).all()


def test_to_arviz_structure(fitted):
    est, _, _ = fitted
    idata = est.to_arviz()
    post = idata.posterior
    assert set(post.data_vars) == {
        "intercept",
        "coef",
        "noise",
        "population_intercept",
        "population_coef",
        "group_intercept_scale",
        "group_coef_scale",
    }
    assert post["coef"].dims == ("chain", "draw", "group", "feature")
    assert post["intercept"].dims == ("chain", "draw", "group")
    assert post["population_coef"].dims == ("chain", "draw", "feature")
    assert post["noise"].dims == ("chain", "draw")
    assert post.sizes == {"chain": 2, "draw": 150, "group": 2, "feature": 3}
    assert list(post["group"].values) == [G1, G2]
    assert list(post["feature"].values) == FEATURES

    coef = post["coef"]
    masked = coef.sel(group=G1, feature="Cutting_Wait_Time").values
    assert np.isnan(masked).all()
    on = coef.sel(group=G2, feature="Cutting_Wait_Time").values
    assert np.isfinite(on).all()
    # Chain-major layout of posterior_ is kept.
    assert_array_equal(
        coef.sel(group=G2).values.reshape(-1, 3), est.posterior_["coef"][:, 1, :]
    )
    assert_array_equal(post["noise"].values.reshape(-1), est.posterior_["noise"])


def test_to_arviz_sample_stats_and_observed(fitted):
    est, _, y = fitted
    idata = est.to_arviz()
    stats = idata.sample_stats
    assert {"diverging", "tree_depth", "n_steps"} <= set(stats.data_vars)
    assert stats["diverging"].dtype == bool
    assert stats["diverging"].dims == ("chain", "draw")
    steps = stats["n_steps"].values
    assert_array_equal(steps, est._posterior.tree_steps)
    assert_array_equal(stats["tree_depth"].values, np.ceil(np.log2(steps + 1)))
    assert int(stats["diverging"].sum()) == est.convergence_["n_divergences"]
    assert_allclose(idata.observed_data["y"].values, y.to_numpy())
    assert_array_equal(idata.constant_data["mask"].values, est.mask_.to_numpy())


@pytest.mark.filterwarnings("ignore:Your data appears to have a single value")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_arviz_functions_work_on_it(fitted):
    az = pytest.importorskip("arviz")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    est, _, _ = fitted
    idata = est.to_arviz()
    table = az.summary(idata)
    assert f"coef[{G2}, Cutting_Wait_Time]" in table.index
    assert np.isfinite(table.loc[f"coef[{G2}, Feed_Speed]", "mean"])
    assert_allclose(
        table.loc[f"coef[{G2}, Feed_Speed]", "mean"],
        est.summary().loc[f"coef[{G2}, Feed_Speed]", "mean"],
        atol=0.01,
    )
    try:
        axes = az.plot_trace(idata, var_names=["coef", "noise"])
        assert axes.size > 0
        axes = az.plot_forest(idata, var_names=["coef"], combined=True)
        assert len(axes) > 0
    finally:
        plt.close("all")


def test_to_arviz_without_arviz_says_how_to_install(fitted, monkeypatch):
    est, _, _ = fitted
    monkeypatch.setitem(sys.modules, "arviz", None)
    with pytest.raises(ImportError, match=r'pip install "hiermask\[arviz\]"'):
        est.to_arviz()
