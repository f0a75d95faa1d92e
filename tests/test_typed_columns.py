"""Typed param columns beside the JSON ones (issue #14, results): every problem of the
catalog records the sizes of the instance it built, defaulted, given or read from a file;
the common algorithm and pipeline params are typed columns that polars and duckdb read as
integers and floats; parts written before these columns existed still read, and the next
compaction rewrites them in the current schema. No Ray: cells run through ``run_cell``
(PyTorch, t = 1), as an actor runs them."""
from __future__ import annotations

import json

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hypersweep import problems
from hypersweep.io import parquet
from hypersweep.io.schema import (ALGORITHM_PARAM_FIELDS, PARAM_COLUMNS, PARAM_FIELDS,
                                  PIPELINE_PARAM_FIELDS, PROBLEM_FIELDS, RESULT_SCHEMA)
from hypersweep.orchestrator.cell import Cell, canonical_json, cell_row, run_cell
from hypersweep.problems.catalog import PROBLEMS

#: catalog params that set a size, and the column that records it
SIZE_PARAMS = {"n_train": "n_train", "n_val": "n_val", "n_test": "n_test",
               "n_features": "n_features", "n_tasks": "n_tasks", "n_samples": "n_train",
               "n_samples_outer": "n_val", "dim_inner": "dim_w", "dim_outer": "dim_lam"}
SAMPLE_PARAMS = ("n_train", "n_samples")
SIZE_COLUMNS = [name for name, _ in PROBLEM_FIELDS if name != "inner_lr"]


def _cell(problem: str, params: dict, *, algorithm: str = "itd", pipeline: str =
          "hypergradient_error", algorithm_params: dict | None = None,
          pipeline_params: dict | None = None, seed: int = 0) -> Cell:
    return Cell(study="typed", pipeline=pipeline, problem=problem, algorithm=algorithm,
                backend="torch", t=1, K=None, seed=seed, problem_params=canonical_json(params),
                algorithm_params=canonical_json(algorithm_params or {}),
                pipeline_params=canonical_json(pipeline_params or {}))


def _finished_row(cell: Cell) -> dict:
    row, _ = run_cell(cell)
    assert row["status"] == "ok", row["error_message"]
    return row


@pytest.mark.parametrize("given", [True, False], ids=["given", "defaulted"])
def test_every_catalog_problem_records_the_sizes_it_built(given):
    for spec in PROBLEMS:
        params = dict(spec.small) if given else {}
        row = _finished_row(_cell(spec.name, params))
        _, _, built = problems.build(spec.name, seed=0, **params)
        merged = {**spec.params, **params}
        where = f"{spec.name} {params}"
        assert row["problem_params"] == canonical_json(params), where  # identity untouched
        for key, column in SIZE_PARAMS.items():
            if key in merged:
                assert row[column] == merged[key], (where, column, row[column])
        assert row["dim_w"] == int(np.prod(built.w_shape)), where
        assert row["dim_lam"] == built.lam0.size, where
        assert row["inner_lr"] == pytest.approx(built.inner_lr, rel=1e-12), where
        if any(key in merged for key in SAMPLE_PARAMS):  # a problem made of samples
            assert row["n_train"] is not None and row["n_val"] is not None, where
            assert row["n_test"] is not None, where
        if "n_features" in merged or "dataset" in merged:  # made of feature vectors
            assert row["n_features"] is not None and row["n_features"] > 0, where
        assert row["n_features"] == problems.make(
            spec.name, backend="torch", dtype="float64", **params).sizes["n_features"]


def _svmlight(path, rows: int, features: int, seed: int = 0) -> None:
    g = np.random.default_rng(seed)
    lines = []
    for i in range(rows):
        columns = sorted(g.choice(features, size=3, replace=False) + 1)
        columns[-1] = features if i == 0 else columns[-1]  # the file's width is `features`
        columns = sorted(set(columns))
        label = 1 if i % 2 else -1
        lines.append(f"{label} " + " ".join(f"{c}:{g.normal():.4f}" for c in columns))
    path.write_text("\n".join(lines) + "\n")


