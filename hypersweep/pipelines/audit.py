"""The audit: hypersweep re-verifies a sample of its own stored results, outside the sweep.

``hypersweep audit OUTPUT [--sample N] [--seed S] [--fd-sample M]`` reads the latest row
per cell of a study's output, picks N finished (``ok``) cells stratified over
(problem, algorithm, backend) — round-robin over the strata, deterministic given the
seed — and re-runs them in a fresh process (``python -m hypersweep.pipelines.audit
--worker``: cells as JSON on stdin, answers as JSON on stdout), one that shares no cache
with the sweep. Per cell:

(a) **reproduce** — the re-run gives the stored metrics: ``hypergrad_rel_error``,
    ``hypergrad_abs_error``, ``hypergrad_norm``, ``inner_suboptimality``, ``val_loss``,
    ``test_loss``, ``test_accuracy``, ``extra.exact_hypergrad_norm``, ``solver_iters`` and
    every ``n_*`` count (row columns and ``extra`` keys alike, so cost columns added later
    are checked too). Bitwise when the row was stored by this host on the same device;
    otherwise within :data:`CROSS_HOST_RTOL` (see docs/audit.md for why). Counts are
    always exact; timing and memory columns are never compared.
(b) **oracle** (pipelines with an oracle) — the problem is rebuilt from scratch with
    ``problems.make`` (no pipeline cache), ∇F(λ) computed afresh, and compared with the
    stored ``exact_hypergrad_norm``; the stored ``hypergrad_abs_error`` is recomputed as
    ‖ĝ − ∇F‖ from the estimator called directly at the cell's (t, K, seed, params).
(c) **finite difference** (the first ``--fd-sample`` distinct instances, default
    min(5, N)) — the fresh ∇F agrees with central differences of F(λ) = ``problem.value``
    along a random unit direction u, in float64.

A rebuilt :class:`~hypersweep.orchestrator.cell.Cell` whose ``cell_id`` is not the stored
one fails the ``identity`` check (the row does not describe the cell it claims to be).
Cells with a ``time_budget_s`` are not sampled: how far they get depends on the clock.

Exit status: 0 when every check passes, 1 on any mismatch (a markdown table names the
cell, the check, both values and the difference), 2 on bad input.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROG = "hypersweep audit"
DEFAULT_SAMPLE = 20
DEFAULT_FD_SAMPLE = 5

#: metric columns a re-run must reproduce, beside every ``n_*`` count (found at run time in
#: the row and in its ``extra``); timing and memory columns are deliberately absent
METRIC_COLUMNS = ("hypergrad_rel_error", "hypergrad_abs_error", "hypergrad_norm",
                  "inner_suboptimality", "val_loss", "test_loss", "test_accuracy",
                  "solver_iters")
#: ``extra`` keys a re-run must reproduce (beside ``n_*``)
EXTRA_METRICS = ("exact_hypergrad_norm",)
#: integer columns: equal on every host (a count that moves is a changed algorithm)
COUNT_COLUMNS = ("solver_iters",)
#: pipelines whose cells have an exact oracle to rebuild (checks b and c)
ORACLE_PIPELINES = ("hypergradient_error",)

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
    cell_id: str
    check: str          # identity, status, reproduce, oracle, finite_difference
    quantity: str       # the column or the quantity compared
    stored: Any         # stored value (finite differences: the fresh oracle's ∇F·u)
    fresh: Any          # re-run / freshly built value (finite differences: the FD)
    difference: str


@dataclass
class AuditReport:
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


# ---------------------------------------------------------------------------------------
# Comparing values


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


# ---------------------------------------------------------------------------------------
# Sampling and rebuilding cells


def sample_cells(rows: list[dict], n: int, seed: int) -> list[dict]:
    """Up to ``n`` rows, one per (problem, algorithm, backend) stratum in turn.

    The strata's order and each stratum's order are seeded permutations of sorted lists,
    so the sample depends on the stored cells and the seed only (not on Parquet order).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    strata: dict[tuple, list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["cell_id"]):
        strata.setdefault((row["problem"], row["algorithm"], row["backend"]), []).append(row)
    keys = sorted(strata)
    queues = [[strata[keys[i]][j] for j in rng.permutation(len(strata[keys[i]]))]
              for i in rng.permutation(len(keys))]
    picked: list[dict] = []
    depth = 0
    while len(picked) < n and any(depth < len(q) for q in queues):
        for queue in queues:
            if depth < len(queue) and len(picked) < n:
                picked.append(queue[depth])
        depth += 1
    return picked


