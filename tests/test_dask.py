"""Fit and predict on Dask data frames against the in-memory path (issue 6).

Everything runs on one ``distributed.LocalCluster`` (2 worker processes, 1
thread each) started and closed by the module fixture. Oracles: the
in-memory fit and predict of the same rows.

Tolerances. The statistics of a partitioned frame are sums in another order
than the in-memory ones, so they agree to float64 rounding: ``rtol=1e-12``
(with an absolute floor of ``1e-12`` times the largest entry, for entries
that cancel to near zero). NUTS amplifies a one-ulp change of its input into
different chains, so the posterior of a partitioned fit matches the
in-memory one in distribution: posterior means within 4.5 Monte Carlo
standard errors. With a single partition both paths run the same arithmetic
in the same order, and the draws are identical bit for bit.
"""

import itertools
import os
import pickle
import time
import warnings

import numpy as np
import pandas as pd
import pytest

try:
    import dask
    import dask.dataframe as dd
    from distributed import Client, LocalCluster
except ImportError:  # pragma: no cover - CI installs the extra
    if os.environ.get("CI"):
        raise
    pytest.skip(
        "needs the dask extra: pip install 'hiermask[dask]'", allow_module_level=True
    )

import hiermask._estimator as estimator_module
import hiermask._fit as fit_module
from hiermask import MaskedHierarchicalRegressor, UnseenGroupWarning
from hiermask._diagnostics import parameter_diagnostics

from .conftest import FAST
from .test_reliability import ALLOWED_PICKLE_MODULES, _leaf_types, pickled_globals

FEATURES = ["a", "b", "c"]
#: Partition sizes of the 300-row frame: unequal, one empty.
SIZES = [70, 0, 130, 100]
RTOL = 1e-12


@pytest.fixture(scope="module")
def client():
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


def make_frame(seed=0, n=300, labels="str", missing=0.03, weights=True, d_share=0.6):
    """Five groups in random row order; ``c`` is all-NaN in group "a" (off),
    ``b`` is NaN in a share ``d_share`` of group "d"'s rows, and a share
    ``missing`` of the other cells is NaN."""
    rng = np.random.default_rng(seed)
    names = np.array(["e", "a", "c", "b", "d"])
    code = rng.integers(0, 5, n)
    X = rng.normal(size=(n, 3)) * [1.0, 2.0, 0.5] + [3.0, -1.0, 10.0]
    coef = np.array([1.0, -0.5, 2.0]) + rng.normal(0, 0.3, size=(5, 3))
    y = 2.0 + 0.5 * code + np.sum(coef[code] * X, axis=1) + rng.normal(0, 0.5, n)
    group = names[code]
    X[group == "a", 2] = np.nan
    d_rows = np.flatnonzero(group == "d")
    X[d_rows[: int(d_share * len(d_rows))], 1] = np.nan
    holes = (rng.random((n, 3)) < missing) & (group != "a")[:, None]
    X[holes] = np.nan
    frame = pd.DataFrame(X, columns=FEATURES)
    if labels == "str":
        frame["g"] = group
    elif labels == "category":
        frame["g"] = pd.Categorical(group, categories=["z", *sorted(set(names))])
    else:
        frame["g"] = code * 10 + 7
    frame["y"] = y
    frame["w"] = 1.0 + (rng.random(n) < 0.3) if weights else 1.0
    return frame


def to_dask(frame, sizes=SIZES):
    """A dask DataFrame with the given partition sizes (unknown divisions)."""
    bounds = np.cumsum([0, *sizes])
    assert bounds[-1] == len(frame)
    parts = [frame.iloc[a:b] for a, b in itertools.pairwise(bounds)]
    return dd.from_delayed([dask.delayed(p) for p in parts], meta=frame.iloc[:0])


def _estimator(**params):
    settings = {"group_col": "g", "on_bad_convergence": "ignore", **FAST}
    return MaskedHierarchicalRegressor(**{**settings, **params})


# ============================================================ statistics
class _Captured(Exception):
    pass


def _statistics(monkeypatch, est, X, y, **kwargs):
    """What fit hands to the sampler, without sampling."""
    seen = []

    def record(fit_stats, config):
        seen.append(fit_stats)
        raise _Captured

    monkeypatch.setattr(estimator_module, "posterior_from_statistics", record)
    monkeypatch.setattr(fit_module, "posterior_from_statistics", record)
    with pytest.raises(_Captured):
        est.fit(X, y, **kwargs)
    return seen[0]


