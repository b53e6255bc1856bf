"""Input checks: group column extraction, feature conversion, label encoding.

Everything here is pure NumPy/pandas and never modifies what the user passed:
every array that leaves these functions is a fresh copy or a read-only view
that the callers do not write to.
"""

from __future__ import annotations

import inspect
import numbers
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.utils import check_array, column_or_1d
from sklearn.utils.validation import _check_sample_weight

from ._masks import row_chunks

#: scikit-learn >= 1.7 refuses all-zero weights unless told otherwise.
_ALL_ZERO_OPTION = (
    "allow_all_zero_weights" in inspect.signature(_check_sample_weight).parameters
)

__all__ = [
    "ParsedX",
    "UnseenGroupWarning",
    "check_target",
    "check_unseen",
    "check_weights",
    "constant_target_message",
    "describe_rows",
    "encode_groups",
    "label_is_missing",
    "lookup_groups",
    "split_groups",
    "target_note",
    "unseen_note",
]

#: Largest magnitude accepted in X and y: the squares of larger values, summed
#: over the rows, overflow the float64 statistics of the fit (1e150 ** 2 * 1e8
#: rows is still finite).
MAX_ABS_VALUE = 1e150

#: Unseen labels listed by name in the note of :func:`unseen_note`.
MAX_LABELS_SHOWN = 5


class UnseenGroupWarning(UserWarning):
    """Warned by the predict methods when rows belong to groups not seen in
    fit (a typo, or an int label against string labels, looks exactly like a
    new group).

    Examples
    --------
    >>> import warnings
    >>> from hiermask import MaskedHierarchicalRegressor, UnseenGroupWarning
    >>> from hiermask.datasets import make_manufacturing
    >>> X, y = make_manufacturing(60, random_state=0)
    >>> est = MaskedHierarchicalRegressor(
    ...     group_col="Product_Group", num_warmup=100, num_samples=100,
    ...     num_chains=2, on_bad_convergence="ignore", random_state=0,
    ... ).fit(X, y)
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     _ = est.predict(X.head(2).assign(Product_Group="Product_Group_9"))
    >>> any(issubclass(w.category, UnseenGroupWarning) for w in caught)
    True
    """


@dataclass(frozen=True)
class ParsedX:
    """Features and group labels taken apart from one ``X``.

    Attributes
    ----------
    features : ndarray of shape (n_samples, n_features), float64
        The feature columns, NaN where missing.
    labels : ndarray of shape (n_samples,) or None
        The group label of each row, or None when no groups were given.
    feature_names : list of str
        Names of the feature columns in input order.
    """

    features: np.ndarray
    labels: np.ndarray | None
    feature_names: list[str]


def describe_rows(rows: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    more = f", ... ({len(rows)} in all)" if len(rows) > limit else ""
    return f"row(s) {shown}{more}"


def _resolve_frame_column(X: pd.DataFrame, group_col) -> int:
    columns = list(X.columns)
    if group_col in columns:
        return columns.index(group_col)
    if isinstance(group_col, numbers.Integral) and not isinstance(group_col, bool):
        if -len(columns) <= group_col < len(columns):
            return int(group_col) % len(columns)
        raise ValueError(
            f"group_col={group_col!r} is out of range for X with "
            f"{len(columns)} columns."
        )
    raise ValueError(
        f"group_col={group_col!r} is not a column of X; its columns are {columns}."
    )


def _frame_features(X: pd.DataFrame, keep: list[int]) -> tuple[np.ndarray, list]:
    out = np.empty((X.shape[0], len(keep)), dtype=np.float64)
    names = []
    for out_j, j in enumerate(keep):
        col = X.iloc[:, j]
        name = X.columns[j]
        names.append(name)
        if (
            pd.api.types.is_datetime64_any_dtype(col.dtype)
            or pd.api.types.is_timedelta64_dtype(col.dtype)
            or isinstance(col.dtype, pd.PeriodDtype)
        ):
            raise ValueError(
                f"Feature column {name!r} has non-numeric dtype {col.dtype}. "
                "Features must be numeric: convert dates and durations to "
                "numbers (e.g. days since a reference date) first."
            )
        if pd.api.types.is_bool_dtype(col.dtype) or pd.api.types.is_numeric_dtype(
            col.dtype
        ):
            if pd.api.types.is_complex_dtype(col.dtype):
                raise ValueError(f"Complex data not supported: column {name!r}.")
            out[:, out_j] = col.to_numpy(dtype=np.float64, na_value=np.nan)
            continue
        try:
            out[:, out_j] = pd.to_numeric(col, errors="raise").to_numpy(
                dtype=np.float64, na_value=np.nan
            )
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"Feature column {name!r} has non-numeric dtype {col.dtype} "
                f"({exc}). Features must be numeric; only the group column may "
                "hold labels."
            ) from None
    return out, names


