"""The ``hypersweep`` command: parses arguments and calls the orchestrator; nothing else.

Subcommands::

    hypersweep run STUDY.yaml [STUDY.yaml ...] [--address ADDR] [--quiet] [--retry-failed]
                   [--force] [--ray-dashboard]
    hypersweep plan STUDY.yaml [--json [--no-cells]] [--baseline PARQUET]
    hypersweep status OUTPUT_DIR
    hypersweep sync-mlflow OUTPUT_DIR [--tracking-uri URI]
    hypersweep problems | algorithms
    hypersweep report ... | regress ... | audit ...  (forwarded to hypersweep.tools.*)

Exit codes: 0 success (a sweep whose cells failed still succeeded: failures are rows),
1 an internal failure, 2 bad input (command line or study file), with a one-line message
on stderr; ``run`` of several studies exits with the worst of their statuses. ``run``, ``plan`` and validation never import Ray before the study is valid;
``plan`` never imports it at all.
"""
from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Sequence

from hypersweep import __version__

PROG = "hypersweep"

#: Subcommands owned by other modules: name -> ("module:function", help). The function is
#: called as ``main(argv) -> int | None`` with the arguments after the subcommand name.
FORWARDED = {
    "report": ("hypersweep.tools.report.main:main",
               "figures and tables from results: report RESULTS... --out DIR"),
    "regress": ("hypersweep.tools.regression.main:main",
                "regression suite against a baseline: regress --suite ... --baseline ... "
                "[--update-baseline]"),
    "audit": ("hypersweep.tools.audit.main:main",
              ("re-run a sample of stored cells and check them: audit OUTPUT "
               "[--sample N] [--seed S] [--fd-sample M]")),
}


