"""One row per cell for any plain reader of ``OUTPUT/results/*.parquet`` (issue #14,
results): when a run starts and ends, parts holding superseded rows are compacted — their
latest rows into one new part, older attempts into ``history/`` — and a kill at any step
of it loses no latest row."""
from __future__ import annotations

import datetime as dt
import os
import shutil
from collections import Counter
from pathlib import Path

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest

import sweep_test_pipeline
from hypersweep.io import parquet
from hypersweep.io.schema import empty_row, empty_trace
from hypersweep.orchestrator import driver
from hypersweep.orchestrator.cell import Cell, canonical_json, failure_row
from hypersweep.orchestrator.sweep import Sweep

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


def _row(cell: int, at: int, status: str = "ok") -> dict:
    row = empty_row()
    row.update(study="compact", cell_id=f"c{cell:04d}", status=status,
               finished_at=T0 + dt.timedelta(seconds=at))
    return row


def _traces(cell: int, steps: int) -> list[dict]:
    return [dict(empty_trace(), study="compact", cell_id=f"c{cell:04d}", step=step,
                 val_loss=float(steps)) for step in range(steps)]


def _count(glob: Path) -> int:
    return duckdb.sql(f"select count(*) from '{glob}'").fetchall()[0][0]


def _write(output: Path, rows: list[tuple[int, int, str, int]], flush_rows: int) -> None:
    """(cell, finished_at second, status, trace steps) rows through a ParquetSink."""
    sink = parquet.ParquetSink(output, flush_rows=flush_rows, flush_seconds=1e9)
    for cell, at, status, steps in rows:
        sink.add(_row(cell, at, status), _traces(cell, steps))
        if sink.due():
            sink.flush()
    sink.flush()


N_CELLS, FLUSH = 320, 20
RETRIED = [*range(0, 8), *range(150, 154)]  # in parts 0 and 7 of 16


def _study_parts(output: Path) -> None:
    """320 cells in 16 parts (each with 2 trace steps; the retried ones failed with
    none), then a later run's retries of 12 of them (ok, 3 steps) in one more part."""
    first = [(c, c, "error" if c in RETRIED else "ok", 0 if c in RETRIED else 2)
             for c in range(N_CELLS)]
    _write(output, first, FLUSH)
    _write(output, [(c, 1000 + c, "ok", 3) for c in RETRIED], FLUSH)


def test_compaction_counts_each_cell_once_and_rewrites_only_parts_with_retried_cells(
        tmp_path):
    _study_parts(tmp_path)
    results, traces = tmp_path / "results", tmp_path / "traces"
    before = sorted(p.name for p in results.glob("*.parquet"))
    assert len(before) == N_CELLS // FLUSH + 1
    assert _count(results / "*.parquet") == N_CELLS + len(RETRIED)  # what a plain read sees

    done = parquet.compact(tmp_path)
    assert _count(results / "*.parquet") == N_CELLS
    assert pl.read_parquet(results / "*.parquet")["cell_id"].n_unique() == N_CELLS
    # only the parts holding a superseded row were rewritten; the 14 others stay as they are
    after = sorted(p.name for p in results.glob("*.parquet"))
    replaced = {before[0], before[7], before[-1]}
    assert set(after) - set(done["results"].new_parts) == set(before) - replaced
    assert (done["results"].parts_replaced, done["results"].rows_kept,
            done["results"].rows_to_history) == (3, 2 * FLUSH, len(RETRIED))
    # the attempts they replaced are in history/, each under its source's name
    history = tmp_path / parquet.HISTORY_DIR / "results"
    assert sorted(p.name for p in history.glob("*.parquet")) == [before[0], before[7]]
    old = duckdb.sql(f"select cell_id, status from '{history}/*.parquet'").fetchall()
    assert sorted(old) == [(f"c{c:04d}", "error") for c in RETRIED]
    latest = {r["cell_id"]: r for r in parquet.read_results(tmp_path).to_pylist()}
    assert len(latest) == N_CELLS and {latest[f"c{c:04d}"]["status"] for c in RETRIED} == {"ok"}
    every = parquet.read_results(tmp_path, latest=False)
    assert every.num_rows == N_CELLS + len(RETRIED)
    assert Counter(every.column("cell_id").to_pylist())["c0000"] == 2

    # traces: the retried cells' new runs (3 steps) are the only ones left for them; the
    # failed attempts had none, so nothing of theirs goes to history
    assert _count(traces / "*.parquet") == 2 * (N_CELLS - len(RETRIED)) + 3 * len(RETRIED)
    assert done["traces"].rows_to_history == 0
    assert parquet.read_traces(tmp_path).num_rows == _count(traces / "*.parquet")

    again = parquet.compact(tmp_path)
    assert not again["results"].changed and not again["traces"].changed


