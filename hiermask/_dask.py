"""Fit and predict on Dask data frames (optional extra ``hiermask[dask]``).

With the collapsed engine the only pass over the rows is a sum of per-group
statistics, so a distributed data frame is fitted without collecting it:

- pass 1 (workers, one task per partition): validate and convert the
  partition as the in-memory path does, then summarize it per group label:
  row counts, NaN counts per feature, weighted moments (count, mean, sum of
  squared deviations) of the observed cells and of the target;
- client: the partition summaries, merged in a tree (moments with Chan's
  formula), give the sorted group labels, the mask (the rule of
  :func:`hiermask._masks.infer_mask`) and the scaling;
- pass 2 (workers): :func:`hiermask._stats.group_statistics` on every
  partition with the global labels, mask and scaling, summed in a tree; the
  rows that hold latent cells travel with the sums, up to a limit;
- client: NUTS and everything after it, exactly as for in-memory data
  (:func:`hiermask._fit.posterior_from_statistics`).

Predictions are lazy: ``map_partitions`` over the rows with the fitted model
as one shared graph key. Each row's prediction depends only on the row (an
unseen group's row has its own mask); the groups not seen in fit are
counted over all partitions by a lazy reduction the predictions depend on,
which raises or warns once, as in memory.

This module imports dask only inside its functions, so that hiermask works
without the extra.
"""

from __future__ import annotations

import functools
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from . import _limits
from ._fit import FitStatistics, LatentRows
from ._masks import group_sum
from ._stats import (
    GroupStats,
    Moments,
    cell_moments,
    group_statistics,
    merge_moments,
    pool_moments,
    scaling_from_moments,
    vector_moments,
)
from ._validation import (
    check_target,
    check_unseen,
    check_weights,
    describe_rows,
    label_is_missing,
    lookup_groups,
    split_groups,
)

__all__ = [
    "FitSummary",
    "UnseenTable",
    "check_fit_inputs",
    "check_predict_inputs",
    "fit_statistics",
    "is_dask_collection",
    "lazy_predictions",
    "summarize",
]


def is_dask_collection(obj) -> bool:
    """Whether ``obj`` is a dask collection (False when dask is not imported).

    Parameters
    ----------
    obj : object
        Anything.

    Returns
    -------
    bool
    """
    if "dask" not in sys.modules:
        return False
    import dask

    return dask.is_dask_collection(obj)


def _dask_dataframe():
    try:
        import dask.dataframe as dd
    except ImportError as exc:  # pragma: no cover - dask present when used
        raise ImportError(
            "Dask input needs the optional extra: pip install 'hiermask[dask]'."
        ) from exc
    return dd


# ------------------------------------------------------------- inputs
def _check_collection(dd, value, name, X, kinds):
    """A dask Series (or None) partitioned like ``X``."""
    if value is None:
        return None
    if not isinstance(value, kinds):
        what = type(value).__name__
        raise ValueError(
            f"{name} must be a dask Series partitioned like X when X is a dask "
            f"DataFrame, got {what}. Take it from the same dask DataFrame as X "
            f"(e.g. {name} = ddf['column'])."
        )
    if value.npartitions != X.npartitions:
        raise ValueError(
            f"{name} has {value.npartitions} partitions but X has {X.npartitions}; "
            "they must be partitioned alike (take both from one dask DataFrame)."
        )
    if X.known_divisions and value.known_divisions:
        if tuple(value.divisions) != tuple(X.divisions):
            raise ValueError(
                f"{name} and X have different divisions; they must be "
                "partitioned alike (take both from one dask DataFrame)."
            )
    return value


def check_fit_inputs(X, y, groups, sample_weight, group_col):
    """Check the types and partitioning of fit's dask inputs.

    Parameters
    ----------
    X : dask.dataframe.DataFrame
        Features (with the group column when ``group_col`` is set).
    y : dask.dataframe.Series
        Target, partitioned like ``X``.
    groups : dask.dataframe.Series or None
        Group labels, partitioned like ``X``.
    sample_weight : dask.dataframe.Series or None
        Frequency weights, partitioned like ``X``.
    group_col : str, int or None
        The group column of ``X``.

    Returns
    -------
    feature_names : list of str
        Names of the feature columns (read from the metadata).
    """
    dd = _dask_dataframe()
    if not isinstance(X, dd.DataFrame):
        raise ValueError(
            f"With dask input, X must be a dask DataFrame, got {type(X).__name__}; "
            "convert a dask array with dask.dataframe.from_dask_array."
        )
    if y is None:
        raise ValueError("y is required: a dask Series partitioned like X.")
    _check_collection(dd, y, "y", X, dd.Series)
    _check_collection(dd, groups, "groups", X, dd.Series)
    _check_collection(dd, sample_weight, "sample_weight", X, dd.Series)
    # Column resolution and feature dtypes, on the (empty) metadata.
    meta_groups = None if groups is None else groups._meta
    parsed = split_groups(X._meta, group_col, meta_groups, ensure_min_samples=0)
    return parsed.feature_names


