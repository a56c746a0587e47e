"""A real single-node SLURM (.ci/slurm-up.sh): runs through the slurm profile and dask-jobqueue
equal the local profile's; survive cancelled, requeued and timed-out worker jobs and name what
SLURM did; are refused before planning when sbatch would refuse their jobs; fail within
run.worker_timeout, with SLURM's own words, when jobs never start or are all lost, and resume;
wait past it, within run.queue_timeout, while the jobs only wait their turn in a busy queue;
and leave no worker job behind a killed or frozen client. Skipped (with the reason) where SLURM
is not installed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from conftest import (
    audit_lines,
    cli,
    committed_count,
    slide_job,
    synthetic_slides,
    wait_for,
    write_job,
)

import gpubatch
from gpubatch.core.errors import GpubatchError

N_SLIDES = 6


def _slurm_up() -> str | None:
    if shutil.which("sinfo") is None:
        return "SLURM is not installed (run .ci/slurm-up.sh)"
    done = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20, check=False)
    if done.returncode != 0 or not {"idle", "mix", "alloc"} & set(done.stdout.split()):
        return f"SLURM is installed but no node is up (run .ci/slurm-up.sh): {done.stderr.strip()}"
    return None


pytestmark = [pytest.mark.slurm, pytest.mark.skipif(_slurm_up() is not None, reason=str(_slurm_up()))]


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_slides(tmp_path_factory.mktemp("slurm-slides"), N_SLIDES, 600, "q")


def _profile(tmp_path: Path, workers: int = 2, **slurm: Any) -> Path:
    """The slurm profile on loopback: scheduler and workers bind 127.0.0.1 (interface lo)."""
    settings = {"queue": "debug", "cores": 1, "processes": 1, "memory": "1GB", "walltime": "00:10:00",
                "interface": "lo", "scheduler_options": {"dashboard_address": "127.0.0.1:0"},
                "worker_extra_args": ["--dashboard-address", "127.0.0.1:0"], **slurm}
    path = tmp_path / "slurm-test.yaml"
    path.write_text(yaml.safe_dump({"cluster": "slurm", "workers": workers, "slurm": settings}))
    return path


def _job(tmp_path: Path, slides: Path, model: Path, tile: int = 32, **run: Any) -> Path:
    job = slide_job([str(slides / "*.tif")], model, tmp_path / "out",
                    run={"readers": 1, "prefetch_batches": 1, "worker_timeout": 8, **run})
    job["tiles"] = {"size": tile, "level": 0, "tissue": {"method": "none"}}
    job["model"]["batch_size"] = 4
    return write_job(tmp_path / "job.yaml", job)


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["slide", "x", "y"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory, slides: Path, classifier: Path) -> pd.DataFrame:
    tmp = tmp_path_factory.mktemp("local")
    return _sorted(gpubatch.run(_job(tmp, slides, classifier), profile="local").predictions())


def _jobs(*states: str) -> list[str]:
    """The jobs squeue lists: in ``states`` (R, PD, ...), or those it lists by default (not ended)."""
    chosen = ["-t", ",".join(states)] if states else []
    done = subprocess.run(["squeue", "-h", *chosen, "-o", "%i"], capture_output=True, text=True, timeout=20,
                          check=False)
    return done.stdout.split()


def test_predictions_equal_the_local_profile_and_logs_stay_out_of_the_cwd(
        tmp_path: Path, slides: Path, classifier: Path, local: pd.DataFrame, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = gpubatch.run(_job(tmp_path, slides, classifier), profile=str(_profile(tmp_path)))
    assert result.exit_code == 0
    pd.testing.assert_frame_equal(_sorted(result.predictions()), local)
    assert not list(tmp_path.glob("slurm-*.out")) and not list(tmp_path.glob("dask-worker*"))
    logs = list((tmp_path / "out" / "_logs").rglob("dask-worker-*.err"))
    assert logs, "worker job logs go under the output folder"


def test_a_cancelled_and_a_requeued_worker_job_are_survived_and_named(
        tmp_path: Path, slides: Path, classifier: Path) -> None:
    """One worker job cancelled (scancel), the other requeued (as preemption or a node failure
    does) while shards run: every shard is done once, and the log and the report say what SLURM
    did to which job, not only that a worker at some address was lost."""
    # 16 px tiles at batch 1: each slide takes seconds, so shards are still running when the job is cancelled
    job = _job(tmp_path, slides, classifier, tile=16, worker_timeout=120)
    proc = cli("run", str(job), "--profile", str(_profile(tmp_path)), "--set", "model.batch_size=1")
    wait_for(lambda: len(_jobs()) == 2 and committed_count(tmp_path / "out") >= 1, 120, "two workers, a commit")
    cancelled, requeued = _jobs()
    subprocess.run(["scancel", cancelled], check=True, timeout=20)
    subprocess.run(["scontrol", "requeue", requeued], check=True, timeout=20)
    most_running = 0
    while proc.poll() is None:  # never more jobs holding an allocation than the profile's workers
        most_running = max(most_running, len(_jobs("R")))
        time.sleep(0.2)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and most_running <= 2, (most_running, log)
    assert f"SLURM cancelled job {cancelled}" in log and f"SLURM requeued job {requeued}" in log, log
    assert "it is cancelled, and a new worker job takes its place" in log, log  # it said "it will start again"
    ended = subprocess.run(["squeue", "-h", "-t", "all", "-j", requeued, "-o", "%T"], capture_output=True, text=True,
                           timeout=20, check=True).stdout.split()
    assert ended == ["CANCELLED"], "the requeued job never ran again beside its replacement"
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    causes = {w.get("job"): w.get("cause", "") for w in report["lost_workers"]}
    assert f"SLURM cancelled job {cancelled}" in causes[cancelled], causes
    assert f"SLURM requeued job {requeued}" in causes[requeued], causes
    df = _sorted(pd.read_parquet(tmp_path / "out" / "predictions.parquet"))
    assert not df.duplicated(["slide", "x", "y"]).any()
    (tmp_path / "inline").mkdir()
    inline = _job(tmp_path / "inline", slides, classifier, tile=16)
    pd.testing.assert_frame_equal(df, _sorted(gpubatch.run(inline, profile="inline").predictions()))


def _every_tile_once(out: Path) -> None:
    """The output holds every slide, and no tile twice."""
    df = pd.read_parquet(out / "predictions.parquet")
    assert not df.duplicated(["slide", "x", "y"]).any() and df["slide"].nunique() == N_SLIDES


def _resume_finishes(tmp_path: Path, job: Path, *expected: str) -> None:
    """`run --resume` of ``job`` (output tmp_path/out) with a fresh profile under tmp_path/next
    finishes, its log saying each of ``expected``, and the output holds every tile once. Its
    run.worker_timeout is a minute: the first run's may be seconds, shorter than a worker job's
    start on a loaded machine."""
    (tmp_path / "next").mkdir(exist_ok=True)
    again = cli("run", str(job), "--profile", str(_profile(tmp_path / "next")), "--resume",
                "--set", "run.worker_timeout=60")
    log = again.communicate(timeout=300)[0]
    assert again.returncode == 0 and all(text in log for text in expected), log
    _every_tile_once(tmp_path / "out")


def _fails_fast(tmp_path: Path, job: Path, profile: Path, within: float, *expected: str,
                while_waiting: Callable[[], None] | None = None) -> None:
    t0 = time.monotonic()
    proc = cli("run", str(job), "--profile", str(profile))
    try:
        if while_waiting is not None:
            while_waiting()
    finally:
        log = proc.communicate(timeout=within + 60)[0]
    took = time.monotonic() - t0
    assert proc.returncode == 1, log
    assert all(text in log for text in expected), log
    assert "Traceback" not in log and took < within, (took, log)
    assert json.loads((tmp_path / "out" / "status.json").read_text())["state"] == "failed"
    assert not _jobs(), "no worker job is left behind"


@pytest.mark.parametrize("slurm,expected", [
    ({"queue": "nope"}, "invalid partition"),
    ({"job_extra_directives": ["--gres=gpu:99"]}, "sbatch rejected the worker job"),
])
def test_an_sbatch_rejection_is_refused_by_validate_and_by_run_before_it_plans(
        tmp_path: Path, slides: Path, classifier: Path, slurm: dict, expected: str) -> None:
    """A profile whose worker job sbatch refuses: `validate` said the job was valid, and `run`
    stopped only once it had planned and prepared the model (minutes with int8 calibration),
    at exit 1. Both now refuse it first, at exit 2, with sbatch's words, submitting nothing."""
    job, profile = _job(tmp_path, slides, classifier), _profile(tmp_path, **slurm)
    for command in ("validate", "run"):
        proc = cli(command, str(job), "--profile", str(profile))
        log = proc.communicate(timeout=90)[0]
        assert proc.returncode == 2 and expected in log and "profile slurm" in log, (command, log)
        assert "Traceback" not in log and not _jobs(), log
    assert not (tmp_path / "out" / "status.json").exists(), "nothing ran"


