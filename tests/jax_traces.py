"""Which jitted JAX functions were traced, by name: the tests' check that changing only t,
K or a warm start never recompiles.

JAX reports every top-level trace (a new cache key of a ``jax.jit`` function, i.e. a new
compilation) as a monitoring event carrying the traced function's ``fun_name``.
``counts()`` registers one listener for the test process on first use and returns its
live ``Counter``; tests compare it before and after a call (``counts()["_aid"]``).
Nothing is counted before the first ``counts()`` call, so read it before the call under
test.
"""
from __future__ import annotations

import collections

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
_COUNTS: collections.Counter = collections.Counter()
_LISTENING: list[bool] = []


def _on_event(event: str, duration: float, **kwargs) -> None:
    if event == TRACE_EVENT:
        _COUNTS[kwargs.get("fun_name")] += 1


def counts() -> collections.Counter:
    """The live count of traces per jitted function name (listening from the first call)."""
    if not _LISTENING:
        import jax

        jax.monitoring.register_event_duration_secs_listener(_on_event)
        _LISTENING.append(True)
    return _COUNTS