def test_file_based_problems_record_the_files_sizes_not_the_defaults(tmp_path):
    from hypersweep.problems import quadratic_sum

    svm = tmp_path / "small.svm"
    _svmlight(svm, rows=40, features=12)
    row = _finished_row(_cell("sparse_logreg", {"data": str(svm), "n_train": 20,
                                                "n_val": 15, "n_test": 5}))
    assert (row["n_train"], row["n_val"], row["n_test"], row["n_features"],
            row["n_classes"], row["dim_w"]) == (20, 15, 5, 12, 2, 12)

    npz = tmp_path / "quadratic.npz"
    np.savez(npz, **quadratic_sum._generate(0, 25, 15, 3, 2, 0.5, 0.1))
    row = _finished_row(_cell("quadratic_sum", {"data": str(npz)}))
    assert (row["n_train"], row["n_val"], row["n_test"], row["dim_w"],
            row["dim_lam"]) == (25, 15, 0, 3, 2)

    g = np.random.default_rng(1)
    ridge = tmp_path / "ridge.npz"
    np.savez(ridge, X_train=g.normal(size=(17, 6)), y_train=g.normal(size=17),
             X_val=g.normal(size=(9, 6)), y_val=g.normal(size=9))
    row = _finished_row(_cell("ridge", {"data": str(ridge)}))
    assert (row["n_train"], row["n_val"], row["n_test"], row["n_features"],
            row["dim_w"]) == (17, 9, 0, 6, 6)


def test_rows_of_a_batch_record_the_sizes_of_each_seeds_instance():
    from hypersweep.orchestrator.cell import run_cells

    cells = [Cell(study="typed", pipeline="hypergradient_error", problem="ridge",
                  algorithm="itd", backend="torch", t=t, K=None, seed=seed,
                  problem_params=canonical_json({"n_train": 12, "n_val": 7}))
             for seed in (0, 1) for t in (1, 2)]
    rows = [row for row, _ in run_cells(cells)]
    assert {row["cell_id"] for row in rows} == {cell.cell_id for cell in cells}
    assert {(row["status"], row["n_train"], row["n_val"], row["n_features"])
            for row in rows} == {("ok", 12, 7, 25)}


def test_cell_ids_are_those_of_the_versions_before_the_typed_columns():
    """A resume finds the cells an older version finished: the typed columns are row
    columns only, never part of a cell's identity (ids computed before they existed)."""
    hpo = Cell(study="typed", pipeline="hpo", problem="ridge", algorithm="soba",
               backend="jax", t=5, K=None, seed=1, pipeline_params='{"outer_lr":0.5}')
    error = Cell(study="typed", pipeline="hypergradient_error", problem="logreg",
                 algorithm="aid_cg", backend="torch", t=10, K=10, K_setting="t", seed=0,
                 problem_params='{"n_train":40}')
    assert hpo.cell_id == "ridge.soba.jax.t5.K-.s1.05eee343"
    assert error.cell_id == "logreg.aid_cg.torch.t10.Kt.s0.f7a82aae"


def test_a_failure_row_has_typed_params_and_no_sizes():
    cell = _cell("ridge", {"n_features": -1})  # build fails: no instance, no sizes
    row, _ = run_cell(cell)
    assert row["status"] == "error"
    assert all(row[column] is None for column in SIZE_COLUMNS)


def _rows() -> list[dict]:
    """Rows of cells whose typed params come from the study, from the catalog's
    defaults, or do not apply."""
    cells = [
        _cell("ridge", {}, algorithm="stocbio", algorithm_params={"batch_size": 32}),
        _cell("ridge", {}, algorithm="stocbio"),  # batch_size: the catalog's 64
        _cell("ridge", {}, algorithm="soba", pipeline="hpo",
              algorithm_params={"step_size": 0.05},
              pipeline_params={"outer_lr": 1, "outer_steps": 7}),
        _cell("ridge", {}, algorithm="tpe", pipeline="blackbox",
              pipeline_params={"num_samples": 5, "time_budget_s": 30}),
        _cell("ridge", {}, algorithm="itd"),  # none of them applies
    ]
    return [cell_row(cell, 1, status="ok") for cell in cells]


