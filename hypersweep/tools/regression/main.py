"""The regression gate: run a fixed suite, compare every cell with a stored baseline.

``hypersweep regress --suite configs/regression.yaml --baseline benchmarks/baseline.parquet``
runs the suite (a normal study file: every estimator × backend on small instances of every
problem, pipeline ``hypergradient_error``, float64; problems and estimators the file does
not list are added from the catalogs, see :mod:`.suite`), then compares each cell with the
baseline row of the same ``cell_id``:

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
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hypersweep.tools.regression.markdown import render_markdown
from hypersweep.tools.regression.rules import (
    Comparison,
    GateInputError,
    Tolerances,
    compare,
)
from hypersweep.tools.regression.suite import (
    load_suite,
    read_baseline,
    run_suite,
    write_baseline,
)

log = logging.getLogger(__name__)

DEFAULT_SUITE = "configs/regression.yaml"
DEFAULT_BASELINE = "benchmarks/baseline.parquet"


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error raises (one line, exit 2) instead of exiting."""

    def error(self, message):  # noqa: D401 - argparse's signature
        raise _ArgumentError(message)


def build_parser() -> argparse.ArgumentParser:
    """The ``hypersweep regress`` arguments; a usage error raises instead of exiting."""
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
    parser.add_argument("--listed-only", action="store_true",
                        help="run only the problems and estimators the suite lists (default: "
                             "also every registered one it does not list, on its small "
                             "instance)")
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
                           num_gpus=args.num_gpus, complete=not args.listed_only)
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
