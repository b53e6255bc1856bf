"""summary() and to_arviz() (issue 4)."""

import copy
import sys

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from ._fitted import GROUP, manufacturing_fit

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
    assert_array_equal(steps, est._fitted.posterior.tree_steps)
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


# ------------------------------------------------ tables people use (#15)
def test_summary_long_form_and_population_only(fitted):
    est, _, _ = fitted
    wide = est.summary()
    long = est.summary(long=True)
    assert list(long.columns[:3]) == ["parameter", "group", "feature"]
    assert list(long.columns[3:]) == list(wide.columns)
    # Same rows in the same order, same numbers (the same arithmetic).
    assert_array_equal(long.iloc[:, 3:].to_numpy(), wide.to_numpy())
    row = long.set_index(["parameter", "group", "feature"]).loc[
        ("coef", G2, "Cutting_Wait_Time")
    ]
    assert_array_equal(row.to_numpy(), wide.loc[f"coef[{G2}, Cutting_Wait_Time]"])
    assert (
        long.loc[long["parameter"] == "noise", ["group", "feature"]]
        .isna()
        .to_numpy()
        .all()
    )
    assert set(long.loc[long["parameter"] == "population_coef", "feature"]) == set(
        FEATURES
    )
    population = est.summary(group_level=False)
    assert not population.index.str.startswith(("intercept[", "coef[")).any()
    assert_array_equal(population.to_numpy(), wide.loc[population.index].to_numpy())


def test_summary_reuses_the_fit_diagnostics(fitted, monkeypatch):
    """The fit diagnosed every parameter of this small model: summary()
    computes none again. With the fit's diagnostics removed (as for group
    rows above the fit's limit), it computes them and gets the same values."""
    import hiermask._summary as summary_module

    est, _, _ = fitted
    expected = est.summary()
    bare = copy.deepcopy(est)
    bare._fitted.posterior.diagnostics.clear()
    assert_allclose(bare.summary().to_numpy(), expected.to_numpy(), rtol=1e-12)

    def refuse(x):
        raise AssertionError("diagnostics computed again")

    monkeypatch.setattr(summary_module, "parameter_diagnostics", refuse)
    assert_array_equal(est.summary().to_numpy(), expected.to_numpy())


def test_coefficients_table(fitted):
    est, _, _ = fitted
    table = est.coefficients()
    assert list(table.columns) == ["intercept", *FEATURES]
    assert list(table.index) == [G1, G2] and table.index.name == "group"
    assert_array_equal(table["intercept"], est.intercept_)
    assert np.isnan(table.loc[G1, "Cutting_Wait_Time"])
    on = est.mask_.to_numpy()
    assert_array_equal(table[FEATURES].to_numpy()[on], est.coef_[on])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_to_arviz_log_likelihood_for_loo_and_compare(fitted):
    """Oracle: scipy's normal log density at draw 0 for rows without NaN;
    a row with a NaN in an applicable feature integrates it out. az.loo and
    az.compare run on two hiermask models of the same rows."""
    az = pytest.importorskip("arviz")
    from scipy.stats import norm

    est, X, y = fitted
    idata = est.to_arviz(X)
    ll = idata.log_likelihood["y"].to_numpy()
    n_draws = est.posterior_["noise"].shape[0]
    assert ll.shape == (2, n_draws // 2, len(y))
    post = est.posterior_
    for i in (0, len(y) - 1):
        g = list(est.groups_).index(X[GROUP].iloc[i])
        x = np.nan_to_num(X.iloc[i, 1:].to_numpy(dtype=float)) * est._fitted.mask[g]
        mean = post["intercept"][0, g] + post["coef"][0, g] @ x
        want = norm.logpdf(y.iloc[i], mean, post["noise"][0])
        assert_allclose(ll[0, 0, i], want, rtol=1e-10)
    assert_array_equal(idata.observed_data["y"].to_numpy(), y.to_numpy())
    loo = az.loo(idata)
    assert np.isfinite(loo["elpd_loo"])
    complete, _, _ = manufacturing_fit("complete")
    table = az.compare({"partial": idata, "complete": complete.to_arviz(X)})
    assert set(table.index) == {"partial", "complete"}
    # The groups differ (different slopes): partial pooling predicts better.
    assert table.index[0] == "partial"
    with pytest.raises(ValueError, match="not seen in fit"):
        est.to_arviz(X.assign(**{GROUP: "other"}))
    with pytest.raises(ValueError, match="give y for other rows"):
        est.to_arviz(X.iloc[:5])
    # Both sides of the memory budget (8 bytes per draw and row).
    small = copy.copy(est)
    small.max_posterior_bytes = 8 * n_draws * 3
    assert small.to_arviz(X.iloc[:3], y.iloc[:3]).log_likelihood["y"].shape[2] == 3
    small.max_posterior_bytes -= 1
    with pytest.raises(ValueError, match="above max_posterior_bytes"):
        small.to_arviz(X.iloc[:3], y.iloc[:3])
