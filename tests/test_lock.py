"""One driver per output (issue #9, part 1): the lock file, its takeover rules, the CLI's
one-line refusal, ``status``'s holder line, and clean-up of only dead writers' tmp files."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from sweep_test_pipeline import ridge_study_yaml  # on sys.path via conftest

from hypersweep.io import lock, parquet, tracking

HOLD = textwrap.dedent("""
    import sys, time
    from hypersweep.io.lock import OutputLock
    OutputLock(sys.argv[1], study="other").acquire()
    print("locked", flush=True)
    time.sleep(120)
""")



@pytest.fixture
def holder_process(tmp_path):
    """A live process of this host holding ``tmp_path/out``'s lock."""
    output = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(output)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc, output
    finally:
        proc.kill()
        proc.wait(10)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(10)
    return proc.pid


def test_a_second_lock_is_refused_naming_the_holder_and_release_removes_the_file(tmp_path):
    first = lock.OutputLock(tmp_path, study="a").acquire()
    with pytest.raises(lock.LockHeld) as caught:
        lock.OutputLock(tmp_path, study="b").acquire()
    message = str(caught.value)
    assert "\n" not in message
    for part in (f"host {socket.gethostname()}", f"pid {os.getpid()}", "since 20",
                 "study 'a'"):
        assert part in message, message
    assert lock.holder(tmp_path)[1] is True
    first.release()
    assert not (tmp_path / lock.LOCK_FILE).exists()
    with lock.OutputLock(tmp_path, study="b"):  # free again
        assert lock.holder(tmp_path)[0]["study"] == "b"


def test_a_live_holder_in_another_process_blocks_until_force(holder_process, caplog):
    proc, output = holder_process
    with pytest.raises(lock.LockHeld, match=f"pid {proc.pid},"):
        lock.OutputLock(output).acquire()
    caplog.set_level(logging.WARNING, logger="hypersweep.io.lock")
    forced = lock.OutputLock(output, study="mine", force=True).acquire()
    assert "--force" in caplog.text and f"pid {proc.pid}" in caplog.text
    assert lock.holder(output)[0]["pid"] == os.getpid()
    proc.kill()  # the ousted holder ending must not take our lock file with it
    proc.wait(10)
    assert lock.holder(output) == (forced.holder, True)
    forced.release()


def test_a_lock_left_by_a_killed_driver_is_taken_over_with_a_warning(holder_process,
                                                                      caplog):
    proc, output = holder_process
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    holder, alive = lock.holder(output)
    assert holder["pid"] == proc.pid and not alive
    caplog.set_level(logging.WARNING, logger="hypersweep.io.lock")
    with lock.OutputLock(output):
        assert "stale lock" in caplog.text and f"pid {proc.pid}" in caplog.text


def test_stale_tmp_sweep_removes_only_files_of_gone_writers(tmp_path):
    host = socket.gethostname()
    live_other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "dead": f".part-1-a.parquet.{_dead_pid()}@{host}.tmp",
            "mine": f".part-2-b.parquet.{os.getpid()}@{host}.tmp",
            "legacy": ".part-3-c.parquet.tmp",
            "live": f".part-4-d.parquet.{live_other.pid}@{host}.tmp",
            "other_host": f".part-5-e.parquet.{_dead_pid()}@elsewhere.example.tmp",
        }
        for name in names.values():
            (tmp_path / name).write_bytes(b"x")
        assert parquet.sweep_stale_tmp(tmp_path) == 3
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [names["live"], names["other_host"]])
    finally:
        live_other.kill()
        live_other.wait(10)


