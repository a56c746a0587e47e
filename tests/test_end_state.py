"""What an output says of itself at the ends of a run that are not a clean finish.

A run interrupted after some commits left predictions.zarr with groups but no root attributes
(or a finished run's stale ones): a reader of the zarr could not tell the committed groups from a
killed attempt's. And while a run merged its parts at the end (minutes at thousands of shards),
`gpubatch status` said "ETA 0 s" rather than that the run was finishing, and with what."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zarr
from conftest import cli, windows_job

import gpubatch
from gpubatch.runtime import progress as progress_module
from gpubatch.runtime import runner

SHARDS = 6
OVERRIDES: dict[str, Any] = {"output__formats": ["zarr", "parquet"], "run__heartbeat_s": 0.3}


def _root_attrs(out: Path) -> dict[str, Any]:
    return dict(zarr.open_group(str(out / "predictions.zarr"), mode="r").attrs)


def _committed_groups(out: Path) -> dict[str, str]:
    records = [json.loads(p.read_text()) for p in (out / "_manifest").glob("*.json")]
    return {r["shard_id"]: r["group"] for r in records}


def test_an_interrupted_run_describes_its_committed_zarr_groups_and_a_resume_finishes_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C (a real SIGINT to this process) after the second commit: the zarr root lists
    exactly the committed shards' groups, by shard id, marked complete: false; the --resume that
    finishes the run rewrites it as finished, with every shard."""
    job, out = windows_job(tmp_path, SHARDS), tmp_path / "out"
    update = progress_module.Progress.update

    def interrupt_after_two(self: progress_module.Progress, result: Any) -> None:
        update(self, result)
        if self.done == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(progress_module.Progress, "update", interrupt_after_two)
    with pytest.raises(KeyboardInterrupt):
        gpubatch.run(job, **OVERRIDES)
    monkeypatch.undo()

    committed = _committed_groups(out)
    assert 2 <= len(committed) < SHARDS
    # commits that landed after the Ctrl-C (the other shard thread's) are counted: status.json
    # said 2 done where the zarr root and `gpubatch report` said 4
    status = json.loads((out / "status.json").read_text())
    assert status["done"] == len(committed) and status["items"] == len(committed), status
    line = cli("status", str(out)).communicate(timeout=60)[0]  # the bare "; interrupted" said no next step
    assert line.startswith(f"interrupted: {len(committed)}/{SHARDS} shards done"), line
    assert "finish it with `gpubatch run JOB --resume`" in line, line
    attrs = _root_attrs(out)
    assert attrs["complete"] is False and attrs["state"] == "interrupted"
    assert attrs["shards"] == sorted(committed) and attrs["groups"] == committed
    assert attrs["kind"] == "genome" and attrs["model_sha256"]
    root = zarr.open_group(str(out / "predictions.zarr"), mode="r")
    assert all(root[group]["start"].shape == (1,) for group in committed.values())  # one window each

    result = gpubatch.run(job, resume=True, **OVERRIDES)
    assert result.exit_code == 0
    finished = _root_attrs(out)
    assert finished["complete"] is True and finished["state"] == "finished"
    assert len(finished["shards"]) == SHARDS and finished["groups"] == _committed_groups(out)
    assert all(finished["groups"][sid] == group for sid, group in committed.items())  # kept, not redone
    assert finished["model_sha256"] == attrs["model_sha256"]


