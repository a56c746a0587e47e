"""The Python API in one long-lived process, as a notebook's kernel is: runs from inside a running
event loop, a Ctrl-C while Dask starts or closes the cluster, a job run again and again, two runs
at once in two threads. Each runs as a script in a fresh process (local profile, real workers):
what a run leaves behind in its process is what is measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import slide_job, synthetic_slides, write_job

REPO = Path(__file__).resolve().parents[1]


def _notebook(tmp_path: Path, script: str, *args: object, env: dict[str, str] | None = None) -> tuple[Any, str]:
    """``script`` run as a fresh process's main script with ``args``: its last line of output as
    JSON, and its stderr."""
    path = tmp_path / "notebook.py"
    path.write_text(script)
    done = subprocess.run([sys.executable, str(path), *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**(env or os.environ), "PYTHONPATH": str(REPO)}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def _local_job(tmp_path: Path, slide: Path, model: Path) -> Path:
    return write_job(tmp_path / "job.yaml", slide_job([str(slide)], model, tmp_path / "out",
                                                      run={"profile": "local", "workers": 1}))


_INTERRUPTED_IN_DASK = '''
import json, os, signal, sys
import psutil
from distributed import Scheduler
from distributed.deploy.spec import SpecCluster
from distributed.nanny import Nanny
import gpubatch

ctrl_c = [signal.SIGINT]

def after_a_ctrl_c(method):  # the first call sends SIGINT to this process, then goes on
    async def interrupted(self, *args, **kwargs):
        if ctrl_c:
            os.kill(os.getpid(), ctrl_c.pop())
        return await method(self, *args, **kwargs)
    return interrupted

if sys.argv[2] == "start":  # while Dask starts the run's first worker
    Nanny.start_unsafe = after_a_ctrl_c(Nanny.start_unsafe)
else:  # while Dask closes the run's cluster, its shards done
    Scheduler.close = after_a_ctrl_c(Scheduler.close)

def workers():  # the worker processes (the forkserver's children) still alive, at most 30 s on
    me = psutil.Process()
    forked = [p for p in me.children(recursive=True) if p.ppid() != me.pid]
    return len(psutil.wait_procs(forked, timeout=30)[1])

if __name__ == "__main__":
    try:
        gpubatch.run(sys.argv[1], show_progress=False)
        stopped = "finished"
    except KeyboardInterrupt:
        stopped = "interrupted"
    live = [c for c in SpecCluster._instances if c.status.name != "closed"]
    after = {"stopped": stopped, "clusters": len(live), "workers": workers()}
    again = gpubatch.run(sys.argv[1], show_progress=False, resume=True)
    print(json.dumps({**after, "resumed": [again.exit_code, again.complete], "then": workers()}))
'''


@pytest.mark.parametrize("where", ["start", "close"])
def test_a_ctrl_c_while_dask_starts_or_closes_the_cluster_leaves_nothing_behind(
        tmp_path: Path, slide_path: Path, mean_model: Path, where: str) -> None:
    """A notebook's interrupt landing while Dask started the local cluster (its constructor waits
    on Dask's event loop) abandoned the half-made cluster: nothing closed it, its worker process
    started after the run had stopped and lived as long as the kernel, and Dask's exit handler
    failed on it ("AssertionError: Status.closing_gracefully"). Landing in the cluster's close,
    it cancelled the close half-way (Dask cancels what an interrupted wait waits on): the
    cluster stayed "closing", with its event loop thread, for the life of the process. Now
    either is let finish, then the interrupt raised; a resume in the same process finishes."""
    outcome, stderr = _notebook(tmp_path, _INTERRUPTED_IN_DASK, _local_job(tmp_path, slide_path, mean_model), where)
    assert outcome == {"stopped": "interrupted", "clusters": 0, "workers": 0, "resumed": [0, True], "then": 0}
    assert json.loads((tmp_path / "out" / "status.json").read_text())["state"] == "finished"
    assert "Traceback" not in stderr, stderr[-3000:]


_RUN_AGAIN_AND_AGAIN = '''
import gc, json, os, sys, threading
import psutil
from distributed.core import Server
import gpubatch

def held():
    gc.collect()
    threads = [t.name for t in threading.enumerate() if not t.name.startswith("asyncio_")]
    return {"fds": len(os.listdir("/proc/self/fd")), "threads": len(threads),
            "children": len(psutil.Process().children(recursive=True)),
            "dask_servers": sum(isinstance(o, Server) for o in gc.get_objects())}

if __name__ == "__main__":
    seen = []
    for i in range(4):  # a notebook's cell run again and again, a new output each time
        result = gpubatch.run(sys.argv[1], show_progress=False, output__uri=f"out{i}")
        seen.append([result.exit_code, held()])
    print(json.dumps(seen))
'''


def test_a_notebook_running_a_job_again_and_again_holds_nothing_more_for_it(tmp_path: Path, slide_path: Path,
                                                                             mean_model: Path) -> None:
    """Every local run left its closed cluster's scheduler and nanny in this process for good
    (Dask's distributed.core._expects_comm caches each server's bound handlers, without bound):
    a notebook re-running a cell held every run's. Counted after each run in one process:
    descriptors, threads (less the asyncio pool a zarr loop grows to its bound as it is busy)
    and child processes come back to what the first run left, and no Dask server outlives its run."""
    seen, _ = _notebook(tmp_path, _RUN_AGAIN_AND_AGAIN, _local_job(tmp_path, slide_path, mean_model))
    assert [code for code, _ in seen] == [0, 0, 0, 0]
    assert [counts for _, counts in seen] == [{**seen[0][1], "dask_servers": 0}] * 4, seen


_TWO_RUNS_AT_ONCE = '''
import json, os, sys, threading
import dask, distributed
import gpubatch
from gpubatch.runtime.progress import Progress

update, outcome, started_b, a_done = Progress.update, {}, [], threading.Event()

def update_in_turn(self, result):  # a's first result starts b, whose first waits for a to end
    update(self, result)
    if threading.current_thread().name == "a" and not started_b:
        started_b.append(b)
        b.start()
    elif threading.current_thread().name == "b":
        a_done.wait(120)

Progress.update = update_in_turn

def run(name, job):
    try:
        result = gpubatch.run(job, show_progress=False, output__uri=f"out-{name}")
        outcome[name] = [result.exit_code, result.report["shards_done"]]
    except Exception as exc:
        outcome[name] = f"{type(exc).__name__}: {exc}"
    if name == "a":
        a_done.set()

if __name__ == "__main__":
    keys = ["distributed.worker.multiprocessing-method", "distributed.admin.low-level-log-length",
            "distributed.worker.profile.enabled", "distributed.nanny.pre-spawn-environ"]
    before = [{k: dask.config.get(k, None) for k in keys}, dict(os.environ)]
    a = threading.Thread(target=run, args=("a", sys.argv[1]), name="a")
    b = threading.Thread(target=run, args=("b", sys.argv[2]), name="b")
    a.start(); a.join(240); b.join(240)
    after = [{k: dask.config.get(k, None) for k in keys}, dict(os.environ)]
    changed = sorted(k for k in set(after[1]) | set(before[1])
                     if after[1].get(k) != before[1].get(k) and k != "__DASK_PARENT_PID")  # Dask's own
    print(json.dumps({**outcome, "settings_back": after[0] == before[0], "environ_changed": changed}))
'''


def test_two_runs_at_once_in_one_process_each_finish_and_leave_the_caller_s_settings(
        tmp_path: Path, slide_path: Path, mean_model: Path) -> None:
    """Two runs in two threads of one notebook, into two outputs, the second started while the
    first waited on its shards: the first died on "RuntimeError: <asyncio.locks.Event ...> is
    bound to a different event loop" (Dask's wait used the newest client, the second run's), and
    each run putting back the Dask settings and environment it found left, when the first to
    start ended first, the first's in place: forkserver workers, a 50-entry scheduler log and the
    workers' OMP_NUM_THREADS=1 stayed in the notebook after both. And the first to end gave
    Dask's log handlers their level back while the other's cluster lived: its INFO lines
    ("Register worker", "Remove client") went to the notebook's stderr."""
    local = {"profile": "local", "workers": 1}
    (tmp_path / "slides").mkdir()
    slides = synthetic_slides(tmp_path / "slides", 8, 300, "a")
    many = slide_job([str(slides / "*.tif")], mean_model, tmp_path / "x", run=local)
    many["tiles"] = {"size": 32, "level": 0, "tissue": {"method": "none"}}
    one = slide_job([str(slide_path)], mean_model, tmp_path / "x", run=local)
    jobs = [write_job(tmp_path / "a.yaml", many), write_job(tmp_path / "b.yaml", one)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    outcome, stderr = _notebook(tmp_path, _TWO_RUNS_AT_ONCE, *jobs, env=env)
    assert outcome == {"a": [0, 8], "b": [0, 1], "settings_back": True, "environ_changed": []}, outcome
    assert " - distributed." not in stderr, stderr[-3000:]  # Dask's INFO lines, quiet while either runs


_INSIDE_A_RUNNING_EVENT_LOOP = '''
import asyncio, json, sys
import gpubatch

async def cell():  # a Jupyter cell: the kernel's event loop runs in this thread
    direct = gpubatch.run(sys.argv[1], show_progress=False, output__uri="direct")
    loop = asyncio.get_running_loop()
    off = await loop.run_in_executor(None, lambda: gpubatch.run(sys.argv[1], show_progress=False,
                                                                 output__uri="executor"))
    return [direct.exit_code, off.exit_code, len(gpubatch.open_results("executor").predictions())]

if __name__ == "__main__":
    print(json.dumps(asyncio.run(asyncio.wait_for(cell(), 200))))
'''


def test_a_local_run_from_inside_a_running_event_loop_finishes(tmp_path: Path, slide_path: Path,
                                                               mean_model: Path) -> None:
    """Jupyter runs cells with its event loop running in the main thread, where a synchronous
    Dask client is a known pitfall: gpubatch.run on the local profile, called straight from a
    coroutine and through run_in_executor, finishes both ways (held when tried; kept so)."""
    (direct, off, rows), _ = _notebook(tmp_path, _INSIDE_A_RUNNING_EVENT_LOOP, _local_job(tmp_path, slide_path, mean_model))
    assert direct == off == 0 and rows > 0
