"""The report's tables: methods compared per problem, the ridge tutorial's table, and
:func:`summary_table`, the short per-(problem, algorithm) text table of a study."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from hypersweep.tools.report.reading import as_frame
from hypersweep.tools.report.statistics import (
    COST_AXIS,
    ERROR_PIPELINE,
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
    """One line per (problem, pipeline, algorithm): cells ok/failed, the median headline
    number (relative hypergradient error for ``hypergradient_error``, final val loss
    otherwise) over ok cells, and the median wall time; a pipeline column when the
    table mixes pipelines. ``table``: a pyarrow Table, DataFrame or list of result rows."""
    df = as_frame(table)
    if df.empty:
        return "(no results)"
    several = df["pipeline"].nunique() > 1
    rank = {p: i for i, p in enumerate(problem_order(df["problem"].unique()))}
    rows = []
    for (problem, pipeline, algorithm), g in sorted(
            df.groupby(["problem", "pipeline", "algorithm"]),
            key=lambda item: (rank[item[0][0]], item[0][1], item[0][2])):
        ok = g[g["status"] == "ok"]
        metric = "rel error" if pipeline == ERROR_PIPELINE else "val loss"
        column = "hypergrad_rel_error" if pipeline == ERROR_PIPELINE else "val_loss"
        values = ok[column].astype(float) if len(ok) else pd.Series([], dtype=float)
        values = values[np.isfinite(values)]
        walls = ok["wall_time_s"].astype(float) if len(ok) else pd.Series([], dtype=float)
        rows.append(((pipeline,) if several else ()) + (
            problem, algorithm, f"{len(ok)}/{len(g) - len(ok)}", metric,
            fmt(float(values.median()) if len(values) else None, ".3e"),
            fmt(float(walls.median()) if len(walls) else None, ".3g")))
    header = (("pipeline",) if several else ()) + (
        "problem", "algorithm", "ok/failed", "metric", "median", "wall s (median)")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(header, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)
