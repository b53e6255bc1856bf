"""Model files that run no code when loaded: ``.npy`` arrays and one JSON document.

A model file is a zip archive. Its member ``model.json`` holds the format and
hiermask versions, the estimator's parameters, and every fitted attribute that
is not an array (group labels with their types, feature names, floats, ints);
each array is a member ``arrays/<attribute path>.npy`` written and read
without pickle. The JSON document declares each array's dtype and shape, and
the member names follow from the tables below, never from the file.

Format 2 adds one thing to format 1: a fit that did not keep its group draws
(``keep_group_draws``) is saved without them, with the exact posterior means
and covariances of the group coefficients that every fit stores. ``save``
writes the lowest format that describes the file (1 when the group draws are
in it, so that older hiermask reads it), and ``load`` reads both.

The tables are the single description of the fitted state: :func:`save`
refuses an estimator with an attribute they do not list, and :func:`load`
validates the whole file against them (member names, declared sizes, dtypes,
shapes against the model's dimensions, JSON types) before it builds the
estimator. Loading reads data only: nothing from the file is unpickled,
imported, executed or written.
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._estimator import InconsistentVersionWarning, MaskedHierarchicalRegressor
from ._fit import GROUP_SITES, GroupDraws, NotInFile, Posterior
from ._fitted import file_fields, fitted_model, from_fields

__all__ = ["FORMAT_VERSION", "MAX_DOCUMENT_BYTES", "ModelFileError", "load", "save"]

#: Written in every file; ``load`` refuses any other value.
FORMAT = "hiermask-model"
#: Version of the layout written by this hiermask.
FORMAT_VERSION = 2
#: Layouts this hiermask reads.
KNOWN_FORMAT_VERSIONS = frozenset({1, 2})
#: The JSON member.
DOCUMENT = "model.json"
#: Largest JSON member accepted (uncompressed): about two million group labels.
MAX_DOCUMENT_BYTES = 64 * 2**20
#: An array member may declare at most this many bytes beyond its data (the
#: ``.npy`` header, 64-byte aligned: 128 bytes for any array written here).
MAX_NPY_HEADER_BYTES = 4096
#: dtypes an array may have, by the kind a table declares.
ARRAY_DTYPES = {
    "f": ("<f8", "<f4"),
    "b": ("|b1",),
    "i": ("<i8", "<i4", "<u8", "<u4"),
}
#: Attributes that are settings rather than fitted state, and are not saved.
NOT_SAVED = frozenset({"_metadata_request"})  # set_fit_request & co.

#: Members carry a fixed date: the same model gives the same bytes.
_DATE = (1980, 1, 1, 0, 0, 0)
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_LABEL_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


class ModelFileError(ValueError):
    """Raised by :func:`hiermask.load` for a file that is not a valid model file.

    The message names the file and what is wrong with it (the member, the
    attribute, the declared and expected values). Nothing from such a file is
    executed or written.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import hiermask
    >>> path = Path(tempfile.mkdtemp()) / "model.hmz"
    >>> _ = path.write_bytes(b"not a zip file")
    >>> try:
    ...     hiermask.load(path)
    ... except hiermask.ModelFileError as error:
    ...     print("refused")
    refused
    """


@dataclass(frozen=True)
class Spec:
    """How one value of the fitted state is stored.

    Attributes
    ----------
    kind : str
        ``"array"`` (an ``.npy`` member), ``"float"``, ``"int"`` (>= 0),
        ``"str"``, ``"names"`` (list of str), ``"labels"`` (group labels with
        their types), ``"diagnostics"`` (names and one array), ``"table"``
        (a dict, or the dataclass ``build``, of the values in ``table``) or
        ``"alias"`` (the value of the estimator attribute ``table``).
    shape : str
        Array shape in dimension symbols; digits are literal. ``G`` groups,
        ``P`` features, ``Q = P + 1`` coefficients, ``D`` draws, ``C``
        chains, ``S = D / C`` draws per chain, ``N`` rows of the fit, ``K``
        diagnosed parameters, ``F`` columns of ``X`` (``n_features_in_``),
        ``R`` correlated group effects (the intercept and the varying
        features).
    dtype : str
        Array dtype kind, a key of :data:`ARRAY_DTYPES`.
    when : frozenset or None
        The poolings that have the value (None: all). Elsewhere it is absent
        from a dict and None in a dataclass.
    optional : bool
        May be absent whatever the pooling.
    nullable : bool
        May be None.
    dim : str
        A dimension symbol bound by the value (an int) or its length.
    table : dict, str or None
        The values of a ``"table"``; the attribute of an ``"alias"``.
    build : callable or None
        The dataclass a ``"table"`` builds (None: a dict), or what makes the
        value of ``"names"`` from its list.
    """

    kind: str
    shape: str = ""
    dtype: str = "f"
    when: frozenset | None = None
    optional: bool = False
    nullable: bool = False
    dim: str = ""
    table: dict | str | None = None
    build: Callable | None = None


def _object_array(values):
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


_POOLED = frozenset({"partial", "complete"})
_PARTIAL = frozenset({"partial"})

#: ``posterior_`` (and ``Posterior.draws``): draws, chains concatenated.
DRAWS = {
    # Absent (both) in a format 2 file of a fit that did not keep them.
    "intercept": Spec("array", "D G", optional=True),
    "coef": Spec("array", "D G P", optional=True),
    "noise": Spec("array", "D"),
    "population_intercept": Spec("array", "D", when=_POOLED),
    "population_coef": Spec("array", "D P", when=_POOLED),
    "group_intercept_scale": Spec("array", "D", when=_PARTIAL),
    "group_coef_scale": Spec("array", "D P", when=_PARTIAL),
    "group_correlation": Spec("array", "D R R", when=_PARTIAL, optional=True),
}
#: ``convergence_``.
CONVERGENCE = {
    "max_r_hat": Spec("float"),
    "min_ess_bulk": Spec("float"),
    "n_divergences": Spec("int"),
    "worst_parameter": Spec("str", nullable=True),
}
#: ``Posterior.prior_reference``.
PRIOR_REFERENCE = {
    "y_ref": Spec("float"),
    "y_unit": Spec("float"),
    "x_ref": Spec("array", "P"),
    "x_unit": Spec("array", "P"),
    "coef_prior_scale": Spec("float"),
    "intercept_prior_scale": Spec("float"),
}
#: ``Posterior.timings``: the sampler's seconds.
TIMINGS = {
    "trace": Spec("float"),
    "compile": Spec("float"),
    "run": Spec("float"),
}
#: The fields of :class:`hiermask._fit.Posterior`.
POSTERIOR = {
    "draws": Spec("alias", table="posterior_"),
    "n_chains": Spec("int", dim="C"),
    "coef_mean": Spec("array", "G Q"),
    "coef_cov": Spec("array", "G Q Q"),
    "unseen_mean": Spec("array", "Q", when=_POOLED),
    "unseen_cov": Spec("array", "Q Q", when=_POOLED),
    "noise_var": Spec("float"),
    "x_fill": Spec("array", "G P"),
    "x_var": Spec("array", "G P"),
    "x_fill_population": Spec("array", "P"),
    "x_var_population": Spec("array", "P"),
    "prior_reference": Spec("table", table=PRIOR_REFERENCE),
    "diagnostics": Spec("diagnostics", "K 3"),
    "diverging": Spec("array", "C S", "b"),
    "tree_steps": Spec("array", "C S", "i"),
    "timings": Spec("table", table=TIMINGS),
    "varying": Spec("array", "P", "b", optional=True, nullable=True),
}
#: Every attribute that fit sets, in the order they are restored; the fitted
#: model (``_fitted``) is stored as its fields (``hiermask._fitted.FILE_FIELDS``).
FITTED = {
    "n_features_in_": Spec("int", dim="F"),
    "feature_names_in_": Spec("names", optional=True, dim="F", build=_object_array),
    "groups_": Spec("labels", dim="G"),
    "_feature_names": Spec("names", dim="P"),
    "_mask": Spec("array", "G P", "b"),
    "_seed": Spec("int"),
    "_fit_target": Spec("array", "N", nullable=True),
    "intercept_": Spec("array", "G"),
    "coef_": Spec("array", "G P"),
    "noise_scale_": Spec("float"),
    "population_intercept_": Spec("float", when=_POOLED),
    "population_coef_": Spec("array", "P", when=_POOLED),
    "group_intercept_scale_": Spec("float", when=_PARTIAL),
    "group_coef_scale_": Spec("array", "P", when=_PARTIAL),
    "posterior_": Spec("table", table=DRAWS),
    "convergence_": Spec("table", table=CONVERGENCE),
    "_posterior": Spec("table", table=POSTERIOR, build=Posterior),
}
#: The estimator's fitted state as one table.
ESTIMATOR = Spec("table", table=FITTED)


def _installed_version():
    from . import __version__

    return __version__


# ===================================================================== save
def _member(path):
    return f"arrays/{path}.npy"


def _float(value):
    value = float(value)
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


_NUMPY_SCALARS = {
    "bool": np.bool_,
    "int": np.integer,
    "float": np.floating,
    "str": np.str_,
}


def _label(value):
    for tag, kind in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if isinstance(value, kind | _NUMPY_SCALARS[tag]):
            if tag == "float":
                return [tag, _float(value)]
            return [tag, kind(value)]
    raise ValueError(
        f"Group label {value!r} of type {type(value).__name__} cannot be saved in "
        "a model file: labels must be str, int, float or bool. Pickle the "
        "estimator instead, or refit with such labels."
    )


def _join(path, name):
    return f"{path}.{name}" if path else name


def _encode(spec, value, path, arrays):
    """The JSON value of ``value``; arrays go to ``arrays[member]``."""
    if value is None:
        if not spec.nullable:
            raise TypeError(f"{path} is None; the model file format says it is not.")
        return None
    if spec.kind == "array":
        value = np.asarray(value)
        if value.dtype.str not in ARRAY_DTYPES[spec.dtype]:
            raise TypeError(f"{path} has dtype {value.dtype}; cannot save it.")
        arrays[_member(path)] = value
        return {"dtype": value.dtype.str, "shape": list(value.shape)}
    if spec.kind == "float":
        return _float(value)
    if spec.kind == "int":
        return int(value)
    if spec.kind == "str":
        return str(value)
    if spec.kind == "names":
        return [str(v) for v in value]
    if spec.kind == "labels":
        return [_label(v) for v in value]
    if spec.kind == "diagnostics":
        names = list(value)
        table = np.array([value[k] for k in names], dtype=np.float64).reshape(-1, 3)
        arrays[_member(path)] = table
        return {"names": names, "values": {"dtype": "<f8", "shape": list(table.shape)}}
    return _encode_table(spec, value, path, arrays)


def _encode_table(spec, value, path, arrays):
    """A dict (or dataclass) as a JSON object; absent and None entries of
    values that only some poolings have are left out."""
    items = vars(value) if isinstance(spec.build, type) else value
    unknown = set(items) - set(spec.table)
    if unknown:
        raise TypeError(
            f"{path or 'The estimator'} holds {sorted(unknown)}, which the model "
            "file format does not describe (the tables of hiermask._files)."
        )
    out = {}
    for name, sub in spec.table.items():
        if sub.kind == "alias" or name not in items:
            continue
        if items[name] is None and not sub.nullable:
            continue
        out[name] = _encode(sub, items[name], _join(path, name), arrays)
    return out


def _params(est):
    params = est.get_params(deep=False)
    out = {}
    for name, value in params.items():
        if isinstance(value, np.generic):
            value = value.item()
        if name == "varying" and not isinstance(value, str):
            out[name] = _varying_list(value)
            continue
        finite = not isinstance(value, float) or math.isfinite(value)
        if not finite or (
            value is not None and not isinstance(value, bool | int | float | str)
        ):
            raise ValueError(
                f"Parameter {name}={value!r} cannot be saved in a model file: "
                "parameters must be None, bool, int, a finite float or str (for "
                "random_state, an int or None)."
            )
        out[name] = value
    return out


def _document(est):
    """The JSON document of a fitted estimator and its arrays."""
    model = fitted_model(est)
    params = _params(est)
    if model.draws is not est.posterior_:
        raise TypeError("posterior_ is not the fitted model's draws; cannot save it.")
    skip = set(params) | NOT_SAVED | {"_fitted"}
    kept = {k: v for k, v in vars(est).items() if k not in skip}
    kept.update(file_fields(model))
    if not model.kept_group_draws:  # saved as the moments, never made here
        kept["posterior_"] = model.draws.others
    arrays = {}
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if not model.kept_group_draws else 1,
        "hiermask_version": _installed_version(),
        "estimator": type(est).__name__,
        "params": params,
        "attributes": _encode_table(ESTIMATOR, kept, "", arrays),
    }
    return document, arrays


def save(est, path):
    """Write a fitted estimator to a model file (see :meth:`save
    <hiermask.MaskedHierarchicalRegressor.save>`).

    Parameters
    ----------
    est : MaskedHierarchicalRegressor
        A fitted estimator.
    path : str or path-like
        The file to write (replaced atomically if it exists).
    """
    document, arrays = _document(est)
    text = json.dumps(document, ensure_ascii=False, indent=1, allow_nan=False)
    path = Path(path)
    # Written beside the target, then renamed: a failed save leaves no file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as raw, zipfile.ZipFile(raw, "w") as archive:
            info = zipfile.ZipInfo(DOCUMENT, date_time=_DATE)
            archive.writestr(info, text.encode(), zipfile.ZIP_DEFLATED)
            for member, array in arrays.items():
                info = zipfile.ZipInfo(member, date_time=_DATE)
                # ZIP64 sizes for every member: one layout whatever the size.
                with archive.open(info, "w", force_zip64=True) as out:
                    np.lib.format.write_array(out, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ===================================================================== load
class _Reader:
    """Validation context of one file: its path, pooling, arrays and dims."""

    def __init__(self, path, pooling):
        self.path = path
        self.pooling = pooling
        self.refs = {}  # member -> (dtype str, shape tuple, shape pattern)
        self.dims = {}
        self.arrays = None  # member -> ndarray once read
        self.root = {}  # the estimator's attributes as they are decoded

    def fail(self, message):
        raise ModelFileError(f"{self.path}: {message}")

    def bind(self, symbol, size, where):
        if symbol and self.dims.setdefault(symbol, size) != size:
            self.fail(
                f"{where} has size {size} where the model has {self.dims[symbol]} "
                f"(dimension {symbol})."
            )


def _expect(reader, ok, path, what, value):
    if not ok:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        reader.fail(f"{path} must be {what}, got {shown}.")


def _decode_float(reader, value, path):
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    _expect(reader, ok and math.isfinite(value), path, "a number", value)
    return float(value)


def _decode_int(reader, value, path):
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    _expect(reader, ok, path, "an int >= 0", value)
    return value


def _decode_names(reader, value, path):
    ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    _expect(reader, ok, path, "a list of str", value)
    return value


def _decode_labels(reader, value, path):
    _expect(reader, isinstance(value, list), path, "a list of labels", value)
    labels = []
    for i, item in enumerate(value):
        ok = isinstance(item, list) and len(item) == 2 and item[0] in _LABEL_TYPES
        _expect(reader, ok, f"{path}[{i}]", "a [type, value] pair", item)
        tag, raw = item
        if tag == "float":
            labels.append(_decode_float(reader, raw, f"{path}[{i}]"))
            continue
        kind = _LABEL_TYPES[tag]
        ok = isinstance(raw, kind) and (tag == "bool" or not isinstance(raw, bool))
        _expect(reader, ok, f"{path}[{i}]", f"a {tag} label", raw)
        labels.append(raw)
    if len(set(labels)) != len(labels):
        reader.fail(f"{path} holds duplicate group labels.")
    return _object_array(labels)


def _decode_array(reader, spec, value, path):
    ok = isinstance(value, dict) and set(value) == {"dtype", "shape"}
    _expect(reader, ok, path, 'an object {"dtype", "shape"}', value)
    dtype, shape = value["dtype"], value["shape"]
    if dtype not in ARRAY_DTYPES[spec.dtype]:
        reader.fail(
            f"{path} declares dtype {dtype!r}; it must be one of "
            f"{', '.join(ARRAY_DTYPES[spec.dtype])} (object arrays are never read)."
        )
    ok = isinstance(shape, list) and all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    )
    _expect(reader, ok, f"{path}.shape", "a list of ints >= 0", shape)
    member = _member(path)
    if reader.arrays is not None:
        return reader.arrays[member]
    symbols = spec.shape.split()
    if len(symbols) != len(shape):
        reader.fail(f"{path} has {len(shape)} dimensions; it must have {len(symbols)}.")
    for symbol, size in zip(symbols, shape, strict=True):
        if symbol.isdigit():
            _expect(reader, size == int(symbol), f"{path}.shape", spec.shape, shape)
        else:
            reader.bind(symbol, size, path)
    reader.refs[member] = (dtype, tuple(shape))
    return None


def _decode_diagnostics(reader, spec, value, path):
    ok = isinstance(value, dict) and set(value) == {"names", "values"}
    _expect(reader, ok, path, 'an object {"names", "values"}', value)
    names = _decode_names(reader, value["names"], f"{path}.names")
    reader.bind("K", len(names), f"{path}.names")
    table = _decode_array(reader, spec, value["values"], path)
    if table is None:
        return None
    return {name: tuple(row) for name, row in zip(names, table, strict=True)}


def _decode(reader, spec, value, path):
    """The value of one entry; arrays are None until ``reader.arrays`` is set."""
    if value is None:
        _expect(reader, spec.nullable, path, f"a {spec.kind}, not null", value)
        return None
    if spec.kind == "array":
        return _decode_array(reader, spec, value, path)
    if spec.kind == "float":
        return _decode_float(reader, value, path)
    if spec.kind == "int":
        out = _decode_int(reader, value, path)
        reader.bind(spec.dim, out, path)
        return out
    if spec.kind == "str":
        _expect(reader, isinstance(value, str), path, "a str", value)
        return value
    if spec.kind in ("names", "labels"):
        decode = _decode_names if spec.kind == "names" else _decode_labels
        out = decode(reader, value, path)
        reader.bind(spec.dim, len(out), path)
        return spec.build(out) if spec.build is not None else out
    if spec.kind == "diagnostics":
        return _decode_diagnostics(reader, spec, value, path)
    return _decode_table(reader, spec, value, path)


def _applies(reader, spec):
    return spec.when is None or reader.pooling in spec.when


def _decode_table(reader, spec, value, path):
    """A JSON object as a dict (or dataclass) of the values ``spec.table``
    describes: each present, absent or None as the pooling says."""
    _expect(reader, isinstance(value, dict), path or "attributes", "an object", value)
    unknown = set(value) - {k for k, s in spec.table.items() if s.kind != "alias"}
    if unknown:
        reader.fail(f"{path or 'attributes'} has unknown entries {sorted(unknown)}.")
    out = {}
    if not path:
        reader.root = out  # the estimator's attributes, for aliases
    for name, sub in spec.table.items():
        where = _join(path, name)
        if sub.kind == "alias":
            out[name] = reader.root.get(sub.table)
        elif name in value:
            if not _applies(reader, sub):
                reader.fail(
                    f"{where} is present, but pooling={reader.pooling!r} has none."
                )
            out[name] = _decode(reader, sub, value[name], where)
        elif _applies(reader, sub) and not sub.optional:
            reader.fail(f"{where} is missing.")
        elif isinstance(spec.build, type):
            out[name] = None
    if isinstance(spec.build, type) and reader.arrays is not None:
        return spec.build(**out)
    return out


def _check_group_draws(reader, draws, version):
    """The group draws: in a format 1 file, or in neither or both of
    ``intercept`` and ``coef`` of a format 2 file."""
    held = [name for name in GROUP_SITES if name in draws]
    if version == 1 and len(held) < len(GROUP_SITES):
        missing = sorted(set(GROUP_SITES) - set(held))
        reader.fail(f"posterior_ lacks {missing}, which format 1 requires.")
    if len(held) == 1:
        reader.fail(
            f"posterior_ holds {held[0]!r} without "
            f"{next(n for n in GROUP_SITES if n not in held)!r}."
        )


def _check_dims(reader, params):
    """The relations between the model's dimensions."""
    dims = reader.dims
    if "Q" in dims and dims["Q"] != dims["P"] + 1:
        reader.fail(f"arrays have {dims['Q']} coefficients for {dims['P']} features.")
    if "S" in dims and dims["C"] * dims["S"] != dims["D"]:
        reader.fail(
            f"{dims['C']} chains of {dims['S']} draws do not make {dims['D']} draws."
        )
    with_column = params.get("group_col") is not None
    if dims["F"] != dims["P"] + with_column:
        reader.fail(
            f"n_features_in_={dims['F']} does not fit {dims['P']} feature(s)"
            + (" and a group column." if with_column else ".")
        )


