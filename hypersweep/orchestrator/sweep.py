"""One study's sweep: cells -> skip done -> actor pool -> Parquet -> MLflow (the loop).

:class:`Sweep` streams a study's cells to a pool of long-lived
:class:`~.actors.CellRunner` actors sized from ``resources``:

* **Feeding** — at most ``pool.IN_FLIGHT_PER_ACTOR`` tasks queued per actor, completions
  collected with ``ray.wait`` (timeout 0.2 s, so signals and flushes stay prompt); cells are
  pulled lazily from the ``expand`` generator through a small look-ahead window from which
  an actor preferably takes a cell with the ``shape_key`` it ran last (its process caches
  that problem instance and its compiled functions).
* **Batches** — a new cell of a pipeline with ``run_batch`` takes along window cells of
  its ``batch_key`` (the study's ``batching`` limits: ``max_cells``, ``max_cost``) as one
  streaming task whose rows arrive, and are recorded, one by one. Its clock restarts at
  each row, and it may run ``cell_timeout_s`` × its pending cells; a batch that overruns
  it, or whose process dies, costs its pending cells nothing: each is re-sent alone (where
  a hanging or crashing cell then meets the rules below), its received rows stay.
* **Resume** — cells whose latest Parquet row is ``ok`` are skipped; so are failed ones
  unless ``retry_failed``.
* **Faults** — a cell that raises or diverges is a row (``run_cell`` does it); a cell
  running longer than ``cell_timeout_s`` gets a ``timeout`` row and its actor is killed and
  restarted; a dead actor process (segfault, OOM, ``os._exit``) costs the cell that was
  running one attempt — it is retried up to ``max_retries`` times on a restarted or another
  actor, then recorded ``crashed`` — while the cells merely queued behind it are re-sent
  without being charged. The sweep always goes on.
* **Sinks** — rows go to Parquet first (one atomic part per 50 rows or 2 s), then to one
  background MLflow writer thread; MLflow being down costs one warning. When the run
  starts and however it ends (except on a failing disk), the parts holding superseded rows
  are compacted (:func:`~hypersweep.io.parquet.compact`): one row per cell in
  ``results/``, older attempts in ``history/``.

The pieces live apart: :mod:`.pool` (actors, pings, restarts), :mod:`.feed` (resume,
retries, look-ahead), :mod:`.sinks` (Parquet and MLflow), :mod:`.summary` (statistics and
tables); this module is the loop that ties them, and what a fault means for a cell.
Starting Ray, signals and several studies are :mod:`.driver`'s. Never imports torch or jax.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from hypersweep.io import lock as lock_mod
from hypersweep.io import parquet
from hypersweep.io.schema import STATUSES
from hypersweep.orchestrator import resources as resources_mod
from hypersweep.orchestrator import summary as summary_mod
from hypersweep.orchestrator.cell import Cell, failure_row
from hypersweep.orchestrator.feed import BatchPolicy, Feed, resume_filter
from hypersweep.orchestrator.pool import PING_RETRY_S, ActorKeeper, Pool, Slot, Task
from hypersweep.orchestrator.progress import SweepProgress
from hypersweep.orchestrator.sinks import Sinks
from hypersweep.orchestrator.summary import zero_hypergradient_warning
from hypersweep.registry import BACKENDS

if TYPE_CHECKING:
    from hypersweep.orchestrator.spec import StudySpec

log = logging.getLogger(__name__)

POLL_S = 0.2
#: Parquet flush policy: a part every FLUSH_ROWS rows or FLUSH_SECONDS, and on exit
FLUSH_ROWS = 50
FLUSH_SECONDS = 2.0


class Sweep:
    """One run of a study's cells: resume, the pool, the loop, faults and the sinks."""

    def __init__(self, study: "StudySpec", cells: Iterable[Cell], *, total: int | None,
                 quiet: bool, retry_failed: bool, stop_event: threading.Event,
                 ensure_ray: Callable[[], Any], address: str | None = None,
                 force: bool = False, keeper: ActorKeeper | None = None,
                 release_ray: Callable[[], Any] | None = None):
        self.study = study
        self.keeper = keeper  # actors handed over between studies (run_studies)
        # the session's last study: called once its runners are stopped after a normal
        # end, so that the session's own Ray stops while the MLflow writer drains
        self.release_ray = release_ray
        self.actor_key: str | None = None
        self.actors_reused = 0
        self.force = force  # take the output's lock even from a live holder
        self.request = resources_mod.study_request(study)
        # only an embedded Ray may drop GPU requests; a cluster may autoscale GPU nodes
        self.local_ray = not (address or os.environ.get("RAY_ADDRESS"))
        self.name = study.study
        self.output = Path(study.output).expanduser().absolute()
        self.max_retries = int(study.max_retries)
        self.cell_timeout_s = float(study.cell_timeout_s) if study.cell_timeout_s else None
        self.stop_event = stop_event
        self.ensure_ray = ensure_ray
        self.total = total
        self.retry_failed = retry_failed
        self.quiet = quiet
        self.pool = Pool(self._new_actor)
        self.counts: Counter = Counter()
        self.retries = 0
        self.timings: dict[str, float] = {}
        self.previous: dict[str, str] = {}
        self.cells = cells
        self.first_submit: float | None = None
        self.tasks_sent = 0
        self.cells_sent = 0

    # -- pool ------------------------------------------------------------------------------
    def _preload(self) -> tuple[str, ...]:
        return tuple(b for b in self.study.backend if b in BACKENDS)

    def _new_actor(self) -> Any:
        from hypersweep.orchestrator.actors import CellRunner, actor_options

        options = actor_options(self.request, compile_cache_setting=self.study.compile_cache)
        return CellRunner.options(**options).remote(self._preload())

    def _start_pool(self) -> None:
        start = time.perf_counter()
        self.ensure_ray()  # before the first import of ray: it sets Ray's environment
        import ray

        self.timings["ray_init_s"] = time.perf_counter() - start
        if self.local_ray and self.request.uses_gpu:
            # A study written for a GPU cluster runs unchanged on a CPU-only laptop.
            self.request, warning = resources_mod.without_missing_gpus(
                self.request, ray.cluster_resources().get("GPU", 0.0))
            if warning:
                log.warning(warning)
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        size = resources_mod.study_pool_size(self.study, nodes or ray.cluster_resources(),
                                             self.total)
        reuse: list = []
        if self.keeper is not None:
            from hypersweep.orchestrator.actors import actor_options

            options = actor_options(self.request, compile_cache_setting=self.study.compile_cache)
            self.actor_key = json.dumps(options, sort_keys=True, default=str)
            reuse = self.keeper.take(self.actor_key, self._preload(), size)
        self.actors_reused = len(reuse)
        self.pool.start(size, reuse)
        log.info("study %s: %d actor(s), %d of them kept from the previous study",
                 self.name, size, len(reuse))

    def _submit(self, slot: Slot) -> bool:
        batch = self.feed.take_batch(slot.last_key, idle=not slot.queue)
        if batch is None:
            return False
        if self.first_submit is None:
            self.first_submit = time.perf_counter()
        if len(batch.cells) == 1:
            self.pool.submit(slot, batch.cells[0], batch.attempts[0], isolate=batch.isolate)
        else:
            self.pool.submit_batch(slot, batch.cells, batch.attempts)
        self.tasks_sent += 1
        self.cells_sent += len(batch.cells)
        return True

    # -- outcomes --------------------------------------------------------------------------
    def _record(self, row: dict, traces: list) -> None:
        self.sinks.add(row, traces)
        self.counts[row["status"]] += 1
        self.progress.record(row["status"])
        if self.sinks.due():  # also within a batch's burst of rows: a part per FLUSH_ROWS
            self.sinks.flush()

    def _finished(self, slot: Slot, task: Task) -> None:
        import ray
        from ray.exceptions import RayError, RayTaskError

        if task.batched:
            self._stream(slot, task)
            return
        try:
            row, traces = ray.get(task.ref)  # ready already: this does not wait
        except RayTaskError as exc:  # the actor shell itself raised: an error row
            self.pool.pop(slot, task)
            self._record(failure_row(task.cell, task.attempt, "error",
                                     f"{type(exc).__name__}: {exc}", task.started_at), [])
            return
        except RayError as exc:  # the process died: actor error, OOM kill, lost worker
            self._actor_died(slot, exc)
            return
        self.pool.pop(slot, task)
        self._record(row, traces)

    def _take_rows(self, slot: Slot, task: Task) -> BaseException | None:
        """Record the rows of the batch ``task`` that have arrived, without waiting; return
        what ended its stream early, if anything: the error of its next row (a dead
        process, or the actor's shell raised) or :class:`StopIteration` (it ended without
        some cells)."""
        import ray
        from ray.exceptions import RayError

        while task.pending:
            if not ray.wait([task.ref], num_returns=1, timeout=0)[0]:
                return None
            try:
                ref = next(task.ref)
            except StopIteration as end:
                return end
            try:
                row, traces = ray.get(ref)  # ready already: this does not wait
            except RayError as exc:
                return exc
            if self.pool.received(slot, task, row["cell_id"]):
                self._record(row, traces)
        return None

    def _stream(self, slot: Slot, task: Task) -> None:
        """The batch ``task`` has rows (or its end) ready: record them; pop it when no
        cell is pending; if its process died, see :meth:`_actor_died`; if it ended with
        cells pending but its actor lives, re-send those alone, uncharged."""
        from ray.exceptions import RayTaskError

        ended = self._take_rows(slot, task)
        if ended is None:
            if not task.pending:
                self.pool.pop(slot, task)
            return
        if not isinstance(ended, (StopIteration, RayTaskError)):
            self._actor_died(slot, ended)
            return
        why = "its stream ended" if isinstance(ended, StopIteration) else \
            f"its runner raised: {str(ended).splitlines()[0][:200]}"
        log.warning("study %s: a batch of %d cells left %d without a row (%s); re-sending "
                    "them one by one", self.name, len(task.cells), len(task.pending), why)
        self.pool.pop(slot, task)
        for cell, attempt in reversed(list(task.pending.values())):
            self.feed.resend(cell, attempt, isolate=False)

    def _actor_died(self, slot: Slot, exc: BaseException) -> None:
        from hypersweep.orchestrator.actors import read_memory_report

        for task in list(slot.queue):  # rows sent before the death are kept
            if task.batched:
                self._take_rows(slot, task)
                if not task.pending:
                    self.pool.pop(slot, task)
        # The cells that may have been running: every cell queued whose row is missing.
        pending = [(task, cell, attempt) for task in slot.queue
                   for cell, attempt in task.pending.values()]
        culprit = None
        for task, cell, attempt in pending:
            reason = read_memory_report(cell.cell_id, attempt)  # read once: it is removed
            # The watchdog names a cell of a batch that had not yielded; which cell of the
            # batch grew is unknown, so only a cell running alone is certain.
            if reason is not None and culprit is None and len(task.pending) == 1:
                culprit = (task, cell, attempt, reason)
        if culprit is not None:
            # Stopped by its memory watchdog: the culprit is certain and a retry would
            # only outgrow memory_mb again, so it is recorded now (``crashed``, the
            # message says memory) and the others re-sent uncharged.
            task, cell, attempt, reason = culprit
            for _, other, other_attempt in reversed(pending):
                if other is not cell:
                    self.feed.resend(other, other_attempt, isolate=False)
            self._record(failure_row(cell, attempt, "crashed", reason, task.started_at), [])
            self.pool.restart(slot, kill=False)
            return
        if len(pending) > 1:
            # Which of the pending cells killed it is uncertain: the reply of a cell that
            # finished just before the crash can be lost with the process, and the cells
            # of a batch run together. Re-run each alone, uncharged; a culprit then dies
            # alone and is charged below.
            for _, cell, attempt in reversed(pending):
                self.feed.resend(cell, attempt, isolate=True)
            self.pool.restart(slot, kill=False)
            return
        if not pending:  # it died after its last row: nothing to blame
            self.pool.restart(slot, kill=False)
            return
        blamed, cell, attempt = pending[0]
        message = f"{type(exc).__name__}: {exc}".strip()
        if attempt <= self.max_retries:
            self.feed.resend(cell, attempt + 1, isolate=True)
            self.retries += 1
            self.progress.retries += 1
            log.info("cell %s: runner died (attempt %d), retrying", cell.cell_id, attempt)
        else:
            self._record(failure_row(
                cell, attempt, "crashed",
                f"worker process died on each of {attempt} attempts; last: {message}",
                blamed.started_at), [])
        self.pool.restart(slot, kill=False)

    def _allowed_s(self, slot: Slot) -> float:
        """How long the head of ``slot`` may run since its clock started:
        ``cell_timeout_s`` per cell it has not sent a row for."""
        return self.cell_timeout_s * max(1, len(slot.queue[0].pending))

    def _check_timeouts(self) -> None:
        if self.cell_timeout_s is None:
            return
        for slot in self.pool.running():
            if time.monotonic() - slot.head_since <= self._allowed_s(slot):
                continue
            head = slot.queue[0]
            if head.batched:  # rows that arrived since the wait restart its clock
                self._stream(slot, head)
                if not (slot.ready and slot.queue and slot.queue[0] is head) or \
                        time.monotonic() - slot.head_since <= self._allowed_s(slot):
                    continue
            running = time.monotonic() - slot.head_since
            for task in reversed(list(slot.queue)[1:]):  # never started: re-sent as is
                for cell, attempt in reversed(list(task.pending.values())):
                    self.feed.resend(cell, attempt, isolate=False)
            pending = list(head.pending.values())
            if len(pending) == 1:
                cell, attempt = pending[0]
                message = (f"exceeded cell_timeout_s={self.cell_timeout_s:g} (stopped "
                           f"after {running:.1f} s); its runner was restarted")
                self._record(failure_row(cell, attempt, "timeout", message, head.started_at,
                                         running), [])
            else:
                # Which cell of the batch hangs is unknown: each is re-sent alone,
                # uncharged, where a hanging one times out with the plain cell_timeout_s.
                log.info("study %s: a batch overran %d × cell_timeout_s; re-sending its "
                         "pending cells one by one", self.name, len(pending))
                for cell, attempt in reversed(pending):
                    self.feed.resend(cell, attempt, isolate=False)
            self.pool.restart(slot, kill=True)

    # -- main loop -------------------------------------------------------------------------
    def _loop(self) -> bool:
        """Run until every cell is recorded (True) or a stop is requested (False)."""
        import ray

        while True:
            if self.stop_event.is_set():
                return False
            self.pool.ping_due(time.monotonic())
            for slot in self.pool.slots:
                while slot.wants_more() and self._submit(slot):
                    pass
            if not self.pool.by_ref and self.feed.empty():
                return True
            refs = self.pool.refs()
            timeout = POLL_S
            if not refs:  # only restarting actors waiting for their next ping
                time.sleep(PING_RETRY_S / 5)
                continue
            if self.cell_timeout_s is not None:
                heads = [s.head_since + self._allowed_s(s) for s in self.pool.running()]
                if heads:
                    timeout = max(0.0, min(timeout, min(heads) - time.monotonic() + 0.01))
            ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
            if ready:
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                for ref in ready:
                    if ref in self.pool.pings:
                        self.pool.on_ping(ref)
                for slot, task in self.pool.finished(set(ready)):
                    if task in slot.queue:  # an earlier outcome may have restarted it
                        self._finished(slot, task)
            self._check_timeouts()
            if self.sinks.due():
                self.sinks.flush()
            self.progress.refresh()

    def run(self) -> dict:
        """Hold the output's lock (before writing anything or starting Ray or MLflow)
        around the sweep; raises :class:`~.lock.LockHeld` at once if another driver holds
        it, :class:`~.parquet.SinkWriteError` if Parquet cannot be written (both exit 2)."""
        self.output.mkdir(parents=True, exist_ok=True)
        with lock_mod.OutputLock(self.output, study=self.name, force=self.force):
            return self._run_locked()

    def _run_locked(self) -> dict:
        wall_start = time.perf_counter()
        self.sinks = Sinks(self.study, self.output, flush_rows=FLUSH_ROWS,
                           flush_seconds=FLUSH_SECONDS)
        self._compact("start")  # repairs a run that was killed before its own compaction
        table = parquet.read_results(self.output)
        self.previous = dict(zip(table.column("cell_id").to_pylist(),
                                 table.column("status").to_pylist()))
        batching = self.study.batching
        self.feed = Feed(self.cells, resume_filter(self.previous, self.retry_failed),
                         batching=BatchPolicy.from_registry(batching.max_cells,
                                                            batching.max_cost))
        self.progress = SweepProgress(None, quiet=self.quiet, label=self.name)
        completed = False
        interrupted = False
        crashed = True
        write_error: parquet.SinkWriteError | None = None
        try:
            if not self.feed.empty():
                self._start_pool()
                if self.total is not None:
                    # Exact once the source is exhausted; until then an upper bound
                    # corrected by the previously finished cells we know of.
                    todo = self.total - sum(1 for s in self.previous.values()
                                            if s == "ok" or not self.retry_failed)
                    self.progress.set_total(max(todo, len(self.feed.window)))
                loop_start = time.perf_counter()
                completed = self._loop()
                interrupted = not completed
                loop_end = time.perf_counter()
                self.timings["loop_s"] = loop_end - loop_start
                if self.first_submit is not None:  # excludes waiting for the actor pool
                    self.timings["cells_s"] = loop_end - self.first_submit
            else:
                completed = True
            crashed = False
        except parquet.SinkWriteError as exc:  # retried already: stop, keep what is saved
            write_error = exc
        finally:
            if write_error is None:
                try:
                    self.sinks.flush(last=True)
                except parquet.SinkWriteError as exc:
                    write_error = exc
            self.progress.close()
            if write_error is not None:
                completed = False
            if (self.keeper is not None and self.actor_key is not None and completed
                    and self.release_ray is None):
                self.keeper.keep(self.actor_key, self._preload(),
                                 [slot.actor for slot in self.pool.slots])
            else:
                self.pool.stop()
                if self.release_ray is not None and completed:
                    try:
                        self.release_ray()
                    except Exception as exc:  # noqa: BLE001 - the summary and MLflow go on
                        log.warning("study %s: stopping Ray failed (%s: %s)", self.name,
                                    type(exc).__name__, exc)
            status = "FINISHED" if completed else (
                "FAILED" if crashed or write_error else "KILLED")
            summary = self._summary(interrupted)
            if zero_hypergradient_warning(summary):
                log.warning(zero_hypergradient_warning(summary))
            self.sinks.close(status=status, summary=None if interrupted else summary,
                             timeout=1.0 if not completed else None)
            mlflow = self.sinks.mlflow_summary()
            if mlflow is not None:
                summary["mlflow"] = mlflow
            # After the pool and MLflow are closed, so that a second Ctrl-C during it
            # skips nothing else (it is safe to kill); a failing disk: the next start's.
            if write_error is None:
                self._compact("end")
            summary["timings"]["compact_s"] = self.sinks.parquet.compact_seconds
            summary["wall_time_s"] = time.perf_counter() - wall_start
            summary["timings"]["mlflow_drain_wait_s"] = self.sinks.drain_wait_s
        if write_error is not None:
            summary["write_error"] = str(write_error)
            raise self.sinks.parquet.stopped(write_error, summary)
        return summary

    def _compact(self, when: str) -> None:
        """One row per cell in ``results/`` (:func:`~hypersweep.io.parquet.compact`), at
        the ``when`` ("start", "end") of the run. A failure costs one warning: the rows
        are safe as they are, ``read_results`` still counts each cell once, and the next
        run compacts again."""
        try:
            done = self.sinks.parquet.compact()
        except Exception as exc:  # noqa: BLE001 - the sweep's rows are safe without it
            log.warning("study %s: compacting %s at the %s of the run failed (%s: %s); "
                        "every row is kept and the next run compacts again", self.name,
                        self.output, when, type(exc).__name__, exc)
            return
        for stats in done.values():
            if stats.changed:
                log.info("study %s: %s/ compacted at the %s of the run: %d part(s) "
                         "replaced by %s (%d latest rows), %d superseded row(s) moved to "
                         "%s/%s/, %.2f s", self.name, stats.kind, when,
                         stats.parts_replaced, ", ".join(stats.new_parts) or "none",
                         stats.rows_kept, stats.rows_to_history, parquet.HISTORY_DIR,
                         stats.kind, stats.seconds)

    def _summary(self, interrupted: bool) -> dict:
        table = parquet.read_results(self.output)
        sink = self.sinks.parquet
        self.timings["parquet_s"] = sink.seconds
        return {
            "study": self.name,
            "output": str(self.output),
            "results_dir": str(sink.results_dir),
            "traces_dir": str(sink.traces_dir),
            "study_yaml": str(self.output / parquet.STUDY_FILE),
            "cells_seen": self.feed.seen,
            "cells_skipped": self.feed.skipped,
            "cells_done": sum(self.counts.values()),
            "counts": {s: self.counts.get(s, 0) for s in STATUSES},
            "study_counts": summary_mod.study_counts(table),
            "retries": self.retries,
            "actors": len(self.pool.slots),
            "actors_reused": self.actors_reused,
            "actor_replacements": self.pool.replacements,
            "batches": self.tasks_sent,  # tasks sent, of one cell or more
            "mean_batch_size": (self.cells_sent / self.tasks_sent) if self.tasks_sent
            else None,
            "interrupted": interrupted,
            "per_pair": summary_mod.per_pair(table),
            **summary_mod.compute_totals(table),
            "timings": dict(self.timings),
            "parquet_files": sink.files_written,
        }