def _non_numeric(arr, columns):
    # The positions (and names, x<j>) of the columns that do not convert to
    # float, with the number of such cells and the first offending value.
    out = []
    for j in columns:
        bad = 0
        first = None
        for value in arr[:, j]:
            try:
                float(value)
            except (TypeError, ValueError):
                bad += 1
                first = value if first is None else first
        if bad:
            out.append(f"'x{j}' ({bad} cell(s), e.g. {first!r})")
    return ", ".join(out) or "none found"


def split_groups(X, group_col=None, groups=None, *, ensure_min_samples=1) -> ParsedX:
    """Take the group labels out of ``X`` and convert the rest to float64.

    Parameters
    ----------
    X : array-like or DataFrame of shape (n_samples, n_columns)
        The input as the user gave it.
    group_col : str, int or None
        Column label (DataFrame) or position of the group column.
    groups : array-like of shape (n_samples,) or None
        Group labels given separately.
    ensure_min_samples : int, default=1
        Fewest rows accepted.

    Returns
    -------
    ParsedX
        The features, labels and feature names.
    """
    if group_col is not None and groups is not None:
        raise ValueError(
            "Groups were given twice: both group_col and groups=. Give the group "
            "labels either as a column of X (group_col) or as groups=, not both."
        )
    if isinstance(X, pd.DataFrame):
        features, labels, names = _split_frame(X, group_col, ensure_min_samples)
    else:
        features, labels, names = _split_array(X, group_col, ensure_min_samples)
    if groups is not None:
        labels = _separate_labels(groups, features.shape[0])
    if _has_large_values(features):  # one chunked pass; the details if needed
        _check_finite(features, names)
        _check_magnitude(features, names)
    return ParsedX(features=features, labels=labels, feature_names=names)


def _has_large_values(features: np.ndarray) -> bool:
    """Whether any cell is infinite or above MAX_ABS_VALUE, chunk by chunk."""
    for sl in row_chunks(*features.shape):
        with np.errstate(invalid="ignore"):
            if (np.abs(features[sl]) > MAX_ABS_VALUE).any():
                return True
    return False


def _split_frame(X, group_col, ensure_min_samples):
    """:func:`split_groups` for a DataFrame: (features, labels, names)."""
    if X.columns.has_duplicates:
        dup = sorted({str(c) for c in X.columns[X.columns.duplicated()]})
        raise ValueError(f"X has duplicate column names: {dup}.")
    if X.shape[0] < ensure_min_samples:
        raise ValueError(
            f"Found array with {X.shape[0]} sample(s) (shape={X.shape}) while "
            f"a minimum of {ensure_min_samples} is required."
        )
    keep = list(range(X.shape[1]))
    labels = None
    if group_col is not None:
        pos = _resolve_frame_column(X, group_col)
        labels = X.iloc[:, pos].to_numpy(dtype=object, na_value=np.nan)
        if isinstance(X.iloc[:, pos].dtype, pd.CategoricalDtype):
            labels = np.asarray(X.iloc[:, pos].astype(object), dtype=object)
        keep.remove(pos)
    elif X.shape[1] == 0:
        raise ValueError("X has 0 feature(s); a minimum of 1 is required.")
    features, names = _frame_features(X, keep)
    names = [str(n) for n in names]
    return features, labels, names


def _split_array(X, group_col, ensure_min_samples):
    """:func:`split_groups` for any other array: (features, labels, names)."""
    arr = check_array(
        X,
        dtype=None,
        ensure_all_finite=False,
        ensure_min_samples=ensure_min_samples,
        ensure_min_features=1,
        input_name="X",
    )
    keep = list(range(arr.shape[1]))
    labels = None
    if group_col is not None:
        if not isinstance(group_col, numbers.Integral) or isinstance(group_col, bool):
            raise ValueError(
                f"group_col={group_col!r} must be an int position when X is "
                "not a DataFrame."
            )
        if not -arr.shape[1] <= group_col < arr.shape[1]:
            raise ValueError(
                f"group_col={group_col} is out of range for X with "
                f"{arr.shape[1]} columns."
            )
        pos = int(group_col) % arr.shape[1]
        # numeric labels keep their dtype (a view): factorizing and looking up
        # typed labels is fast; others become objects
        labels = arr[:, pos] if arr.dtype.kind in "iuf" else None
        if labels is None:
            labels = np.asarray(arr[:, pos], dtype=object)
        keep.remove(pos)
    names = [f"x{j}" for j in keep]
    try:
        features = check_array(
            np.take(arr, keep, axis=1),  # a row-major copy: never X itself
            dtype=np.float64,
            ensure_all_finite=False,
            ensure_min_features=0,
            ensure_min_samples=0,
            input_name="X",
        )
    except (TypeError, ValueError) as exc:  # same type, with the column
        raise type(exc)(
            f"{exc}; non-numeric feature column(s): {_non_numeric(arr, keep)}."
        ) from exc
    return features, labels, names


