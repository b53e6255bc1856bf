"""Model files that run no code when loaded (issue 16).

The oracle of every round trip is the estimator that was saved: the loaded one
must give the same bits (``assert_array_equal``, exact frame comparison), since
the file stores every array and float exactly (``.npy`` and ``repr`` floats).
"""

import copy
import dataclasses
import io
import json
import pickle
import struct
import subprocess
import sys
import textwrap
import warnings
import zipfile
import zlib
from functools import cache
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
import sklearn
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

import hiermask
from hiermask import (
    InconsistentVersionWarning,
    MaskedHierarchicalRegressor,
    ModelFileError,
)
from hiermask import _estimator as estimator_module
from hiermask import _files as files_module
from hiermask._files import (
    CONVERGENCE,
    DOCUMENT,
    DRAWS,
    FITTED,
    MAX_DOCUMENT_BYTES,
    POSTERIOR,
    PRIOR_REFERENCE,
)
from hiermask._fit import Posterior
from hiermask._fitted import FILE_FIELDS
from hiermask.datasets import make_manufacturing

from ._fitted import GROUP, manufacturing_fit
from .conftest import FAST

POOLINGS = ("partial", "none", "complete")


# ================================================================= fits
def _codes(labels):
    return pd.factorize(labels, sort=True)[0] + 10  # int labels 10, 11


@cache
def fitted(engine, pooling, kind):
    """(estimator, X, groups) of the manufacturing data: ``kind="frame"`` a
    DataFrame with the group column, ``"array"`` an ndarray and int labels."""
    if engine == "collapsed" and kind == "frame":
        est, X, _ = manufacturing_fit(pooling)  # shared with other modules
        return est, X, None
    X, y = make_manufacturing(200, random_state=0)
    est = MaskedHierarchicalRegressor(
        pooling=pooling, engine=engine, on_bad_convergence="ignore", **FAST
    )
    if kind == "frame":
        return est.set_params(group_col=GROUP).fit(X, y), X, None
    features = X.drop(columns=GROUP).to_numpy()
    groups = _codes(X[GROUP])
    return est.fit(features, y.to_numpy(), groups=groups), features, groups


def _rows(X, groups):
    """Rows to predict: a NaN to integrate out, a masked value to ignore, an
    unseen group."""
    if isinstance(X, pd.DataFrame):
        rows = X.iloc[[0, 1, 2, 150, 151]].reset_index(drop=True)
        rows.loc[1, "Feed_Speed"] = np.nan
        rows.loc[4, GROUP] = "unseen"
        return rows, None
    rows = X[[0, 1, 2, 150, 151]].copy()
    rows[1, 0] = np.nan
    labels = groups[[0, 1, 2, 150, 151]].copy()
    labels[4] = 99
    return rows, labels