def cell_arguments(row: dict) -> dict:
    """Keyword arguments of ``Cell`` from a stored row: every dataclass field the row has
    (so a field added to ``Cell`` later is carried), except ``cell_id``, which the rebuilt
    cell computes. A null in a column an older output lacked means the field's default."""
    from hypersweep.orchestrator.cell import Cell

    out = {}
    for f in dataclasses.fields(Cell):
        if f.name == "cell_id" or f.name not in row:
            continue
        value = row[f.name]
        if value is None and f.default is not dataclasses.MISSING and f.default is not None:
            continue
        out[f.name] = value
    return out


def _fd_seed(seed: int, cell_id: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{cell_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _oracle_key(row: dict) -> tuple:
    return (row["problem"], row["problem_params"], row["seed"], row["pipeline_params"])


def _threads(output: Path) -> int:
    """Intra-op threads of the study's actors: Ray gives each floor(num_cpus) ≥ 1 via
    OMP_NUM_THREADS (1 unless the study's resources say otherwise)."""
    import yaml

    try:
        raw = yaml.safe_load((output / "study.yaml").read_text(encoding="utf-8")) or {}
        return max(1, int(float((raw.get("resources") or {}).get("num_cpus", 1))))
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError):
        return 1  # no readable study.yaml (e.g. rows written by a script): the default


# ---------------------------------------------------------------------------------------
# The fresh process


def run_worker(tasks: list[dict], *, gpu: bool, threads: int) -> list[dict]:
    """Run ``tasks`` in one fresh ``python -m hypersweep.pipelines.audit --worker`` with the
    environment of a study actor: ``OMP_NUM_THREADS`` as Ray sets it, the actors'
    ``runtime_env`` variables, and no visible GPU for cells that ran on the CPU (Ray hides
    GPUs from actors without ``num_gpus``)."""
    from hypersweep.orchestrator.actors import actor_options

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))  # Ray, too, keeps a value already set
    options = actor_options(num_cpus=threads, num_gpus=1.0 if gpu else 0.0)
    env.update(options.get("runtime_env", {}).get("env_vars", {}))
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-m", "hypersweep.pipelines.audit", "--worker"],
                          input=json.dumps({"tasks": tasks}), capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise AuditError(f"the audit worker exited with status {proc.returncode}: {tail}")
    try:
        answers = json.loads(proc.stdout)
    except ValueError:
        raise AuditError("the audit worker answered something that is not JSON") from None
    if len(answers) != len(tasks):
        raise AuditError(f"the audit worker answered {len(answers)} of {len(tasks)} cells")
    return answers


def fresh_oracle(cell, *, fd_seed: int | None = None) -> dict:
    """∇F(λ) from a problem built from scratch, the abs error of a direct estimator call
    against it, and (``fd_seed`` given) central differences of F along a random u."""
    import numpy as np

    from hypersweep import algorithms, problems
    from hypersweep.pipelines.common import fixed_lam

    problem = problems.make(cell.problem, backend=cell.backend, seed=cell.seed,
                            dtype=cell.dtype, **cell.problem_kwargs)
    lam = fixed_lam(problem, cell.pipeline_kwargs)
    g_star = problem.exact_hypergradient(lam)
    estimator = algorithms.get(cell.algorithm, cell.backend)
    estimate = estimator(problem, problem.as_lam(lam), t=cell.t, K=cell.K, seed=cell.seed,
                         **cell.algorithm_kwargs)
    g = problem.ops.to_numpy(estimate.hypergrad)
    out = {"exact_hypergrad_norm": float(np.linalg.norm(g_star)),
           "hypergrad_abs_error": float(np.linalg.norm(g - g_star))}
    if fd_seed is not None:
        out.update(finite_difference(problem, lam, g_star, seed=fd_seed))
    return out


def direction(shape: tuple, seed: int):
    """The random unit direction u of the finite-difference check (float64, λ's shape)."""
    import numpy as np

    u = np.random.default_rng(seed).standard_normal(shape)
    return u / np.linalg.norm(u)


def finite_difference(problem, lam, g_star, *, seed: int) -> dict:
    """∇F·u, the central difference (F(λ+hu) − F(λ−hu))/2h along a random unit u (float64,
    h = FD_STEP·max(1, ‖λ‖)), and the tolerance their gap must stay within."""
    import numpy as np

    lam = np.asarray(lam, dtype=np.float64)
    u = direction(lam.shape, seed)
    h = FD_STEP * max(1.0, float(np.linalg.norm(lam)))
    f_plus, f_minus = problem.value(lam + h * u), problem.value(lam - h * u)
    directional = float(np.sum(np.asarray(g_star) * u))
    scale = max(abs(directional), FD_FLOOR * float(np.linalg.norm(g_star)))
    noise = FD_NOISE * np.finfo(np.float64).eps * max(abs(f_plus), abs(f_minus)) / h
    return {"directional": directional, "finite_difference": (f_plus - f_minus) / (2 * h),
            "fd_tolerance": FD_RTOL * scale + noise}


