"""The numbers behind the report: error curves and their rates, contraction factors, the
best-val-loss-vs-cost and ‖∇F‖²-vs-cost curves of HPO and black-box cells.

Everything here works on the result and trace DataFrames of :mod:`.reading` and
returns DataFrames or numbers; nothing draws or writes.
"""
from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from hypersweep import problems
from hypersweep.pipelines.common import study_lam
from hypersweep.problems.base import contraction_factor as contraction_factor_of

log = logging.getLogger(__name__)

#: Grazzi et al. 2020's panel order; other problems follow alphabetically
PAPER_ORDER = ("logreg", "kernel_ridge", "biased_reg", "hyper_rep")
BAND = (0.2, 0.8)
#: "within 1 % of the best val loss found by any method"
TARGET_REL = 0.01
GRADIENT_PIPELINE, BLACKBOX_PIPELINE, ERROR_PIPELINE = "hpo", "blackbox", "hypergradient_error"
#: the cost axis of the figures and tables: every oracle call (docs/costs.md)
COST_AXIS = "n_oracle_calls"
#: the stationarity target of the solver table: ‖∇F(λ_k)‖² ≤ GRAD_SQ_TARGET·‖∇F(λ₀)‖²
GRAD_SQ_TARGET = 1e-3


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
    """q of Φ at the λ the hypergradient-error cell used.

    The cell's instance is the one every backend builds from (problem, params, seed):
    :func:`hypersweep.problems.build`'s float64 numpy data, so q needs neither torch nor
    JAX (q is the same for every backend and dtype). None, with a warning, when the
    instance cannot be built or has no Hessian; a missing module is an error, not a
    warning.
    """
    try:
        _, module, built = problems.build(problem, seed=int(seed),
                                          **json.loads(problem_params or "{}"))
        lam = study_lam(built.lam0, json.loads(pipeline_params or "{}"))
        if lam.shape != np.shape(built.lam0):
            raise ValueError(f"lam has shape {lam.shape}, λ has {np.shape(built.lam0)}")
        return contraction_factor_of(module, built, lam)
    except ImportError:
        raise
    except Exception as exc:  # a report must not die on one exotic problem
        log.warning("contraction factor of %s%s (seed %s) unavailable: %s", problem,
                    problem_params, seed, exc)
        return None


# ---------------------------------------------------------------------------------------
# Grouping


def problem_key(df: pd.DataFrame) -> pd.Series:
    """Panel label: the problem, with its params when a problem appears with several."""
    n_params = df.groupby("problem")["problem_params"].transform("nunique")
    return np.where(n_params > 1, df["problem"] + " " + df["problem_params"].fillna(""),
                    df["problem"])


def problem_order(names: Iterable[str]) -> list[str]:
    """Panel labels in :data:`PAPER_ORDER`, then alphabetically."""
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


#: median, then the band's ends (one np.quantile call computes the three)
_LEVELS = (0.5, BAND[0], BAND[1])


def _quantiles(values: np.ndarray) -> tuple[float, float, float]:
    med, lo, hi = np.quantile(values, _LEVELS)
    return float(med), float(lo), float(hi)


# ---------------------------------------------------------------------------------------
# Hypergradient error vs t


def error_curves(results: pd.DataFrame, *, error: str = "hypergrad_rel_error") -> pd.DataFrame:
    """Median and 20–80 % band of ``error`` per (panel, line, t) over seeds (ok rows)."""
    df = results[(results["pipeline"] == ERROR_PIPELINE) & (results["status"] == "ok")]
    df = df[np.isfinite(df[error].astype(float)) & (df[error].astype(float) > 0)]
    if df.empty:
        return pd.DataFrame(columns=["panel", "line", "algorithm", "t", "median", "low",
                                     "high", "n", "backend", "k_setting", "wall_time_s",
                                     COST_AXIS])
    df = df.assign(panel=problem_key(df))
    df = _line_labels(df)
    df = df.assign(**{COST_AXIS: oracle_calls(df)})
    rows = []
    for (panel, line, algo, t), g in df.groupby(["panel", "line", "algorithm", "t"]):
        med, lo, hi = _quantiles(g[error].to_numpy(float))
        rows.append(dict(panel=panel, line=line, algorithm=algo, t=int(t), median=med,
                         low=lo, high=hi, n=len(g), backend=str(g["backend"].iloc[0]),
                         k_setting=str(g["k_setting"].iloc[0]),
                         wall_time_s=_median(g["wall_time_s"]),
                         **{COST_AXIS: _median(g[COST_AXIS])}))
    return pd.DataFrame(rows).sort_values(["panel", "line", "t"]).reset_index(drop=True)


