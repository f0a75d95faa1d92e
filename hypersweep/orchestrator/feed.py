"""What the driver sends next: resume filtering, retries first, then a look-ahead window,
and which new cells share a task.

Pure bookkeeping over :class:`~.cell.Cell` objects (no Ray): cells are pulled lazily from
the ``expand`` generator through a window of at most ``lookahead`` cells, from which an
actor preferably takes one with the ``shape_key`` it ran last (its process caches that
problem instance and its compiled functions). Cells re-sent after a crash or a timeout
go to ``retry`` and leave before any new cell, always one per task. A new cell of a
pipeline with ``run_batch`` takes along cells of the window with its ``batch_key``, up to
the study's ``batching`` limits (:class:`BatchPolicy`), so they share one task.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, NamedTuple

from hypersweep.io.schema import FAILED_STATUSES
from hypersweep.orchestrator.cell import Cell

LOOKAHEAD = 256


def resume_filter(previous: Mapping[str, str], retry_failed: bool) -> Callable[[Cell], bool]:
    """Whether a cell still has to run, given the latest ``previous`` status per cell_id:
    never run before, or failed (error/diverged/timeout/crashed) and ``retry_failed``."""

    def should_run(cell: Cell) -> bool:
        status = previous.get(cell.cell_id)
        if status is None:
            return True
        return retry_failed and status in FAILED_STATUSES

    return should_run


def default_cost(cell: Cell) -> float:
    """A cell's expected cost in oracle calls when its pipeline declares none: t + K."""
    return float(cell.t + (cell.K or 0))


def _never(cell: Cell) -> bool:
    return False


@dataclass(frozen=True)
class BatchPolicy:
    """Which new cells share a task: those whose pipeline can run a batch
    (``batchable``), of one ``batch_key``, at most ``max_cells`` of them and at most
    ``max_cost`` in Σ ``cost`` (a cell costing more than ``max_cost`` runs alone). The
    default sends every cell alone."""

    max_cells: int = 1
    max_cost: float = math.inf
    batchable: Callable[[Cell], bool] = _never
    cost: Callable[[Cell], float] = default_cost

    @classmethod
    def from_registry(cls, max_cells: int, max_cost: float) -> "BatchPolicy":
        """The policy of a study's ``batching`` section: a pipeline is batchable when its
        :class:`~hypersweep.registry.PipelineSpec` has ``run_batch``, and its ``cost``
        (``"module:function"``, imported once per pipeline) prices its cells."""
        from hypersweep.pipelines.catalog import PIPELINES
        from hypersweep.registry import load_object

        specs: dict[str, tuple[bool, Callable[[Cell], float]]] = {}

        def spec_of(cell: Cell) -> tuple[bool, Callable[[Cell], float]]:
            if cell.pipeline not in PIPELINES:  # its runner records the error, alone
                return False, default_cost
            if cell.pipeline not in specs:
                spec = PIPELINES.spec(cell.pipeline)
                cost = load_object(spec.cost) if spec.cost else default_cost
                specs[cell.pipeline] = (bool(spec.run_batch), cost)
            return specs[cell.pipeline]

        return cls(max_cells=int(max_cells), max_cost=float(max_cost),
                   batchable=lambda cell: spec_of(cell)[0],
                   cost=lambda cell: float(spec_of(cell)[1](cell)))


class Batch(NamedTuple):
    """What one task carries: cells, each one's attempt, and whether it must run alone on
    its actor (a re-sent cell whose blame must be certain if the process dies again)."""

    cells: tuple[Cell, ...]
    attempts: tuple[int, ...]
    isolate: bool


class Feed:
    """Pending cells: retries first, then a look-ahead window over the cell stream."""

    def __init__(self, cells: Iterable[Cell], should_run: Callable[[Cell], bool],
                 lookahead: int = LOOKAHEAD, *, batching: BatchPolicy | None = None):
        self._source = iter(cells)
        self._should_run = should_run
        self._lookahead = lookahead
        self.batching = batching or BatchPolicy()
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

    def resend(self, cell: Cell, attempt: int, *, isolate: bool) -> None:
        """Put ``cell`` back at the front (re-sent cells go before new ones)."""
        self.retry.appendleft((cell, attempt, isolate))

    def take(self, shape_key: tuple | None, *, idle: bool = True
             ) -> tuple[Cell, int, bool] | None:
        """The next (cell, attempt, isolate) for an actor that last ran ``shape_key``;
        ``idle``: whether the actor has nothing queued (only an idle actor gets a cell to
        run in isolation)."""
        if self.retry:
            if self.retry[0][2] and not idle:
                return None
            return self.retry.popleft()
        cell = self._take_new(shape_key)
        return None if cell is None else (cell, 1, False)

    def take_batch(self, shape_key: tuple | None, *, idle: bool = True) -> Batch | None:
        """The next task for an actor that last ran ``shape_key``: a re-sent cell alone
        (as :meth:`take`), or a new cell (as :meth:`take`) with, when its pipeline can run
        a batch, the cells of the window that share its ``batch_key``, in window order,
        while they number at most ``max_cells`` and cost at most ``max_cost`` together (a
        cell that would overrun the cost is left for a later task, and a later, cheaper
        one may still join). Cost: O(lookahead)."""
        if self.retry:
            item = self.take(shape_key, idle=idle)
            return None if item is None else Batch((item[0],), (item[1],), item[2])
        first = self._take_new(shape_key)
        if first is None:
            return None
        cells = [first]
        policy = self.batching
        budget = policy.max_cost - policy.cost(first) if (
            policy.max_cells > 1 and policy.batchable(first)) else -1.0
        if budget >= 0:
            key = first.batch_key()
            kept: deque[tuple[Cell, tuple]] = deque()
            for entry in self.window:
                cell = entry[0]
                if len(cells) < policy.max_cells and cell.batch_key() == key:
                    cost = policy.cost(cell)
                    if cost <= budget:
                        cells.append(cell)
                        budget -= cost
                        continue
                kept.append(entry)
            self.window = kept
        return Batch(tuple(cells), (1,) * len(cells), False)

    def _take_new(self, shape_key: tuple | None) -> Cell | None:
        """A new cell of the window, preferably one with ``shape_key``."""
        self._fill()
        if not self.window:
            return None
        if shape_key is not None:
            for position, (cell, key) in enumerate(self.window):
                if key == shape_key:
                    del self.window[position]
                    return cell
        return self.window.popleft()[0]

    def empty(self) -> bool:
        self._fill()
        return not self.retry and not self.window
