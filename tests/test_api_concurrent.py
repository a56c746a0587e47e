"""Runs at once in one process (a notebook's threads, its cells run again): what each run's
report says is what that run did, and a Ctrl-C meant for one run stops that one only."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import slide_job, upload_slides, write_job

if TYPE_CHECKING:
    from s3_fixtures import S3Stack

pytest_plugins = ["s3_fixtures"]


def _storage_counts(report: dict[str, Any]) -> dict[str, float]:
    """A report's counts of storage requests, HEADs, bytes and retries (its timings left out)."""
    kept = ("storage.requests", "storage.heads", "storage.client_", "storage.ops.", "storage.bytes",
            "storage.retries", "storage.library_retries")
    return {k: v for k, v in report["counters"].items() if k.startswith(kept)}


def test_two_runs_at_once_each_report_only_their_own_storage_requests(
        tmp_path: Path, s3: S3Stack, slides_dir: Path, mean_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run over slides on S3 and, started in another thread while it ran, one over local
    slides: the requests each made were counted per process and claimed by whichever run
    asked next, so the local run's report said it sent the other's S3 GETs and HEADs, and the
    S3 run's lost them (each run's start also dropped what the other had not claimed yet)."""
    import gpubatch
    from gpubatch.runtime.progress import Progress
    from gpubatch.runtime.runner import _Run

    remote = slide_job([f"{upload_slides(s3, slides_dir)}/*.tif"], mean_model, tmp_path / "alone")
    remote["input"].update(storage=s3.options(), access="stream")
    remote_job = write_job(tmp_path / "remote.yaml", remote)
    alone = _storage_counts(gpubatch.run(remote_job, show_progress=False).report)
    assert alone.get("storage.ops.head", 0) > 0 and alone.get("storage.heads", 0) >= 0, alone
    local_job = write_job(tmp_path / "local.yaml", slide_job([str(slides_dir / "s0.tif")], mean_model, tmp_path / "b"))
    claim, update = _Run._claim_client_requests, Progress.update
    remote_planned, local_done, remote_reports = threading.Event(), threading.Event(), []

    def claim_after_the_local_run(self: _Run) -> None:  # the remote run's plan counted, not claimed
        if threading.current_thread().name == "remote" and not remote_planned.is_set():
            remote_planned.set()
            local_done.wait(120)
        claim(self)

    def remote_run() -> None:
        remote_reports.append(gpubatch.run(remote_job, show_progress=False, output__uri=str(tmp_path / "a")).report)

    remote = threading.Thread(target=remote_run, name="remote")

    def update_then_start_remote(self: Progress, result: Any) -> None:
        update(self, result)
        if threading.current_thread() is threading.main_thread() and not remote.is_alive() and not remote_reports:
            remote.start()
            remote_planned.wait(120)

    monkeypatch.setattr(_Run, "_claim_client_requests", claim_after_the_local_run)
    monkeypatch.setattr(Progress, "update", update_then_start_remote)
    local_result = gpubatch.run(local_job, show_progress=False)
    local_done.set()
    remote.join(120)
    assert local_result.exit_code == 0 and len(remote_reports) == 1
    local = _storage_counts(local_result.report)
    assert not {k: v for k, v in local.items() if k.startswith(("storage.ops.", "storage.client_ops."))}, local
    assert local.get("storage.heads", 0) == 0, local
    assert _storage_counts(remote_reports[0]) == alone


def test_a_ctrl_c_stops_the_main_thread_s_run_not_another_thread_s(
        tmp_path: Path, slides_dir: Path, mean_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A notebook's interrupt while a cell's run went on in a thread beside the main thread's:
    the signal was latched process-wide and the thread's run, asking at its next poll, raised
    KeyboardInterrupt too (the README says a run in another thread goes on to its end). Now
    the main thread's run stops, resumable, and the other finishes every slide."""
    import os
    import signal

    import gpubatch
    from gpubatch.runtime import stopping
    from gpubatch.runtime.progress import Progress

    slides = [str(p) for p in sorted(slides_dir.glob("*.tif"))]
    main_job = write_job(tmp_path / "main.yaml", slide_job(slides, mean_model, tmp_path / "main"))
    side_job = write_job(tmp_path / "side.yaml", slide_job(slides, mean_model, tmp_path / "side"))
    update, side_outcome, side_done = Progress.update, [], threading.Event()

    def side_run() -> None:
        try:
            side_outcome.append(gpubatch.run(side_job, show_progress=False).exit_code)
        except BaseException as exc:  # noqa: BLE001 - what the thread's run raised is the finding
            side_outcome.append(type(exc).__name__)
        finally:
            side_done.set()

    side = threading.Thread(target=side_run, name="side")

    def update_in_turn(self: Progress, result: Any) -> None:
        update(self, result)
        if threading.current_thread() is threading.main_thread() and not side.is_alive() and not side_outcome:
            side.start()
            try:
                side_done.wait(120)
            except KeyboardInterrupt:  # the main run stops only once the side run has ended
                side_done.wait(120)
                raise
        elif threading.current_thread() is side and not stopping._received:
            os.kill(os.getpid(), signal.SIGINT)
            deadline = threading.Event()
            while not stopping._received and not deadline.wait(0.01):
                pass

    monkeypatch.setattr(Progress, "update", update_in_turn)
    with pytest.raises(KeyboardInterrupt):
        gpubatch.run(main_job, show_progress=False)
    assert side_outcome == [0]
    assert gpubatch.open_results(tmp_path / "side").predictions()["slide"].nunique() == 3
    assert gpubatch.run(main_job, show_progress=False, resume=True).complete


