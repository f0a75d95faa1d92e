"""The interactive report: one self-contained, offline HTML page (Plotly's library
embedded, no request leaves the file), built from a *figure spec* that tests can read.

The spec (:func:`figure_spec`) is plain JSON: a list of panels, each with the Plotly traces
for every x axis it offers (``t``: inner steps t for the error panels and the outer step
for the method panels; ``wall``: wall time; ``calls``: oracle calls), its default log
scales, its problem and section. The page's controls (x axis, log x, log y, problem) redraw
every panel from the spec with ``Plotly.react``; nothing is computed in the browser.

Style (:mod:`.styles`): colour = algorithm (a lighter shade for torch), dash = variant (K
setting, t, params), marker = backend; a method keeps its style in every panel. Each
median line has its 20–80 % band over seeds (filled, in the legend group of its line) and a
hover with the method's parameters, the median and the band. Error panels carry the
reference slope qᵗ (q: the contraction factor of Φ, a property of the problem instance) on
the t axis.
"""
from __future__ import annotations

import html
import json
import math
import platform
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from hypersweep.tools.report import styles as st
from hypersweep.tools.report.statistics import (
    COST_AXIS,
    best_curves,
    error_curves,
    grad_norm_curves,
    method_frame,
    problem_order,
    rate_table,
    test_curves,
    trace_curves,
)

X_MODES = ("t", "wall", "calls")
X_LABELS = {
    "error": {"t": "t (inner steps)", "wall": "wall time per cell (s)",
              "calls": "oracle calls (gradients + Hessian-vector + cross products)"},
    "method": {"t": "outer step", "wall": "wall time (s)",
               "calls": "oracle calls (gradients + Hessian-vector + cross products)"},
}
SECTIONS = {
    "error": "Hypergradient error",
    "best": "Best validation loss so far",
    "grad_sq": "Stationarity ‖∇F(λ)‖² (float64 oracle)",
    "test_loss": "Test loss",
    "test_accuracy": "Test accuracy",
}
#: trace x column per x mode, for the method panels
_TRACE_X = {"t": "step", "wall": "wall_time_s", "calls": COST_AXIS}


# ---------------------------------------------------------------------------------------
# Traces


def _finite(values) -> list:
    """JSON-safe numbers: NaN and ±inf become null (Plotly leaves a gap)."""
    return [float(v) if v is not None and math.isfinite(float(v)) else None for v in values]


def _line_traces(label: str, style: st.Style, x, median, low, high, *, hover: str,
                 role: str = "median") -> list[dict]:
    """The band (upper, then lower filled to it) and the median line of one method."""
    x, median, low, high = _finite(x), _finite(median), _finite(low), _finite(high)
    group = f"{role}:{label}"
    band = [
        dict(type="scatter", x=x, y=high, mode="lines", line=dict(width=0),
             hoverinfo="skip", showlegend=False, legendgroup=group,
             meta=dict(method=label, role="band_high")),
        dict(type="scatter", x=x, y=low, mode="lines", line=dict(width=0), fill="tonexty",
             fillcolor=st.rgba(style.color, 0.15), hoverinfo="skip", showlegend=False,
             legendgroup=group, meta=dict(method=label, role="band_low")),
    ]
    line = dict(type="scatter", x=x, y=median, mode="lines+markers", name=label,
                legendgroup=group,
                line=dict(color=style.color, dash=style.plotly_dash, width=2),
                marker=dict(symbol=style.marker, size=5, color=style.color),
                customdata=[[lo, hi] for lo, hi in zip(low, high)],
                hovertemplate=(f"<b>{html.escape(label)}</b><br>{hover}<br>x = %{{x:.4g}}"
                               "<br>median = %{y:.4g}<br>band 20–80 %: "
                               "%{customdata[0]:.3g} – %{customdata[1]:.3g}<extra></extra>"),
                meta=dict(method=label, role=role))
    return [*band, line]


def _params_text(row: pd.Series | dict) -> str:
    parts = []
    for key in ("backend", "dtype", "K_setting", "algorithm_params", "pipeline_params",
                "problem_params"):
        value = row.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)) \
                or value in ("{}", ""):
            continue
        parts.append(f"{key}: {html.escape(str(value))}")
    return "<br>".join(parts)


