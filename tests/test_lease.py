"""The lease of one run on one output, taken against a real folder and a real S3 server.

A free local output's lease is created atomically and at once; a held one refuses naming its
holder; a stale one is taken over; on S3 it is created and replaced with conditional writes, then
read back, and held with them: a heartbeat or release by a run suspended between its read and
its write never replaces nor deletes the lease a successor took over meanwhile (the race is
staged inside that read, not by sleeps); where no atomic create exists the lease is written,
waited on and read back.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pytest
from conftest import outcome_within, wait_for

from gpubatch.core.errors import SpecError
from gpubatch.outputs import lease as lease_module
from gpubatch.outputs.layout import LEASE
from gpubatch.outputs.lease import Lease, LeaseLost
from gpubatch.outputs.store import OutputStore

if TYPE_CHECKING:
    from s3_fixtures import S3Stack

pytest_plugins = ["s3_fixtures"]


def _lease(store: OutputStore, name: str) -> Lease:
    return Lease(store, name, stale_s=120.0, heartbeat_s=5.0)


def _acquire_within(lease: Lease, seconds: float) -> BaseException | None:
    """Acquire on a thread; the error it raised, or None; fails if it is still waiting."""
    return cast(BaseException | None, outcome_within(lease.acquire, seconds, "acquire"))


def test_a_free_local_output_is_leased_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease_module, "CONFIRM_S", 600.0)  # a wait for confirmation would hang here
    store = OutputStore(tmp_path / "out")
    assert _acquire_within(_lease(store, "run-a"), 30) is None
    assert json.loads((tmp_path / "out" / LEASE).read_text())["run_id"] == "run-a"
    assert [p.name for p in (tmp_path / "out").iterdir()] == [LEASE]  # no temporary left behind


def test_without_hard_links_the_lease_is_written_waited_on_and_read_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem that refuses hard links (some FUSE and SMB mounts) cannot create atomically:
    the store says it cannot tell, and the lease is taken the object-store way, not refused."""
    import os

    def no_links(src: object, dst: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(lease_module, "CONFIRM_S", 0.05)
    store = OutputStore(tmp_path / "out")
    assert store.create_json("probe.json", {}) is None
    assert _acquire_within(_lease(store, "run-a"), 30) is None
    assert json.loads((tmp_path / "out" / LEASE).read_text())["run_id"] == "run-a"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [LEASE]  # no temporary left behind


def test_two_runs_racing_for_a_free_output_one_wins_the_other_names_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease_module, "CONFIRM_S", 600.0)
    store = OutputStore(tmp_path / "out")
    start = threading.Barrier(2)
    errors: dict[str, BaseException | None] = {}

    def race(name: str) -> None:
        start.wait()
        errors[name] = _acquire_within(_lease(store, name), 30)

    racers = [threading.Thread(target=race, args=(name,)) for name in ("run-a", "run-b")]
    for t in racers:
        t.start()
    for t in racers:
        t.join(60)
    winner = json.loads((tmp_path / "out" / LEASE).read_text())["run_id"]
    loser = "run-b" if winner == "run-a" else "run-a"
    assert errors[winner] is None
    assert isinstance(errors[loser], SpecError) and "another run is writing this output" in str(errors[loser])


def test_a_stale_lease_is_taken_over_and_a_live_one_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease_module, "CONFIRM_S", 0.05)
    store = OutputStore(tmp_path / "out")
    killed = {"run_id": "killed", "host": "elsewhere", "pid": 1, "heartbeat": time.time() - 1000, "stale_after_s": 120}
    store.write_json(LEASE, killed)
    assert store.create_json(LEASE, {"run_id": "x"}) is False  # an existing lease is never overwritten by create
    assert json.loads((tmp_path / "out" / LEASE).read_text())["run_id"] == "killed"
    taker = _lease(store, "run-new")
    assert _acquire_within(taker, 30) is None
    assert json.loads((tmp_path / "out" / LEASE).read_text())["run_id"] == "run-new"
    refused = _acquire_within(_lease(store, "run-late"), 30)
    assert isinstance(refused, SpecError) and "run run-new" in str(refused)
    taker.release()
    assert not (tmp_path / "out" / LEASE).exists()


def test_on_object_storage_the_lease_is_created_conditionally_and_read_back(s3: S3Stack) -> None:
    store = OutputStore(f"s3://{s3.bucket}/leases/{uuid.uuid4().hex}", s3.options())
    assert store.create_json("probe.json", {"run_id": "x"}) is True  # If-None-Match: *
    assert store.create_json("probe.json", {"run_id": "y"}) is False
    assert store.read_json("probe.json") == {"run_id": "x"}
    first = _lease(store, "run-a")
    assert _acquire_within(first, 60) is None
    assert store.read_json(LEASE)["run_id"] == "run-a"
    refused = _acquire_within(_lease(store, "run-b"), 60)
    assert isinstance(refused, SpecError) and "run run-a" in str(refused)
    first.release()
    assert not store.exists(LEASE)


