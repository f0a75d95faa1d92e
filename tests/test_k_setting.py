"""K_setting: the K = t line and a fixed-K line stay separable where they coincide, in
the expansion, in Parquet (raw, pandas) and in MLflow; the run summary's totals."""
from __future__ import annotations

import pyarrow as pa
import pytest

from hypersweep.io import tracking
from hypersweep.orchestrator.cell import Cell
from hypersweep.orchestrator.expand import count_cells, expand
from hypersweep.orchestrator.spec import parse_study

STUDY = """\
study: k-setting
pipeline: hypergradient_error
backend: jax
dtype: float64
problems:
  - name: ridge
    params: {{n_features: 4, n_train: 20, n_val: 10}}
algorithms: [aid_cg, itd]
t: [5, 10]
K: [5, t]
seeds: [0]
resources: {{num_cpus: 1}}
output: {output}
mlflow: {{tracking_uri: "{uri}"}}
"""


def test_both_lines_have_a_cell_where_they_coincide(tmp_path):
    study = parse_study(STUDY.format(output=tmp_path / "out", uri="sqlite:///x.db"))
    cells = list(expand(study))
    assert len(cells) == count_cells(study) == 2 * 2 + 2  # aid_cg: 2 t × 2 K; itd: 2 t
    cg = {(c.t, c.K_setting): c for c in cells if c.algorithm == "aid_cg"}
    assert set(cg) == {(5, "5"), (5, "t"), (10, "5"), (10, "t")}
    assert cg[(5, "5")].K == cg[(5, "t")].K == 5
    assert cg[(5, "5")].cell_id != cg[(5, "t")].cell_id
    assert ".Kt." in cg[(5, "t")].cell_id and ".K5." in cg[(5, "5")].cell_id
    assert all(c.K_setting is None for c in cells if c.algorithm == "itd")
    # the fixed-K cells keep the ids they had before K_setting existed
    legacy = Cell(**{**cg[(10, "5")].to_dict(), "K_setting": None, "cell_id": ""})
    assert legacy.cell_id == cg[(10, "5")].cell_id
    with pytest.raises(ValueError, match="K_setting 't' needs K = t"):
        Cell(**{**cg[(10, "5")].to_dict(), "K_setting": "t", "cell_id": ""})


def test_mlflow_groups_follow_the_setting():
    rows = [dict(study="s", pipeline="p", problem="ridge", algorithm="aid_cg", backend="jax",
                 K=5, K_setting=setting, t=5, seed=0, dtype="float64", problem_params="{}",
                 algorithm_params="{}", pipeline_params="{}") for setting in ("5", "t")]
    assert tracking.k_setting(rows[0]) == 5 and tracking.k_setting(rows[1]) == "t"
    assert tracking.group_id(rows[0]) != tracking.group_id(rows[1])
    # rows written before the column existed: the study's K list decides, as before
    old = {**rows[0], "K_setting": None}
    assert tracking.k_setting(old, uses_t=True) == "t" and tracking.k_setting(old) == 5


@pytest.mark.ray
def test_parquet_and_mlflow_hold_both_lines(ray_session, tmp_path, mlflow_sqlite):
    import pandas as pd
    from mlflow import MlflowClient

    from hypersweep.orchestrator import driver

    study = parse_study(STUDY.format(output=tmp_path / "out", uri=mlflow_sqlite))
    summary = driver.run_study(study, quiet=True)
    assert summary["study_counts"]["ok"] == 6
    raw = pd.read_parquet(tmp_path / "out" / "results")  # a raw read, no dedupe helper
    cg = raw[raw.algorithm == "aid_cg"]
    assert sorted(zip(cg.t, cg.K_setting)) == [(5, "5"), (5, "t"), (10, "5"), (10, "t")]
    by_line = cg.groupby("K_setting").t.apply(sorted).to_dict()
    assert by_line == {"5": [5, 10], "t": [5, 10]}

    client = MlflowClient(mlflow_sqlite)
    experiment = client.get_experiment_by_name("k-setting")
    runs = client.search_runs([experiment.experiment_id],
                              filter_string="params.algorithm = 'aid_cg'")
    steps = {r.data.params["K"]: sorted(m.step for m in client.get_metric_history(
        r.info.run_id, "hypergrad_rel_error")) for r in runs}
    assert steps == {"5": [5, 10], "t": [5, 10]}
    assert summary["compute_time_s"] > 0
    assert summary["cells_compiled"] >= 1 and summary["compile_time_s"] > 0


def test_summary_totals_and_the_zero_hypergradient_warning():
    from hypersweep.orchestrator.summary import compute_totals as _compute_totals
    from hypersweep.orchestrator.summary import zero_hypergradient_warning
    from hypersweep.io.schema import RESULT_SCHEMA, empty_row

    rows = []
    for i, (algo, extra) in enumerate([("first_order", '{"zero_hypergradient":true}'),
                                       ("first_order", '{"zero_hypergradient":true}'),
                                       ("aid_cg", '{"compiled":true}')]):
        row = empty_row()
        row.update(problem="quadratic", algorithm=algo, status="ok", cell_id=str(i),
                   wall_time_s=1.5, compile_time_s=2.0 if algo == "aid_cg" else 0.0,
                   extra=extra)
        rows.append(row)
    totals = _compute_totals(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA))
    assert totals["compute_time_s"] == 4.5 and totals["compile_time_s"] == 2.0
    assert totals["cells_compiled"] == 1
    assert totals["zero_hypergradient"] == [{"problem": "quadratic",
                                             "algorithm": "first_order", "cells": 2}]
    warning = zero_hypergradient_warning(totals)
    assert "first_order on quadratic (2 cells)" in warning
    assert zero_hypergradient_warning({"zero_hypergradient": []}) is None