@contextlib.contextmanager
def _partition_down(down: bool) -> Iterator[None]:
    """Partition debug DOWN (scontrol: an administrator's doing) while in the block, if ``down``."""
    if down:
        subprocess.run(["scontrol", "update", "PartitionName=debug", "State=DOWN"], check=True, timeout=20)
    try:
        yield
    finally:
        if down:
            subprocess.run(["scontrol", "update", "PartitionName=debug", "State=UP"], check=True, timeout=20)


@pytest.mark.parametrize("directives,reason,action", [
    (["--hold"], "JobHeldUser", "they are held (`scontrol hold`, or --hold in slurm.job_extra_directives): while "
                                "the run waits, `scontrol release "),
    ([], "PartitionDown", "partition debug is down (`scontrol show partition debug`): ask the cluster's administrator"),
])
def test_workers_that_never_arrive_fail_within_the_timeout_saying_what_would_start_them(
        tmp_path: Path, slides: Path, classifier: Path, directives: list[str], reason: str, action: str) -> None:
    """...and the wait is said as it begins, with SLURM's reason: not a silent terminal for
    run.worker_timeout (30 minutes by default). Jobs held, or on a partition that is down (reasons
    only a person clears), count against run.worker_timeout, not run.queue_timeout; `gpubatch
    status` said nothing of them while the run waited, and neither it nor the failure said what
    would start them. Both now name SLURM's reason and what to do (release them, ask the admin)."""
    out = tmp_path / "out"

    def status_names_the_reason_and_the_fix() -> None:
        wait_for(lambda: _waiting(out).get("jobs") == 2, 40, "status.json saying the jobs wait")
        status = cli("status", str(out)).communicate(timeout=60)[0]
        assert f"waiting for SLURM: 2 jobs pending ({reason}) for" in status and action in status, status

    with _partition_down(reason == "PartitionDown"):
        _fails_fast(tmp_path, _job(tmp_path, slides, classifier, worker_timeout=20),
                    _profile(tmp_path, job_extra_directives=directives), 60, "no worker for 20 s (run.worker_timeout)",
                    f"still pending in SLURM (reason: {reason}); {action}",
                    "waiting for workers (up to run.worker_timeout, 20 s)",
                    while_waiting=status_names_the_reason_and_the_fix)


