"""The client of a run on a login node, and the signals it gets there: the terminal closing under
it (SIGHUP, an SSH session that dropped while the run held the foreground), and a second Ctrl-C
or SIGTERM while it stops. Each ends in an orderly stop: workers stopped, the interruption in
the audit ledger and status.json (with its cause), and an output that --resume finishes; never
a client gone with status.json saying "running". Real processes, a real pseudo-terminal."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    audit_lines,
    cli,
    committed_count,
    synthetic_slides,
    wait_for,
)
from terminal import Terminal
from test_interruptions import _job as interruption_job

pytestmark = pytest.mark.slow
N_SLIDES = 6


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_slides(tmp_path_factory.mktemp("hangup"), N_SLIDES, 700, "h", size=(1024, 768))


def _job(tmp_path: Path, slides: Path, model: Path, profile: str = "local") -> Path:
    """Slow enough shards (8-pixel tiles, one at a time) that the run is mid-way when signalled."""
    return interruption_job(tmp_path, slides, model, profile, tile=8, batch_size=1)


def _status(out: Path) -> dict[str, Any]:
    return json.loads((out / "status.json").read_text())


def _run_events(out: Path) -> list[dict[str, Any]]:
    return [line for line in audit_lines(out, None) if line["event"].startswith("run_")]


def test_a_terminal_that_closes_under_a_run_stops_it_in_order_and_resume_finishes(
        tmp_path: Path, slides: Path, classifier: Path) -> None:
    """The SSH session drops under `gpubatch run` in the foreground: the client took SIGHUP's
    default action and vanished, its workers left to run on, status.json saying "running" and
    nothing in the ledger. Now the stop is SIGTERM's, its cause recorded, though every write to
    the hung-up terminal fails (EIO): no traceback takes the place of the status write."""
    job, out = _job(tmp_path, slides, classifier), tmp_path / "out"
    term = Terminal("run", str(job))
    try:
        wait_for(lambda: committed_count(out) >= 1, 180, "a commit")
        term.hang_up()
        assert term.proc.wait(timeout=60) == 1
    finally:
        term.kill()
    settled = committed_count(out)  # all of them where a loaded machine let the run reach its end:
    status = _status(out)  # a hang-up there is recorded as well (it was left saying "running")
    assert status["state"] == "interrupted", status
    assert "terminal closed (SIGHUP)" in status["reason"] and "--resume" in status["reason"], status
    events = _run_events(out)
    assert [e["event"] for e in events] == ["run_start", "run_interrupted"]
    assert "SIGHUP" in events[-1]["reason"]
    assert len(audit_lines(out)) == settled
    done = cli("run", str(job), "--resume")
    log = done.communicate(timeout=300)[0]
    assert done.returncode == 0 and f"{settled} shard(s) already committed, skipped" in log, log
    assert len(audit_lines(out)) == N_SLIDES


def test_a_run_under_nohup_outlives_its_terminal(tmp_path: Path, slides: Path, classifier: Path) -> None:
    """`nohup gpubatch run ...` asked for the run to go on when the terminal closes: SIGHUP,
    ignored when the run starts, is left ignored, and the run finishes."""
    job, out = _job(tmp_path, slides, classifier, profile="inline"), tmp_path / "out"
    proc = subprocess.Popen(["nohup", sys.executable, "-m", "gpubatch", "run", str(job)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: committed_count(out) >= 1, 180, "a commit")
        os.killpg(proc.pid, signal.SIGHUP)
        assert proc.wait(timeout=300) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert _status(out)["state"] == "finished"


def test_a_run_that_ignores_sighup_finishes_though_its_terminal_fails_every_write(
        tmp_path: Path, slides: Path, classifier: Path) -> None:
    """`nohup gpubatch run JOB` without a redirect (or a run that was disowned): SIGHUP ignored,
    and the terminal, its stdout and stderr, hangs up mid-run, every write there failing with
    EIO. The run failed at its progress bar's last refresh (status.json "failed", reason
    "OSError: [Errno 5] Input/output error", exit 1, all its shards committed) and then at
    its summary's print. It now finishes: its outputs, status.json and report, and exit 0."""
    job, out = _job(tmp_path, slides, classifier), tmp_path / "out"
    term = Terminal("run", str(job), sighup=signal.SIG_IGN)
    try:
        wait_for(lambda: committed_count(out) >= 1, 180, "a commit")
        term.hang_up()  # the bar's refreshes and the summary's print come after: each fails (EIO)
        assert term.proc.wait(timeout=300) == 0
    finally:
        term.kill()
    status = _status(out)
    assert status["state"] == "finished" and status["done"] == N_SLIDES, status
    assert [e["event"] for e in _run_events(out)] == ["run_start", "run_finish"]
    assert json.loads((out / "report.json").read_text())["items"] > 0
    assert (out / "predictions.parquet").is_file() and (out / "report.html").is_file()
    assert len(audit_lines(out)) == N_SLIDES


@pytest.mark.parametrize("then", [signal.SIGINT, signal.SIGTERM])
def test_signals_that_keep_coming_while_the_run_stops_leave_it_recorded_not_running(
        tmp_path: Path, slides: Path, classifier: Path, then: int) -> None:
    """An impatient user: Ctrl-C, then Ctrl-C (or a SIGTERM) again and again while the client
    stops. Each later signal was raised inside the stop itself, cutting short the cancelling of
    the workers or the status write: status.json said "running" for a client that had gone, or
    a traceback ended it. Later signals are now said and the stop goes on to its end."""
    job, out = _job(tmp_path, slides, classifier), tmp_path / "out"
    proc = cli("run", str(job))
    try:
        wait_for(lambda: committed_count(out) >= 1, 180, "a commit")
        proc.send_signal(signal.SIGINT)
        while proc.poll() is None:  # every instant of the stop gets one
            proc.send_signal(then)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.02)
        log = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 1 and "Traceback" not in log and "--resume" in log, log
    assert "while stopping" in log, log
    assert _status(out)["state"] == "interrupted"
    assert [e["event"] for e in _run_events(out)] == ["run_start", "run_interrupted"]
    assert len(audit_lines(out)) == committed_count(out) < N_SLIDES
