"""The three pipelines end to end: YAML -> ``load_study`` -> ``run_study`` on the session's
real local Ray -> Parquet + MLflow (sqlite) -> ``report.main`` -> figures, HTML, artifacts.

One module-scoped fixture runs three tiny ridge studies (hypergradient_error, hpo,
blackbox) into one MLflow store and builds the report from all three output directories;
the tests then read everything back and check contents against references computed here
from the closed-form ridge oracles (``problems.make(...).value`` / ``exact_hypergradient``),
not against the pipelines' own bookkeeping.
"""
from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from hypersweep import problems
from hypersweep.orchestrator import driver, expand, spec
from hypersweep.io.schema import RESULT_SCHEMA, TRACE_SCHEMA
from hypersweep.tools.report import main as report

pytestmark = pytest.mark.ray

RIDGE = {"n_features": 10, "n_train": 40, "n_val": 30}
ERR_T = (5, 40)
HPO_T, HPO_K, HPO_STEPS, HPO_SEEDS = 50, 10, 20, (0, 1)
BB_T, BB_TRIALS, BB_BOX = 50, 15, (-6.0, 3.0)
# tutorial_table.txt: the studies run HPO and black-box cells on ridge (the tutorial's table)
# grad_norm_vs_cost.png / solver_table.csv: the hpo and blackbox rows carry outer_grad_norm
REPORT_FILES = {"error_vs_t.png", "best_val_vs_cost.png", "rates.csv", "comparison.csv",
                "report.html", "report_static.html", "tutorial_table.txt",
                "grad_norm_vs_cost.png", "solver_table.csv"}

COMMON = """\
backend: jax
dtype: float64
problems:
  - name: ridge
    params: {{n_features: 10, n_train: 40, n_val: 30}}
resources: {{num_cpus: 1}}
cell_timeout_s: 120
output: {output}
mlflow: {{tracking_uri: "{uri}"}}
"""
STUDIES = {
    "error": """\
study: e2e-hgerr
pipeline: hypergradient_error
algorithms: [itd, aid_cg]
t: [5, 40]
K: [t]
seeds: [0]
""",
    "hpo": f"""\
study: e2e-hpo
pipeline: hpo
algorithms: [aid_cg]
t: [{HPO_T}]
K: [{HPO_K}]
seeds: [0, 1]
pipeline_params: {{outer_steps: {HPO_STEPS}, outer_lr: 0.2}}
""",
    "blackbox": f"""\
study: e2e-blackbox
pipeline: blackbox
algorithms: [random, tpe]
t: [{BB_T}]
seeds: [0]
pipeline_params: {{num_samples: {BB_TRIALS}, space: {{low: {BB_BOX[0]}, high: {BB_BOX[1]}}}}}
""",
}


def _ridge(seed: int):
    return problems.make("ridge", backend="jax", seed=seed, dtype="float64", **RIDGE)


def _min_value(problem) -> float:
    """min F over the search box in h = log λ: closed-form F, bounded Brent to 1e-9 in h
    (F is smooth and unimodal on this box for these data; a grid would overestimate it)."""
    from scipy.optimize import minimize_scalar

    best = minimize_scalar(lambda h: problem.value(np.array([h])), bounds=BB_BOX,
                           method="bounded", options={"xatol": 1e-9})
    assert best.success and BB_BOX[0] + 0.1 < best.x < BB_BOX[1] - 0.1  # interior minimum
    return float(best.fun)


