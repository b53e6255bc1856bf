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


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module, drop the compiled programs it left behind.

    One pytest process compiles thousands of XLA programs; each keeps memory
    maps until it is released, and a process may hold at most
    ``vm.max_map_count`` (65,530 by default) of them: the full suite crashed
    in XLA's compiler past that point. Programs are cached per module only.
    """
    yield
    _clear_compiled_programs()


@pytest.fixture(autouse=True)
def _release_compiled_programs_when_many():
    """Within a module too, once the process holds half the allowed maps."""
    yield
    if _memory_maps() > 32_000:
        _clear_compiled_programs()


def _memory_maps():
    # Memory maps this process holds (Linux; 0 elsewhere).
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def _clear_compiled_programs():
    import gc

    import jax

    from hiermask import _runner

    _runner._CACHE.clear()
    jax.clear_caches()
    gc.collect()
