"""Overnight failures with real processes: a real `dask scheduler` and `dask worker`s on loopback,
SIGKILL of a worker or of the client mid-run, resume, status from another shell, privacy."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import audit_lines, slide_job, synthetic_slides, write_job

import gpubatch

pytestmark = pytest.mark.slow
N_SLIDES = 8


@pytest.fixture(scope="module")
def many_slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_slides(tmp_path_factory.mktemp("many"), N_SLIDES, 200, "m", (1024, 768))


def _job(tmp_path: Path, slides: Path, model: Path, out: str, **run: object) -> Path:
    job = slide_job([str(slides / "*.tif")], model, tmp_path / out,
                    run={"readers": 1, "prefetch_batches": 2, **run})
    job["tiles"] = {"size": 32, "level": 0, "tissue": {"method": "none"}}
    job["model"]["batch_size"] = 8
    return write_job(tmp_path / f"{out}.yaml", job)


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["slide", "x", "y"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, many_slides: Path, classifier: Path) -> pd.DataFrame:
    tmp = tmp_path_factory.mktemp("clean")
    return _sorted(gpubatch.run(_job(tmp, many_slides, classifier, "clean")).predictions())


def _cli(*args: str, **kw: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "gpubatch", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)  # type: ignore[call-overload]


def _wait_for(predicate, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError("condition not reached")


def _committed(out: Path) -> int:
    d = out / "_manifest"
    return len([p for p in d.glob("*.json") if not p.name.startswith(".tmp")]) if d.is_dir() else 0


def _committed_parts(out: Path) -> dict[str, str]:
    """The parts the commit records name, with their sha256 now."""
    records = [json.loads(p.read_text()) for p in (out / "_manifest").glob("*.json") if not p.name.startswith(".")]
    return {r["part"]: hashlib.sha256((out / "_parts" / r["part"]).read_bytes()).hexdigest() for r in records}


def test_client_killed_mid_run_then_resume_equals_clean(tmp_path: Path, many_slides: Path, classifier: Path,
                                                         clean: pd.DataFrame) -> None:
    job = _job(tmp_path, many_slides, classifier, "killed", profile="local", workers=1)
    out = tmp_path / "killed"
    proc = _cli("run", str(job), start_new_session=True)
    _wait_for(lambda: _committed(out) >= 2)
    os.killpg(proc.pid, signal.SIGKILL)  # the client and the cluster it started, all at once
    proc.wait()
    kept = _committed_parts(out)
    assert 2 <= len(kept) < N_SLIDES
    status = _cli("status", str(out))
    assert "running" in status.communicate()[0]  # the run never finished
    resumed = _cli("run", str(job), "--resume")
    log = resumed.communicate()[0]
    assert resumed.returncode == 0, log
    report = json.loads((out / "report.json").read_text())
    assert sum(1 for s in report["shards"] if s["resumed"]) == len(kept)  # exactly what was committed
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "_parts").glob("*.parquet")}
    assert {name: after.get(name) for name in kept} == kept  # committed parts untouched, byte for byte
    lines = audit_lines(out)
    assert len(lines) == len({line["shard_id"] for line in lines}) == N_SLIDES
    assert len([line for line in lines if line["part"] not in kept]) == N_SLIDES - len(kept)  # only the rest
    df = _sorted(pd.read_parquet(out / "predictions.parquet"))
    assert not df.duplicated(["slide", "x", "y"]).any()
    pd.testing.assert_frame_equal(df, clean)
    assert "finished" in _cli("status", str(out)).communicate()[0]


def _dask_scheduler(sched_file: Path) -> subprocess.Popen:
    proc = subprocess.Popen(["dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                             "--scheduler-file", str(sched_file)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(sched_file.exists, 30)
    return proc


def _dask_worker(sched_file: Path, name: str) -> subprocess.Popen:
    """One `dask worker` of one thread, no nanny (so SIGKILL is final)."""
    return subprocess.Popen(["dask", "worker", "--scheduler-file", str(sched_file), "--nthreads", "1",
                             "--no-nanny", "--no-dashboard", "--name", name],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for_workers(address: str, n: int) -> None:
    from distributed import Client

    with Client(address) as c:
        c.wait_for_workers(n, timeout=60)


@pytest.fixture()
def dask_cluster(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real `dask scheduler` and two `dask worker` processes (no nanny, so SIGKILL is final)."""
    sched_file = tmp_path / "scheduler.json"
    procs = [_dask_scheduler(sched_file)]
    workers = [_dask_worker(sched_file, f"w{i}") for i in range(2)]
    address = json.loads(sched_file.read_text())["address"]
    _wait_for_workers(address, 2)
    yield address, workers
    for p in procs + workers:
        p.kill()
        p.wait()


