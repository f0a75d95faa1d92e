"""Rows into MLflow: the driver's background writer thread, and ``sync_mlflow``, which
backfills afterwards from the Parquet results what MLflow lacks.

Both feed an :class:`~hypersweep.io.tracking.MlflowLogger`; MLflow being down never stops a
sweep (the writer warns once and drops rows, which Parquet keeps for a later sync).
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypersweep.io.parquet import STUDY_FILE, read_results, read_traces
from hypersweep.io.tracking import (MlflowLogger, cell_end_ms, cell_start_ms,
                                    choose_tracking_uri, default_artifact_root,
                                    flatten_params, k_uses_t, output_param,
                                    set_mlflow_env_defaults)

if TYPE_CHECKING:
    from hypersweep.orchestrator.spec import StudySpec

log = logging.getLogger(__name__)


def _connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` means "the tracking store cannot be reached" (vs a bad request)."""
    text = f"{type(exc).__name__}: {exc}"
    markers = ("Max retries exceeded", "Connection refused", "ConnectionError",
               "ConnectTimeout", "ReadTimeout", "timed out", "Failed to establish",
               "RemoteDisconnected", "Connection aborted", "database is locked",
               "unable to open database", "OperationalError", "API request to")
    return isinstance(exc, (ConnectionError, TimeoutError, OSError)) or any(
        marker in text for marker in markers)


