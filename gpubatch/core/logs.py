"""Log lines that are safe to show, and third-party warnings routed into gpubatch's log.

Libraries that parse inputs warn about what they find (tifffile prints a corrupt description's
bytes; imagecodecs reports JPEG 2000 decoder warnings), by default straight onto the terminal
through Python's last-resort handler, without saying which file. Here those loggers and Python
warnings are routed into gpubatch's log at DEBUG (shown with ``-v``), prefixed with the file
being read (:func:`reading`), redacted and with control characters escaped. A decode that must
treat library warnings as errors collects them with :func:`collect_warnings`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

from gpubatch.core.threads import set_on_thread
from gpubatch.io.redact import safe_text

#: loggers of libraries that read inputs and may print their contents
LIBRARY_LOGGERS = ("tifffile", "imagecodecs", "py.warnings")
ROUTED = "gpubatch.libs"
_local = threading.local()


class SafeFormatter(logging.Formatter):
    """Every line redacted and printable: a URI with a signature or a file name with an ANSI
    escape or a raw newline in a log argument cannot leak or forge a line."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = safe_text(record.message)
        return super().formatMessage(record)


class _LibraryHandler(logging.Handler):
    """Re-logs a library's record as gpubatch's DEBUG line naming the file this thread reads;
    warnings also go to the collector a strict decode opened on this thread."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a library's malformed record must not stop a read
            text = str(record.msg)
        collected = getattr(_local, "collected", None)
        if collected is not None and record.levelno >= logging.WARNING:
            collected.append(text)
        where = getattr(_local, "file", None)
        prefix = f"{safe_text(where)}: " if where else ""
        logging.getLogger(ROUTED).debug("%s%s: %s", prefix, record.name, text[:500])


_handler = _LibraryHandler()


def route_library_logs(*, python_warnings: bool = True, extra: tuple[str, ...] = ()) -> None:
    """Send the input libraries' log records (and Python warnings) into gpubatch's log.

    Idempotent. The CLI and workers route everything; a backend used from the Python API routes
    only the libraries' loggers, leaving the caller's ``warnings`` set-up alone.
    """
    if python_warnings:
        logging.captureWarnings(True)
    for name in (*(LIBRARY_LOGGERS if python_warnings else LIBRARY_LOGGERS[:-1]), *extra):
        lib = logging.getLogger(name)
        if _handler not in lib.handlers:
            lib.addHandler(_handler)
        lib.propagate = False


def reading(name: str) -> contextlib.AbstractContextManager[None]:
    """Library warnings raised in this thread meanwhile name ``name`` (redacted, printable, when
    one is logged: this wraps every tile's decode, where redacting the name each time cost more
    than a tenth of a small tile's decode)."""
    return set_on_thread(_local, "file", name)


@contextlib.contextmanager
def collect_warnings() -> Iterator[list[str]]:
    """The library warnings logged in this thread while the block runs (a decoder's complaints)."""
    before = getattr(_local, "collected", None)
    found: list[str] = []
    _local.collected = found
    try:
        yield found
    finally:
        _local.collected = before
