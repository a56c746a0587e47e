"""How busy the cores a worker may use were while a shard ran: what tells a run that waited on
its readers because the cores were full from one that waited because it had too few readers.

A shard's clocks say where its threads spent their time, not whether the machine had cores to
spare: on a host whose cores are all busy, decode time is CPU time, and more reader threads
only take turns on the same cores (the advice to add them is then wrong). The sample is the
cores in this process's CPU affinity (a SLURM job's cpuset, a ``taskset``), read from the
kernel's per-core times, so it counts every process on those cores: another job, a storage
server, the other worker processes of this run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpubatch.core.clocks import StageClocks

#: counters a shard adds: busy core-seconds, and core-seconds elapsed, on its cores
BUSY_KEY, ELAPSED_KEY, CORES_KEY = "host.cpu_busy_s", "host.cpu_elapsed_s", "host.cores"
#: kernel times that are not work: the core was free
IDLE_FIELDS = ("idle", "iowait")
#: Linux counts a guest's time in user and nice already (as psutil's own percentages do)
COUNTED_TWICE = ("guest", "guest_nice")


@dataclass(frozen=True)
class CoreTimes:
    """Cumulative busy and total seconds over a set of cores, since boot."""

    busy_s: float
    total_s: float
    cores: int


def _allowed_cores() -> list[int] | None:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux: every core
        return None


def core_times() -> CoreTimes | None:
    """This process's cores' times now, or None where the kernel's per-core times cannot be read."""
    try:
        import psutil

        per_core = psutil.cpu_times(percpu=True)
    except Exception:  # noqa: BLE001 - no psutil, or no /proc: the report goes without it
        return None
    allowed = _allowed_cores()
    chosen = [per_core[i] for i in allowed if i < len(per_core)] if allowed else list(per_core)
    if not chosen:
        return None
    total = sum(sum(t) - sum(getattr(t, name, 0.0) for name in COUNTED_TWICE) for t in chosen)
    idle = sum(getattr(t, name, 0.0) for t in chosen for name in IDLE_FIELDS)
    return CoreTimes(total - idle, total, len(chosen))


def count_core_use(clocks: StageClocks, before: CoreTimes | None) -> None:
    """Add the busy and elapsed core-seconds since ``before`` to the shard's counters.

    Shards that overlap add overlapping spans; the run's busy share (busy over elapsed summed)
    is then a mean weighted by shard time, which is what the verdict asks: were the cores full
    while the shards ran.
    """
    after = core_times() if before is not None else None
    if before is None or after is None or after.total_s <= before.total_s:
        return
    clocks.count(BUSY_KEY, max(0.0, after.busy_s - before.busy_s))
    clocks.count(ELAPSED_KEY, after.total_s - before.total_s)
    clocks.peak(CORES_KEY, after.cores)
