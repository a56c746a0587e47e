"""SLURM through dask-jobqueue, made to fail loudly: rejections and missing workers are explained.

dask-jobqueue submits worker jobs with ``sbatch`` in a background task: when sbatch refuses a job
(an unknown partition, a gres the nodes lack, more memory than a node has) the error is only
logged, ``scale`` does not raise, and the run would wait forever. Here the job class keeps sbatch's
own error text, the job script is tried with ``sbatch --test-only`` before anything is submitted,
and :class:`SlurmDiagnosis` tells the submitter why a cluster has no workers: a rejection (fatal at
once), jobs still pending (with squeue's reason), or jobs that ended without their worker ever
connecting (with scontrol's state). A job pending for a reason that waiting never clears (a
walltime over the partition's limit, an unknown account) is fatal at once, naming the setting.
Worker job logs go to a folder gpubatch chooses (under the output, or the profile's
``log_directory``), never the directory the user ran from.
"""

from __future__ import annotations

import getpass
import logging
import os
import subprocess
import tempfile
from typing import Any

from gpubatch.core.errors import GpubatchError, MissingExtraError

log = logging.getLogger("gpubatch")
SLURM_TIMEOUT_S = 20  # every sbatch / squeue / scontrol call is bounded


def _job_class() -> Any:
    try:
        from dask_jobqueue.slurm import SLURMJob
    except ImportError:
        raise MissingExtraError("the slurm profile", "dask-jobqueue", "slurm") from None
    from distributed.core import Status

    class RecordingSLURMJob(SLURMJob):
        """A SLURM worker job that keeps sbatch's error on itself (dask-jobqueue only logs it)."""

        submit_error: BaseException | None = None

        async def start(self) -> None:
            try:
                await super().start()
            except Exception as exc:
                self.submit_error = exc
                self.status = Status.failed  # lets the cluster close cleanly
                raise

    return RecordingSLURMJob


def sbatch_text(exc: BaseException) -> str:
    """sbatch's own words from dask-jobqueue's error message."""
    text = str(exc)
    return (text.split("stderr:", 1)[1] if "stderr:" in text else text).strip()


class SlurmUnreachable(GpubatchError):
    """SLURM's controller did not answer a command (slurmctld down, hung, or unreachable)."""


def _run(args: list[str]) -> subprocess.CompletedProcess:
    """``args`` run with SLURM_TIMEOUT_S; a controller that does not answer raises SlurmUnreachable."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=SLURM_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise SlurmUnreachable(_unreachable(args[0], f"no answer within {SLURM_TIMEOUT_S} s")) from None


#: SLURM clients' words for a controller that did not answer (not a refusal of the job)
CONTROLLER_SILENT = ("Socket timed out", "Unable to contact slurm controller", "Connection refused",
                     "Zero Bytes were transmitted or received")


def _controller_silent(stderr: str) -> bool:
    return any(words in stderr for words in CONTROLLER_SILENT)


def _unreachable(command: str, what: str) -> str:
    return (f"SLURM's controller did not answer `{command}` ({what}): is slurmctld up and reachable "
            "from this node? (`scontrol ping` tells)")


def test_only(cluster: Any) -> None:
    """Submit nothing, but ask sbatch whether it would take the job script; raise its refusal."""
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as f:
        f.write(cluster.job_script())
    try:
        done = _run(["sbatch", "--test-only", f.name])
    except FileNotFoundError:
        raise GpubatchError("the slurm profile needs SLURM's sbatch on PATH (run from a login node)") from None
    finally:
        os.unlink(f.name)
    if done.returncode != 0 and _controller_silent(done.stderr):
        raise SlurmUnreachable(_unreachable("sbatch --test-only", done.stderr.strip()))
    if done.returncode != 0:
        raise GpubatchError(f"sbatch rejected the worker job: {(done.stderr + done.stdout).strip()}")


#: squeue's pending reasons that waiting never clears (sbatch --test-only passes them where the
#: cluster does not enforce partition limits at submission: EnforcePartLimits=NO, SLURM's default),
#: and the profile setting to change
NEVER_STARTS = {
    "PartitionTimeLimit": "slurm.walltime: it is longer than the partition's time limit (scontrol show partition)",
    "QOSMaxWallDurationPerJobLimit": "slurm.walltime: it is longer than the QOS allows (sacctmgr show qos)",
    "PartitionNodeLimit": "the nodes slurm.job_extra_directives asks for: more than the partition allows",
    "InvalidAccount": "slurm.account: SLURM knows no such account (sacctmgr show assoc user=$USER)",
    "InvalidQOS": "the --qos in slurm.job_extra_directives: SLURM knows no such QOS (sacctmgr show qos)",
    "AccountNotAllowed": "slurm.account or slurm.queue: the partition does not take jobs of this account",
    "QOSNotAllowed": "the --qos in slurm.job_extra_directives or slurm.queue: the partition does not allow it",
    "BadConstraints": "the --constraint in slurm.job_extra_directives: no node can satisfy it",
    "DependencyNeverSatisfied": "the --dependency in slurm.job_extra_directives: it can no longer be met",
}


def pending_words(ids: list[str], reasons: list[str]) -> tuple[str, bool]:
    """The account of jobs left pending, and whether waiting can help (not for NEVER_STARTS)."""
    text = f"worker jobs {', '.join(ids)} are still pending in SLURM (reason: {', '.join(reasons)})"
    hopeless = [NEVER_STARTS[r] for r in reasons if r in NEVER_STARTS]
    if hopeless:
        return f"{text}; waiting will not start them: change {hopeless[0]}", True
    return text, False


class SlurmDiagnosis:
    """Why a SLURM cluster has no worker: (text, fatal) or None when nothing is known to be wrong."""

    def __init__(self, cluster: Any):
        self.cluster = cluster

    def __call__(self) -> tuple[str, bool] | None:
        """Not fatal when the controller does not answer: it may come back, and the worker
        watch's run.worker_timeout bounds the wait."""
        try:
            return self._diagnose()
        except SlurmUnreachable as exc:
            return str(exc), False

    def _diagnose(self) -> tuple[str, bool] | None:
        jobs = list(self.cluster.workers.values())
        errors = [sbatch_text(j.submit_error) for j in jobs if getattr(j, "submit_error", None) is not None]
        if errors:
            return f"sbatch rejected the worker job: {errors[0]}", True
        ids = [str(j.job_id) for j in jobs if getattr(j, "job_id", None)]
        if not ids:
            return "no worker job was submitted", False
        states = self._states(ids)
        pending = sorted({reason for state, reason in states.values() if state == "PENDING"})
        if pending:
            return pending_words(ids, pending)
        gone = [i for i in ids if i not in states]
        if gone and len(gone) == len(ids):
            return f"worker job {gone[0]} is no longer running: {self._ended(gone[0])}", False
        return None

    def _states(self, ids: list[str]) -> dict[str, tuple[str, str]]:
        done = _run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i|%T|%r"])
        if done.returncode != 0 and _controller_silent(done.stderr):
            raise SlurmUnreachable(_unreachable("squeue", (done.stderr or "no output").strip()))
        out = {}
        for line in done.stdout.splitlines():
            job, state, reason = (line.split("|", 2) + ["", ""])[:3]
            out[job] = (state, reason)
        return out

    def _ended(self, job_id: str) -> str:
        done = _run(["scontrol", "-o", "show", "job", job_id])
        keep = ("JobState", "Reason", "ExitCode", "StdErr")
        return " ".join(t for t in done.stdout.split() if t.split("=")[0] in keep) or "no record left"


