"""The collapsed engine's general model (issue 14), in plain JAX.

Population-only slopes (``varying``) and correlated group effects
(``covariance="full"``), with the group coefficients and the population means
integrated out exactly, as in :mod:`hiermask._collapsed` (whose module
docstring this follows). A group's coefficients in the internal basis are

    theta_g = f + A_g (P_g phi + E_g v_g),   v_g ~ Normal(0, I)

with ``A_g`` the identity with first row ``[1, on k]`` (partial pooling; ``[1,
on (k - K)]`` under no pooling): it maps the deviations of the intercept at
``x = 0`` and of the slopes to the internal intercept (at the centring point)
and slopes. ``E_g = diag(1, on_g) diag(s) L`` where ``s`` holds the
between-group sds (0 for a feature that does not vary) and ``L`` is the
Cholesky factor of the correlation matrix ``Omega`` placed on the intercept
and the varying features (the identity under ``covariance="diagonal"``), so
``E_g E_g'`` is the prior covariance of the group's deviations restricted to
the coefficients that apply to it (0 elsewhere): the marginal of the joint
normal on the features that are on. Under ``"full"`` the correlated effects
sit at the reference point ``K`` (the feature means when ``standardize``),
so ``E`` has first row ``[1, -K] diag(s) L`` (:func:`_deviation_factor`) and
the model does not depend on where a feature's zero lies.

Under partial pooling ``P_g phi`` are the population means (``phi = (ell,
mu)``, ``P_g = A_g^-1 F_g``); under no pooling ``phi`` holds the shared
slopes of the features that do not vary (the intercept and the varying
slopes are ``E_g v_g`` with the fixed prior sds).

With ``K = A'SA`` and ``k = A'r`` (the group's statistics of
:mod:`hiermask._collapsed`), ``M = I + E'KE / sigma^2 = L_M L_M'`` (>= I: no
inverse of an sd is needed, so a sd may be 0), ``T = L_M^-1``, ``a = T E'k``
and ``B = T E'K P``:

    log p(u_g | phi) = c_g - phi'H_g phi / 2 + phi'eta_g
    H_g = P'KP / sigma^2 - B'B / sigma^4,  eta_g = P'k / sigma^2 - B'a / sigma^4
    c_g = -n/2 log(2 pi sigma^2) - log|M|/2 - u'Wu / (2 sigma^2) + |a|^2 / (2 sigma^4)

and ``phi ~ Normal(0, diag(prior_var))`` integrates out. ``E`` is the same
for every group: its rows at a group's off features meet only zeros of ``K``
and ``k``. The reference is plain JAX differentiated by ``jax.grad``
(:func:`general_loglik` with ``hand_written=False``); the sampler's gradient
of the groups' terms is written by hand (:func:`_group_sums`; in blocks of
groups without latent cells :func:`_fixed_group_sums`; both tested against
``jax.grad``): ``jax.grad`` through the per-group algebra made each gradient
several times slower than today's hand-written path (docs/performance.md).
The groups' matrices are stored groups-last and factorized by unrolled code
up to :data:`hiermask._limits.UNROLL_MAX_SIZE` and by LAPACK above, as in
:mod:`hiermask._collapsed`. Conditional draws: ``phi`` from its Gaussian
conditional, then ``v_g | phi ~ Normal(M^-1 E'(k - KP phi) / sigma^2,
M^-1)``, one per posterior draw, with the Rao-Blackwellized moments.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions.transforms import CorrCholeskyTransform

from . import _collapsed as col
from . import _limits
from ._density import FlatDensity
from ._nuts import cholesky, normal, uniform

__all__ = [
    "GeneralSpec",
    "general_conditional",
    "general_density",
    "general_loglik",
    "general_spec",
    "uses_general",
]


class GeneralSpec(NamedTuple):
    """The static settings of the general model (hashable).

    Attributes
    ----------
    pooling : {"partial", "none"}
    varying : tuple of bool
        One per active feature: whether it has a group-specific slope.
    full : bool
        Correlated group effects (``covariance="full"`` under partial
        pooling).
    """

    pooling: str
    varying: tuple
    full: bool

    @property
    def varying_index(self):
        """Positions of the varying features among the active ones."""
        return np.flatnonzero(np.asarray(self.varying, dtype=bool))

    @property
    def n_correlated(self):
        """Size of the correlation matrix: intercept and varying features."""
        return 1 + int(np.sum(self.varying))


def uses_general(pooling, varying, covariance):
    """Whether an engine's settings need the general model.

    Today's model (every feature varying, ``covariance="diagonal"`` or no
    pooling, where the covariance is ignored; or complete pooling) keeps the
    hand-written path of :mod:`hiermask._collapsed`.

    Parameters
    ----------
    pooling : {"partial", "none", "complete"}
    varying : tuple of bool or None
    covariance : {"diagonal", "full"}

    Returns
    -------
    bool
    """
    if covariance not in ("diagonal", "full"):
        raise ValueError(
            f"covariance must be 'diagonal' or 'full', not {covariance!r}."
        )
    if pooling == "complete":
        return False
    if covariance == "full" and pooling == "partial":
        return True
    return varying is not None and not all(varying)


def general_spec(pooling, varying, covariance, n_features):
    """The :class:`GeneralSpec` of an engine's settings for ``n_features``.

    Parameters
    ----------
    pooling : {"partial", "none"}
    varying : tuple of bool or None
        None: every active feature varies.
    covariance : {"diagonal", "full"}
    n_features : int
        Active features.

    Returns
    -------
    GeneralSpec
    """
    if varying is None:
        varying = (True,) * n_features
    varying = tuple(bool(v) for v in varying)
    if len(varying) != n_features:
        raise ValueError(
            f"varying has {len(varying)} entries for {n_features} active features."
        )
    return GeneralSpec(pooling, varying, covariance == "full" and pooling == "partial")


# --------------------------------------------------------------------------
# The model's pieces.


def _deviation_factor(spec, scales, hyper, data):
    """``E`` (q, q): the factor of the deviations' prior covariance before
    the mask (rows of non-varying features are 0).

    ``diag(s) L``, except under ``spec.full`` where the correlated effects
    sit at the reference point (``K``; the feature means when
    ``standardize``): ``E = R diag(s) L`` with ``R`` the identity with first
    row ``[1, -K]`` maps them to the intercept at ``x = 0`` and the slopes.
    Then a shift of a feature's origin leaves the model unchanged in
    internal units. (A feature that is off in a group enters as ``x = 0``
    there, for the deviations as for the population means.)
    """
    vary = np.concatenate([[1.0], np.asarray(spec.varying, dtype=float)])
    q = vary.shape[0]
    if spec.pooling == "partial":
        idx = np.concatenate([[0], 1 + spec.varying_index])
        both = jnp.concatenate([jnp.atleast_1d(scales["tau_a"]), scales["tau"]])
        s = jnp.zeros(q).at[idx].set(both)
    else:
        s = jnp.concatenate([jnp.atleast_1d(hyper.intercept), hyper.coef]) * vary
    if spec.full and spec.n_correlated > 1:
        idx = np.concatenate([[0], 1 + spec.varying_index])
        factor = s[:, None] * jnp.eye(q).at[np.ix_(idx, idx)].set(scales["corr_chol"])
        return factor.at[0].add(-data.K @ factor[1:])
    return jnp.diag(s)  # under "full" with one effect too: s is 0 on slopes


def _population_left(spec, data):
    """``P`` (q, q): ``A_g^-1 F_g`` (partial) or the selection of the shared
    slopes (none), up to rows of features that are off in ``g``, where
    ``K`` and ``k`` vanish."""
    p = data.on.shape[1]
    if spec.pooling == "partial":
        return jnp.eye(p + 1).at[0, 1:].set(-data.K)
    fixed = np.concatenate([[0.0], 1.0 - np.asarray(spec.varying, dtype=float)])
    return jnp.diag(jnp.asarray(fixed))


def _prior_var(hyper):
    # Prior variances of phi (under no pooling only the shared slopes'
    # entries are used; the others integrate to 1).
    return jnp.concatenate([jnp.atleast_1d(hyper.intercept) ** 2, hyper.coef**2])


def _statistics(spec, data, cells, fixed=None):
    """``n``, ``u'Wu``, ``K = A'SA`` (q, q, G) and ``k = A'r`` (q, G).

    Groups last: the algebra below is elementwise over the groups, unrolled
    over the small matrix size (one fused loop per operation, as in
    :mod:`hiermask._collapsed`). ``K`` and ``k`` vanish at the features
    that are off in a group. ``fixed``: the complete rows prepared and the
    rows holding latent cells (:func:`hiermask._collapsed.split_prepared`,
    computed here when None); only those rows' statistics, which depend on
    ``cells``, are added here, into their groups.
    """
    if fixed is None:
        fixed = col.split_prepared(spec.pooling, data)
    prep, rows = fixed
    gram, xty = prep.dev_gram, prep.dev_xty
    if data.miss_row.shape[0]:
        row_gram, row_xty = col.row_statistics(data, rows, cells)
        gram = gram.at[:, :, rows.group].add(jnp.moveaxis(row_gram, 0, -1))
        xty = xty.at[:, rows.group].add(row_xty.T)
    return prep.n, prep.yty, gram, xty


def _unit(x):
    # 1.0 at run time, unknown to the compiler (see _collapsed.materialize).
    return jax.lax.stop_gradient(1.0 + 0.0 * jnp.sum(x[:1]))


def _stats_unit(data, stats):
    """The unit of the groups' algebra (:func:`_unit`) for :func:`_statistics`.

    From ``u'Wu``, which the latent cells leave alone, when there are any:
    from ``k``, which holds them, it is batched with the chains (the
    sampler's ``vmap``) and with the draws, a division by a batched unit in
    every materialized intermediate, and XLA compiled the gradient 3.7
    times slower (``benchmarks/gradient_missing.py full``, 80 latent cells:
    6,929 against 1,872 us; docs/performance.md, "Latent cells"). Without
    latent cells from ``k`` as always (the same program, the same draws).
    """
    _, yty, _, xty = stats
    return _unit(yty if data.miss_row.shape[0] else xty)


def _mm(a, b):
    # a b for a (q, r, ...) and b (r, s, ...), batch axes last (broadcast).
    return sum(a[:, j, None] * b[None, j] for j in range(a.shape[1]))


def _tmm(a, b):
    # a' b for a (r, q, ...) and b (r, s, ...).
    return sum(a[j, :, None] * b[None, j] for j in range(a.shape[0]))


def _mv(a, x):
    # a x for a (q, r, ...) and x (r, ...).
    return sum(a[:, j] * x[j] for j in range(a.shape[1]))


def _tmv(a, x):
    # a' x for a (r, q, ...) and x (r, ...).
    return sum(a[j] * x[j] for j in range(a.shape[0]))


class _Groups(NamedTuple):
    # One evaluation's per-group algebra, groups last (conditional draws).
    t: jnp.ndarray  # (q, q, G) T = L_M^-1
    logdet: jnp.ndarray  # (G,) log|M|
    a: jnp.ndarray  # (q, G) T E'k
    b: jnp.ndarray  # (q, q, G) T E'K P


def _factor_m(inv, factor, gram, xty, unit):
    # Each group's M = I + E'KE inv as its inverse Cholesky factor t and
    # log|M|, with the unit (_stats_unit), E as a column and KE that built it.
    q = factor.shape[0]
    f = factor[:, :, None]
    ke = col.materialize(_mm(gram, f), unit)
    eye = jnp.eye(q)[:, :, None]
    m = col.materialize(eye + inv * _tmm(f, ke), unit)
    t, logdet = col.cholesky_rows(m, unit, col.is_unrolled(q))
    return unit, f, ke, t, logdet


def _groups(inv, factor, left, gram, xty, unit):
    """The groups' ``M = I + E'KE inv`` factorized, ``a`` and ``B``.

    ``E`` is ``factor`` for every group: its rows at a group's off features
    meet only zeros of ``K`` and ``k`` (so ``E'KE`` is that of the masked
    factor), and likewise ``K P``. ``unit``: :func:`_stats_unit`.
    """
    unit, f, ke, t, logdet = _factor_m(inv, factor, gram, xty, unit)
    a = col.materialize(_mv(t, col.materialize(_tmv(f, xty), unit)), unit)
    b = col.materialize(_mm(t, col.materialize(_tmm(ke, left[:, :, None]), unit)), unit)
    return _Groups(t, logdet, a, b)


def _totals(gram, xty):
    # K and k summed over the groups.
    return jnp.sum(gram, axis=-1), jnp.sum(xty, axis=-1)


def _population_moments(inv, left, totals, bb, ba):
    # The groups' sums of H_g and eta_g, from _totals and the sums of B'B
    # and B'a.
    gram_sum, xty_sum = totals
    h = inv * left.T @ gram_sum @ left - inv**2 * bb
    eta = inv * left.T @ xty_sum - inv**2 * ba
    return 0.5 * (h + h.T), eta


def _plain_sums(grp):
    # The four sums of _group_sums from _groups (sum log|M|, sum |a|^2, sum
    # B'B, sum B'a), in plain JAX.
    bb = jnp.sum(_tmm(grp.b, grp.b), axis=-1)
    ba = jnp.sum(_tmv(grp.b, grp.a), axis=-1)
    return jnp.sum(grp.logdet), jnp.sum(grp.a**2), bb, ba


def _summed(inv, left, gram, xty, grp):
    # The groups' sums of H_g and eta_g.
    bb, ba = _plain_sums(grp)[2:]
    return _population_moments(inv, left, _totals(gram, xty), bb, ba)


# The density's per-group terms, with a hand-written gradient. With ``N =
# M^-1`` and ``W = E N E'`` per group, the groups enter the density only
# through four sums: log|M|, k'Wk, P'KWKP and P'KWk (the last two make
# ``sum B'B`` and ``sum B'a``). Given their cotangents (c1, c2, C3, c4),
# with ``G = c2 kk' + KP sym(C3) P'K + (u k' + k u') / 2``, ``u = KP c4``:
#   d/dE   = sum 2 G E N - 2 inv K E N E'G E N + 2 c1 inv K E N
#   d/dinv = sum -tr(N E'G E N S) + c1 tr(N S),   S = E'KE
#   d/dK   = c1 inv W - inv W G W + 2 W K P sym(C3) P' + W k c4'P'
# (for d/dK its symmetric part is what counts: K is symmetric; the
# forward reads one triangle of M)
#   d/dk   = 2 c2 W k + W u
# (tests/test_collapsed_general.py checks them against jax.grad).


def _group_forms(inv, factor, left, gram, xty, unit):
    # The four sums and what their gradient needs.
    unit, f, ke, t, logdet = _factor_m(inv, factor, gram, xty, unit)
    n = col.materialize(_tmm(t, t), unit)
    w = col.materialize(_mm(_mm(f, n), _tr(f)), unit)
    kp = col.materialize(_mm(gram, left[:, :, None]), unit)
    wk = col.materialize(_mv(w, xty), unit)
    wkp = col.materialize(_mm(w, kp), unit)
    forms = (
        jnp.sum(logdet),
        jnp.sum(xty * wk),
        jnp.sum(_tmm(kp, wkp), axis=-1),
        jnp.sum(_tmv(kp, wk), axis=-1),
    )
    return forms, (n, w, kp, wk, wkp, ke)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _group_sums(want_stats, inv, factor, left, gram, xty, unit):
    """``(sum log|M|, sum k'Wk, sum P'KWKP, sum P'KWk)`` (module comment).

    ``want_stats``: whether the gradient with respect to the statistics is
    formed (they depend on latent cells); ``left`` and ``unit``
    (:func:`_stats_unit`) get none.
    """
    return _group_forms(inv, factor, left, gram, xty, unit)[0]


def _group_sums_fwd(want_stats, inv, factor, left, gram, xty, unit):
    forms, saved = _group_forms(inv, factor, left, gram, xty, unit)
    return forms, (inv, factor, left, gram, xty, unit, *saved)


def _group_sums_bwd(want_stats, residuals, cot):
    inv, factor, left, gram, xty, unit, n, w, kp, wk, wkp, ke = residuals
    c1, c2, c3, c4 = cot
    f = factor[:, :, None]
    c3 = 0.5 * (c3 + c3.T)
    u = _mv(kp, c4[:, None])
    g = _mm(kp, _mm(c3[:, :, None], _tr(kp))) + 0.5 * (
        u[:, None] * xty[None] + xty[:, None] * u[None]
    )
    g = col.materialize(g + c2 * xty[:, None] * xty[None], unit)
    gen = col.materialize(_mm(g, _mm(f, n)), unit)  # G E N
    r = col.materialize(_mm(n, _tmm(f, gen)), unit)  # N E'G E N
    grad_f = jnp.sum(
        2.0 * gen - 2.0 * inv * _mm(ke, r) + 2.0 * c1 * inv * _mm(ke, n), -1
    )
    s = _tmm(f, ke)
    grad_inv = jnp.sum((c1 * n - r) * s)
    zero = jnp.zeros_like
    if not want_stats:
        return grad_inv, grad_f, zero(left), zero(gram), zero(xty), zero(unit)
    grad_gram = c1 * inv * w - inv * _mm(w, _mm(g, w))
    grad_gram = grad_gram + 2.0 * _mm(wkp, (c3 @ left.T)[:, :, None])
    grad_gram = grad_gram + wk[:, None] * (left @ c4)[None, :, None]
    grad_xty = 2.0 * c2 * wk + _mv(w, u)
    return grad_inv, grad_f, zero(left), grad_gram, grad_xty, zero(unit)


_group_sums.defvjp(_group_sums_fwd, _group_sums_bwd)


# Without latent cells the statistics are constants of the density: only
# inv and E take a gradient, and it is linear in the cotangents. With X =
# [KP, k] (q, q + 1), Y = N E'X, V = X - inv K E Y and C the symmetric
# (q + 1) x (q + 1) matrix of sym(C3), c4 / 2 and c2 (so that G = X C X'):
#   d/dE   = 2 sum_ab C_ab sum_g V_a Y_b' + 2 c1 inv sum_g K E N,
# and as the sums are inv^-a F(sqrt(inv) E) (a = 0 for log|M|, 1 for the
# three others), d/dinv = (<d/dE, E> / 2 - a c.forms) / inv. One pass over
# the blocks sums log|M|, X'WX (which holds the three other sums), V Y'
# and K E N; the gradient is then a few products of small matrices. The
# pass with the gradient (_blocked_group_sums) instead recomputes each
# block's intermediates (jax.checkpoint) for a second pass once the
# cotangents are known. Sampling at 100,000 groups of 4 coefficients, in
# fresh processes alternated twice, both in blocks of about 4,000 groups:
# 0.298 and 0.321 us per group and gradient against 0.380 and 0.374
# (benchmarks/group_blocks.py --one-pass; its blocks are smaller now, see
# _stat_blocks; larger q in docs/performance.md).


def _linear_pieces(inv, factor, left, gram, xty, unit):
    # One block's log|M|, X'WX, V Y' (q + 1, q + 1, q, q) and K E N summed.
    unit, f, ke, t, logdet = _factor_m(inv, factor, gram, xty, unit)
    x = jnp.concatenate([_mm(gram, left[:, :, None]), xty[:, None]], axis=1)
    x = col.materialize(x, unit)
    tex = col.materialize(_mm(t, col.materialize(_tmm(f, x), unit)), unit)  # T E'X
    y = col.materialize(_tmm(t, tex), unit)  # N E'X
    v = col.materialize(x - inv * _mm(ke, y), unit)
    n = col.materialize(_tmm(t, t), unit)
    return (
        jnp.sum(logdet),
        jnp.einsum("iag,ibg->ab", tex, tex),
        jnp.einsum("iag,jbg->abij", v, y),
        jnp.einsum("ikg,jkg->ij", ke, n),  # N symmetric
    )


def _summed_pieces(inv, factor, left, blocks, unit):
    # _linear_pieces over the blocks (_stat_blocks), summed.
    q = blocks[1].shape[1]
    shapes = ((), (q + 1, q + 1), (q + 1, q + 1, q, q), (q, q))
    return _sum_over_blocks(
        lambda gram, xty: _linear_pieces(inv, factor, left, gram, xty, unit),
        shapes,
        blocks,
        unit,
    )


def _sum_over_blocks(per_block, shapes, blocks, unit, checkpoint=False):
    """``per_block(gram, xty)`` (a tuple of arrays of ``shapes``) summed over
    ``blocks`` (:func:`_stat_blocks`) in a loop; ``checkpoint``: the
    gradient recomputes each block (``jax.checkpoint``)."""
    q = blocks[1].shape[1]

    def step(total, block):
        # the block's statistics copied out first, not read in place (a
        # slice of the stacked blocks at the loop's index) by each of the
        # block's kernels: 1.03-1.06 times faster on one thread
        # (benchmarks/group_blocks.py, alternated)
        lower, xty = block
        gram = col.materialize(lower[_unpacking(q)], unit)
        sums = per_block(gram, col.materialize(xty, unit))
        return jax.tree_util.tree_map(jnp.add, total, sums), None

    step = jax.checkpoint(step) if checkpoint else step
    zeros = tuple(jnp.zeros(shape, blocks[1].dtype) for shape in shapes)
    return jax.lax.scan(step, zeros, blocks)[0]


def _forms_of(pieces):
    # (sum log|M|, sum k'Wk, sum P'KWKP, sum P'KWk) from _summed_pieces.
    logdet, xwx = pieces[:2]
    return logdet, xwx[-1, -1], xwx[:-1, :-1], xwx[:-1, -1]


@jax.custom_vjp
def _fixed_group_sums(inv, factor, left, blocks, unit):
    """:func:`_group_sums` over constant statistics in ``blocks``
    (:func:`_stat_blocks`): one pass for the value and the gradient (module
    comment above); ``left``, the statistics and ``unit`` get none."""
    return _forms_of(_summed_pieces(inv, factor, left, blocks, unit))


def _fixed_group_sums_fwd(inv, factor, left, blocks, unit):
    pieces = _summed_pieces(inv, factor, left, blocks, unit)
    forms = _forms_of(pieces)
    return forms, (inv, factor, forms, *pieces[2:])


def _fixed_group_sums_bwd(residuals, cot):
    inv, factor, forms, vy, ken = residuals
    c1, c2, c3, c4 = cot
    r = c4.shape[0]
    c = jnp.zeros((r + 1, r + 1), c4.dtype)
    c = c.at[:r, :r].set(0.5 * (c3 + c3.T)).at[:r, r].set(0.5 * c4)
    c = c.at[r, :r].set(0.5 * c4).at[r, r].set(c2)
    grad_f = 2.0 * jnp.einsum("ab,abij->ij", c, vy) + 2.0 * c1 * inv * ken
    linear = c2 * forms[1] + jnp.sum(c3 * forms[2]) + jnp.sum(c4 * forms[3])
    grad_inv = (0.5 * jnp.sum(grad_f * factor) - linear) / inv
    return grad_inv, grad_f, None, None, None


_fixed_group_sums.defvjp(_fixed_group_sums_fwd, _fixed_group_sums_bwd)


def uses_blocks(n_groups, q):
    """Whether the groups' terms of ``n_groups`` groups of ``q`` coefficients
    go in blocks (:func:`_blocked_group_sums`).

    Parameters
    ----------
    n_groups, q : int

    Returns
    -------
    bool
        One q x q matrix per group takes more than
        ``_limits.GENERAL_BLOCK_MIN_BYTES``, and the groups make more than
        one block (:func:`_blocking`).
    """
    return (
        8 * n_groups * q * q > _limits.GENERAL_BLOCK_MIN_BYTES
        and _blocking(n_groups, q)[1] > 1
    )


def _blocking(n_groups, q):
    # Groups per block and blocks: the collapsed engine's blocking with the
    # general model's target (or _limits.BLOCK_GROUPS).
    return col._blocking(n_groups, q, _limits.GENERAL_BLOCK_BYTES)


def _blocked_group_sums(want_stats, inv, factor, left, gram, xty, unit, blocks=None):
    """:func:`_group_sums` over blocks of groups (the collapsed engine's
    :func:`~hiermask._collapsed._blocking`), summed, when :func:`uses_blocks`.

    The density's path with latent cells, whose statistics take a gradient;
    without, the blocks go through :func:`_fixed_group_sums` (one pass).

    On all groups at once every per-group intermediate streams through
    memory: at 100,000 groups of 4 coefficients the value and gradient took
    2.5 times as long per group as at 10,000, in blocks 1.2 times
    (``benchmarks/group_blocks.py``).
    A loop over blocks keeps each block's intermediates in cache; padding
    groups have zero statistics and add exactly nothing. The gradient's pass
    recomputes each block's intermediates (``jax.checkpoint``) rather than
    storing them for all groups, which would stream them through memory
    again; the recomputation is why small fits stay in one block.
    ``blocks``: ``gram`` and ``xty`` already in blocks (:func:`_stat_blocks`;
    then only the shape of ``xty`` is read, as
    ``benchmarks/group_blocks.py --one-pass`` does). A
    block holds each group's K as its packed lower triangle, unpacked as the
    block is copied out: the chains that run at once then share the cache
    with 10 numbers per group of 4 coefficients instead of 16 (issue 17:
    0.332-0.345 against 0.346-0.348 us of sampling per group and gradient at
    100,000 groups, alternated twice).
    """
    q, n_groups = xty.shape
    if not uses_blocks(n_groups, q):
        return _group_sums(want_stats, inv, factor, left, gram, xty, unit)

    if blocks is None:
        blocks = _stat_blocks(gram, xty)
    r = left.shape[1]  # the sums: two scalars, P'KWKP (r, r) and P'KWk (r,)
    return _sum_over_blocks(
        lambda gram, xty: _group_sums(want_stats, inv, factor, left, gram, xty, unit),
        ((), (), (r, r), (r,)),
        blocks,
        unit,
        checkpoint=True,
    )


def _unpacking(q):
    # (q, q) positions in the packed lower triangle (np.tril_indices' order).
    rows, cols = np.tril_indices(q)
    index = np.zeros((q, q), dtype=np.int32)
    index[rows, cols] = index[cols, rows] = np.arange(rows.size)
    return index


def _stat_blocks(gram, xty, one_pass=False):
    # gram (q, q, G), its lower triangle packed (q (q + 1) / 2, G), and xty
    # (q, G) as blocks, (n_blocks, ..., size), padded. one_pass: blocks of
    # _fixed_group_sums, of the collapsed engine's size (BLOCK_BYTES, 1,024
    # groups of 4 coefficients), else of _blocking's (GENERAL_BLOCK_BYTES).
    # With nothing to recompute, the smaller blocks sampled 100,000 groups
    # 5-7% faster (docs/performance.md).
    q, n_groups = xty.shape
    size, n_blocks = col._blocking(n_groups, q) if one_pass else _blocking(n_groups, q)
    lower = gram[np.tril_indices(q)]
    return col._to_blocks(lower, size, n_blocks), col._to_blocks(xty, size, n_blocks)


def _population_terms(h, eta, prior_var):
    # -log|lam| / 2 + eta' lam^-1 eta / 2: phi integrated out.
    return _population_terms_fwd(h, eta, prior_var)[0]


# _population_terms with its closed-form gradient (the sampler's): jax.grad
# through the unrolled factorization of lam (up to UNROLL_MAX_SIZE_POPULATION)
# made "full" at 11 coefficients slow to compile and to sample
# (docs/performance.md, "'full' with few groups and many effects"). With
# v = lam^-1 eta, d/d lam = -(lam^-1 + v v') / 2 and d/d eta = v.


@jax.custom_vjp
def _population_terms_hand(h, eta, prior_var):
    return _population_terms(h, eta, prior_var)


def _population_terms_fwd(h, eta, prior_var):
    # col.population_integral's terms, with the form as |T eta|^2 and v as
    # T'(T eta) (population_integral: eta' lam^-1 eta, lam^-1 eta), the
    # order of operations this model's draws have always had: the other
    # order differs in the last bits, and the sampler's trajectories with
    # it (group_covariance="full": every draw of a short fit differs).
    t, logdet = col.population_factor(h, prior_var)
    w = t @ eta
    return -0.5 * logdet + 0.5 * jnp.sum(w**2), (t.T @ t, t.T @ w, prior_var)


def _population_terms_bwd(residuals, g):
    lam_inv, v, prior_var = residuals
    lam_bar = -0.5 * (lam_inv + jnp.outer(v, v))
    return g * lam_bar, g * v, -g * jnp.diag(lam_bar) / prior_var**2


_population_terms_hand.defvjp(_population_terms_fwd, _population_terms_bwd)


def general_loglik(spec, scales, data, hyper, cells, hand_written=True):
    """Log marginal likelihood with group coefficients and population out.

    Parameters
    ----------
    spec : GeneralSpec
    scales : dict
        ``sigma``; under partial pooling ``tau_a`` (), ``tau`` (one per
        varying feature) and, under ``spec.full``, ``corr_chol``: the
        Cholesky factor of the correlation matrix of the intercept and the
        varying features.
    data : CollapsedData
    hyper : Hyper
    cells : array of shape (M,)
        Latent cells.
    hand_written : bool, default=True
        The gradient of the groups' terms written by hand (the sampler's);
        False: all by ``jax.grad`` (the reference).

    Returns
    -------
    scalar
    """
    stats = _statistics(spec, data, cells)
    return _loglik_of(spec, scales, data, hyper, stats, hand_written)


def _loglik_of(
    spec, scales, data, hyper, stats, hand_written=True, blocks=None, totals=None
):
    # general_loglik from the statistics (_statistics); hand_written: the
    # gradient of the groups' terms by _group_sums (in blocks without latent
    # cells _fixed_group_sums), else by jax.grad. blocks (_stat_blocks with
    # one_pass) and totals (_totals): from the same statistics, prepared
    # outside the gradient, or None.
    inv = 1.0 / scales["sigma"] ** 2
    n, yty, gram, xty = stats
    left = _population_left(spec, data)
    factor = _deviation_factor(spec, scales, hyper, data)
    unit = _stats_unit(data, stats)
    if hand_written:
        latent = data.miss_row.shape[0] > 0
        if latent or not uses_blocks(*xty.shape[::-1]):
            logdets, aa, bb, ba = _blocked_group_sums(
                latent, inv, factor, left, gram, xty, unit
            )
        else:
            if blocks is None:
                blocks = _stat_blocks(gram, xty, one_pass=True)
            logdets, aa, bb, ba = _fixed_group_sums(inv, factor, left, blocks, unit)
    else:
        logdets, aa, bb, ba = _plain_sums(_groups(inv, factor, left, gram, xty, unit))
    totals = _totals(gram, xty) if totals is None else totals
    h, eta = _population_moments(inv, left, totals, bb, ba)
    prior_var = _prior_var(hyper)
    population = _population_terms_hand if hand_written else _population_terms
    return (
        0.5 * jnp.sum(n) * jnp.log(inv / (2.0 * jnp.pi))
        - 0.5 * inv * jnp.sum(yty)
        - 0.5 * logdets
        + 0.5 * inv**2 * aa
        - 0.5 * jnp.sum(jnp.log(prior_var))
        + population(h, eta, prior_var)
    )


# --------------------------------------------------------------------------
# The density over a flat vector.


def _layout(spec, data, hyper):
    """The sampled sites, in the flat vector's order (see
    :func:`hiermask._collapsed._layout`); ``coef_scale`` holds the varying
    features only and ``group_correlation`` the unconstrained vector of
    :class:`~numpyro.distributions.transforms.CorrCholeskyTransform`."""
    sites = col.imputation_sites(data)
    sites.append(("noise", (), True, hyper.noise))
    if spec.pooling == "partial":
        idx = spec.varying_index
        sites += [
            ("intercept_scale", (), True, hyper.group_intercept),
            ("coef_scale", (idx.shape[0],), True, jnp.asarray(hyper.group_coef)[idx]),
        ]
        q = spec.n_correlated
        if spec.full and q > 1:
            sites.append(("group_correlation", (q * (q - 1) // 2,), False, None))
    return col.layout_of(sites)


def _scales(spec, values, n_features):
    """The scales of :func:`general_loglik` and the reported sites."""
    scales = {"sigma": values["noise"]}
    reported = {"noise": values["noise"]}
    if spec.pooling == "partial":
        idx = spec.varying_index
        scales["tau_a"] = values["intercept_scale"]
        scales["tau"] = values["coef_scale"]
        reported["intercept_scale"] = values["intercept_scale"]
        reported["coef_scale"] = jnp.zeros(n_features).at[idx].set(values["coef_scale"])
        if spec.full:
            q = spec.n_correlated
            if q > 1:
                chol = CorrCholeskyTransform()(values["group_correlation"])
            else:
                chol = jnp.ones((1, 1))
            scales["corr_chol"] = chol
            reported["group_correlation"] = chol @ chol.T
    for name in ("x_loc", "x_scale", "x_missing"):
        if name in values:
            reported[name] = values[name]
    return scales, reported


def lkj_log_density(unconstrained, concentration, size, chol=None):
    """LKJ prior of a correlation matrix on the unconstrained space.

    ``LKJCholesky(size, concentration)`` at ``CorrCholeskyTransform()(z)``
    plus the transform's log-Jacobian.

    Parameters
    ----------
    unconstrained : array of shape (size (size - 1) / 2,)
    concentration : scalar
    size : int
    chol : array of shape (size, size), optional
        ``CorrCholeskyTransform()(unconstrained)`` where the caller has it
        (the density: one transform to trace and differentiate, not two).

    Returns
    -------
    scalar
    """
    transform = CorrCholeskyTransform()
    if chol is None:
        chol = transform(unconstrained)
    return dist.LKJCholesky(size, concentration).log_prob(
        chol
    ) + transform.log_abs_det_jacobian(unconstrained, chol)


def general_density(spec, data, hyper):
    """The general collapsed posterior over one flat unconstrained vector.

    The sites, priors and transforms of
    :func:`hiermask._collapsed.collapsed_density`, with ``coef_scale``
    sampled for the varying features only (reported as 0.0 for the others)
    and, under ``spec.full``, ``group_correlation`` with its LKJ prior
    (:func:`lkj_log_density`).

    Under ``spec.full`` the density asks for a dense warmup metric
    (``FlatDensity.dense_metric``) while it has at most
    ``_limits.DENSE_METRIC_MAX_SIZE`` (200) coordinates: the scales and the
    correlations correlate a posteriori, and a dense metric took NUTS from
    10-12 to 7 leapfrog steps per draw on ``bench_engines.py --covariance``
    (``docs/performance.md``). 200 covers up to 18 varying features (1 +
    19 + 171 coordinates); above, the latent cells of many missing values
    make most of the vector, nearly independent a posteriori, and the
    metric's ``size ** 2`` per leapfrog step and ``size ** 3`` per window
    would buy little.

    Parameters
    ----------
    spec : GeneralSpec
    data : CollapsedData
    hyper : Hyper

    Returns
    -------
    FlatDensity
    """
    layout = _layout(spec, data, hyper)
    n_cells = data.miss_row.shape[0]
    n_features = data.on.shape[1]
    names = [site[0] for site in layout.sites]
    # the complete rows' statistics: prepared once, outside the gradient;
    # without latent cells also their sums over the groups and their blocks
    # (_fixed_group_sums), which each evaluation would otherwise copy
    # (issue 17: sampling per group and gradient at 100,000 groups then cost
    # 1.08x what it costs at 10,000 in one block, against 1.16x;
    # benchmarks/bench_engines.py --manygroups, docs/performance.md)
    fixed = col.split_prepared(spec.pooling, data)
    q = n_features + 1
    blocks = totals = None
    if not n_cells:
        gram, xty = fixed[0].dev_gram, fixed[0].dev_xty
        totals = _totals(gram, xty)
        if uses_blocks(data.on.shape[0], q):
            blocks = _stat_blocks(gram, xty, one_pass=True)

    def log_density(z):
        x, logp = layout.log_prior(z)
        values = layout.unpack(x)
        scales, _ = _scales(spec, values, n_features)
        if "group_correlation" in names:
            logp = logp + lkj_log_density(
                values["group_correlation"],
                hyper.lkj,
                spec.n_correlated,
                scales["corr_chol"],
            )
        cells = values.get("x_missing")
        if n_cells:
            logp = logp + col.imputation_loglik(data, values["x_scale"], cells)
        stats = _statistics(spec, data, cells, fixed)
        return logp + _loglik_of(
            spec, scales, data, hyper, stats, blocks=blocks, totals=totals
        )

    def constrain(z):
        return _scales(spec, layout.unpack(layout.transform(z)), n_features)[1]

    size = int(layout.offsets[-1])
    return FlatDensity(
        size,
        lambda z: -log_density(z),
        constrain,
        *col.noise_start(data, spec.pooling, layout),
        dense_metric=spec.full and size <= _limits.DENSE_METRIC_MAX_SIZE,
    )


# --------------------------------------------------------------------------
# Conditional draws.


def _draw_scales(spec, draw, hyper):
    # general_loglik's scales of one posterior draw of the sampled sites.
    scales = {"sigma": draw["noise"]}
    if spec.pooling == "partial":
        scales["tau_a"] = draw["intercept_scale"]
        scales["tau"] = draw["coef_scale"][spec.varying_index]
        if spec.full:
            scales["corr_chol"] = cholesky(draw["group_correlation"])
    return scales


def _one_draw(spec, data, hyper, fixed, draw, eps):
    """One posterior draw's ``phi`` and group coefficients, and the groups'
    conditional means and covariances of ``theta`` given it (groups first).
    """
    scales = _draw_scales(spec, draw, hyper)
    inv = 1.0 / scales["sigma"] ** 2
    stats = _statistics(spec, data, draw.get("x_missing"), fixed)
    _, _, gram, xty = stats
    left = _population_left(spec, data)
    factor = _deviation_factor(spec, scales, hyper, data)
    grp = _groups(inv, factor, left, gram, xty, _stats_unit(data, stats))
    h, eta = _summed(inv, left, gram, xty, grp)
    t_pop, _ = col.population_factor(h, _prior_var(hyper))
    phi = t_pop.T @ (t_pop @ eta + eps[0])
    # v | phi ~ N(T'T E'(k - K P phi) inv, T'T)
    f = factor[:, :, None]
    base = left @ phi
    resid = xty - _mv(gram, base[:, None])
    w = inv * _mv(grp.t, _tmv(f, resid))
    v_mean = _tmv(grp.t, w)
    v_draw = v_mean + _tmv(grp.t, eps[1:].T)
    # theta = f + A (P phi + E v), A the identity with first row [1, row]
    row = (
        data.on.T * (data.k if spec.pooling == "partial" else data.k - data.K)[:, None]
    )

    def theta(v):
        x = base[:, None] + _mv(f, v)
        first = x[0] + jnp.sum(row * x[1:], axis=0) - data.e_y
        return jnp.concatenate([first[None], x[1:]]).T

    ce = _mm(f, _tr(grp.t))  # E T'
    ce = jnp.concatenate([ce[:1] + jnp.sum(row[:, None] * ce[1:], axis=0), ce[1:]])
    cov = jnp.moveaxis(_mm(ce, _tr(ce)), -1, 0)
    return phi, theta(v_draw), theta(v_mean), cov


def _tr(a):
    return jnp.swapaxes(a, 0, 1)


def general_conditional(
    spec, rng_key, draws, data, hyper, chunk=None, first_chunk=0, n_valid=None
):
    """Exact draws of the population and group coefficients, one per draw.

    The return structure of :func:`hiermask._collapsed.conditional_draws`,
    and its chunks: the draws go ``chunk`` at a time, each chunk's normals
    from one call of XLA's generator keyed by the chunk's index
    (``first_chunk`` plus its position), so a run over consecutive parts of
    the draws, each starting at a whole chunk, gives the same draws as one
    run over all of them.

    Parameters
    ----------
    spec : GeneralSpec
    rng_key : jax.random.PRNGKey
        Raw key data (uint32) or a typed key.
    draws : dict of arrays with leading dimension D
        Posterior draws of the sampled sites (``group_correlation`` under
        ``spec.full``).
    data : CollapsedData
    hyper : Hyper
    chunk : int, optional
        Draws per chunk (static); by default
        :func:`hiermask._collapsed.conditional_chunk`.
    first_chunk : int or int array, default=0
    n_valid : int or int array, optional
        The first ``n_valid`` draws are real, the rest padding (excluded
        from the moments); by default all ``D``.

    Returns
    -------
    out : dict
        ``group_coef_internal`` (D, G, q) and, under partial pooling,
        ``intercept_at_means`` (D,) and ``coef_mean`` (D, p).
    mean : array of shape (G, q)
    cov : array of shape (G, q, q)
    """
    n_draws = draws["noise"].shape[0]
    n_groups, p = data.on.shape
    q = p + 1
    if chunk is None:
        chunk = col.conditional_chunk(n_draws, n_groups, q)
    chunk = max(1, min(chunk, n_draws))
    n_chunks = -(-n_draws // chunk)
    n_valid = n_draws if n_valid is None else n_valid
    fixed = col.split_prepared(spec.pooling, data)
    sites = ("noise", "intercept_scale", "coef_scale", "group_correlation", "x_missing")

    def chunked(x):
        # (D, ...) -> (n_chunks, chunk, ...), padded by repeating the last
        x = jnp.asarray(x)
        x = jnp.concatenate([x, jnp.repeat(x[-1:], n_chunks * chunk - n_draws, 0)])
        return x.reshape(n_chunks, chunk, *x.shape[1:])

    per_draw = {k: chunked(draws[k]) for k in sites if k in draws}
    weight = (jnp.arange(n_chunks * chunk) < n_valid).astype(float) / n_valid
    zeros = (jnp.zeros((n_groups, q)), jnp.zeros((n_groups, q, q)))

    def one_chunk(acc, xs):
        index, chunk_draws, w = xs
        key_data = col.chunk_key_data(rng_key, index)
        eps = normal(uniform(key_data, (chunk, n_groups + 1, q)))
        phi, coef, mean, cov = jax.vmap(
            lambda d, e: _one_draw(spec, data, hyper, fixed, d, e)
        )(chunk_draws, eps)
        second = cov + mean[..., :, None] * mean[..., None, :]
        acc = (
            acc[0] + jnp.einsum("d,dgi->gi", w, mean),
            acc[1] + jnp.einsum("d,dgij->gij", w, second),
        )
        return acc, (phi, coef)

    index = jnp.arange(n_chunks) + first_chunk
    (rb_mean, second), (phi, coef) = col.maybe_scan(
        one_chunk, zeros, (index, per_draw, weight.reshape(n_chunks, chunk)), n_chunks
    )
    phi = phi.reshape(-1, q)[:n_draws]
    coef = coef.reshape(-1, n_groups, q)[:n_draws]
    rb_cov = second - rb_mean[:, :, None] * rb_mean[:, None, :]
    onq = jnp.concatenate([jnp.ones((n_groups, 1)), data.on], axis=1)
    out = {"group_coef_internal": coef * onq}
    if spec.pooling == "partial":
        out["intercept_at_means"] = phi[:, 0]
        out["coef_mean"] = phi[:, 1:]
    return out, rb_mean * onq, rb_cov * onq[:, :, None] * onq[:, None, :]
