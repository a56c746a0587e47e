"""Progress for long runs: a rich bar on a terminal, periodic plain log lines otherwise.

Also keeps OUTDIR/status.json current, so ``gpubatch status OUTDIR`` can report a run from another
shell: after each shard (at most once a second) and on every heartbeat, so that a status whose
heartbeat stopped tells a dead run from a live one.

status.json's ``items_per_s`` is this run's items over ``wall_s``, the seconds since the run
started (``started``, the clock report.json's ``wall_s`` runs on, model preparation included):
a rate over a shorter span (from the first shard) said 83 items/s where report.json said 88
for the same run. A finished run's figures are report.json's own (:meth:`Progress.finish`).

Items done inside shards still running (engine.item_reports, through the executor) are shown
beside the committed ones, and drive the ETA by items (the plan's ``n_items_hint`` for every
shard where it knows them; else the running shards' own counts, and the mean size of the shards
known so far for those not started): one slide of 100k tiles showed "0/1 shards, 0 items, ETA ?"
for an hour. They are display
only (:class:`InFlight`): ``items`` in status.json and report.json stay the committed count.

Why this and core.phases both: they share only the choice of a rich bar or log lines. This is
the run's account of its shards, fed by their results and the workers' item reports from
other threads: done and failed, items, the model's starvation, an ETA, the state, and
status.json (a documented file `gpubatch status` and other shells read, beaten by the lease's
heartbeat so that a dead run shows), its bar kept on screen as the run's record. core.phases is
the voice of one long step on one thread (a listing, a resume's checks, the run's end): words
and a count, silent when short, a bar that goes when the step ends, and no file. Folded into
one, every listing would carry a run's status.json and ETA, or the run's account a step's
quiet start and transient bar. They meet in one place: once the shards are over, status.json's
``ending`` is the step core.phases says is under way on the client's thread.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

from gpubatch.core.clocks import starvation_of
from gpubatch.core.phases import under_way
from gpubatch.core.plural import counted
from gpubatch.core.results import ShardResult
from gpubatch.core.streams import bar_console
from gpubatch.engine.item_reports import ShardItems
from gpubatch.outputs.layout import STATUS
from gpubatch.outputs.store import OutputStore
from gpubatch.report.words import pct
from gpubatch.runtime.waiting import Queued

log = logging.getLogger("gpubatch")
LOG_EVERY_S = 30.0
STATUS_EVERY_S = 1.0


def _rate(items_per_s: float) -> str:
    """Three significant figures: a genome run's 0.4 items/s read "0 items/s"."""
    return f"{items_per_s:,.0f}" if items_per_s >= 100 else f"{items_per_s:.3g}"


