"""Issue 14, the estimator's side: ``varying``, ``group_covariance``,
``lkj_concentration``; "auto" detection, unidentified designs, unseen groups
from the correlated population, summary/ArviZ/model-file layout.

The fits here are tiny (the engine is a parameter: the direct engine is the
reference); the statistical oracles (statsmodels, simulations) are in
``test_varying_oracles.py``.
"""

import warnings

import numpy as np
import pandas as pd
import pytest

import hiermask
from hiermask import MaskedHierarchicalRegressor
from hiermask._identify import (
    CONSTANT_RTOL,
    collinear_sets,
    constant_within_groups,
)
from hiermask._predict import _unseen_draws
from hiermask._stats import cell_moments, compute_scaling, group_statistics

from ._fitted import fit_config

TINY = {"num_warmup": 60, "num_samples": 60, "num_chains": 2, "random_state": 0}


def _frame(seed=0, n_groups=6, n_per=12):
    # x varies within groups, u is a group-level predictor (constant within
    # each group), z is off (NaN) in group 0
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_groups), n_per)
    x = rng.normal(size=g.size)
    u = np.repeat(rng.normal(size=n_groups), n_per)
    z = rng.normal(size=g.size)
    z[g == 0] = np.nan
    y = (
        1.0
        + (1.0 + 0.4 * rng.normal(size=n_groups)[g]) * x
        + 2.0 * u
        + np.where(np.isnan(z), 0.0, 0.5 * z)
        + 0.5 * rng.normal(size=n_groups)[g]
        + 0.5 * rng.normal(size=g.size)
    )
    X = pd.DataFrame({"x": x, "u": u, "z": z, "g": [f"G{i}" for i in g]})
    return X, y


def _fit(X, y, **params):
    settings = {"group_col": "g", "on_bad_convergence": "ignore", **TINY, **params}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return MaskedHierarchicalRegressor(**settings).fit(X, y)


@pytest.fixture(scope="module")
def direct_fit():
    """The default model on ``_frame()``, direct engine (shared: do not modify)."""
    X, y = _frame()
    return _fit(X, y, engine="direct"), X, y


# ------------------------------------------------------------- parameters
def test_defaults_are_auto_and_full():
    est = MaskedHierarchicalRegressor()
    assert est.varying == "auto"
    assert est.group_covariance == "full"
    assert est.lkj_concentration == 2.0


@pytest.mark.parametrize(
    "params, message",
    [
        ({"varying": ["nope"]}, "varying lists 'nope', which is not a feature"),
        ({"varying": ["g"]}, "varying lists 'g', which is not a feature"),
        ({"group_covariance": "dense"}, "group_covariance"),
        ({"lkj_concentration": 0.0}, "lkj_concentration"),
        ({"varying": "some"}, "varying"),
    ],
)
def test_invalid_settings_say_what(params, message):
    X, y = _frame()
    est = MaskedHierarchicalRegressor(group_col="g", **TINY, **params)
    with pytest.raises(ValueError, match=message):
        est.fit(X, y)


def test_array_positions():
    X, y = _frame()
    arr = X.to_numpy()
    arr[:, 3] = np.repeat(np.arange(6), 12)
    arr = arr.astype(float)
    # column 1 (u) given by position, column 3 is the group column
    est = _fit(arr, y, group_col=3, varying=[1], engine="direct")
    assert est.varying_.to_dict() == {"x0": False, "x1": True, "x2": False}
    with pytest.raises(ValueError, match="position 3, the group column"):
        _fit(arr, y, group_col=3, varying=[3])
    with pytest.raises(ValueError, match="out of range for X with 4 columns"):
        _fit(arr, y, group_col=3, varying=[7])
    with pytest.raises(ValueError, match="column positions"):
        _fit(arr, y, group_col=3, varying=["x0"])


