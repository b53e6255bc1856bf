"""Size thresholds of the engines, in one place.

Each threshold switches between two code paths that compute the same result
(unrolled algebra or LAPACK, one block of groups or several, kept or
recomputed factorizations, one part of conditional draws or two, ...). The
code reads them from this module when it builds a program, and
:func:`current` is part of every compile-cache key, so that a program built
under one set of values is never reused under another. ``tests/
test_thresholds.py`` fits and predicts on both sides of each one through the
public API.

Why each value was chosen, with the measurements behind it, is in the
docstring of the function that uses it.
"""

from __future__ import annotations

#: The groups' q x q matrices (q = features + 1) are factorized by unrolled
#: code up to this size, by LAPACK above (``_collapsed.is_unrolled``).
UNROLL_MAX_SIZE = 24

#: The population's single matrix is factorized by unrolled code up to this
#: size, by LAPACK above (``_collapsed.inverse_cholesky``).
UNROLL_MAX_SIZE_POPULATION = 12

#: Target bytes of one block of groups' intermediates in the collapsed
#: density (one chain); the groups per block follow from q
#: (``_collapsed._blocking``). Also the blocks of the general model's one
#: pass without latent cells (``_general._fixed_group_sums``).
BLOCK_BYTES = 1 << 21

#: If not None, the number of groups per block, overriding ``BLOCK_BYTES``.
BLOCK_GROUPS = None

#: The general model's groups' terms (``group_covariance="full"``,
#: population-only slopes) go in blocks of groups only while one q x q matrix
#: per group, for all groups, takes more than this many bytes
#: (``_general.uses_blocks``): with latent cells the gradient's pass
#: recomputes each block's intermediates, which cost more than it saved at
#: 10,000 groups (q = 4: 1.3 MB; q = 6: 2.9 MB) and far less at 100,000 (q =
#: 4: 12.8 MB), where every intermediate of all groups at once streams
#: through memory (``benchmarks/group_blocks.py``). Without latent cells the
#: blocks take one pass for the value and the gradient
#: (``_general._fixed_group_sums``).
GENERAL_BLOCK_MIN_BYTES = 1 << 22

#: Target bytes of one block of the general model's groups with latent cells
#: (as ``BLOCK_BYTES``; about 4,000 groups of 4 coefficients): with the
#: gradient's recomputation, larger blocks than the diagonal model's were
#: faster at 100,000 groups.
GENERAL_BLOCK_BYTES = 1 << 23

#: The blocks' factorizations are kept from the value's pass for the
#: gradient's pass while they take at most this many bytes per chain
#: (``_collapsed._keeps_factors``).
KEEP_FACTORS_BYTES = 1 << 26

#: The conditional draws go in chunks of at most this many (draws x groups x
#: q x q) floats; two chunks or more run as two parts in parallel
#: (``_collapsed.conditional_chunk``, ``_fit._conditional_parts``).
CONDITIONAL_CHUNK_FLOATS = 1 << 22

#: A tile of a chunk of conditional draws holds about this many times the
#: (draw, group) pairs of a density block (``_collapsed._draw_tiling``).
CONDITIONAL_TILE_FACTOR = 4

#: Models whose data take more than this many numbers run one chain per
#: compiled program, smaller ones pairs of chains in lockstep
#: (``_runner._chain_parts``).
LOCKSTEP_MAX_DATA = 20_000

#: Uniform numbers for multinomial sampling are drawn per block of this many
#: leaves of a NUTS trajectory; longer trajectories draw further blocks
#: (``_nuts``).
LEAF_BLOCK = 64

#: ``keep_group_draws="auto"`` keeps the draws of every group's
#: coefficients at fit while they take at most this many bytes
#: (``num_chains * num_samples * n_groups * (n_features + 1) * 8``); above
#: it they are made when first asked for (``_fit.GroupDraws``).
KEEP_GROUP_DRAWS_BYTES = 1 << 28

#: Rows per chunk of the prediction loops (``_predict``).
PREDICT_CHUNK_ROWS = 1 << 13

#: Cells (rows x q x q) per chunk of the sufficient-statistics pass
#: (``_stats.group_statistics``).
STATS_CHUNK_CELLS = 1 << 22

#: Partitions' statistics combined per task in the dask tree reduction
#: (``_dask``).
DASK_SPLIT_EVERY = 8

#: Convergence diagnostics cover every group coefficient while there are at
#: most this many (groups x (features + 1)); above, only the population
#: parameters (``_fit``).
MAX_GROUP_PARAMS_DIAGNOSED = 2000

#: The collapsed engine's density under ``group_covariance="full"`` asks for a
#: dense warmup metric while its flat vector has at most this many
#: coordinates, a diagonal one above (``_general.general_density``).
DENSE_METRIC_MAX_SIZE = 200

_NAMES = (
    "UNROLL_MAX_SIZE",
    "UNROLL_MAX_SIZE_POPULATION",
    "BLOCK_BYTES",
    "BLOCK_GROUPS",
    "GENERAL_BLOCK_MIN_BYTES",
    "GENERAL_BLOCK_BYTES",
    "KEEP_FACTORS_BYTES",
    "CONDITIONAL_CHUNK_FLOATS",
    "CONDITIONAL_TILE_FACTOR",
    "LOCKSTEP_MAX_DATA",
    "LEAF_BLOCK",
    "PREDICT_CHUNK_ROWS",
    "KEEP_GROUP_DRAWS_BYTES",
    "STATS_CHUNK_CELLS",
    "DASK_SPLIT_EVERY",
    "MAX_GROUP_PARAMS_DIAGNOSED",
    "DENSE_METRIC_MAX_SIZE",
)


def current():
    """The thresholds in force, as a hashable tuple (a compile-cache key part).

    Returns
    -------
    tuple of (str, object)
    """
    return tuple((name, globals()[name]) for name in _NAMES)
