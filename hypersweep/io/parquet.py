"""Where finished cells go: Parquet parts (the source of truth) and MLflow (a view of them).

Only the driver process writes. Layout under a study's ``output`` directory::

    study.yaml                          the study as written (after validation)
    results/part-<ns>-<uuid8>.parquet   result rows, schema.RESULT_SCHEMA: after a run,
                                        exactly one row per cell (its latest attempt)
    traces/part-<ns>-<uuid8>.parquet    per-step trace rows, schema.TRACE_SCHEMA: after a
                                        run, each cell's latest traced attempt only
    history/results/part-….parquet      superseded attempts (a failed row later retried),
    history/traces/part-….parquet       each file named after the part it came from
    quarantine/results|traces/…         parts found unreadable, moved aside
    hypersweep.lock                     the running driver (host, pid, since, study)

Every file is written under a dot-prefixed temporary name, fsynced, renamed into place and
its directory fsynced, so a SIGKILL at any moment leaves either a complete part or an
invisible ``.part-*.<pid>@<host>.tmp`` (readers skip names starting with ``.``; the next
driver on that host deletes those whose process is gone). Only the holder of the output's
lock (:mod:`.lock`) writes. A write that fails (disk full, read-only) keeps its rows
buffered and is retried; if it keeps failing the sweep stops with :class:`SinkWriteError`
and the unsaved cells simply re-run next time. A visible part that cannot be read
(truncated, zero bytes) is moved to ``quarantine/`` with a warning and its cells count as
not done.

**One row per cell.** During a run, retried or re-run cells (``--retry-failed``) append
new rows; :func:`read_results` keeps the latest row per ``cell_id`` (by ``finished_at``) at
any moment. When a run ends — normally, on an error, or stopped by SIGINT/SIGTERM — and
when the next one starts (the repair after a crash), :func:`compact` rewrites only the
parts that hold a superseded row: their latest rows go to one new part, their superseded
rows to ``history/``, then they are deleted. So a plain reader of the documented path
(``duckdb.sql("select count(*) from 'OUTPUT/results/*.parquet'")``, polars, pandas)
counts each cell once, and ``read_results(output, latest=False)`` (results/ and history/)
sees every attempt once. Parts written before a column existed are rewritten in the
current schema by the same step, one at a time, so the files of one ``results/`` agree.
Cost: a footer and the ``cell_id`` column of every part (about 1 s for 2,000 parts),
plus a rewrite of the parts holding retried cells only; never on a flush.

Crash safety of a compaction (a SIGKILL between any two steps): (1) each source part's
superseded rows are written to ``history/<kind>/<its name>``, then (2) the part of latest
rows, whose Parquet metadata names its sources (``hypersweep.replaces``), then (3) the
sources are deleted. At every step each latest row is in ``results/`` (in a source,
in the new part, or both); a repeated (1) writes the same files under the same names; a
source still present next to a part that replaces it is deleted first thing by the next
compaction, its history having been written in (1). Between (2) and (3), and only then, a
plain reader sees those cells twice; :func:`read_results` and :func:`read_traces` never
do.
"""
from __future__ import annotations

import datetime as _dt
import errno
import json
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hypersweep.io.lock import OutputError
from hypersweep.io.schema import RESULT_SCHEMA, TRACE_SCHEMA

log = logging.getLogger(__name__)

RESULTS_DIR = "results"
TRACES_DIR = "traces"
STUDY_FILE = "study.yaml"
QUARANTINE_DIR = "quarantine"
HISTORY_DIR = "history"
#: the Parquet key-value metadata of a compacted part: JSON list of the parts it replaces
REPLACES_KEY = b"hypersweep.replaces"
#: how often a reader lists the parts again when a compaction deleted one under it
READ_RELISTS = 3
#: a failed Parquet write is tried this many times in all, sleeping WRITE_BACKOFF_S × 2^i
WRITE_ATTEMPTS = 4
WRITE_BACKOFF_S = 0.1


