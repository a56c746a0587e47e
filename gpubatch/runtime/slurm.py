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
import re
import subprocess
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from gpubatch.core.errors import GpubatchError, MissingExtraError, SpecError
from gpubatch.runtime.waiting import NoWorkers, Queued

log = logging.getLogger("gpubatch")
SLURM_TIMEOUT_S = 20  # every sbatch / squeue / scontrol call is bounded
ASK_EVERY_S = 10.0  # seconds between squeue calls while the run waits for workers


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


class SbatchRejected(GpubatchError):
    """sbatch refused the worker job script (an unknown partition, a gres or memory no node has)."""


def test_only(cluster: Any) -> None:
    """Submit nothing, but ask sbatch whether it would take the cluster's job script."""
    test_script(cluster.job_script())


def test_script(script: str) -> None:
    """Ask ``sbatch --test-only`` whether it would take ``script``; raise its refusal
    (SbatchRejected), or SlurmUnreachable when the controller did not answer."""
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as f:
        f.write(script)
    try:
        done = _run(["sbatch", "--test-only", f.name])
    except FileNotFoundError:
        raise GpubatchError("the slurm profile needs SLURM's sbatch on PATH (run from a login node)") from None
    finally:
        os.unlink(f.name)
    if done.returncode != 0 and _controller_silent(done.stderr):
        raise SlurmUnreachable(_unreachable("sbatch --test-only", done.stderr.strip()))
    if done.returncode != 0:
        words = "; ".join(line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip())
        raise SbatchRejected(f"sbatch rejected the worker job: {words}")


#: sbatch's --mem: a whole number and a unit (K, M, G, T: binary; M when none), as SLURM reads it
_SBATCH_MEM = re.compile(r"^\s*(\d+)\s*([KMGT]?)B?\s*$", re.IGNORECASE)


def sbatch_mem_bytes(value: Any) -> int | None:
    """The bytes sbatch's ``--mem=value`` asks for; None where it is not a figure this reads
    (sbatch --test-only judges it) or is 0 (SLURM: all of a node's memory)."""
    found = _SBATCH_MEM.match(str(value))
    if not found or int(found[1]) == 0:
        return None
    return int(found[1]) * 1024 ** (" KMGT".index((found[2] or "M").upper()))


def check_job_memory(settings: dict[str, Any]) -> None:
    """Refuse ``slurm.job_mem`` below ``slurm.memory``. dask-jobqueue (0.9) starts each job's
    workers with ``--memory-limit`` of ``memory`` over ``processes`` (what each nanny lets its
    worker hold before it spills, pauses or restarts it), but asks sbatch for ``--mem=job_mem``
    as written (``memory`` only where job_mem is unset): the job's memory cgroup was smaller
    than what its workers believed they may hold, and the kernel's OOM killer ended the whole
    job before any nanny acted. A SpecError (exit 2) naming both keys, their values, the fix."""
    import dask
    from dask.utils import format_bytes, parse_bytes
    from dask_jobqueue.slurm import slurm_format_bytes_ceil

    memory = settings.get("memory") or dask.config.get("jobqueue.slurm.memory", None)
    job_mem = settings.get("job_mem") or dask.config.get("jobqueue.slurm.job-mem", None)
    asked = sbatch_mem_bytes(job_mem) if job_mem is not None else None
    try:
        held = int(parse_bytes(memory)) if memory is not None else 0
    except (TypeError, ValueError):
        return  # dask-jobqueue's own error says it
    if asked is None or not held or asked >= held:
        return
    processes = processes_per_job(settings)
    raise SpecError([("profile slurm", (
        f"slurm.job_mem {job_mem} (sbatch --mem, {format_bytes(asked)}: the worker job's memory cgroup) is less than "
        f"slurm.memory {memory} ({format_bytes(held)}), which dask-jobqueue gives the job's {processes} worker "
        f"process(es) as nanny limits of {format_bytes(held // processes)} each: the kernel would kill the "
        f"job before any nanny acts. Raise slurm.job_mem to at least {slurm_format_bytes_ceil(held)}, remove it "
        f"(sbatch is then asked for slurm.memory), or lower slurm.memory to at most {format_bytes(asked)}"))])