def _work(task: dict) -> dict:
    from hypersweep.orchestrator.cell import Cell, run_cell

    cell = Cell(**task["cell"])
    row, _ = run_cell(cell)
    answer: dict[str, Any] = {"cell_id": cell.cell_id, "row": {
        k: v for k, v in row.items() if k not in ("started_at", "finished_at")}}
    if task.get("oracle"):
        try:
            answer["oracle"] = fresh_oracle(cell, fd_seed=task.get("fd_seed"))
        except Exception as exc:  # noqa: BLE001 - reported as a failed oracle check
            answer["oracle_error"] = f"{type(exc).__name__}: {exc}"[:500]
    return answer


def worker_main() -> int:
    """The fresh process: cells on stdin, answers on stdout (nothing else reaches it)."""
    answer_stream = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library chatter, C level included, goes to stderr
    sys.stdout = sys.stderr
    request = json.load(sys.stdin)
    from hypersweep.orchestrator.actors import register_extra_pipelines

    register_extra_pipelines()
    if any(task["cell"].get("backend") == "torch" for task in request["tasks"]):
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    answers = [_work(task) for task in request["tasks"]]
    json.dump(answers, answer_stream, default=str)
    answer_stream.close()
    return 0


# ---------------------------------------------------------------------------------------
# The audit


def _candidates(output: Path) -> tuple[list[dict], set[str], int]:
    """ok rows, the columns null in every row (absent from an older output), and how many
    ok rows were left out for depending on the clock."""
    from hypersweep.io.parquet import RESULTS_DIR, read_results

    if not output.is_dir():
        raise AuditInputError(f"output directory {str(output)!r} not found")
    results = output / RESULTS_DIR if output.name != RESULTS_DIR else output
    if not any(results.glob("*.parquet")):
        raise AuditInputError(f"{str(output)!r} is not a study output: no "
                              f"{RESULTS_DIR}/*.parquet in it")
    try:
        table = read_results(output)
    except (ValueError, OSError) as exc:
        raise AuditInputError(f"cannot read results in {str(output)!r}: {exc}") from None
    absent = {name for name in table.column_names
              if table.column(name).null_count == table.num_rows}
    rows, timed = [], 0
    for row in table.to_pylist():
        if row["status"] != "ok":
            continue
        try:
            budget = json.loads(row.get("pipeline_params") or "{}").get("time_budget_s")
        except (ValueError, AttributeError):
            budget = None
        if budget is not None:
            timed += 1
            continue
        rows.append(row)
    if not rows:
        raise AuditInputError(f"{str(output)!r} has no finished (status ok) cells to audit"
                              + (f" ({timed} ok cells have a time_budget_s)" if timed else ""))
    return rows, absent, timed


def audit(output: str | Path, *, sample: int = DEFAULT_SAMPLE, seed: int = 0,
          fd_sample: int | None = None) -> AuditReport:
    """Re-run a stratified sample of ``output``'s ok cells and check them (module doc)."""
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
        raise AuditInputError(f"--sample must be an integer >= 1; got {sample!r}")
    if fd_sample is None:
        fd_sample = min(DEFAULT_FD_SAMPLE, sample)
    if isinstance(fd_sample, bool) or not isinstance(fd_sample, int) or fd_sample < 0:
        raise AuditInputError(f"--fd-sample must be an integer >= 0; got {fd_sample!r}")
    output = Path(output)
    rows, absent, timed = _candidates(output)
    picked = sample_cells(rows, sample, seed)
    report = AuditReport(output=str(output), hostname=socket.gethostname(),
                         n_candidates=len(rows), seed=seed, n_time_budget=timed,
                         n_strata=len({(r["problem"], r["algorithm"], r["backend"])
                                       for r in rows}))

    from hypersweep.orchestrator.cell import Cell

    tasks: dict[bool, list[tuple[dict, dict]]] = {False: [], True: []}
    fd_keys: set[tuple] = set()
    for row in picked:
        report.cell_ids.append(row["cell_id"])
        arguments = cell_arguments(row)
        try:
            rebuilt = Cell(**arguments).cell_id
        except (TypeError, ValueError) as exc:
            rebuilt = f"{type(exc).__name__}: {exc}"
        report.record(rebuilt == row["cell_id"], row["cell_id"], "identity", "cell_id",
                      row["cell_id"], rebuilt, "rebuilt Cell differs")
        if rebuilt != row["cell_id"]:
            continue  # the row does not describe its cell: nothing to re-run
        task: dict[str, Any] = {"cell": arguments,
                                "oracle": row["pipeline"] in ORACLE_PIPELINES}
        if task["oracle"] and len(fd_keys) < fd_sample and _oracle_key(row) not in fd_keys:
            fd_keys.add(_oracle_key(row))
            task["fd_seed"] = _fd_seed(seed, row["cell_id"])
        gpu = (row.get("device") or "cpu") != "cpu"
        tasks[gpu].append((row, task))

    threads = _threads(output)
    for gpu, group in tasks.items():
        if not group:
            continue
        log.info("audit: re-running %d cell(s) in a fresh process (%s)", len(group),
                 "gpu" if gpu else "cpu")
        answers = run_worker([task for _, task in group], gpu=gpu, threads=threads)
        for (row, task), answer in zip(group, answers):
            _check(report, row, task, answer, absent)
    return report