def test_status_says_a_run_whose_shards_are_over_is_finishing_and_with_what(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's end held at its merge (an Event), while `gpubatch status` runs in another
    process: it names the step under way, and gives no ETA (it said "ETA 0 s")."""
    job, out = windows_job(tmp_path, SHARDS), tmp_path / "out"
    held, release, said = threading.Event(), threading.Event(), []
    merge = runner.merge_parquet

    def held_merge(*args: Any, **kwargs: Any) -> Any:
        held.set()
        assert release.wait(120), "the test never released the run's end"
        return merge(*args, **kwargs)

    def status_while_held() -> None:
        try:
            assert held.wait(120), "the run's end never reached the merge"
            since = time.time()  # a heartbeat written after the hold began (one every 0.3 s)
            deadline = since + 30
            while json.loads((out / "status.json").read_text())["heartbeat"] <= since + 0.1:
                assert time.time() < deadline, "no heartbeat while the run's end was held"
                time.sleep(0.05)
            said.append(cli("status", str(out)).communicate(timeout=60)[0])
        finally:
            release.set()

    monkeypatch.setattr(runner, "merge_parquet", held_merge)
    watcher = threading.Thread(target=status_while_held, daemon=True)
    watcher.start()
    assert gpubatch.run(job, **OVERRIDES).exit_code == 0
    watcher.join(60)
    (line,) = said
    assert line.startswith(f"running: {SHARDS}/{SHARDS} shards done"), line
    assert "ETA" not in line, line
    assert f"finishing the run: merging the parts into predictions.parquet (0 of {SHARDS} parts, " in line, line
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "finished" and "ending" not in status


def test_a_resume_of_a_finished_output_says_its_zarr_is_not_complete_while_it_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A --resume removes report.json and report.html as it begins (they said finished), but the
    zarr root went on saying ``complete: true`` until the resume's own end rewrote it, though a
    resume may sweep and recompute groups meanwhile. It says running from the resume's start."""
    from gpubatch.models import prepare

    job, out = windows_job(tmp_path, SHARDS), tmp_path / "out"
    assert gpubatch.run(job, **OVERRIDES).exit_code == 0
    assert _root_attrs(out)["complete"] is True
    seen: list[dict[str, Any]] = []
    readers: list[tuple[dict[str, Any], str]] = []
    real_prepare = prepare.prepare_model

    def prepare_seeing_the_root(*args: Any, **kwargs: Any) -> Any:  # after the resume's checks
        seen.append(_root_attrs(out))
        # status.json is still the finished run's: the readers said the output's latest run had
        # finished ("latest run: finished") while this one held it
        readers.append((gpubatch.open_results(str(out)).report, cli("report", str(out)).communicate(timeout=60)[0]))
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(prepare, "prepare_model", prepare_seeing_the_root)
    assert gpubatch.run(job, resume=True, **OVERRIDES).exit_code == 0
    (during,) = seen
    assert during["complete"] is False and during["state"] == "running"
    ((report, said),) = readers
    assert report["state"] == "running" and report["complete"] is False, report["state"]
    first = said.splitlines()[0]
    assert f"latest run: running; {SHARDS} of {SHARDS} shard(s) committed" in first, first
    assert f"run {report['run_id']} is writing it now: wait for it to finish" in first, first
    after = _root_attrs(out)
    assert after["complete"] is True and after["state"] == "finished" and len(after["shards"]) == SHARDS


def test_readers_of_an_output_whose_run_stopped_before_its_shards_say_it_never_started(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that made its output and failed while preparing its model leaves the marker and no
    status.json: `status` said "no run has started there" with exit 2 (a usage error) and
    `report` "latest run: unknown". Both say the run did not start its shards, exit 0."""
    from gpubatch.models import prepare

    job, out = windows_job(tmp_path, SHARDS), tmp_path / "out"

    def fails(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the model's preparation failed")

    monkeypatch.setattr(prepare, "prepare_model", fails)
    with pytest.raises(RuntimeError):
        gpubatch.run(job, **OVERRIDES)
    assert not (out / "status.json").exists() and (out / ".gpubatch-output").exists()
    status = cli("status", str(out))
    line = status.communicate(timeout=60)[0]
    assert status.returncode == 0 and line.startswith("not started: no run wrote status.json"), line
    assert "run the job again" in line, line
    report = cli("report", str(out))
    first = report.communicate(timeout=60)[0].splitlines()[0]
    assert report.returncode == 0 and "latest run: not started; 0 of ? shard(s) committed" in first, first
    assert gpubatch.open_results(str(out)).report["state"] == "not started"
