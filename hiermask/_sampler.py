"""NUTS runner with a compile cache, and convergence diagnostics.

The whole run (initialization, warmup with step-size and mass-matrix
adaptation, sampling) of a set of chains is one XLA program: the iterations
are one ``lax.scan`` and each NUTS transition is one ``lax.while_loop`` with
one leapfrog step per iteration, so there is no per-iteration Python
overhead. Small models run pairs of chains in lockstep per program (every
kernel serves both: on a CPU a small model's cost is the number of kernels
run, not their size), large ones one chain per program; the programs of a
run are executed by a thread pool, one thread per CPU this process may use
(XLA releases the GIL), so chains run in parallel. The split depends only on
the run, never on the machine: a seed gives the same draws everywhere.
Compiled programs are cached per
static configuration (model, pooling, numbers of warmup and draws, chains,
target acceptance) and per shape of the data; prior scales and data values
are arguments, so refits with other prior scales or other rows of the same
shape reuse the program (``TRACE_COUNTS`` counts the traces). Everything runs
in float64 inside a scoped ``jax.enable_x64(True)`` and with per-compilation
XLA options (``COMPILER_OPTIONS``); the user's global configuration is
untouched.

The sampler is the No-U-Turn sampler of Hoffman and Gelman (2014) in the form
NumPyro and Stan use: multinomial sampling of the trajectory (uniform within
each doubling, biased towards the new half at the top level), the generalized
U-turn criterion checked on every sub-tree through checkpoints, divergence
when the energy error exceeds 1000. Warmup adapts the step size by dual
averaging and a diagonal mass matrix in Stan's windows (75 / 25, 50, ... /
50 iterations), with three departures that only change warmup, never the
target: the first metric comes from the gradient at the starting point
instead of the identity, the variance estimates are regularized relative to
the current metric instead of towards 1e-3 (a scale-free version of Stan's
rule), and after each window dual averaging restarts from the current step
size instead of a step-size search. It is written here, over one flat vector,
so that the compiled program stays small (one copy of the gradient code, no
per-site bookkeeping): compilation dominates the cost of a small fit. Random
numbers come from XLA's native bit generator keyed by NumPy from the seed
(JAX's threefry costs a large share of a small program's compile time).

A model takes its density from a ``flat_density`` attribute when it has one
(the collapsed engine writes its density and gradient by hand, see
:func:`hiermask._collapsed.collapsed_density`), else from NumPyro's
``potential_energy`` of the model (the direct engine).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
import math
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
import scipy.stats
from jax.flatten_util import ravel_pytree
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
from numpyro.distributions.transforms import biject_to
from numpyro.handlers import seed, trace
from numpyro.infer.util import constrain_fn, potential_energy

from . import _limits

__all__ = [
    "COMPILER_OPTIONS",
    "LAST_TIMINGS",
    "TRACE_COUNTS",
    "FlatDensity",
    "adaptation_windows",
    "exclusive",
    "map_parts",
    "parameter_diagnostics",
    "run_nuts",
]

#: Number of times each model was traced (compiled) by the runner; tests use it
#: to check that refits reuse the compiled program.
TRACE_COUNTS: collections.Counter = collections.Counter()

#: Half-width of the uniform initialization box in unconstrained space.
_INIT_RADIUS = 2.0

#: A trajectory whose energy error exceeds this is divergent (NumPyro, Stan).
_MAX_DELTA_ENERGY = 1000.0

# Dual averaging constants (Hoffman and Gelman, 2014; Stan defaults).
_DA_GAMMA, _DA_T0, _DA_KAPPA = 0.05, 10.0, 0.75


class FlatDensity(NamedTuple):
    """A posterior over one flat unconstrained vector.

    Attributes
    ----------
    size : int
        Length of the unconstrained vector.
    potential : callable
        ``potential(z) -> scalar``: minus the log density of ``z`` (log
        Jacobians of the transforms included), up to a constant.
    constrain : callable
        ``constrain(z) -> dict``: the value of every reported site.
    init_center, init_radius : array of shape (size,), optional
        Chains start uniformly in ``init_center +- init_radius``; by default
        in ``+-2`` around 0, as Stan and NumPyro do.
    init_variance : array of shape (size,), optional
        Known posterior variances, for the first warmup metric; NaN (and by
        default every coordinate) where unknown: the metric then comes from
        the gradient at the starting point.
    """

    size: int
    potential: Callable
    constrain: Callable
    init_center: Any = None
    init_radius: Any = None
    init_variance: Any = None


def _numpyro_density(model, args):
    # Any NumPyro model, through its potential_energy over the raveled sites.
    prototype = trace(seed(model, rng_seed=0)).get_trace(*args)
    unconstrained = {
        name: biject_to(site["fn"].support).inv(site["value"])
        for name, site in prototype.items()
        if site["type"] == "sample" and not site["is_observed"]
    }
    flat, unravel = ravel_pytree(unconstrained)

    def potential(z):
        return potential_energy(model, args, {}, unravel(z))

    def constrain(z):
        return constrain_fn(model, args, {}, unravel(z), return_deterministic=True)

    return FlatDensity(flat.shape[0], potential, constrain)


def _flat_density(model, data, hyper):
    fn = getattr(model, "func", model)
    builder = getattr(fn, "flat_density", None)
    if builder is None:
        return _numpyro_density(model, (data, hyper))
    return builder(data, hyper, **getattr(model, "keywords", {}))


# --------------------------------------------------------------------------
# NUTS


def _kinetic(inv_mass, r):
    return 0.5 * jnp.sum(inv_mass * r**2, axis=-1)


def _is_turning(inv_mass, r_left, r_right, r_sum):
    # Generalized U-turn criterion (Betancourt, 2017), NumPyro's form.
    rho = r_sum - 0.5 * (r_left + r_right)
    return (jnp.sum(inv_mass * r_left * rho, axis=-1) <= 0) | (
        jnp.sum(inv_mass * r_right * rho, axis=-1) <= 0
    )


def _pick(table, index):
    # table[c, index[c]] for every chain c.
    return jnp.take_along_axis(table, index[:, None], axis=1)[:, 0]


def _where(flag, new, old):
    # Per-chain select: flag (C,) against arrays (C, ...).
    return jnp.where(flag.reshape(flag.shape + (1,) * (new.ndim - 1)), new, old)


def _uniform(key_data, shape):
    # Uniforms on [0, 1) from XLA's native random bit generator (JAX's "rbg"
    # keys). The key material comes from NumPy outside the program: JAX's
    # default threefry generator costs about 0.4 s of compilation per call
    # site on a CPU, the native generator about a quarter of that.
    key = jax.random.wrap_key_data(key_data, impl="rbg")
    return jax.random.uniform(key, shape)


def _normal(u):
    # Standard normals from uniforms on [0, 1) (jax.random.normal's method).
    v = jnp.maximum(2.0 * u - 1.0, np.nextafter(-1.0, 0.0))
    return np.sqrt(2.0) * jax.scipy.special.erfinv(v)


def _key_data(seed_value, num_chains, num_warmup, num_samples, max_tree_depth):
    """Key material of a run: (chains, iterations + 1, leaf blocks + 1, 4).

    For each chain (chains running in lockstep share the first chain's),
    row ``i`` feeds iteration ``i`` (row 0: the starting points and the first
    gradient); column 0 its momenta, directions and first leaf block, column
    ``b`` its ``b``-th further leaf block. Derived from ``seed_value`` alone.
    """
    n_blocks = max(1, (2**max_tree_depth) // _limits.LEAF_BLOCK)
    rng = np.random.default_rng(seed_value)
    shape = (num_chains, num_warmup + num_samples + 1, n_blocks + 1, 4)
    return rng.integers(0, 2**32, size=shape, dtype=np.uint32)


# Rows of the packed point table of a trajectory; each row is a point
# [z, r, grad, potential] of length 3 * dim + 1.
_CURRENT, _LEFT, _RIGHT, _PROPOSAL, _SUB_PROPOSAL = range(5)


class _Tree(NamedTuple):
    # One trajectory per chain; every field has the chains first.
    points: jnp.ndarray  # (C, 5, 3 * dim + 1), rows as above
    r_sums: jnp.ndarray  # (C, 2, dim): whole tree, doubling under way
    ckpt: jnp.ndarray  # (C, max_depth, 2, dim): r and r_sum checkpoints
    log_weights: jnp.ndarray  # (C, 2): whole tree, doubling under way
    sum_accept: jnp.ndarray  # (C,)
    depth: jnp.ndarray  # (C,) number of finished doublings
    leaf: jnp.ndarray  # (C,) index of the next leaf of the doubling
    n_leaves: jnp.ndarray  # (C,)
    done: jnp.ndarray  # (C,)
    diverging: jnp.ndarray  # (C,)


def _nuts_transition(
    value_and_grad, point, key_data, step_size, inv_mass, max_depth, init
):
    """One NUTS transition of every chain, in lockstep.

    Parameters
    ----------
    value_and_grad : callable
        ``(C, dim) -> ((C,), (C, dim))``: potential and its gradient.
    point : array of shape (C, 2 * dim + 1)
        ``[z, grad, potential]`` of each chain.
    key_data : array of shape (n_blocks + 1, 4), uint32
        Key material of the transition's random numbers (XLA's native bit
        generator; see :func:`_uniform`).
    step_size : array of shape (C,)
    inv_mass : array of shape (C, dim)
        Diagonal inverse mass matrices.
    max_depth : int
    init : bool scalar
        Evaluate the potential at ``z`` instead (a zero-length trajectory
        whose only leaf is taken): how the chains get their first gradient
        without a second copy of the gradient code in the program.

    The trajectory is built one leapfrog step per loop iteration (doublings,
    their U-turn checks and the merges are bookkeeping on a packed table of
    points), and the loop runs while any chain is still building, so the
    compiled loop body is small. Returns the new points, the mean acceptance
    statistics, the numbers of leapfrog steps and the divergence flags.
    """
    n_chains, width = point.shape
    dim = (width - 1) // 2
    u = _uniform(key_data[0], (n_chains, dim + 2 * max_depth + _limits.LEAF_BLOCK))
    r0 = _normal(u[:, :dim]) / jnp.sqrt(inv_mass)
    going_right = u[:, dim : dim + max_depth] < 0.5
    top_u = u[:, dim + max_depth : dim + 2 * max_depth]
    first_leaf_u = u[:, dim + 2 * max_depth :]
    z0, grad0, potential0 = point[:, :dim], point[:, dim : 2 * dim], point[:, 2 * dim]
    energy0 = potential0 + _kinetic(inv_mass, r0)
    start = jnp.concatenate([z0, r0, grad0, potential0[:, None]], axis=1)
    step_size = jnp.where(init, 0.0, step_size)
    levels = jnp.arange(max_depth)
    zeros = jnp.zeros(n_chains, jnp.int32)
    tree = _Tree(
        points=jnp.broadcast_to(start[:, None], (n_chains, 5, start.shape[1])),
        r_sums=jnp.stack([r0, jnp.zeros_like(r0)], axis=1),
        ckpt=jnp.zeros((n_chains, max_depth, 2, dim)),
        log_weights=jnp.broadcast_to(jnp.array([0.0, -jnp.inf]), (n_chains, 2)),
        sum_accept=jnp.zeros(n_chains),
        depth=zeros,
        leaf=zeros,
        n_leaves=zeros,
        done=jnp.zeros(n_chains, bool),
        diverging=jnp.zeros(n_chains, bool),
    )

    def leaf_step(state):
        t, leaf_u, limit = state
        active = ~t.done & (t.n_leaves < limit)
        current = t.points[:, _CURRENT]
        z, r = current[:, :dim], current[:, dim : 2 * dim]
        grad = current[:, 2 * dim : 3 * dim]
        right = _pick(going_right, t.depth)
        step = jnp.where(right, step_size, -step_size)[:, None]
        r = r - 0.5 * step * grad
        z = z + step * inv_mass * r
        potential, grad = value_and_grad(z)
        r = r - 0.5 * step * grad
        new = jnp.concatenate([z, r, grad, potential[:, None]], axis=1)
        delta = potential + _kinetic(inv_mass, r) - energy0
        delta = jnp.where(jnp.isnan(delta), jnp.inf, delta)
        diverging = (delta > _MAX_DELTA_ENERGY) & ~init
        # Uniform progressive sampling inside the doubling.
        tree_lw = t.log_weights[:, 0]
        sub_lw = jnp.logaddexp(t.log_weights[:, 1], -delta)
        uniform = _pick(leaf_u, t.n_leaves % _limits.LEAF_BLOCK)
        take = (uniform < jnp.exp(-delta - sub_lw)) | init
        sub_r_sum = t.r_sums[:, 1] + r
        # U-turns inside the doubling: checkpoints at even leaves, checks at
        # odd ones against every sub-tree the leaf closes (NumPyro's scheme).
        n = t.leaf
        idx_max = jax.lax.population_count(n >> 1)
        idx_min = idx_max - jax.lax.population_count((~n & (n + 1)) - 1) + 1
        store = ((n % 2) == 0)[:, None] & (levels == idx_max[:, None])
        ckpt = jnp.where(
            store[:, :, None, None], jnp.stack([r, sub_r_sum], axis=1)[:, None], t.ckpt
        )
        ckpt_r, ckpt_sum = ckpt[:, :, 0], ckpt[:, :, 1]
        turns = _is_turning(
            inv_mass[:, None],
            ckpt_r,
            r[:, None],
            sub_r_sum[:, None] - ckpt_sum + ckpt_r,
        )
        in_range = (levels >= idx_min[:, None]) & (levels <= idx_max[:, None])
        sub_turning = jnp.any(turns & in_range, axis=1)
        leaf = n + 1
        sub_done = (leaf == (1 << t.depth)) | sub_turning | diverging | init
        # Merge a finished, valid doubling into the tree (biased sampling).
        valid = sub_done & ~sub_turning & ~diverging
        move = valid & (_pick(top_u, t.depth) < jnp.exp(sub_lw - tree_lw))
        move = move | init
        sub_proposal = _where(take, new, t.points[:, _SUB_PROPOSAL])
        proposal = _where(move, sub_proposal, t.points[:, _PROPOSAL])
        left = _where(valid & ~right, new, t.points[:, _LEFT])
        right_edge = _where(valid & right, new, t.points[:, _RIGHT])
        r_sum = _where(valid, t.r_sums[:, 0] + sub_r_sum, t.r_sums[:, 0])
        tree_turning = _is_turning(
            inv_mass, left[:, dim : 2 * dim], right_edge[:, dim : 2 * dim], r_sum
        )
        depth = t.depth + sub_done.astype(jnp.int32)
        done = sub_done & (~valid | tree_turning | (depth >= max_depth) | init)
        # The next doubling starts from the edge in its direction.
        next_right = _pick(going_right, jnp.minimum(depth, max_depth - 1))
        current = _where(sub_done, _where(next_right, right_edge, left), new)
        new_tree = _Tree(
            points=jnp.stack(
                [current, left, right_edge, proposal, sub_proposal], axis=1
            ),
            r_sums=jnp.stack([r_sum, _where(sub_done, 0.0 * r, sub_r_sum)], axis=1),
            ckpt=ckpt,
            log_weights=jnp.stack(
                [
                    jnp.where(valid, jnp.logaddexp(tree_lw, sub_lw), tree_lw),
                    jnp.where(sub_done, -jnp.inf, sub_lw),
                ],
                axis=1,
            ),
            sum_accept=t.sum_accept + jnp.minimum(jnp.exp(-delta), 1.0),
            depth=depth,
            leaf=jnp.where(sub_done, 0, leaf),
            n_leaves=t.n_leaves + 1,
            done=done,
            diverging=diverging,
        )
        t = jax.tree_util.tree_map(lambda a, b: _where(active, a, b), new_tree, t)
        return t, leaf_u, limit

    def block(state):
        # Up to _limits.LEAF_BLOCK more leaves per chain with one block of
        # selection uniforms (longer trajectories draw another block).
        t, n_blocks = state
        more = _uniform(
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
    proposal = tree.points[:, _PROPOSAL]
    new_point = jnp.concatenate([proposal[:, :dim], proposal[:, 2 * dim :]], axis=1)
    accept = tree.sum_accept / tree.n_leaves
    return new_point, accept, tree.n_leaves, tree.diverging


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


def _warmup_schedule(num_warmup, num_samples):
    # Per iteration of the run (the initial gradient evaluation first): is it
    # a warmup iteration, does it feed the mass matrix, does a slow window
    # end there, is it the last warmup iteration?
    length = num_warmup + num_samples + 1
    warm, collect, window_end, last = (np.zeros(length, bool) for _ in range(4))
    warm[1 : num_warmup + 1] = True
    if num_warmup:
        last[num_warmup] = True
        for start, end in adaptation_windows(num_warmup)[1:-1]:
            collect[start + 1 : end + 2] = True
            window_end[end + 1] = True
    return warm, collect, window_end, last


class _Adapt(NamedTuple):
    # Per chain: step size, diagonal inverse mass matrix, dual averaging
    # (iterate, its weighted average, mean statistic, count, centre) and the
    # Welford mean, sum of squares and count of the current slow window.
    step_size: jnp.ndarray  # (C,)
    inv_mass: jnp.ndarray  # (C, dim)
    log_step: jnp.ndarray  # (C,)
    log_step_avg: jnp.ndarray
    stat_avg: jnp.ndarray
    count: jnp.ndarray
    center: jnp.ndarray
    w_mean: jnp.ndarray  # (C, dim)
    w_m2: jnp.ndarray
    w_n: jnp.ndarray  # (C,)


def _adapt_update(adapt, accept, z, target_accept_prob, flags):
    warm, collect, window_end, last = flags
    # Dual averaging of the log step size (Hoffman and Gelman, 2014).
    count = adapt.count + 1.0
    stat_avg = (1.0 - 1.0 / (count + _DA_T0)) * adapt.stat_avg + (
        target_accept_prob - accept
    ) / (count + _DA_T0)
    log_step = adapt.center - jnp.sqrt(count) / _DA_GAMMA * stat_avg
    weight = count ** (-_DA_KAPPA)
    log_step_avg = (1.0 - weight) * adapt.log_step_avg + weight * log_step
    finfo = jnp.finfo(jnp.float64)
    step_size = jnp.exp(jnp.where(last, log_step_avg, log_step))
    step_size = jnp.clip(step_size, finfo.tiny, finfo.max)
    # Diagonal mass matrix from the draws of each slow window (Welford),
    # regularized as in Stan when the window ends.
    w_n = adapt.w_n + collect
    delta = z - adapt.w_mean
    w_mean = jnp.where(collect, adapt.w_mean + delta / w_n[:, None], adapt.w_mean)
    w_m2 = jnp.where(collect, adapt.w_m2 + delta * (z - w_mean), adapt.w_m2)
    n = w_n[:, None]
    variance = w_m2 / jnp.maximum(n - 1.0, 1.0)
    # Stan shrinks towards 1e-3; relative to the current metric instead, so
    # that a coordinate whose posterior sd is 1e-3 or less (a residual sd
    # from millions of rows) is not given a metric hundreds of times too wide.
    shrunk = (n / (n + 5.0)) * variance + 1e-3 * (5.0 / (n + 5.0)) * adapt.inv_mass
    # After a window, dual averaging restarts from the current step size
    # (its iterates start around ten times it, as in Stan).
    restart = jnp.where(window_end, 0.0, 1.0)
    updated = _Adapt(
        step_size=step_size,
        inv_mass=jnp.where(window_end, shrunk, adapt.inv_mass),
        log_step=log_step * restart,
        log_step_avg=log_step_avg * restart,
        stat_avg=stat_avg * restart,
        count=count * restart,
        center=jnp.where(window_end, jnp.log(10.0 * step_size), adapt.center),
        w_mean=w_mean * restart,
        w_m2=w_m2 * restart,
        w_n=w_n * restart,
    )
    return jax.tree_util.tree_map(lambda a, b: jnp.where(warm, a, b), updated, adapt)


def _initial_inverse_mass(grad, known):
    # A diagonal metric from the gradient at the starting point: directions
    # where the density is steep start with small steps. This spares the
    # first warmup window trajectories of hundreds of steps on a posterior
    # whose scales differ by orders of magnitude (Stan and NumPyro start from
    # the identity); the first slow window replaces it. Known variances
    # (FlatDensity.init_variance, NaN elsewhere) take precedence: near the
    # mode of a narrow coordinate the gradient is small, not large.
    steep = jnp.where(jnp.isfinite(grad), jnp.clip(1.0 / jnp.abs(grad), 1e-8, 1.0), 1.0)
    return jnp.where(jnp.isnan(known), steep, known)


def _run_chains(
    density,
    key_data,
    z0,
    *,
    num_warmup,
    num_samples,
    target_accept_prob,
    max_tree_depth,
    progress,
    keep_warmup=False,
):
    """Warmup and sampling of a set of chains in lockstep: one scan.

    Iteration 0 only evaluates the gradient at the starting points; the
    first warmup iteration then starts from step size 1 and the gradient
    metric, and dual averaging restarts from the current step size after
    each slow window (Stan searches for a step size there instead). Returns
    draws, divergences, leapfrog steps and acceptance statistics per chain
    and kept iteration (warmup ones too with ``keep_warmup``, for profiling).
    ``progress`` is the traced ``(token, part)`` of :func:`_progress_tick`:
    with a positive token the program reports its iteration to the host
    about ``_PROGRESS_UPDATES`` times.
    """
    n_chains, dim = z0.shape
    value_and_grad = jax.vmap(jax.value_and_grad(density.potential))
    known_variance = density.init_variance
    if known_variance is None:
        known_variance = jnp.full(dim, jnp.nan)
    point = jnp.concatenate([z0, jnp.zeros((n_chains, dim + 1))], axis=1)
    ones, zeros = jnp.ones(n_chains), jnp.zeros(n_chains)
    adapt = _Adapt(
        step_size=ones,
        inv_mass=jnp.ones((n_chains, dim)),
        log_step=zeros,
        log_step_avg=zeros,
        stat_avg=zeros,
        count=zeros,
        center=jnp.full(n_chains, jnp.log(10.0)),
        w_mean=jnp.zeros((n_chains, dim)),
        w_m2=jnp.zeros((n_chains, dim)),
        w_n=zeros,
    )
    schedule = _warmup_schedule(num_warmup, num_samples)

    def step(carry, xs):
        point, adapt = carry
        i, keys, flags = xs
        init = i == 0
        point, accept, n_steps, diverging = _nuts_transition(
            value_and_grad,
            point,
            keys,
            adapt.step_size,
            adapt.inv_mass,
            max_tree_depth,
            init,
        )
        z = point[:, :dim]
        adapt = _adapt_update(adapt, accept, z, target_accept_prob, flags)
        adapt = adapt._replace(
            inv_mass=jnp.where(
                init,
                _initial_inverse_mass(point[:, dim : 2 * dim], known_variance),
                adapt.inv_mass,
            )
        )
        every = max(1, (num_warmup + num_samples) // _PROGRESS_UPDATES)
        last = num_warmup + num_samples
        jax.lax.cond(
            (progress[0] > 0) & ((i % every == 0) | (i == last)),
            lambda: jax.debug.callback(_progress_tick, *progress, i),
            lambda: None,
        )
        return (point, adapt), (z, diverging, n_steps, accept)

    xs = (
        jnp.arange(num_warmup + num_samples + 1),
        key_data,
        tuple(map(jnp.asarray, schedule)),
    )
    _, out = jax.lax.scan(step, (point, adapt), xs)
    out = jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, 0, 1)[:, 1:], out)
    if keep_warmup:
        return out
    return jax.tree_util.tree_map(lambda a: a[:, num_warmup:], out)


def _supported_options(options):
    # The subset of XLA options this jaxlib knows (names change between
    # releases; an unknown one would make every compilation fail).
    probe = jax.jit(lambda x: x + 1.0).lower(np.zeros(2))
    supported = {}
    for name, value in options.items():
        try:
            probe.compile({name: value})
        except Exception:  # any refusal means: leave it out
            continue
        supported[name] = value
    return supported


#: XLA options for the programs of this package, scoped to each compilation
#: (the user's global configuration is untouched). On a CPU the newer fusion
#: emitters compile the many small kernels of a sampler two to three times
#: slower than the classic elemental emitters, for the same speed; the YNNPACK
#: offload of reductions runs the per-group reductions of the collapsed
#: density several times slower than XLA's own loops.
COMPILER_OPTIONS = _supported_options(
    {
        "xla_cpu_use_fusion_emitters": False,
        "xla_cpu_experimental_ynn_fusion_type": "",
    }
)

#: Held while a program that calls LAPACK runs (see :func:`exclusive`).
_LAPACK_LOCK = threading.Lock()


class _Exclusive:
    # A compiled program run under _LAPACK_LOCK, to completion.
    def __init__(self, compiled):
        self.compiled = compiled

    def __call__(self, *args, **kwargs):
        with _LAPACK_LOCK:
            return jax.block_until_ready(self.compiled(*args, **kwargs))


def exclusive(compiled):
    """The compiled program, made to run alone if it calls LAPACK.

    jaxlib's CPU LAPACK kernels (Cholesky, triangular solves) split a batch
    of matrices over XLA's intra-op thread pool and wait for the parts. Two
    programs doing so at once (parallel chains, or fits in threads) can
    leave every pool thread waiting for parts that no thread is free to run:
    a deadlock, reproduced with jax 0.10.2 on this project's 2-CPU machine
    (batched Cholesky of 100 matrices of size 20 in a loop, in two threads).
    Programs that call LAPACK on batches of matrices therefore hold a
    process-wide lock while they run; the others run freely.

    Parameters
    ----------
    compiled : jax.stages.Compiled

    Returns
    -------
    callable
        ``compiled`` itself, or a wrapper that runs it under the lock and
        blocks until its results are ready.
    """
    if any(math.prod(shape) > 1 for shape in _lapack_batches(compiled.as_text())):
        return _Exclusive(compiled)
    return compiled


def _lapack_batches(hlo_text):
    # The batch shape (all but the two matrix dimensions) of every LAPACK
    # call in a compiled program's HLO text. A single matrix is factorized
    # in the calling thread; only batches are split over the pool.
    for match in re.finditer(
        r"= \(?[a-z]\d+\[([\d,]*)\][^\n]*custom_call_target=\"lapack_", hlo_text
    ):
        dims = [int(d) for d in match.group(1).split(",") if d]
        yield tuple(dims[:-2])


#: Compiled sampler programs (through :func:`exclusive`), most recently used
#: last.
_COMPILED: collections.OrderedDict = collections.OrderedDict()
_COMPILED_MAX = 16

#: Seconds spent by the last run_nuts call: ``trace`` (tracing and lowering,
#: 0 when the compiled program was reused), ``compile`` (XLA) and ``run``.
LAST_TIMINGS: dict = {}


@functools.partial(
    jax.jit,
    static_argnames=(
        "model",
        "num_warmup",
        "num_samples",
        "num_chains",
        "target_accept_prob",
        "max_tree_depth",
        "limits",
    ),
)
def _sample(
    key_data,
    data,
    hyper,
    progress_token,
    *,
    model,
    num_warmup,
    num_samples,
    num_chains,
    target_accept_prob,
    max_tree_depth,
    limits,
):
    del limits  # read from _limits while tracing; a part of the cache key
    TRACE_COUNTS[getattr(model, "__name__", repr(model))] += 1
    density = _flat_density(model, data, hyper)
    unit = _uniform(key_data[0, 0, 1], (num_chains, density.size))
    center = 0.0 if density.init_center is None else density.init_center
    radius = _INIT_RADIUS if density.init_radius is None else density.init_radius
    init = center + radius * (2.0 * unit - 1.0)
    run = functools.partial(
        _run_chains,
        density,
        num_warmup=num_warmup,
        num_samples=num_samples,
        target_accept_prob=target_accept_prob,
        max_tree_depth=max_tree_depth,
        progress=(progress_token[0], progress_token[1]),
    )
    # All chains of the program advance together: one leapfrog step of every
    # chain per iteration of the trajectory loop, so each compiled kernel
    # serves all of them. A chain whose trajectory ends first waits.
    z, diverging, num_steps, accept = run(key_data[0], init)
    values = jax.vmap(jax.vmap(density.constrain))(z)
    stats = {"diverging": diverging, "n_steps": num_steps, "accept_prob": accept}
    return values, stats


#: A sampler run with a progress bar reports to the host about this many
#: times per run (every compiled sampler can: whether it does is a traced
#: argument).
_PROGRESS_UPDATES = 100

#: Progress reporters of the runs under way, by token (a run's programs pass
#: their token and part number to :func:`_progress_tick`).
_PROGRESS: dict = {}
_PROGRESS_TOKENS = itertools.count(1)


def _progress_tick(token, part, iteration):
    # Host side of the sampler's progress callback.
    report = _PROGRESS.get(int(token))
    if report is not None:
        report(int(part), int(iteration))


class _ProgressBar:
    """A tqdm bar over the iterations of every chain of one run.

    Created for every run and shown only once the compiled program reports
    (compilation can take seconds, during which no empty bar is shown).
    """

    def __init__(self, per_part, n_parts, num_warmup, num_samples):
        self.per_part = per_part
        self.num_warmup = num_warmup
        self.done = [0] * n_parts
        self.total = per_part * n_parts * (num_warmup + num_samples)
        self.bar = None
        self.lock = threading.Lock()

    def update(self, part, iteration):
        with self.lock:
            if self.bar is None:
                from tqdm.auto import tqdm

                self.bar = tqdm(
                    total=self.total,
                    desc="warmup",
                    unit="it",
                    leave=False,
                    dynamic_ncols=True,
                )
            step = iteration - self.done[part]
            self.done[part] = iteration
            if min(self.done) > self.num_warmup:
                self.bar.set_description("sample", refresh=False)
            self.bar.update(step * self.per_part)

    def close(self):
        with self.lock:
            if self.bar is not None:
                self.bar.close()


def _compiled_program(args, static, timings, before_compile):
    # The compiled sampler for these argument shapes and settings, from the
    # in-memory cache or compiled now (recording trace and compile times);
    # before_compile() runs once the program is traced (or found).
    leaves, treedef = jax.tree_util.tree_flatten(args)
    cache_key = (
        tuple(sorted(static.items(), key=lambda item: item[0])),
        treedef,
        tuple((leaf.shape, leaf.dtype) for leaf in leaves),
    )
    compiled = _COMPILED.pop(cache_key, None)
    if compiled is None:
        start = time.perf_counter()
        lowered = _sample.lower(*args, **static)
        timings["trace"] = time.perf_counter() - start
        before_compile()
        start = time.perf_counter()
        compiled = exclusive(lowered.compile(COMPILER_OPTIONS))
        timings["compile"] = time.perf_counter() - start
    else:
        before_compile()
    _COMPILED[cache_key] = compiled
    while len(_COMPILED) > _COMPILED_MAX:
        _COMPILED.popitem(last=False)
    return compiled


def _chain_parts(num_chains, data_size):
    """How many chains each compiled program runs, and how many programs.

    Fixed by the run alone (never by the number of CPUs, so that a seed gives
    the same draws on every machine): large models run one chain per
    program; small ones pairs of chains in lockstep (two chains cost little
    more than one when the cost is the number of kernels run). Odd numbers
    of chains run one per program, so that one compiled program serves all.
    """
    if data_size > _limits.LOCKSTEP_MAX_DATA or num_chains % 2:
        return 1, num_chains
    return 2, num_chains // 2


def _threads(n_parts):
    # CPUs this process may run on (not the machine's count under a cgroup
    # or affinity mask), and no more threads than programs.
    try:
        n_cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n_cpus = os.cpu_count() or 1
    return max(1, min(n_parts, n_cpus))


def map_parts(compiled, run_part, parts):
    """``[run_part(part) for part in parts]``, the parts in parallel threads.

    One thread per CPU this process may use (XLA releases the GIL while a
    program runs), none for a program that must run alone (see
    :func:`exclusive`).

    Parameters
    ----------
    compiled : callable
        The program ``run_part`` runs (what :func:`exclusive` returned).
    run_part : callable
    parts : list

    Returns
    -------
    list
        The results, in the order of ``parts``.
    """
    n_threads = 1 if isinstance(compiled, _Exclusive) else _threads(len(parts))
    if n_threads == 1:
        return [run_part(part) for part in parts]
    with concurrent.futures.ThreadPoolExecutor(n_threads) as pool:
        return list(pool.map(run_part, parts))


def run_nuts(
    model,
    data,
    hyper,
    *,
    seed_value,
    num_warmup,
    num_samples,
    num_chains,
    target_accept_prob,
    max_tree_depth=10,
    progress_bar=False,
    before_compile=lambda: None,
):
    """Run NUTS chains of ``model(data, hyper)`` in float64.

    Parameters
    ----------
    model : callable
        A NumPyro model ``model(data, hyper)``, optionally with a
        ``flat_density`` attribute (on the function, or on the function a
        ``functools.partial`` wraps) that builds its :class:`FlatDensity`;
        must be the same object from fit to fit for the compile cache to work.
    data, hyper : pytrees of NumPy arrays
        Model arguments (traced).
    seed_value : int
        Seed of the run.
    num_warmup, num_samples, num_chains : int
        Run length.
    target_accept_prob : float
        Step-size adaptation target.
    max_tree_depth : int, default=10
        NUTS tree-depth cap.
    progress_bar : bool, default=False
        Show a progress bar (tqdm, on stderr) of the iterations of all
        chains; the program reports to the host about ``_PROGRESS_UPDATES``
        times per chain (the same compiled program runs without reports when
        it is off).
    before_compile : callable, optional
        Called without arguments once the sampler is traced, before XLA
        compiles it (or at once when a compiled program is reused): the
        caller can start other work that overlaps the compilation.

    Returns
    -------
    values : dict of ndarray of shape (num_chains, num_samples, ...)
        Constrained draws of every latent and deterministic site.
    stats : dict of ndarray of shape (num_chains, num_samples)
        ``diverging``, ``n_steps`` (leapfrog steps) and ``accept_prob``.
    """
    key_data = _key_data(
        seed_value, num_chains, num_warmup, num_samples, max_tree_depth
    )
    data_size = sum(math.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(data))
    per_part, n_parts = _chain_parts(int(num_chains), data_size)
    static = {
        "model": model,
        "num_warmup": int(num_warmup),
        "num_samples": int(num_samples),
        "num_chains": per_part,
        "target_accept_prob": float(target_accept_prob),
        "max_tree_depth": int(max_tree_depth),
        "limits": _limits.current(),
    }
    timings = dict.fromkeys(("trace", "compile", "run"), 0.0)
    # Token 0: no progress reports (the same compiled program either way, so
    # a progress bar cannot change the draws).
    token = next(_PROGRESS_TOKENS) if progress_bar else 0
    with jax.enable_x64(True):
        # NumPy arguments: the compiled program transfers them (jnp.asarray
        # would compile a small conversion program per shape on first use).
        args = jax.tree_util.tree_map(
            np.asarray, (key_data[:per_part], data, hyper, np.zeros(2, np.int32))
        )
        compiled = _compiled_program(args, static, timings, before_compile)
        parts = [
            (
                key_data[i * per_part : (i + 1) * per_part],
                *args[1:3],
                np.array([token, i], dtype=np.int32),
            )
            for i in range(n_parts)
        ]

        def run_part(part_args):
            with jax.enable_x64(True):  # the setting is per thread
                return jax.block_until_ready(compiled(*part_args))

        start = time.perf_counter()
        bar = _ProgressBar(per_part, n_parts, num_warmup, num_samples)
        if progress_bar:
            _PROGRESS[token] = bar.update
        try:
            results = map_parts(compiled, run_part, parts)
        finally:
            _PROGRESS.pop(token, None)
            bar.close()
        timings["run"] = time.perf_counter() - start

        def gather(index):
            return {
                k: np.concatenate([np.asarray(r[index][k]) for r in results])
                for k in results[0][index]
            }

        values = {k: v.astype(np.float64) for k, v in gather(0).items()}
        stats = gather(1)
    LAST_TIMINGS.clear()
    LAST_TIMINGS.update(timings)
    return values, stats


def _rank_normalize(x):
    # x: (chains, draws, k) -> normal scores of the pooled ranks
    chains, draws = x.shape[:2]
    flat = x.reshape(chains * draws, -1)
    ranks = scipy.stats.rankdata(flat, axis=0, method="average")
    z = scipy.special.ndtri((ranks - 0.375) / (flat.shape[0] + 0.25))
    return z.reshape(x.shape)


def _split_rhat(x):
    if x.shape[1] < 4:
        return np.full(x.shape[2:], np.nan)
    return np.asarray(split_gelman_rubin(x))


def parameter_diagnostics(x):
    """Rank-normalized split R-hat and bulk/tail ESS (Vehtari et al., 2021).

    Parameters
    ----------
    x : ndarray of shape (n_chains, n_draws, n_params)
        Draws.

    Returns
    -------
    r_hat, ess_bulk, ess_tail : ndarray of shape (n_params,)
    """
    x = np.asarray(x, dtype=np.float64)
    if x.shape[2] == 0:
        empty = np.zeros(0)
        return empty, empty, empty
    if x.shape[1] < 4:
        nan = np.full(x.shape[2], np.nan)
        return nan, nan, nan
    z = _rank_normalize(x)
    folded = _rank_normalize(np.abs(x - np.median(x.reshape(-1, x.shape[2]), axis=0)))
    r_hat = np.fmax(_split_rhat(z), _split_rhat(folded))
    ess_bulk = np.asarray(effective_sample_size(z))
    flat = x.reshape(-1, x.shape[2])
    lo, hi = np.quantile(flat, [0.05, 0.95], axis=0)
    ess_tail = np.fmin(
        np.asarray(effective_sample_size((x <= lo).astype(np.float64))),
        np.asarray(effective_sample_size((x >= hi).astype(np.float64))),
    )
    constant = np.ptp(flat, axis=0) == 0
    r_hat[constant] = np.nan
    ess_bulk[constant] = np.nan
    ess_tail[constant] = np.nan
    return r_hat, ess_bulk, ess_tail