class UsageError(Exception):
    """Bad input on the command line or in a file it names: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped output keeps long rows whole rather than wrapping them at 80 columns.
    return Console(file=stream, width=None if stream.isatty() else 200, soft_wrap=False)


def _say(console, text: str) -> None:
    """Print data as written: no rich markup (``[log γ, log μ]`` is not a style tag)."""
    console.print(text, markup=False, highlight=False)


def _table(title: str | None, columns: Sequence[str], rows, **kwargs):
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", min_width=len(title or ""), **kwargs)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(Text(str(value)) for value in row))
    return table


def _load_study(path: str, overrides: Sequence[str] = ()):
    """The validated study at ``path`` with ``--set`` ``overrides``, after importing the
    plugins (``$HYPERSWEEP_PLUGINS``) whose problems, algorithms and pipelines it may name."""
    from hypersweep.orchestrator.spec import load_study
    from hypersweep.registry import load_plugins

    try:
        load_plugins()
        return load_study(path, overrides=overrides or ())
    except ValueError as exc:  # a StudyError, or a plugin that cannot be imported
        raise UsageError(str(exc)) from None


# ---------------------------------------------------------------------------------------
# Subcommands.


def cmd_plan(args: argparse.Namespace) -> int:
    from hypersweep.orchestrator.expand import plan

    study = _load_study(args.study, args.set)
    if args.baseline is not None and not os.path.isfile(args.baseline):
        raise UsageError(f"--baseline {args.baseline!r}: file not found")
    start = time.perf_counter()
    summary = plan(study)
    elapsed = time.perf_counter() - start
    if args.json:
        return _plan_json(study, summary, args)
    console = _console()
    _say(console, f"study {study.study}: pipeline {study.pipeline}, backend "
                  f"{', '.join(study.backend)}, dtype {study.dtype}")
    _say(console, f"{summary.total} cells (expanded and checked in {elapsed:.2f} s) -> "
                  f"{study.output}")
    resources = study.resources
    memory = f", memory {resources.memory_mb:g} MB" if resources.memory_mb else ""
    _say(console, f"per actor: num_cpus {resources.num_cpus:g}, num_gpus "
                  f"{resources.num_gpus:g}{memory}; actors "
                  f"{study.num_actors or 'from the cluster'}; max_retries {study.max_retries};"
                  f" cell_timeout_s {study.cell_timeout_s or 'none'}")
    console.print(_table("cells per (problem, algorithm)", ["problem", "algorithm", "cells"],
                         [(p.problem, p.algorithm, p.cells) for p in summary.pairs]))
    if summary.skipped:
        console.print(_table("skipped combinations", ["problem", "algorithm", "backend",
                                                       "reason"],
                             [(s.problem, s.algorithm, s.backend or "all", s.reason)
                              for s in summary.skipped]))
    else:
        _say(console, "skipped combinations: none")
    _say(console, "sample cell_ids:")
    for cell_id in summary.sample_cell_ids:
        _say(console, f"  {cell_id}")
    from hypersweep.orchestrator.estimate import format_seconds as fmt

    priced = _price(study, args, with_cells=False)
    totals = priced.totals
    sources = ", ".join(f"{source} {n}" for source, n in sorted(totals.sources.items()))
    _say(console, f"estimate: {fmt(totals.cell_seconds + totals.compile_seconds())} of cell "
                  f"time ({fmt(totals.cell_seconds / max(totals.n_cells, 1))} per cell), "
                  f"about {fmt(totals.seconds_on(priced.actors))} on {priced.actors} "
                  f"actor(s) ({priced.actors_from}); cells priced from {sources} "
                  f"(details: --json)")
    return 0


def _price(study, args: argparse.Namespace, *, with_cells: bool):
    from hypersweep.orchestrator import estimate

    return estimate.price_study(study, with_cells=with_cells, baseline=(
        estimate.BASELINE_PATH if args.baseline is None else args.baseline))


def _plan_json(study, summary, args: argparse.Namespace) -> int:
    """``plan --json``: one JSON document on stdout, nothing else (README, CLI section)."""
    import json

    from hypersweep.orchestrator.estimate import plan_document

    document = plan_document(study, summary, _price(study, args, with_cells=args.cells))
    sys.stdout.write(json.dumps(document, indent=1, ensure_ascii=False, allow_nan=False)
                     + "\n")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    # every study validated before Ray is ever imported, and before anything is written
    studies = [_load_study(path, args.set) for path in args.study]
    quiet = args.quiet or not sys.stdout.isatty()
    from hypersweep.io.lock import OutputError
    from hypersweep.orchestrator import driver
    from hypersweep.orchestrator.signals import SweepAborted, SweepInterrupted
    from hypersweep.orchestrator.summary import print_summary

    for output, first, second in driver.same_outputs(studies):
        raise UsageError(f"studies {first!r} and {second!r} both write output {output!r}; "
                         "give each study its own output")
    report_out = _report_out(studies, args.report)
    # A SIGTERM that lands while run_study is not listening (before it installs its
    # handlers, or during Ray's shutdown after it restored them) still ends as 143
    # "terminated" rather than as a bare kill or a traceback.
    def _terminated(signum, frame):  # noqa: ARG001
        raise SweepAborted(signum)

    previous_term = signal.signal(signal.SIGTERM, _terminated)
    # Ray's native failure-signal handler, when uninstalled by ray.shutdown(), resets
    # SIGTERM to the default action under Python's handler: a second SIGTERM during
    # the shutdown would kill the process (-15, no message). Python's faulthandler
    # still reports crashes; only native stack traces of Ray's processes are lost.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    options = dict(address=args.address or os.environ.get("RAY_ADDRESS"), quiet=quiet,
                   retry_failed=args.retry_failed, **({"force": True} if args.force else {}),
                   **({"dashboard": True} if args.ray_dashboard else {}))
    codes = [0]

    def show(study, result) -> None:
        if isinstance(result, OutputError):  # held by another driver, Parquet unwritable
            _error(f"study {study.study}: {result}" if len(studies) > 1 else result)
            codes.append(result.exit_code)
            return
        print_summary(result, _console())
        _say(_console(), f"verify a sample of the stored results: {PROG} audit "
                         f"{study.output}")

    try:
        if len(studies) == 1:
            show(studies[0], driver.run_study(studies[0], **options))
        else:
            driver.run_studies(studies, on_result=show, **options)
    except OutputError as exc:  # output held by another driver, or Parquet unwritable
        show(studies[0], exc)
    except SweepInterrupted as exc:
        # SIGTERM (ray job stop) or Ctrl-C: finished rows are saved; exit 128 + signal
        _error(exc)
        codes.append(exc.exit_code)
    except SweepAborted as exc:  # a second signal: 128 + signal
        _error(exc)
        codes.append(exc.exit_code)
    else:
        if report_out is not None and max(codes) == 0:
            codes.append(_report_after_run(studies, report_out, args.mlflow_ui))
    finally:
        # Stopped by a signal: the process is on its way out with 128 + signal. A further
        # SIGTERM (a second `ray job stop`, a supervisor's retry) now ends it at once with
        # 143 instead of the default action's bare kill during the exit (Ray's stop and
        # the interpreter's exit take under a second since the monitor kill and
        # ``console``'s fast exit, so a second signal 0.6 s later now lands here).
        signal.signal(signal.SIGTERM, _exit_terminated if max(codes) >= 128
                      else previous_term)
    return max(codes)


def _report_out(studies, report: str | None) -> Path | None:
    """Where ``run --report [DIR]`` writes the report (None: no report): DIR, else the
    one study's ``OUTPUT/report``; checked before anything runs."""
    if report is None:
        return None
    if not report:
        if len(studies) > 1:
            raise UsageError("--report needs a directory with several studies (one report "
                             "for all of them), e.g. --report results/report")
        return Path(studies[0].output) / "report"
    if Path(report).exists() and not Path(report).is_dir():
        raise UsageError(f"--report {report!r}: exists and is not a directory")
    return Path(report)


