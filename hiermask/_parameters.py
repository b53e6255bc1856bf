"""The reported parameters of a fit, enumerated once.

Fit diagnoses them, ``summary()`` reports them and the convergence gate
names the worst of them; all three go through :func:`parameter_blocks`, so
which parameters exist (a coefficient only where the mask switches it on, a
between-group sd only for a varying feature, each correlation once) and how
they are keyed is written in one place.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Block", "parameter_blocks", "row_name"]


class Block(NamedTuple):
    """One parameter's reported entries.

    Attributes
    ----------
    parameter : str
        Name of the draws in ``posterior_``.
    axes : tuple of str
        What each index array positions: ``"group"``, ``"feature"`` or
        ``"effect"`` (the intercept and the varying features, in the order
        of the correlation matrix); empty for a scalar.
    index : tuple of ndarray
        One position array per axis, one entry per reported row.
    draws : ndarray of shape (n_draws, n_rows)
        The rows' draws.
    """

    parameter: str
    axes: tuple
    index: tuple
    draws: np.ndarray

    @property
    def keys(self):
        """Positional names, ``"coef[3, 2]"``: the keys of fit's diagnostics."""
        if not self.axes:
            return [self.parameter]
        return [
            f"{self.parameter}[{', '.join(str(int(i)) for i in at)}]"
            for at in zip(*self.index, strict=True)
        ]


def _scalar(draws, name):
    return Block(name, (), (), np.asarray(draws[name])[:, None])


def _features(draws, name, features):
    return Block(name, ("feature",), (features,), draws[name][:, features])


def parameter_blocks(draws, mask, varying=None, group_level=True, group_draws=True):
    """Yield the blocks of the parameters that exist, in summary order.

    Parameters
    ----------
    draws : dict of ndarray
        ``posterior_``: draws with chains concatenated.
    mask : ndarray of shape (n_groups, n_features)
        True where a feature applies to a group.
    varying : ndarray of shape (n_features,) or None, default=None
        True for a feature with a group-specific slope; None: every feature.
    group_level : bool, default=True
        Whether to yield the group intercepts and coefficients.
    group_draws : bool, default=True
        Whether their blocks hold their draws; False: none (shape
        ``(0, n_rows)``), and ``draws`` is not asked for them.

    Yields
    ------
    Block
        The group intercepts and the switched-on coefficients (with
        ``group_level``), then the population-level parameters that the
        pooling has: the population intercept and slopes of features on in
        some group, the between-group sds (slopes: varying features only),
        the correlations below the diagonal, keyed ``[j, i]`` with j < i,
        and the noise sd.
    """
    mask = np.asarray(mask, dtype=bool)
    active = np.flatnonzero(mask.any(axis=0))
    if group_level:
        groups = np.arange(mask.shape[0])
        gs, js = np.nonzero(mask)
        if group_draws:
            intercept, coef = draws["intercept"], draws["coef"][:, gs, js]
        else:
            intercept, coef = np.empty((0, len(groups))), np.empty((0, len(gs)))
        yield Block("intercept", ("group",), (groups,), intercept)
        yield Block("coef", ("group", "feature"), (gs, js), coef)
    if "population_intercept" in draws:
        yield _scalar(draws, "population_intercept")
    if "population_coef" in draws:
        yield _features(draws, "population_coef", active)
    if "group_intercept_scale" in draws:
        yield _scalar(draws, "group_intercept_scale")
    if "group_coef_scale" in draws:
        vary = active if varying is None else active[np.asarray(varying)[active]]
        yield _features(draws, "group_coef_scale", vary)
    if "group_correlation" in draws:
        rows, cols = np.tril_indices(draws["group_correlation"].shape[-1], -1)
        yield Block(
            "group_correlation",
            ("effect", "effect"),
            (cols, rows),
            draws["group_correlation"][:, rows, cols],
        )
    yield _scalar(draws, "noise")


def row_name(parameter, group=None, feature=None):
    """A row's readable name: ``"coef[<group>, <feature>]"``, ``"noise"``.

    Parameters
    ----------
    parameter : str
    group, feature : object, default=None
        The row's group label and feature (or effect pair) label; None
        where it has none.

    Returns
    -------
    str
    """
    inside = ", ".join(str(v) for v in (group, feature) if v is not None)
    return f"{parameter}[{inside}]" if inside else parameter