class SinkWriteError(OutputError):
    """Parquet parts could not be written to ``path`` after every attempt."""

    def __init__(self, path: Path, exc: OSError, attempts: int):
        self.path, self.error, self.attempts = path, exc, attempts
        name = errno.errorcode.get(exc.errno, "") if exc.errno else ""
        reason = exc.strerror or str(exc) or type(exc).__name__
        super().__init__(f"cannot write to {path} ({name + ': ' if name else ''}{reason}) "
                         f"after {attempts} attempt(s)")
        self.summary: dict | None = None

    def stopped(self, *, saved: int, unsaved: int, summary: dict | None = None
                ) -> SinkWriteError:
        """This error, its message completed with what the stopped sweep kept."""
        self.summary = summary
        self.args = (f"{self.args[0]}; the sweep stopped: {saved} finished cell(s) of this "
                     f"run are saved, {unsaved} more finished but could not be saved and "
                     f"re-run on the next `hypersweep run`",)
        return self


def _tmp_suffix() -> str:
    """``<pid>@<host>``: whose temporary file it is (see :func:`sweep_stale_tmp`)."""
    return f"{os.getpid()}@{socket.gethostname()}"

# ---------------------------------------------------------------------------------------
# Parquet


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_atomically(tmp: Path, final: Path, write: Callable[[Any], None],
                        mode: str) -> None:
    """Write through ``tmp`` (``write(handle)``), fsync, ``os.replace`` onto ``final`` and
    fsync the directory; on any failure the tmp is removed before the error propagates."""
    try:
        with open(tmp, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(final.parent)


def write_table_atomic(table: pa.Table, directory: str | Path, *,
                       name: str | None = None) -> Path:
    """Write ``table`` as a new ``part-<time_ns>-<uuid8>.parquet`` in ``directory`` (or as
    ``name``, replacing a file of that name).

    tmp (dot-prefixed, invisible to readers) + fsync + ``os.replace`` + directory fsync:
    after a crash the part is either complete or absent; after a failed write (OSError,
    e.g. ENOSPC) the tmp is removed before the error propagates. Cost: ~1.5 ms for 50 rows.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / (name or f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet")
    tmp = directory / f".{final.name}.{_tmp_suffix()}.tmp"
    _replace_atomically(tmp, final, lambda h: pq.write_table(table, h, compression="zstd"),
                        "wb")
    return final


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.{_tmp_suffix()}.tmp"
    _replace_atomically(tmp, path, lambda h: h.write(text), "w")


_TMP_OWNER = re.compile(r"\.(\d+)@(.+)\.tmp$")


def _stale(name: str) -> bool:
    """Whether the writer of temporary file ``name`` is gone: a process of this host that
    no longer exists (or this very process). Another host's files are left to that host;
    names without an owner come from versions before owners were recorded."""
    match = _TMP_OWNER.search(name)
    if match is None:
        return True
    pid, host = int(match.group(1)), match.group(2)
    if host != socket.gethostname():
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def sweep_stale_tmp(directory: str | Path) -> int:
    """Delete the ``.*.tmp`` of writers that are gone (see :func:`_stale`); returns how
    many were removed. Call it only while holding the output's lock."""
    directory = Path(directory)
    removed = 0
    if directory.is_dir():
        for stale in directory.glob(".*.tmp"):
            if not _stale(stale.name):
                continue
            try:
                stale.unlink()
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def _parts(directory: Path) -> list[Path]:
    """The visible parts, oldest first (names start with a nanosecond clock)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.parquet") if not p.name.startswith((".", "_")))


def _quarantine_dir(part: Path) -> Path:
    """``<output>/quarantine/<kind>`` for a part of ``<output>/<kind>`` (a kind of
    ``history/`` keeps its ``history/`` prefix there)."""
    kind = part.parent
    root = kind.parent.parent if kind.parent.name == HISTORY_DIR else kind.parent
    return root / QUARANTINE_DIR / kind.relative_to(root)


def quarantine(part: Path, error: BaseException) -> None:
    """Move an unreadable ``part`` to ``<output>/quarantine/<results|traces>/`` with one
    warning naming it and how many rows it held (0 when even its footer is unreadable)."""
    try:
        lost = pq.read_metadata(part).num_rows
    except Exception:  # noqa: BLE001 - truncated or empty: no footer
        lost = 0
    target_dir = _quarantine_dir(part)
    reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        os.replace(part, target_dir / part.name)
        where = f"moved to {target_dir}"
    except FileNotFoundError:  # another reader moved it first
        return
    except OSError as exc:  # a read-only output: skip it in place
        where = f"left in place (cannot move it: {exc.strerror or exc})"
    count = f"{lost} row(s) lost" if lost else "0 row(s) lost (no footer left to count them)"
    log.warning("unreadable Parquet part %s (%s): %s, %s; its cells count as not done and "
                "re-run", part, reason, count, where)


def _read_part(part: Path, schema: pa.Schema) -> pa.Table | None:
    try:
        return pq.read_table(part, schema=schema)
    except FileNotFoundError:  # quarantined by another reader meanwhile
        return None
    except (pa.ArrowInvalid, OSError) as exc:
        try:
            pq.read_table(part)
        except FileNotFoundError:
            return None
        except (pa.ArrowInvalid, OSError):
            quarantine(part, exc)  # the file itself is unreadable
            return None
        raise  # readable, but not with this schema: not corruption, do not hide it


def _read_parts(directories: Iterable[Path], schema: pa.Schema
                ) -> list[tuple[Path, pa.Table]]:
    """(part, rows) of every readable part of ``directories``, oldest first within each;
    unreadable parts are quarantined. A part deleted between the listing and its read (a
    compaction replaced it) makes the listing start again, so the part that replaced it
    is read instead."""
    for _ in range(READ_RELISTS):
        tables, vanished = [], False
        for part in (p for d in directories for p in _parts(d)):
            table = _read_part(part, schema)
            if table is not None:
                tables.append((part, table))
            elif not part.exists() and not _quarantined(part):
                vanished = True
                break
        if not vanished:
            break
    return tables


def _quarantined(part: Path) -> bool:
    return (_quarantine_dir(part) / part.name).exists()


def empty_table(schema: pa.Schema) -> pa.Table:
    """An empty table of ``schema`` (``schema.empty_table()`` imports pandas, 0.2–0.3 s,
    which a run into a new output need not pay before Ray starts)."""
    return pa.Table.from_batches([], schema=schema)


def _dataset(directories: Iterable[Path], schema: pa.Schema) -> pa.Table:
    """Every row of ``directories``' parts in ``schema`` (a column a part lacks is null)."""
    directories = list(directories)
    for _ in range(READ_RELISTS):
        parts = [p for d in directories for p in _parts(d)]
        if not parts:
            return empty_table(schema)
        import pyarrow.dataset as ds  # here: it imports pandas (see empty_table)

        try:
            return ds.dataset([str(p) for p in parts], format="parquet",
                              schema=schema).to_table()
        except FileNotFoundError:
            continue  # a compaction replaced a part meanwhile: list again
        except (pa.ArrowInvalid, OSError):
            break  # some part is unreadable: read them one by one, quarantining bad ones
    tables = [table for _, table in _read_parts(directories, schema)]
    return pa.concat_tables(tables) if tables else empty_table(schema)


def _sorted_latest_first(table: pa.Table) -> pa.Table:
    return table.sort_by([("cell_id", "ascending"), ("finished_at", "descending")])


def _group_starts(ids: np.ndarray) -> np.ndarray:
    """True where a run of equal ``ids`` (sorted) starts."""
    first = np.ones(len(ids), dtype=bool)
    first[1:] = ids[1:] != ids[:-1]
    return first


def latest_per_cell(table: pa.Table) -> pa.Table:
    """Keep the row with the greatest ``finished_at`` for each ``cell_id``."""
    if table.num_rows == 0:
        return table
    ordered = _sorted_latest_first(table)
    ids = ordered.column("cell_id").to_numpy(zero_copy_only=False)
    return ordered.filter(pa.array(_group_starts(ids)))


def latest_rows(rows: Iterable[dict]) -> list[dict]:
    """:func:`latest_per_cell` for rows as dicts: one row per ``cell_id``, the greatest
    ``finished_at`` (a row without one is the oldest); rows without a cell id all stay."""
    def key(row: dict) -> tuple:
        finished = row.get("finished_at")
        if finished is None:
            return (False, 0.0)
        if finished.tzinfo is None:  # naive: UTC, as the writers record it
            finished = finished.replace(tzinfo=_dt.timezone.utc)
        return (True, finished.timestamp())

    latest: dict[Any, dict] = {}
    loose = []
    for row in rows:
        cell = row.get("cell_id")
        if cell is None:
            loose.append(row)
        elif cell not in latest or key(row) >= key(latest[cell]):
            latest[cell] = row
    return [*latest.values(), *loose]


def without_copies(table: pa.Table) -> pa.Table:
    """Drop repeated copies of one row (same ``cell_id`` and ``finished_at``): what a
    reader may meet while a compaction writes (module docstring), never two attempts."""
    if table.num_rows == 0:
        return table
    keys = pa.Table.from_arrays([table.column("cell_id"), table.column("finished_at")],
                                names=["cell_id", "finished_at"])
    unique = keys.group_by(["cell_id", "finished_at"], use_threads=False).aggregate([])
    if unique.num_rows == table.num_rows:
        return table
    ordered = _sorted_latest_first(table)
    ids = ordered.column("cell_id").to_numpy(zero_copy_only=False)
    times = ordered.column("finished_at").cast(pa.int64()).fill_null(
        np.iinfo(np.int64).min).to_numpy()
    first = _group_starts(ids)
    first[1:] |= times[1:] != times[:-1]
    return ordered.filter(pa.array(first))


def _output_dirs(output_dir: str | Path, kind: str) -> tuple[Path, Path]:
    """(``<output>/<kind>``, ``<output>/history/<kind>``); ``output_dir`` may also be the
    ``<kind>`` directory itself."""
    directory = Path(output_dir)
    if not (directory / kind).is_dir() and directory.name == kind:
        directory = directory.parent
    return directory / kind, directory / HISTORY_DIR / kind


def read_results(output_dir: str | Path, *, latest: bool = True) -> pa.Table:
    """The study's result rows (``RESULT_SCHEMA``), by default the latest row per cell.

    ``output_dir`` is the study's ``output`` (``results/`` below it is read) or the
    ``results`` directory itself. ``latest=False``: every attempt, the superseded ones in
    ``history/results/`` included, each once. The files are plain Parquet in one schema
    after a run (:func:`compact`), with one row per cell: pandas
    (``pd.read_parquet(dir)``), polars (``pl.read_parquet(dir + "/*.parquet")``) and
    duckdb (``read_parquet('dir/*.parquet')``) read them too. Parts written before a
    column existed read it as null here.
    """
    current, history = _output_dirs(output_dir, RESULTS_DIR)
    if latest:
        return latest_per_cell(_dataset([current], RESULT_SCHEMA))
    return without_copies(_dataset([current, history], RESULT_SCHEMA))


def _newest_part_rows(parts: list[pa.Table]) -> list[np.ndarray]:
    """Per part, the mask of its rows whose cell has no rows in a later part."""
    newest: dict[str, int] = {}
    for index, part in enumerate(parts):
        for cell_id in part.column("cell_id").unique().to_pylist():
            newest[cell_id] = index
    return [np.fromiter((newest[c] == index for c in part.column("cell_id").to_pylist()),
                        dtype=bool, count=part.num_rows)
            for index, part in enumerate(parts)]


def read_traces(output_dir: str | Path, *, latest: bool = True) -> pa.Table:
    """Trace rows (``TRACE_SCHEMA``), by default only each cell's latest run.

    A cell's traces are written together in one part file (``part-<time_ns>-…``, so names
    sort by time); when a cell was re-run (``--retry-failed``, a crash retry), the rows of
    its most recent part win (after a run, :func:`compact` has moved the others to
    ``history/traces/``). ``latest=False``: every run's rows, history included.
    """
    current, history = _output_dirs(output_dir, TRACES_DIR)
    if not latest:
        return _dataset([current, history], TRACE_SCHEMA)
    parts = [table for _, table in _read_parts([current], TRACE_SCHEMA)]
    if not parts:
        return empty_table(TRACE_SCHEMA)
    masks = _newest_part_rows(parts)
    return pa.concat_tables([part.filter(pa.array(mask))
                             for part, mask in zip(parts, masks)])


# ---------------------------------------------------------------------------------------
# Compaction


@dataclass
class Compaction:
    """What :func:`compact` did to one kind of part (``results`` or ``traces``)."""

    kind: str
    parts_scanned: int = 0
    parts_replaced: int = 0     # deleted, their rows in new parts and in history/
    parts_upgraded: int = 0     # of those, replaced only to be in the current schema
    leftovers_removed: int = 0  # sources of an interrupted compaction, deleted at once
    rows_kept: int = 0          # latest rows written to the new parts
    rows_to_history: int = 0    # superseded rows written to history/<kind>/
    new_parts: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.parts_replaced or self.leftovers_removed)


