"""The report's three matplotlib figures (Agg backend, nothing shown on screen).

Figure 1, :func:`plot_error_vs_t`: hypergradient error vs t, one panel per problem (log y),
one line per (algorithm, K-setting), median over seeds with a 20–80 % band, each line's
fitted rate r beside the problem's contraction factor q — the panels of Grazzi et al. 2020.
Figure 2, :func:`plot_best_val`: best validation loss so far vs wall time and vs oracle
calls, gradient HPO (solid) against black-box search (dashed).
Figure 3, :func:`plot_grad_norm`: ‖∇F(λ)‖² (float64 oracle) vs wall time and vs oracle
calls, benchmark_bilevel's stationarity plot (Dagréou et al. 2022), same line styles.
"""
from __future__ import annotations

import io

import pandas as pd

from hypersweep.tools.report.statistics import (
    COST_AXIS,
    best_curves,
    error_curves,
    grad_norm_curves,
    method_frame,
    problem_order,
    rate_table,
    trace_curves,
)
from hypersweep.tools.report.tables import fmt

COST_LABEL = "oracle calls (gradients + Hessian-vector + cross products)"
GRAD_LABEL = "‖∇F(λ)‖²"


def _pyplot():
    """matplotlib.pyplot on the Agg backend (imported on first use: it is slow)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_error_vs_t(results: pd.DataFrame, *, error: str = "hypergrad_rel_error"):
    """Figure 1. Returns (figure, rates DataFrame); None figure when there is nothing.
    One panel per problem; each line with its fitted rate r in the legend (below the
    panels, so it covers no curve) and the dotted reference slope qᵗ."""
    import numpy as np

    plt = _pyplot()
    curves = error_curves(results, error=error)
    rates = rate_table(results, curves)
    if curves.empty:
        return None, rates
    panels = problem_order(curves["panel"].unique())
    from hypersweep.tools.report.styles import error_line_styles

    styles = error_line_styles(curves, results)
    n_lines = curves.groupby("panel")["line"].nunique().max()
    legend_rows = -(-(n_lines + 1) // 2)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels),
                                                      3.6 + 0.2 * legend_rows),
                             squeeze=False)
    for ax, panel in zip(axes[0], panels):
        sub = curves[curves["panel"] == panel]
        q = rates.loc[rates["problem"] == panel, "q"]
        q_val = q.iloc[0] if len(q) else None
        for line, g in sub.groupby("line"):
            rate = rates.loc[(rates["problem"] == panel) & (rates["line"] == line), "rate"]
            r = rate.iloc[0] if len(rate) else None
            style = styles[line]
            label = f"{line} (r = {fmt(r, '.3f')})" if r is not None and pd.notna(r) \
                else line
            ax.plot(g["t"], g["median"], marker=style.mpl_marker, ms=3, color=style.color,
                    linestyle=style.mpl_linestyle(), label=label)
            ax.fill_between(g["t"], g["low"], g["high"], color=style.color, alpha=0.15,
                            linewidth=0)
        if q_val is not None and pd.notna(q_val) and 0 < q_val < 1:
            t = np.array(sorted(sub["t"].unique()), float)
            start = sub[sub["t"] == t[0]]["median"].max()
            ref = start * q_val ** (t - t[0])
            keep = ref >= sub["low"][sub["low"] > 0].min() / 10
            keep[:2] = True
            ax.plot(t[keep], ref[keep], ":", color="#7f7f7f", lw=1.2,
                    label=f"reference qᵗ (q = {q_val:.4f})")
        ax.set_yscale("log")
        ax.set_xlabel("t (inner steps)")
        ax.set_title(f"{panel}  (q = {fmt(q_val, '.4f')})", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2,
                  frameon=False)
    axes[0][0].set_ylabel("relative hypergradient error" if error == "hypergrad_rel_error"
                          else "‖ĝ − ∇F‖")
    fig.tight_layout()
    return fig, rates


def _wrapped(title: str, width: int = 60) -> str:
    """A panel title on lines of at most ``width`` characters (a panel named by its
    problem's params is long; side by side, unwrapped titles run into each other)."""
    import textwrap

    return "\n".join(textwrap.wrap(title, width)) or title


def _method_styles(results: pd.DataFrame, methods) -> dict:
    """Each method's :class:`~.styles.Style`, the interactive page's (colour = algorithm,
    lighter for torch; dash = the variant: K, params, t), so that a method looks the same
    in the PNGs and on the page and no two methods of a panel share colour and dash."""
    from hypersweep.tools.report.styles import method_styles

    return method_styles(method_frame(results), results, methods)


def _cost_panels(plt, panels, by_time, by_evals, colors, *, ylabel: str,
                 log_y: bool | None):
    """Rows = ``panels``, columns = (vs wall time, vs oracle calls): see :func:`_panel_grid`."""
    return _panel_grid(plt, panels, [(by_time, "wall time (s)", ylabel),
                                     (by_evals, COST_LABEL, ylabel)], colors, log_y=log_y)


def _panel_grid(plt, panels, columns, colors, *, log_y: bool | None):
    """Rows = ``panels``, one column per (curves, x label, y label) of ``columns``, log x;
    one line per (method, kind) in its style (``colors``: method → Style; the legend says
    gradient or black-box), with its 20–80 % band. ``log_y`` None: log y when the band is
    positive and spans more than a decade."""
    fig, axes = plt.subplots(len(panels), len(columns),
                             figsize=(5 * len(columns), 3.6 * len(panels)), squeeze=False)
    for row, panel in enumerate(panels):
        for col, (data, xlabel, ylabel) in enumerate(columns):
            ax = axes[row][col]
            sub = data[data["panel"] == panel]
            for (method, kind), g in sub.groupby(["method", "kind"]):
                style = colors[method]
                ax.plot(g["x"], g["median"], linestyle=style.mpl_linestyle(),
                        color=style.color, label=f"{method} ({kind})")
                ax.fill_between(g["x"], g["low"], g["high"], color=style.color,
                                alpha=0.15, linewidth=0)
            ax.set_xscale("log")
            if len(sub) and sub["x"].max() >= 10 * sub["x"].min():
                # decades carry labels; labelled minor ticks (2×10¹, 3×10¹, …) overlap
                from matplotlib.ticker import NullFormatter

                ax.xaxis.set_minor_formatter(NullFormatter())
            if log_y or (log_y is None and len(sub) and (sub["low"] > 0).all()
                         and sub["high"].max() > 10 * sub["low"].min()):
                ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(_wrapped(panel), fontsize=8)
            ax.grid(True, alpha=0.3)
            if len(sub):
                ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


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
    colors = _method_styles(results, curves["method"].unique())
    return _cost_panels(plt, panels, by_time, by_evals, colors,
                        ylabel="best val loss so far", log_y=None)


def plot_grad_norm(results: pd.DataFrame, traces: pd.DataFrame):
    """Figure 3: ‖∇F(λ)‖² (log y) vs wall time (left) and oracle calls (right), one row
    per problem, one line per method — every hpo method (solvers, estimators, online;
    solid: ‖∇F‖ at the evaluated λ_k) and black-box searcher (dashed: at the best λ so
    far) — median over seeds with a 20–80 % band. Rows at x ≤ 0 are left out (log x).
    Returns the figure, or None when no trace row carries ``outer_grad_norm``."""
    curves = trace_curves(method_frame(results), traces)
    if curves.empty:
        return None
    curves = curves[curves["grad_sq"].astype(float).notna()]
    by_time = grad_norm_curves(curves, "wall_time_s")
    by_evals = grad_norm_curves(curves, COST_AXIS)
    if by_time.empty and by_evals.empty:
        return None
    plt = _pyplot()
    panels = problem_order(set(by_time["panel"]) | set(by_evals["panel"]))
    colors = _method_styles(results, curves["method"].unique())
    return _cost_panels(plt, panels, by_time, by_evals, colors, ylabel=GRAD_LABEL,
                        log_y=True)


def plot_test_vs_time(results: pd.DataFrame, traces: pd.DataFrame):
    """Figure 4: test loss (left) and test accuracy (right) vs wall time, one row per
    problem, one line per method (gradient solid: at its iterate; black-box dashed: at the
    best trial so far), median over seeds with a 20–80 % band — the stocBiO paper's
    figures. Returns the figure, or None when no trace row has a test metric."""
    from hypersweep.tools.report.statistics import test_curves

    curves = trace_curves(method_frame(results), traces)
    if curves.empty or "test_loss" not in curves or curves["test_loss"].isna().all():
        return None
    loss = test_curves(curves, "wall_time_s", "test_loss")
    accuracy = test_curves(curves, "wall_time_s", "test_accuracy")
    if loss.empty and accuracy.empty:
        return None
    plt = _pyplot()
    panels = problem_order(set(loss["panel"]) | set(accuracy["panel"]))
    colors = _method_styles(results, curves["method"].unique())
    return _panel_grid(plt, panels, [(loss, "wall time (s)", "test loss"),
                                     (accuracy, "wall time (s)", "test accuracy")],
                       colors, log_y=False)


def png(fig) -> bytes:
    """``fig`` as PNG bytes (110 dpi)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def close(fig) -> None:
    """Release ``fig`` (pyplot keeps every figure it made alive until closed)."""
    _pyplot().close(fig)