class InFlight:
    """The items of the shard attempts running now, as their workers last reported them.

    Display only, and never counted twice or left behind: a shard's figure is taken when its
    attempt starts (:meth:`started`) and dropped when the attempt ends (:meth:`ended`: its
    result, committed or failed, or its retry), and only reports of the attempt the client
    is waiting on count, so a late report of a failed or replaced attempt changes nothing.
    Reports arrive on the executor's thread (Dask's event loop); the rest on the client's.
    """

    def __init__(self, run_id: str = ""):
        self.run_id = run_id
        self._lock = threading.Lock()
        self._attempt: dict[str, int] = {}  # shard -> the attempt whose reports count
        self._items: dict[str, tuple[int, int | None]] = {}  # shard -> (items, of how many)

    def started(self, shard_id: str, attempt: int, hint: int | None = None) -> None:
        """``attempt`` of the shard is submitted: nothing done yet, of ``hint`` (the plan's)."""
        with self._lock:
            self._attempt[shard_id] = attempt
            self._items[shard_id] = (0, hint)

    def report(self, report: ShardItems) -> None:
        """A worker's running count; ignored unless it is of this run's current attempt."""
        with self._lock:
            if report.run_id != self.run_id or self._attempt.get(report.shard_id) != report.attempt:
                return
            items, of = self._items.get(report.shard_id, (0, None))
            self._items[report.shard_id] = (max(items, report.items), report.of if report.of is not None else of)

    def restarted(self, shard_id: str) -> None:
        """The attempt's worker was lost while running it, and it runs again from nothing (the
        same attempt, on another worker): its figure starts again, rather than holding the lost
        run's count until the new run passes it."""
        with self._lock:
            if shard_id in self._items:
                self._items[shard_id] = (0, self._items[shard_id][1])

    def ended(self, shard_id: str) -> None:
        """The attempt ended (a result is in, or it is given up on): its figure goes."""
        with self._lock:
            self._attempt.pop(shard_id, None)
            self._items.pop(shard_id, None)

    def items(self) -> int:
        with self._lock:
            return sum(items for items, _ in self._items.values())

    def counts(self) -> list[tuple[int, int | None]]:
        """Each running shard's (items done, of how many: None where it has not said)."""
        with self._lock:
            return list(self._items.values())

    def left(self) -> tuple[int, int | None]:
        """(shards running, items they have left: None where one does not know its count)."""
        counts = self.counts()
        if any(of is None for _, of in counts):
            return len(counts), None
        return len(counts), sum(max(0, (of or 0) - items) for items, of in counts)


