"""Items done inside a running shard, reported to the client while the shard runs.

A shard's result (and its committed item count) reaches the client only when the shard ends: a
run of one 100k-tile slide, or one shard of a million windows, showed "0 items" for an hour. The
model stage now tells an :class:`ItemReporter` of each batch; the reporter publishes the
shard's running count at most every ``REPORT_EVERY_S``, whatever the batch rate, so the cost is
one clock read per batch and one small message every few seconds (a shard shorter than that
sends none).

The counts are the attempt's own running total, not increments: a lost or late message
changes nothing lasting, and the client replaces a shard's figure by its committed count when it
ends, or drops it when the attempt fails (:class:`gpubatch.runtime.progress.InFlight`).

Where the report goes is the executor's business: on a Dask worker it is a worker event
(:func:`_to_dask_worker`, the one place this module knows Dask); on the in-process executor's
threads, whatever :func:`reports_to` set for the thread.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from gpubatch.core.threads import set_on_thread

#: the Dask event topic the reports are published under (one for every run: the scheduler keeps
#: a bounded number of events per topic, so runs sharing a scheduler share that bound)
TOPIC = "gpubatch-items"
#: seconds between a running shard's reports, at most one per interval
REPORT_EVERY_S = 2.0

_here = threading.local()


@dataclass(frozen=True)
class ShardItems:
    """One report: ``items`` done so far by ``attempt`` of ``shard_id`` in run ``run_id``, of
    ``of`` the shard will yield (None where the reader did not say)."""

    run_id: str
    shard_id: str
    attempt: int
    items: int
    of: int | None = None

    def to_msg(self) -> dict[str, Any]:
        """A plain dict: Dask's events must be msgpack-serializable."""
        return asdict(self)

    @classmethod
    def from_msg(cls, msg: Any) -> ShardItems | None:
        """The report a message carries; None for one that is not a report (another sender)."""
        try:
            of = msg.get("of")
            return cls(str(msg["run_id"]), str(msg["shard_id"]), int(msg["attempt"]), int(msg["items"]),
                       None if of is None else int(of))
        except (AttributeError, KeyError, TypeError, ValueError):
            return None


Send = Callable[[ShardItems], None]


def reports_to(send: Send | None) -> contextlib.AbstractContextManager[None]:
    """Reports made on this thread meanwhile go to ``send`` (the in-process executor's shard
    threads: the client's own callback), not to a Dask worker."""
    return set_on_thread(_here, "send", send)


def _to_dask_worker(report: ShardItems) -> None:
    """Publish on the Dask worker running this task (thread-safe: Dask hands it to the worker's
    event loop); outside a worker, nobody listens and the report is dropped."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return
    worker.log_event(TOPIC, report.to_msg())


def _publisher() -> Send:
    """Where this thread's reports go: the in-process callback if one is set, else Dask."""
    return getattr(_here, "send", None) or _to_dask_worker


class ItemReporter:
    """The model stage's ``on_batch``: counts a shard's items, publishing the running total at
    most every ``every_s`` seconds. Made on the shard's own thread (where the destination is
    known); called from the model stage."""

    def __init__(self, run_id: str, shard_id: str, attempt: int, of: int | None,
                 every_s: float | None = None, send: Send | None = None):
        self.run_id, self.shard_id, self.attempt, self.of = run_id, shard_id, attempt, of
        self.every_s = REPORT_EVERY_S if every_s is None else every_s
        self.send = send or _publisher()
        self.items = 0
        self.sent = 0  #: reports published: what tests count to see the cost is per interval
        self._last = time.monotonic()

    def __call__(self, n: int) -> None:
        self.items += n
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        self.sent += 1
        try:
            self.send(ShardItems(self.run_id, self.shard_id, self.attempt, self.items, self.of))
        except Exception:  # noqa: BLE001 - a report is display only: it never fails a shard
            return
