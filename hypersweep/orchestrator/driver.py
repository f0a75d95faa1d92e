"""The entry points: ``run_study``, ``run_studies`` and ``run_cells``.

``run_study(study)`` is what ``hypersweep run study.yaml`` calls (the study is validated
before). It starts an embedded loopback-only Ray (or joins a cluster: ``address`` or
``$RAY_ADDRESS`` as set by ``ray job submit``) and runs the study's :class:`~.sweep.Sweep`
(the loop: feeding, resume, faults, sinks).

* **Several studies** — :func:`run_studies` runs them one after another in one Ray
  session (``hypersweep run a.yaml b.yaml``), each with its own lock, sinks and summary;
  a study's runners go on to the next when it asks for the same actors
  (:class:`~.pool.ActorKeeper`).
* **Signals** — SIGTERM (``ray job stop``) and SIGINT flush the finished rows, mark the
  MLflow parent run KILLED and raise :class:`~.signals.SweepInterrupted` (exit code
  128 + signal).

The driver never imports torch or jax; the actors do, through the pipeline.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from hypersweep.io import lock as lock_mod
from hypersweep.io import tracking
from hypersweep.orchestrator.cell import Cell
from hypersweep.orchestrator.pool import ActorKeeper
from hypersweep.orchestrator.ray_env import init_ray, shutdown_ray
from hypersweep.orchestrator.signals import StopSignals
from hypersweep.orchestrator.sweep import Sweep
from hypersweep.registry import load_plugins

if TYPE_CHECKING:
    from hypersweep.orchestrator.spec import StudySpec


def run_cells(study: "StudySpec", cells: Iterable[Cell], *, total: int | None = None,
              quiet: bool = False, retry_failed: bool = False,
              stop_event: threading.Event | None = None, address: str | None = None,
              force: bool = False) -> dict:
    """Run ``cells`` of ``study`` on the current Ray, or on one started/joined as in
    :func:`run_study` when none is initialized (and then left running). Returns the
    summary; ``summary["interrupted"]`` if ``stop_event`` was set."""
    load_plugins()
    cells, total = _study_cells(study, cells, total)
    sweep = Sweep(study, cells, total=total, quiet=quiet, retry_failed=retry_failed,
                   stop_event=stop_event or threading.Event(),
                   ensure_ray=lambda: init_ray(address), address=address, force=force)
    return sweep.run()


class _Session:
    """One Ray session for one or more studies: the stop signals, Ray started (or
    joined) on the first study that has cells to run, the actors kept between studies,
    and Ray shut down at the end if this session started it."""

    def __init__(self, address: str | None, *, dashboard: bool = False,
                 keep_actors: bool = False):
        self.address = address
        self.dashboard = dashboard
        self.stops = StopSignals()
        self.started: list[bool] = []
        self.released = False
        self.keeper = ActorKeeper() if keep_actors else None

    def ensure_ray(self) -> None:
        if self.started:
            return
        self.started.append(init_ray(self.address, dashboard=self.dashboard))
        self.stops.install()  # again after ray.init, which installs its own SIGTERM handler

    def __enter__(self) -> "_Session":
        self.stops.install()
        tracking.set_mlflow_env_defaults()
        return self

    def release_ray(self) -> None:
        """Kill the kept actors and shut down the Ray this session started, now; called
        by the last study once its runners are stopped, so that Ray's stop (0.3–0.4 s)
        overlaps the study's MLflow drain instead of following it."""
        if self.released or not self.started:
            return
        self.released = True
        try:
            if self.keeper is not None:
                self.keeper.close()
        finally:
            if any(self.started):
                shutdown_ray()

    def __exit__(self, *exc_info) -> None:
        self.stops.restore()
        self.release_ray()

    def sweep(self, study: "StudySpec", cells: Iterable[Cell], total: int | None, *,
              quiet: bool, retry_failed: bool, force: bool, last: bool = False) -> dict:
        """Run one study; ``last``: no study follows it in this session."""
        return Sweep(study, cells, total=total, quiet=quiet, retry_failed=retry_failed,
                      stop_event=self.stops.stop_event, ensure_ray=self.ensure_ray,
                      address=self.address, force=force, keeper=self.keeper,
                      release_ray=self.release_ray if last else None).run()


def _study_cells(study: "StudySpec", cells: Iterable[Cell] | None,
                 total: int | None) -> tuple[Iterable[Cell], int | None]:
    if cells is None:
        from hypersweep.orchestrator import expand

        return expand.expand(study), expand.count_cells(study)
    if total is None and hasattr(cells, "__len__"):
        total = len(cells)  # type: ignore[arg-type]
    return cells, total


