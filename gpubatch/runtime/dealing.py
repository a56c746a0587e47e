"""Dealing shards to worker processes, so that what a shard names as upcoming runs where it ran.

A shard that starts on a worker names the next few inputs (its ``upcoming``) and the worker opens
(streamed slides) or downloads (staged slides) them in the background, so that their round trips
overlap this shard's compute. When the scheduler chose the process for every shard, the next
inputs of the plan mostly ran in another process: on a host of P worker processes each streamed
slide was opened up to P times, and the process that ran it often opened it again, cold
(bench/NOTES.md: 34 openings for 16 slides on 2 processes). Dealt, each worker process has a
*lane*: the shards it runs next, in plan order, and a shard's upcoming inputs are the rest of its
own lane.

The :class:`Dealer` is the logic only, no I/O and no Dask: the submitter tells it the workers
there are (and their slots) and which placed shards finished, and asks it what to submit where.
It pulls the plan lazily, holding at most ``depth`` shards per lane beyond what is in flight.
A worker that leaves gives its lane back, to be dealt first; a worker that arrives gets a lane;
when the plan is spent, a worker with room takes the last shard of the longest other lane, so
the run's end does not wait on one worker's queue while others idle.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gpubatch.sources.base import Shard

#: shards queued on a worker beyond those running, per slot: a slot that frees starts the next
#: shard at once instead of after a round trip to the client
QUEUED_PER_SLOT = 1


@dataclass(frozen=True)
class Placement:
    """One shard to submit to ``worker``, naming ``upcoming``: the inputs that worker runs next."""

    worker: str
    shard: Shard
    upcoming: tuple[str, ...]


class Dealer:
    """Deals a stream of shards to workers' lanes; a shard's upcoming inputs are its lane's rest."""

    def __init__(self, shards: Iterable[Shard], depth: int):
        self._plan = iter(shards)
        self._plan_spent = False
        self.depth = max(0, depth)
        self.slots: dict[str, int] = {}
        self.lanes: dict[str, deque[Shard]] = {}
        self.in_flight: dict[str, int] = {}
        self._rank: dict[str, int] = {}  # workers in address order: ties go to the first
        self._returned: deque[Shard] = deque()  # lanes of workers that left, dealt again first

    @property
    def done(self) -> bool:
        """Every shard of the plan has been placed."""
        return self._plan_spent and not self._returned and not any(self.lanes.values())

    def set_workers(self, slots: Mapping[str, int]) -> list[str]:
        """The workers there are now and their shard slots (workers with none are left out).
        A worker that left gives its lane back; returns the workers that left."""
        present = {w: n for w, n in slots.items() if n > 0}
        gone = [w for w in self.slots if w not in present]
        for worker in gone:
            self._returned.extend(self.lanes.pop(worker))
            del self.slots[worker], self.in_flight[worker]
        for worker in sorted(present):
            if worker not in self.slots:
                self.lanes[worker], self.in_flight[worker] = deque(), 0
            self.slots[worker] = present[worker]
        self._rank = {w: i for i, w in enumerate(sorted(self.slots))}
        return gone

    def finished(self, worker: str) -> None:
        """A shard placed on ``worker`` finished (or failed): its room is free again."""
        if self.in_flight.get(worker, 0) > 0:
            self.in_flight[worker] -= 1

    def room(self, worker: str) -> int:
        return self.slots[worker] * (1 + QUEUED_PER_SLOT) - self.in_flight[worker]

    def placements(self, limit: int) -> list[Placement]:
        """Up to ``limit`` shards to submit now: each to the worker with the most room for its
        slots, which runs it next; none when no worker has room."""
        placed: list[Placement] = []
        while len(placed) < limit:
            hungry = [w for w in self.slots if self.room(w) > 0]
            if not hungry:
                break
            worker = max(hungry, key=lambda w: (self.room(w) / self.slots[w], -self._rank[w]))
            self._top_up()
            shard = self._take(worker)
            if shard is None:
                break
            self.in_flight[worker] += 1
            self._top_up()
            placed.append(Placement(worker, shard, tuple(s.input_uri for s in self.lanes[worker])))
        return placed

    def _top_up(self) -> None:
        """Deal until every lane holds ``depth`` shards (or the plan is spent), shortest lane
        first, so that plan order is dealt round the workers."""
        while self.lanes:
            worker = min(self.lanes, key=lambda w: (len(self.lanes[w]), self._rank[w]))
            if len(self.lanes[worker]) >= self.depth:
                return
            shard = self._next_undealt()
            if shard is None:
                return
            self.lanes[worker].append(shard)

    def _next_undealt(self) -> Shard | None:
        if self._returned:
            return self._returned.popleft()
        if not self._plan_spent:
            shard = next(self._plan, None)
            if shard is not None:
                return shard
            self._plan_spent = True
        return None

    def _take(self, worker: str) -> Shard | None:
        """The head of ``worker``'s lane; else an undealt shard; else the last of the longest
        other lane (the plan is spent and this worker would idle)."""
        if self.lanes[worker]:
            return self.lanes[worker].popleft()
        shard = self._next_undealt()
        if shard is not None:
            return shard
        longest = max(self.lanes, key=lambda w: len(self.lanes[w]))
        return self.lanes[longest].pop() if self.lanes[longest] else None