def test_an_inline_run_s_profile_storage_options_are_not_the_caller_s_after_it(
        tmp_path: Path, slide_path: Path, mean_model: Path) -> None:
    """An inline run's shards apply the profile's ``storage`` options and ``range_reader`` to
    the calling process, where they stayed for good: a notebook's later open_results and the
    next run's plan read with that profile's options (its credentials too). Run twice, in case
    the second took settings the first left; the caller's are as they were after each."""
    import gpubatch
    from gpubatch.io import storage_profile as storage

    profile = tmp_path / "inline-s3.yaml"
    profile.write_text("cluster: inline\nworkers: 1\nrange_reader: fsspec\n"
                       "storage:\n  key: profile-key\n  secret: profile-secret\n")
    job = write_job(tmp_path / "job.yaml", slide_job([str(slide_path)], mean_model, tmp_path / "out",
                                                     run={"profile": str(profile)}))
    before = (dict(storage._profile_options), dict(storage._settings))
    for again in (False, True):
        assert gpubatch.run(job, show_progress=False, overwrite=again).exit_code == 0
        assert (storage._profile_options, storage._settings) == before


def test_a_ctrl_c_as_a_run_ends_releases_its_lease_and_the_next_run_goes_on(
        tmp_path: Path, slides_dir: Path, mean_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C landing in the run's last steps, before its lease was released: the lease stayed
    held and its heartbeat thread beat it for the life of the process, so the notebook's next
    run into that output was refused ("another run is writing this output ... in this same
    process"), as was any other process's. Now the lease is released, then the interrupt raised."""
    import os
    import signal

    import gpubatch
    from gpubatch.outputs.commits import CommitIndex
    from gpubatch.outputs.layout import LEASE

    close, sent = CommitIndex.close, []

    def interrupted_close(self: CommitIndex) -> None:
        if not sent:
            sent.append(signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        close(self)

    monkeypatch.setattr(CommitIndex, "close", interrupted_close)
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", slide_job([str(p) for p in sorted(slides_dir.glob("*.tif"))],
                                                     mean_model, out))
    with pytest.raises(KeyboardInterrupt):
        gpubatch.run(job, show_progress=False)
    assert sent and not (out / LEASE).exists()
    assert "gpubatch-heartbeat" not in {t.name for t in threading.enumerate()}
    again = gpubatch.run(job, show_progress=False, resume=True)
    assert again.exit_code == 0 and again.complete


def _held_by_the_process() -> dict[str, Any]:
    """What a run could leave behind in its process, counted: descriptors, threads (less the
    pools that grow to their bound as they are busy: zarr's asyncio loop, the identity lookups),
    logging handlers and filters on every logger, import paths, the storage settings."""
    import gc
    import logging
    import os
    import sys

    from gpubatch.io import storage_profile as storage

    gc.collect()
    pooled = ("asyncio_", "gpubatch-identity_", "gpubatch-open_", "gpubatch-preopen_", "gpubatch-ahead_")
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)] + [logging.root]
    return {"fds": len(os.listdir("/proc/self/fd")),
            "threads": sorted(t.name for t in threading.enumerate() if not t.name.startswith(pooled)),
            "handlers": sum(len(lg.handlers) for lg in loggers if isinstance(lg, logging.Logger)),
            "filters": sum(len(lg.filters) for lg in loggers if isinstance(lg, logging.Logger)),
            "sys.path": len(sys.path), "storage": [storage._profile_options, storage._settings]}


