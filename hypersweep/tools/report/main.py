"""``hypersweep report RESULTS_DIR... [--out DIR]``: reads one or more study output
directories and writes to ``DIR``:

``error_vs_t.png``
    hypergradient error vs t, one panel per problem (log y), one line per (algorithm,
    K-setting): median over seeds with a 20–80 % band — the four panels of Grazzi et al.
    2020 for logreg, kernel_ridge, biased_reg, hyper_rep. Each line's observed linear
    rate r (least squares of log error vs t over its decreasing part: error ≈ c·rᵗ) is
    printed next to the problem's contraction factor q of Φ.
``best_val_vs_cost.png``
    best validation loss so far vs wall time and vs oracle calls, gradient
    HPO (``hpo`` traces, solid) against black-box search (``blackbox`` traces, dashed),
    median over seeds with a 20–80 % band.
``grad_norm_vs_cost.png``
    ‖∇F(λ)‖² (the float64 oracle's, log y) vs wall time and vs oracle calls, one row of
    panels per problem, one line per method: every hpo method (solvers, double-loop
    estimators, online; solid) and black-box searcher (at its best λ so far; dashed),
    median over seeds with a 20–80 % band — when the traces carry ``outer_grad_norm``.
``comparison.csv`` / ``rates.csv`` / ``solver_table.csv``
    the tables below, machine-readable. ``solver_table.csv``: per problem and method,
    the median wall time and oracle calls to first reach ‖∇F(λ_k)‖² ≤ 1e-3·‖∇F(λ₀)‖²
    (over the seeds that reached it, NaN when none; ``seeds_reached`` says how many of
    the ok seeds), the median final ‖∇F‖², and the seeds (written with the figure).
``tutorial_table.txt``
    the ridge tutorial's table, when the results hold HPO or black-box cells on ridge.
``report.html``
    the interactive page (:mod:`.interactive`): self-contained and offline (Plotly
    embedded), every figure above as one plot per panel with a choice of x axis (t or
    outer step / wall time / oracle calls), log toggles, a problem selector and hover
    with the run's parameters; the tables with unambiguous column names; a header with
    the machine, devices, versions, git commit, the studies' YAML and links to their
    MLflow runs (``--mlflow-ui``).
``report_static.html``
    everything above with the PNGs embedded (base64), plus per problem: method, final best
    val loss, test metric, time and oracle calls to reach within 1 % of the best val loss
    any method found (per seed), the solver table, and the summary table.

The files are logged as artifacts of each study's MLflow parent run (tag
``hypersweep.study``) when its tracking store is reachable; otherwise a warning. That
MLflow work (importing mlflow, finding the parent runs for the page's links, logging the
files) runs in a child process while this one draws (:class:`MlflowSide`): about 4 s of
the demo's report, which a thread could not overlap (the GIL). ``hypersweep run
--report`` (what ``make demo`` runs) calls :func:`write_report` in its own process once
the studies end, with its MLflow side there too (:class:`MlflowHere`): the run's writer
has imported mlflow already.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hypersweep.io.parquet import STUDY_FILE
from hypersweep.io.tracking import TAG_ROLE, TAG_STUDY, choose_tracking_uri
from hypersweep.tools.report import figures, interactive
from hypersweep.tools.report.page import render_html
from hypersweep.tools.report.reading import read_outputs
from hypersweep.tools.report.tables import (
    comparison_table,
    solver_table,
    summary_table,
    tutorial_summary,
)

log = logging.getLogger(__name__)

_SQLITE = "sqlite:///"
#: where ``mlflow ui`` listens by default: the page's links point there
DEFAULT_MLFLOW_UI = "http://127.0.0.1:5000"


def build_report(dirs: Sequence[str | Path], out: str | Path, *,
                 error: str = "hypergrad_rel_error",
                 mlflow_links: Sequence[tuple[str, str]] | Callable[[], Sequence[tuple[str, str]]]
                 = ()) -> dict:
    """Read ``dirs``, write the figures, CSVs, ``report.html`` (interactive) and
    ``report_static.html`` (the PNGs) to ``out``; return ``{"files": [...], "figures":
    {name: Figure}, "spec", "rates", "comparison", "solver", "summary", "results",
    "tutorial"}``. ``mlflow_links`` may be a callable, called only when the page that
    shows them is written (:class:`MlflowSide` finds them meanwhile)."""
    results, traces = read_outputs(dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    found, images, files = {}, {}, []
    fig1, rates = figures.plot_error_vs_t(results, error=error)
    fig2 = figures.plot_best_val(results, traces)
    fig3 = figures.plot_grad_norm(results, traces)
    fig4 = figures.plot_test_vs_time(results, traces)
    for name, fig in (("error_vs_t.png", fig1), ("best_val_vs_cost.png", fig2),
                      ("grad_norm_vs_cost.png", fig3), ("test_vs_time.png", fig4)):
        if fig is None:
            continue
        found[name] = fig
        images[name] = figures.png(fig)
        (out / name).write_bytes(images[name])
        files.append(out / name)
        figures.close(fig)
    comparison = comparison_table(results, traces)
    solver = solver_table(results, traces)
    summary = summary_table(results)
    for name, df in (("rates.csv", rates), ("comparison.csv", comparison),
                     ("solver_table.csv", solver)):
        if len(df):
            df.to_csv(out / name, index=False)
            files.append(out / name)
    tutorial = tutorial_summary(results)
    if tutorial:
        (out / "tutorial_table.txt").write_text(tutorial, encoding="utf-8")
        files.append(out / "tutorial_table.txt")
    page = render_html(sources=[str(d) for d in dirs], summary=summary, images=images,
                       rates=rates, comparison=comparison, solver=solver,
                       tutorial=tutorial)
    (out / "report_static.html").write_text(page, encoding="utf-8")
    files.append(out / "report_static.html")
    spec = interactive.figure_spec(results, traces, error=error)
    if callable(mlflow_links):
        mlflow_links = mlflow_links()
    page = interactive.render_page(
        spec, prov=interactive.provenance(results, dirs), summary=summary,
        comparison=comparison, solver=solver, rates=rates, mlflow_links=mlflow_links)
    (out / "report.html").write_text(page, encoding="utf-8")
    files.append(out / "report.html")
    return {"files": files, "figures": found, "spec": spec, "rates": rates,
            "comparison": comparison,
            "solver": solver, "summary": summary, "results": results,
            "tutorial": tutorial}


def _study_tracking(output_dir: Path, override: str | None) -> tuple[str | None, str, str]:
    """(tracking URI or None, experiment, study) from ``output_dir/study.yaml``.

    The URI is :func:`~hypersweep.io.tracking.choose_tracking_uri` of ``override`` and
    the study's ``mlflow.tracking_uri``. A sqlite store that is not where that says is
    looked for beside the output (the study ran from another directory, or the output
    moved with its store); None when it is nowhere, or the study disabled MLflow.
    """
    import yaml

    raw = {}
    study_file = output_dir / STUDY_FILE
    if study_file.is_file():
        raw = yaml.safe_load(study_file.read_text(encoding="utf-8")) or {}
    cfg = raw.get("mlflow") or {}
    study = raw.get("study") or output_dir.name
    if cfg.get("enabled") is False and not override:
        return None, study, study
    uri = choose_tracking_uri(override, cfg.get("tracking_uri"))
    if uri.startswith(_SQLITE):
        path = Path(uri[len(_SQLITE):])
        candidates = [path, output_dir.parent / path.name, output_dir / path.name]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            log.warning("MLflow store %s not found; report not logged to MLflow",
                        candidates[0])
            return None, study, study
        uri = _SQLITE + str(path.resolve())
    return uri, cfg.get("experiment") or study, study


def _parent_run(client, experiment: str, study: str):
    """(experiment id, the study's parent run id) or None."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{TAG_STUDY}` = '{study}' and "
                                           f"tags.`{TAG_ROLE}` = 'parent'", max_results=10)
    if not runs:
        return None
    return exp.experiment_id, sorted(runs, key=lambda r: r.info.start_time or 0)[0].info.run_id


