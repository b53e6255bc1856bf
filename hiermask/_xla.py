"""XLA and jaxlib workarounds, each with its reason.

Two behaviours of the compiler and of jaxlib that the sampler's programs work
around; the mathematics never depends on them. Nothing here runs at import:
the compiler options are probed on first use (``import hiermask`` compiles
nothing and does not start JAX's backend). Measurements behind both are in
``docs/performance.md``.
"""

from __future__ import annotations

import functools
import math
import re
import threading

import jax
import numpy as np

__all__ = ["compiler_options", "exclusive", "runs_alone"]

#: XLA options wanted for this package's programs (``compiler_options`` keeps
#: those this jaxlib knows). On a CPU the newer fusion emitters compile the
#: many small kernels of a sampler two to three times slower than the
#: classic elemental emitters, for the same speed; the YNNPACK offload of
#: reductions runs the per-group reductions of the collapsed density several
#: times slower than XLA's own loops (jax/jaxlib 0.10.2).
_WANTED_OPTIONS = (
    ("xla_cpu_use_fusion_emitters", False),
    ("xla_cpu_experimental_ynn_fusion_type", ""),
)

#: Held while a program that calls LAPACK on a batch runs (see
#: :func:`exclusive`).
_LAPACK_LOCK = threading.Lock()


@functools.cache
def _supported_options():
    # The subset of the wanted options this jaxlib knows (names change
    # between releases; an unknown one would make every compilation fail).
    probe = jax.jit(lambda x: x + 1.0).lower(np.zeros(2))
    supported = {}
    for name, value in _WANTED_OPTIONS:
        try:
            probe.compile({name: value})
        except Exception:  # any refusal means: leave it out
            continue
        supported[name] = value
    return tuple(supported.items())


def compiler_options():
    """XLA options for this package's programs, scoped to each compilation.

    Computed on first use (it compiles a probe program) and then reused; the
    user's global JAX configuration is untouched.

    Returns
    -------
    dict
        Options for ``jax.stages.Lowered.compile``.
    """
    return dict(_supported_options())


class _Exclusive:
    # A compiled program run under _LAPACK_LOCK, to completion.
    def __init__(self, compiled):
        self.compiled = compiled

    def __call__(self, *args, **kwargs):
        with _LAPACK_LOCK:
            return jax.block_until_ready(self.compiled(*args, **kwargs))


def exclusive(compiled):
    """The compiled program, made to run alone if it calls LAPACK on a batch.

    jaxlib's CPU LAPACK kernels (Cholesky, triangular solves) split a batch
    of matrices over XLA's intra-op thread pool and wait for the parts. Two
    programs doing so at once (parallel chains, or fits in threads) can
    leave every pool thread waiting for parts that no thread is free to run:
    a deadlock, seen with jax and jaxlib 0.10.2 on a 2-CPU machine (batched
    Cholesky of 100 matrices of size 20 in a loop, in two threads; sizes
    4-17 did not hang; neither ``OPENBLAS_NUM_THREADS=1`` nor
    ``xla_cpu_multi_thread_eigen=False`` helped). Programs that call LAPACK
    on batches of matrices therefore hold a process-wide lock while they
    run; the others run freely. A single matrix is factorized in the calling
    thread and needs no lock.

    Parameters
    ----------
    compiled : jax.stages.Compiled

    Returns
    -------
    callable
        ``compiled`` itself, or a wrapper that runs it under the lock and
        blocks until its results are ready.
    """
    if any(math.prod(shape) > 1 for shape in _lapack_batches(compiled.as_text())):
        return _Exclusive(compiled)
    return compiled


def runs_alone(program):
    """Whether ``program`` (what :func:`exclusive` returned) runs under the lock.

    Parameters
    ----------
    program : callable

    Returns
    -------
    bool
    """
    return isinstance(program, _Exclusive)


def _lapack_batches(hlo_text):
    # The batch shape (all but the two matrix dimensions) of every LAPACK
    # call in a compiled program's HLO text.
    for match in re.finditer(
        r"= \(?[a-z]\d+\[([\d,]*)\][^\n]*custom_call_target=\"lapack_", hlo_text
    ):
        dims = [int(d) for d in match.group(1).split(",") if d]
        yield tuple(dims[:-2])
