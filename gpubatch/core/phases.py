"""Progress of the long steps outside the shards: listing inputs, checking committed parts on a
resume, the run's end (merging parts, heatmaps, the audit, the report), ingesting a genome.

Each was silent for as long as it ran: at 10,000 shards a resume's checks and a run's end took
minutes with no line between "N shard(s) already committed" (or the last shard's) and the
summary, like a hung run. A :class:`Phase` says what it is doing and how far it is, as the
shards' progress does (runtime.progress): on a terminal a transient rich bar, otherwise a log
line every ``LOG_EVERY_S`` (never one per item). A short step says nothing: the bar shows only
once the step has run ``BAR_AFTER_S``, the first line only after ``LOG_EVERY_S``, so small jobs
stay quiet. A watcher thread says it too while one item takes long (a read retried on a slow
store, one opaque call such as a listing): every wait a message.

Why this and runtime.progress both: the shards' progress is the run's account of its shards
(results and item reports arriving from other threads, an ETA, the run's state and
status.json, which other shells read); a phase is only words and a count for a step on one
thread, with no file and no state. runtime.progress reads the phase under way
(:func:`under_way`) for status.json's ``ending`` once the shards are over. Neither times
anything for the report: its seconds are the run's clocks (core.clocks, report.summary).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

from gpubatch.core.plural import plural
from gpubatch.core.streams import bar_console

T = TypeVar("T")
log = logging.getLogger("gpubatch")
#: seconds between log lines (and before the first: a shorter step says nothing)
LOG_EVERY_S = 10.0
#: seconds a step runs before its bar shows on a terminal, and between the bar's updates
BAR_AFTER_S = 2.0
BAR_EVERY_S = 0.2

#: whether steps show a bar (True), log lines (False) or ask the terminal (None): a run's
#: ``show_progress`` says it for the run's steps (:func:`shown_as`)
_bar_wanted: ContextVar[bool | None] = ContextVar("gpubatch_phase_bar", default=None)
#: the phase under way on this thread: a phase begun inside it is one of its steps
_current: ContextVar[Phase | None] = ContextVar("gpubatch_phase", default=None)
#: each thread's outermost phase under way, for other threads to read (:func:`under_way`)
_outermost: dict[int, Phase] = {}


@contextmanager
def shown_as(bar: bool | None) -> Iterator[None]:
    """Steps started meanwhile (on this thread) show a bar, log lines, or (None) ask stderr."""
    token = _bar_wanted.set(bar)
    try:
        yield
    finally:
        _bar_wanted.reset(token)


class Phase:
    """One long step, or several in turn (:meth:`step`): what it does, items done of how many.

    Used from one thread (``advance``, ``step``); the watcher only reads the counts."""

    def __init__(self, what: str, total: int | None = None, unit: str = "item"):
        self.name = what  # the phase's, for its last line; ``what`` is the step's
        self.what, self.total, self.unit, self.done = what, total, unit, 0
        self.started = self.step_started = self.last_said = time.monotonic()
        self.said = False  # a line or a bar was shown: the end is said too
        wanted = _bar_wanted.get()
        self._bar_mode = sys.stderr.isatty() if wanted is None else wanted
        self._bar: Any = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="gpubatch-phase", daemon=True)
        self._watcher.start()

    def step(self, what: str, total: int | None = None, unit: str = "item") -> None:
        """The next step of the phase: its own words and count, the phase's clock and quiet."""
        with self._lock:
            self.what, self.total, self.unit, self.done = what, total, unit, 0
            self.step_started = time.monotonic()
            if self._bar is not None:  # its clock too: the bar's elapsed time is the step's
                self._bar.reset(self._task, total=total, description=what, words=self.words())
        self._say()

    def advance(self, n: int = 1) -> None:
        self.done += n
        self._say()

    def counting(self, items: Iterable[T]) -> Iterator[T]:
        """``items``, each counted once its consumer asks for the next (it is done with it)."""
        for item in items:
            yield item
            self.advance()

    def close(self) -> None:
        """The phase is over: its bar goes; where a line was logged, one says it ended."""
        self._stopped.set()
        self._watcher.join()
        with self._lock:
            if self._bar is not None:
                self._bar.stop()
            elif self.said:
                log.info("%s: done (%.0f s)", self.name, time.monotonic() - self.started)

    def describe(self) -> dict[str, Any]:
        """The step under way, for status.json (read from another thread: the heartbeat's)."""
        with self._lock:
            return {"phase": self.name, "step": self.what, "words": self.words(),
                    "step_s": time.monotonic() - self.step_started}

    def words(self) -> str:
        """How far the step is: "1,234 of 10,000 parts", "1,234 parts", or nothing counted yet;
        bytes in MB ("1,204 of 3,100 MB")."""
        if self.unit == "byte":  # a tenth of a MB where the whole is under 100 MB
            digits = 1 if max(self.total or 0, self.done) < 100e6 else 0
            of = f" of {self.total / 1e6:,.{digits}f}" if self.total is not None else ""
            return f"{self.done / 1e6:,.{digits}f}{of} MB"
        if self.total is not None:
            return f"{self.done:,} of {self.total:,} {plural(self.total, self.unit)}"
        return f"{self.done:,} {plural(self.done, self.unit)}" if self.done else "under way"

    def _watch(self) -> None:
        """Says how far the step is while the caller is inside one item (a long read, a listing)."""
        while not self._stopped.wait(max(0.05, BAR_EVERY_S if self._bar_mode else LOG_EVERY_S)):
            self._say()

    def _due(self, now: float) -> bool:
        """A word is due: the phase has run past its quiet start, and the last word is old enough."""
        quiet, every = (BAR_AFTER_S, BAR_EVERY_S) if self._bar_mode else (LOG_EVERY_S, LOG_EVERY_S)
        return now - self.started >= quiet and (not self.said or now - self.last_said >= every)

    def _say(self) -> None:
        now = time.monotonic()
        if not self._due(now):
            return
        with self._lock:
            if self._stopped.is_set():
                return
            self.said, self.last_said = True, now
            if self._bar_mode:
                self._show_bar()
            else:
                log.info("%s: %s (%.0f s)", self.what, self.words(), now - self.step_started)

    def _show_bar(self) -> None:
        """The rich bar, started at its first word, on stderr (core.streams.bar_console)."""
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.table import Column

        if self._bar is None:  # the words of the step give way on a narrow terminal, not its counts
            what = TextColumn("{task.description}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis"))
            self._bar = Progress(SpinnerColumn(), what, BarColumn(bar_width=20),
                                 TextColumn("{task.fields[words]}", table_column=Column(no_wrap=True)),
                                 TimeElapsedColumn(), transient=True, expand=True,
                                 console=bar_console())
            self._task = self._bar.add_task(self.what, total=self.total, words="")
            self._bar.start()
        self._bar.update(self._task, description=self.what, total=self.total, completed=self.done, words=self.words())


@contextmanager
def phase(what: str, total: int | None = None, unit: str = "item") -> Iterator[Phase]:
    """A :class:`Phase` for the block, closed however the block ends. Inside another phase (the
    report of an interrupted run reads the commit records), it is that phase's next step: one
    bar, one voice."""
    outer = _current.get()
    if outer is not None:
        outer.step(what, total, unit)
        yield outer
        return
    shown = Phase(what, total, unit)
    token = _current.set(shown)
    thread = threading.get_ident()
    _outermost[thread] = shown
    try:
        yield shown
    finally:
        _outermost.pop(thread, None)
        _current.reset(token)
        shown.close()


def under_way(thread: int) -> Phase | None:
    """The outermost phase the thread ``thread`` is in now, or None: what a run's client thread
    is doing once its shards are over, for the heartbeat thread's status.json (runtime.progress)."""
    return _outermost.get(thread)