def _study_parent(directory: str | Path, tracking_uri: str | None, *, relocate: bool = False):
    """(client, study, experiment id, parent run id) of one output's study, or None when
    MLflow is off for it or its parent run is not found (a warning says which)."""
    uri, experiment, study = _study_tracking(Path(directory), tracking_uri)
    if uri is None:
        return None
    from hypersweep.io.tracking import relocate_artifacts, set_mlflow_env_defaults
    set_mlflow_env_defaults()
    if relocate:
        relocate_artifacts(uri)  # a moved results folder: log beside its own store
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    found = _parent_run(client, experiment, study)
    if found is None:
        log.warning("no MLflow parent run tagged %s=%r in experiment %r at %s",
                    TAG_STUDY, study, experiment, uri)
        return None
    return client, study, *found


def mlflow_links(dirs: Sequence[str | Path], *, ui_url: str,
                 tracking_uri: str | None = None) -> list[tuple[str, str]]:
    """(label, URL in the MLflow UI at ``ui_url``) of each study's experiment and parent
    run (its children are listed under it); empty where the store is unreachable."""
    links = []
    for directory in dirs:
        try:
            found = _study_parent(directory, tracking_uri)
            if found is None:
                continue
            _, study, exp_id, run_id = found
            # MLflow 3.17's UI picks its view from ?workflowType= (then remembers it), not
            # from the experiment's tag: the links open the model-training view
            base, view = ui_url.rstrip("/"), "?workflowType=machine_learning"
            links.append((f"{study} (runs)", f"{base}/#/experiments/{exp_id}/runs{view}"))
            links.append((f"{study} (parent run)",
                          f"{base}/#/experiments/{exp_id}/runs/{run_id}{view}"))
        except Exception as exc:  # a view: the report is written without links
            log.warning("no MLflow links for %s: %s", directory, exc)
    return links


