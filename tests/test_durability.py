"""Durability of a study's output (issue #9, parts 2-4): a disk that refuses writes never
drops a finished cell silently, an unreadable Parquet part is quarantined and its cells
re-run, and two drivers on one output never both run it."""
from __future__ import annotations

import errno
import io
import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import sweep_test_pipeline
from hypersweep.io import lock, parquet
from hypersweep.orchestrator import driver, sweep
from hypersweep.orchestrator.cell import Cell, canonical_json

pytestmark = pytest.mark.ray


def _study(output: Path, name: str = "durable"):
    return sweep_test_pipeline.study(output, name=name, num_actors=2)


def _cells(n: int, name: str = "durable") -> list[Cell]:
    return [Cell(study=name, pipeline="sweep_test", problem="toy", algorithm="probe",
                 backend="none", t=1, K=None, seed=seed, pipeline_params=canonical_json({}))
            for seed in range(n)]


def _tmp_files(output: Path) -> list[Path]:
    return [p for d in (parquet.RESULTS_DIR, parquet.TRACES_DIR) for p in
            (output / d).glob(".*")]


def _once_each(output: Path, cells: list[Cell]) -> None:
    """Every cell exactly once on disk (all rows, not only the latest), every one ok."""
    rows = parquet.read_results(output, latest=False)
    counts = Counter(rows.column("cell_id").to_pylist())
    assert set(counts) == {c.cell_id for c in cells}
    assert set(counts.values()) == {1}, [k for k, v in counts.items() if v > 1]
    assert set(rows.column("status").to_pylist()) == {"ok"}


def _fail_after(monkeypatch, parts: int, code: int = errno.ENOSPC) -> dict:
    """Make the Parquet writer fail with ``code`` once ``parts`` parts are written: the
    failing call leaves half a file behind, as a full disk does."""
    state = {"written": 0, "failures": 0}
    real = parquet.pq.write_table

    def write_table(table, where, **kwargs):
        if state["written"] >= parts:
            state["failures"] += 1
            where.write(b"PAR1 half a part")
            raise OSError(code, os.strerror(code))
        real(table, where, **kwargs)
        state["written"] += 1

    monkeypatch.setattr(parquet.pq, "write_table", write_table)
    return state


def test_a_persistent_write_failure_stops_the_sweep_and_a_rerun_loses_nothing(
        ray_session, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "FLUSH_ROWS", 4)
    cells, output = _cells(40), tmp_path / "out"
    state = _fail_after(monkeypatch, parts=3)

    with pytest.raises(parquet.SinkWriteError) as caught:
        driver.run_cells(_study(output), cells, quiet=True)
    message = str(caught.value)
    saved = parquet.read_results(output).num_rows
    assert "\n" not in message
    assert message.startswith(f"cannot write to {output / parquet.RESULTS_DIR} "
                              "(ENOSPC: No space left on device) after 4 attempt(s)"), message
    assert f"{saved} finished cell(s) of this run are saved" in message, message
    assert 0 < saved < len(cells) and state["failures"] == 4
    summary = caught.value.summary
    unsaved = summary["cells_done"] - saved
    assert unsaved > 0 and f", {unsaved} more finished but could not be saved" in message
    assert not _tmp_files(output), _tmp_files(output)
    assert not (output / lock.LOCK_FILE).exists()  # released on the error path

    monkeypatch.undo()  # the disk has room again
    monkeypatch.setattr(sweep, "FLUSH_ROWS", 4)
    rerun = driver.run_cells(_study(output), cells, quiet=True)
    assert rerun["cells_skipped"] == saved and rerun["cells_done"] == len(cells) - saved
    _once_each(output, cells)


def test_a_write_that_fails_then_recovers_keeps_every_row(ray_session, tmp_path,
                                                          monkeypatch):
    monkeypatch.setattr(sweep, "FLUSH_ROWS", 4)
    cells, output = _cells(20), tmp_path / "out"
    real = parquet.pq.write_table
    calls = {"n": 0}

    def flaky(table, where, **kwargs):  # every other call fails once
        calls["n"] += 1
        if calls["n"] % 2:
            raise OSError(errno.EIO, "transient")
        real(table, where, **kwargs)

    monkeypatch.setattr(parquet.pq, "write_table", flaky)
    summary = driver.run_cells(_study(output), cells, quiet=True)
    assert summary["cells_done"] == len(cells)
    _once_each(output, cells)
    assert not _tmp_files(output)


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                             str(where)], check=False, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {result.stderr.strip()}")