def check_profile(settings: dict[str, Any]) -> None:
    """The worker job a profile's ``slurm`` settings make, tried with ``sbatch --test-only``
    before anything runs: ``validate`` refuses what ``run`` would, and ``run`` refuses it before
    planning and preparing the model (minutes, with int8 calibration), not after. A refusal is
    a SpecError (exit 2) naming the profile."""
    import inspect

    job_cls = _job_class()
    check_job_memory(settings)
    accepted = {p for c in job_cls.__mro__ if "__init__" in vars(c)
                for p in inspect.signature(vars(c)["__init__"]).parameters}
    job = job_cls(scheduler="tcp://127.0.0.1:8786", name="gpubatch-check",
                  **{k: v for k, v in settings.items() if k in accepted})
    try:
        test_script(job.job_script())
    except SbatchRejected as exc:
        raise SpecError([("profile slurm", str(exc))]) from None


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


#: squeue's pending reasons the queue clears by itself (the job waits its turn on a busy cluster,
#: for a group's share to free up, for a maintenance reservation to end): while every worker job
#: waits for one of these, run.queue_timeout bounds the wait instead of run.worker_timeout. Also
#: every QOS or association limit on a group, a user or an account (QOSGrpCpuLimit,
#: AssocMaxJobsLimit), but not the per-job ones: a job over those never fits (_clears_by_itself).
#: Any other reason (PartitionDown, a held job) counts against run.worker_timeout, as before.
CLEARS_BY_ITSELF = {"None", "Priority", "Resources", "BeginTime", "Dependency", "ReqNodeNotAvail", "Reservation",
                    "Licenses", "JobArrayTaskLimit"}
_GROUP_LIMIT = re.compile(r"^(QOS|Assoc)\w*Limit$")


#: squeue's pending reasons that only a person clears, and what starts the jobs (said while the run
#: waits and when run.worker_timeout ends the wait, which counts against it)
NEEDS_A_PERSON = {
    "JobHeldUser": "they are held (`scontrol hold`, or --hold in slurm.job_extra_directives): while the run waits, "
                   "`scontrol release {ids}` starts them",
    "JobHeldAdmin": "an administrator holds them: ask the cluster's administrator why, and to release them "
                    "(`scontrol release {ids}`) while the run waits",
    "PartitionDown": "partition {partition} is down (`scontrol show partition {partition}`): ask the cluster's "
                     "administrator when it will be up, or set another partition in slurm.queue",
    "PartitionInactive": "partition {partition} is inactive (`scontrol show partition {partition}`): ask the "
                         "cluster's administrator when it will be up, or set another partition in slurm.queue",
}
#: pending reasons naming nodes that are not available: a person's to clear where every node of the
#: partition is down, drained or failing (not merely busy or reserved), in these words
NODES_UNAVAILABLE = ("ReqNodeNotAvail", "Nodes required for job are DOWN")
NODES_DOWN = ("every node of partition {partition} is down or drained (`sinfo -R -p {partition}` says why): ask "
              "the cluster's administrator when they will be back, or set another partition in slurm.queue")
#: sinfo's compact node states in which a node runs jobs now or will without anyone's help
_NODE_USABLE = {"idle", "mix", "alloc", "comp", "resv", "plnd", "maint"}


def partition_nodes_down(partition: str) -> bool:
    """Whether every node of ``partition`` is down, drained or failing, as sinfo says (False when
    it does not answer: then nothing is claimed)."""
    done = _run(["sinfo", "-h", "-N", "-p", partition, "-o", "%t"])
    states = done.stdout.split() if done.returncode == 0 else []
    return bool(states) and not any(s.rstrip("~#!%$@^-") in _NODE_USABLE for s in states)