# --------------------------------------------------------------- the archive
def _unsafe(name):
    parts = name.split("/")
    return (
        name.startswith("/")
        or "\\" in name
        or re.match(r"^[A-Za-z]:", name) is not None
        or ".." in parts
        or "" in parts
    )


def _members(reader, archive):
    """The members by name, after checks of their names and storage."""
    infos = archive.infolist()
    names = [info.filename for info in infos]
    for name in names:
        if _unsafe(name):
            reader.fail(
                f"member {name!r} has an unsafe path (absolute, '..', a backslash "
                "or an empty part)."
            )
    if len(set(names)) != len(names):
        reader.fail("a member name occurs twice.")
    for info in infos:
        if info.flag_bits & 0x1:
            reader.fail(f"member {info.filename!r} is encrypted.")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            reader.fail(
                f"member {info.filename!r} uses compression method "
                f"{info.compress_type}; only stored and deflated members are read."
            )
    return {info.filename: info for info in infos}


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(
            f"duplicate keys {sorted({k for k in keys if keys.count(k) > 1})}"
        )
    return dict(pairs)


def _refuse_constant(name):
    raise ValueError(f"{name} is not JSON")


def _read_document(reader, archive, infos):
    info = infos.get(DOCUMENT)
    if info is None:
        reader.fail(f"the member {DOCUMENT} is missing; not a hiermask model file.")
    if info.file_size > MAX_DOCUMENT_BYTES:
        reader.fail(
            f"{DOCUMENT} declares {info.file_size} bytes, more than the "
            f"{MAX_DOCUMENT_BYTES} a model document may have."
        )
    with archive.open(info) as f:
        raw = f.read(MAX_DOCUMENT_BYTES + 1)
    try:
        return json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_no_duplicate_keys,
            parse_constant=_refuse_constant,
        )
    except (ValueError, RecursionError) as exc:
        reader.fail(f"{DOCUMENT} is not valid JSON ({exc}).")