@contextlib.contextmanager
def _scheduler_with_a_worker(tmp_path: Path) -> Iterator[tuple[list[subprocess.Popen], Path, str]]:
    """A real `dask scheduler` and one worker, "first" (procs[0] and procs[1]); the scheduler
    file and address. Every process in the list, the test's own appended, is killed after."""
    sched_file = tmp_path / "scheduler.json"
    procs = [_dask_scheduler(sched_file)]
    try:
        procs.append(_dask_worker(sched_file, "first"))
        address = json.loads(sched_file.read_text())["address"]
        _wait_for_workers(address, 1)
        yield procs, sched_file, address
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_worker_that_arrives_mid_run_is_dealt_shards(tmp_path: Path, classifier: Path) -> None:
    """Shards are dealt to the workers there are (runtime.dealing); a worker that connects while
    the run goes on (a SLURM job that started late) gets a lane and runs shards, and every shard
    is committed once."""
    (tmp_path / "slides").mkdir()
    slides = synthetic_slides(tmp_path / "slides", 24, 300, "late", (1024, 768))
    with _scheduler_with_a_worker(tmp_path) as (procs, sched_file, address):
        out = tmp_path / "late"
        proc = _cli("submit", str(_job(tmp_path, slides, classifier, "late")), "--scheduler", address)
        _wait_for(lambda: _committed(out) >= 1)
        late = _dask_worker(sched_file, "late")
        procs.append(late)
        log = proc.communicate(timeout=180)[0]
        assert proc.returncode == 0, log
        records = [json.loads(p.read_text()) for p in (out / "_manifest").glob("*.json") if not p.name.startswith(".")]
        assert len(records) == len({r["shard_id"] for r in records}) == 24
        assert late.pid in {r["pid"] for r in records}, "the worker that arrived mid-run ran no shard"


def test_worker_killed_mid_shard_is_retried_elsewhere(tmp_path: Path, many_slides: Path, classifier: Path,
                                                      clean: pd.DataFrame, dask_cluster) -> None:  # type: ignore[no-untyped-def]
    address, workers = dask_cluster
    job = _job(tmp_path, many_slides, classifier, "lost")
    out = tmp_path / "lost"
    proc = _cli("submit", str(job), "--scheduler", address)
    _wait_for(lambda: _committed(out) >= 1)
    workers[0].send_signal(signal.SIGKILL)
    log = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, log
    df = _sorted(pd.read_parquet(out / "predictions.parquet"))
    assert not df.duplicated(["slide", "x", "y"]).any()
    pd.testing.assert_frame_equal(df, clean)
    committed = [a["shard_id"] for a in audit_lines(out)]
    assert sorted(committed) == sorted(set(committed)) and len(committed) == N_SLIDES


def test_truncated_slide_is_quarantined_at_once_not_retried(tmp_path: Path, slide_path: Path,
                                                            classifier: Path) -> None:
    """A bad input fails the same way every time: it is quarantined on its first attempt even with
    retries left (retries of failures that may pass: tests/test_resume_exact.py)."""
    bad = tmp_path / "bad.tif"
    bad.write_bytes(slide_path.read_bytes()[: len(slide_path.read_bytes()) // 2])
    job = slide_job([str(slide_path), str(bad)], classifier, tmp_path / "out", run={"retries": 2})
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job))
    assert result.exit_code == 3
    assert [Path(f["input"]).name for f in result.report["failed"]] == ["bad.tif"]
    assert "truncated" in result.report["failed"][0]["error"]
    assert result.report["failed"][0]["attempts"] == 1
    assert [a["attempt"] for a in audit_lines(tmp_path / "out", "shard_failed")] == [1]
    assert len(result.predictions()) > 0