def run_study(study: "StudySpec", *, address: str | None = None, quiet: bool = False,
              retry_failed: bool = False, cells: Iterable[Cell] | None = None,
              total: int | None = None, force: bool = False, dashboard: bool = False) -> dict:
    """Run a validated study to completion; return its summary (see ``print_summary``).

    ``address``: a Ray cluster to join ("auto", "ray://…", "host:port"); default
    ``$RAY_ADDRESS`` (set by ``ray job submit``) or else an embedded local Ray on
    127.0.0.1 that is shut down at the end (``dashboard``: with Ray's dashboard).
    ``retry_failed``: re-run cells whose latest
    status is error/diverged/timeout/crashed (``ok`` cells are always skipped).
    ``cells``/``total``: run these instead of ``expand.expand(study)`` (tests, tools).
    ``force``: take the output's lock even if another live driver holds it.
    Raises :class:`~.signals.SweepInterrupted` after SIGTERM/SIGINT (rows flushed first),
    :class:`~.lock.LockHeld` if another driver holds the output, and
    :class:`~.parquet.SinkWriteError` if Parquet parts cannot be written.
    """
    load_plugins()
    cells, total = _study_cells(study, cells, total)
    with _Session(address, dashboard=dashboard) as session:
        summary = session.sweep(study, cells, total, quiet=quiet,
                                retry_failed=retry_failed, force=force, last=True)
    if summary["interrupted"]:
        raise session.stops.interrupted(summary)
    return summary


def same_outputs(studies: Iterable["StudySpec"]) -> list[tuple[str, str, str]]:
    """(output, first study, second study) for each output that two of ``studies`` would
    both write (paths compared once absolute and resolved)."""
    seen: dict[Path, str] = {}
    clashes = []
    for study in studies:
        path = Path(study.output).expanduser().resolve()
        if path in seen:
            clashes.append((str(study.output), seen[path], study.study))
        else:
            seen[path] = study.study
    return clashes


def run_studies(studies: "list[StudySpec]", *, address: str | None = None,
                quiet: bool = False, retry_failed: bool = False, force: bool = False,
                dashboard: bool = False,
                on_result: Callable[["StudySpec", Any], None] | None = None) -> list:
    """Run validated studies one after another in one Ray session (what
    ``hypersweep run a.yaml b.yaml`` calls); return each study's summary, or the
    :class:`~.lock.OutputError` that stopped it, in order.

    Ray is started (embedded, as in :func:`run_study`) or joined (``address``,
    ``$RAY_ADDRESS``) once, when the first study with pending cells needs it, and shut
    down after the last. Each study keeps everything of its own: output lock, resume,
    Parquet, MLflow run, summary; ``quiet``, ``retry_failed`` and ``force`` apply to
    each. A study that cannot take its output (held lock, unwritable Parquet) is
    reported and the next one runs.

    Actors: a study that finishes normally hands its runners to the next one when its
    actor request (``.options``: resources, restarts, runtime_env) is identical and its
    backends are among those the runners preloaded; the pool is then resized to the
    new study's size (extra actors killed, missing ones created). Otherwise, and after
    any interruption, the runners are killed and the next study creates a new pool.

    ``on_result(study, summary_or_error)`` is called as each study ends (the CLI prints
    the summary then, before the next study starts). Raises ``ValueError`` if two
    studies write the same output, and :class:`~.signals.SweepInterrupted` after
    SIGTERM/SIGINT, with the summary of the study it stopped; the studies before it
    are complete and saved, the ones after it never start.
    """
    studies = list(studies)
    clashes = same_outputs(studies)
    if clashes:
        output, first, second = clashes[0]
        raise ValueError(f"studies {first!r} and {second!r} both write output {output!r}; "
                         "give each study its own output")
    load_plugins()
    results: list = []
    with _Session(address, dashboard=dashboard, keep_actors=True) as session:
        for index, study in enumerate(studies):
            if session.stops.stop_event.is_set():
                summary = {"study": study.study, "cells_done": 0, "interrupted": True,
                           "results_dir": str(Path(study.output) / "results")}
                break
            cells, total = _study_cells(study, None, None)
            try:
                summary = session.sweep(study, cells, total, quiet=quiet,
                                        retry_failed=retry_failed, force=force,
                                        last=index == len(studies) - 1)
            except lock_mod.OutputError as exc:
                results.append(exc)
                if on_result is not None:
                    on_result(study, exc)
                continue
            if summary["interrupted"]:
                break
            results.append(summary)
            if on_result is not None:
                on_result(study, summary)
        else:
            return results
    raise session.stops.interrupted(summary)