@pytest.mark.parametrize("engine", ["direct", "collapsed"])
@pytest.mark.parametrize(
    "varying, expected",
    [
        ("auto", {"x": True, "u": False, "z": True}),
        ("all", {"x": True, "u": True, "z": True}),
        (["z"], {"x": False, "u": False, "z": True}),
        ([], {"x": False, "u": False, "z": False}),
    ],
)
def test_varying_series(varying, expected, engine):
    X, y = _frame()
    est = _fit(X, y, varying=varying, engine=engine, group_covariance="diagonal")
    assert est.varying_.dtype == bool
    assert est.varying_.to_dict() == expected
    # a population-only slope: one value for every group where the feature
    # applies, exactly 0 where it is off, and no between-group sd
    coef = est.posterior_["coef"]
    for j, name in enumerate(["x", "u", "z"]):
        applies = est.mask_[name].to_numpy()
        assert np.all(coef[:, ~applies, j] == 0.0)
        if not expected[name]:
            on = coef[:, applies, j]
            np.testing.assert_array_equal(on, on[:, :1].repeat(on.shape[1], 1))
            assert np.all(est.posterior_["group_coef_scale"][:, j] == 0.0)
            assert f"group_coef_scale[{name}]" not in est.summary().index
        else:
            assert np.all(est.posterior_["group_coef_scale"][:, j] > 0.0)


@pytest.mark.parametrize("engine", ["direct", "collapsed"])
def test_pooling_none_shares_the_non_varying_slope(engine):
    X, y = _frame()
    with pytest.warns(UserWarning, match="'u' are constant within every group"):
        est = MaskedHierarchicalRegressor(
            group_col="g", pooling="none", engine=engine,
            on_bad_convergence="ignore", **TINY,
        ).fit(X, y)  # fmt: skip
    coef = est.posterior_["coef"]
    assert est.varying_.to_dict() == {"x": True, "u": False, "z": True}
    np.testing.assert_array_equal(coef[:, :, 1], coef[:, :1, 1].repeat(6, 1))
    assert np.std(coef[:, :, 0].mean(axis=0)) > 0.0  # x: one per group
    assert not hasattr(est, "group_correlation_")


def test_complete_pooling_varies_nothing():
    X, y = _frame()
    est = _fit(X, y, pooling="complete", engine="direct")
    assert not est.varying_.any()
    assert not hasattr(est, "group_correlation_")


# --------------------------------------------------------------- "auto"
def _cells(X, g, mask):
    cells = cell_moments(X, np.ones(X.shape[0]), g, mask.shape[0])
    scaling = compute_scaling(X, np.zeros(X.shape[0]), np.ones(X.shape[0]), mask[g])
    return cells, scaling


def test_constant_within_groups_threshold_both_sides():
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(4), 5)
    level = np.repeat(rng.normal(size=4), 5) * 3.0
    jitter = rng.normal(size=20)
    mask = np.ones((4, 4), bool)
    mask[3, 3] = False
    X = np.column_stack(
        [
            level,  # exactly constant within groups
            level + 100 * CONSTANT_RTOL * jitter,  # within-group sd 1e-7 x scale
            level + 0.01 * CONSTANT_RTOL * jitter,  # 1e-11 x scale: rounding
            np.where(g == 3, np.nan, level),  # off in group 3
        ]
    )
    X[0, 0] = np.nan  # a missing cell leaves the others constant
    cells, scaling = _cells(X, g, mask)
    flags = constant_within_groups(cells, mask, scaling)
    assert flags.tolist() == [True, False, True, True]
    # a group with a single observed value counts as constant
    one = np.column_stack([np.arange(4.0)])
    cells, scaling = _cells(one, np.arange(4), np.ones((4, 1), bool))
    assert constant_within_groups(cells, np.ones((4, 1), bool), scaling).all()


def test_auto_is_said_in_summary_and_plot(direct_fit):
    est, _, _ = direct_fit
    note = est.summary().attrs["varying"]
    assert "group-specific slopes for x, z" in note
    assert "population slope only for u (constant within every group" in note
    assert est.summary(long=True).attrs["varying"] == note


# ---------------------------------------------------------- identification
def _gram(X, g, mask):
    scaling = compute_scaling(X, np.zeros(len(g)), np.ones(len(g)), mask[g])
    stats = group_statistics(X, np.zeros(len(g)), np.ones(len(g)), g, mask, scaling)
    return stats.gram