def test_audit_trail_and_zarr_attributes(tmp_path: Path, slide_path: Path, classifier: Path) -> None:
    import zarr

    from gpubatch import __version__
    from gpubatch.core.files import file_sha256

    job = slide_job([str(slide_path)], classifier, tmp_path / "out")
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job))
    line = audit_lines(Path(result.output_uri))[0]
    for key in ("input", "size", "mtime", "model_sha256", "backend", "precision", "gpubatch_version",
                "spec_sha256", "host", "start", "end"):
        assert line.get(key) is not None, key
    assert line["size"] == slide_path.stat().st_size and line["end"] >= line["start"]
    sha = file_sha256(classifier, cached=False)
    assert line["model_sha256"] == sha and line["gpubatch_version"] == __version__
    root = zarr.open_group(str(Path(result.output_uri) / "predictions.zarr"), mode="r")
    assert root.attrs["model_sha256"] == sha and root.attrs["gpubatch_version"] == __version__
    assert root.attrs["kind"] == "slides" and list(root.attrs["shards"]) == [line["shard_id"]]
    group = root[root.attrs["groups"][line["shard_id"]]]
    assert group.attrs["model_sha256"] == sha and group.attrs["precision"] == line["precision"] == "fp32"
    assert group.attrs["backend"] == line["backend"] == "onnxruntime"


def test_progress_lines_when_not_a_terminal(tmp_path: Path, slides_dir: Path, classifier: Path) -> None:
    job = write_job(tmp_path / "job.yaml", slide_job([str(slides_dir / "*.tif")], classifier, tmp_path / "out"))
    proc = _cli("run", str(job))
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0
    line = next(x for x in log.splitlines() if "shards 3/3 done" in x)
    assert "items/s" in line and "starvation" in line and "ETA" in line


def _worker_environment(keys: list[str], conn: Any) -> None:
    """Run in a process forked from the forkserver: send back what it sees of ``keys``."""
    conn.send({k: os.environ.get(k) for k in keys})
    conn.close()


def test_workers_fork_from_a_forkserver_with_the_worker_environment() -> None:
    """glibc reads MALLOC_* once, at process start: a worker forked from the forkserver has the
    forkserver's settings, so the forkserver itself must start with them, however early a run
    starts it (and the client's own environment is left as it was).

    A process is forked from the forkserver and reports its environment. (Reading the
    forkserver's /proc environ right after starting it raced the exec: an empty environment was
    read in about half the runs.)"""
    import multiprocessing

    from gpubatch.runtime import cluster

    if cluster._mp_method() != "forkserver":
        pytest.skip("workers are spawned, not forked, on this platform")
    before = dict(os.environ)
    cluster._ensure_forkserver()
    assert dict(os.environ) == before
    ctx = multiprocessing.get_context("forkserver")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker_environment, args=(list(cluster.WORKER_ENV), child))
    proc.start()
    child.close()
    assert parent.poll(60), "the forked process sent nothing"
    seen = parent.recv()
    proc.join(30)
    assert proc.exitcode == 0
    assert seen == {key: before.get(key, value) for key, value in cluster.WORKER_ENV.items()}
    assert dict(os.environ) == before


