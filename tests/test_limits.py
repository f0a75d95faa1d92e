"""Hostile inputs and limits (issue #9): an alias bomb or an oversized study, an output
that cannot be written, a cell that outgrows ``resources.memory_mb``, the default
``cell_timeout_s``, and SIGTERM sent twice. Bad input is one line on stderr and exit 2
within seconds, with nothing written; a memory hog is stopped, recorded ``crashed`` with a
message that says memory, and the sweep goes on; a twice-terminated sweep exits 143 with its finished rows on disk."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

import sweep_test_pipeline
from hypersweep.io.parquet import read_results
from hypersweep.orchestrator import driver
from hypersweep.orchestrator.cell import Cell, canonical_json
from hypersweep.io.schema import FAILED_STATUSES
from hypersweep.orchestrator.spec import (DEFAULT_CELL_TIMEOUT_S, MAX_STUDY_BYTES, StudyError,
                                          parse_study)

TESTS_DIR = Path(__file__).resolve().parent
#: what "promptly" means for refusing bad input (the CLI's own start is ~1 s)
PROMPT_S = 5.0


def _study_text(output: Path, extra: str = "") -> str:
    return textwrap.dedent(f"""\
        study: limits
        pipeline: hypergradient_error
        backend: jax
        problems: [ridge]
        algorithms: [itd]
        t: [1]
        output: {output}
        mlflow: {{enabled: false}}
        """) + extra


def _cli(*argv: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "hypersweep", *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=60)
    return proc, time.monotonic() - start


def _refused(study: Path, command: str, *, cwd: Path, needle: str) -> str:
    """Run ``hypersweep COMMAND STUDY``; it must exit 2 promptly with one line naming the
    problem. Returns that line."""
    proc, elapsed = _cli(command, str(study), cwd=cwd)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (command, proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and needle in lines[0], (command, proc.stderr[-2000:])
    assert elapsed < PROMPT_S, (command, elapsed)
    assert proc.stdout == ""
    return lines[0]


# --------------------------------------------------------------------------------------
# YAML input


def _alias_bomb(levels: int = 9) -> str:
    """Nine nested lists of ten aliases each: ~10**10 nodes once expanded."""
    lines = ["pipeline_params:", "  x0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for level in range(1, levels + 1):
        lines.append(f"  x{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("command", ["plan", "run"])
def test_an_alias_bomb_is_one_line_exit_2_and_writes_nothing(tmp_path, command):
    output = tmp_path / "out"
    study = tmp_path / "bomb.yaml"
    study.write_text(_study_text(output, _alias_bomb()))
    line = _refused(study, command, cwd=tmp_path, needle="YAML aliases expand the study")
    assert "100,000" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.yaml"]


@pytest.mark.parametrize("command", ["plan", "run"])
def test_an_oversized_study_is_one_line_exit_2_and_writes_nothing(tmp_path, command):
    output = tmp_path / "out"
    study = tmp_path / "big.yaml"
    padding = "# " + "x" * 1000 + "\n"
    study.write_text(_study_text(output) + padding * (MAX_STUDY_BYTES // len(padding) + 1))
    line = _refused(study, command, cwd=tmp_path, needle="more than the limit of 1,048,576")
    assert f"{study.stat().st_size:,} bytes" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.yaml"]


def test_aliases_within_the_limit_recursion_and_deep_nesting(tmp_path):
    # a few aliases, as people write them, are fine
    spec = parse_study(_study_text(tmp_path / "out", "pipeline_params: {}\n"
                                   "resources: &r {num_cpus: 1}\n"))
    assert spec.resources.num_cpus == 1
    with pytest.raises(StudyError, match=r"^YAML aliases expand the study by 1,\d{3},\d{3},\d{3} nodes"):
        parse_study(_study_text(tmp_path / "out", _alias_bomb(8)))
    with pytest.raises(StudyError, match="a study cannot be recursive"):
        parse_study(_study_text(tmp_path / "out", "pipeline_params: &p {a: [*p]}\n"))
    with pytest.raises(StudyError, match="nests too deeply"):
        parse_study(_study_text(tmp_path / "out", "pipeline_params: {a: " + "[" * 5000
                                + "]" * 5000 + "}\n"))
    with pytest.raises(StudyError, match="more than the limit"):
        parse_study("#" * (MAX_STUDY_BYTES + 1))


# --------------------------------------------------------------------------------------
# cell_timeout_s


def test_cell_timeout_s_defaults_to_an_hour_and_null_disables_it(tmp_path):
    assert DEFAULT_CELL_TIMEOUT_S == 3600.0
    assert parse_study(_study_text(tmp_path / "o")).cell_timeout_s == 3600.0
    assert parse_study(_study_text(tmp_path / "o", "cell_timeout_s: null\n")
                       ).cell_timeout_s is None
    assert parse_study(_study_text(tmp_path / "o", "cell_timeout_s: 5\n")).cell_timeout_s == 5


# --------------------------------------------------------------------------------------
# output


def _readonly_dir(tmp_path: Path):
    """A directory nobody may write in, or None. A mode of 0o555 stops everyone but root
    (root bypasses permission bits, so there the directory *is* writable and refusing it
    would be wrong); for root, a tmpfs mounted read-only, where the mount is permitted."""
    directory = tmp_path / "ro"
    directory.mkdir()
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return directory, lambda: directory.chmod(0o755)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs",
                              str(directory)], capture_output=True)
    if mounted.returncode != 0:
        return None, None
    return directory, lambda: subprocess.run(["umount", str(directory)], check=True)


@pytest.mark.parametrize("command", ["plan", "run"])
def test_an_unwritable_output_is_one_line_exit_2(tmp_path, command):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory\n")
    cases = [
        (a_file, "exists and is not a directory"),
        (a_file / "sub", "is not a directory"),
        # /sys refuses new files even to root (EACCES); /proc has no such directory at all
        (Path("/sys/hypersweep-limits-test/out"), "cannot be created"),
        (Path("/proc/hypersweep-limits-test"), "is not writable"),
    ]
    readonly, undo = _readonly_dir(tmp_path)
    if readonly is not None:
        cases.append((readonly / "out", "is not writable"))
    try:
        for index, (output, needle) in enumerate(cases):
            study = tmp_path / f"study{index}.yaml"
            study.write_text(_study_text(output))
            before = sorted(p.name for p in tmp_path.rglob("*"))
            line = _refused(study, command, cwd=tmp_path, needle=needle)
            assert line.startswith(f"hypersweep: error: {study}: output: '{output}'"), line
            assert sorted(p.name for p in tmp_path.rglob("*")) == before  # probe removed
            assert a_file.read_text() == "not a directory\n"
        if readonly is not None:
            assert not any(readonly.iterdir())
    finally:
        if undo is not None:
            undo()


# --------------------------------------------------------------------------------------
# memory_mb


def test_a_cell_past_memory_mb_is_stopped_recorded_and_the_sweep_goes_on(
        ray_session, tmp_path):
    assert "crashed" in FAILED_STATUSES  # --retry-failed re-runs it
    log = tmp_path / "hog.rss"
    params = dict(hog_seeds=[1], hog_step_mb=50, hog_every_s=0.01, hog_max_mb=2000,
                  hang_s=30, hog_log=str(log), sleep_s=0.2)
    cells = [Cell(study="limits", pipeline="sweep_test", problem="toy", algorithm="probe",
                  backend="none", t=1, K=None, seed=seed,
                  pipeline_params=canonical_json(params)) for seed in range(4)]
    # backend () preloads nothing: a runner's idle RSS (~100 MB) stays well below 300 MB
    study = sweep_test_pipeline.study(tmp_path / "out", name="limits", num_actors=2,
                                      resources={"memory_mb": 300}, cell_timeout_s=60)
    total = psutil.virtual_memory().total
    lowest = [psutil.virtual_memory().available]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            lowest[0] = min(lowest[0], psutil.virtual_memory().available)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.monotonic()
    try:
        summary = driver.run_cells(study, cells, quiet=True)
    finally:
        stop.set()
        sampler.join()
    elapsed = time.monotonic() - start
    rows = {row["seed"]: row for row in read_results(tmp_path / "out").to_pylist()}
    assert summary["cells_done"] == 4 and sorted(rows) == [0, 1, 2, 3]
    hog = rows[1]
    assert hog["status"] == "crashed", hog
    assert hog["error_message"].startswith("memory limit exceeded: RSS "), hog
    assert "> memory_mb 300" in hog["error_message"]
    assert hog["attempt"] == 1  # not retried: it would outgrow the limit again
    assert all(rows[seed]["status"] == "ok" for seed in (0, 2, 3)), rows
    peak_mb = max(int(line) for line in log.read_text().split()) / 2**20
    print(f"{hog['error_message']}; hog's last logged RSS {peak_mb:.0f} MB; lowest available "
          f"{lowest[0] / 2**30:.2f} of {total / 2**30:.2f} GiB; {elapsed:.1f} s")
    assert peak_mb < 300 + 400, peak_mb  # stopped within a few samples of the limit
    assert lowest[0] > total / 2, (lowest[0], total)


# --------------------------------------------------------------------------------------
# SIGTERM


# what the installed `hypersweep` command runs (cli.console: main, exit handlers, os._exit),
# with the tests folder on the path for the sweep_test pipeline
CLI = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from hypersweep.cli import console
    sys.argv = ["hypersweep", "run", {study!r}, "--quiet"]
    console()
""")


