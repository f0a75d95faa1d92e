"""The regression gate's rules: compare a run with the baseline, cell by cell.

Pure: pyarrow tables in, dataclasses out; no backend, no Ray. The rules (accuracy,
status, time, coverage) are listed in :mod:`hypersweep.tools.regression.main`.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import pyarrow as pa

ERROR_COLUMN = "hypergrad_rel_error"
TIME_COLUMN = "wall_time_s"
#: columns a baseline must have to be compared
REQUIRED_COLUMNS = ("cell_id", "problem", "algorithm", "backend", "status", ERROR_COLUMN,
                    TIME_COLUMN)


class GateInputError(ValueError):
    """Bad command-line input or an unreadable suite/baseline: one line, exit 2."""


@dataclass(frozen=True)
class Tolerances:
    """When a cell counts as worse (the rules: :mod:`hypersweep.tools.regression.main`).

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
    """The outcome of :func:`compare`: what got worse, better, slower, faster, and which
    cells only one side has; ``failed`` is the gate's verdict."""

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