def outputs(est, rows, groups):
    """Everything the estimator computes from its fitted state."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unseen-group and prior warnings
        mean, sd = est.predict(rows, groups=groups, return_std=True)
        return {
            "predict": est.predict(rows, groups=groups),
            "mean": mean,
            "sd": sd,
            "interval": est.predict_interval(rows, groups=groups, coverage=0.8),
            "draws": est.sample_y(rows, groups=groups, n_samples=3, random_state=1),
            "draws_own_seed": est.sample_y(rows, groups=groups, n_samples=3),
        }


def assert_same_state(a, b, path="est"):
    """Equal values of equal types, walking dicts, lists and dataclasses."""
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b), path
        for key in a:
            assert_same_state(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{path}[{i}]")
    elif dataclasses.is_dataclass(a):
        assert_same_state(vars(a), vars(b), path)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        if a.dtype == object:
            assert_same_state(a.tolist(), b.tolist(), path)
        else:
            np.testing.assert_array_equal(a, b, err_msg=path)
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), path
    else:
        assert a == b, (path, a, b)


def _fitted_state(est):
    """The attributes that fit set, in sorted order (fit and load set them in
    different orders)."""
    params = est.get_params(deep=False)
    return {k: v for k, v in sorted(vars(est).items()) if k not in params}


def round_trip(est, tmp_path, name="model.hmz"):
    path = tmp_path / name
    est.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same version: no warning
        return hiermask.load(path)


# ========================================================== round trips
#: Both input kinds with the collapsed engine (the array fits reuse the frame
#: fits' compiled programs); the direct engine, whose every fit takes seconds,
#: with DataFrame input.
ROUND_TRIPS = [
    (engine, pooling, kind)
    for engine, kinds in (("collapsed", ("frame", "array")), ("direct", ("frame",)))
    for pooling in POOLINGS
    for kind in kinds
]


@pytest.mark.parametrize(("engine", "pooling", "kind"), ROUND_TRIPS)
def test_round_trip_is_bit_for_bit(engine, pooling, kind, tmp_path):
    est, X, groups = fitted(engine, pooling, kind)
    loaded = round_trip(est, tmp_path)
    assert loaded.get_params() == est.get_params()
    assert_same_state(_fitted_state(est), _fitted_state(loaded))
    assert loaded._fitted.draws is loaded.posterior_
    rows, labels = _rows(X, groups)
    expected, got = outputs(est, rows, labels), outputs(loaded, rows, labels)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    pd.testing.assert_frame_equal(loaded.summary(), est.summary(), check_exact=True)
    pd.testing.assert_frame_equal(loaded.mask_, est.mask_, check_exact=True)
    if kind == "frame":
        np.testing.assert_array_equal(loaded.feature_names_in_, est.feature_names_in_)
    else:
        assert not hasattr(loaded, "feature_names_in_")
    ours, theirs = est.to_arviz(), loaded.to_arviz()
    assert ours.groups() == theirs.groups()
    for group in ours.groups():
        assert ours[group].identical(theirs[group]), group


def test_plots_are_the_same_pixels(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from hiermask import plotting

    est, X, _ = fitted("collapsed", "partial", "frame")
    _, y = make_manufacturing(200, random_state=0)
    loaded = round_trip(est, tmp_path)

    def png(model, draw):
        fig = Figure(figsize=(4, 3))
        draw(model, fig.subplots())
        out = io.BytesIO()
        fig.savefig(out, format="png", dpi=50)
        return out.getvalue()

    for draw in (
        lambda m, ax: plotting.plot_mask(m, ax=ax),
        lambda m, ax: plotting.plot_forest(m, ax=ax),
        lambda m, ax: plotting.plot_shrinkage(m, X, y, ax=ax),
        lambda m, ax: plotting.plot_ppc(m, X, y, n_samples=5, ax=ax),
    ):
        assert png(loaded, draw) == png(est, draw)


def test_fresh_process_loads_without_unpickling_and_predicts_the_same(tmp_path):
    est, X, _ = fitted("collapsed", "partial", "frame")
    est.save(tmp_path / "model.hmz")
    rows, _ = _rows(X, None)
    rows.to_csv(tmp_path / "rows.csv", index=False)
    expected = outputs(est, rows, None)
    script = textwrap.dedent(
        f"""
        import pickle, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        import numpy as np, pandas as pd
        import hiermask
        from tests.test_files import outputs

        def refuse(*args, **kwargs):
            raise AssertionError("load unpickled something")

        pickle.load = pickle.loads = pickle.Unpickler = refuse
        before = set(sys.modules)
        est = hiermask.load("model.hmz")
        imported = sorted(set(sys.modules) - before - {{"encodings.cp437"}})
        assert not imported, imported  # nothing but zipfile's name codec
        rows = pd.read_csv("rows.csv")
        np.savez("out.npz", **outputs(est, rows, None))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp_path / "out.npz") as out:
        for key, value in expected.items():
            np.testing.assert_array_equal(out[key], value, err_msg=key)


def test_files_are_reproducible(tmp_path):
    est, _, _ = fitted("collapsed", "partial", "frame")
    est.save(tmp_path / "a.hmz")
    est.save(tmp_path / "b.hmz")
    assert (tmp_path / "a.hmz").read_bytes() == (tmp_path / "b.hmz").read_bytes()


# ================================================================ labels
def _label_data(n_per_group=12):
    rng = np.random.default_rng(5)
    n = 3 * n_per_group
    x = rng.normal(size=(n, 2))
    x[:n_per_group, 1] = np.nan  # feature 1 is off for the first group
    y = 1.0 + x[:, 0] + np.nan_to_num(x[:, 1]) + rng.normal(scale=0.3, size=n)
    return x, y, np.repeat([0, 1, 2], n_per_group)


