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
"""

from __future__ import annotations

import csv
import os
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


def main():
    rows = []
    load = os.getloadavg()[0]
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
    for (n_groups, label), ns in best.items():
        rows.append({"groups": n_groups, "form": label, "ns_per_group": ns})
    for row in rows:
        row["load_before"] = load
    print(f"load average before: {load:.2f}")
    print(f"{'groups':>8}  {'form':>10}  {'ns per group':>12}")
    for row in rows:
        print(f"{row['groups']:>8}  {row['form']:>10}  {row['ns_per_group']:>12.0f}")
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "group_blocks.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
