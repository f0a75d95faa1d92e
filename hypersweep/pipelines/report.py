"""Reports: figures, tables and one self-contained HTML page from study outputs.

``hypersweep report RESULTS_DIR... --out DIR`` (this module's :func:`main`) reads one or
more study output directories and writes to ``DIR``:

``error_vs_t.png``
    hypergradient error vs t, one panel per problem (log y), one line per (algorithm,
    K-setting): median over seeds with a 20–80 % band — the four panels of Grazzi et al.
    2020 for logreg, kernel_ridge, biased_reg, hyper_rep. Each line's observed linear
    rate r (least squares of log error vs t over its decreasing part: error ≈ c·rᵗ) is
    printed next to the problem's contraction factor q of Φ.
``best_val_vs_cost.png``
    best validation loss so far vs wall time and vs oracle calls, gradient
    HPO (``hpo`` traces, solid) against black-box search (``blackbox`` traces, dashed),
    median over seeds with a 20–80 % band.
``comparison.csv`` / ``rates.csv``
    the tables below, machine-readable.
``report.html``
    everything above, images embedded (base64), plus per problem: method, final best val
    loss, test metric, time and oracle calls to reach within 1 % of the best val loss any
    method found (per seed), and :func:`summary_table`.

The figures and the page are logged as artifacts of each study's MLflow parent run (tag
``hypersweep.study``) when its tracking store is reachable; otherwise a warning.

:func:`summary_table` is the short per-(problem, algorithm) text table ``hypersweep run``
prints at the end of a study.
"""
from __future__ import annotations

import argparse
import base64
import functools
import html
import importlib
import io
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

#: Grazzi et al. 2020's panel order; other problems follow alphabetically
PAPER_ORDER = ("logreg", "kernel_ridge", "biased_reg", "hyper_rep")
BAND = (0.2, 0.8)
#: "within 1 % of the best val loss found by any method"
TARGET_REL = 0.01
GRADIENT_PIPELINE, BLACKBOX_PIPELINE, ERROR_PIPELINE = "hpo", "blackbox", "hypergradient_error"


# ---------------------------------------------------------------------------------------
# Reading


def _read_parquet_dir(directory: Path, schema) -> "pa.Table":  # noqa: F821
    import pyarrow as pa
    import pyarrow.parquet as pq
    files = sorted(p for p in directory.glob("*.parquet") if not p.name.startswith((".", "_")))
    if not files:
        return schema.empty_table()
    return pa.concat_tables([pq.read_table(f, schema=schema) for f in files])


