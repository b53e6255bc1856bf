"""The sampler as segments of one compiled program, with no host callback.

A run's warmup and sampling go in segments that carry the chains' state from
one call of the compiled program to the next (``hiermask._nuts.segments``).
The oracle of the carried state is the same run in a single segment; the
segmentation depends on the run's settings alone, so the progress bar cannot
change the draws; and with no callback into Python, JAX's persistent cache
stores the sampler, so that a new process (or a loky worker) loads it.
"""

import importlib.util
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

#: The tests of programs stored by hiermask._export: jax.export's
#: serialization needs flatbuffers (a dependency; missing in an environment
#: installed before it was one).
needs_export = pytest.mark.skipif(
    importlib.util.find_spec("flatbuffers") is None, reason="flatbuffers missing"
)


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
import collections, hashlib, json, os, sys
import jax
events = collections.Counter()
jax.monitoring.register_event_listener(lambda e, **k: events.update([e]))
import hiermask
from hiermask.datasets import make_manufacturing
if sys.argv[1] != "off":
    hiermask.enable_compilation_cache(sys.argv[1])
X, y = make_manufacturing(60, random_state=0)
est = hiermask.MaskedHierarchicalRegressor(**json.loads(sys.argv[2])).fit(X, y)
draws = hashlib.md5()
for name in sorted(est.posterior_):
    draws.update(name.encode() + est.posterior_[name].tobytes())
def listing(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []
print(json.dumps({
    "files": listing(sys.argv[1]),
    "exported": listing(os.path.join(sys.argv[1], "hiermask-exported")),
    "hits": events["/jax/compilation_cache/cache_hits"],
    "misses": events["/jax/compilation_cache/cache_misses"],
    "traced": est._fitted.posterior.timings["trace"] > 0,
    "draws": draws.hexdigest(),
}))
"""

#: The fits of the subprocesses above: tiny, one chain.
FIT_PARAMS = {
    "group_col": "Product_Group", "num_warmup": 20, "num_samples": 20,
    "num_chains": 1, "on_bad_convergence": "ignore", "random_state": 0,
}  # fmt: skip


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


def _fit(folder, **params):
    return _python(_FIT, folder, json.dumps({**FIT_PARAMS, **params}))


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A cache folder that one fresh process filled, and that process's report.

    The tests use this folder itself: JAX's cache keys hold its path, so a
    copy elsewhere would compile again.
    """
    folder = tmp_path_factory.mktemp("warm")
    return folder, _fit(folder)


@needs_export
def test_persistent_cache_stores_the_sampler(warm):
    folder, first = warm
    assert first["traced"]
    assert first["misses"] > 0 and first["hits"] == 0
    # JAX names an entry after the jitted function: the sampler's is _program.
    assert any(name.startswith("jit__program-") for name in first["files"])
    # hiermask stores the traced sampler and conditional draws beside them.
    assert [name.split("-")[0] for name in first["exported"]] == [
        "_conditional_with_limits",
        "_program",
    ]
    second = _fit(folder)
    # A fresh process neither traces the sampler (it reads it back) nor
    # compiles anything: every program of the fit comes from the cache.
    assert not second["traced"]
    assert second["misses"] == 0 and second["hits"] == first["misses"]
    assert (second["files"], second["exported"]) == (first["files"], first["exported"])


@needs_export
def test_stored_sampler_gives_the_draws_of_a_traced_one(warm):
    # Oracle: the same fit without the persistent cache, traced as before
    # (the cache-filling process traced too, then ran the exported program).
    folder, first = warm
    traced = _fit("off")  # no such folder: the cache stays off
    assert traced["traced"] and traced["files"] == traced["exported"] == []
    assert first["draws"] == traced["draws"]
    loaded = _fit(folder)
    assert not loaded["traced"] and loaded["draws"] == traced["draws"]


@needs_export
def test_corrupt_or_stale_stored_program_is_traced_again(warm):
    folder, first = warm
    files = sorted((folder / "hiermask-exported").iterdir())
    stored = [file.read_bytes() for file in files]
    try:
        files[1].write_bytes(b"not an exported program")  # the sampler's
        blob = bytearray(stored[0])
        blob[-100] ^= 0xFF  # a flipped bit of the program: the checksum fails
        files[0].write_bytes(bytes(blob))
        again = _fit(folder)
        # traced again, to the same programs: JAX's cache still has them
        assert again["traced"] and again["misses"] == 0
        assert again["draws"] == first["draws"]
        assert [file.read_bytes() for file in files] == stored  # written anew
    finally:
        for file, blob in zip(files, stored, strict=True):
            file.write_bytes(blob)


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


@needs_export
def test_gridsearch_workers_load_the_sampler(tmp_path):
    # enable_compilation_cache in the parent reaches the loky workers (by
    # the environment): each worker reads back the sampler that the parent
    # traced for each fold's shape and stored (it traces nothing), and
    # compiles nothing, loading every program from the cache.
    res = _python(_SEARCH, tmp_path, ROOT)
    workers = set(res["pid"])
    assert len(workers) == 2
    assert not any(res["traced"])
    assert not any(res["cache_misses"])
    assert max(res["cache_hits"]) > 0