def _q_reference(q: float | None, t: np.ndarray, start: float, floor: float) -> dict | None:
    """The slope qᵗ through (t₀, ``start``): where an error that contracts like Φ goes;
    drawn down to a tenth of the panel's lowest value (``floor``), not beyond, so that it
    does not stretch the axis."""
    if q is None or not (0 < q < 1) or len(t) < 2 or not math.isfinite(start) or start <= 0:
        return None
    t = np.asarray(sorted(set(t)), float)
    y = start * q ** (t - t[0])
    if math.isfinite(floor) and floor > 0:
        keep = y >= floor / 10
        keep[:2] = True
        t, y = t[keep], y[keep]
    return dict(type="scatter", x=_finite(t), y=_finite(y), mode="lines",
                name=f"reference q^t (q = {q:.4g})",
                line=dict(color=st.REFERENCE_COLOR, dash="dot", width=1.5),
                hovertemplate=f"reference q^t, q = {q:.4g}<br>t = %{{x}}<br>%{{y:.3g}}"
                              "<extra></extra>",
                meta=dict(method="reference", role="reference"))


def _error_panels(results: pd.DataFrame, error: str) -> list[dict]:
    curves = error_curves(results, error=error)
    if curves.empty:
        return []
    rates = rate_table(results, curves)
    rows = results[results["pipeline"] == "hypergradient_error"]
    styles = st.error_line_styles(curves, results)
    ylabel = ("relative hypergradient error ‖ĝ − ∇F‖ / ‖∇F‖" if error == "hypergrad_rel_error"
              else "hypergradient error ‖ĝ − ∇F‖")
    panels = []
    for i, panel in enumerate(problem_order(curves["panel"].unique())):
        sub = curves[curves["panel"] == panel]
        q = rates.loc[rates["problem"] == panel, "q"]
        q_val = float(q.iloc[0]) if len(q) and pd.notna(q.iloc[0]) else None
        modes: dict[str, list] = {m: [] for m in X_MODES}
        for line, g in sub.groupby("line", sort=True):
            g = g.sort_values("t")
            rate = rates.loc[(rates["problem"] == panel) & (rates["line"] == line), "rate"]
            r = rate.iloc[0] if len(rate) else None
            label = f"{line}" + (f" (r = {r:.3f})" if r is not None and pd.notna(r) else "")
            src = rows[(rows["algorithm"] == g["algorithm"].iloc[0])
                       & (rows["backend"] == g["backend"].iloc[0])]
            hover = _params_text(src.iloc[0]) if len(src) else ""
            hover += f"<br>seeds: {int(g['n'].max())}"
            for mode, column in (("t", "t"), ("wall", "wall_time_s"), ("calls", COST_AXIS)):
                x = g[column].to_numpy(float)
                if not np.isfinite(x).any():
                    continue
                modes[mode] += _line_traces(label, styles[line], x, g["median"], g["low"],
                                            g["high"], hover=hover)
        top = sub[sub["t"] == sub["t"].min()]["median"].max()
        ref = _q_reference(q_val, sub["t"].to_numpy(), float(top),
                           float(sub["low"][sub["low"] > 0].min()))
        if ref is not None:
            modes["t"].append(ref)
        problem = sub["panel"].iloc[0].split(" ")[0]
        panels.append(dict(
            id=f"error-{i}", section="error", problem=problem,
            title=f"{panel}   (q = {q_val:.4g})" if q_val is not None else panel,
            ylabel=ylabel, ylog=True, xlog={"t": False, "wall": True, "calls": True},
            xlabels=X_LABELS["error"], modes=modes))
    return panels