def test_every_worker_lost_fails_within_the_worker_timeout(tmp_path: Path, many_slides: Path, classifier: Path,
                                                          dask_cluster) -> None:  # type: ignore[no-untyped-def]
    """A Dask cluster whose workers all die: the run stops within run.worker_timeout with exit 1
    and one clear line, status.json says failed; it never hangs."""
    address, workers = dask_cluster
    job = _job(tmp_path, many_slides, classifier, "gone", worker_timeout=5)
    out = tmp_path / "gone"
    proc = _cli("submit", str(job), "--scheduler", address, "--set", "model.batch_size=1")
    _wait_for(lambda: _committed(out) >= 1)
    t0 = time.monotonic()
    for w in workers:
        w.send_signal(signal.SIGKILL)
    try:
        log = proc.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        os.system(f"py-spy dump --pid {proc.pid} > /tmp/hang-dump.txt 2>&1")
        raise
    assert proc.returncode == 1, log
    assert "no worker for 5 s (run.worker_timeout)" in log and "Traceback" not in log, log
    assert time.monotonic() - t0 < 60
    assert json.loads((out / "status.json").read_text())["state"] == "failed"
    assert [a["event"] for a in audit_lines(out, None) if a["event"].startswith("run_")] == ["run_start", "run_failed"]


def test_a_scheduler_that_dies_mid_run_stops_it_with_one_clear_line(tmp_path: Path, many_slides: Path,
                                                                     classifier: Path) -> None:
    """The scheduler of `submit` killed mid-run: Dask cancels every task in flight, and the client
    died on distributed's FuturesCancelledError with a traceback. It stops with one line saying
    what happened and that --resume finishes the run; status.json says failed."""
    with _scheduler_with_a_worker(tmp_path) as (procs, _, address):
        out = tmp_path / "orphaned"
        job = _job(tmp_path, many_slides, classifier, "orphaned", heartbeat_s=0.3)
        proc = _cli("submit", str(job), "--scheduler", address, "--set", "model.batch_size=1")
        _wait_for(lambda: _committed(out) >= 1, 120)
        procs[0].kill()
        log = proc.communicate(timeout=120)[0]
        assert proc.returncode == 1, log
        assert "Traceback" not in log and "lost the Dask scheduler" in log and "--resume" in log, log
        status = json.loads((out / "status.json").read_text())
        assert status["state"] == "failed" and "lost the Dask scheduler" in status.get("reason", ""), status


def test_a_client_that_closed_itself_after_losing_its_scheduler_stops_the_run_cleanly() -> None:
    """Dask's client, unable to reconnect to a dead scheduler, closes itself; a wait that came
    after that died on distributed's "ValueError: No clients found" with a traceback (CI, stop
    33) instead of the line that says the scheduler was lost and --resume finishes the run; a
    submission after it died on ClosedClientError."""
    from distributed import Client, LocalCluster

    from gpubatch.runtime.executors import DaskExecutor, SchedulerLost

    with LocalCluster(n_workers=1, processes=False, threads_per_worker=1, dashboard_address=None,
                      silence_logs=50) as cluster:
        client = Client(cluster)
        executor = DaskExecutor(client)
        fut = executor.submit(time.sleep, 2, key="gpubatch-s-1-1-0")
        client.close()
        with pytest.raises(SchedulerLost, match="lost the Dask scheduler.*--resume"):
            executor.wait_first({fut}, timeout=5)
        with pytest.raises(SchedulerLost, match="could not reconnect"):  # the next shard's submission
            executor.submit(time.sleep, 0, key="gpubatch-s-2-1-0")


def test_workers_without_the_profiles_resources_are_named_not_called_absent(
        tmp_path: Path, many_slides: Path, classifier: Path, dask_cluster) -> None:  # type: ignore[no-untyped-def]
    """Workers that are connected but offer none of the resources the profile asks of each shard
    (a GPU profile's `resources: {GPU: 1}` submitted to CPU workers) run nothing: the run stops
    within run.worker_timeout saying so and what to change, not that no worker connected."""
    address, _ = dask_cluster
    profile = tmp_path / "gpu-scheduler.yaml"
    profile.write_text(json.dumps({"cluster": "scheduler", "resources": {"GPU": 1}}))
    job = _job(tmp_path, many_slides, classifier, "nogpu", worker_timeout=3, profile=str(profile))
    proc = _cli("submit", str(job), "--scheduler", address)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, log
    assert "no worker connected" not in log, log
    assert "2 workers are connected" in log and "GPU" in log and "resources" in log, log
    assert "Traceback" not in log, log