def log_to_mlflow(dirs: Sequence[str | Path], files: Sequence[Path], *,
                  tracking_uri: str | None = None) -> list[str]:
    """Log ``files`` under ``report/`` of each study's MLflow parent run; returns the run
    ids logged to. Never raises: an unreachable store is a warning."""
    logged = []
    for directory in dirs:
        try:
            found = _study_parent(directory, tracking_uri, relocate=True)
            if found is None:
                continue
            client, run_id = found[0], found[3]
            for f in files:
                client.log_artifact(run_id, str(f), artifact_path="report")
            logged.append(run_id)
        except Exception as exc:  # MLflow is a view; the files are already written
            log.warning("could not log the report to MLflow for %s: %s", directory, exc)
    return logged


def _mlflow_side(conn, dirs: list[str], ui_url: str, tracking_uri: str | None) -> None:
    """The child of :class:`MlflowSide`: send the links, then log the files it is sent
    (None: nothing) and send the run ids logged to."""
    try:
        conn.send(mlflow_links(dirs, ui_url=ui_url, tracking_uri=tracking_uri))
        files = conn.recv()
        conn.send([] if files is None else
                  log_to_mlflow(dirs, [Path(f) for f in files], tracking_uri=tracking_uri))
    except (EOFError, BrokenPipeError):  # the parent gave up on us
        pass
    finally:
        conn.close()


class MlflowHere:
    """The report's MLflow work in this process, with :class:`MlflowSide`'s interface: for
    ``hypersweep run --report``, whose MLflow writer has imported mlflow already (a child
    would import it again: ~2.5 s of CPU)."""

    def __init__(self, dirs: Sequence[str | Path], *, ui_url: str,
                 tracking_uri: str | None):
        self.dirs, self.ui_url, self.tracking_uri = list(dirs), ui_url, tracking_uri

    def links(self) -> list[tuple[str, str]]:
        return mlflow_links(self.dirs, ui_url=self.ui_url, tracking_uri=self.tracking_uri)

    def log(self, files: Sequence[Path]) -> list[str]:
        return log_to_mlflow(self.dirs, files, tracking_uri=self.tracking_uri)

    def close(self) -> None:
        pass


