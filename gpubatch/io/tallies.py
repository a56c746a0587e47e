"""Counts made with no shard's clocks at hand (HEADs, the plan's reads, the requests counted on
the wire, retries), kept apart per run.

They were counted per process and claimed by whichever run or shard asked next, so two runs at
once in one process (a notebook's threads) took each other's: a run over local slides reported
the S3 listings and HEADs of the run beside it, and each run's start dropped what the other had
not claimed yet. Now a run counts into a book of its own, found through a context variable: the
run's thread has it, as do the tasks that thread starts on an asyncio loop (fsspec's and zarr's
``sync`` run a coroutine in a copy of the caller's context) and the work gpubatch hands to its
thread pools (:func:`gpubatch.core.threads.in_this_context`). What is counted with no run's book
(a Dask worker process, a thread started outside any run) goes to the process's book, which
every claim takes too: one run in a process claims all it did, as before.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextvars import ContextVar


class Tally:
    """A count and what of it has been claimed, under a lock: what is counted without a shard's
    clocks, claimed by each shard (and the client) in turn, so none counts twice."""

    def __init__(self) -> None:
        self.counted = 0
        self.claimed = 0
        self.lock = threading.Lock()

    def add(self, n: int = 1) -> None:
        with self.lock:
            self.counted += n

    def claim(self) -> int:
        with self.lock:
            new, self.claimed = self.counted - self.claimed, self.counted
        return new


class TallyBook:
    """Named tallies, each made when first counted."""

    def __init__(self) -> None:
        self._tallies: dict[str, Tally] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> Tally:
        found = self._tallies.get(name)
        if found is None:
            with self._lock:
                found = self._tallies.setdefault(name, Tally())
        return found


#: what is counted outside any run's context (a worker process's shards, threads outside a run)
_PROCESS = TallyBook()
_OF_RUN: ContextVar[TallyBook | None] = ContextVar("gpubatch_run_tallies", default=None)


def tally(name: str) -> Tally:
    """The tally ``name`` to count into here: the running run's, else the process's."""
    return (_OF_RUN.get() or _PROCESS)[name]


def claim_tally(name: str) -> int:
    """What was counted as ``name`` since the last claim, by this run (where one runs here) and
    outside any run, claimed."""
    book = _OF_RUN.get()
    return _PROCESS[name].claim() + (book[name].claim() if book is not None else 0)


@contextlib.contextmanager
def counts_of_this_run() -> Iterator[None]:
    """Count into a book of this run's own meanwhile (see the module docstring)."""
    token = _OF_RUN.set(TallyBook())
    try:
        yield
    finally:
        _OF_RUN.reset(token)
