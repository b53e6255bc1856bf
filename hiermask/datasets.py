"""Simulators for grouped regression data with group-specific missing features.

Every simulator returns pandas objects and takes a ``random_state``: the same
seed always gives the same data. The simulators never import the estimator.
"""

__all__ = [
    "MANUFACTURING_FEATURES",
    "MANUFACTURING_GROUPS",
    "MANUFACTURING_TRUE_COEF",
    "MANUFACTURING_TRUE_INTERCEPT",
    "make_grouped_regression",
    "make_manufacturing",
    "make_missing_x",
    "make_schools",
]

import numbers

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

MANUFACTURING_GROUPS = ("Product_Group_1", "Product_Group_2")
"""tuple of str: The two group labels of :func:`make_manufacturing`."""

MANUFACTURING_FEATURES = ("Feed_Speed", "Pull_Acceleration", "Cutting_Wait_Time")
"""tuple of str: The three feature columns of :func:`make_manufacturing`."""

MANUFACTURING_TRUE_COEF = pd.DataFrame(
    [[2.5, 3.0, 0.0], [1.0, 0.5, 3.0]],
    index=pd.Index(MANUFACTURING_GROUPS, name="Product_Group"),
    columns=list(MANUFACTURING_FEATURES),
    dtype=np.float64,
)
"""pandas.DataFrame: True coefficients of :func:`make_manufacturing`.

Indexed by group label, one column per feature; ``0.0`` where the feature does
not apply to the group (``Cutting_Wait_Time`` for ``Product_Group_1``).
"""

MANUFACTURING_TRUE_INTERCEPT = dict.fromkeys(MANUFACTURING_GROUPS, 0.0)
"""dict of str to float: True intercepts of :func:`make_manufacturing` (all 0)."""

_SCHOOL_SIZES = (20, 15, 25, 18, 22, 16, 19, 21)


def _check_rng(random_state):
    """Turn ``random_state`` into a :class:`numpy.random.Generator`.

    Parameters
    ----------
    random_state : int, numpy.random.RandomState, numpy.random.Generator or None
        ``None`` draws fresh entropy from the operating system; an int seeds a
        new generator; a ``RandomState`` seeds a new generator from one of its
        draws (advancing it); a ``Generator`` is used as is.

    Returns
    -------
    numpy.random.Generator
    """
    if random_state is None:
        return np.random.default_rng()
    if isinstance(random_state, np.random.Generator):
        return random_state
    if isinstance(random_state, np.random.RandomState):
        return np.random.default_rng(random_state.randint(0, 2**31 - 1))
    if isinstance(random_state, numbers.Integral) and not isinstance(
        random_state, bool
    ):
        return np.random.default_rng(int(random_state))
    raise ValueError(
        "random_state must be None, an int, a numpy.random.RandomState or a "
        f"numpy.random.Generator; got {random_state!r}."
    )


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value!r}.")
    return int(value)


def _check_nonneg(name, value):
    value = float(value)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}.")
    return value


def _check_fraction(name, value):
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1]; got {value!r}.")
    return value


