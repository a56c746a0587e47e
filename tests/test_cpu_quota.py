"""A worker limited by a CPU quota (a container's CPU limit) is measured against the quota, not
against every core of the node its affinity names: a throttled worker must not look idle."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import slide_job, write_job

from gpubatch.core.cpu import CGROUP_ROOT, find_cpu_quota

PERIOD_US = 100_000


def _limited_cgroup(cores: float) -> Iterator[list[Path]]:
    """A real cgroup with a CPU quota of ``cores`` (v1 cpu + cpuacct, or v2 with the cpu
    controller); yields the ``cgroup.procs`` files a process joins. Skips where this machine
    cannot make one (not root, no cpu controller, cgroups not writable)."""
    name = f"gpubatch-test-{uuid.uuid4().hex[:8]}"
    quota = str(int(cores * PERIOD_US))
    v1 = [CGROUP_ROOT / "cpu", CGROUP_ROOT / "cpuacct"]
    made: list[Path] = []
    try:
        if all((d / "cgroup.procs").exists() for d in v1) and (v1[0] / "cpu.cfs_quota_us").exists():
            made = [d / name for d in v1]
            for d in made:
                d.mkdir()
            (made[0] / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (made[0] / "cpu.cfs_quota_us").write_text(quota)
        elif "cpu" in (CGROUP_ROOT / "cgroup.subtree_control").read_text().split():
            made = [CGROUP_ROOT / name]
            made[0].mkdir()
            (made[0] / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        else:
            pytest.skip("no cgroup cpu controller here")
    except OSError as exc:
        for d in made:
            d.rmdir() if d.exists() else None
        pytest.skip(f"cannot make a cgroup here: {exc}")
    try:
        yield [d / "cgroup.procs" for d in made]
    finally:
        for d in made:
            _empty_and_remove(d)


def _empty_and_remove(group: Path, wait_s: float = 30.0) -> None:
    """Remove a test cgroup once the processes started in it are gone: a run's worker processes
    may still be shutting down when its client returns (the kernel refuses a cgroup with
    members: EBUSY). Any left after ``wait_s`` are the test's own, and are killed."""
    deadline = time.monotonic() + wait_s
    while (group / "cgroup.procs").read_text().split() and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in (group / "cgroup.procs").read_text().split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    while (group / "cgroup.procs").read_text().split() and time.monotonic() < deadline + 10:
        time.sleep(0.1)
    group.rmdir()


@pytest.fixture
def half_core() -> Iterator[list[Path]]:
    yield from _limited_cgroup(0.5)


@pytest.fixture
def one_core() -> Iterator[list[Path]]:
    yield from _limited_cgroup(1.0)


def _join(procs: list[Path]) -> str:
    """Python lines that move the running process into the cgroup."""
    return "".join(f"open({str(p)!r}, 'w').write(str(os.getpid()))\n" for p in procs)