def test_jobs_waiting_on_nodes_that_are_all_down_are_a_persons_to_start(tmp_path: Path) -> None:
    """squeue says "Nodes required for job are DOWN, DRAINED or reserved for jobs in higher
    priority partitions" (or ReqNodeNotAvail) of busy nodes and of dead ones alike: where every
    node of the partition is down or drained (sinfo), the wait is a person's to end, and said so."""
    from gpubatch.runtime.slurm import person_needed

    words = ["Nodes required for job are DOWN, DRAINED or reserved for jobs in higher priority partitions"]
    assert person_needed(["7"], words, "debug") is None, "the node is up: the queue clears this"
    node = subprocess.run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%N"], capture_output=True, text=True,
                          timeout=20, check=True).stdout.split()[0]
    subprocess.run(["scontrol", "update", f"NodeName={node}", "State=DRAIN", "Reason=gpubatch-test"], check=True,
                   timeout=20)
    try:
        said = person_needed(["7"], words, "debug")
    finally:
        subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], check=True, timeout=20)
        _node_serving()
    assert said and "every node of partition debug is down or drained (`sinfo -R -p debug`" in said, said


def _node_serving(timeout: float = 60.0) -> None:
    """Wait until partition debug's node is up and answering (sinfo's state without ``*``).

    Resumed from a drain, the node was shown IDLE but not responding for a moment on a loaded
    machine (slurmctld.log: "Node vm now responding" 0.8 s after the resume), and a job submitted
    then was refused by sbatch at once: "Requested node configuration is not available"."""
    def serving() -> bool:
        state = subprocess.run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%t"], capture_output=True, text=True,
                               timeout=20, check=False).stdout.split()
        return bool(state) and state[0] in ("idle", "mix", "alloc")

    wait_for(serving, timeout, "partition debug's node up and responding")


