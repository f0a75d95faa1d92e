"""The sweep driver: validated study -> cells -> skip done -> actor pool -> Parquet -> MLflow.

``run_study(study)`` is what ``hypersweep run study.yaml`` calls (the study is validated
before). It starts an embedded loopback-only Ray (or joins a cluster: ``address`` or
``$RAY_ADDRESS`` as set by ``ray job submit``), builds a pool of long-lived
:class:`~.actors.CellRunner` actors sized from ``resources``, and streams cells to them:

* **Feeding** — at most ``IN_FLIGHT_PER_ACTOR`` cells queued per actor, completions
  collected with ``ray.wait`` (timeout 0.2 s, so signals and flushes stay prompt); cells are
  pulled lazily from the ``expand`` generator through a small look-ahead window from which
  an actor preferably takes a cell with the ``shape_key`` it ran last (its process caches
  that problem instance and its compiled functions).
* **Resume** — cells whose latest Parquet row is ``ok`` are skipped; so are failed ones
  unless ``retry_failed``.
* **Faults** — a cell that raises or diverges is a row (``run_cell`` does it); a cell
  running longer than ``cell_timeout_s`` gets a ``timeout`` row and its actor is killed and
  restarted; a dead actor process (segfault, OOM, ``os._exit``) costs the cell that was
  running one attempt — it is retried up to ``max_retries`` times on a restarted or another
  actor, then recorded ``crashed`` — while the cells merely queued behind it are re-sent
  without being charged. The sweep always goes on.
* **Sinks** — rows go to Parquet first (one atomic part per 50 rows or 2 s), then to one
  background MLflow writer thread; MLflow being down costs one warning.
* **Signals** — SIGTERM (``ray job stop``) and SIGINT flush the finished rows, mark the
  MLflow parent run KILLED and raise :class:`SweepInterrupted` (exit code 128 + signal).

The driver never imports torch or jax; the actors do, through the pipeline.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import signal
import statistics
import tempfile
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from hypersweep import __version__
from hypersweep.io import lock as lock_mod
from hypersweep.orchestrator import resources as resources_mod
from hypersweep.io import parquet, tracking
from hypersweep.orchestrator.cell import Cell
from hypersweep.orchestrator.progress import SweepProgress
from hypersweep.io.schema import FAILED_STATUSES, STATUSES, empty_row
from hypersweep.registry import BACKENDS

log = logging.getLogger(__name__)

IN_FLIGHT_PER_ACTOR = 2
POLL_S = 0.2
PING_FAILURES_BEFORE_REPLACE = 3
PING_RETRY_S = 0.25
LOOKAHEAD = 256
#: Parquet flush policy: a part every FLUSH_ROWS rows or FLUSH_SECONDS, and on exit
FLUSH_ROWS = 50
FLUSH_SECONDS = 2.0


def _signal_word(signum: int) -> str:
    """What the shell says of a process stopped by ``signum``."""
    return "terminated" if signum == signal.SIGTERM else "interrupted"


class SweepInterrupted(RuntimeError):
    """Raised by :func:`run_study` after a SIGTERM/SIGINT once finished rows are flushed;
    ``exit_code`` is 128 + signal (143 "terminated", 130 "interrupted")."""

    def __init__(self, signum: int, summary: dict):
        self.signum = signum
        self.summary = summary
        self.exit_code = 128 + int(signum)
        super().__init__(f"{_signal_word(signum)} (signal {signum}); "
                         f"{summary.get('cells_done', 0)} cells finished and saved in "
                         f"{summary.get('results_dir')}")


class SweepAborted(KeyboardInterrupt):
    """A signal that ends the run at once: a second SIGINT (a second SIGTERM is ignored
    so that the stop under way can flush), or a SIGTERM caught by the CLI outside
    :func:`run_study`'s handlers (e.g. during Ray's shutdown). A KeyboardInterrupt, so it
    unwinds like Ctrl-C; ``exit_code`` is 128 + signal as for :class:`SweepInterrupted`."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + int(signum)
        super().__init__(f"{_signal_word(signum)} (signal {signum}); rows finished before "
                         "it are saved in the output")


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _plain(value: Any) -> Any:
    """A study-like object as YAML-safe data (for studies built without a YAML source)."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "__dict__"):
        return {k: _plain(v) for k, v in vars(value).items() if not k.startswith("_")}
    return str(value)


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def failure_row(cell: Cell, attempt: int, status: str, message: str,
                started_at: _dt.datetime | None = None, wall_time_s: float | None = None
                ) -> dict:
    """A result row the driver writes for a cell that produced none (timeout, crash)."""
    row = empty_row()
    row.update(study=cell.study, cell_id=cell.cell_id, pipeline=cell.pipeline,
               problem=cell.problem, algorithm=cell.algorithm, backend=cell.backend,
               dtype=cell.dtype, K=cell.K, K_setting=cell.K_setting, t=cell.t,
               seed=cell.seed, attempt=attempt, status=status, error_message=message[:2000],
               hypersweep_version=__version__,
               problem_params=cell.problem_params, algorithm_params=cell.algorithm_params,
               pipeline_params=cell.pipeline_params, started_at=started_at or _now(),
               finished_at=_now(), wall_time_s=wall_time_s)
    return row


# ---------------------------------------------------------------------------------------
# Pool bookkeeping


class _Task:
    __slots__ = ("cell", "attempt", "ref", "started_at", "submitted")

    def __init__(self, cell: Cell, attempt: int, ref: Any):
        self.cell, self.attempt, self.ref = cell, attempt, ref
        self.started_at = _now()
        self.submitted = time.monotonic()


class _Slot:
    """One actor and the cells queued on it (the head is the one running)."""

    def __init__(self, index: int, actor: Any):
        self.index = index
        self.actor = actor
        self.queue: deque[_Task] = deque()
        self.ready = False
        self.ping: Any = None
        self.ping_failures = 0
        self.last_key: tuple | None = None
        self.head_since = 0.0
        self.ping_at: float | None = None  # when to re-ping a restarting actor
        self.isolated = False  # running a cell alone (a retry after a crash)


class _Feed:
    """Pending cells: retries first, then a look-ahead window over the cell stream."""

    def __init__(self, cells: Iterable[Cell], should_run: Callable[[Cell], bool],
                 lookahead: int = LOOKAHEAD):
        self._source = iter(cells)
        self._should_run = should_run
        self._lookahead = lookahead
        #: (cell, attempt, isolate): ``isolate`` = run it alone on its actor, so that if
        #: the process dies again the blame is certain
        self.retry: deque[tuple[Cell, int, bool]] = deque()
        self.window: deque[tuple[Cell, tuple]] = deque()
        self.source_done = False
        self.seen = 0
        self.skipped = 0

    def _fill(self) -> None:
        while len(self.window) < self._lookahead and not self.source_done:
            try:
                cell = next(self._source)
            except StopIteration:
                self.source_done = True
                return
            self.seen += 1
            if self._should_run(cell):
                self.window.append((cell, cell.shape_key()))
            else:
                self.skipped += 1

    def take(self, shape_key: tuple | None, *, idle: bool = True
             ) -> tuple[Cell, int, bool] | None:
        """The next cell for an actor that last ran ``shape_key``; ``idle``: whether the
        actor has nothing queued (only an idle actor gets a cell to run in isolation)."""
        if self.retry:
            if self.retry[0][2] and not idle:
                return None
            return self.retry.popleft()
        self._fill()
        if not self.window:
            return None
        if shape_key is not None:
            for position, (cell, key) in enumerate(self.window):
                if key == shape_key:
                    del self.window[position]
                    return cell, 1, False
        return self.window.popleft()[0], 1, False

    def empty(self) -> bool:
        self._fill()
        return not self.retry and not self.window


def actor_request(study: Any) -> "resources_mod.ActorRequest":
    resources = _get(study, "resources")
    return resources_mod.ActorRequest(
        num_cpus=float(_get(resources, "num_cpus", 1.0)),
        num_gpus=float(_get(resources, "num_gpus", 0.0) or 0.0),
        memory_mb=_get(resources, "memory_mb"))


def pool_size(study: Any, cluster: dict | list, n_cells: int | None = None) -> int:
    """``num_actors``, else how many actors of the study's request fit on the nodes.

    ``cluster``: a list of alive nodes' resources (counted per node, so two 1-GPU nodes
    with num_gpus 0.4 give 4 actors, not 5), or one totals dict (a single node).
    At least one actor when nothing fits on a single local node.
    """
    nodes = cluster if isinstance(cluster, list) else [cluster]
    requested = _get(study, "num_actors")
    try:
        return resources_mod.pool_size(nodes, actor_request(study),
                                       requested=int(requested) if requested else None,
                                       n_cells=n_cells)
    except ValueError:
        return 1


# ---------------------------------------------------------------------------------------
# Ray


def _init_ray(address: str | None) -> bool:
    """Join ``address`` / ``$RAY_ADDRESS`` or start a local loopback-only Ray.
    Returns whether this call started it (only then does the driver shut it down).

    The environment is set before this process first imports Ray, which reads it then
    (see :mod:`.ray_env`); a cluster that is joined keeps the user's environment."""
    import sys

    from hypersweep.orchestrator.ray_env import prepare_local_ray

    imported = sys.modules.get("ray")
    if imported is not None and imported.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    local_kwargs = {} if address else prepare_local_ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Errors of refs we abandoned on purpose (timeouts, crashed actors) are handled; do not
    # let Ray print them again when the refs are garbage collected.
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    import ray

    if address:
        ray.init(address=address, logging_level="WARNING")
        return True
    temp_dir = os.path.join(tempfile.gettempdir(), f"hypersweep-ray-{os.getuid()}")
    ray.init(address="local", _temp_dir=temp_dir, logging_level="ERROR",
             log_to_driver=False, **local_kwargs)
    return True