def _method_panels(results: pd.DataFrame, traces: pd.DataFrame) -> list[dict]:
    methods = method_frame(results)
    curves = trace_curves(methods, traces)
    if curves.empty:
        return []
    first = methods.drop_duplicates("method").set_index("method")
    styles = st.method_styles(methods, results)
    ylabels = {"best": "best val loss so far L_out(w_k, λ_k)", "grad_sq": "‖∇F(λ)‖²",
               "test_loss": "test loss", "test_accuracy": "test accuracy"}
    panels = []
    for metric in ("best", "grad_sq", "test_loss", "test_accuracy"):
        data = curves
        if metric == "grad_sq":
            data = curves[curves["grad_sq"].astype(float).notna()]
        if data.empty or metric not in data or pd.to_numeric(
                data[metric], errors="coerce").isna().all():
            continue
        by_mode = {}
        for mode in X_MODES:
            x = _TRACE_X[mode]
            if metric == "best":
                by_mode[mode] = best_curves(data, x)
            elif metric == "grad_sq":
                by_mode[mode] = grad_norm_curves(data, x)
            else:
                by_mode[mode] = test_curves(data, x, metric)
        names = set().union(*(set(c["panel"]) for c in by_mode.values()))
        for i, panel in enumerate(problem_order(names)):
            modes: dict[str, list] = {m: [] for m in X_MODES}
            for mode, c in by_mode.items():
                for (method, kind), g in c[c["panel"] == panel].groupby(
                        ["method", "kind"], sort=True):
                    g = g.sort_values("x")
                    row = first.loc[method]
                    hover = (f"{kind}<br>" + _params_text(row)
                             + f"<br>seeds: {int((methods['method'] == method).sum())}")
                    modes[mode] += _line_traces(f"{method}", styles[method], g["x"],
                                                g["median"], g["low"], g["high"],
                                                hover=hover)
            problem = panel.split(" ")[0]
            panels.append(dict(
                id=f"{metric}-{i}", section=metric, problem=problem, title=panel,
                ylabel=ylabels[metric], ylog=metric == "grad_sq" or _spans_decades(by_mode,
                                                                                   panel),
                xlog={"t": False, "wall": True, "calls": True},
                xlabels=X_LABELS["method"], modes=modes))
    return panels


def _spans_decades(by_mode: dict, panel: str) -> bool:
    c = by_mode["wall"]
    c = c[c["panel"] == panel]
    return bool(len(c) and (c["low"] > 0).all() and c["high"].max() > 10 * c["low"].min())


def figure_spec(results: pd.DataFrame, traces: pd.DataFrame, *,
                error: str = "hypergrad_rel_error") -> dict:
    """Every panel of the page with its traces per x axis (see the module docstring)."""
    panels = _error_panels(results, error) + _method_panels(results, traces)
    return dict(panels=panels, x_modes=list(X_MODES),
                sections={k: v for k, v in SECTIONS.items()
                          if any(p["section"] == k for p in panels)},
                problems=sorted({p["problem"] for p in panels}))


# ---------------------------------------------------------------------------------------
# Header: where the numbers come from


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    root = Path(__file__).resolve().parents[3]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    if out.returncode != 0:
        return "unknown (not a git checkout)"
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def provenance(results: pd.DataFrame, sources: Sequence[str | Path]) -> dict:
    """What the header shows: the machine(s), devices and hypersweep versions that
    produced the rows, and the versions, commit and machine that built the report."""
    def values(col):
        if results.empty or col not in results:
            return []
        return sorted({str(v) for v in results[col].dropna().unique()})

    studies = []
    for src in sources:
        path = Path(src) / "study.yaml"
        studies.append(dict(path=str(src), yaml=path.read_text(encoding="utf-8")
                            if path.is_file() else "(no study.yaml)"))
    return dict(
        produced_on=values("hostname"), devices=values("device") or ["cpu"],
        hypersweep_versions=values("hypersweep_version"),
        report_commit=_git_commit(), report_machine=(
            f"{platform.node()} · {platform.platform()} · {platform.machine()} · "
            f"Python {platform.python_version()}"),
        versions={p: _version(p) for p in ("hypersweep", "jax", "torch", "numpy", "pandas",
                                           "ray", "mlflow", "plotly")},
        studies=studies)