def check_predict_inputs(X, groups, group_col):
    """Check the types and partitioning of dask inputs to predict.

    Parameters
    ----------
    X : dask.dataframe.DataFrame
        Rows to predict.
    groups : dask.dataframe.Series or None
        Group labels, partitioned like ``X``.
    group_col : str, int or None
        The group column of ``X``.

    Returns
    -------
    int
        Number of feature columns.
    """
    dd = _dask_dataframe()
    if not isinstance(X, dd.DataFrame):
        raise ValueError(
            f"With dask input, X must be a dask DataFrame, got {type(X).__name__}."
        )
    _check_collection(dd, groups, "groups", X, dd.Series)
    meta_groups = None if groups is None else groups._meta
    parsed = split_groups(X._meta, group_col, meta_groups, ensure_min_samples=0)
    return parsed.features.shape[1]


@contextmanager
def _in_partition(number, n_partitions):
    """Say which partition a validation error comes from."""
    try:
        yield
    except ValueError as exc:
        where = f"Partition {number} of {n_partitions}"
        if "row" in str(exc):
            where += " (rows numbered from 0 within the partition)"
        raise ValueError(f"{where}: {exc}") from None


def _parse(X, y, groups, w, group_col):
    """One partition as arrays: what the in-memory fit validates, per row."""
    parsed = split_groups(X, group_col, groups, ensure_min_samples=0)
    n = parsed.features.shape[0]
    labels = parsed.labels
    if labels is not None:
        missing = label_is_missing(labels)
        if missing.any():
            raise ValueError(
                "Group labels contain NaN/None at "
                f"{describe_rows(np.flatnonzero(missing))}. Every row used for "
                "fitting needs a group."
            )
    if n == 0:
        for name, values in (("y", y), ("sample_weight", w)):
            if values is not None and len(values):
                raise ValueError(f"{name} has {len(values)} values but X has 0 rows.")
        return parsed, np.zeros(0), np.zeros(0)
    target = check_target(y, n)
    weights = check_weights(w, parsed.features, require_positive_sum=False)
    return parsed, target, weights


# ----------------------------------------------------- labelled summaries
def _union(a_labels, b_labels):
    """Labels of ``a`` then the new ones of ``b``; positions of b's labels."""
    pos = lookup_groups(a_labels, b_labels, len(b_labels))
    new = pos < 0
    labels = np.concatenate([a_labels, b_labels[new]])
    pos[new] = len(a_labels) + np.arange(int(new.sum()))
    return labels, pos


def _grow(values, size):
    out = np.zeros((size, *values.shape[1:]), dtype=values.dtype)
    out[: values.shape[0]] = values
    return out


@dataclass(frozen=True)
class FitSummary:
    """Pass 1 over the rows: per-label counts and moments.

    ``labels`` are in order of first appearance until :func:`summarize`
    sorts them like :func:`hiermask._validation.encode_groups`.

    Attributes
    ----------
    labels : ndarray of shape (n_groups,), object
        Group labels.
    rows : ndarray of shape (n_groups,), int64
        Rows per group.
    nans : ndarray of shape (n_groups, n_features), int64
        NaN cells per group and feature.
    cells : Moments
        Weighted moments of the observed cells, (n_groups, n_features).
    y : Moments
        Weighted moments of the target (scalars).
    n_rows : int
        Number of rows.
    weight_sum : float
        Sum of the weights.
    """

    labels: np.ndarray
    rows: np.ndarray
    nans: np.ndarray
    cells: Moments
    y: Moments
    n_rows: int
    weight_sum: float


def _merge_summaries(a: FitSummary, b: FitSummary) -> FitSummary:
    labels, pos = _union(a.labels, b.labels)
    size = len(labels)
    rows, nans = _grow(a.rows, size), _grow(a.nans, size)
    rows[pos] += b.rows
    nans[pos] += b.nans
    cells = Moments(
        *(_grow(v, size) for v in (a.cells.count, a.cells.mean, a.cells.m2))
    )
    merged = merge_moments(
        Moments(cells.count[pos], cells.mean[pos], cells.m2[pos]), b.cells
    )
    cells.count[pos], cells.mean[pos], cells.m2[pos] = (
        merged.count,
        merged.mean,
        merged.m2,
    )
    return FitSummary(
        labels=labels,
        rows=rows,
        nans=nans,
        cells=cells,
        y=merge_moments(a.y, b.y),
        n_rows=a.n_rows + b.n_rows,
        weight_sum=a.weight_sum + b.weight_sum,
    )


