"""Plots of a fitted :class:`~hiermask.MaskedHierarchicalRegressor`.

Every function draws on a matplotlib Axes (a new figure when ``ax`` is None)
and returns it. matplotlib is an optional dependency, imported only when a
function is called: ``pip install "hiermask[plot]"``.

- :func:`plot_mask`: which features apply to which group (heatmap).
- :func:`plot_shrinkage`: per-group estimates without pooling against the
  fitted (partially pooled) ones, with the population mean as a line.
- :func:`plot_forest`: group coefficients with central intervals.
- :func:`plot_group_effects`: each group's intercept against a slope (or two
  slopes), with the population mean and its covariance ellipse.
- :func:`plot_ppc`: histogram of the observed target against histograms of
  posterior-predictive draws.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

if TYPE_CHECKING:  # matplotlib is an optional extra
    import pandas as pd
    from matplotlib.axes import Axes

    from ._estimator import MaskedHierarchicalRegressor

from ._fitted import fitted_model

__all__ = [
    "plot_forest",
    "plot_group_effects",
    "plot_mask",
    "plot_ppc",
    "plot_shrinkage",
]

#: Install hint given when matplotlib is missing.
PLOT_HINT = 'hiermask.plotting needs matplotlib: pip install "hiermask[plot]"'

#: Colours: on/off cells of the mask, estimates, observed data.
_ON, _OFF = "#3b7dd8", "#e8e8e8"
_NONE_COLOR, _POOLED_COLOR, _POP_COLOR = "#d95f02", "#1b9e77", "#444444"

#: At most this many tick labels are written on a categorical axis.
_MAX_TICK_LABELS = 60

#: plot_forest shows every group up to this many groups; above, by default,
#: the FOREST_EXTREMES groups of each block farthest from its median.
MAX_FOREST_GROUPS = 60
FOREST_EXTREMES = 30

#: plot_shrinkage(clip=True) keeps the axis within this many interquartile
#: ranges of the quartiles of the estimates; values beyond sit on its edge.
CLIP_IQR = 3.0


def _axes(ax, figsize=None):
    """Return ``ax``, or the Axes of a new figure, importing matplotlib lazily."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError(PLOT_HINT) from exc
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    # Constrained layout keeps long tick labels inside a plain savefig.
    _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def _labels(values):
    return [str(v) for v in values]


def _set_categorical_ticks(ax, axis, labels):
    n = len(labels)
    step = max(1, int(np.ceil(n / _MAX_TICK_LABELS)))
    positions = np.arange(0, n, step)
    if axis == "x":
        ax.set_xticks(positions)
        ax.set_xticklabels([labels[i] for i in positions], rotation=30, ha="right")
    else:
        ax.set_yticks(positions)
        ax.set_yticklabels([labels[i] for i in positions])


# --------------------------------------------------------------------- mask
def plot_mask(est: MaskedHierarchicalRegressor, ax: Axes | None = None) -> Axes:
    """Heatmap of which features apply to which group.

    Parameters
    ----------
    est : MaskedHierarchicalRegressor
        A fitted estimator.
    ax : matplotlib.axes.Axes, default=None
        Axes to draw on; None creates a new figure.

    Returns
    -------
    matplotlib.axes.Axes
        Groups on the rows, features on the columns; a filled cell means the
        feature has a coefficient for the group (``est.mask_`` is True), a
        grey cell that it is off (all NaN in the group's rows at fit).

    Examples
    --------
    >>> from matplotlib.figure import Figure
    >>> from hiermask import MaskedHierarchicalRegressor, plotting
    >>> from hiermask.datasets import make_manufacturing
    >>> X, y = make_manufacturing(60, random_state=0)
    >>> est = MaskedHierarchicalRegressor(
    ...     group_col="Product_Group", num_warmup=100, num_samples=100,
    ...     num_chains=2, on_bad_convergence="ignore", random_state=0,
    ... ).fit(X, y)
    >>> ax = plotting.plot_mask(est, ax=Figure().subplots())
    >>> ax.get_title()
    'Feature mask (1 of 6 group x feature pairs off)'
    """
    model = fitted_model(est)
    mask = model.mask
    n_groups, n_features = mask.shape
    ax = _axes(
        ax,
        figsize=(
            min(4.5 + 1.0 * max(n_features, 1), 12.0),
            min(1.8 + 0.3 * n_groups, 12.0),
        ),
    )
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    if n_features == 0:
        return _no_features(ax, n_groups)
    ax.imshow(
        mask.astype(float),
        cmap=ListedColormap([_OFF, _ON]),
        vmin=0,
        vmax=1,
        aspect="auto",
        interpolation="nearest",
    )
    groups, features = _labels(model.groups), _labels(model.feature_names)
    if model.pooling != "complete":
        # say what varying chose: features with a population slope only
        features = [
            f if v else f"{f} (population slope)"
            for f, v in zip(features, model.varying, strict=True)
        ]
    _set_categorical_ticks(ax, "x", features)
    _set_categorical_ticks(ax, "y", groups)
    if n_groups <= 30 and n_groups * n_features <= 400:  # cells tall enough
        _label_cells(ax, mask)
    ax.set_xlabel("feature")
    ax.set_ylabel("group")
    n_off = int((~mask).sum())
    ax.set_title(
        f"Feature mask ({n_off} of {mask.size} group x feature pairs off)",
        fontsize=10,
    )
    ax.legend(
        handles=[
            Patch(color=_ON, label="applies"),
            Patch(color=_OFF, label="off (all NaN)"),
        ],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        frameon=False,
    )
    return ax


