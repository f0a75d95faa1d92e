"""How a sweep stops on a signal, without Ray: the first SIGTERM/SIGINT asks the loop to
stop, a second SIGTERM is ignored, a second SIGINT aborts, and the handlers go back."""
from __future__ import annotations

import os
import signal

import pytest

from hypersweep.orchestrator.signals import StopSignals, SweepAborted, SweepInterrupted


def test_first_signal_stops_second_sigterm_is_ignored_second_sigint_aborts():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stops = StopSignals()
    stops.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stops.stop_event.is_set() and stops.received == [signal.SIGTERM]
        os.kill(os.getpid(), signal.SIGTERM)  # a supervisor repeating itself: ignored
        assert stops.received == [signal.SIGTERM]
        stops.install()  # again, as after ray.init: the first handlers are kept
        with pytest.raises(SweepAborted) as aborted:
            os.kill(os.getpid(), signal.SIGINT)
        assert aborted.value.exit_code == 130
    finally:
        stops.restore()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    interrupted = stops.interrupted({"cells_done": 3, "results_dir": "/out/results"})
    assert isinstance(interrupted, SweepInterrupted) and interrupted.exit_code == 143
    assert str(interrupted).startswith("terminated (signal 15); 3 cells finished")