# ---------------------------------------------------------------------------------------
# The sweep


class _Sweep:
    def __init__(self, study: Any, cells: Iterable[Cell], *, total: int | None,
                 quiet: bool, retry_failed: bool, stop_event: threading.Event,
                 ensure_ray: Callable[[], Any], address: str | None = None,
                 force: bool = False):
        self.study = study
        self.force = force  # take the output's lock even from a live holder
        self.request = actor_request(study)
        # only an embedded Ray may drop GPU requests; a cluster may autoscale GPU nodes
        self.local_ray = not (address or os.environ.get("RAY_ADDRESS"))
        self.name = _get(study, "study")
        self.output = Path(_get(study, "output")).expanduser().absolute()
        self.max_retries = int(_get(study, "max_retries", 2))
        timeout = _get(study, "cell_timeout_s")
        self.cell_timeout_s = float(timeout) if timeout else None
        self.stop_event = stop_event
        self.ensure_ray = ensure_ray
        self.total = total
        self.retry_failed = retry_failed
        self.quiet = quiet
        self.slots: list[_Slot] = []
        self.by_ref: dict = {}
        self.pings: dict = {}
        self.replacements = 0
        self.counts: Counter = Counter()
        self.retries = 0
        self.timings: dict[str, float] = {}
        self.previous: dict[str, str] = {}
        self.cells = cells
        self.first_submit: float | None = None

    # -- resume ----------------------------------------------------------------------------
    def _load_previous(self) -> None:
        table = parquet.read_results(self.output)
        self.previous = dict(zip(table.column("cell_id").to_pylist(),
                                 table.column("status").to_pylist()))

    def _should_run(self, cell: Cell) -> bool:
        status = self.previous.get(cell.cell_id)
        if status is None:
            return True
        return self.retry_failed and status in FAILED_STATUSES

    # -- pool ------------------------------------------------------------------------------
    def _new_actor(self) -> Any:
        from hypersweep.orchestrator.actors import CellRunner, actor_options

        options = actor_options(num_cpus=self.request.num_cpus,
                                num_gpus=self.request.num_gpus,
                                memory_mb=self.request.memory_mb)
        backends = _get(self.study, "backend", ()) or ()
        if isinstance(backends, str):
            backends = (backends,)
        preload = tuple(b for b in backends if b in BACKENDS)
        return CellRunner.options(**options).remote(preload)

    def _ping(self, slot: _Slot) -> None:
        slot.ready = False
        slot.ping_at = None
        slot.ping = slot.actor.ping.remote()
        self.pings[slot.ping] = slot

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
        size = pool_size(self.study, nodes or ray.cluster_resources(), self.total)
        self.slots = [_Slot(i, self._new_actor()) for i in range(size)]
        for slot in self.slots:
            self._ping(slot)
        self.pool_started = time.perf_counter()
        log.info("study %s: %d actor(s)", self.name, size)

    def _restart(self, slot: _Slot, *, kill: bool) -> None:
        import ray

        if kill:
            ray.kill(slot.actor, no_restart=False)
        for task in slot.queue:
            self.by_ref.pop(task.ref, None)
        slot.queue.clear()
        slot.isolated = False
        self._ping(slot)

    def _on_ping(self, ref: Any) -> None:
        import ray
        from ray.exceptions import ActorUnavailableError, RayError

        slot = self.pings.pop(ref)
        if slot.ping is not ref:
            return
        slot.ping = None
        try:
            ray.get(ref)
        except ActorUnavailableError:
            # Restarting (after a crash or our kill): ask again shortly; a restart that
            # never completes ends as ActorDiedError below.
            slot.ping_at = time.monotonic() + PING_RETRY_S
            return
        except RayError as exc:
            slot.ping_failures += 1
            if slot.ping_failures >= PING_FAILURES_BEFORE_REPLACE:
                self.replacements += 1
                if self.replacements > 3 * len(self.slots) + 10:
                    raise RuntimeError(f"cell runners keep dying before they can run a cell; "
                                       f"last error: {exc}") from exc
                log.warning("replacing cell runner %d after %d failed restarts: %s",
                            slot.index, slot.ping_failures, str(exc).splitlines()[0][:200])
                ray.kill(slot.actor, no_restart=True)
                slot.actor = self._new_actor()
                slot.ping_failures = 0
            self._ping(slot)
            return
        slot.ready = True
        slot.ping_failures = 0

    def _submit(self, slot: _Slot) -> bool:
        item = self.feed.take(slot.last_key, idle=not slot.queue)
        if item is None:
            return False
        cell, attempt, isolate = item
        slot.isolated = isolate
        if self.first_submit is None:
            self.first_submit = time.perf_counter()
        task = _Task(cell, attempt, slot.actor.run.remote(cell, attempt))
        if not slot.queue:
            slot.head_since = time.monotonic()
        slot.queue.append(task)
        slot.last_key = cell.shape_key()
        self.by_ref[task.ref] = task
        return True

    # -- outcomes --------------------------------------------------------------------------
    def _record(self, row: dict, traces: list) -> None:
        self.sink.add(row, traces)
        self.counts[row["status"]] += 1
        self.progress.record(row["status"])

    def _pop_head(self, slot: _Slot, task: _Task) -> None:
        slot.queue.remove(task)
        self.by_ref.pop(task.ref, None)
        slot.head_since = time.monotonic()
        if not slot.queue:
            slot.isolated = False

    def _finished(self, slot: _Slot, task: _Task) -> None:
        import ray
        from ray.exceptions import RayError, RayTaskError

        try:
            row, traces = ray.get(task.ref)  # ready already: this does not wait
        except RayTaskError as exc:  # the actor shell itself raised: an error row
            self._pop_head(slot, task)
            self._record(failure_row(task.cell, task.attempt, "error",
                                     f"{type(exc).__name__}: {exc}", task.started_at), [])
            return
        except RayError as exc:  # the process died: actor error, OOM kill, lost worker
            self._actor_died(slot, exc)
            return
        self._pop_head(slot, task)
        self._record(row, traces)

    def _actor_died(self, slot: _Slot, exc: BaseException) -> None:
        from hypersweep.orchestrator.actors import read_memory_report

        for task in slot.queue:
            reason = read_memory_report(task.cell.cell_id, task.attempt)
            if reason is None:
                continue
            # Stopped by its memory watchdog: the culprit is certain and a retry would
            # only outgrow memory_mb again, so it is recorded now (``crashed``, the
            # message says memory) and the others re-sent uncharged.
            for other in reversed(slot.queue):
                if other is not task:
                    self.feed.retry.appendleft((other.cell, other.attempt, False))
            self._record(failure_row(task.cell, task.attempt, "crashed", reason,
                                     task.started_at), [])
            self._restart(slot, kill=False)
            return
        if len(slot.queue) > 1:
            # Which of the queued cells killed it is uncertain: the reply of a cell that
            # finished just before the crash can be lost with the process. Re-run each
            # alone, uncharged; a culprit then dies alone and is charged below.
            for task in reversed(slot.queue):
                self.feed.retry.appendleft((task.cell, task.attempt, True))
            self._restart(slot, kill=False)
            return
        blamed = slot.queue[0]
        message = f"{type(exc).__name__}: {exc}".strip()
        if blamed.attempt <= self.max_retries:
            self.feed.retry.appendleft((blamed.cell, blamed.attempt + 1, True))
            self.retries += 1
            self.progress.retries += 1
            log.info("cell %s: runner died (attempt %d), retrying", blamed.cell.cell_id,
                     blamed.attempt)
        else:
            self._record(failure_row(
                blamed.cell, blamed.attempt, "crashed",
                f"worker process died on each of {blamed.attempt} attempts; last: {message}",
                blamed.started_at), [])
        self._restart(slot, kill=False)

    def _check_timeouts(self) -> None:
        if self.cell_timeout_s is None:
            return
        now = time.monotonic()
        for slot in self.slots:
            if not slot.ready or not slot.queue:
                continue
            running = now - slot.head_since
            if running <= self.cell_timeout_s:
                continue
            head, queued = slot.queue[0], list(slot.queue)[1:]
            for task in reversed(queued):  # never started: re-sent as they were
                self.feed.retry.appendleft((task.cell, task.attempt, False))
            self._record(failure_row(
                head.cell, head.attempt, "timeout",
                f"exceeded cell_timeout_s={self.cell_timeout_s:g} (stopped after "
                f"{running:.1f} s); its runner was restarted", head.started_at, running), [])
            self._restart(slot, kill=True)

    def _flush(self) -> None:
        rows = self.sink.flush()
        if rows and self.writer is not None:
            self.writer.submit(rows)

    # -- main loop -------------------------------------------------------------------------
    def _loop(self) -> bool:
        """Run until every cell is recorded (True) or a stop is requested (False)."""
        import ray

        while True:
            if self.stop_event.is_set():
                return False
            now = time.monotonic()
            for slot in self.slots:
                if slot.ping_at is not None and now >= slot.ping_at:
                    self._ping(slot)
                while (slot.ready and not slot.isolated
                       and len(slot.queue) < IN_FLIGHT_PER_ACTOR):
                    if not self._submit(slot):
                        break
            if not self.by_ref and self.feed.empty():
                return True
            refs = list(self.by_ref) + list(self.pings)
            timeout = POLL_S
            if not refs:  # only restarting actors waiting for their next ping
                time.sleep(PING_RETRY_S / 5)
                continue
            if self.cell_timeout_s is not None:
                heads = [s.head_since + self.cell_timeout_s for s in self.slots
                         if s.ready and s.queue]
                if heads:
                    timeout = max(0.0, min(timeout, min(heads) - time.monotonic() + 0.01))
            ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
            if ready:
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                ready_set = set(ready)
                for ref in ready:
                    if ref in self.pings:
                        self._on_ping(ref)
                for slot in self.slots:
                    for task in list(slot.queue):
                        if task.ref in ready_set and task in slot.queue:
                            self._finished(slot, task)
            self._check_timeouts()
            if self.sink.due():
                self._flush()
            self.progress.refresh()

    def _mlflow_writer(self) -> tracking.MlflowWriter | None:
        config = _get(self.study, "mlflow")
        if not _get(config, "enabled", True):
            return None
        uri = _get(config, "tracking_uri", "sqlite:///results/mlflow.db")
        fields_set = getattr(config, "model_fields_set", None)
        if fields_set is not None and "tracking_uri" not in fields_set and os.environ.get(
                "MLFLOW_TRACKING_URI"):
            uri = os.environ["MLFLOW_TRACKING_URI"]  # study left the default: env wins
        # The URI goes to MlflowClient explicitly (never mlflow's cwd default); the process
        # environment is left alone so a later study in the same process is not redirected.
        uri = tracking.resolve_tracking_uri(uri)
        tracking.set_mlflow_env_defaults()
        experiment = _get(config, "experiment") or self.name
        logger = tracking.MlflowLogger(uri, experiment, self.name,
                                    study_params=tracking.study_params(self.study),
                                    study_yaml=self._study_text(),
                                    artifact_root=tracking.default_artifact_root(uri),
                                    k_uses_t=tracking.k_uses_t(_get(self.study, "K", []) or []))
        return tracking.MlflowWriter(logger).start()

    def _study_text(self) -> str:
        text = _get(self.study, "source_text")
        if text:
            return text
        return yaml.safe_dump(_plain(self.study), sort_keys=False)

    def run(self) -> dict:
        """Hold the output's lock (before writing anything or starting Ray or MLflow)
        around the sweep; raises :class:`~.lock.LockHeld` at once if another driver holds
        it, :class:`~.parquet.SinkWriteError` if Parquet cannot be written (both exit 2)."""
        self.output.mkdir(parents=True, exist_ok=True)
        with lock_mod.OutputLock(self.output, study=self.name, force=self.force):
            return self._run_locked()

    def _run_locked(self) -> dict:
        wall_start = time.perf_counter()
        try:
            parquet.write_text_atomic(self.output / parquet.STUDY_FILE, self._study_text())
        except OSError as exc:
            raise parquet.SinkWriteError(self.output / parquet.STUDY_FILE, exc, 1) from exc
        self.sink = parquet.ParquetSink(self.output, flush_rows=FLUSH_ROWS,
                                      flush_seconds=FLUSH_SECONDS)
        self._load_previous()
        self.writer = self._mlflow_writer()
        self.feed = _Feed(self.cells, self._should_run)
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
                    self._flush()
                except parquet.SinkWriteError as exc:
                    write_error = exc
            self.progress.close()
            self._stop_actors()
            if write_error is not None:
                completed = False
            status = "FINISHED" if completed else (
                "FAILED" if crashed or write_error else "KILLED")
            summary = self._summary(wall_start, interrupted)
            if zero_hypergradient_warning(summary):
                log.warning(zero_hypergradient_warning(summary))
            if self.writer is not None:
                self.writer.close(status=status,
                                  summary=None if interrupted else summary,
                                  timeout=1.0 if not completed else None)
                summary["mlflow"] = self._mlflow_summary()
            summary["wall_time_s"] = time.perf_counter() - wall_start
            summary["timings"]["mlflow_drain_wait_s"] = (
                self.writer.drain_wait_s if self.writer else 0.0)
        if write_error is not None:
            summary["write_error"] = str(write_error)
            raise write_error.stopped(saved=self.sink.rows_written,
                                      unsaved=self.sink.pending, summary=summary)
        return summary

    def _stop_actors(self) -> None:
        if not self.slots:
            return
        import ray

        for slot in self.slots:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def _mlflow_summary(self) -> dict:
        logger = self.writer.logger
        return {"tracking_uri": logger.tracking_uri, "experiment": logger.experiment_name,
                "parent_run_id": logger.parent_run_id, "cells_logged": logger.cells_logged,
                "runs_created": logger.runs_created, "dropped": self.writer.dropped,
                "error": self.writer.error, "seconds": logger.seconds,
                "connect_seconds": logger.connect_seconds}

    def _summary(self, wall_start: float, interrupted: bool) -> dict:
        table = parquet.read_results(self.output)
        study_counts = Counter(table.column("status").to_pylist())
        totals = _compute_totals(table)
        pairs: dict[tuple, dict[str, list]] = {}
        for row in table.select(["problem", "algorithm", "status", "hypergrad_rel_error",
                                 "wall_time_s", "val_loss"]).to_pylist():
            entry = pairs.setdefault((row["problem"], row["algorithm"]),
                                     {"rel": [], "wall": [], "val": [], "n": 0, "ok": 0})
            entry["n"] += 1
            if row["status"] == "ok":
                entry["ok"] += 1
                if row["hypergrad_rel_error"] is not None:
                    entry["rel"].append(row["hypergrad_rel_error"])
                if row["wall_time_s"] is not None:
                    entry["wall"].append(row["wall_time_s"])
                if row["val_loss"] is not None:
                    entry["val"].append(row["val_loss"])
        per_pair = [{"problem": p, "algorithm": a, "cells": e["n"], "ok": e["ok"],
                     "median_rel_error": statistics.median(e["rel"]) if e["rel"] else None,
                     "median_val_loss": statistics.median(e["val"]) if e["val"] else None,
                     "median_wall_time_s": statistics.median(e["wall"]) if e["wall"] else None}
                    for (p, a), e in sorted(pairs.items())]
        self.timings["parquet_s"] = self.sink.seconds
        return {
            "study": self.name,
            "output": str(self.output),
            "results_dir": str(self.sink.results_dir),
            "traces_dir": str(self.sink.traces_dir),
            "study_yaml": str(self.output / parquet.STUDY_FILE),
            "cells_seen": self.feed.seen,
            "cells_skipped": self.feed.skipped,
            "cells_done": sum(self.counts.values()),
            "counts": {s: self.counts.get(s, 0) for s in STATUSES},
            "study_counts": {s: study_counts.get(s, 0) for s in STATUSES},
            "retries": self.retries,
            "actors": len(self.slots),
            "actor_replacements": self.replacements,
            "interrupted": interrupted,
            "per_pair": per_pair,
            **totals,
            "timings": dict(self.timings),
            "parquet_files": self.sink.files_written,
        }