def test_collinear_sets():
    rng = np.random.default_rng(1)
    g = np.repeat(np.arange(3), 10)
    a, b, c, d = rng.normal(size=(4, 30))
    mask = np.ones((3, 4), bool)
    exact = np.column_stack([a, b, a + 2 * b, c])
    assert collinear_sets(_gram(exact, g, mask), mask) == {(0, 1, 2): 3}
    # a + 2 b plus independent noise of sd 1e-3: not exactly collinear
    near = exact + np.column_stack([0 * d, 0 * d, 1e-3 * d, 0 * d])
    assert collinear_sets(_gram(near, g, mask), mask) == {}
    # column 1 duplicates column 0 in group 0 and column 3 in groups 1, 2
    dup = np.column_stack([a, np.where(g == 0, a, b), c, b])
    assert collinear_sets(_gram(dup, g, mask), mask) == {(0, 1): 1, (1, 3): 2}
    # ... unless column 3 is off in groups 1 and 2
    off = mask.copy()
    off[1:, 3] = False
    dup[g > 0, 3] = np.nan
    assert collinear_sets(_gram(dup, g, off), off) == {(0, 1): 1}
    # too few rows for the columns that vary: not judged
    few = np.column_stack([a, b, c, a + b])[:4]
    one = np.zeros(4, int)
    assert collinear_sets(_gram(few, one, mask[:1]), mask[:1]) == {}


def _messages(record):
    return [str(w.message) for w in record if w.category is UserWarning]


