"""The NUTS runner: compile cache, chains on threads, progress.

The runner knows an engine only through its density
(``engine.density(data, hyper) -> FlatDensity``, see
:mod:`hiermask._density`). A run of a set of chains (starting points,
warmup, sampling) is a fixed sequence of segments of iterations
(:func:`hiermask._nuts.segments`, 16 per run), each a call of one
compiled program that carries the chains' state on to the next
(:func:`hiermask._nuts.iterate`): the program never calls back into Python,
so JAX's persistent compilation cache can store it, and the progress bar is
updated from Python between segments. The segmentation depends on the run's
settings alone, never on whether a bar is shown: the bar cannot change the
draws. Small models run pairs of chains in lockstep per program (every
kernel serves both: on a CPU a small model's cost is the number of kernels
run, not their size), large ones one chain per program; the programs of a
run are executed by threads, one per CPU this process may use (XLA releases
the GIL), so chains run in parallel. The split depends only on the run,
never on the machine: a seed gives the same draws everywhere.

Compiled programs are cached per static configuration (engine, chains per
program, target acceptance, tree depth, size thresholds) and per shape of
the data and of a segment (its length follows from the run's); prior
scales and data values are arguments, so refits with other prior scales or
other rows of the same shape reuse the program (:func:`cache_info` counts
them). The same cache holds the compiled conditional draws of
:mod:`hiermask._fit` (:func:`compiled_in_background`): it is the package's
one piece of module state. While JAX's persistent compilation cache is on,
a traced program is also stored on disk as an exported program
(:mod:`hiermask._export`), so that a new process reads it back instead of
tracing it again. Everything runs in float64 inside a scoped
``jax.enable_x64(True)`` and with per-compilation XLA options
(:func:`hiermask._xla.compiler_options`); the user's global configuration is
untouched.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import math
import os
import threading
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _export, _limits, _nuts
from ._xla import compiler_options, exclusive, runs_alone

__all__ = [
    "CacheInfo",
    "RunResult",
    "cache_info",
    "compiled_in_background",
    "map_parts",
    "run_nuts",
]


class RunResult(NamedTuple):
    """What :func:`run_nuts` returns.

    Attributes
    ----------
    values : dict of ndarray of shape (num_chains, num_samples, ...)
        Constrained draws of every reported site.
    stats : dict of ndarray
        ``diverging``, ``n_steps`` (leapfrog steps) and ``accept_prob``,
        of shape (num_chains, num_samples); ``warmup_steps`` (num_chains,):
        each chain's gradient evaluations before its first kept draw (its
        warmup's leapfrog steps and the starting point's gradient).
    timings : dict
        Seconds: ``trace`` (tracing and lowering, 0 when the compiled
        program was reused, or read back from the exported program that
        :mod:`hiermask._export` stored), ``compile`` (XLA, or loading from
        JAX's persistent cache, with reading back and lowering the stored
        program when it was; 0 when reused) and ``run``.
    traced : bool
        Whether the sampler was traced for this run (neither reused nor
        read back).
    """

    values: dict
    stats: dict
    timings: dict
    traced: bool


class CacheInfo(NamedTuple):
    """Statistics of the compile cache (as ``functools.lru_cache`` gives)."""

    hits: int
    misses: int
    currsize: int


class _ProgramCache:
    # The package's one compile cache. programs: compiled sampler programs
    # (through exclusive), with hit and miss counts; background: futures of
    # programs compiled in a thread (the conditional draws), under lock.
    # Each most recently used last, at most max_size of each.
    def __init__(self, max_size):
        self.programs = collections.OrderedDict()
        self.background = collections.OrderedDict()
        self.lock = threading.Lock()
        self.max_size = max_size
        self.hits = self.misses = 0

    def get(self, key):
        program = self.programs.pop(key, None)
        if program is None:
            self.misses += 1
        else:
            self.hits += 1
            self.programs[key] = program
        return program

    def put(self, key, program):
        self.programs[key] = program
        while len(self.programs) > self.max_size:
            self.programs.popitem(last=False)

    def future(self, key, compile_now):
        # The cached future of key, or a new one computing compile_now() in
        # a thread (also when the cached one failed).
        with self.lock:
            future = self.background.pop(key, None)
            if future is None or (future.done() and future.exception() is not None):
                future = _in_background(compile_now)
            self.background[key] = future
            while len(self.background) > self.max_size:
                self.background.popitem(last=False)
        return future

    def clear(self):
        """Forget every compiled program (the counts stay)."""
        with self.lock:
            self.programs.clear()
            self.background.clear()


def _in_background(fn):
    # A future of fn() computed in a new daemon thread (a thread per call,
    # not a pool: a pool's threads do not survive os.fork).
    future = concurrent.futures.Future()

    def work():
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to whoever waits on the result
            future.set_exception(exc)

    threading.Thread(target=work, name="hiermask-compile", daemon=True).start()
    return future


_CACHE = _ProgramCache(16)


def cache_info():
    """Hits, misses and size of the sampler's compile cache.

    Counts the sampler's programs only, not those of
    :func:`compiled_in_background`.

    Returns
    -------
    CacheInfo
    """
    return CacheInfo(_CACHE.hits, _CACHE.misses, len(_CACHE.programs))


def compiled_in_background(key, compile_now):
    """Future of a program compiled in a background thread, cached by key.

    The future is kept in the package's compile cache (the 16 most recently
    used keys); a call with a cached key returns its future, unless that
    future failed: then the program is compiled again.

    Parameters
    ----------
    key : hashable
        Everything the compiled program depends on (shapes, static
        arguments, size thresholds).
    compile_now : callable
        Takes no argument and returns the compiled program; run in a new
        daemon thread.

    Returns
    -------
    concurrent.futures.Future
        Its result is what ``compile_now`` returns.
    """
    return _CACHE.future(key, compile_now)


@functools.partial(
    jax.jit,
    static_argnames=(
        "engine",
        "num_chains",
        "target_accept_prob",
        "max_tree_depth",
        "limits",
    ),
)
def _program(
    state,
    iterations,
    start_key,
    data,
    hyper,
    *,
    engine,
    num_chains,
    target_accept_prob,
    max_tree_depth,
    limits,
):
    # One compiled program: a segment of the chains of one part, in
    # lockstep. The run's first segment (iteration 0) starts the chains
    # afresh from start_key, whatever state it is given.
    del limits  # read from _limits while tracing; a part of the cache key
    density = engine.density(data, hyper)
    fresh = _nuts.start(density, start_key, num_chains)
    first = iterations.index[0] == 0
    state = jax.tree_util.tree_map(lambda a, b: jnp.where(first, a, b), fresh, state)
    state, z, diverging, n_steps, accept = _nuts.iterate(
        density,
        state,
        iterations,
        target_accept_prob=target_accept_prob,
        max_tree_depth=max_tree_depth,
    )
    values = jax.vmap(jax.vmap(density.constrain))(z)
    stats = {"diverging": diverging, "n_steps": n_steps, "accept_prob": accept}
    return state, values, stats


def _start_state(start_key, data, hyper, *, engine, num_chains):
    # Zeros of the shapes of a run's ChainState (the first segment's input,
    # which the program replaces): traces the density's construction only.
    shapes = jax.eval_shape(
        lambda k, d, h: _nuts.start(engine.density(d, h), k, num_chains),
        start_key,
        data,
        hyper,
    )
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


#: ``progress_bar="auto"`` opens the bar once a run is projected (from the
#: segments done) to take at least this many seconds in all.
AUTO_PROGRESS_SECONDS = 15.0


class _ProgressBar:
    """A tqdm bar over the iterations of every chain of one run.

    Every part reports after each of its segments. Opened with the run, or
    with ``open_after`` seconds at the first report from which the run is
    projected to take at least that long.
    """

    def __init__(self, per_part, n_parts, num_warmup, num_samples, open_after=None):
        self.per_part = per_part
        self.num_warmup = num_warmup
        self.total = per_part * n_parts * (num_warmup + num_samples)
        self.done = [0] * n_parts
        self.lock = threading.Lock()
        self.open_after = open_after
        self.start = time.perf_counter()
        self.bar = None if open_after is not None else self._open()

    def _open(self):
        from tqdm.auto import tqdm

        return tqdm(
            total=self.total, desc="warmup", unit="it", leave=False, dynamic_ncols=True
        )

    def _long(self):
        # whether the run is projected to take at least open_after seconds
        done = sum(self.done) * self.per_part
        elapsed = time.perf_counter() - self.start
        return done > 0 and elapsed * self.total >= self.open_after * done

    def update(self, part, iteration):
        """Part ``part`` has run its iterations up to ``iteration``."""
        with self.lock:
            step = (iteration - self.done[part]) * self.per_part
            self.done[part] = iteration
            if self.bar is None:
                if not self._long():
                    return
                self.bar = self._open()
                step = sum(self.done) * self.per_part
            if min(self.done) > self.num_warmup:
                self.bar.set_description("sample", refresh=False)
            self.bar.update(step)

    def close(self):
        with self.lock:
            if self.bar is not None:
                self.bar.close()


def _compiled_program(args, static, timings, before_compile):
    # The compiled sampler for these argument shapes and settings, with the
    # zero state its first segment takes, from the cache or compiled now
    # (recording trace and compile times); before_compile() runs once the
    # program is traced (or found).
    leaves, treedef = jax.tree_util.tree_flatten(args)
    cache_key = (
        tuple(sorted(static.items(), key=lambda item: item[0])),
        treedef,
        tuple((leaf.shape, leaf.dtype) for leaf in leaves),
    )
    found = _CACHE.get(cache_key)
    if found is None:
        start = time.perf_counter()
        lowered, state, traced = _lowered(args, static, cache_key)
        timings["trace" if traced else "compile"] = time.perf_counter() - start
        before_compile()
        start = time.perf_counter()
        found = exclusive(lowered.compile(compiler_options())), state
        timings["compile"] += time.perf_counter() - start
        _CACHE.put(cache_key, found)
    else:
        before_compile()
    return found


def _lowered(args, static, cache_key):
    # The lowered sampler, its zero start state, and whether it was traced
    # (not read back from its stored program, see hiermask._export).
    def arguments(stored):
        if stored is not None:
            return (_stored_state(stored), *args), {}
        state = _start_state(
            *args[1:], engine=static["engine"], num_chains=static["num_chains"]
        )
        return (state, *args), {}

    lowered, (state, *_), traced = _export.lowered(
        "_program", _export_key(cache_key), _program, static, arguments
    )
    return lowered, state, traced


def _export_key(cache_key):
    # The compile-cache key in a form whose repr is the same in every
    # process (the tree structure as text).
    settings, treedef, shapes = cache_key
    return settings, str(treedef), shapes


def _stored_state(stored):
    # The zero start state of a stored sampler, from the shapes of its
    # first arguments (the state's leaves) and the tree of its first result.
    state_tree = stored.out_tree.children()[0]
    avals = stored.exported.in_avals[: state_tree.num_leaves]
    zeros = [np.zeros(aval.shape, aval.dtype) for aval in avals]
    return jax.tree_util.tree_unflatten(state_tree, zeros)


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
    :func:`hiermask._xla.exclusive`).

    Parameters
    ----------
    compiled : callable
        The program ``run_part`` runs (what :func:`hiermask._xla.exclusive`
        returned).
    run_part : callable
    parts : list

    Returns
    -------
    list
        The results, in the order of ``parts``.
    """
    n_threads = 1 if runs_alone(compiled) else _threads(len(parts))
    if n_threads == 1:
        return [run_part(part) for part in parts]
    with concurrent.futures.ThreadPoolExecutor(n_threads) as pool:
        return list(pool.map(run_part, parts))


