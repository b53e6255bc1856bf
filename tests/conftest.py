"""Shared test settings: CPU only, fixed seeds, tiny NUTS runs."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

#: NUTS settings shared by most tests: one compiled program per data shape.
FAST = {"num_warmup": 150, "num_samples": 150, "num_chains": 2, "random_state": 0}

#: Version 0.1's model (every slope varies, independent group deviations),
#: for the tests whose closed forms are written for it.
OLD_MODEL = {"varying": "all", "group_covariance": "diagonal"}


@pytest.fixture
def fast():
    """Keyword arguments for a quick, seeded fit."""
    return dict(FAST)
