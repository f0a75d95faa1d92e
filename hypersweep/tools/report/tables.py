"""The report's tables: methods compared per problem, stationarity reached per problem
(:func:`solver_table`), the ridge tutorial's table, and :func:`summary_table`, the short
per-(problem, algorithm) text table of a study."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from hypersweep.tools.report.reading import as_frame
from hypersweep.tools.report.statistics import (
    COST_AXIS,
    ERROR_PIPELINE,
    GRAD_SQ_TARGET,
    GRADIENT_PIPELINE,
    TARGET_REL,
    method_frame,
    oracle_calls,
    problem_order,
    trace_curves,
)


def fmt(value: Any, spec: str = ".4g") -> str:
    """``value`` formatted with ``spec``; "—" for None and non-finite floats."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value, spec)


def comparison_table(results: pd.DataFrame, traces: pd.DataFrame) -> pd.DataFrame:
    """Per (problem, method): seeds, final best val loss, test metric, wall time and
    oracle calls (medians over seeds), and the median time / oracle calls to reach within
    :data:`TARGET_REL` of the best val loss any method found on that seed's data."""
    methods = method_frame(results)
    if not methods.empty:
        methods = methods.assign(**{COST_AXIS: oracle_calls(methods)})
    columns = ["problem", "method", "kind", "cells", "ok", "final_val_loss", "test_loss",
               "test_accuracy", "wall_time_s", COST_AXIS, "reached",
               "time_to_target_s", "calls_to_target"]
    if methods.empty:
        return pd.DataFrame(columns=columns)
    curves = trace_curves(methods, traces)
    final_by_cell = {}
    if not curves.empty:
        last = curves.sort_values("step").groupby("cell_id")["best"].min()
        final_by_cell = last.to_dict()
    ok = methods[methods["status"] == "ok"].copy()
    ok["final"] = [final_by_cell.get(c, v) for c, v in zip(ok["cell_id"], ok["val_loss"])]
    # the best any method found, per (panel, seed): same data for every method
    target = ok.groupby(["panel", "seed"])["final"].min()
    rows = []
    for (panel, method, kind), g in methods.groupby(["panel", "method", "kind"]):
        good = ok[(ok["panel"] == panel) & (ok["method"] == method)]
        times, evals, reached = [], [], 0
        for cell_id, seed in zip(good["cell_id"], good["seed"]):
            best = target.get((panel, seed))
            c = curves[curves["cell_id"] == cell_id] if not curves.empty else curves
            if best is None or not np.isfinite(best) or c.empty:
                continue
            hit = c[c["best"] <= best + TARGET_REL * abs(best)].sort_values("step")
            if len(hit):
                reached += 1
                times.append(float(hit["wall_time_s"].iloc[0]))
                evals.append(float(hit[COST_AXIS].iloc[0]))

        def med(col):
            vals = good[col].astype(float)
            vals = vals[np.isfinite(vals)]
            return float(vals.median()) if len(vals) else None

        rows.append(dict(
            problem=panel, method=method, kind=kind, cells=len(g), ok=len(good),
            final_val_loss=(float(np.median(good["final"].astype(float)))
                            if len(good) else None),
            test_loss=med("test_loss"), test_accuracy=med("test_accuracy"),
            wall_time_s=med("wall_time_s"), **{COST_AXIS: med(COST_AXIS)},
            reached=f"{reached}/{len(good)}",
            time_to_target_s=float(np.median(times)) if times else None,
            calls_to_target=float(np.median(evals)) if evals else None))
    out = pd.DataFrame(rows, columns=columns)
    out["_order"] = out["problem"].map({p: i for i, p in enumerate(problem_order(
        out["problem"]))})
    return out.sort_values(["_order", "final_val_loss"]).drop(columns="_order").reset_index(
        drop=True)


