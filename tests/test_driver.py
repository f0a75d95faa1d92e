"""The sweep driver end to end on a real local Ray and a real (sqlite) MLflow store.

Plus the pieces that need no Ray: pool sizing, the atomic Parquet writer and
dedupe-on-read, the MLflow grouping, the summary table, the no-torch/jax import rule (the
feed and the pool's bookkeeping are in tests/test_pool.py).
"""
from __future__ import annotations

import datetime as dt
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import sweep_test_pipeline
from hypersweep.io import parquet, tracking, tracking_sync
from hypersweep.io.schema import RESULT_SCHEMA, empty_row
from hypersweep.orchestrator import driver, resources
from hypersweep.orchestrator.summary import format_summary

ROOT = Path(__file__).resolve().parents[1]

STUDY_YAML = """\
study: e2e_ridge
pipeline: hypergradient_error
backend: jax
dtype: float64
problems:
  - name: ridge
    params: {{n_features: 10, n_train: 40, n_val: 20}}
algorithms: [aid_cg, itd]
t: [5, 40]
K: [5]
seeds: [0, 1]
resources: {{num_cpus: 1}}
num_actors: 2
output: {output}
mlflow: {{tracking_uri: "{uri}"}}
"""


@pytest.mark.ray
def test_small_ridge_study_end_to_end(ray_session, tmp_path, mlflow_sqlite):
    from mlflow import MlflowClient

    from hypersweep.orchestrator.expand import count_cells, expand
    from hypersweep.orchestrator.spec import parse_study

    study = parse_study(STUDY_YAML.format(output=tmp_path / "out", uri=mlflow_sqlite))
    expected_ids = {cell.cell_id for cell in expand(study)}
    assert count_cells(study) == 8  # (aid_cg: 2 t × 1 K + itd: 2 t) × 2 seeds

    summary = driver.run_study(study, quiet=True)

    assert summary["counts"]["ok"] == 8 and summary["cells_done"] == 8
    assert summary["study_counts"] == {"ok": 8, "error": 0, "diverged": 0, "timeout": 0,
                                       "crashed": 0}
    assert (tmp_path / "out" / "study.yaml").read_text() == study.source_text

    table = parquet.read_results(tmp_path / "out")
    assert table.schema == RESULT_SCHEMA
    assert set(table.column("cell_id").to_pylist()) == expected_ids
    rows = {(r["algorithm"], r["t"], r["seed"]): r for r in table.to_pylist()}
    for (algorithm, t, seed), row in rows.items():
        assert row["status"] == "ok" and row["attempt"] == 1
        assert row["problem"] == "ridge" and row["backend"] == "jax"
        assert row["K"] == (5 if algorithm == "aid_cg" else None)
        assert 0 < row["hypergrad_rel_error"] < 1, row  # a hypergradient, not noise
        assert row["wall_time_s"] > 0 and row["finished_at"] >= row["started_at"]
    # On ridge the inner problem contracts, so more inner steps t give a better estimate
    # for ITD (and for AID at fixed K, whose error is dominated by w_t here).
    for algorithm in ("aid_cg", "itd"):
        for seed in (0, 1):
            assert rows[(algorithm, 40, seed)]["hypergrad_rel_error"] < \
                rows[(algorithm, 5, seed)]["hypergrad_rel_error"]

    # The same files through pandas, polars and duckdb.
    import pandas as pd
    frame = pd.read_parquet(tmp_path / "out" / "results")
    assert frame.shape == (8, len(RESULT_SCHEMA)) and list(frame.columns) == RESULT_SCHEMA.names
    by_id = frame.set_index("cell_id")["hypergrad_rel_error"].to_dict()
    for row in table.to_pylist():
        assert by_id[row["cell_id"]] == row["hypergrad_rel_error"]
    polars = pytest.importorskip("polars")
    assert polars.read_parquet(str(tmp_path / "out" / "results" / "*.parquet")).height == 8
    duckdb = pytest.importorskip("duckdb")
    count = duckdb.sql(f"select count(*) from read_parquet("
                       f"'{tmp_path / 'out' / 'results'}/*.parquet')").fetchall()[0][0]
    assert count == 8

    # MLflow: one parent, one child per (algorithm, K, seed) group, t as the step.
    client = MlflowClient(tracking_uri=mlflow_sqlite)
    experiment = client.get_experiment_by_name("e2e_ridge")
    parents = client.search_runs([experiment.experiment_id],
                                 "tags.`hypersweep.role` = 'parent'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.tags["hypersweep.study"] == "e2e_ridge"
    assert parent.data.params["pipeline"] == "hypergradient_error"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"study.yaml", "summary.json"} <= artifacts
    children = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 4
    for child in children:
        params = child.data.params
        assert params["problem"] == "ridge" and params["problem.n_features"] == "10"
        history = client.get_metric_history(child.info.run_id, "hypergrad_rel_error")
        assert sorted(m.step for m in history) == [5, 40]
        for metric in history:
            row = rows[(params["algorithm"], metric.step, int(params["seed"]))]
            assert metric.value == pytest.approx(row["hypergrad_rel_error"], rel=1e-12)

    # Resume: nothing left to run, nothing new written, MLflow already complete.
    parts = sorted((tmp_path / "out" / "results").glob("*.parquet"))
    again = driver.run_study(study, quiet=True)
    assert again["cells_done"] == 0 and again["cells_skipped"] == 8
    assert sorted((tmp_path / "out" / "results").glob("*.parquet")) == parts
    assert tracking_sync.sync_mlflow(tmp_path / "out")["logged"] == 0
    assert "e2e_ridge" in format_summary(again)


