"""Benchmark baseline: the hand-written per-row NumPyro model of the seed example.

This is the model an analyst writes by hand for the manufacturing example,
before hiermask: independent ``Normal(0, 5)`` priors on every group's intercept
and coefficients, coefficients switched off by a 0/1 mask, one likelihood term
per row, sampled by stock NumPyro NUTS with vectorized chains in the default
float32 precision. hiermask's speed targets are stated relative to it.

Run ``python benchmarks/baseline.py --n-samples 500`` to time it on the
manufacturing example.
"""

__all__ = ["baseline_model", "fit_baseline"]

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
from numpyro.infer import MCMC, NUTS

from hiermask.datasets import make_manufacturing


def baseline_model(mask, group_idx, X, y=None):
    """Per-row NumPyro model with masked group coefficients.

    Parameters
    ----------
    mask : jax.Array of shape (n_groups, n_features)
        1 where a feature applies to a group, 0 where it does not.
    group_idx : jax.Array of shape (n_samples,)
        Integer group of each row, in ``range(n_groups)``.
    X : jax.Array of shape (n_samples, n_features)
        Features; NaN cells are read as 0 and masked cells are ignored.
    y : jax.Array of shape (n_samples,) or None, default=None
        Observed target; ``None`` samples it.
    """
    n_groups, n_features = mask.shape
    X_masked = jnp.where(jnp.isnan(X), 0.0, X) * mask[group_idx]

    with numpyro.plate("group", n_groups):
        alpha = numpyro.sample("alpha", dist.Normal(0.0, 5.0))
        with numpyro.plate("feature", n_features):
            w = numpyro.sample("w", dist.Normal(0.0, 5.0))

    w_masked = w.T * mask
    mu = alpha[group_idx] + jnp.sum(X_masked * w_masked[group_idx], axis=-1)
    scale = numpyro.sample("scale", dist.HalfNormal(5.0))

    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("obs", dist.Normal(mu, scale), obs=y)


def fit_baseline(
    X,
    y,
    group_idx,
    mask,
    *,
    num_warmup=200,
    num_samples=300,
    num_chains=4,
    seed=0,
):
    """Fit :func:`baseline_model` with NUTS and time it.

    The chains run vectorized (``chain_method="vectorized"``) in JAX's default
    float32 precision; the global JAX configuration is left untouched.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
        Float features, possibly with NaN.
    y : ndarray of shape (n_samples,)
        Target.
    group_idx : ndarray of shape (n_samples,)
        Integer group of each row, in ``range(n_groups)``.
    mask : ndarray of shape (n_groups, n_features)
        1 (or True) where a feature applies to a group, else 0.
    num_warmup : int, default=200
        Warm-up iterations per chain.
    num_samples : int, default=300
        Kept draws per chain.
    num_chains : int, default=4
        Number of chains.
    seed : int, default=0
        Seed of the sampler's PRNG key.

    Returns
    -------
    result : dict
        ``wall_s`` (seconds of ``mcmc.run``, compilation included),
        ``min_ess`` (smallest effective sample size over the intercepts, the
        unmasked coefficients and the noise scale, by
        :func:`numpyro.diagnostics.effective_sample_size`, not rank-normalised),
        ``max_r_hat`` (largest split R-hat over the same parameters),
        ``ess_per_s`` (``min_ess / wall_s``), ``n_divergences`` (int),
        ``coef_mean`` (ndarray of shape (n_groups, n_features), 0 where
        masked) and ``intercept_mean`` (ndarray of shape (n_groups,)).
    """
    mask = np.asarray(mask).astype(bool)
    with jax.enable_x64(False):
        args = (
            jnp.asarray(mask, dtype=jnp.float32),
            jnp.asarray(group_idx, dtype=jnp.int32),
            jnp.asarray(X, dtype=jnp.float32),
            jnp.asarray(y, dtype=jnp.float32),
        )
        mcmc = MCMC(
            NUTS(baseline_model),
            num_warmup=num_warmup,
            num_samples=num_samples,
            num_chains=num_chains,
            chain_method="vectorized",
            progress_bar=False,
        )
        start = time.perf_counter()
        mcmc.run(jax.random.PRNGKey(seed), *args, extra_fields=("diverging",))
        samples = jax.block_until_ready(mcmc.get_samples(group_by_chain=True))
        wall_s = time.perf_counter() - start
        diverging = mcmc.get_extra_fields()["diverging"]

    alpha = np.asarray(samples["alpha"], dtype=np.float64)  # (c, d, g)
    w = np.asarray(samples["w"], dtype=np.float64)  # (c, d, p, g)
    scale = np.asarray(samples["scale"], dtype=np.float64)  # (c, d)
    n_chains, n_draws = scale.shape
    w_on = w.reshape(n_chains, n_draws, -1)[:, :, mask.T.ravel()]
    parameters = [alpha, w_on, scale[..., None]]
    ess = np.concatenate([np.ravel(effective_sample_size(a)) for a in parameters])
    r_hat = np.concatenate([np.ravel(split_gelman_rubin(a)) for a in parameters])
    min_ess = float(np.min(ess))
    return {
        "wall_s": wall_s,
        "min_ess": min_ess,
        "max_r_hat": float(np.max(r_hat)),
        "ess_per_s": min_ess / wall_s,
        "n_divergences": int(np.sum(diverging)),
        "coef_mean": w.mean(axis=(0, 1)).T * mask,
        "intercept_mean": alpha.mean(axis=(0, 1)),
    }


def _manufacturing_inputs(n_samples, random_state):
    """Arrays for :func:`fit_baseline` from the manufacturing simulator."""
    X, y = make_manufacturing(n_samples, random_state=random_state)
    labels, group_idx = np.unique(X["Product_Group"].to_numpy(), return_inverse=True)
    features = X.drop(columns="Product_Group").to_numpy(dtype=np.float64)
    n_groups = len(labels)
    observed = np.zeros((n_groups, features.shape[1]), dtype=bool)
    for g in range(n_groups):
        observed[g] = ~np.isnan(features[group_idx == g]).all(axis=0)
    return features, y.to_numpy(), group_idx, observed.astype(np.int32)


def main(argv=None):
    """Time the baseline on the manufacturing example and print the results.

    Parameters
    ----------
    argv : list of str or None, default=None
        Command-line arguments; ``None`` reads ``sys.argv``.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=500)
    parser.add_argument("--num-warmup", type=int, default=200)
    parser.add_argument("--num-samples", type=int, default=300)
    parser.add_argument("--num-chains", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    X, y, group_idx, mask = _manufacturing_inputs(args.n_samples, args.seed)
    result = fit_baseline(
        X,
        y,
        group_idx,
        mask,
        num_warmup=args.num_warmup,
        num_samples=args.num_samples,
        num_chains=args.num_chains,
        seed=args.seed,
    )
    print(f"n_samples: {args.n_samples}")
    for key, value in result.items():
        if not isinstance(value, np.ndarray):
            print(
                f"{key}: {value:.5g}" if isinstance(value, float) else f"{key}: {value}"
            )


if __name__ == "__main__":
    main()