def _compute_totals(table) -> dict:
    """Study-wide totals from the results: compute and compile seconds (so a reader sees
    what compilation cost beside the measured work), and the cells whose estimate was an
    exact zero where ∇F ≠ 0 (``extra.zero_hypergradient``), by (problem, algorithm)."""
    compute = compile_s = 0.0
    compiled = 0
    zero: Counter = Counter()
    for row in table.select(["problem", "algorithm", "status", "wall_time_s",
                             "compile_time_s", "extra"]).to_pylist():
        if row["status"] != "ok":
            continue
        compute += row["wall_time_s"] or 0.0
        compile_s += row["compile_time_s"] or 0.0
        compiled += bool(row["compile_time_s"])
        if row["extra"] and '"zero_hypergradient":true' in row["extra"]:
            zero[(row["problem"], row["algorithm"])] += 1
    return {"compute_time_s": compute, "compile_time_s": compile_s, "cells_compiled": compiled,
            "zero_hypergradient": [{"problem": p, "algorithm": a, "cells": n}
                                   for (p, a), n in sorted(zero.items())]}


def zero_hypergradient_warning(summary: dict) -> str | None:
    """One line about exact-zero estimates (e.g. first_order where L_out has no direct λ
    term), or None."""
    zero = summary.get("zero_hypergradient") or []
    if not zero:
        return None
    where = ", ".join(f"{z['algorithm']} on {z['problem']} ({z['cells']} cells)" for z in zero)
    return (f"warning: exact zero hypergradient where ∇F ≠ 0: {where}; the estimate has no "
            "term for this problem (e.g. first_order when L_out has no direct λ term)")


