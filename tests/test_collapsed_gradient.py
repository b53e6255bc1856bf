"""The collapsed engine's hand-written gradient against ``jax.grad`` (issue 13).

The oracle is automatic differentiation of the very forward code the custom
VJP wraps (``_pooled_loglik_fwd``'s value), not finite differences: the two
gradients are the same mathematics in another order of operations, so they
agree to rounding. Shapes, masks, weights, latent cells and the poolings
with a hand-written gradient (partial and none; complete pooling's density
has none, ``jax.grad`` differentiates it) are drawn by hypothesis; both
factorization paths (unrolled and LAPACK) are reached for the groups and for
the population. Unrolled code is compiled
only up to size 8 here (its compile time grows as the size squared, and
``jax.grad`` of it is the slow case the hand-written gradient exists for);
the thresholds' own values are covered by ``tests/test_thresholds.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hiermask import _collapsed, _limits

from ._fitted import engine_data

#: Sizes up to which unrolled factorizations are compiled in this test.
_UNROLL_CAP = 8


def _problem(n_groups, n_features, pooling, seed):
    # Random rows (3 per group and more), weights, masks (feature 0 on
    # everywhere) and up to 3 latent cells, as the engine's data.
    rng = np.random.default_rng(seed)
    n_rows = 3 * n_groups + 5
    group_idx = np.concatenate(
        [np.arange(n_groups), rng.integers(0, n_groups, n_rows - n_groups)]
    )
    X = rng.normal(size=(n_rows, n_features))
    y = X[:, 0] + rng.normal(size=n_rows)
    w = rng.uniform(0.5, 2.0, n_rows)
    mask = rng.uniform(size=(n_groups, n_features)) < 0.7
    mask[:, 0] = True
    X[~mask[group_idx]] = np.nan
    X[rng.integers(0, n_rows, rng.integers(0, 4)), 0] = np.nan  # latent cells
    data, hyper, _ = engine_data(X, y, w, group_idx, mask, pooling)
    return jax.tree_util.tree_map(jnp.asarray, (data, hyper))


def _forward(static, *args):
    # The custom VJP's forward code alone: jax.grad differentiates through it.
    return _collapsed._pooled_loglik_fwd(static, *args)[0]


@pytest.mark.slow
@settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    n_groups=st.integers(1, 300),
    n_features=st.integers(1, 30),
    pooling=st.sampled_from(["partial", "none"]),
    unroll_groups=st.booleans(),
    unroll_population=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hand_written_gradient_equals_jax_grad(
    n_groups, n_features, pooling, unroll_groups, unroll_population, seed
):
    q = n_features + 1
    # each path on its side of the threshold: unrolled at q <= the cap when
    # drawn, LAPACK otherwise
    groups_max = q if unroll_groups and q <= _UNROLL_CAP else q - 1
    population_max = q if unroll_population and q <= _UNROLL_CAP else q - 1
    with pytest.MonkeyPatch.context() as patch, jax.enable_x64(True):
        patch.setattr(_limits, "UNROLL_MAX_SIZE", groups_max)
        patch.setattr(_limits, "UNROLL_MAX_SIZE_POPULATION", population_max)
        data, hyper = _problem(n_groups, n_features, pooling, seed)
        density = _collapsed.collapsed_density(data, hyper, pooling)
        z = jnp.asarray(np.random.default_rng(seed).uniform(-1.5, 1.5, density.size))
        hand = np.asarray(jax.jit(jax.grad(density.potential))(z))
        patch.setattr(_collapsed, "_pooled_loglik", _forward)
        forward = _collapsed.collapsed_density(data, hyper, pooling)
        auto = np.asarray(jax.jit(jax.grad(forward.potential))(z))
    assert np.all(np.isfinite(auto))
    # the same mathematics in another order: equal to rounding (observed
    # ~1e-13 relative); rtol 1e-10 with an absolute floor of 1e-12 of the
    # largest entry for entries that cancel to near zero
    np.testing.assert_allclose(
        hand, auto, rtol=1e-10, atol=1e-12 * np.max(np.abs(auto))
    )
