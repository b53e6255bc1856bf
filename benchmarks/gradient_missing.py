"""Cost of one gradient of the collapsed density: complete data against latent cells.

The data of ``bench_engines.py --missing --quick`` (10,000 rows, 200 groups, 8
features; 80 NaN cells): 50 gradients in one compiled loop, compiled with the
package's XLA options and the data passed as arguments, best of 3 by
``time.process_time``; microseconds per gradient (issue 17). Each in two
forms: ``grad``, ``jax.grad`` of the potential, and ``sampler``, the form
the NUTS kernel compiles (``jax.vmap(jax.value_and_grad(...))`` over one
chain): XLA can compile the two very differently (docs/performance.md,
"Latent cells").

    python benchmarks/gradient_missing.py full diagonal
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def gradient_us(engine, frame, y, form="grad"):
    """Microseconds per gradient of the engine's density on these rows."""
    from hiermask._fit import FitConfig, _collapsed_data, _hyper, _prior_units
    from hiermask._stats import compute_scaling
    from hiermask._xla import compiler_options

    groups = frame["group"].to_numpy()
    X = frame.drop(columns="group").to_numpy(dtype=float)
    _, group_idx = np.unique(groups, return_inverse=True)
    mask = np.ones((group_idx.max() + 1, X.shape[1]), bool)
    w = np.ones(len(y))
    scaling = compute_scaling(X, y, w, mask[group_idx])
    config = FitConfig(
        pooling="partial",
        engine="collapsed",
        standardize=True,
        coef_prior_scale=1.0,
        intercept_prior_scale=1.0,
        group_scale_prior=1.0,
        noise_prior_scale=1.0,
        num_warmup=1,
        num_samples=1,
        num_chains=1,
        target_accept_prob=0.8,
        seed=0,
    )
    with jax.enable_x64(True):
        data = _collapsed_data(
            X, y, w, group_idx, mask, scaling, _prior_units(scaling, True)
        )
        hyper = _hyper(config, scaling)

        def gradients(data, hyper, z):
            density = engine.density(data, hyper)

            if form == "grad":

                def body(i, acc):
                    return acc + jax.grad(density.potential)(z + 1e-3 * i)

            else:
                value_and_grad = jax.vmap(jax.value_and_grad(density.potential))

                def body(i, acc):
                    value, grad = value_and_grad((z + 1e-3 * i)[None])
                    return acc + grad[0] + value[0]

            return jax.lax.fori_loop(0, 50, body, jnp.zeros_like(z))

        size = engine.density(data, hyper).size
        z = jnp.asarray(np.random.default_rng(0).uniform(-0.5, 0.5, size))
        run = jax.jit(gradients).lower(data, hyper, z).compile(compiler_options())
        run(data, hyper, z).block_until_ready()
        best = np.inf
        for _ in range(3):
            start = time.process_time()
            run(data, hyper, z).block_until_ready()
            best = min(best, time.process_time() - start)
    return data.miss_row.shape[0], size, 1e6 * best / 50


def main(argv):
    from bench_engines import _missing_data

    from hiermask._collapsed import CollapsedEngine

    warnings.simplefilter("ignore")
    X, holed, y, _ = _missing_data(quick=True)
    y = np.asarray(y, dtype=float)
    for covariance in argv or ["full", "diagonal"]:
        engine = CollapsedEngine("partial", covariance=covariance)
        for form in ("grad", "sampler"):
            for frame in (X, holed):
                cells, size, us = gradient_us(engine, frame, y, form)
                print(
                    f"{covariance} ({form}): {cells} latent cells, {size} "
                    f"coordinates, {us:.0f} us per gradient",
                    flush=True,
                )


if __name__ == "__main__":
    main(sys.argv[1:])