def test_typed_params_take_the_study_value_else_the_default():
    stocbio, stocbio_default, soba, tpe, itd = _rows()
    assert stocbio["batch_size"] == 32 and stocbio_default["batch_size"] == 64
    assert (soba["step_size"], soba["outer_ratio"], soba["batch_size"]) == (0.05, 1.0, 64)
    assert (soba["outer_lr"], soba["outer_steps"], soba["optimizer"]) == (1.0, 7, "adam")
    assert isinstance(soba["outer_lr"], float) and soba["num_samples"] is None
    assert (tpe["num_samples"], tpe["time_budget_s"], tpe["outer_lr"]) == (5, 30.0, None)
    assert all(itd[name] is None for name, _ in ALGORITHM_PARAM_FIELDS + PIPELINE_PARAM_FIELDS)
    assert json.loads(soba["pipeline_params"]) == {"outer_lr": 1, "outer_steps": 7}


def test_polars_and_duckdb_read_the_typed_columns_as_numbers(tmp_path):
    sink = parquet.ParquetSink(tmp_path, flush_rows=2)
    rows = _rows()
    for row in rows:
        sink.add(row)
        if sink.due():
            sink.flush()
    sink.flush()
    glob = str(tmp_path / "results" / "*.parquet")
    frame = pl.read_parquet(glob)
    described = {row[0]: row[1] for row in
                 duckdb.sql(f"describe select * from '{glob}'").fetchall()}
    expected = {pa.int64(): (pl.Int64, "BIGINT"), pa.float64(): (pl.Float64, "DOUBLE"),
                pa.string(): (pl.String, "VARCHAR")}
    for name, kind in PARAM_FIELDS:
        assert frame.schema[name] == expected[kind][0], name
        assert described[name] == expected[kind][1], name
    total = duckdb.sql(f"select sum(batch_size), max(outer_lr) from '{glob}'").fetchall()
    assert total == [(32 + 64 + 64, 1.0)]


def _old_part(directory, rows: list[dict]) -> None:
    """A part as an earlier version wrote it: no typed param columns."""
    old = pa.schema([f for f in RESULT_SCHEMA if f.name not in PARAM_COLUMNS])
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k in old.names}
                                  for r in rows], schema=old)
    parquet.write_table_atomic(table, directory)


def test_an_old_schema_part_reads_next_to_a_new_one_and_is_rewritten_in_the_new(tmp_path):
    old_rows, new_rows = _rows()[:2], _rows()[2:]
    _old_part(tmp_path / "results", old_rows)
    sink = parquet.ParquetSink(tmp_path)
    for row in new_rows:
        sink.add(row)
    sink.flush()
    table = parquet.read_results(tmp_path)
    assert table.schema.equals(RESULT_SCHEMA, check_metadata=False)
    by_id = {r["cell_id"]: r for r in table.to_pylist()}
    assert {by_id[r["cell_id"]]["batch_size"] for r in old_rows} == {None}  # not recorded
    assert by_id[new_rows[0]["cell_id"]]["outer_lr"] == 1.0

    done = parquet.compact(tmp_path)["results"]
    assert (done.parts_replaced, done.parts_upgraded, done.rows_to_history) == (1, 1, 0)
    parts = sorted((tmp_path / "results").glob("*.parquet"))
    assert len(parts) == 2 and all(pq.read_schema(p).equals(RESULT_SCHEMA, check_metadata=False)
                                   for p in parts)
    glob = str(tmp_path / "results" / "*.parquet")
    assert pl.read_parquet(glob).height == len(old_rows) + len(new_rows)
    assert duckdb.sql(f"select count(n_train), count(*) from '{glob}'").fetchall() == [
        (0, len(old_rows) + len(new_rows))]
    assert parquet.read_results(tmp_path).to_pylist() == table.to_pylist()
    assert not (tmp_path / parquet.HISTORY_DIR / "results").exists()