def _separate_labels(groups, n_rows):
    """The labels given as ``groups=``, one per row."""
    labels = np.asarray(column_or_1d(np.asarray(groups, dtype=object)))
    if labels.shape[0] != n_rows:
        raise ValueError(
            f"groups has {labels.shape[0]} labels but X has {n_rows} rows."
        )
    return labels


def _check_finite(features, names):
    """Refuse infinite feature values, naming their columns."""
    inf = np.isinf(features)
    if inf.any():
        bad = [
            f"{names[j]!r} ({int(inf[:, j].sum())} cell(s))"
            for j in np.flatnonzero(inf.any(axis=0))
        ]
        raise ValueError(
            "Input X contains infinity in feature column(s) "
            + ", ".join(bad)
            + ". Replace it with a finite value or NaN."
        )


def _check_magnitude(features: np.ndarray, names: list) -> None:
    """Refuse values whose squares would overflow the statistics."""
    with np.errstate(invalid="ignore"):
        big = np.abs(features) > MAX_ABS_VALUE
    if not big.any():
        return
    bad = [
        f"{names[j]!r} ({int(big[:, j].sum())} cell(s), e.g. "
        f"{features[np.argmax(big[:, j]), j]:.3g})"
        for j in np.flatnonzero(big.any(axis=0))
    ]
    raise ValueError(
        f"Input X has values above {MAX_ABS_VALUE:g} in magnitude in feature "
        f"column(s) {', '.join(bad)}; their squares overflow float64. Rescale "
        "the column (e.g. to other units) or replace the value with NaN."
    )


def label_is_missing(labels: np.ndarray) -> np.ndarray:
    return np.asarray(pd.isna(labels), dtype=bool)


def encode_groups(labels: np.ndarray | None, n_samples: int):
    """Encode fit-time group labels as integer codes.

    Parameters
    ----------
    labels : ndarray of shape (n_samples,) or None
        Group labels; None means one group.
    n_samples : int
        Number of rows.

    Returns
    -------
    groups : ndarray of shape (n_groups,)
        The distinct labels, sorted when they are comparable, else in order
        of first appearance.
    group_idx : ndarray of shape (n_samples,), int64
        Code of each row.
    """
    if labels is None:
        return np.array([0], dtype=object), np.zeros(n_samples, dtype=np.int64)
    missing = label_is_missing(labels)
    if missing.any():
        rows = np.flatnonzero(missing)
        raise ValueError(
            f"Group labels contain NaN/None at {describe_rows(rows)}. Every row "
            "used for fitting needs a group."
        )
    try:
        codes, uniques = pd.factorize(labels, sort=True)
    except TypeError:
        codes, uniques = pd.factorize(labels, sort=False)
    return np.asarray(uniques, dtype=object), codes.astype(np.int64, copy=False)


def _is_number(value) -> bool:
    # an int or float that float64 holds exactly; not bool (True == 1 in
    # Python, not in a typed index)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return False
    return not isinstance(value, numbers.Integral) or abs(int(value)) < 2**53