def test_cli_run_on_a_held_output_exits_2_in_5s_with_one_line(holder_process, tmp_path):
    proc, output = holder_process
    study = tmp_path / "study.yaml"
    study.write_text(ridge_study_yaml("lock-test", output=output))
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "hypersweep", "run", str(study)],
                            check=False, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    assert elapsed < 5.0, elapsed
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hypersweep: error: output ") and \
        f"host {socket.gethostname()}, pid {proc.pid}, since " in lines[0], lines[0]
    assert not (output / parquet.STUDY_FILE).exists()  # refused before writing anything

    status = subprocess.run([sys.executable, "-m", "hypersweep", "status", str(output)],
                            check=False, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert f"running: study 'other' on host {socket.gethostname()}, pid {proc.pid}" \
        in status.stdout, status.stdout


SIGTERM_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import sweep_test_pipeline
    from hypersweep.orchestrator import cell as C, driver, signals
    cells = [C.Cell(study="term", pipeline="sweep_test", problem="toy", algorithm="probe",
                    backend="none", t=1, K=None, seed=s,
                    pipeline_params=C.canonical_json({{"sleep_s": 0.3, "done_dir": {done!r}}}))
             for s in range(100)]
    study = sweep_test_pipeline.study({output!r}, name="term", num_actors=1)
    try:
        driver.run_study(study, quiet=True, cells=cells)
    except signals.SweepInterrupted as exc:
        sys.exit(exc.exit_code)
""")


@pytest.mark.ray
def test_the_lock_is_released_after_sigterm(tmp_path):
    output, done = tmp_path / "out", tmp_path / "done"
    done.mkdir()
    script = SIGTERM_SCRIPT.format(tests=str(Path(__file__).parent), output=str(output),
                                   done=str(done))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(tmp_path / "driver.err", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=err,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not any(done.iterdir()):
            assert time.monotonic() < deadline and proc.poll() is None, \
                (tmp_path / "driver.err").read_text()[-2000:]
            time.sleep(0.1)
        assert lock.holder(output) == (lock._read(output / lock.LOCK_FILE), True)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 128 + signal.SIGTERM
    assert lock.holder(output) is None  # released, file removed
    with lock.OutputLock(output):
        pass


N_CONCURRENT_CELLS, N_GROUPS = 4, 2  # 2 algorithms × 2 t; a group drops t


@pytest.mark.ray
def test_two_concurrent_cli_runs_one_runs_the_other_exits_2(tmp_path, mlflow_sqlite):
    from mlflow import MlflowClient

    output = tmp_path / "out"
    study = tmp_path / "study.yaml"
    study.write_text(ridge_study_yaml(
        "concurrent-test", output=output, algorithms="[itd, aid_cg]", t="[1, 2]",
        more=f'K: [2]\nresources: {{num_cpus: 1}}\nmlflow: {{tracking_uri: "{mlflow_sqlite}"}}'))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(tmp_path / "first.err", "wb") as err:
        first = subprocess.Popen([sys.executable, "-m", "hypersweep", "run", str(study)],
                                 stdout=subprocess.DEVNULL, stderr=err, env=env,
                                 start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while lock.holder(output) is None:
            assert time.monotonic() < deadline and first.poll() is None, \
                (tmp_path / "first.err").read_text()
            time.sleep(0.05)
        start = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "hypersweep", "run", str(study)],
                                check=False, capture_output=True, text=True, timeout=60, env=env)
        elapsed = time.monotonic() - start
        assert first.poll() is None, "the first run must still be running"
        assert second.returncode == 2, second.stderr
        assert elapsed < 5.0, elapsed
        line, = second.stderr.strip().splitlines()
        assert f"pid {first.pid}, since " in line and "study 'concurrent-test'" in line, line
        assert first.wait(300) == 0, (tmp_path / "first.err").read_text()[-3000:]
    finally:
        try:
            os.killpg(first.pid, 9)
        except ProcessLookupError:
            pass
    assert lock.holder(output) is None

    third = subprocess.run([sys.executable, "-m", "hypersweep", "run", str(study)],
                           check=False, capture_output=True, text=True, timeout=120, env=env)
    assert third.returncode == 0, third.stderr
    assert f"0 cells run, {N_CONCURRENT_CELLS} skipped" in third.stdout, third.stdout

    rows = parquet.read_results(output, latest=False)
    counts = Counter(rows.column("cell_id").to_pylist())
    assert len(counts) == N_CONCURRENT_CELLS and set(counts.values()) == {1}
    client = MlflowClient(tracking_uri=mlflow_sqlite)
    experiment = client.get_experiment_by_name("concurrent-test")
    runs = client.search_runs([experiment.experiment_id])
    roles = Counter(r.data.tags.get(tracking.TAG_ROLE) for r in runs)
    assert roles == {"parent": 1, "group": N_GROUPS}, roles
    groups = [r.data.tags[tracking.TAG_GROUP] for r in runs
              if r.data.tags.get(tracking.TAG_ROLE) == "group"]
    assert len(set(groups)) == N_GROUPS
    logged = sum(1 for r in runs for key in r.data.tags if key.startswith(tracking.TAG_CELL_PREFIX))
    assert logged == N_CONCURRENT_CELLS