def _our_jobs(name: str) -> list[str]:
    done = subprocess.run(["squeue", "-h", "--name", name, "-o", "%i"], capture_output=True, text=True, timeout=20,
                          check=False)
    return done.stdout.split()


def _waiting(out: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((out / "status.json").read_text()).get("waiting") or {})
    except (OSError, ValueError):  # not yet written, or being replaced
        return {}


def test_jobs_pending_in_a_busy_queue_are_waited_for_past_the_worker_timeout_then_the_run_finishes(
        tmp_path: Path, slides: Path, classifier: Path, local: pd.DataFrame) -> None:
    """A run submitted to a busy queue (its jobs PENDING for a reason the queue clears by itself:
    BeginTime here, as Priority or Resources on a real cluster) failed after run.worker_timeout,
    overnight, while its jobs waited their turn. It now waits on, bounded by run.queue_timeout,
    saying so in the log and in status.json / `gpubatch status`; once SLURM starts the jobs
    (their begin time moved to now), the run finishes."""
    name = f"gpubatch-queue-{os.getpid()}"
    _node_serving()  # a node not answering for a moment makes sbatch refuse the jobs outright
    profile = _profile(tmp_path, job_name=name, job_extra_directives=["--begin=now+1hour"])
    job = _job(tmp_path, slides, classifier, queue_timeout=600)  # run.worker_timeout 8 s
    proc = cli("run", str(job), "--profile", str(profile))
    try:
        try:
            wait_for(lambda: _waiting(tmp_path / "out").get("jobs") == 2, 90, "status.json saying the jobs wait")
        except TimeoutError as exc:  # what the run and SLURM said, for a failure seen only in CI
            proc.kill()
            queue = subprocess.run(["squeue", "-h", "-o", "%i %j %T %r"], capture_output=True, text=True,
                                   timeout=20, check=False).stdout
            raise TimeoutError(f"{exc}; status {_waiting(tmp_path / 'out')}; squeue:\n{queue}\nlog:\n"
                               f"{proc.communicate()[0][-4000:]}") from None
        since = _waiting(tmp_path / "out")["since"]
        wait_for(lambda: time.time() - since > 2.5 * 8, 60, "two and a half worker timeouts spent waiting")
        assert proc.poll() is None, proc.communicate()[0]
        status = cli("status", str(tmp_path / "out")).communicate(timeout=60)[0]
        assert "waiting for SLURM: 2 jobs pending (BeginTime) for" in status, status
        for job_id in _our_jobs(name):
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, timeout=20)
        log = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
        subprocess.run(["scancel", "--name", name], check=False, timeout=20)
    assert proc.returncode == 0, log
    assert "waiting for SLURM: 2 jobs pending (BeginTime) for" in log, log
    assert "run.worker_timeout does not count this wait" in log and "reason: BeginTime" in log, log
    assert "waiting" not in json.loads((tmp_path / "out" / "status.json").read_text())
    pd.testing.assert_frame_equal(_sorted(pd.read_parquet(tmp_path / "out" / "predictions.parquet")), local)


def test_jobs_pending_past_the_queue_timeout_fail_naming_both_settings_and_resume_finishes(
        tmp_path: Path, slides: Path, classifier: Path) -> None:
    """The queue's wait is bounded too: past run.queue_timeout the run fails (exit 1) with
    SLURM's reason and the settings to change, and --resume finishes it once jobs can start."""
    job = _job(tmp_path, slides, classifier, worker_timeout=3, queue_timeout=15)
    profile = _profile(tmp_path, job_extra_directives=["--begin=now+1hour"])
    t0 = time.monotonic()
    _fails_fast(tmp_path, job, profile, 60, "no worker for 15 s (run.queue_timeout)",
                "still pending in SLURM (reason: BeginTime)", "raise run.queue_timeout",
                "finish the run with --resume", "waiting for SLURM: 2 jobs pending (BeginTime)")
    assert time.monotonic() - t0 > 15, "the wait outlived run.worker_timeout, bounded by run.queue_timeout"
    _resume_finishes(tmp_path, job)


