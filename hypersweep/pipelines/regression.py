"""The regression gate: run a fixed suite, compare every cell with a stored baseline.

``hypersweep regress --suite configs/regression.yaml --baseline benchmarks/baseline.parquet``
runs the suite (a normal study file: every hypergradient algorithm × backend on small
instances of every problem, pipeline ``hypergradient_error``, float64), then compares each
cell with the baseline row of the same ``cell_id``:

* **accuracy** — a cell regresses when ``err_new > max(err_base·(1+rtol), err_base+atol)``
  (``err`` = ``hypergrad_rel_error``): ``rtol`` absorbs platform round-off propagated through
  t inner steps, ``atol`` the noise of errors already at the float64 floor. It improves when
  the same holds with the roles swapped.
* **status** — ``ok`` in the baseline and anything else now is a regression; the reverse an
  improvement.
* **time** — per (problem, algorithm): the median over its cells of
  ``(t_new + floor)/(t_base + floor)`` (``wall_time_s``; ``floor`` damps sub-millisecond
  noise), divided by the median of that ratio over the whole suite (so a machine that is
  uniformly 2× slower flags nothing). Above ``slowdown`` it is flagged; it fails the gate
  only with ``--fail-on-slowdown``.
* **coverage** — cells in the suite but not the baseline are listed (nothing to compare);
  baseline cells the run did not produce fail the gate (the suite changed without a new
  baseline, or cells went missing).

It prints a markdown report (also written to ``--report``) and returns 1 when the gate
fails, 0 otherwise, 2 on bad input. ``--update-baseline`` writes the run as the new
baseline (after reporting against the old one, if any) and returns 0.

Execution: by default the cells run **in this process**, one after another, through the
same :func:`~hypersweep.orchestrator.cell.run_cell` the Ray actors call. On 2 CPUs that is
faster than Ray (no ~5 s start, no per-actor torch/jax import and JIT compile: the suite is
dominated by first-call compilation, which one process pays once per shape), its timings
are not perturbed by a neighbour actor, and the tests can swap an algorithm's
implementation in the registry. ``--address ADDR`` (or ``--executor ray``) runs it through
the normal driver on a Ray cluster instead (``ray job submit ... -- hypersweep regress ...
--address auto``). Either way the rows land in a fresh ``<output>/run-<UTC time>`` study
directory (``hypersweep status`` reads it) and the cell_ids are the same.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import platform
import socket
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from hypersweep import __version__
from hypersweep.io.schema import RESULT_SCHEMA

log = logging.getLogger(__name__)

DEFAULT_SUITE = "configs/regression.yaml"
DEFAULT_BASELINE = "benchmarks/baseline.parquet"
ERROR_COLUMN = "hypergrad_rel_error"
TIME_COLUMN = "wall_time_s"
BASELINE_METADATA_KEY = b"hypersweep.baseline"
#: columns a baseline must have to be compared
REQUIRED_COLUMNS = ("cell_id", "problem", "algorithm", "backend", "status", ERROR_COLUMN,
                    TIME_COLUMN)
#: rows shown per markdown table; the rest is summarized in one line
MAX_TABLE_ROWS = 200


class GateInputError(ValueError):
    """Bad command-line input or an unreadable suite/baseline: one line, exit 2."""


# ---------------------------------------------------------------------------------------
# Comparison (pure: pyarrow tables in, dataclasses out; no backend, no Ray)


@dataclass(frozen=True)
class Tolerances:
    """When a cell counts as worse. See the module docstring for the rules.

    ``rtol`` 1 %: float64 round-off differences between machines/BLAS builds, carried
    through t ≤ a few hundred steps of a contraction, stay below 1e-10 relative; a wrong
    update or a changed default moves the error by far more than 1 %. ``atol`` 1e-10
    (in units of the relative error): below it an error sits at the float64 floor, where
    relative changes mean nothing. ``time_floor_s`` 10 ms is added to both times before
    dividing: most suite cells take 1–20 ms, and on a loaded box one preemption turns
    2 ms into 7 ms. ``slowdown`` 2.0: unchanged code re-run on a 2-core machine shared
    with other jobs gave normalized group ratios from 0.38× to 1.53× with that floor, so
    2× is the smallest change that is not noise there (a lost JIT, an O(n) → O(n²) slip
    are 10×).
    """

    rtol: float = 0.01
    atol: float = 1e-10
    slowdown: float = 2.0
    time_floor_s: float = 0.01
    fail_on_slowdown: bool = False

    def __post_init__(self):
        for name in ("rtol", "atol", "time_floor_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise GateInputError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.slowdown, (int, float)) and self.slowdown > 1
                and math.isfinite(self.slowdown)):
            raise GateInputError(f"slowdown must be a number > 1, got {self.slowdown!r}")

    def worse(self, new: float, base: float) -> bool:
        """Whether error ``new`` exceeds ``base`` beyond both tolerances (NaN is worse)."""
        if math.isnan(new):
            return not math.isnan(base)
        return new > max(base * (1.0 + self.rtol), base + self.atol)


@dataclass(frozen=True)
class CellChange:
    """One cell that got worse (or better): its status or its hypergradient error."""

    cell_id: str
    problem: str
    algorithm: str
    backend: str
    what: str                 # "error" or "status"
    baseline: str
    now: str


@dataclass(frozen=True)
class TimeChange:
    """Per (problem, algorithm): median time ratio, normalized by the suite's median."""

    problem: str
    algorithm: str
    normalized_ratio: float
    median_ratio: float
    baseline_median_s: float
    now_median_s: float
    n_cells: int


