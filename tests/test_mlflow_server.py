"""MLflow over HTTP against a real `mlflow server` that dies mid-sweep.

The sweep must finish with complete Parquet and exactly one warning; after the server
comes back (same sqlite backend), ``sync_mlflow`` must log exactly the missing cells, and
a second sync nothing.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest

import sweep_test_pipeline
from hypersweep.io import tracking, tracking_sync
from hypersweep.io.parquet import read_results
from hypersweep.orchestrator import driver, sweep
from hypersweep.orchestrator.cell import Cell, canonical_json

pytestmark = pytest.mark.ray

T_VALUES = (1, 2, 3, 4)
SEEDS = range(10)


def _logged_cells(client, experiment_id: str) -> dict[str, dict]:
    """run name -> {cell tags} for every child run."""
    runs = client.search_runs([experiment_id], "tags.`hypersweep.role` = 'group'")
    return {run.info.run_id: {k: v for k, v in run.data.tags.items()
                              if k.startswith(tracking.TAG_CELL_PREFIX)} for run in runs}


def test_server_outage_then_sync_backfills_exactly_the_missing_cells(
        ray_session, mlflow_server, tmp_path, monkeypatch, caplog):
    from mlflow import MlflowClient

    monkeypatch.setattr(sweep, "FLUSH_SECONDS", 0.5)
    params = canonical_json({"sleep_s": 0.4})
    cells = [Cell(study="srv", pipeline="sweep_test", problem="toy", algorithm="probe",
                  backend="jax", t=t, K=None, seed=seed, pipeline_params=params)
             for seed in SEEDS for t in T_VALUES]
    study = sweep_test_pipeline.study(
        tmp_path / "out", name="srv", num_actors=2,
        mlflow={"enabled": True, "tracking_uri": mlflow_server.uri, "experiment": "srv-exp"})
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    stopped = threading.Event()

    def stop_server_once_some_cells_are_logged():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                experiment = client.get_experiment_by_name("srv-exp")
                if experiment and any(_logged_cells(client, experiment.experiment_id)
                                      .values()):
                    break
            except Exception:  # noqa: BLE001 - not created yet
                pass
            time.sleep(0.1)
        # An abrupt outage: SIGKILL, no graceful shutdown.
        os.killpg(mlflow_server.proc.pid, signal.SIGKILL)
        mlflow_server.proc.wait(10)
        stopped.set()

    stopper = threading.Thread(target=stop_server_once_some_cells_are_logged, daemon=True)
    stopper.start()
    with caplog.at_level(logging.WARNING):
        started = time.monotonic()
        summary = driver.run_cells(study, cells, quiet=True)
        elapsed = time.monotonic() - started
    stopper.join(5)
    assert stopped.is_set(), "the server was never stopped: no cell reached MLflow"

    assert summary["counts"]["ok"] == len(cells)
    assert read_results(tmp_path / "out").num_rows == len(cells)
    assert summary["mlflow"]["error"] is not None
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "MLflow" in warnings[0].getMessage(), warnings
    # Cells: 40 × 0.4 s on 2 actors = 8 s; a hung MLflow client would add minutes.
    assert elapsed < 60, elapsed

    mlflow_server.start()
    experiment = client.get_experiment_by_name("srv-exp")
    logged_before = sum(len(tags) for tags in
                        _logged_cells(client, experiment.experiment_id).values())
    assert 0 < logged_before < len(cells), "the outage should land mid-sweep"

    first = tracking_sync.sync_mlflow(tmp_path / "out", tracking_uri=mlflow_server.uri)
    assert first["logged"] == len(cells) - logged_before
    assert first["already_logged"] == logged_before
    children = client.search_runs([experiment.experiment_id],
                                  "tags.`hypersweep.role` = 'group'")
    assert len(children) == len(SEEDS)  # one run per seed, t is the step
    for child in children:
        history = client.get_metric_history(child.info.run_id, "hypergrad_rel_error")
        assert sorted(m.step for m in history) == list(T_VALUES)  # each once
    parents = client.search_runs([experiment.experiment_id],
                                 "tags.`hypersweep.role` = 'parent'")
    assert len(parents) == 1
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}

    second = tracking_sync.sync_mlflow(tmp_path / "out", tracking_uri=mlflow_server.uri)
    assert second["logged"] == 0 and second["already_logged"] == len(cells)
    assert second["runs_created"] == 0
