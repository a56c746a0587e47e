"""Executors: where shards run. One small interface, an in-process twin and Dask.

The runner submits shard functions and waits for the first of several to finish; it does not
know whether they run on threads of this process (``inline``, for debugging and small jobs) or on
a Dask cluster (local processes, GPUs, an existing scheduler, SLURM).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import queue
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as thread_wait
from typing import Any

from gpubatch.core.errors import GpubatchError
from gpubatch.engine.item_reports import TOPIC as ITEMS_TOPIC
from gpubatch.engine.item_reports import ShardItems, reports_to
from gpubatch.io.redact import redact
from gpubatch.runtime.dask_bookkeeping import (
    forget_closed_servers,
    forget_key_names,
    trim_scheduler,
)
from gpubatch.runtime.losses import LostWorkers, WorkerJobs
from gpubatch.runtime.waiting import NoWorkers

log = logging.getLogger("gpubatch")
#: the event a Dask nanny logs on the scheduler when it kills its worker for memory
MEMORY_KILL_TOPIC = "worker-restart-memory"
WATCH_S = 1.0  # seconds between looks at which worker runs what
TRIM_S = 30.0  # seconds between trims of the scheduler's per-task bookkeeping
CLOSE_TIMEOUT_S = 20  # a client or cluster that does not close in this long is left behind


class Executor(ABC):
    """Runs shard functions somewhere and reports them as futures."""

    @abstractmethod
    def submit(self, fn: Callable[..., Any], *args: Any, key: str, worker: str | None = None) -> Any:
        """Start ``fn(*args)``; ``key`` names the task uniquely (one per attempt). ``worker``
        (one of :meth:`worker_slots`) is where it should run; elsewhere only if that one is gone."""

    @abstractmethod
    def wait_first(self, pending: set[Any], timeout: float | None = None) -> set[Any]:
        """The futures among ``pending`` that have finished, waiting for at least one (or the timeout)."""

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release workers and connections."""

    def cancel(self, pending: set[Any]) -> None:  # noqa: B027 - threads cannot be cancelled
        """Stop tasks that have not finished (an interrupted run)."""

    def abandon(self, stuck: set[Any]) -> None:
        """Give up on tasks that ran past run.shard_timeout: stop them, and free what runs them
        where that can be done (a thread cannot be stopped; a Dask worker process can)."""
        self.cancel(stuck)

    def running(self) -> set[str] | None:
        """Keys of the tasks a worker holds now; None when that cannot be known."""
        return None

    def workers(self) -> int:
        """Workers connected now (in-process threads count as workers)."""
        return 1

    def worker_slots(self) -> dict[str, int] | None:
        """The worker processes there are now and how many shards each runs at once, for
        dealing shards to them (runtime.dealing); None when every shard runs in this process."""
        return None

    def why_no_workers(self) -> NoWorkers | None:
        """The executor's account of why no worker is there: whether waiting cannot help (an
        sbatch rejection), whether the jobs only wait their turn in a busy queue; None when it
        knows of nothing wrong."""
        return None

    def on_progress(self, callback: Callable[[ShardItems], None]) -> None:  # noqa: B027 - optional
        """Have ``callback`` told of the items running shards report (engine.item_reports), as
        they report them, on whatever thread the executor hears them on; by default nothing is
        heard and progress moves as shards finish."""

    def note_processing(self, pending: set[Any]) -> None:  # noqa: B027 - nothing to watch in-process
        """Called as the run waits: lets the executor notice workers that left mid-task."""

    def claim_worker_requests(self) -> dict[str, int]:
        """The storage requests worker processes made after their last shard's claim (its commit
        record's write), claimed (io.metrics.claim_requests); none where shards run in this
        process, whose leftovers the client claims itself."""
        return {}

    def lost_workers(self) -> list[dict[str, Any]]:
        """Workers that left while the run went on: {worker, time, shards they were running,
        and cause where it is known}."""
        return []

    def loss_cause(self, worker: str) -> str | None:
        """Why ``worker`` was lost, where that is known."""
        return None

    def lost_executing(self) -> dict[str, str]:
        """The shards that workers lost since the last call were executing (not merely queued
        there), each with the worker lost."""
        return {}

    def failure_words(self, exc: BaseException) -> str:
        """How an error raised outside the shard's own code (the executor's) is recorded."""
        return f"{type(exc).__name__}: {exc}"

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InlineExecutor(Executor):
    """No Dask: shards run on threads of this process (``threads_per_worker`` at once).

    Two shards at a time let one shard's setup (open, tissue mask) overlap the other's compute;
    the model session is shared, as on a Dask worker.

    A shard given up on (run.shard_timeout) cannot be stopped: Python has no way to stop a
    thread, least of all one blocked in a read in the kernel. Its thread is left behind and a
    new one takes its place, so the run goes on at full width; the threads are daemons, so the
    one left behind does not hold the process open at its end (a ThreadPoolExecutor's threads
    are joined at exit, and the run hung there after saying it was done).
    """

    def __init__(self, threads: int = 2):
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue())
        self._threads: list[threading.Thread] = []
        self._abandoned: set[Future[Any]] = set()
        self._lock = threading.Lock()
        self._running: dict[threading.Thread, Future[Any]] = {}
        self._on_items: Callable[[ShardItems], None] | None = None
        for _ in range(max(1, threads)):
            self._start_thread()

    def _start_thread(self) -> None:
        thread = threading.Thread(target=self._work, name=f"gpubatch-shard-{len(self._threads)}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        me = threading.current_thread()
        while (item := self._queue.get()) is not None:
            fut, fn, args = item
            if not fut.set_running_or_notify_cancel():
                continue
            with self._lock:
                self._running[me] = fut
            try:
                with reports_to(self._on_items):  # the shard's reports: straight to the client's callback
                    fut.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting client
                fut.set_exception(exc)
            finally:
                with self._lock:
                    self._running.pop(me, None)

    def submit(self, fn: Callable[..., Any], *args: Any, key: str, worker: str | None = None) -> Future[Any]:
        fut: Future[Any] = Future()  # run in a copy of the run's context: what it counts stays the run's (io.tallies)
        self._queue.put((fut, contextvars.copy_context().run, (fn, *args)))
        return fut

    def on_progress(self, callback: Callable[[ShardItems], None]) -> None:
        """The shards run on this process's threads: their reports are handed to ``callback``
        there and then, no Dask in between."""
        self._on_items = callback

    def wait_first(self, pending: set[Any], timeout: float | None = None) -> set[Any]:
        return set(thread_wait(pending, timeout=timeout, return_when=FIRST_COMPLETED).done)

    def cancel(self, pending: set[Any]) -> None:
        """Shards not yet started never start; those running finish (a thread cannot be stopped)."""
        for fut in pending:
            fut.cancel()

    def abandon(self, stuck: set[Any]) -> None:
        """The threads running ``stuck`` stay stuck (Python cannot stop one) and are left
        behind; as many new threads take their places."""
        self.cancel(stuck)
        with self._lock:
            held = [fut for fut in self._running.values() if fut in stuck]
            self._abandoned.update(held)
        for _ in held:
            self._start_thread()
        if held:
            log.warning("%d shard thread(s) given up on after run.shard_timeout cannot be stopped (the "
                        "inline profile runs shards on threads of this process): they are left behind, "
                        "still blocked, and new threads run the rest; a profile with worker processes "
                        "(local) restarts a stuck worker instead", len(held))

    def close(self) -> None:
        """Let the threads finish what they run and stop, but wait on none left behind stuck;
        shards not yet started never start."""
        with contextlib.suppress(queue.Empty):
            while (item := self._queue.get_nowait()) is not None:
                item[0].cancel()
        for _ in self._threads:
            self._queue.put(None)
        with self._lock:
            stuck = {t for t, fut in self._running.items() if fut in self._abandoned}
        for thread in self._threads:
            if thread not in stuck:
                thread.join()


class SchedulerLost(GpubatchError):
    """The Dask scheduler cancelled the run's tasks (it stopped, or the connection to it was lost)."""

    def __init__(self, reasons: str):
        super().__init__(f"lost the Dask scheduler: it cancelled the run's tasks ({reasons}); the run stops "
                         "and its committed shards stand: when the scheduler is back, rerun with --resume")


def _cancel_reasons(exc: BaseException) -> str:
    """Dask's reasons for cancelling (``scheduler-connection-lost``), without the task keys."""
    groups = getattr(exc, "error_groups", None) or []
    return ", ".join(sorted({str(g.reason) for g in groups})) or "no reason given"


class DaskExecutor(Executor):
    """A Dask client (and the cluster it started, if any); ``resources`` bound every task.

    ``diagnose`` (from the cluster's maker) explains an empty cluster, e.g. SLURM's own error for
    a rejected job or the reason a job is still pending.
    """

    def __init__(self, client: Any, cluster: Any = None, resources: dict[str, float] | None = None,
                 diagnose: Callable[[], NoWorkers | None] | None = None, jobs: WorkerJobs | None = None):
        self.client, self.cluster, self.resources = client, cluster, resources
        self.diagnose = diagnose
        self._processing: dict[str, list[str]] = {}
        self._lost = LostWorkers(jobs, late_cause=self._exit_cause)
        #: the keys each worker was executing at the last look (None: not known)
        self._executing: dict[str, set[str] | None] = {}
        self._lost_executing: dict[str, str] = {}  # shard -> the worker lost while executing it
        self._checked = self._trimmed = self._slots_seen = 0.0
        self._slots: dict[str, int] = {}
        #: each worker's memory limit in bytes (None: unlimited), kept after it leaves
        self._limits: dict[str, int | None] = {}
        self._submitted = 0
        self._scheduler_lost = False
        #: undone when the executor closes: Dask settings gpubatch held for its cluster's life
        self.on_close: Callable[[], None] = lambda: None

    def submit(self, fn: Callable[..., Any], *args: Any, key: str, worker: str | None = None) -> Any:
        """Tasks start in the order submitted: Dask ranks tasks submitted within 100 ms of each
        other (client.submit's fifo_timeout) alike, and a worker started a shard before the one
        submitted ahead of it, which had not yet been opened ahead for it (tests/test_remote_jobs)."""
        self._submitted += 1
        kwargs: dict[str, Any] = {"pure": False, "key": key, "priority": -self._submitted}
        if self.resources:
            kwargs["resources"] = self.resources  # e.g. {GPU: 1}: one shard per GPU at a time
        if worker is not None:  # and if it has left, Dask runs the shard on another
            kwargs.update(workers=[worker], allow_other_workers=True)
        from distributed.client import ClosedClientError

        try:
            return self.client.submit(fn, *args, **kwargs)
        except ClosedClientError:
            raise self._client_closed() from None

    def _client_closed(self) -> SchedulerLost:
        """Dask's client closes itself when it cannot reconnect to a scheduler that went away."""
        self._scheduler_lost = True
        return SchedulerLost("the client could not reconnect and closed")

    def claim_worker_requests(self) -> dict[str, int]:
        """Each worker's requests since its last shard's claim, summed; waited for at most
        CLAIM_TIMEOUT_S (a worker that does not answer keeps its own: the report is not held up
        for it). On a cluster shared with another run, that run's requests in flight would be
        claimed here too: its shards claim theirs at their commits, so only those in between."""
        from gpubatch.io.metrics import CLAIM_TIMEOUT_S, claim_requests

        try:
            answers = self.client.run(claim_requests, on_error="ignore", callback_timeout=CLAIM_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - the counts are the report's, never the run's failure
            log.info("the workers' last storage requests were not counted: %s", redact(str(exc)))
            return {}
        totals: dict[str, int] = {}
        for counts in answers.values():
            for name, n in (counts or {}).items():
                totals[name] = totals.get(name, 0) + int(n)
        return totals

    def worker_slots(self) -> dict[str, int]:
        """Looked up at most every WATCH_S (a worker that arrives waits that long for shards):
        each worker's threads, or fewer where ``resources`` (a GPU per shard) allow fewer."""
        now = time.monotonic()
        if now - self._slots_seen >= WATCH_S or not self._slots:
            self._slots_seen = now
            try:
                workers = self.client.scheduler_info()["workers"]
            except Exception:  # noqa: BLE001 - a missed look changes nothing: the worker watch
                return dict(self._slots)  # (``workers``) tells a scheduler that is gone
            self._slots = {addr: _slots_of(info, self.resources) for addr, info in workers.items()}
            self._lost.seen(workers)
            self._limits.update({addr: info.get("memory_limit") or None for addr, info in workers.items()})
        return dict(self._slots)

    def wait_first(self, pending: set[Any], timeout: float | None = None) -> set[Any]:
        """As the interface says; raises SchedulerLost when the scheduler cancelled the tasks
        (Dask cancels every future of a client that lost its scheduler: none will finish)."""
        from concurrent.futures import CancelledError

        from distributed.client import _wait  # distributed.wait, on this client's event loop
        from distributed.utils import TimeoutError as DaskTimeout

        if self.client.status in ("closing", "closed"):
            raise self._client_closed()
        try:  # distributed.wait waits on the process's default client's loop: another run's, or the caller's
            done = self.client.sync(_wait, list(pending), timeout=timeout, return_when="FIRST_COMPLETED").done
            return set(done)
        except (TimeoutError, DaskTimeout):
            return set()
        except CancelledError as exc:
            self._scheduler_lost = True
            raise SchedulerLost(_cancel_reasons(exc)) from None
        except (ValueError, RuntimeError):  # its event loop stopped: our client had closed itself
            if self.client.status not in ("closing", "closed"):
                raise
            raise self._client_closed() from None

    def cancel(self, pending: set[Any]) -> None:
        with contextlib.suppress(Exception):
            self.client.cancel(list(pending), force=True)

    def on_progress(self, callback: Callable[[ShardItems], None]) -> None:
        """Subscribe to the workers' item reports (Dask events, relayed by the scheduler as they
        come); ``callback`` runs on the client's event loop thread. A scheduler that refuses the
        subscription leaves progress moving as shards finish."""
        def handle(event: tuple[float, Any]) -> None:
            report = ShardItems.from_msg(event[1])
            if report is not None:
                callback(report)

        try:
            self.client.subscribe_topic(ITEMS_TOPIC, handle)
        except Exception as exc:  # noqa: BLE001 - display only: the run goes on without it
            log.debug("no item reports from running shards: %s", exc)

    def abandon(self, stuck: set[Any]) -> None:
        """Cancel the tasks and restart, through its nanny, each worker running one: a thread
        stuck in a read cannot be stopped, and would hold the worker's slot for good."""
        keys = {fut.key for fut in stuck}
        try:
            holders = sorted(w for w, running in self.client.processing().items() if keys & set(running))
        except Exception:  # noqa: BLE001 - a scheduler that does not answer: the worker watch tells
            holders = []
        self.cancel(stuck)
        if not holders:
            return
        log.warning("restarting worker(s) %s: a shard there ran past run.shard_timeout", ", ".join(holders))
        try:
            outcome = self.client.restart_workers(holders, timeout=CLOSE_TIMEOUT_S, raise_for_error=False)
        except Exception as exc:  # noqa: BLE001 - a scheduler that does not answer
            outcome = {w: f"failed ({exc})" for w in holders}
        for worker, how in sorted((outcome or {}).items()):
            if how != "OK":
                log.warning("worker %s was not restarted: %s", worker, _not_restarted(str(how)))

    def running(self) -> set[str] | None:
        try:
            return {str(key) for keys in self.client.processing().values() for key in keys}
        except Exception:  # noqa: BLE001 - a scheduler that does not answer: nothing is known
            return None

    def workers(self) -> int:
        try:
            return len(self.client.nthreads())
        except Exception:  # noqa: BLE001 - a scheduler that does not answer has no usable workers
            return 0

    def why_no_workers(self) -> NoWorkers | None:
        """The cluster maker's account (SLURM's words); else, with workers connected, that none
        offers the resources each shard asks for: they are there, and would run nothing."""
        found = self.diagnose() if self.diagnose is not None else None
        needs = self.resources or {}
        connected = self.workers() if found is None and needs else 0
        if connected:
            asked = " ".join(f"{name}={need:g}" for name, need in needs.items())
            found = NoWorkers(f"{connected} worker{'s are' if connected != 1 else ' is'} connected, but none offers the "
                     f"resources each shard asks for (the profile's resources: {asked}); start the workers "
                     f"with `--resources \"{asked}\"`, or take `resources` out of the profile")
        return found

    def note_processing(self, pending: set[Any]) -> None:
        """Every second at most: which worker runs which shard; a worker that vanished since the
        last look is recorded with the shards it was running (Dask reruns them elsewhere)."""
        now = time.monotonic()
        if now - self._trimmed >= TRIM_S:
            self._trimmed = now
            self.trim_scheduler()
        if now - self._checked < WATCH_S:
            return
        self._checked = now
        try:
            tasks = self._tasks_on_workers()
        except Exception:  # noqa: BLE001 - a missed look is not an error
            return
        processing = {w: [_shard_of(k) for k in keys] for w, (keys, _) in tasks.items()}
        for worker, shards in self._processing.items():
            if worker not in processing:
                self._lost.lost(worker, shards, self._memory_kill(worker))
                self._lost_executing.update({_shard_of(k): worker for k in self._executing.pop(worker, None) or ()})
        self._processing = processing
        self._executing = {w: running for w, (_, running) in tasks.items()}
        self._lost.explain()

    def _exit_cause(self, worker: str) -> str | None:
        """How ``worker``'s process ended, as its nanny told the scheduler
        (:mod:`gpubatch.runtime.worker_exits`: the OOM killer's SIGKILL, a crash); None if untold."""
        from gpubatch.runtime.worker_exits import EXIT_TOPIC, exit_cause

        try:
            return exit_cause(self.client.get_events(EXIT_TOPIC), worker)
        except Exception:  # noqa: BLE001 - a scheduler that does not answer: the loss stays unexplained
            return None

    def watch_exits(self) -> None:
        """Have every nanny, now and to come, tell the scheduler how its worker processes end."""
        from gpubatch.runtime.worker_exits import WorkerExits

        try:
            self.client.register_plugin(WorkerExits(), name=WorkerExits.name)
        except Exception:  # noqa: BLE001 - without it a lost worker is only "lost", as before
            log.debug("could not register the worker-exit plugin", exc_info=True)

    def _memory_kill(self, worker: str | None = None) -> str | None:
        """Why ``worker`` (or, None: any worker of this run) was lost, where its nanny said it
        killed it for memory (the scheduler's ``worker-restart-memory`` events); None where no
        such event names it (a kill by the kernel's OOM killer leaves none: see :meth:`_exit_cause`)."""
        try:
            events = self.client.get_events(MEMORY_KILL_TOPIC)
        except Exception:  # noqa: BLE001 - a scheduler that does not answer: the loss stays unexplained
            return None
        for _, event in reversed(list(events or ())):
            if isinstance(event, dict) and (worker is None or event.get("worker") == worker):
                return memory_kill_words(event.get("rss"), self._limits.get(str(event.get("worker"))))
        return None

    def failure_words(self, exc: BaseException) -> str:
        """A shard's failure that is no shard's fault, said with its cause where Dask's words do
        not give it: KilledWorker (its workers kept dying) names memory after a memory kill, else
        the batch system's account of the last of those workers ("SLURM ended job 432 at its time limit")."""
        words = f"{type(exc).__name__}: {exc}"
        if type(exc).__name__ != "KilledWorker":
            return words
        last = re.findall(r"\b(?:tcp|tls|ucx|inproc)://[^\s,'\"]+", str(exc))
        cause = self._memory_kill() or (self._lost.cause_of(last[-1].rstrip(".")) if last else None)
        return f"{words} ({cause})" if cause else words

    def trim_scheduler(self) -> None:
        """Trim Dask's per-task bookkeeping in this process: its own key-name cache, and, when
        the scheduler runs here (the local and SLURM profiles), the scheduler's, on the
        scheduler's own thread and without waiting for it. A scheduler elsewhere (``--scheduler``)
        is its operator's memory, not the client's, and is left alone."""
        forget_key_names()
        scheduler, loop = getattr(self.cluster, "scheduler", None), getattr(self.cluster, "loop", None)
        if scheduler is not None and loop is not None:
            loop.add_callback(trim_scheduler, scheduler)

    def _tasks_on_workers(self) -> dict[str, tuple[list[str], set[str] | None]]:
        """Each worker's tasks (its queue, what it executes), in one call to the scheduler;
        where the scheduler runs no function of ours (pickle turned off), the queue alone."""
        def tasks(dask_scheduler: Any) -> dict[str, tuple[list[str], list[str]]]:
            return {addr: ([str(ts.key) for ts in ws.processing], [str(ts.key) for ts in ws.executing])
                    for addr, ws in dask_scheduler.workers.items()}

        try:
            found = self.client.run_on_scheduler(tasks)
            return {w: (list(queued), set(running)) for w, (queued, running) in found.items()}
        except Exception:  # noqa: BLE001 - a scheduler that takes no functions: what it lets us ask
            return {w: ([str(k) for k in keys], None) for w, keys in self.client.processing().items()}

    def lost_executing(self) -> dict[str, str]:
        found, self._lost_executing = self._lost_executing, {}
        return found

    def lost_workers(self) -> list[dict[str, Any]]:
        return self._lost.entries()

    def loss_cause(self, worker: str) -> str | None:
        return self._memory_kill(worker) or self._lost.cause_of(worker)

    def close(self) -> None:
        """Close the client (and the cluster it started), on a helper thread waited for here: a
        Ctrl-C landing in Dask's close (the run's last second) cancelled it half-way, since Dask's
        sync wait cancels what it waits on when interrupted, and left the cluster "closing" for
        the life of the process, with its event loop thread. Here the close is let finish, then
        the interrupt raised."""
        from gpubatch.core.threads import made_off_the_main_thread

        closed = made_off_the_main_thread(self._close_now, lambda _: None, 2 * CLOSE_TIMEOUT_S + 5,
                                          "gpubatch-cluster-close")
        if closed is None:
            log.warning("the Dask client or cluster did not close within %d s; left behind", 2 * CLOSE_TIMEOUT_S + 5)

    def _close_now(self) -> bool:
        """Close the client, then the cluster. A client that lost its scheduler is still trying
        to reconnect, and closing it logs that loop's cancellation as an error with a traceback
        under the run's one line saying why it stopped: that is left to ``-v``."""
        quiet = _quieted("distributed.client") if self._scheduler_lost else contextlib.nullcontext()
        try:
            with quiet:
                self.client.close(timeout=CLOSE_TIMEOUT_S)
        finally:
            try:
                if self.cluster is not None:
                    self.cluster.close(timeout=CLOSE_TIMEOUT_S)
                    forget_closed_servers()
            finally:
                self.on_close()
        return True


def _not_restarted(how: str) -> str:
    """What became of a worker stuck past run.shard_timeout that its nanny did not restart."""
    if how == "removed":
        return ("it has no nanny (started with --no-nanny, or a deployment's own), so nothing can stop its "
                "stuck thread or start it again: the scheduler removed it from the run, which goes on with "
                "the other workers (start workers with a nanny to have stuck ones restarted)")
    return (f"{how}: its stuck thread may hold one of its slots for good; if the run stops making progress, "
            "restart that worker")


@contextlib.contextmanager
def _quieted(name: str) -> Any:
    """The logger ``name`` says nothing below CRITICAL meanwhile (unless gpubatch logs at DEBUG)."""
    logger, verbose = logging.getLogger(name), log.isEnabledFor(logging.DEBUG)
    level = logger.level
    if not verbose:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def memory_kill_words(rss: Any, limit: int | None) -> str:
    """The cause and the fix of a worker its nanny killed for memory."""
    from dask.utils import format_bytes

    used = f"{format_bytes(int(rss))} in use" if isinstance(rss, (int, float)) else "its memory"
    over = f", over 95% of its {format_bytes(limit)} limit" if limit else ", over its limit"
    return (f"killed by its nanny for memory: {used}{over}; lower model.batch_size or "
            "run.prefetch_batches, or give each worker more memory (the profile's memory_limit)")


def _slots_of(info: dict[str, Any], needs: dict[str, float] | None) -> int:
    """How many shards a worker (its scheduler_info entry) runs at once."""
    slots = int(info.get("nthreads", 1))
    for name, need in (needs or {}).items():
        if need > 0:
            have = float(info.get("resources", {}).get(name, 0))
            slots = min(slots, int(have // need))
    return slots


def _shard_of(key: Any) -> str:
    """The shard id in a task key ``gpubatch-<shard>-<attempt>-<ns>``."""
    text = str(key[0] if isinstance(key, tuple) else key)
    return text.removeprefix("gpubatch-").rsplit("-", 2)[0]