def run_cells(study: Any, cells: Iterable[Cell], *, total: int | None = None,
              quiet: bool = False, retry_failed: bool = False,
              stop_event: threading.Event | None = None, address: str | None = None,
              force: bool = False) -> dict:
    """Run ``cells`` of ``study`` (attributes as in ``StudySpec``) on the current Ray, or
    on one started/joined as in :func:`run_study` when none is initialized (and then left
    running). Returns the summary; ``summary["interrupted"]`` if ``stop_event`` was set."""
    if total is None and hasattr(cells, "__len__"):
        total = len(cells)  # type: ignore[arg-type]
    sweep = _Sweep(study, cells, total=total, quiet=quiet, retry_failed=retry_failed,
                   stop_event=stop_event or threading.Event(),
                   ensure_ray=lambda: _init_ray(address), address=address, force=force)
    return sweep.run()


def run_study(study: Any, *, address: str | None = None, quiet: bool = False,
              retry_failed: bool = False, cells: Iterable[Cell] | None = None,
              total: int | None = None, force: bool = False) -> dict:
    """Run a validated study to completion; return its summary (see ``print_summary``).

    ``address``: a Ray cluster to join ("auto", "ray://…", "host:port"); default
    ``$RAY_ADDRESS`` (set by ``ray job submit``) or else an embedded local Ray on
    127.0.0.1 that is shut down at the end. ``retry_failed``: re-run cells whose latest
    status is error/diverged/timeout/crashed (``ok`` cells are always skipped).
    ``cells``/``total``: run these instead of ``spec.expand(study)`` (tests, tools).
    ``force``: take the output's lock even if another live driver holds it.
    Raises :class:`SweepInterrupted` after SIGTERM/SIGINT (rows flushed first),
    :class:`~.lock.LockHeld` if another driver holds the output, and
    :class:`~.parquet.SinkWriteError` if Parquet parts cannot be written.
    """
    if cells is None:
        from hypersweep.orchestrator import spec

        cells = spec.expand(study)
        total = spec.count_cells(study)
    elif total is None and hasattr(cells, "__len__"):
        total = len(cells)  # type: ignore[arg-type]
    stop_event = threading.Event()
    received: list[int] = []
    started: list[bool] = []

    def on_signal(signum, frame):  # noqa: ARG001
        if stop_event.is_set():
            if signum == signal.SIGTERM:
                # Supervisors repeat SIGTERM before their SIGKILL: raising here could cut
                # the final flush short, so the stop under way is left to finish (143).
                log.warning("signal %d again: already flushing and stopping", signum)
                return
            raise SweepAborted(signum)  # Ctrl-C twice: stop waiting for anything
        received.append(signum)
        log.warning("signal %d: flushing finished cells and stopping", signum)
        stop_event.set()

    def ensure_ray():
        started.append(_init_ray(address))
        install_handlers()  # after ray.init, which installs its own SIGTERM handler

    previous: dict = {}

    def install_handlers():
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous.setdefault(signum, signal.getsignal(signum))
                signal.signal(signum, on_signal)

    install_handlers()
    tracking.set_mlflow_env_defaults()
    try:
        sweep = _Sweep(study, cells, total=total, quiet=quiet, retry_failed=retry_failed,
                       stop_event=stop_event, ensure_ray=ensure_ray, address=address,
                       force=force)
        summary = sweep.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if any(started):
            import ray

            ray.shutdown()
    if summary["interrupted"]:
        raise SweepInterrupted(received[0] if received else signal.SIGTERM, summary)
    return summary


