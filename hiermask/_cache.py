"""JAX's persistent compilation cache, turned on where the user asks for it.

The library never changes JAX's global configuration by itself; the command
line turns the cache on (it owns its process), and a user turns it on in a
notebook or script with :func:`enable_compilation_cache`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: Environment variable that turns the command line's cache off when set to
#: a non-empty value other than "0".
NO_CACHE_ENV = "HIERMASK_NO_CACHE"

#: The JAX options :func:`enable_compilation_cache` sets.
_OPTIONS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


def default_cache_dir() -> Path:
    """The per-user cache folder of hiermask's compiled programs.

    ``$XDG_CACHE_HOME/hiermask/jax`` (``~/.cache/hiermask/jax`` when unset)
    on Linux, ``~/Library/Caches/hiermask/jax`` on macOS and
    ``%LOCALAPPDATA%\\hiermask\\jax`` on Windows: the locations ``platformdirs``
    gives.

    Returns
    -------
    pathlib.Path
    """
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData/Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "hiermask" / "jax"


def cache_disabled_by_env() -> bool:
    """Whether ``HIERMASK_NO_CACHE`` asks the command line not to cache."""
    return os.environ.get(NO_CACHE_ENV, "") not in ("", "0")


def enable_compilation_cache(path=None) -> dict:
    """Turn on JAX's persistent compilation cache for this process and its children.

    hiermask's programs are cached per shape in memory; with this cache they
    are also written to disk, so that a new process (a restarted notebook, a
    ``GridSearchCV(n_jobs=...)`` worker, the next ``hiermask`` command) loads
    them instead of compiling them again. Beside them, in the folder
    ``hiermask-exported``, hiermask keeps its traced programs
    (:func:`jax.export.export`), so that a new process does not trace them
    either. This changes JAX's global
    configuration for the whole process (every JAX program is then cached,
    not only hiermask's): ``jax_compilation_cache_dir`` is set to ``path``,
    and ``jax_persistent_cache_min_compile_time_secs`` and
    ``jax_persistent_cache_min_entry_size_bytes`` to 0 (cache every
    program, however fast it compiled), from the next compilation on (also
    after earlier ones in this process). It also sets the environment
    variables of the same options (``JAX_COMPILATION_CACHE_DIR``, ...), so
    that processes started from this one afterwards (the loky workers of
    ``GridSearchCV(n_jobs=...)`` or ``cross_val_score(n_jobs=...)``) use the
    same cache. hiermask never calls this by itself.

    Parameters
    ----------
    path : str or os.PathLike, default=None
        Cache folder, created if missing; None: :func:`default_cache_dir`.

    Returns
    -------
    dict
        The previous values of the three options and of the three
        environment variables (None where unset): pass it to
        :func:`restore_compilation_cache` to undo.

    Examples
    --------
    >>> import tempfile
    >>> import hiermask
    >>> previous = hiermask.enable_compilation_cache(tempfile.mkdtemp())
    >>> hiermask.restore_compilation_cache(previous)
    """
    import jax

    folder = Path(default_cache_dir() if path is None else path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    previous = {name: getattr(jax.config, name) for name in _OPTIONS}
    previous.update({name.upper(): os.environ.get(name.upper()) for name in _OPTIONS})
    values = (str(folder), 0.0, 0)
    for name, value in zip(_OPTIONS, values, strict=True):
        jax.config.update(name, value)
        os.environ[name.upper()] = str(value)
    _reset_jax_cache()
    return previous


def _reset_jax_cache():
    # JAX decides whether to use its persistent cache at the process's first
    # compilation and keeps that decision: reset it, so that the new settings
    # hold from the next compilation on, even after earlier ones.
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()


def restore_compilation_cache(previous) -> None:
    """Undo :func:`enable_compilation_cache`.

    Parameters
    ----------
    previous : dict
        What :func:`enable_compilation_cache` returned: JAX's options and
        the environment variables get these values back (an environment
        variable that was unset is removed).

    Examples
    --------
    >>> import tempfile
    >>> import jax
    >>> import hiermask
    >>> before = jax.config.jax_compilation_cache_dir
    >>> previous = hiermask.enable_compilation_cache(tempfile.mkdtemp())
    >>> hiermask.restore_compilation_cache(previous)
    >>> jax.config.jax_compilation_cache_dir == before
    True
    """
    import jax

    for name in _OPTIONS:
        jax.config.update(name, previous[name])
        value = previous[name.upper()]
        if value is None:
            os.environ.pop(name.upper(), None)
        else:
            os.environ[name.upper()] = value
    _reset_jax_cache()
