"""The edges of a run a user sees: what a process prints as it ends, and what a script that runs
gpubatch again and again keeps.

A run that succeeded must end quietly: no library's traceback at interpreter exit (an az:// zarr
left adlfs's "Loop is not running" there), none as its Dask cluster closes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import slide_job, synthetic_slides, write_job

pytest_plugins = ["s3_fixtures", "cloud_fixtures"]

REPO = Path(__file__).resolve().parents[1]


def run_in_a_process(job: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m gpubatch run JOB`` as a user runs it, to its interpreter's exit."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "gpubatch", "run", str(job)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("where", ["s3", "azure"])
def test_a_run_on_object_storage_ends_without_a_traceback(
        tmp_path: Path, where: str, mean_model: Path, request: pytest.FixtureRequest) -> None:
    """Slides read from and zarr and parquet written to an object store, in a process of its own:
    it ends with exit code 0 and nothing but gpubatch's lines. After an az:// zarr, adlfs's
    finaliser printed ``RuntimeError: Loop is not running`` and its traceback at exit."""
    store: Any = request.getfixturevalue(where)
    (tmp_path / "slides").mkdir()
    slides = synthetic_slides(tmp_path / "slides", 2, seed=5, prefix="s")
    uris = [store.upload(p, f"exit-{uuid.uuid4().hex[:8]}/{p.name}") for p in sorted(slides.glob("*.tif"))]
    job = slide_job(uris, mean_model, tmp_path / "unused", input={"storage": store.options()})
    job["output"] = {"uri": store.uri(f"runs/{uuid.uuid4().hex[:8]}"), "formats": ["zarr", "parquet"],
                     "storage": store.options()}
    done = run_in_a_process(write_job(tmp_path / "job.yaml", job))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Loop is not running" not in done.stderr, done.stderr[-3000:]


#: a local cluster of gpubatch's whose scheduler answers heartbeats late (its process busy, as at
#: a run's end), closed while a worker's heartbeat waits for its answer
LATE_HEARTBEAT = """
import asyncio, threading
from gpubatch.runtime.cluster import open_executor

waiting, asked = threading.Event(), []

def late(answer):
    async def later(**message):
        reply = answer(**message)
        asked.append(message)
        if len(asked) > 1:  # the first may have been sent before the workers' plugins were set up
            waiting.set()
        await asyncio.sleep(1.5)
        return reply
    return later

if __name__ == "__main__":
    executor = open_executor({"cluster": "local", "threads_per_worker": 1}, 1)
    handlers = executor.cluster.scheduler.handlers
    handlers["heartbeat_worker"] = late(handlers["heartbeat_worker"])
    assert waiting.wait(60), "no heartbeat reached the scheduler in 60 s"
    executor.close()
    print("closed")
"""


def test_a_cluster_closed_while_a_heartbeat_waits_prints_no_traceback(tmp_path: Path) -> None:
    """A worker closed while its heartbeat waited for the scheduler's answer cut that heartbeat
    off (distributed's Worker.close closes its connections without waiting for it) and printed
    "Failed to communicate with scheduler during heartbeat." with a CommClosedError traceback
    at the end of a clean run. Now the worker lets the heartbeat finish before it closes."""
    script = tmp_path / "late_heartbeat.py"
    script.write_text(LATE_HEARTBEAT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "closed", done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "during heartbeat" not in done.stderr, done.stderr[-3000:]


#: runs the jobs named on its command line one after another in one process, as an analysis
#: script does, and prints what the process holds after each: live model sessions and their host
#: stages (gc), open file descriptors, logging handlers, and threads outside the process-wide
#: pools (core.threads), which grow to their bound as they are used
AGAIN_AND_AGAIN = """
import gc, json, logging, os, sys, threading
import gpubatch
from gpubatch.core import threads
from gpubatch.engine.model_stage import _HostStage
from gpubatch.models.base import Model

def held():
    gc.collect()
    pools = tuple(f"gpubatch-{name}_" for name in threads._pools)
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in logging.root.manager.loggerDict)]
    return {"models": sum(isinstance(o, Model) for o in gc.get_objects()),
            "stages": sum(isinstance(o, _HostStage) for o in gc.get_objects()),
            "fds": len(os.listdir("/proc/self/fd")), "handlers": sum(len(lg.handlers) for lg in loggers),
            "threads": sorted(t.name for t in threading.enumerate() if not t.name.startswith(pools))}

for job in sys.argv[1:]:
    assert gpubatch.run(job, show_progress=False).exit_code == 0
    print(json.dumps(held()))
"""


def test_a_script_running_job_after_job_keeps_only_its_last_few_models(tmp_path: Path) -> None:
    """An analysis script runs six jobs (each its own model, the inline profile) in one process.
    Every model session the process had loaded stayed, with its runtime arena and its host
    stage's batch buffer: memory grew with each model a script ran. Now a process keeps the last
    few (models.base.MAX_SESSIONS) and nothing else grows: threads, file descriptors, handlers."""
    from conftest import windows_job

    from gpubatch.models.base import MAX_SESSIONS

    jobs = []
    for i in range(6):
        (tmp_path / f"j{i}").mkdir()
        jobs.append(str(windows_job(tmp_path / f"j{i}", shards=2)))
    script = tmp_path / "again.py"
    script.write_text(AGAIN_AND_AGAIN)
    done = subprocess.run([sys.executable, str(script), *jobs], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    held = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert held[-1]["models"] <= MAX_SESSIONS and held[-1]["stages"] <= MAX_SESSIONS, held
    for key in ("fds", "handlers", "threads"):
        assert held[-1][key] == held[1][key], (key, held)
