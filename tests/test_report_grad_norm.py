"""The report's stationarity view: ‖∇F(λ)‖² vs cost (``grad_norm_vs_cost.png``) and the
time to ‖∇F(λ_k)‖² ≤ 1e-3·‖∇F(λ₀)‖² (``solver_table.csv``), plus the blackbox pipeline's
``outer_grad_norm`` columns that feed them.

The synthetic study fixes every crossing by hand (see :func:`_synthetic`); the real-cell
tests recompute the numbers from the float64 oracle of a freshly built problem.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from hypersweep import problems
from hypersweep.io.parquet import write_table_atomic
from hypersweep.io.schema import RESULT_SCHEMA, TRACE_SCHEMA, empty_row, empty_trace
from hypersweep.orchestrator.cell import Cell, make_cell_id, run_cell
from hypersweep.tools.report import figures, reading, statistics, tables
from hypersweep.tools.report import main as report

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
PROBLEMS = ("ridge", "quadratic")
RIDGE = dict(n_features=5, n_train=30, n_val=20)
TIME, CALLS = tables.TIME_TO_GRAD, tables.CALLS_TO_GRAD

# soba: ‖∇F(λ₀)‖ differs per seed (1, 10, 0.1) and ‖∇F(λ_k)‖ = g0·0.5ᵏ at evaluation k
# (step 10k). ‖∇F‖² ≤ 1e-3·g0² ⇔ 0.25ᵏ ≤ 1e-3 ⇔ k ≥ 4.98: evaluation 5 on every seed
# (an absolute 1e-3 would give k = 5, 9, 2). Evaluation k runs at wall 0.1·k·(1+s) and
# 40·k·(1+s) oracle calls: reached at 0.5, 1.0, 1.5 s (median 1.0) and 200, 400, 600
# calls (median 400). Final ‖∇F‖² = g0²·0.25¹⁰, median over seeds 0.25¹⁰.
SOBA_G0 = {0: 1.0, 1: 10.0, 2: 0.1}
# aid_cg K=5 (an estimator: its step 0 is at λ₀ but after the first step's cost, wall
# 0.2(k+1), 100(k+1) calls): ‖∇F‖ = 0.9ᵏ (0.81ᵏ never reaches 1e-3 in 10 steps) on seeds
# 0, 1; 0.1ᵏ on seed 2 (0.01ᵏ ≤ 1e-3 at k = 2: wall 0.6, 300 calls): 1/3. Seed 3
# reaches 1e-3 at k = 2 too, then diverges: not an ok seed, so not counted.
# random (blackbox, one seed): ‖∇F(λ₀)‖ = 2 (result: 0.02 / rel 0.01), and ‖∇F‖ at the
# best λ so far per trial None (the first trial diverged), 0.5, 0.1, 0.06, 0.02: squares
# 0.25, 0.01, 0.0036, 4e-4 against 1e-3·4 = 4e-3: trial 3, wall 0.2, 120 calls (with
# ‖∇F(λ₀)‖ taken as 1 it would be trial 4).
RANDOM_GRADS = [None, 0.5, 0.1, 0.06, 0.02]


def _row(problem, pipeline, algorithm, seed, *, K=None, t=10, **values):
    cell = Cell(study="gn", pipeline=pipeline, problem=problem, algorithm=algorithm,
                backend="torch", t=t, K=K, seed=seed)
    row = empty_row()
    row.update(study="gn", cell_id=make_cell_id(cell), pipeline=pipeline, problem=problem,
               algorithm=algorithm, backend="torch", dtype="float64", K=K, t=t, seed=seed,
               status="ok", attempt=1, problem_params="{}", algorithm_params="{}",
               pipeline_params="{}", started_at=NOW, finished_at=NOW, wall_time_s=1.0)
    row.update(values)
    return row


def _trace(row, step, wall, calls, grad, val=1.0):
    tr = empty_trace()
    tr.update(study="gn", cell_id=row["cell_id"], step=step, wall_time_s=wall,
              n_oracle_calls=calls, outer_grad_norm=grad, val_loss=val)
    return tr


def _synthetic():
    rows, traces = [], []
    for problem in PROBLEMS:
        for seed, g0 in SOBA_G0.items():
            row = _row(problem, "hpo", "soba", seed, val_loss=0.5,
                       outer_grad_norm=g0 * 0.5 ** 10, outer_grad_norm_rel=0.5 ** 10)
            rows.append(row)
            for k in range(11):
                traces.append(_trace(row, 10 * k, 0.1 * k * (1 + seed), 40 * k * (1 + seed),
                                     g0 * 0.5 ** k, val=1 + 1 / (k + 1)))
        for seed in range(4):
            ratio = 0.9 if seed < 2 else 0.1
            diverged = seed == 3
            row = _row(problem, "hpo", "aid_cg", seed, K=5,
                       status="diverged" if diverged else "ok",
                       val_loss=math.nan if diverged else 0.6,
                       outer_grad_norm=None if diverged else ratio ** 10,
                       outer_grad_norm_rel=None if diverged else ratio ** 10)
            rows.append(row)
            for k in range(4 if diverged else 10):
                grad = None if diverged and k == 3 else ratio ** k
                traces.append(_trace(row, k, 0.2 * (k + 1), 100 * (k + 1), grad,
                                     val=1 + 1 / (k + 2)))
        row = _row(problem, "blackbox", "random", 0, t=30, val_loss=0.7,
                   outer_grad_norm=0.02, outer_grad_norm_rel=0.01)
        rows.append(row)
        for k, grad in enumerate(RANDOM_GRADS):
            traces.append(_trace(row, k, 0.05 * (k + 1), 30 * (k + 1), grad, val=2 - 0.1 * k))
    return rows, traces


def _write(directory, rows, traces):
    write_table_atomic(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), directory / "results")
    write_table_atomic(pa.Table.from_pylist(traces, schema=TRACE_SCHEMA), directory / "traces")


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("gn")
    _write(out, *_synthetic())
    return out


@pytest.fixture(scope="module")
def built(study_dir, tmp_path_factory):
    return report.build_report([study_dir], tmp_path_factory.mktemp("gn-report"))


def test_solver_table_matches_the_hand_computed_crossings(built):
    table = built["solver"]
    assert list(table.columns) == tables.SOLVER_COLUMNS
    assert list(table["problem"]) == ["quadratic"] * 3 + ["ridge"] * 3
    ridge = table[table["problem"] == "ridge"].set_index("method")
    # fastest first: random (0.2 s), aid_cg (0.6 s), soba (1.0 s)
    assert list(ridge.index) == ["random", "aid_cg K=5", "soba"]

    soba = ridge.loc["soba"]
    assert (soba["kind"], soba["family"]) == ("gradient", "solver")
    assert (soba["seeds"], soba["failed"], soba["seeds_reached"]) == (3, 0, "3/3")
    assert soba[TIME] == pytest.approx(1.0, rel=1e-12)
    assert soba[CALLS] == 400
    assert soba["final_grad_norm_sq"] == pytest.approx(0.25 ** 10, rel=1e-12)

    aid = ridge.loc["aid_cg K=5"]
    assert (aid["family"], aid["seeds"], aid["failed"], aid["seeds_reached"]) == (
        "estimator", 3, 1, "1/3")
    assert aid[TIME] == pytest.approx(0.6, rel=1e-12)
    assert aid[CALLS] == 300
    assert aid["final_grad_norm_sq"] == pytest.approx(0.81 ** 10, rel=1e-12)

    rnd = ridge.loc["random"]
    assert (rnd["kind"], rnd["family"], rnd["seeds_reached"]) == ("black-box", "searcher",
                                                                  "1/1")
    assert rnd[TIME] == pytest.approx(0.2, rel=1e-12)
    assert rnd[CALLS] == 120
    assert rnd["final_grad_norm_sq"] == pytest.approx(4e-4, rel=1e-12)


def test_a_method_that_never_reaches_the_target_shows_nan_and_0_of_n(study_dir, tmp_path):
    rows, traces = _synthetic()
    # aid_cg's seed 2 now decreases at 0.9ᵏ too: no ok seed reaches the target
    slow = {r["cell_id"] for r in rows if r["algorithm"] == "aid_cg" and r["seed"] == 2}
    traces = [dict(tr, outer_grad_norm=0.9 ** tr["step"]) if tr["cell_id"] in slow else tr
              for tr in traces]
    _write(tmp_path, rows, traces)
    built = report.build_report([tmp_path], tmp_path / "rep")
    aid = built["solver"].set_index(["problem", "method"]).loc[("ridge", "aid_cg K=5")]
    assert aid["seeds_reached"] == "0/3"
    assert math.isnan(aid[TIME]) and math.isnan(aid[CALLS])
    ridge = built["solver"][built["solver"]["problem"] == "ridge"]
    assert list(ridge["method"]) == ["random", "soba", "aid_cg K=5"]  # not reached: last
    page = (tmp_path / "rep" / "report_static.html").read_text(encoding="utf-8")
    assert "<td>0/3</td><td>not reached</td><td>not reached</td>" in page
    csv = pd.read_csv(tmp_path / "rep" / "solver_table.csv")
    assert csv[TIME].isna().sum() == 2  # one per problem


def test_grad_norm_figure_has_a_panel_pair_per_problem_and_a_line_per_method(built):
    fig = built["figures"]["grad_norm_vs_cost.png"]
    assert len(fig.axes) == 2 * len(PROBLEMS)
    assert [ax.get_title() for ax in fig.axes] == ["quadratic", "quadratic", "ridge", "ridge"]
    for i, ax in enumerate(fig.axes):
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
        assert ax.get_ylabel() == figures.GRAD_LABEL
        assert ax.get_xlabel() == ("wall time (s)" if i % 2 == 0 else figures.COST_LABEL)
        # one line per method, each in its own colour (colour = algorithm; the legend
        # says gradient or black-box)
        colours = {line.get_label(): line.get_color() for line in ax.get_lines()}
        assert set(colours) == {"soba (gradient)", "aid_cg K=5 (gradient)",
                                "random (black-box)"}
        assert len(set(colours.values())) == 3
        for line in ax.get_lines():
            assert (np.asarray(line.get_xdata()) > 0).all()
    lines = {line.get_label(): line for line in fig.axes[3].get_lines()}
    # the median line ends at the median of the cells' last ‖∇F‖² (soba: g0²·0.25¹⁰ →
    # 0.25¹⁰; aid_cg: ok seeds 0.81⁹, 0.81⁹, 0.01⁹ and the diverged seed's last finite
    # 0.01², which the figure keeps as the best-val figure does: (1e-4 + 0.81⁹) / 2)
    assert lines["soba (gradient)"].get_ydata()[-1] == pytest.approx(0.25 ** 10, rel=1e-12)
    assert lines["aid_cg K=5 (gradient)"].get_ydata()[-1] == pytest.approx(
        (1e-4 + 0.81 ** 9) / 2, rel=1e-12)
    assert lines["random (black-box)"].get_ydata()[-1] == pytest.approx(4e-4, rel=1e-12)
    # aid_cg's first row has cost > 0 (100 calls): it is on the axis
    assert lines["aid_cg K=5 (gradient)"].get_xdata()[0] == pytest.approx(100.0)


def test_rows_at_zero_cost_are_left_out_of_the_log_axis(study_dir):
    """soba's step-0 rows (wall 0, at λ₀) are dropped: on the wall-time axis its seeds
    start at 0.1, 0.2 and 0.3 s, so the median (≥ 2 of 3 seeds) starts at the first grid
    point ≥ 0.2 s. Were the x = 0 rows kept, every seed would have a value at 0.1 s —
    as the best-val curves, which keep them, do."""
    results, traces = reading.read_output(study_dir)
    curves = statistics.trace_curves(statistics.method_frame(results), traces)
    soba = curves[(curves["method"] == "soba") & (curves["panel"] == "ridge")]
    drawn = statistics.grad_norm_curves(soba, "wall_time_s")
    assert drawn["x"].min() >= 0.2 - 1e-12
    assert drawn["x"].min() < 0.2 * 1.03  # the grid's ratio is 30^(1/119) ≈ 1.029
    assert statistics.best_curves(soba, "wall_time_s")["x"].min() == pytest.approx(0.1)


def test_build_report_writes_the_figure_the_table_and_the_html_section(built):
    out = built["files"][0].parent
    names = {f.name for f in built["files"]}
    assert {"grad_norm_vs_cost.png", "solver_table.csv", "best_val_vs_cost.png",
            "report.html"} <= names
    data = (out / "grad_norm_vs_cost.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    csv = pd.read_csv(out / "solver_table.csv")
    assert list(csv.columns) == tables.SOLVER_COLUMNS
    soba = csv[(csv["problem"] == "ridge") & (csv["method"] == "soba")].iloc[0]
    assert soba[TIME] == pytest.approx(1.0) and soba["seeds_reached"] == "3/3"
    page = (out / "report_static.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 2  # best val, grad norm (no error fig)
    assert "Stationarity ‖∇F(λ)‖² vs cost" in page
    assert "Time to ‖∇F(λ)‖² ≤ 0.001·‖∇F(λ₀)‖²" in page
    for text in (TIME, CALLS, "<td>3/3</td>", "<td>1/3</td>", "<td>400</td>", "<td>120</td>"):
        assert text in page, text
    # the best-val figure is unchanged: same panels, same lines
    best = built["figures"]["best_val_vs_cost.png"]
    assert len(best.axes) == 4
    assert {line.get_label() for line in best.axes[0].get_lines()} == {
        "soba (gradient)", "aid_cg K=5 (gradient)", "random (black-box)"}


def test_outputs_without_outer_grad_norm_get_neither_figure_nor_table(tmp_path):
    rows, traces = _synthetic()
    rows = [dict(r, outer_grad_norm=None, outer_grad_norm_rel=None) for r in rows]
    traces = [dict(t, outer_grad_norm=None) for t in traces]
    _write(tmp_path, rows, traces)
    built = report.build_report([tmp_path], tmp_path / "rep")
    assert "grad_norm_vs_cost.png" not in built["figures"]
    assert built["solver"].empty
    assert not (tmp_path / "rep" / "solver_table.csv").exists()
    assert "best_val_vs_cost.png" in built["figures"]


def test_the_report_with_grad_norms_imports_neither_torch_nor_jax(study_dir, tmp_path):
    code = ("import sys; from hypersweep.tools.report.main import build_report; "
            f"r = build_report([{str(study_dir)!r}], {str(tmp_path / 'r')!r}); "
            "assert len(r['solver']) == 6; "
            "print(sorted(m for m in ('torch', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
    assert (tmp_path / "r" / "grad_norm_vs_cost.png").exists()


# -- real cells ---------------------------------------------------------------------------
def _real_cell(pipeline, algorithm, seed, *, t=10, K=None, algorithm_params=None,
               **pipeline_params):
    return Cell(study="gn-real", pipeline=pipeline, problem="ridge", algorithm=algorithm,
                backend="torch", t=t, K=K, seed=seed, problem_params=json.dumps(RIDGE),
                algorithm_params=json.dumps(algorithm_params or {}),
                pipeline_params=json.dumps(pipeline_params))


@pytest.fixture(scope="module")
def real_runs():
    runs = {}
    for seed in (0, 1):
        runs["soba", seed] = run_cell(_real_cell(
            "hpo", "soba", seed, algorithm_params={"batch_size": 1000}, outer_steps=200,
            eval_every=20))
        runs["aid_cg", seed] = run_cell(_real_cell("hpo", "aid_cg", seed, K=5,
                                                   outer_steps=30))
        runs["random", seed] = run_cell(_real_cell("blackbox", "random", seed, t=30,
                                                   num_samples=8))
    for key, (row, _) in runs.items():
        assert row["status"] == "ok", (key, row["error_message"])
    return runs


def _oracle(seed):
    problem = problems.make("ridge", backend="torch", dtype="float64", seed=seed, **RIDGE)
    return problem, float(np.linalg.norm(problem.exact_hypergradient(
        problem.initial_hyperparams())))


def test_blackbox_grad_norm_is_the_oracle_at_the_best_trial_so_far(real_runs):
    for seed in (0, 1):
        row, traces = real_runs["random", seed]
        problem, g0 = _oracle(seed)
        assert problem.lam_shape == (1,)  # lam_mean is the trial's λ
        best_lam = np.asarray(json.loads(row["extra"])["best_lam"])
        g = float(np.linalg.norm(problem.exact_hypergradient(best_lam)))
        assert row["outer_grad_norm"] == pytest.approx(g, rel=1e-12)
        assert row["outer_grad_norm_rel"] == pytest.approx(g / g0, rel=1e-12)
        vals = [tr["val_loss"] for tr in traces]
        for i, tr in enumerate(traces):
            j = int(np.argmin(vals[:i + 1]))  # the first best, as the pipeline keeps it
            lam = np.array([traces[j]["lam_mean"]])
            expected = float(np.linalg.norm(problem.exact_hypergradient(lam)))
            assert tr["outer_grad_norm"] == pytest.approx(expected, rel=1e-12), i
        assert traces[-1]["outer_grad_norm"] == pytest.approx(g, rel=1e-12)
        # the oracle is evaluation: the cost columns count the trials' inner steps only
        assert row["n_oracle_calls"] == row["n_inner_grad_evals"] == 8 * 30


def test_solver_table_from_real_cells_matches_the_traces(real_runs, tmp_path):
    rows = [row for row, _ in real_runs.values()]
    traces = [tr for _, trs in real_runs.values() for tr in trs]
    _write(tmp_path, rows, traces)
    built = report.build_report([tmp_path], tmp_path / "rep")
    table = built["solver"].set_index("method")
    assert set(table.index) == {"soba", "aid_cg K=5", "random"}
    for algorithm, method in (("soba", "soba"), ("aid_cg", "aid_cg K=5"),
                              ("random", "random")):
        times, calls, finals = [], [], []
        for seed in (0, 1):
            row, trs = real_runs[algorithm, seed]
            _, g0 = _oracle(seed)  # λ₀ = the problem's initial λ (no lam0 given)
            hit = [tr for tr in trs if tr["outer_grad_norm"] is not None
                   and tr["outer_grad_norm"] ** 2 <= 1e-3 * g0 ** 2]
            if hit:
                times.append(hit[0]["wall_time_s"])
                calls.append(hit[0]["n_oracle_calls"])
            finals.append(row["outer_grad_norm"] ** 2)
        got = table.loc[method]
        assert got["seeds_reached"] == f"{len(times)}/2"
        if times:
            assert got[TIME] == pytest.approx(float(np.median(times)), rel=1e-12)
            assert got[CALLS] == pytest.approx(float(np.median(calls)), rel=1e-12)
        else:
            assert math.isnan(got[TIME]) and math.isnan(got[CALLS])
        assert got["final_grad_norm_sq"] == pytest.approx(float(np.median(finals)),
                                                          rel=1e-12)
    # soba with a full batch on this ridge: ‖∇F‖ falls below 3 % of ‖∇F(λ₀)‖ on some seed
    assert table.loc["soba", "seeds_reached"] != "0/2"
    fig = built["figures"]["grad_norm_vs_cost.png"]
    assert len(fig.axes) == 2
    assert {line.get_label() for line in fig.axes[1].get_lines()} == {
        "soba (gradient)", "aid_cg K=5 (gradient)", "random (black-box)"}