def person_needed(ids: list[str], reasons: list[str], partition: str) -> str | None:
    """What starts jobs ``ids`` pending for ``reasons`` where only a person can (held, partition
    or nodes down: NEEDS_A_PERSON, NODES_DOWN), in words; None where the queue clears them."""
    for reason in reasons:
        name = reason_name(reason)
        if name in NEEDS_A_PERSON:
            return NEEDS_A_PERSON[name].format(ids=",".join(ids), partition=partition)
        if name.startswith(NODES_UNAVAILABLE) and partition and partition_nodes_down(partition):
            return NODES_DOWN.format(partition=partition)
    return None


def reason_name(reason: str) -> str:
    """squeue's reason without its details: "ReqNodeNotAvail, UnavailableNodes:n1" is ReqNodeNotAvail."""
    return reason.split(",", 1)[0].strip() if reason.startswith("ReqNodeNotAvail") else reason.strip()


def _clears_by_itself(reason: str) -> bool:
    name = reason_name(reason)
    if name in NEVER_STARTS:
        return False
    return name in CLEARS_BY_ITSELF or (bool(_GROUP_LIMIT.match(name)) and "PerJob" not in name)


def pending_words(ids: list[str], reasons: list[str], action: str | None = None) -> tuple[str, bool]:
    """The account of jobs left pending, and whether waiting can help (not for NEVER_STARTS);
    ``action``: what a person must do to start them (person_needed)."""
    text = f"worker jobs {', '.join(ids)} are still pending in SLURM (reason: {', '.join(reasons)})"
    hopeless = [NEVER_STARTS[r] for r in reasons if r in NEVER_STARTS]
    if hopeless:
        return f"{text}; waiting will not start them: change {hopeless[0]}", True
    return (f"{text}; {action}" if action else text), False


def queued_of(ids: list[str], states: Mapping[str, tuple[str, ...]], action: str | None = None) -> Queued | None:
    """Every job of ``ids`` pending, for reasons the queue clears by itself or, with ``action``
    (person_needed), for one only a person clears: the jobs and those reasons; else None (one is
    running, gone, or pending for a reason neither known to clear nor said how to clear)."""
    found = [states.get(i) for i in ids]
    if not ids or any(s is None or s[0] != "PENDING" for s in found):
        return None
    reasons = tuple(sorted({reason_name(s[1]) for s in found if s is not None}))
    if action:
        return Queued(len(ids), reasons, clears=False, action=action)
    if not all(s is not None and _clears_by_itself(s[1]) for s in found):
        return None
    return Queued(len(ids), reasons)