def _summarize_partition(X, y, groups, w, group_col, n_partitions, partition_info=None):
    number = partition_info["number"]
    with _in_partition(number, n_partitions):
        parsed, target, weights = _parse(X, y, groups, w, group_col)
    features = parsed.features
    n = features.shape[0]
    if parsed.labels is None:
        codes, labels = np.zeros(n, dtype=np.int64), np.array([0], dtype=object)
    else:
        codes, uniques = pd.factorize(parsed.labels, sort=False)
        labels = np.asarray(uniques, dtype=object)
    n_labels = len(labels)
    summary = FitSummary(
        labels=labels,
        rows=np.bincount(codes, minlength=n_labels).astype(np.int64),
        nans=np.rint(group_sum(np.isnan(features), codes, n_labels)).astype(np.int64),
        cells=cell_moments(features, weights, codes, n_labels),
        y=vector_moments(target, weights),
        n_rows=n,
        weight_sum=float(weights.sum()),
    )
    return pd.Series([summary], dtype=object)


@dataclass(frozen=True)
class _Partial:
    """Pass 2 result of some partitions: summed statistics, latent rows."""

    stats: GroupStats
    latent: LatentRows | None  # None once more than the limit
    n_latent: int


def _merge_partials(limit, a: _Partial, b: _Partial) -> _Partial:
    n_latent = a.n_latent + b.n_latent
    latent = None
    if n_latent <= limit and a.latent is not None and b.latent is not None:
        latent = LatentRows(
            *(
                np.concatenate([getattr(a.latent, f), getattr(b.latent, f)])
                for f in ("X", "y", "w", "group_idx")
            )
        )
    s, t = a.stats, b.stats
    stats = GroupStats(
        n=s.n + t.n,
        gram=s.gram + t.gram,
        xty=s.xty + t.xty,
        yty=s.yty + t.yty,
        incomplete_rows=s.incomplete_rows,
        x_count=s.x_count + t.x_count,
        x_sum=s.x_sum + t.x_sum,
        x_sumsq=s.x_sumsq + t.x_sumsq,
    )
    return _Partial(stats, latent, n_latent)


@dataclass(frozen=True)
class _Plan:
    """What pass 2 needs from pass 1 (one graph key shared by all tasks)."""

    groups: np.ndarray
    active: np.ndarray
    mask: np.ndarray  # (n_groups, n_active)
    scaling: object
    limit: int


def _statistics_partition(
    X, y, groups, w, group_col, plan, n_partitions, partition_info=None
):
    number = partition_info["number"]
    with _in_partition(number, n_partitions):
        parsed, target, weights = _parse(X, y, groups, w, group_col)
    n = parsed.features.shape[0]
    if parsed.labels is None:
        codes = np.zeros(n, dtype=np.int64)
    else:
        codes = lookup_groups(plan.groups, parsed.labels, n)
    if (codes < 0).any():
        raise RuntimeError(
            f"Partition {number} holds group labels that the first pass over the "
            "data did not see: the data changed between the two passes (is its "
            "source non-deterministic?). Persist or write it out first."
        )
    Xa = parsed.features[:, plan.active]
    stats = group_statistics(Xa, target, weights, codes, plan.mask, plan.scaling)
    rows = stats.incomplete_rows
    latent = None
    if len(rows) <= plan.limit:
        latent = LatentRows(Xa[rows], target[rows], weights[rows], codes[rows])
    stats = replace(stats, incomplete_rows=np.zeros(0, dtype=np.int64))
    return pd.Series([_Partial(stats, latent, len(rows))], dtype=object)


# ---------------------------------------------------------- reductions
def _unwrap(part):
    return part.iloc[0] if isinstance(part, pd.Series) else part


def _combine(merge, parts):
    return functools.reduce(merge, [_unwrap(p) for p in parts])