def _check_format(reader, document):
    """Format and versions; returns the hiermask version that wrote the file
    and the format version."""
    _expect(reader, isinstance(document, dict), DOCUMENT, "a JSON object", document)
    if document.get("format") != FORMAT:
        reader.fail(f"not a hiermask model file ({DOCUMENT} has no format {FORMAT!r}).")
    version = document.get("format_version")
    ok = isinstance(version, int) and not isinstance(version, bool)
    _expect(reader, ok, "format_version", "an int", version)
    newest = max(KNOWN_FORMAT_VERSIONS)
    if version > newest:
        reader.fail(
            f"written in model file format {version} by a newer hiermask "
            f"({document.get('hiermask_version')!r}); this hiermask "
            f"{_installed_version()} reads formats up to {newest}. Upgrade hiermask."
        )
    if version not in KNOWN_FORMAT_VERSIONS:
        reader.fail(
            f"unknown model file format version {version}; this hiermask reads "
            f"{sorted(KNOWN_FORMAT_VERSIONS)}."
        )
    keys = {"format", "format_version", "hiermask_version", "estimator"}
    keys |= {"params", "attributes"}
    if set(document) != keys:
        reader.fail(f"{DOCUMENT} must have exactly the entries {sorted(keys)}.")
    saved = document["hiermask_version"]
    _expect(reader, isinstance(saved, str), "hiermask_version", "a str", saved)
    if document["estimator"] != MaskedHierarchicalRegressor.__name__:
        reader.fail(f"estimator {document['estimator']!r} is not known.")
    return saved, version


