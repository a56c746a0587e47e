"""A shard that never returns (a read stuck on a hung mount) must not hang an overnight run: it
fails after run.shard_timeout, the worker process stuck in it is restarted, the shard is retried
then quarantined, and the rest of the run finishes. The hang is real: the slide is swapped for a
FIFO nobody writes, so the worker's open() blocks in the kernel."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import audit_lines, slide_job, synthetic_slides, wait_for, write_job

N_SLIDES = 4


def _unblock(fifo: Path) -> None:
    """Open the FIFO for writing and close it, so that a reader stuck on it sees end of file."""
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("profile", ["local", "inline"])
def test_a_shard_stuck_in_a_read_is_quarantined_after_the_shard_timeout(tmp_path: Path, classifier: Path,
                                                                         profile: str) -> None:
    """``inline`` runs shards on threads of the client, which cannot be stopped: the stuck
    threads are left behind (the log says so, not that anything was restarted), new ones run
    the rest, and the process still exits (a thread pool's threads are joined at exit: it hung)."""
    (tmp_path / "slides").mkdir()
    slides = synthetic_slides(tmp_path / "slides", N_SLIDES, 300, "h", (1024, 768))
    job = slide_job([str(slides / "*.tif")], classifier, tmp_path / "out",
                    run={"profile": profile, "workers": 1, "readers": 1, "prefetch_batches": 2, "stage_ahead": 0,
                         "retries": 1, "shard_timeout": 6})
    job["tiles"] = {"size": 16, "level": 0, "tissue": {"method": "none"}}
    job["model"]["batch_size"] = 1  # each slide takes seconds: the last is not opened before it is swapped
    spec = write_job(tmp_path / "job.yaml", job)
    proc = subprocess.Popen([sys.executable, "-m", "gpubatch", "run", str(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    last = sorted(slides.glob("*.tif"))[-1]
    try:
        # status.json is written once planning is done, before the cluster starts: the last
        # slide's shard is submitted only after two others finish
        wait_for(lambda: (tmp_path / "out" / "status.json").exists() or proc.poll() is not None, 120, "the plan")
        last.unlink()
        os.mkfifo(last)
        log = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        _unblock(last)
    assert proc.returncode == 3, log
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [Path(f["input"]).name for f in report["failed"]] == [last.name], report["failed"]
    assert "run.shard_timeout" in report["failed"][0]["error"] and report["failed"][0]["attempts"] == 2
    committed = [a["shard_id"] for a in audit_lines(tmp_path / "out")]
    assert len(committed) == len(set(committed)) == N_SLIDES - 1
    assert "Traceback" not in log, log
    if profile == "inline":
        assert "cannot be stopped" in log and "left behind" in log and "restarting" not in log, log
