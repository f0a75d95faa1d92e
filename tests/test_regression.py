"""The regression gate: comparison rules on synthetic tables, then the real thing.

* rules (no backend): each threshold is hit from both sides, so every rule can fail;
* gate mechanics on a small torch-only suite run in this process: unchanged code passes
  twice (suite → baseline → suite again), and an ``aid_cg`` whose CG steps along the
  residual instead of the search direction — swapped into the registry under the *same*
  name — fails with exactly its cells named in the markdown;
* the shipped suite, completed from the catalogs, covers every registered estimator and
  problem (a newly registered one joins as new cells), and the committed baseline matches
  the suite file cell for cell (fast); the whole suite against the committed
  baseline (``slow``: about a minute of CPU on an idle 2-core box).
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from hypersweep.tools.regression import main as regression
from hypersweep.tools.regression import suite
from hypersweep.tools.regression.markdown import render_markdown
from hypersweep.tools.regression.rules import Tolerances, compare

REPO_ROOT = Path(__file__).resolve().parent.parent
SUITE = REPO_ROOT / "configs" / "regression.yaml"
BASELINE = REPO_ROOT / "benchmarks" / "baseline.parquet"


# ---------------------------------------------------------------------------------------
# Comparison rules on synthetic tables


def _table(rows: list[dict]) -> pa.Table:
    full = []
    for row in rows:
        full.append(dict(dict(problem="ridge", algorithm="aid_cg", backend="torch",
                              status="ok", hypergrad_rel_error=1e-3, wall_time_s=0.1),
                         **row))
    return pa.Table.from_pylist(full)


def _cells(n: int, **overrides) -> list[dict]:
    return [dict(cell_id=f"c{i}", **overrides) for i in range(n)]


def test_identical_runs_pass():
    base = _table(_cells(4))
    result = compare(base, base)
    assert result.n_compared == 4
    assert not result.failed and not result.regressions and not result.improvements
    assert result.suite_time_ratio == pytest.approx(1.0)


def test_error_growth_beyond_rtol_regresses_and_within_does_not():
    tol = Tolerances(rtol=0.01, atol=1e-10)
    base = _table([dict(cell_id="a", hypergrad_rel_error=1e-3),
                   dict(cell_id="b", hypergrad_rel_error=1e-3)])
    now = _table([dict(cell_id="a", hypergrad_rel_error=1.02e-3),    # +2 %: regression
                  dict(cell_id="b", hypergrad_rel_error=1.005e-3)])  # +0.5 %: noise
    result = compare(base, now, tol)
    assert result.regressed_cell_ids() == ["a"]
    assert result.regressions[0].what == "error" and result.failed


def test_errors_at_the_float64_floor_use_the_absolute_tolerance():
    tol = Tolerances(rtol=0.01, atol=1e-10)
    base = _table([dict(cell_id="a", hypergrad_rel_error=1e-14),
                   dict(cell_id="b", hypergrad_rel_error=1e-14)])
    # a: 5× larger but still 1e-13 in absolute terms -> round-off, not a regression
    # b: grew past base + atol -> regression
    now = _table([dict(cell_id="a", hypergrad_rel_error=5e-14),
                  dict(cell_id="b", hypergrad_rel_error=2e-10)])
    assert compare(base, now, tol).regressed_cell_ids() == ["b"]


def test_nan_error_and_worse_status_regress_better_ones_improve():
    base = _table([dict(cell_id="nan"), dict(cell_id="err"), dict(cell_id="fixed",
                   status="error", hypergrad_rel_error=None),
                   dict(cell_id="better", hypergrad_rel_error=1e-2)])
    now = _table([dict(cell_id="nan", hypergrad_rel_error=float("nan")),
                  dict(cell_id="err", status="diverged"), dict(cell_id="fixed"),
                  dict(cell_id="better", hypergrad_rel_error=1e-4)])
    result = compare(base, now)
    assert {(c.cell_id, c.what) for c in result.regressions} == {("nan", "error"),
                                                                  ("err", "status")}
    assert {(c.cell_id, c.what) for c in result.improvements} == {("fixed", "status"),
                                                                   ("better", "error")}


def test_still_failing_cells_are_neither_regressions_nor_improvements():
    base = _table([dict(cell_id="a", status="error", hypergrad_rel_error=None)])
    now = _table([dict(cell_id="a", status="timeout", hypergrad_rel_error=None)])
    result = compare(base, now)
    assert not result.regressions and not result.improvements and not result.failed


def test_a_uniformly_slower_machine_flags_nothing_but_one_slow_group_is_flagged():
    rows = [dict(cell_id=f"{p}{i}", problem=p, algorithm="itd", wall_time_s=1.0)
            for p in ("ridge", "logreg", "quadratic") for i in range(3)]
    base = _table(rows)
    uniformly = _table([dict(r, wall_time_s=3.0) for r in rows])
    result = compare(base, uniformly)
    assert result.suite_time_ratio == pytest.approx(3.0, rel=0.01)
    assert not result.slowdowns and not result.speedups

    one_slow = _table([dict(r, wall_time_s=4.0 if r["problem"] == "logreg" else 1.0)
                       for r in rows])
    tol = Tolerances(slowdown=1.5, time_floor_s=0.005)
    result = compare(base, one_slow, tol)
    assert [(c.problem, c.algorithm) for c in result.slowdowns] == [("logreg", "itd")]
    assert result.slowdowns[0].normalized_ratio == pytest.approx(4.005 / 1.005, rel=1e-9)
    assert not result.failed  # flagged only ...
    assert compare(base, one_slow, Tolerances(fail_on_slowdown=True)).failed  # ... unless
    # 1.4x is under the threshold: nothing flagged
    mild = _table([dict(r, wall_time_s=1.4 if r["problem"] == "logreg" else 1.0)
                   for r in rows])
    assert not compare(base, mild, tol).slowdowns


def test_sub_millisecond_jitter_is_absorbed_by_the_time_floor():
    rows = [dict(cell_id=f"{p}{i}", problem=p, wall_time_s=0.0005)
            for p in ("ridge", "logreg", "quadratic") for i in range(2)]
    now = _table([dict(r, wall_time_s=0.0015 if r["problem"] == "ridge" else 0.0005)
                  for r in rows])
    assert not compare(_table(rows), now, Tolerances(time_floor_s=0.005)).slowdowns
    assert compare(_table(rows), now, Tolerances(time_floor_s=0.0)).slowdowns


def test_missing_cells_fail_and_new_cells_are_listed_only():
    base = _table(_cells(3))
    now = _table(_cells(2) + [dict(cell_id="extra")])
    result = compare(base, now)
    assert result.missing_cells == ["c2"] and result.new_cells == ["extra"]
    assert result.failed
    assert not compare(_table(_cells(2)), now).failed


def test_markdown_names_the_regressed_cells_and_the_verdict():
    base = _table(_cells(2))
    now = _table([dict(cell_id="c0"), dict(cell_id="c1", hypergrad_rel_error=0.5)])
    text = render_markdown(compare(base, now), suite="s.yaml", baseline="b.parquet",
                           run_dir="/r", n_cells=2)
    assert text.startswith("# Regression gate: FAILED")
    assert "| `c1` | ridge | aid_cg | torch | error | 1.000e-03 | 5.000e-01 |" in text
    assert "`c0`" not in text
    assert render_markdown(compare(base, base)).startswith("# Regression gate: passed")


@pytest.mark.parametrize("bad", [dict(rtol=-1.0), dict(atol=float("nan")),
                                 dict(slowdown=1.0), dict(time_floor_s=-0.1)])
def test_bad_tolerances_are_rejected(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        Tolerances(**bad)


def test_compare_rejects_tables_that_are_not_results():
    with pytest.raises(ValueError, match="hypergrad_rel_error"):
        compare(pa.table({"cell_id": ["a"]}), _table(_cells(1)))


# ---------------------------------------------------------------------------------------
# The gate end to end on a small suite (torch only: no JIT, a few seconds)


SMALL_SUITE = """\
study: regression-small
pipeline: hypergradient_error
backend: [torch]
dtype: float64
problems:
  - name: ridge
    params: {n_features: 10, n_train: 40, n_val: 20}
  - name: quadratic
    params: {dim_inner: 10, dim_outer: 3}
