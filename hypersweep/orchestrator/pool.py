"""The pool of cell runners: one :class:`Slot` per actor, the tasks queued on it, its
pings and its restarts.

Bookkeeping only: the actors come from ``new_actor`` (the driver's factory of
:class:`~.actors.CellRunner` handles) and are used through ``actor.run.remote`` (one cell),
``actor.run_batch.options(num_returns="streaming").remote`` (several cells, one row each
as it is known) and ``actor.ping.remote``, so everything but :meth:`Pool.on_ping` and
killing runs (and is unit-tested) with fake actors and no Ray. What a dead actor or a
timeout *means* for the cells (blame, retries, rows) is the driver's.
"""
from __future__ import annotations

import datetime as _dt
import logging
import time
from collections import deque
from typing import Any, Callable, Sequence

from hypersweep.orchestrator.cell import Cell

log = logging.getLogger(__name__)

#: tasks queued per actor (the head runs, the next waits in the actor's mailbox)
IN_FLIGHT_PER_ACTOR = 2
PING_FAILURES_BEFORE_REPLACE = 3
PING_RETRY_S = 0.25


class Task:
    """One task sent to an actor: one cell attempt (``ref``: the ObjectRef of its row), or
    a batch of cells (``ref``: the ObjectRefGenerator of their rows, ``batched``).
    ``pending``: cell_id -> (cell, attempt) of the cells whose row has not arrived, in
    the order sent."""

    __slots__ = ("cells", "attempts", "ref", "batched", "pending", "started_at",
                 "submitted")

    def __init__(self, cells: Sequence[Cell], attempts: Sequence[int], ref: Any, *,
                 batched: bool = False):
        self.cells, self.attempts, self.ref = tuple(cells), tuple(attempts), ref
        self.batched = batched
        self.pending: dict[str, tuple[Cell, int]] = {
            cell.cell_id: (cell, attempt)
            for cell, attempt in zip(self.cells, self.attempts)}
        self.started_at = _dt.datetime.now(_dt.timezone.utc)
        self.submitted = time.monotonic()

    @property
    def cell(self) -> Cell:
        """The first cell (the only one of a one-cell task)."""
        return self.cells[0]

    @property
    def attempt(self) -> int:
        return self.attempts[0]


class Slot:
    """One actor and the tasks queued on it (the head is the one running). ``head_since``:
    when the head started, or sent its latest row (a batch)."""

    def __init__(self, index: int, actor: Any):
        self.index = index
        self.actor = actor
        self.queue: deque[Task] = deque()
        self.ready = False
        self.ping: Any = None
        self.ping_failures = 0
        self.last_key: tuple | None = None
        self.head_since = 0.0
        self.ping_at: float | None = None  # when to re-ping a restarting actor
        self.isolated = False  # running a cell alone (a retry after a crash)

    def wants_more(self) -> bool:
        """Ready, not running a cell alone, and fewer than IN_FLIGHT_PER_ACTOR queued."""
        return self.ready and not self.isolated and len(self.queue) < IN_FLIGHT_PER_ACTOR


