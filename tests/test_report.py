"""Reports from a synthetic study output written with the real Parquet schemas.

Every number the report shows is known in advance: geometric error sequences with set
ratios, and hpo/blackbox traces whose targets and crossing times are fixed by hand.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from hypersweep import problems
from hypersweep.orchestrator.cell import Cell, canonical_json, make_cell_id
from hypersweep.io.schema import (RESULT_SCHEMA, TRACE_SCHEMA, empty_row,
                                            empty_trace)
from hypersweep.io.parquet import write_table_atomic
from hypersweep.tools.report import figures, reading, statistics, tables
from hypersweep.tools.report import main as report

T_GRID = [1, 2, 5, 10, 20, 50, 100]
SEEDS = [0, 1, 2]
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _row(pipeline, problem, algorithm, t, K, seed, **values):
    cell = Cell(study="synth", pipeline=pipeline, problem=problem, algorithm=algorithm,
                backend="jax", t=t, K=K, seed=seed)
    row = empty_row()
    row.update(study="synth", cell_id=make_cell_id(cell), pipeline=pipeline,
               problem=problem, algorithm=algorithm, backend="jax", dtype="float64", K=K,
               t=t, seed=seed, status="ok", attempt=1, problem_params="{}",
               algorithm_params="{}", pipeline_params="{}", started_at=NOW,
               finished_at=NOW, wall_time_s=0.5)
    row.update(values)
    return row


def _error_rows():
    """itd: 2·0.9ᵗ; aid_cg K=t: 0.7ᵗ down to a 1e-13 floor; aid_fp K=t: 0.8ᵗ, and
    aid_fp K=10: 0.8ᵗ until a 1e-3 plateau (no K=10 cell at t=10: the K=t one is it)."""
    rows = []
    for problem in ("ridge", "kernel_ridge"):
        for seed in SEEDS:
            noise = 1.0 + 0.01 * seed  # a seed-dependent constant: the rate is unchanged
            for t in T_GRID:
                e = {"itd": (None, 2 * 0.9 ** t), "aid_cg": (t, max(0.7 ** t, 1e-13)),
                     "aid_fp": (t, 0.8 ** t)}
                for algo, (K, err) in e.items():
                    rows.append(_row("hypergradient_error", problem, algo, t, K, seed,
                                     hypergrad_rel_error=err * noise))
                if t != 10:
                    rows.append(_row("hypergradient_error", problem, "aid_fp", t, 10, seed,
                                     hypergrad_rel_error=max(0.8 ** t, 1e-3) * noise))
    return rows


def _method_rows():
    """hpo aid_cg K=10: val 1 + 1/(k+1) at wall 0.1(k+1), evals 100(k+1), k < 10 → final
    1.1. blackbox random: 2.0 until trial 15 scores 1.05 (wall 0.8, evals 800), then 1.5.
    Target per seed = 1.05 (1 % band: ≤ 1.0605): only random reaches it. A 4th random
    cell failed."""
    rows, traces = [], []
    for seed in SEEDS:
        hpo = _row("hpo", "ridge", "aid_cg", 50, 10, seed, val_loss=1.1, test_loss=1.2,
                   n_inner_grad_evals=1000, wall_time_s=1.0)
        bb = _row("blackbox", "ridge", "random", 50, None, seed, val_loss=1.05,
                  test_loss=1.15, n_inner_grad_evals=1000, wall_time_s=1.0)
        rows += [hpo, bb]
        for k in range(10):
            tr = empty_trace()
            tr.update(study="synth", cell_id=hpo["cell_id"], step=k, wall_time_s=0.1 * (k + 1),
                      n_inner_grad_evals=100 * (k + 1), val_loss=1 + 1 / (k + 1),
                      best_val_loss=1 + 1 / (k + 1))
            traces.append(tr)
        best = math.inf
        for k in range(20):
            val = 2.0 if k < 15 else 1.05 if k == 15 else 1.5
            best = min(best, val)
            tr = empty_trace()
            tr.update(study="synth", cell_id=bb["cell_id"], step=k,
                      wall_time_s=0.05 * (k + 1), n_inner_grad_evals=50 * (k + 1),
                      val_loss=val, best_val_loss=best)
            traces.append(tr)
    rows.append(_row("blackbox", "ridge", "random", 50, None, 3, status="error",
                     error_message="boom"))
    return rows, traces


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    method_rows, traces = _method_rows()
    rows = _error_rows() + method_rows
    write_table_atomic(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), out / "results")
    write_table_atomic(pa.Table.from_pylist(traces, schema=TRACE_SCHEMA), out / "traces")
    # a re-run of one cell, written later: the report must keep only this row
    rerun = dict(method_rows[0], val_loss=1.1, finished_at=NOW + dt.timedelta(hours=1),
                 attempt=2)
    write_table_atomic(pa.Table.from_pylist([rerun], schema=RESULT_SCHEMA), out / "results")
    return out


@pytest.fixture(scope="module")
def built(study_dir, tmp_path_factory):
    return report.build_report([study_dir], tmp_path_factory.mktemp("report"))


def test_fit_rate_recovers_known_ratios():
    t = np.array(T_GRID)
    assert statistics.fit_rate(t, 3.0 * 0.9 ** t) == pytest.approx(0.9, rel=1e-12)
    # floor at 1e-13 from t = 100 on: excluded from the fit
    assert statistics.fit_rate(t, np.maximum(0.7 ** t, 1e-13)) == pytest.approx(0.7, rel=1e-12)
    # K = 10 plateau at 1e-3 (reached at t ≈ 31): only t ≤ 20 are on the line
    plateau = np.maximum(0.8 ** t, 1e-3)
    assert list(t[statistics.decreasing_part(t, plateau)]) == [1, 2, 5, 10, 20]
    assert statistics.fit_rate(t, plateau) == pytest.approx(0.8, rel=1e-12)
    # a non-contractive start (error rises, then falls at rate 0.5): fit from the peak
    rising = np.array([1.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    assert statistics.fit_rate(np.arange(6), rising) == pytest.approx(0.5, rel=1e-12)
    assert statistics.fit_rate([1, 2], [1.0, 1.0]) is None  # no decrease: no rate


def test_error_vs_t_figure_has_a_panel_per_problem_and_the_fitted_rates(built):
    fig = built["figures"]["error_vs_t.png"]
    assert [ax.get_title().split("  ")[0] for ax in fig.axes] == ["kernel_ridge", "ridge"]
    ridge_ax = fig.axes[1]
    assert ridge_ax.get_yscale() == "log"
    labels = sorted(line.get_label() for line in ridge_ax.get_lines())
    q_ridge = built["rates"].set_index(["problem", "line"]).loc[("ridge", "itd"), "q"]
    assert labels == ["aid_cg K=t (r = 0.700)", "aid_fp K=10 (r = 0.800)",
                      "aid_fp K=t (r = 0.800)", "itd (r = 0.900)",
                      f"reference qᵗ (q = {q_ridge:.4f})"]
    # the K=10 line includes the t = 10 cell (stored once, with K = t = 10)
    fp10 = next(line for line in ridge_ax.get_lines() if line.get_label().startswith(
        "aid_fp K=10"))
    assert list(fp10.get_xdata()) == T_GRID
    rates = built["rates"].set_index(["problem", "line"])
    assert rates.loc[("ridge", "itd"), "rate"] == pytest.approx(0.9, rel=1e-12)
    # q from the cells' own instances (the pipelines' builder) equals a freshly built
    # problem's, median over seeds
    q = np.median([problems.make("ridge", backend="torch", seed=s, dtype="float64")
                   .contraction_factor() for s in SEEDS])
    assert rates.loc[("ridge", "itd"), "q"] == pytest.approx(q, rel=1e-12)
    assert 0 < q < 1
    assert f"(q = {q:.4f})" in fig.axes[1].get_title()


# Five seeds, one an outlier, so that the median, the mean and the band all differ. Sorted
# factors 1.0, 1.1, 1.2, 1.3, 10: median 1.2 (mean 2.92); band by linear interpolation
# between order statistics (numpy's default), at positions 0.2·4 and 0.8·4:
# 20 %: 1.0 + 0.8·0.1 = 1.08, 80 %: 1.3 + 0.2·8.7 = 3.04.
SKEWED = {0: 10.0, 1: 1.2, 2: 1.0, 3: 1.3, 4: 1.1}  # seed -> factor (outlier first)
SKEWED_MEDIAN, SKEWED_LOW, SKEWED_HIGH = 1.2, 1.08, 3.04


@pytest.fixture(scope="module")
def skewed_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("skewed")
    rows = [_row("hypergradient_error", "ridge", "itd", t, None, seed,
                 hypergrad_rel_error=factor * 0.5 ** t)
            for seed, factor in SKEWED.items() for t in (1, 2, 5)]
    write_table_atomic(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), out / "results")
    return reading.read_output(out)[0]


def test_error_curves_are_the_median_over_seeds_with_a_20_80_band(skewed_results):
    curves = statistics.error_curves(skewed_results)
    assert list(curves["t"]) == [1, 2, 5] and set(curves["n"]) == {5}
    base = 0.5 ** curves["t"].to_numpy(float)
    np.testing.assert_allclose(curves["median"], SKEWED_MEDIAN * base, rtol=1e-12)
    np.testing.assert_allclose(curves["low"], SKEWED_LOW * base, rtol=1e-12)
    np.testing.assert_allclose(curves["high"], SKEWED_HIGH * base, rtol=1e-12)
    # ... and the figure draws exactly those: the line is the median, the band 20-80 %.
    fig, _ = figures.plot_error_vs_t(skewed_results)
    (ax,) = fig.axes
    line, reference = ax.get_lines()  # the median and the reference slope qᵗ
    assert reference.get_label().startswith("reference qᵗ")
    np.testing.assert_allclose(line.get_xdata(), [1, 2, 5])
    np.testing.assert_allclose(line.get_ydata(), SKEWED_MEDIAN * base, rtol=1e-12)
    (band,) = ax.collections
    vertices = np.concatenate([path.vertices for path in band.get_paths()])
    for t, b in zip((1, 2, 5), base):
        ys = vertices[vertices[:, 0] == t, 1]
        assert ys.min() == pytest.approx(SKEWED_LOW * b, rel=1e-12)
        assert ys.max() == pytest.approx(SKEWED_HIGH * b, rel=1e-12)


def test_best_val_figure_and_comparison_table(built):
    fig = built["figures"]["best_val_vs_cost.png"]
    assert len(fig.axes) == 2  # one problem × (wall time, evaluations)
    assert fig.axes[0].get_xlabel() == "wall time (s)"
    assert fig.axes[1].get_xlabel() == figures.COST_LABEL  # n_oracle_calls (docs/costs.md)
    colours = {line.get_label(): line.get_color() for line in fig.axes[0].get_lines()}
    assert set(colours) == {"aid_cg K=10 (gradient)", "random (black-box)"}
    assert len(set(colours.values())) == 2  # colour = algorithm, as on report.html
    # the median curve ends at the final best values
    ends = {line.get_label(): line.get_ydata()[-1] for line in fig.axes[1].get_lines()}
    assert ends["random (black-box)"] == pytest.approx(1.05)
    assert ends["aid_cg K=10 (gradient)"] == pytest.approx(1.1)

    table = built["comparison"].set_index("method")
    assert table.loc["random", "final_val_loss"] == pytest.approx(1.05)
    assert table.loc["random", "reached"] == "3/3"
    assert table.loc["random", "time_to_target_s"] == pytest.approx(0.8)
    assert table.loc["random", "calls_to_target"] == pytest.approx(800)
    assert table.loc["random", "cells"] == 4 and table.loc["random", "ok"] == 3
    assert table.loc["aid_cg K=10", "final_val_loss"] == pytest.approx(1.1)
    assert table.loc["aid_cg K=10", "reached"] == "0/3"
    assert table.loc["aid_cg K=10", "test_loss"] == pytest.approx(1.2)
    assert list(table.index) == ["random", "aid_cg K=10"]  # best first


def test_html_is_self_contained_and_shows_the_numbers(built):
    out = built["files"][0].parent
    page = (out / "report_static.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 2
    assert "src='http" not in page and "<script" not in page
    for text in ("random", "aid_cg K=10", "<td>3/3</td>", "<td>0/3</td>", "<td>0.8</td>",
                 "<td>800</td>", "<td>1.05</td>", "itd", "<td>0.9</td>"):
        assert text in page, text
    for name in ("error_vs_t.png", "best_val_vs_cost.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_summary_table_counts_and_medians(built):
    text = tables.summary_table(built["results"])
    assert text.splitlines()[0].split()[:3] == ["pipeline", "problem", "algorithm"]
    lines = {tuple(line.split()[:4]): line for line in text.splitlines()[2:]}
    assert lines[("blackbox", "ridge", "random", "3/1")]
    hpo = lines[("hpo", "ridge", "aid_cg", "3/0")]
    assert "val loss F(λ_final)" in hpo and "1.100e+00" in hpo
    itd = lines[("hypergradient_error", "ridge", "itd", "21/0")]
    # median over the seeds at the largest t (100) of 2·0.9ᵗ·(1 + 0.01 s): s = 1; not
    # the median over all t (t = 10), which mixes inner budgets
    assert "rel error at t=100" in itd and f"{2 * 0.9 ** 100 * 1.01:.3e}" in itd
    assert tables.summary_table([]) == "(no results)"


def test_rerun_keeps_the_latest_row(built):
    res = built["results"]
    hpo = res[(res["pipeline"] == "hpo") & (res["seed"] == 0)]
    assert len(hpo) == 1 and int(hpo["attempt"].iloc[0]) == 2


def _parent_run(study_dir, tmp_path, uri: str, experiment: str):
    """(client, experiment id, parent run id) of a study "synth" whose ``study.yaml`` in
    ``study_dir`` (removed by the caller) names ``experiment`` at ``uri``."""
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment(experiment, artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, tags={"hypersweep.study": "synth",
                                          "hypersweep.role": "parent"}).info.run_id
    (study_dir / "study.yaml").write_text(
        f"study: synth\nmlflow:\n  tracking_uri: {uri}\n  experiment: {experiment}\n")
    return client, exp, parent


def test_main_writes_the_report_and_logs_it_to_the_parent_run(study_dir, tmp_path,
                                                              mlflow_sqlite):
    (tmp_path / "mlflow").mkdir()
    client, _, parent = _parent_run(study_dir, tmp_path, mlflow_sqlite, "synth-exp")
    try:
        out = tmp_path / "rep"
        assert report.main([str(study_dir), "--out", str(out)]) == 0
        assert (out / "report.html").is_file()
        names = sorted(a.path for a in client.list_artifacts(parent, "report"))
        # tutorial_table.txt: the synthetic rows include HPO cells on ridge
        assert names == ["report/best_val_vs_cost.png", "report/comparison.csv",
                         "report/error_vs_t.png", "report/rates.csv", "report/report.html",
                         "report/report_static.html", "report/tutorial_table.txt"]
    finally:
        (study_dir / "study.yaml").unlink()
    assert report.main([str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2


def test_write_report_in_process_logs_and_links_like_the_child(study_dir, tmp_path,
                                                                mlflow_sqlite, monkeypatch):
    """``mlflow_in_process`` (``run --report``): the same artifacts on the parent run and
    the same links on the page as the child process gives, and no child is started."""
    client, exp, parent = _parent_run(study_dir, tmp_path, mlflow_sqlite, "synth-here")
    pages = {}
    try:
        for in_process in (False, True):
            if in_process:
                monkeypatch.setattr(report, "MlflowSide", None)  # a child would fail
            out = tmp_path / f"rep-{in_process}"
            built = report.write_report([study_dir], out, ui_url="http://127.0.0.1:5123",
                                        mlflow_in_process=in_process)
            assert (out / "report.html").is_file() and len(built["files"]) == 7
            pages[in_process] = (out / "report.html").read_text(encoding="utf-8")
            names = sorted(a.path for a in client.list_artifacts(parent, "report"))
            assert names == sorted(f"report/{f.name}" for f in built["files"])
    finally:
        (study_dir / "study.yaml").unlink()
    link = f"http://127.0.0.1:5123/#/experiments/{exp}/runs/{parent}"
    assert link in pages[False] and link in pages[True]


def test_out_defaults_to_the_results_folder_and_is_required_for_several(study_dir,
                                                                          tmp_path, capsys):
    import shutil

    own = tmp_path / "study"
    shutil.copytree(study_dir, own)  # the module's folder stays as the other tests read it
    assert report.main([str(own), "--no-mlflow"]) == 0
    assert (own / "report" / "report.html").is_file()
    assert report.main([str(own), str(study_dir), "--no-mlflow"]) == 2
    assert "--out is required with several results directories" in capsys.readouterr().err


def test_report_from_real_blackbox_rows(tmp_path):
    """A real blackbox cell, through run_cell, into the report's comparison table."""
    from hypersweep.orchestrator.cell import run_cell
    cell = Cell(study="real", pipeline="blackbox", problem="ridge", algorithm="random",
                backend="torch", t=30, K=None, seed=0,
                pipeline_params=canonical_json({"num_samples": 5}))
    row, traces = run_cell(cell)
    write_table_atomic(pa.Table.from_pylist([row], schema=RESULT_SCHEMA), tmp_path / "results")
    write_table_atomic(pa.Table.from_pylist(traces, schema=TRACE_SCHEMA), tmp_path / "traces")
    built = report.build_report([tmp_path], tmp_path / "rep")
    table = built["comparison"]
    assert list(table["method"]) == ["random"]
    assert table["final_val_loss"].iloc[0] == pytest.approx(row["val_loss"], rel=1e-12)
    assert table["reached"].iloc[0] == "1/1"
    assert "best_val_vs_cost.png" in built["figures"]
    assert json.loads(row["extra"])["n_trials"] == 5