class SlurmDiagnosis:
    """Why a SLURM cluster has no worker (runtime.waiting.NoWorkers), or None when nothing is
    known to be wrong."""

    def __init__(self, cluster: Any):
        self.cluster = cluster
        #: (the jobs asked about, when, what squeue told)
        self._asked: tuple[list[str], float, NoWorkers | None] | None = None

    def __call__(self) -> NoWorkers | None:
        """An sbatch rejection at once; SLURM's account of the same jobs at most every
        ASK_EVERY_S (the worker watch asks every second, and a controller is not to be polled
        that often for as long as run.worker_timeout). Not fatal when the controller does not answer: it may come back,
        and the worker watch's run.worker_timeout bounds the wait."""
        jobs = list(self.cluster.workers.values())
        errors = [sbatch_text(j.submit_error) for j in jobs if getattr(j, "submit_error", None) is not None]
        if errors:
            return NoWorkers(f"sbatch rejected the worker job: {errors[0]}", True)
        ids = [str(j.job_id) for j in jobs if getattr(j, "job_id", None)]
        if not ids:
            return NoWorkers("no worker job was submitted")
        now = time.monotonic()
        if self._asked is not None and self._asked[0] == ids and now - self._asked[1] < ASK_EVERY_S:
            return self._asked[2]
        try:
            found = self._diagnose(ids)
        except SlurmUnreachable as exc:
            found = NoWorkers(str(exc))
        self._asked = (ids, now, found)
        return found

    def _diagnose(self, ids: list[str]) -> NoWorkers | None:
        states = self._states(ids)
        pending = sorted({reason for state, reason, _ in states.values() if state == "PENDING"})
        if pending:
            waiting = [i for i in ids if states.get(i, ("",))[0] == "PENDING"]
            partition = next((s[2] for s in states.values() if s[0] == "PENDING"), "")
            action = person_needed(waiting, pending, partition)
            text, fatal = pending_words(ids, pending, action)
            return NoWorkers(text, fatal, None if fatal else queued_of(ids, states, action))
        gone = [i for i in ids if i not in states]
        if gone and len(gone) == len(ids):
            return NoWorkers(f"worker job {gone[0]} is no longer running: {self._ended(gone[0])}")
        return None

    def _states(self, ids: list[str]) -> dict[str, tuple[str, str, str]]:
        """squeue's state, pending reason and partition of each of ``ids`` it still lists."""
        done = _run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i|%T|%P|%r"])
        if done.returncode != 0 and _controller_silent(done.stderr):
            raise SlurmUnreachable(_unreachable("squeue", (done.stderr or "no output").strip()))
        out = {}
        for line in done.stdout.splitlines():
            job, state, partition, reason = (line.split("|", 3) + ["", "", ""])[:4]
            out[job] = (state, reason, partition)
        return out

    def _ended(self, job_id: str) -> str:
        record = job_record(job_id)
        keep = ("JobState", "Reason", "ExitCode", "StdErr")
        raw = " ".join(f"{k}={record[k]}" for k in keep if k in record) or "no record left"
        words = ended_words(job_id, record)
        return f"{words} ({raw})" if words else raw

    def job_of(self, worker_name: str) -> str | None:
        """The SLURM job a worker (by its Dask name) runs in: dask-jobqueue names each worker
        after its job's entry in the cluster (``NAME``, or ``NAME-i`` for a job's i-th process)."""
        for name, job in list(self.cluster.workers.items()):
            if worker_name == str(name) or worker_name.startswith(f"{name}-"):
                return str(job.job_id) if getattr(job, "job_id", None) else None
        return None

    def why_ended(self, job_ids: list[str]) -> dict[str, str]:
        """SLURM's account of why each of ``job_ids`` ended, in words, in one squeue call (a
        preemption may take a hundred jobs at once); those SLURM has no end for yet (still
        running: their worker left for another reason, or SLURM is finishing them) are left out.
        Each of these jobs ran (its worker was connected): found pending, it was requeued."""
        try:
            records = job_states(job_ids)
        except SlurmUnreachable:
            return {}
        found = {}
        for job_id in job_ids:
            record = records.get(job_id, {})
            if record.get("JobState") in ("PENDING", "REQUEUE_HOLD", "REQUEUE_FED"):
                record = {**record, "Restarts": "1"}
            words = ended_words(job_id, {**record, "StdErr": self._log_of(job_id)} if record else {})
            if words:
                found[job_id] = words
        return found

    def _log_of(self, job_id: str) -> str:
        """Where job ``job_id`` writes its stderr: the job script's ``-e`` path."""
        header = str(getattr(self.cluster, "job_header", ""))
        path = re.search(r"^#SBATCH -e (\S+)", header, re.M)
        return path.group(1).replace("%J", job_id).replace("%j", job_id) if path else "its job's stderr"


