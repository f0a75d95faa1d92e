"""The report as one self-contained HTML page (images embedded as base64 PNG)."""
from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence

import pandas as pd

from hypersweep.tools.report.statistics import GRAD_SQ_TARGET, TARGET_REL
from hypersweep.tools.report.tables import CALLS_TO_GRAD, TIME_TO_GRAD, fmt

_CSS = ("body{font-family:sans-serif;max-width:1200px;margin:auto}"
        "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;"
        "padding:3px 8px;font-size:13px;text-align:right}th{background:#eee}"
        "img{max-width:100%}pre{background:#f6f6f6;padding:8px}")


def _html_table(df: pd.DataFrame) -> str:
    def cell(v):
        if isinstance(v, float):
            return fmt(v)
        return "—" if v is None else html.escape(str(v))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>"
                   for row in df.astype(object).where(df.notna(), None).itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(data: bytes, alt: str) -> str:
    return (f"<img alt='{html.escape(alt)}' src='data:image/png;base64,"
            f"{base64.b64encode(data).decode()}'>")


def render_html(*, sources: Sequence[str], summary: str, images: dict[str, bytes],
                rates: pd.DataFrame, comparison: pd.DataFrame,
                solver: pd.DataFrame | None = None, tutorial: str | None = None) -> str:
    """The page: sources, the summary table, the tutorial table (if any), figure 1 with
    the rates, figure 2, the comparison table per problem, figure 3 and the solver
    table. ``images``: PNG bytes by file name (``error_vs_t.png``,
    ``best_val_vs_cost.png``, ``grad_norm_vs_cost.png``), each optional."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>hypersweep report"
             f"</title><style>{_CSS}</style></head><body><h1>hypersweep report</h1>",
             "<p>Results: " + ", ".join(html.escape(s) for s in sources) + "</p>",
             f"<h2>Summary</h2><pre>{html.escape(summary)}</pre>"]
    if tutorial:
        parts.append("<h2>Ridge tutorial summary</h2>"
                     f"<pre>{html.escape(tutorial)}</pre>")
    if "error_vs_t.png" in images:
        parts.append("<h2>Hypergradient error vs t</h2><p>Median over seeds, band 20–80 %. "
                     "r: fitted linear rate (error ≈ c·rᵗ over the decreasing part); q: "
                     "contraction factor of Φ.</p>")
        parts.append(_img(images["error_vs_t.png"], "error vs t"))
        parts.append(_html_table(rates))
    if "best_val_vs_cost.png" in images:
        parts.append("<h2>Best validation loss vs cost</h2><p>Gradient-based HPO (solid) vs "
                     "black-box search (dashed); median over seeds, band 20–80 %.</p>")
        parts.append(_img(images["best_val_vs_cost.png"], "best val loss vs cost"))
    if len(comparison):
        parts.append(f"<h2>Methods per problem</h2><p>final_val_loss: median over seeds of "
                     f"the best val loss found; n_oracle_calls: gradients + Hessian-vector "
                     f"+ cross products; time/oracle calls to target: median over the seeds "
                     f"that got within {TARGET_REL:.0%} of the best val loss any method "
                     f"found on that seed's data.</p>")
        for problem, g in comparison.groupby("problem", sort=False):
            parts.append(f"<h3>{html.escape(problem)}</h3>")
            parts.append(_html_table(g.drop(columns="problem")))
    if "test_vs_time.png" in images:
        parts.append("<h2>Test loss and accuracy vs wall time</h2><p>Gradient-based HPO "
                     "(solid: at the iterate of each evaluation) vs black-box search "
                     "(dashed: at the best trial so far by validation loss); median over "
                     "seeds, band 20–80 %.</p>")
        parts.append(_img(images["test_vs_time.png"], "test loss and accuracy vs time"))
    if "grad_norm_vs_cost.png" in images:
        parts.append("<h2>Stationarity ‖∇F(λ)‖² vs cost</h2><p>‖∇F‖ from the float64 "
                     "oracle at the evaluated λ (hpo methods, solid) or at the best λ so "
                     "far (black-box search, dashed); median over seeds, band 20–80 %.</p>")
        parts.append(_img(images["grad_norm_vs_cost.png"], "grad norm vs cost"))
    if solver is not None and len(solver):
        parts.append(f"<h2>Time to ‖∇F(λ)‖² ≤ {GRAD_SQ_TARGET:g}·‖∇F(λ₀)‖²</h2><p>"
                     f"{TIME_TO_GRAD} / {CALLS_TO_GRAD}: median over the seeds that "
                     f"reached it (seeds_reached) of the wall time / oracle calls at the "
                     f"first evaluation at or below the target; final_grad_norm_sq: median "
                     f"over ok seeds of ‖∇F‖² at the final λ (hpo) or the best trial's λ "
                     f"(black-box).</p>")
        shown = solver.astype(object)
        for col in (TIME_TO_GRAD, CALLS_TO_GRAD):
            shown[col] = [("not reached" if not isinstance(v, float) or math.isnan(v)
                           else v) for v in solver[col]]
        # one table, problem first (as the rates table): a row never starts with a
        # method's name, which is the comparison table's row key
        parts.append(_html_table(shown))
    parts.append("</body></html>")
    return "\n".join(parts)