def test_an_inline_job_run_again_and_again_in_one_process_holds_nothing_more(
        tmp_path: Path, slides_dir: Path, mean_model: Path) -> None:
    """A notebook re-running an inline job's cell (a new output each time): after the first
    run, each later one leaves the process holding what the first left, read back included."""
    import gpubatch

    job = write_job(tmp_path / "job.yaml", slide_job([str(p) for p in sorted(slides_dir.glob("*.tif"))],
                                                     mean_model, tmp_path / "unused"))
    seen = []
    for i in range(6):
        result = gpubatch.run(job, show_progress=False, output__uri=str(tmp_path / f"out{i}"))
        assert result.exit_code == 0 and len(gpubatch.open_results(result.output_uri).predictions()) > 0
        del result
        seen.append(_held_by_the_process())
    assert seen[1:] == [seen[0]] * 5, seen


def test_a_ctrl_c_as_the_lease_is_taken_releases_it(tmp_path: Path, slides_dir: Path, mean_model: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C landing as the run had just taken its lease (a remote store's acquire waits a
    while to read it back) left the lease held with no one to release it: the next run in the
    process was refused as "another run ... in this same process" until it went stale."""
    import os
    import signal

    import gpubatch
    from gpubatch.outputs.layout import LEASE
    from gpubatch.outputs.lease import Lease

    acquire = Lease.acquire

    def acquire_then_interrupt(self: Lease) -> None:
        acquire(self)
        os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", slide_job([str(slides_dir / "s0.tif")], mean_model, out))
    with monkeypatch.context() as patch:
        patch.setattr(Lease, "acquire", acquire_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            gpubatch.run(job, show_progress=False)
    assert not (out / LEASE).exists()
    assert gpubatch.run(job, show_progress=False, resume=True).complete


def test_a_refused_run_holds_no_descriptor_while_its_error_is_kept(tmp_path: Path, slides_dir: Path,
                                                                   mean_model: Path) -> None:
    """A run refused because another holds the output kept its commit index (an open SQLite
    file) for as long as the caller kept the error: a notebook keeps the last one, with its
    traceback's frames."""
    import gc
    import os

    import gpubatch
    from gpubatch.outputs.lease import Lease
    from gpubatch.outputs.store import OutputStore

    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", slide_job([str(slides_dir / "s0.tif")], mean_model, out))
    assert gpubatch.run(job, show_progress=False).complete
    holder = Lease(OutputStore(str(out)), "another-run", stale_s=120.0, heartbeat_s=5.0)
    holder.acquire()
    try:
        gc.collect()
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(gpubatch.SpecError, match="another run is writing") as refused:
            gpubatch.run(job, show_progress=False, resume=True)
        gc.collect()
        assert len(os.listdir("/proc/self/fd")) == before, refused.value
    finally:
        holder.release()