def read_output(output_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(results, traces) of one study output directory as DataFrames.

    Results: the latest row per ``cell_id`` (by ``finished_at``), via
    ``hypersweep.orchestrator.parquet.read_results``. Traces: every trace row, keeping the
    last-written row per (cell_id, step) — a re-run cell's newer part files sort after
    the older ones (names start with a nanosecond clock).
    """
    directory = Path(output_dir)
    if not directory.is_dir():
        raise ValueError(f"results directory {str(directory)!r} does not exist")
    try:
        from hypersweep.io import parquet
        results = parquet.read_results(directory)
        traces = parquet.read_traces(directory)
    except ImportError:  # pragma: no cover - the sinks module ships with hypersweep
        from hypersweep.io.schema import RESULT_SCHEMA, TRACE_SCHEMA
        results = _read_parquet_dir(directory / "results", RESULT_SCHEMA)
        df = results.to_pandas()
        df = df.sort_values("finished_at").drop_duplicates("cell_id", keep="last")
        results = df
        traces = _read_parquet_dir(directory / "traces", TRACE_SCHEMA)
    res = results if isinstance(results, pd.DataFrame) else results.to_pandas()
    tr = traces.to_pandas() if not isinstance(traces, pd.DataFrame) else traces
    if len(tr):
        tr = tr.drop_duplicates(["cell_id", "step"], keep="last")
    res = res.assign(output_dir=str(directory))
    return res.reset_index(drop=True), tr.reset_index(drop=True)


def read_outputs(dirs: Sequence[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    parts = [read_output(d) for d in dirs]
    results = pd.concat([p[0] for p in parts], ignore_index=True)
    traces = pd.concat([p[1] for p in parts], ignore_index=True)
    if len(results):  # the same cell in two directories: keep the latest
        results = results.sort_values("finished_at").drop_duplicates("cell_id", keep="last")
    return results.reset_index(drop=True), traces


def _as_frame(table: Any) -> pd.DataFrame:
    if isinstance(table, pd.DataFrame):
        return table
    if hasattr(table, "to_pandas"):
        return table.to_pandas()
    return pd.DataFrame(list(table))


def _extra(value: Any) -> dict:
    if isinstance(value, str) and value:
        try:
            return json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------------------------------
# Rates and contraction factors


def decreasing_part(t: Sequence[float], err: Sequence[float]) -> np.ndarray:
    """Indices (sorted by t) of the part of an error curve that still decreases.

    The curve is cut to run from its maximum to its minimum, and points within a factor 2
    of that minimum (the plateau of a K = const line, or the rounding floor) are dropped,
    so the fit sees only the linear-rate regime.
    """
    t = np.asarray(t, dtype=float)
    err = np.asarray(err, dtype=float)
    order = np.argsort(t)
    e = err[order]
    ok = np.isfinite(e) & (e > 0)
    if ok.sum() < 2:
        return np.array([], dtype=int)
    valid = order[ok]
    ev = err[valid]
    m = int(np.argmin(ev))
    start = int(np.argmax(ev[:m + 1]))  # a non-contractive start rises first (Grazzi §5)
    keep = [i for i in range(start, m + 1) if ev[i] > 2.0 * ev[m]]
    return valid[keep] if len(keep) >= 2 else np.array([], dtype=int)


def fit_rate(t: Sequence[float], err: Sequence[float]) -> float | None:
    """The observed linear rate r of ``err ≈ c·rᵗ``: exp of the least-squares slope of
    log err vs t over :func:`decreasing_part`; None with fewer than 2 such points."""
    idx = decreasing_part(t, err)
    if len(idx) < 2:
        return None
    x = np.asarray(t, dtype=float)[idx]
    y = np.log(np.asarray(err, dtype=float)[idx])
    slope = np.polyfit(x, y, 1)[0]
    return float(np.exp(slope))


@functools.lru_cache(maxsize=256)
def contraction_factor(problem: str, problem_params: str, seed: int,
                       pipeline_params: str = "{}") -> float | None:
    """q of Φ at the λ the hypergradient-error cell used, in numpy (no torch/jax).

    Rebuilds the problem's data like ``problems.make`` and binds it to the numpy ops
    (``Problem.contraction_factor`` only needs the float64 oracles).
    """
    try:
        from hypersweep import problems
        from hypersweep.pipelines.common import fixed_lam
        from hypersweep.problems.base import Problem
        params = json.loads(problem_params or "{}")
        merged = problems.check_params(problem, params)
        spec = problems.spec(problem)
        module = importlib.import_module(spec.impl)
        own = {k: v for k, v in merged.items() if k not in ("inner_lr", "w_init")}
        built = module.build(seed=int(seed), **own)
        if merged["inner_lr"] is not None:
            built.inner_lr = float(merged["inner_lr"])
        bound = Problem(spec, module, built, backend="numpy", dtype="float64",
                        seed=int(seed), params=params)
        lam = fixed_lam(bound, json.loads(pipeline_params or "{}"))
        return float(bound.contraction_factor(lam))
    except Exception as exc:  # a report must not die on one exotic problem
        log.warning("contraction factor of %s%s (seed %s) unavailable: %s", problem,
                    problem_params, seed, exc)
        return None


# ---------------------------------------------------------------------------------------
# Grouping helpers


def _problem_key(df: pd.DataFrame) -> pd.Series:
    """Panel label: the problem, with its params when a problem appears with several."""
    n_params = df.groupby("problem")["problem_params"].transform("nunique")
    return np.where(n_params > 1, df["problem"] + " " + df["problem_params"].fillna(""),
                    df["problem"])


def _problem_order(names: Iterable[str]) -> list[str]:
    names = sorted(set(names))
    rank = {p: i for i, p in enumerate(PAPER_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n.split(" ")[0], len(rank)), n))


def _line_labels(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of hypergradient-error results, each tagged with its line: (algorithm,
    K-setting ["K=t" or "K=<k>"], backend/dtype when several), from the ``K_setting``
    column. Outputs written before that column existed had one cell where a K = t line
    meets a fixed-K line (t = K); such a row is put on both lines."""
    df = df.copy()
    suffix = pd.Series("", index=df.index)
    for col in ("backend", "dtype"):
        if df[col].nunique() > 1:
            suffix = suffix + " [" + df[col].astype(str) + "]"
    k = df["K"]
    legacy = "K_setting" not in df.columns or bool(df["K_setting"].isna().all())
    is_t = (k.notna() & (k == df["t"])) if legacy else df["K_setting"].eq("t")
    df["k_setting"] = np.where(k.isna(), "", np.where(is_t, "K=t", "K=" + k.astype(
        "Int64").astype(str)))
    df["line"] = (df["algorithm"] + np.where(df["k_setting"] != "", " " + df["k_setting"], "")
                  + suffix)
    if not legacy:
        return df
    fixed = df[~is_t & k.notna()]
    extra = []
    for (panel, algo), group in fixed.groupby(["panel", "algorithm"]):
        ks = set(group["K"].astype(int))
        mask = (df["panel"] == panel) & (df["algorithm"] == algo) & is_t & df["K"].isin(ks)
        dup = df[mask].copy()
        if len(dup):
            dup["k_setting"] = "K=" + dup["K"].astype(int).astype(str)
            dup["line"] = dup["algorithm"] + " " + dup["k_setting"] + suffix[mask]
            extra.append(dup)
    return pd.concat([df, *extra], ignore_index=True) if extra else df


def _quantiles(values: np.ndarray) -> tuple[float, float, float]:
    return (float(np.quantile(values, 0.5)), float(np.quantile(values, BAND[0])),
            float(np.quantile(values, BAND[1])))


# ---------------------------------------------------------------------------------------
# Figure 1: hypergradient error vs t


def error_curves(results: pd.DataFrame, *, error: str = "hypergrad_rel_error") -> pd.DataFrame:
    """Median and 20–80 % band of ``error`` per (panel, line, t) over seeds (ok rows)."""
    df = results[(results["pipeline"] == ERROR_PIPELINE) & (results["status"] == "ok")]
    df = df[np.isfinite(df[error].astype(float)) & (df[error].astype(float) > 0)]
    if df.empty:
        return pd.DataFrame(columns=["panel", "line", "algorithm", "t", "median", "low",
                                     "high", "n"])
    df = df.assign(panel=_problem_key(df))
    df = _line_labels(df)
    rows = []
    for (panel, line, algo, t), g in df.groupby(["panel", "line", "algorithm", "t"]):
        med, lo, hi = _quantiles(g[error].to_numpy(float))
        rows.append(dict(panel=panel, line=line, algorithm=algo, t=int(t), median=med,
                         low=lo, high=hi, n=len(g)))
    return pd.DataFrame(rows).sort_values(["panel", "line", "t"]).reset_index(drop=True)


def rate_table(results: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """Per (panel, line): the fitted rate of the median curve and the median q."""
    df = results[(results["pipeline"] == ERROR_PIPELINE) & (results["status"] == "ok")]
    q_by_panel: dict[str, float | None] = {}
    if not df.empty:
        df = df.assign(panel=_problem_key(df))
        for panel, g in df.groupby("panel"):
            keys = g[["problem", "problem_params", "seed", "pipeline_params"]].drop_duplicates()
            qs = [contraction_factor(r.problem, r.problem_params or "{}", int(r.seed),
                                     r.pipeline_params or "{}") for r in keys.itertuples()]
            qs = [q for q in qs if q is not None]
            q_by_panel[panel] = float(np.median(qs)) if qs else None
    rows = []
    for (panel, line), g in curves.groupby(["panel", "line"], sort=False):
        rows.append(dict(problem=panel, line=line, rate=fit_rate(g["t"], g["median"]),
                         q=q_by_panel.get(panel), points=len(g)))
    return pd.DataFrame(rows, columns=["problem", "line", "rate", "q", "points"])


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value, spec)


def plot_error_vs_t(results: pd.DataFrame, *, error: str = "hypergrad_rel_error"):
    """Figure 1. Returns (figure, rates DataFrame); None figure when there is nothing."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = error_curves(results, error=error)
    rates = rate_table(results, curves)
    if curves.empty:
        return None, rates
    panels = _problem_order(curves["panel"].unique())
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
                    label=f"{line} (r={_fmt(r, '.3f')})")
            ax.fill_between(g["t"], g["low"], g["high"], color=colors[line], alpha=0.2,
                            linewidth=0)
        ax.set_yscale("log")
        ax.set_xlabel("t (inner steps)")
        ax.set_title(f"{panel}  (q = {_fmt(q_val, '.4f')})", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("relative hypergradient error" if error == "hypergrad_rel_error"
                          else "‖ĝ − ∇F‖")
    fig.tight_layout()
    return fig, rates


# ---------------------------------------------------------------------------------------
# Figure 2 and the comparison table: best val loss vs cost


def _method_frame(results: pd.DataFrame) -> pd.DataFrame:
    """hpo and blackbox result rows with a method label and kind."""
    df = results[results["pipeline"].isin([GRADIENT_PIPELINE, BLACKBOX_PIPELINE])].copy()
    if df.empty:
        return df.assign(panel=[], method=[], kind=[])
    df["panel"] = _problem_key(df)
    label = df["algorithm"].astype(str)
    label = label + np.where(df["K"].notna(), " K=" + df["K"].astype("Int64").astype(str), "")
    n_t = df.groupby(["panel", "pipeline", "algorithm"])["t"].transform("nunique")
    label = label + np.where(n_t > 1, " t=" + df["t"].astype(str), "")
    n_ap = df.groupby(["panel", "pipeline", "algorithm"])["algorithm_params"].transform(
        "nunique")
    label = label + np.where(n_ap > 1, " " + df["algorithm_params"].fillna(""), "")
    if df["backend"].nunique() > 1:
        label = label + " [" + df["backend"].astype(str) + "]"
    df["method"] = label
    df["kind"] = np.where(df["pipeline"] == GRADIENT_PIPELINE, "gradient", "black-box")
    return df


def _trace_curves(methods: pd.DataFrame, traces: pd.DataFrame) -> pd.DataFrame:
    """Trace rows of the method cells, with best_val_loss filled as the running minimum
    of the finite val losses where a pipeline left it empty."""
    if methods.empty or traces.empty:
        return pd.DataFrame(columns=["cell_id", "step", "wall_time_s", COST_AXIS,
                                     "best", "panel", "method", "kind", "seed"])
    tr = traces[traces["cell_id"].isin(methods["cell_id"])].copy()
    tr = tr.sort_values(["cell_id", "step"])
    val = tr["val_loss"].astype(float).where(np.isfinite(tr["val_loss"].astype(float)))
    running = val.groupby(tr["cell_id"]).cummin()
    best = tr["best_val_loss"].astype(float)
    tr["best"] = best.where(np.isfinite(best), running)
    tr[COST_AXIS] = oracle_calls(tr)
    meta = methods[["cell_id", "panel", "method", "kind", "seed"]]
    return tr.merge(meta, on="cell_id", how="inner")


#: the cost axis of the figures and tables: every oracle call (docs/costs.md)
COST_AXIS = "n_oracle_calls"
COST_LABEL = "oracle calls (gradients + Hessian-vector + cross products)"


def oracle_calls(df: pd.DataFrame) -> pd.Series:
    """``n_oracle_calls``; for rows written before that column existed, the sum of the
    counts they have (inner gradients + Hessian-vector products), which undercounts."""
    legacy = pd.Series(0.0, index=df.index)
    for col in ("n_inner_grad_evals", "n_hvp_evals"):
        if col in df.columns:
            legacy = legacy + df[col].astype(float).fillna(0.0)
    if COST_AXIS not in df.columns:
        return legacy
    return df[COST_AXIS].astype(float).fillna(legacy)


def _step_values(x: np.ndarray, y: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The step function "y of the last point with x ≤ g" on ``grid`` (NaN before)."""
    idx = np.searchsorted(x, grid, side="right") - 1
    out = np.where(idx >= 0, y[np.clip(idx, 0, None)], np.nan)
    return out


def best_curves(curves: pd.DataFrame, x: str, n_grid: int = 120) -> pd.DataFrame:
    """Median and 20–80 % band over seeds of best val loss vs ``x`` (wall_time_s or
    n_oracle_calls) per (panel, method), on a log grid; a point is drawn where at
    least half of the seeds have started."""
    rows = []
    for (panel, method, kind), g in curves.groupby(["panel", "method", "kind"]):
        per_cell = []
        for _, c in g.groupby("cell_id"):
            c = c[np.isfinite(c[x].astype(float)) & np.isfinite(c["best"].astype(float))]
            if len(c):
                per_cell.append((c[x].to_numpy(float), c["best"].to_numpy(float)))
        if not per_cell:
            continue
        lo = min(cx[cx > 0].min() if (cx > 0).any() else 1e-9 for cx, _ in per_cell)
        hi = max(cx.max() for cx, _ in per_cell)
        grid = np.geomspace(lo, max(hi, lo * 1.0001), n_grid)
        values = np.vstack([_step_values(cx, cy, grid) for cx, cy in per_cell])
        have = np.isfinite(values).sum(axis=0)
        for j, gx in enumerate(grid):
            if have[j] * 2 < len(per_cell) or have[j] == 0:
                continue
            col = values[:, j][np.isfinite(values[:, j])]
            med, qlo, qhi = _quantiles(col)
            rows.append(dict(panel=panel, method=method, kind=kind, x=float(gx),
                             median=med, low=qlo, high=qhi))
    return pd.DataFrame(rows, columns=["panel", "method", "kind", "x", "median", "low",
                                       "high"])


def plot_best_val(results: pd.DataFrame, traces: pd.DataFrame):
    """Figure 2: rows = problems, columns = (vs wall time, vs oracle calls).
    Returns the figure, or None when there are no hpo/blackbox traces."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _trace_curves(_method_frame(results), traces)
    if curves.empty:
        return None
    by_time = best_curves(curves, "wall_time_s")
    by_evals = best_curves(curves, COST_AXIS)
    panels = _problem_order(curves["panel"].unique())
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


def comparison_table(results: pd.DataFrame, traces: pd.DataFrame) -> pd.DataFrame:
    """Per (problem, method): seeds, final best val loss, test metric, wall time and
    oracle calls (medians over seeds), and the median time / oracle calls to reach within
    :data:`TARGET_REL` of the best val loss any method found on that seed's data."""
    methods = _method_frame(results)
    if not methods.empty:
        methods = methods.assign(**{COST_AXIS: oracle_calls(methods)})
    columns = ["problem", "method", "kind", "cells", "ok", "final_val_loss", "test_loss",
               "test_accuracy", "wall_time_s", COST_AXIS, "reached",
               "time_to_target_s", "calls_to_target"]
    if methods.empty:
        return pd.DataFrame(columns=columns)
    curves = _trace_curves(methods, traces)
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
    out["_order"] = out["problem"].map({p: i for i, p in enumerate(_problem_order(
        out["problem"]))})
    return out.sort_values(["_order", "final_val_loss"]).drop(columns="_order").reset_index(
        drop=True)


# ---------------------------------------------------------------------------------------
# The text summary printed after every study


def summary_table(table: Any) -> str:
    """One line per (problem, pipeline, algorithm): cells ok/failed, the median headline
    number (relative hypergradient error for ``hypergradient_error``, final val loss
    otherwise) over ok cells, and the median wall time; a pipeline column when the
    table mixes pipelines. ``table``: a pyarrow Table,
    DataFrame or list of result rows."""
    df = _as_frame(table)
    if df.empty:
        return "(no results)"
    several = df["pipeline"].nunique() > 1
    rank = {p: i for i, p in enumerate(_problem_order(df["problem"].unique()))}
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
            _fmt(float(values.median()) if len(values) else None, ".3e"),
            _fmt(float(walls.median()) if len(walls) else None, ".3g")))
    header = (("pipeline",) if several else ()) + (
        "problem", "algorithm", "ok/failed", "metric", "median", "wall s (median)")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(header, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# HTML, files, MLflow


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _html_table(df: pd.DataFrame) -> str:
    def cell(v):
        if isinstance(v, float):
            return _fmt(v)
        return "—" if v is None else html.escape(str(v))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>"
                   for row in df.astype(object).where(df.notna(), None).itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = ("body{font-family:sans-serif;max-width:1200px;margin:auto}"
        "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;"
        "padding:3px 8px;font-size:13px;text-align:right}th{background:#eee}"
        "img{max-width:100%}pre{background:#f6f6f6;padding:8px}")


def render_html(*, sources: Sequence[str], summary: str, images: dict[str, bytes],
                rates: pd.DataFrame, comparison: pd.DataFrame,
                tutorial: str | None = None) -> str:
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
    parts.append("</body></html>")
    return "\n".join(parts)


def _img(data: bytes, alt: str) -> str:
    return (f"<img alt='{html.escape(alt)}' src='data:image/png;base64,"
            f"{base64.b64encode(data).decode()}'>")


def build_report(dirs: Sequence[str | Path], out: str | Path, *,
                 error: str = "hypergrad_rel_error") -> dict:
    """Read ``dirs``, write the figures, CSVs and ``report.html`` to ``out``; return
    ``{"files": [...], "figures": {name: Figure}, "rates", "comparison", "summary"}``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, traces = read_outputs(dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures, images, files = {}, {}, []
    fig1, rates = plot_error_vs_t(results, error=error)
    fig2 = plot_best_val(results, traces)
    for name, fig in (("error_vs_t.png", fig1), ("best_val_vs_cost.png", fig2)):
        if fig is None:
            continue
        figures[name] = fig
        images[name] = _png(fig)
        (out / name).write_bytes(images[name])
        files.append(out / name)
        plt.close(fig)
    comparison = comparison_table(results, traces)
    summary = summary_table(results)
    for name, df in (("rates.csv", rates), ("comparison.csv", comparison)):
        if len(df):
            df.to_csv(out / name, index=False)
            files.append(out / name)
    tutorial = _tutorial_summary(results)
    if tutorial:
        (out / "tutorial_table.txt").write_text(tutorial, encoding="utf-8")
        files.append(out / "tutorial_table.txt")
    page = render_html(sources=[str(d) for d in dirs], summary=summary, images=images,
                       rates=rates, comparison=comparison, tutorial=tutorial)
    (out / "report.html").write_text(page, encoding="utf-8")
    files.append(out / "report.html")
    return {"files": files, "figures": figures, "rates": rates, "comparison": comparison,
            "summary": summary, "results": results, "tutorial": tutorial}


def _tutorial_summary(results: pd.DataFrame) -> str | None:
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


def _study_tracking(output_dir: Path, override: str | None) -> tuple[str | None, str, str]:
    """(tracking URI or None, experiment, study) from ``output_dir/study.yaml``."""
    import yaml
    raw = {}
    study_file = output_dir / "study.yaml"
    if study_file.is_file():
        raw = yaml.safe_load(study_file.read_text(encoding="utf-8")) or {}
    cfg = raw.get("mlflow") or {}
    study = raw.get("study") or output_dir.name
    if cfg.get("enabled") is False and not override:
        return None, study, study
    uri = override or cfg.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") \
        or "sqlite:///results/mlflow.db"
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):]).expanduser()
        if not path.is_absolute():  # relative to where the study ran: try cwd, then above
            candidates = [Path.cwd() / path, output_dir.parent / path.name,
                          output_dir / path.name]
            path = next((c for c in candidates if c.is_file()), candidates[0])
        if not path.is_file():
            log.warning("MLflow store %s not found; report not logged to MLflow", path)
            return None, study, study
        uri = "sqlite:///" + str(path.resolve())
    return uri, cfg.get("experiment") or study, study


def log_to_mlflow(dirs: Sequence[str | Path], files: Sequence[Path], *,
                  tracking_uri: str | None = None) -> list[str]:
    """Log ``files`` under ``report/`` of each study's MLflow parent run; returns the run
    ids logged to. Never raises: an unreachable store is a warning."""
    logged = []
    for directory in dirs:
        try:
            uri, experiment, study = _study_tracking(Path(directory), tracking_uri)
            if uri is None:
                continue
            from hypersweep.io.tracking import set_mlflow_env_defaults
            set_mlflow_env_defaults()
            from mlflow import MlflowClient
            client = MlflowClient(tracking_uri=uri)
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                log.warning("MLflow experiment %r not found at %s; report not logged",
                            experiment, uri)
                continue
            runs = client.search_runs(
                [exp.experiment_id],
                filter_string=f"tags.`hypersweep.study` = '{study}' and "
                              f"tags.`hypersweep.role` = 'parent'", max_results=10)
            if not runs:
                log.warning("no MLflow parent run tagged hypersweep.study=%r in %r; report "
                            "not logged", study, experiment)
                continue
            run_id = sorted(runs, key=lambda r: r.info.start_time or 0)[0].info.run_id
            for f in files:
                client.log_artifact(run_id, str(f), artifact_path="report")
            logged.append(run_id)
        except Exception as exc:  # MLflow is a view; the files are already written
            log.warning("could not log the report to MLflow for %s: %s", directory, exc)
    return logged


def main(argv: Sequence[str] | None = None) -> int:
    """``hypersweep report RESULTS_DIR... --out DIR [--mlflow-uri URI] [--no-mlflow]``."""
    parser = argparse.ArgumentParser(
        prog="hypersweep report",
        description="Figures, tables and an HTML page from study output directories.")
    parser.add_argument("results", nargs="+", help="study output directories")
    parser.add_argument("--out", required=True, help="directory for the report")
    parser.add_argument("--error", choices=("rel", "abs"), default="rel",
                        help="hypergradient error to plot (default: rel)")
    parser.add_argument("--mlflow-uri", default=None,
                        help="tracking URI (default: each study's study.yaml)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    args = parser.parse_args(argv)
    for d in args.results:
        if not Path(d).is_dir():
            sys.stderr.write(f"error: results directory {d!r} does not exist\n")
            return 2
    error = "hypergrad_rel_error" if args.error == "rel" else "hypergrad_abs_error"
    report = build_report(args.results, args.out, error=error)
    if report["results"].empty:
        log.warning("no result rows found in %s", ", ".join(args.results))
    if not args.no_mlflow:
        log_to_mlflow(args.results, report["files"], tracking_uri=args.mlflow_uri)
    if report.get("tutorial"):
        sys.stdout.write(report["tutorial"] + "\n")
    sys.stdout.write(f"report written to {Path(args.out) / 'report.html'}\n")
    return 0


__all__ = ["main", "build_report", "summary_table", "fit_rate", "decreasing_part",
           "plot_error_vs_t", "plot_best_val", "comparison_table", "error_curves",
           "rate_table", "contraction_factor", "read_output", "read_outputs",
           "log_to_mlflow", "render_html"]
