"""Collapsed engine: coefficients integrated out of the density (JAX).

Each group's coefficient vector in the internal basis (intercept at the
centring point, then the slopes; see :mod:`hiermask._model`) is
``theta_g = F_g phi + f_g + C_g v_g`` with ``v_g ~ Normal(0, I)``: ``phi =
(ell, mu)`` are the population means (Gaussian prior), ``C_g = A_g D_g``
depends on the between-group sds through the diagonal ``D_g`` (``A_g`` is
fixed by the data). The likelihood of a group's rows is Gaussian in
``theta_g`` with sufficient statistics ``S = Xt'WXt``, ``r = Xt'Wu``,
``u'Wu`` and ``n = sum w``, so ``v_g`` integrates out exactly, per group:

    log p(u_g | b0) = const_g - b0'H_g b0 / 2 + b0'eta_g,   b0 = F_g phi + f_g

with ``M = I + C'SC / sigma^2`` (always >= I, so well conditioned even as the
between-group sds go to zero), ``H = S/sigma^2 - S C M^-1 C' S / sigma^4``,
``eta = r/sigma^2 - S C M^-1 C' r / sigma^4`` and ``const = -n/2 log(2 pi
sigma^2) - log|M|/2 - (u'Wu/sigma^2 - r'C M^-1 C' r/sigma^4)/2``. The sum over
groups is then Gaussian in ``phi``, which integrates out too. NUTS samples
only the residual sd, the between-group sds and the imputation model: no
funnel is left (neither between group effects and their sds, nor between
the population means and the sds). Afterwards ``phi`` and every ``theta_g``
are drawn exactly from their Gaussian conditionals, one draw per posterior
draw. Cost per gradient: O(n_groups q^3), independent of the number of rows.

The sampler evaluates this density in an equivalent form
(:func:`marginal_loglik`): with ``C = A D``, ``F' H F = (D^-1 A^-1 F)' M^-1
(D A'SF) / sigma^2`` and ``F' eta = (D^-1 A^-1 F)' M^-1 D A'r / sigma^2``, so
the population precision is a product of positive factors rather than the
difference of two terms that grow with the number of rows; one Cholesky
factor of each group's ``M`` gives everything. The groups are processed in
blocks sized to stay in a core's cache (a loop over the blocks; one block
when they are few); within a block, matrices are stored groups-last and the
algebra is unrolled over the small matrix size (vectorized over the block's
groups; LAPACK for larger matrices, see :data:`hiermask._limits.UNROLL_MAX_SIZE`). The
gradient is written by hand (:func:`_pooled_loglik`): one pass over the
blocks sums the forms the population terms need, a second forms each
block's gradient. Conditional
draws go the same way, block by block. Everything here runs in float64 (the
caller scopes ``jax.enable_x64``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from . import _limits
from ._density import INIT_RADIUS, FlatDensity
from ._model import IMPUTE_LOC_SCALE, IMPUTE_SCALE_SCALE, Hyper
from ._nuts import normal, uniform
from ._stats import centred_design, latent_layout, reference_units

__all__ = [
    "CollapsedData",
    "CollapsedEngine",
    "cholesky_rows",
    "chunk_key_data",
    "collapsed_density",
    "conditional_chunk",
    "conditional_draws",
    "imputation_sites",
    "inverse_cholesky",
    "is_unrolled",
    "layout_of",
    "marginal_loglik",
    "materialize",
    "maybe_scan",
    "noise_start",
    "population_factor",
    "population_integral",
    "residual_sd_guess",
]

# Each group's matrix is factorized by unrolled elementwise code up to
# UNROLL_MAX_SIZE (one vectorized loop over a block's groups per column, no
# library call), by LAPACK above (:func:`hiermask._xla.exclusive`); the
# population's single matrix up to UNROLL_MAX_SIZE_POPULATION. Why these
# sizes, measured: docs/performance.md, "Unroll limits".


def is_unrolled(q):
    # Whether the groups' q x q matrices are factorized by unrolled code.
    return q <= _limits.UNROLL_MAX_SIZE


class CollapsedData(NamedTuple):
    """Sufficient statistics and latent-cell rows of the collapsed engine."""

    on: jnp.ndarray  # (G, p)
    k: jnp.ndarray  # (p,)
    K: jnp.ndarray  # (p,)
    e_y: jnp.ndarray  # ()
    n: jnp.ndarray  # (G,)
    gram: jnp.ndarray  # (G, q, q)
    xty: jnp.ndarray  # (G, q)
    yty: jnp.ndarray  # (G,)
    inc_group: jnp.ndarray  # (R,) group of each row holding latent cells
    inc_design: jnp.ndarray  # (R, p) its centred design, 0 at latent cells
    inc_y: jnp.ndarray  # (R,)
    inc_w: jnp.ndarray  # (R,)
    miss_row: jnp.ndarray  # (M,) position of each latent cell's row in inc_*
    miss_col: jnp.ndarray  # (M,)
    miss_slot: jnp.ndarray  # (M,)
    impute_cols: jnp.ndarray  # (P,)
    x_count: jnp.ndarray  # (G, P) observed-cell statistics of impute_cols
    x_sum: jnp.ndarray  # (G, P)
    x_sumsq: jnp.ndarray  # (G, P)
    noise_guess: jnp.ndarray  # (2, 2) residual_sd_guess: per group, pooled


@dataclass(frozen=True)
class CollapsedEngine:
    """The collapsed engine: group coefficients integrated out.

    An engine prepares its data once (:meth:`prepare`), gives the sampler a
    density over a flat vector (:meth:`density`) and draws what it
    integrated out (:meth:`conditional`). Engines are hashable: equal
    engines share compiled programs.

    Today's model (every feature varying with independent group effects, or
    complete pooling) runs the hand-written code of this module; population-only
    slopes and correlated group effects run the plain-JAX general model of
    :mod:`hiermask._general`.

    Parameters
    ----------
    pooling : {"partial", "none", "complete"}
    varying : tuple of bool, optional
        One per active feature (a column of the data's ``on``): whether it
        has a group-specific slope. None: every feature varies.
    covariance : {"diagonal", "full"}, default="diagonal"
        Group effects independent, or jointly normal with an LKJ-distributed
        correlation (partial pooling only).

    Examples
    --------
    >>> from hiermask._collapsed import CollapsedEngine
    >>> engine = CollapsedEngine("partial", varying=(True, False), covariance="full")
    >>> engine.conditional_sites[-1]
    'group_correlation'
    """

    pooling: str = "partial"
    varying: tuple | None = None
    covariance: str = "diagonal"

    #: Sampled sites that :meth:`conditional` takes (today's model).
    _SITES: ClassVar[tuple] = (
        "noise",
        "intercept_scale",
        "coef_scale",
        "x_missing",
    )

    def __post_init__(self):
        if self.varying is not None:
            object.__setattr__(self, "varying", tuple(bool(v) for v in self.varying))

    @property
    def general(self):
        """Whether this engine runs the general model (:mod:`hiermask._general`)."""
        from ._general import uses_general

        return uses_general(self.pooling, self.varying, self.covariance)

    @property
    def conditional_sites(self):
        """Sampled sites that :meth:`conditional` takes."""
        if self.general and self.covariance == "full" and self.pooling == "partial":
            return (*self._SITES, "group_correlation")
        return self._SITES

    def _spec(self, data):
        from ._general import general_spec

        n_features = data.on.shape[1]
        return general_spec(self.pooling, self.varying, self.covariance, n_features)

    def prepare(self, statistics, ref):
        """The engine's data from the statistics of the rows.

        Parameters
        ----------
        statistics : FitStatistics
            What :mod:`hiermask._fit` gathers from the rows: ``mask`` (all
            features), ``scaling``, ``stats`` and ``latent`` rows.
        ref : tuple
            Prior reference points ``(M_y, s_y, M, s)`` in data units.

        Returns
        -------
        CollapsedData
        """
        mask, scaling = statistics.mask, statistics.scaling
        stats, rows = statistics.stats, statistics.latent
        on = mask[:, mask.any(axis=0)]
        design, latent = centred_design(rows.X, on[rows.group_idx], scaling)
        cols, miss_row, miss_col, miss_slot = latent_layout(latent)
        totals = (np.sum(a, axis=0, keepdims=True) for a in _stat_arrays(stats))
        k, K, e_y = reference_units(scaling, ref)
        return CollapsedData(
            on=on.astype(np.float64),
            k=k,
            K=K,
            e_y=e_y,
            n=stats.n,
            gram=stats.gram,
            xty=stats.xty,
            yty=stats.yty,
            inc_group=rows.group_idx,
            inc_design=design,
            inc_y=(rows.y - scaling.y_mean) / scaling.y_scale,
            inc_w=rows.w,
            miss_row=miss_row,
            miss_col=miss_col,
            miss_slot=miss_slot,
            impute_cols=cols,
            x_count=stats.x_count[:, cols],
            x_sum=stats.x_sum[:, cols],
            x_sumsq=stats.x_sumsq[:, cols],
            noise_guess=np.stack(
                [residual_sd_guess(*_stat_arrays(stats)), residual_sd_guess(*totals)]
            ),
        )

    def density(self, data, hyper):
        """The posterior as a :class:`~hiermask._density.FlatDensity`.

        See :func:`collapsed_density` and
        :func:`hiermask._general.general_density`.
        """
        if self.general:
            from ._general import general_density

            return general_density(self._spec(data), data, hyper)
        return collapsed_density(data, hyper, self.pooling)

    def conditional(self, rng_key, draws, data, hyper, **chunking):
        """Exact draws of the population and group coefficients.

        See :func:`conditional_draws` (``chunking``: its ``chunk``,
        ``first_chunk`` and ``n_valid``; the general model:
        :func:`hiermask._general.general_conditional`).
        """
        if self.general:
            from ._general import general_conditional

            return general_conditional(
                self._spec(data), rng_key, draws, data, hyper, **chunking
            )
        return conditional_draws(rng_key, draws, data, hyper, self.pooling, **chunking)


def _stat_arrays(stats):
    # The statistics residual_sd_guess takes.
    return stats.n, stats.gram, stats.xty, stats.yty


def residual_sd_guess(n, gram, xty, yty):
    """Least-squares residual sd of each group's rows, pooled, and its sd.

    From the sufficient statistics (rows with latent cells left out): the
    residual sum of squares of each group's own least-squares fit (rank
    deficient designs included, by eigendecomposition), summed over groups
    and divided by the residual degrees of freedom ``sum(n_g - rank_g)``.
    The collapsed engine starts its chains' residual sd near it (see
    :func:`collapsed_density`).

    Parameters
    ----------
    n : array of shape (G,)
        Rows (sums of weights) per group.
    gram, xty, yty : arrays of shape (G, q, q), (G, q), (G,)
        ``Xt'WXt``, ``Xt'Wu``, ``u'Wu`` per group.

    Returns
    -------
    ndarray of shape (2,)
        ``[sd, sd / sqrt(2 dof)]`` (the second: the estimate's standard
        error); ``[1, 0]`` when no group has more rows than coefficients.
    """
    gram = np.asarray(gram, dtype=np.float64)
    q = gram.shape[-1]
    diag = np.diagonal(gram, axis1=-2, axis2=-1)
    empty = diag <= 0  # features switched off in the group
    inv_sd = np.where(empty, 0.0, 1.0 / np.sqrt(np.where(empty, 1.0, diag)))
    # unit-diagonal (correlation) form; switched-off features get a 1 on the
    # diagonal and nothing else, so they add no fit and are not counted
    corr = gram * inv_sd[:, :, None] * inv_sd[:, None, :]
    corr = corr + empty[:, :, None] * np.eye(q)
    vals, vecs = np.linalg.eigh(corr)
    kept = vals > 1e-10 * q
    proj = np.einsum("gji,gj->gi", vecs, np.asarray(xty) * inv_sd)
    fitted = np.sum(np.where(kept, proj**2 / np.where(kept, vals, 1.0), 0.0), axis=1)
    rank = kept.sum(axis=1) - empty.sum(axis=1)
    dof = np.asarray(n, dtype=np.float64) - rank
    useful = dof > 0.5
    total_dof = float(np.sum(dof[useful]))
    rss = float(np.sum(np.maximum(np.asarray(yty) - fitted, 0.0)[useful]))
    if total_dof < 1.0 or rss <= 0.0:
        return np.array([1.0, 0.0])
    sd = np.sqrt(rss / total_dof)
    return np.array([sd, sd / np.sqrt(2.0 * total_dof)])


# --------------------------------------------------------------------------
# Small dense algebra, batched over groups. Matrices are stored with their
# two matrix axes first and the batch axes (groups) last, so that every
# elementwise operation runs over contiguous batches and vectorizes.


def _cholesky_entries(m):
    # Cholesky factor of a batch of small SPD matrices, entry by entry:
    # {(i, j): array of the batch shape}, lower triangle.
    size = m.shape[0]
    chol = {}
    for j in range(size):
        s = m[j, j]
        for k in range(j):
            s = s - chol[j, k] ** 2
        chol[j, j] = jnp.sqrt(s)
        inv = 1.0 / chol[j, j]
        for i in range(j + 1, size):
            s = m[i, j]
            for k in range(j):
                s = s - chol[i, k] * chol[j, k]
            chol[i, j] = s * inv
    return chol


def _triangular_inverse_entries(chol, size):
    # Inverse of a lower-triangular matrix given entry by entry.
    inv = {}
    for i in range(size):
        inv[i, i] = 1.0 / chol[i, i]
        for j in range(i):
            s = chol[i, j] * inv[j, j]
            for k in range(j + 1, i):
                s = s + chol[i, k] * inv[k, j]
            inv[i, j] = -s * inv[i, i]
    return inv


def inverse_cholesky(m):
    """``T = L^-1`` (lower, ``m = L L'``) and ``log|m|``; batch axes last."""
    size = m.shape[0]
    if size <= _limits.UNROLL_MAX_SIZE_POPULATION:
        chol = _cholesky_entries(m)
        inv = _triangular_inverse_entries(chol, size)
        logdet = 2.0 * sum(jnp.log(chol[j, j]) for j in range(size))
        zero = jnp.zeros(m.shape[2:])
        t = jnp.stack(
            [
                jnp.stack([inv.get((i, j), zero) for j in range(size)])
                for i in range(size)
            ]
        )
        # Materialize the factor: fused into its consumers, XLA would redo
        # the elimination for every element of every product that uses it.
        return jax.lax.optimization_barrier((t, logdet))
    return _lapack_inverse_cholesky(m)


def _lapack_inverse_cholesky(m):
    # inverse_cholesky by LAPACK, one call per matrix.
    size = m.shape[0]
    front = jnp.moveaxis(m, (0, 1), (-2, -1))
    chol = jnp.linalg.cholesky(front)
    eye = jnp.broadcast_to(jnp.eye(size), front.shape)
    inv = jsl.solve_triangular(chol, eye, lower=True)
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    return jnp.moveaxis(inv, (-2, -1), (0, 1)), logdet


def _tr(a):
    return jnp.swapaxes(a, 0, 1)


# --------------------------------------------------------------------------
# The model's pieces.


def _population_map(data):
    # F: group coefficients' prior mean given phi = (ell, mu), before f.
    on = data.on
    n_groups, n_features = on.shape
    q = n_features + 1
    F = jnp.zeros((n_groups, q, q))
    F = F.at[:, 0, 0].set(1.0)
    F = F.at[:, 0, 1:].set(on * data.k - data.K)
    return F.at[:, jnp.arange(1, q), jnp.arange(1, q)].set(on)


def _deviation_parts(pooling, data):
    # A (unit upper triangular: identity with first row [1, row]) of C = A D.
    on = data.on
    row = on * data.k if pooling == "partial" else on * (data.k - data.K)
    q = on.shape[1] + 1
    return jnp.broadcast_to(jnp.eye(q), (on.shape[0], q, q)).at[:, 0, 1:].set(row)


class _Prepared(NamedTuple):
    # Statistics shifted by f (so that b0 = F phi) and mapped by A and F;
    # groups last.
    n: jnp.ndarray  # (G,)
    yty: jnp.ndarray  # (G,) (u - Xt f)'W(u - Xt f)
    dev_gram: jnp.ndarray | None  # (q, q, G) A'SA
    dev_xty: jnp.ndarray | None  # (q, G) A'r
    pop_gram: jnp.ndarray | None  # (q, q) sum F'SF (complete pooling)
    pop_xty: jnp.ndarray | None  # (q,) sum F'r (complete pooling)


def _prepare(pooling, data, stats):
    """Everything of the density that does not depend on sampled scales."""
    n, gram, xty, yty = stats
    e_y = data.e_y
    # theta = f + F phi + C v with f = -e_y on the intercept: shift it into u.
    yty = yty + 2.0 * e_y * xty[:, 0] + e_y**2 * gram[:, 0, 0]
    xty = xty + e_y * gram[:, :, 0]
    if pooling == "complete":
        F = _population_map(data)
        return _Prepared(
            n,
            yty,
            None,
            None,
            jnp.einsum("gki,gkl,glj->ij", F, gram, F),
            jnp.einsum("gki,gk->i", F, xty),
        )
    A = _deviation_parts(pooling, data)
    dev_gram = jnp.einsum("gki,gkl,glj->ijg", A, gram, A)
    dev_xty = jnp.einsum("gki,gk->ig", A, xty)
    return _Prepared(n, yty, dev_gram, dev_xty, None, None)


# The rows holding latent cells. _prepare is linear in the statistics, and a
# row's share of them is an outer product: with xt = [1, x] the row's design,
# u = y + e_y and a = L'xt (L = A_g, or F_g under complete pooling), the row
# adds w to n, w u^2 to u'Wu, w a a' to A'SA (F'SF) and w u a to A'r (F'r).
# The complete rows are prepared once, outside the density, with the n and
# u'Wu of the incomplete rows (which do not depend on the latent cells); each
# evaluation adds only the incomplete rows' outer products, into the groups
# that hold them: its cost grows with the number of these rows, not with the
# number of groups (docs/performance.md, "Latent cells").


class _Rows(NamedTuple):
    # The rows holding latent cells, prepared: see above.
    group: jnp.ndarray  # (R,)
    left_xt: jnp.ndarray  # (R, q) a = L'xt with 0 at the row's latent cells
    w: jnp.ndarray  # (R,)
    u: jnp.ndarray  # (R,) y + e_y


def split_prepared(pooling, data):
    """The prepared statistics of the complete rows, and the incomplete rows.

    Parameters
    ----------
    pooling : {"partial", "none", "complete"}
    data : CollapsedData

    Returns
    -------
    prep : _Prepared
        :func:`_prepare` of the complete rows' statistics, with the ``n``
        and ``u'Wu`` of the rows holding latent cells added.
    rows : _Rows
        Those rows, for :func:`row_statistics`.
    """
    n_groups = data.on.shape[0]
    w, u = data.inc_w, data.inc_y + data.e_y

    def seg(v):
        return jax.ops.segment_sum(v, data.inc_group, num_segments=n_groups)

    prep = _prepare(pooling, data, (data.n + seg(w), data.gram, data.xty, data.yty))
    prep = prep._replace(yty=prep.yty + seg(w * u**2))
    if pooling == "complete":
        left = _population_map(data)[data.inc_group]
    else:
        left = _deviation_parts(pooling, data)[data.inc_group]
    xt = jnp.concatenate([jnp.ones((w.shape[0], 1)), data.inc_design], axis=1)
    return prep, _Rows(data.inc_group, jnp.einsum("rki,rk->ri", left, xt), w, u)


def row_statistics(data, rows, cells):
    """Each incomplete row's prepared ``w a a'`` and ``w u a`` given its cells.

    A latent cell of feature ``j`` is the entry ``1 + j`` of the row's
    ``xt``; row ``1 + j`` of ``L`` is the unit vector there (``A`` is the
    identity but for its first row; ``F``'s diagonal is ``on``, 1 where a
    cell can be latent), so the cell adds itself to ``a``'s entry ``1 + j``.

    Parameters
    ----------
    data : CollapsedData
    rows : _Rows
        From :func:`split_prepared`.
    cells : array of shape (M,)
        The latent cells (internal units).

    Returns
    -------
    gram : array of shape (R, q, q)
    xty : array of shape (R, q)
    """
    a = rows.left_xt.at[data.miss_row, 1 + data.miss_col].add(cells)
    wa = rows.w[:, None] * a
    return wa[:, :, None] * a[:, None, :], wa * rows.u[:, None]


def _blocks_with_rows(blocks, rows, gram, xty):
    # Add the rows' prepared statistics into the blocks of their groups.
    size = blocks.onq.shape[-1]
    b, j = rows.group // size, rows.group % size
    return blocks._replace(
        gram=blocks.gram.at[b, :, :, j].add(gram), xty=blocks.xty.at[b, :, j].add(xty)
    )


def _pop_left(data):
    # A^-1 F under partial pooling, the same for every group where it
    # matters: the identity with first row [1, -K]. (A group's own A^-1 F
    # has zero rows at its masked features, where A'SA and A'r vanish.)
    q = data.K.shape[0] + 1
    return jnp.eye(q).at[0, 1:].set(-data.K)


# --------------------------------------------------------------------------
# Blocked per-group algebra. The groups are split into blocks of a few dozen
# to a few hundred; a loop over the blocks keeps each block's intermediates
# in a core's cache (on all groups at once, every intermediate streams
# through memory). Within a block, matrices are stored groups-last and the
# algebra is unrolled over the matrix size into operations on whole rows or
# columns, each one vectorized loop over the block's groups.

# Target bytes of one block's intermediates (one chain); the number of
# groups per block follows from the matrix size.

#: Bytes of intermediates per group and per entry of a q x q matrix.
_BYTES_PER_ENTRY = 8 * 16

# If set, the number of groups per block, overriding BLOCK_BYTES (tests use
# it to exercise several blocks, and a ragged last one, with few groups).


def _blocking(n_groups, q, target=None):
    """Groups per block and number of blocks for ``n_groups`` groups.

    Parameters
    ----------
    n_groups : int
    q : int
        Matrix size (features + intercept).
    target : int, optional
        Bytes of one block's intermediates; default
        ``_limits.BLOCK_BYTES``.

    Returns
    -------
    size, n_blocks : int
        ``size * n_blocks >= n_groups``; a single block (no loop, no
        padding) when all groups fit in one.
    """
    if _limits.BLOCK_GROUPS is not None:
        size = int(_limits.BLOCK_GROUPS)
    else:
        target = _limits.BLOCK_BYTES if target is None else target
        size = max(8, target // (_BYTES_PER_ENTRY * q * q))
    if n_groups <= size:
        return n_groups, 1
    n_blocks = -(-n_groups // size)
    if _limits.BLOCK_GROUPS is None:
        # Blocks as even as possible, in whole vectors of 8, and an odd
        # number of them: rows of a block's matrices then start at
        # addresses spread over the cache sets (a power-of-two row length
        # maps every row of a matrix to the same set).
        size = 8 * (-(-n_groups // (8 * n_blocks)) | 1)
        n_blocks = -(-n_groups // size)
    return size, n_blocks


def _to_blocks(x, size, n_blocks):
    # Groups-last (..., G) -> (n_blocks, ..., size), zero-padded.
    pad = size * n_blocks - x.shape[-1]
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    x = x.reshape(*x.shape[:-1], n_blocks, size)
    return jnp.moveaxis(x, -2, 0)


def _from_blocks(x, n_groups):
    # (n_blocks, ..., size) -> groups-last (..., G)
    x = jnp.moveaxis(x, 0, -2)
    return x.reshape(*x.shape[:-2], -1)[..., :n_groups]


class _Blocks(NamedTuple):
    # The group statistics in blocks, (n_blocks, ..., size): the groups of a
    # block last. Padding groups have zero statistics and onq = 0 (so d = 1
    # and M = I): they contribute exactly nothing.
    gram: jnp.ndarray  # (nb, q, q, B) A'SA
    xty: jnp.ndarray  # (nb, q, B) A'r
    onq: jnp.ndarray  # (nb, q, B) 1 where d takes the base sd, else d = 1
    unit: jnp.ndarray  # () 1.0, unknown to the compiler (see materialize)


def _group_blocks(prep, on):
    """The group statistics in blocks (see :func:`_blocking`).

    Under complete pooling (no group statistics) only ``onq``.
    """
    n_groups, p = on.shape
    size, n_blocks = _blocking(n_groups, p + 1)
    onq = jnp.concatenate([jnp.ones((1, n_groups)), on.T], axis=0)
    # 1.0 at run time, but not a constant of the program (0 * x is not
    # simplified for floating point x).
    unit = 1.0 + 0.0 * jnp.sum(prep.yty[:1])
    return _Blocks(
        *(
            None if x is None else _to_blocks(x, size, n_blocks)
            for x in (prep.dev_gram, prep.dev_xty, onq)
        ),
        jax.lax.stop_gradient(unit),
    )


def materialize(x, unit):
    # Materialize x. XLA's CPU fusion duplicates cheap producers into every
    # consumer and every reuse (a row of a factor read by each entry of a
    # product would be recomputed for each), and optimization barriers do
    # not reach its fusion pass; it does not fuse an expensive operation
    # (here a division by 1.0 that it cannot see is one) into a consumer
    # that reuses its elements.
    return x / unit


def cholesky_rows(m, unit, unroll):
    """``T = L^-1`` and ``log|m|`` for SPD ``m = L L'``; batch axes last.

    Column ``j`` of ``L`` (left-looking) and then row ``i`` of ``T`` are
    one kernel each: divisions, so materialized (see :func:`materialize`).

    Returns
    -------
    t : array of shape (q, q, ...)
        Lower triangular.
    logdet : array
    """
    size = m.shape[0]
    if not unroll:
        return _lapack_inverse_cholesky(m)
    cols = []  # cols[j]: column j of L from row j down
    for j in range(size):
        s = m[j:, j]
        for k in range(j):
            s = s - cols[k][j - k :] * cols[k][j - k]
        # the pivot's square root for every entry (s[0] + 0 s: not a
        # broadcast, which XLA would compute in a kernel of its own): one
        # kernel per column
        cols.append(materialize(s / jnp.sqrt(s[0] + 0.0 * s), unit))
    logdet = 2.0 * sum(jnp.log(c[0]) for c in cols)
    rows = []
    for i in range(size):
        # row i of T: [-sum_k L[i, k] T[k, :], 1] / L[i, i], zero-padded
        num = jnp.zeros((size, *m.shape[2:])).at[i].set(1.0)
        for k in range(i):
            num = num - cols[k][i - k] * rows[k]
        # a division by the pivot for every entry: materialized, one kernel
        rows.append(num / (cols[i][0] + 0.0 * num))
    return jnp.stack(rows), logdet


def _tri_mm(t, x, unit):
    # t x for t (q, q, ...) and x (q, n, ...), one kernel.
    return materialize(
        sum(t[:, k][:, None] * x[k][None] for k in range(t.shape[1])), unit
    )


def _tri_tmm(t, x, unit):
    # t' x for t (q, q, ...) and x (q, n, ...).
    return materialize(sum(t[k][:, None] * x[k][None] for k in range(t.shape[0])), unit)


def _tri_gram(t, unit):
    # t't for t (q, q, ...).
    return materialize(sum(t[k][:, None] * t[k][None] for k in range(t.shape[0])), unit)


def _mmt_small(a, b, unit):
    # a b' for batches of small dense matrices (matrix axes first).
    out = sum(a[:, j][:, None] * b[:, j][None] for j in range(a.shape[1]))
    return materialize(out, unit)


class _Factors(NamedTuple):
    # One block's factorization at given scales (see _block_factor).
    d: jnp.ndarray  # (q, B) deviation sds
    rows: list  # rows of T = L^-1, M = L L'
    logdet: jnp.ndarray  # (B,) log|M|
    u: jnp.ndarray  # (q, k, B) T [DS, Dr] (partial) or T Dr (none)
    v: jnp.ndarray  # (q, k, B) M^-1 [DS, Dr] or M^-1 Dr


def _block_chol(inv, base, blk, unroll):
    # d, the rows of T = L^-1 and log|M| for M = I + inv D S D = L L'.
    d = base[:, None] * blk.onq + (1.0 - blk.onq)
    q = d.shape[0]
    eye = jnp.eye(q).reshape(q, q, *([1] * (blk.gram.ndim - 2)))
    m = eye + inv * d[:, None] * blk.gram * d[None]
    rows, logdet = cholesky_rows(m, blk.unit, unroll)
    return d, rows, logdet


def _block_factor(pooling, inv, base, blk, unroll):
    """Factorize one block's ``M = I + inv D S D`` and solve for its forms.

    With ``D = diag(d)``, ``S = A'SA`` and ``r = A'r`` of the block's groups:
    ``u = T [DS, Dr]`` and ``v = M^-1 [DS, Dr]`` (only the last column
    under no pooling), from which the per-group terms of the density are
    ``Y = D^-1 M^-1 D S`` (= v / d), ``z = D^-1 M^-1 D r`` and ``s = r'D
    M^-1 D r = |u[:, -1]|^2``.
    """
    d, rows, logdet = _block_chol(inv, base, blk, unroll)
    dr = (d * blk.xty)[:, None]
    x = dr if pooling == "none" else jnp.concatenate([d[:, None] * blk.gram, dr], 1)
    u = _tri_mm(rows, x, blk.unit)
    v = _tri_tmm(rows, u, blk.unit)
    return _Factors(d, rows, logdet, u, v)


def _block_sums(pooling, f):
    # The block's sums over its groups: log|M|, s and, under partial
    # pooling, Y and z (module docstring).
    logdet = jnp.sum(f.logdet, axis=-1)
    s = jnp.sum(f.u[:, -1] ** 2, axis=(0, -1))
    if pooling == "none":
        return logdet, s, None, None
    q = f.d.shape[0]
    y = jnp.sum(f.v[:, :q] / f.d[:, None], axis=-1)
    z = jnp.sum(f.v[:, q] / f.d, axis=-1)
    return logdet, s, y, z


def _block_grads(pooling, want, inv, blk, f, cot):
    """One block's gradients of its summed terms, given their cotangents.

    ``cot = (c_logdet, c_s, c_y, c_z)``, the same for every group (``c_y``
    and ``c_z`` None under no pooling). Returns the gradient with respect
    to inv (summed over the block), the base sds (summed; with "base" in
    ``want``) and the block's statistics (with "stats" in ``want``).
    """
    c_logdet, c_s, c_y, c_z = cot
    unit = blk.unit
    q, d = f.d.shape[0], f.d
    gram = blk.gram
    zt = f.v[:, -1]  # M^-1 D r
    minv = _tri_gram(f.rows, unit)
    # gradient with respect to M (module docstring):
    # c_logdet M^-1 - M^-1 [C~, c~] [M^-1 DS, M^-1 Dr]' - c_s zt zt'
    g_m = c_logdet * minv - c_s * zt[:, None] * zt[None]
    g_e = None
    if pooling == "partial":
        # C~ = D^-1 c_y, c~ = D^-1 c_z; N = M^-1 [C~, c~]
        c_t = jnp.concatenate([c_y, c_z[:, None]], axis=1)[:, :, None] / d[:, None]
        n = _tri_tmm(f.rows, _tri_mm(f.rows, c_t, unit), unit)
        g_m = g_m - _mmt_small(n, f.v, unit)
        g_e = n[:, :q]  # gradient with respect to E = D S
        g_dr = n[:, q] + 2.0 * c_s * zt  # ... to D r
    else:
        g_dr = 2.0 * c_s * zt
    g_m = materialize(g_m, unit)
    dsd = d[:, None] * gram * d[None]
    grad_inv = jnp.sum(g_m * dsd)
    grad_base = grad_blk = None
    if "base" in want:
        # M = I + inv D S D, E = D S, Dr; and C~, c~ through D^-1
        g_sym = g_m + _tr(g_m)
        grad_d = inv * _sum1(g_sym * gram * d[None]) + g_dr * blk.xty
        if pooling == "partial":
            y = f.v[:, :q] / d[:, None]
            grad_d = grad_d + _sum1(g_e * gram) - _sum1(y * c_t[:, :q])
            grad_d = grad_d - f.v[:, q] / d * c_t[:, q]
        grad_base = jnp.sum(grad_d * blk.onq, axis=-1)
    if "stats" in want:
        g_gram = inv * d[:, None] * g_m * d[None]
        if g_e is not None:
            g_gram = g_gram + d[:, None] * g_e
        grad_blk = _Blocks(g_gram, d * g_dr, None, None)
    return grad_inv, grad_base, grad_blk


def _sum1(a):
    # Sum over the second (short) axis as elementwise adds.
    return sum(a[:, j] for j in range(a.shape[1]))


def _block_loop(body, carry, blocks):
    # lax.scan over the blocks; no loop for a single block (a smaller
    # program, the same as without blocking).
    if blocks.onq.shape[0] == 1:
        carry, ys = body(carry, _block(blocks, 0))
        return carry, jax.tree_util.tree_map(lambda a: a[None], ys)

    def step(carry, xs):
        return body(carry, _Blocks(*xs, blocks.unit))

    return jax.lax.scan(step, carry, (blocks.gram, blocks.xty, blocks.onq))


def _block(blocks, i):
    return _Blocks(blocks.gram[i], blocks.xty[i], blocks.onq[i], blocks.unit)


def population_factor(precision, prior_var):
    """Inverse Cholesky factor of the population coefficients' precision.

    Parameters
    ----------
    precision : array of shape (q, q)
        The (symmetric) precision from the data.
    prior_var : array of shape (q,)
        Prior variances of the population coefficients.

    Returns
    -------
    t : array of shape (q, q)
        ``L^-1`` (lower) for ``lam = precision + diag(1 / prior_var) = L L'``.
    logdet : scalar
        ``log|lam|``.
    """
    lam = precision + jnp.diag(1.0 / prior_var)
    t, logdet = inverse_cholesky(lam[:, :, None])
    return t[:, :, 0], logdet[0]


def population_integral(precision, eta, prior_var):
    """The population coefficients integrated out of a Gaussian form.

    With ``lam = precision + diag(1 / prior_var)``: the terms
    ``-log|lam| / 2 + eta' lam^-1 eta / 2`` of
    ``log int exp(-phi' precision phi / 2 + phi' eta) N(phi; 0,
    diag(prior_var)) dphi`` that depend on the form (the prior's
    ``-log|diag(prior_var)| / 2`` is the caller's), and what their gradient
    needs: with ``v = lam^-1 eta``, d/d lam = ``-(lam^-1 + v v') / 2`` and
    d/d eta = ``v``.

    Parameters
    ----------
    precision : array of shape (q, q)
        The (symmetric) precision from the data.
    eta : array of shape (q,)
    prior_var : array of shape (q,)
        Prior variances of the population coefficients.

    Returns
    -------
    value : scalar
    lam_inv : array of shape (q, q)
    v : array of shape (q,)
    """
    t, logdet = population_factor(precision, prior_var)
    lam_inv = t.T @ t
    v = lam_inv @ eta
    return -0.5 * logdet + 0.5 * eta @ v, lam_inv, v


def _population_terms(inv, total, prior_var):
    # log p of the population integral from the summed forms, and what its
    # gradient needs: lam^-1 and lam^-1 h.
    q = total.shape[0] - 1
    precision = 0.5 * inv * (total[:q, :q] + total[:q, :q].T)
    value, lam_inv, v = population_integral(precision, inv * total[:q, q], prior_var)
    return -0.5 * jnp.sum(jnp.log(prior_var)) + value, lam_inv, v


def _pooled_total(pop_left, s, y, z):
    # The summed forms [a, b]' M^-1 [a, b] of the population integral:
    # F'H F and F'eta (times sigma^2 and sigma^4) and the r'..r term.
    q = pop_left.shape[0]
    total = jnp.zeros((q + 1, q + 1))
    total = total.at[:q, :q].set(pop_left.T @ y @ pop_left)
    return total.at[:q, q].set(pop_left.T @ z).at[q, q].set(s)


# The blocks' factorizations are kept from the value's pass over the groups
# for the gradient's pass while they take at most KEEP_FACTORS_BYTES (per
# chain); above, the gradient's pass factorizes each block again
# (docs/performance.md, "Kept factorizations").


def _keeps_factors(blocks):
    # Whether the factorizations fit in KEEP_FACTORS_BYTES (d, T, log|M|,
    # u and v of every group).
    n_blocks, q, _, size = blocks.gram.shape
    return 8 * n_blocks * size * (3 * q * q + 3 * q + 1) <= _limits.KEEP_FACTORS_BYTES


def _pooled_loglik_fwd(static, inv, base, blocks, pop_left, prior_var):
    pooling, want, unroll = static
    zero = jnp.zeros(())
    if pooling == "none":
        # Cotangents known before the sum over groups: value and gradient
        # in one pass.
        cot = (-0.5, 0.5 * inv**2, None, None)

        def body(carry, blk):
            f = _block_factor(pooling, inv, base, blk, unroll)
            logdet, s, _, _ = _block_sums(pooling, f)
            grad_inv, _, grad_blk = _block_grads(pooling, want, inv, blk, f, cot)
            return (carry[0] + logdet, carry[1] + s, carry[2] + grad_inv), grad_blk

        (logdet, s, grad_inv), grad_blocks = _block_loop(
            body, (zero, zero, zero), blocks
        )
        logp = -0.5 * logdet + 0.5 * inv**2 * s
        return logp, (inv * s + grad_inv, grad_blocks)
    q = base.shape[0]
    if blocks.onq.shape[0] == 1:
        # one block: keep its factors for the gradient
        f = _block_factor(pooling, inv, base, _block(blocks, 0), unroll)
        logdet, s, y, z = _block_sums(pooling, f)
        saved = f
    else:
        keep = _keeps_factors(blocks)

        def body(carry, blk):
            f = _block_factor(pooling, inv, base, blk, unroll)
            sums = jax.tree_util.tree_map(jnp.add, carry, _block_sums(pooling, f))
            return sums, (f if keep else None)

        zeros = (zero, zero, jnp.zeros((q, q)), jnp.zeros(q))
        (logdet, s, y, z), saved = _block_loop(body, zeros, blocks)
    total = _pooled_total(pop_left, s, y, z)
    pop, lam_inv, v = _population_terms(inv, total, prior_var)
    logp = -0.5 * logdet + 0.5 * inv**2 * s + pop
    return logp, (inv, base, blocks, pop_left, total, lam_inv, v, saved)


def _pooled_loglik_bwd(static, residuals, g):
    pooling, want, unroll = static
    scale = lambda x: None if x is None else g * x  # noqa: E731
    if pooling == "none":
        grad_inv, grad_blocks = residuals
        return (
            g * grad_inv,
            None,
            jax.tree_util.tree_map(scale, grad_blocks),
            None,
            None,
        )
    inv, base, blocks, pop_left, total, lam_inv, v, saved = residuals
    q = base.shape[0]
    # cotangents of the summed forms (the same for every group) and the
    # gradient with respect to inv of the population terms given them
    lam_bar = -0.5 * (lam_inv + jnp.outer(v, v))
    c_y = inv * pop_left @ lam_bar @ pop_left.T
    c_z = inv * pop_left @ v
    cot = (-0.5, 0.5 * inv**2, c_y, c_z)
    grad_inv = inv * total[q, q] + jnp.sum(lam_bar * total[:q, :q]) + v @ total[:q, q]
    if blocks.onq.shape[0] == 1:
        grads = _block_grads(pooling, want, inv, _block(blocks, 0), saved, cot)
        grad_groups, grad_base = grads[0], grads[1]
        grad_blocks = jax.tree_util.tree_map(lambda a: a[None], grads[2])
    else:
        # second pass: each block's gradient, from its kept factorization
        # or from the factorization again

        def body(carry, xs):
            blk, f = _Blocks(*xs[0], blocks.unit), xs[1]
            if f is None:
                f = _block_factor(pooling, inv, base, blk, unroll)
            grads = _block_grads(pooling, want, inv, blk, f, cot)
            return (carry[0] + grads[0], carry[1] + grads[1]), grads[2]

        zeros = (jnp.zeros(()), jnp.zeros(q))
        xs = ((blocks.gram, blocks.xty, blocks.onq), saved)
        (grad_groups, grad_base), grad_blocks = jax.lax.scan(body, zeros, xs)
    return (
        g * (grad_inv + grad_groups),
        scale(grad_base),
        jax.tree_util.tree_map(scale, grad_blocks),
        None,
        None,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pooled_loglik(static, inv, base, blocks, pop_left, prior_var):
    # The terms of the log marginal likelihood under partial or no pooling
    # that involve the groups' factorizations (all but the n and u'Wu
    # terms), with the closed-form gradient of the module docstring,
    # blockwise: a pass over the blocks sums the forms; the population
    # terms follow; the gradient takes a second pass (over the
    # factorizations kept from the first while they fit in
    # KEEP_FACTORS_BYTES, else each block's factorization again) or, under
    # no pooling, comes with the first. static = (pooling,
    # want, unroll): want, the gradients to form besides inv's ("base": the
    # between-group sds; "stats": the statistics, when they depend on latent
    # cells); unroll, how to factorize (see is_unrolled).
    return _pooled_loglik_fwd(static, inv, base, blocks, pop_left, prior_var)[0]


_pooled_loglik.defvjp(_pooled_loglik_fwd, _pooled_loglik_bwd)


def _base_sd(pooling, values, hyper):
    # The base of the deviation sds d = base on + (1 - on) (intercept first).
    if pooling == "partial":
        return jnp.concatenate([jnp.atleast_1d(values["tau_a"]), values["tau"]])
    return jnp.concatenate([jnp.atleast_1d(hyper.intercept), hyper.coef])


def _prepared_loglik(
    pooling, prep, blocks, pop_left, sigma, base, hyper, stats_grad=False
):
    """Log marginal likelihood from prepared statistics (see module doc).

    ``blocks``: the statistics in blocks (:func:`_group_blocks`; None under
    complete pooling); ``stats_grad``: whether the gradient with respect to
    the statistics is wanted (they depend on latent cells).
    """
    inv = 1.0 / sigma**2
    prior_var = jnp.concatenate([hyper.intercept[None] ** 2, hyper.coef**2])
    logp = 0.5 * jnp.sum(prep.n) * jnp.log(inv / (2.0 * jnp.pi)) - 0.5 * inv * jnp.sum(
        prep.yty
    )
    if pooling != "complete":
        want = ("base",) if pooling == "partial" else ()
        want = want + (("stats",) if stats_grad else ())
        return logp + _pooled_loglik(
            (pooling, want, is_unrolled(base.shape[0])),
            inv,
            base,
            blocks,
            pop_left,
            prior_var,
        )
    total = jnp.zeros((prior_var.shape[0] + 1,) * 2)
    total = total.at[:-1, :-1].set(prep.pop_gram).at[:-1, -1].set(prep.pop_xty)
    return logp + _population_terms(inv, total, prior_var)[0]


def marginal_loglik(pooling, values, data, hyper, cells):
    """Log marginal likelihood with group coefficients and population out.

    Parameters
    ----------
    pooling : {"partial", "none", "complete"}
    values : dict
        ``sigma`` and, under partial pooling, ``tau_a`` and ``tau``.
    data : CollapsedData
    hyper : Hyper
    cells : array of shape (M,)
        Latent cells.

    Returns
    -------
    scalar
    """
    prep, blocks = _prepared_stats(pooling, data, _fixed_stats(pooling, data), cells)
    base = None if pooling == "complete" else _base_sd(pooling, values, hyper)
    stats_grad = data.miss_row.shape[0] > 0
    return _prepared_loglik(
        pooling, prep, blocks, _pop_left(data), values["sigma"], base, hyper, stats_grad
    )


def cell_sums(data, cells):
    """Count, sum and sum of squares of each (group, imputed column)'s cells.

    Observed cells weighted as in the statistics, each latent cell once.

    Parameters
    ----------
    data : CollapsedData
    cells : array of shape (..., M)
        Latent cells (internal units); leading axes are draws.

    Returns
    -------
    count, total, sumsq : arrays of shape (..., G, P)
    """
    n_groups, n_cols = data.x_count.shape
    pair = data.inc_group[data.miss_row] * n_cols + data.miss_slot
    lead = cells.shape[:-1]

    def seg(v):
        # (..., M) -> (..., G, P): a sum into the pairs of the last axis
        v = jnp.moveaxis(v, -1, 0)
        out = jax.ops.segment_sum(v, pair, num_segments=n_groups * n_cols)
        return jnp.moveaxis(out, 0, -1).reshape(*lead, n_groups, n_cols)

    return (
        data.x_count + seg(jnp.ones_like(cells)),
        data.x_sum + seg(cells),
        data.x_sumsq + seg(cells**2),
    )


def imputation_loglik(data, scale, cells):
    """The imputation model's log density with ``x_loc`` integrated out.

    In :func:`hiermask._model.direct_model` the cells (observed and latent)
    of feature ``j`` in group ``g`` are ``Normal(loc_gj, scale_j)`` given
    ``loc_gj ~ Normal(0, L)`` (``L`` = ``IMPUTE_LOC_SCALE``). ``loc_gj``
    integrates out of each pair exactly: with ``N``, ``S`` and ``Q`` the
    pair's (weighted) count, sum and sum of squares and ``s = scale_j``,

        -N/2 log(2 pi s^2) - (Q - S^2 / (N + s^2/L^2)) / (2 s^2)
        - log(1 + N L^2/s^2) / 2,

    for unit weights the normal density of the pair's cells with covariance
    ``s^2 I + L^2 11'``. Its conditional is :func:`loc_moments`'.

    Parameters
    ----------
    data : CollapsedData
    scale : array of shape (P,)
    cells : array of shape (M,)

    Returns
    -------
    scalar
    """
    count, total, sumsq = cell_sums(data, cells)
    s2 = scale**2
    lam = IMPUTE_LOC_SCALE**2
    quad = sumsq - total**2 / (count + s2 / lam)
    return jnp.sum(
        -0.5 * count * jnp.log(2.0 * jnp.pi * s2)
        - 0.5 * quad / s2
        - 0.5 * jnp.log1p(count * (lam / s2))
    )


def loc_moments(data, scale, cells, chunk=None):
    """Posterior mean and variance of ``x_loc`` from its exact conditional.

    Given a draw's ``scale`` and latent cells, ``loc_gj ~ Normal(S / (N +
    s^2/L^2), s^2 / (N + s^2/L^2))`` (see :func:`imputation_loglik`); over
    the draws, the mean of the conditional means and the mean conditional
    variance plus the variance of the conditional means
    (Rao-Blackwellized: no random numbers). Draws go ``chunk`` at a time
    (by default as many as make about 2**22 pairs).

    Parameters
    ----------
    data : CollapsedData
    scale : ndarray of shape (D, P)
    cells : ndarray of shape (D, M)
    chunk : int, optional

    Returns
    -------
    mean, var : ndarray of shape (G, P)
        Internal units.
    """
    lam = IMPUTE_LOC_SCALE**2
    scale, cells = np.asarray(scale), np.asarray(cells)
    n_draws = scale.shape[0]
    if chunk is None:
        chunk = max(1, (1 << 22) // max(1, data.x_count.size))

    def conditional(lo):
        hi = min(lo + chunk, n_draws)
        with jax.enable_x64(True):
            count, total, _ = cell_sums(data, jnp.asarray(cells[lo:hi]))
        count, total = np.asarray(count), np.asarray(total)
        denom = count + (scale[lo:hi, None, :] ** 2) / lam
        return total / denom, scale[lo:hi, None, :] ** 2 / denom

    starts = range(0, n_draws, chunk)
    mean = sum(conditional(lo)[0].sum(axis=0) for lo in starts) / n_draws
    var = 0.0
    for lo in starts:
        m, v = conditional(lo)
        var = var + v.sum(axis=0) + ((m - mean) ** 2).sum(axis=0)
    return mean, var / n_draws


class _Layout(NamedTuple):
    # Where each sampled site sits in the flat vector, and its prior.
    sites: list  # (name, shape, positive, prior scale or None)
    offsets: np.ndarray  # (n_sites + 1,)
    positive: np.ndarray  # (size,) bool: softplus-transformed coordinates
    has_prior: np.ndarray  # (size,) bool: Normal / HalfNormal prior here
    prior_scale: jnp.ndarray  # (size,)

    def transform(self, z):
        return jnp.where(self.positive, jax.nn.softplus(z), z)

    def log_prior(self, z):
        """The point ``x`` of ``z``, and the log-Jacobians of its softplus
        coordinates plus the Normal / HalfNormal priors of all sites at once
        (constants dropped)."""
        x = self.transform(z)
        logp = jnp.sum(jnp.where(self.positive, jax.nn.log_sigmoid(z), 0.0))
        logp = logp - 0.5 * jnp.sum(
            jnp.where(self.has_prior, (x / self.prior_scale) ** 2, 0.0)
        )
        return x, logp

    def unpack(self, x):
        return {
            name: x[start:stop].reshape(shape)
            for (name, shape, _, _), start, stop in zip(
                self.sites, self.offsets[:-1], self.offsets[1:], strict=True
            )
        }


def imputation_sites(data):
    """The imputation model's sampled sites, first in the flat vector.

    ``(name, shape, positive, prior scale)`` as in :func:`_layout`; none
    without latent cells. The general model (:mod:`hiermask._general`)
    lays out the same sites.

    Parameters
    ----------
    data : CollapsedData

    Returns
    -------
    list of tuple
    """
    n_cells = data.miss_row.shape[0]
    if not n_cells:
        return []
    n_cols = data.impute_cols.shape[0]
    # x_loc is integrated out (imputation_loglik)
    return [
        ("x_scale", (n_cols,), True, IMPUTE_SCALE_SCALE),
        ("x_missing", (n_cells,), False, None),
    ]


def _layout(data, hyper, pooling):
    """The sampled sites of the collapsed model, in the flat vector's order.

    Each site is ``(name, shape, positive, prior scale)``: a Normal prior
    (HalfNormal when positive) of that scale; None for the latent cells,
    whose prior is the imputation model.
    """
    n_features = data.on.shape[1]
    sites = imputation_sites(data)
    sites.append(("noise", (), True, hyper.noise))
    if pooling == "partial":
        sites += [
            ("intercept_scale", (), True, hyper.group_intercept),
            ("coef_scale", (n_features,), True, hyper.group_coef),
        ]
    return layout_of(sites)


def layout_of(sites):
    # The _Layout of a list of sites (name, shape, positive, prior scale).
    sizes = [math.prod(shape) for _, shape, _, _ in sites]
    prior_scale = jnp.concatenate(
        [
            jnp.broadcast_to(1.0 if scale is None else scale, (width,))
            for (_, _, _, scale), width in zip(sites, sizes, strict=True)
        ]
    )
    return _Layout(
        sites=sites,
        offsets=np.cumsum([0, *sizes]),
        positive=np.repeat([site[2] for site in sites], sizes),
        has_prior=np.repeat([site[3] is not None for site in sites], sizes),
        prior_scale=prior_scale,
    )


def _fixed_stats(pooling, data):
    # What _prepared_stats adds the latent cells' rows to: the complete
    # rows prepared (split_prepared), in blocks (only onq under complete
    # pooling), and the incomplete rows.
    prep, rows = split_prepared(pooling, data)
    return prep, _group_blocks(prep, data.on), rows


def _prepared_stats(pooling, data, fixed, cells):
    # The prepared statistics and blocks given the latent cells: the fixed
    # ones plus the incomplete rows' (row_statistics), in their groups.
    prep, blocks, rows = fixed
    if not data.miss_row.shape[0]:
        return prep, blocks
    gram, xty = row_statistics(data, rows, cells)
    if pooling == "complete":
        return prep._replace(
            pop_gram=prep.pop_gram + jnp.sum(gram, axis=0),
            pop_xty=prep.pop_xty + jnp.sum(xty, axis=0),
        ), blocks
    return prep, _blocks_with_rows(blocks, rows, gram, xty)


def collapsed_density(data: CollapsedData, hyper: Hyper, pooling: str = "partial"):
    """The collapsed posterior as a density over one flat unconstrained vector.

    The posterior of :func:`hiermask._model.direct_model` with the population
    means and group coefficients integrated out (same sites, priors and
    likelihood), written by hand: positive sites are softplus transforms of
    unconstrained coordinates, with their log-Jacobians. Unlike exp, softplus
    grows linearly, so a half-normal prior's tail stays Gaussian in the
    unconstrained space instead of exp(2x)-steep (where NUTS diverges when a
    scale is informed by little more than its prior, as a between-group sd
    over two groups is). Statistics that do not depend on sampled values are
    prepared once, here; the transforms and priors act on the whole vector
    at once, which keeps the compiled gradient small.

    Parameters
    ----------
    data : CollapsedData
    hyper : Hyper
    pooling : {"partial", "none", "complete"}

    Returns
    -------
    FlatDensity
    """
    layout = _layout(data, hyper, pooling)
    n_cells = data.miss_row.shape[0]
    # prepared once, outside the gradient (the latent cells' rows are added
    # in each evaluation)
    fixed = _fixed_stats(pooling, data)

    def log_density(z):
        x, logp = layout.log_prior(z)
        values = layout.unpack(x)
        scales = {"sigma": values["noise"]}
        if pooling == "partial":
            scales["tau_a"] = values["intercept_scale"]
            scales["tau"] = values["coef_scale"]
        cells = values.get("x_missing")
        if n_cells:
            logp = logp + imputation_loglik(data, values["x_scale"], cells)
        stats = _prepared_stats(pooling, data, fixed, cells)
        base = None if pooling == "complete" else _base_sd(pooling, scales, hyper)
        return logp + _prepared_loglik(
            pooling,
            *stats,
            _pop_left(data),
            scales["sigma"],
            base,
            hyper,
            stats_grad=n_cells > 0,
        )

    def constrain(z):
        return layout.unpack(layout.transform(z))

    return FlatDensity(
        int(layout.offsets[-1]),
        lambda z: -log_density(z),
        constrain,
        *noise_start(data, pooling, layout),
    )


def noise_start(data, pooling, layout):
    """Where chains start, and the first metric: ``(center, radius, variance)``.

    The residual sd starts within 4 standard errors of the least-squares
    guess (within +-2 of it in the unconstrained space if that is narrower),
    the rest in +-2 around 0 as usual: with many rows the residual sd is
    known to a fraction of a percent, and a chain that starts it far away
    spends the warmup windows walking in, which ruins their variance
    estimates (a stuck chain, seen at 1e6 rows). Its first warmup metric is
    that standard error squared (near the mode the gradient, which sets the
    others', says little of its scale); NaN elsewhere.
    """
    size = len(layout.positive)
    guess = data.noise_guess[1 if pooling == "complete" else 0]
    at = layout.offsets[[site[0] for site in layout.sites].index("noise")]
    z_guess = _inverse_softplus(guess[0])
    sd_z = guess[1] / jax.nn.sigmoid(z_guess)
    known = guess[1] > 0
    center = jnp.zeros(size).at[at].set(jnp.where(known, z_guess, 0.0))
    radius = (
        jnp.full(size, INIT_RADIUS)
        .at[at]
        .set(jnp.where(known, jnp.minimum(INIT_RADIUS, 4.0 * sd_z), INIT_RADIUS))
    )
    variance = jnp.full(size, jnp.nan).at[at].set(jnp.where(known, sd_z**2, jnp.nan))
    return center, radius, variance


def _inverse_softplus(x):
    # log(exp(x) - 1), stable for large x
    return x + jnp.log(-jnp.expm1(-x))


# conditional_draws processes draws in chunks of at most this many
# (draws x groups x q x q) floats (one random-number call per chunk).

# A tile of a chunk (its draws by one block of groups) holds about this many
# times the (draw, group) pairs of a density block.


def _population_draw(inv, lam_total, h_total, prior_var, eps):
    # phi ~ N(lam^-1 h, lam^-1), lam = inv sym(lam_total) + diag(1 /
    # prior_var), h = inv h_total: phi = t' (t h + eps), lam^-1 = t't.
    t, _ = population_factor(0.5 * inv * (lam_total + lam_total.T), prior_var)
    return t.T @ (t @ (inv * h_total) + eps)


def _group_draw(pooling, inv, blk, phi, eps, consts, chol):
    """One draw's conditional draws of a block's groups given ``phi``.

    ``theta = b0 + A D v`` with ``b0 = F phi + f`` and ``v | phi ~ N(inv
    M^-1 D (A'r - A'SF phi), M^-1)``, ``M^-1 = T'T`` (``chol``: what
    :func:`_block_chol` returns). Returns the draw and the conditional mean
    of ``theta`` (q, B) and ``D M^-1 D`` (q, q, B): the conditional
    covariance of ``theta`` is ``A D M^-1 D A'``.
    """
    _, _, k_pop, a_row = consts
    unit = blk.unit
    d, rows = chol[:2]  # _block_chol
    q = d.shape[0]
    resid = blk.xty
    if pooling == "partial":
        # A'SF phi = A'SA (A^-1 F phi); A^-1 F phi = pop_left phi
        left = jnp.concatenate([phi[:1] + k_pop @ phi[1:], phi[1:]])
        resid = resid - sum(blk.gram[:, j] * left[j] for j in range(q))
    b0 = _prior_mean(pooling, blk.onq, phi, consts)
    w = inv * _tri_mm(rows, (d * resid)[:, None], unit)[:, 0]
    v = _tri_tmm(rows, jnp.stack([w, w + eps], axis=1), unit)  # mean, draw
    dmd = d[:, None] * _tri_gram(rows, unit) * d[None]
    # A D v, A the identity with first row [1, row]
    dv = d[:, None] * v
    row = blk.onq[1:] * a_row[:, None]
    adv = jnp.concatenate([dv[:1] + jnp.sum(row[:, None] * dv[1:], 0)[None], dv[1:]])
    return b0 + adv[:, 1], b0 + adv[:, 0], dmd


def _prior_mean(pooling, onq, phi, consts):
    # b0 = F phi + f of a block's groups (q, B); onq (q, B).
    e_y, k, k_pop, _ = consts
    if pooling == "none":
        return jnp.zeros((onq.shape[0], 1)).at[0].set(-e_y)
    # F: first row [1, on k - K], then diag(on)
    on = onq[1:]
    first = phi[0] + jnp.sum((on * k[:, None] + k_pop[:, None]) * phi[1:, None], 0)
    return jnp.concatenate([first[None] - e_y, on * phi[1:, None]])


def _apply_a(x, row):
    # A x A' for A the identity with first row [1, row]; x (q, q, G).
    x = jnp.concatenate([x[:1] + jnp.sum(row[:, None] * x[1:], 0)[None], x[1:]])
    return jnp.concatenate(
        [x[:, :1] + jnp.sum(row[None] * x[:, 1:], 1)[:, None], x[:, 1:]], axis=1
    )


def _fmix32(h):
    # MurmurHash3's finalizer: a bijective mixing of uint32 words.
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def chunk_key_data(rng_key, chunk):
    # Key material of XLA's native generator for one chunk, mixed from the
    # caller's key and the chunk index (no threefry in the program: each
    # threefry call site costs a large share of a small program's compile).
    if jnp.issubdtype(rng_key.dtype, jax.dtypes.prng_key):
        rng_key = jax.random.key_data(rng_key)
    words = jnp.ravel(rng_key).astype(jnp.uint32)
    seed = _fmix32(words[0] ^ _fmix32(words[-1] ^ jnp.uint32(0x9E3779B9)))
    salt = jnp.arange(4, dtype=jnp.uint32) + 4 * chunk.astype(jnp.uint32)
    return _fmix32(seed ^ _fmix32(salt + jnp.uint32(0x7F4A7C15)))


def _draw_tiling(chunk, n_groups, q):
    # Draws per tile and tiles per chunk (padded): a tile's draws by a
    # block's groups are about _TILE_FACTOR density blocks.
    size, _ = _blocking(n_groups, q)
    pairs = _limits.CONDITIONAL_TILE_FACTOR * _blocking(1 << 40, q)[0]
    per_tile = max(1, min(chunk, pairs // size))
    n_sub = -(-chunk // per_tile)
    return -(-chunk // n_sub), n_sub


def maybe_scan(body, carry, xs, n):
    # lax.scan over n steps; no loop for one step.
    if n == 1:
        carry, ys = body(carry, jax.tree_util.tree_map(lambda a: a[0], xs))
        return carry, jax.tree_util.tree_map(lambda a: a[None], ys)
    return jax.lax.scan(body, carry, xs)


def conditional_chunk(n_draws, n_groups, q):
    """Draws per chunk of :func:`conditional_draws` (one random-number call).

    Parameters
    ----------
    n_draws, n_groups, q : int
        Posterior draws, groups and coefficients per group.

    Returns
    -------
    int
    """
    return max(1, min(n_draws, _limits.CONDITIONAL_CHUNK_FLOATS // (n_groups * q * q)))


class _DrawPlan(NamedTuple):
    # The static sizes of a run of conditional draws.
    pooling: str
    n_draws: int
    n_groups: int
    q: int
    chunk: int  # draws per chunk (one random-number call)
    n_chunks: int
    size: int  # groups per block
    n_blocks: int
    tile: int  # draws per tile
    n_sub: int  # tiles per chunk
    unroll: bool
    n_cells: int


class _DrawConsts(NamedTuple):
    # What every tile reads: the data and the population's constants.
    data: CollapsedData
    prior_var: jnp.ndarray  # (q,)
    pop_left: jnp.ndarray  # (q, q)
    consts: tuple  # e_y, k, -K and the first row of A (over the slopes)
    fixed: tuple  # _fixed_stats


def _draw_plan(n_draws, data, pooling, chunk):
    n_groups, n_features = data.on.shape
    q = n_features + 1
    if chunk is None:
        chunk = conditional_chunk(n_draws, n_groups, q)
    chunk = min(chunk, n_draws)
    size, n_blocks = _blocking(n_groups, q)
    tile, n_sub = _draw_tiling(chunk, n_groups, q)
    return _DrawPlan(
        pooling=pooling,
        n_draws=n_draws,
        n_groups=n_groups,
        q=q,
        chunk=chunk,
        n_chunks=-(-n_draws // chunk),
        size=size,
        n_blocks=n_blocks,
        tile=tile,
        n_sub=n_sub,
        unroll=is_unrolled(q),
        n_cells=data.miss_row.shape[0],
    )


def _chunked(plan, x):
    # (D, ...) -> (n_chunks, n_sub, tile, ...); padding repeats the last
    # draw (weight 0)
    n_chunks, chunk = plan.n_chunks, plan.chunk
    x = jnp.concatenate([x, jnp.repeat(x[-1:], n_chunks * chunk - plan.n_draws, 0)])
    x = x.reshape(n_chunks, chunk, *x.shape[1:])
    x = jnp.concatenate(
        [x, jnp.repeat(x[:, -1:], plan.n_sub * plan.tile - chunk, axis=1)], axis=1
    )
    return x.reshape(n_chunks, plan.n_sub, plan.tile, *x.shape[2:])


def _per_draw(plan, draws, hyper, n_valid):
    """Each draw's sigma, base sds, latent cells and weight, in tiles."""
    if plan.pooling == "partial":
        base = jnp.concatenate(
            [draws["intercept_scale"][:, None], draws["coef_scale"]], axis=1
        )
    else:
        base = jnp.broadcast_to(_base_sd("none", None, hyper), (plan.n_draws, plan.q))
    n_chunks, chunk = plan.n_chunks, plan.chunk
    keep = jnp.arange(n_chunks * chunk) < n_valid
    keep = jnp.concatenate(
        [
            keep.reshape(n_chunks, chunk),
            jnp.zeros((n_chunks, plan.n_sub * plan.tile - chunk), bool),
        ],
        axis=1,
    )
    return (
        _chunked(plan, draws["noise"]),
        _chunked(plan, base),
        _chunked(plan, draws.get("x_missing", jnp.zeros((plan.n_draws, 0)))),
        keep.reshape(n_chunks, plan.n_sub, plan.tile).astype(float),
    )


def _draw_statistics(plan, c, cells):
    # The tile's statistics and blocks, and the vmap axis of the blocks
    # (0: one per draw, given its latent cells; None: shared).
    if not plan.n_cells:
        return (*c.fixed[:2], None)
    prep, blocks = jax.vmap(
        lambda x: _prepared_stats(plan.pooling, c.data, c.fixed, x)
    )(cells)
    # blocks by draw -> draws inside each block
    blocks = _Blocks(
        *(None if a is None else jnp.moveaxis(a, 0, 1) for a in blocks[:3]),
        blocks.unit[0],
    )
    return prep, blocks, 0


def _vmapped(axis, fn, *args):
    # fn over the tile's draws; statistics (args 2-4) shared unless per draw
    return jax.vmap(fn, (0, 0, axis, axis, axis, *[0] * (len(args) - 5)))(*args)


def _tile_population(plan, c, tile_stats, inv, base, eps_pop, first):
    """The tile's draws of the population vector ``phi`` (tile, q)."""
    prep, blocks, axis = tile_stats
    pooling = plan.pooling
    if pooling == "none":
        return jnp.zeros((plan.tile, plan.q))
    if pooling == "complete":
        return jax.vmap(_population_draw, (0, axis, axis, None, 0))(
            inv, prep.pop_gram, prep.pop_xty, c.prior_var, eps_pop
        )

    def factor(i, b, g, r, o):
        return _block_factor(pooling, i, b, _Blocks(g, r, o, blocks.unit), plan.unroll)

    def sums(carry, x):
        f = _vmapped(axis, factor, inv, base, *x) if first is None else first
        _, _, y, z = jax.vmap(functools.partial(_block_sums, pooling))(f)
        return (carry[0] + y, carry[1] + z), None

    q = plan.q
    xs = (blocks.gram, blocks.xty, blocks.onq)
    zeros = (jnp.zeros((plan.tile, q, q)), jnp.zeros((plan.tile, q)))
    (y, z), _ = maybe_scan(sums, zeros, xs, plan.n_blocks)
    total_y = jnp.einsum("ki,dkl,lj->dij", c.pop_left, y, c.pop_left)
    total_z = z @ c.pop_left
    return jax.vmap(_population_draw, (0, 0, 0, None, 0))(
        inv, total_y, total_z, c.prior_var, eps_pop
    )


def _tile_groups(plan, c, tile_stats, inv, base, phi, weight, first, eps_group, acc):
    """Every group's draws given the tile's ``phi``, block by block, and the
    weighted sums of their conditional moments; returns ``(acc, coef)``."""
    _, blocks, axis = tile_stats
    pooling, tile, q = plan.pooling, plan.tile, plan.q

    def one(i, b, g, r, o, p, e, *chol):
        blk = _Blocks(g, r, o, blocks.unit)
        if not chol:
            chol = _block_chol(i, b, blk, plan.unroll)
        return _group_draw(pooling, i, blk, p, e, c.consts, chol)

    def groups(carry, x):
        gram, xty, onq_b, eps, acc_b = x
        if pooling == "complete":
            mean = jax.vmap(_prior_mean, (None, axis, 0, None))(
                pooling, onq_b, phi, c.consts
            )
            coef, dmd = mean, jnp.zeros((tile, q, q, plan.size))
        else:
            chol = () if first is None else (first.d, first.rows)
            coef, mean, dmd = _vmapped(
                axis, one, inv, base, gram, xty, onq_b, phi, eps, *chol
            )
        w = weight[:, None, None]
        acc_b = (
            acc_b[0] + jnp.sum(w * mean, 0),
            acc_b[1] + jnp.sum(w[..., None] * dmd, 0),
            acc_b[2] + jnp.sum(w[..., None] * mean[:, :, None] * mean[:, None], 0),
        )
        return carry, (jnp.swapaxes(coef, 1, 2), acc_b)

    xs = (blocks.gram, blocks.xty, blocks.onq, eps_group, acc)
    _, (coef, acc) = maybe_scan(groups, None, xs, plan.n_blocks)
    # coef (n_blocks, tile, size, q) -> (tile, G, q)
    coef = jnp.moveaxis(coef, 0, 1).reshape(tile, plan.n_blocks * plan.size, q)
    return acc, coef[:, : plan.n_groups]


def _one_tile(plan, c, acc, args):
    """A tile's draws: ``phi`` given the sampled sites, then the groups."""
    sigma, base, cells, weight, eps_pop, eps_group = args
    inv = 1.0 / sigma**2
    tile_stats = _draw_statistics(plan, c, cells)
    _, blocks, axis = tile_stats
    # one block: one factorization for both passes
    first = None
    if plan.n_blocks == 1 and plan.pooling != "complete":

        def factor(i, b, g, r, o):
            blk = _Blocks(g, r, o, blocks.unit)
            return _block_factor(plan.pooling, i, b, blk, plan.unroll)

        first = _vmapped(
            axis,
            factor,
            inv,
            base,
            *(x[0] for x in (blocks.gram, blocks.xty, blocks.onq)),
        )
    phi = _tile_population(plan, c, tile_stats, inv, base, eps_pop, first)
    acc, coef = _tile_groups(
        plan, c, tile_stats, inv, base, phi, weight, first, eps_group, acc
    )
    return acc, (phi, coef)


def _chunk_normals(plan, rng_key, index):
    """A chunk's standard normals: population (n_sub, tile, q) and groups
    (n_sub, n_blocks, tile, q, size); the stream depends on ``index`` only."""
    q, chunk, tile, n_sub = plan.q, plan.chunk, plan.tile, plan.n_sub
    key_data = chunk_key_data(rng_key, index)
    normals = normal(uniform(key_data, (chunk, q * (plan.n_groups + 1))))
    normals = jnp.concatenate(
        [normals, jnp.zeros((n_sub * tile - chunk, normals.shape[1]))]
    )
    eps_pop = normals[:, :q].reshape(n_sub, tile, q)
    eps_group = _to_blocks(
        normals[:, q:].reshape(-1, q, plan.n_groups), plan.size, plan.n_blocks
    )
    eps_group = eps_group.reshape(plan.n_blocks, n_sub, tile, q, plan.size)
    return eps_pop, jnp.moveaxis(eps_group, 0, 1)


def _draw_results(plan, c, phi, coef, acc, n_valid):
    # The draws in the order of the posterior draws, and the moments.
    q, n_groups, chunk = plan.q, plan.n_groups, plan.chunk
    onq = jnp.concatenate([jnp.ones((n_groups, 1)), c.data.on], axis=1)
    phi = phi.reshape(plan.n_chunks, plan.n_sub * plan.tile, q)[:, :chunk]
    phi = phi.reshape(-1, q)[: plan.n_draws]
    coef = coef.reshape(plan.n_chunks, plan.n_sub * plan.tile, n_groups, q)[:, :chunk]
    coef = coef.reshape(-1, n_groups, q)[: plan.n_draws] * onq
    s_mean, s_dmd, s_outer = (_from_blocks(a, n_groups) / n_valid for a in acc)
    mean = s_mean.T
    cov = _apply_a(s_dmd, onq[:, 1:].T * c.consts[3][:, None]) + s_outer
    cov = jnp.moveaxis(cov, -1, 0) - mean[:, :, None] * mean[:, None, :]
    out = {"group_coef_internal": coef}
    if plan.pooling != "none":
        out["intercept_at_means"] = phi[:, 0]
        out["coef_mean"] = phi[:, 1:]
    return out, mean * onq, cov * onq[:, :, None] * onq[:, None, :]


def conditional_draws(
    rng_key, draws, data, hyper, pooling, chunk=None, first_chunk=0, n_valid=None
):
    """Exact draws of the population and group coefficients, one per draw.

    For each posterior draw of the sampled sites, the population vector
    ``phi = (ell, mu)`` is drawn from its Gaussian conditional, then every
    group's coefficients given ``phi``. Also returns the Rao-Blackwellized
    posterior mean and covariance of each group's coefficients (averages of
    the conditional moments given the drawn ``phi``). Draws are processed in
    chunks (one random-number call each, its stream fixed by the chunk's
    index), a chunk in tiles of a few draws, and a tile block by block of
    groups: a pass over the blocks sums what the population draws need, a
    second draws the groups given them. A run over consecutive parts of the
    draws, each starting at a whole chunk, gives the same draws as one run
    over all of them.

    Parameters
    ----------
    rng_key : jax.random.PRNGKey
    draws : dict of arrays with leading dimension D
        Posterior draws of the sampled sites.
    data : CollapsedData
    hyper : Hyper
    pooling : {"partial", "none", "complete"}
    chunk : int, optional
        Draws per chunk (static); by default :func:`conditional_chunk`.
    first_chunk : int or int array, default=0
        Index of the first chunk (for a part of a run).
    n_valid : int or int array, optional
        The first ``n_valid`` draws are real, the rest padding (excluded
        from the moments); by default all ``D``.

    Returns
    -------
    out : dict
        ``group_coef_internal`` (D, G, q) and, unless ``pooling="none"``,
        ``intercept_at_means`` (D,) and ``coef_mean`` (D, p).
    mean : array of shape (G, q)
    cov : array of shape (G, q, q)
    """
    plan = _draw_plan(draws["noise"].shape[0], data, pooling, chunk)
    n_valid = plan.n_draws if n_valid is None else n_valid
    prior_var = jnp.concatenate([hyper.intercept[None] ** 2, hyper.coef**2])
    a_row = data.k if pooling == "partial" else data.k - data.K
    c = _DrawConsts(
        data=data,
        prior_var=prior_var,
        pop_left=_pop_left(data),
        consts=(data.e_y, data.k, -data.K, a_row),
        fixed=_fixed_stats(pooling, data),
    )

    def one_chunk(acc, args):
        index, sigma, base, cells, weight = args
        eps_pop, eps_group = _chunk_normals(plan, rng_key, index)
        return maybe_scan(
            functools.partial(_one_tile, plan, c),
            acc,
            (sigma, base, cells, weight, eps_pop, eps_group),
            plan.n_sub,
        )

    q, size, n_blocks = plan.q, plan.size, plan.n_blocks
    acc = (
        jnp.zeros((n_blocks, q, size)),
        jnp.zeros((n_blocks, q, q, size)),
        jnp.zeros((n_blocks, q, q, size)),
    )
    index = jnp.arange(plan.n_chunks) + first_chunk
    per_draw = _per_draw(plan, draws, hyper, n_valid)
    acc, (phi, coef) = maybe_scan(one_chunk, acc, (index, *per_draw), plan.n_chunks)
    return _draw_results(plan, c, phi, coef, acc, n_valid)