class _QuietRetries(logging.Filter):
    """Drop urllib3's per-retry warnings raised from the MLflow writer thread: an outage
    is reported once, by the writer."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName != WRITER_THREAD


WRITER_THREAD = "hypersweep-mlflow"
_QUIET_RETRIES = _QuietRetries()


class MlflowWriter:
    """One background thread that feeds :class:`MlflowLogger` from a bounded queue.

    The driver calls ``submit(rows, traces)`` only after those rows (and the trace rows of
    their cells, by cell_id) are in Parquet. The first
    failure that looks like "store unreachable" logs ONE warning and turns the writer off
    for the rest of the run (rows are then dropped, they are safe in Parquet and
    ``sync_mlflow`` backfills them); a full queue drops rows the same way instead of
    blocking the sweep.
    """

    _STOP = object()
    _WAKE = object()  # "no more rows": ends a coalescing wait at once

    def __init__(self, logger: MlflowLogger, *, max_backlog: int = 20000,
                 coalesce_s: float = 0.5):
        self.coalesce_s = coalesce_s
        self.logger = logger
        self.queue: queue.Queue = queue.Queue(maxsize=max_backlog)
        self.dead = False
        self.error: str | None = None
        self.dropped = 0
        self._abort = threading.Event()
        self._last_sent = threading.Event()
        self._final_status = "FINISHED"
        self._summary: dict | None = None
        self._thread = threading.Thread(target=self._run, name=WRITER_THREAD, daemon=True)
        self.drain_wait_s = 0.0

    def start(self) -> "MlflowWriter":
        urllib3_log = logging.getLogger("urllib3.connectionpool")
        if _QUIET_RETRIES not in urllib3_log.filters:
            urllib3_log.addFilter(_QUIET_RETRIES)
        self._thread.start()
        return self

    def submit(self, rows: list[dict], traces: dict[str, list] | None = None) -> None:
        if self.dead or not rows:
            if rows:
                self.dropped += len(rows)
            return
        try:
            self.queue.put_nowait((rows, traces or {}))
        except queue.Full:
            self.dropped += len(rows)
            self._warn_once(RuntimeError(f"backlog above {self.queue.maxsize} batches"),
                            what="is too slow")

    def last_rows_sent(self) -> None:
        """No more rows will be submitted (the sweep's last cell is in): log what is
        queued now instead of waiting ``coalesce_s`` for more, while the driver stops its
        pool and writes the summary before :meth:`close`."""
        self._last_sent.set()
        try:
            self.queue.put_nowait(self._WAKE)
        except queue.Full:  # a full backlog keeps the writer busy anyway
            pass

    def _warn_once(self, exc: BaseException, what: str = "is unreachable") -> None:
        if self.error is None:
            self.error = f"{type(exc).__name__}: {exc}"[:500]
            log.warning("MLflow at %s %s (%s); the sweep goes on and Parquet keeps every "
                        "row; run `hypersweep sync-mlflow <output>` later to backfill.",
                        self.logger.tracking_uri, what, self.error.splitlines()[0][:300])

    def _fail(self, exc: BaseException) -> None:
        self.dead = True
        self._warn_once(exc)

    def _collect(self, batch: list, traces: dict, deadline: float | None) -> None:
        """Extend ``batch`` (and ``traces``) from the queue (up to 5000 rows) until
        ``deadline`` (None: only what is queued now) or the stop marker, which is put back
        for the main loop."""
        while len(batch) < 5000 and not self._abort.is_set():
            try:
                if deadline is None:
                    more = self.queue.get_nowait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return
                    more = self.queue.get(timeout=remaining)
            except queue.Empty:
                return
            if more is self._STOP:
                self.queue.put(self._STOP)
                return
            if more is self._WAKE:
                return
            batch.extend(more[0])
            traces.update(more[1])

    def _run(self) -> None:
        try:
            # Linux schedules threads individually: let the cell runners (same box on a
            # laptop) win the CPU over this background bookkeeping.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        try:
            self.logger.connect()
        except Exception as exc:  # noqa: BLE001 - any failure disables MLflow, never the sweep
            self._fail(exc)
        while True:
            item = self.queue.get()
            if item is self._STOP:
                break
            if item is self._WAKE:
                continue
            batch, traces = list(item[0]), dict(item[1])
            # Coalesce what arrives within ``coalesce_s``: a group's cells (one per t) then
            # tend to go out in one log_batch instead of one per Parquet flush; once the
            # last rows are in, there is nothing to wait for.
            if not self._last_sent.is_set():
                self._collect(batch, traces, time.monotonic() + self.coalesce_s)
            self._collect(batch, traces, None)  # then take what is already queued
            if self.dead or self._abort.is_set():
                self.dropped += len(batch)
                continue
            try:
                self.logger.log_rows(batch, traces)
            except Exception as exc:  # noqa: BLE001
                if _connection_error(exc):
                    self._fail(exc)
                    self.dropped += len(batch)
                else:  # a bad value in one batch: skip it, keep logging the rest
                    self.dropped += len(batch)
                    log.warning("MLflow rejected a batch of %d rows: %s", len(batch), exc)
        if not self.dead:
            try:
                self.logger.finish(self._final_status, self._summary)
            except Exception as exc:  # noqa: BLE001
                self._fail(exc)

    def close(self, *, status: str = "FINISHED", summary: dict | None = None,
              timeout: float | None = None) -> None:
        """Stop after the backlog is logged (``timeout``: give up waiting, drop the rest)."""
        self._final_status, self._summary = status, summary
        start = time.perf_counter()
        if status != "FINISHED":
            self._abort.set()  # interrupted: end the runs now, skip the backlog
        self.queue.put(self._STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._abort.set()
            log.warning("MLflow writer still busy after %.1f s; leaving it (rows are in "
                        "Parquet; `hypersweep sync-mlflow` backfills)", timeout or 0.0)
        self.drain_wait_s = time.perf_counter() - start


def study_params(study: "StudySpec", tracking_uri: str | None = None) -> dict:
    """The parent run's params: the keys of ``study`` (a StudySpec), compactly; ``output``
    relative to the folder of a sqlite ``tracking_uri`` (see :func:`output_param`)."""
    out: dict[str, Any] = {}
    for key in ("study", "pipeline", "backend", "dtype", "t", "K", "seeds", "num_actors",
                "max_retries", "cell_timeout_s", "output"):
        value = getattr(study, key)
        out[key] = list(value) if isinstance(value, tuple) else value
    out["problems"] = [entry.label for entry in study.problems]
    out["algorithms"] = [entry.label for entry in study.algorithms]
    for name in ("num_cpus", "num_gpus", "memory_mb"):
        out[f"resources.{name}"] = getattr(study.resources, name)
    if tracking_uri is not None and study.output:
        out["output"] = output_param(study.output, tracking_uri)
    flatten_params("pipeline_params", dict(study.pipeline_params), out)
    return {key: json.dumps(value, default=str) if isinstance(value, (list, dict)) else value
            for key, value in out.items()}


def sync_mlflow(output_dir: str | Path, tracking_uri: str | None = None, *,
                experiment: str | None = None) -> dict:
    """Log to MLflow exactly the cells of ``output_dir`` that it lacks (idempotent).

    Reads ``output_dir/study.yaml`` for the study name, experiment and tracking URI
    (``tracking_uri`` / ``experiment`` override them), the latest Parquet row per cell and
    the trace rows of its latest run (the curves of outer-step runs); a cell is logged when
    its group's run lacks the tag recording that very row. Running it twice logs nothing
    the second time. It also re-points a moved sqlite store at its own artifacts and
    records the end times of runs whose cells ended later. Returns counts.
    """
    import yaml

    output_dir = Path(output_dir)
    study_file = output_dir / STUDY_FILE
    if not study_file.is_file():
        raise ValueError(f"{str(output_dir)!r} is not a study output: {STUDY_FILE} is "
                         f"missing (run `hypersweep run` first)")
    text = study_file.read_text(encoding="utf-8")
    raw = yaml.safe_load(text) or {}
    mlflow_cfg = raw.get("mlflow") or {}
    name = raw.get("study")
    uri = choose_tracking_uri(tracking_uri, mlflow_cfg.get("tracking_uri"))
    set_mlflow_env_defaults()
    experiment = experiment or mlflow_cfg.get("experiment") or name
    rows = read_results(output_dir).to_pylist()
    traces: dict[str, list] = {}
    for trace in read_traces(output_dir).to_pylist():
        traces.setdefault(trace["cell_id"], []).append(trace)
    params = {key: json.dumps(value, default=str) if isinstance(value, (list, dict))
              else value for key, value in raw.items() if key != "mlflow"}
    params["output"] = output_param(output_dir, uri)
    logger = MlflowLogger(uri, experiment, name, study_yaml=text, study_params=params,
                          artifact_root=default_artifact_root(uri), resume_parent=False,
                          k_uses_t=k_uses_t(list(raw.get("K") or []) + [
                              k for entry in raw.get("algorithms") or []
                              if isinstance(entry, dict) for k in entry.get("K") or []]),
                          parent_start_ms=min(map(cell_start_ms, rows), default=None))
    logger.connect()
    logged = logger.log_rows(rows, traces)
    if logger.parent_created:  # a parent made here spans the cells it shows
        logger.finish("FINISHED", end_time=max(map(cell_end_ms, rows), default=None))
    else:
        logger.flush_end_times()
    return {"cells": len(rows), "logged": logged,
            "already_logged": logger.cells_already_logged,
            "runs_created": logger.runs_created, "tracking_uri": uri,
            "experiment": experiment, "parent_run_id": logger.parent_run_id,
            "relocated": logger.relocated}
