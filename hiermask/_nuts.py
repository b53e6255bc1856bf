"""hiermask's NUTS kernel and its warmup adaptation: pure functions.

The algorithm is NumPyro's (and Stan's): the No-U-Turn sampler of Hoffman and
Gelman (2014) with multinomial sampling of the trajectory (uniform within
each doubling, biased towards the new half at the top level), the
generalized U-turn criterion (Betancourt, 2017) checked on every sub-tree
through checkpoints (NumPyro's iterative scheme), divergence when the energy
error exceeds 1000. Warmup adapts the step size by dual averaging and a
diagonal mass matrix in Stan's windows (75 / 25, 50, ... / 50 iterations),
or a dense one for a density that asks for it (``FlatDensity.dense_metric``);
after each slow window dual averaging restarts from the current step size,
which is NumPyro's default (Stan searches for a step size there instead).
Two choices differ from NumPyro's and only change warmup, never the target:
the first metric comes from the gradient at the starting point instead of
the identity, and the variance estimates are regularized relative to the
current metric instead of towards 1e-3 (a scale-free form of Stan's rule).

It is written here, over one flat vector and for chains in lockstep, so
that the compiled program stays small (one copy of the gradient code, no
per-site bookkeeping): compilation dominates the cost of a small fit
(``docs/performance.md``). The kernel is ``init`` / ``step`` over
NamedTuples; warmup is ``adaptation_init`` / ``adaptation_update`` /
``adaptation_final``, the shape of BlackJAX's ``window_adaptation``;
a run is a fixed sequence of segments (:func:`segments`), each a
``lax.scan`` of the same length (:func:`iterate`) that carries the
:class:`ChainState` on to the next, so that every segment of a run is a call
of one compiled program and nothing calls back into Python. Every array has
the chains first. Random numbers come from XLA's native bit generator keyed
by NumPy (:func:`uniform`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _limits

__all__ = [
    "AdaptState",
    "ChainState",
    "Iterations",
    "NUTSInfo",
    "NUTSState",
    "WindowFlags",
    "adaptation_final",
    "adaptation_init",
    "adaptation_start",
    "adaptation_update",
    "adaptation_windows",
    "checkpoint_indices",
    "cholesky",
    "init",
    "is_iterative_turning",
    "is_turning",
    "iterate",
    "key_data",
    "leapfrog",
    "make_point",
    "momentum_factor",
    "normal",
    "segment_length",
    "segments",
    "start",
    "step",
    "uniform",
    "velocity",
    "warmup_schedule",
]

#: A trajectory whose energy error exceeds this is divergent (NumPyro, Stan).
MAX_DELTA_ENERGY = 1000.0

# Dual averaging constants (Hoffman and Gelman, 2014; Stan defaults).
_DA_GAMMA, _DA_T0, _DA_KAPPA = 0.05, 10.0, 0.75


# --------------------------------------------------------------------------
# Random numbers


def uniform(key_data, shape):
    """Uniforms on [0, 1) from XLA's native random bit generator.

    The key material (JAX's "rbg" keys) comes from NumPy outside the
    program: JAX's default threefry generator costs a large share of a small
    program's compile time (``docs/performance.md``).

    Parameters
    ----------
    key_data : array of shape (4,), uint32
    shape : tuple of int

    Returns
    -------
    array of shape ``shape``
    """
    key = jax.random.wrap_key_data(key_data, impl="rbg")
    return jax.random.uniform(key, shape)


def normal(u):
    """Standard normals from uniforms on [0, 1) (``jax.random.normal``'s way).

    Parameters
    ----------
    u : array

    Returns
    -------
    array of the shape of ``u``
    """
    v = jnp.maximum(2.0 * u - 1.0, np.nextafter(-1.0, 0.0))
    return np.sqrt(2.0) * jax.scipy.special.erfinv(v)


def key_data(seed_value, num_chains, num_warmup, num_samples, max_tree_depth):
    """Key material of a run: (chains, iterations + 1, leaf blocks + 1, 4).

    Row ``i`` of a chain feeds iteration ``i`` (row 0: the starting points
    and the first gradient); column 0 its momenta, directions and first leaf
    block, column ``b`` its ``b``-th further leaf block. Derived from
    ``seed_value`` alone (chains in lockstep use the first chain's rows).

    Returns
    -------
    ndarray of uint32
    """
    n_blocks = max(1, (2**max_tree_depth) // _limits.LEAF_BLOCK)
    rng = np.random.default_rng(seed_value)
    shape = (num_chains, num_warmup + num_samples + 1, n_blocks + 1, 4)
    return rng.integers(0, 2**32, size=shape, dtype=np.uint32)


# --------------------------------------------------------------------------
# Trajectory pieces (NumPyro's hmc_util, for chains in lockstep)


class Point(NamedTuple):
    """A point of phase space per chain, stored as one array so that every
    select of a point is one operation (a small model's cost is the number
    of operations run): ``[z, r, grad, potential]`` of shape
    (C, 3 dim + 1), read through the properties."""

    data: jnp.ndarray

    @property
    def dim(self):
        return (self.data.shape[-1] - 1) // 3

    @property
    def z(self):  # (C, dim) position
        return self.data[:, : self.dim]

    @property
    def r(self):  # (C, dim) momentum
        return self.data[:, self.dim : 2 * self.dim]

    @property
    def grad(self):  # (C, dim) gradient of the potential at z
        return self.data[:, 2 * self.dim : 3 * self.dim]

    @property
    def potential(self):  # (C,)
        return self.data[:, 3 * self.dim]


def make_point(z, r, grad, potential):
    """The :class:`Point` of its parts."""
    return Point(jnp.concatenate([z, r, grad, potential[:, None]], axis=1))


def _is_dense(inv_mass):
    # (C, dim, dim) dense against (C, dim) diagonal inverse masses
    return inv_mass.ndim == 3


def velocity(inv_mass, r):
    """``M^-1 r`` per chain: the inverse mass ``M^-1`` diagonal (C, dim) or
    dense (C, dim, dim); the momenta ``r`` (C, dim) or (C, k, dim)."""
    if _is_dense(inv_mass):
        return jnp.einsum("cij,c...j->c...i", inv_mass, r)
    if r.ndim == 3:
        return inv_mass[:, None] * r
    return inv_mass * r


def kinetic_energy(inv_mass, r):
    """Kinetic energy ``r' M^-1 r / 2`` (``inv_mass``: see :func:`velocity`)."""
    if _is_dense(inv_mass):
        return 0.5 * jnp.sum(r * velocity(inv_mass, r), axis=-1)
    return 0.5 * jnp.sum(inv_mass * r**2, axis=-1)


def is_turning(inv_mass, r_left, r_right, r_sum):
    """Generalized U-turn criterion (Betancourt, 2017), NumPyro's form.

    ``inv_mass``: see :func:`velocity`; the momenta (C, dim), or (C, k,
    dim) for ``k`` sub-trees at once. With a dense metric ``M^-1`` is
    applied once, to ``rho`` (``r' M^-1 rho = rho' M^-1 r``).
    """
    rho = r_sum - 0.5 * (r_left + r_right)
    if _is_dense(inv_mass):
        v_rho = velocity(inv_mass, rho)
        return (jnp.sum(r_left * v_rho, axis=-1) <= 0) | (
            jnp.sum(r_right * v_rho, axis=-1) <= 0
        )
    if rho.ndim == 3:
        inv_mass = inv_mass[:, None]
    return (jnp.sum(inv_mass * r_left * rho, axis=-1) <= 0) | (
        jnp.sum(inv_mass * r_right * rho, axis=-1) <= 0
    )


def leapfrog(value_and_grad, point, step, inv_mass):
    """One leapfrog step of size ``step`` (C, 1), negative to go left."""
    r = point.r - 0.5 * step * point.grad
    if _is_dense(inv_mass):
        z = point.z + step * velocity(inv_mass, r)
    else:
        z = point.z + step * inv_mass * r
    potential, grad = value_and_grad(z)
    r = r - 0.5 * step * grad
    return make_point(z, r, grad, potential)


def checkpoint_indices(leaf):
    """Checkpoints a leaf of a doubling checks against: ``(idx_min, idx_max)``.

    NumPyro's ``_leaf_idx_to_ckpt_idxs``: an even leaf ``n`` is stored at
    checkpoint ``idx_max``; an odd one closes the sub-trees whose left-most
    leaves sit at checkpoints ``idx_min..idx_max``.
    """
    idx_max = jax.lax.population_count(leaf >> 1)
    idx_min = idx_max - jax.lax.population_count((~leaf & (leaf + 1)) - 1) + 1
    return idx_min, idx_max


def is_iterative_turning(inv_mass, r, r_sum, ckpt_r, ckpt_r_sum, idx_min, idx_max):
    """Whether any sub-tree the leaf closes makes a U-turn (NumPyro's scheme).

    ``ckpt_r`` and ``ckpt_r_sum`` (C, max_depth, dim): momentum and running
    momentum sum at each checkpoint; ``r_sum``: the running sum at the leaf.
    """
    levels = jnp.arange(ckpt_r.shape[1])
    turns = is_turning(
        inv_mass, ckpt_r, r[:, None], r_sum[:, None] - ckpt_r_sum + ckpt_r
    )
    in_range = (levels >= idx_min[:, None]) & (levels <= idx_max[:, None])
    return jnp.any(turns & in_range, axis=1)


def _pick(table, index):
    # table[c, index[c]] for every chain c.
    return jnp.take_along_axis(table, index[:, None], axis=1)[:, 0]


def _where(flag, new, old):
    # Per-chain select of pytrees: flag (C,) against arrays (C, ...).
    def select(a, b):
        return jnp.where(flag.reshape(flag.shape + (1,) * (a.ndim - 1)), a, b)

    return jax.tree_util.tree_map(select, new, old)


class Trajectory(NamedTuple):
    """What stays fixed while one transition builds its trajectory."""

    value_and_grad: Callable  # (C, dim) -> ((C,), (C, dim))
    inv_mass: jnp.ndarray  # (C, dim) diagonal or (C, dim, dim) dense
    step_size: jnp.ndarray  # (C,)
    energy0: jnp.ndarray  # (C,) energy at the start
    going_right: jnp.ndarray  # (C, max_depth) direction of each doubling
    top_u: jnp.ndarray  # (C, max_depth) uniforms of the biased merges
    # The first gradient: a trajectory of one leaf at step size 0 whose leaf
    # is taken, so that the chains get the gradient at their starting point
    # from the transition's own copy of the gradient code.
    first_gradient: jnp.ndarray  # () bool


# Rows of a tree's point table.
_CURRENT, _LEFT, _RIGHT, _PROPOSAL, _SUB_PROPOSAL = range(5)


class Tree(NamedTuple):
    """A trajectory under construction, per chain.

    Same-shaped parts are stacked, so that the trajectory loop carries ten
    arrays and every per-chain select of a tree is ten operations (a small
    model's cost is the number of operations run); the parts are read
    through the properties and the tree is made by :func:`make_tree`.
    """

    points: jnp.ndarray  # (C, 5, 3 dim + 1): current, left, right, proposals
    r_sums: jnp.ndarray  # (C, 2, dim): momentum sums of tree, doubling
    ckpt: jnp.ndarray  # (C, max_depth, 2, dim): checkpointed r, r_sum
    log_weights: jnp.ndarray  # (C, 2): log total weights of tree, doubling
    sum_accept: jnp.ndarray  # (C,) sum of the leaves' acceptance statistics
    depth: jnp.ndarray  # (C,) number of finished doublings
    leaf: jnp.ndarray  # (C,) index of the next leaf in its doubling
    n_leaves: jnp.ndarray  # (C,)
    done: jnp.ndarray  # (C,)
    diverging: jnp.ndarray  # (C,)

    @property
    def current(self):  # the edge the next leaf extends
        return Point(self.points[:, _CURRENT])

    @property
    def left(self):  # the tree's left-most point (finished doublings)
        return Point(self.points[:, _LEFT])

    @property
    def right(self):  # its right-most point
        return Point(self.points[:, _RIGHT])

    @property
    def proposal(self):  # the tree's multinomial sample
        return Point(self.points[:, _PROPOSAL])

    @property
    def sub_proposal(self):  # the sample of the doubling under way
        return Point(self.points[:, _SUB_PROPOSAL])

    @property
    def r_sum(self):  # (C, dim) momentum sum of the tree
        return self.r_sums[:, 0]

    @property
    def sub_r_sum(self):  # (C, dim) of the doubling under way
        return self.r_sums[:, 1]

    @property
    def log_weight(self):  # (C,) log total weight of the tree
        return self.log_weights[:, 0]

    @property
    def sub_log_weight(self):  # (C,) of the doubling under way
        return self.log_weights[:, 1]


def make_tree(points, r_sums, log_weights, ckpt, **rest):
    """The :class:`Tree` of its parts.

    ``points``: the :class:`Point` ``(current, left, right, proposal,
    sub_proposal)``; ``r_sums``: ``(r_sum, sub_r_sum)``; ``log_weights``:
    ``(log_weight, sub_log_weight)``; ``ckpt``: the stacked checkpoints of
    :func:`_grow_subtree`; ``rest``: the other fields by name.
    """
    return Tree(
        points=jnp.stack([p.data for p in points], axis=1),
        r_sums=jnp.stack(r_sums, axis=1),
        ckpt=ckpt,
        log_weights=jnp.stack(log_weights, axis=1),
        **rest,
    )


class _Leaf(NamedTuple):
    # One new leaf and what it does to the doubling under way.
    point: Point
    right: jnp.ndarray  # (C,) it extends the right edge
    delta: jnp.ndarray  # (C,) energy error
    diverging: jnp.ndarray
    take: jnp.ndarray  # it becomes the doubling's sample
    sub_log_weight: jnp.ndarray
    sub_r_sum: jnp.ndarray
    ckpt: jnp.ndarray  # (C, max_depth, 2, dim) checkpointed r and r_sum
    sub_turning: jnp.ndarray
    sub_done: jnp.ndarray  # the doubling is finished (full, turning, diverging)


def _initial_tree(start, max_depth):
    # A tree of the starting point alone.
    n_chains, dim = start.r.shape
    zeros = jnp.zeros(n_chains, jnp.int32)
    return make_tree(
        points=(start,) * 5,
        r_sums=(start.r, jnp.zeros_like(start.r)),
        log_weights=(jnp.zeros(n_chains), jnp.full(n_chains, -jnp.inf)),
        ckpt=jnp.zeros((n_chains, max_depth, 2, dim)),
        sum_accept=jnp.zeros(n_chains),
        depth=zeros,
        leaf=zeros,
        n_leaves=zeros,
        done=jnp.zeros(n_chains, bool),
        diverging=jnp.zeros(n_chains, bool),
    )


def _grow_subtree(traj, tree, leaf_u):
    """One leaf more in the doubling under way: uniform progressive sampling
    within it, checkpoints at even leaves and U-turn checks at odd ones."""
    right = _pick(traj.going_right, tree.depth)
    step_size = jnp.where(right, traj.step_size, -traj.step_size)[:, None]
    new = leapfrog(traj.value_and_grad, tree.current, step_size, traj.inv_mass)
    delta = new.potential + kinetic_energy(traj.inv_mass, new.r) - traj.energy0
    delta = jnp.where(jnp.isnan(delta), jnp.inf, delta)
    diverging = (delta > MAX_DELTA_ENERGY) & ~traj.first_gradient
    sub_log_weight = jnp.logaddexp(tree.sub_log_weight, -delta)
    u = _pick(leaf_u, tree.n_leaves % _limits.LEAF_BLOCK)
    take = (u < jnp.exp(-delta - sub_log_weight)) | traj.first_gradient
    sub_r_sum = tree.sub_r_sum + new.r
    idx_min, idx_max = checkpoint_indices(tree.leaf)
    levels = jnp.arange(tree.ckpt.shape[1])
    store = ((tree.leaf % 2) == 0)[:, None] & (levels == idx_max[:, None])
    ckpt = jnp.where(
        store[:, :, None, None],
        jnp.stack([new.r, sub_r_sum], axis=1)[:, None],
        tree.ckpt,
    )
    sub_turning = is_iterative_turning(
        traj.inv_mass, new.r, sub_r_sum, ckpt[:, :, 0], ckpt[:, :, 1], idx_min, idx_max
    )
    full = (tree.leaf + 1) == (1 << tree.depth)
    return _Leaf(
        point=new,
        right=right,
        delta=delta,
        diverging=diverging,
        take=take,
        sub_log_weight=sub_log_weight,
        sub_r_sum=sub_r_sum,
        ckpt=ckpt,
        sub_turning=sub_turning,
        sub_done=full | sub_turning | diverging | traj.first_gradient,
    )


def _combine_tree(traj, tree, leaf, max_depth):
    """Merge a finished, valid doubling into the tree (biased sampling) and
    decide whether the trajectory ends; returns the updated tree."""
    sub_done, new = leaf.sub_done, leaf.point
    valid = sub_done & ~leaf.sub_turning & ~leaf.diverging
    gain = jnp.exp(leaf.sub_log_weight - tree.log_weight)
    move = (valid & (_pick(traj.top_u, tree.depth) < gain)) | traj.first_gradient
    sub_proposal = _where(leaf.take, new, tree.sub_proposal)
    left = _where(valid & ~leaf.right, new, tree.left)
    right = _where(valid & leaf.right, new, tree.right)
    r_sum = _where(valid, tree.r_sum + leaf.sub_r_sum, tree.r_sum)
    turning = is_turning(traj.inv_mass, left.r, right.r, r_sum)
    depth = tree.depth + sub_done.astype(jnp.int32)
    ends = ~valid | turning | (depth >= max_depth) | traj.first_gradient
    # The next doubling starts from the edge in its direction.
    next_right = _pick(traj.going_right, jnp.minimum(depth, max_depth - 1))
    current = _where(sub_done, _where(next_right, right, left), new)
    proposal = _where(move, sub_proposal, tree.proposal)
    log_weight = jnp.where(
        valid, jnp.logaddexp(tree.log_weight, leaf.sub_log_weight), tree.log_weight
    )
    return make_tree(
        points=(current, left, right, proposal, sub_proposal),
        r_sums=(r_sum, _where(sub_done, 0.0 * new.r, leaf.sub_r_sum)),
        log_weights=(
            log_weight,
            jnp.where(sub_done, -jnp.inf, leaf.sub_log_weight),
        ),
        ckpt=leaf.ckpt,
        sum_accept=tree.sum_accept + jnp.minimum(jnp.exp(-leaf.delta), 1.0),
        depth=depth,
        leaf=jnp.where(sub_done, 0, tree.leaf + 1),
        n_leaves=tree.n_leaves + 1,
        done=sub_done & ends,
        diverging=leaf.diverging,
    )


def _build_tree(traj, tree, key_data, first_leaf_u, max_depth):
    """Grow the trajectory one leaf per loop iteration until every chain is
    done; the loop runs while any chain is still building, so its compiled
    body is small. Leaves draw their selection uniforms in blocks of
    ``LEAF_BLOCK`` (longer trajectories draw another block)."""
    n_chains = tree.done.shape[0]

    def leaf_step(state):
        t, leaf_u, limit = state
        active = ~t.done & (t.n_leaves < limit)
        grown = _combine_tree(traj, t, _grow_subtree(traj, t, leaf_u), max_depth)
        return _where(active, grown, t), leaf_u, limit

    def block(state):
        t, n_blocks = state
        more = uniform(
            key_data[jnp.maximum(n_blocks, 1)], (n_chains, _limits.LEAF_BLOCK)
        )
        leaf_u = jnp.where(n_blocks == 0, first_leaf_u, more)
        limit = (n_blocks + 1) * _limits.LEAF_BLOCK
        t, _, _ = jax.lax.while_loop(
            lambda s: jnp.any(~s[0].done & (s[0].n_leaves < s[2])),
            leaf_step,
            (t, leaf_u, limit),
        )
        return t, n_blocks + 1

    tree, _ = jax.lax.while_loop(
        lambda s: jnp.any(~s[0].done), block, (tree, jnp.zeros((), jnp.int32))
    )
    return tree


# --------------------------------------------------------------------------
# The kernel


class NUTSState(NamedTuple):
    """The state of every chain between transitions."""

    z: jnp.ndarray  # (C, dim)
    grad: jnp.ndarray  # (C, dim) gradient of the potential at z
    potential: jnp.ndarray  # (C,)


class NUTSInfo(NamedTuple):
    """What a transition reports, per chain."""

    accept_prob: jnp.ndarray  # (C,) mean acceptance statistic of the leaves
    n_steps: jnp.ndarray  # (C,) leapfrog steps
    diverging: jnp.ndarray  # (C,)


def init(z):
    """The state at starting points ``z`` (C, dim), before the first gradient.

    The first call of :func:`step` must pass ``first_gradient=True``: it
    evaluates the potential and its gradient at ``z`` and moves nowhere.
    """
    n_chains, dim = z.shape
    return NUTSState(z, jnp.zeros((n_chains, dim)), jnp.zeros(n_chains))


def step(
    value_and_grad,
    state,
    key_data,
    step_size,
    inv_mass,
    max_depth,
    first_gradient,
    mass_factor=None,
):
    """One NUTS transition of every chain, in lockstep.

    Parameters
    ----------
    value_and_grad : callable
        ``(C, dim) -> ((C,), (C, dim))``: potential and its gradient.
    state : NUTSState
    key_data : array of shape (n_blocks + 1, 4), uint32
        Key material of the transition's random numbers (see :func:`uniform`).
    step_size : array of shape (C,)
    inv_mass : array of shape (C, dim) or (C, dim, dim)
        Diagonal or dense inverse mass matrices ``M^-1``.
    max_depth : int
    first_gradient : bool scalar
        Only evaluate the gradient at ``state.z`` (see :func:`init`).
    mass_factor : array of shape (C, dim, dim), optional
        With a dense ``inv_mass`` (and only then): ``F`` with ``F F' = M``,
        which turns standard normals into momenta (:func:`momentum_factor`).

    Returns
    -------
    NUTSState, NUTSInfo
    """
    n_chains, dim = state.z.shape
    u = uniform(key_data[0], (n_chains, dim + 2 * max_depth + _limits.LEAF_BLOCK))
    if mass_factor is None:
        r0 = normal(u[:, :dim]) / jnp.sqrt(inv_mass)
    else:
        r0 = velocity(mass_factor, normal(u[:, :dim]))
    traj = Trajectory(
        value_and_grad=value_and_grad,
        inv_mass=inv_mass,
        step_size=jnp.where(first_gradient, 0.0, step_size),
        energy0=state.potential + kinetic_energy(inv_mass, r0),
        going_right=u[:, dim : dim + max_depth] < 0.5,
        top_u=u[:, dim + max_depth : dim + 2 * max_depth],
        first_gradient=first_gradient,
    )
    start = make_point(state.z, r0, state.grad, state.potential)
    tree = _build_tree(
        traj,
        _initial_tree(start, max_depth),
        key_data,
        u[:, dim + 2 * max_depth :],
        max_depth,
    )
    new = tree.proposal
    info = NUTSInfo(tree.sum_accept / tree.n_leaves, tree.n_leaves, tree.diverging)
    return NUTSState(new.z, new.grad, new.potential), info


# --------------------------------------------------------------------------
# Warmup adaptation (Stan's windows; BlackJAX's init / update / final shape)


def adaptation_windows(num_warmup):
    """Stan's warmup windows: ``[(start, end), ...]``, ends inclusive.

    A fast initial buffer (75), slow windows doubling from 25 in which the
    mass matrix is estimated, a fast final buffer (50); shortened
    proportionally for short warmups, as in Stan and NumPyro.
    """
    if num_warmup < 20:
        return [(0, num_warmup - 1)]
    start_buffer, end_buffer, first = 75, 50, 25
    if start_buffer + end_buffer + first > num_warmup:
        start_buffer = int(0.15 * num_warmup)
        end_buffer = int(0.1 * num_warmup)
        first = num_warmup - start_buffer - end_buffer
    windows = [(0, start_buffer - 1)]
    end_start = num_warmup - end_buffer
    size, begin = first, start_buffer
    while begin < end_start:
        if 3 * size <= end_start - begin:
            next_size = 2 * size
        else:
            size = end_start - begin
            next_size = size
        windows.append((begin, begin + size - 1))
        begin, size = begin + size, next_size
    windows.append((end_start, num_warmup - 1))
    return windows


class WindowFlags(NamedTuple):
    """Per iteration of a run (the first-gradient iteration first)."""

    warm: np.ndarray  # a warmup iteration: adapt
    collect: np.ndarray  # its draw feeds the mass matrix estimate
    window_end: np.ndarray  # a slow window ends there
    last: np.ndarray  # the last warmup iteration


def warmup_schedule(num_warmup, num_samples):
    """The :class:`WindowFlags` of every iteration of a run (NumPy arrays)."""
    length = num_warmup + num_samples + 1
    warm, collect, window_end, last = (np.zeros(length, bool) for _ in range(4))
    warm[1 : num_warmup + 1] = True
    if num_warmup:
        last[num_warmup] = True
        for start, end in adaptation_windows(num_warmup)[1:-1]:
            collect[start + 1 : end + 2] = True
            window_end[end + 1] = True
    return WindowFlags(warm, collect, window_end, last)


class AdaptState(NamedTuple):
    """Per chain: step size, inverse mass matrix (diagonal, or dense with the
    factor that draws its momenta), dual averaging (iterate, its weighted
    average, mean statistic, count, centre) and the Welford mean, sums of
    squares (and of cross products, dense) and count of the current slow
    window."""

    step_size: jnp.ndarray  # (C,)
    inv_mass: jnp.ndarray  # (C, dim) diagonal or (C, dim, dim) dense
    log_step: jnp.ndarray  # (C,)
    log_step_avg: jnp.ndarray
    stat_avg: jnp.ndarray
    count: jnp.ndarray
    center: jnp.ndarray
    w_mean: jnp.ndarray  # (C, dim)
    w_m2: jnp.ndarray  # the shape of inv_mass
    w_n: jnp.ndarray  # (C,)
    mass_factor: jnp.ndarray | None = None  # (C, dim, dim) when dense


def adaptation_init(n_chains, dim, dense=False):
    """Step size 1, identity metric (dense: a full matrix, whose off-diagonal
    elements warmup estimates too), dual averaging centred at log 10."""
    ones, zeros = jnp.ones(n_chains), jnp.zeros(n_chains)
    shape = (n_chains, dim, dim) if dense else (n_chains, dim)
    identity = jnp.broadcast_to(jnp.eye(dim), shape) if dense else jnp.ones(shape)
    return AdaptState(
        step_size=ones,
        inv_mass=identity,
        log_step=zeros,
        log_step_avg=zeros,
        stat_avg=zeros,
        count=zeros,
        center=jnp.full(n_chains, jnp.log(10.0)),
        w_mean=jnp.zeros((n_chains, dim)),
        w_m2=jnp.zeros(shape),
        w_n=zeros,
        mass_factor=identity if dense else None,
    )


def cholesky(m):
    """Lower Cholesky factor of one small SPD matrix, a column per iteration
    of a loop: no LAPACK, whose batched calls run under the LAPACK lock
    (:mod:`hiermask._xla`), and a program that does not grow with the size
    (the unrolled factorization's compile time grew about as its fourth
    power)."""
    size = m.shape[0]
    index = jnp.arange(size)

    def column(j, chol):
        # m[:, j] - sum_{k < j} L[:, k] L[j, k]: columns >= j are still 0
        s = m[:, j] - chol @ chol[j]
        d = jnp.sqrt(s[j])
        return chol.at[:, j].set(
            jnp.where(index > j, s / d, jnp.where(index == j, d, 0.0))
        )

    return jax.lax.fori_loop(0, size, column, jnp.zeros_like(m))


def momentum_factor(inv_mass):
    """``F = L^-T`` for dense inverse mass matrices ``M^-1 = L L'`` (C, dim,
    dim): ``F F' = M``, so ``F`` times standard normals are momenta. ``L^-1``
    by forward substitution, a row per iteration of a loop."""
    dim = inv_mass.shape[-1]
    identity = jnp.eye(dim)

    def inverse(chol):
        def row(i, inv):
            # row i of L^-1: (e_i - L[i] L^-1) / L[i, i]; rows >= i are 0
            return inv.at[i].set((identity[i] - chol[i] @ inv) / chol[i, i])

        return jax.lax.fori_loop(0, dim, row, jnp.zeros_like(chol))

    inverse_chol = jax.vmap(lambda m: inverse(cholesky(m)))(inv_mass)
    return jnp.swapaxes(inverse_chol, -1, -2)


def adaptation_start(state, grad, known_variance):
    """The first metric, from the gradient at the starting point.

    Directions where the density is steep start with small steps: this
    spares the first window trajectories of hundreds of steps on a
    posterior whose scales differ by orders of magnitude (Stan and NumPyro
    start from the identity); the first slow window replaces it. Known
    variances (``FlatDensity.init_variance``, NaN elsewhere) take
    precedence: near the mode of a narrow coordinate the gradient is small.
    """
    steep = jnp.where(jnp.isfinite(grad), jnp.clip(1.0 / jnp.abs(grad), 1e-8, 1.0), 1.0)
    variance = jnp.where(jnp.isnan(known_variance), steep, known_variance)
    if state.mass_factor is None:
        return state._replace(inv_mass=variance)
    return state._replace(
        inv_mass=_diagonal_matrix(variance),
        mass_factor=_diagonal_matrix(1.0 / jnp.sqrt(variance)),
    )


def _diagonal_matrix(d):
    # (C, dim) -> (C, dim, dim) with d on the diagonals
    return d[..., None] * jnp.eye(d.shape[-1])


def _dual_averaging(state, accept, target_accept_prob):
    # One dual-averaging step of the log step size (Hoffman and Gelman, 2014).
    count = state.count + 1.0
    stat_avg = (1.0 - 1.0 / (count + _DA_T0)) * state.stat_avg + (
        target_accept_prob - accept
    ) / (count + _DA_T0)
    log_step = state.center - jnp.sqrt(count) / _DA_GAMMA * stat_avg
    weight = count ** (-_DA_KAPPA)
    log_step_avg = (1.0 - weight) * state.log_step_avg + weight * log_step
    return count, stat_avg, log_step, log_step_avg


def _clipped_exp(log_step):
    finfo = jnp.finfo(jnp.float64)
    return jnp.clip(jnp.exp(log_step), finfo.tiny, finfo.max)


def _welford(state, z, collect):
    # The slow window's running mean and sum of squares, with this draw.
    w_n = state.w_n + collect
    delta = z - state.w_mean
    w_mean = jnp.where(collect, state.w_mean + delta / w_n[:, None], state.w_mean)
    if state.mass_factor is None:
        products = delta * (z - w_mean)
    else:
        products = delta[:, :, None] * (z - w_mean)[:, None, :]
    w_m2 = jnp.where(collect, state.w_m2 + products, state.w_m2)
    return w_mean, w_m2, w_n


def _dense_estimate(covariance, n):
    """A window's covariance estimate, made symmetric and shrunk towards its
    own diagonal with weight ``dim / (n + dim)`` (``n`` draws): with fewer
    draws than dimensions the sample covariance is singular, and its
    noisiest directions would get the smallest steps (Stan's rule alone, on
    a 46-coordinate "full" density: trajectories of 784 steps on average,
    1023 at most, after a first window of 25 draws; docs/performance.md)."""
    dim = covariance.shape[-1]
    covariance = 0.5 * (covariance + jnp.swapaxes(covariance, -1, -2))
    weight = dim / (n + dim)
    diagonal = _diagonal_matrix(jnp.diagonal(covariance, axis1=-2, axis2=-1))
    return (1.0 - weight) * covariance + weight * diagonal


def adaptation_update(state, accept, z, target_accept_prob, flags):
    """Adapt after one iteration with flags ``flags`` (:class:`WindowFlags`).

    Dual averaging of the step size; a Welford estimate of each slow
    window's variances, which become the metric when the window ends,
    regularized relative to the current metric (Stan shrinks towards 1e-3
    instead: a coordinate whose posterior sd is 1e-3 or less, a residual sd
    from millions of rows, would get a metric hundreds of times too wide);
    after a window dual averaging restarts from the current step size
    (NumPyro's default: its iterates start around ten times it).
    """
    count, stat_avg, log_step, log_step_avg = _dual_averaging(
        state, accept, target_accept_prob
    )
    step_size = _clipped_exp(log_step)
    w_mean, w_m2, w_n = _welford(state, z, flags.collect)
    dense = state.mass_factor is not None
    n = w_n[:, None, None] if dense else w_n[:, None]
    variance = w_m2 / jnp.maximum(n - 1.0, 1.0)
    previous = state.inv_mass
    if dense:
        variance = _dense_estimate(variance, n)
        previous = _diagonal_matrix(jnp.diagonal(previous, axis1=-2, axis2=-1))
    shrunk = (n / (n + 5.0)) * variance + 1e-3 * (5.0 / (n + 5.0)) * previous
    restart = jnp.where(flags.window_end, 0.0, 1.0)
    factor = state.mass_factor
    if dense:  # factorized only where a window ends
        factor = jax.lax.cond(
            flags.window_end, momentum_factor, lambda _: state.mass_factor, shrunk
        )
    updated = AdaptState(
        step_size=step_size,
        inv_mass=jnp.where(flags.window_end, shrunk, state.inv_mass),
        log_step=log_step * restart,
        log_step_avg=log_step_avg * restart,
        stat_avg=stat_avg * restart,
        count=count * restart,
        center=jnp.where(flags.window_end, jnp.log(10.0 * step_size), state.center),
        w_mean=w_mean * restart,
        w_m2=w_m2 * restart,
        w_n=w_n * restart,
        mass_factor=factor,
    )
    return jax.tree_util.tree_map(
        lambda a, b: jnp.where(flags.warm, a, b), updated, state
    )


def adaptation_final(state):
    """The sampling step size: the dual-averaging average of warmup's end."""
    return state._replace(step_size=_clipped_exp(state.log_step_avg))


# --------------------------------------------------------------------------
# A run, as segments of iterations


#: A run goes in this many segments (fewer when it has few iterations).
N_SEGMENTS = 16


class ChainState(NamedTuple):
    """What a set of chains carries from one iteration to the next."""

    kernel: NUTSState
    adapt: AdaptState


class Iterations(NamedTuple):
    """The inputs of a segment of iterations, one row per iteration.

    ``index`` (int32): the iteration number (0: the first gradient);
    ``keys`` (uint32, (L, n_blocks + 1, 4)): the rows of :func:`key_data`;
    ``flags``: the :class:`WindowFlags`.
    """

    index: np.ndarray
    keys: np.ndarray
    flags: WindowFlags


def segment_length(num_warmup, num_samples):
    """Iterations per segment of a run: ``ceil(iterations / N_SEGMENTS)``.

    The run's ``num_warmup + num_samples + 1`` iterations (the first
    gradient included) in :data:`N_SEGMENTS` segments of equal length (the
    last one padded: fewer than :data:`N_SEGMENTS` iterations in all).

    Parameters
    ----------
    num_warmup, num_samples : int

    Returns
    -------
    int
    """
    return -(-(num_warmup + num_samples + 1) // N_SEGMENTS)


def segments(keys, num_warmup, num_samples):
    """The :class:`Iterations` of each segment of a run (NumPy arrays).

    Every segment has :func:`segment_length` rows, so that one compiled
    program runs them all. The last one is padded with iterations past the
    run's end: they are transitions like the others (with zero keys and no
    adaptation), whose draws are dropped. Padding them with transitions
    rather than skipping them keeps the compiled transition the one of a
    run in a single ``lax.scan``, and so the draws bitwise the same as
    hiermask's earlier single-program runs: a skip (``lax.cond``, or a
    trajectory marked done from the start) changes XLA's fusion and the
    last bits of the density's reductions, which a chain then amplifies.

    Parameters
    ----------
    keys : ndarray of shape (iterations + 1, n_blocks + 1, 4), uint32
        One chain's rows of :func:`key_data` (chains in lockstep share them).
    num_warmup, num_samples : int

    Returns
    -------
    list of Iterations
    """
    length = segment_length(num_warmup, num_samples)
    n_iterations = num_warmup + num_samples + 1
    n_padded = -(-n_iterations // length) * length

    def pad(a):
        return np.concatenate([a, np.zeros((n_padded - len(a), *a.shape[1:]), a.dtype)])

    whole = Iterations(
        index=np.arange(n_padded, dtype=np.int32),
        keys=pad(keys[:n_iterations]),
        flags=WindowFlags(*map(pad, warmup_schedule(num_warmup, num_samples))),
    )
    return [
        jax.tree_util.tree_map(lambda a, s=start: a[s : s + length], whole)
        for start in range(0, n_padded, length)
    ]


def start(density, key_data, n_chains):
    """The :class:`ChainState` of a run's start.

    Starting points uniform in the density's initialization box (from
    ``key_data``, (4,) uint32, see :func:`uniform`), step size 1 and the
    identity metric (:func:`adaptation_init`).

    Parameters
    ----------
    density : FlatDensity
    key_data : array of shape (4,), uint32
    n_chains : int

    Returns
    -------
    ChainState
    """
    z0 = density.initial_points(uniform(key_data, (n_chains, density.size)))
    adapt = adaptation_init(n_chains, density.size, density.dense_metric)
    return ChainState(init(z0), adapt)


def _select(flag, new, old):
    # Scalar-flag select of pytrees.
    return jax.tree_util.tree_map(lambda a, b: jnp.where(flag, a, b), new, old)


def iterate(density, state, iterations, *, target_accept_prob, max_tree_depth):
    """Run a segment of iterations of a set of chains in lockstep (``lax.scan``).

    Iteration 0 only evaluates the gradient at the starting points (see
    :func:`init`); warmup then starts from step size 1 and the metric of
    :func:`adaptation_start`, and adapts as the flags say.

    Parameters
    ----------
    density : FlatDensity
    state : ChainState
    iterations : Iterations
    target_accept_prob : float
    max_tree_depth : int

    Returns
    -------
    state : ChainState
        After the segment.
    z : array of shape (C, L, dim)
        The position after each iteration.
    diverging, n_steps, accept_prob : arrays of shape (C, L)
    """
    dim = state.kernel.z.shape[1]
    value_and_grad = jax.vmap(jax.value_and_grad(density.potential))
    known_variance = density.init_variance
    if known_variance is None:
        known_variance = jnp.full(dim, jnp.nan)

    def transition(carry, xs):
        kernel, adapt = carry
        first = xs.index == 0
        kernel, info = step(
            value_and_grad,
            kernel,
            xs.keys,
            adapt.step_size,
            adapt.inv_mass,
            max_tree_depth,
            first,
            adapt.mass_factor,
        )
        adapt = adaptation_update(
            adapt, info.accept_prob, kernel.z, target_accept_prob, xs.flags
        )
        adapt = _select(xs.flags.last, adaptation_final(adapt), adapt)
        adapt = _select(
            first, adaptation_start(adapt, kernel.grad, known_variance), adapt
        )
        out = (kernel.z, info.diverging, info.n_steps, info.accept_prob)
        return ChainState(kernel, adapt), out

    state, out = jax.lax.scan(transition, state, iterations)
    z, diverging, n_steps, accept_prob = (jnp.swapaxes(a, 0, 1) for a in out)
    return state, z, diverging, n_steps, accept_prob
