"""Counts JAX's persistent-cache events in the process that imports it.

Imported by a loky worker when it unpickles the scorers below, before the
worker fits: the scorers then report, per fitted estimator, the worker's
process id, whether the fit traced the sampler, and the worker's cache hits
and misses so far.
"""

import collections
import os

import jax

EVENTS = collections.Counter()
jax.monitoring.register_event_listener(lambda event, **kwargs: EVENTS.update([event]))


def pid(est, X, y):
    return os.getpid()


def traced(est, X, y):
    return float(est._fitted.posterior.timings["trace"] > 0)


def cache_hits(est, X, y):
    return EVENTS["/jax/compilation_cache/cache_hits"]


def cache_misses(est, X, y):
    return EVENTS["/jax/compilation_cache/cache_misses"]


SCORING = {f.__name__: f for f in (pid, traced, cache_hits, cache_misses)}
