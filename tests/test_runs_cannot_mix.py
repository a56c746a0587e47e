"""Runs that cannot mix: resume checks identity, a second run needs --resume or --overwrite, a
lease keeps two runs out of one output, the output folder is guarded, and a finished output holds
no temporaries. Real runs through the CLI and the Python API, on local folders."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
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
from gpubatch.cli.demo import make_classifier, write_synthetic_slide
from gpubatch.core.errors import SpecError
from gpubatch.outputs.layout import MARKER, TMP_PREFIX

N_SLIDES = 6


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_slides(tmp_path_factory.mktemp("mix"), N_SLIDES, 300, "s")


def _job(tmp_path: Path, slides: Path, model: Path, out: str = "out", **run: object) -> Path:
    job = slide_job([str(slides / "*.tif")], model, tmp_path / out, run={"readers": 1, **run})
    job["tiles"] = {"size": 32, "level": 0, "tissue": {"method": "none"}}
    job["model"]["batch_size"] = 8
    return write_job(tmp_path / f"{out}.yaml", job)


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["slide", "x", "y"]).reset_index(drop=True)


def test_a_second_run_needs_resume_or_overwrite(tmp_path: Path, slides: Path, classifier: Path) -> None:
    job = _job(tmp_path, slides, classifier)
    first = gpubatch.run(job)
    proc = cli("run", str(job))
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2 and "--resume" in log and "--overwrite" in log, log
    audit_before = (tmp_path / "out" / "audit.jsonl").read_text()
    again = gpubatch.run(job, resume=True)  # everything committed: nothing recomputed
    assert again.report["shard_stats"]["resumed"] == N_SLIDES and again.exit_code == 0
    assert len(audit_lines(tmp_path / "out")) == N_SLIDES
    assert (tmp_path / "out" / "audit.jsonl").read_text().startswith(audit_before.splitlines()[0])
    fresh = gpubatch.run(job, overwrite=True)
    assert fresh.report["shard_stats"]["resumed"] == 0
    pd.testing.assert_frame_equal(_sorted(fresh.predictions()), _sorted(first.predictions()))


def test_resume_refuses_a_result_changing_spec_naming_the_field(tmp_path: Path, slides: Path,
                                                                classifier: Path) -> None:
    job = _job(tmp_path, slides, classifier)
    gpubatch.run(job)
    proc = cli("run", str(job), "--resume", "--set", "tiles.size=16")
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2 and "tiles.size: 32 committed, 16 now" in log, log
    assert "--overwrite" in log


def test_resume_refuses_another_model_naming_its_sha(tmp_path: Path, slides: Path, classifier: Path) -> None:
    job = _job(tmp_path, slides, classifier)
    gpubatch.run(job)
    other = make_classifier(tmp_path / "other.onnx", seed=7)
    with pytest.raises(SpecError, match=r"model: sha256 [0-9a-f]{12}\.\.\. committed, [0-9a-f]{12}\.\.\. now"):
        gpubatch.run(job, resume=True, model__path=str(other))


def test_an_input_replaced_between_runs_is_recomputed(tmp_path: Path, slides: Path, classifier: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for p in sorted(slides.glob("*.tif"))[:3]:
        (inputs / p.name).write_bytes(p.read_bytes())
    job = _job(tmp_path, inputs, classifier)
    first = _sorted(gpubatch.run(job).predictions())
    replaced = inputs / "s1.tif"
    write_synthetic_slide(replaced, 768, 512, seed=999, levels=2)  # same name, other pixels
    logger = logging.getLogger("gpubatch")  # an in-process CLI run may have stopped its propagation
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("WARNING", logger="gpubatch"):
            again = gpubatch.run(job, resume=True)
    finally:
        logger.removeHandler(caplog.handler)
    assert "input changed since it was committed" in caplog.text and "s1.tif" in caplog.text
    assert again.report["shard_stats"]["resumed"] == 2
    second = _sorted(again.predictions())
    changed = second["slide"].str.endswith("s1.tif")
    assert not np.allclose(second.loc[changed, "probs_0"], first.loc[changed, "probs_0"])
    pd.testing.assert_frame_equal(second[~changed], first[~changed])
    superseded = audit_lines(tmp_path / "out", "shard_superseded")
    assert len(superseded) == 1 and superseded[0]["input"].endswith("s1.tif")
    assert len(audit_lines(tmp_path / "out")) == 3


def test_a_held_output_refuses_a_second_run_naming_the_holder(tmp_path: Path, slides: Path,
                                                             classifier: Path) -> None:
    slow = _job(tmp_path, slides, classifier, profile="inline", heartbeat_s=0.5)
    holder = cli("run", str(slow), "--set", "run.prefetch_batches=1", "--set", "model.batch_size=1")
    wait_for(lambda: (tmp_path / "out" / "_lease.json").exists(), 60, "the first run's lease")
    second = cli("run", str(slow), "--resume")
    log = second.communicate(timeout=60)[0]
    assert second.returncode == 2 and "another run is writing this output" in log, log
    lease = json.loads((tmp_path / "out" / "_lease.json").read_text())
    assert f"pid {lease['pid']}" in log and lease["host"] in log
    assert holder.communicate(timeout=300)[1] is None and holder.returncode == 0
    assert not (tmp_path / "out" / "_lease.json").exists()


@pytest.mark.parametrize("uri", ["/", ".", "", "~"])
def test_outputs_that_are_not_a_dedicated_folder_are_refused(tmp_path: Path, slides: Path, classifier: Path,
                                                             uri: str) -> None:
    job = json.loads(json.dumps(slide_job([str(slides / "s0.tif")], classifier, tmp_path / "x")))
    job["output"]["uri"] = str(Path.home()) if uri == "~" else uri
    with pytest.raises(SpecError, match="output.uri"):
        gpubatch.run(gpubatch.spec.parse_job(job))


def test_a_folder_gpubatch_did_not_make_is_refused_and_left_alone(tmp_path: Path, slides: Path,
                                                                 classifier: Path) -> None:
    foreign = tmp_path / "project"
    (foreign / "_parts").mkdir(parents=True)
    (foreign / "_parts" / "important.parquet").write_bytes(b"mine")
    (foreign / "notes.txt").write_text("mine")
    job = slide_job([str(slides / "s0.tif")], classifier, foreign)
    for flags in ({}, {"overwrite": True}):
        with pytest.raises(SpecError, match="did not write"):
            gpubatch.run(write_job(tmp_path / "job.yaml", job), **flags)
    assert (foreign / "_parts" / "important.parquet").read_bytes() == b"mine"
    assert sorted(p.name for p in foreign.rglob("*")) == ["_parts", "important.parquet", "notes.txt"]
    as_file = tmp_path / "file-output"
    as_file.write_text("x")
    with pytest.raises(SpecError, match="is a file"):
        gpubatch.run(write_job(tmp_path / "job2.yaml", slide_job([str(slides / "s0.tif")], classifier, as_file)))


def test_a_new_output_another_run_is_marking_this_instant_is_not_called_foreign(tmp_path: Path, slides: Path,
                                                                                 classifier: Path) -> None:
    """Two runs started at once on a new output (two threads of a notebook, two terminals): the
    one that looked while the other's marker was still under its temporary name was refused as
    if the folder held a user's files ("holds files that gpubatch did not write; give an empty or
    new folder"), not by the lease that names the run writing it. A user's file beside such a
    temporary is still refused."""
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{TMP_PREFIX}1a2b3c4d-{MARKER}").write_text("{}")  # the other run's marker, an instant before its rename
    job = write_job(tmp_path / "job.yaml", slide_job([str(slides / "s0.tif")], classifier, out))
    assert gpubatch.run(job, show_progress=False).exit_code == 0
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / f"{TMP_PREFIX}1a2b3c4d-{MARKER}").write_text("{}")
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SpecError, match="did not write"):
        gpubatch.run(write_job(tmp_path / "f.yaml", slide_job([str(slides / "s0.tif")], classifier, foreign)))


def test_overwrite_removes_only_what_gpubatch_wrote(tmp_path: Path, slides: Path, classifier: Path) -> None:
    job = _job(tmp_path, slides, classifier)
    gpubatch.run(job)
    mine = tmp_path / "out" / "my-notes.txt"
    mine.write_text("keep me")
    gpubatch.run(job, overwrite=True)
    assert mine.read_text() == "keep me" and (tmp_path / "out" / MARKER).exists()


def test_a_finished_output_holds_no_temporaries_or_stray_attempts(tmp_path: Path, slides: Path,
                                                                  classifier: Path) -> None:
    out = tmp_path / "out"
    job = _job(tmp_path, slides, classifier, profile="inline")
    killed = cli("run", str(job), "--set", "model.batch_size=1", start_new_session=True)
    wait_for(lambda: committed_count(out) >= 2, 120, "two commits")
    killed.kill()
    killed.wait()
    stray = next((out / "_parts").glob("*.parquet")).with_name("s9-adeadbeef00.parquet")
    stray.write_bytes(b"half a part")  # what a worker killed mid-write leaves
    time.sleep(0.1)
    result = gpubatch.run(job, resume=True)
    assert result.exit_code == 0
    names = [p.name for p in out.rglob("*")]
    assert not [n for n in names if n.startswith(TMP_PREFIX)] and stray.name not in names
    records = json.loads((out / "predictions.zarr" / "zarr.json").read_text())["attributes"]
    parts = sorted(p.name for p in (out / "_parts").iterdir())
    assert len(parts) == N_SLIDES and len(records["groups"]) == N_SLIDES
    assert sorted(p.name for p in (out / "predictions.zarr").iterdir() if p.is_dir()) == sorted(records["groups"].values())


def test_a_run_still_preparing_its_model_keeps_its_lease(tmp_path: Path, slides: Path, classifier: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The lease is beaten from the moment it is taken. Its heartbeat started only with the
    shards, after the resume's checks and the model's preparation (quantization, a TensorRT
    build: minutes), so a second run started meanwhile took a live run's lease over as stale,
    and the two wrote one output."""
    import threading

    from gpubatch.models import prepare

    job = _job(tmp_path, slides, classifier, profile="inline", heartbeat_s=0.1, lease_stale_s=0.5)
    preparing, go_on = threading.Event(), threading.Event()
    real_prepare = prepare.prepare_model

    def slow_prepare(*args: object, **kwargs: object) -> object:
        if not preparing.is_set():  # the first run's preparation lasts until the test is done
            preparing.set()
            assert go_on.wait(60)
        return real_prepare(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(prepare, "prepare_model", slow_prepare)
    first: list[object] = []
    holder = threading.Thread(target=lambda: first.append(gpubatch.run(job, show_progress=False)), daemon=True)
    holder.start()
    try:
        assert preparing.wait(60)
        time.sleep(1.0)  # twice run.lease_stale_s with the first run alive, preparing
        with pytest.raises(SpecError, match="another run is writing this output"):
            gpubatch.run(job, resume=True, show_progress=False)
    finally:
        go_on.set()
        holder.join(120)
    assert first and first[0].exit_code == 0  # type: ignore[attr-defined]
    assert len(audit_lines(tmp_path / "out")) == N_SLIDES


def test_a_run_whose_lease_was_taken_over_stops_and_leaves_the_output_to_the_new_one(
        tmp_path: Path, slides: Path, classifier: Path) -> None:
    """A run suspended (Ctrl-Z) past run.lease_stale_s is taken over by the next run, rightly:
    its heartbeat stopped. Continued, it kept beating its lease over the new run's and both ran
    into one output, each sweeping the other's attempts at its end. Now its next heartbeat sees
    the lease is another run's: it stops, exit 1, naming that run, and writes nothing more of
    the output's own (status, audit); the new run finishes it."""
    import os
    import signal

    job = _job(tmp_path, slides, classifier, profile="inline", heartbeat_s=0.2, lease_stale_s=1.0)
    out = tmp_path / "out"
    first = cli("run", str(job), "--set", "model.batch_size=1", "--set", "run.prefetch_batches=1")
    try:
        wait_for(lambda: committed_count(out) >= 1, 120, "the first run's first commit")
        os.kill(first.pid, signal.SIGSTOP)
        assert committed_count(out) < N_SLIDES, "the first run had finished its shards before it was stopped"
        time.sleep(1.5)
        second = cli("run", str(job), "--resume", "--set", "model.batch_size=1")
        wait_for(lambda: json.loads((out / "_lease.json").read_text()).get("pid") == second.pid, 60,
                 "the second run's lease")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    log = first.communicate(timeout=120)[0]
    assert first.returncode == 1 and "took this output over" in log and f"pid {second.pid}" in log, log
    second_log = second.communicate(timeout=300)[0]
    assert second.returncode == 0, second_log
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "finished" and status["done"] == N_SLIDES
    df = pd.read_parquet(out / "predictions.parquet")
    assert not df.duplicated(["slide", "x", "y"]).any() and df["slide"].nunique() == N_SLIDES
    assert len(audit_lines(out)) == N_SLIDES


def test_a_run_taken_over_unseen_by_its_heartbeat_stops_before_its_end(
        tmp_path: Path, slides: Path, classifier: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run continued after a suspension can reach its end before its heartbeat thread has read
    the lease: the end checked only the flag that thread sets, so it swept what its own commits
    did not name (the other run's attempts) and merged, and the suspended run of the test above
    finished with exit 0 over the run that had taken it over. The end reads the lease itself."""
    from gpubatch.outputs.lease import LeaseLost
    from gpubatch.runtime import runner

    job = _job(tmp_path, slides, classifier, profile="inline", heartbeat_s=30.0, lease_stale_s=90.0)
    out = tmp_path / "out"
    theirs = out / "_parts" / "s9-adeadbeef00.parquet"
    real = runner.raise_if_stopped

    def taken_over_meanwhile() -> None:  # the shards are done; the heartbeat has not looked since
        (out / "_lease.json").write_text(json.dumps({"run_id": "run-b", "host": "elsewhere", "pid": 1,
                                                     "heartbeat": time.time(), "stale_after_s": 90.0}))
        theirs.write_bytes(b"run-b's attempt, in flight")
        real()

    monkeypatch.setattr(runner, "raise_if_stopped", taken_over_meanwhile)
    with pytest.raises(LeaseLost, match="run run-b on host elsewhere"):
        gpubatch.run(job, show_progress=False)
    assert theirs.exists() and not (out / "predictions.parquet").exists()
    assert json.loads((out / "_lease.json").read_text())["run_id"] == "run-b"
    assert json.loads((out / "status.json").read_text()).get("state") != "finished"


def test_status_says_a_run_is_starting_while_it_prepares(tmp_path: Path, slides: Path, classifier: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Before its shards, a run checks the output and prepares its model (minutes for a TensorRT
    build) and status.json is not yet its own: `status` said "no run has started there" (exit
    2) for a new output, and for a resume the killed run's "interrupted ... --resume"."""
    import threading

    from gpubatch.cli.main import main
    from gpubatch.models import prepare

    job = _job(tmp_path, slides, classifier, profile="inline", heartbeat_s=0.2)
    preparing, go_on = threading.Event(), threading.Event()
    real_prepare = prepare.prepare_model

    def slow_prepare(*args: object, **kwargs: object) -> object:
        preparing.set()
        assert go_on.wait(60)
        return real_prepare(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(prepare, "prepare_model", slow_prepare)
    holder = threading.Thread(target=lambda: gpubatch.run(job, show_progress=False), daemon=True)
    holder.start()
    try:
        assert preparing.wait(60)
        capsys.readouterr()
        assert main(["status", str(tmp_path / "out")]) == 0
        assert capsys.readouterr().out.startswith("starting: run ")
    finally:
        go_on.set()
        holder.join(120)
    assert main(["status", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.startswith(f"finished: {N_SLIDES}/{N_SLIDES} shards done")
