"""What the driver sends next: resume filtering, retries first, then a look-ahead window.

Pure bookkeeping over :class:`~.cell.Cell` objects (no Ray): cells are pulled lazily from
the ``expand`` generator through a window of at most ``lookahead`` cells, from which an
actor preferably takes one with the ``shape_key`` it ran last (its process caches that
problem instance and its compiled functions). Cells re-sent after a crash or a timeout
go to ``retry`` and leave before any new cell.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Mapping

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


class Feed:
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
