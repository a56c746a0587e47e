"""Batch worker jobs that outlive their run: each leaves once the scheduler stops answering.

The scheduler of a SLURM run lives in the ``gpubatch run`` process on the login node. Killed,
it takes its sockets with it and Dask's workers stop within seconds. Frozen (Ctrl-Z in a tmux
pane, a job-control SIGSTOP, a login node's cgroup freezer), its kernel still acknowledges every
packet, so no worker ever sees the connection fail: the worker jobs sat idle, each holding its
allocation, until their walltime (hours). :class:`LeaveWithoutScheduler` asks the scheduler
something small every ``CHECK_S``; after ``leave_after_s`` (the run's ``run.lease_stale_s``,
the age at which a run's output lease is another run's to take) with no answer, the worker and
its nanny close and the job ends. A run that is thawed later finds its workers gone and gets new
ones (the SLURM cluster keeps its number of jobs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

log = logging.getLogger("gpubatch")
CHECK_S = 10.0  # seconds between questions to the scheduler, and how long each may take


def _plugin_base() -> type:
    from distributed.diagnostics.plugin import WorkerPlugin

    return WorkerPlugin


class LeaveWithoutScheduler(_plugin_base()):  # type: ignore[misc]
    """A Dask worker plugin: the worker (and its nanny) close after ``leave_after_s`` seconds in
    which the scheduler answered nothing."""

    name = "gpubatch-leave-without-scheduler"
    idempotent = True

    def __init__(self, leave_after_s: float, check_s: float = CHECK_S):
        self.leave_after_s, self.check_s = leave_after_s, min(check_s, leave_after_s)
        self._task: asyncio.Task[None] | None = None
        self._closing: asyncio.Future[Any] | None = None  # held: an unreferenced task may be collected

    async def setup(self, worker: Any) -> None:
        self._task = asyncio.ensure_future(self._watch(worker))

    async def teardown(self, worker: Any) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _watch(self, worker: Any) -> None:
        answered = time.monotonic()
        while True:
            await asyncio.sleep(self.check_s)
            with contextlib.suppress(Exception):  # no answer, or an error: the same to this watch
                await asyncio.wait_for(worker.scheduler.identity(), self.check_s)
                answered = time.monotonic()
            if time.monotonic() - answered > self.leave_after_s:
                break
        log.warning("gpubatch: the scheduler (in the `gpubatch run` process) has answered nothing for "
                    "%.0f s (run.lease_stale_s): this worker leaves, and its batch job ends, rather than "
                    "hold the allocation", time.monotonic() - answered)
        # on a task of its own: closing tears this plugin down, which cancels this watch
        self._closing = asyncio.ensure_future(worker.close(nanny=True, reason="gpubatch-scheduler-silent"))