def test_superseded_traces_go_to_history(tmp_path):
    _write(tmp_path, [(c, c, "diverged", 2) for c in range(4)], flush_rows=2)
    _write(tmp_path, [(c, 100 + c, "ok", 5) for c in (1, 2)], flush_rows=10)
    parquet.compact(tmp_path)
    current = duckdb.sql(f"select cell_id, count(*) from '{tmp_path}/traces/*.parquet' "
                         "group by cell_id order by cell_id").fetchall()
    assert current == [("c0000", 2), ("c0001", 5), ("c0002", 5), ("c0003", 2)]
    old = duckdb.sql(f"select cell_id, count(*) from "
                     f"'{tmp_path}/history/traces/*.parquet' group by cell_id "
                     "order by cell_id").fetchall()
    assert old == [("c0001", 2), ("c0002", 2)]
    assert parquet.read_traces(tmp_path, latest=False).num_rows == 2 * 4 + 5 * 2


class _Killed(BaseException):
    """A SIGKILL at a file-system step: nothing after it runs, not even cleanups."""


def _kill_at(monkeypatch, step: int) -> dict:
    """Make the ``step``-th rename or delete (counting from 1) kill the process."""
    state = {"calls": 0, "killed": False, "replace": os.replace, "unlink": os.unlink}

    def wrap(real):
        def call(*args, **kwargs):
            state["calls"] += 1
            if state["killed"] or state["calls"] == step:
                state["killed"] = True
                raise _Killed()
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(os, "replace", wrap(os.replace))
    monkeypatch.setattr(os, "unlink", wrap(os.unlink))
    return state


def _small_study(output: Path) -> dict[str, str]:
    """10 cells in 3 parts, 4 of them retried (2 failed twice); their latest statuses."""
    _write(output, [(c, c, "error" if c in (1, 2, 5, 8) else "ok", 1) for c in range(10)],
           flush_rows=4)
    _write(output, [(1, 100, "error", 2), (5, 101, "ok", 2)], flush_rows=10)
    _write(output, [(1, 200, "ok", 3), (2, 201, "ok", 3), (8, 202, "ok", 3)], flush_rows=10)
    return {r["cell_id"]: r["status"] for r in parquet.read_results(output).to_pylist()}


def test_a_kill_at_any_step_of_a_compaction_loses_no_latest_row(tmp_path, monkeypatch):
    # fsync is not what is tested here (a kill, not a power cut): skip its cost
    monkeypatch.setattr(parquet.os, "fsync", lambda fd: None)
    monkeypatch.setattr(parquet, "_fsync_dir", lambda directory: None)
    original = tmp_path / "original"
    expected = _small_study(original)
    reference = tmp_path / "reference"
    shutil.copytree(original, reference)
    parquet.compact(reference)
    history = sorted(duckdb.sql(f"select cell_id, status, finished_at from "
                                f"'{reference}/history/results/*.parquet'").fetchall())
    traces = parquet.read_traces(reference).num_rows
    step = 0
    while True:
        step += 1
        output = tmp_path / f"kill-{step}"
        shutil.copytree(original, output)
        state = _kill_at(monkeypatch, step)
        try:
            parquet.compact(output)
        except _Killed:
            pass
        monkeypatch.setattr(os, "replace", state["replace"])
        monkeypatch.setattr(os, "unlink", state["unlink"])
        if not state["killed"]:
            break  # the compaction has fewer steps than this: every kill point was tried
        # killed: every cell still reads back at its latest status, each once
        assert {r["cell_id"]: r["status"]
                for r in parquet.read_results(output).to_pylist()} == expected, step
        assert parquet.read_traces(output).num_rows == traces, step
        # the next run's compaction repairs it, exactly: nothing twice, nothing lost
        parquet.compact(output)
        assert _count(output / "results" / "*.parquet") == len(expected), step
        assert sorted(duckdb.sql(f"select cell_id, status, finished_at from "
                                 f"'{output}/history/results/*.parquet'").fetchall()
                      ) == history, step
        assert _count(output / "traces" / "*.parquet") == traces, step
    assert step > 6  # history writes, the new parts, the deletions