def _is_column(value):
    return isinstance(value, str | int) and not isinstance(value, bool)


def _varying_list(value):
    # ``varying`` as a list of column labels (str) or positions (int)
    items = [v.item() if isinstance(v, np.generic) else v for v in list(value)]
    if not all(_is_column(v) for v in items):
        raise ValueError(
            f"Parameter varying={value!r} cannot be saved in a model file: a list "
            "of varying columns must hold str labels or int positions."
        )
    return items


def _params_of(reader, params):
    """The estimator's parameters, validated as its constructor would."""
    _expect(reader, isinstance(params, dict), "params", "an object", params)
    known = MaskedHierarchicalRegressor().get_params()
    unknown = set(params) - set(known)
    if unknown:
        reader.fail(f"params has unknown parameter(s) {sorted(unknown)}.")
    for name, value in params.items():
        if name == "varying" and isinstance(value, list):
            ok = all(_is_column(v) for v in value)
            _expect(reader, ok, "params.varying", "a list of str or int", value)
            continue
        ok = value is None or isinstance(value, bool | int | float | str)
        _expect(reader, ok, f"params.{name}", "null, a bool, number or str", value)
    est = MaskedHierarchicalRegressor(**params)
    try:
        est._validate_params()
    except (ValueError, TypeError) as exc:
        reader.fail(f"params: {exc}")
    return est