@pytest.mark.parametrize("gap_s", [0.05, 0.6])
def test_sigterm_twice_exits_143_terminated_with_finished_rows_saved(tmp_path, gap_s):
    """0.05 s: both land before the driver's next poll (one handler call); 0.6 s: the second
    lands while the first is being handled (flush, actors stopped, Ray shut down)."""
    done = tmp_path / "done"
    done.mkdir()
    output = tmp_path / "out"
    study = tmp_path / "study.yaml"
    study.write_text(textwrap.dedent(f"""\
        study: sigterm
        pipeline: sweep_test
        backend: jax
        problems: [ridge]
        algorithms: [itd]
        t: [1]
        seeds: 200
        pipeline_params: {{sleep_s: 0.2, done_dir: {str(done)!r}}}
        resources: {{num_cpus: 1}}
        num_actors: 2
        output: {output}
        mlflow: {{enabled: false}}
        """))
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-c", CLI.format(tests=str(TESTS_DIR),
                                                             study=str(study))],
                            cwd=tmp_path, env=env, start_new_session=True,
                            stdout=open(tmp_path / "cli.out", "wb"),
                            stderr=open(tmp_path / "cli.err", "wb"))
    try:
        deadline = time.monotonic() + 120
        while not list((output / "results").glob("*.parquet")):
            assert proc.poll() is None, (tmp_path / "cli.err").read_text()[-3000:]
            assert time.monotonic() < deadline, "no Parquet part in 120 s"
            time.sleep(0.05)
        saved_before = read_results(output).num_rows
        finished_before = len(list(done.iterdir()))
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(gap_s)
        os.kill(proc.pid, signal.SIGTERM)
        sent = time.monotonic()
        proc.wait(30)
        exit_s = time.monotonic() - sent
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    err = (tmp_path / "cli.err").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "hypersweep: error: terminated" in err, err[-3000:]
    assert "interrupted" not in err and "Traceback" not in err, err[-3000:]
    print(f"exit {proc.returncode} after {exit_s:.1f} s: {err.strip().splitlines()[-1]}")
    table = read_results(output)
    ids = table.column("cell_id").to_pylist()
    # every cell finished before the signals is saved (one may finish while they are
    # handled, hence <= for the upper bound)
    assert saved_before <= finished_before <= len(ids) <= len(list(done.iterdir())) < 200
    assert len(ids) == len(set(ids)) and set(table.column("status").to_pylist()) == {"ok"}