def _close(actual, expected, name):
    floor = RTOL * max(float(np.max(np.abs(expected), initial=0.0)), 1.0)
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=floor, err_msg=name)


def assert_same_statistics(got, want):
    np.testing.assert_array_equal(got.mask, want.mask)
    for field in ("y_mean", "y_scale", "x_mean", "x_scale"):
        _close(getattr(got.scaling, field), getattr(want.scaling, field), field)
    for field in ("n", "gram", "xty", "yty", "x_count", "x_sum", "x_sumsq"):
        _close(getattr(got.stats, field), getattr(want.stats, field), field)
    for field in ("count", "mean", "m2"):
        on = want.mask[:, want.mask.any(axis=0)]
        got_cells = np.where(on, getattr(got.cells, field), 0.0)
        want_cells = np.where(on, getattr(want.cells, field), 0.0)
        _close(got_cells, want_cells, f"cells.{field}")
    # The rows with latent cells are the input rows themselves, in order.
    for field in ("X", "y", "w", "group_idx"):
        np.testing.assert_array_equal(
            getattr(got.latent, field), getattr(want.latent, field), err_msg=field
        )


@pytest.mark.parametrize(
    "labels, weights, via, threshold",
    [
        ("str", True, "column", 1.0),
        ("category", False, "column", 1.0),
        ("int", True, "groups", 1.0),
        ("str", True, "column", 0.5),  # "b" is off in group "d"
    ],
)
def test_statistics_equal_in_memory_ones(
    client, monkeypatch, labels, weights, via, threshold
):
    frame = make_frame(labels=labels, weights=weights)
    ddf = to_dask(frame)
    est = _estimator(mask_threshold=threshold)
    if via == "column":
        cols = [*FEATURES, "g"]
        want = _statistics(
            monkeypatch, est, frame[cols], frame["y"], sample_weight=frame["w"]
        )
        got = _statistics(monkeypatch, est, ddf[cols], ddf["y"], sample_weight=ddf["w"])
    else:
        est.set_params(group_col=None)
        want = _statistics(
            monkeypatch,
            est,
            frame[FEATURES],
            frame["y"],
            groups=frame["g"],
            sample_weight=frame["w"],
        )
        got = _statistics(
            monkeypatch,
            est,
            ddf[FEATURES],
            ddf["y"],
            groups=ddf["g"],
            sample_weight=ddf["w"],
        )
    assert len(want.latent.y) > 5  # latent rows are part of the comparison
    assert not want.mask.all()  # so is a mask
    if threshold < 1:
        assert not want.mask[3, 1]  # group "d" (sorted 4th), feature "b"
    assert_same_statistics(got, want)


def test_weights_that_are_zero_in_a_partition_are_fine(client, monkeypatch):
    frame = make_frame()
    frame.loc[frame.index[:70], "w"] = 0.0  # the whole first partition
    ddf = to_dask(frame)
    cols = [*FEATURES, "g"]
    est = _estimator()
    want = _statistics(
        monkeypatch, est, frame[cols], frame["y"], sample_weight=frame["w"]
    )
    got = _statistics(monkeypatch, est, ddf[cols], ddf["y"], sample_weight=ddf["w"])
    assert_same_statistics(got, want)


# ================================================================ posterior
def _fit_pair(sizes):
    frame = make_frame()
    cols = [*FEATURES, "g"]
    ddf = to_dask(frame, sizes)
    memory = _estimator().fit(frame[cols], frame["y"], sample_weight=frame["w"])
    distributed = _estimator().fit(ddf[cols], ddf["y"], sample_weight=ddf["w"])
    return memory, distributed


@pytest.fixture(scope="module")
def fits(client):
    memory, one = _fit_pair([300])
    _, many = _fit_pair(SIZES)
    return {"memory": memory, "one": one, "many": many}


def test_one_partition_gives_the_in_memory_posterior_bit_for_bit(fits):
    memory, one = fits["memory"], fits["one"]
    assert set(one.posterior_) == set(memory.posterior_)
    for name, draws in memory.posterior_.items():
        np.testing.assert_array_equal(one.posterior_[name], draws, err_msg=name)
    for attr in ("coef_", "intercept_", "population_coef_", "group_coef_scale_"):
        np.testing.assert_array_equal(getattr(one, attr), getattr(memory, attr))
    assert one.convergence_ == memory.convergence_


