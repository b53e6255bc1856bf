"""The NUTS runner: compile cache, chains on threads, progress.

The runner knows an engine only through its density
(``engine.density(data, hyper) -> FlatDensity``, see
:mod:`hiermask._density`). The whole run of a set of chains (starting
points, warmup, sampling; :func:`hiermask._nuts.sample`) is one XLA program,
so there is no per-iteration Python overhead. Small models run pairs of
chains in lockstep per program (every kernel serves both: on a CPU a small
model's cost is the number of kernels run, not their size), large ones one
chain per program; the programs of a run are executed by threads, one per
CPU this process may use (XLA releases the GIL), so chains run in parallel.
The split depends only on the run, never on the machine: a seed gives the
same draws everywhere.

Compiled programs are cached per static configuration (engine, numbers of
warmup and draws, chains, target acceptance, size thresholds) and per shape
of the data; prior scales and data values are arguments, so refits with
other prior scales or other rows of the same shape reuse the program
(:func:`cache_info` counts them). Everything runs in float64 inside a scoped
``jax.enable_x64(True)`` and with per-compilation XLA options
(:func:`hiermask._xla.compiler_options`); the user's global configuration is
untouched.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
import math
import os
import threading
import time
from typing import NamedTuple

import jax
import numpy as np

from . import _limits, _nuts
from ._xla import compiler_options, exclusive, runs_alone

__all__ = ["CacheInfo", "RunResult", "cache_info", "map_parts", "run_nuts"]


class RunResult(NamedTuple):
    """What :func:`run_nuts` returns.

    Attributes
    ----------
    values : dict of ndarray of shape (num_chains, num_samples, ...)
        Constrained draws of every reported site.
    stats : dict of ndarray of shape (num_chains, num_samples)
        ``diverging``, ``n_steps`` (leapfrog steps) and ``accept_prob``.
    timings : dict
        Seconds: ``trace`` (tracing and lowering, 0 when the compiled
        program was reused), ``compile`` (XLA, 0 likewise) and ``run``.
    traced : bool
        Whether the sampler was traced for this run (no reuse).
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
    # Compiled sampler programs (through exclusive), most recently used
    # last, with hit and miss counts: the package's one compile cache.
    def __init__(self, max_size):
        self.programs = collections.OrderedDict()
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


_CACHE = _ProgramCache(16)


def cache_info():
    """Hits, misses and size of the sampler's compile cache.

    Returns
    -------
    CacheInfo
    """
    return CacheInfo(_CACHE.hits, _CACHE.misses, len(_CACHE.programs))


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


def _progress_reporter(progress_token, n_iterations):
    # on_iteration for _nuts.sample: a host callback about _PROGRESS_UPDATES
    # times per run, only with a positive (traced) token, so that one
    # compiled program serves runs with and without a bar.
    every = max(1, n_iterations // _PROGRESS_UPDATES)
    token, part = progress_token[0], progress_token[1]

    def on_iteration(i):
        jax.lax.cond(
            (token > 0) & ((i % every == 0) | (i == n_iterations)),
            lambda: jax.debug.callback(_progress_tick, token, part, i),
            lambda: None,
        )

    return on_iteration


@functools.partial(
    jax.jit,
    static_argnames=(
        "engine",
        "num_warmup",
        "num_samples",
        "num_chains",
        "target_accept_prob",
        "max_tree_depth",
        "limits",
    ),
)
def _program(
    key_data,
    data,
    hyper,
    progress_token,
    *,
    engine,
    num_warmup,
    num_samples,
    num_chains,
    target_accept_prob,
    max_tree_depth,
    limits,
):
    # One compiled program: the chains of one part, in lockstep.
    del limits  # read from _limits while tracing; a part of the cache key
    density = engine.density(data, hyper)
    unit = _nuts.uniform(key_data[0, 0, 1], (num_chains, density.size))
    z, diverging, n_steps, accept = _nuts.sample(
        density,
        key_data[0],
        density.initial_points(unit),
        num_warmup=num_warmup,
        num_samples=num_samples,
        target_accept_prob=target_accept_prob,
        max_tree_depth=max_tree_depth,
        on_iteration=_progress_reporter(progress_token, num_warmup + num_samples),
    )
    values = jax.vmap(jax.vmap(density.constrain))(z)
    stats = {"diverging": diverging, "n_steps": n_steps, "accept_prob": accept}
    return values, stats


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
    # cache or compiled now (recording trace and compile times);
    # before_compile() runs once the program is traced (or found).
    leaves, treedef = jax.tree_util.tree_flatten(args)
    cache_key = (
        tuple(sorted(static.items(), key=lambda item: item[0])),
        treedef,
        tuple((leaf.shape, leaf.dtype) for leaf in leaves),
    )
    compiled = _CACHE.get(cache_key)
    if compiled is None:
        start = time.perf_counter()
        lowered = _program.lower(*args, **static)
        timings["trace"] = time.perf_counter() - start
        before_compile()
        start = time.perf_counter()
        compiled = exclusive(lowered.compile(compiler_options()))
        timings["compile"] = time.perf_counter() - start
        _CACHE.put(cache_key, compiled)
    else:
        before_compile()
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


def _run_parts(compiled, parts, bar, token):
    # Run the parts' programs (with the progress bar registered under
    # token when it is positive); returns their results and the seconds.
    def run_part(part_args):
        with jax.enable_x64(True):  # the setting is per thread
            return jax.block_until_ready(compiled(*part_args))

    start = time.perf_counter()
    if token:
        _PROGRESS[token] = bar.update
    try:
        results = map_parts(compiled, run_part, parts)
    finally:
        _PROGRESS.pop(token, None)
        bar.close()
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
    progress_bar : bool, default=False
        Show a progress bar (tqdm, on stderr) of the iterations of all
        chains; the program reports to the host about ``_PROGRESS_UPDATES``
        times per chain (the same compiled program runs without reports when
        it is off, so the bar cannot change the draws).
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
        "num_warmup": int(num_warmup),
        "num_samples": int(num_samples),
        "num_chains": per_part,
        "target_accept_prob": float(target_accept_prob),
        "max_tree_depth": int(max_tree_depth),
        "limits": _limits.current(),
    }
    timings = dict.fromkeys(("trace", "compile", "run"), 0.0)
    # Token 0: no progress reports.
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
        bar = _ProgressBar(per_part, n_parts, num_warmup, num_samples)
        results, timings["run"] = _run_parts(compiled, parts, bar, token)
        values, stats = _gather(results)
    return RunResult(values, stats, timings, traced=timings["trace"] > 0.0)