algorithms: [itd, aid_cg, aid_fp]
t: [20]
K: [10]
seeds: [0, 1]
output: OUTPUT
mlflow: {enabled: false}
"""


def wrong_cg(problem, lam, *, t: int, K: int, seed: int = 0):
    """aid_cg with a classic typo: x moves along the residual r instead of the search
    direction p. Everything else (α, β, the residual update) is textbook CG."""
    import torch

    from hypersweep.algorithms.torch import aid

    w_t, lin, rhs, grad_lam = aid._adjoint_setup(problem, lam, t)
    matvec = lambda p: problem.inner_lr * lin.hvp(p)  # noqa: E731
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rr = torch.sum(r * r)
    for _ in range(K):
        Ap = matvec(p)
        alpha = rr / torch.sum(p * Ap)
        x = x + alpha * r  # the bug: should be alpha * p
        r = r - alpha * Ap
        rr_new = torch.sum(r * r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return aid._finish(problem, lam, w_t, lin, grad_lam, x, t, K, K, {})


@pytest.fixture
def small_suite(tmp_path, monkeypatch):
    # What `main` would set for in-process runs; monkeypatch restores it afterwards.
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    path = tmp_path / "small.yaml"
    path.write_text(SMALL_SUITE.replace("OUTPUT", str(tmp_path / "runs")))
    return path


@pytest.fixture
def degraded_aid_cg(monkeypatch):
    """Swap aid_cg's torch implementation for :func:`wrong_cg` under the same name, in
    place (the catalog keeps its order); both are restored after the test."""
    from hypersweep import algorithms
    from hypersweep.algorithms.catalog import ALGORITHMS

    original = ALGORITHMS.spec("aid_cg")
    degraded = dataclasses.replace(original, impls={**original.impls,
                                                    "torch": f"{__name__}:wrong_cg"})
    monkeypatch.setitem(ALGORITHMS._specs, "aid_cg", degraded)
    algorithms.get.cache_clear()
    yield
    algorithms.get.cache_clear()


def _gate(suite: Path, baseline: Path, tmp_path: Path, *extra: str) -> tuple[int, str]:
    report = tmp_path / "report.md"
    code = regression.main(["--suite", str(suite), "--baseline", str(baseline),
                            "--report", str(report), "--listed-only", *extra])
    return code, report.read_text()


def test_gate_passes_on_unchanged_code_and_fails_on_a_degraded_algorithm(
        small_suite, tmp_path, request):
    baseline = tmp_path / "baseline.parquet"
    code, text = _gate(small_suite, baseline, tmp_path, "--update-baseline")
    assert code == 0 and baseline.is_file()
    assert "Baseline written" in text
    base_table, info = suite.read_baseline(baseline)
    assert base_table.num_rows == 12 and info["cells"] == 12
    assert set(base_table.column("status").to_pylist()) == {"ok"}

    code, text = _gate(small_suite, baseline, tmp_path)
    assert code == 0, text
    assert text.startswith("# Regression gate: passed")
    assert "12 cells compared; 0 regression(s)" in text

    request.getfixturevalue("degraded_aid_cg")
    code, text = _gate(small_suite, baseline, tmp_path)
    assert code == 1, text
    assert text.startswith("# Regression gate: FAILED")
    cg_cells = sorted(c for c in base_table.column("cell_id").to_pylist()
                      if ".aid_cg." in c)
    assert len(cg_cells) == 4
    regressed = sorted(line.split("`")[1] for line in text.splitlines()
                       if line.startswith("| `"))
    # exactly the aid_cg cells regress; itd and aid_fp are untouched by the swap
    assert regressed == cg_cells
    assert "4 regression(s)" in text


def test_missing_baseline_and_bad_arguments_exit_2(small_suite, tmp_path, capsys):
    code = regression.main(["--suite", str(small_suite), "--baseline",
                            str(tmp_path / "nope.parquet")])
    assert code == 2
    assert "--update-baseline" in capsys.readouterr().err
    assert regression.main(["--rtol", "abc"]) == 2
    assert regression.main(["--suite", str(tmp_path / "none.yaml"), "--update-baseline",
                            "--baseline", str(tmp_path / "b.parquet")]) == 2
    assert regression.main(["--slowdown", "0.5", "--baseline", str(BASELINE)]) == 2


def test_regress_is_reachable_from_the_cli(tmp_path):
    from hypersweep import cli

    code = cli.main(["regress", "--suite", str(tmp_path / "none.yaml"), "--baseline",
                     str(tmp_path / "none.parquet")])
    assert code == 2


# ---------------------------------------------------------------------------------------
# The shipped suite and baseline


def test_suite_covers_every_hypergradient_algorithm_and_problem():
    from hypersweep import algorithms, problems

    study = suite.load_suite(SUITE)
    assert {a.name for a in study.algorithms} == set(algorithms.names("estimator"))
    assert {p.name for p in study.problems} == set(problems.names())
    assert set(study.backend) == {"jax", "torch"}
    assert study.dtype == "float64" and study.pipeline == "hypergradient_error"


def test_a_newly_registered_problem_joins_the_suite_as_new_cells(monkeypatch, tmp_path):
    """No edit of the suite file: a problem registered in the catalog runs on its small
    instance, and its cells are new to the committed baseline, none of which goes missing."""
    from hypersweep.orchestrator.expand import expand
    from hypersweep.problems.catalog import PROBLEMS

    small = {"dim_inner": 4, "dim_outer": 2}
    copy = dataclasses.replace(PROBLEMS.spec("quadratic"), name="quadratic_copy", small=small)
    monkeypatch.setitem(PROBLEMS._specs, "quadratic_copy", copy)
    study = suite.load_suite(SUITE, output=tmp_path)
    (entry,) = [p for p in study.problems if p.name == "quadratic_copy"]
    assert dict(entry.params) == small
    cells = {cell.cell_id: cell for cell in expand(study)}
    baseline_ids = set(suite.read_baseline(BASELINE)[0].column("cell_id").to_pylist())
    assert baseline_ids <= set(cells)
    new = set(cells) - baseline_ids
    assert new and {cells[c].problem for c in new} == {"quadratic_copy"}
    listed = suite.load_suite(SUITE, output=tmp_path, complete=False)
    assert "quadratic_copy" not in {p.name for p in listed.problems}


def test_committed_baseline_matches_the_suite_cell_for_cell():
    from hypersweep.orchestrator.expand import expand
    from hypersweep.orchestrator.spec import load_study

    table, info = suite.read_baseline(BASELINE)
    expected = sorted(cell.cell_id for cell in expand(load_study(SUITE)))
    assert sorted(table.column("cell_id").to_pylist()) == expected, (
        "configs/regression.yaml changed without a new baseline: run "
        "`hypersweep regress --update-baseline` and commit benchmarks/baseline.parquet")
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert set(table.column("dtype").to_pylist()) == {"float64"}
    assert info.get("suite") and info.get("created_at")


@pytest.mark.slow
def test_full_suite_passes_against_the_committed_baseline(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "hypersweep", "regress", "--suite", str(SUITE),
         "--baseline", str(BASELINE), "--output", str(tmp_path / "runs"),
         "--report", str(tmp_path / "report.md")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "# Regression gate: passed" in proc.stdout


def test_nightly_workflow_installs_runs_the_gate_and_uploads_the_report():
    import yaml

    workflow = yaml.safe_load((REPO_ROOT / ".github/workflows/regression.yml").read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as True
    assert triggers["schedule"][0]["cron"].split()[2:] == ["*", "*", "*"]  # daily
    steps = workflow["jobs"]["gate"]["steps"]
    runs = [step.get("run", "") for step in steps]
    assert any(run.strip() == "make install" for run in runs)
    gate = next(run for run in runs if "hypersweep regress" in run)
    for arg in ("--suite configs/regression.yaml", "--baseline benchmarks/baseline.parquet",
                "--report regression.md"):
        assert arg in gate
    upload = next(step for step in steps if "upload-artifact" in step.get("uses", ""))
    assert upload["if"] == "always()" and "regression.md" in upload["with"]["path"]
