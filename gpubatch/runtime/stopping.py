"""Ctrl-C and SIGTERM during a run: an exception in the main thread, and a latch that keeps it.

A signal handler's exception is raised wherever the main thread happens to be, and Python drops
an exception raised inside a finaliser (a ``__del__``, a weakref callback: Dask's futures release
themselves in one) after printing "Exception ignored in". A Ctrl-C that lands there would be lost
and the run would go on to the end. So each handler also latches the signal, and the submit
loop asks :func:`raise_if_stopped` at every poll: a signal whose exception was dropped is raised
again there, within one poll.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from gpubatch.core.errors import GpubatchError


class Terminated(GpubatchError):
    """The client was asked to stop (SIGTERM)."""


#: the signal received while :func:`stop_on_signals` holds, until it ends
_received: list[int] = []


def _stopped(signum: int) -> BaseException:
    if signum == signal.SIGTERM:
        return Terminated("interrupted (SIGTERM); finish the run with --resume")
    return KeyboardInterrupt()


def _on_signal(signum: int, frame: Any) -> None:
    _received.append(signum)
    raise _stopped(signum)


def raise_if_stopped() -> None:
    """Raise the exception of a signal received during the run (one a finaliser dropped)."""
    if _received:
        raise _stopped(_received[0])


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM become exceptions in the main thread, so the run stops its workers and
    records the interruption instead of vanishing (the previous handlers are restored after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    _received.clear()
    signal.signal(signal.SIGTERM, _on_signal)
    if previous[signal.SIGINT] not in (signal.SIG_IGN, None):  # else a background job without
        signal.signal(signal.SIGINT, _on_signal)  # job control: Ctrl-C is not ours to catch
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _received.clear()