def _tree_reduce(collection, merge):
    """Merge the one-object partitions of ``collection`` in a tree of tasks
    (``_limits.DASK_SPLIT_EVERY`` per task), keeping the partition order.

    Returns
    -------
    dask.delayed.Delayed
    """
    import dask

    level = collection.to_delayed()
    combine = dask.delayed(_combine, pure=True)
    while True:
        level = [
            combine(merge, level[i : i + _limits.DASK_SPLIT_EVERY])
            for i in range(0, len(level), _limits.DASK_SPLIT_EVERY)
        ]
        if len(level) == 1:
            return level[0]


def _map_rows(func, X, y, groups, w, *args, **kwargs):
    dd = _dask_dataframe()
    return dd.map_partitions(
        func,
        X,
        y,
        groups,
        w,
        *args,
        meta=pd.Series([], dtype=object),
        enforce_metadata=False,
        **kwargs,
    )


def summarize(X, y, groups, sample_weight, group_col):
    """Pass 1: compute the per-group summary of dask inputs.

    Parameters
    ----------
    X : dask.dataframe.DataFrame
        Features (with the group column when ``group_col`` is set).
    y, groups, sample_weight : dask.dataframe.Series or None
        Target, group labels and weights, partitioned like ``X``.
    group_col : str, int or None
        The group column of ``X``.

    Returns
    -------
    FitSummary
        With the labels sorted like the in-memory fit sorts them.
    """
    import dask

    n = X.npartitions
    parts = _map_rows(_summarize_partition, X, y, groups, sample_weight, group_col, n)
    (summary,) = dask.compute(_tree_reduce(parts, _merge_summaries))
    # Sort like encode_groups: by label when comparable, else first appearance.
    try:
        codes, _ = pd.factorize(summary.labels, sort=True)
    except TypeError:
        codes = np.arange(len(summary.labels))
    order = np.argsort(codes)
    cells = summary.cells
    return replace(
        summary,
        labels=summary.labels[order],
        rows=summary.rows[order],
        nans=summary.nans[order],
        cells=Moments(cells.count[order], cells.mean[order], cells.m2[order]),
    )


def fit_statistics(
    X, y, groups, sample_weight, group_col, summary: FitSummary, mask, max_latent_rows
) -> FitStatistics:
    """Pass 2: the statistics of the collapsed engine, summed over partitions.

    Parameters
    ----------
    X : dask.dataframe.DataFrame
        Features (with the group column when ``group_col`` is set).
    y, groups, sample_weight : dask.dataframe.Series or None
        Target, group labels and weights, partitioned like ``X``.
    group_col : str, int or None
        The group column of ``X``.
    summary : FitSummary
        Pass 1's result (labels sorted).
    mask : ndarray of shape (n_groups, n_features), bool
        Which features apply to which group.
    max_latent_rows : int
        Most rows holding latent cells that may come to the client.

    Returns
    -------
    FitStatistics

    Raises
    ------
    ValueError
        When more than ``max_latent_rows`` rows hold latent cells.
    """
    import dask

    active = mask.any(axis=0)
    ma = mask[:, active]
    cells = Moments(
        summary.cells.count[:, active],
        summary.cells.mean[:, active],
        summary.cells.m2[:, active],
    )
    scaling = scaling_from_moments(pool_moments(cells, ma), summary.y)
    # Rows with latent cells are at least the latent cells of any one column.
    latent_cells = (np.where(ma, summary.nans[:, active], 0)).sum(axis=0)
    lower_bound = int(latent_cells.max()) if latent_cells.size else 0
    if lower_bound > max_latent_rows:
        _too_many_latent_rows(lower_bound, max_latent_rows, at_least=True)
    plan = dask.delayed(
        _Plan(summary.labels, active, ma, scaling, int(max_latent_rows)), pure=True
    )
    parts = _map_rows(
        _statistics_partition,
        X,
        y,
        groups,
        sample_weight,
        group_col,
        plan,
        X.npartitions,
    )
    merge = functools.partial(_merge_partials, int(max_latent_rows))
    (result,) = dask.compute(_tree_reduce(parts, merge))
    if result.n_latent > max_latent_rows or result.latent is None:
        _too_many_latent_rows(result.n_latent, max_latent_rows)
    return FitStatistics(mask, scaling, result.stats, result.latent, cells)


def _too_many_latent_rows(count, limit, at_least=False):
    amount = f"at least {count}" if at_least else str(count)
    raise ValueError(
        f"{amount} rows of X hold NaN in features that apply to their group "
        "(latent cells, imputed in the fit). A fit on dask data brings such rows "
        f"to the client, and max_latent_rows={limit}. Use missing='error' to "
        "reject them, clean the data (fill those cells, or drop those rows) "
        "before fit, or raise max_latent_rows."
    )


