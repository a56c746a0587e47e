"""The wait for workers, and its two bounds: a busy queue, and everything else.

A run with no worker fails after ``run.worker_timeout`` (30 minutes by default): none arrived,
or all were lost, and waiting longer rarely helps. Except on a busy cluster, where worker jobs
sit PENDING for reasons the queue clears by itself (Priority, Resources, a group limit, a
maintenance reservation): an overnight run submitted at 18:00 to a queue that frees up at 21:00
failed at 18:30. While every worker job is pending for such a reason (the executor says so:
:class:`Queued`), the wait is the queue's, bounded by ``run.queue_timeout`` (a day by default)
instead, said as it begins and every QUEUE_SAY_EVERY_S after, and shown in status.json; the
rest of the wait (jobs that vanished, none queued, a worker that starts and never connects)
still counts against ``run.worker_timeout``, added up over the whole wait so that jobs going
from pending to running and back cannot reset it for ever.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import NamedTuple

from gpubatch.core.errors import GpubatchError
from gpubatch.core.plural import plural

log = logging.getLogger("gpubatch")
#: seconds between the log lines of a wait on a busy queue (besides its first, and a change of reason)
QUEUE_SAY_EVERY_S = 300.0


class Queued(NamedTuple):
    """Every worker job is pending in the batch system: for reasons it clears by itself
    (``clears``: the queue's wait, bounded by run.queue_timeout), or for ones only a person
    clears (a hold, a partition or its nodes down), with ``action``, what starts the jobs: that
    wait counts against run.worker_timeout, and status.json says what to do."""

    jobs: int
    reasons: tuple[str, ...]
    system: str = "SLURM"
    clears: bool = True
    action: str = ""

    def words(self, waited_s: float) -> str:
        """"waiting for SLURM: 2 jobs pending (Priority) for 42 min", and what starts them where a
        person must: status.json and the log say it."""
        return (f"waiting for {self.system}: {self.jobs} {plural(self.jobs, 'job')} pending ({', '.join(self.reasons)}) "
                f"for {duration_words(waited_s)}" + (f": {self.action}" if self.action else ""))


class NoWorkers(NamedTuple):
    """An executor's account of why no worker is there: ``fatal`` where waiting cannot help (an
    sbatch rejection, a walltime over the partition's limit); ``queued`` where the jobs only
    wait their turn."""

    text: str
    fatal: bool = False
    queued: Queued | None = None


class WorkersUnavailable(GpubatchError):
    """No worker within the wait's bound: the run cannot make progress."""

    def __init__(self, why: str):
        super().__init__(f"{why}; what is committed stands: once workers can start, finish the run with --resume")


def duration_words(seconds: float) -> str:
    """35 s, 42 min, 3 h 12 min: a wait as a person reads it."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = int(seconds // 60)
    return f"{minutes} min" if minutes < 120 else f"{minutes // 60} h {minutes % 60} min"


class WorkerWait:
    """The clocks of one wait with no worker, looked at about every second by the submitter.

    ``on_queued`` is told the queue wait (what is pending, and since when, as a wall-clock time)
    as it begins or changes, and None as it ends, for status.json."""

    def __init__(self, worker_timeout: float, queue_timeout: float,
                 on_queued: Callable[[Queued | None, float], None] | None = None):
        self.worker_timeout, self.queue_timeout = worker_timeout, queue_timeout
        self.on_queued = on_queued or (lambda queued, since: None)
        self._since: float | None = None  # when the wait began (monotonic)
        self._last = 0.0  # the last look
        self._unqueued_s = 0.0  # the wait's seconds not spent with every job queued
        self._queued: Queued | None = None  # what the last look found queued
        self._queued_since = 0.0  # when the present stretch of queueing began (monotonic)
        self._said: tuple[str, float] | None = None  # the last line said, and when

    def over(self) -> None:
        """A worker is there (or a shard finished): the wait, if any, ends."""
        if self._queued is not None:
            self.on_queued(None, 0.0)
        self._since, self._queued, self._unqueued_s, self._said = None, None, 0.0, None

    def look(self, why: NoWorkers | None, now: float | None = None) -> None:
        """One look at a wait with no worker; raises WorkersUnavailable when it is over its bound,
        or ``why`` says waiting cannot help."""
        now = time.monotonic() if now is None else now
        if why is not None and why.fatal:
            raise WorkersUnavailable(why.text)
        if self._since is None:
            self._since = self._last = now
        if not self._queue_clock():  # the time since the last look counts as what that look found
            self._unqueued_s += now - self._last
        self._last = now
        self._set_queued(why.queued if why is not None else None, now)
        if self._queue_clock():
            self._queue_bound(why, now)
        elif self._unqueued_s > self.worker_timeout:
            reason = why.text if why else "no worker connected to the scheduler"
            raise WorkersUnavailable(f"no worker for {self.worker_timeout:g} s (run.worker_timeout): {reason}")
        else:
            self._say(why, now)

    def _queue_clock(self) -> bool:
        """Whether the wait is the queue's (run.queue_timeout): every job pending for reasons the
        queue clears by itself, not held or on a partition that is down."""
        return self._queued is not None and self._queued.clears

    def _set_queued(self, queued: Queued | None, now: float) -> None:
        if queued is not None and self._queued is None:
            self._queued_since = now
        if queued != self._queued:
            self.on_queued(queued, time.time() - (now - self._queued_since))
        self._queued = queued

    def _queue_bound(self, why: NoWorkers | None, now: float) -> None:
        """The queue's wait: over run.queue_timeout (counted from the wait's start) it fails."""
        assert self._queued is not None and self._since is not None and why is not None
        waited = now - self._queued_since
        if now - self._since > self.queue_timeout:
            raise WorkersUnavailable(
                f"no worker for {self.queue_timeout:g} s (run.queue_timeout): {why.text}, waiting their turn "
                f"in a busy queue ({duration_words(waited)}); raise run.queue_timeout to wait longer, or ask for less "
                "per worker job (slurm.walltime, cores, memory, or fewer run.workers) so that they start sooner")
        line = self._queued.words(waited)
        if self._said is None or self._said[0] != why.text or now - self._said[1] >= QUEUE_SAY_EVERY_S:
            self._said = (why.text, now)
            log.info("%s (up to run.queue_timeout, %g s; run.worker_timeout does not count this wait): %s",
                     line, self.queue_timeout, why.text)

    def _say(self, why: NoWorkers | None, now: float) -> None:
        """A wait other than the queue's: said as it begins, and again when its account changes."""
        if why is not None and (self._said is None or self._said[0] != why.text):
            self._said = (why.text, now)
            log.info("waiting for workers (up to run.worker_timeout, %g s): %s", self.worker_timeout, why.text)