def format_summary(summary: dict) -> str:
    """A short plain-text table: counts by status, then per (problem, algorithm) medians."""
    lines = [f"study {summary['study']}: {summary['cells_done']} cells run, "
             f"{summary['cells_skipped']} skipped (done before), "
             f"{summary['wall_time_s']:.1f} s; results in {summary['results_dir']}"]
    counts = summary["study_counts"]
    lines.append("status   " + "  ".join(f"{s} {counts[s]}" for s in STATUSES))
    if "compute_time_s" in summary:
        lines.append(f"time     compute {summary['compute_time_s']:.1f} s, compile "
                     f"{summary['compile_time_s']:.1f} s ({summary['cells_compiled']} cells "
                     "paid a compile; the others reused compiled functions)")
    if summary["per_pair"]:
        width = max(len(f"{p['problem']} × {p['algorithm']}") for p in summary["per_pair"])
        lines.append(f"{'problem × algorithm':<{width}}  cells    ok  median rel err  "
                     f"median wall s")
        for pair in summary["per_pair"]:
            rel = pair["median_rel_error"]
            wall = pair["median_wall_time_s"]
            lines.append(f"{pair['problem'] + ' × ' + pair['algorithm']:<{width}}  "
                         f"{pair['cells']:5d} {pair['ok']:5d}  "
                         f"{'-' if rel is None else f'{rel:.3e}':>14}  "
                         f"{'-' if wall is None else f'{wall:.4f}':>13}")
    warning = zero_hypergradient_warning(summary)
    if warning:
        lines.append(warning)
    mlflow = summary.get("mlflow")
    if mlflow:
        state = f"unavailable ({mlflow['error']})" if mlflow["error"] else "ok"
        lines.append(f"mlflow {state}: {mlflow['cells_logged']} cells logged to "
                     f"{mlflow['tracking_uri']} (experiment {mlflow['experiment']})")
    return "\n".join(lines)