def lookup_groups(groups: np.ndarray, labels: np.ndarray | None, n_samples: int):
    """Map predict-time labels to fitted group codes; -1 marks unseen groups.

    Parameters
    ----------
    groups : ndarray of shape (n_groups,)
        Labels seen at fit.
    labels : ndarray of shape (n_samples,) or None
        Labels at predict; None means the single fitted group.
    n_samples : int
        Number of rows.

    Returns
    -------
    ndarray of shape (n_samples,), int64
        Fitted code of each row, -1 for labels not seen at fit.
    """
    if labels is None:
        if len(groups) != 1:
            raise ValueError(
                f"The model was fitted on {len(groups)} groups; give the group "
                "of each row at predict (group_col in X or groups=)."
            )
        return np.zeros(n_samples, dtype=np.int64)
    missing = label_is_missing(labels)
    if missing.any():
        rows = np.flatnonzero(missing)
        raise ValueError(f"Group labels contain NaN/None at {describe_rows(rows)}.")
    if labels.dtype.kind in "iuf" and all(_is_number(g) for g in groups):
        # typed lookup, which compares numbers as Python does
        index = pd.Index(np.asarray(groups.tolist(), dtype=np.float64))
        return index.get_indexer(labels.astype(np.float64)).astype(np.int64)
    index = pd.Index(groups)
    try:
        return index.get_indexer(pd.Index(labels, dtype=object)).astype(np.int64)
    except (TypeError, pd.errors.InvalidIndexError):
        lookup = {label: i for i, label in enumerate(groups)}
        return np.array([lookup.get(lab, -1) for lab in labels], dtype=np.int64)


def check_target(y, n_samples: int) -> np.ndarray:
    """Validate the target: 1-D, numeric, finite, one value per row.

    Parameters
    ----------
    y : array-like of shape (n_samples,)
        Target.
    n_samples : int
        Number of rows of X.

    Returns
    -------
    ndarray of shape (n_samples,), float64
        A copy of the target.
    """
    if isinstance(y, pd.Series | pd.DataFrame):
        y = y.to_numpy(dtype=np.float64, na_value=np.nan)
    y = check_array(
        y,
        ensure_2d=False,
        dtype=np.float64,
        ensure_all_finite=False,
        input_name="y",
        copy=True,
    )
    y = column_or_1d(y, warn=True)
    if y.shape[0] != n_samples:
        raise ValueError(f"y has {y.shape[0]} values but X has {n_samples} rows.")
    nan = np.isnan(y)
    if nan.any():
        raise ValueError(
            f"Input y contains NaN: {int(nan.sum())} value(s), at "
            f"{describe_rows(np.flatnonzero(nan))}. Rows with a missing target "
            "are rows to predict, not to fit: drop them before fit."
        )
    inf = np.isinf(y)
    if inf.any():
        raise ValueError(
            "Input y contains infinity or a value too large for dtype('float64'): "
            f"{int(inf.sum())} value(s), at {describe_rows(np.flatnonzero(inf))}."
        )
    big = np.abs(y) > MAX_ABS_VALUE
    if big.any():
        raise ValueError(
            f"Input y has values above {MAX_ABS_VALUE:g} in magnitude: "
            f"{int(big.sum())} value(s), at {describe_rows(np.flatnonzero(big))}; "
            "their squares overflow float64. Rescale the target."
        )
    return y


def constant_target_message(value: float) -> str:
    """The error for a target that takes one value.

    Parameters
    ----------
    value : float
        The value.

    Returns
    -------
    str
    """
    return (
        f"y is constant (every value is {value:g}): there is nothing to regress, "
        "and the priors, in units of sd(y) = 0, would be degenerate. Check that "
        "the target column is the intended one."
    )


def target_note(y: np.ndarray) -> str | None:
    """What the Gaussian model assumes, for a target that looks binary or
    like counts; raises for a constant target.

    Parameters
    ----------
    y : ndarray of shape (n_samples,)
        The validated target (finite).

    Returns
    -------
    str or None
        A warning text when ``y`` takes two values or only non-negative
        integers, else None.

    Raises
    ------
    ValueError
        When ``y`` is constant.
    """
    low, high = float(y.min()), float(y.max())
    if low == high:
        raise ValueError(constant_target_message(low))
    model = (
        "the model assumes a continuous Gaussian target, y ~ Normal(intercept + "
        "x'coef, sigma) with one sigma for every row"
    )
    if np.all((y == low) | (y == high)):
        return (
            f"y takes only two values ({low:g} and {high:g}): {model}, so "
            "predictions and intervals are not confined to these values (a "
            "linear probability model). For a binary outcome a logistic model "
            "fits better."
        )
    if low >= 0 and np.all(y == np.round(y)):
        return (
            f"y holds only non-negative integers ({low:g} to {high:g}): {model}, so "
            "intervals can go below 0 and the spread does not grow with the mean. "
            "For counts a Poisson or negative binomial model may fit better."
        )
    return None


