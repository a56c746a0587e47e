"""Reading ahead: the byte ranges of planned reads fetched in the background, within a budget.

A streamed slide's reader threads each fetch a block's tiles, then decode them; a thread waiting on
a round trip is not decoding. When the reads to come are known (a slide's read blocks are planned
before the first is read), their ranges can be in flight while earlier blocks decode, so that the
bytes in flight cover latency x bandwidth and no reader waits on the network once the pipeline
runs. :class:`ReadAhead` does that for one object: ``plan`` the blocks (each a list of (offset,
length) ranges, in order of use), then ``read_ranges`` takes what was fetched ahead and fetches
the rest directly.

Memory is bounded: ranges are issued, in plan order, only while the bytes fetched ahead and not
yet taken stay under a target, which adapts to what the run needs (three times the bytes consumed
per request latency, at least ``floor``) and never exceeds ``budget``. Ranges nobody takes (a tile
found in the decoded-tile cache after all) are dropped once the reads have moved well past them.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gpubatch.core.switches import JOIN_READS, switched_on
from gpubatch.core.threads import background_pool
from gpubatch.io.metrics import background
from gpubatch.io.ranges import RangeReader, coalesce

if TYPE_CHECKING:
    from gpubatch.core.clocks import StageClocks

#: background fetch threads of the process (they wait on the network, off the GIL with obstore)
THREADS = 16
#: a group this many groups behind the newest one taken from is dropped with what it still holds
STALE_GROUPS = 32
#: ranges already taken whose bytes are kept for a second read of the same range: a tile two
#: blocks share is fetched for the first, and the second, read by another thread before the first
#: has decoded it, would otherwise fetch it again in the foreground (a round trip it waits through)
RECENT_RANGES = 128
#: the most bytes of planned reads fetched as one group (their neighbouring ranges joined)
MERGED_BYTES = 4 << 20


@dataclass(eq=False)
class _Group:
    """One or more planned reads' ranges, fetched together in the background."""

    seq: int
    spans: list[tuple[int, int]]
    nbytes: int
    left: int  # ranges not yet taken
    future: Future[list[bytes]] = field(default_factory=Future)
    issued: float = field(default_factory=time.perf_counter)