def test_group_level_predictor_and_correlation_on_dask(client):
    # issue 14: "auto" sees the same group-level predictor in the summed
    # statistics, and one partition gives the in-memory posterior bit for bit
    frame = make_frame()
    level = {"a": 0.3, "b": -1.2, "c": 0.8, "d": 2.0, "e": -0.4}
    frame["u"] = frame["g"].map(level).astype(float)
    frame["y"] = frame["y"] + 1.5 * frame["u"]
    cols = [*FEATURES, "u", "g"]
    memory = _estimator().fit(frame[cols], frame["y"], sample_weight=frame["w"])
    ddf = to_dask(frame, [300])
    one = _estimator().fit(ddf[cols], ddf["y"], sample_weight=ddf["w"])
    assert memory.varying_.to_dict() == {"a": True, "b": True, "c": True, "u": False}
    assert one.varying_.equals(memory.varying_)
    assert "group_correlation" in memory.posterior_
    for name, draws in memory.posterior_.items():
        np.testing.assert_array_equal(one.posterior_[name], draws, err_msg=name)


def _mc_se(draws, n_chains):
    """Monte Carlo standard error of each parameter's mean (0 if constant)."""
    flat = draws.reshape(draws.shape[0], -1)
    se = np.zeros(flat.shape[1])
    varies = flat.std(axis=0) > 0
    x = flat[:, varies].reshape(n_chains, -1, int(varies.sum()))
    _, ess, _ = parameter_diagnostics(x)
    se[varies] = flat[:, varies].std(axis=0) / np.sqrt(ess)
    return se


def test_partitioned_fit_gives_the_in_memory_posterior(fits):
    memory, many = fits["memory"], fits["many"]
    pd.testing.assert_frame_equal(many.mask_, memory.mask_)
    np.testing.assert_array_equal(many.groups_, memory.groups_)
    np.testing.assert_array_equal(many.groups_, ["a", "b", "c", "d", "e"])
    assert many.n_features_in_ == memory.n_features_in_ == 4
    np.testing.assert_array_equal(many.feature_names_in_, memory.feature_names_in_)
    assert (many.coef_[0, 2], memory.coef_[0, 2]) == (0.0, 0.0)  # "c" off for "a"
    chains = FAST["num_chains"]
    for name, draws in memory.posterior_.items():
        other = many.posterior_[name]
        assert other.shape == draws.shape
        se = np.hypot(_mc_se(draws, chains), _mc_se(other, chains))
        diff = np.abs(draws.mean(axis=0) - other.mean(axis=0)).ravel()
        on = se > 0  # masked coefficients are exactly 0 in both
        assert np.all(diff[~on] == 0), name
        assert np.all(diff[on] < 4.5 * se[on]), (name, np.max(diff[on] / se[on]))
    # Rao-Blackwellized means are averages of exact conditional means: their
    # Monte Carlo error is below that of the raw draws' means.
    se = np.hypot(
        _mc_se(memory.posterior_["coef"], chains),
        _mc_se(many.posterior_["coef"], chains),
    ).reshape(memory.coef_.shape)
    assert np.all(np.abs(memory.coef_ - many.coef_) <= 4.5 * se + 1e-12)


def test_dask_fit_pickles_with_numpy_only(fits):
    est = fits["many"]
    blob = pickle.dumps(est)
    modules = {module.split(".")[0] for module, _ in pickled_globals(blob)}
    assert modules <= ALLOWED_PICKLE_MODULES, modules - ALLOWED_PICKLE_MODULES
    allowed = {np.ndarray, int, float, bool, str, type(None), dict, list, tuple}
    allowed |= {type(est._fitted), type(est._fitted.posterior)}
    leaves = _leaf_types(est.__getstate__())
    assert {t for t in leaves if not issubclass(t, np.generic)} <= allowed
    loaded = pickle.loads(blob)
    rows = make_frame(seed=5)[[*FEATURES, "g"]]
    np.testing.assert_array_equal(loaded.predict(rows), est.predict(rows))


def test_dask_fit_has_no_target_for_arviz(fits):
    with pytest.raises(ValueError, match="to_arviz needs the target"):
        fits["many"].to_arviz()


