"""Workers lost mid-run, and why: the record the report's ``lost_workers`` holds.

A Dask worker that vanishes says nothing about why. Where the cluster's maker knows the batch
job each worker runs in (SLURM), the loss is put in the batch system's words: "SLURM cancelled
job 426", "SLURM ended job 432 at its time limit", "SLURM requeued job 435". SLURM gives a job
its final state a moment after its worker is gone (a cancelled job is COMPLETING first), so an
unexplained loss is asked about again at each look, for up to ``EXPLAIN_S``, before it is said.
The same wait serves a worker's nanny's word of how its process ended (``late_cause``: the OOM
killer's SIGKILL, a crash; runtime.worker_exits), which reaches the scheduler after the loss
may be seen; where both speak, both are said.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("gpubatch")
#: how long a lost worker's batch job is asked about for a final state before the loss is said
#: without one, and how often
EXPLAIN_S, ASK_EVERY_S = 30.0, 3.0


class WorkerJobs(Protocol):
    """The batch jobs a cluster's workers run in (runtime.slurm.SlurmDiagnosis)."""

    def job_of(self, worker_name: str) -> str | None:
        """The id of the batch job the worker of this Dask name runs in; None if not known."""

    def why_ended(self, job_ids: list[str]) -> dict[str, str]:
        """The batch system's account of each job's end, for those it has one for (yet)."""


class LostWorkers:
    """Workers that left while the run went on, with the shards they held and their cause."""

    def __init__(self, jobs: WorkerJobs | None = None, late_cause: Callable[[str], str | None] | None = None):
        self.jobs = jobs
        self.late_cause = late_cause
        self._job_of: dict[str, str] = {}  # worker address -> its batch job's id
        self._lost: list[dict[str, Any]] = []
        self._unexplained: list[tuple[dict[str, Any], float]] = []  # (entry, when to stop asking)
        self._asked = 0.0

    def seen(self, workers: dict[str, dict[str, Any]]) -> None:
        """Workers connected now (the scheduler's worker info, by address): their batch jobs,
        looked up while the cluster still lists them."""
        if self.jobs is None:
            return
        for address, info in workers.items():
            if address not in self._job_of:
                job = self.jobs.job_of(str(info.get("name", "")))
                if job:
                    self._job_of[address] = job

    def lost(self, worker: str, shards: list[str], cause: str | None) -> None:
        """``worker`` left holding ``shards``; ``cause`` where the executor knows it (a memory kill)."""
        entry: dict[str, Any] = {"worker": worker, "time": time.time(), "shards": sorted(set(shards))}
        job = self._job_of.get(worker)
        if job:
            entry["job"] = job
        self._lost.append(entry)
        if cause is None and ((job and self.jobs is not None) or self.late_cause is not None):
            self._unexplained.append((entry, time.monotonic() + EXPLAIN_S))
            self._asked = 0.0  # asked at once: a time limit or node failure is final already
            self.explain()
        else:
            self._say(entry, cause)

    def explain(self, final: bool = False) -> None:
        """Ask again about the losses not yet explained; say each one explained, or given up on
        (after EXPLAIN_S, or ``final``: the run is ending)."""
        now = time.monotonic()
        if not self._unexplained or (not final and now - self._asked < ASK_EVERY_S):
            return
        self._asked = now
        jobs = sorted({e["job"] for e, _ in self._unexplained if e.get("job")})
        ended = self.jobs.why_ended(jobs) if self.jobs and jobs else {}
        waiting = []
        for entry, until in self._unexplained:
            said = (self.late_cause(entry["worker"]) if self.late_cause else None, ended.get(entry.get("job", "")))
            cause = "; ".join(c for c in said if c) or None
            if cause is None and not final and now < until:
                waiting.append((entry, until))
            else:
                self._say(entry, cause)
        self._unexplained = waiting

    def cause_of(self, worker: str) -> str | None:
        """The cause of ``worker``'s loss, asked of its nanny's word and the batch system now if
        not yet known."""
        for entry in reversed(self._lost):
            if entry["worker"] == worker:
                if "cause" in entry:
                    return str(entry["cause"])
                job = entry.get("job")
                said = (self.late_cause(worker) if self.late_cause else None,
                        self.jobs.why_ended([job]).get(job) if job and self.jobs is not None else None)
                return "; ".join(c for c in said if c) or None
        return None

    def entries(self) -> list[dict[str, Any]]:
        """Every loss, each explained as far as it can be by now."""
        self.explain(final=True)
        return list(self._lost)

    def _say(self, entry: dict[str, Any], cause: str | None) -> None:
        if cause:
            entry["cause"] = cause
        job = f" (SLURM job {entry['job']})" if entry.get("job") else ""
        log.warning("worker %s%s was lost%s; its shards (%s) are run again elsewhere", entry["worker"], job,
                    f": {cause}" if cause else "", ", ".join(entry["shards"]) or "none running")
