"""JAX's persistent compilation cache, shared by every process of a study (on by default).

An actor compiles each (problem, algorithm, t-bucket) function once per process; with this
cache the second process, and every later run, loads the executable from disk instead of
compiling it again (XLA's compile is most of a small cell's cost).

Where: ``$HYPERSWEEP_CACHE_DIR`` if set, else ``~/.cache/hypersweep/jax``;
``HYPERSWEEP_CACHE_DIR=off`` (or ``0``, ``false``, ``none``, ``disabled``) turns it off. A
study's ``compile_cache: {enabled, dir}`` section sets the variable for its actors
(:func:`env_for`). Nothing happens at import: :func:`ensure` turns the cache on, once per
process, when a runner starts or a JAX problem is first built (``ops.resolve_device``).
Importing this module does not import JAX, so the orchestrator can read :func:`counts`.

Thresholds: every executable is written (``jax_persistent_cache_min_compile_time_secs =
0``, no minimum entry size): the functions of a sweep compile in 0.05–1 s each, under JAX's
default threshold of 1 s, and they are what the cache is for.

Concurrent writers. JAX 0.10's file cache (``jax._src.lru_cache.LRUCache`` without a size
limit) writes an entry with ``Path.write_bytes`` in place, after an ``exists()`` check and
without a lock: a second process can read the half-written file, and two processes writing
the same key at once can leave one's bytes followed by the tail of the other's (two
entries of one key may differ in length: each embeds its own compile time and
serialization), and a runner killed mid-write (``cell_timeout_s``, the memory watchdog)
leaves a truncated entry behind. So this module installs an ``AtomicFileCache``
(:func:`atomic_file_cache`), which reads and writes the same files (``<key>-cache``) but
writes each entry to a temporary file in the same folder and renames it into place: a
reader sees a whole entry or none, and of two writers one whole entry wins. When
``jax_compilation_cache_max_size`` is set, JAX's own cache (which then locks every read and
write with ``filelock``) is kept instead.

The folder also holds ``executables/`` (:mod:`.executables`): the t-grid functions'
executables under a key computed before tracing, loaded without tracing or lowering.
Their misses compile with this cache's reads off (:func:`fresh_reads_off`), and their
loads count as hits here (:func:`record_hit`).

CPU caveat. JAX 0.10 caches XLA:CPU executables too. They are compiled for the host CPU's
features; XLA's CPU loader refuses an entry whose features the loading host lacks (the
loss is a recompile, not a crash), so a cache shared by nodes with different CPUs gives
few hits: use a per-node path there (docs/clusters.md). On some CPUs the loader refuses
every entry (jax-ml/jax#38445: LLVM tuning flags mistaken for features); the per-cell hit
count then stays 0 and the run is as fast as without the cache.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jax._src.compilation_cache_interface import CacheInterface

log = logging.getLogger(__name__)

#: The cache folder, or one of :data:`OFF` to turn the cache off.
CACHE_DIR_ENV = "HYPERSWEEP_CACHE_DIR"
OFF = ("off", "0", "false", "none", "disabled")
#: JAX's monitoring events: a compile that consulted the cache, and one served from it.
LOOKUP_EVENT = "/jax/compilation_cache/compile_requests_use_cache"
HIT_EVENT = "/jax/compilation_cache/cache_hits"
#: The file suffix of JAX's own file cache, so either cache reads the other's entries.
_SUFFIX = "-cache"

_STATE: dict = {"checked": False, "dir": None, "hits": 0, "lookups": 0}
_LOCK = threading.Lock()


def default_dir() -> Path:
    return Path("~/.cache/hypersweep/jax").expanduser()


def resolve_dir(value: str | None = None) -> Path | None:
    """The folder the cache uses: ``value`` (default ``$HYPERSWEEP_CACHE_DIR``), ``~``
    expanded; :func:`default_dir` when unset or empty; None when it says off."""
    if value is None:
        value = os.environ.get(CACHE_DIR_ENV)
    if value is None or not str(value).strip():
        return default_dir()
    if str(value).strip().lower() in OFF:
        return None
    return Path(str(value).strip()).expanduser().absolute()


def env_for(enabled: bool = True, directory: str | None = None) -> dict[str, str]:
    """``$HYPERSWEEP_CACHE_DIR`` for a study's actors: off, the study's ``dir``, else the
    driver's own setting (if any; an unset variable lets each node use its default)."""
    if not enabled:
        return {CACHE_DIR_ENV: "off"}
    if directory:
        return {CACHE_DIR_ENV: str(directory)}
    if os.environ.get(CACHE_DIR_ENV):
        return {CACHE_DIR_ENV: os.environ[CACHE_DIR_ENV]}
    return {}


