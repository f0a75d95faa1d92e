"""The audit's checks: what a re-run must reproduce, within which tolerance, and the
record of every comparison (:class:`AuditReport`).
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

#: metric columns a re-run must reproduce, beside every ``n_*`` count (found at run time in
#: the row and in its ``extra``); timing and memory columns are deliberately absent
METRIC_COLUMNS = ("hypergrad_rel_error", "hypergrad_abs_error", "hypergrad_norm",
                  "inner_suboptimality", "val_loss", "test_loss", "test_accuracy",
                  "solver_iters")
#: ``extra`` keys a re-run must reproduce (beside ``n_*``)
EXTRA_METRICS = ("exact_hypergrad_norm",)
#: integer columns: equal on every host (a count that moves is a changed algorithm)
COUNT_COLUMNS = ("solver_iters",)

#: Relative tolerance of float metrics re-run on another host or device, by cell dtype.
#: Another BLAS, SIMD width or GPU reorders sums: each op then differs by a few ulps and a
#: contracting inner loop of t steps keeps that at ~eps·κ; 1e-6 (float64) sits ~1e8 ulps
#: above that yet far below any real change of a result. float32 (eps 1.2e-7) gets 1e-3.
CROSS_HOST_RTOL = {"float64": 1e-6, "float32": 1e-3}
#: the oracle is float64 numpy whatever the cell's dtype
ORACLE_RTOL = 1e-6
#: finite differences: step h = FD_STEP·max(1, ‖λ‖); pass when
#: |FD − ∇F·u| ≤ FD_RTOL·max(|∇F·u|, FD_FLOOR·‖∇F‖) + FD_NOISE·eps·max|F(λ ± hu)|/h.
#: Measured on every catalog problem (3 seeds, λ₀ and a shifted λ, 3 directions): worst
#: |FD − ∇F·u|/scale = 9e-9 (data_cleaning), so 1e-5 leaves three orders of margin while an
#: oracle off by 0.1 % of ‖∇F‖ along u fails. The last term is F's rounding divided by h.
FD_STEP, FD_RTOL, FD_FLOOR, FD_NOISE = 1e-5, 1e-5, 1e-3, 100.0


class AuditInputError(ValueError):
    """Bad input (not a study output, N < 1, ...): one line, exit 2."""


class AuditError(RuntimeError):
    """The audit could not run (the worker died): one line, exit 1."""


@dataclass(frozen=True)
class Mismatch:
    """One failed check: which cell, which check and quantity, both values, how far."""

    cell_id: str
    check: str          # identity, status, reproduce, oracle, finite_difference
    quantity: str       # the column or the quantity compared
    stored: Any         # stored value (finite differences: the fresh oracle's ∇F·u)
    fresh: Any          # re-run / freshly built value (finite differences: the FD)
    difference: str


@dataclass
class AuditReport:
    """What an audit looked at (output, sample, strata) and what it found: the number of
    checks passed and every :class:`Mismatch`; ``ok`` when there is none."""

    output: str
    hostname: str
    n_candidates: int   # ok cells that could be sampled
    n_strata: int
    seed: int
    cell_ids: list[str] = field(default_factory=list)
    n_oracle: int = 0
    n_fd: int = 0
    n_time_budget: int = 0
    passed: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def record(self, same: bool, cell_id: str, check: str, quantity: str, stored: Any,
               fresh: Any, difference: str | None = None) -> None:
        if same:
            self.passed += 1
        else:
            self.mismatches.append(Mismatch(cell_id, check, quantity, stored, fresh,
                                            difference or _difference(stored, fresh)))


def _same(stored: Any, fresh: Any, *, rtol: float | None, atol: float = 0.0) -> bool:
    """``rtol=None``: bitwise (NaN equals NaN); integers always compare exactly."""
    if stored is None or fresh is None:
        return stored is None and fresh is None
    if isinstance(stored, int) and isinstance(fresh, int):
        return stored == fresh
    a, b = float(stored), float(fresh)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if rtol is None:
        return struct.pack("<d", a) == struct.pack("<d", b)
    return abs(a - b) <= rtol * max(abs(a), abs(b)) + atol


def _difference(stored: Any, fresh: Any) -> str:
    try:
        a, b = float(stored), float(fresh)
    except (TypeError, ValueError):
        return "differs"
    if math.isnan(a) or math.isnan(b):
        return "nan"
    delta = b - a
    scale = max(abs(a), abs(b))
    return f"{delta:+.3e} (rel {abs(delta) / scale:.1e})" if scale > 0 else f"{delta:+.3e}"


def _extra(row: dict) -> dict:
    text = row.get("extra")
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def recorded_metrics(row: dict) -> dict:
    """The deterministic quantities a row records: metric and ``n_*`` columns, then the
    ``extra`` keys among :data:`EXTRA_METRICS` and ``n_*`` (a column wins over ``extra``,
    so a count that moved from ``extra`` into the schema still matches)."""
    out = {}
    for key, value in _extra(row).items():
        if key in EXTRA_METRICS or key.startswith("n_"):
            out[key] = value
    for key in (*METRIC_COLUMNS, *(c for c in row if c.startswith("n_"))):
        if key in row and (row[key] is not None or key not in out):
            out[key] = row[key]
    return out


def _is_count(key: str) -> bool:
    return key.startswith("n_") or key in COUNT_COLUMNS


def _tolerance(key: str, stored: dict, *, exact: bool, dtype: str) -> tuple[float | None,
                                                                          float]:
    """(rtol, atol) for comparing ``key``; ``rtol=None`` means bitwise."""
    if exact or _is_count(key):
        return None, 0.0
    if key == "exact_hypergrad_norm":
        return ORACLE_RTOL, 0.0
    rtol = CROSS_HOST_RTOL.get(dtype, CROSS_HOST_RTOL["float32"])
    # |‖ĝ₁−∇F‖ − ‖ĝ₂−∇F‖| ≤ ‖ĝ₁−ĝ₂‖: two estimates equal to rtol·‖ĝ‖ give errors equal to
    # rtol·‖ĝ‖ in absolute terms, which is what an error near the float floor can promise.
    norm = stored.get("hypergrad_norm")
    if key == "hypergrad_abs_error" and norm is not None:
        return rtol, rtol * abs(float(norm))
    ref = stored.get("exact_hypergrad_norm")
    if key == "hypergrad_rel_error" and norm is not None and ref:
        return rtol, rtol * abs(float(norm)) / abs(float(ref))
    return rtol, 0.0


def check_answer(report: AuditReport, row: dict, task: dict, answer: dict,
                 absent: set[str]) -> None:
    """Record in ``report`` every check of one re-run ``answer`` (the worker's) against the
    stored ``row``: its status, each recorded metric, then the fresh oracle's quantities
    and finite differences when ``task`` asked for them. ``absent``: columns null in every
    stored row (ones an older output lacked)."""
    cell_id = row["cell_id"]
    rerun = answer["row"]
    report.record(rerun.get("status") == "ok", cell_id, "status", "status", "ok",
                  f"{rerun.get('status')}: {rerun.get('error_message') or ''}".strip(": "),
                  "re-run did not finish")
    if rerun.get("status") != "ok":
        return
    dtype = row.get("dtype") or "float64"
    same_host = rerun.get("hostname") == row.get("hostname")
    # A batched row came from its batch's one grid (and, in JAX, vmapped) call, which
    # equals the per-(t, K) call the re-run makes to rounding, not bitwise (another order
    # of the same sums): it is held to the cross-host tolerance, counts stay exact.
    batched = (_extra(row).get("batch_size") or 1) > 1
    exact = same_host and rerun.get("device") == row.get("device") and not batched
    stored, fresh = recorded_metrics(row), recorded_metrics(rerun)
    # What the row stored, plus what the re-run has where the output has that column but
    # this row left it null (a column null in every row is one an older output lacked).
    keys = [k for k, v in stored.items() if v is not None]
    keys += [k for k, v in fresh.items() if v is not None and stored.get(k) is None
             and k in row and k not in absent]
    for key in keys:
        rtol, atol = _tolerance(key, stored, exact=exact, dtype=dtype)
        report.record(_same(stored.get(key), fresh.get(key), rtol=rtol, atol=atol),
                      cell_id, "reproduce", key, stored.get(key), fresh.get(key))

    if not task.get("oracle"):
        return
    report.n_oracle += 1
    oracle = answer.get("oracle")
    if oracle is None:
        report.record(False, cell_id, "oracle", "fresh oracle", "-",
                      answer.get("oracle_error", "missing"), "could not be built")
        return
    if stored.get("exact_hypergrad_norm") is not None:
        report.record(_same(stored["exact_hypergrad_norm"], oracle["exact_hypergrad_norm"],
                            rtol=None if same_host else ORACLE_RTOL),
                      cell_id, "oracle", "exact_hypergrad_norm",
                      stored["exact_hypergrad_norm"], oracle["exact_hypergrad_norm"])
    if stored.get("hypergrad_abs_error") is not None:
        rtol, atol = _tolerance("hypergrad_abs_error", stored, exact=exact, dtype=dtype)
        report.record(_same(stored["hypergrad_abs_error"], oracle["hypergrad_abs_error"],
                            rtol=rtol, atol=atol),
                      cell_id, "oracle", "hypergrad_abs_error",
                      stored["hypergrad_abs_error"], oracle["hypergrad_abs_error"])
    if "finite_difference" in oracle:
        report.n_fd += 1
        gap = abs(oracle["finite_difference"] - oracle["directional"])
        report.record(gap <= oracle["fd_tolerance"], cell_id, "finite_difference",
                      "∇F·u vs FD", oracle["directional"], oracle["finite_difference"],
                      f"{gap:.3e} > tol {oracle['fd_tolerance']:.1e}")
