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
factor of each group's ``M`` gives everything. The per-group algebra is
stored groups-last and unrolled over the tiny matrix size (vectorized over
groups, no LAPACK call per group), and its gradient is written by hand
(:func:`_pooled_loglik`): both make the compiled program small and fast on a
CPU. Everything here runs in float64 (the caller scopes ``jax.enable_x64``).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import numpyro
import numpyro.distributions as dist

from ._model import IMPUTE_LOC_SCALE, IMPUTE_SCALE_SCALE, Hyper, sample_imputation
from ._sampler import FlatDensity, _normal, _uniform

__all__ = [
    "CollapsedData",
    "GroupTerms",
    "collapsed_density",
    "collapsed_model",
    "conditional_draws",
    "group_terms",
    "logdet_forms",
    "marginal_loglik",
    "none_factor",
]

#: Matrices up to this size are factorized by unrolled elementwise code
#: (vectorized over the groups, no LAPACK call per group); larger ones by
#: LAPACK, whose compile time does not grow with the size. Up to
#: UNROLL_MAX_SIZE_LARGE when there are at least UNROLL_MIN_BATCH of them
#: (running time then outweighs the longer compilation).
UNROLL_MAX_SIZE = 8
UNROLL_MAX_SIZE_LARGE = 12
UNROLL_MIN_BATCH = 64


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


def _inverse_cholesky(m):
    """``T = L^-1`` (lower, ``m = L L'``) and ``log|m|``; batch axes last."""
    size = m.shape[0]
    batch = math.prod(m.shape[2:])
    if size <= UNROLL_MAX_SIZE or (
        size <= UNROLL_MAX_SIZE_LARGE and batch >= UNROLL_MIN_BATCH
    ):
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
    front = jnp.moveaxis(m, (0, 1), (-2, -1))
    chol = jnp.linalg.cholesky(front)
    eye = jnp.broadcast_to(jnp.eye(size), front.shape)
    inv = jsl.solve_triangular(chol, eye, lower=True)
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    return jnp.moveaxis(inv, (-2, -1), (0, 1)), logdet


def _mm(a, b):
    # Batched product of small matrices, a (i, j, ...) by b (j, k, ...),
    # unrolled over the contraction index into one elementwise expression:
    # XLA fuses it into a single vectorized loop over the batch, where a
    # dot_general is a library call per batch element. The barrier keeps
    # XLA from fusing the product into its consumers (which would recompute
    # it for each of their elements).
    out = sum(a[:, j][:, None] * b[j][None] for j in range(a.shape[1]))
    return jax.lax.optimization_barrier(out)


def _mtm(a, b):
    # a' b for batches of small matrices: a (j, i, ...), b (j, k, ...).
    out = sum(a[j][:, None] * b[j][None] for j in range(a.shape[0]))
    return jax.lax.optimization_barrier(out)


def _mmt(a, b):
    # a b' for batches of small matrices: a (i, j, ...), b (k, j, ...).
    out = sum(a[:, j][:, None] * b[:, j][None] for j in range(a.shape[1]))
    return jax.lax.optimization_barrier(out)


def _sum0(a):
    # Sum over the (short) first axis as elementwise adds: XLA's CPU
    # reductions over a non-minor axis are slow.
    return sum(a[j] for j in range(a.shape[0]))


def _tr(a):
    return jnp.swapaxes(a, 0, 1)


def _logdet_forms_fwd(m, a, b):
    k = a.shape[1]
    t, logdet = _inverse_cholesky(m)
    tab = _mm(t, jnp.concatenate([a, b], axis=1))  # one pass over t
    forms = _mtm(tab[:, :k], tab[:, k:])
    return (logdet, forms), (t, tab)


def _logdet_forms_grads(t, tab, c_logdet, c_forms):
    # Gradients of c_logdet * log|m| + <c_forms, a' m^-1 b> with respect to
    # m, a and b, given t = L^-1 and t [a, b].
    size, k = t.shape[0], c_forms.shape[0]
    inv_all = _mtm(t, jnp.concatenate([t, tab], axis=1))  # m^-1 [I, a, b]
    m_inv, m_inv_a = inv_all[:, :size], inv_all[:, size : size + k]
    m_inv_b = inv_all[:, size + k :]
    grad_a = _mmt(m_inv_b, c_forms)
    grad_b = _mm(m_inv_a, c_forms)
    grad_m = c_logdet * m_inv - _mmt(grad_b, m_inv_b)
    return grad_m, grad_a, grad_b