@dataclass(eq=False)
class _Scan:
    part: Path
    cell_ids: pa.Array
    outdated: bool
    replaces: list[str] = field(default_factory=list)


def _scan(part: Path, schema: pa.Schema) -> _Scan | None:
    """The cell ids, schema state and ``replaces`` list of ``part`` (its footer and one
    column); None when it vanished or is unreadable (then quarantined)."""
    try:
        with pq.ParquetFile(part) as handle:
            names = set(handle.schema_arrow.names)
            metadata = handle.schema_arrow.metadata or {}
            if "cell_id" not in names:  # not a part of ours: left alone
                log.warning("Parquet file %s has no cell_id column; compaction skips it",
                            part)
                return None
            ids = handle.read(columns=["cell_id"]).column("cell_id").combine_chunks().cast(
                pa.string())
    except FileNotFoundError:
        return None
    except (pa.ArrowInvalid, OSError) as exc:
        if part.exists():
            quarantine(part, exc)
        return None
    # Only missing columns are added: a part with columns this version does not know
    # (written by a newer one) is left as it is, never narrowed.
    outdated = names < set(schema.names)
    replaces = json.loads(metadata[REPLACES_KEY]) if REPLACES_KEY in metadata else []
    return _Scan(part, ids, outdated, [str(name) for name in replaces])