def _report_after_run(studies, out: Path, ui_url: str) -> int:
    """``hypersweep report`` of the studies' outputs into ``out``, in this process: its
    imports are warm, and the MLflow writer has imported mlflow (the report's MLflow side
    then runs here instead of in a child that imports it again). Exit status 1 if the
    report fails (the results are saved either way)."""
    from hypersweep.tools.report import main as report_main

    try:
        report = report_main.write_report(
            [study.output for study in studies], out, ui_url=ui_url,
            mlflow_in_process="mlflow" in sys.modules)
    except Exception as exc:  # noqa: BLE001 - the run's results stand; say why, exit 1
        logging.getLogger(__name__).debug("the report was not written", exc_info=True)
        _error(f"report not written to {out}: {type(exc).__name__}: {exc}")
        return 1
    report_main.say_written(report, out)
    return 0


def _exit_terminated(signum, frame) -> None:  # noqa: ARG001
    """A SIGTERM after a run stopped by a signal: flush what is printed, exit 128 + signal
    (the stop's message and the saved rows are already out)."""
    _flush_std()
    os._exit(128 + signum)


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more to say
            pass


def cmd_status(args: argparse.Namespace) -> int:
    """Counts by status of a study's output, against its plan: the cells the saved
    ``study.yaml`` expands to, how many have a row (by latest status) and how many are
    pending. A folder without ``study.yaml``, results or a run holding its lock is not a
    study: exit 2."""
    if not os.path.isdir(args.output_dir):
        raise UsageError(f"output directory {args.output_dir!r} not found")
    from hypersweep.io.parquet import STUDY_FILE, read_results

    study_file = Path(args.output_dir) / STUDY_FILE
    try:
        table = read_results(args.output_dir)
    except ValueError as exc:  # not a study output, unreadable schema
        raise UsageError(str(exc)) from None
    from hypersweep.io import lock

    held = lock.holder(args.output_dir)
    if not study_file.is_file() and (table is None or table.num_rows == 0) and held is None:
        raise UsageError(f"{args.output_dir!r} is not a study output: no {STUDY_FILE}, no "
                         f"results and no run holding it (give the output folder of a study)")
    planned = _planned_cells(study_file)
    console = _console()
    if held is not None:
        holder, alive = held
        _say(console, f"{'running' if alive else 'stale lock (its run is gone)'}: "
                      f"{lock.describe(holder)}")
    done_ids = set() if table is None else set(table.column("cell_id").to_pylist())
    if planned is not None:
        pending = len(planned - done_ids)
        _say(console, f"{args.output_dir}: {len(planned)} cells planned, "
                      f"{len(planned & done_ids)} with a result, {pending} pending")
    if table is None or table.num_rows == 0:
        _say(console, f"{args.output_dir}: no results yet")
        return 0
    by_status = _group_counts(table, ["status"])
    _say(console, f"{args.output_dir}: {table.num_rows} cells")
    rows = sorted(((k[0], n) for k, n in by_status.items()), key=lambda item: -item[1])
    if planned is not None:
        rows.append(("pending", len(planned - done_ids)))
    console.print(_table("cells by status", ["status", "cells"], rows))
    statuses = sorted({k[0] for k in by_status}, key=_status_order)
    by_pair = _group_counts(table, ["problem", "algorithm", "status"])
    pairs = sorted({(p, a) for p, a, _ in by_pair})
    rows = [(problem, algorithm, *(by_pair.get((problem, algorithm, s), 0) for s in statuses))
            for problem, algorithm in pairs]
    console.print(_table("cells by (problem, algorithm)", ["problem", "algorithm", *statuses],
                         rows))
    return 0