def counts() -> tuple[int, int] | None:
    """(cache hits, compiles that looked in the cache) in this process so far, or None
    when the cache is off here. Differences around a cell give the cell's."""
    if _STATE["dir"] is None:
        return None
    return _STATE["hits"], _STATE["lookups"]


def record_hit() -> None:
    """Count an executable served without JAX's compile path (:mod:`.executables`) as a
    cache lookup that hit."""
    with _LOCK:
        _STATE["hits"] += 1
        _STATE["lookups"] += 1


_FRESH = threading.local()


@contextlib.contextmanager
def fresh_reads_off():
    """Within this block (this thread), the ``AtomicFileCache`` reads nothing: compiles
    are fresh (and still written). :mod:`.executables` needs executables that XLA built,
    not ones loaded from here: JAX 0.10 cannot serialize those again."""
    previous = getattr(_FRESH, "on", False)
    _FRESH.on = True
    try:
        yield
    finally:
        _FRESH.on = previous


def _on_event(event: str, **_: object) -> None:
    if event == HIT_EVENT:
        _STATE["hits"] += 1
    elif event == LOOKUP_EVENT:
        _STATE["lookups"] += 1


def ensure() -> Path | None:
    """Turn the cache on in this process, once, as ``$HYPERSWEEP_CACHE_DIR`` says; return
    its folder (None when off or when it could not be set up, which is logged, never
    raised: a run without the cache is only slower)."""
    with _LOCK:
        if _STATE["checked"]:
            return _STATE["dir"]
        _STATE["checked"] = True
        path = resolve_dir()
        if path is None:
            return None
        try:
            _STATE["dir"] = _enable(path)
        except Exception as exc:  # noqa: BLE001 - the cache is an optimisation
            log.warning("JAX compilation cache at %s not enabled: %s", path, exc)
        return _STATE["dir"]


def _enable(path: Path) -> Path:
    import jax
    from jax._src import compilation_cache as jax_cache

    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_compilation_cache_dir", str(path))
    if jax.config.jax_compilation_cache_max_size == -1:
        _install_atomic(jax_cache, path)
    jax.monitoring.register_event_listener(_on_event)
    return path


def _install_atomic(jax_cache, path: Path) -> None:
    """Make an ``AtomicFileCache`` JAX's cache object (JAX builds its own lazily at the
    first compile, from ``jax_compilation_cache_dir``, unless one is there already)."""
    needed = ("_cache", "_cache_initialized", "_cache_initialized_mutex")
    if not all(hasattr(jax_cache, name) for name in needed):
        log.warning("this JAX has no %s; its own cache is used (its writes are not atomic)",
                    ", ".join(needed))
        return
    with jax_cache._cache_initialized_mutex:
        if jax_cache._cache is None:  # else set up before us: leave it
            jax_cache._cache = atomic_file_cache(path)
            jax_cache._cache_initialized = True


def atomic_file_cache(path) -> "CacheInterface":
    """An ``AtomicFileCache`` on ``path`` (the class needs JAX, so it is built on
    first use)."""
    return _atomic_class()(path)


@functools.cache
def _atomic_class() -> type:
    from jax._src.compilation_cache_interface import CacheInterface

    class AtomicFileCache(CacheInterface):
        """A folder of ``<key>-cache`` files (JAX's layout); a write is a rename into
        place, so a reader never sees a partial entry and a killed writer leaves none."""

        def __init__(self, path):
            self._path = self.path = Path(path)
            self.path.mkdir(parents=True, exist_ok=True)

        def get(self, key: str) -> bytes | None:
            if not key:
                raise ValueError("key cannot be empty")
            if getattr(_FRESH, "on", False):
                return None
            try:
                return (self.path / f"{key}{_SUFFIX}").read_bytes()
            except FileNotFoundError:
                return None

        def put(self, key: str, value: bytes) -> None:
            if not key:
                raise ValueError("key cannot be empty")
            final = self.path / f"{key}{_SUFFIX}"
            if final.exists():
                return
            write_atomic(final, value)

    return AtomicFileCache


def write_atomic(final: Path, value: bytes) -> None:
    """Write ``value`` to a temporary file beside ``final`` (dot-prefixed, with this
    process's id), then rename it onto ``final``: atomic on POSIX, so a reader sees a
    whole file or none, and of two writers one whole file wins."""
    temporary = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(value)
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)
