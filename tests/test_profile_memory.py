"""A profile's memory settings as users write them in YAML, read one way by whatever enforces
them and by the budget `validate` and `run` check, and refused where they cannot be true."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import slide_job, write_job

from gpubatch.cli.main import main
from gpubatch.core import memory_limit
from gpubatch.core.errors import EXIT_USAGE, SpecError

GIB = 2**30
#: 8192 tiles of 64 px: about 1.2 GiB in flight on one pipeline (the local profile's one thread per worker)
ABOUT_ONE_GIB = "model.batch_size=8192"


@pytest.fixture()
def spec(tmp_path: Path, slide_path: Path, classifier: Path) -> Path:
    if memory_limit.machine_memory() < 4 * GIB:
        pytest.skip("the configuration must fit this machine's memory, and not 2 GiB")
    return write_job(tmp_path / "job.yaml", slide_job([str(slide_path)], classifier, tmp_path / "out"))


def _profile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    return path


def _two_gib_container(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process in a container whose memory cgroup allows 2 GiB."""
    root = tmp_path / "sys"
    for name, text in {"cgroup.controllers": "cpu memory\n", "pod/memory.max": f"{2 * GIB}\n",
                       "pod/app/memory.max": "max\n", "proc": "0::/pod/app\n"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    monkeypatch.setattr(memory_limit, "CGROUP_ROOT", root)
    monkeypatch.setattr(memory_limit, "PROC_CGROUP", root / "proc")


def test_a_fraction_written_as_a_string_is_the_budget_the_nannies_enforce(
        spec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``memory_limit: "0.25"``: the nannies held each worker to a quarter of the 2 GiB (512 MiB),
    but the budget check read the string with parse_bytes (0) and checked 1.2 GiB in flight
    against the whole 2 GiB: `validate` passed what the nanny would kill."""
    from gpubatch.runtime.cluster import load_profile, nanny_memory_limit
    from gpubatch.runtime.worker_memory import _profile_limit

    _two_gib_container(tmp_path, monkeypatch)
    profile = _profile(tmp_path, 'cluster: local\nworkers: 1\nmemory_limit: "0.25"\n')
    assert _profile_limit(load_profile(str(profile)))[0] == nanny_memory_limit("0.25", 1) == GIB // 2
    for command in ("validate", "run"):
        capsys.readouterr()
        assert main([command, str(spec), "--profile", str(profile), "--set", ABOUT_ONE_GIB]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert "over its 512.00 MiB (the profile's memory_limit)" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("given,said", [
    ("-1", "is negative"), ("-2GB", "is negative"), ("1.5", "is a fraction over 1"),
    ('"0.25x"', "is not a memory limit"), ("lots", "is not a memory limit"), ("true", "is not a memory limit"),
])
def test_a_nonsense_memory_limit_is_refused_naming_the_profile_key(
        spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], given: str, said: str) -> None:
    """A negative limit, a fraction over 1 (Dask took 1.5 as 1 byte) or a string no unit reads
    reached the nannies as given, or the budget check as 0."""
    profile = _profile(tmp_path, f"cluster: local\nworkers: 1\nmemory_limit: {given}\n")
    assert main(["validate", str(spec), "--profile", str(profile)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "profile mine.yaml: memory_limit" in err and said in err and 'bytes such as "4GB"' in err, err


@pytest.mark.parametrize("given,said,fix", [
    ("2", "2 is 2 bytes (a number without a unit is bytes, as Dask reads it)", "write '2GB'"),
    ('"16"', "'16' is 16 bytes", "write '16GB'"),
    ("1000000", "1000000 is 1,000,000 bytes", "write '1000000MB' or '1000000GB', as meant"),
    ("512kB", "'512kB' is 512,000 bytes", "write at least '64MiB'"),
])
def test_a_memory_limit_too_small_for_any_worker_is_refused_saying_the_unit_it_lacks(
        spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], given: str, said: str, fix: str) -> None:
    """``memory_limit: 2`` (2 GB meant) is 2 bytes to Dask, as to the budget check: each nanny
    held its worker to 2 bytes. Refused by validate and run alike, saying what was read and the fix."""
    profile = _profile(tmp_path, f"cluster: local\nworkers: 1\nmemory_limit: {given}\n")
    for command in ("validate", "run"):
        capsys.readouterr()
        assert main([command, str(spec), "--profile", str(profile)]) == EXIT_USAGE, command
        err = capsys.readouterr().err
        assert "profile mine.yaml: memory_limit" in err and said in err and fix in err, err
        assert "under the 64.00 MiB a worker needs" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("given,read", [("auto", "auto"), ("null", None), ("0.25", 0.25), ('"0.25"', 0.25),
                                        ("1", 1.0), ("0", 0), ("64MiB", 64 * 2**20), ("4GB", 4 * 10**9), ('"2 GiB"', 2 * GIB),
                                        (str(3 * GIB), 3 * GIB)])
def test_every_reader_reads_a_memory_limit_alike(tmp_path: Path, given: str, read: Any) -> None:
    from gpubatch.runtime.cluster import load_profile, read_memory_limit

    profile = load_profile(str(_profile(tmp_path, f"cluster: local\nmemory_limit: {given}\n")))
    assert read_memory_limit(profile["memory_limit"]) == read


def _slurm_profile(tmp_path: Path, **slurm: Any) -> Path:
    settings = {"queue": "debug", "cores": 2, "processes": 2, "memory": "64GB", "walltime": "00:10:00", **slurm}
    return _profile(tmp_path, yaml.safe_dump({"cluster": "slurm", "workers": 1, "slurm": settings}))


def test_a_slurm_job_mem_below_its_memory_is_refused_by_validate_and_run_before_submitting(
        spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """dask-jobqueue gives each of a job's worker processes a nanny limit of slurm.memory over
    slurm.processes but asks sbatch for --mem=slurm.job_mem: with job_mem 32G under memory 64GB
    the job's cgroup held half of what its workers believed theirs, and the kernel killed the
    job before any nanny acted. Refused before sbatch is asked (no SLURM needed)."""
    pytest.importorskip("dask_jobqueue")
    profile = _slurm_profile(tmp_path, job_mem="32G")
    for command in ("validate", "run"):
        capsys.readouterr()
        assert main([command, str(spec), "--profile", str(profile)]) == EXIT_USAGE, command
        err = capsys.readouterr().err
        assert ("profile slurm: slurm.job_mem 32G (sbatch --mem, 32.00 GiB: the worker job's memory cgroup) is "
                "less than slurm.memory 64GB (59.60 GiB), which dask-jobqueue gives the job's 2 worker process(es) "
                "as nanny limits of 29.80 GiB each" in err and "Raise slurm.job_mem to at least 60G" in err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("job_mem,refused", [("16000", True), (16000, True), ("60G", False), ("61440M", False),
                                             ("0", False), ("64GB", False), ("70000M", False)])
def test_job_mem_is_read_as_sbatch_reads_it(job_mem: Any, refused: bool) -> None:
    """sbatch's --mem is mebibytes without a unit, binary with one: 60G is more than 64GB."""
    pytest.importorskip("dask_jobqueue")
    from gpubatch.runtime.slurm import check_job_memory

    settings = {"cores": 2, "processes": 2, "memory": "64GB", "job_mem": job_mem}
    if refused:
        with pytest.raises(SpecError, match="slurm.job_mem"):
            check_job_memory(settings)
    else:
        check_job_memory(settings)


@pytest.fixture()
def scheduler_workers() -> Iterator[str]:
    """A real Dask scheduler on 127.0.0.1 with four workers (threads of this process) reporting
    memory limits of 256 MiB (two of them), 4 GiB and none; its address."""
    from distributed import Client, LocalCluster, Worker

    with LocalCluster(n_workers=2, processes=False, protocol="tcp", host="127.0.0.1", threads_per_worker=1,
                      memory_limit="256MiB", dashboard_address=None, silence_logs=50) as cluster:
        options = cluster.new_worker_spec().popitem()[1]["options"]
        for name, limit in (("big", 4 * GIB), ("unlimited", 0)):
            cluster.worker_spec[name] = {"cls": Worker, "options": {**options, "memory_limit": limit}}
        cluster.sync(cluster._correct_state)
        with Client(cluster.scheduler_address) as client:
            client.wait_for_workers(4, timeout=60)
        yield cluster.scheduler_address


def test_a_scheduler_s_workers_memory_limit_is_the_budget_not_the_client_s_memory(
        spec: Path, tmp_path: Path, scheduler_workers: str, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """With `cluster: scheduler` the budget was the client machine's memory: 1.2 GiB in flight
    passed validate on this machine and met workers whose nannies allow 256 MiB. The smallest
    memory_limit the workers report holds (one without a limit is not counted); validate, run on
    the profile and submit (the job's own profile is inline) all refuse it, saying so."""
    caplog.set_level("INFO", logger="gpubatch")
    profile = _profile(tmp_path, f"cluster: scheduler\naddress: {scheduler_workers}\n")
    said = "over its 256.00 MiB (the smallest memory_limit the scheduler's workers report (3 of 4 report one))"
    for command in (["validate", "--profile", str(profile)], ["run", "--profile", str(profile)],
                    ["submit", "--scheduler", scheduler_workers]):
        capsys.readouterr()
        assert main([command[0], str(spec), *command[1:], "--set", ABOUT_ONE_GIB]) == EXIT_USAGE, command
        err = capsys.readouterr().err
        assert "model.batch_size: 8192 items" in err and said in err, err
    assert "a worker's memory budget: 256.00 MiB, the smallest memory_limit the scheduler's workers" in caplog.text
    assert not (tmp_path / "out").exists()
    assert main(["validate", str(spec), "--profile", str(profile), "--no-open"]) == 0


def test_a_scheduler_whose_workers_report_no_memory_limit_leaves_the_client_s_memory_saying_so(
        tmp_path: Path, slide_path: Path, classifier: Path) -> None:
    from distributed import LocalCluster

    from gpubatch.runtime.worker_memory import worker_memory_budget
    from gpubatch.spec import load_job

    job = load_job(str(write_job(tmp_path / "job.yaml", slide_job([str(slide_path)], classifier, tmp_path / "o"))), [])
    with LocalCluster(n_workers=1, processes=False, protocol="tcp", host="127.0.0.1", memory_limit=0,
                      dashboard_address=None, silence_logs=50) as cluster:
        budget, said = worker_memory_budget(job, {"cluster": "scheduler", "address": cluster.scheduler_address})
    assert budget == memory_limit.usable_memory().total
    assert said == "this machine's memory, the client's, as its workers report no memory_limit"
    budget, said = worker_memory_budget(job, {"cluster": "scheduler", "address": None})
    assert said == "this machine's memory, the client's, as no scheduler address is given"