def test_inputs_are_neither_changed_nor_persisted(client):
    frame = make_frame()
    before = frame.copy()
    ddf = to_dask(frame)
    X, y = ddf[[*FEATURES, "g"]], ddf["y"]
    names = (X._name, y._name)
    est = _estimator().fit(X, y)
    dask.compute(*est.predict(X, return_std=True))
    pd.testing.assert_frame_equal(frame, before)
    assert (X._name, y._name) == names
    # Nothing stays on the workers (results are released once gathered).
    deadline = time.monotonic() + 10
    while any(client.has_what().values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(client.has_what().values())


# ================================================================ predict
def predict_frame():
    """Rows to predict: seen groups, an integrated-out NaN, a value in a
    masked cell, and two unseen groups whose rows span partitions; "new" has
    ``c`` NaN in its first partition only, "newer" has ``c`` NaN everywhere
    (off for those rows)."""
    rows = make_frame(seed=3, n=40)[[*FEATURES, "g"]]
    rows.loc[rows.index[1], "a"] = np.nan
    rows.loc[rows.index[rows["g"] == "a"], "c"] = 7.0  # masked: ignored
    rows.loc[rows.index[[5, 6, 25, 26]], "g"] = "new"
    rows.loc[rows.index[[5, 6]], "c"] = np.nan
    rows.loc[rows.index[[7, 30]], "g"] = "newer"
    rows.loc[rows.index[[7, 30]], "c"] = np.nan
    rows.index = pd.Index([f"r{i}" for i in range(len(rows))], name="row")
    return rows


PREDICT_SIZES = [20, 0, 12, 8]


def test_predict_is_lazy_with_meta_and_equals_in_memory(fits):
    est = fits["many"]
    rows = predict_frame()
    X = to_dask(rows, PREDICT_SIZES)
    mean = est.predict(X)
    assert isinstance(mean, dd.Series)
    assert mean.npartitions == X.npartitions
    assert mean._meta.dtype == np.float64 and mean._meta.name == "mean"
    assert mean._meta.index.dtype == rows.index.dtype
    want_mean, want_sd = est.predict(rows, return_std=True)
    got = mean.compute()
    pd.testing.assert_index_equal(got.index, rows.index)
    np.testing.assert_array_equal(got.to_numpy(), want_mean)

    got_mean, got_sd = dask.compute(*est.predict(X, return_std=True))
    np.testing.assert_array_equal(got_mean.to_numpy(), want_mean)
    np.testing.assert_array_equal(got_sd.to_numpy(), want_sd)

    interval = est.predict_interval(X, coverage=0.8)
    assert list(interval.columns) == ["lower", "upper"]
    assert (interval._meta.dtypes == np.float64).all()
    got = interval.compute()
    pd.testing.assert_index_equal(got.index, rows.index)
    np.testing.assert_array_equal(
        got.to_numpy(), est.predict_interval(rows, coverage=0.8)
    )


def test_partitions_predict_each_row_as_alone(fits):
    """A row's prediction depends only on the row: "new" gives ``c`` in some
    rows and not in others, across partitions; each row's mean and sd from
    the partitioned frame equal those of the row predicted alone."""
    est = fits["many"]
    rows = predict_frame()
    everywhere = est.predict(to_dask(rows, PREDICT_SIZES), return_std=True)
    got = np.column_stack([s.compute().to_numpy() for s in everywhere])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnseenGroupWarning)
        alone = np.array(
            [np.ravel(est.predict(rows.iloc[[i]], return_std=True)) for i in range(40)]
        )
    np.testing.assert_allclose(got, alone, rtol=1e-12)


def test_fit_and_predict_with_groups_series(client):
    frame = make_frame()
    ddf = to_dask(frame)
    kwargs = {"group_col": None}
    memory = _estimator(**kwargs).fit(frame[FEATURES], frame["y"], groups=frame["g"])
    lazy = _estimator(**kwargs).fit(ddf[FEATURES], ddf["y"], groups=ddf["g"])
    np.testing.assert_array_equal(lazy.groups_, memory.groups_)
    rows = predict_frame()
    X = to_dask(rows, PREDICT_SIZES)
    got = lazy.predict(X[FEATURES], groups=X["g"]).compute().to_numpy()
    np.testing.assert_array_equal(got, lazy.predict(rows[FEATURES], groups=rows["g"]))
    with pytest.raises(ValueError, match="groups must be a dask Series"):
        lazy.predict(X[FEATURES], groups=rows["g"])