LABEL_KINDS = {
    "str": ["b", "a", "c"],
    "mixed_case_unicode": ["Größe", "größe", "日本"],
    "int": [30, 10, 20],
    "numpy_int64": np.array([30, 10, 20], dtype=np.int64),
    "float": [0.5, 2.5, 1.5],
    "numpy_str": np.array(["x", "Y", "z"]),
    "mixed_types": ["a", 1, 2.5],  # not sortable: order of first appearance
    "mixed_with_bool": [2.5, True, "a"],
    "categorical": pd.Categorical(["x", "y", "z"], categories=["z", "y", "x", "w"]),
    "categorical_int": pd.Categorical([3, 1, 2], categories=[1, 2, 3, 4]),
}


@pytest.mark.parametrize("name", list(LABEL_KINDS))
def test_group_labels_of_every_kind_round_trip(name, tmp_path):
    x, y, code = _label_data()
    values = LABEL_KINDS[name]
    if isinstance(values, pd.Categorical):
        column = values[code]  # a categorical group column of a DataFrame
        X = pd.DataFrame({"g": column, "a": x[:, 0], "b": x[:, 1]})
        est = MaskedHierarchicalRegressor(
            group_col="g", on_bad_convergence="ignore", **FAST
        ).fit(X, y)
        rows, labels = X.iloc[::5], None
    else:
        labels_all = np.asarray(values, dtype=object)[code]
        if isinstance(values, np.ndarray):
            labels_all = values[code]
        est = MaskedHierarchicalRegressor(on_bad_convergence="ignore", **FAST)
        est.fit(x, y, groups=labels_all)
        rows, labels = x[::5], labels_all[::5]
    loaded = round_trip(est, tmp_path)
    assert [type(g) for g in loaded.groups_] == [type(g) for g in est.groups_]
    assert list(loaded.groups_) == list(est.groups_)
    pd.testing.assert_frame_equal(loaded.mask_, est.mask_, check_exact=True)
    assert not loaded.mask_.iloc[:, 1].all()  # the mask came back too
    expected = est.predict(rows, groups=labels, return_std=True)
    loaded.set_params(unseen_groups="error")  # every label must be found
    got = loaded.predict(rows, groups=labels, return_std=True)
    np.testing.assert_array_equal(got, expected)


def test_unsupported_labels_and_parameters_are_refused_at_save(tmp_path):
    est, _, _ = fitted("collapsed", "partial", "frame")
    when = copy.copy(est)
    when.groups_ = np.array([pd.Timestamp("2024-01-01"), "b"], dtype=object)
    with pytest.raises(ValueError, match=r"Group label Timestamp.*type Timestamp"):
        when.save(tmp_path / "m.hmz")
    state = copy.copy(est).set_params(random_state=np.random.RandomState(0))
    with pytest.raises(ValueError, match="random_state=RandomState"):
        state.save(tmp_path / "m.hmz")
    with pytest.raises(NotFittedError):
        MaskedHierarchicalRegressor().save(tmp_path / "m.hmz")
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp file left


def test_a_failed_save_keeps_the_existing_file(tmp_path, monkeypatch):
    est, _, _ = fitted("collapsed", "partial", "frame")
    path = tmp_path / "m.hmz"
    path.write_bytes(b"previous")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np.lib.format, "write_array", broken)
    with pytest.raises(OSError, match="disk full"):
        est.save(path)
    assert path.read_bytes() == b"previous"
    assert list(tmp_path.iterdir()) == [path]


# ====================================================== the table covers it
@pytest.mark.parametrize("pooling", POOLINGS)
def test_the_tables_describe_every_fitted_attribute(pooling):
    est, _, _ = fitted("collapsed", pooling, "frame")

    def expected(table, optional_present=()):
        return {
            name
            for name, spec in table.items()
            if (spec.when is None or pooling in spec.when)
            and (not spec.optional or name in optional_present)
        }

    # the fitted model is saved as its fields
    stored = set(_fitted_state(est)) - {"_fitted"} | set(FILE_FIELDS)
    assert stored == expected(FITTED, {"feature_names_in_"})
    assert set(est.posterior_) == expected(DRAWS, {"intercept", "coef"})
    assert set(est.convergence_) == set(CONVERGENCE)
    assert [f.name for f in dataclasses.fields(Posterior)] == list(POSTERIOR)
    assert set(est._fitted.posterior.prior_reference) == set(PRIOR_REFERENCE)
    present = {k for k, v in vars(est._fitted.posterior).items() if v is not None}
    assert present == expected(POSTERIOR, {"varying"})


