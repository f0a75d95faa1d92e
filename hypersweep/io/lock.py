"""One driver per output directory: an advisory lock file ``OUTPUT/hypersweep.lock``.

Why ``fcntl.flock`` on an open file (plus JSON naming the holder) rather than
``O_CREAT|O_EXCL``: the kernel drops a flock when its process ends, however it ends
(SIGKILL and OOM kills included), so "is the holder alive" is answered by the lock itself
and a takeover cannot race — two drivers that both find a stale lock both try
``LOCK_EX|LOCK_NB`` and exactly one wins. With ``O_EXCL`` a killed driver leaves a file that
has to be judged stale from its PID, and two drivers removing a stale file at once can
both go on to "win". The JSON inside (host, pid, started_at, study) only *describes* the
holder for the messages. Linux NFS maps flock to POSIX byte-range locks, so it also holds
between drivers on different hosts sharing the output over NFSv4.

Protocol: open-or-create the path, ``flock(LOCK_EX|LOCK_NB)``, then check that the path
still names the inode we locked (a releasing holder unlinks it; a ``--force`` replaces it),
else start over. Release: unlink the path if it is still ours, then close.
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = "hypersweep.lock"
#: a busy lock is re-tried this many times, 50 ms apart, before it counts as held (a
#: ``hypersweep status`` peeking at it holds it for microseconds)
BUSY_TRIES = 5


class OutputError(RuntimeError):
    """The output directory cannot be used (held by another driver, or refuses writes):
    one line for the user, exit code 2."""

    exit_code = 2


class LockHeld(OutputError):
    """Another live driver holds the output's lock."""

    def __init__(self, path: Path, holder: dict):
        self.path = path
        self.holder = holder
        super().__init__(f"output {path.parent} is in use by another hypersweep run: "
                         f"{describe(holder)}; wait for it to finish, or pass --force if "
                         f"it is gone")


def describe(holder: dict) -> str:
    """``study 'x' on host h, pid 123, since 2026-…`` (missing fields shown as ?)."""
    return (f"study {holder.get('study', '?')!r} on host {holder.get('host', '?')}, "
            f"pid {holder.get('pid', '?')}, since {holder.get('started_at', '?')}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _read(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
        holder = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _dead_here(holder: dict) -> bool:
    """Whether ``holder`` names a process on this host that no longer exists."""
    pid = holder.get("pid")
    return (holder.get("host") == socket.gethostname() and isinstance(pid, int)
            and pid != os.getpid() and not _pid_alive(pid))


class OutputLock:
    """The lock of one output directory; ``acquire()`` / ``release()`` or ``with``.

    ``force``: take the lock even from a live holder (its file is replaced; that driver
    keeps running on its own, now unlisted, inode — use it only for a holder known gone).
    """

    def __init__(self, output_dir: str | Path, *, study: str | None = None,
                 force: bool = False):
        self.path = Path(output_dir) / LOCK_FILE
        self.study = study
        self.force = force
        self.holder: dict | None = None
        self._fd: int | None = None

    def _try_lock(self) -> int | None:
        """An fd holding the flock of the file now at ``self.path``, or None if busy."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:  # read-only or full output: one line, not a traceback
                raise OutputError(f"cannot create the lock file {self.path}: "
                                  f"{exc.strerror or exc}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    return None
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # released and unlinked (or replaced) meanwhile: start over

    def acquire(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = None
        for attempt in range(BUSY_TRIES):
            fd = self._try_lock()
            if fd is not None:
                break
            if attempt + 1 < BUSY_TRIES:
                time.sleep(0.05)
        if fd is None:
            holder = _read(self.path)
            if not (self.force or _dead_here(holder)):
                raise LockHeld(self.path, holder)
            # --force, or a holder dead on this host whose flock survives in a process
            # that inherited its fd: replace the file; the old inode keeps the old flock.
            log.warning("taking over the lock of %s from %s (%s)", self.path.parent,
                        describe(holder), "--force" if self.force else "process gone")
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            fd = self._try_lock()
            if fd is None:  # another driver took the fresh file first
                raise LockHeld(self.path, _read(self.path))
        else:
            previous = _read(self.path)
            if previous.get("pid") is not None:
                log.warning("taking over a stale lock of %s from %s (that process is gone)",
                            self.path.parent, describe(previous))
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(),
                       "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(
                           timespec="seconds"),
                       "study": self.study}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(self.holder) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # Unlink while still holding the flock, and only our own inode (after a
            # --force the path belongs to the new holder).
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                self.path.unlink()
        except OSError:
            pass
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder(output_dir: str | Path) -> tuple[dict, bool] | None:
    """``(holder, alive)`` from the output's lock file, or None when there is none.

    ``alive``: whether a process holds the lock now (probed with a shared non-blocking
    flock, released at once — a driver starting meanwhile retries, see ``BUSY_TRIES``).
    """
    path = Path(output_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            alive = True
        else:
            alive = False
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    return _read(path), alive


__all__ = ["LOCK_FILE", "LockHeld", "OutputError", "OutputLock", "describe", "holder"]
