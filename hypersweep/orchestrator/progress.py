"""Sweep progress: a rich live bar on a terminal, a log line every few seconds otherwise."""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("hypersweep.progress")

FAILED = ("error", "timeout", "crashed")


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else \
        f"{rest // 60}:{rest % 60:02d}"


def _make_audible() -> None:
    """Progress lines are INFO; show them even when the application logs at WARNING
    (the CLI's default) or configured no logging at all (a plain script, a Ray job)."""
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    if not log.handlers and not logging.getLogger().hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)


class SweepProgress:
    """Counts cells by status; ``total`` is the number to run (after resume skipping),
    or None when unknown. ETA = remaining × (elapsed / done) over this run's cells."""

    def __init__(self, total: int | None, *, quiet: bool = False, label: str = "sweep",
                 log_every_s: float = 5.0):
        self.total = total
        self.counts: dict[str, int] = {}
        self.retries = 0
        self.label = label
        self.log_every_s = log_every_s
        self.rich = not quiet and sys.stdout.isatty()
        self._start = time.monotonic()
        self._last_log = self._start
        self._live = None
        if not self.rich:
            _make_audible()
        if self.rich:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            self._live = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TextColumn("{task.fields[detail]}"),
                                  TimeElapsedColumn(), TextColumn("ETA"),
                                  TimeRemainingColumn(), transient=False)
            self._task = self._live.add_task(label, total=total, detail="")
            self._live.start()

    def set_total(self, total: int | None) -> None:
        self.total = total
        if self._live is not None:
            self._live.update(self._task, total=total)

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def detail(self) -> str:
        failed = sum(self.counts.get(s, 0) for s in FAILED)
        remaining = "?" if self.total is None else max(0, self.total - self.done)
        text = (f"ok {self.counts.get('ok', 0)}  failed {failed}  "
                f"diverged {self.counts.get('diverged', 0)}  remaining {remaining}")
        return text + (f"  retries {self.retries}" if self.retries else "")

    def eta_s(self) -> float | None:
        if not self.total or not self.done:
            return None
        rate = self.done / max(1e-9, time.monotonic() - self._start)
        return max(0, self.total - self.done) / rate

    def record(self, status: str) -> None:
        self.counts[status] = self.counts.get(status, 0) + 1
        self.refresh()

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._live is not None:
            self._live.update(self._task, completed=self.done, detail=self.detail())
        elif force or now - self._last_log >= self.log_every_s:
            self._last_log = now
            total = "?" if self.total is None else self.total
            log.info("%s: %d/%s done (%s), elapsed %s, ETA %s", self.label, self.done, total,
                     self.detail(), _eta(now - self._start), _eta(self.eta_s()))

    def close(self) -> None:
        if self._live is not None:
            self._live.update(self._task, completed=self.done, detail=self.detail())
            self._live.stop()
            self._live = None
        else:
            self.refresh(force=True)