def test_a_throttled_process_reads_as_full_under_its_quota(half_core: list[Path]) -> None:
    """One spinning thread under half a core: the quota's figure says full and throttled; the
    per-core figure over the machine's cores would have said mostly idle."""
    script = "import os, time, json\n" + _join(half_core) + """
from gpubatch.core.clocks import StageClocks
from gpubatch.core.cpu import core_times, count_core_use, find_cpu_quota
from gpubatch.report.summary import host_cpu
quota = find_cpu_quota()
clocks, before = StageClocks(), core_times()
t = time.time()
while time.time() - t < 1.5:
    pass
count_core_use(clocks, before)
print(json.dumps({"quota": quota.cores, "cpu": host_cpu(clocks.counters, clocks.peaks)}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["quota"] == 0.5
    cpu = got["cpu"]
    assert cpu["quota"] is True and cpu["cores"] == 0.5
    assert cpu["busy"] > 0.85 and cpu["throttled"] > 0.5


def test_a_run_in_a_container_sized_cgroup_reports_its_quota(tmp_path: Path, one_core: list[Path],
                                                               slides_dir: Path, classifier: Path) -> None:
    """A whole run (client, forkserver and Dask workers) started in a one-core cgroup on a
    machine with more cores: the report counts the quota's core and says so."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("the quota must allow fewer cores than the machine has")
    job = slide_job([str(slides_dir / "*.tif")], classifier, tmp_path / "out",
                    tiles={"size": 64, "mpp": 0.5, "tissue": {"method": "none"}},
                    run={"profile": "local", "workers": 1, "readers": 2})
    spec = write_job(tmp_path / "job.yaml", job)
    script = "import os, sys\n" + _join(one_core) + (
        "from gpubatch.cli.main import main\nsys.exit(main(['run', sys.argv[1]]))\n")
    done = subprocess.run([sys.executable, "-c", script, str(spec)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    cpu = report["host_cpu"]
    assert cpu["quota"] is True and cpu["cores"] == 1 and 0 < cpu["busy"] <= 1
    assert "a CPU quota" in report["verdict"]["evidence"] or report["verdict"].get("state") != "verdict"


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_tightest_quota_over_a_cgroup_and_its_ancestors_is_found(tmp_path: Path) -> None:
    """The quota may sit on a parent (a Kubernetes pod above its container): the tightest wins;
    'max' and -1 mean none. Formats as the kernel writes them, v2 and v1 co-mounted."""
    v2 = _tree(tmp_path / "v2", {
        "cgroup.controllers": "cpu memory", "kubepods/cpu.max": "max 100000",
        "kubepods/pod1/cpu.max": "150000 100000", "kubepods/pod1/app/cpu.max": "400000 100000",
        "kubepods/pod1/cpu.stat": "usage_usec 2500000\nnr_periods 40\nnr_throttled 10\nthrottled_usec 9\n",
        "proc": "0::/kubepods/pod1/app\n"})
    quota = find_cpu_quota(v2, v2 / "proc")
    assert quota is not None and quota.cores == 1.5 and quota.stat == v2 / "kubepods/pod1/cpu.stat"
    times = quota.times()
    assert times is not None and times.busy_s == 2.5 and (times.periods, times.throttled) == (40, 10)
    (v2 / "kubepods/pod1/cpu.max").write_text("max 100000")
    assert find_cpu_quota(v2, v2 / "proc").cores == 4.0  # type: ignore[union-attr]
    (v2 / "kubepods/pod1/app/cpu.max").write_text("max 100000")
    assert find_cpu_quota(v2, v2 / "proc") is None
    (v2 / "kubepods/pod1/app/cpu.max").write_text("lots 100000\n")  # not the kernel's: skipped, not a crash
    (v2 / "kubepods/cpu.max").write_text("50000 100000")
    assert find_cpu_quota(v2, v2 / "proc").cores == 0.5  # type: ignore[union-attr]

    v1 = _tree(tmp_path / "v1", {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "200000", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
        "cpu,cpuacct/docker/abc/cpuacct.usage": "3000000000",
        "cpu,cpuacct/docker/abc/cpu.stat": "nr_periods 7\nnr_throttled 3\nthrottled_time 5\n",
        "cpu,cpuacct/docker/cpu.cfs_quota_us": "-1", "cpu,cpuacct/docker/cpu.cfs_period_us": "100000",
        "proc": "12:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n"})
    quota = find_cpu_quota(v1, v1 / "proc")
    assert quota is not None and quota.cores == 2.0
    times = quota.times()
    assert times is not None and times.busy_s == 3.0 and (times.periods, times.throttled) == (7, 3)
    assert find_cpu_quota(v1, tmp_path / "no-such-proc-file") is None


def test_a_cpu_quota_caps_the_local_workers_it_starts_and_allows(tmp_path: Path, one_core: list[Path],
                                                                   slides_dir: Path, classifier: Path) -> None:
    """In a one-core container on a machine with more cores, the local profile sizes itself to
    the quota: `workers: auto` starts one worker (not one per core of the node, each taking turns
    on the one core), and asking for more than the quota is refused like asking for more than
    the cores, naming the quota."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("the quota must allow fewer cores than the machine has")
    job = slide_job([str(slides_dir / "*.tif")], classifier, tmp_path / "out",
                    tiles={"size": 64, "mpp": 0.5, "tissue": {"method": "none"}},
                    run={"profile": "local", "readers": 1})
    spec = write_job(tmp_path / "job.yaml", job)
    script = "import os, sys\n" + _join(one_core) + (
        "from gpubatch.cli.main import main\nsys.exit(main(['run', *sys.argv[1:]]))\n")
    refused = subprocess.run([sys.executable, "-c", script, str(spec), "--set", "run.workers=2"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "run.workers" in refused.stderr and "CPU quota" in refused.stderr, refused.stderr[-3000:]
    assert not (tmp_path / "out" / "report.json").exists()
    done = subprocess.run([sys.executable, "-c", script, str(spec)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["workers"] == 1
