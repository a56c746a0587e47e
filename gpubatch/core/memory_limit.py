"""The memory this process may use: the machine's, or less where a cgroup limits it.

A container (Docker's ``--memory``, a Kubernetes memory limit) or a SLURM job (``--mem``) runs
in a memory cgroup whose limit is far below the machine's RAM, which is all that
``sysconf``/``psutil`` report there. Budgets sized on the RAM passed configurations the cgroup
could not hold, and the kernel's OOM killer ended the run instead of gpubatch's refusal naming
the key to lower. The limit is read as the kernel writes it: cgroup v2 ``memory.max`` ("max" for
none) and ``memory.high``, v1 ``memory.limit_in_bytes`` (a huge number for none), the tightest over
this process's own cgroup (``/proc/self/cgroup``) and its ancestors, since the limit may sit on a
parent (a Kubernetes pod above its container, a SLURM job above its step). ``memory.high`` is the
soft limit (Kubernetes' MemoryQoS, systemd's ``MemoryHigh=``): above it the kernel throttles the
cgroup's allocations and reclaims its pages hard, so a run sized past it crawls in reclaim or
swap; with ``memory.max`` left at "max" a budget that read only the hard limit was the whole host.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gpubatch.core.cpu import CGROUP_ROOT, PROC_CGROUP, cgroup_and_ancestors, own_cgroups

#: a limit this large is none: cgroup v1 reads "unlimited" back as PAGE_COUNTER_MAX pages
#: (9223372036854771712 with 4 KiB pages)
NO_LIMIT = 1 << 62
#: cgroup v2's limits, hard then soft: whichever is smaller over the cgroup and its ancestors holds
V2_LIMITS = ("memory.max", "memory.high")


def machine_memory() -> int:
    """Physical memory of this machine in bytes (0 where the platform does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def gib(n: float) -> str:
    """Bytes as GiB with two decimals (48.00 GiB), smaller figures in MiB or kiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 2**10:.1f} kiB"


@dataclass(frozen=True)
class CgroupMemory:
    """The tightest memory limit over a cgroup and its ancestors, and the files that say it."""

    limit: int
    #: the file that set the limit (memory.max, memory.high, memory.limit_in_bytes)
    source: Path
    #: the same cgroup's usage now (v2 memory.current, v1 memory.usage_in_bytes)
    usage: Path

    def room(self) -> int | None:
        """Bytes the cgroup may still take (its limit less its usage); None where unreadable."""
        try:
            return max(0, self.limit - int(self.usage.read_text()))
        except (OSError, ValueError):
            return None


def _read_limit(path: Path) -> int | None:
    """A limit file's bytes; None for "max", a huge figure, or a file unreadable or not the kernel's."""
    try:
        text = path.read_text().strip()
        value = int(text) if text != "max" else None
    except (OSError, ValueError):
        return None
    return value if value is not None and 0 < value < NO_LIMIT else None


def _tightest(dirs: list[Path], limit_files: tuple[str, ...], usage_file: str) -> CgroupMemory | None:
    """The smallest of ``limit_files`` over ``dirs`` (the first named where two are equal)."""
    best = None
    for d in dirs:
        for name in limit_files:
            limit = _read_limit(d / name)
            if limit is not None and (best is None or limit < best.limit):
                best = CgroupMemory(limit, d / name, d / usage_file)
    return best


def find_cgroup_memory(root: Path | None = None, proc_cgroup: Path | None = None) -> CgroupMemory | None:
    """This process's cgroup memory limit (v2 ``memory.max`` or ``memory.high``, or v1
    ``memory.limit_in_bytes``), the tightest over its cgroup and their ancestors; None where there is none or no cgroups.
    ``root`` and ``proc_cgroup`` default to the kernel's (read when called, so tests may point
    them at a tree of their own)."""
    root = CGROUP_ROOT if root is None else root
    try:
        groups = own_cgroups(PROC_CGROUP if proc_cgroup is None else proc_cgroup)
    except (OSError, ValueError):
        return None
    if "" in groups and (root / "cgroup.controllers").exists():
        return _tightest(cgroup_and_ancestors(root, groups[""]), V2_LIMITS, "memory.current")
    memory = next((c for c in groups if "memory" in c.split(",")), None)
    if memory is None:
        return None
    dirs = cgroup_and_ancestors(root / memory, groups[memory])
    return _tightest(dirs, ("memory.limit_in_bytes",), "memory.usage_in_bytes")


@dataclass(frozen=True)
class UsableMemory:
    """The memory this process may use, and where the figure comes from, in words."""

    total: int  # bytes (0: unknown)
    said: str  # "this machine's memory", "the container's memory limit 2.00 GiB (cgroup memory.max)"
    cgroup: CgroupMemory | None  # the cgroup that sets it, if one does


def usable_memory(root: Path | None = None, proc_cgroup: Path | None = None) -> UsableMemory:
    """The machine's memory, or its cgroup's limit where that is lower (a container's, a SLURM
    job's): the figure every memory budget of gpubatch starts from."""
    ram, group = machine_memory(), find_cgroup_memory(root, proc_cgroup)
    if group is not None and (not ram or group.limit < ram):
        return UsableMemory(group.limit, f"the container's memory limit {gib(group.limit)} "
                                         f"(cgroup {group.source.name})", group)
    return UsableMemory(ram, "this machine's memory", None)
