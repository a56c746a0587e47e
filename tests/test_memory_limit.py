"""A container's (or SLURM job's) memory cgroup limit, not the node's RAM, is the memory a
worker's budget starts from: sized on the RAM, a configuration the cgroup could not hold passed
`validate` and `run`, and the kernel's OOM killer ended the run instead of a refusal naming the
key to lower."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import slide_job, write_job

from gpubatch.cli.main import main
from gpubatch.core import memory_limit
from gpubatch.core.cpu import CGROUP_ROOT
from gpubatch.core.errors import EXIT_USAGE
from gpubatch.core.memory_limit import find_cgroup_memory, machine_memory, usable_memory

GIB = 2**30
#: cgroup v1's "unlimited", as the kernel reads it back (PAGE_COUNTER_MAX pages of 4 KiB)
V1_UNLIMITED = "9223372036854771712\n"
#: 8192 tiles of 64 px: a 384 MiB model input, 2.32 GiB in flight (read units included) on the inline profile's two
#: pipelines (with run.prefetch_batches 4): over a 2 GiB container, well under most machines' RAM
OVER_TWO_GIB = "model.batch_size=8192"


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_tightest_memory_limit_over_a_cgroup_and_its_ancestors_is_found(tmp_path: Path) -> None:
    """The limit may sit on a parent (a Kubernetes pod above its container); 'max' and v1's
    huge 'unlimited' mean none. Formats as the kernel writes them."""
    v2 = _tree(tmp_path / "v2", {
        "cgroup.controllers": "cpu memory\n", "kubepods/memory.max": "max\n",
        "kubepods/pod1/memory.max": "4294967296\n", "kubepods/pod1/app/memory.max": "max\n",
        "kubepods/pod1/memory.current": "1073741824\n", "proc": "0::/kubepods/pod1/app\n"})
    found = find_cgroup_memory(v2, v2 / "proc")
    assert found is not None and found.limit == 4 * GIB and found.source == v2 / "kubepods/pod1/memory.max"
    assert found.room() == 3 * GIB
    (v2 / "kubepods/pod1/app/memory.max").write_text("2147483648\n")
    found = find_cgroup_memory(v2, v2 / "proc")
    assert found is not None and found.limit == 2 * GIB and found.room() is None  # app has no memory.current
    (v2 / "kubepods/pod1/app/memory.max").write_text("lots\n")  # not the kernel's: skipped, not a crash
    (v2 / "kubepods/pod1/memory.max").write_text("max\n")
    assert find_cgroup_memory(v2, v2 / "proc") is None

    v1 = _tree(tmp_path / "v1", {
        "memory/memory.limit_in_bytes": V1_UNLIMITED, "memory/docker/memory.limit_in_bytes": V1_UNLIMITED,
        "memory/docker/abc/memory.limit_in_bytes": "536870912\n",
        "memory/docker/abc/memory.usage_in_bytes": "134217728\n",
        "proc": "12:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n"})
    found = find_cgroup_memory(v1, v1 / "proc")
    assert found is not None and found.limit == GIB // 2 and found.room() == 384 * 2**20
    (v1 / "memory/docker/abc/memory.limit_in_bytes").write_text(V1_UNLIMITED)
    assert find_cgroup_memory(v1, v1 / "proc") is None
    assert find_cgroup_memory(v1, tmp_path / "no-such-proc-file") is None


def test_a_cgroup_v2_soft_limit_memory_high_is_a_limit_too(tmp_path: Path) -> None:
    """memory.high=4G with memory.max=max (Kubernetes' MemoryQoS, systemd's MemoryHigh=): the kernel
    throttles and reclaims hard above 4 GiB, but only memory.max was read and the budget was the
    whole host. The smaller of the two holds, on the cgroup or an ancestor."""
    v2 = _tree(tmp_path, {"cgroup.controllers": "cpu memory\n", "pod/memory.max": "max\n",
                          "pod/memory.high": f"{4 * GIB}\n", "pod/memory.current": f"{GIB}\n",
                          "pod/app/memory.max": "max\n", "pod/app/memory.high": "max\n", "proc": "0::/pod/app\n"})
    found = find_cgroup_memory(v2, v2 / "proc")
    assert found is not None and found.limit == 4 * GIB and found.source == v2 / "pod/memory.high"
    assert found.room() == 3 * GIB
    (v2 / "pod/app/memory.max").write_text(f"{2 * GIB}\n")  # a hard limit below the soft one holds
    found = find_cgroup_memory(v2, v2 / "proc")
    assert found is not None and found.limit == 2 * GIB and found.source == v2 / "pod/app/memory.max"
    if machine_memory() > 4 * GIB:
        (v2 / "pod/app/memory.max").write_text("max\n")
        usable = usable_memory(v2, v2 / "proc")
        assert usable.total == 4 * GIB and usable.said == "the container's memory limit 4.00 GiB (cgroup memory.high)"


def test_a_limit_above_the_machine_s_memory_leaves_the_machine_s(tmp_path: Path) -> None:
    ram = machine_memory()
    v2 = _tree(tmp_path, {"cgroup.controllers": "memory\n", "memory.max": f"{ram * 2}\n", "proc": "0::/\n"})
    assert usable_memory(v2, v2 / "proc").said == "this machine's memory"
    (v2 / "memory.max").write_text(f"{GIB}\n")
    usable = usable_memory(v2, v2 / "proc")
    assert usable.total == GIB and usable.said == "the container's memory limit 1.00 GiB (cgroup memory.max)"


@pytest.fixture()
def spec(tmp_path: Path, slide_path: Path, classifier: Path) -> Path:
    if machine_memory() < 4 * GIB:
        pytest.skip("the configuration must fit this machine's memory, and not 2 GiB")
    return write_job(tmp_path / "job.yaml", slide_job([str(slide_path)], classifier, tmp_path / "out"))


def test_validate_and_run_refuse_what_a_container_s_memory_limit_cannot_hold(
        spec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """2.32 GiB in flight passed in a 2 GiB container, the budget being the node's RAM."""
    assert main(["validate", str(spec), "--set", OVER_TWO_GIB]) == 0
    fake = _tree(tmp_path / "sys", {"cgroup.controllers": "cpu memory\n", "kubepods/memory.max": "2147483648\n",
                                    "kubepods/app/memory.max": "max\n", "proc": "0::/kubepods/app\n"})
    monkeypatch.setattr(memory_limit, "CGROUP_ROOT", fake)
    monkeypatch.setattr(memory_limit, "PROC_CGROUP", fake / "proc")
    for command in ("validate", "run"):
        capsys.readouterr()
        assert main([command, str(spec), "--set", OVER_TWO_GIB]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert ("model.batch_size: 8192 items make a 384.00 MiB model input" in err and "a worker holds about 2.32 GiB"
                in err and "over its 2.00 GiB (the container's memory limit 2.00 GiB (cgroup memory.max)); "
                "lower model.batch_size, tiles.size or run.prefetch_batches" in err), err
    assert not (tmp_path / "out").exists()
    assert main(["validate", str(spec), "--set", "model.batch_size=4096"]) == 0


def _memory_cgroup(limit: int) -> Iterator[Path]:
    """A real memory cgroup limited to ``limit`` bytes (v1, or v2 with the memory controller);
    yields the ``cgroup.procs`` a process joins. Skips where this machine cannot make one."""
    name = f"gpubatch-test-{uuid.uuid4().hex[:8]}"
    v1 = CGROUP_ROOT / "memory"
    try:
        if (v1 / "memory.limit_in_bytes").exists():
            group, limit_file = v1 / name, "memory.limit_in_bytes"
        elif "memory" in (CGROUP_ROOT / "cgroup.subtree_control").read_text().split():
            group, limit_file = CGROUP_ROOT / name, "memory.max"
        else:
            pytest.skip("no cgroup memory controller here")
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a memory cgroup here: {exc}")
    try:
        (group / limit_file).write_text(str(limit))
        yield group / "cgroup.procs"
    finally:
        with contextlib.suppress(OSError):  # its one process has exited: the kernel lets it go
            group.rmdir()


@pytest.fixture()
def two_gib_cgroup() -> Iterator[Path]:
    yield from _memory_cgroup(2 * GIB)


def test_validate_in_a_real_memory_cgroup_names_its_limit(spec: Path, two_gib_cgroup: Path) -> None:
    """`validate` started in a real 2 GiB memory cgroup (as a container's or a SLURM job's
    process is) refuses the 2.32 GiB configuration, naming the cgroup's limit."""
    script = (f"import os, sys\nopen({str(two_gib_cgroup)!r}, 'w').write(str(os.getpid()))\n"
              "from gpubatch.cli.main import main\nsys.exit(main(['validate', *sys.argv[1:]]))\n")
    done = subprocess.run([sys.executable, "-c", script, str(spec), "--set", OVER_TWO_GIB],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_USAGE, done.stderr[-3000:]
    assert "over its 2.00 GiB (the container's memory limit 2.00 GiB (cgroup memory." in done.stderr, done.stderr


def test_the_tuner_s_default_budget_is_a_quarter_of_what_the_container_may_still_take(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`batch_size: auto` swept up to a quarter of the node's available memory (at most 4 GiB)
    in a container with far less room left: the sweep's largest batch met the OOM killer."""
    from gpubatch.models.prepare.tune import default_memory_budget_mb

    fake = _tree(tmp_path, {"cgroup.controllers": "memory\n", "pod/memory.max": "1073741824\n",
                            "pod/memory.current": "536870912\n", "proc": "0::/pod\n"})
    monkeypatch.setattr(memory_limit, "CGROUP_ROOT", fake)
    monkeypatch.setattr(memory_limit, "PROC_CGROUP", fake / "proc")
    assert default_memory_budget_mb() == 128.0


def _two_gib_pod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process in a pod's container cgroup whose parent is limited to 2 GiB: the top cgroup,
    the only one Dask reads, says nothing."""
    fake = _tree(tmp_path / "sys", {"cgroup.controllers": "cpu memory\n", "kubepods/memory.max": "2147483648\n",
                                    "kubepods/app/memory.max": "max\n", "proc": "0::/kubepods/app\n"})
    monkeypatch.setattr(memory_limit, "CGROUP_ROOT", fake)
    monkeypatch.setattr(memory_limit, "PROC_CGROUP", fake / "proc")


def test_a_local_cluster_s_nannies_hold_each_worker_to_its_share_of_the_container_s_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Dask's memory_limit "auto" reads only the top cgroup's files: in a SLURM job's or a pod's
    cgroup each worker's nanny got its share of the node's RAM, so no nanny paused, spilled or
    restarted a worker before the kernel's OOM killer ended the whole job."""
    from distributed.system import MEMORY_LIMIT

    from gpubatch.runtime.cluster import load_profile, open_executor

    if MEMORY_LIMIT < 4 * GIB:
        pytest.skip("Dask's own figure must be above the fake 2 GiB limit")
    _two_gib_pod(tmp_path, monkeypatch)
    caplog.set_level("INFO", logger="gpubatch")
    profile = load_profile("local")
    assert profile["memory_limit"] == "auto"
    with open_executor(profile, 2) as executor:
        workers = executor.client.scheduler_info(n_workers=-1)["workers"]
    assert sorted(w["memory_limit"] for w in workers.values()) == [GIB, GIB]
    assert ("each worker may hold 1.00 GiB: the container's memory limit 2.00 GiB (cgroup memory.max) "
            "over 2 workers") in caplog.text


def test_a_profile_s_own_memory_limit_is_honoured_and_a_fraction_is_of_the_container_s_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpubatch.runtime.cluster import nanny_memory_limit

    _two_gib_pod(tmp_path, monkeypatch)
    assert nanny_memory_limit(0.25, 4) == nanny_memory_limit("0.25", 4) == GIB // 2
    assert nanny_memory_limit("auto", 4) == GIB // 2
    for given in ("4GB", 3 * GIB, 0, None):  # bytes as given; 0 and None: no limit
        assert nanny_memory_limit(given, 4) == given