def test_model_threads_are_sized_on_the_workers_host_not_the_clients(tmp_path: Path, classifier: Path) -> None:
    """A run submitted to a scheduler from a machine with fewer cores than its workers' (a login
    node; here the client pinned to one core): each worker's model gets its own host's cores over
    the workers there, not the client's. Sized on the client, it got one thread of two."""
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("needs a worker with more cores than the client")
    (tmp_path / "slides").mkdir()
    slides = synthetic_slides(tmp_path / "slides", 2, 200, "t", (256, 256))
    with _scheduler_with_a_worker(tmp_path) as (_, _sched, address):
        proc = _cli("submit", str(_job(tmp_path, slides, classifier, "threads")), "--scheduler", address,
                    "--set", "run.workers=1", preexec_fn=lambda: os.sched_setaffinity(0, {0}))
        log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, log
    records = [json.loads(p.read_text()) for p in (tmp_path / "threads" / "_manifest").glob("*.json")]
    assert len(records) == 2 and {r["model"]["threads"] for r in records} == {cores}, records


def test_a_worker_killed_for_memory_is_named_with_what_to_change() -> None:
    """A worker its nanny kills for passing its memory limit was "lost", like one whose host
    vanished: the operator could not tell a batch too large from a flaky node. The lost worker's
    record, and the KilledWorker its shard ends in, now say memory and what to lower."""
    import operator

    import dask
    from distributed import Client, LocalCluster

    from gpubatch.runtime.executors import DaskExecutor

    quiet = {"distributed.worker.memory.spill": False, "distributed.worker.memory.target": False,
             "distributed.worker.memory.pause": False, "distributed.scheduler.allowed-failures": 0}
    with dask.config.set(quiet), LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                              memory_limit="300MiB", host="127.0.0.1", dashboard_address=None,
                                              silence_logs=50) as cluster, Client(cluster) as client:
        executor = DaskExecutor(client, cluster)
        executor.worker_slots()
        fut = executor.submit(functools.partial(operator.mul, b"x"), 1536 * 2**20, key="gpubatch-s-1-1-0")
        deadline = time.monotonic() + 60
        while not executor.lost_workers() and time.monotonic() < deadline:
            executor.note_processing({fut})
            time.sleep(0.3)
        exc = fut.exception(timeout=60)
        words = executor.failure_words(exc)  # as the submitter records it, with the cluster up
    (lost,) = executor.lost_workers()
    assert "killed by its nanny for memory" in lost.get("cause", "") and "300.00 MiB limit" in lost["cause"], lost
    assert "model.batch_size" in lost["cause"] and "memory_limit" in lost["cause"]
    assert type(exc).__name__ == "KilledWorker" and "for memory" in words, words


def _kill_own_process(signum: int) -> None:
    os.kill(os.getpid(), signum)


def test_a_worker_killed_from_outside_dask_is_named_with_what_to_check() -> None:
    """The kernel's OOM killer (or a SLURM job's memory cgroup) kills a worker with SIGKILL and
    leaves no Dask event: the run said only "worker lost", the words of a host that vanished.
    Its nanny now tells the scheduler how the process ended, and the lost worker's record and
    the shard's KilledWorker say SIGKILL, the OOM killer and where to look; a crash says so."""
    import dask
    from distributed import Client, LocalCluster

    from gpubatch.runtime.executors import DaskExecutor

    settings = {"distributed.scheduler.allowed-failures": 0}
    with dask.config.set(settings), LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                                 host="127.0.0.1", dashboard_address=None,
                                                 silence_logs=50) as cluster, Client(cluster) as client:
        executor = DaskExecutor(client, cluster)
        executor.watch_exits()
        words = []
        for n, signum in enumerate((signal.SIGKILL, signal.SIGABRT)):
            client.wait_for_workers(1, timeout=60)
            (worker,) = executor.worker_slots()
            fut = executor.submit(_kill_own_process, signum, key=f"gpubatch-s-{n}-1-0")
            deadline = time.monotonic() + 60
            while not executor.loss_cause(worker) and time.monotonic() < deadline:
                executor.note_processing({fut})  # the nanny's word may come after the loss is seen
                time.sleep(0.3)
            words.append(executor.failure_words(fut.exception(timeout=60)))
            while worker in executor.worker_slots() and time.monotonic() < deadline:
                time.sleep(0.3)
    killed, crashed = executor.lost_workers()
    assert "signal 9 (SIGKILL)" in killed.get("cause", "") and "OOM killer" in killed["cause"], killed
    assert "dmesg" in killed["cause"] and "model.batch_size" in killed["cause"]
    assert "SIGKILL" in words[0] and "OOM" in words[0], words
    assert "crashed (SIGABRT) in native code" in crashed.get("cause", ""), crashed