@dataclass
class Comparison:
    tolerances: Tolerances
    n_compared: int = 0
    regressions: list[CellChange] = field(default_factory=list)
    improvements: list[CellChange] = field(default_factory=list)
    slowdowns: list[TimeChange] = field(default_factory=list)
    speedups: list[TimeChange] = field(default_factory=list)
    new_cells: list[str] = field(default_factory=list)
    missing_cells: list[str] = field(default_factory=list)
    suite_time_ratio: float | None = None

    @property
    def failed(self) -> bool:
        return bool(self.regressions or self.missing_cells
                    or (self.tolerances.fail_on_slowdown and self.slowdowns))

    def regressed_cell_ids(self) -> list[str]:
        return [change.cell_id for change in self.regressions]


def _rows_by_id(table: pa.Table) -> dict[str, dict]:
    columns = {name: table.column(name).to_pylist() for name in REQUIRED_COLUMNS}
    return {cell_id: {name: columns[name][i] for name in REQUIRED_COLUMNS}
            for i, cell_id in enumerate(columns["cell_id"])}


def _fmt_error(value) -> str:
    return "—" if value is None else f"{value:.3e}"


def _as_float(value) -> float:
    return float("nan") if value is None else float(value)


def compare(baseline: pa.Table, current: pa.Table,
            tolerances: Tolerances = Tolerances()) -> Comparison:
    """Compare the ``current`` run with the ``baseline`` cell by cell (by ``cell_id``).

    Both are result tables with at most one row per cell (``parquet.read_results``). Cost:
    O(cells) Python work, no backend imported.
    """
    for name, table in (("baseline", baseline), ("current results", current)):
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise GateInputError(f"the {name} lack the column(s) {', '.join(missing)}; "
                                 "expected hypersweep result rows")
    base, now = _rows_by_id(baseline), _rows_by_id(current)
    result = Comparison(tolerances=tolerances)
    result.new_cells = sorted(set(now) - set(base))
    result.missing_cells = sorted(set(base) - set(now))
    common = sorted(set(base) & set(now))
    result.n_compared = len(common)
    ratios: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for cell_id in common:
        b, n = base[cell_id], now[cell_id]
        key = dict(cell_id=cell_id, problem=n["problem"], algorithm=n["algorithm"],
                   backend=n["backend"])
        if b["status"] == "ok" and n["status"] != "ok":
            result.regressions.append(CellChange(**key, what="status", baseline="ok",
                                                 now=str(n["status"])))
            continue
        if b["status"] != "ok" and n["status"] == "ok":
            result.improvements.append(CellChange(**key, what="status",
                                                  baseline=str(b["status"]), now="ok"))
            continue
        if b["status"] != "ok":
            continue  # failing before and now: nothing to compare
        err_b, err_n = _as_float(b[ERROR_COLUMN]), _as_float(n[ERROR_COLUMN])
        if tolerances.worse(err_n, err_b):
            result.regressions.append(CellChange(**key, what="error",
                                                 baseline=_fmt_error(b[ERROR_COLUMN]),
                                                 now=_fmt_error(n[ERROR_COLUMN])))
        elif tolerances.worse(err_b, err_n):
            result.improvements.append(CellChange(**key, what="error",
                                                  baseline=_fmt_error(b[ERROR_COLUMN]),
                                                  now=_fmt_error(n[ERROR_COLUMN])))
        t_b, t_n = b[TIME_COLUMN], n[TIME_COLUMN]
        if t_b is not None and t_n is not None and t_b >= 0 and t_n >= 0:
            floor = tolerances.time_floor_s
            ratio = (t_n + floor) / (t_b + floor)
            ratios.setdefault((n["problem"], n["algorithm"]), []).append((ratio, t_b, t_n))
    _compare_times(result, ratios)
    return result