class Pool:
    """The slots, the refs in flight (``by_ref``: cell results, ``pings``) and restarts."""

    def __init__(self, new_actor: Callable[[], Any]):
        self.new_actor = new_actor
        self.slots: list[Slot] = []
        self.by_ref: dict[Any, Task] = {}
        self.pings: dict[Any, Slot] = {}
        self.replacements = 0

    def start(self, size: int, reuse: list | tuple = ()) -> None:
        """Take the actors in ``reuse`` (at most ``size``; from :class:`ActorKeeper`) and
        create the rest, up to ``size``; ping each (a slot is ready once its ping
        returns)."""
        actors = list(reuse)[:size]
        actors += [self.new_actor() for _ in range(size - len(actors))]
        self.slots = [Slot(i, actor) for i, actor in enumerate(actors)]
        for slot in self.slots:
            self.ping(slot)

    def ping(self, slot: Slot) -> None:
        slot.ready = False
        slot.ping_at = None
        slot.ping = slot.actor.ping.remote()
        self.pings[slot.ping] = slot

    def ping_due(self, now: float) -> None:
        """Ping again the restarting actors whose retry time has come."""
        for slot in self.slots:
            if slot.ping_at is not None and now >= slot.ping_at:
                self.ping(slot)

    def submit(self, slot: Slot, cell: Cell, attempt: int, *, isolate: bool) -> Task:
        """Send ``cell`` to ``slot``'s actor (``isolate``: nothing else until it is done)."""
        slot.isolated = isolate
        ref = slot.actor.run.remote(cell, attempt)
        return self._queue(slot, Task((cell,), (attempt,), ref))

    def submit_batch(self, slot: Slot, cells: Sequence[Cell], attempts: Sequence[int]
                     ) -> Task:
        """Send ``cells`` to ``slot``'s actor as one streaming task (one row per cell, as
        each is known); a single cell goes as :meth:`submit`."""
        if len(cells) == 1:
            return self.submit(slot, cells[0], attempts[0], isolate=False)
        ref = slot.actor.run_batch.options(num_returns="streaming").remote(
            list(cells), list(attempts))
        return self._queue(slot, Task(cells, attempts, ref, batched=True))

    def _queue(self, slot: Slot, task: Task) -> Task:
        if not slot.queue:
            slot.head_since = time.monotonic()
        slot.queue.append(task)
        slot.last_key = task.cells[-1].shape_key()
        self.by_ref[task.ref] = task
        return task

    def received(self, slot: Slot, task: Task, cell_id: str) -> bool:
        """A row of ``task`` arrived: the cell is no longer pending and the slot's clock
        restarts (a batch's next cell starts now). False for a row not pending (a
        duplicate or unknown cell: ignore it)."""
        if task.pending.pop(cell_id, None) is None:
            return False
        slot.head_since = time.monotonic()
        return True

    def pop(self, slot: Slot, task: Task) -> None:
        """``task`` is done: the next queued task (if any) starts its clock now."""
        slot.queue.remove(task)
        self.by_ref.pop(task.ref, None)
        slot.head_since = time.monotonic()
        if not slot.queue:
            slot.isolated = False

    def restart(self, slot: Slot, *, kill: bool) -> None:
        """Forget ``slot``'s queue and wait for its actor again (``kill``: make Ray restart
        it first, for a cell that overran its timeout)."""
        if kill:
            import ray

            ray.kill(slot.actor, no_restart=False)
        for task in slot.queue:
            self.by_ref.pop(task.ref, None)
        slot.queue.clear()
        slot.isolated = False
        self.ping(slot)

    def on_ping(self, ref: Any) -> None:
        """A ping returned: the slot is ready, or its actor is restarting (ask again soon),
        or it failed (after PING_FAILURES_BEFORE_REPLACE failures, a new actor)."""
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
                slot.actor = self.new_actor()
                slot.ping_failures = 0
            self.ping(slot)
            return
        slot.ready = True
        slot.ping_failures = 0

    def refs(self) -> list:
        """Every ref the driver waits on: cell results, then pings."""
        return list(self.by_ref) + list(self.pings)

    def running(self) -> list[Slot]:
        """Slots whose actor is ready and has a task running (the queue's head)."""
        return [slot for slot in self.slots if slot.ready and slot.queue]

    def finished(self, ready: set) -> list[tuple[Slot, Task]]:
        """(slot, task) of the tasks whose ref is in ``ready``, in queue order."""
        return [(slot, task) for slot in self.slots for task in list(slot.queue)
                if task.ref in ready]

    def stop(self) -> None:
        """Kill every actor for good (the end of the sweep)."""
        if not self.slots:
            return
        import ray

        for slot in self.slots:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass


class ActorKeeper:
    """Runners kept alive between the studies of one ``hypersweep run a.yaml b.yaml``.

    A study that ends normally hands its actors back with the key they were created
    under (their ``.options(...)``: resources, restarts, runtime_env) and that study's
    backends (which every one of them preloaded, or a runner it reused imported before).
    The next study takes them when its own options are the same and its backends are
    among those (a [jax, torch] study's runners serve a jax study; a jax study's do not
    serve a torch one, whose first cell would pay the import); anything else kills them
    and the study starts a new pool. Reused actors keep their process
    caches (problem instances, compiled functions), which are keyed by identity, so a
    cell's result does not depend on which study ran before it.
    """

    def __init__(self):
        self.key: str | None = None
        self.preload: frozenset[str] = frozenset()
        self.actors: list = []

    def keep(self, key: str, preload: tuple[str, ...], actors: list) -> None:
        self.close()
        self.key, self.preload, self.actors = key, frozenset(preload), list(actors)

    def take(self, key: str, preload: tuple[str, ...], size: int) -> list:
        """Up to ``size`` kept actors fit for (``key``, ``preload``); the others are
        killed. Returns [] when none fits."""
        fits = self.key == key and set(preload) <= self.preload
        taken = self.actors[:size] if fits else []
        self.actors = self.actors[len(taken):]
        self.close()
        return taken

    def close(self) -> None:
        """Kill every kept actor for good."""
        actors, self.actors, self.key = self.actors, [], None
        if not actors:
            return
        import ray

        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