def _data_bytes(reader, info, dtype, shape):
    """The bytes of data a member must hold; refuses it by its declared size."""
    nbytes = np.dtype(dtype).itemsize * math.prod(shape)
    if not nbytes <= info.file_size <= nbytes + MAX_NPY_HEADER_BYTES:
        reader.fail(
            f"member {info.filename!r} declares {info.file_size} bytes uncompressed; "
            f"the document declares {nbytes} bytes of data (and a header of at "
            f"most {MAX_NPY_HEADER_BYTES})."
        )
    return nbytes


def _read_array(reader, archive, info, dtype, shape):
    """One ``.npy`` member, read without pickle after its header is checked."""
    dtype, name = np.dtype(dtype), info.filename
    nbytes = _data_bytes(reader, info, dtype, shape)
    with archive.open(info) as f:
        try:
            major, _ = np.lib.format.read_magic(f)
            read_header = {
                1: np.lib.format.read_array_header_1_0,
                2: np.lib.format.read_array_header_2_0,
            }.get(major)
            if read_header is None:
                raise ValueError(f".npy format version {major}")
            got_shape, fortran, got_dtype = read_header(f)
        except (ValueError, SyntaxError) as exc:
            reader.fail(f"member {name!r} is not a .npy array ({exc}).")
        if got_dtype != dtype or tuple(got_shape) != tuple(shape):
            reader.fail(
                f"member {name!r} holds an array of dtype {got_dtype} and shape "
                f"{tuple(got_shape)}; the document declares {dtype} and "
                f"{tuple(shape)}."
            )
        if f.tell() + nbytes != info.file_size:
            reader.fail(f"member {name!r} does not hold {nbytes} bytes of data.")
        data = f.read(nbytes)
        f.read()  # the end of the member: its checksum is verified here
    if dtype.kind == "b" and (np.frombuffer(data, dtype=np.uint8) > 1).any():
        reader.fail(f"member {name!r} holds bool values other than 0 and 1.")
    order = "F" if fortran else "C"
    return np.frombuffer(data, dtype=dtype).reshape(shape, order=order).copy("K")


