"""Files shared by the processes of one host: a lock per entry, and a small record beside it.

The stage cache is one per host, not one per worker process: any worker may run the shard whose
slide another worker downloaded ahead, and the disk budget is the host's. Its processes agree
through ``flock`` locks (released by the kernel when a process dies, so a crashed download never
blocks the others): a download holds its entry's lock exclusively, a process using the file holds
it shared, and eviction takes it exclusively without waiting, so a file in use is never deleted.
Without ``fcntl`` (Windows) the locks only order this process's threads, and the stage cache
keeps a directory per process instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

SHARED = fcntl is not None
POLL_S = 0.05


class EntryLock:
    """An flock on one file; not re-entrant; its state (exclusive/shared/none) per instance."""

    def __init__(self, path: str):
        self.path = path
        self._fd: int | None = None
        self._mutex = threading.Lock()  # orders this process's threads on the one descriptor
        self.state = "none"

    def _descriptor(self) -> int:
        if self._fd is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        return self._fd

    def _take(self, mode: str, timeout: float | None) -> bool:
        """``mode`` (exclusive or shared), waiting at most ``timeout`` s (None: do not wait)."""
        flag = 0 if fcntl is None else (fcntl.LOCK_EX if mode == "exclusive" else fcntl.LOCK_SH)
        deadline = time.monotonic() + (timeout or 0.0)
        while True:
            with self._mutex:
                if fcntl is None:
                    self.state = mode
                    return True
                try:
                    fcntl.flock(self._descriptor(), flag | fcntl.LOCK_NB)
                    if self._current():
                        self.state = mode
                        return True
                    continue  # locked a file since deleted: take the one at the path now
                except BlockingIOError:
                    pass
            if timeout is None or time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)

    def _current(self) -> bool:
        """Whether the locked descriptor is still the file at the path. A lock file is deleted
        (by :meth:`remove`, under the exclusive lock) when its entry goes; a process that opened
        it before then locks a file nobody else will see, so it drops it and opens the path anew."""
        assert self._fd is not None
        try:
            same = os.fstat(self._fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(self._fd)  # releases the stale lock
            self._fd = None
        return same

    def remove(self) -> None:
        """Delete the lock file while holding it exclusively (the entry is gone), then let go."""
        with self._mutex:
            if self.state == "exclusive":
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
        self.close()

    def exclusive(self, timeout: float | None = None) -> bool:
        return self._take("exclusive", timeout)

    def shared(self, timeout: float | None = None) -> bool:
        return self._take("shared", timeout)

    def unlock(self) -> None:
        with self._mutex:
            if self._fd is not None and fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            self.state = "none"

    def close(self) -> None:
        with self._mutex:
            if self._fd is not None:
                os.close(self._fd)  # releases its flock too
                self._fd = None
            self.state = "none"


def try_exclusive(path: str) -> EntryLock | None:
    """The lock at ``path`` held exclusively now, or None when anyone holds it (no waiting)."""
    lock = EntryLock(path)
    if lock.exclusive(None):
        return lock
    lock.close()
    return None


def read_record(path: str) -> dict[str, Any]:
    """A record written by :func:`write_record`; {} when there is none (or a torn one)."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_record(path: str, record: dict[str, Any]) -> None:
    """Write a small JSON record atomically (readers see the old one or the new one)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh)
    os.replace(tmp, path)


def touch(path: str) -> None:
    """Mark a record as just used (its mtime orders eviction, least recent first)."""
    with contextlib.suppress(OSError):
        os.utime(path)