@pytest.fixture(scope="module")
def e2e(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    saved_uri = os.environ.get("MLFLOW_TRACKING_URI")  # the driver sets it process-wide
    studies, summaries, outputs = {}, {}, {}
    try:
        for key, body in STUDIES.items():
            outputs[key] = root / key
            path = root / f"{key}.yaml"
            path.write_text(body + COMMON.format(output=outputs[key], uri=uri))
            studies[key] = spec.load_study(path)
            summaries[key] = driver.run_study(studies[key], quiet=True)
        report_dir = root / "report"
        rc = report.main([str(outputs[k]) for k in ("error", "hpo", "blackbox")]
                         + ["--out", str(report_dir)])
    finally:
        if saved_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_uri
    assert rc == 0
    return SimpleNamespace(root=root, uri=uri, studies=studies, summaries=summaries,
                           outputs=outputs, report=report_dir)


def _results(e2e, key) -> pd.DataFrame:
    return pd.read_parquet(e2e.outputs[key] / "results")


def _traces(e2e, key) -> pd.DataFrame:
    return pd.read_parquet(e2e.outputs[key] / "traces")


def _extra(value) -> dict:
    return json.loads(value) if value else {}


def test_every_planned_cell_is_one_ok_row_read_back_by_pyarrow_and_pandas(e2e):
    expected_counts = {"error": 4,      # itd × 2 t + aid_cg × 2 (t, K = t)
                       "hpo": 2,        # 2 seeds
                       "blackbox": 2}   # random, tpe
    for key, study in e2e.studies.items():
        summary = e2e.summaries[key]
        n = expected_counts[key]
        assert expand.count_cells(study) == n
        assert summary["study_counts"]["ok"] == n and summary["cells_done"] == n, summary
        table = pq.read_table(e2e.outputs[key] / "results")
        assert table.schema.equals(RESULT_SCHEMA, check_metadata=False)
        assert table.num_rows == n  # no retries: one row per cell
        assert set(table.column("cell_id").to_pylist()) == {
            c.cell_id for c in expand.expand(study)}
        frame = _results(e2e, key)
        assert (frame["status"] == "ok").all(), frame[["cell_id", "error_message"]]
        assert (frame["attempt"] == 1).all() and (frame["backend"] == "jax").all()
        assert (frame["pipeline"] == study.pipeline).all()
        assert (frame["problem"] == "ridge").all()
        assert (frame["wall_time_s"] > 0).all()
        by_id = dict(zip(frame["cell_id"], frame["val_loss"]))
        for row in table.to_pylist():  # pyarrow and pandas read the same numbers
            assert by_id[row["cell_id"]] == row["val_loss"]
        if key == "error":  # one estimate per cell: nothing to trace
            assert not list((e2e.outputs[key] / "traces").glob("*.parquet"))
            continue
        traces = pq.read_table(e2e.outputs[key] / "traces")
        assert traces.schema.equals(TRACE_SCHEMA, check_metadata=False)
        assert traces.num_rows == {"hpo": HPO_STEPS * len(HPO_SEEDS),
                                   "blackbox": 2 * BB_TRIALS}[key]


def test_hypergradient_error_rows_shrink_from_t5_to_t40(e2e):
    frame = _results(e2e, "error")
    g_star = _ridge(0).exact_hypergradient(_ridge(0).initial_hyperparams())
    rows = {(r.algorithm, r.t): r for r in frame.itertuples()}
    assert set(rows) == {(a, t) for a in ("itd", "aid_cg") for t in ERR_T}
    for (algorithm, t), row in rows.items():
        assert (row.K == t) if algorithm == "aid_cg" else pd.isna(row.K)
        assert 0 < row.hypergrad_rel_error < 1, row  # an estimate, neither exact nor noise
        # The pipeline's oracle is the one recomputed here from (problem, seed): same data.
        assert _extra(row.extra)["exact_hypergrad_norm"] == pytest.approx(
            np.linalg.norm(g_star), rel=1e-12)
        assert row.hypergrad_abs_error == pytest.approx(
            row.hypergrad_rel_error * np.linalg.norm(g_star), rel=1e-12)
        # triangle inequality: | ‖ĝ‖ − ‖∇F‖ | ≤ ‖ĝ − ∇F‖ (tiny slack for rounding)
        assert abs(row.hypergrad_norm - np.linalg.norm(g_star)) <= \
            row.hypergrad_abs_error * (1 + 1e-9) + 1e-15
    for algorithm in ("itd", "aid_cg"):
        # ridge's Φ contracts (q ≈ 0.65 here, q^35 ≈ 3e-7), so 35 more inner steps cut
        # the error by orders of magnitude (seen: 2e-7 for itd, 5e-8 for aid_cg K = t);
        # 1e-4 leaves a wide margin yet fails for any estimator that stops converging.
        assert rows[(algorithm, 40)].hypergrad_rel_error < \
            1e-4 * rows[(algorithm, 5)].hypergrad_rel_error


def test_hpo_lowers_the_value_function_and_traces_one_row_per_outer_step(e2e):
    frame = _results(e2e, "hpo").set_index("seed")
    traces = _traces(e2e, "hpo")
    assert sorted(frame.index) == list(HPO_SEEDS)
    for seed in HPO_SEEDS:
        row = frame.loc[seed]
        problem = _ridge(seed)
        lam0 = problem.initial_hyperparams()
        f0 = problem.value(lam0)
        extra = _extra(row["extra"])
        lam_final = np.array(extra["lam_final"])
        # val_loss of an hpo row is F(λ_final), recomputed here from the closed form.
        assert row["val_loss"] == pytest.approx(problem.value(lam_final), rel=1e-12)
        assert row["val_loss"] < f0
        # 20 Adam steps (lr 0.2 on log λ) close most of the gap to min F; Adam still
        # oscillates a little around the optimum at step 20 (seen: 98.5 % and 99.9 %).
        f_min = _min_value(problem)
        assert row["val_loss"] >= f_min * (1 - 1e-12)
        assert (f0 - row["val_loss"]) >= 0.9 * (f0 - f_min)
        assert extra["outer_steps_done"] == HPO_STEPS
        assert row["n_inner_grad_evals"] == HPO_STEPS * HPO_T

        tr = traces[traces["cell_id"] == row["cell_id"]].sort_values("step")
        assert list(tr["step"]) == list(range(HPO_STEPS))
        assert tr["lam_mean"].iloc[0] == pytest.approx(float(lam0[0]), abs=0)  # λ₀ first
        # step 0 is measured at λ₀ with t = 50 inner steps: L_out(w_t) ≈ F(λ₀)
        assert tr["val_loss"].iloc[0] == pytest.approx(f0, rel=1e-6)
        best = tr["best_val_loss"].to_numpy()
        assert np.all(np.diff(best) <= 0)
        np.testing.assert_array_equal(best, np.minimum.accumulate(tr["val_loss"].to_numpy()))
        evals = tr["n_inner_grad_evals"].to_numpy()
        assert np.all(np.diff(evals) > 0)
        np.testing.assert_array_equal(evals, HPO_T * np.arange(1, HPO_STEPS + 1))
        assert np.all(np.diff(tr["wall_time_s"].to_numpy()) > 0)


def test_blackbox_rows_carry_the_best_lambda_and_one_trace_per_trial(e2e):
    frame = _results(e2e, "blackbox").set_index("algorithm")
    traces = _traces(e2e, "blackbox")
    problem = _ridge(0)
    f_min = _min_value(problem)
    assert sorted(frame.index) == ["random", "tpe"]
    for algorithm in ("random", "tpe"):
        row = frame.loc[algorithm]
        extra = _extra(row["extra"])
        assert extra["n_trials"] == BB_TRIALS
        best_lam = np.array(extra["best_lam"])
        assert best_lam.shape == (1,) and BB_BOX[0] <= best_lam[0] <= BB_BOX[1]
        assert extra["best_lam_mean"] == best_lam[0]
        # The best trial ran t = 50 steps of a contraction from 0: its L_out(w_t) is F at
        # its λ to ~q^50 ≈ 1e-9 relative; 1e-6 leaves room for the inner step size cap.
        assert row["val_loss"] == pytest.approx(problem.value(best_lam), rel=1e-6)
        assert row["val_loss"] >= f_min * (1 - 1e-6)  # no search beats min F (same 1e-6)

        tr = traces[traces["cell_id"] == row["cell_id"]].sort_values("step")
        assert list(tr["step"]) == list(range(BB_TRIALS))
        assert tr["val_loss"].min() == row["val_loss"]
        assert tr.loc[tr["step"] == extra["best_trial"], "lam_mean"].item() == best_lam[0]
        best = tr["best_val_loss"].to_numpy()
        assert np.all(np.diff(best) <= 0) and best[-1] == row["val_loss"]
        evals = tr["n_inner_grad_evals"].to_numpy()
        np.testing.assert_array_equal(evals, BB_T * np.arange(1, BB_TRIALS + 1))
        assert row["n_inner_grad_evals"] == BB_T * BB_TRIALS
        lam = tr["lam_mean"].to_numpy()
        assert np.all((lam >= BB_BOX[0]) & (lam <= BB_BOX[1]))
        assert len(np.unique(lam)) == BB_TRIALS  # distinct suggestions, not one repeated


def _runs(client, experiment_id):
    return client.search_runs([experiment_id], max_results=1000)


def test_mlflow_has_one_parent_per_study_and_every_cell_nested_under_it(e2e):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=e2e.uri)
    all_runs = [run for exp in client.search_experiments() for run in
                _runs(client, exp.experiment_id)]
    top_level = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.data.tags.get("hypersweep.study") for r in top_level) == sorted(
        s.study for s in e2e.studies.values())
    assert all(r.data.tags.get("hypersweep.role") == "parent" for r in top_level)
    for key, study in e2e.studies.items():
        experiment = client.get_experiment_by_name(study.study)
        runs = _runs(client, experiment.experiment_id)
        parents = [r for r in runs if r.data.tags.get("hypersweep.role") == "parent"]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        parent = parents[0]
        assert parent.data.tags["hypersweep.study"] == study.study
        assert parent.data.params["pipeline"] == study.pipeline
        children = [r for r in runs if r is not parent]
        assert children and all(
            c.data.tags.get("mlflow.parentRunId") == parent.info.run_id for c in children)
        frame = _results(e2e, key)
        rows = {(r.algorithm, int(r.seed), r.t, None if pd.isna(r.K) else int(r.K)): r
                for r in frame.itertuples()}
        steps_seen = set()
        for child in children:
            params = child.data.params
            assert params["problem"] == "ridge" and params["problem.n_features"] == "10"
            k_param = params["K"]  # the K setting: "None", "t" (K = t) or a number
            k_of = (lambda t: None) if k_param == "None" else (
                (lambda t: t) if k_param == "t" else (lambda t, k=int(k_param): k))
            # hpo, blackbox: one run per cell, its result row as result.* beside the curve
            metric = "hypergrad_rel_error" if key == "error" else "result.val_loss"
            history = client.get_metric_history(child.info.run_id, metric)
            assert history
            for point in history:
                t = point.step if key == "error" else int(params["t"])
                row = rows[(params["algorithm"], int(params["seed"]), t, k_of(t))]
                assert point.value == pytest.approx(
                    getattr(row, metric.removeprefix("result.")), rel=1e-12)
                steps_seen.add((params["algorithm"], t))
            if key != "error":  # the step of a trace curve is the outer step (trial)
                assert sorted(m.step for m in client.get_metric_history(
                    child.info.run_id, "val_loss")) == list(
                        range(HPO_STEPS if key == "hpo" else BB_TRIALS))
        if key == "error":  # the step of a hypergradient-error metric is t
            assert steps_seen == {(a, t) for a in ("itd", "aid_cg") for t in ERR_T}
            itd = [c for c in children if c.data.params["algorithm"] == "itd"]
            assert len(itd) == 1  # itd has no K: one run, t = 5 and 40 as its steps
            assert sorted(m.step for m in client.get_metric_history(
                itd[0].info.run_id, "hypergrad_rel_error")) == list(ERR_T)
            # K = t is one setting, so one run whose steps draw the error-vs-t curve
            cg = [c for c in children if c.data.params["algorithm"] == "aid_cg"]
            assert [c.data.params["K"] for c in cg] == ["t"]
            assert sorted(m.step for m in client.get_metric_history(
                cg[0].info.run_id, "hypergrad_rel_error")) == list(ERR_T)
        elif key == "blackbox":
            # the search runs inside the cell: one nested run per (searcher, seed),
            # no run per trial anywhere (top_level above holds only the parents)
            assert sorted(c.data.params["algorithm"] for c in children) == ["random", "tpe"]
            assert len(runs) == 1 + len(children)
        else:
            assert sorted(int(c.data.params["seed"]) for c in children) == list(HPO_SEEDS)
            assert steps_seen == {("aid_cg", HPO_T)}


