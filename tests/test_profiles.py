"""Every shipped profile is valid: known keys, and the cluster object it describes can be built
(a SLURM job script rendered, its durations parsed) without submitting anything."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from gpubatch.runtime.cluster import CONFIG_DIRS, load_profile

PROFILES = sorted(p for d in CONFIG_DIRS if d.is_dir() for p in d.glob("*.yaml"))


def test_profiles_are_shipped() -> None:
    assert {p.stem for p in PROFILES} >= {"local", "local-cuda", "scheduler", "slurm", "inline"}


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_profile_loads(path: Path) -> None:
    profile = load_profile(str(path))
    assert profile["cluster"] in ("local", "local-cuda", "scheduler", "slurm", "inline")


def _worker_durations(args: list[str]) -> dict[str, float]:
    from dask.utils import parse_timedelta

    out = {}
    for flag in ("--lifetime", "--lifetime-stagger"):
        if flag in args:
            out[flag] = parse_timedelta(args[args.index(flag) + 1])
    return out


@pytest.mark.parametrize("path", [p for p in PROFILES if yaml.safe_load(p.read_text()).get("cluster") == "slurm"],
                         ids=lambda p: p.stem)
def test_slurm_profile_renders_a_job_script_and_valid_durations(path: Path) -> None:
    if importlib.util.find_spec("dask_jobqueue") is None:
        pytest.skip("dask-jobqueue is not installed (pip install 'gpubatch[slurm]')")
    from dask_jobqueue.slurm import SLURMJob

    settings = load_profile(str(path))["slurm"]
    script = SLURMJob(scheduler="tcp://127.0.0.1:8786", name="check", **settings).job_script()
    assert "#SBATCH" in script and "dask_worker" in script.replace("-", "_")
    durations = _worker_durations(list(settings.get("worker_extra_args", [])))
    hours, minutes, seconds = (int(v) for v in settings["walltime"].split(":"))  # SLURM's HH:MM:SS
    walltime = hours * 3600 + minutes * 60 + seconds
    if durations:  # workers leave before SLURM kills the job at its walltime
        assert durations["--lifetime"] + durations.get("--lifetime-stagger", 0) < walltime


def test_an_unparseable_lifetime_is_caught_by_the_check() -> None:
    with pytest.raises((ValueError, KeyError)):
        _worker_durations(["--lifetime", "7h50m"])


@pytest.mark.parametrize("setting", ["workers: 0", "workers: -3", "workers: 1.5", "workers: lots",
                                     "threads_per_worker: 0", "threads_per_worker: many"])
def test_a_profile_with_an_impossible_worker_count_is_refused_before_anything_runs(
        tmp_path: Path, setting: str, slides_dir: Path, classifier: Path) -> None:
    """`workers: 0` or `-3` ran one worker, `1.5` one, and `lots` failed with a traceback after
    planning: each is a usage error (exit 2, nothing run) naming the profile's key."""
    import subprocess
    import sys

    from conftest import slide_job, write_job

    key = setting.split(":")[0]
    profile = tmp_path / "bad.yaml"
    profile.write_text(f"cluster: local\n{setting}\n")
    spec = write_job(tmp_path / "job.yaml", slide_job([str(slides_dir / "*.tif")], classifier, tmp_path / "out"))
    done = subprocess.run([sys.executable, "-m", "gpubatch", "run", str(spec), "--profile", str(profile)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert key in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "out" / "report.json").exists()


@pytest.mark.parametrize("settings", [{"cores": 8, "memory": "4GB"}, {"cores": 8, "processes": 2, "memory": "4GB"},
                                      {"cores": 1, "memory": "1GB"}, {"cores": 36, "memory": "64GB"}],
                         ids=["cores-8", "processes-2", "cores-1", "cores-36"])
def test_slurm_processes_per_job_are_jobqueues_own(settings: dict[str, object]) -> None:
    """The model's threads on a SLURM worker are its job's CPUs over the job's worker processes:
    that count must be the one dask-jobqueue puts on the worker's command line (--nworkers)."""
    if importlib.util.find_spec("dask_jobqueue") is None:
        pytest.skip("dask-jobqueue (the slurm extra) is not installed")
    from dask_jobqueue import SLURMCluster

    from gpubatch.runtime.slurm import processes_per_job

    with SLURMCluster(**settings, scheduler_options={"host": "127.0.0.1"}) as cluster:
        expected = cluster._dummy_job.worker_processes
    assert processes_per_job(settings) == expected
