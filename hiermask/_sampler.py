"""NUTS runner with a compile cache, and convergence diagnostics.

The whole run (initialization, warmup with step-size and mass-matrix
adaptation, sampling) of all chains is one jitted XLA program: chains run in
sequence with ``lax.map`` and the iterations are ``lax.scan`` loops, so there
is no per-iteration Python overhead. The program is cached by JAX per static
configuration (model, pooling, numbers of warmup and draws, chains, target
acceptance) and per shape of the data; prior scales and data values are
traced arguments, so refits with other prior scales or other rows of the same
shape reuse it. Everything runs in float64 inside a scoped
``jax.enable_x64(True)``; the user's global configuration is untouched.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
import scipy.stats
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
from numpyro.distributions.transforms import biject_to
from numpyro.handlers import seed, trace
from numpyro.infer.hmc import hmc
from numpyro.infer.util import constrain_fn, potential_energy

__all__ = ["TRACE_COUNTS", "parameter_diagnostics", "run_nuts"]

#: Number of times each model was traced (compiled) by the runner; tests use it
#: to check that refits reuse the compiled program.
TRACE_COUNTS: collections.Counter = collections.Counter()

#: Half-width of the uniform initialization box in unconstrained space.
_INIT_RADIUS = 2.0


@functools.partial(
    jax.jit,
    static_argnames=(
        "model",
        "num_warmup",
        "num_samples",
        "num_chains",
        "target_accept_prob",
        "max_tree_depth",
    ),
)
def _sample(
    rng_key,
    data,
    hyper,
    *,
    model,
    num_warmup,
    num_samples,
    num_chains,
    target_accept_prob,
    max_tree_depth,
):
    TRACE_COUNTS[getattr(model, "__name__", repr(model))] += 1
    args = (data, hyper)
    prototype = trace(seed(model, rng_seed=0)).get_trace(*args)
    shapes = {
        name: biject_to(site["fn"].support).inv(site["value"]).shape
        for name, site in prototype.items()
        if site["type"] == "sample" and not site["is_observed"]
    }
    init_key, chain_key = jax.random.split(rng_key)
    init_keys = jax.random.split(init_key, len(shapes))
    init = {
        name: jax.random.uniform(
            k, (num_chains, *shape), minval=-_INIT_RADIUS, maxval=_INIT_RADIUS
        )
        for k, (name, shape) in zip(init_keys, shapes.items(), strict=True)
    }

    def pe(z):
        return potential_energy(model, args, {}, z)

    init_kernel, sample_kernel = hmc(potential_fn=pe, algo="NUTS")

    def chain(key, z0):
        state = init_kernel(
            z0,
            num_warmup,
            target_accept_prob=target_accept_prob,
            max_tree_depth=max_tree_depth,
            rng_key=key,
        )

        def step(s, _):
            s = sample_kernel(s)
            return s, (s.z, s.diverging, s.num_steps, s.accept_prob)

        # One scan over warmup and sampling: the kernel adapts while its
        # iteration counter is below num_warmup; warmup outputs are dropped.
        _, out = jax.lax.scan(step, state, None, length=num_warmup + num_samples)
        return jax.tree_util.tree_map(lambda a: a[num_warmup:], out)

    # Chains run one after the other inside the program (lax.map): on a CPU
    # this is as fast as vmap, lowers and compiles several times faster, and
    # no chain waits for the longest trajectory of the others.
    z, diverging, num_steps, accept = jax.lax.map(
        lambda args: chain(*args), (jax.random.split(chain_key, num_chains), init)
    )
    constrain = functools.partial(
        constrain_fn, model, args, {}, return_deterministic=True
    )
    values = jax.vmap(jax.vmap(constrain))(z)
    stats = {"diverging": diverging, "n_steps": num_steps, "accept_prob": accept}
    return values, stats


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
):
    """Run vectorized NUTS chains of ``model(data, hyper)`` in float64.

    Parameters
    ----------
    model : callable
        A NumPyro model ``model(data, hyper)``; must be the same object from
        fit to fit for the compile cache to work.
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

    Returns
    -------
    values : dict of ndarray of shape (num_chains, num_samples, ...)
        Constrained draws of every latent and deterministic site.
    stats : dict of ndarray of shape (num_chains, num_samples)
        ``diverging``, ``n_steps`` (leapfrog steps) and ``accept_prob``.
    """
    with jax.enable_x64(True):
        key = jax.random.PRNGKey(seed_value)
        data = jax.tree_util.tree_map(jnp.asarray, data)
        hyper = jax.tree_util.tree_map(jnp.asarray, hyper)
        values, stats = _sample(
            key,
            data,
            hyper,
            model=model,
            num_warmup=int(num_warmup),
            num_samples=int(num_samples),
            num_chains=int(num_chains),
            target_accept_prob=float(target_accept_prob),
            max_tree_depth=int(max_tree_depth),
        )
        values = {k: np.asarray(v, dtype=np.float64) for k, v in values.items()}
        stats = {k: np.asarray(v) for k, v in stats.items()}
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
