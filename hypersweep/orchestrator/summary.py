"""The end-of-run summary: statistics over a study's results and its two renderings
(:func:`format_summary`, plain text; :func:`print_summary`, rich tables for the CLI)."""
from __future__ import annotations

import json
import statistics
from collections import Counter
from typing import Any

from hypersweep.io.schema import STATUSES


def per_pair(table) -> list[dict]:
    """Cells, ok cells and medians of the ok cells per (problem, algorithm), an algorithm
    with a K setting split by it ("aid_cg K=t", "aid_cg K=10"). The error is the median
    at the group's largest t (``t_max``): the medians do not mix inner budgets. The val
    loss is the pipelines' ``val_loss``: F(λ_final) with the float64 oracle."""
    pairs: dict[tuple, dict[str, list]] = {}
    names = set(table.column_names)
    columns = ["problem", "algorithm", "status", "hypergrad_rel_error", "wall_time_s",
               "val_loss"] + [c for c in ("t", "K_setting", "pipeline") if c in names]
    for row in table.select(columns).to_pylist():
        algorithm = row["algorithm"]
        if row.get("K_setting") and row.get("pipeline") == "hypergradient_error":
            algorithm = f"{algorithm} K={row['K_setting']}"
        entry = pairs.setdefault((row["problem"], algorithm),
                                 {"rel": [], "wall": [], "val": [], "n": 0, "ok": 0})
        entry["n"] += 1
        if row["status"] == "ok":
            entry["ok"] += 1
            if row["hypergrad_rel_error"] is not None:
                entry["rel"].append((row.get("t") or 0, row["hypergrad_rel_error"]))
            if row["wall_time_s"] is not None:
                entry["wall"].append(row["wall_time_s"])
            if row["val_loss"] is not None:
                entry["val"].append(row["val_loss"])
    out = []
    for (p, a), e in sorted(pairs.items()):
        t_max = max((t for t, _ in e["rel"]), default=None)
        rel = [v for t, v in e["rel"] if t == t_max]
        out.append({"problem": p, "algorithm": a, "cells": e["n"], "ok": e["ok"],
                    "t_max": t_max if rel and "t" in names else None,
                    "median_rel_error": statistics.median(rel) if rel else None,
                    "median_val_loss": statistics.median(e["val"]) if e["val"] else None,
                    "median_wall_time_s": statistics.median(e["wall"]) if e["wall"]
                    else None})
    return out


def study_counts(table) -> dict[str, int]:
    """Cells per status over the whole study's latest rows."""
    counts = Counter(table.column("status").to_pylist())
    return {s: counts.get(s, 0) for s in STATUSES}


def compute_totals(table) -> dict:
    """Study-wide totals from the results: compute and compile seconds (so a reader sees
    what compilation cost beside the measured work), the compiles the persistent cache
    served (``extra.compile_cache_hits`` of ``extra.compile_cache_lookups``, over the rows
    that carry them, ok or not: a failed cell's compiles filled the cache too), and the
    cells whose estimate was an exact zero where ∇F ≠ 0 (``extra.zero_hypergradient``), by
    (problem, algorithm)."""
    compute = compile_s = 0.0
    compiled = hits = lookups = 0
    cache_rows = 0
    zero: Counter = Counter()
    for row in table.select(["problem", "algorithm", "status", "wall_time_s",
                             "compile_time_s", "extra"]).to_pylist():
        if row["extra"] and '"compile_cache_lookups"' in row["extra"]:
            extra = json.loads(row["extra"])
            hits += int(extra.get("compile_cache_hits") or 0)
            lookups += int(extra.get("compile_cache_lookups") or 0)
            cache_rows += 1
        if row["status"] != "ok":
            continue
        compute += row["wall_time_s"] or 0.0
        compile_s += row["compile_time_s"] or 0.0
        compiled += bool(row["compile_time_s"])
        if row["extra"] and '"zero_hypergradient":true' in row["extra"]:
            zero[(row["problem"], row["algorithm"])] += 1
    cache = {"hits": hits, "lookups": lookups} if cache_rows else None
    return {"compute_time_s": compute, "compile_time_s": compile_s, "cells_compiled": compiled,
            "compile_cache": cache,
            "zero_hypergradient": [{"problem": p, "algorithm": a, "cells": n}
                                   for (p, a), n in sorted(zero.items())]}


def zero_hypergradient_warning(summary: dict) -> str | None:
    """One line about exact-zero estimates (e.g. first_order where L_out has no direct λ
    term), or None."""
    zero = summary.get("zero_hypergradient") or []
    if not zero:
        return None
    where = ", ".join(f"{z['algorithm']} on {z['problem']} ({z['cells']} cells)" for z in zero)
    return (f"warning: exact zero hypergradient where ∇F ≠ 0: {where}; the estimate has no "
            "term for this problem (e.g. first_order when L_out has no direct λ term)")


