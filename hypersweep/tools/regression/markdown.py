"""The regression gate's markdown report: verdict, what was compared, one table per kind
of change."""
from __future__ import annotations

from collections.abc import Sequence

from hypersweep.tools.regression.rules import (
    ERROR_COLUMN,
    CellChange,
    Comparison,
    TimeChange,
)

#: rows shown per markdown table; the rest is summarized in one line
MAX_TABLE_ROWS = 200


def _md_table(header: Sequence[str], rows: list[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows[:MAX_TABLE_ROWS]:
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    if len(rows) > MAX_TABLE_ROWS:
        lines.append(f"\n… and {len(rows) - MAX_TABLE_ROWS} more.")
    return lines


def _cell_rows(changes: list[CellChange]) -> list[tuple]:
    return [(f"`{c.cell_id}`", c.problem, c.algorithm, c.backend, c.what, c.baseline, c.now)
            for c in changes]


def _time_rows(changes: list[TimeChange]) -> list[tuple]:
    return [(c.problem, c.algorithm, f"{c.normalized_ratio:.2f}×", f"{c.median_ratio:.2f}×",
             f"{c.baseline_median_s * 1e3:.2f}", f"{c.now_median_s * 1e3:.2f}", c.n_cells)
            for c in changes]


def render_markdown(comparison: Comparison, *, suite: str = "", baseline: str = "",
                    run_dir: str = "", baseline_info: dict | None = None,
                    n_cells: int | None = None) -> str:
    """The report: verdict, what was compared, then one table per kind of change."""
    tol = comparison.tolerances
    verdict = "FAILED" if comparison.failed else "passed"
    lines = [f"# Regression gate: {verdict}", ""]
    if suite or baseline:
        lines.append(f"- suite `{suite}`" + (f" ({n_cells} cells)" if n_cells is not None
                                              else "") + f"; results in `{run_dir}`")
        info = baseline_info or {}
        made = ", ".join(f"{k} {info[k]}" for k in ("created_at", "hostname",
                                                     "hypersweep_version") if info.get(k))
        lines.append(f"- baseline `{baseline}`" + (f" ({made})" if made else ""))
    lines.append(f"- {comparison.n_compared} cells compared; {len(comparison.regressions)} "
                 f"regression(s), {len(comparison.improvements)} improvement(s), "
                 f"{len(comparison.new_cells)} new, {len(comparison.missing_cells)} missing")
    lines.append(f"- error rule: fail if `{ERROR_COLUMN}` > max(base·(1+{tol.rtol:g}), "
                 f"base+{tol.atol:g}); status ok → anything else fails")
    if comparison.suite_time_ratio is not None:
        lines.append(f"- time: this run / baseline, median over all cells = "
                     f"{comparison.suite_time_ratio:.2f}× (per-(problem, algorithm) medians "
                     f"are divided by it; flagged above {tol.slowdown:g}×, "
                     f"{'failing' if tol.fail_on_slowdown else 'not failing'})")
    lines.append("")
    header = ["cell_id", "problem", "algorithm", "backend", "what", "baseline", "now"]
    time_header = ["problem", "algorithm", "normalized", "raw median ratio",
                   "baseline median ms", "now median ms", "cells"]
    lines += [f"## Regressions ({len(comparison.regressions)})", ""]
    lines += _md_table(header, _cell_rows(comparison.regressions)) \
        if comparison.regressions else ["None."]
    lines += ["", f"## Improvements ({len(comparison.improvements)})", ""]
    lines += _md_table(header, _cell_rows(comparison.improvements)) \
        if comparison.improvements else ["None."]
    lines += ["", f"## Slowdowns ({len(comparison.slowdowns)}"
              f"{', failing' if tol.fail_on_slowdown and comparison.slowdowns else ''})", ""]
    lines += _md_table(time_header, _time_rows(comparison.slowdowns)) \
        if comparison.slowdowns else ["None."]
    lines += ["", f"## Speedups ({len(comparison.speedups)})", ""]
    lines += _md_table(time_header, _time_rows(comparison.speedups)) \
        if comparison.speedups else ["None."]
    if comparison.missing_cells:
        lines += ["", f"## Missing cells ({len(comparison.missing_cells)}, failing)", "",
                  "In the baseline but not produced by this run. If the suite changed on "
                  "purpose, rerun with `--update-baseline` and commit the new baseline.", ""]
        lines += [f"- `{c}`" for c in comparison.missing_cells[:MAX_TABLE_ROWS]]
    if comparison.new_cells:
        lines += ["", f"## New cells ({len(comparison.new_cells)}, not compared)", ""]
        lines += [f"- `{c}`" for c in comparison.new_cells[:MAX_TABLE_ROWS]]
    return "\n".join(lines) + "\n"
