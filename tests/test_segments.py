"""The sampler as segments of one compiled program, with no host callback.

A run's warmup and sampling go in segments that carry the chains' state from
one call of the compiled program to the next (``hiermask._nuts.segments``).
The oracle of the carried state is the same run in a single segment; the
segmentation depends on the run's settings alone, so the progress bar cannot
change the draws; and with no callback into Python, JAX's persistent cache
stores the sampler, so that a new process (or a loky worker) loads it.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hiermask import MaskedHierarchicalRegressor, _nuts
from hiermask.datasets import make_manufacturing

ROOT = Path(__file__).resolve().parents[1]
TINY = {"num_warmup": 30, "num_samples": 20, "random_state": 0}


@pytest.mark.parametrize(
    ("num_warmup", "num_samples", "length", "n_segments"),
    [
        (0, 14, 1, 15),  # 15 iterations: one per segment
        (0, 15, 1, 16),  # 16: still one
        (0, 16, 2, 9),  # 17: two per segment, one padded
        (500, 1000, 94, 16),  # the defaults: 1501 = 16 x 94 - 3
        (30, 20, 4, 13),
    ],
)
def test_segments_cover_the_run_once_in_order(
    num_warmup, num_samples, length, n_segments
):
    n_iterations = num_warmup + num_samples + 1
    keys = np.random.default_rng(0).integers(
        0, 2**32, size=(n_iterations, 3, 4), dtype=np.uint32
    )
    parts = _nuts.segments(keys, num_warmup, num_samples)
    assert _nuts.segment_length(num_warmup, num_samples) == length
    assert len(parts) == n_segments <= _nuts.N_SEGMENTS
    assert {len(p.index) for p in parts} == {length}
    index = np.concatenate([p.index for p in parts])
    np.testing.assert_array_equal(index, np.arange(n_segments * length))
    assert 0 <= len(index) - n_iterations < _nuts.N_SEGMENTS
    stacked = np.concatenate([p.keys for p in parts])
    np.testing.assert_array_equal(stacked[:n_iterations], keys)
    assert not stacked[n_iterations:].any()
    schedule = _nuts.warmup_schedule(num_warmup, num_samples)
    for name, flags in zip(_nuts.WindowFlags._fields, schedule, strict=True):
        joined = np.concatenate([getattr(p.flags, name) for p in parts])
        np.testing.assert_array_equal(joined[:n_iterations], flags)
        assert not joined[n_iterations:].any()  # padding adapts nothing


@pytest.mark.parametrize("num_chains", [2, 3])  # chains in lockstep; one each
def test_segments_give_the_draws_of_one_segment(monkeypatch, num_chains):
    # Oracle: the same run as a single lax.scan (one segment, no padding).
    # 30 + 20 + 1 iterations go in 13 segments of 4, the last one padded.
    X, y = make_manufacturing(80, random_state=1)
    params = {"group_col": "Product_Group", "num_chains": num_chains, **TINY}
    params["on_bad_convergence"] = "ignore"
    shown = MaskedHierarchicalRegressor(progress_bar=True, **params).fit(X, y)
    segmented = MaskedHierarchicalRegressor(**params).fit(X, y)
    monkeypatch.setattr(_nuts, "N_SEGMENTS", 1)
    whole = MaskedHierarchicalRegressor(**params).fit(X, y)
    for name, draws in whole.posterior_.items():
        np.testing.assert_array_equal(segmented.posterior_[name], draws)
        np.testing.assert_array_equal(shown.posterior_[name], draws)


_FIT = """
import collections, json, os, sys
import jax
events = collections.Counter()
jax.monitoring.register_event_listener(lambda e, **k: events.update([e]))
import hiermask
from hiermask.datasets import make_manufacturing
hiermask.enable_compilation_cache(sys.argv[1])
X, y = make_manufacturing(60, random_state=0)
est = hiermask.MaskedHierarchicalRegressor(
    group_col="Product_Group", num_warmup=20, num_samples=20, num_chains=1,
    on_bad_convergence="ignore", random_state=0,
).fit(X, y)
print(json.dumps({
    "files": sorted(os.listdir(sys.argv[1])),
    "hits": events["/jax/compilation_cache/cache_hits"],
    "misses": events["/jax/compilation_cache/cache_misses"],
    "traced": est._fitted.posterior.timings["trace"] > 0,
}))
"""


def _python(code, *args):
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_persistent_cache_stores_the_sampler(tmp_path):
    first = _python(_FIT, tmp_path)
    assert first["misses"] > 0 and first["hits"] == 0
    # JAX names an entry after the jitted function: the sampler's is _program.
    assert any(name.startswith("jit__program-") for name in first["files"])
    second = _python(_FIT, tmp_path)
    # A fresh process traces the sampler but compiles nothing: every program
    # of the fit (the sampler among them) comes from the cache.
    assert second["traced"]
    assert second["misses"] == 0 and second["hits"] == first["misses"]
    assert second["files"] == first["files"]


_SEARCH = """
import json, sys
sys.path.insert(0, sys.argv[2])
import hiermask
from sklearn.model_selection import GridSearchCV, KFold
from hiermask.datasets import make_manufacturing
from tests._compile_probe import SCORING
hiermask.enable_compilation_cache(sys.argv[1])
X, y = make_manufacturing(80, random_state=0)
est = hiermask.MaskedHierarchicalRegressor(
    group_col="Product_Group", num_warmup=20, num_samples=20, num_chains=1,
    on_bad_convergence="ignore", random_state=0,
)
for train, _ in KFold(2).split(X):  # compiles here what the folds need
    est.fit(X.iloc[train], y[train])
search = GridSearchCV(
    est, {"coef_prior_scale": [0.5, 1.0, 2.0]}, cv=KFold(2), n_jobs=2,
    scoring=SCORING, refit=False, error_score="raise",
).fit(X, y)
res = search.cv_results_
print(json.dumps({
    name: [v for i in range(2) for v in res[f"split{i}_test_{name}"].tolist()]
    for name in SCORING
}))
"""


def test_gridsearch_workers_load_the_sampler(tmp_path):
    # enable_compilation_cache in the parent reaches the loky workers (by
    # the environment): each worker traces the sampler for its first fit of
    # each fold's shape but compiles nothing, loading every program from the
    # cache that the parent filled.
    res = _python(_SEARCH, tmp_path, ROOT)
    workers = {}
    for pid, traced, misses in zip(
        res["pid"], res["traced"], res["cache_misses"], strict=True
    ):
        workers.setdefault(pid, []).append(traced)
        assert misses == 0
    assert len(workers) == 2
    assert all(any(t) for t in workers.values())  # each worker traced
    assert not all(res["traced"])  # and reused its programs in memory
    assert max(res["cache_hits"]) > 0