def _compile_line(summary: dict) -> str:
    return (f"compute {summary['compute_time_s']:.1f} s, compile "
            f"{summary['compile_time_s']:.1f} s ({summary['cells_compiled']} cells paid a "
            "compile")


def compile_cache_line(summary: dict) -> str | None:
    """How many XLA compiles the persistent compilation cache served, or None when no row
    says (torch only, or the cache off)."""
    cache = summary.get("compile_cache")
    if not cache:
        return None
    share = f" ({cache['hits'] / cache['lookups']:.0%})" if cache["lookups"] else ""
    return (f"compile cache: {cache['hits']} of {cache['lookups']} XLA compiles were "
            f"cache hits{share}")


def batch_line(summary: dict) -> str | None:
    """How many tasks carried the cells sent, when some carried several (batches), or
    None."""
    mean = summary.get("mean_batch_size")
    if not mean or mean <= 1:
        return None
    return (f"batches: {summary['batches']} tasks sent, {mean:.1f} cells per task on "
            "average")


def _mlflow_line(mlflow: dict) -> str:
    state = f"unavailable ({mlflow['error']})" if mlflow["error"] else "ok"
    return (f"mlflow {state}: {mlflow['cells_logged']} cells logged to "
            f"{mlflow['tracking_uri']} (experiment {mlflow['experiment']})")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_summary(summary: dict) -> str:
    """A short plain-text table: counts by status, then per (problem, algorithm) medians."""
    lines = [f"study {summary['study']}: {summary['cells_done']} cells run, "
             f"{summary['cells_skipped']} skipped (done before), "
             f"{summary['wall_time_s']:.1f} s; results in {summary['results_dir']}"]
    counts = summary["study_counts"]
    lines.append("status   " + "  ".join(f"{s} {counts[s]}" for s in STATUSES))
    if "compute_time_s" in summary:
        lines.append(f"time     {_compile_line(summary)}; the others reused compiled "
                     "functions)")
        if compile_cache_line(summary):
            lines.append(f"cache    {compile_cache_line(summary)}")
    if batch_line(summary):
        lines.append(f"tasks    {batch_line(summary)}")
    if summary["per_pair"]:
        width = max(len(f"{p['problem']} × {p['algorithm']}") for p in summary["per_pair"])
        lines.append(f"{'problem × algorithm':<{width}}  cells    ok  t_max  "
                     f"median rel err at t_max  median wall s")
        for pair in summary["per_pair"]:
            lines.append(f"{pair['problem'] + ' × ' + pair['algorithm']:<{width}}  "
                         f"{pair['cells']:5d} {pair['ok']:5d}  "
                         f"{_fmt(pair.get('t_max'), 'd'):>5}  "
                         f"{_fmt(pair['median_rel_error'], '.3e'):>23}  "
                         f"{_fmt(pair['median_wall_time_s'], '.4f'):>13}")
    warning = zero_hypergradient_warning(summary)
    if warning:
        lines.append(warning)
    if summary.get("mlflow"):
        lines.append(_mlflow_line(summary["mlflow"]))
    return "\n".join(lines)


def print_summary(summary: dict, console: Any = None) -> None:
    """The summary as rich tables (the CLI's end-of-run display)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()

    def say(text: str) -> None:  # as written: a path's "[b]" is not rich markup
        console.print(text, markup=False, highlight=False)

    say(format_summary(summary).splitlines()[0])
    table = Table(title="status")
    for status in STATUSES:
        table.add_column(status, justify="right")
    table.add_row(*(str(summary["study_counts"][s]) for s in STATUSES))
    console.print(table)
    if summary["per_pair"]:
        pairs = Table(title="per (problem, algorithm), ok cells")
        for column in ("problem", "algorithm", "cells", "ok", "t_max",
                       "median rel error at t_max", "median val loss F(λ_final)",
                       "median wall s"):
            pairs.add_column(column, justify="left" if column in ("problem", "algorithm")
                             else "right")
        for pair in summary["per_pair"]:
            pairs.add_row(pair["problem"], pair["algorithm"], str(pair["cells"]),
                          str(pair["ok"]), _fmt(pair.get("t_max"), "d"),
                          _fmt(pair["median_rel_error"], ".3e"),
                          _fmt(pair.get("median_val_loss"), ".5g"),
                          _fmt(pair["median_wall_time_s"], ".4f"))
        console.print(pairs)
    if "compute_time_s" in summary:
        say(_compile_line(summary) + ")")
        if compile_cache_line(summary):
            say(compile_cache_line(summary))
    if batch_line(summary):
        say(batch_line(summary))
    warning = zero_hypergradient_warning(summary)
    if warning:
        say(warning)
    if summary.get("mlflow"):
        say(_mlflow_line(summary["mlflow"]))