def job_states(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """squeue's JobState, Reason, TimeLimit and NodeList of those of ``job_ids`` SLURM still
    knows (ended ones for MinJobAge), in one call."""
    done = _run(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%T|%r|%l|%N"])
    if done.returncode != 0 and _controller_silent(done.stderr):
        raise SlurmUnreachable(_unreachable("squeue", done.stderr.strip()))
    keys = ("JobState", "Reason", "TimeLimit", "NodeList")
    found = {}
    for line in done.stdout.splitlines():
        job_id, *values = (line.split("|") + [""] * 4)[:5]
        found[job_id.strip()] = {k: v.strip() for k, v in zip(keys, values, strict=True)}
    return found


_FIELD = re.compile(r"^[A-Za-z][\w/:]*$")  # scontrol's field names: JobState, CPUs/Task, AllocNode:Sid


def job_record(job_id: str) -> dict[str, str]:
    """``scontrol show job``'s fields for ``job_id`` ({} once SLURM has forgotten it, MinJobAge
    after it ended); the log paths with the job id put in for ``%J`` / ``%j``."""
    done = _run(["scontrol", "-o", "show", "job", job_id])
    if done.returncode != 0 and _controller_silent(done.stderr):
        raise SlurmUnreachable(_unreachable("scontrol show job", done.stderr.strip()))
    record: dict[str, str] = {}
    last = ""
    for token in done.stdout.split():
        key, sep, value = token.partition("=")
        if sep and _FIELD.match(key):
            record[key], last = value, key
        elif last:  # a value with spaces in it
            record[last] += f" {token}"
    for key in ("StdErr", "StdOut"):
        if key in record:
            record[key] = record[key].replace("%J", job_id).replace("%j", job_id)
    return record


#: words for the ends SLURM gives a job, by JobState (and Reason, while it is still COMPLETING)
ENDS = {
    "CANCELLED": "SLURM cancelled job {id} (scancel: its owner or an administrator)",
    "TIMEOUT": "SLURM ended job {id} at its time limit ({limit}: the profile's slurm.walltime)",
    "PREEMPTED": "SLURM preempted job {id} (a job of higher priority took its resources)",
    "NODE_FAIL": "SLURM lost job {id} with its node {node} (NODE_FAIL)",
    "OUT_OF_MEMORY": "SLURM killed job {id} for memory (OUT_OF_MEMORY): raise slurm.memory",
    "FAILED": "job {id} failed; its log: {log}",
    "BOOT_FAIL": "job {id}'s node failed to boot (BOOT_FAIL)",
    "DEADLINE": "SLURM ended job {id} at its --deadline (DEADLINE)",
    "COMPLETED": "job {id} ended (its worker exited: at its --lifetime, or see its log: {log})",
    # SLURM holds a requeued job back two minutes (its EligibleTime), and Dask cancels a lost worker's
    # job once the worker has been gone distributed.deploy.lost-worker-timeout (15 s): it never restarts
    "REQUEUED": "SLURM requeued job {id} (preempted, or its node failed; reason: {reason}): it is cancelled, "
                "and a new worker job takes its place",
}
#: what a COMPLETING job's Reason says its end will be
COMPLETING_AS = {"TimeLimit": "TIMEOUT", "NodeDown": "NODE_FAIL", "Prolog": "FAILED"}


def ended_words(job_id: str, record: dict[str, str]) -> str | None:
    """Why job ``job_id`` (its :func:`job_record`) ended; None while it has not (as SLURM sees it)."""
    if not record:
        return f"SLURM no longer knows job {job_id} (it ended over MinJobAge ago; `sacct -j {job_id}` tells why)"
    state, reason = record.get("JobState", ""), record.get("Reason", "")
    if state == "COMPLETING":
        state = COMPLETING_AS.get(reason, "")
    elif state in ("PENDING", "REQUEUE_HOLD", "REQUEUE_FED") and record.get("Restarts", "0") != "0":
        state = "REQUEUED"
    template = ENDS.get(state)
    if template is None:
        return None
    return template.format(id=job_id, limit=record.get("TimeLimit", "?"), node=record.get("NodeList", "?"),
                           log=record.get("StdErr", "?"), reason=reason)


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


def _job_words(settings: dict[str, Any]) -> str:
    """Each worker job's partition and time limit, and where they come from: a profile without
    ``walltime`` gets dask-jobqueue's default (30 minutes), and every worker job is ended then."""
    import dask

    queue = settings.get("queue") or dask.config.get("jobqueue.slurm.queue", None)
    walltime = settings.get("walltime")
    limit = (f"time limit {walltime} each (slurm.walltime)" if walltime else
             f"time limit {dask.config.get('jobqueue.slurm.walltime', None) or 'the partition default'} "
             "each, dask-jobqueue's default: set slurm.walltime")
    return f"partition {queue}, {limit}" if queue else f"the default partition, {limit}"


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
    log.info("SLURM: %d worker job(s) asked for (%s); job logs in %s", n_workers, _job_words(settings),
             settings["log_directory"])
    return cluster, SlurmDiagnosis(cluster)
