"""How busy the cores a worker may use were while a shard ran: what tells a run that waited on
its readers because the cores were full from one that waited because it had too few readers.

A shard's clocks say where its threads spent their time, not whether the machine had cores to
spare: on a host whose cores are all busy, decode time is CPU time, and more reader threads
only take turns on the same cores (the advice to add them is then wrong). The sample is the
cores in this process's CPU affinity (a SLURM job's cpuset, a ``taskset``), read from the
kernel's per-core times, so it counts every process on those cores: another job, a storage
server, the other worker processes of this run.

A container limited by a CPU quota (Kubernetes CPU limits, ``docker --cpus``, a cgroup's
``cpu.max`` or ``cpu.cfs_quota_us``) sees every core of its node in its affinity, yet may run on
only a share of them: a throttled worker on a mostly idle node would look as if it had cores to
spare. Where a quota allows fewer cores than the affinity names, the sample is the quota's instead:
the limiting cgroup's CPU usage against the wall time the quota allows, with the share of its
scheduling periods in which the kernel throttled it.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpubatch.core.clocks import StageClocks

#: counters a shard adds: busy core-seconds, and core-seconds elapsed, on its cores
BUSY_KEY, ELAPSED_KEY, CORES_KEY = "host.cpu_busy_s", "host.cpu_elapsed_s", "host.cores"
#: counters a quota-limited shard adds: its cgroup's scheduling periods, and those throttled
PERIODS_KEY, THROTTLED_KEY, QUOTA_KEY = "host.cpu_periods", "host.cpu_throttled_periods", "host.cpu_quota"
#: where the kernel shows cgroups, and which this process is in
CGROUP_ROOT, PROC_CGROUP = Path("/sys/fs/cgroup"), Path("/proc/self/cgroup")
#: kernel times that are not work: the core was free
IDLE_FIELDS = ("idle", "iowait")
#: Linux counts a guest's time in user and nice already (as psutil's own percentages do)
COUNTED_TWICE = ("guest", "guest_nice")


@dataclass(frozen=True)
class CoreTimes:
    """Cumulative busy and total seconds over a set of cores, since boot."""

    busy_s: float
    total_s: float
    cores: float
    #: the quota's scheduling periods so far, and those throttled (0 without a quota)
    periods: int = 0
    throttled: int = 0
    quota: bool = False


@dataclass(frozen=True)
class CpuQuota:
    """The tightest CPU quota over this process's cgroup and its ancestors."""

    cores: float
    #: v2: the limiting cgroup's cpu.stat (usage_usec); v1: its cpuacct.usage (nanoseconds)
    usage: Path
    #: the limiting cgroup's cpu.stat: nr_periods, nr_throttled
    stat: Path
    v2: bool

    def times(self) -> CoreTimes | None:
        """The quota's usage and allowed seconds now; None where its files cannot be read."""
        try:
            stat = _keyed(self.stat)
            used = stat["usage_usec"] / 1e6 if self.v2 else int(self.usage.read_text()) / 1e9
        except (OSError, ValueError, KeyError):
            return None
        return CoreTimes(used, time.monotonic() * self.cores, self.cores,
                         stat.get("nr_periods", 0), stat.get("nr_throttled", 0), quota=True)


def _keyed(path: Path) -> dict[str, int]:
    """A cgroup's ``key value`` lines."""
    pairs = (line.split() for line in path.read_text().splitlines())
    return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].lstrip("-").isdigit()}


def own_cgroups(proc_cgroup: Path) -> dict[str, str]:
    """Controllers -> this process's cgroup path, from ``/proc/self/cgroup`` ('' for v2)."""
    groups = {}
    for line in proc_cgroup.read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        groups[controllers] = path
    return groups


def cgroup_and_ancestors(mount: Path, path: str) -> list[Path]:
    """The cgroup directory ``path`` under ``mount`` and its ancestors up to the mount."""
    d, dirs = mount / path.lstrip("/"), []
    while mount == d or mount in d.parents:
        dirs.append(d)
        d = d.parent
    return dirs