def test_a_shard_longer_than_the_walltime_is_quarantined_naming_the_time_limit(
        tmp_path: Path, classifier: Path) -> None:
    """A shard that outlasts a worker job's walltime: SLURM ends the job, and the shard ran
    again on the next job, and the next (13 jobs with Dask's and gpubatch's defaults), then was
    quarantined as a KilledWorker naming no time limit. The run says each job's time ran out,
    quarantines the shard once more workers than Dask's allowed-failures (0 here) were lost
    running it, with the time limit named, and does the other inputs."""
    (tmp_path / "slides").mkdir()
    folder = synthetic_slides(tmp_path / "slides", 1, 900, "short")
    synthetic_slides(folder, 1, 901, "long", size=(4096, 4096))  # 1M 4 px tiles at batch 1: minutes
    job = _job(tmp_path, folder, classifier, tile=4, worker_timeout=300)
    proc = cli("run", str(job), "--profile", str(_profile(tmp_path, workers=1, walltime="00:01:00")),
               "--set", "model.batch_size=1", env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"})
    log = proc.communicate(timeout=400)[0]
    assert proc.returncode == 3, log
    assert "time limit 00:01:00 each (slurm.walltime)" in log, log  # said when the jobs are asked for
    assert "at its time limit (00:01:00: the profile's slurm.walltime)" in log, log
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    (failed,) = report["failed"]
    assert failed["input"].endswith("long0.tif") and "time limit" in failed["error"], failed
    assert "slurm.walltime" in failed["error"] and "lost 1 time (" in failed["error"], failed


def test_every_worker_lost_fails_within_the_timeout(tmp_path: Path, slides: Path, classifier: Path) -> None:
    """...saying how to finish it, and --resume does."""
    job = _job(tmp_path, slides, classifier)
    proc = cli("run", str(job), "--profile", str(_profile(tmp_path)), "--set", "model.batch_size=1")
    wait_for(lambda: committed_count(tmp_path / "out") >= 1, 120, "a commit")
    subprocess.run(["scontrol", "update", "PartitionName=debug", "State=DOWN"], check=True, timeout=20)
    try:
        subprocess.run(["scancel", *_jobs()], check=True, timeout=20)
        log = proc.communicate(timeout=120)[0]
    finally:
        subprocess.run(["scontrol", "update", "PartitionName=debug", "State=UP"], check=True, timeout=20)
    assert proc.returncode == 1 and "run.worker_timeout" in log, log
    # SLURM's own account: of the cancelled jobs, or of the ones asked for again, pending on the
    # down partition (whether dask-jobqueue asks again within run.worker_timeout is its timing)
    assert any(said in log for said in ("JobState=CANCELLED", "PartitionDown", "SLURM cancelled job")), log
    assert "finish the run with --resume" in log, log
    assert json.loads((tmp_path / "out" / "status.json").read_text())["state"] == "failed"
    subprocess.run(["scancel", *_jobs()], check=False, timeout=20)
    _resume_finishes(tmp_path, job, "already committed, skipped")


def test_a_walltime_over_the_partitions_limit_fails_at_once_naming_the_setting(
        tmp_path: Path, slides: Path, classifier: Path) -> None:
    """sbatch --test-only accepts a walltime longer than the partition's MaxTime (EnforcePartLimits
    NO, SLURM's default), and the job then stays PENDING (PartitionTimeLimit) for good: the run
    stops at once, with squeue's reason and the profile setting to change, not after
    run.worker_timeout (30 minutes by default)."""
    job = _job(tmp_path, slides, classifier, worker_timeout=600)
    subprocess.run(["scontrol", "update", "PartitionName=debug", "MaxTime=00:05:00"], check=True, timeout=20)
    try:
        _fails_fast(tmp_path, job, _profile(tmp_path), 60, "PartitionTimeLimit", "slurm.walltime")
    finally:
        subprocess.run(["scontrol", "update", "PartitionName=debug", "MaxTime=UNLIMITED"], check=True, timeout=20)


def test_worker_jobs_a_killed_client_left_queued_are_cancelled_by_the_next_run(
        tmp_path: Path, slides: Path, classifier: Path) -> None:
    """A client killed (SIGKILL) while its worker jobs wait in the queue cannot cancel them: they
    would each start later, hold an allocation and find no scheduler. The next run into the same
    output cancels them before it submits its own, and finishes."""
    job = _job(tmp_path, slides, classifier, worker_timeout=600)
    proc = cli("run", str(job), "--profile", str(_profile(tmp_path, job_extra_directives=["--begin=now+1hour"])))
    try:
        wait_for(lambda: len(_jobs()) == 2, 60, "two queued worker jobs")
    finally:
        proc.kill()
        proc.communicate()
    left = _jobs()
    _resume_finishes(tmp_path, job, "left behind by an earlier run")
    assert not set(left) & set(_jobs()), "the killed run's queued jobs are gone"


def test_running_worker_jobs_of_a_killed_client_end_by_themselves_and_resume_finishes(
        tmp_path: Path, slides: Path, classifier: Path) -> None:
    """The client killed (SIGKILL) while its worker jobs run shards: no one is left to cancel
    them, and each must end by itself (its scheduler's sockets die with the client) rather than
    hold its allocation overnight; --resume then finishes the run. A guard of what the README
    promises (within a minute), found to hold on a real SLURM."""
    job = _job(tmp_path, slides, classifier, tile=8, worker_timeout=300)
    proc = cli("run", str(job), "--profile", str(_profile(tmp_path)), "--set", "model.batch_size=1")
    try:
        wait_for(lambda: len(_jobs()) == 2 and committed_count(tmp_path / "out") >= 1, 120, "two workers, a commit")
    finally:
        proc.kill()
        proc.communicate()
    left = set(_jobs())
    wait_for(lambda: not left & set(_jobs()), 75, "the killed client's running worker jobs ending")
    _resume_finishes(tmp_path, job, "already committed, skipped")


def test_worker_jobs_of_a_frozen_client_end_within_the_lease_then_a_thawed_run_finishes(
        tmp_path: Path, slides: Path, classifier: Path) -> None:
    """A client stopped (Ctrl-Z, SIGSTOP) while its worker jobs run: its kernel still answers
    TCP, so Dask's workers never see the scheduler go and the jobs held their allocations until
    their walltime. Each worker now leaves once the scheduler has answered nothing for
    run.lease_stale_s, and its job ends; the run, thawed, gets new worker jobs and finishes."""
    job = _job(tmp_path, slides, classifier, tile=8, worker_timeout=300, heartbeat_s=5, lease_stale_s=15)
    proc = cli("run", str(job), "--profile", str(_profile(tmp_path)), "--set", "model.batch_size=1")
    try:
        wait_for(lambda: len(_jobs()) == 2 and committed_count(tmp_path / "out") >= 1, 120, "two workers, a commit")
        frozen = _jobs()
        proc.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: not set(frozen) & set(_jobs()), 90, "the frozen client's worker jobs ending")
        finally:
            proc.send_signal(signal.SIGCONT)
        log = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, log
    said = "".join(p.read_text() for p in (tmp_path / "out" / "_logs").rglob("*.err"))
    assert "the scheduler (in the `gpubatch run` process) has answered nothing" in said
    _every_tile_once(tmp_path / "out")