def _study(output: Path, **fields):
    return sweep_test_pipeline.study(output, name="compact", num_actors=1, **fields)


def _cells(n: int, **params) -> list[Cell]:
    return [Cell(study="compact", pipeline="sweep_test", problem="toy", algorithm="probe",
                 backend="none", t=1, K=None, seed=seed,
                 pipeline_params=canonical_json(params)) for seed in range(n)]


def test_a_run_start_repairs_duplicates_left_by_a_killed_run(tmp_path):
    """Rows appended by a run killed before its compaction: the next run, with nothing
    left to do (no Ray), compacts them first thing."""
    cells, output = _cells(4), tmp_path / "out"
    earlier = parquet.ParquetSink(output)
    for cell in cells:
        earlier.add(failure_row(cell, 1, "error", "first"))
    earlier.flush()
    for cell in cells[:2]:
        earlier.add(failure_row(cell, 1, "ok", "retried"))
    earlier.flush()
    assert _count(output / "results" / "*.parquet") == 6
    summary = driver.run_cells(_study(output), cells, quiet=True)
    assert summary["cells_done"] == 0
    assert _count(output / "results" / "*.parquet") == len(cells)
    assert _count(output / "history" / "results" / "*.parquet") == 2


@pytest.mark.parametrize("ending", ["stopped", "raised"])
def test_a_run_that_stops_or_fails_compacts_what_it_wrote(tmp_path, monkeypatch, ending):
    """A run stopped by a signal (its loop returns False) or failing in its loop still
    compacts the retries it recorded (no Ray: the loop is replaced by one that records)."""
    cells, output = _cells(3), tmp_path / "out"
    earlier = parquet.ParquetSink(output)
    for cell in cells:
        earlier.add(failure_row(cell, 1, "error", "first"))
    earlier.flush()

    def loop(self):
        for cell in cells[:2]:
            self._record(failure_row(cell, 1, "ok", "retried"), [])
        if ending == "raised":
            raise RuntimeError("the loop failed")
        return False

    monkeypatch.setattr(Sweep, "_start_pool", lambda self: None)
    monkeypatch.setattr(Sweep, "_loop", loop)
    study = _study(output)
    if ending == "raised":
        with pytest.raises(RuntimeError):
            driver.run_cells(study, cells, quiet=True, retry_failed=True)
    else:
        assert driver.run_cells(study, cells, quiet=True, retry_failed=True)["interrupted"]
    rows = duckdb.sql(f"select cell_id, status from '{output}/results/*.parquet'").fetchall()
    assert sorted(rows) == sorted([(c.cell_id, "ok") for c in cells[:2]]
                                  + [(cells[2].cell_id, "error")])
    assert _count(output / "history" / "results" / "*.parquet") == 2


@pytest.mark.ray
def test_a_cell_that_fails_then_succeeds_on_retry_is_counted_once(ray_session, tmp_path):
    """The acceptance of issue #14: after a study whose cell crashed and then succeeded
    on ``--retry-failed``, duckdb counts each cell once in ``OUTPUT/results``."""
    marker = tmp_path / "markers"
    marker.mkdir()
    cells, output = _cells(5, crash_once_seeds=[2], marker_dir=str(marker)), tmp_path / "out"
    study = _study(output, max_retries=0)  # the crash is recorded, not retried at once
    # alone in its runner, so the crash is charged to it (not re-sent as a bystander's)
    first = driver.run_cells(study, [cells[2]], quiet=True)
    assert first["counts"]["crashed"] == 1
    again = driver.run_cells(study, cells, quiet=True, retry_failed=True)
    assert again["cells_done"] == len(cells) and again["counts"]["ok"] == len(cells)
    glob = output / "results" / "*.parquet"
    assert duckdb.sql(f"select count(*) from '{glob}'").fetchall()[0][0] == len(cells)
    assert duckdb.sql(f"select count(distinct status) from '{glob}'").fetchall() == [(1,)]
    old = pq.read_table(output / "history" / "results").to_pylist()
    assert [(r["cell_id"], r["status"]) for r in old] == [(cells[2].cell_id, "crashed")]
    assert parquet.read_results(output, latest=False).num_rows == len(cells) + 1
