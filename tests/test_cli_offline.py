"""The ``hypersweep`` command without a cluster: bad input, plan, tables, status, hooks.

Bad input runs the real CLI in its own process (all processes started at once, so the
table costs about one interpreter start per core): exit status 2, exactly one stderr line
naming the key path, nothing created on disk, and neither Ray nor torch nor jax imported.
``run`` itself is checked against a stand-in ``run_study``; the real driver has its own
tests.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import yaml

from hypersweep import cli
from hypersweep.io import tracking_sync
from hypersweep.orchestrator import driver
from hypersweep.orchestrator.signals import SweepInterrupted
from hypersweep.orchestrator.summary import print_summary

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "configs" / "example_small.yaml"

# Runs cli.main, then reports which heavy modules the process imported.
WRAPPER = textwrap.dedent("""
    import sys
    from hypersweep.cli import main
    rc = main(sys.argv[1:])
    heavy = sorted(m for m in ("ray", "torch", "jax", "mlflow") if m in sys.modules)
    sys.stdout.write("\\nIMPORTED=" + ",".join(heavy) + "\\n")
    sys.exit(rc)
""")

GOOD = dict(study="cli-test", pipeline="hypergradient_error", backend="jax",
            problems=["ridge"], algorithms=["itd", "aid_cg"], t=[5, 10], K=[5, "t"],
            seeds=2, output="out", mlflow={"tracking_uri": "sqlite:///mlflow.db"})


def _yaml(**changes) -> str:
    return yaml.safe_dump({**GOOD, **changes}, sort_keys=False)


# (case id, study file text or None for "no file", argv, expected stderr fragment)
BAD_INPUT = [
    ("malformed_yaml", "study: cli-test\nproblems: [ridge\nt: 3\n", ["run", "study.yaml"],
     "malformed YAML at line 3"),
    ("unknown_key", _yaml(seeds_=[1]), ["run", "study.yaml"], "unknown key 'seeds_'"),
    ("unknown_problem", _yaml(problems=["ridgee"]), ["run", "study.yaml"],
     "problems[0]: unknown problem 'ridgee'"),
    ("unknown_algorithm", _yaml(algorithms=["itd", "aid-cgg"]), ["run", "study.yaml"],
     "algorithms[1]: unknown algorithm 'aid-cgg'. Valid choices: itd,"),
    ("unknown_backend", _yaml(backend="tf"), ["run", "study.yaml"],
     "backend: unknown backend 'tf'. Valid choices: jax, torch"),
    ("unknown_pipeline", _yaml(pipeline="hpx"), ["run", "study.yaml"],
     "pipeline: unknown pipeline 'hpx'"),
    ("unknown_dtype", _yaml(dtype="bfloat16"), ["run", "study.yaml"],
     "dtype: unknown dtype 'bfloat16'"),
    ("unknown_problem_param", _yaml(problems=[{"name": "ridge", "params": {"n_trian": 9}}]),
     ["run", "study.yaml"], "problems[0].params.n_trian: unknown parameter for problem"),
    ("t_below_1", _yaml(t=[5, 0]), ["run", "study.yaml"], "t[1]: must be an integer >= 1"),
    ("K_negative", _yaml(K=[-2]), ["run", "study.yaml"], "K[0]: must be an integer >= 0"),
    ("negative_gpus", _yaml(resources={"num_gpus": -0.5}), ["run", "study.yaml"],
     "resources.num_gpus: must be >= 0"),
    ("too_fine_fraction", _yaml(resources={"num_gpus": 0.33333}), ["run", "study.yaml"],
     "resources.num_gpus: fractions must be multiples of 0.0001"),
    ("plan_bad_study", _yaml(t=[0]), ["plan", "study.yaml"], "t[0]: must be"),
    ("missing_file", None, ["run", "nope.yaml"], "study file 'nope.yaml' not found"),
    ("unknown_subcommand", None, ["frobnicate"], "invalid choice: 'frobnicate'"),
    ("no_subcommand", None, [], "required: COMMAND"),
    ("unknown_option", _yaml(), ["run", "study.yaml", "--fast"], "unrecognized arguments"),
    ("status_missing_dir", None, ["status", "nowhere"], "'nowhere' not found"),
]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_ADDRESS="", HYPERSWEEP_PLUGINS="")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory):
    """Start every bad-input case at once; collect (rc, stdout, stderr, files left)."""
    started = {}
    for case, text, argv, _ in BAD_INPUT:
        workdir = tmp_path_factory.mktemp(case)
        if text is not None:
            (workdir / "study.yaml").write_text(text)
        started[case] = (workdir, subprocess.Popen(
            [sys.executable, "-c", WRAPPER, *argv], cwd=workdir, env=_env(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = {}
    for case, (workdir, process) in started.items():
        out, err = process.communicate(timeout=120)
        results[case] = (process.returncode, out, err,
                         sorted(p.name for p in workdir.iterdir()))
    return results


@pytest.mark.parametrize("case, text, argv, fragment", BAD_INPUT,
                         ids=[c[0] for c in BAD_INPUT])
def test_bad_input_exits_2_with_one_line(bad_input_runs, case, text, argv, fragment):
    rc, out, err, files = bad_input_runs[case]
    assert rc == 2, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hypersweep: error: ") and fragment in lines[0], lines[0]
    assert files == ([] if text is None else ["study.yaml"])  # no output dir, no mlflow.db
    assert "IMPORTED=\n" in out  # neither ray nor torch, jax, mlflow


def test_a_plugin_that_cannot_be_imported_exits_2_with_one_line(tmp_path):
    (tmp_path / "study.yaml").write_text(_yaml())
    proc = subprocess.run([sys.executable, "-m", "hypersweep", "plan", "study.yaml"],
                          cwd=tmp_path, env=dict(_env(), HYPERSWEEP_PLUGINS="no_such_plugin"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "hypersweep: error: $HYPERSWEEP_PLUGINS names 'no_such_plugin', which cannot be "
        "imported: No module named 'no_such_plugin'"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


def test_library_imports_no_backend():
    modules = ["hypersweep.orchestrator.spec", "hypersweep.orchestrator.cell",
               "hypersweep.io.schema", "hypersweep.cli",
               "hypersweep.problems.catalog", "hypersweep.algorithms.catalog",
               "hypersweep.problems", "hypersweep.algorithms"]
    modules += [f"hypersweep.orchestrator.{path.stem}"
                for path in sorted((ROOT / "hypersweep" / "orchestrator").glob("[!_]*.py"))]
    code = ("import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "print(sorted(m for m in ('torch', 'jax') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", (modules, result.stdout)


def test_python_dash_m_plan_never_imports_ray(tmp_path):
    (tmp_path / "study.yaml").write_text(_yaml())
    # the real `python -m hypersweep` entry point, then a look at sys.modules (its fast
    # exit, os._exit after the exit handlers, is turned into SystemExit to get there)
    code = ("import os, sys, runpy\nsys.argv = ['hypersweep', 'plan', 'study.yaml']\n"
            "def _exit(code):\n    raise SystemExit(code)\nos._exit = _exit\n"
            "try:\n    runpy.run_module('hypersweep', run_name='__main__')\n"
            "except SystemExit as exc:\n    rc = exc.code\n"
            "print('RC', rc, 'RAY', 'ray' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert "RC 0 RAY False" in result.stdout, result.stdout + result.stderr
    # per seed: itd one cell per t (2); aid_cg one per (t, K line): 2 t × {5, t} = 4. × 2 seeds.
    assert "12 cells" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


# --- in-process commands ---------------------------------------------------------------


def test_plan_output(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(_yaml(problems=["ridge", "quadratic"], algorithms=["itd", "stocbio"]))
    assert cli.main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    # ridge: itd 2 t × 2 seeds = 4; stocbio 2 t × 2 K lines {5, t} × 2 seeds = 8.
    # quadratic: itd 4; stocbio skipped (needs minibatch). Total 16.
    assert "16 cells" in out
    assert "cells per (problem, algorithm)" in out
    rows = {tuple(cell.strip() for cell in line.split("│")[1:4])
            for line in out.splitlines() if line.startswith("│")}
    assert {("ridge", "itd", "4"), ("ridge", "stocbio", "8"), ("quadratic", "itd", "4"),
            ("quadratic", "stocbio", "0")} <= rows
    assert "skipped combinations" in out and "stocbio requires minibatch" in out
    sample = [line.strip() for line in out.splitlines() if line.startswith("  ridge.")
              or line.startswith("  quadratic.")]
    assert 5 <= len(sample) <= 14 and sample[0].startswith("ridge.itd.jax.t5.K-.s0.")
    assert not (tmp_path / "out").exists()


def test_plan_of_example(capsys):
    assert cli.main(["plan", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "120 cells" in out and "skipped combinations: none" in out


def test_problems_table(capsys):
    assert cli.main(["problems"]) == 0
    out = capsys.readouterr().out
    from hypersweep import problems
    for name in problems.names():
        assert name in out
    assert "λ parametrization" in out and "closed_form" in out
    assert "[log γ, log μ]" in out  # printed as written, not swallowed as rich markup


def test_algorithms_table(capsys):
    assert cli.main(["algorithms"]) == 0
    out = capsys.readouterr().out
    from hypersweep import algorithms
    for name in algorithms.names():
        assert name in out
    assert "uses K" in out and "minibatch" in out and "Ji, Yang & Liang 2021" in out


def test_run_validates_then_calls_the_driver(tmp_path, monkeypatch, capsys):
    calls = []

    def run_study(study, *, address, quiet, retry_failed):
        calls.append((study.study, address, quiet, retry_failed))
        return {"study": study.study, "cells_done": 8, "cells_skipped": 0,
                "wall_time_s": 1.0, "results_dir": f"{study.output}/results",
                "study_counts": {"ok": 7, "error": 1, "diverged": 0, "timeout": 0,
                                 "crashed": 0}, "per_pair": []}

    monkeypatch.setattr(driver, "run_study", run_study)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    path = tmp_path / "study.yaml"
    path.write_text(_yaml())
    assert cli.main(["run", str(path), "--retry-failed"]) == 0
    # stdout is captured (not a terminal), so --quiet is implied
    assert calls == [("cli-test", "ray://head:10001", True, True)]
    out = capsys.readouterr().out
    assert "ok" in out and "7" in out and "error" in out
    assert cli.main(["run", str(path), "--address", "10.0.0.1:6379"]) == 0
    assert calls[-1][1:] == ("10.0.0.1:6379", True, False)


def test_forwarded_subcommands(monkeypatch, capsys):
    got = []
    fake = types.ModuleType("hypersweep.tools.report.main")
    fake.main = lambda argv: got.append(argv) or 0
    monkeypatch.setitem(sys.modules, "hypersweep.tools.report.main", fake)
    assert cli.main(["report", "a.parquet", "b", "--out", "figs"]) == 0
    assert got == [["a.parquet", "b", "--out", "figs"]]
    monkeypatch.setitem(sys.modules, "hypersweep.tools.regression.main", None)  # absent
    assert cli.main(["regress", "--suite", "x"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "hypersweep.tools.regression.main" in err[0]
    assert cli.main(["--help"]) == 0
    helptext = capsys.readouterr().out
    assert "report" in helptext and "regress" in helptext and "sync-mlflow" in helptext


def _write_results(output_dir: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hypersweep.io.schema import RESULT_SCHEMA, empty_row

    when = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)

    def row(cell_id, problem, algorithm, status, minutes):
        r = empty_row()
        r.update(study="s", cell_id=cell_id, problem=problem, algorithm=algorithm,
                 status=status, finished_at=when + dt.timedelta(minutes=minutes))
        return r

    first = [row("a", "ridge", "itd", "ok", 0), row("b", "ridge", "itd", "crashed", 0),
             row("c", "ridge", "aid_cg", "diverged", 0), row("d", "logreg", "itd", "ok", 0)]
    retry = [row("b", "ridge", "itd", "ok", 5)]  # the retried cell's latest row wins
    results = output_dir / "results"
    results.mkdir(parents=True)
    for index, rows in enumerate([first, retry]):
        pq.write_table(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA),
                       results / f"part-{index}.parquet")


def test_status_counts(tmp_path, capsys):
    _write_results(tmp_path)
    assert cli.main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path}: 4 cells" in out
    rows = {tuple(cell.strip() for cell in line.split("│")[1:-1])
            for line in out.splitlines() if line.startswith("│")}
    assert ("ok", "3") in rows and ("diverged", "1") in rows
    assert not any(r[0] == "crashed" for r in rows)  # superseded by the retry
    # by (problem, algorithm): columns are the statuses present, in schema order
    assert ("ridge", "itd", "2", "0") in rows and ("ridge", "aid_cg", "0", "1") in rows
    assert ("logreg", "itd", "1", "0") in rows


def test_status_of_a_folder_that_is_not_a_study_is_exit_2(tmp_path, capsys):
    assert cli.main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a study output: no study.yaml, no results" in err[0]


STATUS_STUDY = """\
study: status-plan
pipeline: hypergradient_error
backend: jax
problems: [ridge]
algorithms: [itd, aid_cg]
t: [2, 3]
K: [2]
seeds: 2
output: {output}
mlflow: {{enabled: false}}
"""


def test_status_counts_pending_cells_against_the_saved_plan(tmp_path, capsys):
    """A study output with its study.yaml and results for some of its 8 cells (one
    retried): planned, with a result, pending; an output with the plan and no rows yet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hypersweep.io.schema import RESULT_SCHEMA, empty_row
    from hypersweep.orchestrator.expand import expand
    from hypersweep.orchestrator.spec import parse_study

    text = STATUS_STUDY.format(output=tmp_path)
    (tmp_path / "study.yaml").write_text(text)
    assert cli.main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "8 cells planned, 0 with a result, 8 pending" in out and "no results yet" in out
    cells = list(expand(parse_study(text)))
    rows = []
    when = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    for minute, (cell, status, attempt) in enumerate((
            (cells[0], "error", 1), (cells[0], "ok", 2), (cells[1], "ok", 1),
            (cells[5], "diverged", 1))):
        row = empty_row()
        row.update({k: v for k, v in cell.to_dict().items() if k in RESULT_SCHEMA.names},
                   status=status, attempt=attempt,
                   finished_at=when + dt.timedelta(minutes=minute))
        rows.append(row)
    results = tmp_path / "results"
    results.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA),
                   results / "part-0.parquet")
    assert cli.main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "8 cells planned, 3 with a result, 5 pending" in out
    table = {tuple(c.strip() for c in line.split("│")[1:-1])
             for line in out.splitlines() if line.startswith("│")}
    assert {("ok", "2"), ("diverged", "1"), ("pending", "5")} <= table