def _label_cells(ax, mask):
    """Write "on" / "off" in each cell of the mask and rule lines between."""
    n_groups, n_features = mask.shape
    for g, j in np.ndindex(n_groups, n_features):
        ax.text(
            j,
            g,
            "on" if mask[g, j] else "off",
            ha="center",
            va="center",
            fontsize=9,
            color="white" if mask[g, j] else "#555555",
        )
    ax.set_xticks(np.arange(-0.5, n_features), minor=True)
    ax.set_yticks(np.arange(-0.5, n_groups), minor=True)
    ax.grid(which="minor", color="white", linewidth=2)
    ax.tick_params(which="minor", length=0)


def _no_features(ax, n_groups):
    """The mask plot of an intercept-only model: a note instead of cells."""
    ax.text(
        0.5,
        0.5,
        "no features: an intercept-only model",
        ha="center",
        va="center",
        transform=ax.transAxes,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"Feature mask ({n_groups} groups, no features)")
    return ax


# ---------------------------------------------------------------- shrinkage
def _parameter_index(model, parameter):
    """Resolve ``parameter`` to None (intercept) or a feature position."""
    names = list(model.feature_names)
    if parameter is None:
        active = np.flatnonzero(model.mask.any(axis=0))
        return None if active.size == 0 else int(active[0])
    if parameter == "intercept":
        return None
    if parameter in names:
        return names.index(parameter)
    raise ValueError(
        f"Unknown parameter {parameter!r}; expected 'intercept' or one of the "
        f"features {names}."
    )


