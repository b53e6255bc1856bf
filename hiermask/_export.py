"""Traced programs kept on disk beside JAX's persistent compilation cache.

JAX's persistent cache (:func:`hiermask.enable_compilation_cache`) stores
compiled programs, but a new process must still trace and lower a program
before JAX can look it up, and tracing the sampler takes longer than loading
it. So, while that cache is on (``jax_compilation_cache_dir`` is set), the
package's programs are exported (:func:`jax.export.export`) the first time
they are traced, and written to the folder ``hiermask-exported`` inside
JAX's cache folder; a new process reads the exported program back and
lowers a call of it (:meth:`jax.export.Exported.call`), which traces none
of hiermask's code, and JAX then loads the compiled program from its cache.

A file's name holds a digest of its key and the file holds the key itself:
everything the package's in-memory compile cache keys on (static settings,
size thresholds, the arguments' tree structure, shapes and dtypes), plus
hiermask's version and a digest of its source, the versions of jax, jaxlib
and numpyro, the backend and JAX's options that change a trace. A file that
cannot be read, does not match its key or its checksum counts as absent:
the program is traced again and the file overwritten (atomically, as
parallel workers may write it at once). Data and prior scales are arguments
of the exported program, never constants of it; with the cache off nothing
is read or written. Everything here runs in the caller's scoped
configuration (float64 inside ``jax.enable_x64(True)``); JAX's global
configuration is never changed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import tempfile
from importlib import import_module, metadata
from pathlib import Path
from typing import NamedTuple

import jax

__all__ = ["Stored", "load", "lower", "lowered", "path", "store"]

#: The folder of the exported programs, inside JAX's cache folder.
SUBFOLDER = "hiermask-exported"

#: The first bytes of a file (a new layout takes a new number).
_MAGIC = b"hiermask-export 1\n"

#: JAX options that change what a trace gives, when the jax in use does not
#: list them itself (``trace_context_names``).
_TRACE_OPTIONS = (
    "jax_enable_x64",
    "jax_default_matmul_precision",
    "jax_numpy_rank_promotion",
    "jax_numpy_dtype_promotion",
    "jax_threefry_partitionable",
    "jax_default_prng_impl",
    "jax_softmax_custom_jvp",
)


class Stored(NamedTuple):
    """An exported program and the tree structure of its results.

    The program takes and returns flat lists of arrays (its arguments'
    leaves in the order of ``jax.tree_util.tree_leaves((args, kwargs))``);
    ``out_tree`` rebuilds the results of the function that was exported.
    """

    exported: jax.export.Exported
    out_tree: jax.tree_util.PyTreeDef


def lowered(name, key, jitted, static, arguments):
    """``jitted`` lowered: read back from its stored program, or traced.

    While JAX's persistent cache is on, the program stored under ``name`` and
    ``key`` is read back and a call of it lowered (:func:`lower`); when there
    is none (or it does not fit), ``jitted`` is exported, stored and a call of
    it lowered; with the cache off, or when it cannot be exported, it is
    lowered as it always was: ``jitted.lower(*args, **kwargs, **static)``.

    Parameters
    ----------
    name : str
        The program's name (of its file, and of JAX's cache entry).
    key : tuple
        See :func:`path`.
    jitted : jax.stages.Wrapped
        A ``jax.jit`` function.
    static : dict
        Its static keyword arguments.
    arguments : callable
        Takes the stored program, or None when tracing, and returns the
        ``(args, kwargs)`` to lower ``fn`` or the stored program on.

    Returns
    -------
    lowered : jax.stages.Lowered
    args : tuple
        The positional arguments it was lowered on.
    traced : bool
        Whether ``fn`` was traced (not read back).
    """
    where = path(name, key)
    stored = load(where) if where is not None else None
    if stored is not None:
        try:
            args, kwargs = arguments(stored)
            return lower(stored, name, args, kwargs), args, False
        except Exception:  # a program that does not fit after all: trace
            pass
    args, kwargs = arguments(None)
    if where is not None:
        try:
            fn = functools.partial(jitted, **static)
            stored = store(where, fn, args, kwargs)
            return lower(stored, name, args, kwargs), args, True
        except Exception:  # not exportable: lowered directly, not stored
            pass
    return jitted.lower(*args, **kwargs, **static), args, True


def path(name, key):
    """Where the program ``name`` with this key is stored, or None.

    Parameters
    ----------
    name : str
        The program's name (a prefix of the file's name).
    key : tuple
        Everything the traced program depends on (the in-memory cache key);
        its ``repr`` must not depend on the process.

    Returns
    -------
    (pathlib.Path, str) or None
        The file and the full key text it must hold; None while JAX's
        persistent cache is off (nothing is then read or written).
    """
    folder = jax.config.jax_compilation_cache_dir
    if not folder or "://" in str(folder):  # off, or not a local folder
        return None
    if not jax.config.jax_enable_compilation_cache or not _serializable():
        return None
    text = repr((_environment(), _trace_options(), name, key))
    digest = hashlib.sha256(text.encode()).hexdigest()[:40]
    return Path(folder) / SUBFOLDER / f"{name}-{digest}.jaxexport", text


@functools.cache
def _serializable():
    # Whether exported programs can be written and read: jax.export's
    # serialization needs the flatbuffers package (a dependency of hiermask;
    # without it programs are traced in every process, as without the cache).
    return importlib.util.find_spec("flatbuffers") is not None


@functools.cache
def _environment():
    # What a stored program depends on besides its key, fixed per process.
    import jaxlib

    import hiermask

    source = hashlib.sha256()
    package = Path(hiermask.__file__).parent
    for file in sorted(package.rglob("*.py")):
        source.update(file.relative_to(package).as_posix().encode() + b"\0")
        source.update(file.read_bytes())
    try:
        numpyro = metadata.version("numpyro")
    except metadata.PackageNotFoundError:  # pragma: no cover
        numpyro = None
    return (
        hiermask.__version__,
        source.hexdigest(),
        jax.__version__,
        jaxlib.__version__,
        numpyro,
        jax.default_backend(),
    )


def _trace_options():
    # The values of JAX's options that change a trace (scoped ones included).
    try:
        from jax._src.config import trace_context_names

        names = [n for n in trace_context_names() if n.startswith("jax_")]
    except Exception:  # another jax: the usual suspects
        names = _TRACE_OPTIONS
    values = []
    for name in names:
        try:
            values.append((name, repr(getattr(jax.config, name))))
        except AttributeError:
            continue
    return tuple(values)


def load(where):
    """The stored program at ``where`` (from :func:`path`), or None.

    None when the file is missing, unreadable, of another layout, holds
    another key or fails its checksum: the caller then traces again.

    Parameters
    ----------
    where : (pathlib.Path, str)

    Returns
    -------
    Stored or None
    """
    file, text = where
    try:
        blob = file.read_bytes()
        if not blob.startswith(_MAGIC):
            return None
        start = len(_MAGIC) + 8
        size = int.from_bytes(blob[len(_MAGIC) : start], "little")
        header = json.loads(blob[start : start + size])
        payload = blob[start + size :]
        if header["key"] != text or header["sha256"] != _sha256(payload):
            return None
        exported = jax.export.deserialize(bytearray(payload))
        return Stored(exported, _decode_tree(header["out_tree"]))
    except Exception:  # whatever is wrong with the file: trace again
        return None


def store(where, fn, args, kwargs):
    """Export ``fn(*args, **kwargs)``, write it to ``where`` and read it back.

    A file that cannot be written is skipped silently (the program is still
    returned); a program that cannot be exported raises.

    Parameters
    ----------
    where : (pathlib.Path, str)
        From :func:`path`.
    fn : callable
        Takes ``args`` and ``kwargs`` (pytrees of arrays or
        ``jax.ShapeDtypeStruct``; static settings bound already) and returns a
        pytree of arrays.
    args : tuple
    kwargs : dict

    Returns
    -------
    Stored
        As :func:`load` would read it (deserialized from the bytes written,
        so that a program lowered from it is the one a later process lowers).
    """
    leaves, in_tree = jax.tree_util.tree_flatten((args, kwargs))
    out_trees = []

    def flat(*xs):
        a, k = jax.tree_util.tree_unflatten(in_tree, xs)
        results, out_tree = jax.tree_util.tree_flatten(fn(*a, **k))
        out_trees.append(out_tree)
        return results

    specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    payload = bytes(jax.export.export(jax.jit(flat))(*specs).serialize())
    _write(where, payload, out_trees[0])
    return Stored(jax.export.deserialize(bytearray(payload)), out_trees[0])


def _write(where, payload, out_tree):
    # The file, written to a temporary file in its folder and moved in place.
    file, text = where
    header = json.dumps(
        {"key": text, "sha256": _sha256(payload), "out_tree": _encode_tree(out_tree)}
    ).encode()
    blob = _MAGIC + len(header).to_bytes(8, "little") + header + payload
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=file.parent, prefix=".tmp-")
    except OSError:  # a read-only cache: the program is used unsaved
        return
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # as JAX's cache entries, not 0o600
            f.write(blob)
        os.replace(temporary, file)
    except OSError:
        Path(temporary).unlink(missing_ok=True)


def lower(stored, name, args, kwargs):
    """Lower a call of the stored program on ``args`` and ``kwargs``.

    Traces no code of hiermask's: the jitted function only calls the
    exported program. Its name is ``name``, which JAX's cache entries take.

    Parameters
    ----------
    stored : Stored
    name : str
    args : tuple
    kwargs : dict

    Returns
    -------
    jax.stages.Lowered
        Compiles (``.compile(options)``) to a program called as
        ``compiled(*args, **kwargs)`` that returns the exported function's
        results with their tree structure.
    """

    def call(*a, **k):
        results = stored.exported.call(*jax.tree_util.tree_leaves((a, k)))
        return jax.tree_util.tree_unflatten(stored.out_tree, results)

    call.__name__ = call.__qualname__ = name
    return jax.jit(call).lower(*args, **kwargs)


def _sha256(payload):
    return hashlib.sha256(payload).hexdigest()


def _encode_tree(tree):
    # A tree structure of tuples, lists, dicts with str keys, None and
    # hiermask's named tuples, as JSON.
    data = tree.node_data()
    if data is None:
        return "*"
    kind, aux = data
    children = [_encode_tree(child) for child in tree.children()]
    if kind is type(None):
        return None
    if kind in (tuple, list):
        return {kind.__name__: children}
    if kind is dict and all(isinstance(k, str) for k in aux):
        return {"dict": list(aux), "of": children}
    if issubclass(kind, tuple) and kind.__module__.startswith("hiermask."):
        return {"namedtuple": f"{kind.__module__}:{kind.__qualname__}", "of": children}
    raise TypeError(f"cannot store a tree with a node of type {kind!r}")


def _decode_tree(encoded):
    return jax.tree_util.tree_structure(_skeleton(encoded))


def _skeleton(encoded):
    # An object of the encoded structure, with 0 for every leaf.
    if encoded == "*":
        return 0
    if encoded is None:
        return None
    if "tuple" in encoded or "list" in encoded:
        kind = tuple if "tuple" in encoded else list
        return kind(_skeleton(child) for child in encoded[kind.__name__])
    children = [_skeleton(child) for child in encoded["of"]]
    if "dict" in encoded:
        return dict(zip(encoded["dict"], children, strict=True))
    module, name = encoded["namedtuple"].split(":")
    if not module.startswith("hiermask."):
        raise ValueError(f"not hiermask's type: {module}")
    return getattr(import_module(module), name)(*children)
