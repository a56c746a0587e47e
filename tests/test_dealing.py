"""Dealing shards to worker processes (runtime.dealing): the logic alone, driven as the submitter
drives it, and the executor's slot count from a scheduler's worker entries.

The whole-run consequence (each streamed slide opened once, in the process that runs it) is
tests/test_remote_jobs.py::test_each_streamed_slide_is_opened_once_where_its_shard_runs; a worker
killed mid-run is tests/test_resilience.py.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

from gpubatch.runtime.dealing import Dealer, Placement
from gpubatch.runtime.executors import _slots_of
from gpubatch.sources import Shard


def _plan(n: int | None, pulled: list[int] | None = None) -> Iterator[Shard]:
    for i in itertools.count() if n is None else range(n):
        if pulled is not None:
            pulled.append(i)
        yield Shard(f"s{i}", f"u{i}")


def _drain(dealer: Dealer, running: list[Placement] | None = None, limit: int = 1000) -> list[Placement]:
    """Place everything, finishing the oldest placed shard (of ``running`` first) whenever no
    worker has room."""
    placed: list[Placement] = []
    running = list(running or [])
    while not dealer.done:
        new = dealer.placements(limit)
        placed += new
        running += new
        if not new:
            dealer.finished(running.pop(0).worker)
    return placed


def test_plan_order_is_dealt_round_the_workers_and_upcoming_is_the_own_lane() -> None:
    dealer = Dealer(_plan(20), depth=2)
    dealer.set_workers({"tcp://b": 2, "tcp://a": 2})
    placed = _drain(dealer)
    assert sorted(p.shard.shard_id for p in placed) == sorted(f"s{i}" for i in range(20))  # each once
    assert [p.shard.shard_id for p in placed[:4]] == ["s0", "s1", "s2", "s3"]
    assert {p.worker for p in placed[:2]} == {"tcp://a", "tcp://b"}
    for worker in ("tcp://a", "tcp://b"):
        mine = [p for p in placed if p.worker == worker]
        for i, p in enumerate(mine):  # what a shard names is what its worker runs next, in order
            assert p.upcoming == tuple(q.shard.input_uri for q in mine[i + 1:i + 3])


def test_no_worker_gets_more_than_its_slots_running_and_one_queued_per_slot() -> None:
    dealer = Dealer(_plan(50), depth=3)
    dealer.set_workers({"a": 1, "b": 3})
    first = dealer.placements(100)
    assert sum(p.worker == "a" for p in first) == 2 and sum(p.worker == "b" for p in first) == 6
    assert dealer.placements(100) == []
    dealer.finished("b")
    assert [p.worker for p in dealer.placements(100)] == ["b"]


def test_the_window_limits_what_is_placed_at_once() -> None:
    dealer = Dealer(_plan(50), depth=2)
    dealer.set_workers({"a": 4, "b": 4})
    assert len(dealer.placements(3)) == 3
    assert len(dealer.placements(0)) == 0


def test_the_plan_is_pulled_lazily() -> None:
    """An endless plan: the dealer holds the placed shards and ``depth`` per lane, no more."""
    pulled: list[int] = []
    dealer = Dealer(_plan(None, pulled), depth=2)
    dealer.set_workers({"a": 2, "b": 2})
    placed = dealer.placements(100)
    assert len(placed) == 8
    assert len(pulled) == 8 + 2 * 2
    dealer.finished("a")
    dealer.placements(100)
    assert len(pulled) == 9 + 2 * 2


def test_a_worker_that_leaves_gives_its_lane_back_to_be_dealt_first() -> None:
    dealer = Dealer(_plan(30), depth=3)
    dealer.set_workers({"a": 1, "b": 1})
    before = dealer.placements(100)
    lane_b = [s.shard_id for s in dealer.lanes["b"]]
    assert dealer.set_workers({"a": 1}) == ["b"]
    lane_a = [s.shard_id for s in dealer.lanes["a"]]
    after = [p.shard.shard_id for p in _drain(dealer, [p for p in before if p.worker == "a"])]
    assert after[:6] == lane_a + lane_b  # a's own lane, then b's, then the rest of the plan
    ids = [p.shard.shard_id for p in before] + after
    assert sorted(ids) == sorted(f"s{i}" for i in range(30))  # none lost, none twice


def test_a_worker_that_arrives_gets_shards_and_one_without_slots_none() -> None:
    dealer = Dealer(_plan(30), depth=2)
    dealer.set_workers({"a": 1, "gpu-less": 0})
    assert {p.worker for p in dealer.placements(100)} == {"a"}
    dealer.set_workers({"a": 1, "b": 2, "gpu-less": 0})
    assert {p.worker for p in dealer.placements(100)} == {"b"}
    assert "gpu-less" not in dealer.lanes


def test_no_worker_means_no_placement_and_not_done() -> None:
    dealer = Dealer(_plan(3), depth=2)
    assert dealer.placements(10) == [] and not dealer.done
    dealer.set_workers({"a": 1})
    assert len(_drain(dealer)) == 3 and dealer.done


def test_at_the_end_an_idle_worker_takes_the_last_of_the_longest_lane() -> None:
    dealer = Dealer(_plan(8), depth=3)
    dealer.set_workers({"a": 1, "b": 1})
    dealer.placements(100)  # a: s0 s2 running/queued, lane s4 s6; b: s1 s3, lane s5 s7
    dealer.finished("a")
    dealer.finished("a")
    dealer.finished("a")  # a is quick: it runs its lane, then takes b's last shard
    taken = [p.shard.shard_id for p in dealer.placements(100)]
    assert taken == ["s4", "s6"]
    dealer.finished("a")
    assert [(p.worker, p.shard.shard_id) for p in dealer.placements(100)] == [("a", "s7")]
    assert [s.shard_id for s in dealer.lanes["b"]] == ["s5"]


def test_depth_zero_names_nothing_upcoming() -> None:
    dealer = Dealer(_plan(6), depth=0)
    dealer.set_workers({"a": 1, "b": 1})
    placed = _drain(dealer)
    assert len(placed) == 6 and all(p.upcoming == () for p in placed)


def test_random_finishes_arrivals_and_departures_place_every_shard_once() -> None:
    rng = random.Random(7)
    dealer = Dealer(_plan(500), depth=2)
    workers = {"w0": 2, "w1": 1}
    dealer.set_workers(workers)
    running: list[Placement] = []
    placed: list[str] = []
    while not dealer.done:
        if rng.random() < 0.05:  # a worker leaves (its running shards are Dask's to rerun) or arrives
            if len(workers) > 1 and rng.random() < 0.5:
                gone = rng.choice(sorted(workers))
                del workers[gone]
                running = [p for p in running if p.worker != gone]
            else:
                workers[f"w{rng.randrange(100, 999)}"] = rng.randint(1, 3)
            dealer.set_workers(workers)
        new = dealer.placements(rng.randint(1, 6))
        for p in new:
            assert p.worker in workers and p.shard.input_uri not in p.upcoming
        placed += [p.shard.shard_id for p in new]
        running += new
        if running and (not new or rng.random() < 0.5):
            dealer.finished(running.pop(rng.randrange(len(running))).worker)
    assert sorted(placed) == sorted(f"s{i}" for i in range(500))


def test_slots_are_threads_or_fewer_where_resources_bound_them() -> None:
    assert _slots_of({"nthreads": 4}, None) == 4
    assert _slots_of({"nthreads": 4, "resources": {"GPU": 1}}, {"GPU": 1}) == 1
    assert _slots_of({"nthreads": 4, "resources": {"GPU": 2}}, {"GPU": 1}) == 2
    assert _slots_of({"nthreads": 4}, {"GPU": 1}) == 0  # a worker without a GPU runs no shard


def test_a_missed_look_at_the_workers_keeps_the_lanes(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A scheduler that does not answer one look is not a cluster whose workers all left: the
    slots seen last stand (the worker watch, not the dealer, decides a scheduler is gone)."""
    from gpubatch.runtime import executors

    class Flaky:  # a client whose scheduler answers once, then not
        calls = 0

        def scheduler_info(self) -> dict:
            self.calls += 1
            if self.calls > 1:
                raise OSError("Timed out trying to connect to tcp://127.0.0.1:8786")
            return {"workers": {"tcp://a": {"nthreads": 2}, "tcp://b": {"nthreads": 1}}}

    executor = executors.DaskExecutor(Flaky())
    assert executor.worker_slots() == {"tcp://a": 2, "tcp://b": 1}
    monkeypatch.setattr(executors, "WATCH_S", 0.0)
    assert executor.worker_slots() == {"tcp://a": 2, "tcp://b": 1}