class ReadAhead:
    """Planned range reads of one object, fetched ahead of use; thread-safe."""

    def __init__(self, reader: RangeReader, budget: int = 64 << 20, clocks: StageClocks | None = None,
                 floor: int = 8 << 20):
        self.reader, self.budget, self.clocks = reader, budget, clocks
        self.floor = min(floor, budget)
        self.join = switched_on(JOIN_READS)
        self._plan: deque[list[tuple[int, int]]] = deque()
        self._where: dict[tuple[int, int], tuple[_Group, int]] = {}  # range -> (group, span index)
        self._recent: OrderedDict[tuple[int, int], tuple[_Group, int]] = OrderedDict()  # taken ones
        self._pending: set[tuple[int, int]] = set()  # planned, not yet issued
        self._groups: deque[_Group] = deque()
        self._held = 0
        self._seq = 0
        self._newest_taken = 0
        self._latency = 0.0  # EWMA of a group's fetch time, s
        self._taken_bytes = 0
        self._started: float | None = None
        self._closed = False
        self._lock = threading.Lock()

    # -- planning and issuing ------------------------------------------------------------------

    def plan(self, blocks: Iterable[Sequence[tuple[int, int]]]) -> None:
        """The ranges of the reads to come, one list per read, in the order they will be made."""
        with self._lock:
            for block in blocks:
                ranges = [r for r in block if r[1] > 0]
                self._plan.append(ranges)
                self._pending.update(ranges)
            self._top_up()

    def _target(self) -> int:
        """Bytes to hold ahead: three times what the reads consume per round trip, in bounds."""
        if self._started is None or self._latency <= 0:
            return self.floor
        rate = self._taken_bytes / max(time.perf_counter() - self._started, 1e-3)
        return int(min(self.budget, max(self.floor, 3 * rate * self._latency)))

    def _top_up(self) -> None:
        """Issue planned reads while the bytes held ahead stay under the target (lock held)."""
        target = self._target()
        while self._plan and self._held < target and not self._closed:
            ranges = self._next_group(target)
            if ranges:
                self._issue(ranges)

    def _next_group(self, target: int) -> list[tuple[int, int]]:
        """The next planned reads fetched as one group (lock held): one read, then the reads
        after it whose ranges join the group's, while it stays under a quarter of the target (at
        most MERGED_BYTES).

        A slide's neighbouring blocks hold neighbouring pieces of the same rows of stored tiles:
        fetched together, those pieces join into one request per row instead of one per block
        and row, and an object store's cost is mostly per request (bench/NOTES.md). A read whose
        ranges mostly do not join stays in a group of its own: a group's bytes are handed out
        when its last request is answered, which only fewer requests are worth. The first group
        of an object is one read, so that its first bytes wait for nothing else."""
        cap = min(MERGED_BYTES, target // 4) if self._seq and self.join else 0
        ranges: list[tuple[int, int]] = []
        nbytes = requests = 0
        while self._plan:
            block = [r for r in self._plan[0] if r in self._pending]
            size = sum(n for _, n in block)
            if ranges and block:
                alone = self._requests(block)
                joined = self._requests(ranges + block)
                if nbytes + size > cap or joined > requests + alone // 2:
                    break
                requests = joined
            elif block:
                requests = self._requests(block)
            self._plan.popleft()
            self._pending.difference_update(block)
            ranges += block
            nbytes += size
        return ranges

    def _requests(self, ranges: list[tuple[int, int]]) -> int:
        return len(coalesce(ranges, self.reader.gap, self.reader.max_request))

    def _issue(self, ranges: list[tuple[int, int]]) -> None:
        groups = coalesce(ranges, self.reader.gap, self.reader.max_request)
        spans = [(start, stop) for start, stop, _ in groups]
        self._seq += 1
        group = _Group(self._seq, spans, sum(b - a for a, b in spans), len(ranges))
        for k, (_, _, members) in enumerate(groups):
            for i in members:
                self._where[ranges[i]] = (group, k)
        self._groups.append(group)
        self._held += group.nbytes
        if self.clocks is not None:
            self.clocks.peak("storage.read_ahead_bytes", self._held)
        background_pool("ahead", THREADS).submit(self._fetch, group)

    def _fetch(self, group: _Group) -> None:
        if not group.future.set_running_or_notify_cancel():
            return
        try:
            with background():
                blobs = self.reader.fetch_many(group.spans)
        except BaseException as exc:  # noqa: BLE001 - raised to whoever takes one of its ranges
            group.future.set_exception(exc)
        else:
            group.future.set_result(blobs)
        seconds = time.perf_counter() - group.issued
        with self._lock:
            self._latency = seconds if self._latency <= 0 else 0.8 * self._latency + 0.2 * seconds

    # -- taking --------------------------------------------------------------------------------

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes of each (offset, length) range: fetched ahead where planned, else now."""
        hits: dict[int, tuple[_Group, int]] = {}
        again: dict[int, tuple[_Group, int]] = {}  # taken before, bytes still here
        with self._lock:
            if self._started is None:
                self._started = time.perf_counter()
            for i, r in enumerate(ranges):
                found = self._where.pop(r, None)
                if found is not None:
                    hits[i] = found
                    self._recent[r] = found
                    if len(self._recent) > RECENT_RANGES:
                        self._recent.popitem(last=False)
                elif r in self._recent:
                    again[i] = self._recent[r]
                else:
                    self._pending.discard(r)  # read now: not worth fetching again later
            self._top_up()
        out: list[bytes] = [b""] * len(ranges)
        t0, waited = time.perf_counter(), any(not g.future.done() for g, _ in again.values())
        for i, (group, k) in again.items():  # in flight still, maybe: wait for it, never refetch
            offset, length = ranges[i]
            start = group.spans[k][0]
            out[i] = group.future.result()[k][offset - start : offset - start + length]
        if again and self.clocks is not None:
            self.clocks.count("storage.read_ahead_hits", len(again))
            if waited:
                self.clocks.count("storage.wait_s", time.perf_counter() - t0)
        misses = [i for i in range(len(ranges)) if i not in hits and i not in again]
        if misses:
            if self.clocks is not None:  # read now, in the caller: a round trip it waits through
                self.clocks.count("storage.read_ahead_misses", len(misses))
            for i, blob in zip(misses, self.reader.read_ranges([ranges[i] for i in misses]), strict=True):
                out[i] = blob
        if hits:
            self._take(ranges, hits, out)
        return out

    def _take(self, ranges: Sequence[tuple[int, int]], hits: dict[int, tuple[_Group, int]],
              out: list[bytes]) -> None:
        t0 = time.perf_counter()
        waited_on = [g for g, _ in hits.values() if not g.future.done()]
        try:
            for i, (group, k) in hits.items():
                start = group.spans[k][0]
                offset, length = ranges[i]
                blob = group.future.result()[k]
                out[i] = blob[offset - start : offset - start + length]
        finally:
            self._release(hits.values(), sum(length for _, length in ranges))
            if self.clocks is not None:
                self.clocks.count("storage.read_ahead_hits", len(hits))
                if waited_on:
                    self.clocks.count("storage.wait_s", time.perf_counter() - t0)

    def _release(self, taken: Iterable[tuple[_Group, int]], nbytes: int) -> None:
        with self._lock:
            self._taken_bytes += nbytes
            for group, _ in taken:
                group.left -= 1
                self._newest_taken = max(self._newest_taken, group.seq)
                if group.left == 0:
                    self._drop(group)
            while self._groups and self._groups[0].seq < self._newest_taken - STALE_GROUPS:
                self._drop(self._groups[0])
            self._top_up()

    def _drop(self, group: _Group) -> None:
        """Forget a group (lock held): its bytes no longer count against the budget."""
        if group in self._groups:
            self._groups.remove(group)
            self._held -= group.nbytes
            for r in [r for r, (g, _) in self._where.items() if g is group]:
                del self._where[r]

    def close(self) -> None:
        """Stop issuing; what is in flight finishes and is dropped."""
        with self._lock:
            self._closed = True
            self._plan.clear()
            self._pending.clear()
            for group in self._groups:
                group.future.cancel()
            self._groups.clear()
            self._where.clear()
            self._recent.clear()
            self._held = 0