def make_manufacturing(
    n_samples: int = 500,
    *,
    noise: float = 0.5,
    random_state: int | np.random.RandomState | np.random.Generator | None = None,
) -> tuple[pd.DataFrame, pd.Series]:
    """Simulate the two-product-group manufacturing example.

    Production speed depends on feed speed and pull acceleration for both
    product groups, and also on cutting wait time for group 2. Cutting wait
    time does not apply to group 1 and is NaN in all of its rows. The first
    ``n_samples // 2`` rows belong to ``"Product_Group_1"``, the rest to
    ``"Product_Group_2"``. All intercepts are 0.

    ======================  =====================================
    group                   ``Production_Speed``
    ======================  =====================================
    ``Product_Group_1``     ``2.5 * feed + 3.0 * pull + e``
    ``Product_Group_2``     ``1.0 * feed + 0.5 * pull + 3.0 * cut + e``
    ======================  =====================================

    with ``feed ~ U(1, 10)``, ``pull ~ U(0.5, 5)``, ``cut ~ U(0.1, 2)`` and
    ``e ~ Normal(0, noise)``.

    Parameters
    ----------
    n_samples : int, default=500
        Number of rows; at least 2 so that both groups have rows.
    noise : float, default=0.5
        Standard deviation of the Gaussian noise on the target.
    random_state : int, numpy.random.RandomState, numpy.random.Generator or \
None, default=None
        Seed or generator; the same seed gives the same data.

    Returns
    -------
    X : pandas.DataFrame of shape (n_samples, 4)
        Columns ``Product_Group`` (string labels), ``Feed_Speed``,
        ``Pull_Acceleration`` and ``Cutting_Wait_Time`` (float64).
    y : pandas.Series of shape (n_samples,)
        The target, named ``Production_Speed``.

    See Also
    --------
    MANUFACTURING_TRUE_COEF : The true coefficients, 0.0 for the masked cell.
    MANUFACTURING_TRUE_INTERCEPT : The true intercepts.

    Examples
    --------
    >>> from hiermask.datasets import make_manufacturing
    >>> X, y = make_manufacturing(10, random_state=0)
    >>> X.shape, y.name
    ((10, 4), 'Production_Speed')
    >>> int(X.loc[X["Product_Group"] == "Product_Group_1", "Cutting_Wait_Time"].count())
    0
    """
    n_samples = _check_int("n_samples", n_samples, 2)
    noise = _check_nonneg("noise", noise)
    rng = _check_rng(random_state)

    feed = rng.uniform(1.0, 10.0, n_samples)
    pull = rng.uniform(0.5, 5.0, n_samples)
    cut = rng.uniform(0.1, 2.0, n_samples)
    eps = rng.normal(0.0, noise, n_samples)

    n_first = n_samples // 2
    group_idx = np.repeat([0, 1], [n_first, n_samples - n_first])
    coef = MANUFACTURING_TRUE_COEF.to_numpy()[group_idx]
    y = coef[:, 0] * feed + coef[:, 1] * pull + coef[:, 2] * cut + eps
    cut[group_idx == 0] = np.nan

    labels = np.asarray(MANUFACTURING_GROUPS, dtype=object)[group_idx]
    X = pd.DataFrame(
        {
            "Product_Group": labels,
            MANUFACTURING_FEATURES[0]: feed,
            MANUFACTURING_FEATURES[1]: pull,
            MANUFACTURING_FEATURES[2]: cut,
        }
    )
    return X, pd.Series(y, name="Production_Speed")


def make_schools(
    n_schools: int = 8,
    *,
    n_students: int | ArrayLike | None = None,
    mean: float = 75.0,
    between_sd: float = 8.0,
    within_sd: float = 12.0,
    random_state: int | np.random.RandomState | np.random.Generator | None = None,
    return_truth: bool = False,
) -> tuple:
    """Simulate test scores of students nested in schools.

    Each school k has a true mean ``m_k ~ Normal(mean, between_sd)``, and each
    of its students scores ``Normal(m_k, within_sd)``: the varying-intercept
    model of the classic schools example. Rows are ordered by school.

    Parameters
    ----------
    n_schools : int, default=8
        Number of schools.
    n_students : int, sequence of int or None, default=None
        Students per school. ``None``: ``[20, 15, 25, 18, 22, 16, 19, 21]``
        when ``n_schools == 8``, otherwise drawn uniformly from 3 to 60
        inclusive. An int gives every school that many students; a sequence
        must have length ``n_schools``. Every count must be at least 1.
    mean : float, default=75.0
        Population mean of the school means.
    between_sd : float, default=8.0
        Standard deviation of the school means around ``mean``.
    within_sd : float, default=12.0
        Standard deviation of the scores within a school.
    random_state : int, numpy.random.RandomState, numpy.random.Generator or \
None, default=None
        Seed or generator; the same seed gives the same data.
    return_truth : bool, default=False
        Also return the true school means.

    Returns
    -------
    X : pandas.DataFrame of shape (n_students_total, 1)
        One column ``school`` with labels ``"School_1"`` to ``"School_k"``.
    y : pandas.Series of shape (n_students_total,)
        The scores, named ``score``.
    school_means : pandas.Series of shape (n_schools,)
        Only when ``return_truth=True``: the true school means, indexed by
        school label.

    Examples
    --------
    >>> from hiermask.datasets import make_schools
    >>> X, y, truth = make_schools(random_state=0, return_truth=True)
    >>> len(X), list(truth.index[:2])
    (156, ['School_1', 'School_2'])
    """
    n_schools = _check_int("n_schools", n_schools, 1)
    mean = float(mean)
    between_sd = _check_nonneg("between_sd", between_sd)
    within_sd = _check_nonneg("within_sd", within_sd)
    rng = _check_rng(random_state)

    if n_students is None:
        if n_schools == len(_SCHOOL_SIZES):
            sizes = np.asarray(_SCHOOL_SIZES, dtype=np.int64)
        else:
            sizes = rng.integers(3, 61, size=n_schools)
    elif isinstance(n_students, numbers.Integral):
        sizes = np.full(n_schools, _check_int("n_students", n_students, 1))
    else:
        sizes = np.asarray(n_students)
        if sizes.shape != (n_schools,) or not np.issubdtype(sizes.dtype, np.integer):
            raise ValueError(
                "n_students must be None, an int or a sequence of n_schools="
                f"{n_schools} ints; got {n_students!r}."
            )
        if np.any(sizes < 1):
            raise ValueError(f"Every n_students must be >= 1; got {n_students!r}.")

    labels = np.array([f"School_{k + 1}" for k in range(n_schools)], dtype=object)
    school_means = rng.normal(mean, between_sd, n_schools)
    school_idx = np.repeat(np.arange(n_schools), sizes)
    scores = rng.normal(school_means[school_idx], within_sd)

    X = pd.DataFrame({"school": labels[school_idx]})
    y = pd.Series(scores, name="score")
    if not return_truth:
        return X, y
    truth = pd.Series(
        school_means, index=pd.Index(labels, name="school"), name="school_mean"
    )
    return X, y, truth


