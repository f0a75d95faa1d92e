"""``hypersweep plan --json`` and the cost estimate behind it (orchestrator/estimate.py).

The document is one JSON value on stdout; its cells are the plan's; every cell is priced
with a positive, finite estimate that names its source. Cells whose configuration the
regression baseline ran are priced from those very rows ("baseline", "exact"), a larger
budget is scaled from them, the study's own results win over the baseline, and a
(pipeline, algorithm) no row measured falls back to the model. Bad input: exit 2, one
stderr line, nothing on stdout. No torch, jax or Ray is imported.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from hypersweep import cli
from hypersweep.io.schema import RESULT_SCHEMA, empty_row
from hypersweep.orchestrator import estimate
from hypersweep.orchestrator.cell import canonical_json
from hypersweep.orchestrator.expand import expand, plan
from hypersweep.orchestrator.spec import load_study

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "benchmarks" / "baseline.parquet"
# the regression suite's ridge instance: its cells are rows of the committed baseline
RIDGE = {"n_features": 10, "n_train": 40, "n_val": 20}
SUITE_LIKE = dict(study="plan-json", pipeline="hypergradient_error", backend=["jax", "torch"],
                  problems=[{"name": "ridge", "params": RIDGE}], algorithms=["itd", "aid_cg"],
                  t=[20], K=[10], seeds=[0, 1], mlflow={"enabled": False})


def _study(tmp_path: Path, **changes) -> Path:
    data = {**SUITE_LIKE, "output": str(tmp_path / "out"), **changes}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _plan_json(capsys, *argv) -> dict:
    assert cli.main(["plan", *map(str, argv), "--json"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out)  # the whole of stdout is one JSON document


def _baseline_rows() -> list[dict]:
    return pq.read_table(BASELINE).to_pylist()


def test_document_has_the_plans_cells_counts_and_a_finite_estimate(tmp_path, capsys):
    path = _study(tmp_path, problems=[{"name": "ridge", "params": RIDGE}, "quadratic"],
                  algorithms=["itd", "stocbio"], t=[5, 20], K=[5, "t"], seeds=2)
    doc = _plan_json(capsys, path)
    study = load_study(path)
    summary = plan(study)
    assert doc["n_cells"] == summary.total == len(doc["cells"]) > 0
    assert [c["cell_id"] for c in doc["cells"]] == [c.cell_id for c in expand(study)]
    assert sum(doc["counts"]["algorithm"].values()) == summary.total
    assert doc["counts"]["pipeline"] == {"hypergradient_error": summary.total}
    assert {p["problem"]: p for p in doc["pairs"] if p["algorithm"] == "stocbio"}[
        "quadratic"]["cells"] == 0
    assert any("minibatch" in s["reason"] for s in doc["skipped"])
    est = doc["estimate"]
    for key in ("seconds_per_cell", "total_seconds", "seconds_at_actors"):
        assert math.isfinite(est[key]) and est[key] > 0, key
    assert est["source"] in ("baseline", "results", "model", "mixed")
    assert sum(est["sources"].values()) == summary.total
    assert est["references"]["baseline"]["path"] == str(estimate.BASELINE_PATH)
    assert est["actors"] >= 1 and est["actors"] in [b["actors"] for b in est["by_actors"]]
    assert all(b["seconds"] > 0 for b in est["by_actors"])
    for cell in doc["cells"]:
        e = cell["estimate"]
        assert e["source"] in estimate.SOURCES and e["match"] in estimate.MATCHES
        assert math.isfinite(e["seconds"]) and e["seconds"] >= e["wall_s"] > 0
        assert cell["done"] is False
    assert est["pending_cells"] == summary.total
    assert not (tmp_path / "out").exists()  # plan writes nothing


def test_cells_matching_baseline_rows_are_priced_from_them(tmp_path, capsys):
    doc = _plan_json(capsys, _study(tmp_path))
    rows = _baseline_rows()
    assert doc["estimate"]["source"] == "baseline"
    assert doc["estimate"]["matches"] == {"exact": doc["n_cells"]} and doc["n_cells"] == 8
    for cell in doc["cells"]:
        e = cell["estimate"]
        assert (e["source"], e["match"], e["scale"], e["same_instance"]) == (
            "baseline", "exact", 1.0, True)
        same = [r for r in rows if r["status"] == "ok" and all(
            r[k] == cell[k] for k in ("pipeline", "problem", "algorithm", "backend", "t",
                                      "K", "dtype", "problem_params", "pipeline_params",
                                      "algorithm_params"))]
        assert len(same) == 2 and e["reference"] in {r["cell_id"] for r in same}
        walls = [r["wall_time_s"] for r in same]
        # the timed part is the rows' own wall time (their median)
        assert e["wall_s"] == pytest.approx(statistics.median(walls), rel=1e-5)
        # the whole cell: at least its wall time, within a factor 3 of what the faster
        # of the two rows took on its actor, compile excluded
        elapsed = [(r["finished_at"] - r["started_at"]).total_seconds() - r["compile_time_s"]
                   for r in same]
        assert e["wall_s"] <= e["seconds"] <= 3 * min(elapsed)
        assert e["compile_s"] == pytest.approx(max(r["compile_time_s"] for r in same))


def test_a_larger_budget_is_scaled_from_the_baseline(tmp_path, capsys):
    exact = _plan_json(capsys, _study(tmp_path))
    scaled = _plan_json(capsys, _study(tmp_path, t=[80], K=[30]))
    by_key = {(c["algorithm"], c["backend"], c["seed"]): c["estimate"]
              for c in exact["cells"]}
    for cell in scaled["cells"]:
        e, ref = cell["estimate"], by_key[(cell["algorithm"], cell["backend"], cell["seed"])]
        assert (e["source"], e["match"]) == ("baseline", "scaled")
        # work units 2t + K (itd takes no K): (160 + 30) / (40 + 10), or 160 / 40
        ratio = 190 / 50 if cell["K"] is not None else 160 / 40
        assert e["scale"] == pytest.approx(ratio)
        assert e["wall_s"] == pytest.approx(ref["wall_s"] * ratio, rel=1e-5)
    assert scaled["estimate"]["cell_seconds"] > exact["estimate"]["cell_seconds"]


def test_other_instance_is_scaled_and_says_so(tmp_path, capsys):
    doc = _plan_json(capsys, _study(tmp_path, problems=[{"name": "ridge",
                                                         "params": {"n_features": 30}}]))
    for cell in doc["cells"]:
        assert cell["estimate"]["source"] == "baseline"
        assert cell["estimate"]["same_instance"] is False


def test_hpo_cells_are_priced_per_estimator_call(tmp_path, capsys):
    steps = 50
    doc = _plan_json(capsys, _study(tmp_path, pipeline="hpo", K=[10],
                                    pipeline_params={"outer_steps": steps}))
    rows = [r for r in _baseline_rows() if r["problem"] == "ridge"
            and r["problem_params"] == canonical_json(RIDGE)]
    for cell in doc["cells"]:
        e = cell["estimate"]
        assert (e["source"], e["match"]) == ("baseline", "per_call")
        walls = [r["wall_time_s"] for r in rows if r["algorithm"] == cell["algorithm"]
                 and r["backend"] == cell["backend"]]
        assert e["wall_s"] == pytest.approx(steps * statistics.median(walls), rel=1e-5)
        assert e["seconds"] > e["wall_s"]  # + one evaluation with the oracle per step


def test_unmeasured_algorithms_fall_back_to_the_model(tmp_path, capsys):
    doc = _plan_json(capsys, _study(tmp_path, pipeline="hpo", problems=["logreg"],
                                    algorithms=["soba"], K=None,
                                    pipeline_params={"outer_steps": 200}))
    assert doc["estimate"]["source"] == "model"
    model = doc["estimate"]["model"]
    assert set(model["seconds_per_unit"]) == {"jax", "torch"}
    for cell in doc["cells"]:
        e = cell["estimate"]
        assert (e["source"], e["match"]) == ("model", "model")
        assert math.isfinite(e["seconds"]) and e["seconds"] > e["wall_s"] > 0


def test_the_model_prices_fixed_by_its_forward_steps(tmp_path, capsys):
    steps = 40
    doc = _plan_json(capsys, _study(tmp_path, pipeline="hpo", algorithms=["fixed"], K=None,
                                    pipeline_params={"outer_steps": steps}))
    model = doc["estimate"]["model"]
    for cell in doc["cells"]:
        e = cell["estimate"]
        assert (e["source"], e["match"]) == ("model", "model")
        # t inner steps per outer step, nothing else: steps · t work units
        assert e["wall_s"] == pytest.approx(
            steps * cell["t"] * model["seconds_per_unit"][cell["backend"]], rel=1e-5)
        per_eval = model["metrics_s"] + model["oracle_s"]
        assert e["seconds"] == pytest.approx(
            e["wall_s"] + model["cell_overhead_s"] + steps * per_eval, rel=1e-5)


def test_time_budget_caps_the_estimate(tmp_path, capsys):
    doc = _plan_json(capsys, _study(tmp_path, pipeline="hpo", K=[10], pipeline_params={
        "outer_steps": 10**7, "time_budget_s": 3}))
    for cell in doc["cells"]:
        assert cell["estimate"]["wall_s"] == pytest.approx(3.0)
        assert cell["estimate"]["seconds"] < 10


def _write_results(output: Path, cells, *, wall: float, busy: float) -> None:
    """Result rows of ``cells`` as a driver writes them (``ok``, ``actor_busy_s``)."""
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    rows = []
    for cell in cells:
        row = empty_row()
        row.update({k: v for k, v in cell.to_dict().items() if k in row})
        row.update(status="ok", attempt=1, wall_time_s=wall, compile_time_s=0.0,
                   started_at=now, finished_at=now + dt.timedelta(seconds=busy),
                   extra=canonical_json({"actor_busy_s": busy}))
        rows.append(row)
    (output / "results").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA),
                   output / "results" / "part-0.parquet")


def test_the_studys_own_results_win_and_mark_cells_done(tmp_path, capsys):
    path = _study(tmp_path)
    cells = list(expand(load_study(path)))
    done = [c for c in cells if c.seed == 0]
    _write_results(tmp_path / "out", done, wall=0.25, busy=0.5)
    doc = _plan_json(capsys, path)
    assert doc["estimate"]["sources"] == {"results": len(cells)}
    assert doc["estimate"]["pending_cells"] == len(cells) - len(done)
    for cell in doc["cells"]:
        e = cell["estimate"]
        assert cell["done"] is (cell["seed"] == 0)
        # seeds do not change a cell's cost: the seed-1 cells are exact matches too
        assert (e["source"], e["match"]) == ("results", "exact")
        assert (e["wall_s"], e["seconds"]) == (pytest.approx(0.25), pytest.approx(0.5))
    assert doc["estimate"]["references"]["results"]["rows"] == len(done)


def test_batch_rows_share_the_batch_time():
    """A batch yields its first row after the shared work: the rest is split evenly."""
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    rows = [dict(started_at=start, finished_at=start, hostname="h", wall_time_s=w,
                 compile_time_s=c, extra=canonical_json({"actor_busy_s": b, "batch_size": 3}))
            for w, c, b in ((0.1, 0.3, 1.3), (0.2, 0.0, 0.05), (0.3, 0.0, 0.05))]
    rows.append(dict(started_at=start, finished_at=start + dt.timedelta(seconds=2.0),
                     wall_time_s=1.0, compile_time_s=0.0, extra=None))
    elapsed = estimate.cell_elapsed(rows)
    rest = (1.4 - (0.1 + 0.3 + 0.2 + 0.3)) / 3
    assert elapsed[:3] == pytest.approx([0.4 + rest, 0.2 + rest, 0.3 + rest])
    assert sum(elapsed[:3]) == pytest.approx(1.4)  # the batch's time, all of it
    assert elapsed[3] == pytest.approx(2.0)  # in-process: finished − started


def test_plain_plan_shows_the_estimate_in_one_line(tmp_path, capsys):
    assert cli.main(["plan", str(_study(tmp_path))]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith("estimate:")]
    assert len(lines) == 1 and "baseline 8" in lines[0] and "actor(s)" in lines[0]


def test_no_cells_leaves_the_list_out(tmp_path, capsys):
    doc = json.loads(_run_quietly(capsys, ["plan", str(_study(tmp_path)), "--json",
                                           "--no-cells"]))
    assert doc["cells_included"] is False and doc["cells"] == [] and doc["n_cells"] == 8


def _run_quietly(capsys, argv) -> str:
    assert cli.main(argv) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv_tail, fragment", [
    (["--set", "t=[0]"], "t"),
    (["--set", "algorithms=[itdd]"], "unknown algorithm 'itdd'"),
    (["--baseline", "/nonexistent/baseline.parquet"], "--baseline"),
])
def test_bad_input_exits_2_with_nothing_on_stdout(tmp_path, capsys, argv_tail, fragment):
    code = cli.main(["plan", str(_study(tmp_path)), "--json", *argv_tail])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and fragment in captured.err


def test_a_missing_study_exits_2_with_nothing_on_stdout(tmp_path, capsys):
    assert cli.main(["plan", str(tmp_path / "none.yaml"), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "not found" in captured.err


def test_plan_json_imports_neither_torch_jax_nor_ray(tmp_path):
    script = textwrap.dedent("""
        import sys
        from hypersweep.cli import main
        rc = main(sys.argv[1:])
        heavy = sorted(m for m in ("ray", "torch", "jax") if m in sys.modules)
        sys.stderr.write("IMPORTED=" + ",".join(heavy) + "\\n")
        sys.exit(rc)
    """)
    proc = subprocess.run([sys.executable, "-c", script, "plan", str(_study(tmp_path)),
                           "--json", "--no-cells"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n_cells"] == 8
    assert "IMPORTED=\n" in proc.stderr