def no_pooling_estimates(
    est: MaskedHierarchicalRegressor,
    X: ArrayLike | pd.DataFrame,
    y: ArrayLike,
    groups: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group least-squares estimates, each group fitted on its own.

    For each group seen in fit, ordinary least squares of ``y`` on an
    intercept and the features that apply to the group, on its rows without
    NaN in those features; for a model without features, the group mean of
    ``y``. Rows of groups not seen in fit are ignored.

    Parameters
    ----------
    est : MaskedHierarchicalRegressor
        A fitted estimator (its groups, mask and group column are used).
    X : {array-like, DataFrame} of shape (n_samples, n_features_in)
        Rows laid out as in fit.
    y : array-like of shape (n_samples,)
        Target.
    groups : array-like of shape (n_samples,), default=None
        Group labels, when they are not a column of ``X``.

    Returns
    -------
    intercept : ndarray of shape (n_groups,)
        NaN where a group has too few complete rows.
    coef : ndarray of shape (n_groups, n_features)
        NaN where masked or where a group has too few complete rows.
    n_rows : ndarray of shape (n_groups,)
        Complete rows used per group.

    Examples
    --------
    >>> from matplotlib.figure import Figure
    >>> from hiermask import MaskedHierarchicalRegressor, plotting
    >>> from hiermask.datasets import make_manufacturing
    >>> X, y = make_manufacturing(60, random_state=0)
    >>> est = MaskedHierarchicalRegressor(
    ...     group_col="Product_Group", num_warmup=100, num_samples=100,
    ...     num_chains=2, on_bad_convergence="ignore", random_state=0,
    ... ).fit(X, y)
    >>> import numpy as np
    >>> intercept, coef, n_rows = plotting.no_pooling_estimates(est, X, y)
    >>> coef.shape, bool(np.isnan(coef[0, 2]))  # masked: NaN
    ((2, 3), True)
    """
    from ._validation import lookup_groups, split_groups

    model = fitted_model(est)
    parsed = split_groups(X, est.group_col, groups)
    features = parsed.features
    n = features.shape[0]
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"X has {n} rows but y has {y.shape[0]}.")
    group_idx = lookup_groups(model.groups, parsed.labels, n)
    mask = model.mask
    n_groups, p = mask.shape
    intercept = np.full(n_groups, np.nan)
    coef = np.full((n_groups, p), np.nan)
    n_rows = np.zeros(n_groups, dtype=np.int64)
    for g in range(n_groups):
        on = np.flatnonzero(mask[g])
        rows = group_idx == g
        Xg = features[rows][:, on]
        yg = y[rows]
        keep = ~np.isnan(Xg).any(axis=1) & np.isfinite(yg)
        Xg, yg = Xg[keep], yg[keep]
        n_rows[g] = yg.shape[0]
        if yg.shape[0] < on.size + 1:
            continue
        design = np.column_stack([np.ones(yg.shape[0]), Xg])
        sol, _, rank, _ = np.linalg.lstsq(design, yg, rcond=None)
        if rank < design.shape[1]:
            continue
        intercept[g] = sol[0]
        coef[g, on] = sol[1:]
    return intercept, coef, n_rows


def _spread(positions, gap):
    """Label positions near ``positions`` at least ``gap`` apart (same order)."""
    positions = np.asarray(positions, dtype=float)
    order = np.argsort(positions, kind="stable")
    placed = positions[order].copy()
    for i in range(1, placed.size):
        placed[i] = max(placed[i], placed[i - 1] + gap)
    placed -= placed.mean() - positions.mean()
    out = np.empty_like(placed)
    out[order] = placed
    return out


def _shrinkage_values(est, model, X, y, groups, parameter):
    """Name, no-pooling and fitted values, population value, the groups
    where the parameter applies, and rows per group."""
    j = _parameter_index(model, parameter)
    raw_intercept, raw_coef, n_rows = no_pooling_estimates(est, X, y, groups)
    if j is None:
        name = "group mean" if len(model.feature_names) == 0 else "intercept"
        raw, fitted = raw_intercept, np.asarray(est.intercept_, dtype=float)
        population = getattr(est, "population_intercept_", None)
        applies = np.ones(len(raw), dtype=bool)
    else:
        name = str(model.feature_names[j])
        raw, fitted = raw_coef[:, j], np.asarray(est.coef_, dtype=float)[:, j]
        pop = getattr(est, "population_coef_", None)
        population = None if pop is None else float(np.asarray(pop)[j])
        applies = model.mask[:, j]
    return name, raw, fitted, population, np.flatnonzero(applies), n_rows


def _clip_limits(raw, values):
    """Axis limits CLIP_IQR interquartile ranges beyond the quartiles of the
    no-pooling estimates ``raw``, or None when all ``values`` lie within."""
    q1, q3 = np.quantile(raw, [0.25, 0.75])
    spread = CLIP_IQR * (q3 - q1)
    lo, hi = q1 - spread, q3 + spread
    if spread <= 0 or (values.min() >= lo and values.max() <= hi):
        return None
    return lo, hi


def _mark_clipped(ax, columns, limits):
    """Triangles on the edge for values beyond the axis; returns their
    number. ``columns``: ``(x, values, colour)`` per column of points."""
    lo, hi = limits
    margin = 0.04 * (hi - lo)
    ax.set_ylim(lo - margin, hi + margin)
    count = 0
    for x, values, color in columns:
        for v in values[(values < lo) | (values > hi)]:
            edge, marker = (hi + margin, "^") if v > hi else (lo - margin, "v")
            ax.scatter(
                [x], [edge], marker=marker, color=color, s=60, zorder=3,
                clip_on=False,
            )  # fmt: skip
            count += 1
    return count


def _label_groups(ax, model, shown, fitted, placed_span, n_rows):
    labels = _labels(model.groups)
    placed = _spread(fitted[shown], 0.055 * placed_span)
    for g, y_text in zip(shown, placed, strict=True):
        ax.annotate(
            f"{labels[g]} (n={n_rows[g]})",
            (1, fitted[g]),
            xytext=(1.1, y_text),
            textcoords="data",
            va="center",
            fontsize=8,
            arrowprops={"arrowstyle": "-", "color": "#bbbbbb", "lw": 0.6},
        )


def plot_shrinkage(
    est: MaskedHierarchicalRegressor,
    X: ArrayLike | pd.DataFrame,
    y: ArrayLike,
    groups: ArrayLike | None = None,
    ax: Axes | None = None,
    *,
    parameter: str | None = None,
    clip: bool = True,
) -> Axes:
    """No-pooling against fitted estimates per group, with the population mean.

    Each group is a line from its no-pooling estimate (least squares on its
    own rows, or its mean of ``y`` for a model without features) on the left
    to the estimator's posterior mean on the right; the dashed line is the
    posterior mean of the population parameter. Under partial pooling the
    lines lean towards it, the more so the less data a group has.

    Parameters
    ----------
    est : MaskedHierarchicalRegressor
        A fitted estimator.
    X : {array-like, DataFrame} of shape (n_samples, n_features_in)
        The training rows (laid out as in fit).
    y : array-like of shape (n_samples,)
        The training target.
    groups : array-like of shape (n_samples,), default=None
        Group labels, when they are not a column of ``X``.
    ax : matplotlib.axes.Axes, default=None
        Axes to draw on; None creates a new figure.
    parameter : str, default=None
        ``"intercept"`` or a feature name. None: the intercept for a model
        without features, else the first feature that applies to a group.
    clip : bool, default=True
        Keep the axis within 3 interquartile ranges of the quartiles of the
        estimates, so that one outlying group (a slope fitted on two rows)
        does not squash the others; values beyond are drawn as triangles on
        the edge, with a note. False: an axis that holds every value.

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> from matplotlib.figure import Figure
    >>> from hiermask import MaskedHierarchicalRegressor, plotting
    >>> from hiermask.datasets import make_manufacturing
    >>> X, y = make_manufacturing(60, random_state=0)
    >>> est = MaskedHierarchicalRegressor(
    ...     group_col="Product_Group", num_warmup=100, num_samples=100,
    ...     num_chains=2, on_bad_convergence="ignore", random_state=0,
    ... ).fit(X, y)
    >>> ax = plotting.plot_shrinkage(est, X, y, ax=Figure().subplots())
    >>> ax.get_title()
    'Shrinkage of the Feed_Speed coefficients'
    """
    model = fitted_model(est)
    name, raw, fitted, population, shown, n_rows = _shrinkage_values(
        est, model, X, y, groups, parameter
    )
    ax = _axes(ax, figsize=(6.5, 5.0))
    sizes = n_rows[shown].astype(float)
    scale = 120.0 / max(sizes.max(), 1.0) if sizes.size else 1.0
    for g in shown:
        area = 20 + scale * n_rows[g]
        if np.isfinite(raw[g]):
            ax.plot([0, 1], [raw[g], fitted[g]], color="#999999", lw=1, zorder=1)
            ax.scatter([0], [raw[g]], s=area, color=_NONE_COLOR, zorder=2)
        ax.scatter([1], [fitted[g]], s=area, color=_POOLED_COLOR, zorder=2)
    finite_raw = raw[shown][np.isfinite(raw[shown])]
    values = np.concatenate([finite_raw, fitted[shown]])
    limits = _clip_limits(finite_raw, values) if clip and finite_raw.size else None
    clipped = 0
    if limits is not None:
        columns = [(0, finite_raw, _NONE_COLOR), (1, fitted[shown], _POOLED_COLOR)]
        clipped = _mark_clipped(ax, columns, limits)
        values = np.clip(values, *limits)
    if population is not None:
        values = np.append(values, population)
    if 0 < shown.size <= 15:
        span = float(np.ptp(values)) or max(abs(float(values[0])), 1.0)
        _label_groups(ax, model, shown, fitted, span, n_rows)
    if population is not None:
        ax.plot(
            [-0.35, 1.04], [population, population], color=_POP_COLOR, ls="--",
            lw=1.2, label=f"population mean ({population:.3g})", zorder=0,
        )  # fmt: skip
        ax.legend(
            loc="upper center", bbox_to_anchor=(0.5, -0.19), frameon=False, fontsize=8
        )
    _shrinkage_axes(ax, model, name, shown, clipped)
    return ax


def _shrinkage_axes(ax, model, name, shown, clipped):
    ax.set_xticks([0, 1])
    ax.set_xticklabels(
        ["no pooling\n(each group alone)", f"{model.pooling} pooling\n(hiermask)"]
    )
    ax.set_xlim(-0.35, 2.0 if shown.size <= 15 else 1.35)
    if name in ("group mean", "intercept"):
        ax.set_ylabel(name)
        ax.set_title(f"Shrinkage of the group {name.removeprefix('group ')}s")
    else:
        ax.set_ylabel(f"coefficient of {name}")
        ax.set_title(f"Shrinkage of the {name} coefficients")
    note = "marker area ~ rows in the group"
    if clipped:
        note += (
            f"\n{clipped} estimate(s) beyond the axis (triangles); clip=False shows all"
        )
    ax.set_xlabel(note, fontsize=8, color="#666666")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


# ------------------------------------------------------------------- forest
def _chosen_groups(model, groups):
    """Codes of the groups named in ``groups`` (None: all), in their order."""
    if groups is None:
        return None
    labels = list(model.groups)
    lookup = {label: g for g, label in enumerate(labels)}
    lookup.update({str(label): g for g, label in enumerate(labels)})
    unknown = [g for g in groups if g not in lookup]
    if unknown:
        raise ValueError(
            f"groups= names {len(unknown)} group(s) not seen in fit: "
            f"{', '.join(map(repr, unknown[:5]))}."
        )
    return [lookup[g] for g in groups]


def _extremes(means, members):
    """The FOREST_EXTREMES members whose posterior means lie farthest from
    the members' median, ordered by mean."""
    means = means[members]
    far = np.argsort(-np.abs(means - np.median(means)), kind="stable")
    keep = np.sort(far[:FOREST_EXTREMES])
    return members[keep[np.argsort(means[keep], kind="stable")]]


def _intervals(values, tail):
    # posterior mean and central interval of each column of draws
    lo, hi = np.quantile(values, [tail, 1.0 - tail], axis=0)
    return values.mean(axis=0), lo, hi


def _group_intervals(model, j, tail):
    """Each group's posterior mean and central interval of the intercept
    (``j`` None) or of feature ``j``: from the draws, or, when fit did not
    keep them (``keep_group_draws``), from the exact moments (a normal
    interval), making no draw."""
    if model.kept_group_draws:
        draws = model.draws
        values = draws["intercept"] if j is None else draws["coef"][..., j]
        return _intervals(values, tail)
    groups = np.arange(len(model.groups))
    mean, _, lo, hi = model.moment_intervals(groups, 0 if j is None else j + 1, tail)
    return mean, lo, hi


def _forest_rows(model, blocks, chosen, tail):
    """Rows ``(label, (mean, lo, hi), kind)``, rows per block and a note on
    what was left out."""
    names, groups = list(model.feature_names), _labels(model.groups)
    mask, draws = model.mask, model.draws
    rows, sizes, notes = [], [], []
    for j in blocks:
        if j is None:
            title, member = "intercept", np.ones(len(groups), dtype=bool)
            pop = draws.get("population_intercept")
        else:
            title, member = names[j], mask[:, j]
            pop = draws.get("population_coef")
            pop = None if pop is None else pop[:, j]
        mean, lo, hi = _group_intervals(model, j, tail)
        members = np.flatnonzero(member)
        if chosen is not None:
            members = np.array([g for g in chosen if member[g]], dtype=int)
        elif len(groups) > MAX_FOREST_GROUPS:
            notes.append(title)
            members = _extremes(mean, members)
        prefix = f"{title}: " if len(blocks) > 1 else ""
        if pop is not None:
            pop_row = (f"{prefix}population mean", _intervals(pop, tail), "population")
            rows.append(pop_row)
        rows += [
            (f"{prefix}{groups[g]}", (mean[g], lo[g], hi[g]), "group") for g in members
        ]
        sizes.append(members.size + (pop is not None))
    note = None
    if notes:
        note = (
            f"{len(groups)} groups: the {FOREST_EXTREMES} farthest from the median "
            "shown per block;\ngroups=[...] selects others"
        )
    return rows, sizes, note


def plot_forest(
    est: MaskedHierarchicalRegressor,
    feature: str | None = None,
    coverage: float = 0.9,
    ax: Axes | None = None,
    *,
    groups: list | None = None,
) -> Axes:
    """Group coefficients with central posterior intervals.

    Parameters
    ----------
    est : MaskedHierarchicalRegressor
        A fitted estimator.
    feature : str, default=None
        A feature name or ``"intercept"``: one row per group (groups where
        the feature is off are left out). None: every feature that applies to
        some group, in blocks (the intercept when the model has no features).
    coverage : float in (0, 1), default=0.9
        Mass of the central interval drawn around each posterior mean.
    ax : matplotlib.axes.Axes, default=None
        Axes to draw on; None creates a new figure.
    groups : list of labels, default=None
        The groups to show, in this order. None: every group up to 60
        groups; above that, the 30 groups of each block whose posterior means
        lie farthest from the block's median, ordered by mean, with a note.

    Returns
    -------
    matplotlib.axes.Axes
        One row per coefficient: the posterior mean (dot) and the interval
        (line); where the pooling has a population, a diamond row for the
        population mean of each block.

    Examples
    --------
    >>> from matplotlib.figure import Figure
    >>> from hiermask import MaskedHierarchicalRegressor, plotting
    >>> from hiermask.datasets import make_manufacturing
    >>> X, y = make_manufacturing(60, random_state=0)
    >>> est = MaskedHierarchicalRegressor(
    ...     group_col="Product_Group", num_warmup=100, num_samples=100,
    ...     num_chains=2, on_bad_convergence="ignore", random_state=0,
    ... ).fit(X, y)
    >>> ax = plotting.plot_forest(
    ...     est, feature="Feed_Speed", coverage=0.9, ax=Figure().subplots()
    ... )
    >>> ax.get_title()
    'Posterior means and 90% intervals'
    """
    from ._summary import interval_labels

    model = fitted_model(est)
    interval_labels(coverage)  # validates coverage
    tail = (1.0 - float(coverage)) / 2.0
    if feature is None:
        blocks = [int(j) for j in np.flatnonzero(model.mask.any(axis=0))] or [None]
    else:
        blocks = [_parameter_index(model, feature)]
    chosen = _chosen_groups(model, groups)
    rows, sizes, note = _forest_rows(model, blocks, chosen, tail)
    n = len(rows)
    ax = _axes(ax, figsize=(6.5, min(1.5 + 0.3 * n, 20.0)))
    y_pos = np.arange(n)[::-1]
    for (_, (mean, lo, hi), kind), yp in zip(rows, y_pos, strict=True):
        color = _POP_COLOR if kind == "population" else _POOLED_COLOR
        ax.plot([lo, hi], [yp, yp], color=color, lw=2, solid_capstyle="butt")
        marker = "D" if kind == "population" else "o"
        ax.plot([float(mean)], [yp], marker=marker, color=color, ms=5)
    ax.set_ylim(-0.7, n - 0.3)
    step = max(1, int(np.ceil(n / _MAX_TICK_LABELS)))
    ax.set_yticks(y_pos[::step])
    ax.set_yticklabels([r[0] for r in rows][::step], fontsize=8 if n > 30 else None)
    _forest_decorations(ax, model, blocks, sizes, n)
    title = f"Posterior means and {coverage:.0%} intervals"
    ax.set_title(title if note is None else f"{title}\n{note}", fontsize=10)
    return ax


def _forest_decorations(ax, model, blocks, sizes, n):
    """Zero line, axis label, block separators, grid."""
    # A reference line at 0 only where it does not stretch the axis.
    x_lo, x_hi = ax.get_xlim()
    if x_lo - 0.1 * (x_hi - x_lo) <= 0.0 <= x_hi + 0.1 * (x_hi - x_lo):
        ax.axvline(0.0, color="#bbbbbb", lw=0.8, zorder=0)
    if len(blocks) == 1:
        j = blocks[0]
        label = "intercept" if j is None else f"coefficient of {model.feature_names[j]}"
        ax.set_xlabel(label)
    else:
        ax.set_xlabel("coefficient")
        for e in n - np.cumsum(sizes)[:-1] - 0.5:  # separate the feature blocks
            ax.axhline(e, color="#dddddd", lw=0.8)
    ax.grid(axis="x", color="#eeeeee", lw=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


# ---------------------------------------------------------------------- ppc
def plot_ppc(
    est: MaskedHierarchicalRegressor,
    X: ArrayLike | pd.DataFrame,
    y: ArrayLike,
    groups: ArrayLike | None = None,
    n_samples: int = 50,
    ax: Axes | None = None,
    *,
    random_state: int | np.random.RandomState | None = None,
) -> Axes:
    """Histogram of the observed target against posterior-predictive draws.

    Parameters
    ----------
    est : MaskedHierarchicalRegressor
        A fitted estimator.
    X : {array-like, DataFrame} of shape (n_samples, n_features_in)
        Rows (usually the training rows).
    y : array-like of shape (n_samples,)
        Observed target of those rows.
    groups : array-like of shape (n_samples,), default=None
        Group labels, when they are not a column of ``X``.
    n_samples : int, default=50
        Number of replicated data sets drawn with ``est.sample_y``.
    ax : matplotlib.axes.Axes, default=None
        Axes to draw on; None creates a new figure.
    random_state : int, RandomState instance or None, default=None
        Seed of the draws; None uses the estimator's.

    Returns
    -------
    matplotlib.axes.Axes
        Black: the density histogram of the observed ``y``; green: the median
        and the band between the 5% and 95% quantiles, bin by bin, of the
        density histograms of the replicated data sets, on the same bins.

    Examples
    --------
    >>> from matplotlib.figure import Figure
    >>> from hiermask import MaskedHierarchicalRegressor, plotting
    >>> from hiermask.datasets import make_manufacturing
    >>> X, y = make_manufacturing(60, random_state=0)
    >>> est = MaskedHierarchicalRegressor(
    ...     group_col="Product_Group", num_warmup=100, num_samples=100,
    ...     num_chains=2, on_bad_convergence="ignore", random_state=0,
    ... ).fit(X, y)
    >>> ax = plotting.plot_ppc(est, X, y, n_samples=20, ax=Figure().subplots())
    >>> ax.get_xlabel()
    'y'
    """
    fitted_model(est)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    reps = est.sample_y(
        X, groups=groups, n_samples=n_samples, random_state=random_state
    )
    if reps.shape[0] != y.shape[0]:
        raise ValueError(f"X has {reps.shape[0]} rows but y has {y.shape[0]}.")
    ax = _axes(ax, figsize=(6.5, 4.5))
    finite = y[np.isfinite(y)]
    lo = min(np.min(finite), np.quantile(reps, 0.005))
    hi = max(np.max(finite), np.quantile(reps, 0.995))
    n_bins = int(np.clip(np.sqrt(finite.size) * 1.5, 10, 60))
    bins = np.linspace(lo, hi, n_bins + 1)
    dens = np.stack(
        [
            np.histogram(reps[:, k], bins=bins, density=True)[0]
            for k in range(reps.shape[1])
        ]
    )
    band_lo, band_mid, band_hi = np.quantile(dens, [0.05, 0.5, 0.95], axis=0)
    ax.fill_between(
        bins,
        np.append(band_lo, band_lo[-1]),
        np.append(band_hi, band_hi[-1]),
        step="post",
        color=_POOLED_COLOR,
        alpha=0.3,
        lw=0,
        label=f"posterior predictive, 90% of {reps.shape[1]} draws",
    )
    ax.stairs(
        band_mid,
        bins,
        color=_POOLED_COLOR,
        lw=1.2,
        label="posterior predictive, median",
    )
    observed, _ = np.histogram(finite, bins=bins, density=True)
    ax.stairs(observed, bins, color="black", lw=2, label="observed")
    ax.set_xlabel("y")
    ax.set_ylabel("density")
    ax.set_title(f"Posterior predictive check ({reps.shape[1]} replicated data sets)")
    ax.legend(loc="best", frameon=False)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return ax


# ------------------------------------------------------------ group effects
def _effect_position(model, name):
    if name == "intercept":
        return 0
    names = _labels(model.feature_names)
    if str(name) not in names:
        raise ValueError(
            f"{name!r} is neither 'intercept' nor a feature; the features are {names}."
        )
    j = names.index(str(name))
    if not model.varying[j]:
        raise ValueError(
            f"{name!r} has no group-specific slope (varying_ is False): every "
            "group has the population slope."
        )
    return j + 1


def _correlation(model, i, j):
    # posterior-mean correlation of effects i and j (positions in [intercept,
    # features]), from group_correlation (over [intercept, varying features])
    at = np.cumsum(np.concatenate([[True], model.varying])) - 1
    return float(np.mean(model.draws["group_correlation"][:, at[i], at[j]]))


def plot_group_effects(
    est: MaskedHierarchicalRegressor,
    x: str = "intercept",
    y: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Each group's posterior-mean effects, with the population's ellipse.

    Parameters
    ----------
    est : MaskedHierarchicalRegressor
        Fitted with ``pooling="partial"``.
    x : str, default="intercept"
        ``"intercept"`` or a feature with a group-specific slope.
    y : str, default=None
        A feature with a group-specific slope (or ``"intercept"``); None:
        the first such feature.
    ax : matplotlib.axes.Axes, default=None
        Axes to draw on; None creates a new figure.

    Returns
    -------
    matplotlib.axes.Axes
        One point per group where both effects apply (posterior means of
        its intercept, the value at x = 0, and slopes), the population mean
        (a cross) and the ellipses that hold 50% and 90% of a new group's
        effects: the normal that ``predict`` uses for a group not seen in
        fit (the covariance of the population mean's draws plus the
        posterior-mean between-group covariance ``diag(tau) Omega
        diag(tau)``). Under ``group_covariance="full"`` the title gives the
        posterior-mean correlation of the two effects (as in
        ``group_correlation_``).

    Raises
    ------
    ValueError
        If the pooling is not ``"partial"``, or ``x`` or ``y`` is not the
        intercept or a feature with a group-specific slope.

    Examples
    --------
    >>> import numpy as np
    >>> from matplotlib.figure import Figure
    >>> from hiermask import MaskedHierarchicalRegressor, plotting
    >>> rng = np.random.default_rng(0)
    >>> g = np.repeat(np.arange(8), 10)
    >>> X = rng.normal(size=(80, 1))
    >>> y = rng.normal(size=8)[g] + X[:, 0] * (1 + rng.normal(size=8)[g])
    >>> est = MaskedHierarchicalRegressor(
    ...     num_warmup=100, num_samples=100, num_chains=2,
    ...     on_bad_convergence="ignore", random_state=0,
    ... ).fit(X, y, groups=g)
    >>> ax = plotting.plot_group_effects(est, y="x0", ax=Figure().subplots())
    >>> ax.get_xlabel(), ax.get_ylabel()
    ('intercept', 'slope of x0')
    """
    model = fitted_model(est)
    if model.pooling != "partial":
        raise ValueError(
            f"plot_group_effects needs pooling='partial' (a population of group "
            f"effects); this model has pooling={model.pooling!r}."
        )
    if y is None:
        varying = model.effects[1:]
        if not varying:
            raise ValueError(
                "No feature has a group-specific slope (varying_ is False "
                "everywhere): there is only the intercept to show."
            )
        y = varying[0]
    i, j = _effect_position(model, x), _effect_position(model, y)
    if i == j:
        raise ValueError(f"x and y are both {x!r}; give two different effects.")
    ax = _axes(ax, figsize=(5.5, 4.5))
    from matplotlib.patches import Ellipse
    from scipy.stats import chi2

    both = np.concatenate([[True], model.mask.any(axis=0)])
    on = np.column_stack([np.ones(len(model.groups), bool), model.mask])
    shown = on[:, i] & on[:, j] & both[i] & both[j]
    coef = model.posterior.coef_mean
    ax.scatter(
        coef[shown, i], coef[shown, j], s=18, color=_POOLED_COLOR, label="groups"
    )
    mean, cov = model.posterior.unseen_mean, model.posterior.unseen_cov
    block = cov[np.ix_([i, j], [i, j])]
    values, vectors = np.linalg.eigh(block)
    angle = np.degrees(np.arctan2(vectors[1, 1], vectors[0, 1]))
    for mass, style in ((0.5, "-"), (0.9, "--")):
        radius = np.sqrt(chi2.ppf(mass, 2))
        ax.add_patch(
            Ellipse(
                (mean[i], mean[j]),
                2 * radius * np.sqrt(max(values[1], 0.0)),
                2 * radius * np.sqrt(max(values[0], 0.0)),
                angle=angle,
                fill=False,
                linestyle=style,
                color=_POP_COLOR,
                label=f"{mass:.0%} of new groups",
            )
        )
    ax.plot(mean[i], mean[j], "x", color=_POP_COLOR, ms=10, mew=2, label="population")
    ax.autoscale_view()

    def label(k, name):
        return "intercept" if k == 0 else f"slope of {name}"

    ax.set_xlabel(label(i, x))
    ax.set_ylabel(label(j, y))
    title = "Group effects"
    if "group_correlation" in model.draws:
        title += f" (population correlation {_correlation(model, i, j):.2f})"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="best", fontsize=8, framealpha=0.8)
    return ax