def _logdet_forms_bwd(residuals, cotangents):
    return _logdet_forms_grads(*residuals, *cotangents)


@jax.custom_vjp
def logdet_forms(m, a, b):
    """``log|m|`` and the bilinear forms ``a' m^-1 b`` of small SPD matrices.

    Batched over trailing axes (matrix axes first); reverse-mode
    differentiable with a closed-form gradient (a few batched products, no
    factorization).

    Parameters
    ----------
    m : array of shape (s, s, ...)
        Symmetric positive definite.
    a, b : arrays of shape (s, k, ...)

    Returns
    -------
    logdet : array of shape (...)
    forms : array of shape (k, k, ...)
    """
    return _logdet_forms_fwd(m, a, b)[0]


logdet_forms.defvjp(_logdet_forms_fwd, _logdet_forms_bwd)


# --------------------------------------------------------------------------
# The model's pieces.


def group_prior(pooling, values, data):
    """How each group's prior mean and spread depend on the population.

    The prior mean of group ``g``'s coefficients is ``F_g phi + f_g``, linear
    in the population vector ``phi = (ell, mu)``, and the group deviation is
    ``C_g v_g``.

    Parameters
    ----------
    pooling : {"partial", "none", "complete"}
        Pooling mode.
    values : dict
        Sampled between-group sds ``tau_a`` and ``tau`` (partial pooling).
    data : CollapsedData
        Data; only ``on``, ``k``, ``K`` and ``e_y`` are used.

    Returns
    -------
    F : array of shape (G, q, q) or None (no population under "none")
    f : array of shape (G, q)
    C : array of shape (G, q, q) or None (no group deviation under "complete")
    """
    on = data.on
    n_groups, n_features = on.shape
    q = n_features + 1
    f = jnp.zeros((n_groups, q)).at[:, 0].set(-data.e_y)
    if pooling == "none":
        return None, f, None
    F = _population_map(data)
    if pooling == "complete":
        return F, f, None
    intercept_sd = jnp.broadcast_to(values["tau_a"], (n_groups,))
    slope_sd = values["tau"] * on + (1.0 - on)
    return F, f, _deviation_factor(intercept_sd, slope_sd, on * data.k)


def _population_map(data):
    # F: group coefficients' prior mean given phi = (ell, mu), before f.
    on = data.on
    n_groups, n_features = on.shape
    q = n_features + 1
    F = jnp.zeros((n_groups, q, q))
    F = F.at[:, 0, 0].set(1.0)
    F = F.at[:, 0, 1:].set(on * data.k - data.K)
    return F.at[:, jnp.arange(1, q), jnp.arange(1, q)].set(on)


def _deviation_factor(intercept_sd, slope_sd, row):
    # C = A diag(d) where A is the identity with first row [1, row]
    d = jnp.concatenate([intercept_sd[:, None], slope_sd], axis=1)
    C = jnp.eye(d.shape[1]) * d[:, None, :]
    return C.at[:, 0, 1:].set(row * slope_sd)


def _deviation_parts(pooling, data):
    # A (unit upper triangular: identity with first row [1, row]) of C = A D.
    on = data.on
    row = on * data.k if pooling == "partial" else on * (data.k - data.K)
    q = on.shape[1] + 1
    return jnp.broadcast_to(jnp.eye(q), (on.shape[0], q, q)).at[:, 0, 1:].set(row)


def _deviation_sd(pooling, values, data, hyper):
    # The diagonal d of C = A diag(d), group-last: (..., q, G); leading batch
    # axes of the values carry through.
    on = data.on.T
    if pooling == "partial":
        intercept_sd, slope = values["tau_a"], values["tau"]
    else:
        intercept_sd, slope = hyper.intercept, hyper.coef
    slope_sd = slope[..., :, None] * on + (1.0 - on)
    intercept_sd = jnp.broadcast_to(
        jnp.asarray(intercept_sd)[..., None, None],
        (*slope_sd.shape[:-2], 1, on.shape[1]),
    )
    return jnp.concatenate([intercept_sd, slope_sd], axis=-2)