def test_a_result_lost_with_its_worker_is_given_up_at_once(tmp_path: Path, many_slides: Path,
                                                           classifier: Path) -> None:
    """A shard finished on a worker that dies before the client gathers its result: Dask
    recomputes it under the dead worker's placement, which no worker takes, and the run waited
    out run.worker_timeout (30 minutes by default) before trying again. The submitter sees the
    finished future turn lost and hands it back at once, for the shard to be submitted again."""
    from distributed import Client, wait

    from gpubatch.core.results import ShardResult
    from gpubatch.runtime.executors import DaskExecutor
    from gpubatch.runtime.submit import Submitter
    from gpubatch.sources import Shard

    job = gpubatch.load_job(_job(tmp_path, many_slides, classifier, "lost", worker_timeout=60))
    with _scheduler_with_a_worker(tmp_path) as (procs, _, address), Client(address) as client:
        executor = DaskExecutor(client)
        first = next(iter(executor.worker_slots()))
        submitter = Submitter(executor, job, None, on_result=lambda r: None, window=1)  # type: ignore[arg-type]
        fut = executor.submit(functools.partial(ShardResult.failure, retryable=False), "s-1", "a.tif", "ran",
                              key="s-1-attempt-1", worker=first)
        fut.shard, fut.worker = Shard("s-1", "a.tif"), first
        submitter.attempts["s-1"] = 1
        wait([fut], timeout=30)
        assert fut.status == "finished"
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait()
        started = time.monotonic()
        assert submitter._result(fut) is None
        assert time.monotonic() - started < 15


def test_shards_of_a_lost_worker_run_on_the_worker_that_replaces_it(
        tmp_path: Path, many_slides: Path, classifier: Path, clean: pd.DataFrame) -> None:
    """The only worker dies mid-shard and another joins later (a nanny's restart after a memory
    kill, a SLURM job replaced): the shards dealt to the dead one run on the newcomer. Dask keeps
    a task restricted to a dead worker in 'no-worker' whatever joins later, despite
    allow_other_workers, so the run waited forever. A result finished on the dead worker but not
    yet gathered is given up at once (the test above), so run.worker_timeout is beyond the test's
    90 s: a wait for it would fail the test."""
    with _scheduler_with_a_worker(tmp_path) as (procs, sched_file, address):
        out = tmp_path / "replaced"
        proc = _cli("submit", str(_job(tmp_path, many_slides, classifier, "replaced", worker_timeout=120)),
                    "--scheduler", address, "--set", "model.batch_size=1")
        procs.append(proc)
        _wait_for(lambda: _committed(out) >= 1)
        procs[1].send_signal(signal.SIGKILL)
        procs.append(_dask_worker(sched_file, "second"))
        log = proc.communicate(timeout=90)[0]
        assert proc.returncode == 0, log
        committed = [a["shard_id"] for a in audit_lines(out)]
        assert sorted(committed) == sorted(set(committed)) and len(committed) == N_SLIDES
        pd.testing.assert_frame_equal(_sorted(pd.read_parquet(out / "predictions.parquet")), clean)
