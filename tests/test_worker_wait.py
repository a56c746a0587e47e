"""The wait for workers and its two bounds (runtime.waiting), on explicit clocks: a busy queue
is waited for up to run.queue_timeout, everything else (jobs gone, held, a worker that never
connects) up to run.worker_timeout, added up over the whole wait; and which of squeue's pending
reasons count as a busy queue (runtime.slurm). The real SLURM runs are in test_slurm.py."""

from __future__ import annotations

from typing import Any

import pytest

from gpubatch.runtime.slurm import queued_of
from gpubatch.runtime.waiting import (
    NoWorkers,
    Queued,
    WorkersUnavailable,
    WorkerWait,
    duration_words,
)

BUSY = NoWorkers("worker jobs 1, 2 are still pending in SLURM (reason: Priority)", queued=Queued(2, ("Priority",)))
GONE = NoWorkers("worker job 1 is no longer running: SLURM cancelled job 1")


def _wait(told: list[Any] | None = None) -> WorkerWait:
    return WorkerWait(worker_timeout=30, queue_timeout=3600,
                      on_queued=lambda queued, since: told.append(queued) if told is not None else None)


def test_a_busy_queue_is_waited_for_past_the_worker_timeout_up_to_the_queue_timeout() -> None:
    told: list[Any] = []
    wait = _wait(told)
    for t in range(0, 3600, 5):
        wait.look(BUSY, now=float(t))
    assert told == [BUSY.queued], "status.json is told once, as the queue wait begins"
    with pytest.raises(WorkersUnavailable, match=r"no worker for 3600 s \(run.queue_timeout\).*Priority"
                                                 r".*raise run.queue_timeout.*--resume"):
        wait.look(BUSY, now=3601.0)


def test_time_not_spent_queued_adds_up_against_the_worker_timeout() -> None:
    """Jobs that go from pending to running (their worker never connecting) and back: each
    stretch outside the queue counts, so the swings cannot hold the run open for a day."""
    wait, t = _wait(), 0.0
    with pytest.raises(WorkersUnavailable, match=r"no worker for 30 s \(run.worker_timeout\): worker job 1"):
        for _ in range(10):
            for why in (BUSY, GONE, GONE, BUSY):  # 10 s gone in each round of 20 s
                wait.look(why, now=t)
                t += 5.0
    assert 60 < t < 3600


def test_a_worker_ends_the_wait_and_its_clocks() -> None:
    told: list[Any] = []
    wait = _wait(told)
    wait.look(GONE, now=0.0)
    wait.look(BUSY, now=20.0)
    wait.over()
    assert told == [BUSY.queued, None]
    wait.look(GONE, now=100.0)
    wait.look(GONE, now=125.0)  # 25 s of this wait, not 45 s since the first
    with pytest.raises(WorkersUnavailable, match="run.worker_timeout"):
        wait.look(GONE, now=131.0)


def test_jobs_only_a_person_can_start_are_told_to_status_and_count_against_the_worker_timeout() -> None:
    """Held jobs (JobHeldUser) are no busy queue: run.worker_timeout bounds their wait, as before,
    but status.json is told of it, and its words and the failure say what starts them."""
    action = "they are held: while the run waits, `scontrol release 1,2` starts them"
    states = {"1": ("PENDING", "JobHeldUser"), "2": ("PENDING", "JobHeldUser")}
    held = queued_of(["1", "2"], states, action)
    assert held == Queued(2, ("JobHeldUser",), clears=False, action=action)
    assert held.words(60) == f"waiting for SLURM: 2 jobs pending (JobHeldUser) for 1 min: {action}"
    told: list[Any] = []
    wait = _wait(told)
    why = NoWorkers(f"worker jobs 1, 2 are still pending in SLURM (reason: JobHeldUser); {action}", queued=held)
    wait.look(why, now=0.0)
    with pytest.raises(WorkersUnavailable, match=r"no worker for 30 s \(run.worker_timeout\).*`scontrol release 1,2`"):
        wait.look(why, now=31.0)
    assert told == [held]


def test_a_fatal_account_stops_at_once() -> None:
    with pytest.raises(WorkersUnavailable, match="sbatch rejected"):
        _wait().look(NoWorkers("sbatch rejected the worker job: invalid partition", fatal=True), now=0.0)


@pytest.mark.parametrize("reasons,queued", [
    (["Priority", "Resources"], ("Priority", "Resources")),
    (["QOSGrpCpuLimit", "BeginTime"], ("BeginTime", "QOSGrpCpuLimit")),
    (["ReqNodeNotAvail, UnavailableNodes:vm", "AssocMaxJobsLimit"], ("AssocMaxJobsLimit", "ReqNodeNotAvail")),
    (["Priority", "JobHeldUser"], None),  # a held job waits for a person
    (["Priority", "PartitionDown"], None),
    (["QOSMaxCpuPerJobLimit", "Priority"], None),  # a job over a per-job limit never fits
    (["PartitionTimeLimit", "Priority"], None),
])
def test_only_reasons_the_queue_clears_by_itself_make_a_busy_queue(reasons: list[str], queued: Any) -> None:
    states = {str(i): ("PENDING", r) for i, r in enumerate(reasons)}
    found = queued_of(list(states), states)
    assert (found.reasons if found else None) == queued
    assert queued_of(["0", "9"], states) is None, "a job squeue no longer lists is not waiting in the queue"
    assert queued_of(list(states), {**states, "0": ("RUNNING", "None")}) is None


def test_waits_are_said_as_a_person_reads_them() -> None:
    assert [duration_words(s) for s in (35, 42 * 60 + 5, 3 * 3600 + 12 * 60)] == ["35 s", "42 min", "3 h 12 min"]
    assert Queued(1, ("Resources",)).words(60) == "waiting for SLURM: 1 job pending (Resources) for 1 min"