def none_factor(data, hyper):
    """Group deviation factor ``C`` under no pooling (fixed by the prior).

    Parameters
    ----------
    data : CollapsedData
    hyper : Hyper

    Returns
    -------
    array of shape (G, q, q)
    """
    on = data.on
    intercept_sd = jnp.broadcast_to(hyper.intercept, (on.shape[0],))
    slope_sd = hyper.coef * on + (1.0 - on)
    return _deviation_factor(intercept_sd, slope_sd, on * (data.k - data.K))


def add_incomplete_rows(data, cells):
    """Statistics of every group with the rows holding latent cells added.

    Parameters
    ----------
    data : CollapsedData
        Data.
    cells : array of shape (M,)
        Values of the latent cells (internal units).

    Returns
    -------
    n, gram, xty, yty : arrays
        As in :class:`CollapsedData`, now over all rows.
    """
    if data.inc_group.shape[0] == 0:
        return data.n, data.gram, data.xty, data.yty
    n_groups = data.on.shape[0]
    design = data.inc_design.at[data.miss_row, data.miss_col].set(cells)
    xt = jnp.concatenate([jnp.ones((design.shape[0], 1)), design], axis=1)
    wxt = xt * data.inc_w[:, None]

    def seg(v):
        return jax.ops.segment_sum(v, data.inc_group, num_segments=n_groups)

    return (
        data.n + seg(data.inc_w),
        data.gram + seg(wxt[:, :, None] * xt[:, None, :]),
        data.xty + seg(wxt * data.inc_y[:, None]),
        data.yty + seg(data.inc_w * data.inc_y**2),
    )


class GroupTerms(NamedTuple):
    """Each group's log marginal likelihood as a quadratic in its prior mean.

    ``log p(u_g | b0) = const - b0'H b0 / 2 + b0'eta``.
    """

    const: jnp.ndarray  # (G,)
    H: jnp.ndarray  # (G, q, q)
    eta: jnp.ndarray  # (G, q)
    chol: jnp.ndarray | None  # (G, q, q) Cholesky factor of M
    proj: jnp.ndarray | None  # (G, q, q) L^-1 C'


def group_terms(C, sigma, stats):
    """Integrate every group's deviation out: quadratic form in its prior mean.

    The textbook form of the module docstring; the sampler uses the
    equivalent, cancellation-free form of :func:`marginal_loglik`.

    Parameters
    ----------
    C : array of shape (G, q, q) or None
        Group deviation factor (None: no deviation).
    sigma : scalar
        Residual sd, internal units.
    stats : tuple
        ``(n, gram, xty, yty)``.

    Returns
    -------
    GroupTerms
    """
    n, gram, xty, yty = stats
    s2 = sigma**2
    const = -0.5 * n * jnp.log(2.0 * jnp.pi * s2) - 0.5 * yty / s2
    if C is None:
        return GroupTerms(const, gram / s2, xty / s2, None, None)
    q = gram.shape[-1]
    m = jnp.eye(q) + jnp.einsum("gki,gkl,glj->gij", C, gram, C) / s2
    chol = jnp.linalg.cholesky(m)
    proj = jsl.solve_triangular(chol, jnp.swapaxes(C, -1, -2), lower=True)
    ps = jnp.einsum("gij,gjk->gik", proj, gram) / s2  # L^-1 C'S / s2
    pr = jnp.einsum("gij,gj->gi", proj, xty) / s2  # L^-1 C'r / s2
    logdet = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    const = const - logdet + 0.5 * jnp.sum(pr**2, axis=-1)
    H = gram / s2 - jnp.einsum("gki,gkj->gij", ps, ps)
    eta = xty / s2 - jnp.einsum("gki,gk->gi", ps, pr)
    return GroupTerms(const, H, eta, chol, proj)