def test_a_terminal_that_closes_under_a_run_cancels_its_worker_jobs_and_records_why(
        tmp_path: Path, slides: Path, classifier: Path) -> None:
    """The SSH session to the login node drops under `gpubatch run --profile slurm` in the
    foreground: the client died of SIGHUP, its worker jobs left to find that out by themselves,
    status.json saying "running". Now its worker jobs are cancelled as it stops and the stop's
    cause is recorded."""
    from terminal import Terminal

    job, out = _job(tmp_path, slides, classifier, tile=8, worker_timeout=300), tmp_path / "out"
    term = Terminal("run", str(job), "--profile", str(_profile(tmp_path)), "--set", "model.batch_size=1")
    try:
        # at the first commit: waiting for both jobs to run as well let a loaded CI machine's first
        # worker finish every shard meanwhile, and the hang-up met a run at its end
        wait_for(lambda: committed_count(out) >= 1 and len(_jobs()) == 2, 120, "a commit")
        workers = set(_jobs())
        term.hang_up()
        assert term.proc.wait(timeout=60) == 1
    finally:
        term.kill()
    wait_for(lambda: not workers & set(_jobs()), 15, "the worker jobs gone from squeue")
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "interrupted" and "terminal closed (SIGHUP)" in status["reason"], status
    _resume_finishes(tmp_path, job, "already committed, skipped")


