"""JAX's persistent compilation cache: off unless asked for, on when asked."""

import os
import subprocess
import sys

import pytest

import hiermask
from hiermask._cache import cache_disabled_by_env, default_cache_dir

_SCRIPT = """
import os, sys
import jax
import pytest

import hiermask
from hiermask.datasets import make_manufacturing
assert jax.config.jax_compilation_cache_dir is None  # import changes nothing
if sys.argv[1] == "on":
    previous = hiermask.enable_compilation_cache(sys.argv[2])
    assert previous["jax_compilation_cache_dir"] is None
X, y = make_manufacturing(60, random_state=0)
hiermask.MaskedHierarchicalRegressor(
    group_col="Product_Group", num_warmup=20, num_samples=20, num_chains=1,
    on_bad_convergence="ignore", random_state=0,
).fit(X, y)
print(len(os.listdir(sys.argv[2])))
"""


def _run(mode, folder):
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode, str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


def test_programs_are_cached_only_when_asked(tmp_path):
    assert _run("off", tmp_path) == 0
    assert _run("on", tmp_path) > 0


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "hiermask" / "jax"


def test_no_cache_environment_variable(monkeypatch):
    for value, disabled in [("", False), ("0", False), ("1", True), ("yes", True)]:
        monkeypatch.setenv("HIERMASK_NO_CACHE", value)
        assert cache_disabled_by_env() is disabled


def test_enable_compilation_cache_is_public():
    assert "enable_compilation_cache" in hiermask.__all__


def _cli(args, cache_home, **env):
    import os

    run_env = {k: v for k, v in os.environ.items() if k != "HIERMASK_NO_CACHE"}
    run_env.update(XDG_CACHE_HOME=str(cache_home), **env)
    out = subprocess.run(
        [sys.executable, "-m", "hiermask", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=run_env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    folder = cache_home / "hiermask" / "jax"
    return len(list(folder.iterdir())) if folder.exists() else 0


DEMO = ["demo", "--n-samples", "40", "--num-warmup", "20", "--num-samples", "20",
        "--num-chains", "1", "--quiet"]  # fmt: skip


def test_command_line_caches_unless_told_not_to(tmp_path):
    # The command owns its process: it turns the cache on in the user's cache
    # folder; --no-cache and HIERMASK_NO_CACHE turn it off.
    assert _cli([*DEMO, "--no-cache"], tmp_path / "a") == 0
    assert _cli(DEMO, tmp_path / "b", HIERMASK_NO_CACHE="1") == 0
    assert _cli(DEMO, tmp_path / "c") > 0


def test_main_called_from_python_leaves_jax_config_alone(tmp_path, capsys):
    import jax

    from hiermask.cli import main

    before = jax.config.jax_compilation_cache_dir
    # parsed, then refused (no such model file): past the cache switch
    assert main(["predict", str(tmp_path / "none.hmz"), str(tmp_path / "x.csv")]) == 1
    assert jax.config.jax_compilation_cache_dir == before


_TOGGLE = """
import os, sys
import jax
import pytest

import hiermask
jax.jit(lambda x: x + 1.0)(1.0)  # compiled before the cache is on
previous = hiermask.enable_compilation_cache(sys.argv[1])
assert os.environ["JAX_COMPILATION_CACHE_DIR"] == sys.argv[1]
jax.jit(lambda x: x * 2.0)(1.0)
stored = len(os.listdir(sys.argv[1]))
hiermask.restore_compilation_cache(previous)
assert "JAX_COMPILATION_CACHE_DIR" not in os.environ
assert jax.config.jax_compilation_cache_dir is None
jax.jit(lambda x: x * 3.0)(1.0)
print(stored, len(os.listdir(sys.argv[1])))
"""


def test_enable_after_a_compilation_and_restore(tmp_path):
    # The switch holds from the next compilation on, also after earlier ones
    # in the process; restore turns it off again and unsets the environment
    # variables that the workers of a parallel search would inherit.
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    out = subprocess.run(
        [sys.executable, "-c", _TOGGLE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "1"]


def test_stored_programs_are_keyed_and_checked(tmp_path):
    # hiermask._export: a file per key, only while JAX's cache is on; a file
    # of another key, or whose program fails its checksum, is not read.
    pytest.importorskip("flatbuffers")
    import jax

    from hiermask import _export

    assert jax.config.jax_compilation_cache_dir is None
    assert _export.path("_program", ("a",)) is None
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    try:  # nothing compiles in between
        a, b = _export.path("_program", ("a",)), _export.path("_program", ("b",))
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
    assert a[0].parent == b[0].parent == tmp_path / _export.SUBFOLDER
    assert a[0] != b[0] and a[1] != b[1]
    tree = jax.tree_util.tree_structure((1, {"x": 2, "y": None}, [3]))
    _export._write(a, b"not a program", tree)
    assert _export.load(b) is None  # no such file
    b[0].write_bytes(a[0].read_bytes())
    assert _export.load(b) is None  # another key
    assert _export.load(a) is None  # the right key, but no program
    assert _export._decode_tree(_export._encode_tree(tree)) == tree
    assert not list(tmp_path.glob(f"{_export.SUBFOLDER}/.tmp-*"))


def test_stored_tree_structures_round_trip():
    import jax

    from hiermask import _export, _nuts

    adapt = _nuts.AdaptState(*range(len(_nuts.AdaptState._fields)))
    state = _nuts.ChainState(_nuts.NUTSState(1, 2, 3), adapt)
    tree = jax.tree_util.tree_structure((state, {"noise": 0}, {"a": 1, "b": 2}))
    assert _export._decode_tree(_export._encode_tree(tree)) == tree