def test_an_attribute_the_tables_do_not_describe_is_refused(tmp_path):
    est, _, _ = fitted("collapsed", "partial", "frame")
    extra = copy.copy(est)
    extra.new_attribute_ = np.zeros(2)
    with pytest.raises(TypeError, match=r"\['new_attribute_'\].*does not describe"):
        extra.save(tmp_path / "m.hmz")
    posterior = copy.copy(est)
    posterior.convergence_ = {**est.convergence_, "new": 1.0}
    with pytest.raises(TypeError, match=r"convergence_ holds \['new'\]"):
        posterior.save(tmp_path / "m.hmz")


def test_routing_requests_are_not_saved_and_a_dask_fit_has_no_target(tmp_path):
    est, _, _ = fitted("collapsed", "partial", "frame")
    with sklearn.config_context(enable_metadata_routing=True):
        routed = clone(est).set_fit_request(groups=True)
    routed.__dict__.update(_fitted_state(est))  # the fit, with a request
    loaded = round_trip(routed, tmp_path)
    assert "_metadata_request" not in vars(loaded)
    no_target = copy.copy(est)
    # as a fit on dask data leaves it
    no_target._fitted = dataclasses.replace(est._fitted, target=None)
    loaded = round_trip(no_target, tmp_path, "b.hmz")
    assert loaded._fitted.target is None
    with pytest.raises(ValueError, match="to_arviz needs the target"):
        loaded.to_arviz()


# ============================================================== versions
def _members(path):
    with zipfile.ZipFile(path) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def _write(path, members):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _with_document(members, change):
    document = json.loads(members[DOCUMENT])
    change(document)
    return {**members, DOCUMENT: json.dumps(document).encode()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    est, X, _ = fitted("collapsed", "partial", "frame")
    path = tmp_path_factory.mktemp("saved") / "model.hmz"
    est.save(path)
    return est, X, _members(path)


def test_another_hiermask_version_loads_with_a_warning(saved, tmp_path):
    est, X, members = saved

    def older(document):
        document["hiermask_version"] = "0.0.1"

    path = _write(tmp_path / "old.hmz", _with_document(members, older))
    with pytest.warns(InconsistentVersionWarning, match=r"hiermask 0\.0\.1") as rec:
        loaded = hiermask.load(path)
    assert rec[0].message.original_version == "0.0.1"
    assert rec[0].message.current_version == hiermask.__version__
    assert rec[0].filename == __file__  # points at the caller
    rows, _ = _rows(X, None)
    np.testing.assert_array_equal(loaded.predict(rows), est.predict(rows))


def test_unpickling_another_version_warns_and_loads(saved, monkeypatch):
    est, X, _ = saved
    monkeypatch.setattr(estimator_module, "_version", lambda: "99.0")
    blob = pickle.dumps(est)
    monkeypatch.undo()
    with pytest.warns(InconsistentVersionWarning, match=r"saved with hiermask 99\.0"):
        loaded = pickle.loads(blob)
    rows, _ = _rows(X, None)
    np.testing.assert_array_equal(loaded.predict(rows), est.predict(rows))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pickle.loads(pickle.dumps(est))  # the same version: silent
        joblib.load(io.BytesIO(_joblib_bytes(est)))


def _joblib_bytes(est):
    out = io.BytesIO()
    joblib.dump(est, out)
    return out.getvalue()


# ============================================================= bad files
def _raw_zip(entries):
    """A zip archive written by hand: (name, data, method, crc, size, flags)
    per member, so that names, sizes and flags can be anything."""
    out, central = io.BytesIO(), []
    for name, data, method, crc, size, flags in entries:
        offset, raw = out.tell(), name.encode()
        head = (20, flags, method, 0, 33, crc, len(data), size, len(raw))
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, *head, 0) + raw + data)
        central.append(
            struct.pack("<IH", 0x02014B50, 20)
            + struct.pack("<HHHHHIIIHHHHHII", *head, 0, 0, 0, 0, 0, offset)
            + raw
        )
    start, directory = out.tell(), b"".join(central)
    out.write(directory)
    n = len(entries)
    out.write(
        struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(directory), start, 0)
    )
    return out.getvalue()


