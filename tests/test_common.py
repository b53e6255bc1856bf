"""scikit-learn's estimator checks.

Every check runs and must pass, except one that cannot pass for an MCMC
estimator and is run on its own below with the one failure it may give.
"""

import pytest
from sklearn.base import clone
from sklearn.utils.estimator_checks import (
    check_sample_weight_equivalence_on_dense_data,
    estimator_checks_generator,
)

from hiermask import MaskedHierarchicalRegressor

from .conftest import FAST

ESTIMATOR = MaskedHierarchicalRegressor(on_bad_convergence="ignore", **FAST)

#: The weight-equivalence check needs fitting and predicting to work, not
#: good draws: its 30-feature, 15-row data make NUTS build deep trees once
#: the FAST warmup adapts (two fits of 300 draws cost over a minute), while
#: this short run takes well under a second after compiling.
SHORT = {"num_warmup": 20, "num_samples": 10, "num_chains": 1}

#: Checks run by their own test below instead of the parametrized one.
RUN_SEPARATELY = {"check_sample_weight_equivalence_on_dense_data"}


def _check_name(check):
    return getattr(check, "func", check).__name__


CHECKS = [
    (estimator, check)
    for estimator, check in estimator_checks_generator(clone(ESTIMATOR), legacy=True)
    if _check_name(check) not in RUN_SEPARATELY
]


@pytest.mark.parametrize(
    ("estimator", "check"), CHECKS, ids=[_check_name(c) for _, c in CHECKS]
)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)


def test_sample_weight_equivalence_fails_only_on_the_comparison():
    # Integer weights and repeated rows give the same posterior, but the
    # sufficient statistics differ by float rounding, which changes the NUTS
    # trajectory, so predictions agree only within Monte Carlo error, never
    # to sklearn's rtol=1e-7 (tests/test_estimator.py checks the equivalence
    # within Monte Carlo error). Fitting and predicting must work: the check
    # may fail only at its final comparison. Its data (15 rows x 30
    # features, one group) take the LAPACK paths of the collapsed engine.
    # The default "full" fits as "diagonal" here, with a warning: one group
    # for 31 correlated effects (issue 14; before that rule the 465
    # correlations that only their prior informs made these fits take over
    # 10 minutes on 2 CPUs)
    with (
        pytest.warns(UserWarning, match="1 group.s. for 31 correlated group effects"),
        pytest.raises(AssertionError, match="is not equivalent to fitting"),
    ):
        check_sample_weight_equivalence_on_dense_data(
            "MaskedHierarchicalRegressor", clone(ESTIMATOR).set_params(**SHORT)
        )