def _html_row(page: str, first_cells: str) -> str:
    """The one table row of ``page`` that starts with ``<td>{first_cells}</td>``."""
    rows = re.findall(rf"<tr><td>{re.escape(first_cells)}</td>.*?</tr>", page)
    assert len(rows) == 1, (first_cells, rows)
    return rows[0]


def test_report_shows_the_parquet_numbers_and_is_logged_to_every_parent(e2e):
    from matplotlib import image
    from mlflow import MlflowClient

    assert REPORT_FILES <= {p.name for p in e2e.report.iterdir()}
    for name in ("error_vs_t.png", "best_val_vs_cost.png"):
        data = (e2e.report / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
        pixels = image.imread(e2e.report / name)[..., :3]
        assert pixels.shape[0] > 300 and pixels.shape[1] > 300
        # a drawn figure: plenty of non-white pixels and many distinct colours
        assert (pixels.min(axis=-1) < 0.9).mean() > 0.01
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50

    page = (e2e.report / "report_static.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 3
    for method in ("itd", "aid_cg K=t", f"aid_cg K={HPO_K}", "random", "tpe"):
        assert method in page, method
    hpo, hpo_traces = _results(e2e, "hpo"), _traces(e2e, "hpo")
    blackbox = _results(e2e, "blackbox").set_index("algorithm")
    # Summary table (<pre>): the median over seeds of the hpo rows' val_loss, as %.3e.
    median_val = statistics.median(hpo["val_loss"])
    summary_line = next(line for line in page.splitlines()
                        if line.startswith("hpo") and " aid_cg " in line)
    assert f"{median_val:.3e}" in summary_line
    # Comparison table: final_val_loss = median over seeds of the best traced val loss
    # (for hpo) / the best trial's loss (blackbox), shown with 4 significant digits.
    best_per_cell = hpo_traces.groupby("cell_id")["best_val_loss"].min()
    assert f"<td>{statistics.median(best_per_cell):.4g}</td>" in _html_row(
        page, f"aid_cg K={HPO_K}")
    for algorithm in ("random", "tpe"):
        assert f"<td>{blackbox.loc[algorithm, 'val_loss']:.4g}</td>" in _html_row(
            page, algorithm)
    comparison = pd.read_csv(e2e.report / "comparison.csv").set_index("method")
    assert comparison.loc["random", "final_val_loss"] == pytest.approx(
        blackbox.loc["random", "val_loss"], rel=1e-12)
    assert comparison.loc[f"aid_cg K={HPO_K}", "ok"] == len(HPO_SEEDS)
    rates = pd.read_csv(e2e.report / "rates.csv").set_index("line")
    assert set(rates.index) == {"itd", "aid_cg K=t"}
    # q of Φ at the cells' λ (= λ₀), recomputed from the problem itself
    q = _ridge(0).contraction_factor(_ridge(0).initial_hyperparams())
    assert 0 < q < 1 and rates.loc["itd", "q"] == pytest.approx(q, rel=1e-12)
    assert f"<td>{q:.4f}</td>" in _html_row(page, "ridge</td><td>itd")

    client = MlflowClient(tracking_uri=e2e.uri)
    for study in e2e.studies.values():
        experiment = client.get_experiment_by_name(study.study)
        (parent,) = client.search_runs([experiment.experiment_id],
                                       "tags.`hypersweep.role` = 'parent'")
        logged = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id,
                                                                   "report")}
        assert logged == REPORT_FILES, (study.study, logged)
        local = client.download_artifacts(parent.info.run_id, "report/report_static.html",
                                          str(e2e.root / f"dl-{study.study}"))
        assert Path(local).read_text(encoding="utf-8") == page
