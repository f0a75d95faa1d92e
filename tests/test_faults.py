"""Fault tolerance on a real local Ray: errors, divergence, crashes, timeouts, SIGKILL and
SIGTERM of the driver. The sweep must always go on, and the Parquet read back must hold
every cell exactly once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hypersweep.io import parquet
from hypersweep.io.schema import FAILED_STATUSES
from hypersweep.orchestrator import driver
from hypersweep.orchestrator.cell import Cell, canonical_json, failure_row

import sweep_test_pipeline  # noqa: E402 - on sys.path via conftest

pytestmark = pytest.mark.ray


# How late past cell_timeout_s a timeout row may be recorded (see its use).
TIMEOUT_SLACK_S = 1.0


def _study(output: Path, **overrides):
    return sweep_test_pipeline.study(output, name="faults", backend=("jax",), **overrides)


def _cells(seeds, params: dict, *, t=(1,), study="faults") -> list[Cell]:
    return [Cell(study=study, pipeline="sweep_test", problem="toy", algorithm="probe",
                 backend="jax", t=t_, K=None, seed=seed, pipeline_params=canonical_json(params))
            for t_ in t for seed in seeds]


def test_every_failure_kind_is_recorded_and_the_sweep_goes_on(ray_session, tmp_path):
    params = dict(raise_seeds=[1], nan_seeds=[2], crash_seeds=[3], crash_once_seeds=[4],
                  marker_dir=str(tmp_path), hang_seeds=[5], hang_s=120)
    cells = _cells(range(8), params)
    # The real pipeline with a step size far above 2/L: the inner iterates blow up.
    diverging = Cell(study="faults", pipeline="hypergradient_error", problem="ridge",
                     algorithm="itd", backend="jax", t=50, K=None, seed=0,
                     problem_params=canonical_json({"inner_lr": 10.0, "n_features": 5,
                                                    "n_train": 20, "n_val": 10}))
    cells.append(diverging)
    study = _study(tmp_path / "out", cell_timeout_s=4.0)

    summary = driver.run_cells(study, cells, quiet=True)

    table = parquet.read_results(tmp_path / "out")
    rows = {r["cell_id"]: r for r in table.to_pylist()}
    assert set(rows) == {c.cell_id for c in cells}
    by_seed = {c.seed: rows[c.cell_id] for c in cells if c.pipeline == "sweep_test"}
    assert [by_seed[s]["status"] for s in range(8)] == [
        "ok", "error", "diverged", "crashed", "ok", "timeout", "ok", "ok"]
    assert "injected failure" in by_seed[1]["error_message"]
    assert by_seed[3]["attempt"] == 2  # max_retries=1: two attempts, then "crashed"
    assert "died" in by_seed[3]["error_message"]
    # Seed 4 killed its process once (the marker proves it), then ran fine. Its attempt
    # is 2 if it was alone on its actor when it died, else 1 (not charged, see driver).
    assert (tmp_path / f"{cells[4].cell_id}.crashed").exists()
    assert by_seed[4]["attempt"] in (1, 2) and by_seed[4]["hypergrad_rel_error"] == \
        sweep_test_pipeline.expected_rel_error(1, None, 4)
    assert "cell_timeout_s=4" in by_seed[5]["error_message"]
    # The driver records a timeout once the head cell has run (driver clock, from when it
    # became its actor's head) *more* than cell_timeout_s: > 4.0 is guaranteed. Its
    # ray.wait sleeps until that deadline + 10 ms (never longer than POLL_S = 0.2 s), so
    # the row says 4.01-4.2 s (measured 4.009-4.010 s, also with a core kept busy). The
    # 1 s of slack is for a driver descheduled on a loaded 2-core box; a check firing
    # early, or only after some unrelated event, fails.
    assert 4.0 < by_seed[5]["wall_time_s"] < 4.0 + TIMEOUT_SLACK_S, by_seed[5]["wall_time_s"]
    assert by_seed[0]["hypergrad_rel_error"] == sweep_test_pipeline.expected_rel_error(
        1, None, 0)
    assert rows[diverging.cell_id]["status"] == "diverged"
    # Charged retries: seed 3 once; seed 4 once or not at all. Seeds 0-2 sharing an
    # actor with a crash are never charged.
    assert summary["retries"] == 1 + (by_seed[4]["attempt"] - 1)
    assert all(by_seed[s]["attempt"] == 1 for s in (0, 1, 2, 5, 6, 7))
    assert summary["counts"] == {"ok": 4, "error": 1, "diverged": 2, "timeout": 1,
                                 "crashed": 1}

    # Resume skips every recorded cell; retry_failed re-runs exactly the failed ones.
    subset = [cells[0], cells[1], cells[2]]  # ok, error, diverged
    assert driver.run_cells(study, subset, quiet=True)["cells_skipped"] == 3
    rerun = driver.run_cells(study, subset, quiet=True, retry_failed=True)
    assert rerun["cells_skipped"] == 1 and rerun["cells_done"] == 2
    assert rerun["counts"]["error"] == 1 and rerun["counts"]["diverged"] == 1
    assert parquet.read_results(tmp_path / "out").num_rows == len(cells)


def test_retry_failed_reruns_every_failed_status_and_no_ok_cell(ray_session, tmp_path):
    """One earlier row per status: a resume skips them all; ``retry_failed`` re-runs exactly
    the cells whose latest row has a status in ``FAILED_STATUSES`` (whatever that tuple
    holds), and they now succeed."""
    statuses = ("ok", *FAILED_STATUSES)
    cells = _cells(range(len(statuses)), {})  # healthy cells: a re-run gives "ok"
    output = tmp_path / "out"
    earlier = parquet.ParquetSink(output)
    for cell, status in zip(cells, statuses):
        earlier.add(failure_row(cell, 1, status, f"earlier {status}"))
    earlier.flush()
    study = _study(output)

    resumed = driver.run_cells(study, cells, quiet=True)
    assert resumed["cells_skipped"] == len(cells) and resumed["cells_done"] == 0

    rerun = driver.run_cells(study, cells, quiet=True, retry_failed=True)
    assert rerun["cells_skipped"] == 1 and rerun["cells_done"] == len(FAILED_STATUSES)
    latest = {r["cell_id"]: r for r in parquet.read_results(output).to_pylist()}
    by_status = {status: latest[cell.cell_id] for cell, status in zip(cells, statuses)}
    for status, row in by_status.items():
        assert row["status"] == "ok", (status, row["error_message"])
        # re-run, not the earlier row: a real result (the ok one was left alone)
        assert (row["error_message"] == "earlier ok") == (status == "ok"), status
    assert parquet.read_results(output, latest=False).num_rows == \
        len(cells) + len(FAILED_STATUSES)


SCRIPT = textwrap.dedent("""
    import json, sys, logging
    sys.path.insert(0, {tests!r})
    import sweep_test_pipeline
    from hypersweep.orchestrator import cell as C, driver, signals, sweep
    sweep.FLUSH_ROWS, sweep.FLUSH_SECONDS = {flush_rows}, {flush_seconds}
    cells = [C.Cell(study="kill", pipeline="sweep_test", problem="toy", algorithm="probe",
                    backend="none", t=1, K=None, seed=s,
                    pipeline_params=C.canonical_json({params}))
             for s in range({n})]
    study = sweep_test_pipeline.study({output!r}, name="kill", num_actors=2,
        mlflow={{"enabled": {mlflow_on}, "tracking_uri": {uri!r}, "experiment": None}})
    try:
        summary = driver.run_study(study, quiet=True, cells=cells)
    except signals.SweepInterrupted as exc:
        sys.exit(exc.exit_code)
    print(json.dumps(summary["counts"]))