def _planned_cells(study_file: Path) -> set[str] | None:
    """cell_ids the saved study expands to (None when there is no readable study file: a
    study file that no longer validates, e.g. after a catalog change, gives no plan)."""
    if not study_file.is_file():
        return None
    from hypersweep.orchestrator.expand import expand
    from hypersweep.orchestrator.spec import StudyError, parse_study

    try:
        text = study_file.read_text(encoding="utf-8")
        study = parse_study(text, source=str(study_file))
    except (StudyError, OSError, TypeError):
        return None
    return {cell.cell_id for cell in expand(study)}


def _status_order(status: str) -> tuple:
    from hypersweep.io.schema import STATUSES

    return (STATUSES.index(status) if status in STATUSES else len(STATUSES), status)


def _group_counts(table, keys: list[str]) -> dict[tuple, int]:
    grouped = table.select(keys).group_by(keys).aggregate([([], "count_all")])
    columns = [grouped.column(key).to_pylist() for key in keys]
    counts = grouped.column("count_all").to_pylist()
    return {tuple(str(col[i]) for col in columns): counts[i] for i in range(len(counts))}


def cmd_sync_mlflow(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.output_dir):
        raise UsageError(f"output directory {args.output_dir!r} not found")
    from hypersweep.io.tracking_sync import sync_mlflow

    try:
        result = sync_mlflow(args.output_dir, tracking_uri=args.tracking_uri)
    except ValueError as exc:  # not a study output
        raise UsageError(str(exc)) from None
    console = _console()
    for key, value in result.items():
        _say(console, f"{key}: {value}")
    return 0


def cmd_problems(args: argparse.Namespace) -> int:
    from hypersweep import problems as registry
    from hypersweep.problems.catalog import PROBLEMS

    if args.name is not None:
        if args.name not in PROBLEMS.names():
            raise UsageError(f"unknown problem {args.name!r}. Valid choices: "
                             f"{', '.join(PROBLEMS.names())}")
        s = PROBLEMS.spec(args.name)
        console = _console()
        _say(console, f"{s.name}: {s.summary}")
        _say(console, f"λ parametrization: {s.lam_parametrization}")
        _say(console, f"capabilities: {', '.join(sorted(s.capabilities)) or '-'}")
        _say(console, f"reference: {s.reference}")
        rows = [(key, repr(value), "common to every problem"
                 if key in registry.COMMON_PARAMS else "")
                for key, value in registry.valid_params(args.name).items()]
        console.print(_table(f"{s.name}: accepted params (problems[].params) and defaults",
                             ["param", "default", "note"], rows))
        return 0
    rows = [(s.name, s.summary, s.lam_parametrization,
             ", ".join(sorted(s.capabilities)) or "-", s.reference) for s in PROBLEMS]
    _console().print(_table("problems", ["name", "summary", "λ parametrization",
                                         "capabilities", "reference"], rows, show_lines=True))
    return 0


def cmd_algorithms(args: argparse.Namespace) -> int:
    from hypersweep.algorithms.catalog import ALGORITHMS

    rows = [(s.name, s.kind, s.summary, "yes" if s.uses_K else "no",
             ", ".join(sorted(s.requires)) or "-", ", ".join(s.impls), s.reference)
            for s in ALGORITHMS]
    _console().print(_table("algorithms", ["name", "kind", "summary", "uses K", "requires",
                                           "backends", "reference"], rows, show_lines=True))
    return 0


def run_forwarded(name: str, argv: list[str]) -> int:
    """Call another module's ``main(argv)`` for subcommand ``name``."""
    from hypersweep.registry import load_object

    return int(load_object(FORWARDED[name][0])(argv) or 0)