class MlflowSide:
    """The report's MLflow work in a child process (``spawn``: a fresh interpreter, no
    state shared with this one): :func:`mlflow_links` starts at once, :meth:`links` waits
    for them, :meth:`log` hands it the files for :func:`log_to_mlflow` and waits.
    MLflow is a view of the results: a child that fails or hangs costs a warning and
    leaves the report's files as they are (no links, nothing logged)."""

    def __init__(self, dirs: Sequence[str | Path], *, ui_url: str,
                 tracking_uri: str | None, timeout: float = 300.0):
        self.timeout = timeout
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_mlflow_side, name="hypersweep-report-mlflow",
                                   args=(child, [str(d) for d in dirs], ui_url,
                                         tracking_uri), daemon=True)
        self.process.start()
        child.close()

    def _receive(self, what: str):
        try:
            if self.conn.poll(self.timeout):
                return self.conn.recv()
            log.warning("MLflow: no answer for %s within %.0f s", what, self.timeout)
        except (EOFError, OSError) as exc:
            log.warning("MLflow: the report's MLflow process ended early (%s): %s", what,
                        exc or "no answer")
        return None

    def links(self) -> list[tuple[str, str]]:
        return [tuple(link) for link in self._receive("the links") or []]

    def log(self, files: Sequence[Path]) -> list[str]:
        try:
            self.conn.send([str(f) for f in files])
        except OSError as exc:
            log.warning("MLflow: the report was not logged: %s", exc)
            return []
        return self._receive("logging the report") or []

    def close(self) -> None:
        self.conn.close()
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def main(argv: Sequence[str] | None = None) -> int:
    """``hypersweep report RESULTS_DIR... [--out DIR] [--mlflow-uri URI] [--no-mlflow]``
    (``--out`` defaults to ``RESULTS_DIR/report`` for one directory)."""
    parser = argparse.ArgumentParser(
        prog="hypersweep report",
        description="Figures, tables and an HTML page from study output directories.")
    parser.add_argument("results", nargs="+", help="study output directories")
    parser.add_argument("--out", default=None,
                        help="directory for the report (default: RESULTS_DIR/report for "
                             "one results directory; required for several)")
    parser.add_argument("--error", choices=("rel", "abs"), default="rel",
                        help="hypergradient error to plot (default: rel)")
    parser.add_argument("--mlflow-uri", default=None,
                        help="tracking URI (default: each study's study.yaml)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--mlflow-ui", default=DEFAULT_MLFLOW_UI,
                        help="the MLflow UI the page links to (default: "
                             "http://127.0.0.1:5000, where `mlflow ui` listens)")
    args = parser.parse_args(argv)
    for d in args.results:
        if not Path(d).is_dir():
            sys.stderr.write(f"error: results directory {d!r} does not exist\n")
            return 2
    if args.out is None:
        if len(args.results) > 1:
            sys.stderr.write("error: --out is required with several results directories "
                             "(one report for all of them)\n")
            return 2
        args.out = str(Path(args.results[0]) / "report")
    error = "hypergrad_rel_error" if args.error == "rel" else "hypergrad_abs_error"
    report = write_report(args.results, args.out, error=error, mlflow=not args.no_mlflow,
                          ui_url=args.mlflow_ui, tracking_uri=args.mlflow_uri)
    say_written(report, args.out)
    return 0


def write_report(dirs: Sequence[str | Path], out: str | Path, *,
                 error: str = "hypergrad_rel_error", mlflow: bool = True,
                 ui_url: str = DEFAULT_MLFLOW_UI, tracking_uri: str | None = None,
                 mlflow_in_process: bool = False) -> dict:
    """:func:`build_report` with its MLflow side (links on the page, the files logged to
    each study's parent run; ``mlflow=False``: neither): in a child process
    (:class:`MlflowSide`), or here (:class:`MlflowHere`) with ``mlflow_in_process``, for
    a caller that has imported mlflow already."""
    side = None
    if mlflow:
        side = (MlflowHere if mlflow_in_process else MlflowSide)(
            dirs, ui_url=ui_url, tracking_uri=tracking_uri)
    try:
        report = build_report(dirs, out, error=error,
                              mlflow_links=side.links if side else ())
        if report["results"].empty:
            log.warning("no result rows found in %s", ", ".join(map(str, dirs)))
        if side is not None:
            side.log(report["files"])
    finally:
        if side is not None:
            side.close()
    return report


def say_written(report: dict, out: str | Path) -> None:
    """What ``hypersweep report`` prints once the files are written."""
    if report.get("tutorial"):
        sys.stdout.write(report["tutorial"] + "\n")
    sys.stdout.write(f"report written to {Path(out) / 'report.html'}\n")
