"""Compiled executables kept on disk under a key of what determines them: a warm call skips
tracing, lowering and the compile-cache lookup.

JAX's persistent compilation cache (:mod:`.compile_cache`) saves the XLA compile, but
every process still traces and lowers each function before it can look the executable
up: 0.08 s of tracing and 0.11 s of lowering per t-grid function of grazzi2020, before the
cached executable loads in 0.04 s; that was half of a warm sweep's actor time. Here the
executable is keyed before tracing, by

* the function (module and name) and its static arguments (their ``repr``, which must
  not hold a memory address, else the call is not stored),
* the tree structure and abstract values (shape, dtype, weak type, device) of the others,
* the source of the package's algorithms and problems (what can be traced;
  :data:`TRACED_FOLDERS`), of the wrapped function's module and of a problem module
  named in the static arguments (a plugin's): an edit to that code is a miss, never a
  stale hit,
* JAX and jaxlib versions, the backend (platform and its version, device kind), the
  host CPU's model and feature flags (XLA:CPU code is compiled for them), the JAX
  settings that change lowering (x64, default matmul precision) and ``$XLA_FLAGS``,

and a hit is ``jax.experimental.serialize_executable.deserialize_and_load``: 16–22 ms
for a grazzi2020 grid function, against 0.17 s through the persistent cache.

Misses compile *fresh*. An executable that JAX itself loaded from its persistent cache
cannot be serialized again with JAX 0.10 (the copy loads, then fails at its first run with
``NOT_FOUND: Function wrapped_exponential not found``), so a miss here compiles with the
persistent cache's reads turned off in this thread (:func:`.compile_cache.fresh_reads_off`,
our ``AtomicFileCache``); with JAX's own cache (``jax_compilation_cache_max_size`` set)
that is not possible, and an executable that came from it is used but not stored.

Entries live in ``<cache dir>/executables/`` (the cache dir of :mod:`.compile_cache`, so
``HYPERSWEEP_CACHE_DIR=off`` turns this off too), written to a temporary file and renamed
into place (concurrent writers: one whole entry wins). An entry that cannot be read or
loaded (truncated, another JAX) is logged, compiled again and replaced. Loads count as
compile time (:func:`.ops.compile_seconds` adds ``COUNTERS.load_seconds``) and as
compile-cache hits
(:func:`.compile_cache.counts`), so a row's ``compile_time_s`` and the summary's hit count
stay true.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import pickle
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax

from hypersweep.problems.jax import compile_cache

log = logging.getLogger(__name__)

#: Bumped when the entry layout changes.
FORMAT = 1
SUBDIR = "executables"
_SUFFIX = ".xla"
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # …/hypersweep


#: The package folders whose code a compiled function can contain (what is traced):
#: the algorithms and the problems (their math, ops and data layout).
TRACED_FOLDERS = ("algorithms", "problems")


@functools.cache
def _package_fingerprint() -> str:
    """sha256 over every ``.py`` file (path and bytes) of :data:`TRACED_FOLDERS` (an edit
    to the orchestrator, the pipelines, I/O or the CLI is no miss)."""
    digest = hashlib.sha256()
    files: list[Path] = []
    for folder in TRACED_FOLDERS:
        files += sorted((_PACKAGE_ROOT / folder).rglob("*.py"))
    for path in files:
        digest.update(str(path.relative_to(_PACKAGE_ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.cache
def _module_fingerprint(module_name: str) -> str:
    """sha256 of a module's source file ('' without one): the wrapped function's module
    and a problem module named in the static arguments (a plugin's, outside the package)."""
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return ""
    origin = getattr(spec, "origin", None)
    if not origin or not os.path.isfile(origin):
        return ""
    return hashlib.sha256(Path(origin).read_bytes()).hexdigest()


@functools.cache
def _host_cpu() -> str:
    """The CPU model and feature flags (XLA:CPU compiles for them)."""
    model = flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = value.strip()
            if model and flags:
                break
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{model}|{flags}"


@functools.cache
def _installation(platform_name: str) -> tuple:
    import jaxlib

    device = jax.devices(platform_name)[0]
    return (FORMAT, jax.__version__, jaxlib.__version__, sys.version_info[:2],
            device.client.platform, device.client.platform_version, device.device_kind,
            _host_cpu() if platform_name == "cpu" else "", _package_fingerprint())


def _environment(platform_name: str) -> tuple:
    """What besides the call decides the executable (settings read per call: they can
    change within a process)."""
    return (_installation(platform_name), bool(jax.config.jax_enable_x64),
            str(jax.config.jax_default_matmul_precision), os.environ.get("XLA_FLAGS", ""))


def _static_repr(value: Any) -> str | None:
    """A process-independent description of a static argument, or None."""
    text = repr(value)
    if " at 0x" in text or "object at" in text:
        return None
    module_name = getattr(value, "module_name", None)
    if isinstance(module_name, str):
        text += "|" + _module_fingerprint(module_name)
    return text


def _leaf(x) -> tuple:
    devices = getattr(x, "devices", None)
    if callable(devices):
        try:
            ids = tuple(sorted((d.platform, d.id) for d in devices()))
        except Exception:  # noqa: BLE001 - a tracer or an exotic array: no device
            ids = ()
        return ("array", tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)),
                ids)
    if hasattr(x, "shape") and hasattr(x, "dtype"):  # numpy
        return ("host", tuple(x.shape), str(x.dtype))
    return ("py", type(x).__name__)


