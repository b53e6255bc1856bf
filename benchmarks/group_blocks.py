"""The general collapsed path's groups' terms: all groups at once against blocks.

Value and gradient (with respect to the noise precision and the deviations'
factor) of the four sums of ``hiermask._general`` over 10,000 and 100,000
groups of 4 coefficients (3 features), with random Gram matrices of 10 rows
each, compiled once and timed over 30 calls after a warm one, the two forms
alternated three times (the best of each kept); nanoseconds per group (issue
17). ``one block``: ``_general._group_sums`` on every group at once;
``blocks``: ``_general._blocked_group_sums`` with blocks forced
(``_limits.GENERAL_BLOCK_MIN_BYTES = 0``); the sampler runs the second above
that limit. The two give the same
sums up to rounding (``tests/test_collapsed_general.py``).

    python benchmarks/group_blocks.py

prints a table and writes ``benchmarks/results/group_blocks.csv``.

    python benchmarks/group_blocks.py --sampler

times the two forms in the sampler instead: fits of 10,000 groups of 10
rows and 3 features (the default ``"full"`` model, 4 chains x (100 + 100),
chains two at a time on the 2 cores) in one block and with blocks forced,
alternated twice; microseconds of sampling per group and gradient (the
kept draws' leapfrog steps, counting the warmup's as many), written to
``benchmarks/results/group_blocks_sampler.csv``.

    python benchmarks/group_blocks.py --one-pass

times, in the sampler, the two forms of the blocks when no latent cell
changes the statistics: fits of 100,000 groups of 10 rows and 3 features
(2 chains x (150 + 50), one chain per core) with the sampler's one pass
(``_general._fixed_group_sums``, blocks of ``BLOCK_BYTES``) and with the
pass that recomputes each block for the gradient
(``_general._blocked_group_sums``, the path with latent cells, blocks of
``GENERAL_BLOCK_BYTES``), alternated twice; microseconds of sampling per group and
gradient, every gradient counted (the warmup's from the runner), written to
``benchmarks/results/group_blocks_one_pass.csv``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from hiermask import _general, _limits

RESULTS = Path(__file__).resolve().parent / "results"
Q = 4
REPS = 30


def ns_per_group(n_groups, sums):
    """Nanoseconds per group of one value and gradient of ``sums``."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n_groups, 10, Q))
    gram = jnp.asarray(np.einsum("gni,gnj->ijg", x, x))
    xty = jnp.asarray(rng.normal(size=(Q, n_groups)))
    factor = jnp.asarray(np.tril(rng.normal(size=(Q, Q))) * 0.3 + np.eye(Q))
    left, unit = jnp.eye(Q), jnp.ones(())

    def total(inv, factor):
        out = sums(False, inv, factor, left, gram, xty, unit)
        return out[0] + out[1] + jnp.sum(out[2]) + jnp.sum(out[3])

    step = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))
    jax.block_until_ready(step(1.0, factor))
    start = time.perf_counter()
    for _ in range(REPS):
        out = step(1.0, factor)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / REPS / n_groups * 1e9