def test_sample_y_partitions(fits):
    est = fits["many"]
    rows = predict_frame()
    one = est.sample_y(to_dask(rows, [40]), n_samples=5, random_state=3).compute()
    np.testing.assert_array_equal(
        one.to_numpy(), est.sample_y(rows, n_samples=5, random_state=3)
    )
    X = to_dask(rows, PREDICT_SIZES)
    draws = est.sample_y(X, n_samples=5, random_state=3)
    assert list(draws.columns) == [0, 1, 2, 3, 4]
    assert (draws._meta.dtypes == np.float64).all()
    got = draws.compute()
    pd.testing.assert_index_equal(got.index, rows.index)
    np.testing.assert_array_equal(
        got.to_numpy(), est.sample_y(X, n_samples=5, random_state=3).compute()
    )
    # Partitions after the first draw their noise from their own streams.
    assert not np.any(got.to_numpy()[20:] == one.to_numpy()[20:])
    other = est.sample_y(X, n_samples=5, random_state=4).compute()
    assert not np.any(other.to_numpy() == got.to_numpy())


def test_sample_y_uses_one_posterior_draw_per_column_across_partitions(fits):
    """Far from the data, the coefficient draw dominates the spread: rows
    with equal x in different partitions differ only by noise when column k
    uses the same draw (and, for an unseen group, the same effects)."""
    est = fits["many"]
    far = pd.DataFrame(
        {"a": 50.0, "b": -60.0, "c": 80.0, "g": ["b", "new", "b", "new"]},
        index=[0, 1, 2, 3],
    )
    X = to_dask(far, [2, 0, 2])[[*FEATURES, "g"]]  # each pair split apart
    draws = est.sample_y(X, n_samples=400, random_state=0).compute().to_numpy()
    noise = est.noise_scale_
    for i, j in ((0, 2), (1, 3)):
        spread_same = np.std(draws[i] - draws[j])
        assert spread_same < 2.0 * np.sqrt(2) * noise, (i, j, spread_same)
        # Different columns (different draws) spread much more.
        assert np.std(draws[i] - np.roll(draws[j], 1)) > 3 * spread_same


def test_predict_stays_lazy_until_computed(fits):
    def broken():
        raise RuntimeError("computed")

    meta = predict_frame().iloc[:0]
    X = dd.from_delayed([dask.delayed(broken)()], meta=meta)
    est = fits["many"]
    outputs = [
        est.predict(X),
        est.predict_interval(X),
        est.sample_y(X, n_samples=2),
    ]
    for out in outputs:
        with pytest.raises(RuntimeError, match="computed"):
            out.compute()


def test_unseen_groups_error_at_compute(fits):
    est = pickle.loads(pickle.dumps(fits["many"])).set_params(unseen_groups="error")
    rows = predict_frame()
    with pytest.raises(ValueError) as memory:
        est.predict(rows)
    lazy = est.predict(to_dask(rows, PREDICT_SIZES))
    with pytest.raises(ValueError) as distributed:
        lazy.compute()
    assert str(distributed.value) == str(memory.value)


def test_score_refuses_dask(fits):
    ddf = to_dask(make_frame())
    with pytest.raises(TypeError, match="score does not take dask input"):
        fits["many"].score(ddf[[*FEATURES, "g"]], ddf["y"])


# ================================================================ errors
def _fit_error(frame, sizes=SIZES, **params):
    ddf = to_dask(frame, sizes)
    est = _estimator(**params)
    with pytest.raises(ValueError) as info:
        est.fit(ddf[[*FEATURES, "g"]], ddf["y"])
    assert not hasattr(est, "coef_")
    return str(info.value)


def test_errors_name_the_partition_and_row(client):
    frame = make_frame()
    frame.loc[frame.index[70 + 3], "y"] = np.nan  # partition 2, row 3
    msg = _fit_error(frame)
    assert msg.startswith("Partition 2 of 4 (rows numbered from 0 within the")
    assert "Input y contains NaN: 1 value(s), at row(s) 3." in msg

    frame = make_frame()
    frame.loc[frame.index[200 + 5], "g"] = None  # partition 3, row 5
    assert "Partition 3 of 4" in (msg := _fit_error(frame))
    assert "Group labels contain NaN/None at row(s) 5" in msg

    frame = make_frame()
    frame.loc[frame.index[1], "b"] = np.inf
    msg = _fit_error(frame)
    assert "Partition 0 of 4" in msg and "infinity in feature column(s) 'b'" in msg


def test_metadata_errors_are_raised_before_computing(client):
    frame = make_frame()
    frame["when"] = pd.Timestamp("2024-01-01")
    ddf = to_dask(frame)
    with pytest.raises(ValueError, match="'when' has non-numeric dtype"):
        _estimator().fit(ddf[[*FEATURES, "when", "g"]], ddf["y"])
    with pytest.raises(ValueError, match="not a column of X"):
        _estimator(group_col="nope").fit(ddf[FEATURES], ddf["y"])