def _results_split(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(kept, superseded) row masks of result rows: the latest row per cell is kept, any
    older attempt superseded, a copy of the kept row (same ``finished_at``) neither."""
    keys = pa.table({"cell_id": table.column("cell_id"), "time": table.column(
        "finished_at").cast(pa.int64()).fill_null(np.iinfo(np.int64).min)})
    order = pc.sort_indices(keys, sort_keys=[("cell_id", "ascending"),
                                             ("time", "descending")]).to_numpy()
    ids = keys.column("cell_id").to_numpy(zero_copy_only=False)[order]
    times = keys.column("time").to_numpy()[order]
    first = _group_starts(ids)
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    copy = ~first & (times == times[group_start])
    kept, superseded = np.zeros(len(order), bool), np.zeros(len(order), bool)
    kept[order[first]] = True
    superseded[order[~first & ~copy]] = True
    return kept, superseded


def _replace_parts(group: list[_Scan], kind: str, schema: pa.Schema, directory: Path,
                   history: Path, stats: Compaction) -> None:
    """Replace the parts of ``group`` by one part of their latest rows, their superseded
    rows going to ``history`` (the three steps of the module docstring, in order)."""
    tables = [(scan, _read_part(scan.part, schema)) for scan in group]
    tables = [(scan, table) for scan, table in tables if table is not None]
    if not tables:
        return
    if kind == RESULTS_DIR:
        kept, superseded = _results_split(pa.concat_tables([t for _, t in tables]))
        bounds = np.cumsum([0] + [t.num_rows for _, t in tables])
        splits = [(kept[a:b], superseded[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    else:
        splits = [(mask, ~mask) for mask in _newest_part_rows([t for _, t in tables])]
    for (scan, table), (_, old) in zip(tables, splits):  # (1)
        if old.any():
            moved = table.filter(pa.array(old))
            write_table_atomic(moved, history, name=scan.part.name)
            stats.rows_to_history += moved.num_rows
        elif scan.outdated:
            stats.parts_upgraded += 1
    latest = pa.concat_tables([table.filter(pa.array(keep))
                               for (_, table), (keep, _) in zip(tables, splits)])
    names = [scan.part.name for scan, _ in tables]
    latest = latest.replace_schema_metadata({REPLACES_KEY: json.dumps(names)})
    stats.new_parts.append(write_table_atomic(latest, directory).name)  # (2)
    stats.rows_kept += latest.num_rows
    for scan, _ in tables:  # (3)
        try:
            os.unlink(scan.part)
        except FileNotFoundError:
            pass
    _fsync_dir(directory)
    stats.parts_replaced += len(tables)


def _compact_kind(output: Path, kind: str, schema: pa.Schema) -> Compaction:
    start = time.perf_counter()
    directory, history = output / kind, output / HISTORY_DIR / kind
    stats = Compaction(kind)
    for where in (directory, history):  # what a killed writer (or compaction) left
        sweep_stale_tmp(where)
    scans = [scan for scan in (_scan(p, schema) for p in _parts(directory)) if scan]
    stats.parts_scanned = len(scans)
    if not scans:  # a new output (pyarrow's value_counts below imports pandas)
        stats.seconds = time.perf_counter() - start
        return stats
    # An interrupted compaction: sources next to the part that replaces them.
    present = {scan.part.name for scan in scans}
    leftovers = sorted({name for scan in scans for name in scan.replaces} & present)
    for name in leftovers:
        os.unlink(directory / name)
    if leftovers:
        _fsync_dir(directory)
        stats.leftovers_removed = len(leftovers)
        scans = [scan for scan in scans if scan.part.name not in leftovers]
    # The parts to replace together: those holding a cell that has rows elsewhere too
    # (results: a second row anywhere; traces: rows in another part). Then each part in
    # an older schema on its own, so an upgrade never holds more than one part in memory.
    ids = [scan.cell_ids if kind == RESULTS_DIR else scan.cell_ids.unique()
           for scan in scans]
    counts = pc.value_counts(pa.concat_arrays(ids) if ids else pa.array([], pa.string()))
    duplicated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    retried = [scan for scan in scans if len(duplicated) and pc.any(
        pc.is_in(scan.cell_ids, value_set=duplicated)).as_py()]
    groups = [retried] if retried else []
    in_retried = {scan.part for scan in retried}
    groups += [[scan] for scan in scans if scan.outdated and scan.part not in in_retried]
    for group in groups:
        _replace_parts(group, kind, schema, directory, history, stats)
    stats.seconds = time.perf_counter() - start
    return stats


def compact(output_dir: str | Path) -> dict[str, Compaction]:
    """Leave one row per cell in ``results/`` and one run per cell in ``traces/``, the
    superseded ones in ``history/``, every part in the current schema (module docstring).

    Reads every part's footer and ``cell_id`` column, then only the parts to replace;
    untouched parts stay as they are, so its cost follows the retried cells, not the
    study. Call it only while holding the output's lock, never on every flush: the sweep
    calls it when a run starts (the repair of a crash) and when it ends.
    """
    output = Path(output_dir)
    return {kind: _compact_kind(output, kind, schema)
            for kind, schema in ((RESULTS_DIR, RESULT_SCHEMA), (TRACES_DIR, TRACE_SCHEMA))}


class ParquetSink:
    """Buffers rows in the driver and writes one atomic part per flush.

    ``flush_rows`` / ``flush_seconds``: flush when that many rows are buffered or the
    oldest buffered row is that old (and always on ``flush()``), so a SIGKILL loses at most
    ``flush_seconds`` of finished cells plus the in-flight ones. Create it only while
    holding the output's lock: it deletes the stale temporary files of dead writers.

    A write that raises OSError keeps every buffered row and is tried ``write_attempts``
    times in all (backoff ``write_backoff_s`` × 2^i); then :class:`SinkWriteError`, with
    the rows still buffered, so nothing half-written is counted as saved (:meth:`stopped`
    says how many).
    """

    def __init__(self, output_dir: str | Path, *, flush_rows: int = 50,
                 flush_seconds: float = 2.0, write_attempts: int = WRITE_ATTEMPTS,
                 write_backoff_s: float = WRITE_BACKOFF_S):
        self.output_dir = Path(output_dir)
        self.results_dir = self.output_dir / RESULTS_DIR
        self.traces_dir = self.output_dir / TRACES_DIR
        self.write_attempts = max(1, int(write_attempts))
        self.write_backoff_s = write_backoff_s
        for directory in (self.results_dir, self.traces_dir):
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SinkWriteError(directory, exc, 1) from exc
            removed = sweep_stale_tmp(directory)
            if removed:
                log.info("removed %d stale temporary file(s) in %s", removed, directory)
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self._rows: list[dict] = []
        self._traces: list[dict] = []
        self._oldest: float | None = None
        self.rows_written = 0
        self.files_written = 0
        self.seconds = 0.0  # time spent converting and writing (for the overhead report)
        self.compact_seconds = 0.0

    def add(self, row: dict, traces: Iterable[dict] = ()) -> None:
        if self._oldest is None:
            self._oldest = time.monotonic()
        self._rows.append(row)
        self._traces.extend(traces)

    def due(self) -> bool:
        if not self._rows:
            return False
        return (len(self._rows) >= self.flush_rows
                or time.monotonic() - self._oldest >= self.flush_seconds)

    def _write(self, rows: list[dict], schema: pa.Schema, directory: Path) -> None:
        table = pa.Table.from_pylist(rows, schema=schema)
        for attempt in range(self.write_attempts):
            try:
                write_table_atomic(table, directory)
                self.files_written += 1
                return
            except OSError as exc:
                if attempt + 1 == self.write_attempts:
                    raise SinkWriteError(directory, exc, self.write_attempts) from exc
                log.info("writing a Parquet part to %s failed (%s); retrying", directory, exc)
                time.sleep(self.write_backoff_s * 2 ** attempt)

    def flush(self) -> list[dict]:
        """Write buffered rows (traces first, then results); returns the rows written.

        Rows leave the buffer only once their part is in place; raises
        :class:`SinkWriteError` when a part cannot be written (they stay buffered).
        """
        if not self._rows and not self._traces:
            return []
        start = time.perf_counter()
        try:
            if self._traces:
                self._write(self._traces, TRACE_SCHEMA, self.traces_dir)
                self._traces = []  # written: a retry of the results must not repeat them
            rows = self._rows
            if rows:
                self._write(rows, RESULT_SCHEMA, self.results_dir)
            self._rows, self._oldest = [], None
        finally:
            self.seconds += time.perf_counter() - start
        self.rows_written += len(rows)
        return rows

    def compact(self) -> dict[str, Compaction]:
        """:func:`compact` the output: at the start and the end of a run, between flushes
        (rows still buffered stay buffered), never per flush."""
        start = time.perf_counter()
        try:
            return compact(self.output_dir)
        finally:
            self.compact_seconds += time.perf_counter() - start

    def stopped(self, error: SinkWriteError, summary: dict | None = None) -> SinkWriteError:
        """``error`` completed with how many rows this sink saved and how many it holds."""
        return error.stopped(saved=self.rows_written, unsaved=len(self._rows),
                             summary=summary)


# ---------------------------------------------------------------------------------------