def test_cost_axis_is_n_oracle_calls_with_a_fallback_for_old_outputs():
    """ITD-like traces (n_oracle_calls = 3 × inner gradients) plot at their oracle calls;
    rows written before the column existed fall back to inner + Hessian-vector counts."""
    import pandas as pd

    df = pd.DataFrame({"n_inner_grad_evals": [100, 200, 100], "n_hvp_evals": [0, 0, 40],
                       "n_oracle_calls": [301, 602, None]})
    assert statistics.oracle_calls(df).tolist() == [301.0, 602.0, 140.0]
    assert statistics.oracle_calls(df.drop(columns="n_oracle_calls")).tolist() == [100.0, 200.0,
                                                                              140.0]
    curves = pd.DataFrame({"panel": "p", "method": "itd", "kind": "gradient", "cell_id": "c",
                           "n_oracle_calls": [301.0, 602.0], "best": [2.0, 1.0]})
    drawn = statistics.best_curves(curves, statistics.COST_AXIS, n_grid=5)
    assert drawn["x"].min() == pytest.approx(301.0) and drawn["x"].max() == pytest.approx(602.0)


def test_the_report_imports_neither_torch_nor_jax(study_dir, tmp_path):
    """q comes from the problems' numpy instances: a report imports no backend (each
    import cost ~1.5 s of the demo's report)."""
    code = ("import sys; from hypersweep.tools.report.main import build_report; "
            f"build_report([{str(study_dir)!r}], {str(tmp_path / 'r')!r}); "
            "print(sorted(m for m in ('torch', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
    assert (tmp_path / "r" / "rates.csv").exists()


def test_the_mlflow_side_runs_in_another_process_and_a_dead_one_costs_a_warning(
        study_dir, tmp_path, caplog):
    """MlflowSide: its work is in a child process; when that process is gone, the links are
    none and nothing is logged, each with a warning, and nothing raises."""
    import logging
    import os

    side = report.MlflowSide([study_dir], ui_url="http://127.0.0.1:5000", tracking_uri=None,
                             timeout=60)
    assert side.process.pid != os.getpid()
    side.process.kill()
    side.process.join()
    with caplog.at_level(logging.WARNING, logger=report.log.name):
        assert side.links() == []
        assert side.log([tmp_path / "report.html"]) == []
    side.close()
    assert "MLflow" in caplog.text


def test_an_unreachable_tracking_server_still_writes_the_report(study_dir, tmp_path,
                                                                monkeypatch):
    """--mlflow-uri at a closed loopback port: the page is written without links and the
    command succeeds (the child warns; MLflow is a view)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the child inherits it
    out = tmp_path / "rep"
    assert report.main([str(study_dir), "--out", str(out),
                        "--mlflow-uri", "http://127.0.0.1:9"]) == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "(runs)" not in page and (out / "report_static.html").is_file()
