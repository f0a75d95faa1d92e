"""Sinks that need no Ray: dedup of re-run cells on read, and the driver's Sinks (study.yaml,
then Parquet parts; MLflow off)."""
import time

import pyarrow as pa
import pyarrow.parquet as pq

from hypersweep.io import parquet
from hypersweep.io.schema import TRACE_SCHEMA, empty_trace


def _write_part(directory, rows):
    records = []
    for cell_id, step, val in rows:
        record = empty_trace()
        record.update(cell_id=cell_id, step=step, val_loss=val)
        records.append(record)
    name = directory / f"part-{time.time_ns()}-test.parquet"
    pq.write_table(pa.Table.from_pylist(records, schema=TRACE_SCHEMA), name)


def test_read_traces_keeps_only_the_latest_run_of_a_rerun_cell(tmp_path):
    traces = tmp_path / "traces"
    traces.mkdir()
    _write_part(traces, [("a", 0, 1.0), ("a", 1, 2.0), ("b", 0, 5.0)])  # first run
    _write_part(traces, [("a", 0, 9.0)])  # cell a re-run (e.g. --retry-failed), 1 step
    latest = sorted((r["cell_id"], r["step"], r["val_loss"])
                    for r in parquet.read_traces(tmp_path).to_pylist())
    assert latest == [("a", 0, 9.0), ("b", 0, 5.0)]
    assert parquet.read_traces(tmp_path, latest=False).num_rows == 4


def test_read_traces_of_a_missing_directory_is_empty(tmp_path):
    assert parquet.read_traces(tmp_path).num_rows == 0


def test_sinks_write_the_study_then_parquet_and_leave_mlflow_off(tmp_path):
    import sweep_test_pipeline
    from hypersweep.io.schema import empty_row
    from hypersweep.orchestrator.sinks import Sinks

    study = sweep_test_pipeline.study(tmp_path / "out", name="sinks")
    sinks = Sinks(study, tmp_path / "out", flush_rows=2, flush_seconds=1e9)
    assert "study: sinks" in (tmp_path / "out" / parquet.STUDY_FILE).read_text()
    assert sinks.writer is None and sinks.mlflow_summary() is None
    for cell_id in ("a", "b", "c"):
        row = empty_row()
        row.update(study="sinks", cell_id=cell_id, status="ok")
        sinks.add(row, [])
        if sinks.due():
            sinks.flush()
    assert parquet.read_results(tmp_path / "out").num_rows == 2  # "c" still buffered
    error = parquet.SinkWriteError(tmp_path, OSError(28, "No space left on device"), 4)
    assert "2 finished cell(s) of this run are saved, 1 more" in str(
        sinks.parquet.stopped(error))
    sinks.flush()
    assert parquet.read_results(tmp_path / "out").num_rows == 3
    sinks.close(status="FINISHED", summary=None, timeout=None)
    assert sinks.drain_wait_s == 0.0


class _RecordingLogger:
    """An MlflowLogger stand-in: records each log_rows batch and when it came."""
    tracking_uri, experiment_name = "fake://", "fake"

    def __init__(self):
        import threading
        self.batches, self.logged = [], threading.Event()

    def connect(self):
        pass

    def log_rows(self, rows, traces):
        self.batches.append([row["cell_id"] for row in rows])
        self.logged.set()

    def finish(self, status, summary):
        self.batches.append(status)


def test_the_writer_logs_the_last_rows_without_waiting_to_coalesce():
    """Rows coalesce for ``coalesce_s`` (a group's cells go out together); once the sweep
    says its last rows are sent, the writer logs what it has at once instead of waiting
    out the window (or for close()), so the drain starts while the driver stops its pool
    and writes its summary."""
    from hypersweep.io.tracking_sync import MlflowWriter

    logger = _RecordingLogger()
    writer = MlflowWriter(logger, coalesce_s=600.0).start()  # a window no test waits out
    writer.submit([{"cell_id": "a"}, {"cell_id": "b"}])
    writer.submit([{"cell_id": "c"}])
    assert not logger.logged.wait(0.3)  # still coalescing
    writer.last_rows_sent()
    assert logger.logged.wait(30.0), "the last rows waited for the coalescing window"
    assert logger.batches == [["a", "b", "c"]]
    writer.close(status="FINISHED")
    assert logger.batches == [["a", "b", "c"], "FINISHED"]
    assert writer.dropped == 0 and writer.error is None