def _read_arrays(reader, archive, infos):
    """Every array the document declares: the member names and declared sizes
    of all are checked before any is read."""
    expected = set(reader.refs) | {DOCUMENT}
    missing = sorted(expected - set(infos))
    if missing:
        reader.fail(f"member(s) {missing} are missing.")
    extra = sorted(set(infos) - expected)
    if extra:
        reader.fail(f"unexpected member(s) {extra}.")
    for member, (dtype, shape) in reader.refs.items():
        _data_bytes(reader, infos[member], dtype, shape)
    return {
        member: _read_array(reader, archive, infos[member], dtype, shape)
        for member, (dtype, shape) in reader.refs.items()
    }


def _load(reader, archive):
    infos = _members(reader, archive)
    document = _read_document(reader, archive, infos)
    saved, version = _check_format(reader, document)
    est = _params_of(reader, document["params"])
    reader.pooling = est.pooling
    attributes = _decode_table(reader, ESTIMATOR, document["attributes"], "")
    _check_group_draws(reader, attributes["posterior_"], version)
    _check_dims(reader, est.get_params())
    reader.arrays = _read_arrays(reader, archive, infos)
    attributes = _decode_table(reader, ESTIMATOR, document["attributes"], "")
    if GROUP_SITES[0] not in attributes["posterior_"]:
        draws = GroupDraws(attributes["posterior_"], NotInFile())
        attributes["posterior_"] = attributes["_posterior"].draws = draws
    model = from_fields(attributes, est.get_params(deep=False))
    for name, value in {**attributes, "_fitted": model}.items():
        setattr(est, name, value)
    return est, saved


