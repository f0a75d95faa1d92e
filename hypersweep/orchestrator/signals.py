"""How a sweep stops on a signal, and the exceptions that say so.

SIGTERM (``ray job stop``, a supervisor) and SIGINT (Ctrl-C) set :class:`StopSignals`'s
``stop_event``: the driver's loop then returns, the finished rows are flushed, the MLflow
parent run is marked KILLED and :func:`~.driver.run_study` raises :class:`SweepInterrupted`
(exit code 128 + signal). A second SIGTERM is ignored, so that the flush under way is not
cut short (supervisors repeat SIGTERM before their SIGKILL); a second SIGINT raises
:class:`SweepAborted` at once. No Ray; handlers are installed from the main thread only.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)


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


class StopSignals:
    """SIGTERM/SIGINT handlers that ask the sweep to stop (see the module docstring).

    ``install()`` may be called again (after ``ray.init``, which installs its own SIGTERM
    handler); ``restore()`` puts back the handlers found at the first install.
    """

    def __init__(self):
        self.stop_event = threading.Event()
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        if self.stop_event.is_set():
            if signum == signal.SIGTERM:
                log.warning("signal %d again: already flushing and stopping", signum)
                return
            raise SweepAborted(signum)  # Ctrl-C twice: stop waiting for anything
        self.received.append(signum)
        log.warning("signal %d: flushing finished cells and stopping", signum)
        self.stop_event.set()

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, self._on_signal)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def interrupted(self, summary: dict) -> SweepInterrupted:
        """The exception for a sweep stopped by the first signal received (SIGTERM when
        the stop came from elsewhere)."""
        return SweepInterrupted(self.received[0] if self.received else signal.SIGTERM,
                                summary)