def test_a_real_full_tmpfs(ray_session, tmp_path, monkeypatch):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "2m")
    try:
        monkeypatch.setattr(sweep, "FLUSH_ROWS", 4)
        output = disk / "out"
        filler = disk / "filler"
        # Leave ~96 KiB free: a few parts fit, then ENOSPC.
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        filler.write_bytes(b"\0" * (free - 96 * 1024))
        cells = _cells(80)
        with pytest.raises(parquet.SinkWriteError, match="ENOSPC") as caught:
            driver.run_cells(_study(output), cells, quiet=True)
        saved = parquet.read_results(output).num_rows
        assert 0 < saved < len(cells), saved
        assert f"{saved} finished cell(s) of this run are saved" in str(caught.value)
        assert not _tmp_files(output), _tmp_files(output)
        filler.unlink()
        rerun = driver.run_cells(_study(output), cells, quiet=True)
        assert rerun["cells_done"] == len(cells) - saved
        _once_each(output, cells)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


N_Q = 8  # 4 t × 2 seeds


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "hypersweep", *args], check=False, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_corrupt_and_empty_parts_are_quarantined_and_their_cells_rerun(ray_session, tmp_path,
                                                                       monkeypatch, caplog):
    from hypersweep import cli

    output = tmp_path / "out"
    study = tmp_path / "study.yaml"
    study.write_text(sweep_test_pipeline.ridge_study_yaml(
        "quarantine-test", output=output, t="[1, 2, 3, 4]", seeds=2,
        more="resources: {num_cpus: 1}\nmlflow: {enabled: false}"))
    monkeypatch.setattr(sweep, "FLUSH_ROWS", 3)
    monkeypatch.setattr(sweep, "FLUSH_SECONDS", 1e6)
    assert cli.main(["run", str(study), "--quiet"]) == 0
    parts = sorted((output / parquet.RESULTS_DIR).glob("*.parquet"))
    assert len(parts) >= 3, parts
    truncated, emptied = parts[0], parts[1]
    lost = {c for p in (truncated, emptied) for c in pq.read_table(p).column(
        "cell_id").to_pylist()}
    truncated_rows = pq.read_metadata(truncated).num_rows
    data = truncated.read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    emptied.write_bytes(b"")
    quarantine = output / parquet.QUARANTINE_DIR / parquet.RESULTS_DIR

    status = _cli("status", str(output))
    assert status.returncode == 0, status.stderr
    assert f"{output}: {N_Q - len(lost)} cells" in status.stdout, status.stdout
    for part in (truncated, emptied):
        assert f"unreadable Parquet part {part} (" in status.stderr, status.stderr
        assert (quarantine / part.name).exists() and not part.exists()
    assert "0 row(s) lost" in status.stderr  # no footer left to count them
    assert truncated_rows > 0

    report = _cli("report", str(output), "--out", str(tmp_path / "report"), "--no-mlflow")
    assert report.returncode == 0, report.stderr[-3000:]

    caplog.set_level(logging.INFO, logger="hypersweep")
    before = parquet.read_results(output).num_rows
    printed = io.StringIO()
    monkeypatch.setattr(sys, "stdout", printed)
    assert cli.main(["run", str(study), "--quiet"]) == 0
    monkeypatch.undo()
    assert f"{len(lost)} cells run, {before} skipped" in printed.getvalue(), printed.getvalue()
    rows = parquet.read_results(output, latest=False)
    counts = Counter(rows.column("cell_id").to_pylist())
    assert len(counts) == N_Q and set(counts.values()) == {1}
    assert set(rows.column("status").to_pylist()) == {"ok"}


def test_an_empty_trace_part_is_quarantined_and_the_others_read(tmp_path):
    import pyarrow as pa

    from hypersweep.io.schema import TRACE_SCHEMA, empty_trace

    traces = tmp_path / parquet.TRACES_DIR
    for cell_id in ("a", "b"):
        rows = [dict(empty_trace(), cell_id=cell_id, step=step) for step in range(3)]
        parquet.write_table_atomic(pa.Table.from_pylist(rows, schema=TRACE_SCHEMA), traces)
    first = sorted(traces.glob("*.parquet"))[0]
    first.write_bytes(b"")
    for latest in (True, False):
        table = parquet.read_traces(tmp_path, latest=latest)
        assert set(table.column("cell_id").to_pylist()) == {"b"} and table.num_rows == 3
    assert (tmp_path / parquet.QUARANTINE_DIR / parquet.TRACES_DIR / first.name).exists()
