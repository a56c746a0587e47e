"""The lease of one run on one output, taken against a real folder and a real S3 server.

A free local output's lease is created atomically and at once; a held one refuses naming its
holder; a stale one is taken over; on S3 it is created and replaced with conditional writes, then
read back; where no atomic create exists the lease is written, waited on and read back.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pytest
from conftest import outcome_within

from gpubatch.core.errors import SpecError
from gpubatch.outputs import lease as lease_module
from gpubatch.outputs.layout import LEASE
from gpubatch.outputs.lease import Lease
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
