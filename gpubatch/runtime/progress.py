"""Progress for long runs: a rich bar on a terminal, periodic plain log lines otherwise.

Also writes OUTDIR/status.json after each shard so ``gpubatch status OUTDIR`` can report a run in
progress from another shell.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from gpubatch.core.clocks import starvation_of
from gpubatch.core.files import write_json_atomic
from gpubatch.core.results import ShardResult

log = logging.getLogger("gpubatch")
LOG_EVERY_S = 30.0


class Progress:
    def __init__(self, total: int, *, already: int = 0, outdir: Path | None = None,
                 enabled: bool | None = None):
        self.total, self.done, self.failed = total, already, 0
        self.items = 0
        self.busy = self.starved = 0.0
        self.t0 = time.time()
        self.last_log = self.t0
        self.outdir = outdir
        tty = sys.stderr.isatty() if enabled is None else enabled
        self._bar: Any = None
        if tty and total:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("[bold]shards"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), transient=False)
            self._task = self._bar.add_task("run", total=total, completed=already, rate="")
            self._bar.start()
        self._write_status("running")

    def eta_s(self) -> float | None:
        elapsed = time.time() - self.t0
        fresh = self.done + self.failed
        return None if not fresh or not elapsed else (self.total - fresh) * elapsed / max(fresh, 1)

    def update(self, result: ShardResult) -> None:
        if result.ok:
            self.done += 1
            self.items += result.items
            model = result.clocks.get("stages", {}).get("model", {})
            self.busy += model.get("busy_s", 0.0)
            self.starved += model.get("starved_s", 0.0)
        else:
            self.failed += 1
        rate = self.items / max(time.time() - self.t0, 1e-9)
        starv = starvation_of({"busy_s": self.busy, "starved_s": self.starved})
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done + self.failed, rate=f"{rate:.0f} items/s, starved {starv:.0%}")
        elif time.time() - self.last_log >= LOG_EVERY_S or self.done + self.failed == self.total:
            self.last_log = time.time()
            eta = self.eta_s()
            log.info("shards %d/%d done, %d failed, %.1f items/s, starvation %.1f%%, ETA %s",
                     self.done, self.total, self.failed, rate, 100 * starv, f"{eta:.0f} s" if eta is not None else "?")
        self._write_status("running")

    def _write_status(self, state: str) -> None:
        if self.outdir is None:
            return
        elapsed = time.time() - self.t0
        write_json_atomic(self.outdir / "status.json", {
            "state": state, "done": self.done, "failed": self.failed, "total": self.total,
            "items": self.items, "items_per_s": self.items / elapsed if elapsed > 0 else 0.0,
            "eta_s": self.eta_s(), "starvation": starvation_of({"busy_s": self.busy, "starved_s": self.starved}),
            "updated": time.time(),
        })

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