def check_weights(
    sample_weight, features: np.ndarray, *, require_positive_sum=True
) -> np.ndarray:
    """Validate frequency weights: finite, non-negative, not all zero.

    Parameters
    ----------
    sample_weight : array-like of shape (n_samples,) or None
        Weights; None means ones.
    features : ndarray of shape (n_samples, n_features)
        The features, for the row count.
    require_positive_sum : bool, default=True
        Whether all-zero weights are an error (False for one partition of
        the rows, whose sum the caller checks over all partitions).

    Returns
    -------
    ndarray of shape (n_samples,), float64
        A copy of the weights.
    """
    extra = {}
    if not require_positive_sum and _ALL_ZERO_OPTION:
        extra["allow_all_zero_weights"] = True
    w = _check_sample_weight(
        sample_weight, features, dtype=np.float64, ensure_non_negative=True, **extra
    )
    w = np.array(w, dtype=np.float64, copy=True)
    if not np.isfinite(w).all():
        raise ValueError("sample_weight contains NaN or infinity.")
    if require_positive_sum and w.sum() <= 0:
        raise ValueError("sample_weight sums to zero: nothing to fit.")
    return w


def _canonical(label) -> str:
    """The label as a stripped string, numbers written one way (308, 308.0
    and "308 " are all "308")."""
    text = str(label).strip()
    try:
        return str(int(text))
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else repr(number)


def _near_misses(fitted: np.ndarray, unseen: np.ndarray) -> list[str]:
    """Hints for unseen labels that equal a seen one after converting the
    type or stripping spaces."""
    seen = {}
    for label in fitted:
        seen.setdefault(_canonical(label), label)
    hints = []
    for label in unseen:
        match = seen.get(_canonical(label))
        if match is None:
            continue
        how = []
        if type(label) is not type(match) or str(label).strip() != str(match).strip():
            how.append("converting its type")
        if str(label) != str(label).strip() or str(match) != str(match).strip():
            how.append("stripping spaces")
        hints.append(
            f"{label!r} ({type(label).__name__}) would match the seen label "
            f"{match!r} ({type(match).__name__}) after {' and '.join(how)}"
        )
        if len(hints) == MAX_LABELS_SHOWN:
            break
    return hints


def unseen_note(fitted: np.ndarray, unseen: np.ndarray, n_rows: int, pooling: str):
    """The warning text for rows of groups not seen in fit.

    Parameters
    ----------
    fitted : ndarray of shape (n_groups,)
        Labels seen in fit.
    unseen : ndarray of shape (n_unseen,)
        The distinct unseen labels, in order of first appearance.
    n_rows : int
        Number of rows with an unseen label.
    pooling : str
        The model's pooling (what an unseen group is predicted from).

    Returns
    -------
    str
    """
    source = {
        "partial": "from the population distribution of the groups",
        "complete": "with the coefficients shared by every group",
        "none": "from the prior: pooling='none' has no population to draw from",
    }[pooling]
    shown = ", ".join(map(repr, unseen[:MAX_LABELS_SHOWN]))
    more = f", ... ({len(unseen)} in all)" if len(unseen) > MAX_LABELS_SHOWN else ""
    text = (
        f"{n_rows} row(s) in {len(unseen)} group(s) not seen in fit ({shown}{more}) "
        f"are predicted {source}."
    )
    hints = _near_misses(fitted, unseen)
    if hints:
        text += " " + "; ".join(hints) + "."
    return text + " Use unseen_groups='error' to refuse them."


def check_unseen(fitted, unseen, n_rows, *, policy, pooling, stacklevel=4):
    """Refuse (``policy="error"``) or warn about rows of unseen groups.

    Parameters
    ----------
    fitted : ndarray of shape (n_groups,)
        Labels seen in fit.
    unseen : ndarray of shape (n_unseen,)
        The distinct unseen labels; nothing happens when it is empty.
    n_rows : int
        Number of rows with an unseen label.
    policy : {"population", "error"}
        The estimator's ``unseen_groups``.
    pooling : str
        The estimator's ``pooling``.
    stacklevel : int, default=4
        Passed to :func:`warnings.warn`.

    Raises
    ------
    ValueError
        Under ``policy="error"``, listing the unseen labels.
    """
    if len(unseen) == 0:
        return
    if policy == "error":
        hints = _near_misses(fitted, unseen)
        raise ValueError(
            f"{len(unseen)} group(s) were not seen in fit: "
            f"{', '.join(map(repr, unseen[:10]))}. "
            + ("; ".join(hints) + ". " if hints else "")
            + "Use unseen_groups='population' to predict them from the population."
        )
    warnings.warn(
        unseen_note(fitted, unseen, n_rows, pooling),
        UnseenGroupWarning,
        stacklevel=stacklevel,
    )