class _Part(NamedTuple):
    # What one part's program is called with, besides the chain state.
    index: int
    segments: list  # of _nuts.Iterations
    start_key: np.ndarray  # (4,) uint32


def _run_part(program, state, part, data, hyper, keep, report):
    # Run one part's segments in turn, carrying the chain state; returns
    # the values and statistics of the iterations in range(*keep), chains
    # first, and calls report(part index, iterations done) after each
    # segment. The statistics also hold each chain's warmup leapfrog steps.
    kept, warmup_steps = [], 0
    with jax.enable_x64(True):  # the setting is per thread
        for iterations in part.segments:
            state, values, stats = program(
                state, iterations, part.start_key, data, hyper
            )
            jax.block_until_ready(state)
            first = int(iterations.index[0])
            lo, hi = (
                max(keep[0] - first, 0),
                min(keep[1] - first, len(iterations.index)),
            )
            warm = np.asarray(stats["n_steps"])[:, :lo]  # iterations before keep
            warmup_steps = warmup_steps + warm.sum(axis=1, dtype=np.int64)
            if lo < hi:
                kept.append(
                    jax.tree_util.tree_map(
                        lambda a, lo=lo, hi=hi: np.asarray(a)[:, lo:hi],
                        (values, stats),
                    )
                )
            report(part.index, min(int(iterations.index[-1]), keep[1] - 1))
    values, stats = jax.tree_util.tree_map(lambda *a: np.concatenate(a, axis=1), *kept)
    return values, {**stats, "warmup_steps": warmup_steps}