def _v2_quota(mount: Path, path: str) -> CpuQuota | None:
    best = None
    for d in cgroup_and_ancestors(mount, path):
        try:
            quota, period = (d / "cpu.max").read_text().split()
            cores = int(quota) / int(period) if quota != "max" and int(period) > 0 else None
        except (OSError, ValueError):  # unreadable or not "QUOTA PERIOD": no limit known here
            continue
        if cores is not None and (best is None or cores < best.cores):
            best = CpuQuota(cores, d / "cpu.stat", d / "cpu.stat", v2=True)
    return best


def _v1_quota(root: Path, groups: dict[str, str]) -> CpuQuota | None:
    cpu = next((c for c in groups if "cpu" in c.split(",")), None)
    acct = next((c for c in groups if "cpuacct" in c.split(",")), None)
    if cpu is None or acct is None:
        return None
    best = None
    for d in cgroup_and_ancestors(root / cpu, groups[cpu]):
        try:
            quota, period = int((d / "cpu.cfs_quota_us").read_text()), int((d / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        if quota > 0 and period > 0 and (best is None or quota / period < best.cores):
            # the usage of the same cgroup in the cpuacct hierarchy (co-mounted with cpu, or its twin)
            same = root / acct / d.relative_to(root / cpu)
            usage = same if same.is_dir() else root / acct / groups[acct].lstrip("/")
            best = CpuQuota(quota / period, usage / "cpuacct.usage", d / "cpu.stat", v2=False)
    return best


def find_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> CpuQuota | None:
    """This process's CPU quota (cgroup v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us``), the
    tightest over its cgroup and their ancestors; None where there is none or no cgroups."""
    try:
        groups = own_cgroups(proc_cgroup)
    except (OSError, ValueError):
        return None
    if "" in groups and (root / "cgroup.controllers").exists():
        return _v2_quota(root, groups[""])
    return _v1_quota(root, groups)


@functools.cache
def _process_quota() -> CpuQuota | None:
    """A process's cgroup is set when it starts (a container's, a SLURM step's): read once."""
    return find_cpu_quota()


def quota_cores() -> float | None:
    """The cores this process's CPU quota allows (0.5, 4.0, ...), or None where no quota limits it:
    a container on a large node sees every core in its affinity, but runs on only this many."""
    quota = _process_quota()
    return quota.cores if quota is not None else None


def usable_cores() -> int:
    """Cores this process may use: its affinity, capped by a CPU quota (a container's CPU limit,
    rounded up as Dask does). Sized on the affinity alone, a one-core container on a 64-core node
    started 64 worker processes and as many model threads, all taking turns on the one core."""
    allowed = _allowed_cores()
    cores = len(allowed) if allowed else os.cpu_count() or 1
    quota = quota_cores()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _allowed_cores() -> list[int] | None:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux: every core
        return None


def core_times() -> CoreTimes | None:
    """This process's cores' times now (its CPU quota's, where that allows fewer cores than its
    affinity names), or None where the kernel's times cannot be read."""
    allowed = _allowed_cores()
    quota = _process_quota()
    if quota is not None and quota.cores < (len(allowed) if allowed else os.cpu_count() or 1):
        return quota.times()
    return _per_core_times(allowed)


def _per_core_times(allowed: list[int] | None) -> CoreTimes | None:
    try:
        import psutil

        per_core = psutil.cpu_times(percpu=True)
    except Exception:  # noqa: BLE001 - no psutil, or no /proc: the report goes without it
        return None
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
    if before is None or after is None or after.total_s <= before.total_s or after.quota != before.quota:
        return
    clocks.count(BUSY_KEY, max(0.0, after.busy_s - before.busy_s))
    clocks.count(ELAPSED_KEY, after.total_s - before.total_s)
    clocks.peak(CORES_KEY, after.cores)
    if after.quota:
        clocks.peak(QUOTA_KEY, 1)
        clocks.count(PERIODS_KEY, max(0, after.periods - before.periods))
        clocks.count(THROTTLED_KEY, max(0, after.throttled - before.throttled))