# ---------------------------------------------------------------------------------------
# The parser.


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Large studies of hypergradient algorithms on "
                     "Ray; results to Parquet and MLflow.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-v: info, -vv: debug)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "run", help="validate studies, then run their pending cells in one Ray session",
        description="Validate every study first (any bad one: exit 2, nothing started or "
                    "written), then run them one after another in one Ray session, each "
                    "with its own output, lock, MLflow run and summary; actors are reused "
                    "between studies that ask for the same ones. Exit status: the worst "
                    "of the studies'.")
    run.add_argument("study", metavar="STUDY.yaml", nargs="+")
    run.add_argument("--address", default=None,
                     help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    run.add_argument("--quiet", action="store_true",
                     help="no progress display (implied when stdout is not a terminal)")
    run.add_argument("--retry-failed", action="store_true",
                     help="re-run cells whose latest status is error, diverged, timeout "
                          "or crashed (ok cells are always skipped)")
    run.add_argument("--force", action="store_true",
                     help="take the output's lock even if another run holds it (only for "
                          "a holder known to be gone, e.g. on a lost host)")
    run.add_argument("--ray-dashboard", action="store_true",
                     help="start the embedded Ray with its dashboard (on 127.0.0.1; off by "
                          "default, which starts Ray faster)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="KEY=VALUE: set a study key before validation (dotted path, YAML value; "
                          "repeatable), e.g. --set pipeline_params.outer_lr=0.5 --set seeds=5")
    run.add_argument("--report", nargs="?", const="", default=None, metavar="DIR",
                     help="after the studies end, write `hypersweep report` of their "
                          "outputs to DIR (default with one study: OUTPUT/report), in this "
                          "process")
    run.add_argument("--mlflow-ui", default="http://127.0.0.1:5000", metavar="URL",
                     help="with --report: the MLflow UI the page links to (default: "
                          "http://127.0.0.1:5000, where `mlflow ui` listens)")
    run.set_defaults(handler=cmd_run)

    plan = commands.add_parser("plan", help="validate a study and show its cells; no Ray")
    plan.add_argument("study", metavar="STUDY.yaml")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="KEY=VALUE: set a study key before validation (dotted path, YAML value; "
                          "repeatable), e.g. --set pipeline_params.outer_lr=0.5 --set seeds=5")
    plan.add_argument("--json", action="store_true",
                      help="print one JSON document (cells, counts, cost estimate) to stdout "
                           "and nothing else")
    plan.add_argument("--no-cells", dest="cells", action="store_false",
                      help="with --json: leave the list of cells out (counts and estimate "
                           "only)")
    plan.add_argument("--baseline", default=None, metavar="PARQUET",
                      help="rows to price cells from, besides the study's own results "
                           "(default: the repository's benchmarks/baseline.parquet)")
    plan.set_defaults(handler=cmd_plan)

    status = commands.add_parser("status", help="cell counts by status from a study's output")
    status.add_argument("output_dir", metavar="OUTPUT_DIR")
    status.set_defaults(handler=cmd_status)

    sync = commands.add_parser("sync-mlflow",
                               help="log to MLflow the results it is missing (backfill)")
    sync.add_argument("output_dir", metavar="OUTPUT_DIR")
    sync.add_argument("--tracking-uri", default=None,
                      help="MLflow tracking URI (default: the one the study used)")
    sync.set_defaults(handler=cmd_sync_mlflow)

    problems = commands.add_parser(
        "problems", help="list the registered problems; with NAME, one problem's accepted "
                         "params, defaults and λ parametrization")
    problems.add_argument("name", metavar="NAME", nargs="?", default=None)
    problems.set_defaults(handler=cmd_problems)
    algorithms = commands.add_parser("algorithms", help="list the registered algorithms")
    algorithms.set_defaults(handler=cmd_algorithms)

    for name, (_, help_text) in FORWARDED.items():  # dispatched in main(), listed here
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 \
        else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def _error(message: str) -> None:
    text = " ".join(str(message).split())
    print(f"{PROG}: error: {text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m hypersweep``; returns the exit
    status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # Forwarded subcommands parse their own arguments: hand over everything after them.
        first = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), None)
        if first is not None and argv[first] in FORWARDED:
            _configure_logging(sum(arg.count("v") for arg in argv[:first]
                                   if arg.startswith("-") and set(arg[1:]) == {"v"})
                               + argv[:first].count("--verbose"))
            return run_forwarded(argv[first], argv[first + 1:])
        args = build_parser().parse_args(argv)
        _configure_logging(args.verbose)
        return args.handler(args)
    except UsageError as exc:
        _error(exc)
        return 2
    except ModuleNotFoundError as exc:  # a module or an optional dependency not installed
        _error(exc)
        return 1
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else 0


def console() -> None:
    """The ``hypersweep`` console script and ``python -m hypersweep``: :func:`main`, then a
    fast exit.

    When ``main`` has returned, every result is written and closed. The exit handlers run
    (``atexit``: logging, Ray, MLflow), the standard streams are flushed, and the process
    ends with ``os._exit``, skipping the interpreter's teardown of the modules it
    imported: 0.6 s after importing MLflow alone, 1.1–1.4 s at the end of a
    ``hypersweep run`` (docs/benchmarks.md §9c). An exception that escapes ``main`` exits
    the ordinary way, with its traceback."""
    code = main()
    atexit._run_exitfuncs()
    _flush_std()
    os._exit(code if isinstance(code, int) else 1)


__all__ = ["main", "console", "build_parser", "FORWARDED", "UsageError"]