def _stored(members, **overrides):
    """Members as raw entries (stored), with per-name overrides."""
    entries = []
    for name, data in members.items():
        entry = (name, data, 0, zlib.crc32(data), len(data), 0)
        entries.append(overrides.get(name, entry))
    return entries


def _zeros_bomb(size):
    """A deflate stream of ``size`` zero bytes (size a multiple of 1 MiB),
    about 1000 times smaller: one fully flushed block, repeated."""
    mib = bytes(2**20)
    block = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = block.compress(mib) + block.flush(zlib.Z_FULL_FLUSH)
    return piece * (size // 2**20) + block.flush()


class _PickleBomb:
    """Unpickling this writes the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "executed"))


def _object_member(marker):
    out = io.BytesIO()
    payload = np.empty(1, dtype=object)
    payload[0] = _PickleBomb(marker)
    np.save(out, payload, allow_pickle=True)
    return out.getvalue()


def _npy(array):
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


COEF = "arrays/coef_.npy"
DRAWS_COEF = "arrays/posterior_.coef.npy"  # larger than a pickled object array
MASK = "arrays/_mask.npy"
BOMB_BYTES = 4095 * 2**20  # 4 GiB of zeros, less 1 MiB (no ZIP64 needed)


def _doc(change):
    def edit(members, marker):
        return _with_document(members, change)

    return edit


def _set(*keys, value):
    def change(document):
        target = document
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return _doc(change)


def _drop(name):
    return lambda members, marker: {k: v for k, v in members.items() if k != name}


def _replace(name, data):
    return lambda members, marker: {**members, name: data}


def _raw(**overrides):
    return lambda members, marker: _raw_zip(_stored(members, **overrides))


def _text(data):
    return lambda members, marker: data


def _first_bytes(n):
    return lambda members, marker: _raw_zip(_stored(members))[:n]


def _flip_a_data_byte(members, marker):
    data = _raw_zip(_stored(members))
    at = data.index(b"\x93NUMPY", data.index(COEF.encode())) + 140  # in the data
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def _mask_byte_two(members, marker):
    data = bytearray(members[MASK])
    data[-1] = 2
    return {**members, MASK: bytes(data)}


BAD_FILES = {
    "not a zip": (_text(b"group,x\na,1\n"), "not a zip archive"),
    "empty": (_text(b""), "not a zip archive"),
    "truncated": (_first_bytes(3000), "truncated"),
    "damaged data": (_flip_a_data_byte, "damaged"),
    "missing member": (_drop(COEF), r"member\(s\) \['arrays/coef_.npy'\] are missing"),
    "missing document": (_drop(DOCUMENT), "model.json is missing"),
    "extra member": (
        _replace("arrays/extra.npy", _npy(np.zeros(2))),
        r"unexpected member\(s\) \['arrays/extra.npy'\]",
    ),
    "object dtype declared": (
        _set("attributes", "coef_", "dtype", value="|O"),
        "declares dtype '|O'.*object arrays are never read",
    ),
    "object array with a pickle payload": (
        lambda members, marker: {**members, COEF: _object_member(marker)},
        "'arrays/coef_.npy' holds an array of dtype object",
    ),
    "object array of the declared size": (
        lambda members, marker: {
            **members,
            DRAWS_COEF: _object_member(marker).ljust(len(members[DRAWS_COEF]), b" "),
        },
        "holds an array of dtype object",
    ),
    "member shape differs from the document": (
        _replace(COEF, _npy(np.zeros((3, 2)))),
        r"shape \(3, 2\); the document declares float64 and \(2, 3\)",
    ),
    "document shape differs from the model": (
        _set("attributes", "coef_", "shape", value=[2, 4]),
        "coef_ has size 4 where the model has 3 .dimension P",
    ),
    "bool array holding 2": (_mask_byte_two, "bool values other than 0 and 1"),
    "member path with ..": (
        _replace("arrays/../../evil.npy", b"x"),
        "unsafe path",
    ),
    "absolute member path": (
        _raw(**{COEF: ("/tmp/evil.npy", b"x", 0, zlib.crc32(b"x"), 1, 0)}),
        "'/tmp/evil.npy' has an unsafe path",
    ),
    "duplicate member": (
        lambda members, marker: _raw_zip(
            _stored(members) + _stored({COEF: members[COEF]})
        ),
        "occurs twice",
    ),
    "encrypted member": (
        lambda members, marker: _raw_zip(
            [(*e[:5], 1) if e[0] == COEF else e for e in _stored(members)]
        ),
        "is encrypted",
    ),
    "compression bomb": (
        lambda members, marker: _raw_zip(
            _stored(members)[:-1]
            + [(list(members)[-1], _zeros_bomb(BOMB_BYTES), 8, 0, BOMB_BYTES, 0)]
        ),
        f"declares {BOMB_BYTES} bytes uncompressed; the document declares",
    ),
    "document too large": (
        lambda members, marker: {
            **members,
            DOCUMENT: b" " * (MAX_DOCUMENT_BYTES + 1),
        },
        f"more than the {MAX_DOCUMENT_BYTES}",
    ),
    "document not JSON": (_replace(DOCUMENT, b"{not json"), "not valid JSON"),
    "document with NaN": (_replace(DOCUMENT, b'{"format": NaN}'), "not valid JSON"),
    "document not UTF-8": (_replace(DOCUMENT, b'{"\xff": 1}'), "not valid JSON"),
    "document with a duplicate key": (
        _replace(DOCUMENT, b'{"format": 1, "format": 2}'),
        "duplicate keys",
    ),
    "document a list": (_replace(DOCUMENT, b"[]"), "model.json must be a JSON object"),
    "another format": (_set("format", value="other"), "not a hiermask model file"),
    "newer format version": (
        _set("format_version", value=3),
        "format 3 by a newer hiermask.*reads formats up to 2. Upgrade",
    ),
    "unknown format version": (
        _set("format_version", value=0),
        "unknown model file format version 0",
    ),
    "format version of the wrong type": (
        _set("format_version", value="1"),
        "format_version must be an int, got '1'",
    ),
    "unknown estimator": (_set("estimator", value="os.system"), "not known"),
    "extra top-level entry": (_set("code", value="x"), "exactly the entries"),
    "unknown parameter": (_set("params", "code", value=1), "unknown parameter"),
    "parameter of the wrong type": (
        _set("params", "pooling", value=3),
        "params: The 'pooling' parameter",
    ),
    "parameter that is a list": (
        _set("params", "group_col", value=["x"]),
        "params.group_col must be null, a bool, number or str",
    ),
    "int of the wrong type": (
        _set("attributes", "n_features_in_", value="4"),
        "n_features_in_ must be an int >= 0, got '4'",
    ),
    "negative int": (
        _set("attributes", "convergence_", "n_divergences", value=-1),
        "convergence_.n_divergences must be an int >= 0",
    ),
    "float of the wrong type": (
        _set("attributes", "noise_scale_", value=[1.0]),
        r"noise_scale_ must be a number, got \[1.0\]",
    ),
    "labels of the wrong type": (
        _set("attributes", "groups_", value="ab"),
        "groups_ must be a list of labels",
    ),
    "label of an unknown type": (
        _set("attributes", "groups_", value=[["code", "x"], ["str", "b"]]),
        r"groups_\[0\] must be a \[type, value\] pair",
    ),
    "duplicate labels": (
        _set("attributes", "groups_", value=[["str", "a"], ["str", "a"]]),
        "duplicate group labels",
    ),
    "missing attribute": (
        lambda members, marker: _with_document(
            members, lambda d: d["attributes"].pop("coef_")
        ),
        "coef_ is missing",
    ),
    "unknown attribute": (
        _set("attributes", "__class__", value="x"),
        r"unknown entries \['__class__'\]",
    ),
    "attribute of another pooling": (
        _set("params", "pooling", value="none"),
        "population_intercept_ is present, but pooling='none' has none",
    ),
    "features do not fit n_features_in_": (
        _doc(
            lambda d: (
                d["attributes"].update(n_features_in_=3)
                or d["attributes"].pop("feature_names_in_")
            )
        ),
        "n_features_in_=3 does not fit 3 feature",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_get_one_clear_error_and_nothing_runs(case, saved, tmp_path):
    _, _, members = saved
    make, message = BAD_FILES[case]
    marker = tmp_path / "executed"
    content = make(dict(members), marker)
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / "bad.hmz"
    if isinstance(content, dict):
        _write(path, content)
    else:
        path.write_bytes(content)
    before = {p: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ModelFileError, match=message) as info:
        hiermask.load(path)
    assert str(info.value).startswith(f"{path}: ")
    assert "\n" not in str(info.value)
    assert not marker.exists()  # the pickle payload never ran
    assert {p: p.read_bytes() for p in folder.iterdir()} == before


def test_the_bomb_is_refused_before_any_member_is_decompressed(
    saved, tmp_path, monkeypatch
):
    _, _, members = saved
    path = tmp_path / "bomb.hmz"
    path.write_bytes(BAD_FILES["compression bomb"][0](dict(members), None))
    with zipfile.ZipFile(path) as archive:  # the bomb is real: 4 GiB declared
        info = archive.infolist()[-1]
        assert info.file_size == BOMB_BYTES and info.compress_size < BOMB_BYTES / 500
        with archive.open(info) as f:
            assert f.read(2**20) == bytes(2**20)
    opened = []
    original = zipfile.ZipFile.open

    def spy(self, name, *args, **kwargs):
        opened.append(getattr(name, "filename", name))
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    with pytest.raises(ModelFileError, match="bytes uncompressed"):
        hiermask.load(path)
    assert opened == [DOCUMENT]


def _npy_with_header(array, size):
    """A .npy member whose header (magic and length included) takes ``size``
    bytes, padded with spaces as numpy pads it."""
    described = repr(
        {"descr": array.dtype.str, "fortran_order": False, "shape": array.shape}
    )
    header = described + " " * (size - 10 - len(described) - 1) + "\n"
    length = struct.pack("<H", len(header))
    return b"\x93NUMPY\x01\x00" + length + header.encode() + array.tobytes()


def test_size_limits_on_both_sides(saved, tmp_path):
    # MAX_DOCUMENT_BYTES: a document of exactly that size loads, one byte more
    # is refused; MAX_NPY_HEADER_BYTES: likewise for the bytes of a member
    # beyond its data (the .npy header).
    est, X, members = saved
    rows, _ = _rows(X, None)
    document = members[DOCUMENT]
    padded = document + b" " * (MAX_DOCUMENT_BYTES - len(document))
    for extra, ok in ((0, True), (1, False)):
        path = _write(
            tmp_path / "doc.hmz", {**members, DOCUMENT: padded + b" " * extra}
        )
        if ok:
            np.testing.assert_array_equal(
                hiermask.load(path).predict(rows), est.predict(rows)
            )
        else:
            with pytest.raises(ModelFileError, match="more than the"):
                hiermask.load(path)
    limit = files_module.MAX_NPY_HEADER_BYTES
    for size, ok in ((limit, True), (limit + 1, False)):
        member = _npy_with_header(est.coef_, size)
        assert np.array_equal(np.load(io.BytesIO(member)), est.coef_)  # a valid .npy
        path = _write(tmp_path / "npy.hmz", {**members, COEF: member})
        if ok:
            np.testing.assert_array_equal(hiermask.load(path).coef_, est.coef_)
        else:
            with pytest.raises(ModelFileError, match=f"declares {48 + size} bytes"):
                hiermask.load(path)


def test_a_file_that_is_not_there_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        hiermask.load(tmp_path / "missing.hmz")


def test_model_file_error_is_a_value_error():
    assert issubclass(ModelFileError, ValueError)
    assert {"load", "ModelFileError", "InconsistentVersionWarning"} <= set(
        hiermask.__all__
    )
    assert files_module.FORMAT_VERSION in files_module.KNOWN_FORMAT_VERSIONS
