"""The Ray actor that runs cells: a thin, long-lived shell around :func:`cell.run_cell`
and, for a batch of cells sent as one task, :func:`cell.run_cells`.

One ``CellRunner`` per resource slot lives for the whole study, so its process keeps the
imported backend, the cached problem instances and the compiled functions between cells
(the driver sends cells with the same ``shape_key`` to the same runner when it can). It
holds no state the driver relies on: Ray may restart it (``max_restarts``) after a crash
and the driver re-sends what was lost.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from hypersweep.orchestrator import cell as cell_module
from hypersweep.orchestrator import resources
from hypersweep.orchestrator.resources import ActorRequest
from hypersweep.problems.jax import compile_cache  # no JAX import
from hypersweep.registry import PLUGINS_ENV, load_plugins

log = logging.getLogger(__name__)

#: ``resources.memory_mb`` of the study, for the runner's memory watchdog (actor_options).
MEMORY_LIMIT_ENV = "HYPERSWEEP_MEMORY_LIMIT_MB"
#: Where a runner stopped by its watchdog leaves the reason for the driver (one small
#: file per cell attempt, read and removed by :func:`read_memory_report`).
MEMORY_REPORT_DIR_ENV = "HYPERSWEEP_MEMORY_REPORT_DIR"
#: RSS sampling period. At 5 GB/s of allocation a cell overshoots its limit by at most
#: about 5 GB/s × this before it is stopped.
MEMORY_POLL_S = 0.02
#: The runner's exit status when the watchdog stops it (128 + SIGKILL, as the kernel's
#: OOM killer would leave it).
MEMORY_EXIT_CODE = 137


def memory_report_dir() -> Path:
    return Path(os.environ.get(MEMORY_REPORT_DIR_ENV) or Path(
        tempfile.gettempdir(), f"hypersweep-memory-{os.getuid()}"))


def _report_path(cell_id: str, attempt: int) -> Path:
    return memory_report_dir() / f"{cell_id}.{int(attempt)}.txt"


def read_memory_report(cell_id: str, attempt: int) -> str | None:
    """The watchdog's message for this cell attempt, if its runner was stopped for memory
    (the file is removed). Only on the node the runner ran on: the driver of a multi-node
    cluster sees the plain crash instead."""
    path = _report_path(cell_id, attempt)
    try:
        message = path.read_text(encoding="utf-8").strip()
        path.unlink()
    except OSError:
        return None
    return message or None


class _MemoryWatchdog(threading.Thread):
    """Stops the runner's process once its RSS passes ``memory_mb`` while a cell runs.

    Ray's ``memory`` option only reserves the amount for scheduling; nothing stops an
    actor that grows past it until the whole node runs out. ``RLIMIT_AS`` would cap
    virtual memory, which JAX/XLA and torch reserve by the gigabyte without touching, so
    the resident set is sampled instead. On excess the reason is written for the driver
    and the process hard-exits (``os._exit``: no cleanup that could allocate), which the
    driver sees as a dead actor and records as a ``crashed`` row with this message (not
    retried).
    """

    def __init__(self, limit_mb: float, current: Callable[[], tuple | None]):
        super().__init__(name="hypersweep-memory-watchdog", daemon=True)
        self.limit_mb = float(limit_mb)
        self.current = current

    def run(self) -> None:
        import psutil

        process = psutil.Process()
        limit = self.limit_mb * 2**20
        while True:
            rss = process.memory_info().rss
            running = self.current()
            # Only while a cell runs: a runner whose idle footprint is above the limit
            # gets a memory row for each cell (saying so) rather than endless restarts.
            if rss > limit and running is not None:
                self._stop(rss / 2**20, *running)
            time.sleep(MEMORY_POLL_S)

    def _stop(self, rss_mb: float, cell_id: str, attempt: int) -> None:
        message = (f"memory limit exceeded: RSS {rss_mb:.0f} MB > memory_mb "
                   f"{self.limit_mb:g}; the runner was stopped")
        try:
            path = _report_path(cell_id, attempt)
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".tmp")
            temporary.write_text(message, encoding="utf-8")
            temporary.replace(path)
        finally:
            os._exit(MEMORY_EXIT_CODE)


class _CellRunner:
    """Runs one cell per ``run`` call, or a batch per ``run_batch`` call. At start it
    imports the plugins named in ``$HYPERSWEEP_PLUGINS`` (their pipelines, problems and
    algorithms then exist here as in the driver) and, for ``preload``, the backends' ops,
    so the first cell's clock (and its ``cell_timeout_s``) does not include a 1–2 s
    torch/jax import; with JAX it turns the persistent compilation cache on
    (``$HYPERSWEEP_CACHE_DIR``, see :mod:`hypersweep.problems.jax.compile_cache`). Each
    JAX row's ``extra`` says how many of the cell's compiles the cache served
    (``compile_cache_hits`` of ``compile_cache_lookups``)."""

    def __init__(self, preload: tuple[str, ...] = ()):
        self._running: tuple[str, int] | None = None
        limit = os.environ.get(MEMORY_LIMIT_ENV)
        if limit:
            _MemoryWatchdog(float(limit), lambda: self._running).start()
        load_plugins()
        for backend in preload:
            try:
                importlib.import_module(f"hypersweep.problems.{backend}.ops")
                if backend == "jax":
                    compile_cache.ensure()
            except Exception as exc:  # noqa: BLE001 - the cell will report it properly
                log.warning("preloading backend %r failed: %s", backend, exc)
        self.pid = os.getpid()

    def ping(self) -> int:
        return self.pid

    def run(self, cell: cell_module.Cell, attempt: int) -> tuple[dict, list[dict]]:
        self._running = (cell.cell_id, attempt)
        before = compile_cache.counts()
        start = time.perf_counter()
        try:
            row, traces = cell_module.run_cell(cell, attempt)
        finally:
            self._running = None
        _count_compiles(row, cell, before)
        _count_busy(row, start)
        return row, traces

    def run_batch(self, cells: list, attempts: list) -> Iterator[tuple[dict, list[dict]]]:
        """Yield (row, trace rows) per cell of a batch as each is known
        (:func:`cell.run_cells`); a Ray streaming generator, called with
        ``.options(num_returns="streaming")``. Each row's compile-cache counts and
        ``actor_busy_s`` are those since the previous row, so their sums over the batch
        are the batch's. While it runs,
        the memory watchdog names a cell the batch has not yielded yet."""
        pending = {cell.cell_id: (cell.cell_id, int(attempt))
                   for cell, attempt in zip(cells, attempts)}
        self._running = next(iter(pending.values()), None)
        before = compile_cache.counts()
        since = time.perf_counter()
        try:
            for row, traces in cell_module.run_cells(cells, attempts):
                pending.pop(row["cell_id"], None)
                before = _count_compiles(row, cells[0], before)
                since = _count_busy(row, since)
                self._running = next(iter(pending.values()), None)
                yield row, traces
        finally:
            self._running = None


def _count_compiles(row: dict, cell: cell_module.Cell, before: tuple | None
                    ) -> tuple | None:
    """Put the compile-cache hits and lookups since ``before`` on a JAX ``row``'s
    ``extra``; return the counts now (the next row's ``before``)."""
    after = compile_cache.counts()
    if after is not None and cell.backend == "jax":
        hits, lookups = (a - b for a, b in zip(after, before or (0, 0)))
        row["extra"] = with_extra(row["extra"], compile_cache_hits=hits,
                                  compile_cache_lookups=lookups)
    return after


def _count_busy(row: dict, since: float) -> float:
    """Put the runner's seconds since ``since`` (its task's start or its previous row) on
    ``row``'s ``extra`` as ``actor_busy_s``: summed over rows, the time the runners spent
    on cells, oracles, rows and compiles (the denominator of a compile share); returns
    now."""
    now = time.perf_counter()
    row["extra"] = with_extra(row["extra"], actor_busy_s=round(now - since, 6))
    return now


def with_extra(extra: str | None, **values: Any) -> str:
    """The ``extra`` JSON column with ``values`` added."""
    merged = json.loads(extra) if extra else {}
    merged.update(values)
    return cell_module.canonical_json(merged)


def actor_options(request: ActorRequest, *, max_restarts: int = 4,
                  compile_cache_setting: Any = None) -> dict[str, Any]:
    """``.options(...)`` for one runner: :func:`.resources.actor_options` (resources,
    restarts, GPU sharing) plus what the runner reads from its environment, the plugins
    (``$HYPERSWEEP_PLUGINS``), its memory watchdog's limit and report folder, and the
    compile cache's folder or ``off`` (``$HYPERSWEEP_CACHE_DIR``) from the study's
    ``compile_cache`` section (``compile_cache_setting``; None: the driver's own
    variable, if set)."""
    setting = compile_cache_setting
    env = compile_cache.env_for(enabled=getattr(setting, "enabled", True),
                                directory=getattr(setting, "dir", None))
    if os.environ.get(PLUGINS_ENV):
        env[PLUGINS_ENV] = os.environ[PLUGINS_ENV]
    if request.memory_mb:
        env[MEMORY_LIMIT_ENV] = f"{float(request.memory_mb):g}"
        env[MEMORY_REPORT_DIR_ENV] = str(memory_report_dir())
    return resources.actor_options(request, max_restarts=max_restarts, extra_env=env)


def __getattr__(name: str) -> Any:
    """``CellRunner``, the Ray actor class, built on first use: importing this module
    must not import Ray, whose environment the driver sets first (see ``ray_env``)."""
    if name == "CellRunner":
        import ray

        runner = ray.remote(_CellRunner)
        globals()["CellRunner"] = runner
        return runner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
