"""Several studies in one ``hypersweep run`` (issue 11): one Ray session, studies one after
another, each with its own complete output and summary; every study validated before Ray
starts; two studies writing the same output refused; SIGTERM during a later study keeps
the earlier ones' results.

The real CLI runs in its own process (real embedded Ray, tiny ridge/quadratic cells); one
Ray start covers the whole-run test, the bad-input tests start none.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from sweep_test_pipeline import ridge_study_yaml  # on sys.path via conftest

from hypersweep.io import parquet

# Runs cli.main, then reports whether the process imported Ray.
WRAPPER = textwrap.dedent("""
    import sys
    from hypersweep.cli import main
    rc = main(sys.argv[1:])
    sys.stdout.write("\\nIMPORTED_RAY=" + str("ray" in sys.modules) + "\\n")
    sys.exit(rc)
""")


MORE = "K: [2]\nmlflow: {enabled: false}"


def _quadratic_yaml(name: str, *, output, t: str = "[2, 3]", seeds: int = 1) -> str:
    return (f"study: {name}\npipeline: hypergradient_error\nbackend: [jax]\n"
            f"dtype: float64\nproblems:\n  - name: quadratic\n    params: {{dim_inner: 4, dim_outer: 2}}\n"
            f"algorithms: [itd, aid_cg]\nt: {t}\nK: [2]\nseeds: {seeds}\n"
            f"output: {output}\nmlflow: {{enabled: false}}\n")


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return str(path)


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _cli(args: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WRAPPER, *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_studies_run_in_one_session_each_complete_and_sigterm_keeps_the_finished_ones(
        tmp_path):
    a = _write(tmp_path, "a", ridge_study_yaml("multi-a", output=tmp_path / "out-a",
                                               algorithms="[itd, aid_cg]", t="[2, 3]",
                                               seeds=2, more=MORE))
    b = _write(tmp_path, "b", _quadratic_yaml("multi-b", output=tmp_path / "out-b"))
    # long enough (hundreds of cells) to be still running when the signal lands
    c = _write(tmp_path, "c", ridge_study_yaml("multi-c", output=tmp_path / "out-c",
                                               algorithms="[itd, aid_cg]",
                                               t="[2, 3, 4, 5, 6, 7, 8, 9]", seeds=40,
                                               more=MORE))
    proc = subprocess.Popen([sys.executable, "-m", "hypersweep", "-v", "run", a, b, c],
                            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    deadline = time.monotonic() + 150
    try:
        for line in proc.stdout:  # the summaries are printed as each study ends
            seen.append(line)
            if line.startswith("study multi-b:"):
                time.sleep(1.0)  # into study c
                proc.send_signal(signal.SIGTERM)
                break
            assert time.monotonic() < deadline, "".join(seen)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    out = "".join(seen) + out
    assert proc.returncode == 143, out[-3000:] + err[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("study multi-")]
    assert [line.split(":")[0] for line in lines] == ["study multi-a", "study multi-b"], out
    assert "0 skipped" in lines[0] and "8 cells run" in lines[0]
    assert "4 cells run" in lines[1]
    for name, cells in (("out-a", 8), ("out-b", 4)):
        table = parquet.read_results(tmp_path / name)
        assert table.num_rows == cells
        assert set(table.column("status").to_pylist()) == {"ok"}
        assert (tmp_path / name / parquet.STUDY_FILE).exists()
    assert len(set(parquet.read_results(tmp_path / "out-a").column("study").to_pylist())
               | set(parquet.read_results(tmp_path / "out-b").column("study").to_pylist())
               ) == 2
    # study c: stopped cleanly, its finished rows readable, the error one line
    assert parquet.read_results(tmp_path / "out-c").num_rows < 640
    errors = [line for line in err.splitlines() if line.startswith("hypersweep: error")]
    assert len(errors) == 1 and "signal 15" in errors[0], err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    # one Ray, one pool: b and c took a's runners (same request, jax preloaded)
    reused = re.search(r"study multi-b: (\d+) actor\(s\), (\d+) of them kept", err)
    assert reused and reused.group(1) == reused.group(2), err[-3000:]


def test_a_bad_second_study_exits_2_before_ray_and_writes_nothing(tmp_path):
    a = _write(tmp_path, "a", ridge_study_yaml("multi-a", output=tmp_path / "out-a"))
    bad = _write(tmp_path, "bad", ridge_study_yaml("multi-bad", output=tmp_path / "out-bad",
                                                   algorithms="[itd, aid-cgg]"))
    done = _cli(["run", a, bad], tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "unknown algorithm 'aid-cgg'" in err[0], done.stderr
    assert "IMPORTED_RAY=False" in done.stdout
    assert not (tmp_path / "out-a").exists() and not (tmp_path / "out-bad").exists()


def test_two_studies_writing_the_same_output_are_refused(tmp_path):
    a = _write(tmp_path, "a", ridge_study_yaml("multi-a", output=tmp_path / "same"))
    b = _write(tmp_path, "b", _quadratic_yaml("multi-b", output=f"{tmp_path}/./same"))
    for args in (["run", a, b], ["run", a, a]):
        done = _cli(args, tmp_path)
        assert done.returncode == 2, done.stdout + done.stderr
        err = done.stderr.strip().splitlines()
        assert len(err) == 1 and "both write output" in err[0], done.stderr
        assert "IMPORTED_RAY=False" in done.stdout
        assert not (tmp_path / "same").exists()


# The last study of a session stops the session's own Ray as soon as its runners are
# stopped, while its MLflow writer still drains; earlier studies hand their runners on.
RELEASE_SCRIPT = textwrap.dedent("""
    import json, sys, threading
    import psutil
    from hypersweep.orchestrator import driver
    from hypersweep.orchestrator.spec import load_study

    calls = []
    real = driver.shutdown_ray

    def recording_shutdown():
        import ray
        writers = [t for t in threading.enumerate() if t.name == "hypersweep-mlflow"]
        calls.append({"writer_alive": any(t.is_alive() for t in writers),
                      "ray_up": ray.is_initialized()})
        real()

    driver.shutdown_ray = recording_shutdown
    from hypersweep.io import tracking_sync
    events = []
    for name in ("last_rows_sent", "close"):
        def recording(self, *args, _real=getattr(tracking_sync.MlflowWriter, name),
                      _name=name, **kwargs):
            events.append(_name)
            return _real(self, *args, **kwargs)
        setattr(tracking_sync.MlflowWriter, name, recording)
    summaries = driver.run_studies([load_study(p) for p in sys.argv[1:]], quiet=True)
    import ray
    left = [p for p in psutil.Process().children(recursive=True) if p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]
    print("RESULT=" + json.dumps({
        "calls": calls, "ray_up_after": ray.is_initialized(), "writer_events": events,
        "left": [p.name() for p in left],
        "studies": [{"cells": s["cells_done"], "ok": s["counts"]["ok"],
                     "reused": s["actors_reused"], "actors": s["actors"],
                     "mlflow_cells": s["mlflow"]["cells_logged"],
                     "dropped": s["mlflow"]["dropped"]} for s in summaries]}))