class _Prepared(NamedTuple):
    # Statistics shifted by f (so that b0 = F phi) and mapped by A and F;
    # groups last.
    n: jnp.ndarray  # (G,)
    yty: jnp.ndarray  # (G,) (u - Xt f)'W(u - Xt f)
    dev_gram: jnp.ndarray | None  # (q, q, G) A'SA
    dev_xty: jnp.ndarray | None  # (q, G) A'r
    dev_cross: jnp.ndarray | None  # (q, q, G) A'SF (partial pooling)
    pop_left: jnp.ndarray | None  # (q, q, G) A^-1 F (partial pooling)
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
            None,
            None,
            jnp.einsum("gki,gkl,glj->ij", F, gram, F),
            jnp.einsum("gki,gk->i", F, xty),
        )
    A = _deviation_parts(pooling, data)
    dev_gram = jnp.einsum("gki,gkl,glj->ijg", A, gram, A)
    dev_xty = jnp.einsum("gki,gk->ig", A, xty)
    if pooling == "none":
        return _Prepared(n, yty, dev_gram, dev_xty, None, None, None, None)
    F = _population_map(data)
    # A^-1 is the identity with first row [1, -row].
    a_inv = 2.0 * jnp.eye(A.shape[-1]) - A
    return _Prepared(
        n,
        yty,
        dev_gram,
        dev_xty,
        jnp.einsum("gki,gkl,glj->ijg", A, gram, F),
        jnp.einsum("gij,gjk->ikg", a_inv, F),
        None,
        None,
    )


def _group_forms(pooling, inv, d, prep):
    # M, and the bilinear forms [a, b] of the module docstring, per group.
    q = d.shape[0]
    m = jnp.eye(q)[:, :, None] + inv * (d[:, None] * d[None, :] * prep.dev_gram)
    dr = (d * prep.dev_xty)[:, None]
    if pooling == "none":
        return m, dr, dr
    a = jnp.concatenate([prep.pop_left / d[:, None], dr], axis=1)
    b = jnp.concatenate([d[:, None] * prep.dev_cross, dr], axis=1)
    return m, a, b


def _population_terms(inv, total, prior_var):
    # log p of the population integral from the summed forms, and what its
    # gradient needs: lam^-1 and lam^-1 h.
    q = total.shape[0] - 1
    lam = 0.5 * inv * (total[:q, :q] + total[:q, :q].T) + jnp.diag(1.0 / prior_var)
    h = inv * total[:q, q]
    t, logdet = _inverse_cholesky(lam[:, :, None])
    t = t[:, :, 0]
    lam_inv = t.T @ t
    v = lam_inv @ h
    logp = -0.5 * jnp.sum(jnp.log(prior_var)) - 0.5 * logdet[0] + 0.5 * h @ v
    return logp, lam_inv, v


def _pooled_loglik_fwd(pooling, inv, d, prep, prior_var):
    m, a, b = _group_forms(pooling, inv, d, prep)
    (logdet, forms), (t, tab) = _logdet_forms_fwd(m, a, b)
    total = jnp.sum(forms, axis=-1)
    n_total, y_total = jnp.sum(prep.n), jnp.sum(prep.yty)
    k = total.shape[0] - 1
    logp = (
        0.5 * n_total * jnp.log(inv / (2.0 * jnp.pi))
        - 0.5 * inv * y_total
        - 0.5 * jnp.sum(logdet)
        + 0.5 * inv**2 * total[k, k]
    )
    lam_inv = v = None
    if pooling == "partial":
        pop, lam_inv, v = _population_terms(inv, total, prior_var)
        logp = logp + pop
    return logp, (inv, d, prep, t, tab, total, lam_inv, v)


