"""Where the driver's rows go, in order: Parquet (the record), then MLflow (a view).

:class:`Sinks` writes the study's ``study.yaml``, buffers rows in a
:class:`~hypersweep.io.parquet.ParquetSink` and hands each flushed batch, with the trace
rows of its cells (the curves of outer-step runs), to the background
:class:`~hypersweep.io.tracking_sync.MlflowWriter` (when the study's ``mlflow.enabled``),
so MLflow only ever sees rows that are already safe on disk. Driver-only; no Ray.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from hypersweep.io import parquet, tracking
from hypersweep.io.tracking_sync import MlflowWriter, study_params

if TYPE_CHECKING:
    from hypersweep.orchestrator.spec import StudySpec


def study_text(study: "StudySpec") -> str:
    """The study as written (``source_text``), else its fields as YAML."""
    return study.source_text or yaml.safe_dump(study.model_dump(mode="json"),
                                               sort_keys=False)


def mlflow_writer(study: "StudySpec") -> MlflowWriter | None:
    """A started writer for the study's MLflow settings, or None when disabled.

    The URI goes to MlflowClient explicitly (never mlflow's cwd default); the process
    environment is left alone so a later study in the same process is not redirected."""
    if not study.mlflow.enabled:
        return None
    uri = tracking.choose_tracking_uri(None, study.mlflow.tracking_uri)
    tracking.set_mlflow_env_defaults()
    logger = tracking.MlflowLogger(uri, study.mlflow.experiment or study.study, study.study,
                                   study_params=study_params(study, uri),
                                   study_yaml=study_text(study),
                                   artifact_root=tracking.default_artifact_root(uri),
                                   k_uses_t=tracking.k_uses_t(
                                       [*(study.K or [])] + [k for entry in study.algorithms
                                                             for k in (entry.K or [])]))
    return MlflowWriter(logger).start()


class Sinks:
    """The Parquet sink and the MLflow writer of one sweep (create it holding the lock)."""

    def __init__(self, study: "StudySpec", output: Path, *, flush_rows: int,
                 flush_seconds: float):
        try:
            parquet.write_text_atomic(output / parquet.STUDY_FILE, study_text(study))
        except OSError as exc:
            raise parquet.SinkWriteError(output / parquet.STUDY_FILE, exc, 1) from exc
        self.parquet = parquet.ParquetSink(output, flush_rows=flush_rows,
                                           flush_seconds=flush_seconds)
        self.writer = mlflow_writer(study)
        self._traces: dict[str, list] = {}  # cell_id -> trace rows, until its row flushes

    def add(self, row: dict, traces: list) -> None:
        self.parquet.add(row, traces)
        if self.writer is not None and traces:
            self._traces[row["cell_id"]] = traces

    def due(self) -> bool:
        return self.parquet.due()

    def flush(self, *, last: bool = False) -> None:
        """Write the buffered rows to Parquet, then queue them (and their cells' trace rows)
        for MLflow; ``last``: no row follows (MLflow logs them without waiting for more)."""
        rows = self.parquet.flush()
        if self.writer is not None:
            if rows:
                traces = {row["cell_id"]: self._traces.pop(row["cell_id"]) for row in rows
                          if row.get("cell_id") in self._traces}
                self.writer.submit(rows, traces)
            if last:
                self.writer.last_rows_sent()

    def close(self, *, status: str, summary: dict | None, timeout: float | None) -> None:
        """End the MLflow runs with ``status`` (Parquet is flushed by the caller)."""
        if self.writer is not None:
            self.writer.close(status=status, summary=summary, timeout=timeout)

    @property
    def drain_wait_s(self) -> float:
        return self.writer.drain_wait_s if self.writer else 0.0

    def mlflow_summary(self) -> dict | None:
        """What MLflow received, for the run's summary (None when MLflow is off)."""
        if self.writer is None:
            return None
        logger = self.writer.logger
        return {"tracking_uri": logger.tracking_uri, "experiment": logger.experiment_name,
                "parent_run_id": logger.parent_run_id, "cells_logged": logger.cells_logged,
                "runs_created": logger.runs_created, "dropped": self.writer.dropped,
                "error": self.writer.error, "seconds": logger.seconds,
                "connect_seconds": logger.connect_seconds}