def _successor_takes_over_after_next_read(store: OutputStore, successor: Lease,
                                          monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """Stage the race of a run suspended between its lease's read and its write (laptop sleep,
    SIGSTOP, a paused VM): the next read of the lease through ``store`` returns what it read,
    but only after ``successor`` has taken the lease over on the server. Deterministic: the
    take-over runs inside that read, on the reading thread. The returned dict gets "taken"
    (None, or the error the take-over raised) once it has happened, and "read_again" at the
    lease's next read (a heartbeat's next read: the write after the staged one is done)."""
    real_read = store.read_json
    outcome: dict[str, object] = {}

    def read_then_lose_the_lease(name: str) -> object:
        held = real_read(name)
        if name == LEASE and "taken" in outcome:
            outcome["read_again"] = True
        elif name == LEASE:
            try:
                successor.acquire()
                outcome["taken"] = None
            except Exception as exc:  # noqa: BLE001 - shown by the test's assertion
                outcome["taken"] = exc
        return held

    monkeypatch.setattr(store, "read_json", read_then_lose_the_lease)
    return outcome


def _s3_leases(s3: S3Stack) -> tuple[OutputStore, OutputStore]:
    """Two clients' stores on one new S3 prefix: the suspended run's and its successor's."""
    uri = f"s3://{s3.bucket}/leases/{uuid.uuid4().hex}"
    return OutputStore(uri, s3.options()), OutputStore(uri, s3.options())


def test_an_s3_heartbeat_never_overwrites_the_lease_a_successor_took_over(
        s3: S3Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run A's heartbeat reads its lease (still A's), then A is suspended; run B takes the lease
    over as stale; A wakes and writes its heartbeat. Written plainly, that heartbeat replaced
    B's lease and both ran into one output. Written on the ETag A last wrote (If-Match), it is
    refused (412): A finds its lease lost, naming B, stops beating, and B keeps the output."""
    monkeypatch.setattr(lease_module, "CONFIRM_S", 0.05)
    store_a, store_b = _s3_leases(s3)
    first = Lease(store_a, "run-a", stale_s=0.0, heartbeat_s=0.05)  # stale at once: B may take it
    successor = _lease(store_b, "run-b")
    assert _acquire_within(first, 60) is None
    staged = _successor_takes_over_after_next_read(store_a, successor, monkeypatch)
    try:
        first.hold()
        wait_for(lambda: first.lost is not None or "read_again" in staged, 30,
                 "run A's heartbeat after the take-over")
        assert staged.get("taken", "not staged") is None
        assert store_b.read_json(LEASE)["run_id"] == "run-b"
        assert first.lost is not None and first.lost["run_id"] == "run-b"
        with pytest.raises(LeaseLost, match="another run took this output over: run run-b on host"):
            first.check()
    finally:
        first.release()
    assert store_b.read_json(LEASE)["run_id"] == "run-b"  # A's release left B's lease alone
    successor.release()
    assert not store_b.exists(LEASE)


def test_releasing_an_s3_lease_never_deletes_the_lease_a_successor_took_over(
        s3: S3Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run A ends: its release reads the lease (still A's), then A is suspended; run B takes the
    lease over; A wakes and deletes. A plain delete removed B's lease from under B (a third
    run could then take the output B is writing); deleted only at the ETag A last wrote
    (If-Match on DELETE), it is refused and B's lease stays."""
    monkeypatch.setattr(lease_module, "CONFIRM_S", 0.05)
    store_a, store_b = _s3_leases(s3)
    first = Lease(store_a, "run-a", stale_s=0.0, heartbeat_s=5.0)
    successor = _lease(store_b, "run-b")
    assert _acquire_within(first, 60) is None
    staged = _successor_takes_over_after_next_read(store_a, successor, monkeypatch)
    first.release()
    assert staged.get("taken", "not staged") is None
    assert store_b.read_json(LEASE)["run_id"] == "run-b"
    successor.release()
    assert not store_b.exists(LEASE)


def test_an_s3_heartbeat_that_meets_its_own_landed_write_beats_on(
        s3: S3Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """A heartbeat whose write landed but whose answer was lost is sent again and meets a newer
    version of its own lease (412): that is still this run's lease, not a successor's; it
    takes that version as its own and beats on rather than stopping the run."""
    monkeypatch.setattr(lease_module, "CONFIRM_S", 0.05)
    store, _ = _s3_leases(s3)
    mine = Lease(store, "run-a", stale_s=120.0, heartbeat_s=0.05)
    assert _acquire_within(mine, 60) is None
    store.write_json(LEASE, mine._record())  # as if a heartbeat had landed, its answer lost
    beats: list[float] = []
    try:
        mine.hold(beat=lambda: beats.append(time.time()))
        wait_for(lambda: len(beats) >= 3 or mine.lost is not None, 30, "three heartbeats")
        assert mine.lost is None
        assert store.read_json(LEASE)["run_id"] == "run-a"
    finally:
        mine.release()
    assert not store.exists(LEASE)
