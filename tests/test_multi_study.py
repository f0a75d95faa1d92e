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