def _pooled_loglik_bwd(pooling, residuals, g):
    inv, d, prep, t, tab, total, lam_inv, v = residuals
    q, k = d.shape[0], total.shape[0] - 1
    # cotangent of every group's forms (the same for all groups)
    c_forms = jnp.zeros((k + 1, k + 1)).at[k, k].set(0.5 * inv**2)
    grad_inv = 0.5 * jnp.sum(prep.n) / inv - 0.5 * jnp.sum(prep.yty)
    grad_inv = grad_inv + inv * total[k, k]
    if pooling == "partial":
        lam_bar = -0.5 * (lam_inv + jnp.outer(v, v))
        c_forms = c_forms.at[:q, :q].set(inv * lam_bar).at[:q, q].set(inv * v)
        grad_inv = grad_inv + jnp.sum(lam_bar * total[:q, :q]) + v @ total[:q, q]
    grad_m, grad_a, grad_b = _logdet_forms_grads(t, tab, -0.5, c_forms[:, :, None])
    # chain rule through M = I + inv (d d' o S~) and a, b (module docstring)
    gram = prep.dev_gram
    grad_inv = grad_inv + jnp.sum(_sum0(_sum0(grad_m * d[:, None] * d[None, :] * gram)))
    grad_d = inv * sum((grad_m[:, j] + grad_m[j]) * d[j] * gram[:, j] for j in range(q))
    grad_dr = grad_a[:, k] + grad_b[:, k]
    grad_d = grad_d + grad_dr * prep.dev_xty
    grad_dev_xty = grad_dr * d
    grad_dev_cross = grad_pop_left = None
    if pooling == "partial":
        ga, gb = grad_a[:, :q], grad_b[:, :q]
        grad_d = grad_d - sum(ga[:, c] * prep.pop_left[:, c] for c in range(q)) / d**2
        grad_d = grad_d + sum(gb[:, c] * prep.dev_cross[:, c] for c in range(q))
        grad_dev_cross = d[:, None] * gb
        grad_pop_left = ga / d[:, None]
    grad_prep = _Prepared(
        n=jnp.broadcast_to(0.5 * jnp.log(inv / (2.0 * jnp.pi)), prep.n.shape),
        yty=jnp.broadcast_to(-0.5 * inv, prep.yty.shape),
        dev_gram=inv * grad_m * d[:, None] * d[None, :],
        dev_xty=grad_dev_xty,
        dev_cross=grad_dev_cross,
        pop_left=grad_pop_left,
        pop_gram=None,
        pop_xty=None,
    )
    scale = lambda x: None if x is None else g * x  # noqa: E731
    return (
        g * grad_inv,
        g * grad_d,
        jax.tree_util.tree_map(scale, grad_prep),
        None,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pooled_loglik(pooling, inv, d, prep, prior_var):
    # Log marginal likelihood under partial or no pooling, with the
    # closed-form gradient of the module docstring (batch-last products, no
    # transposes or reductions over short axes: what XLA compiles well).
    return _pooled_loglik_fwd(pooling, inv, d, prep, prior_var)[0]


_pooled_loglik.defvjp(_pooled_loglik_fwd, _pooled_loglik_bwd)


def _prepared_loglik(pooling, prep, sigma, d, hyper):
    """Log marginal likelihood from prepared statistics (see module doc)."""
    inv = 1.0 / sigma**2
    prior_var = jnp.concatenate([hyper.intercept[None] ** 2, hyper.coef**2])
    if pooling != "complete":
        return _pooled_loglik(pooling, inv, d, prep, prior_var)
    logp = 0.5 * jnp.sum(prep.n) * jnp.log(inv / (2.0 * jnp.pi)) - 0.5 * inv * jnp.sum(
        prep.yty
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
    prep = _prepare(pooling, data, add_incomplete_rows(data, cells))
    d = None if pooling == "complete" else _deviation_sd(pooling, values, data, hyper)
    return _prepared_loglik(pooling, prep, values["sigma"], d, hyper)


def _imputation_loglik(data, loc, scale, cells):
    # x_observed factor and the latent cells' prior, as in collapsed_model.
    quad = data.x_sumsq - 2.0 * loc * data.x_sum + data.x_count * loc**2
    observed = jnp.sum(
        -0.5 * data.x_count * jnp.log(2.0 * jnp.pi * scale**2) - 0.5 * quad / scale**2
    )
    miss_group = data.inc_group[data.miss_row]
    return observed + jnp.sum(
        dist.Normal(loc[miss_group, data.miss_slot], scale[data.miss_slot]).log_prob(
            cells
        )
    )


def collapsed_model(data: CollapsedData, hyper: Hyper, pooling: str = "partial"):
    """NumPyro model of the collapsed engine.

    NUTS samples only the residual sd, the between-group sds (partial
    pooling) and the imputation model with its latent cells; the population
    means and every group's coefficients are integrated out exactly and drawn
    afterwards by :func:`conditional_draws`. Sites, priors and names match
    :func:`hiermask._model.direct_model`. The runner samples the same density
    through :func:`collapsed_density` (attached as ``flat_density``).

    Parameters
    ----------
    data : CollapsedData
        Statistics in internal units.
    hyper : Hyper
        Prior scales in internal units.
    pooling : {"partial", "none", "complete"}
        Pooling mode.
    """
    n_groups, n_features = data.on.shape
    cells = jnp.zeros(0)
    if data.miss_row.shape[0]:
        miss_group = data.inc_group[data.miss_row]
        loc, scale, cells = sample_imputation(
            n_groups, data.impute_cols, miss_group, data.miss_slot
        )
        quad = data.x_sumsq - 2.0 * loc * data.x_sum + data.x_count * loc**2
        numpyro.factor(
            "x_observed",
            jnp.sum(
                -0.5 * data.x_count * jnp.log(2.0 * jnp.pi * scale**2)
                - 0.5 * quad / scale**2
            ),
        )
    values = {"sigma": numpyro.sample("noise", dist.HalfNormal(hyper.noise))}
    if pooling == "partial":
        values["tau_a"] = numpyro.sample(
            "intercept_scale", dist.HalfNormal(hyper.group_intercept)
        )
        values["tau"] = numpyro.sample(
            "coef_scale",
            dist.HalfNormal(hyper.group_coef * jnp.ones(n_features)).to_event(1),
        )
    numpyro.factor(
        "marginal_likelihood", marginal_loglik(pooling, values, data, hyper, cells)
    )


def collapsed_density(data: CollapsedData, hyper: Hyper, pooling: str = "partial"):
    """The collapsed posterior as a density over one flat unconstrained vector.

    Exactly the posterior of :func:`collapsed_model` (same sites, priors and
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
    n_groups, n_features = data.on.shape
    n_cells = data.miss_row.shape[0]
    n_cols = data.impute_cols.shape[0]
    # (name, shape, positive, prior scale: Normal or HalfNormal(scale))
    sites = []
    if n_cells:
        sites += [
            ("x_loc", (n_groups, n_cols), False, IMPUTE_LOC_SCALE),
            ("x_scale", (n_cols,), True, IMPUTE_SCALE_SCALE),
            ("x_missing", (n_cells,), False, None),  # prior: imputation model
        ]
    sites.append(("noise", (), True, hyper.noise))
    if pooling == "partial":
        sites += [
            ("intercept_scale", (), True, hyper.group_intercept),
            ("coef_scale", (n_features,), True, hyper.group_coef),
        ]
    sizes = [math.prod(shape) for _, shape, _, _ in sites]
    positive = np.repeat([site[2] for site in sites], sizes)
    has_prior = np.repeat([site[3] is not None for site in sites], sizes)
    prior_scale = jnp.concatenate(
        [
            jnp.broadcast_to(1.0 if scale is None else scale, (width,))
            for (_, _, _, scale), width in zip(sites, sizes, strict=True)
        ]
    )
    offsets = np.cumsum([0, *sizes])
    prep = None if n_cells else _prepare(pooling, data, add_incomplete_rows(data, ()))

    def transform(z):
        return jnp.where(positive, jax.nn.softplus(z), z)

    def unpack(x):
        return {
            name: x[start:stop].reshape(shape)
            for (name, shape, _, _), start, stop in zip(
                sites, offsets[:-1], offsets[1:], strict=True
            )
        }

    def log_density(z):
        x = transform(z)
        # log-Jacobians and the Normal / HalfNormal priors, all sites at once
        # (constants dropped).
        logp = jnp.sum(jnp.where(positive, jax.nn.log_sigmoid(z), 0.0))
        logp = logp - 0.5 * jnp.sum(jnp.where(has_prior, (x / prior_scale) ** 2, 0.0))
        values = unpack(x)
        scales = {"sigma": values["noise"]}
        if pooling == "partial":
            scales["tau_a"] = values["intercept_scale"]
            scales["tau"] = values["coef_scale"]
        stats_prep = prep
        if n_cells:
            loc, scale, cells = values["x_loc"], values["x_scale"], values["x_missing"]
            logp = logp + _imputation_loglik(data, loc, scale, cells)
            stats_prep = _prepare(pooling, data, add_incomplete_rows(data, cells))
        d = (
            None
            if pooling == "complete"
            else _deviation_sd(pooling, scales, data, hyper)
        )
        return logp + _prepared_loglik(pooling, stats_prep, scales["sigma"], d, hyper)

    def potential(z):
        return -log_density(z)

    def constrain(z):
        return unpack(transform(z))

    return FlatDensity(len(positive), potential, constrain)


collapsed_model.flat_density = collapsed_density


#: conditional_draws processes draws in chunks of at most this many
#: (draws x groups x q x q) floats.
_CHUNK_FLOATS = 1 << 22


def _conditional_one(pooling, data, hyper, prep, normals, sigma, tau_a, tau, cells):
    # Conditional moments and draws of the population and group coefficients
    # given one posterior draw of the sampled sites (groups last inside).
    n_groups, n_features = data.on.shape
    q = n_features + 1
    if prep is None:
        prep = _prepare(pooling, data, add_incomplete_rows(data, cells))
    inv = 1.0 / sigma**2
    f = jnp.zeros((q, 1)).at[0].set(-data.e_y)
    eps_pop, eps_group = normals[:q], normals[q:].reshape(q, 1, n_groups)
    if pooling == "complete":
        lam, h = inv * prep.pop_gram, inv * prep.pop_xty
    else:
        d = _deviation_sd(pooling, {"tau_a": tau_a, "tau": tau}, data, hyper)
        m = jnp.eye(q)[:, :, None] + inv * (d[:, None] * d[None, :] * prep.dev_gram)
        t, _ = _inverse_cholesky(m)  # M^-1 = t't
    if pooling == "partial":
        dr = d * prep.dev_xty
        left = _mm(t, prep.pop_left / d[:, None])
        right = _mm(t, jnp.concatenate([d[:, None] * prep.dev_cross, dr[:, None]], 1))
        forms = inv * jnp.sum(_mtm(left, right), axis=-1)
        lam, h = 0.5 * (forms[:, :q] + forms[:, :q].T), forms[:, q]
    if pooling == "none":
        phi, b0 = jnp.zeros(q), f
    else:
        prior_var = jnp.concatenate([hyper.intercept[None] ** 2, hyper.coef**2])
        t_pop, _ = _inverse_cholesky((lam + jnp.diag(1.0 / prior_var))[:, :, None])
        # phi ~ N(lam^-1 h, lam^-1), lam^-1 = t_pop' t_pop
        white = _mm(t_pop, h[:, None, None]) + eps_pop[:, None, None]
        phi = _mtm(t_pop, white)[:, 0, 0]
        F = jnp.moveaxis(_population_map(data), 0, -1)  # (q, q, G)
        b0 = f + sum(F[:, j] * phi[j] for j in range(q))
    if pooling == "complete":
        coef, mean, cov = b0, b0, jnp.zeros((q, q, n_groups))
    else:
        # theta = b0 + A D v, v | phi ~ N(M^-1 D (A'r - A'S F phi) / s2, M^-1)
        resid = prep.dev_xty
        if pooling == "partial":
            resid = resid - sum(prep.dev_cross[:, j] * phi[j] for j in range(q))
        w = inv * _mm(t, (d * resid)[:, None])
        a_mat = jnp.moveaxis(_deviation_parts(pooling, data), 0, -1)
        factor = _mm(a_mat, d[:, None] * _tr(t))  # A D t'
        mean = b0 + _mm(factor, w)[:, 0]
        cov = _mm(factor, _tr(factor))
        coef = mean + _mm(factor, eps_group)[:, 0]
    return coef.T, phi, mean.T, jnp.moveaxis(cov, -1, 0)


def _fmix32(h):
    # MurmurHash3's finalizer: a bijective mixing of uint32 words.
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _chunk_key_data(rng_key, chunk):
    # Key material of XLA's native generator for one chunk, mixed from the
    # caller's key and the chunk index (no threefry in the program: each
    # threefry call site costs a large share of a small program's compile).
    if jnp.issubdtype(rng_key.dtype, jax.dtypes.prng_key):
        rng_key = jax.random.key_data(rng_key)
    words = jnp.ravel(rng_key).astype(jnp.uint32)
    seed = _fmix32(words[0] ^ _fmix32(words[-1] ^ jnp.uint32(0x9E3779B9)))
    salt = jnp.arange(4, dtype=jnp.uint32) + 4 * chunk.astype(jnp.uint32)
    return _fmix32(seed ^ _fmix32(salt + jnp.uint32(0x7F4A7C15)))


def conditional_draws(rng_key, draws, data, hyper, pooling):
    """Exact draws of the population and group coefficients, one per draw.

    For each posterior draw of the sampled sites, the population vector
    ``phi = (ell, mu)`` is drawn from its Gaussian conditional, then every
    group's coefficients given ``phi``. Also returns the Rao-Blackwellized
    posterior mean and covariance of each group's coefficients (averages of
    the conditional moments given the drawn ``phi``). Draws are processed in
    vectorized chunks.

    Parameters
    ----------
    rng_key : jax.random.PRNGKey
    draws : dict of arrays with leading dimension D
        Posterior draws of the sampled sites.
    data : CollapsedData
    hyper : Hyper
    pooling : {"partial", "none", "complete"}

    Returns
    -------
    out : dict
        ``group_coef_internal`` (D, G, q) and, unless ``pooling="none"``,
        ``intercept_at_means`` (D,) and ``coef_mean`` (D, p).
    mean : array of shape (G, q)
    cov : array of shape (G, q, q)
    """
    n_draws = draws["noise"].shape[0]
    n_groups, n_features = data.on.shape
    q = n_features + 1
    chunk = max(1, min(n_draws, _CHUNK_FLOATS // (n_groups * q * q)))
    n_chunks = -(-n_draws // chunk)
    pad = n_chunks * chunk - n_draws

    def chunked(x):
        # padding repeats the last draw; its weight is 0
        x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)])
        return x.reshape(n_chunks, chunk, *x.shape[1:])

    sigma = chunked(draws["noise"])
    tau_a = chunked(draws.get("intercept_scale", draws["noise"]))
    tau = chunked(draws.get("coef_scale", jnp.ones((n_draws, n_features))))
    cells = chunked(draws.get("x_missing", jnp.zeros((n_draws, 0))))
    weight = jnp.concatenate([jnp.ones(n_draws), jnp.zeros(pad)]).reshape(
        n_chunks, chunk
    )
    prep = None
    if data.miss_row.shape[0] == 0:
        prep = _prepare(pooling, data, add_incomplete_rows(data, ()))

    def one_chunk(args):
        index, sigma, tau_a, tau, cells, weight = args
        key_data = _chunk_key_data(rng_key, index)
        normals = _normal(_uniform(key_data, (chunk, q * (n_groups + 1))))
        coef, phi, mean, cov = jax.vmap(
            functools.partial(_conditional_one, pooling, data, hyper, prep)
        )(normals, sigma, tau_a, tau, cells)
        w = weight[:, None, None]
        sums = (
            jnp.sum(w * mean, axis=0),
            jnp.sum(w[..., None] * cov, axis=0),
            jnp.sum(w[..., None] * mean[..., :, None] * mean[..., None, :], axis=0),
        )
        return coef, phi, sums

    chunks = (jnp.arange(n_chunks), sigma, tau_a, tau, cells, weight)
    if n_chunks == 1:  # no loop: a smaller program
        out = one_chunk(jax.tree_util.tree_map(lambda a: a[0], chunks))
        coef, phi, sums = jax.tree_util.tree_map(lambda a: a[None], out)
    else:
        coef, phi, sums = jax.lax.map(one_chunk, chunks)
    s_mean, s_cov, s_outer = sums
    onq = jnp.concatenate([jnp.ones((n_groups, 1)), data.on], axis=1)
    coef = coef.reshape(n_chunks * chunk, n_groups, q)[:n_draws] * onq
    phi = phi.reshape(n_chunks * chunk, q)[:n_draws]
    mean = s_mean.sum(0) / n_draws
    cov = s_cov.sum(0) / n_draws + s_outer.sum(0) / n_draws
    cov = cov - mean[:, :, None] * mean[:, None, :]
    out = {"group_coef_internal": coef}
    if pooling != "none":
        out["intercept_at_means"] = phi[:, 0]
        out["coef_mean"] = phi[:, 1:]
    return out, mean * onq, cov * onq[:, :, None] * onq[:, None, :]