class _Counters:
    def __init__(self):
        self.loads = 0
        self.stores = 0
        self.load_seconds = 0.0
        self.failures = 0


COUNTERS = _Counters()
_LOCK = threading.Lock()


def store_dir() -> Path | None:
    """``<compile cache dir>/executables``, or None when the cache is off."""
    base = compile_cache.ensure()
    return None if base is None else base / SUBDIR


def cached(jitted: Callable, *, static_argnames: tuple[str, ...]) -> Callable:
    """Wrap ``jitted`` (a ``jax.jit`` of a function whose leading positional arguments
    are the ``static_argnames``, passed positionally) so that its executables are kept
    in memory and on disk (module docstring). Falls back to ``jitted`` itself when the
    store is off, a static argument has no stable description, or an argument is not
    on one device of its platform (tracers included)."""
    n_static = len(static_argnames)
    module = getattr(jitted, "__module__", None) or ""
    name = f"{module}:{getattr(jitted, '__qualname__', '?')}"
    memo: dict[tuple, Any] = {}

    @functools.wraps(jitted)
    def call(*args):
        static, dynamic = args[:n_static], args[n_static:]
        leaves, tree = jax.tree_util.tree_flatten(dynamic)
        try:
            key = (static, tree, tuple(_leaf(x) for x in leaves))
            compiled = memo.get(key)
        except TypeError:  # an unhashable static argument: let jit say so
            return jitted(*args)
        if compiled is None:
            compiled = _obtain(jitted, name, args, static, key)
            if compiled is None:
                return jitted(*args)
            memo[key] = compiled
        return compiled(*dynamic)

    call.memo = memo  # type: ignore[attr-defined]
    return call


def _platform(key_leaves) -> str | None:
    platforms = {p for leaf in key_leaves if leaf[0] == "array" for p, _ in leaf[4]}
    ids = {leaf[4] for leaf in key_leaves if leaf[0] == "array"}
    if len(platforms) != 1 or len(ids) != 1 or len(next(iter(ids))) != 1:
        return None  # mixed or multi-device arguments: not this store's business
    return platforms.pop()


def _obtain(jitted, name: str, args, static, key) -> Any | None:
    """The compiled executable for this call from disk, else compiled fresh and stored;
    None when this call is not for the store."""
    directory = store_dir()
    if directory is None:
        return None
    platform_name = _platform(key[2])
    descriptions = [_static_repr(v) for v in static]
    if platform_name is None or any(d is None for d in descriptions):
        return None
    module = name.partition(":")[0]
    text = repr((_environment(platform_name), name, _module_fingerprint(module),
                 descriptions, str(key[1]), key[2]))
    digest = hashlib.sha256(text.encode()).hexdigest()
    path = directory / f"{digest}{_SUFFIX}"
    loaded = _load(path)
    if loaded is not None:
        return loaded
    return _compile_and_store(jitted, args, path)


def _load(path: Path) -> Any | None:
    from jax.experimental.serialize_executable import deserialize_and_load

    start = time.perf_counter()
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("executable %s not read (%s); compiling", path.name, exc)
        return None
    try:
        payload, in_tree, out_tree = pickle.loads(blob)
        compiled = deserialize_and_load(payload, in_tree, out_tree)
    except Exception as exc:  # noqa: BLE001 - a bad entry costs a compile, never a run
        with _LOCK:
            COUNTERS.failures += 1
        log.warning("executable %s not loaded (%s: %s); compiling it again", path.name,
                    type(exc).__name__, exc)
        return None
    seconds = time.perf_counter() - start
    with _LOCK:
        COUNTERS.loads += 1
        COUNTERS.load_seconds += seconds
    compile_cache.record_hit()
    return compiled


def _compile_and_store(jitted, args, path: Path) -> Any:
    from jax.experimental.serialize_executable import serialize

    before = compile_cache.counts()
    with compile_cache.fresh_reads_off():
        compiled = jitted.lower(*args).compile()
    after = compile_cache.counts()
    if before is not None and after is not None and after[0] > before[0]:
        # served by JAX's own persistent cache after all: usable, not re-serializable
        return compiled
    try:
        blob = pickle.dumps(serialize(compiled), protocol=pickle.HIGHEST_PROTOCOL)
        path.parent.mkdir(parents=True, exist_ok=True)
        compile_cache.write_atomic(path, blob)  # replaces a damaged entry too
        with _LOCK:
            COUNTERS.stores += 1
    except Exception as exc:  # noqa: BLE001 - not stored costs the next process a compile
        log.warning("executable %s not stored: %s", path.name, exc)
    return compiled


__all__ = ["cached", "store_dir", "COUNTERS", "FORMAT", "SUBDIR"]