""")


def _driver_process(tmp_path: Path, *, n: int, params: dict, flush_rows: int = 50,
                    flush_seconds: float = 2.0, mlflow_uri: str | None = None):
    script = SCRIPT.format(tests=str(Path(__file__).parent), flush_rows=flush_rows,
                           flush_seconds=flush_seconds, params=params, n=n,
                           output=str(tmp_path / "out"), mlflow_on=mlflow_uri is not None,
                           uri=mlflow_uri or "")
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    # Its own session, so the Ray it starts can be reaped by process group afterwards.
    # Files, not pipes: Ray's worker-death notices could fill a pipe and block the driver.
    stdout = open(tmp_path / "driver.out", "ab")
    stderr = open(tmp_path / "driver.err", "ab")
    return subprocess.Popen([sys.executable, "-c", script], env=env, cwd=tmp_path,
                            stdout=stdout, stderr=stderr, start_new_session=True)


def _reap(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_sigkill_of_the_driver_then_rerun_gives_each_cell_once(tmp_path):
    n = 60
    done_dir = tmp_path / "done"
    done_dir.mkdir()
    params = {"sleep_s": 0.1, "done_dir": str(done_dir)}
    results = tmp_path / "out" / "results"
    proc = _driver_process(tmp_path, n=n, params=params, flush_rows=5, flush_seconds=0.5)
    try:
        _wait_for(lambda: len(list(results.glob("part-*.parquet"))) >= 2, 120,
                  "two Parquet parts")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        _reap(proc)
    before = parquet.read_results(tmp_path / "out")
    assert 0 < before.num_rows < n, "the kill should land mid-sweep"

    proc = _driver_process(tmp_path, n=n, params=params)
    try:
        proc.wait(180)
    finally:
        _reap(proc)
    assert proc.returncode == 0, (tmp_path / "driver.err").read_text()[-3000:]
    out = (tmp_path / "driver.out").read_text().strip().splitlines()[-1]
    assert json.loads(out)["ok"] == n - before.num_rows
    for part in results.glob("*.parquet"):
        pq.read_table(part)  # no corrupt visible file
    table = parquet.read_results(tmp_path / "out")
    ids = table.column("cell_id").to_pylist()
    assert len(ids) == len(set(ids)) == n
    assert set(table.column("status").to_pylist()) == {"ok"}
    # Finished-before-the-kill cells were not run again.
    assert set(before.column("cell_id").to_pylist()) <= set(ids)


def test_sigterm_flushes_finished_rows_and_exits_promptly(tmp_path, mlflow_sqlite):
    from mlflow import MlflowClient

    done_dir = tmp_path / "done"
    done_dir.mkdir()
    params = {"sleep_s": 0.2, "done_dir": str(done_dir)}
    # No flush before the signal: every row in Parquet afterwards is the SIGTERM flush.
    proc = _driver_process(tmp_path, n=200, params=params, flush_rows=10**6,
                           flush_seconds=1e6, mlflow_uri=mlflow_sqlite)
    client = MlflowClient(tracking_uri=mlflow_sqlite)

    def parent_started():
        if not Path(mlflow_sqlite[len("sqlite:///"):]).exists():
            return False
        try:
            experiment = client.get_experiment_by_name("kill")
            return experiment is not None and bool(client.search_runs(
                [experiment.experiment_id], "tags.`hypersweep.role` = 'parent'"))
        except Exception:  # noqa: BLE001 - database still being created
            return False

    try:
        _wait_for(lambda: len(list(done_dir.iterdir())) >= 4, 120, "four finished cells")
        _wait_for(parent_started, 60, "the MLflow parent run")
        finished_before = len(list(done_dir.iterdir()))
        assert not list((tmp_path / "out" / "results").glob("*.parquet"))
        sent = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(15)
        exit_s = time.monotonic() - sent
    finally:
        _reap(proc)
    assert proc.returncode == 128 + signal.SIGTERM
    # `ray job stop` waits 3 s before SIGKILL; allow slack for this loaded 2-core box.
    assert exit_s < 6.0, exit_s
    table = parquet.read_results(tmp_path / "out")
    # Every cell finished before the signal is saved (a cell may finish in its actor
    # while the signal is handled, hence <= for the upper bound).
    assert finished_before <= table.num_rows <= len(list(done_dir.iterdir()))
    experiment = client.get_experiment_by_name("kill")
    parent = client.search_runs([experiment.experiment_id],
                                "tags.`hypersweep.role` = 'parent'")[0]
    assert parent.info.status == "KILLED"


def test_a_failing_ray_stop_costs_a_warning_not_the_summary_or_mlflow(
        ray_session, tmp_path, mlflow_sqlite, caplog):
    """The last study stops the session's Ray before its MLflow drain
    (``driver._Session.release_ray``); if that stop raises, the study still ends with its
    summary and every row in Parquet and MLflow."""
    import threading

    from hypersweep.orchestrator.sweep import Sweep

    def failing_stop():
        raise RuntimeError("ray.shutdown failed")

    cells = _cells(range(60), {}, t=(1, 2))  # 120 cells: more than a Parquet flush
    study = _study(tmp_path / "out", num_actors=2,
                   mlflow={"enabled": True, "tracking_uri": mlflow_sqlite})
    sweep = Sweep(study, cells, total=len(cells), quiet=True, retry_failed=False,
                  stop_event=threading.Event(), ensure_ray=lambda: None,
                  release_ray=failing_stop)
    with caplog.at_level("WARNING"):
        summary = sweep.run()
    assert summary["counts"]["ok"] == 120 and not summary["interrupted"]
    assert summary["mlflow"]["cells_logged"] == 120 and summary["mlflow"]["dropped"] == 0
    assert parquet.read_results(tmp_path / "out").num_rows == 120
    assert "stopping Ray failed (RuntimeError: ray.shutdown failed)" in caplog.text