def test_problems_name_shows_params_defaults_and_parametrization(capsys):
    assert cli.main(["problems", "sparse_logreg"]) == 0
    out = capsys.readouterr().out
    assert "λ parametrization: h = log λ, one per feature" in out
    rows = {tuple(c.strip() for c in line.split("│")[1:-1])
            for line in out.splitlines() if line.startswith("│")}
    assert ("n_features", "4000", "") in rows and ("zero_based", "False", "") in rows
    assert ("data", "None", "common to every problem") in rows
    assert cli.main(["problems", "nope"]) == 2
    assert "unknown problem 'nope'. Valid choices: ridge," in capsys.readouterr().err


def test_sync_mlflow_prints_what_it_backfilled(tmp_path, monkeypatch, capsys):
    got = []
    monkeypatch.setattr(tracking_sync, "sync_mlflow", lambda output_dir, tracking_uri=None: (
        got.append((output_dir, tracking_uri)) or {"cells": 4, "logged": 3}))
    assert cli.main(["sync-mlflow", str(tmp_path), "--tracking-uri", "sqlite:///x.db"]) == 0
    assert got == [(str(tmp_path), "sqlite:///x.db")]
    out = capsys.readouterr().out
    assert "logged: 3" in out and "cells: 4" in out

    def not_an_output(output_dir, tracking_uri=None):
        raise ValueError(f"{output_dir!r} is not a study output:\nstudy.yaml is missing")

    monkeypatch.setattr(tracking_sync, "sync_mlflow", not_an_output)
    assert cli.main(["sync-mlflow", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "is not a study output" in err[0]


def test_summary_json_roundtrip_is_printable(capsys):
    # the driver's summary holds paths and JSON values; printing must not read "[b]" as
    # rich markup
    extra = json.loads('{"a": [1, "[b]"]}')
    print_summary({"study": "s", "cells_done": 2, "cells_skipped": 0, "wall_time_s": 1.0,
                   "results_dir": f"/out/{extra['a'][1]}/results", "per_pair": [],
                   "study_counts": {"ok": 2, "error": 0, "diverged": 0, "timeout": 0,
                                    "crashed": 0}})
    assert "[b]" in capsys.readouterr().out


def test_run_interrupted_exits_128_plus_signal(tmp_path, monkeypatch, capsys):
    def run_study(study, **kwargs):
        raise SweepInterrupted(15, {"cells_done": 3, "results_dir": "out/results"})

    monkeypatch.setattr(driver, "run_study", run_study)
    path = tmp_path / "study.yaml"
    path.write_text(_yaml())
    assert cli.main(["run", str(path)]) == 143
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "signal 15" in err[0]


def _summary(study):
    return {"study": study.study, "cells_done": 2, "cells_skipped": 0, "wall_time_s": 1.0,
            "results_dir": f"{study.output}/results", "per_pair": [],
            "study_counts": {"ok": 2, "error": 0, "diverged": 0, "timeout": 0,
                             "crashed": 0}}


def test_run_of_several_studies_reports_each_and_exits_with_the_worst(tmp_path, monkeypatch,
                                                                     capsys):
    from hypersweep.io.lock import OutputError

    calls = []

    def run_studies(studies, *, on_result, **options):
        calls.append(([s.study for s in studies], options))
        on_result(studies[0], _summary(studies[0]))
        on_result(studies[1], OutputError("output b/results refuses writes"))
        on_result(studies[2], _summary(studies[2]))
        return []

    monkeypatch.setattr(driver, "run_studies", run_studies)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    paths = []
    for name in ("a", "b", "c"):
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(_yaml(study=f"multi-{name}", output=f"out-{name}"))
    assert cli.main(["run", *map(str, paths), "--retry-failed", "--force"]) == 2
    assert calls == [(["multi-a", "multi-b", "multi-c"],
                      {"address": None, "quiet": True, "retry_failed": True, "force": True})]
    captured = capsys.readouterr()
    assert "study multi-a: 2 cells run" in captured.out
    assert "study multi-c: 2 cells run" in captured.out
    err = captured.err.splitlines()
    assert err == ["hypersweep: error: study multi-b: output b/results refuses writes"]

    def interrupted(studies, *, on_result, **options):
        on_result(studies[0], _summary(studies[0]))
        raise SweepInterrupted(15, {"cells_done": 1, "results_dir": "out-b/results"})

    monkeypatch.setattr(driver, "run_studies", interrupted)
    assert cli.main(["run", str(paths[0]), str(paths[1])]) == 143
    captured = capsys.readouterr()
    assert "study multi-a: 2 cells run" in captured.out
    assert len(captured.err.splitlines()) == 1 and "signal 15" in captured.err


def test_run_refuses_two_studies_with_one_output_before_the_driver(tmp_path, monkeypatch,
                                                                  capsys):
    called = []
    monkeypatch.setattr(driver, "run_studies", lambda *a, **k: called.append(a))
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(_yaml(study="multi-a", output="same"))
    second.write_text(_yaml(study="multi-b", output="./same/"))
    assert cli.main(["run", str(first), str(second)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "'multi-a' and 'multi-b' both write output" in err[0]
    assert called == [] and not (tmp_path / "same").exists()


def test_run_report_is_checked_before_the_driver(tmp_path, monkeypatch, capsys):
    """``run --report`` with several studies needs a DIR, and DIR must not be a file:
    exit 2, one line, before the driver runs or anything is written."""
    called = []
    monkeypatch.setattr(driver, "run_studies", lambda *a, **k: called.append(a))
    monkeypatch.setattr(driver, "run_study", lambda *a, **k: called.append(a))
    monkeypatch.chdir(tmp_path)
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(_yaml(study="multi-a", output="out-a"))
    second.write_text(_yaml(study="multi-b", output="out-b"))
    (tmp_path / "afile").write_text("x")
    for argv, expected in ((["run", str(first), str(second), "--report"],
                            "--report needs a directory with several studies"),
                           (["run", str(first), "--report", "afile"],
                            "--report 'afile': exists and is not a directory")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and expected in err[0], err
    assert called == [] and sorted(p.name for p in tmp_path.iterdir()) == [
        "a.yaml", "afile", "b.yaml"]


def test_run_report_follows_a_finished_run_only(tmp_path, monkeypatch, capsys):
    """After the studies end, ``run --report [DIR]`` writes the report of their outputs
    (default with one study: OUTPUT/report), in-process for MLflow when mlflow is
    imported; not after an interrupted run; a failing report exits 1 with one line."""
    from hypersweep.tools.report import main as report_main

    written = []

    def write_report(dirs, out, **options):
        written.append((list(map(str, dirs)), str(out), options))
        return {"tutorial": ""}

    monkeypatch.setattr(report_main, "write_report", write_report)
    monkeypatch.setattr(driver, "run_study", lambda study, **k: _summary(study))

    def run_studies(studies, *, on_result, **options):
        for study in studies:
            on_result(study, _summary(study))

    monkeypatch.setattr(driver, "run_studies", run_studies)
    monkeypatch.chdir(tmp_path)
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(_yaml(study="multi-a", output="out-a"))
    second.write_text(_yaml(study="multi-b", output="out-b"))
    monkeypatch.delitem(sys.modules, "mlflow", raising=False)  # a run with MLflow off
    assert cli.main(["run", str(first), "--report"]) == 0
    out_a, out_b = str(tmp_path / "out-a"), str(tmp_path / "out-b")
    assert written[-1][:2] == ([out_a], str(Path(out_a) / "report"))
    assert written[-1][2] == {"ui_url": "http://127.0.0.1:5000", "mlflow_in_process": False}
    assert f"report written to {out_a}/report/report.html" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "mlflow", types.ModuleType("mlflow"))  # the writer's
    assert cli.main(["run", str(first), str(second), "--report", "rep",
                     "--mlflow-ui", "http://127.0.0.1:5999"]) == 0
    assert written[-1] == ([out_a, out_b], "rep", {"ui_url": "http://127.0.0.1:5999",
                                                   "mlflow_in_process": True})
    capsys.readouterr()

    def interrupted(studies, *, on_result, **options):
        on_result(studies[0], _summary(studies[0]))
        raise SweepInterrupted(15, {"cells_done": 1, "results_dir": "out-b/results"})

    monkeypatch.setattr(driver, "run_studies", interrupted)
    count = len(written)
    assert cli.main(["run", str(first), str(second), "--report", "rep"]) == 143
    assert len(written) == count
    from hypersweep.io.lock import OutputError

    def one_refused(studies, *, on_result, **options):
        on_result(studies[0], _summary(studies[0]))
        on_result(studies[1], OutputError("output out-b/results refuses writes"))

    monkeypatch.setattr(driver, "run_studies", one_refused)
    assert cli.main(["run", str(first), str(second), "--report", "rep"]) == 2
    assert len(written) == count  # a study without its results: no report of them
    capsys.readouterr()

    def failing(dirs, out, **options):
        raise OSError("disk full")

    monkeypatch.setattr(report_main, "write_report", failing)
    assert cli.main(["run", str(first), "--report"]) == 1
    captured = capsys.readouterr()
    assert "study multi-a: 2 cells run" in captured.out
    assert captured.err.splitlines() == [
        f"hypersweep: error: report not written to {Path(out_a) / 'report'}: "
        "OSError: disk full"]


def test_console_script_runs_exit_handlers_flushes_and_keeps_the_status(tmp_path):
    """``cli.console`` (the installed command) ends with os._exit after main: the exit
    status is main's, the atexit handlers ran and buffered output (a pipe) is complete."""
    (tmp_path / "study.yaml").write_text(_yaml())
    code = ("import atexit, sys\n"
            "atexit.register(lambda: print('HANDLER RAN', flush=True))\n"
            "sys.argv = ['hypersweep', 'plan', sys.argv[1]]\n"
            "from hypersweep.cli import console\nconsole()\nprint('NOT REACHED')")
    ok = subprocess.run([sys.executable, "-c", code, "study.yaml"], cwd=tmp_path,
                        env=_env(), capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "12 cells" in ok.stdout and ok.stdout.rstrip().endswith("HANDLER RAN")
    assert "NOT REACHED" not in ok.stdout
    bad = subprocess.run([sys.executable, "-c", code, "absent.yaml"], cwd=tmp_path,
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "absent.yaml" in bad.stderr
    assert "HANDLER RAN" in bad.stdout


def test_a_sigterm_after_a_signal_stopped_run_exits_143_not_killed(tmp_path):
    """What ``cmd_run`` leaves installed once a signal stopped the run: a further SIGTERM
    during the exit ends the process with 143 and its output flushed (the default action
    would kill it, status -15)."""
    code = ("import os, signal, sys, time\nfrom hypersweep import cli\n"
            "signal.signal(signal.SIGTERM, cli._exit_terminated)\n"
            "sys.stdout.write('saved before the signal')\n"
            "os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(30)\nprint('NOT REACHED')")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 143, done.stderr
    assert done.stdout == "saved before the signal"