#: the solver table's columns named after GRAD_SQ_TARGET (1e-3)
TIME_TO_GRAD, CALLS_TO_GRAD = "time_to_1e-3_s", "oracle_calls_to_1e-3"
SOLVER_COLUMNS = ["problem", "method", "kind", "family", "seeds", "failed", "seeds_reached",
                  TIME_TO_GRAD, CALLS_TO_GRAD, "final_grad_norm_sq"]


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def reference_grad_norm(row, cell_traces: pd.DataFrame) -> float:
    """‖∇F(λ₀)‖ of a cell: its result row's ``outer_grad_norm`` ÷ ``outer_grad_norm_rel``
    (every pipeline that writes them divides by the oracle at the cell's λ₀); else, for an
    ``hpo`` cell (a diverged one has no ratio), its step-0 trace row, which is at λ₀ for
    every kind. NaN when neither is known."""
    g, rel = _float(row.get("outer_grad_norm")), _float(row.get("outer_grad_norm_rel"))
    if math.isfinite(g) and math.isfinite(rel) and rel > 0:
        return g / rel
    if row.get("pipeline") == GRADIENT_PIPELINE and len(cell_traces):
        first = cell_traces[cell_traces["step"] == 0]
        if len(first):
            return _float(first["outer_grad_norm"].iloc[0])
    return math.nan


def _family(algorithm: str) -> str | None:
    """The catalog kind (solver, estimator, online, searcher, baseline); None when
    unregistered."""
    from hypersweep import algorithms  # the catalog only: pure data, no backend

    try:
        return algorithms.spec(algorithm).kind
    except ValueError:
        return None


def solver_table(results: pd.DataFrame, traces: pd.DataFrame) -> pd.DataFrame:
    """Per (problem, method) of the hpo and blackbox cells: how fast ‖∇F(λ_k)‖² falls to
    :data:`GRAD_SQ_TARGET`·‖∇F(λ₀)‖² = 1e-3·‖∇F(λ₀)‖² (λ₀ and ‖∇F‖ from each cell's float64 oracle, see
    :func:`reference_grad_norm`).

    ``seeds``: ok cells; ``failed``: the others. ``seeds_reached``: "k/seeds", the ok
    cells with a trace row at or below the target; ``time_to_1e-3_s`` /
    ``oracle_calls_to_1e-3``: the median, over those k cells, of the cumulative wall time
    / oracle calls of their first such row (NaN when k = 0); the resolution is the
    pipeline's evaluation interval (hpo ``eval_every``, one blackbox trial).
    ``final_grad_norm_sq``: median over ok cells of the result row's ``outer_grad_norm``²
    (hpo: at λ_final; blackbox: at the best trial's λ). Rows by problem, then fastest
    first. Empty when no cell carries ``outer_grad_norm`` (outputs from before it).
    """
    methods = method_frame(results)
    if methods.empty:
        return pd.DataFrame(columns=SOLVER_COLUMNS)
    if "outer_grad_norm" not in methods:
        methods = methods.assign(outer_grad_norm=np.nan)
    curves = trace_curves(methods, traces)
    has_grad = bool(np.isfinite(curves["grad_sq"].astype(float)).any()) or bool(
        np.isfinite(methods["outer_grad_norm"].astype(float)).any())
    if not has_grad:
        return pd.DataFrame(columns=SOLVER_COLUMNS)
    by_cell = dict(tuple(curves.groupby("cell_id"))) if len(curves) else {}
    rows = []
    for (panel, method, kind), g in methods.groupby(["panel", "method", "kind"]):
        ok = g[g["status"] == "ok"]
        times, calls = [], []
        for _, row in ok.iterrows():
            c = by_cell.get(row["cell_id"], curves.iloc[0:0])
            g0 = reference_grad_norm(row, c)
            if not (math.isfinite(g0) and g0 > 0) or c.empty:
                continue
            hit = c[c["grad_sq"].astype(float) <= GRAD_SQ_TARGET * g0 ** 2].sort_values("step")
            if len(hit):
                times.append(float(hit["wall_time_s"].iloc[0]))
                calls.append(float(hit[COST_AXIS].iloc[0]))
        final = ok["outer_grad_norm"].astype(float) ** 2
        final = final[np.isfinite(final)]
        rows.append({
            "problem": panel, "method": method, "kind": kind,
            "family": _family(str(g["algorithm"].iloc[0])),
            "seeds": len(ok), "failed": len(g) - len(ok),
            "seeds_reached": f"{len(times)}/{len(ok)}",
            TIME_TO_GRAD: float(np.median(times)) if times else math.nan,
            CALLS_TO_GRAD: float(np.median(calls)) if calls else math.nan,
            "final_grad_norm_sq": float(final.median()) if len(final) else math.nan})
    out = pd.DataFrame(rows, columns=SOLVER_COLUMNS)
    out["_order"] = out["problem"].map({p: i for i, p in enumerate(problem_order(
        out["problem"]))})
    return out.sort_values(["_order", TIME_TO_GRAD, "final_grad_norm_sq"],
                           na_position="last").drop(columns="_order").reset_index(drop=True)