def test_a_client_in_a_slurm_job_at_its_time_limit_stops_within_killwait_naming_the_limit(
        tmp_path: Path, slides: Path, classifier: Path) -> None:
    """`sbatch --time=1 --wrap "gpubatch run ..."`: at the time limit SLURM sends the client
    SIGTERM, then SIGKILL KillWait later (5 s here). The stop cancels the worker jobs and says
    the time limit, not a bare SIGTERM, within that."""
    import sys

    (tmp_path / "many").mkdir()
    many = synthetic_slides(tmp_path / "many", 2 * N_SLIDES, 900, "t", (2048, 1536))  # minutes, past the limit
    job, out = _job(tmp_path, many, classifier, tile=8, worker_timeout=300), tmp_path / "out"
    command = (f"exec {sys.executable} -m gpubatch run {job} --profile {_profile(tmp_path)} "
               "--set model.batch_size=1")
    done = subprocess.run(["sbatch", "--parsable", "--time=1", "--cpus-per-task=1", "--mem=2G",
                           f"--output={tmp_path / 'client.log'}", "--wrap", command],
                          capture_output=True, text=True, timeout=20, check=True, env=_without_slurm_job())
    client = done.stdout.strip().split(";")[0]
    wait_for(lambda: committed_count(out) >= 1, 120, "a commit")
    workers = set(_jobs()) - {client}
    wait_for(lambda: client not in _jobs(), 150, "the client's job ending at its time limit")
    wait_for(lambda: not workers & set(_jobs()), 15, "the worker jobs gone from squeue")
    log = (tmp_path / "client.log").read_text()
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "interrupted", (status, log)
    assert f"the SLURM job {client} this client runs in reached its time limit" in status["reason"], (status, log)
    assert "--resume" in log and "Traceback" not in log, log
    assert [e["event"] for e in audit_lines(out, None) if e["event"].startswith("run_")] == \
        ["run_start", "run_interrupted"]


def _without_slurm_job() -> dict[str, str]:
    """This environment less SLURM's job variables (a test suite run inside a job of its own)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_JOB")}


@contextlib.contextmanager
def _controller_silent() -> Iterator[None]:
    """slurmctld stopped (SIGSTOP): a hung controller, answering nothing until it is continued."""
    pids = [int(p) for p in subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True, text=True).stdout.split()]
    if not pids:
        pytest.skip("no slurmctld process on this machine to stop")
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def test_a_controller_that_does_not_answer_is_named_not_taken_for_a_rejection(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hung slurmctld: starting a cluster ends in a GpubatchError naming the controller and the
    check to make (no TimeoutExpired traceback), and the worker watch's diagnosis says the same
    (not "the worker job is no longer running", which a failed squeue read as before)."""
    from types import SimpleNamespace

    from gpubatch.runtime import slurm

    monkeypatch.setattr(slurm, "SLURM_TIMEOUT_S", 3)
    settings = yaml.safe_load(_profile(tmp_path).read_text())["slurm"]
    with _controller_silent():
        started = time.monotonic()
        with pytest.raises(GpubatchError, match="slurmctld") as refused:
            slurm.start_slurm_cluster(settings, 1, str(tmp_path / "logs"), "gpubatch-silent")
        assert "rejected" not in str(refused.value) and time.monotonic() - started < 30
        diagnosis = slurm.SlurmDiagnosis(SimpleNamespace(workers={"w": SimpleNamespace(job_id="4242")}))()
    assert diagnosis is not None and "slurmctld" in diagnosis[0] and diagnosis[1] is False, diagnosis
