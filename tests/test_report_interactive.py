"""The interactive report's figure spec and page, without a browser (tests/test_browser.py
opens the real page in Chromium).

The synthetic outputs have two backends and more algorithms than the palette has
colours, K settings and params that make several methods per algorithm: the style test
runs over every panel and x axis of the spec.
"""
from __future__ import annotations

import datetime as dt
import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from hypersweep.io.parquet import write_table_atomic
from hypersweep.io.schema import RESULT_SCHEMA, TRACE_SCHEMA, empty_row, empty_trace
from hypersweep.orchestrator.cell import Cell, make_cell_id
from hypersweep.tools.report import figures, interactive, styles
from hypersweep.tools.report import main as report

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
T_GRID = [2, 4, 8, 16, 32]
#: 23 "algorithms": more than styles.PALETTE's 20 colours
MANY = [f"algo{i:02d}" for i in range(23)]


def _row(pipeline, problem, algorithm, backend, t, K, seed, *, k_setting=None,
         algorithm_params="{}", **values):
    cell = Cell(study="synth", pipeline=pipeline, problem=problem, algorithm=algorithm,
                backend=backend, t=t, K=K, seed=seed, algorithm_params=algorithm_params)
    row = empty_row()
    row.update(study="synth", cell_id=make_cell_id(cell), pipeline=pipeline,
               problem=problem, algorithm=algorithm, backend=backend, dtype="float64",
               K=K, K_setting=k_setting, t=t, seed=seed, status="ok", attempt=1,
               problem_params="{}", algorithm_params=algorithm_params,
               pipeline_params="{}", started_at=NOW, finished_at=NOW)
    row.update(values)
    return row


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Error rows: itd and aid_cg (K = 10 and K = t) and the 23 ``algoN``, on jax and
    torch, 3 seeds, two problems, each with its own error, wall time and oracle calls.
    hpo rows with traces: aid_cg with two step sizes and soba, on both backends."""
    out = tmp_path_factory.mktemp("interactive")
    rows, traces = [], []
    rng = np.random.default_rng(0)
    for problem in ("ridge", "logreg"):
        for backend in ("jax", "torch"):
            for seed in range(3):
                for t in T_GRID:
                    lines = [("itd", None, None), ("aid_cg", 10, "10"), ("aid_cg", t, "t")]
                    lines += [(a, None, None) for a in MANY]
                    for j, (algo, K, ks) in enumerate(lines):
                        rows.append(_row(
                            "hypergradient_error", problem, algo, backend, t, K, seed,
                            k_setting=ks, hypergrad_rel_error=(0.5 + 0.01 * j) ** t
                            * (1 + 0.1 * seed), wall_time_s=0.001 * t * (1 + seed + j),
                            n_oracle_calls=3 * t + j))
    for backend in ("jax", "torch"):
        for algo, params in (("aid_cg", '{"lr":0.1}'), ("aid_cg", '{"lr":0.5}'),
                             ("soba", "{}")):
            for seed in range(3):
                row = _row("hpo", "ridge", algo, backend, 20, 5 if algo == "aid_cg" else None,
                           seed, algorithm_params=params, val_loss=1.0, test_loss=1.1,
                           test_accuracy=0.9)
                rows.append(row)
                for k in range(8):
                    tr = empty_trace()
                    tr.update(study="synth", cell_id=row["cell_id"], step=k,
                              wall_time_s=0.1 * (k + 1), n_oracle_calls=50 * (k + 1),
                              val_loss=1 + rng.random() / (k + 1), test_loss=1.2,
                              test_accuracy=0.8, outer_grad_norm=0.5 ** k)
                    traces.append(tr)
    write_table_atomic(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), out / "results")
    write_table_atomic(pa.Table.from_pylist(traces, schema=TRACE_SCHEMA), out / "traces")
    return out


@pytest.fixture(scope="module")
def built(outputs, tmp_path_factory):
    return report.build_report([outputs], tmp_path_factory.mktemp("rep"),
                               mlflow_links=[("synth (runs)", "http://127.0.0.1:5000/#/x")])


def _medians(panel_traces):
    return [t for t in panel_traces if t["meta"]["role"] == "median"]


def test_no_two_methods_share_colour_and_dash_in_a_panel(built):
    spec = built["spec"]
    assert len(spec["panels"]) >= 2 + 4  # 2 error panels; best, ‖∇F‖², test loss/acc
    for panel in spec["panels"]:
        for mode, traces in panel["modes"].items():
            lines = _medians(traces)
            pairs = [(t["line"]["color"], t["line"]["dash"]) for t in lines]
            assert len(pairs) == len(set(pairs)), (panel["id"], mode)
            assert len({t["name"] for t in lines}) == len(lines)
    error = next(p for p in spec["panels"] if p["section"] == "error")
    assert len(_medians(error["modes"]["t"])) == 2 * (3 + len(MANY))  # 52 lines


def test_colour_is_the_algorithm_dash_the_variant_marker_the_backend(built):
    spec = built["spec"]
    style = {}  # method -> (colour, dash, marker), over every panel
    for panel in spec["panels"]:
        for traces in panel["modes"].values():
            for t in _medians(traces):
                s = (t["line"]["color"], t["line"]["dash"], t["marker"]["symbol"])
                assert style.setdefault(t["name"].split(" (r =")[0], s) == s  # same everywhere
    assert style["aid_cg K=10 [jax]"][0] == style["aid_cg K=t [jax]"][0]
    assert style["aid_cg K=10 [jax]"][1] != style["aid_cg K=t [jax]"][1]
    assert style["aid_cg K=10 [jax]"][2] == "circle" and style["aid_cg K=10 [torch]"][2] == \
        "square"
    assert style["aid_cg K=10 [torch]"][0] == styles.lighter(style["aid_cg K=10 [jax]"][0],
                                                             0.45)
    assert style["itd [jax]"][0] != style["aid_cg K=10 [jax]"][0]
    # every one of the 26 algorithms has its own colour on jax, beyond the palette too
    jax_colours = {name.split(" ")[0]: s[0] for name, s in style.items()
                   if name.endswith("[jax]") and " K=" not in name}
    assert len(set(jax_colours.values())) == len(jax_colours) == 1 + len(MANY) + 1


def test_x_axes_carry_the_rows_numbers(built, outputs):
    """t: the grid; wall and calls: medians over seeds at each t, from the rows."""
    spec = built["spec"]
    panel = next(p for p in spec["panels"] if p["section"] == "error"
                 and p["problem"] == "ridge")
    line = next(t for t in _medians(panel["modes"]["t"]) if t["name"].startswith(
        "aid_cg K=t [torch]"))
    assert line["x"] == T_GRID
    j = 2  # aid_cg K=t is the third line of the fixture
    wall = next(t for t in _medians(panel["modes"]["wall"]) if t["name"] == line["name"])
    # median over seeds 0..2 of 0.001·t·(1 + seed + j) = 0.001·t·(2 + j)
    np.testing.assert_allclose(wall["x"], [0.001 * t * (2 + j) for t in T_GRID])
    calls = next(t for t in _medians(panel["modes"]["calls"]) if t["name"] == line["name"])
    assert calls["x"] == [3 * t + j for t in T_GRID]
    # median of (0.52)^t·(1 + 0.1·seed) over seeds = (0.52)^t·1.1
    np.testing.assert_allclose(line["y"], [0.52 ** t * 1.1 for t in T_GRID], rtol=1e-12)
    ref = next(t for t in panel["modes"]["t"] if t["meta"]["role"] == "reference")
    q = float(re.search(r"q = ([0-9.e-]+)", ref["name"]).group(1))
    assert 0 < q < 1 and ref["y"][1] / ref["y"][0] == pytest.approx(q ** (ref["x"][1]
                                                                         - ref["x"][0]),
                                                                    rel=1e-3)
    assert not any(t["meta"]["role"] == "reference" for t in panel["modes"]["wall"])


def test_method_panels_on_every_axis_with_their_params_in_the_hover(built):
    spec = built["spec"]
    best = next(p for p in spec["panels"] if p["section"] == "best")
    for mode in ("t", "wall", "calls"):
        names = {t["name"] for t in _medians(best["modes"][mode])}
        assert len(names) == 6, (mode, names)  # 3 methods × 2 backends
    hover = next(t for t in _medians(best["modes"]["wall"]) if '"lr":0.5' in t["name"])
    assert "algorithm_params" in hover["hovertemplate"]
    grad = next(p for p in spec["panels"] if p["section"] == "grad_sq")
    assert grad["ylog"] is True


def test_the_page_is_self_contained_with_its_header(built, outputs):
    page = (built["files"][0].parent / "report.html").read_text(encoding="utf-8")
    assert len(page) > 3_000_000  # plotly.js embedded
    assert not re.search(r"<script[^>]+src=", page) and "<link" not in page
    assert "cdn.plot.ly" not in page.split("<script>", 2)[-1][:200]
    ours = page.split("</script>", 1)[1]  # plotly.js's own attribution strings aside
    external = {u for u in re.findall(r"(?:href|src)=['\"](https?://[^'\"]+)", ours)}
    assert external == {"http://127.0.0.1:5000/#/x"}  # only the given MLflow link
    spec = json.loads(re.search(r"<script id='spec' type='application/json'>(.*?)</script>",
                                page, re.S).group(1))
    assert [p["id"] for p in spec["panels"]] == [p["id"] for p in built["spec"]["panels"]]
    for text in ("Versions:", "commit <code>", "study: ", "device(s) <b>cpu</b>",
                 "best val loss seen, min_k L_out(w_k, λ_k)", "F(λ_final)",
                 "id='xaxis'", "id='logx'", "id='logy'", "id='problem'"):
        assert text in page, text


def test_the_png_error_figure_uses_the_same_styles(built):
    fig = built["figures"]["error_vs_t.png"]
    curves = pd.DataFrame(built["spec"]["panels"][0]["modes"]["t"])
    ax = fig.axes[0]
    drawn = {line.get_label().split(" (r =")[0]: line for line in ax.get_lines()}
    for t in _medians(built["spec"]["panels"][0]["modes"]["t"]):
        line = drawn[t["name"].split(" (r =")[0]]
        assert line.get_color() == t["line"]["color"]
    assert any(label.startswith("reference q") for label in drawn)
    assert len(curves)
    # dashes differ between K settings in the PNG too
    assert drawn["aid_cg K=10 [jax]"].get_linestyle() != drawn["aid_cg K=t [jax]"].get_linestyle()
    figures.close(fig)


def test_the_png_cost_figures_colour_each_method_as_the_page_does(built):
    fig = built["figures"]["best_val_vs_cost.png"]
    page = {t["name"]: t["line"]["color"]
            for p in built["spec"]["panels"] if p["section"] == "best"
            for t in _medians(p["modes"]["wall"])}
    drawn = {line.get_label().rsplit(" (", 1)[0]: line.get_color()
             for ax in fig.axes for line in ax.get_lines()}
    assert drawn and drawn == {name: page[name] for name in drawn}
    for ax in fig.axes:  # two aid_cg step sizes: one colour, two dashes
        pairs = [(line.get_color(), str(line._dash_pattern))  # matplotlib's on/off seq
                 for line in ax.get_lines()]
        assert len(set(pairs)) == len(pairs) == 6, pairs
    figures.close(fig)