def test_pool_size_from_resources(tmp_path):
    study = sweep_test_pipeline.study(tmp_path, resources={"num_cpus": 0.5})
    assert resources.study_pool_size(study, {"CPU": 2.0}) == 4
    study = sweep_test_pipeline.study(tmp_path, resources={"num_cpus": 1, "num_gpus": 0.25})
    assert resources.study_pool_size(study, {"CPU": 16.0, "GPU": 1.0}) == 4  # GPU-bound
    study = sweep_test_pipeline.study(tmp_path, resources={"num_cpus": 4})
    assert resources.study_pool_size(study, {"CPU": 2.0}) == 1  # at least one
    study = sweep_test_pipeline.study(tmp_path, resources={"num_cpus": 4}, num_actors=3)
    assert resources.study_pool_size(study, {"CPU": 2.0}) == 3


def _row(cell_id: str, status: str, minute: int) -> dict:
    row = empty_row()
    stamp = dt.datetime(2026, 1, 1, 0, minute, tzinfo=dt.timezone.utc)
    row.update(study="s", cell_id=cell_id, status=status, started_at=stamp, finished_at=stamp)
    return row


def test_parquet_parts_are_atomic_and_deduped_on_read(tmp_path):
    sink = parquet.ParquetSink(tmp_path, flush_rows=2, flush_seconds=1e9)
    sink.add(_row("c1", "crashed", 1))
    assert not sink.due()
    sink.add(_row("c2", "ok", 2))
    assert sink.due()
    sink.flush()
    sink.add(_row("c1", "ok", 3))  # a retry of c1, later
    sink.flush()
    results = tmp_path / "results"
    # A writer killed mid-write leaves only a dot-prefixed temporary file: invisible.
    (results / ".part-123-deadbeef.parquet.tmp").write_bytes(b"PAR1 truncated")
    raw = parquet.read_results(tmp_path, latest=False)
    assert raw.num_rows == 3
    latest = parquet.read_results(tmp_path)
    assert dict(zip(latest.column("cell_id").to_pylist(),
                    latest.column("status").to_pylist())) == {"c1": "ok", "c2": "ok"}
    for part in results.glob("part-*.parquet"):
        assert pq.read_schema(part) == RESULT_SCHEMA
    parquet.ParquetSink(tmp_path)  # startup sweeps stale temporaries
    assert not list(results.glob(".*.tmp"))
    assert parquet.read_results(tmp_path / "missing").num_rows == 0