def _check(report: AuditReport, row: dict, task: dict, answer: dict,
           absent: set[str]) -> None:
    cell_id = row["cell_id"]
    rerun = answer["row"]
    report.record(rerun.get("status") == "ok", cell_id, "status", "status", "ok",
                  f"{rerun.get('status')}: {rerun.get('error_message') or ''}".strip(": "),
                  "re-run did not finish")
    if rerun.get("status") != "ok":
        return
    dtype = row.get("dtype") or "float64"
    same_host = rerun.get("hostname") == row.get("hostname")
    exact = same_host and rerun.get("device") == row.get("device")
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


# ---------------------------------------------------------------------------------------
# Output


def _cell_text(value: Any) -> str:
    text = "null" if value is None else repr(value) if isinstance(value, float) else str(value)
    return " ".join(text.split()).replace("|", "\\|")


def render(report: AuditReport) -> str:
    """Markdown: what was audited, the table of mismatches (if any), one summary line."""
    lines = [f"audit of {report.output}: {len(report.cell_ids)} of {report.n_candidates} ok "
             f"cells over {report.n_strata} (problem, algorithm, backend) strata, seed "
             f"{report.seed}; {report.n_oracle} with a fresh oracle, {report.n_fd} with "
             f"finite differences"
             + (f"; {report.n_time_budget} time-budgeted cells not sampled"
                if report.n_time_budget else ""),
             (f"compared bitwise for rows stored by this host ({report.hostname}) on the "
              f"same device, else within rtol {CROSS_HOST_RTOL['float64']:g} (float64) / "
              f"{CROSS_HOST_RTOL['float32']:g} (float32); counts always exactly"), ""]
    if report.mismatches:
        lines += ["| cell_id | check | stored | re-run/fresh | difference |",
                  "|---|---|---|---|---|"]
        for m in report.mismatches:
            lines.append(f"| {_cell_text(m.cell_id)} | {m.check}: {_cell_text(m.quantity)} | "
                         f"{_cell_text(m.stored)} | {_cell_text(m.fresh)} | "
                         f"{_cell_text(m.difference)} |")
        lines.append("")
    cells_failed = len({m.cell_id for m in report.mismatches})
    lines.append(f"audit: {len(report.cell_ids)} cells audited, {report.passed} checks "
                 f"passed, {len(report.mismatches)} failed"
                 + (f" (in {cells_failed} cell{'s' * (cells_failed != 1)})"
                    if cells_failed else ""))
    return "\n".join(lines) + "\n"


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _ArgumentError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Re-run a stratified sample of a study's "
                     "finished cells in a fresh process and check the stored results; "
                     "exit 1 on any mismatch.")
    parser.add_argument("output", metavar="OUTPUT", help="the study's output directory")
    parser.add_argument("--sample", type=int, default=DEFAULT_SAMPLE, metavar="N",
                        help=f"ok cells to re-run (default {DEFAULT_SAMPLE})")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="seed of the stratified sample (default 0)")
    parser.add_argument("--fd-sample", type=int, default=None, metavar="M",
                        help=f"instances checked by finite differences "
                             f"(default min({DEFAULT_FD_SAMPLE}, N))")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``hypersweep audit OUTPUT ...``: 0 all checks pass, 1 a mismatch, 2 bad input."""
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        report = audit(args.output, sample=args.sample, seed=args.seed,
                       fd_sample=args.fd_sample)
    except (_ArgumentError, AuditInputError) as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except AuditError as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    sys.stdout.write(render(report))
    return 0 if report.ok else 1


__all__ = ["CROSS_HOST_RTOL", "FD_RTOL", "ORACLE_RTOL", "AuditError", "AuditInputError",
           "AuditReport", "Mismatch", "audit", "cell_arguments", "direction",
           "finite_difference", "fresh_oracle", "main", "recorded_metrics", "render",
           "run_worker", "sample_cells"]

if __name__ == "__main__":
    sys.exit(worker_main() if sys.argv[1:] == ["--worker"] else main())
