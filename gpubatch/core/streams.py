"""Writing to a terminal or a pipe that may go away before the process ends.

Two everyday ways: a reader that stops reading (``gpubatch report OUT | head -1``, ``| grep -q
finished``): writes fail with EPIPE (Python ignores SIGPIPE, so a BrokenPipeError); and a
terminal that hangs up under a process that ignores SIGHUP (``nohup`` without a redirect,
``disown``): writes fail with EIO. Either way no one is left to read: what the process would
still say has nowhere to go, and saying it must not stop what it does. An overnight run failed
at its progress bar's last refresh and again at its summary, its shards all committed.

:class:`QuietWhenGone` wraps a text stream so that the first such failure points the stream's
descriptor at /dev/null (Python's documented remedy: its buffer, later writes, and the flush at
the interpreter's exit then go nowhere instead of failing again, there as "Exception ignored"
and exit status 120) and later writes are dropped. Any other error is raised as before.
"""

from __future__ import annotations

import errno
import os
import sys
from contextlib import suppress
from typing import Any, TextIO

#: a write's errno that says the reader is gone for good: a closed pipe or socket, a hung-up
#: terminal (EIO; ENXIO where the device itself went)
GONE_ERRNOS = frozenset({errno.EPIPE, errno.EIO, errno.ENXIO, errno.ECONNRESET})


def point_at_devnull(fd: int) -> None:
    """Descriptor ``fd`` writes to /dev/null from now on (for this process and what it starts)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def reader_gone(exc: BaseException) -> bool:
    """Whether a write failed because no one reads the other end any more."""
    return isinstance(exc, OSError) and exc.errno in GONE_ERRNOS


class QuietWhenGone:
    """A text stream (stdout, stderr, a console's file) whose writes never fail because its
    reader went away; everything else (``isatty``, ``fileno``, ``encoding``) is the stream's."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        #: the reader went away: what is written from now on is dropped
        self.gone = False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self.stream.write(text)
            except OSError as exc:
                self._went(exc)
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self.stream.flush()
            except OSError as exc:
                self._went(exc)

    def _went(self, exc: OSError) -> None:
        if not reader_gone(exc):
            raise exc
        self.gone = True
        with suppress(OSError, ValueError, AttributeError):  # a stream with no descriptor: dropped only
            point_at_devnull(self.stream.fileno())
        with suppress(OSError, ValueError):  # what its buffer still holds: to /dev/null, not to exit's flush
            self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def bar_console() -> Any:
    """The rich Console a progress bar draws on (the shards' bar, runtime.progress, and the long
    steps', core.phases): stderr, the terminal the bar was chosen for (rich's default, stdout, put
    the bar's last frame first in ``run JOB | head -1`` and none on the terminal), through
    :class:`QuietWhenGone`: a terminal that hangs up under a run that ignores SIGHUP fails every
    write (EIO), and rich, on a closed pipe, exits the process (SystemExit 1); either failed a
    run whose shards were all committed, at the bar's last refresh."""
    from rich.console import Console

    return Console(file=QuietWhenGone(sys.stderr))  # type: ignore[arg-type]