@pytest.mark.parametrize(
    "make_y, match",
    [
        (lambda frame, ddf: frame["y"], "y must be a dask Series partitioned like X"),
        (lambda frame, ddf: frame["y"].to_numpy(), "y must be a dask Series"),
        (
            lambda frame, ddf: to_dask(frame, [150, 150])["y"],
            "y has 2 partitions but X has 4",
        ),
        (
            lambda frame, ddf: to_dask(frame, [70, 1, 129, 100])["y"],
            r"y has \d+ values but X has \d+ rows",
        ),
    ],
)
def test_inputs_must_be_partitioned_alike(client, make_y, match):
    frame = make_frame()
    ddf = to_dask(frame)
    with pytest.raises(ValueError, match=match):
        _estimator().fit(ddf[[*FEATURES, "g"]], make_y(frame, ddf))


def test_other_refusals(client):
    frame = make_frame()
    ddf = to_dask(frame)
    X, y = ddf[[*FEATURES, "g"]], ddf["y"]
    with pytest.raises(ValueError, match="engine='direct' needs every row"):
        _estimator(engine="direct").fit(X, y)
    tiny = to_dask(frame.iloc[:1], [1])
    with pytest.raises(ValueError, match="a minimum of 2 is required"):
        _estimator().fit(tiny[[*FEATURES, "g"]], tiny["y"])
    zero = to_dask(frame.assign(w=0.0))
    with pytest.raises(ValueError, match="sample_weight sums to zero"):
        _estimator().fit(zero[[*FEATURES, "g"]], zero["y"], sample_weight=zero["w"])
    with pytest.raises(ValueError, match="X must be a dask DataFrame"):
        _estimator().fit(X.to_dask_array(lengths=True), y)
    const = to_dask(frame.assign(y=3.0))
    with pytest.raises(ValueError, match=r"y is constant \(every value is 3\)"):
        _estimator().fit(const[[*FEATURES, "g"]], const["y"])


def test_missing_error_message_equals_in_memory(client):
    frame = make_frame()
    with pytest.raises(ValueError) as memory:
        _estimator(missing="error").fit(frame[[*FEATURES, "g"]], frame["y"])
    assert str(memory.value) == _fit_error(frame, missing="error")


def test_latent_row_limit(client, monkeypatch):
    frame = make_frame(missing=0.0, d_share=0.0)  # no latent cells ...
    assert frame.loc[frame["g"] != "a", FEATURES].notna().all().all()
    frame.loc[frame.index[[0, 80, 150]], "a"] = np.nan  # ... but these 6,
    frame.loc[frame.index[[1, 81, 250]], "b"] = np.nan  # 3 per column
    # At least 3 cells in one column: refused before the second pass.
    msg = _fit_error(frame, max_latent_rows=2)
    assert msg.startswith("at least 3 rows of X hold NaN in features that apply")
    assert "max_latent_rows=2" in msg and "missing='error'" in msg
    # 6 rows in all: the second pass counts them.
    msg = _fit_error(frame, max_latent_rows=5)
    assert msg.startswith("6 rows of X hold NaN")
    # Within the limit: the rows reach the client.
    ddf = to_dask(frame)
    est = _estimator(max_latent_rows=6)
    got = _statistics(monkeypatch, est, ddf[[*FEATURES, "g"]], ddf["y"])
    assert len(got.latent.y) == 6


def test_warnings_equal_in_memory_ones(client, monkeypatch):
    frame = make_frame()
    frame["empty"] = np.nan
    last_e = frame.index[frame["g"] == "e"][-1]
    frame = frame[(frame["g"] != "e") | (frame.index == last_e)]  # one row of "e"
    cols = ["a", "empty", "b", "c", "g"]
    ddf = to_dask(frame, [100, len(frame) - 100])
    est = _estimator(pooling="none")
    caught = {}
    for name, X, y in (("memory", frame, frame["y"]), ("dask", ddf, ddf["y"])):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            _statistics(monkeypatch, est, X[cols], y)
        caught[name] = sorted(
            str(w.message) for w in record if w.category is UserWarning
        )
    assert any("'empty' are off" in t for t in caught["memory"])
    assert any("1 group(s) have a single row ('e')" in t for t in caught["memory"])
    assert caught["dask"] == caught["memory"]
