"""Group coefficients kept as moments; their draws made only when asked for.

With ``keep_group_draws=False`` (or "auto" above
``_limits.KEEP_GROUP_DRAWS_BYTES``) the collapsed engine's conditional
program returns the population draws and each group's exact moments only;
``posterior_`` (a :class:`hiermask._fit.GroupDraws`) makes ``intercept`` and
``coef`` on first access by running the conditional draws again with the
fit's key. Oracle: the fit that kept them. Everything must be equal bit for
bit: the draws, ``coef_``, ``intercept_``, ``predict`` with its sd, and
``predict_interval``.
"""

import json
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pandas as pd
import pytest

from hiermask import MaskedHierarchicalRegressor, _limits, _runner
from hiermask._fit import GroupDraws
from hiermask.datasets import make_grouped_regression

from .conftest import FAST
from .test_reliability import ALLOWED_PICKLE_MODULES, pickled_globals

SETTINGS = {"group_col": "group", "on_bad_convergence": "ignore", **FAST}


def _data(missing=0):
    X, y = make_grouped_regression(240, 6, 3, mask_fraction=0.2, random_state=4)
    if missing:
        X = X.copy()
        rows = np.random.default_rng(0).choice(len(X), missing, replace=False)
        for row in rows:  # a NaN in an applicable cell: latent, imputed
            cols = [c for c in ("x0", "x1", "x2") if np.isfinite(X.at[row, c])]
            X.at[row, cols[0]] = np.nan
    return X, y


def _pair(X, y, **params):
    kept = MaskedHierarchicalRegressor(keep_group_draws=True, **SETTINGS, **params)
    made = MaskedHierarchicalRegressor(keep_group_draws=False, **SETTINGS, **params)
    return kept.fit(X, y), made.fit(X, y)