def cancel_left_behind(job_name: str) -> list[str]:
    """Cancel this user's worker jobs named ``job_name``: those of an earlier run into the same
    output whose client was killed (SIGKILL, a lost login node) before it could cancel them.
    Running ones exit on their own once the scheduler is gone (dask-jobqueue's death timeout),
    but pending ones stay queued, and would each start, hold an allocation and find no one.
    Safe because the caller holds the output's lease: no live run owns jobs of that name."""
    user = getpass.getuser()
    try:
        ids = _run(["squeue", "-h", "--user", user, "--name", job_name, "-o", "%i"]).stdout.split()
        if ids:
            _run(["scancel", "--user", user, *ids])
    except (OSError, SlurmUnreachable) as exc:
        log.warning("could not look for worker jobs left behind by an earlier run (%s)", exc)
        return []
    if ids:
        log.warning("cancelled worker job(s) %s left behind by an earlier run into this output", ", ".join(ids))
    return ids


def processes_per_job(settings: dict[str, Any]) -> int:
    """The worker processes each SLURM job starts, as dask-jobqueue decides it: the profile's
    ``processes``, else jobqueue's configuration, else its split of ``cores``; they share the
    job's CPUs (its cpuset), so each process's model gets a share of them."""
    import dask

    processes = settings.get("processes") or dask.config.get("jobqueue.slurm.processes", None)
    if processes:
        return max(1, int(processes))
    cores = settings.get("cores") or dask.config.get("jobqueue.slurm.cores", None)
    if not cores:
        return 1
    try:
        from dask_jobqueue.core import nprocesses_nthreads
    except ImportError:
        return 1
    return max(1, int(nprocesses_nthreads(int(cores))[0]))


def start_slurm_cluster(settings: dict[str, Any], n_workers: int, log_directory: str,
                        job_name: str | None = None) -> tuple[Any, SlurmDiagnosis]:
    """A SLURMCluster keeping ``n_workers`` worker jobs (lost ones are replaced), checked first.
    ``job_name`` (unless the profile names the jobs itself): the name that marks the jobs as the
    output's, so that a later run cancels those a killed client left behind."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise MissingExtraError("the slurm profile", "dask-jobqueue", "slurm") from None
    if job_name and "job_name" not in settings:
        settings = {**settings, "job_name": job_name}
        cancel_left_behind(job_name)
    settings = {"log_directory": log_directory, **settings}
    os.makedirs(settings["log_directory"], exist_ok=True)
    cluster = SLURMCluster(job_cls=_job_class(), **settings)
    try:
        test_only(cluster)
        cluster.adapt(minimum_jobs=n_workers, maximum_jobs=n_workers)
    except BaseException:
        cluster.close()
        raise
    log.info("SLURM: %d worker job(s) asked for; job logs in %s", n_workers, settings["log_directory"])
    return cluster, SlurmDiagnosis(cluster)