def test_unidentified_designs_are_named():
    X, y = _frame()
    X = X.assign(x2=X["x"], const=3.0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        MaskedHierarchicalRegressor(
            group_col="g", varying="all", engine="direct",
            on_bad_convergence="ignore", **TINY,
        ).fit(X, y)  # fmt: skip
    text = "\n".join(_messages(record))
    assert "Columns 'x', 'x2' are exactly collinear within 6 of 6 group(s)" in text
    assert "Feature(s) 'const' take a single value in every row" in text
    assert "Feature(s) 'u' are constant within every group" in text
    assert "varying='auto'" in text


def test_identified_design_gives_no_warning():
    X, y = _frame()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        MaskedHierarchicalRegressor(
            group_col="g", engine="direct", on_bad_convergence="ignore", **TINY
        ).fit(X, y)
    assert _messages(record) == []


# ----------------------------------------------------------- unseen groups
def test_unseen_draws_follow_the_correlated_population(direct_fit):
    est, _, _ = direct_fit
    assert est.varying_.to_dict() == {"x": True, "u": False, "z": True}
    post = est._fitted.posterior
    n_draws = post.draws["noise"].shape[0]
    on = np.array([True, True, True])
    draw_idx = np.arange(n_draws)
    coef = np.concatenate(
        [_unseen_draws(post, f"new{i}", on, 0, draw_idx) for i in range(300)]
    )
    # the closed form that predict uses: E over the posterior of the
    # population mean, Cov = Cov(population) + E[diag(tau) Omega diag(tau)]
    np.testing.assert_allclose(coef.mean(axis=0), post.unseen_mean, atol=0.05)
    sd = np.sqrt(np.diag(post.unseen_cov))
    emp = np.cov(coef, rowvar=False)
    # 300 x n_draws draws: relative errors of a few percent
    np.testing.assert_allclose(np.sqrt(np.diag(emp)), sd, rtol=0.05)
    corr = emp / np.outer(np.sqrt(np.diag(emp)), np.sqrt(np.diag(emp)))
    implied = post.unseen_cov / np.outer(sd, sd)
    np.testing.assert_allclose(corr, implied, atol=0.04)
    # u does not vary: its unseen sd is the population slope's alone
    pop = np.std(post.draws["population_coef"][:, 1])
    np.testing.assert_allclose(sd[2], pop, rtol=0.05)


def test_unseen_group_uses_its_own_group_level_value(direct_fit):
    est, X, _ = direct_fit
    row = X.iloc[:1].assign(g="new")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = est.predict(row)
        shifted = est.predict(row.assign(u=row["u"] + 1.0))
    np.testing.assert_allclose(shifted - base, est.population_coef_[1], rtol=1e-10)


# ------------------------------------------------------------------ layout
def test_every_reported_parameter_has_one_key_and_one_name(direct_fit):
    # Fit's diagnostics, summary() and convergence_ go through one
    # enumeration: every key names the summary row at the same place, and
    # each row's mean is that of the draws at the key's positions.
    est, _, _ = direct_fit
    model = est._fitted
    table = est.summary()
    keys = [key for block in model.blocks() for key in block.keys]
    assert [model.name_of(key) for key in keys] == list(table.index)
    assert set(model.posterior.diagnostics) <= set(keys)
    draws = est.posterior_
    for key, name in zip(keys, table.index, strict=True):
        parameter, _, inside = key.partition("[")
        at = tuple(int(i) for i in inside.rstrip("]").split(",")) if inside else ()
        expected = np.mean(draws[parameter][(slice(None), *at)])
        assert table.loc[name, "mean"] == pytest.approx(expected, rel=1e-12), key
    assert est.convergence_["worst_parameter"] in table.index
    with pytest.raises(KeyError):
        model.name_of("coef[0, 99]")


def test_correlation_layout(direct_fit, tmp_path):
    est, X, _ = direct_fit
    corr = est.posterior_["group_correlation"]
    assert corr.shape == (120, 3, 3)
    np.testing.assert_allclose(np.diagonal(corr, axis1=1, axis2=2), 1.0)
    np.testing.assert_allclose(corr, np.swapaxes(corr, 1, 2), atol=1e-12)
    frame = est.group_correlation_
    assert list(frame.index) == ["intercept", "x", "z"] == list(frame.columns)
    np.testing.assert_allclose(frame.to_numpy(), corr.mean(axis=0))
    table = est.summary()
    row = table.loc["group_correlation[intercept, x]"]
    assert row["mean"] == pytest.approx(corr[:, 0, 1].mean())
    assert "group_correlation[x, z]" in table.index
    assert "group_correlation[intercept, u]" not in table.index
    long = est.summary(long=True)
    assert (long["parameter"] == "group_correlation").sum() == 3
    idata = est.to_arviz()
    values = idata.posterior["group_correlation"]
    assert values.dims == ("chain", "draw", "effect", "effect_")
    assert list(values.coords["effect"].values) == ["intercept", "x", "z"]
    path = tmp_path / "m.hmz"
    est.save(path)
    back = hiermask.load(path)
    np.testing.assert_array_equal(back.posterior_["group_correlation"], corr)
    assert back.varying_.equals(est.varying_)
    new = X.iloc[:5].assign(g="new")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(
            back.sample_y(new, n_samples=7), est.sample_y(new, n_samples=7)
        )


def test_model_file_keeps_a_varying_list(tmp_path):
    X, y = _frame()
    est = _fit(X, y, engine="direct", varying=["z", "x"], group_covariance="diagonal")
    est.save(tmp_path / "m.hmz")
    back = hiermask.load(tmp_path / "m.hmz")
    assert back.get_params()["varying"] == ["z", "x"]
    assert back.varying_.to_dict() == {"x": True, "u": False, "z": True}
    with pytest.raises(ValueError, match="cannot be saved in a model file"):
        est.set_params(varying=[1.5]).save(tmp_path / "bad.hmz")


def test_full_covariance_with_one_varying_effect():
    X, y = _frame()
    est = _fit(X, y, engine="direct", varying=[])
    np.testing.assert_array_equal(est.posterior_["group_correlation"], 1.0)
    assert list(est.group_correlation_.index) == ["intercept"]


@pytest.mark.parametrize("n_groups", [2, 3])
def test_full_needs_as_many_groups_as_correlated_effects(n_groups):
    # _frame's effects: intercept, x and z vary (u is a group-level
    # predictor): q = 3. Three groups estimate the correlation; two are fewer
    # than the effects: "full" is fitted as "diagonal" (the same draws as an
    # explicit "diagonal" fit, bit for bit) and a warning gives the counts.
    X, y = _frame(n_groups=n_groups)
    settings = {"group_col": "g", "on_bad_convergence": "ignore", **TINY}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        est = MaskedHierarchicalRegressor(**settings).fit(X, y)
    assert est.varying_.to_dict() == {"x": True, "u": False, "z": True}
    notes = [m for m in _messages(record) if "group_covariance='full'" in m]
    summary_line = est.summary().attrs["varying"]
    if n_groups == 3:
        assert notes == []
        assert est.group_correlation_.shape == (3, 3)
        assert "fitted as 'diagonal'" not in summary_line
        return
    (note,) = notes
    assert note.startswith(
        "group_covariance='full' with 2 group(s) for 3 correlated group effects "
        "(the intercept and 2 varying slope(s))"
    )
    assert "their 3 correlations" in note
    assert "group_correlation" not in est.posterior_
    assert not hasattr(est, "group_correlation_")
    assert est.get_params()["group_covariance"] == "full"  # not changed
    assert "group_covariance='full' (fitted as 'diagonal'" in summary_line
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        diagonal = MaskedHierarchicalRegressor(
            **settings, group_covariance="diagonal"
        ).fit(X, y)
    assert not [m for m in _messages(record) if "group_covariance='full'" in m]
    assert set(diagonal.posterior_) == set(est.posterior_)
    for name, draws in diagonal.posterior_.items():
        np.testing.assert_array_equal(est.posterior_[name], draws, err_msg=name)


def test_lkj_concentration_is_traced():
    # a refit with another concentration reuses the compiled sampler
    from hiermask._runner import cache_info

    X, y = _frame()
    _fit(X, y, engine="direct")
    before = cache_info().misses
    _fit(X, y, engine="direct", lkj_concentration=7.0)
    assert cache_info().misses == before


def test_indicator_through_the_mask_is_not_a_single_value():
    # 1.0 where it applies, off elsewhere: identified by the groups where it
    # is off, so only the group-level warning (when its slope varies) fires
    from hiermask._identify import warn_unidentified

    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(6), 8)
    mask = np.ones((6, 2), bool)
    mask[3:, 1] = False
    X = np.column_stack([rng.normal(size=48), np.where(g < 3, 1.0, np.nan)])
    cells, scaling = _cells(X, g, mask)
    config = fit_config(engine="direct", feature_names=("x", "ind"))
    gram = _gram(X, g, mask)

    def messages(varying):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            warn_unidentified(config, varying, cells, mask, scaling, gram)
        return _messages(record)

    assert messages(np.array([True, False])) == []
    (only,) = messages(np.array([True, True]))
    assert only.startswith("Feature(s) 'ind' are constant within every group")


