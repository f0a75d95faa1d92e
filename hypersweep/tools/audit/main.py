"""The audit: hypersweep re-verifies a sample of its own stored results, outside the sweep.

``hypersweep audit OUTPUT [--sample N] [--seed S] [--fd-sample M]`` reads the latest row
per cell of a study's output, picks N finished (``ok``) cells stratified over
(problem, algorithm, backend) — round-robin over the strata, deterministic given the
seed — and re-runs them in a fresh process (``python -m hypersweep.tools.audit.worker``: cells as
JSON on stdin, answers as JSON on stdout), one that shares no cache with the sweep. Per cell:

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
import json
import logging
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hypersweep.seeding import derive_seed
from hypersweep.tools.audit.checks import (
    CROSS_HOST_RTOL,
    AuditError,
    AuditInputError,
    AuditReport,
    check_answer,
)
from hypersweep.tools.audit.worker import run_worker

log = logging.getLogger(__name__)

PROG = "hypersweep audit"
DEFAULT_SAMPLE = 20
DEFAULT_FD_SAMPLE = 5
#: pipelines whose cells have an exact oracle to rebuild (checks b and c)
ORACLE_PIPELINES = ("hypergradient_error",)


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
    return derive_seed("audit_fd", seed, cell_id)


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
            check_answer(report, row, task, answer, absent)
    return report


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
    """The ``hypersweep audit`` arguments; a usage error raises instead of exiting."""
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
