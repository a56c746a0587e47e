"""Commands whose reader goes away: `gpubatch report OUT | head -1`, `gpubatch status OUT | grep
-q finished`, a run's output piped into a pager that was quit. Each write to a closed pipe fails
(EPIPE; Python ignores SIGPIPE, so a BrokenPipeError): every printing command ended in a traceback
and exit 1, and a run that had committed every shard and written its outputs exited 1 as well.

The convention now: what is left to print is dropped, the command does the rest of its work
(report.html, the ingest's store, the run's outputs and status.json) and exits with its own
status, quietly: 0 here, since each succeeds; a run's says how the run went. Not 1 (DESIGN's
"anything else", a failure) nor 141 (outside its codes): under ``set -o pipefail``,
`gpubatch status OUT | grep -q finished` is a finished run, not a failed command. (A terminal
that hangs up under a run, EIO on every write: tests/test_hangup.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import slide_job, synthetic_slides, write_job
from terminal import Terminal

import gpubatch
from gpubatch.core.results import ShardResult
from gpubatch.runtime.progress import Progress

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, classifier: Path) -> dict[str, Path]:
    """Two small slides, a job over them and its finished output; a genome to ingest."""
    from gpubatch.cli.demo import write_synthetic_genome

    folder = tmp_path_factory.mktemp("gone")
    slides = synthetic_slides(folder, 2, seed=31, prefix="g")
    job = write_job(folder / "job.yaml", slide_job([str(slides / "g*.tif")], classifier, folder / "out"))
    assert gpubatch.run(job, show_progress=False).exit_code == 0
    fasta = write_synthetic_genome(folder / "g.fa", {"chr1": 3000}, seed=2)
    return {"folder": folder, "job": job, "out": folder / "out", "slide": slides / "g0.tif", "fasta": fasta}


def with_closed_stdout(*args: str | Path, stderr_too: bool = False) -> subprocess.CompletedProcess[str]:
    """``python -m gpubatch ARGS`` with stdout (and stderr, ``stderr_too``) a pipe whose reader
    has gone before the first write; buffered, as a user's pipe is."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = str(REPO)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "gpubatch", *map(str, args)], stdout=write_end,
                              stderr=write_end if stderr_too else subprocess.PIPE, text=True, timeout=300, env=env)
    finally:
        os.close(write_end)


def assert_quiet(done: subprocess.CompletedProcess[str]) -> None:
    """Exit 0, and nothing on stderr about the pipe (a traceback, Python's "Exception ignored")."""
    err = done.stderr or ""
    assert done.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err and "Broken pipe" not in err, err[-3000:]


@pytest.mark.parametrize("command", ["report", "status", "inspect output", "inspect slide", "validate", "help"])
def test_a_command_whose_reader_went_away_exits_quietly_with_its_own_status(
        finished: dict[str, Path], tmp_path: Path, command: str) -> None:
    args = {"report": ["report", finished["out"]], "status": ["status", finished["out"]],
            "inspect output": ["inspect", finished["out"]], "inspect slide": ["inspect", finished["slide"]],
            "validate": ["validate", finished["job"], "--set", f"output.uri={tmp_path / 'new'}"],
            "help": ["--help"]}[command]
    assert_quiet(with_closed_stdout(*args))


def test_report_html_is_written_though_no_one_reads_the_summary(finished: dict[str, Path]) -> None:
    html = finished["out"] / "report.html"
    html.unlink()
    assert_quiet(with_closed_stdout("report", finished["out"], "--html"))
    assert html.is_file() and "<html" in html.read_text()


def test_an_ingest_whose_reader_went_away_writes_its_store(finished: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "g.zarr"
    assert_quiet(with_closed_stdout("ingest", "genome", finished["fasta"], store))
    assert (store / "zarr.json").is_file() or (store / ".zgroup").is_file()


@pytest.mark.parametrize("stderr_too", [False, True])
def test_a_run_whose_reader_went_away_finishes_and_says_so_by_its_exit_status(
        finished: dict[str, Path], tmp_path: Path, stderr_too: bool) -> None:
    """`gpubatch run JOB | less`, quit at once (and `2>&1 |`): the run finished, its outputs
    written, and exited 1 with a BrokenPipeError at its summary's print."""
    out = tmp_path / "out"
    assert_quiet(with_closed_stdout("run", finished["job"], "--set", f"output.uri={out}", stderr_too=stderr_too))
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "finished" and status["done"] == status["total"] == 2, status
    assert (out / "predictions.parquet").is_file() and (out / "report.json").is_file()


def test_run_piped_on_a_terminal_prints_its_summary_first_and_its_bar_on_the_terminal(
        finished: dict[str, Path], tmp_path: Path) -> None:
    """`gpubatch run JOB | head -1` on a terminal: the bar is chosen by stderr being a terminal,
    but rich drew it on stdout: the pipe's first line was the bar's last frame, not the summary,
    and the terminal showed no bar."""
    term = Terminal("run", str(finished["job"]), "--set", f"output.uri={tmp_path / 'out'}", stdout=subprocess.PIPE)
    try:
        printed = term.proc.communicate(timeout=300)[0].decode()
    finally:
        term.hang_up()
        term.kill()
    assert term.proc.returncode == 0, printed
    assert printed.splitlines()[0].startswith("test: "), printed[:500]
    assert "shards" not in printed.splitlines()[0]
    assert b"shards" in term.shown and b"items/s" in term.shown


def test_the_progress_bar_outlives_a_terminal_that_hung_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run from Python (``gpubatch.run``) under ``nohup`` without a redirect: the bar's writes to
    the hung-up terminal failed (EIO) at its last refresh and failed the run; on a closed pipe,
    rich's own remedy exits the process (SystemExit 1). The bar goes quiet instead."""
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        monkeypatch.setattr(sys, "stdout", tty)
        monkeypatch.setattr(sys, "stderr", tty)
        bar = Progress(2, enabled=True)
        os.close(master)  # the terminal hangs up: every write to it fails with EIO
        for shard in ("a", "b"):
            bar.update(ShardResult.from_dict({"shard_id": shard, "input": shard, "items": 5, "wall_s": 1.0}))
            bar.tick()
        bar.close()
        assert (bar.done, bar.items) == (2, 10)