def sampler_rows():
    """Sampling time per group and gradient at 10,000 groups, both forms."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_engines import _profiled_fit

    from hiermask.datasets import make_grouped_regression

    n_groups, warmup, draws, chains, at_once = 10_000, 100, 100, 4, 2
    X, y = make_grouped_regression(10 * n_groups, n_groups, 3, random_state=0)
    default = _limits.GENERAL_BLOCK_MIN_BYTES
    rows = []
    try:
        for form in ("one block", "blocks", "one block", "blocks"):
            _limits.GENERAL_BLOCK_MIN_BYTES = 0 if form == "blocks" else default
            row, est = _profiled_fit(
                X,
                y,
                form,
                num_warmup=warmup,
                num_samples=draws,
                num_chains=chains,
                progress_bar=False,
            )
            steps = float(np.mean(est._fitted.posterior.tree_steps))
            # gradients one after the other: every chain's warmup and draws,
            # the chains at_once at a time
            serial = steps * (warmup + draws) * chains / at_once
            rows.append(
                {
                    "groups": n_groups,
                    "form": form,
                    "sample_s": row["sample_s"],
                    "steps_per_draw": steps,
                    "us_per_group_gradient": row["sample_s"] / serial / n_groups * 1e6,
                }
            )
    finally:
        _limits.GENERAL_BLOCK_MIN_BYTES = default
    return rows


def one_pass_row(form):
    """Sampling time per group and gradient at 100,000 groups, one form."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_engines import Profiler, _profiled_fit

    from hiermask.datasets import make_grouped_regression

    n_groups, warmup, draws = 100_000, 150, 50
    X, y = make_grouped_regression(10 * n_groups, n_groups, 3, random_state=0)
    if form == "recompute":

        def recompute(inv, factor, left, blocks, unit):
            # _blocked_group_sums reads only the shape of xty given blocks
            q, size = blocks[1].shape[1:]
            xty = jax.ShapeDtypeStruct((q, size * blocks[1].shape[0]), blocks[1].dtype)
            return _general._blocked_group_sums(
                False, inv, factor, left, None, xty, unit, blocks
            )

        # and in the recomputation's blocks (GENERAL_BLOCK_BYTES)
        stat_blocks = _general._stat_blocks
        _general._stat_blocks = lambda gram, xty, one_pass=False: stat_blocks(gram, xty)
        _general._fixed_group_sums = recompute
    prof = Profiler()
    row, est = _profiled_fit(
        X,
        y,
        form,
        profiler=prof,
        num_warmup=warmup,
        num_samples=draws,
        num_chains=2,
        progress_bar=False,
    )
    kept = np.asarray(est._fitted.posterior.tree_steps)
    per_chain = (kept.sum() + prof.warmup_steps.sum()) / 2
    return {
        "groups": n_groups,
        "form": form,
        "sample_s": row["sample_s"],
        "gradients_per_chain": float(per_chain),
        "us_per_group_gradient": row["sample_s"] / per_chain / n_groups * 1e6,
    }


def one_pass_rows():
    """:func:`one_pass_row` for both forms, alternated twice, each in a new
    process (the compiled programs are cached per process)."""
    rows = []
    for form in ("one pass", "recompute", "one pass", "recompute"):
        child = subprocess.run(
            [sys.executable, __file__, "--one-pass-form", form],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    return rows


def write(rows, name, load):
    """Print ``rows`` and save them, with the load average before, as CSV."""
    print(f"load average before: {load:.2f}")
    for row in rows:
        row["load_before"] = load
        cells = (f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values())
        print("  ".join(f"{k}={c}" for k, c in zip(row, cells, strict=True)))
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / name, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main():
    load = os.getloadavg()[0]
    if "--sampler" in sys.argv[1:]:
        write(sampler_rows(), "group_blocks_sampler.csv", load)
        return
    if "--one-pass-form" in sys.argv[1:]:
        print(json.dumps(one_pass_row(sys.argv[sys.argv.index("--one-pass-form") + 1])))
        return
    if "--one-pass" in sys.argv[1:]:
        write(one_pass_rows(), "group_blocks_one_pass.csv", load)
        return
    forms = {"one block": _general._group_sums, "blocks": _general._blocked_group_sums}
    best = {}
    _limits.GENERAL_BLOCK_MIN_BYTES = 0
    with jax.enable_x64(True):
        for _ in range(3):
            for n_groups in (10_000, 100_000):
                for label, sums in forms.items():
                    ns = ns_per_group(n_groups, sums)
                    key = (n_groups, label)
                    best[key] = min(best.get(key, ns), ns)
    rows = [
        {"groups": n_groups, "form": label, "ns_per_group": ns}
        for (n_groups, label), ns in best.items()
    ]
    write(rows, "group_blocks.csv", load)


if __name__ == "__main__":
    main()