def print_summary(summary: dict, console: Any = None) -> None:
    """Print :func:`format_summary` with rich (the CLI's end-of-run table)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    console.print(format_summary(summary).splitlines()[0])
    table = Table(title="status")
    for status in STATUSES:
        table.add_column(status, justify="right")
    table.add_row(*(str(summary["study_counts"][s]) for s in STATUSES))
    console.print(table)
    if summary["per_pair"]:
        pairs = Table(title="per (problem, algorithm), ok cells")
        for column in ("problem", "algorithm", "cells", "ok", "median rel error",
                       "median val loss", "median wall s"):
            pairs.add_column(column, justify="left" if column in ("problem", "algorithm")
                             else "right")
        for pair in summary["per_pair"]:
            rel, wall = pair["median_rel_error"], pair["median_wall_time_s"]
            val = pair.get("median_val_loss")
            pairs.add_row(pair["problem"], pair["algorithm"], str(pair["cells"]),
                          str(pair["ok"]), "-" if rel is None else f"{rel:.3e}",
                          "-" if val is None else f"{val:.5g}",
                          "-" if wall is None else f"{wall:.4f}")
        console.print(pairs)
    if "compute_time_s" in summary:
        console.print(f"compute {summary['compute_time_s']:.1f} s, compile "
                      f"{summary['compile_time_s']:.1f} s ({summary['cells_compiled']} cells "
                      "paid a compile)")
    warning = zero_hypergradient_warning(summary)
    if warning:
        console.print(warning)
    mlflow = summary.get("mlflow")
    if mlflow:
        console.print(format_summary(summary).splitlines()[-1])


__all__ = ["run_study", "run_cells", "read_results", "sync_mlflow", "SweepInterrupted",
           "SweepAborted",
           "format_summary", "print_summary", "pool_size", "failure_row"]

read_results = parquet.read_results
sync_mlflow = tracking.sync_mlflow