CASES = {
    "full": {},
    "diagonal": {"group_covariance": "diagonal", "varying": "all"},
    "population-only slope": {"group_covariance": "diagonal", "varying": ["x0"]},
    "none": {"pooling": "none"},
    "complete": {"pooling": "complete"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_group_draws_made_on_access_equal_the_kept_ones(case):
    X, y = _data()
    kept, made = _pair(X, y, **CASES[case])
    assert isinstance(made.posterior_, GroupDraws)
    assert not made.posterior_.made
    assert type(kept.posterior_) is dict
    # predictions come from the moments, before any group draw is made
    np.testing.assert_array_equal(made.coef_, kept.coef_)
    np.testing.assert_array_equal(made.intercept_, kept.intercept_)
    for a, b in zip(
        made.predict(X, return_std=True), kept.predict(X, return_std=True), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        made.predict_interval(X, coverage=0.8), kept.predict_interval(X, coverage=0.8)
    )
    assert not made.posterior_.made
    assert list(made.posterior_) == list(kept.posterior_)
    for name, value in kept.posterior_.items():
        np.testing.assert_array_equal(made.posterior_[name], value, err_msg=name)
    assert made.posterior_.made


def test_group_draws_of_imputed_cells_equal_the_kept_ones():
    # latent cells: the conditional draws take the sampled cells too
    X, y = _data(missing=5)
    kept, made = _pair(X, y, group_covariance="diagonal", varying="all")
    np.testing.assert_array_equal(made.predict(X), kept.predict(X))
    # summary(): the population rows from the same draws; the group rows
    # from the exact moments (normal interval, no diagnostics), no draw made
    a = made.summary(coverage=0.8)
    b = kept.summary(coverage=0.8)
    assert list(a.index) == list(b.index)
    assert not made.posterior_.made
    group = a.index.str.startswith(("intercept[", "coef["))
    pd.testing.assert_frame_equal(a[~group], b[~group])
    assert a.loc[group, ["ess_bulk", "ess_tail", "r_hat"]].isna().all().all()
    post, mask = made._fitted.posterior, made._fitted.mask
    var = np.diagonal(post.coef_cov, axis1=1, axis2=2)
    mean = np.concatenate([post.coef_mean[:, 0], post.coef_mean[:, 1:][mask]])
    cov = np.concatenate([var[:, 0], var[:, 1:][mask]])
    np.testing.assert_array_equal(a.loc[group, "mean"].to_numpy(), mean)
    np.testing.assert_array_equal(a.loc[group, "sd"].to_numpy(), np.sqrt(cov))
    half = a.loc[group, "90%"].to_numpy() - mean
    np.testing.assert_allclose(half, 1.2815515655446004 * np.sqrt(cov), rtol=1e-12)
    np.testing.assert_allclose(
        a.loc[group, "10%"].to_numpy(), mean - half, rtol=1e-12, atol=1e-12
    )
    for name in ("intercept", "coef"):
        np.testing.assert_array_equal(made.posterior_[name], kept.posterior_[name])
    # the other readers of group draws make them too
    np.testing.assert_array_equal(
        made.sample_y(X, n_samples=3, random_state=1),
        kept.sample_y(X, n_samples=3, random_state=1),
    )
    a, b = made.to_arviz().posterior, kept.to_arviz().posterior
    np.testing.assert_array_equal(a["coef"].values, b["coef"].values)


@pytest.mark.parametrize("above", [False, True])
def test_keep_group_draws_auto_keeps_up_to_the_limit(above, monkeypatch):
    X, y = _data()
    need = FAST["num_chains"] * FAST["num_samples"] * 6 * 4 * 8
    monkeypatch.setattr(_limits, "KEEP_GROUP_DRAWS_BYTES", need - above)
    est = MaskedHierarchicalRegressor(**SETTINGS).fit(X, y)
    assert isinstance(est.posterior_, GroupDraws) == above


def test_max_posterior_bytes_bounds_only_kept_draws():
    X, y = _data()
    small = {**SETTINGS, "max_posterior_bytes": 1000}
    with pytest.raises(ValueError, match="keep_group_draws=False"):
        MaskedHierarchicalRegressor(keep_group_draws=True, **small).fit(X, y)
    est = MaskedHierarchicalRegressor(keep_group_draws=False, **small).fit(X, y)
    assert est.posterior_["coef"].shape == (300, 6, 3)


def test_direct_engine_always_keeps_its_group_draws():
    X, y = _data()
    with pytest.raises(ValueError, match="keep_group_draws=False needs the collapsed"):
        MaskedHierarchicalRegressor(
            engine="direct", keep_group_draws=False, **SETTINGS
        ).fit(X, y)


@pytest.fixture(scope="module")
def diagonal_pair():
    X, y = _data()
    return (X, *_pair(X, y, group_covariance="diagonal", varying="all"))


def test_the_forest_of_a_fit_without_group_draws_shows_the_moments(diagonal_pair):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from hiermask import plotting

    _, kept, made = diagonal_pair
    made = pickle.loads(pickle.dumps(made))  # without the draws other tests made
    ax = plotting.plot_forest(made, feature="x0", coverage=0.9, ax=Figure().subplots())
    assert not made.posterior_.made  # no draw made
    post, mask = made._fitted.posterior, made._fitted.mask
    groups = np.flatnonzero(mask[:, 0])
    mean = post.coef_mean[groups, 1]
    half = 1.6448536269514722 * np.sqrt(post.coef_cov[groups, 1, 1])
    # per row an interval, then a marker; the population's row first
    lines = ax.lines[2 : 2 + 2 * len(groups)]
    np.testing.assert_allclose(
        [line.get_xdata()[0] for line in lines[1::2]], mean, rtol=1e-12
    )
    np.testing.assert_allclose(
        [line.get_xdata() for line in lines[::2]],
        np.column_stack([mean - half, mean + half]),
        rtol=1e-12,
    )
    # the kept fit's forest: the draws' means, within Monte Carlo error
    ax = plotting.plot_forest(kept, feature="x0", coverage=0.9, ax=Figure().subplots())
    drawn = [line.get_xdata()[0] for line in ax.lines[3 : 3 + 2 * len(groups) : 2]]
    sd = half / 1.6448536269514722
    assert np.all(np.abs(np.array(drawn) - mean) < 4.5 * sd / np.sqrt(300))


def test_a_pickle_holds_what_makes_the_group_draws_not_them(diagonal_pair, tmp_path):
    _, kept, made = diagonal_pair
    _ = made.posterior_["coef"]  # made and held; the pickle leaves them out
    blob = pickle.dumps(made)
    modules = {module.split(".")[0] for module, _ in pickled_globals(blob)}
    assert modules <= ALLOWED_PICKLE_MODULES
    assert len(blob) < len(pickle.dumps(kept))
    path = tmp_path / "model.pkl"
    path.write_bytes(blob)
    np.save(tmp_path / "coef.npy", kept.posterior_["coef"])
    code = (
        "import pickle, numpy as np;"
        f"est = pickle.load(open({str(path)!r}, 'rb'));"
        f"expected = np.load({str(tmp_path / 'coef.npy')!r});"
        "assert not est.posterior_.made;"
        "assert np.array_equal(est.posterior_['coef'], expected);"
        "print('same')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "same"


def _document(path):
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read("model.json")), archive.namelist()


def test_a_model_file_holds_the_group_draws_only_when_fit_kept_them(
    diagonal_pair, tmp_path
):
    import hiermask

    X, kept, _ = diagonal_pair
    kept.save(tmp_path / "kept.hmz")
    document, names = _document(tmp_path / "kept.hmz")
    assert document["format_version"] == 1  # older hiermask reads it
    assert "arrays/posterior_.coef.npy" in names
    loaded = hiermask.load(tmp_path / "kept.hmz")
    assert type(loaded.posterior_) is dict
    np.testing.assert_array_equal(loaded.posterior_["coef"], kept.posterior_["coef"])

    lean = MaskedHierarchicalRegressor(
        keep_group_draws=False, group_covariance="diagonal", varying="all", **SETTINGS
    ).fit(*_data())
    lean.save(tmp_path / "lean.hmz")
    assert not lean.posterior_.made  # saving made no group draw
    document, names = _document(tmp_path / "lean.hmz")
    assert document["format_version"] == 2
    assert not any(".intercept." in n or ".coef." in n for n in names), names
    size = (tmp_path / "lean.hmz").stat().st_size
    assert size < (tmp_path / "kept.hmz").stat().st_size / 2
    _runner._CACHE.clear()
    loaded = hiermask.load(tmp_path / "lean.hmz")
    assert not loaded._fitted.kept_group_draws
    np.testing.assert_array_equal(loaded.predict(X), lean.predict(X))
    with_std = [m.predict(X, return_std=True) for m in (loaded, lean)]
    for a, b in zip(*with_std, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.coef_, lean.coef_)
    pd.testing.assert_frame_equal(loaded.summary(), lean.summary())
    assert list(loaded.posterior_) == list(lean.posterior_)
    for ask in (
        lambda: loaded.posterior_["coef"],
        lambda: loaded.sample_y(X),
        lambda: loaded.to_arviz(),
    ):
        with pytest.raises(ValueError, match="keep_group_draws=True and save again"):
            ask()
    # It pickles (no draws to hold) and saves again to the same bytes.
    again = pickle.loads(pickle.dumps(loaded))
    np.testing.assert_array_equal(again.predict(X), lean.predict(X))
    loaded.save(tmp_path / "again.hmz")
    assert (tmp_path / "again.hmz").read_bytes() == (tmp_path / "lean.hmz").read_bytes()


@pytest.mark.parametrize("version, drop", [(1, ("coef", "intercept")), (2, ("coef",))])
def test_a_file_missing_group_draws_it_needs_is_refused(
    diagonal_pair, tmp_path, version, drop
):
    import hiermask

    _, kept, _ = diagonal_pair
    kept.save(tmp_path / "kept.hmz")
    with zipfile.ZipFile(tmp_path / "kept.hmz") as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    document = json.loads(members["model.json"])
    document["format_version"] = version
    for name in drop:
        del document["attributes"]["posterior_"][name]
        del members[f"arrays/posterior_.{name}.npy"]
    members["model.json"] = json.dumps(document).encode()
    with zipfile.ZipFile(tmp_path / "bad.hmz", "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    expected = "format 1 requires" if version == 1 else "'intercept' without 'coef'"
    with pytest.raises(hiermask.ModelFileError, match=expected):
        hiermask.load(tmp_path / "bad.hmz")


def test_moments_equal_those_of_many_group_draws():
    # coef_mean / coef_cov (closed form, averaged over the hyperparameter
    # draws) against the mean and covariance of 4,000 conditional draws.
    # Given the hyperparameter draws, mean(draws) - coef_mean is a mean of
    # D independent normals of covariance C_d (the conditional ones), so its
    # sd is at most sqrt(diag(coef_cov) / D): |z| < 4.5 for every entry.
    X, y = _data()
    est = MaskedHierarchicalRegressor(
        keep_group_draws=False,
        **{**SETTINGS, "num_warmup": 500, "num_samples": 2000, "num_chains": 2},
        group_covariance="diagonal",
        varying="all",
    ).fit(X, y)
    post = est._fitted.posterior
    both = np.concatenate(
        [est.posterior_["intercept"][..., None], est.posterior_["coef"]], axis=-1
    )
    n_draws = both.shape[0]
    on = np.concatenate([np.ones((6, 1), bool), est._fitted.mask], axis=1)
    sd = np.sqrt(np.diagonal(post.coef_cov, axis1=1, axis2=2))
    z = (both.mean(axis=0) - post.coef_mean)[on] / (sd[on] / np.sqrt(n_draws))
    assert np.max(np.abs(z)) < 4.5
    # variances: the draws' over the moments' within 15% (sd of a variance
    # estimate from 4,000 draws: about 2.2% for independent draws)
    ratio = both.var(axis=0)[on] / sd[on] ** 2
    np.testing.assert_allclose(ratio, 1.0, atol=0.15)
