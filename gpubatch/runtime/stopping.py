"""Ctrl-C, SIGTERM and SIGHUP during a run: an exception in the main thread, and a latch that keeps it.

A signal handler's exception is raised wherever the main thread happens to be, and Python drops
an exception raised inside a finaliser (a ``__del__``, a weakref callback: Dask's futures release
themselves in one) after printing "Exception ignored in". A Ctrl-C that lands there would be lost
and the run would go on to the end. So each handler also latches the signal, and the submit
loop asks :func:`raise_if_stopped` at every poll: a signal whose exception was dropped is raised
again there, within one poll.

Only the first signal raises. A second one (an impatient Ctrl-C, SLURM's SIGTERM after a
person's) lands in the orderly stop itself: raised there, it cut short the cancelling of the
workers or the status write and left status.json saying "running". It is said and latched.

SIGHUP is the terminal closing (an SSH session that dropped under a foreground run): stopped
like SIGTERM, after the terminal's outputs are pointed at /dev/null, since every write to a
hung-up terminal fails (EIO) and one failing in the stop would take the status write's place.
A run started under ``nohup`` (SIGHUP ignored) is left to outlive its terminal.

A signal that comes while the main thread is inside an import is delivered again once the import
is over (within milliseconds of it): raised inside one, it broke the process for good. A module
interrupted half-way stays half-imported (pandas then failed to import for the rest of the
process, and a notebook needed a restart), and one landing inside importlib's own bookkeeping
left the interpreter's import lock held, so the next thread to import (the next run's Dask event
loop) waited on it for ever. The first run in a fresh process or notebook spends seconds importing.
"""

from __future__ import annotations

import os
import signal
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from gpubatch.core.errors import GpubatchError
from gpubatch.core.streams import point_at_devnull
from gpubatch.runtime.own_job import OwnJob


class Terminated(GpubatchError):
    """The client was asked to stop (SIGTERM, SIGHUP)."""


#: the signals received while :func:`stop_on_signals` holds, until it ends
_received: list[int] = []
#: how soon a signal that came during an import is sent again (seconds)
REDELIVER_S = 0.05
#: the SLURM job this client runs in, if any (a SIGTERM at its end time is its time limit)
_own_job: list[OwnJob] = []
#: non-empty while :func:`signals_held` holds: a signal is latched, and raised at its end
_holding: list[bool] = []
HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _stopped(signum: int) -> BaseException:
    if signum == signal.SIGHUP:
        return Terminated("interrupted: the terminal closed (SIGHUP); finish the run with --resume")
    if signum == signal.SIGTERM:
        limit = _own_job[0].time_limit_words() if _own_job else None
        return Terminated(f"interrupted ({limit or 'SIGTERM'}); finish the run with --resume")
    return KeyboardInterrupt()


def _say(text: str) -> None:
    """One line on stderr from a signal handler: the descriptor written directly (no buffer or
    lock the interrupted code may hold), and a terminal that is gone is no error."""
    with suppress(OSError):
        os.write(2, f"gpubatch: {text}\n".encode())


def _quiet_gone_terminal() -> None:
    """stdout and stderr to /dev/null unless they are files (a log a person asked for): the
    terminal or the pipe to it has gone with the session."""
    for fd in (1, 2):
        with suppress(OSError):
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                point_at_devnull(fd)


def _inside_an_import(frame: Any) -> bool:
    """Whether the interrupted main thread is running an import: importlib's frames under it."""
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith("<frozen importlib.") or name.endswith(("importlib/_bootstrap.py",
                                                                  "importlib/_bootstrap_external.py")):
            return True
        frame = frame.f_back
    return False


def _deliver_again(signum: int) -> None:
    """Send ``signum`` to this process again in REDELIVER_S, from a helper thread."""
    timer = threading.Timer(REDELIVER_S, os.kill, (os.getpid(), signum))
    timer.daemon = True
    timer.start()


def _on_signal(signum: int, frame: Any) -> None:
    if signum == signal.SIGHUP:
        _quiet_gone_terminal()
    if _inside_an_import(frame):  # raised here it breaks the import for good: after it, then
        _deliver_again(signum)
        return
    _received.append(signum)
    if len(_received) == 1 and not _holding:
        raise _stopped(signum)
    if len(_received) == 2:  # said once: a held-down Ctrl-C is not a screenful
        _say(f"{signal.Signals(signum).name} while stopping: the workers are being stopped and the "
             "interruption recorded, within seconds (kill -9 leaves that to --resume)")


def raise_if_stopped() -> None:
    """Raise the exception of a signal received during the run (one a finaliser dropped). Only
    in the main thread, whose run the handlers stop: a run in another thread of the process (a
    notebook's) goes on to its end, where it once raised the main thread's Ctrl-C too."""
    if _received and threading.current_thread() is threading.main_thread():
        raise _stopped(_received[0])


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP become exceptions in the main thread, so the run stops its
    workers and records the interruption instead of vanishing (the previous handlers are
    restored after). A signal ignored when the run starts stays ignored: SIGINT in a background
    job without job control is not ours to catch, nor SIGHUP under nohup."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in HANDLED}
    _received.clear()
    own_job = OwnJob.from_environment()
    _own_job[:] = [own_job] if own_job is not None else []
    for sig, handler in previous.items():
        if sig == signal.SIGTERM or handler not in (signal.SIG_IGN, None):
            signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _received.clear()
        _own_job.clear()


@contextmanager
def signals_held() -> Iterator[None]:
    """A signal meanwhile (in the main thread) is latched, and raised once the block is done:
    for a run's last steps, which must not be cut half-way. A Ctrl-C landing before the run's
    lease was released left it held, its heartbeat thread beating it for the life of the
    process: a notebook's next run into that output was refused as "another run in this same
    process", and so was every other process's. A block that raises raises its own error, and
    one entered after a signal raises none (a run's first signal alone raises)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = len(_received)
    _holding.append(True)
    try:
        yield
    finally:
        _holding.pop()
    if not before and _received:
        raise _stopped(_received[0])


def ignore_further_signals() -> None:
    """A process whose run was stopped is on its way out (its last words, Dask's exit handlers):
    a signal that keeps coming must not end it there, in a traceback, or by the default action."""
    if threading.current_thread() is threading.main_thread():
        for sig in HANDLED:
            signal.signal(sig, signal.SIG_IGN)
