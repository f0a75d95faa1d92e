"""The report's two matplotlib figures (Agg backend, nothing shown on screen).

Figure 1, :func:`plot_error_vs_t`: hypergradient error vs t, one panel per problem (log y),
one line per (algorithm, K-setting), median over seeds with a 20–80 % band, each line's
fitted rate r beside the problem's contraction factor q — the panels of Grazzi et al. 2020.
Figure 2, :func:`plot_best_val`: best validation loss so far vs wall time and vs oracle
calls, gradient HPO (solid) against black-box search (dashed).
"""
from __future__ import annotations

import io

import pandas as pd

from hypersweep.tools.report.statistics import (
    COST_AXIS,
    best_curves,
    error_curves,
    method_frame,
    problem_order,
    rate_table,
    trace_curves,
)
from hypersweep.tools.report.tables import fmt

COST_LABEL = "oracle calls (gradients + Hessian-vector + cross products)"


def _pyplot():
    """matplotlib.pyplot on the Agg backend (imported on first use: it is slow)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_error_vs_t(results: pd.DataFrame, *, error: str = "hypergrad_rel_error"):
    """Figure 1. Returns (figure, rates DataFrame); None figure when there is nothing."""
    plt = _pyplot()
    curves = error_curves(results, error=error)
    rates = rate_table(results, curves)
    if curves.empty:
        return None, rates
    panels = problem_order(curves["panel"].unique())
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    lines = sorted(curves["line"].unique())
    colors = {line: plt.cm.tab10(i % 10) for i, line in enumerate(lines)}
    for ax, panel in zip(axes[0], panels):
        sub = curves[curves["panel"] == panel]
        q = rates.loc[rates["problem"] == panel, "q"]
        q_val = q.iloc[0] if len(q) else None
        for line, g in sub.groupby("line"):
            rate = rates.loc[(rates["problem"] == panel) & (rates["line"] == line), "rate"]
            r = rate.iloc[0] if len(rate) else None
            ax.plot(g["t"], g["median"], marker="o", ms=3, color=colors[line],
                    label=f"{line} (r={fmt(r, '.3f')})")
            ax.fill_between(g["t"], g["low"], g["high"], color=colors[line], alpha=0.2,
                            linewidth=0)
        ax.set_yscale("log")
        ax.set_xlabel("t (inner steps)")
        ax.set_title(f"{panel}  (q = {fmt(q_val, '.4f')})", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("relative hypergradient error" if error == "hypergrad_rel_error"
                          else "‖ĝ − ∇F‖")
    fig.tight_layout()
    return fig, rates


def plot_best_val(results: pd.DataFrame, traces: pd.DataFrame):
    """Figure 2: rows = problems, columns = (vs wall time, vs oracle calls).
    Returns the figure, or None when there are no hpo/blackbox traces."""
    plt = _pyplot()
    curves = trace_curves(method_frame(results), traces)
    if curves.empty:
        return None
    by_time = best_curves(curves, "wall_time_s")
    by_evals = best_curves(curves, COST_AXIS)
    panels = problem_order(curves["panel"].unique())
    methods = sorted(curves["method"].unique())
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(len(panels), 2, figsize=(10, 3.6 * len(panels)), squeeze=False)
    for row, panel in enumerate(panels):
        for col, (data, xlabel) in enumerate(((by_time, "wall time (s)"),
                                              (by_evals, COST_LABEL))):
            ax = axes[row][col]
            sub = data[data["panel"] == panel]
            for (method, kind), g in sub.groupby(["method", "kind"]):
                style = "-" if kind == "gradient" else "--"
                ax.plot(g["x"], g["median"], style, color=colors[method],
                        label=f"{method} ({kind})")
                ax.fill_between(g["x"], g["low"], g["high"], color=colors[method],
                                alpha=0.15, linewidth=0)
            ax.set_xscale("log")
            if len(sub) and (sub["low"] > 0).all() and sub["high"].max() > 10 * sub[
                    "low"].min():
                ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("best val loss so far")
            ax.set_title(panel, fontsize=10)
            ax.grid(True, alpha=0.3)
            if len(sub):
                ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def png(fig) -> bytes:
    """``fig`` as PNG bytes (110 dpi)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def close(fig) -> None:
    """Release ``fig`` (pyplot keeps every figure it made alive until closed)."""
    _pyplot().close(fig)