def test_mlflow_group_and_fingerprint_are_stable():
    row = {**_row("c1", "ok", 1), "problem": "ridge", "algorithm": "itd", "backend": "jax",
           "K": None, "seed": 3, "t": 10, "dtype": "float64", "pipeline": "p",
           "problem_params": '{"n":{"a":1}}', "algorithm_params": "{}",
           "pipeline_params": "{}"}
    other_t = {**row, "t": 20}
    other_seed = {**row, "seed": 4}
    assert tracking.group_id(row) == tracking.group_id(other_t) != tracking.group_id(other_seed)
    params = tracking.group_params(row)
    assert params["problem.n.a"] == "1" and params["K"] == "None"
    assert tracking.cell_fingerprint(row) == "ok@2026-01-01T00:01:00.000000+00:00"


def test_orchestrator_never_imports_torch_or_jax():
    code = textwrap.dedent("""
        import sys
        import hypersweep.orchestrator.driver, hypersweep.orchestrator.actors
        import hypersweep.io.parquet, hypersweep.io.tracking, hypersweep.io.tracking_sync
        import hypersweep.orchestrator.pool, hypersweep.orchestrator.feed
        import hypersweep.orchestrator.sinks, hypersweep.orchestrator.summary
        import hypersweep.orchestrator.progress
        bad = [m for m in ("torch", "jax") if m in sys.modules]
        assert not bad, bad
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_nothing_heavy_is_imported_before_ray_starts(tmp_path):
    """What a run into a new output does before Ray starts is the driver's critical path
    (one core, nothing else running): it imports neither pandas (via pyarrow.dataset or
    ``Schema.empty_table``), nor ``scipy.special`` (via the problem modules' numpy_ops),
    nor mlflow (0.2–1.5 s each). numpy_ops' scipy functions, imported on first use, still
    equal scipy's."""
    code = textwrap.dedent(f"""
        import os, sys
        from hypersweep import cli
        from hypersweep.orchestrator import driver

        def at_ray_start(*args, **kwargs):
            heavy = [m for m in ("pandas", "scipy.special", "pyarrow.dataset", "mlflow",
                                 "jax", "torch") if m in sys.modules]
            print("HEAVY=" + ",".join(heavy), flush=True)
            os._exit(0)

        driver.init_ray = at_ray_start
        cli.main(["run", "--quiet", {str(ROOT / "configs" / "grazzi2020.yaml")!r},
                  "--set", "output={tmp_path / 'out'}", "--set", "mlflow.enabled=false"])
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert "HEAVY=\n" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    check = textwrap.dedent("""
        import numpy as np
        from scipy import special
        from hypersweep.problems import numpy_ops
        x = np.array([[-800.0, 0.0, 3.0], [1.0, 2.0, 700.0]])
        assert np.array_equal(numpy_ops.sigmoid(x), special.expit(x))
        assert np.array_equal(numpy_ops.logsumexp(x, axis=1), special.logsumexp(x, axis=1))
        assert np.array_equal(numpy_ops.log_softmax(x, axis=0),
                              special.log_softmax(x, axis=0))
    """)
    subprocess.run([sys.executable, "-c", check], check=True, timeout=120)


def test_empty_table_is_schema_empty_table():
    for schema in (RESULT_SCHEMA, parquet.TRACE_SCHEMA):
        table = parquet.empty_table(schema)
        assert table.num_rows == 0 and table.equals(schema.empty_table())
        assert table.schema.equals(schema, check_metadata=True)


def test_format_summary_lists_statuses_and_medians():
    summary = {"study": "s", "cells_done": 2, "cells_skipped": 1, "wall_time_s": 1.5,
               "results_dir": "/x/results",
               "study_counts": {"ok": 2, "error": 1, "diverged": 0, "timeout": 0,
                                "crashed": 0},
               "per_pair": [{"problem": "ridge", "algorithm": "itd", "cells": 3, "ok": 2,
                             "median_rel_error": 0.125, "median_wall_time_s": 0.01}]}
    text = format_summary(summary)
    assert "ok 2  error 1" in text and "1.250e-01" in text and "ridge × itd" in text
    assert math.isclose(float(text.split()[-2]), 0.125)
