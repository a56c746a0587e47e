"""Submitting shards: a bounded window of tasks in flight, retries, and a watch on the workers.

The client holds at most ``window`` shards in flight, however many the plan has, so its memory
does not grow with the job; the plan is consumed lazily. Failures that may pass (a lost worker,
a storage timeout, a shard with no result within ``run.shard_timeout``) are retried up to
``run.retries`` times; bad inputs are not. While it waits,
the submitter watches the executor: when no worker has been there for ``run.worker_timeout``
seconds (none ever arrived, or every one was lost) it stops the run with the executor's own
account of why (an ``sbatch`` rejection, jobs left pending) instead of waiting forever; while
every worker job only waits its turn in a busy queue, ``run.queue_timeout`` bounds the wait
instead (runtime.waiting).

Where the executor has worker processes (Dask), shards are dealt to them (runtime.dealing), so
that the inputs a shard names as upcoming are the ones its own process runs next; in one
process (``inline``) they are simply the plan's next.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from gpubatch.core.errors import DiskFull
from gpubatch.core.memory import hand_back_freed_memory
from gpubatch.core.plural import plural
from gpubatch.core.results import ShardResult
from gpubatch.engine.context import RunContext
from gpubatch.engine.worker import execute_shard
from gpubatch.runtime.dealing import Dealer
from gpubatch.runtime.executors import Executor
from gpubatch.runtime.progress import InFlight
from gpubatch.runtime.stopping import raise_if_stopped
from gpubatch.runtime.waiting import Queued, WorkerWait
from gpubatch.sources import Shard
from gpubatch.spec import JobSpec

log = logging.getLogger("gpubatch")
POLL_S = 1.0
#: seconds between hand-backs of the client's freed memory to the system (core.memory)
HAND_BACK_S = 30.0


class Submitter:
    """Runs a stream of shards through an executor; hands each final result to ``on_result``."""

    def __init__(self, executor: Executor, job: JobSpec, ctx: RunContext,
                 on_result: Callable[[ShardResult], None], window: int,
                 on_retry: Callable[[ShardResult], None] | None = None, ahead: int | None = None,
                 on_poll: Callable[[], None] | None = None, in_flight: InFlight | None = None,
                 on_queued: Callable[[Queued | None, float], None] | None = None):
        self.executor, self.job, self.ctx, self.on_result = executor, job, ctx, on_result
        #: the items running attempts report, for the display: each attempt's figure is opened as
        #: it is submitted and closed as its result comes in (never left to add to the result's)
        self.in_flight = in_flight or InFlight()
        if in_flight is not None:  # someone shows them: have the executor pass them on
            executor.on_progress(in_flight.report)
        #: asked at every poll; raises to stop the run (the output's lease was taken over)
        self.on_poll = on_poll or (lambda: None)
        self.on_retry = on_retry  # told of each failed attempt that is tried again (the audit records it)
        self.window = max(1, window)
        #: how many next inputs of the plan each shard names, when shards are not dealt to
        #: worker processes (run.stage_ahead by default; dealt, each lane holds run.stage_ahead)
        self.ahead = job.run.stage_ahead if ahead is None else ahead
        self.attempts: dict[str, int] = {}  #: shards in flight -> attempts so far
        #: shards in flight -> the workers lost while executing them
        self.losses: dict[str, list[str]] = {}
        self.allowed_losses = _allowed_failures()
        self.pending: set[Any] = set()
        #: the wait with no worker, if any, and its bounds; ``on_queued`` is told of a wait on a busy queue
        self.wait = WorkerWait(job.run.worker_timeout, job.run.queue_timeout, on_queued)
        self._handed_back = time.monotonic()
        self.dealer: Dealer | None = None  #: set while shards are dealt to worker processes

    def _submit(self, shard: Shard, upcoming: tuple[str, ...], worker: str | None = None) -> Any:
        n = self.attempts.get(shard.shard_id, 0) + 1
        self.attempts[shard.shard_id] = n
        self.in_flight.started(shard.shard_id, n, shard.n_items_hint)
        key = f"gpubatch-{shard.shard_id}-{n}-{time.time_ns()}"
        fut = self.executor.submit(execute_shard, shard, self.job, self.ctx, upcoming if n == 1 else (), n,
                                   key=key, worker=worker)
        fut.shard, fut.worker = shard, worker
        fut.deadline = time.monotonic() + self.job.run.shard_timeout
        return fut

    def _overdue(self, pending: set[Any], done: set[Any]) -> set[Any]:
        """Tasks past run.shard_timeout, given up on: a read stuck in the kernel (a hung mount)
        never returns, and would hold the run open forever. The executor frees their workers."""
        now = time.monotonic()
        late = {fut for fut in pending - done if now > fut.deadline}
        if late:
            self.executor.abandon(late)
        return late

    def _timed_out(self, fut: Any) -> ShardResult:
        """The failure recorded for a task given up on; it may pass on another attempt."""
        shard, limit = fut.shard, self.job.run.shard_timeout
        log.warning("shard %s: no result within %g s (run.shard_timeout)", shard.shard_id, limit)
        result = ShardResult.failure(
            shard.shard_id, shard.input_uri,
            f"no result within {limit:g} s (run.shard_timeout): the shard was stuck (a read that never "
            "returned) or slower than that; raise run.shard_timeout if shards this large take longer",
            retryable=True)
        result.attempt = self.attempts[shard.shard_id]
        return result

    def _result(self, fut: Any) -> ShardResult | None:
        """A finished task's result; None when it was lost with the worker that held it.

        The result lives on the worker that ran the task until gathered. If that worker dies
        first, Dask recomputes the task under the dead worker's placement, which no worker that
        joins later takes (see _place_again): the run would wait out run.worker_timeout for it.
        A future that goes from finished back to lost or pending is therefore given up at once
        and the caller runs the shard again; any other wait is bounded by run.worker_timeout
        (and then counts as a retryable failure)."""
        shard = fut.shard
        deadline = time.monotonic() + self.job.run.worker_timeout
        while True:
            try:
                result: ShardResult = fut.result(timeout=POLL_S)
                break
            except TimeoutError as exc:
                if getattr(fut, "status", "finished") in ("lost", "pending"):
                    return None
                if time.monotonic() < deadline:
                    continue
                result = ShardResult.failure(shard.shard_id, shard.input_uri, f"{type(exc).__name__}: {exc}",
                                             retryable=True)
                break
            except Exception as exc:  # a worker died, the result was lost, or the task raised outside the shard
                result = ShardResult.failure(shard.shard_id, shard.input_uri, self.executor.failure_words(exc),
                                             retryable=True)
                break
        result.attempt = self.attempts[shard.shard_id]
        return result

    def run(self, shards: Iterable[Shard]) -> None:
        if self.executor.worker_slots() is not None:
            self._run_dealt(shards)
        else:
            self._run_in_plan_order(shards)

    def _run_dealt(self, shards: Iterable[Shard]) -> None:
        """Shards dealt to the worker processes there are, as they have room; none while there
        are none (the worker watch bounds that wait)."""
        pending = self.pending
        self.dealer = dealer = Dealer(shards, self.job.run.stage_ahead)
        while pending or not dealer.done:
            slots = self.executor.worker_slots() or {}
            gone = dealer.set_workers(slots)
            for worker in gone:
                log.info("worker %s left; the shards dealt to it are dealt again", worker)
            if gone:
                self._place_again(set(gone))
            for placed in dealer.placements(self.window - len(pending)):
                pending.add(self._submit(placed.shard, placed.upcoming, placed.worker))
            if pending:
                self._collect(pending)
            else:  # no worker with slots: wait for one, within run.worker_timeout
                time.sleep(POLL_S)
                raise_if_stopped()
                self.on_poll()
                self._watch_workers(False, available=len(dealer.slots))

    def _place_again(self, gone: set[str]) -> None:
        """Submit again, to any worker, the shards placed on workers that left and held by none.

        Dask keeps a task placed on a worker that died in 'no-worker' when no other worker is
        there, and a worker that joins later does not take it despite allow_other_workers
        (distributed's bulk_schedule_unrunnable_after_adding_worker checks only the
        restriction): with one worker, or all lost and replaced, the run waited forever. A task
        some worker holds (Dask moved it to one already there) is left alone: it may be running.
        """
        placed = {fut for fut in self.pending if fut.worker in gone}
        held = self.executor.running() if placed else set()
        if held is None:
            return
        self._submit_again({fut for fut in placed if str(fut.key) not in held})

    def _count_losses(self) -> None:
        """Count, per shard, the workers lost while executing it; a shard lost with more than
        Dask's allowed-failures workers fails (not retried) with the cause of the last loss.
        Dask's own count (KilledWorker) starts again with every new task: each submit after a
        loss (_place_again) and each retry. A shard longer than a worker job's time limit ended
        (retries + 1) x (allowed-failures + 1) + 1 jobs, 13 by default (four days of 8-hour
        jobs), and was then quarantined as a KilledWorker that named no time limit."""
        for shard_id, worker in self.executor.lost_executing().items():
            self.losses.setdefault(shard_id, []).append(worker)
            self.in_flight.restarted(shard_id)
        over = [fut for fut in self.pending if len(self.losses.get(fut.shard.shard_id, ())) > self.allowed_losses]
        for fut in over:
            self.executor.cancel({fut})
            self.pending.discard(fut)
            if self.dealer is not None and fut.worker is not None:
                self.dealer.finished(fut.worker)
            self._settle(fut, self._lost_too_often(fut))

    def _lost_too_often(self, fut: Any) -> ShardResult:
        shard, workers = fut.shard, self.losses.pop(fut.shard.shard_id)
        cause = self.executor.loss_cause(workers[-1]) or "no cause known"
        result = ShardResult.failure(
            shard.shard_id, shard.input_uri,
            f"the worker running it was lost {len(workers)} {plural(len(workers), 'time')} (the last: {cause}); a shard "
            "that outlives every worker that runs it (a batch job's time limit, such as slurm.walltime, or "
            "its memory) never finishes: give the workers more, or split the input", retryable=False)
        result.attempt = self.attempts[shard.shard_id]
        return result

    def _submit_again(self, lost: set[Any]) -> None:
        """Cancel tasks whose worker left (not yet run, or their result gone with it) and submit
        their shards again, to any worker. Not a failed attempt: nothing about the shard failed."""
        self.executor.cancel(lost)
        for fut in lost:
            self.pending.discard(fut)
            self.attempts[fut.shard.shard_id] -= 1
            self.pending.add(self._submit(fut.shard, ()))

    def _run_in_plan_order(self, shards: Iterable[Shard]) -> None:
        pending = self.pending
        stream = _with_upcoming(shards, self.ahead)
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < self.window:
                item = next(stream, None)
                if item is None:
                    exhausted = True
                    break
                pending.add(self._submit(*item))
            if pending:
                self._collect(pending)

    def _collect(self, pending: set[Any]) -> None:
        done = self.executor.wait_first(pending, timeout=POLL_S)
        raise_if_stopped()
        self.on_poll()
        self._watch_workers(bool(done))
        late = self._overdue(pending, done)
        for fut in done | late:
            pending.discard(fut)
            if self.dealer is not None and fut.worker is not None:
                self.dealer.finished(fut.worker)
            result = self._timed_out(fut) if fut in late else self._result(fut)
            if result is None:
                log.warning("shard %s: its result was lost with the worker that held it; running it again",
                            fut.shard.shard_id)
                self._submit_again({fut})
                continue
            self._settle(fut, result)
        self.executor.note_processing(pending)
        self._count_losses()
        self._hand_back_memory()

    def _settle(self, fut: Any, result: ShardResult) -> None:
        """A finished attempt: tried again where it may pass, else final (handed to on_result)."""
        if result.stops_run:  # a full disk: every shard would fail alike, and no input is to blame
            raise DiskFull(result.error or "the disk is full")
        if not result.ok and result.retryable and result.attempt <= self.job.run.retries:
            log.warning("shard %s failed (%s); retrying", result.shard_id, result.error)
            if self.on_retry is not None:
                self.on_retry(result)
            self.pending.add(self._submit(fut.shard, ()))
            return
        del self.attempts[result.shard_id]  # final: the count lives on in the result
        self.losses.pop(result.shard_id, None)
        self.in_flight.ended(result.shard_id)  # before the result counts: never both at once
        self.on_result(result)

    def _hand_back_memory(self) -> None:
        """Every HAND_BACK_S: the memory that folding results and Dask's messages freed goes
        back to the system, so that the client's RSS over a 100,000-shard run stays where the
        first minutes put it instead of keeping every hole those left (bench/bench_client.py)."""
        now = time.monotonic()
        if now - self._handed_back >= HAND_BACK_S:
            self._handed_back = now
            hand_back_freed_memory()

    def _watch_workers(self, progressed: bool, available: int | None = None) -> None:
        """Stops the run when no worker (``available``: none that can run a shard) has been
        there for run.worker_timeout (run.queue_timeout while every worker job waits its turn
        in a busy queue: runtime.waiting), or the executor knows waiting cannot help."""
        if progressed or (self.executor.workers() if available is None else available) > 0:
            self.wait.over()
            return
        self.wait.look(self.executor.why_no_workers())


def _allowed_failures() -> int:
    """Dask's own bound on the workers a task may outlive (distributed.scheduler.allowed-failures)."""
    import dask

    return int(dask.config.get("distributed.scheduler.allowed-failures", 3))


def _with_upcoming(shards: Iterable[Shard], ahead: int) -> Iterator[tuple[Shard, tuple[str, ...]]]:
    """Each shard with the inputs of the next ``ahead`` shards (for staging them in advance),
    holding only ``ahead + 1`` shards of the plan at once."""
    it = iter(shards)
    buffer: list[Shard] = []
    for shard in it:
        buffer.append(shard)
        if len(buffer) > ahead:
            head = buffer.pop(0)
            yield head, tuple(s.input_uri for s in buffer)
    while buffer:
        head = buffer.pop(0)
        yield head, tuple(s.input_uri for s in buffer)