""")


def test_the_last_study_stops_ray_while_its_mlflow_writer_drains(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # b: 240 cells, more than a Parquet flush (50 rows) and several MLflow batches
    a = _write(tmp_path, "a", _quadratic_yaml("release-a", output=tmp_path / "out-a")
               .replace("mlflow: {enabled: false}", f'mlflow: {{tracking_uri: "{uri}"}}'))
    b = _write(tmp_path, "b", _quadratic_yaml("release-b", output=tmp_path / "out-b",
                                              t="[2, 3, 4, 5]", seeds=30)
               .replace("mlflow: {enabled: false}", f'mlflow: {{tracking_uri: "{uri}"}}'))
    done = subprocess.run([sys.executable, "-c", RELEASE_SCRIPT, a, b], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    import json
    result = json.loads(done.stdout.split("RESULT=")[1])
    # one stop, made by the last study while its writer thread was still alive (before
    # the change it came from the session's exit, after the writer was joined)
    assert result["calls"] == [{"writer_alive": True, "ray_up": True}], result
    assert not result["ray_up_after"] and result["left"] == [], result
    # each study tells its writer that its last rows are in before it closes it
    assert result["writer_events"] == ["last_rows_sent", "close"] * 2, result
    first, last = result["studies"]
    assert (first["cells"], first["ok"], first["mlflow_cells"]) == (4, 4, 4), result
    assert (last["cells"], last["ok"], last["mlflow_cells"]) == (240, 240, 240), result
    assert last["reused"] == last["actors"] > 0, result  # a's runners, handed on
    assert first["dropped"] == last["dropped"] == 0, result