def tutorial_summary(results: pd.DataFrame) -> str | None:
    """The ridge tutorial's table (method, t, final λ, final val loss, runtime) when the
    results hold HPO or black-box cells on ``ridge`` (configs/ridge_tutorial*.yaml)."""
    if results.empty or "pipeline" not in results:
        return None
    rows = results[(results["problem"] == "ridge")
                   & results["pipeline"].isin(["hpo", "blackbox"])]
    if rows.empty:
        return None
    from hypersweep.pipelines.hpo import tutorial_table

    return tutorial_table(rows, file=None)


def summary_table(table: Any) -> str:
    """One line per (problem, pipeline, algorithm [K setting]): cells ok/failed, the median
    headline number over ok cells (relative hypergradient error at the line's largest t
    for ``hypergradient_error``; the val loss F(λ_final) at the final λ otherwise), and the
    median wall time; a pipeline column when the table mixes pipelines. ``table``: a pyarrow Table, DataFrame or list of result rows."""
    df = as_frame(table)
    if df.empty:
        return "(no results)"
    several = df["pipeline"].nunique() > 1
    rank = {p: i for i, p in enumerate(problem_order(df["problem"].unique()))}
    df = df.copy()
    if "K_setting" in df:  # an error line per K setting: "aid_cg K=t", "aid_cg K=10"
        k = df["K_setting"].where(df["pipeline"] == ERROR_PIPELINE)
        df["algorithm"] = df["algorithm"].where(k.isna(), df["algorithm"] + " K="
                                                + k.fillna("").astype(str))
    rows = []
    for (problem, pipeline, algorithm), g in sorted(
            df.groupby(["problem", "pipeline", "algorithm"]),
            key=lambda item: (rank[item[0][0]], item[0][1], item[0][2])):
        ok = g[g["status"] == "ok"]
        counts = f"{len(ok)}/{len(g) - len(ok)}"
        if pipeline == ERROR_PIPELINE and len(ok):
            # the error at the line's largest t: medians do not mix inner budgets
            t_max = int(ok["t"].max())
            ok = ok[ok["t"] == t_max]
            metric, column = f"rel error at t={t_max}", "hypergrad_rel_error"
        else:
            metric, column = "val loss F(λ_final)", "val_loss"
        values = ok[column].astype(float) if len(ok) else pd.Series([], dtype=float)
        values = values[np.isfinite(values)]
        walls = ok["wall_time_s"].astype(float) if len(ok) else pd.Series([], dtype=float)
        rows.append(((pipeline,) if several else ()) + (
            problem, algorithm, counts, metric,
            fmt(float(values.median()) if len(values) else None, ".3e"),
            fmt(float(walls.median()) if len(walls) else None, ".3g")))
    header = (("pipeline",) if several else ()) + (
        "problem", "algorithm", "ok/failed", "metric", "median", "wall s (median)")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(header, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)