# ------------------------------------------------------------- predict
@dataclass(frozen=True)
class UnseenTable:
    """Labels of the groups not seen in fit, over all partitions.

    Attributes
    ----------
    labels : ndarray of shape (n_unseen,), object
    """

    labels: np.ndarray

    def lookup(self, labels, group_idx):
        """The ``unseen`` tuple of :func:`hiermask._predict.unseen_codes`.

        Parameters
        ----------
        labels : ndarray of shape (n_samples,) or None
            Labels of the rows.
        group_idx : ndarray of shape (n_samples,)
            Fitted code of each row, -1 for unseen groups.

        Returns
        -------
        tuple
            ``(codes, labels)``.
        """
        codes = np.full(group_idx.shape[0], -1, dtype=np.int64)
        rows = np.flatnonzero(group_idx < 0)
        if rows.size:
            codes[rows] = lookup_groups(self.labels, labels[rows], rows.size)
        return codes, self.labels


@dataclass(frozen=True)
class _UnseenCounts:
    labels: np.ndarray
    rows: np.ndarray


def _merge_unseen(a: _UnseenCounts, b: _UnseenCounts) -> _UnseenCounts:
    labels, pos = _union(a.labels, b.labels)
    rows = _grow(a.rows, len(labels))
    rows[pos] += b.rows
    return _UnseenCounts(labels, rows)


def _unseen_partition(X, groups, group_col, fitted, n, partition_info=None):
    with _in_partition(partition_info["number"], n):
        parsed = split_groups(X, group_col, groups, ensure_min_samples=0)
        n_rows = parsed.features.shape[0]
        group_idx = lookup_groups(fitted, parsed.labels, n_rows)
    rows = np.flatnonzero(group_idx < 0)
    codes, uniques = pd.factorize(parsed.labels[rows]) if rows.size else ([], [])
    labels = np.asarray(uniques, dtype=object)
    counts = _UnseenCounts(
        labels,
        np.bincount(np.asarray(codes, dtype=np.int64), minlength=len(labels)),
    )
    return pd.Series([counts], dtype=object)


def _unseen_table(counts: _UnseenCounts, fitted, policy, pooling):
    check_unseen(
        fitted,
        counts.labels,
        int(counts.rows.sum()),
        policy=policy,
        pooling=pooling,
        stacklevel=2,
    )
    return UnseenTable(counts.labels)


def _predict_partition(X, groups, model, table, what, extra, partition_info=None):
    values = model._predict_partition(
        X, groups, table, what, extra, partition_info["number"]
    )
    if what == "draws":
        columns = list(range(values.shape[1]))
    else:
        columns = list(what)
    return pd.DataFrame(values, index=X.index, columns=columns)


def lazy_predictions(model, X, groups, what, extra, *, fitted):
    """Lazy per-row outputs of a fitted model on a dask DataFrame.

    Parameters
    ----------
    model : MaskedHierarchicalRegressor
        A snapshot of the fitted estimator; it must provide
        ``_predict_partition(X, groups, table, what, extra, number)``
        returning an ndarray of shape (n_rows, n_columns).
    X : dask.dataframe.DataFrame
        Rows to predict.
    groups : dask.dataframe.Series or None
        Group labels, partitioned like ``X``.
    what : tuple of str or "draws"
        Names of the output columns, or ``"draws"`` for ``extra[0]``
        integer-named columns.
    extra : tuple
        Further arguments of ``_predict_partition`` (e.g. n_samples, seed).
    fitted : ndarray of shape (n_groups,)
        Labels seen in fit.

    Returns
    -------
    dask.dataframe.DataFrame
        One row per row of ``X``, with its index.
    """
    import dask

    dd = _dask_dataframe()
    n = X.npartitions
    counts = dd.map_partitions(
        _unseen_partition,
        X,
        groups,
        model.group_col,
        fitted,
        n,
        meta=pd.Series([], dtype=object),
        enforce_metadata=False,
    )
    table = dask.delayed(_unseen_table, pure=True)(
        _tree_reduce(counts, _merge_unseen),
        fitted,
        model.unseen_groups,
        model.pooling,
    )
    if what == "draws":
        columns = list(range(extra[0]))
    else:
        columns = list(what)
    meta = pd.DataFrame(
        {c: pd.Series([], dtype=np.float64) for c in columns},
        index=X._meta.index[:0],
        columns=columns,
    )
    shared = dask.delayed(model, pure=False)
    return dd.map_partitions(
        _predict_partition,
        X,
        groups,
        shared,
        table,
        what,
        extra,
        meta=meta,
        enforce_metadata=False,
    )
