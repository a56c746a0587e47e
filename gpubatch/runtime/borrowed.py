"""What gpubatch's clusters borrow from the calling process while they live: Dask settings and
os.environ, given back when the last of them closes.

A cluster gpubatch starts runs under its own Dask settings (runtime.cluster's ``_dask_settings``),
and Dask's nannies set their workers' environment (OMP_NUM_THREADS=1, MALLOC_*, PYTHONHASHSEED)
in this process's os.environ before each worker starts, and leave it there. A notebook that runs
gpubatch and then its own Dask or numpy must get its own back: forkserver workers, no profiler and
numpy on one thread were not its choice.

Runs in two threads of one process overlap, and each putting back what it found at its own start
put back, when the first to start ended last, what the other had set: the caller kept gpubatch's
settings and the workers' environment after both. So the process's first cluster takes the
caller's, and its last gives them back: each setting is set once while any cluster needs it.
Dask's log handlers too: a local cluster quiets them while it lives (``silence_logs``), and the
first of two to close gave them their level back under the other, whose INFO lines then went to
the notebook's stderr; they are quiet while any cluster that asks it lives.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

#: taken while os.environ holds what only a starting process should see (the forkserver's start),
#: so that a copy of the caller's environment is never taken in between
ENVIRON_LOCK = threading.Lock()
#: set by distributed for its own children to read (proctitle), not a setting of the caller's
_DASK_OWN_ENV = ("__DASK_PARENT_PID",)


def restore_environ(before: dict[str, str]) -> None:
    """os.environ as it was ``before``, for every variable changed since."""
    for key in set(os.environ) | set(before):
        if key in _DASK_OWN_ENV or os.environ.get(key) == before.get(key):
            continue
        if key in before:
            os.environ[key] = before[key]
        else:
            os.environ.pop(key, None)


class _Borrowed:
    """The Dask settings set for the clusters alive now (how many need each, and the
    ``dask.config.set`` that undoes it) and the caller's environment from before the first."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.settings: dict[str, tuple[int, Any]] = {}
        self.holders = 0
        self.environ: dict[str, str] = {}
        self.quiet = 0  # the clusters alive that quiet Dask's log handlers
        self.loud = contextlib.ExitStack()  # their levels before, given back by the last

    def take(self, settings: dict[str, Any], quiet: bool = False) -> None:
        import dask

        with self.lock:
            if self.holders == 0:
                with ENVIRON_LOCK:
                    self.environ = dict(os.environ)
            self.holders += 1
            if quiet and not self.quiet:
                from distributed.utils import silence_logging_cmgr

                self.loud.enter_context(silence_logging_cmgr(logging.ERROR))
            self.quiet += quiet
            for key, value in settings.items():
                count, undo = self.settings.get(key, (0, None))
                self.settings[key] = (count + 1, undo if undo is not None else dask.config.set({key: value}))

    def give_back(self, settings: dict[str, Any], quiet: bool = False) -> None:
        with self.lock:
            self.quiet -= quiet
            if quiet and not self.quiet:
                self.loud.close()
            for key in settings:
                count, undo = self.settings.pop(key)
                if count > 1:
                    self.settings[key] = (count - 1, undo)
                else:
                    undo.__exit__(None, None, None)
            self.holders -= 1
            if self.holders == 0:
                restore_environ(self.environ)


_BORROWED = _Borrowed()


def borrow(settings: dict[str, Any], quiet: bool = False) -> Callable[[], None]:
    """Set the Dask ``settings`` (constant values per key) for a cluster that is starting, taking
    the caller's environment first if no cluster of gpubatch's is alive, and (``quiet``) Dask's
    log handlers to errors only; returns what gives them back when the cluster has closed (once,
    however often called)."""
    _BORROWED.take(settings, quiet)
    given: list[bool] = []

    def give_back() -> None:
        if not given:
            given.append(True)
            _BORROWED.give_back(settings, quiet)

    return give_back