def make_missing_x(
    n_samples: int = 100,
    *,
    intercept: float = 2.0,
    slope: float = 3.0,
    noise: float = 1.0,
    missing_fraction: float = 0.3,
    random_state: int | np.random.RandomState | np.random.Generator | None = None,
) -> tuple[pd.DataFrame, pd.Series]:
    """Simulate a simple regression whose covariate is missing at random.

    ``x ~ Normal(0, 1)`` and ``y = intercept + slope * x + Normal(0, noise)``;
    then ``round(missing_fraction * n_samples)`` values of ``x``, chosen
    uniformly at random, are set to NaN (missing completely at random). ``y``
    is always observed.

    Parameters
    ----------
    n_samples : int, default=100
        Number of rows.
    intercept : float, default=2.0
        True intercept.
    slope : float, default=3.0
        True slope.
    noise : float, default=1.0
        Standard deviation of the Gaussian noise on ``y``.
    missing_fraction : float, default=0.3
        Fraction of ``x`` values set to NaN, in [0, 1].
    random_state : int, numpy.random.RandomState, numpy.random.Generator or \
None, default=None
        Seed or generator; the same seed gives the same data.

    Returns
    -------
    X : pandas.DataFrame of shape (n_samples, 1)
        One float64 column ``x``, with NaN where missing.
    y : pandas.Series of shape (n_samples,)
        The target, named ``y``.

    Examples
    --------
    >>> from hiermask.datasets import make_missing_x
    >>> X, y = make_missing_x(random_state=0)
    >>> int(X["x"].isna().sum()), int(y.isna().sum())
    (30, 0)
    """
    n_samples = _check_int("n_samples", n_samples, 1)
    noise = _check_nonneg("noise", noise)
    missing_fraction = _check_fraction("missing_fraction", missing_fraction)
    rng = _check_rng(random_state)

    x = rng.standard_normal(n_samples)
    y = float(intercept) + float(slope) * x + rng.normal(0.0, noise, n_samples)
    n_missing = round(missing_fraction * n_samples)
    x[rng.choice(n_samples, size=n_missing, replace=False)] = np.nan
    return pd.DataFrame({"x": x}), pd.Series(y, name="y")


