"""Progress for long runs: a rich bar on a terminal, periodic plain log lines otherwise.

Also keeps OUTDIR/status.json current, so ``gpubatch status OUTDIR`` can report a run from another
shell: after each shard (at most once a second) and on every heartbeat, so that a status whose
heartbeat stopped tells a dead run from a live one.

status.json's ``items_per_s`` is this run's items over ``wall_s``, the seconds since the run
started (``started``, the clock report.json's ``wall_s`` runs on, model preparation included):
a rate over a shorter span (from the first shard) said 83 items/s where report.json said 88
for the same run. A finished run's figures are report.json's own (:meth:`Progress.finish`).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

from gpubatch.core.clocks import starvation_of
from gpubatch.core.results import ShardResult
from gpubatch.outputs.layout import STATUS
from gpubatch.outputs.store import OutputStore
from gpubatch.report.verdict import pct

log = logging.getLogger("gpubatch")
LOG_EVERY_S = 30.0
STATUS_EVERY_S = 1.0


def _rate(items_per_s: float) -> str:
    """Three significant figures: a genome run's 0.4 items/s read "0 items/s"."""
    return f"{items_per_s:,.0f}" if items_per_s >= 100 else f"{items_per_s:.3g}"


class Progress:
    def __init__(self, total: int, *, already: int = 0, store: OutputStore | None = None,
                 enabled: bool | None = None, run_id: str = "", heartbeat_s: float = 10.0,
                 plan_failed: int = 0, started: float | None = None):
        self.total, self.already, self.done, self.failed = total, already, already, 0
        self.plan_failed = plan_failed  # inputs (or records) quarantined before any shard: no shard stands for them
        self.items = 0
        self.busy = self.starved = 0.0
        self.t0 = time.time()  # the shards' start: the ETA's clock
        self.started = self.t0 if started is None else started  # the run's start: the rate's clock
        self.last_log = self.last_status = self.last_shard = self.t0
        self.store, self.run_id, self.heartbeat_s = store, run_id, heartbeat_s
        self.state = "running"
        self._final: dict[str, Any] = {}  # what the final state says besides (the reason)
        self._lock = threading.Lock()
        tty = sys.stderr.isatty() if enabled is None else enabled
        self._bar: Any = None
        if tty and total:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            # the elapsed clock ticks while a long shard runs and the bar cannot move
            self._bar = RichProgress(TextColumn("[bold]shards"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     transient=False)
            self._task = self._bar.add_task("run", total=total, completed=already, rate="")
            self._bar.start()
        self._write_status()

    def eta_s(self) -> float | None:
        elapsed = time.time() - self.t0
        fresh = self.done - self.already + self.failed
        return None if not fresh or not elapsed else (self.total - self.done - self.failed) * elapsed / fresh

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
            rate = self.items / max(time.time() - self.started, 1e-9)
            starv = starvation_of({"busy_s": self.busy, "starved_s": self.starved})
            self._bar.update(self._task, completed=self.done + self.failed, rate=f"{_rate(rate)} items/s, starved {pct(starv)}")
        elif time.time() - self.last_log >= LOG_EVERY_S or self.done + self.failed == self.total:
            self._log_line()
        if time.time() - self.last_status >= STATUS_EVERY_S or self.done + self.failed == self.total:
            self._write_status()

    def _log_line(self) -> None:
        self.last_log = time.time()
        rate = self.items / max(self.last_log - self.started, 1e-9)
        starv = starvation_of({"busy_s": self.busy, "starved_s": self.starved})
        eta = self.eta_s()
        log.info("shards %d/%d done, %d failed, %.1f items/s, starvation %.1f%%, ETA %s",
                 self.done, self.total, self.failed, rate, 100 * starv, f"{eta:.0f} s" if eta is not None else "?")

    def heartbeat(self) -> None:
        """Called by the lease's heartbeat thread: status.json says the run is alive. Without a
        terminal, a log line every LOG_EVERY_S too while no shard finishes: lines came only as
        shards finished, so one shard of a 100k-tile slide or a million windows left the log
        silent for as long as it ran, like a hung run."""
        self._write_status()
        now = time.time()
        if self._bar is not None or self.state != "running" or now - self.last_log < LOG_EVERY_S:
            return
        if self.last_shard > self.last_log:  # shards finished since the last line: say them
            self._log_line()
            return
        self.last_log = now
        log.info("shards %d/%d done, %d failed; still running: no shard finished in the last %.0f s "
                 "(a shard's items are counted when it finishes)", self.done, self.total, self.failed,
                 now - self.last_shard)

    def finish(self, state: str, **extra: Any) -> None:
        """The final state: finished, interrupted or failed (with the reason in ``extra``, kept
        for the heartbeats that still write status.json until the lease is released). The rate
        and its span stop here (or are ``extra``'s: a finished run's report.json figures), so
        that those heartbeats do not stretch a stopped run's seconds."""
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
                "items_per_s": self.items / elapsed if elapsed > 0 else 0.0, "eta_s": self.eta_s(),
                "starvation": starvation_of({"busy_s": self.busy, "starved_s": self.starved}),
                "started": self.started, "heartbeat": now, "heartbeat_s": self.heartbeat_s, **extra,
            })

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