def _run_parts(compiled, parts, data, hyper, keep, progress):
    # Run the parts in threads; returns their results and the seconds.
    # progress: a _ProgressBar or None.
    program, state = compiled
    report = progress.update if progress is not None else lambda part, done: None

    def run_part(part):
        return _run_part(program, state, part, data, hyper, keep, report)

    start = time.perf_counter()
    try:
        results = map_parts(program, run_part, parts)
    finally:
        if progress is not None:
            progress.close()
    return results, time.perf_counter() - start


def _gather(results):
    # The parts' values (as float64) and statistics, chains concatenated.
    def gather(index):
        return {
            k: np.concatenate([np.asarray(r[index][k]) for r in results])
            for k in results[0][index]
        }

    return {k: v.astype(np.float64) for k, v in gather(0).items()}, gather(1)


def run_nuts(
    engine,
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
    """Run hiermask's NUTS on ``engine.density(data, hyper)`` in float64.

    Parameters
    ----------
    engine : hashable
        An engine (:class:`hiermask._collapsed.CollapsedEngine`,
        :class:`hiermask._model.DirectEngine`): the runner calls only its
        ``density(data, hyper)``, while tracing. Equal engines share
        compiled programs.
    data, hyper : pytrees of NumPy arrays
        The density's arguments (traced).
    seed_value : int
        Seed of the run.
    num_warmup, num_samples, num_chains : int
        Run length.
    target_accept_prob : float
        Step-size adaptation target.
    max_tree_depth : int, default=10
        NUTS tree-depth cap.
    progress_bar : bool or "auto", default=False
        Show a progress bar (tqdm, on stderr) of the iterations of all
        chains, updated after each segment (the segments are the same
        without it, so the bar cannot change the draws); ``"auto"``: only
        once the run is projected to take at least
        :data:`AUTO_PROGRESS_SECONDS`.
    before_compile : callable, optional
        Called without arguments once the sampler is traced, before XLA
        compiles it (or at once when a compiled program is reused): the
        caller can start other work that overlaps the compilation.

    Returns
    -------
    RunResult
    """
    key_data = _nuts.key_data(
        seed_value, num_chains, num_warmup, num_samples, max_tree_depth
    )
    data_size = sum(math.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(data))
    per_part, n_parts = _chain_parts(int(num_chains), data_size)
    static = {
        "engine": engine,
        "num_chains": per_part,
        "target_accept_prob": float(target_accept_prob),
        "max_tree_depth": int(max_tree_depth),
        "limits": _limits.current(),
    }
    timings = dict.fromkeys(("trace", "compile", "run"), 0.0)
    # Chains in lockstep use the rows of their part's first chain.
    parts = [
        _Part(
            i,
            _nuts.segments(key_data[i * per_part], num_warmup, num_samples),
            key_data[i * per_part, 0, 1],
        )
        for i in range(n_parts)
    ]
    with jax.enable_x64(True):
        # NumPy arguments: the compiled program transfers them (jnp.asarray
        # would compile a small conversion program per shape on first use).
        data, hyper = jax.tree_util.tree_map(np.asarray, (data, hyper))
        args = (parts[0].segments[0], parts[0].start_key, data, hyper)
        compiled = _compiled_program(args, static, timings, before_compile)
        progress = None
        if progress_bar:
            after = AUTO_PROGRESS_SECONDS if progress_bar == "auto" else None
            progress = _ProgressBar(per_part, n_parts, num_warmup, num_samples, after)
        keep = (num_warmup + 1, num_warmup + num_samples + 1)
        results, timings["run"] = _run_parts(
            compiled, parts, data, hyper, keep, progress
        )
        values, stats = _gather(results)
    return RunResult(values, stats, timings, traced=timings["trace"] > 0.0)