def _median(values: pd.Series) -> float:
    """The median of the finite values (NaN when none): a line's cost at one t."""
    v = pd.to_numeric(values, errors="coerce").to_numpy(float)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if len(v) else float("nan")


def rate_table(results: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """Per (panel, line): the fitted rate of the median curve and the median q."""
    df = results[(results["pipeline"] == ERROR_PIPELINE) & (results["status"] == "ok")]
    q_by_panel: dict[str, float | None] = {}
    if not df.empty:
        df = df.assign(panel=problem_key(df))
        for panel, g in df.groupby("panel"):
            keys = g[["problem", "problem_params", "seed",
                      "pipeline_params"]].drop_duplicates()
            qs = [contraction_factor(r.problem, r.problem_params or "{}", int(r.seed),
                                     r.pipeline_params or "{}")
                  for r in keys.itertuples()]
            qs = [q for q in qs if q is not None]
            q_by_panel[panel] = float(np.median(qs)) if qs else None
    rows = []
    for (panel, line), g in curves.groupby(["panel", "line"], sort=False):
        rows.append(dict(problem=panel, line=line, rate=fit_rate(g["t"], g["median"]),
                         q=q_by_panel.get(panel), points=len(g)))
    return pd.DataFrame(rows, columns=["problem", "line", "rate", "q", "points"])


# ---------------------------------------------------------------------------------------
# Best val loss vs cost


def method_frame(results: pd.DataFrame) -> pd.DataFrame:
    """hpo and blackbox result rows with a method label and kind."""
    df = results[results["pipeline"].isin([GRADIENT_PIPELINE, BLACKBOX_PIPELINE])].copy()
    if df.empty:
        return df.assign(panel=[], method=[], kind=[])
    df["panel"] = problem_key(df)
    label = df["algorithm"].astype(str)
    label = label + np.where(df["K"].notna(), " K=" + df["K"].astype("Int64").astype(str), "")
    n_t = df.groupby(["panel", "pipeline", "algorithm"])["t"].transform("nunique")
    label = label + np.where(n_t > 1, " t=" + df["t"].astype(str), "")
    n_ap = df.groupby(["panel", "pipeline", "algorithm"])["algorithm_params"].transform(
        "nunique")
    label = label + np.where(n_ap > 1, " " + df["algorithm_params"].fillna(""), "")
    # the same algorithm with other pipeline_params (per-algorithm overrides, or several
    # studies in one report) is another method, not more seeds of one
    n_pp = df.groupby(["panel", "pipeline", "algorithm"])["pipeline_params"].transform(
        "nunique")
    label = label + np.where(n_pp > 1, " " + df["pipeline_params"].fillna(""), "")
    if df["backend"].nunique() > 1:
        label = label + " [" + df["backend"].astype(str) + "]"
    df["method"] = label
    df["kind"] = np.where(df["pipeline"] == GRADIENT_PIPELINE, "gradient", "black-box")
    return df


def trace_curves(methods: pd.DataFrame, traces: pd.DataFrame) -> pd.DataFrame:
    """Trace rows of the method cells, with best_val_loss filled as the running minimum
    of the finite val losses where a pipeline left it empty, and ``grad_sq`` =
    ``outer_grad_norm``² (NaN where a row has none: outputs from before that column, a
    non-finite λ)."""
    if methods.empty or traces.empty:
        return pd.DataFrame(columns=["cell_id", "step", "wall_time_s", COST_AXIS,
                                     "best", "grad_sq", "panel", "method", "kind", "seed"])
    tr = traces[traces["cell_id"].isin(methods["cell_id"])].copy()
    tr = tr.sort_values(["cell_id", "step"])
    val = tr["val_loss"].astype(float).where(np.isfinite(tr["val_loss"].astype(float)))
    running = val.groupby(tr["cell_id"]).cummin()
    best = tr["best_val_loss"].astype(float)
    tr["best"] = best.where(np.isfinite(best), running)
    tr["grad_sq"] = (tr["outer_grad_norm"].astype(float) ** 2 if "outer_grad_norm" in tr
                     else np.nan)
    tr[COST_AXIS] = oracle_calls(tr)
    meta = methods[["cell_id", "panel", "method", "kind", "seed"]]
    return tr.merge(meta, on="cell_id", how="inner")


def test_curves(curves: pd.DataFrame, x: str, metric: str, n_grid: int = 120
                ) -> pd.DataFrame:
    """Median and 20–80 % band over seeds of a test metric (``test_loss`` or
    ``test_accuracy``) vs ``x`` per (panel, method): for a gradient method the metric at
    its iterate (w_k, λ_k) of each evaluation; for a black-box searcher the metric of the
    best trial so far (the λ its user would pick by validation loss), so both read as
    "what the method offers at this time"."""
    if curves.empty or metric not in curves:
        return quantile_curves(curves.assign(**{metric: []}) if curves.empty else curves,
                               x, metric, n_grid=n_grid)
    out = []
    for cell_id, c in curves.sort_values(["cell_id", "step"]).groupby("cell_id", sort=False):
        c = c.copy()
        value = pd.to_numeric(c[metric], errors="coerce")
        if (c["kind"] == "black-box").all():
            val = c["val_loss"].astype(float).where(np.isfinite(c["val_loss"].astype(float)))
            best_pos = val.expanding().apply(lambda v: np.nanargmin(v) if np.isfinite(
                v).any() else np.nan, raw=True)
            value = pd.Series([value.iloc[int(p)] if np.isfinite(p) else np.nan
                               for p in best_pos], index=c.index)
        c["_metric"] = value.astype(float)
        out.append(c)
    frame = pd.concat(out) if out else curves.assign(_metric=[])
    return quantile_curves(frame, x, "_metric", n_grid=n_grid, positive_x=True)


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
    return np.where(idx >= 0, y[np.clip(idx, 0, None)], np.nan)


def best_curves(curves: pd.DataFrame, x: str, n_grid: int = 120) -> pd.DataFrame:
    """Median and 20–80 % band over seeds of best val loss vs ``x`` (wall_time_s or
    n_oracle_calls) per (panel, method), on a log grid; a point is drawn where at
    least half of the seeds have started."""
    return quantile_curves(curves, x, "best", n_grid=n_grid)


def grad_norm_curves(curves: pd.DataFrame, x: str, n_grid: int = 120) -> pd.DataFrame:
    """Median and 20–80 % band over seeds of ‖∇F(λ)‖² (``grad_sq``) vs ``x`` per (panel,
    method), on a log grid. Rows at x ≤ 0 are dropped (a solver's step 0 at λ₀ costs
    nothing and has no place on a log axis; an estimator's first row already paid its
    first step), so each cell's curve starts at its first evaluation with x > 0."""
    return quantile_curves(curves, x, "grad_sq", n_grid=n_grid, positive_x=True)


def quantile_curves(curves: pd.DataFrame, x: str, y: str, *, n_grid: int = 120,
                    positive_x: bool = False) -> pd.DataFrame:
    """Median and 20–80 % band over a (panel, method)'s cells of the step function "``y``
    of the cell's last row with ``x`` ≤ g" on a log grid g of ``x`` spanning every
    cell's rows; a grid point is drawn where at least half of the cells have a value
    (each cell's last value holds to the grid's end). Rows with a non-finite x or y are
    dropped, and with ``positive_x`` those with x ≤ 0 too."""
    rows = []
    for (panel, method, kind), g in curves.groupby(["panel", "method", "kind"]):
        per_cell = []
        for _, c in g.groupby("cell_id"):
            cx = c[x].to_numpy(float)
            cy = c[y].to_numpy(float)
            keep = np.isfinite(cx) & np.isfinite(cy) & ((cx > 0) if positive_x else True)
            if keep.any():
                order = np.argsort(cx[keep], kind="stable")
                per_cell.append((cx[keep][order], cy[keep][order]))
        if not per_cell:
            continue
        lo = min(cx[cx > 0].min() if (cx > 0).any() else 1e-9 for cx, _ in per_cell)
        hi = max(cx.max() for cx, _ in per_cell)
        grid = np.geomspace(lo, max(hi, lo * 1.0001), n_grid)
        values = np.vstack([_step_values(cx, cy, grid) for cx, cy in per_cell])
        have = np.isfinite(values).sum(axis=0)
        drawn = (have * 2 >= len(per_cell)) & (have > 0)
        if not drawn.any():
            continue
        # every drawn grid point at once: NaN (a cell not started yet) left out per point
        med, qlo, qhi = np.nanquantile(values[:, drawn], _LEVELS, axis=0)
        rows += [dict(panel=panel, method=method, kind=kind, x=float(gx), median=float(m),
                      low=float(a), high=float(b))
                 for gx, m, a, b in zip(grid[drawn], med, qlo, qhi)]
    return pd.DataFrame(rows, columns=["panel", "method", "kind", "x", "median", "low",
                                       "high"])
