"""Honest timing and memory measurement helpers shared by pipelines and benchmarks."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource
import threading
import time
from typing import Any, Callable


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]


@functools.cache
def _mallinfo2():
    """glibc's ``mallinfo2``, looked up on first use (None off glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
        fn.restype = _Mallinfo2
        return fn
    except (OSError, AttributeError):
        return None


def heap_in_use() -> int | None:
    """Bytes handed out by malloc (all arenas + mmap'd chunks); None off glibc.

    torch CPU tensors, autograd nodes and XLA:CPU buffers all come from this heap, which
    is why it beats an RSS delta (glibc keeps freed pages resident).
    """
    mallinfo2 = _mallinfo2()
    if mallinfo2 is None:
        return None
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


class PeakHeap:
    """Context manager sampling the heap every ~0.5 ms; ``.peak_mb`` = peak extra MB."""

    def __init__(self, interval: float = 5e-4):
        self.interval = interval
        self.peak_mb: float | None = None

    def __enter__(self):
        self._base = heap_in_use()
        self._peak = self._base
        self._stop = threading.Event()
        if self._base is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            cur = heap_in_use()
            if cur > self._peak:
                self._peak = cur
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if self._base is None:
            self.peak_mb = peak_rss_mb()
            return False
        self._stop.set()
        self._thread.join()
        cur = heap_in_use()
        self._peak = max(self._peak, cur)
        self.peak_mb = max(0.0, (self._peak - self._base) / 2**20)
        return False


def peak_rss_mb() -> float:
    """The process's peak resident set size (MB), a high-water mark since it started."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(fn: Callable[[], Any], block: Callable[[Any], Any]) -> tuple[Any, float]:
    """Run ``fn``, block on its result (device sync), return (result, seconds)."""
    t0 = time.perf_counter()
    out = fn()
    block(out)
    return out, time.perf_counter() - t0