def load(path):
    """Load a model written by :meth:`MaskedHierarchicalRegressor.save
    <hiermask.MaskedHierarchicalRegressor.save>`.

    Loading reads data only: the file is a zip archive of ``.npy`` arrays,
    read with ``allow_pickle=False``, and one JSON document. Nothing in it is
    unpickled, imported or executed, and the whole file is validated (member
    names, declared sizes, dtypes, shapes, JSON types, parameters) before the
    estimator is built.

    Parameters
    ----------
    path : str or path-like
        A model file (suggested suffix ``.hmz``).

    Returns
    -------
    MaskedHierarchicalRegressor
        The fitted estimator: it predicts, summarizes, plots and exports to
        ArviZ exactly like the one that was saved.

    Raises
    ------
    ModelFileError
        If the file is not a valid model file: not a zip archive, truncated
        or damaged, a member missing, unexpected or with an unsafe path, an
        array of another dtype or shape than the document declares (object
        arrays are never read), a member declaring more bytes than its array
        needs (a compression bomb is refused before it is decompressed), a
        JSON document over :data:`MAX_DOCUMENT_BYTES` or with wrong types,
        or a format version that this hiermask does not know (files of a
        newer format are refused, never misread).
    FileNotFoundError
        If there is no such file.

    Warns
    -----
    InconsistentVersionWarning
        If another hiermask version wrote the file (in a format this one
        reads).

    Examples
    --------
    >>> import numpy as np
    >>> import hiermask
    >>> from hiermask import MaskedHierarchicalRegressor
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(40, 2))
    >>> y = X @ [1.0, -1.0] + rng.normal(scale=0.1, size=40)
    >>> est = MaskedHierarchicalRegressor(
    ...     num_warmup=100, num_samples=100, num_chains=2, random_state=0,
    ...     on_bad_convergence="ignore",
    ... ).fit(X, y)
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "model.hmz")
    >>> est.save(path)
    >>> loaded = hiermask.load(path)
    >>> bool((loaded.predict(X) == est.predict(X)).all())
    True
    """
    reader = _Reader(os.fspath(path), pooling=None)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        reader.fail(f"not a zip archive, or a truncated or damaged one ({exc}).")
    with archive:
        try:
            est, saved = _load(reader, archive)
        except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
            reader.fail(f"damaged or truncated ({exc}).")
    current = _installed_version()
    if saved != current:
        warnings.warn(
            InconsistentVersionWarning(original_version=saved, current_version=current),
            stacklevel=2,
        )
    return est