def make_grouped_regression(
    n_samples: int = 1000,
    n_groups: int = 10,
    n_features: int = 3,
    *,
    pooling_sd: float = 0.5,
    noise: float = 1.0,
    mask_fraction: float = 0.0,
    random_state: int | np.random.RandomState | np.random.Generator | None = None,
    return_truth: bool = False,
) -> tuple:
    """Simulate a hierarchical linear regression with per-group feature masks.

    The population coefficients and intercept are drawn from ``Normal(0, 1)``;
    each group's coefficients and intercept are the population values plus
    independent ``Normal(0, pooling_sd)`` deviations. Each (group, feature)
    pair is switched off with probability ``mask_fraction``: its coefficient
    is 0 and the feature is NaN in all of that group's rows. A group never
    loses all of its features (one, chosen at random, is switched back on);
    a feature may be off in every group. Features are ``Normal(0, 1)`` and
    ``y = intercept[g] + x @ coef[g] + Normal(0, noise)``.

    Rows are assigned to groups in a random order with sizes as equal as
    possible (they differ by at most one). Everything is vectorized float64
    NumPy, so ten million rows take a few seconds.

    Parameters
    ----------
    n_samples : int, default=1000
        Number of rows; at least ``2 * n_groups``, so every group has at
        least 2 rows.
    n_groups : int, default=10
        Number of groups, labelled ``"g0"`` to ``"g{n_groups - 1}"``.
    n_features : int, default=3
        Number of features, named ``"x0"`` to ``"x{n_features - 1}"``.
    pooling_sd : float, default=0.5
        Standard deviation of the group deviations from the population
        coefficients and intercept.
    noise : float, default=1.0
        Standard deviation of the Gaussian noise on ``y``.
    mask_fraction : float, default=0.0
        Probability that a (group, feature) pair is switched off, in [0, 1].
    random_state : int, numpy.random.RandomState, numpy.random.Generator or \
None, default=None
        Seed or generator; the same seed gives the same data.
    return_truth : bool, default=False
        Also return the true parameters.

    Returns
    -------
    X : pandas.DataFrame of shape (n_samples, n_features + 1)
        Column ``group`` (categorical with categories ``"g0"`` ...) followed
        by the float64 feature columns.
    y : pandas.Series of shape (n_samples,)
        The target, named ``y``.
    truth : dict
        Only when ``return_truth=True``, with keys

        - ``"coef"``: DataFrame (groups x features), 0.0 where switched off;
        - ``"intercept"``: Series indexed by group;
        - ``"population_coef"``: Series indexed by feature;
        - ``"population_intercept"``: float;
        - ``"mask"``: bool DataFrame (groups x features), False where
          switched off.

    Examples
    --------
    >>> from hiermask.datasets import make_grouped_regression
    >>> X, y, truth = make_grouped_regression(
    ...     100, 4, 2, mask_fraction=0.3, random_state=0, return_truth=True
    ... )
    >>> list(X.columns), truth["coef"].shape
    (['group', 'x0', 'x1'], (4, 2))
    """
    n_groups = _check_int("n_groups", n_groups, 1)
    n_features = _check_int("n_features", n_features, 1)
    n_samples = _check_int("n_samples", n_samples, 2 * n_groups)
    pooling_sd = _check_nonneg("pooling_sd", pooling_sd)
    noise = _check_nonneg("noise", noise)
    mask_fraction = _check_fraction("mask_fraction", mask_fraction)
    rng = _check_rng(random_state)

    population_coef = rng.standard_normal(n_features)
    population_intercept = float(rng.standard_normal())
    coef = population_coef + rng.normal(0.0, pooling_sd, (n_groups, n_features))
    intercept = population_intercept + rng.normal(0.0, pooling_sd, n_groups)

    mask = rng.random((n_groups, n_features)) >= mask_fraction
    empty = np.flatnonzero(~mask.any(axis=1))
    mask[empty, rng.integers(0, n_features, size=empty.size)] = True
    coef[~mask] = 0.0

    base, extra = divmod(n_samples, n_groups)
    sizes = np.full(n_groups, base)
    sizes[:extra] += 1
    group_idx = rng.permutation(np.repeat(np.arange(n_groups, dtype=np.intp), sizes))

    # One contiguous row per feature, so that each DataFrame column is one
    # contiguous array and y is accumulated one feature at a time.
    features = rng.standard_normal((n_features, n_samples))
    y = rng.normal(0.0, noise, n_samples)
    y += intercept[group_idx]
    for j in range(n_features):
        y += coef[group_idx, j] * features[j]
        if not mask[:, j].all():
            features[j, ~mask[group_idx, j]] = np.nan

    group_labels = [f"g{k}" for k in range(n_groups)]
    feature_names = [f"x{j}" for j in range(n_features)]
    # ``features.T`` has the memory layout of a pandas float block: no copy.
    X = pd.DataFrame(features.T, columns=feature_names, copy=False)
    X.insert(0, "group", pd.Categorical.from_codes(group_idx, group_labels))
    y = pd.Series(y, name="y")
    if not return_truth:
        return X, y

    group_index = pd.Index(group_labels, name="group")
    feature_index = pd.Index(feature_names)
    truth = {
        "coef": pd.DataFrame(coef, index=group_index, columns=feature_index),
        "intercept": pd.Series(intercept, index=group_index, name="intercept"),
        "population_coef": pd.Series(
            population_coef, index=feature_index, name="population_coef"
        ),
        "population_intercept": population_intercept,
        "mask": pd.DataFrame(mask, index=group_index, columns=feature_index),
    }
    return X, y, truth