def test_plots_say_what_varies(direct_fit, tmp_path):
    from matplotlib.figure import Figure
    from matplotlib.patches import Ellipse

    from hiermask import plotting

    est, X, y = direct_fit
    ax = plotting.plot_mask(est, ax=Figure().subplots())
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["x", "u (population slope)", "z"]
    ax = plotting.plot_group_effects(est, y="x", ax=Figure().subplots())
    path = tmp_path / "effects.png"
    ax.figure.savefig(path, dpi=60)
    assert path.stat().st_size > 1000
    points = ax.collections[0].get_offsets()
    coef = est.coefficients().to_numpy()
    np.testing.assert_allclose(points, coef[:, [0, 1]])  # every group has x
    ellipses = [p for p in ax.patches if isinstance(p, Ellipse)]
    assert len(ellipses) == 2
    # An unseen group's effects (intercept, x): the population draws' mean and
    # covariance plus the posterior-mean between-group covariance.
    draws = est.posterior_
    pop = np.column_stack(
        [draws["population_intercept"], draws["population_coef"][:, 0]]
    )
    sd = np.column_stack(
        [draws["group_intercept_scale"], draws["group_coef_scale"][:, 0]]
    )
    corr = draws["group_correlation"][:, :2, :2]  # effects: intercept, x, z
    cov = np.cov(pop, rowvar=False, bias=True) + np.mean(
        sd[:, :, None] * corr * sd[:, None, :], axis=0
    )
    np.testing.assert_allclose(ellipses[0].center, pop.mean(axis=0), rtol=1e-12)
    # the 50% ellipse's area: pi chi2_2(0.5) sqrt(det cov)
    area = np.pi * ellipses[0].width * ellipses[0].height / 4
    expected = np.pi * 2 * np.log(2) * np.sqrt(np.linalg.det(cov))
    np.testing.assert_allclose(area, expected, rtol=1e-10)
    rho = np.mean(corr[:, 0, 1])
    assert ax.get_title() == f"Group effects (population correlation {rho:.2f})"
    # z is off in group 0: five groups
    ax = plotting.plot_group_effects(est, x="x", y="z", ax=Figure().subplots())
    assert len(ax.collections[0].get_offsets()) == 5
    with pytest.raises(ValueError, match="'u' has no group-specific slope"):
        plotting.plot_group_effects(est, y="u")
    with pytest.raises(ValueError, match="needs pooling='partial'"):
        plotting.plot_group_effects(_fit(X, y, engine="direct", pooling="complete"))