# ---------------------------------------------------------------------------------------
# The page

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1400px;margin:auto;padding:0 12px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;
font-size:13px;text-align:right}th{background:#eee}pre{background:#f6f6f6;padding:8px;
overflow:auto}#controls{position:sticky;top:0;background:#fff;padding:8px 0;z-index:10;
border-bottom:1px solid #ddd}#controls label{margin-right:18px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(620px,1fr));gap:8px}
.panel{min-height:400px}.note{color:#555;font-size:14px}
"""

_JS = """
const SPEC = JSON.parse(document.getElementById('spec').textContent);
function value(id){ return document.getElementById(id).value; }
function drawAll(){
  const mode = value('xaxis'), lx = value('logx'), ly = value('logy'), prob = value('problem');
  for (const p of SPEC.panels){
    const div = document.getElementById(p.id);
    const shown = !prob || p.problem === prob;
    div.parentElement.style.display = shown ? '' : 'none';
    const xlog = lx === 'auto' ? p.xlog[mode] : lx === 'log';
    const ylog = ly === 'auto' ? p.ylog : ly === 'log';
    const traces = p.modes[mode] || [];
    // the legend below the axis title, in a bottom margin sized to its rows
    const width = (div.clientWidth || 600) - 20;
    let rows = 1, used = 0;
    for (const t of traces) {
      if (t.showlegend === false) continue;
      const w = 45 + 5.8 * String(t.name || '').length;  // symbol + text, 10 px font
      if (used > 0 && used + w > width) { rows += 1; used = w; } else { used += w; }
    }
    const legendPx = 21 * rows + 10;
    const layout = {
      title: {text: p.title, font: {size: 13}},
      xaxis: {title: {text: p.xlabels[mode]}, type: xlog ? 'log' : 'linear'},
      yaxis: {title: {text: p.ylabel}, type: ylog ? 'log' : 'linear',
              exponentformat: 'power'},
      legend: {orientation: 'h', yref: 'container', y: 0, yanchor: 'bottom', x: 0,
               font: {size: 10}},
      margin: {t: 40, r: 10, b: 70 + legendPx}, height: 400 + legendPx,
      hovermode: 'closest'};
    if (!traces.length) layout.annotations = [{text: 'nothing to draw on this axis',
      showarrow: false, xref: 'paper', yref: 'paper', x: 0.5, y: 0.5}];
    Plotly.react(div, traces, layout, {displaylogo: false, responsive: true});
    div.dataset.xmode = mode;
  }
  document.body.dataset.drawn = String(Number(document.body.dataset.drawn || 0) + 1);
}
for (const id of ['xaxis', 'logx', 'logy', 'problem'])
  document.getElementById(id).addEventListener('change', drawAll);
drawAll();
"""


def _select(id_: str, label: str, options: Sequence[tuple[str, str]], selected: str) -> str:
    opts = "".join(f"<option value='{html.escape(v)}'{' selected' if v == selected else ''}>"
                   f"{html.escape(t)}</option>" for v, t in options)
    return f"<label>{html.escape(label)} <select id='{id_}'>{opts}</select></label>"


def _table_html(df: pd.DataFrame, headers: dict[str, str] | None = None) -> str:
    from hypersweep.tools.report.tables import fmt

    headers = headers or {}

    def cell(v):
        if isinstance(v, float):
            return fmt(v)
        return "—" if v is None else html.escape(str(v))
    head = "".join(f"<th title='{html.escape(str(c))}'>{html.escape(headers.get(c, str(c)))}"
                   f"</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>"
                   for row in df.astype(object).where(df.notna(), None).itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


#: the methods table's columns, said unambiguously (the CSV keeps the short names)
COMPARISON_HEADERS = {
    "final_val_loss": "best val loss seen, min_k L_out(w_k, λ_k) (median over seeds)",
    "test_loss": "test loss at the final λ (median)",
    "test_accuracy": "test accuracy at the final λ (median)",
    "wall_time_s": "wall time s (median)",
    COST_AXIS: "oracle calls (median)",
    "reached": "seeds within 1 % of the best",
    "time_to_target_s": "time to within 1 % (s, median)",
    "calls_to_target": "oracle calls to within 1 % (median)",
}


def render_page(spec: dict, *, prov: dict, summary: str, comparison: pd.DataFrame,
                solver: pd.DataFrame | None, rates: pd.DataFrame,
                mlflow_links: Sequence[tuple[str, str]] = ()) -> str:
    """The page: header (provenance, studies, MLflow links), controls, one section per
    figure kind with one plot per panel, the tables; Plotly embedded."""
    from plotly.offline import get_plotlyjs

    p = prov
    versions = ", ".join(f"{k} {v}" for k, v in p["versions"].items())
    header = [
        "<h1>hypersweep report</h1>",
        "<p class='note'>Results produced on <b>"
        + html.escape(", ".join(p["produced_on"]) or "—") + "</b>, device(s) <b>"
        + html.escape(", ".join(p["devices"])) + "</b>, hypersweep "
        + html.escape(", ".join(p["hypersweep_versions"]) or "—") + ".<br>Report built at "
        f"commit <code>{html.escape(p['report_commit'])}</code> on "
        f"{html.escape(p['report_machine'])}.<br>Versions: {html.escape(versions)}.</p>",
    ]
    for study in p["studies"]:
        header.append(f"<details><summary>study: {html.escape(study['path'])}</summary>"
                      f"<pre>{html.escape(study['yaml'])}</pre></details>")
    if mlflow_links:
        header.append("<p>MLflow runs: " + " · ".join(
            f"<a href='{html.escape(url)}'>{html.escape(label)}</a>"
            for label, url in mlflow_links) + "</p>")
    controls = ("<div id='controls'>"
                + _select("xaxis", "x axis", [("t", "t (error) / outer step (methods)"),
                                              ("wall", "wall time"),
                                              ("calls", "oracle calls")], "t")
                + _select("logx", "x scale", [("auto", "auto"), ("log", "log"),
                                              ("linear", "linear")], "auto")
                + _select("logy", "y scale", [("auto", "auto"), ("log", "log"),
                                              ("linear", "linear")], "auto")
                + _select("problem", "problem", [("", "all")]
                          + [(q, q) for q in spec["problems"]], "")
                + "</div>")
    body = []
    notes = {
        "error": "Median over seeds (line) and 20–80 % band. r: the fitted linear rate "
                 "(error ≈ c·rᵗ over the decreasing part); dotted grey: the slope qᵗ of "
                 "the contraction factor q of Φ, through the top line's first point. "
                 "Wall time and oracle calls: medians over seeds at each t.",
        "best": "Gradient HPO at each evaluation vs black-box search; median over seeds "
                "with a 20–80 % band.",
        "grad_sq": "‖∇F(λ)‖ from the float64 oracle at the evaluated λ (hpo methods) or the "
                   "best λ so far (black-box search).",
        "test_loss": "At the iterate of each evaluation (gradient) or the best trial so far "
                     "by validation loss (black-box).",
        "test_accuracy": "As the test loss.",
    }
    for section, title in spec["sections"].items():
        body.append(f"<h2>{html.escape(title)}</h2><p class='note'>"
                    f"{html.escape(notes[section])}</p><div class='grid'>")
        for panel in spec["panels"]:
            if panel["section"] == section:
                body.append(f"<div class='cell'><div class='panel' id='{panel['id']}' "
                            f"data-problem='{html.escape(panel['problem'])}'></div></div>")
        body.append("</div>")
        if section == "error" and len(rates):
            body.append(_table_html(rates, {"rate": "fitted rate r", "q": "q of Φ"}))
    tables = [f"<h2>Summary</h2><p class='note'>Per (problem, algorithm): median over ok "
              f"cells of the relative hypergradient error (all t and K) or of the val loss "
              f"F(λ_final) at the final λ.</p><pre>{html.escape(summary)}</pre>"]
    if len(comparison):
        tables.append("<h2>Methods per problem</h2>")
        for problem, g in comparison.groupby("problem", sort=False):
            tables.append(f"<h3>{html.escape(problem)}</h3>")
            tables.append(_table_html(g.drop(columns="problem"), COMPARISON_HEADERS))
    if solver is not None and len(solver):
        tables.append("<h2>Time to ‖∇F(λ)‖² ≤ 1e-3·‖∇F(λ₀)‖²</h2>")
        tables.append(_table_html(solver))
    spec_json = json.dumps(spec, separators=(",", ":"), allow_nan=False)
    spec_json = spec_json.replace("</", "<\\/")  # never closes the script element
    return "\n".join([
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>hypersweep report</title>", f"<style>{_CSS}</style>",
        f"<script>{get_plotlyjs()}</script></head><body>",
        *header, controls, *body, *tables,
        f"<script id='spec' type='application/json'>{spec_json}</script>",
        f"<script>{_JS}</script></body></html>"])