def _compare_times(result: Comparison, ratios: dict) -> None:
    every = [r for group in ratios.values() for r, _, _ in group]
    if not every:
        return
    overall = statistics.median(every)
    result.suite_time_ratio = overall
    threshold = result.tolerances.slowdown
    for (problem, algorithm), group in sorted(ratios.items()):
        median_ratio = statistics.median(r for r, _, _ in group)
        change = TimeChange(problem, algorithm, median_ratio / overall, median_ratio,
                            statistics.median(b for _, b, _ in group),
                            statistics.median(n for _, _, n in group), len(group))
        if change.normalized_ratio > threshold:
            result.slowdowns.append(change)
        elif change.normalized_ratio < 1.0 / threshold:
            result.speedups.append(change)
    result.slowdowns.sort(key=lambda c: -c.normalized_ratio)
    result.speedups.sort(key=lambda c: c.normalized_ratio)


# ---------------------------------------------------------------------------------------
# Markdown


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


# ---------------------------------------------------------------------------------------
# Baseline file


def read_baseline(path: str | Path) -> tuple[pa.Table, dict]:
    """The baseline rows and the metadata stored with them (who made it, when, versions)."""
    path = Path(path)
    if not path.is_file():
        raise GateInputError(f"baseline {str(path)!r} not found; create it with "
                             "--update-baseline")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise GateInputError(f"cannot read baseline {str(path)!r}: {exc}") from None
    raw = (table.schema.metadata or {}).get(BASELINE_METADATA_KEY)
    info = json.loads(raw) if raw else {}
    return table, info


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def write_baseline(table: pa.Table, path: str | Path, *, suite: str) -> dict:
    """Write ``table`` (sorted by cell_id) atomically, with provenance in its metadata."""
    path = Path(path)
    info = {
        "created_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "hostname": socket.gethostname(),
        "suite": str(suite),
        "hypersweep_version": __version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "torch": _package_version("torch"),
        "jax": _package_version("jax"),
        "cells": table.num_rows,
    }
    ordered = table.select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA).sort_by("cell_id")
    ordered = ordered.replace_schema_metadata(
        {BASELINE_METADATA_KEY: json.dumps(info, sort_keys=True).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    pq.write_table(ordered, tmp, compression="zstd")
    os.replace(tmp, path)
    return info


# ---------------------------------------------------------------------------------------
# Running the suite


def load_suite(path: str | Path, *, output: str | Path | None = None,
               num_cpus: float | None = None, num_gpus: float | None = None):
    """The suite study, its ``output`` set to a fresh ``<output>/run-<UTC time>-<id>``
    (``output`` defaults to the suite's own) and its resources optionally overridden."""
    from hypersweep.orchestrator.spec import StudyError, load_study

    try:
        study = load_study(path)
    except StudyError as exc:
        raise GateInputError(str(exc)) from None
    if study.pipeline != "hypergradient_error":
        raise GateInputError(f"{path}: pipeline must be 'hypergradient_error' for the "
                             f"regression gate, got {study.pipeline!r}")
    update: dict = {"output": str(_run_dir(output or study.output))}
    if num_cpus is not None or num_gpus is not None:
        resources = study.resources.model_dump()
        if num_cpus is not None:
            resources["num_cpus"] = num_cpus
        if num_gpus is not None:
            resources["num_gpus"] = num_gpus
        try:
            update["resources"] = type(study.resources).model_validate(resources)
        except ValueError as exc:
            raise GateInputError(f"resources: {' '.join(str(exc).split())}") from None
    return study.model_copy(update=update)


def run_in_process(study) -> dict:
    """Run every cell of ``study`` here, one after another; rows go to Parquet under
    ``study.output`` like the driver's. Returns {status: count}."""
    from hypersweep.io import parquet
    from hypersweep.orchestrator import spec
    from hypersweep.orchestrator.cell import run_cell

    output = Path(study.output)
    sink = parquet.ParquetSink(output)
    parquet.write_text_atomic(output / parquet.STUDY_FILE, study.source_text)
    total = spec.count_cells(study)
    counts: dict[str, int] = {}
    start = time.perf_counter()
    for index, cell in enumerate(spec.expand(study), start=1):
        row, traces = run_cell(cell)
        counts[row["status"]] = counts.get(row["status"], 0) + 1
        sink.add(row, traces)
        if sink.due():
            sink.flush()
        if index % 25 == 0 or index == total:
            log.info("regression suite: %d/%d cells, %.1f s", index, total,
                     time.perf_counter() - start)
    sink.flush()
    return counts


def run_suite(study, *, executor: str = "inprocess", address: str | None = None):
    """Run the suite's cells; return the result table (latest row per cell)."""
    from hypersweep.io import parquet

    if executor == "ray":
        from hypersweep.orchestrator.driver import run_study

        run_study(study, address=address, quiet=True)
    else:
        run_in_process(study)
    return parquet.read_results(study.output)


# ---------------------------------------------------------------------------------------
# Command line


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error raises (one line, exit 2) instead of exiting."""

    def error(self, message):  # noqa: D401 - argparse's signature
        raise _ArgumentError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hypersweep regress",
        description="Run the regression suite and compare it with a baseline; exit 1 on a "
                    "regression.")
    parser.add_argument("--suite", default=DEFAULT_SUITE, help="suite study YAML "
                        f"(default {DEFAULT_SUITE})")
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="baseline Parquet "
                        f"(default {DEFAULT_BASELINE})")
    parser.add_argument("--update-baseline", action="store_true",
                        help="write this run as the new baseline (exit 0)")
    parser.add_argument("--output", default=None,
                        help="where run directories go (default: the suite's output)")
    parser.add_argument("--report", default=None,
                        help="also write the markdown report here (default: "
                             "<run dir>/regression.md only)")
    parser.add_argument("--executor", choices=("inprocess", "ray"), default=None,
                        help="inprocess (default) or ray (the normal driver)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to run on (implies --executor ray), e.g. auto")
    parser.add_argument("--num-cpus", type=float, default=None,
                        help="override the suite's resources.num_cpus (ray executor)")
    parser.add_argument("--num-gpus", type=float, default=None,
                        help="override the suite's resources.num_gpus, e.g. 0.25 (ray)")
    defaults = Tolerances()
    parser.add_argument("--rtol", type=float, default=defaults.rtol,
                        help=f"relative error tolerance (default {defaults.rtol:g})")
    parser.add_argument("--atol", type=float, default=defaults.atol,
                        help=f"absolute error tolerance (default {defaults.atol:g})")
    parser.add_argument("--slowdown", type=float, default=defaults.slowdown,
                        help="flag (problem, algorithm) groups whose normalized median "
                             f"time ratio exceeds this (default {defaults.slowdown:g})")
    parser.add_argument("--fail-on-slowdown", action="store_true",
                        help="make flagged slowdowns fail the gate")
    return parser


def _run_dir(output: str | Path) -> Path:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path(output).expanduser().absolute() / f"run-{stamp}-{uuid.uuid4().hex[:6]}"


def main(argv: Sequence[str] | None = None) -> int:
    """``hypersweep regress ...``: 0 passed (or baseline written), 1 regression, 2 bad
    input. The markdown report goes to stdout and to files (see ``--report``)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except _ArgumentError as exc:
        print(f"hypersweep regress: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    executor = "ray" if args.address else (args.executor or "inprocess")
    try:
        tolerances = Tolerances(rtol=args.rtol, atol=args.atol, slowdown=args.slowdown,
                                fail_on_slowdown=args.fail_on_slowdown)
        baseline = baseline_info = None
        if not args.update_baseline:  # fail on a missing baseline before running anything
            baseline, baseline_info = read_baseline(args.baseline)
        elif Path(args.baseline).is_file():
            baseline, baseline_info = read_baseline(args.baseline)
        study = load_suite(args.suite, output=args.output, num_cpus=args.num_cpus,
                           num_gpus=args.num_gpus)
    except GateInputError as exc:
        print(f"hypersweep regress: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2

    if executor == "inprocess":
        # Ray workers run with OMP_NUM_THREADS=1; do the same (effective when torch is not
        # imported yet) so in-process and actor timings compare, and so a busy 2-core box
        # does not thrash: measured 85 s -> 6 s for data_cleaning's torch cells at load 12.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    run_dir = Path(study.output)
    start = time.perf_counter()
    current = run_suite(study, executor=executor, address=args.address)
    elapsed = time.perf_counter() - start
    log.info("regression suite: %d cells in %.1f s (%s)", current.num_rows, elapsed,
             executor)

    if baseline is not None:
        comparison = compare(baseline, current, tolerances)
    else:
        comparison = Comparison(tolerances=tolerances, new_cells=sorted(
            current.column("cell_id").to_pylist()))
    report = render_markdown(comparison, suite=args.suite, baseline=args.baseline,
                             run_dir=str(run_dir), baseline_info=baseline_info,
                             n_cells=current.num_rows)
    report += f"\nSuite wall time: {elapsed:.1f} s ({executor}).\n"
    if args.update_baseline:
        not_ok = [s for s in current.column("status").to_pylist() if s != "ok"]
        info = write_baseline(current, args.baseline, suite=args.suite)
        report += (f"\nBaseline written to `{args.baseline}` ({info['cells']} cells"
                   + (f"; WARNING: {len(not_ok)} cell(s) not ok are part of it"
                      if not_ok else "") + ").\n")
    (run_dir / "regression.md").write_text(report, encoding="utf-8")
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(report, encoding="utf-8")
    sys.stdout.write(report)
    sys.stdout.flush()
    if args.update_baseline:
        return 0
    return 1 if comparison.failed else 0


__all__ = ["main", "compare", "render_markdown", "Tolerances", "Comparison", "CellChange",
           "TimeChange", "read_baseline", "write_baseline", "run_suite", "run_in_process",
           "load_suite", "GateInputError"]
