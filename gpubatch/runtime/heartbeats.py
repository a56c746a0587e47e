"""A closing Dask worker lets its last heartbeat be answered before it closes its connections.

Seen at the end of clean runs (one bench run in four): a worker process printed
``distributed.worker - ERROR - Failed to communicate with scheduler during heartbeat.`` and a
``CommClosedError ... ConnectionPool.heartbeat_worker ... Stream is closed`` traceback as the
cluster closed. The cause is in distributed's ``Worker.close``: it stops the heartbeat's periodic
callback but does not wait for a heartbeat already sent, then closes its connection pool, which
aborts that heartbeat's connection while it waits for the scheduler's answer; ``heartbeat`` logs
every OSError with its traceback, closing or not. A local cluster's scheduler runs on the event
loop of the ``gpubatch run`` process, which is busy at a run's end (the merge, the report), so
its answer can take long enough for the close to overtake it.

:class:`FinishHeartbeat` is a worker plugin: its ``teardown``, which ``Worker.close`` awaits
before it stops the callbacks and closes the pool, stops the heartbeat and waits (at most
:data:`WAIT_S`) for the one in flight. It wraps the callback of the worker's
``periodic_callbacks["heartbeat"]``, which distributed does not publish as an interface: where
that is absent (another distributed), the plugin does nothing, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

log = logging.getLogger("gpubatch")

#: the longest a closing worker waits for its heartbeat's answer: under the 4 s a nanny gives a
#: worker to close (80% of Nanny.close's 5 s) before it kills the process
WAIT_S = 3.0
_IN_FLIGHT = "_gpubatch_heartbeat_in_flight"


class FinishHeartbeat(WorkerPlugin):
    """On each worker: at close, no heartbeat is cut off waiting for the scheduler's answer."""

    idempotent = True  # registered once per scheduler; a second run's registration is ignored
    name = "gpubatch-finish-heartbeat"

    def setup(self, worker: Any) -> None:
        callback = getattr(worker, "periodic_callbacks", {}).get("heartbeat")
        if callback is None or getattr(callback, _IN_FLIGHT, False) is not False:
            return
        beat: Callable[[], Awaitable[None] | None] = callback.callback
        setattr(callback, _IN_FLIGHT, None)

        async def tracked() -> None:
            task = asyncio.ensure_future(_awaited(beat()))
            setattr(callback, _IN_FLIGHT, task)
            await task

        callback.callback = tracked

    async def teardown(self, worker: Any) -> None:
        callback = getattr(worker, "periodic_callbacks", {}).get("heartbeat")
        if callback is None:
            return
        callback.stop()
        task = getattr(callback, _IN_FLIGHT, None)
        if task is not None and not task.done():
            with contextlib.suppress(Exception):  # its own failure is the heartbeat's to log
                await asyncio.wait_for(asyncio.shield(task), WAIT_S)


async def _awaited(value: Awaitable[None] | None) -> None:
    if value is not None:
        await value


def finish_heartbeats(client: Any) -> None:
    """Have every worker of ``client``'s scheduler, now and to come, finish its heartbeat at close."""
    try:
        client.register_plugin(FinishHeartbeat(), name=FinishHeartbeat.name)
    except Exception:  # noqa: BLE001 - without it a closing worker may print a heartbeat's traceback, as before
        log.debug("could not register the heartbeat plugin", exc_info=True)