class Progress:
    def __init__(self, total: int, *, already: int = 0, store: OutputStore | None = None,
                 enabled: bool | None = None, run_id: str = "", heartbeat_s: float = 10.0,
                 plan_failed: int = 0, started: float | None = None, items_planned: int | None = None):
        self.total, self.already, self.done, self.failed = total, already, already, 0
        #: the items of the shards this run submits, where the plan knows every one's count
        self.items_planned = items_planned
        self.in_flight = InFlight(run_id)
        self.plan_failed = plan_failed  # inputs (or records) quarantined before any shard: no shard stands for them
        self.items = 0
        self.busy = self.starved = 0.0
        self.t0 = time.time()  # the shards' start: the ETA's clock
        self.started = self.t0 if started is None else started  # the run's start: the rate's clock
        self.last_log = self.last_status = self.last_shard = self.t0
        self.store, self.run_id, self.heartbeat_s = store, run_id, heartbeat_s
        self.state = "running"
        #: the shards are over (:meth:`close`): the run's end says its own progress (core.phases),
        #: on the thread that closed it, which status.json names (:meth:`_ending`)
        self.closed = False
        self._client_thread: int | None = None
        self._final: dict[str, Any] = {}  # what the final state says besides (the reason)
        #: the worker jobs waiting their turn in a busy queue, and since when (wall clock); None when not
        self._queued: tuple[Queued, float] | None = None
        self._lock = threading.Lock()
        self.last_bar = 0.0
        tty = sys.stderr.isatty() if enabled is None else enabled
        self._bar: Any = None
        if tty and total:
            self._start_bar(total, already)
        self._write_status()

    def _start_bar(self, total: int, already: int) -> None:
        """The rich bar: shards done of the total, items (running shards' included), the rate and
        the ETA (:meth:`eta_s`: by items where they are known; rich's own went by shards only).
        On stderr, never failing the run where its reader is gone (core.streams.bar_console)."""
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        # the elapsed clock ticks while a long shard runs and the bar cannot move
        self._bar = RichProgress(TextColumn("[bold]shards"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                                 TextColumn("ETA {task.fields[eta]}"), transient=False,
                                 console=bar_console())
        self._task = self._bar.add_task("run", total=total, completed=already, rate="", eta="?")
        self._bar.start()

    def eta_s(self) -> float | None:
        """Seconds left: by items where the items left are known or can be estimated (:meth:`_items_left`),
        else by shards (none known before one finishes)."""
        by_items = self._eta_by_items()
        if by_items is not None:
            return by_items
        elapsed = time.time() - self.t0
        fresh = self.done - self.already + self.failed
        return None if not fresh or not elapsed else (self.total - self.done - self.failed) * elapsed / fresh

    def _eta_by_items(self) -> float | None:
        """Items left over the items' rate since the shards started; None where either is unknown."""
        running = self.in_flight.items()
        left = self._items_left(running)
        seen, elapsed = self.items + running, time.time() - self.t0
        return None if left is None or not seen or elapsed <= 0 else left * elapsed / seen

    def _items_left(self, running: int) -> int | None:
        """The plan's count less those done; else the running shards' own counts less their done,
        and for each shard whose count no one knows yet (not started, or not yet said), the mean
        size of the shards whose size is known (committed, or said while running): a run of 1,000
        slides showed "ETA ?" until its first slide finished, and went by shards after that."""
        if self.items_planned is not None:
            return max(0, self.items_planned - self.items - running)
        counts = self.in_flight.counts()
        sizes = [of for _, of in counts if of is not None]
        known = self.done - self.already + len(sizes)
        if not known:
            return None
        mean_size = (self.items + sum(sizes)) / known
        unsized = self.total - self.done - self.failed - len(sizes)
        left_sized = sum(max(0, of - items) for items, of in counts if of is not None)
        done_unsized = sum(items for items, of in counts if of is None)
        return left_sized + max(0, round(unsized * mean_size) - done_unsized)

    def update(self, result: ShardResult) -> None:
        if result.ok:
            self.done += 1
            self.items += result.items
            model = result.clocks.get("stages", {}).get("model", {})
            self.busy += model.get("busy_s", 0.0)
            self.starved += model.get("starved_s", 0.0)
        else:
            self.failed += 1
        self.last_shard = time.time()
        if self._bar is not None:
            self._refresh_bar()
        elif time.time() - self.last_log >= LOG_EVERY_S or self.done + self.failed == self.total:
            self._log_line()
        if time.time() - self.last_status >= STATUS_EVERY_S or self.done + self.failed == self.total:
            self._write_status()

    def tick(self) -> None:
        """Called as the client waits on shards (about every second): the bar shows the running
        shards' items as they come, not only as shards finish."""
        if self._bar is not None and time.time() - self.last_bar >= STATUS_EVERY_S:
            self._refresh_bar()

    def _figures(self, now: float) -> tuple[int, float, float, float | None]:
        """Items in running shards, items/s (committed and running) since the start, the model's
        starvation, and the ETA: what the bar and the log lines show."""
        running = self.in_flight.items()
        rate = (self.items + running) / max(now - self.started, 1e-9)
        return running, rate, starvation_of({"busy_s": self.busy, "starved_s": self.starved}), self.eta_s()

    def _refresh_bar(self) -> None:
        self.last_bar = time.time()
        running, rate, starv, eta = self._figures(self.last_bar)
        self._bar.update(self._task, completed=self.done + self.failed,
                         rate=f"{counted(self.items + running, 'item')}, {_rate(rate)} items/s, starved {pct(starv)}",
                         eta=f"{eta:.0f} s" if eta is not None else "?")

    def _log_line(self) -> None:
        self.last_log = time.time()
        running, rate, starv, eta = self._figures(self.last_log)
        log.info("shards %d/%d done, %d failed, %s%s, %.1f items/s, starvation %.1f%%, ETA %s",
                 self.done, self.total, self.failed, counted(self.items + running, "item"),
                 f" ({running:,} in running shards)" if running else "", rate, 100 * starv,
                 f"{eta:.0f} s" if eta is not None else "?")

    def heartbeat(self) -> None:
        """Called by the lease's heartbeat thread: status.json says the run is alive. Without a
        terminal, a log line every LOG_EVERY_S too while no shard finishes: lines came only as
        shards finished, so one shard of a 100k-tile slide or a million windows left the log
        silent for as long as it ran, like a hung run. The line counts the running shards' items
        where they reported some; where none did, it says how long since a shard finished. Once
        the shards are over, no line: the run's end said "no shard finished in the last 78 s
        (running shards report their items...)" of a run with none left, while it merged."""
        self._write_status()
        now = time.time()
        if self.closed:
            return
        if self._bar is not None:
            self.tick()
            return
        if self.state != "running" or now - self.last_log < LOG_EVERY_S:
            return
        if self.last_shard > self.last_log or self.in_flight.items():
            self._log_line()  # shards finished since the last line, or running ones said how far they are
            return
        self.last_log = now
        log.info("shards %d/%d done, %d failed; still running: no shard finished in the last %.0f s "
                 "(running shards report their items every few seconds)", self.done, self.total, self.failed,
                 now - self.last_shard)

    def queued(self, queued: Queued | None, since: float) -> None:
        """The submitter's word that every worker job is pending (runtime.waiting): its turn in a
        busy queue, or a person's action (a hold released, a partition brought up); since
        ``since``; None when the wait is over. status.json says it at once, and on every heartbeat."""
        self._queued = None if queued is None else (queued, since)
        self._write_status()

    def _waiting(self, now: float) -> dict[str, Any]:
        """status.json's ``waiting``, while every worker job is pending: its words, the jobs, the
        reasons, since when, and (``action``) what starts them where only a person can."""
        if self._queued is None or self.state != "running":
            return {}
        queued, since = self._queued
        action = {"action": queued.action} if queued.action else {}
        return {"waiting": {"words": queued.words(now - since), "system": queued.system, "jobs": queued.jobs,
                            "reasons": list(queued.reasons), "since": since, **action}}

    def finish(self, state: str, *, unheard: Iterable[ShardResult] = (), **extra: Any) -> None:
        """The final state: finished, interrupted or failed (with the reason in ``extra``, kept
        for the heartbeats that still write status.json until the lease is released). The rate
        and its span stop here (or are ``extra``'s: a finished run's report.json figures), so
        that those heartbeats do not stretch a stopped run's seconds. ``unheard`` are commits the
        client never heard of (``Manifest.unheard``), counted: a stopped run's status said 2/6
        done while the zarr root and `gpubatch report` said 4."""
        for entry in unheard:
            self.done += 1
            self.items += entry.items
        elapsed = time.time() - self.started
        frozen = {"wall_s": elapsed, "items_per_s": self.items / elapsed if elapsed > 0 else 0.0}
        self.state, self._final = state, {**frozen, **extra}
        self._write_status()

    def _write_status(self) -> None:
        if self.store is None:
            return
        extra = self._final
        with self._lock:
            now = time.time()
            self.last_status = now
            elapsed = now - self.started
            self.store.write_json(STATUS, {
                "state": self.state, "run_id": self.run_id, "done": self.done, "failed": self.failed,
                "plan_failed": self.plan_failed,
                "total": self.total, "resumed": self.already, "items": self.items, "wall_s": elapsed,
                "items_per_s": self.items / elapsed if elapsed > 0 else 0.0,
                "eta_s": None if self.closed else self.eta_s(), **self._ending(),
                "items_running": self.in_flight.items() if self.state == "running" else 0,
                "starvation": starvation_of({"busy_s": self.busy, "starved_s": self.starved}),
                "started": self.started, "heartbeat": now, "heartbeat_s": self.heartbeat_s, **self._waiting(now),
                **extra,
            })

    def _ending(self) -> dict[str, Any]:
        """status.json's ``ending`` while the run's end runs (the shards are over, the state is
        still running): its step and how far it is, where one is under way. It said "ETA 0 s"
        for the minutes a merge of thousands of parts takes."""
        if not self.closed or self.state != "running":
            return {}
        under = under_way(self._client_thread) if self._client_thread is not None else None
        return {"ending": under.describe() if under is not None else {}}

    def close(self) -> None:
        self._client_thread = threading.get_ident()
        self.closed = True
        if self._bar is not None:
            self._bar.stop()
