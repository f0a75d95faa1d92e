"""A sqlite MLflow store is written in WAL mode (``tracking.enable_sqlite_wal``): set on the
store's own connections only, off with ``$HYPERSWEEP_MLFLOW_SQLITE_WAL=0``, and what a run
logs is all there for another process (the reader the UI is) after the writer is gone."""
from __future__ import annotations

import datetime as dt
import sqlite3
import subprocess
import sys

import pytest

from hypersweep.io import tracking
from hypersweep.io.schema import empty_row

T0 = dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)


def _rows(study: str, n: int, groups: int = 10) -> list[dict]:
    out = []
    for i in range(n):
        row = empty_row()
        seed, t = i % groups, i // groups + 1
        row.update(study=study, pipeline="hypergradient_error", problem="ridge",
                   algorithm="aid_cg", backend="jax", dtype="float64", K=5, K_setting="5",
                   t=t, seed=seed, status="ok", attempt=1, problem_params="{}",
                   algorithm_params="{}", pipeline_params="{}", wall_time_s=0.1,
                   hypergrad_rel_error=1.0 / t, started_at=T0 + dt.timedelta(seconds=i),
                   finished_at=T0 + dt.timedelta(seconds=i + 0.1))
        row["cell_id"] = f"{study}.t{t}.s{seed}"
        out.append(row)
    return out


def _logger(uri: str, name: str) -> tracking.MlflowLogger:
    logger = tracking.MlflowLogger(uri, name, name, study_params={"output": name},
                                   artifact_root=tracking.default_artifact_root(uri))
    logger.connect()
    return logger


def _journal(path) -> str:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA journal_mode").fetchone()[0]


def test_a_sqlite_store_is_written_in_wal_mode(tmp_path):
    db = tmp_path / "mlflow.db"
    logger = _logger(f"sqlite:///{db}", "wal-on")
    assert logger.sqlite_wal
    assert logger.log_rows(_rows("wal-on", 20)) == 20
    assert _journal(db) == "wal"


def test_the_setting_off_keeps_sqlites_default_journal(tmp_path, monkeypatch):
    monkeypatch.setenv(tracking.SQLITE_WAL_ENV, "0")
    db = tmp_path / "off" / "mlflow.db"
    db.parent.mkdir()
    logger = _logger(f"sqlite:///{db}", "wal-off")
    assert not logger.sqlite_wal
    assert logger.log_rows(_rows("wal-off", 20)) == 20
    assert _journal(db) == "delete"


def test_other_sqlite_databases_of_the_process_are_untouched(tmp_path):
    """The listener is process-wide (SQLAlchemy's Engine class); it acts on the store's
    file only."""
    from sqlalchemy import create_engine, text

    tracking.enable_sqlite_wal(f"sqlite:///{tmp_path / 'store.db'}")
    other = tmp_path / "other.db"
    engine = create_engine(f"sqlite:///{other}")
    with engine.begin() as conn:
        conn.execute(text("create table t (x integer)"))
    engine.dispose()
    assert _journal(other) == "delete"


def test_non_sqlite_stores_are_left_alone():
    assert not tracking.enable_sqlite_wal("http://127.0.0.1:5000")
    assert not tracking.enable_sqlite_wal("file:///tmp/mlruns")


READER = """
import sys
from mlflow import MlflowClient
client = MlflowClient(tracking_uri=sys.argv[1])
exp = client.get_experiment_by_name(sys.argv[2])
runs = client.search_runs([exp.experiment_id], "tags.`hypersweep.role` = 'group'",
                          max_results=1000)
tags = sum(1 for r in runs for k in r.data.tags if k.startswith("hypersweep.t."))
points = sum(len(client.get_metric_history(r.info.run_id, "hypergrad_rel_error"))
             for r in runs)
print(len(runs), tags, points)
"""


@pytest.mark.slow
def test_a_thousand_cells_in_wal_mode_are_all_read_by_another_process(tmp_path):
    """1,000 cells in 10 children, logged in 20 batches of 50 (more than a writer flush)
    by a logger that is then closed; a separate process reading the store (as the UI
    does) sees every cell tag and metric point."""
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    logger = _logger(uri, "wal-scale")
    rows = _rows("wal-scale", 1000)
    for i in range(0, 1000, 50):
        assert logger.log_rows(rows[i:i + 50]) == 50
    logger.finish()
    assert _journal(db) == "wal"
    out = subprocess.run([sys.executable, "-c", READER, uri, "wal-scale"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["10", "1000", "1000"]
