"""The SLURM job the client itself runs in (``sbatch --wrap "gpubatch run ..."``), if any.

SLURM ends a job at its time limit with SIGTERM, then SIGKILL KillWait later (30 s by default).
The stop that SIGTERM starts has those seconds, not the several a controller that is slow to
answer may take; so the job's end time is asked once, in the background, as the run starts, and
a SIGTERM at or after it is said to be the time limit (what to change: a longer ``--time``, then
--resume) rather than a bare SIGTERM.
"""

from __future__ import annotations

import datetime
import os
import threading
import time

from gpubatch.runtime.slurm import job_record


class OwnJob:
    """This process's SLURM job: its id, and its end time once SLURM has said it."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        self.end: float | None = None
        self.limit = ""  # squeue's words for the limit (1:00:00), for the message
        threading.Thread(target=self._ask, name="gpubatch-own-job", daemon=True).start()

    @classmethod
    def from_environment(cls) -> OwnJob | None:
        """The job named by SLURM_JOB_ID where the client runs inside one, else None."""
        job_id = os.environ.get("SLURM_JOB_ID", "").strip()
        return cls(job_id) if job_id.isdigit() else None

    def _ask(self) -> None:
        try:
            record = job_record(self.job_id)
            end = datetime.datetime.fromisoformat(record["EndTime"])  # local time, as SLURM writes it
        except Exception:  # noqa: BLE001 - no SLURM here, or no end: a SIGTERM stays a SIGTERM
            return
        self.limit, self.end = record.get("TimeLimit", ""), end.timestamp()

    def time_limit_words(self, now: float | None = None) -> str | None:
        """What a SIGTERM received now means where it is the job's time limit, else None."""
        if self.end is None or (now if now is not None else time.time()) < self.end - 1:
            return None
        return (f"SIGTERM: the SLURM job {self.job_id} this client runs in reached its time limit "
                f"({self.limit}); give it a longer --time")
