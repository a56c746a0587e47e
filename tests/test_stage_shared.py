"""The stage cache is one per host: worker processes share staged copies, wait for each other's
downloads instead of repeating them, and never evict a copy another process has open. Real
processes (spawned, as Dask's are not forked from the test), a real S3 server (moto) behind the
proxy that counts requests."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from s3_fixtures import S3Stack

from gpubatch.core.clocks import StageClocks
from gpubatch.io.host_files import read_record
from gpubatch.io.retry import RetryPolicy
from gpubatch.io.stage_cache import StageCache
from gpubatch.io.stage_entries import staging_for
from gpubatch.io.storage import input_changed, input_identity

pytest_plugins = ["s3_fixtures"]

SPAWN = multiprocessing.get_context("spawn")


def _stage_in_child(directory: str, uri: str, options: dict[str, Any], hold: Any, done: Any,
                    run: str | None = None) -> None:
    """Open (download) ``uri`` in another process, staging for ``run``; keep it open until
    ``hold`` is set."""
    cache = StageCache(directory, max_bytes=1 << 30, run=run)
    staged = cache.open(uri, options, StageClocks())
    done.set()
    hold.wait(120)
    staged.close()


def _child(directory: str, uri: str, options: dict[str, Any], run: str | None = None) -> tuple[Any, Any, Any]:
    hold, done = SPAWN.Event(), SPAWN.Event()
    proc = SPAWN.Process(target=_stage_in_child, args=(directory, uri, options, hold, done, run))
    proc.start()
    return proc, hold, done


@pytest.fixture()
def uris(s3: S3Stack, slide_path: Path) -> list[str]:
    return [s3.upload(slide_path) for _ in range(3)]


def test_a_copy_staged_by_another_process_serves_this_one(tmp_path: Path, s3: S3Stack, uris: list[str]) -> None:
    proc, hold, done = _child(str(tmp_path), uris[0], s3.options())
    try:
        assert done.wait(120)
        s3.proxy.reset()
        clocks = StageClocks()
        cache = StageCache(str(tmp_path), max_bytes=1 << 30)
        with cache.open(uris[0], s3.options(), clocks) as staged:
            assert Path(staged.path).stat().st_size > 0
        # one HEAD to check the copy is of this very object; no byte downloaded again
        assert s3.proxy.stats == {**s3.proxy.stats, "HEAD": 1, "GET": 0}
        assert clocks.counters["storage.cache_hits"] == 1
        assert clocks.counters.get("storage.requests", 0) == 0
    finally:
        hold.set()
        proc.join(60)


def test_a_download_in_progress_elsewhere_is_waited_for_not_repeated(tmp_path: Path, s3: S3Stack,
                                                                     uris: list[str]) -> None:
    s3.proxy.configure(latency_s=0.5)
    records = tmp_path / f"u{os.getuid()}" / ".records"
    proc, hold, done = _child(str(tmp_path), uris[0], s3.options())
    try:
        deadline = time.monotonic() + 60
        while not list(records.glob("*.json")) and time.monotonic() < deadline:  # the child downloads
            time.sleep(0.01)
        assert list(records.glob("*.json")), "the child never started its download"
        cache = StageCache(str(tmp_path), max_bytes=1 << 30)
        clocks = StageClocks()
        with cache.open(uris[0], s3.options(), clocks):
            assert done.is_set()  # it waited for the child's download to finish
        assert s3.proxy.stats["GET"] == 1 and s3.proxy.stats["HEAD"] == 2  # one download, a HEAD each
        assert clocks.counters["storage.wait_s"] > 0.2 and clocks.counters["storage.cache_hits"] == 1
    finally:
        hold.set()
        proc.join(60)


def test_a_copy_in_use_elsewhere_is_never_evicted(tmp_path: Path, s3: S3Stack, uris: list[str],
                                                  slide_path: Path) -> None:
    size = slide_path.stat().st_size
    proc, hold, done = _child(str(tmp_path), uris[0], s3.options())
    try:
        assert done.wait(120)
        cache = StageCache(str(tmp_path), max_bytes=int(size * 1.5))  # room for one copy
        with cache.open(uris[1], s3.options(), StageClocks()) as second:
            assert Path(second.path).exists()
        assert len(list(tmp_path.rglob("*.tif"))) == 2  # over budget, but the child's copy is open: kept
    finally:
        hold.set()
        proc.join(60)
    clocks = StageClocks()
    with cache.open(uris[2], s3.options(), clocks):  # nothing is open elsewhere now: both evicted
        pass
    assert clocks.counters["storage.evictions"] == 2 and len(list(tmp_path.rglob("*.tif"))) == 1
    records = tmp_path / f"u{os.getuid()}" / ".records"
    assert len(list(records.glob("*.lock"))) == 1  # an evicted copy's lock file goes with it
    cache.release(uris[2])
    assert len(list(tmp_path.rglob("*.tif"))) == 0
    # a released copy leaves a small record saying so, which stops stale prefetches
    assert [read_record(str(p)).get("size") for p in records.glob("*.json")] == [0]


def test_a_prefetch_asked_before_its_copy_was_released_downloads_nothing(tmp_path: Path, s3: S3Stack,
                                                                         uris: list[str]) -> None:
    """A worker's prefetch may wait in its queue while another worker downloads, uses and
    releases the slide: run then, it would download a copy nobody opens. A later ask (a rerun)
    does download."""
    user, other = StageCache(str(tmp_path), max_bytes=1 << 30), StageCache(str(tmp_path), max_bytes=1 << 30)
    stale = other._new_entry(uris[0])  # asked now, run later
    with user.open(uris[0], s3.options(), StageClocks()):
        pass
    user.release(uris[0])
    s3.proxy.reset()
    other._download(stale, s3.options(), RetryPolicy(), False, False)
    assert stale.state == "skipped" and s3.proxy.stats["GET"] == 0
    assert other.prefetch([uris[0]], s3.options()) == [uris[0]]  # asked after the release: downloads
    clocks = StageClocks()
    with other.open(uris[0], s3.options(), clocks):
        pass
    assert s3.proxy.stats["GET"] == 1  # the prefetch's download, which the open waited for


# -- a version this run asked already: the client's staging before the workers, a worker's prefetch


def test_a_download_this_run_has_in_progress_elsewhere_is_waited_for_with_no_head(
        tmp_path: Path, s3: S3Stack, uris: list[str]) -> None:
    """The client stages the first slides while the workers start; a worker opening one waits
    for that download. It took the version from the record the client's download wrote (its
    HEAD's: size, ETag, mtime), where it asked again before (a HEAD each, two per slide)."""
    s3.proxy.configure(latency_s=0.5)
    records = tmp_path / f"u{os.getuid()}" / ".records"
    proc, hold, done = _child(str(tmp_path), uris[0], s3.options(), run="run-1")
    try:
        deadline = time.monotonic() + 60
        while not list(records.glob("*.json")) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert list(records.glob("*.json")), "the child never started its download"
        clocks = StageClocks()
        with StageCache(str(tmp_path), max_bytes=1 << 30, run="run-1").open(uris[0], s3.options(), clocks) as staged:
            assert done.is_set() and staged.identity is not None
        assert s3.proxy.stats["GET"] == 1 and s3.proxy.stats["HEAD"] == 1  # the child's, no more
        assert staged.identity == input_identity(uris[0], s3.options())
        assert clocks.counters["storage.cache_hits"] == 1
    finally:
        hold.set()
        proc.join(60)


def test_a_copy_another_run_staged_is_asked_again_and_this_runs_is_not(tmp_path: Path, s3: S3Stack,
                                                                       uris: list[str]) -> None:
    """A copy this run staged is of the version this run asked: taken with no request. A copy an
    earlier run staged, or one staged with no run named, is asked again (a HEAD) before it is
    used; a record of this run whose copy is gone is asked again and downloaded."""
    with StageCache(str(tmp_path), max_bytes=1 << 30, run="run-1").open(uris[0], s3.options(), StageClocks()) as first:
        pass
    for run, heads, gets in [("run-1", 0, 0), ("run-2", 1, 0), (None, 1, 0)]:
        s3.proxy.reset()
        with StageCache(str(tmp_path), max_bytes=1 << 30, run=run).open(uris[0], s3.options(), StageClocks()) as again:
            assert again.path == first.path and again.identity == first.identity
        assert (s3.proxy.stats["HEAD"], s3.proxy.stats["GET"]) == (heads, gets), run
    os.remove(first.path)  # the record stays, its copy is gone
    s3.proxy.reset()
    with StageCache(str(tmp_path), max_bytes=1 << 30, run="run-1").open(uris[0], s3.options(), StageClocks()) as new:
        assert Path(new.path).stat().st_size == first.identity["size"]
    assert (s3.proxy.stats["HEAD"], s3.proxy.stats["GET"]) == (1, 1)


def test_a_copy_an_earlier_run_staged_is_stamped_with_the_run_that_asked_again(
        tmp_path: Path, s3: S3Stack, uris: list[str]) -> None:
    """The client of a second run finds the copy an earlier run staged: it asks its version (a
    HEAD) and uses it, but left the record naming the earlier run, so each of its workers asked
    again (a HEAD each: 2 for that slide over two workers). The record now names the run that
    asked, and its other processes take the copy with no request."""
    with StageCache(str(tmp_path), max_bytes=1 << 30, run="run-1").open(uris[0], s3.options(), StageClocks()) as first:
        pass
    s3.proxy.reset()
    client = StageCache(str(tmp_path), max_bytes=1 << 30, run="run-2")
    with client.open(uris[0], s3.options(), StageClocks()) as again:
        assert again.path == first.path
    assert (s3.proxy.stats["HEAD"], s3.proxy.stats["GET"]) == (1, 0)
    for _worker in range(2):
        with StageCache(str(tmp_path), max_bytes=1 << 30, run="run-2").open(uris[0], s3.options(), StageClocks()) as took:
            assert took.identity == first.identity
    assert (s3.proxy.stats["HEAD"], s3.proxy.stats["GET"]) == (1, 0), s3.proxy.log


def test_an_object_written_over_after_this_run_staged_it(tmp_path: Path, s3: S3Stack, slide_path: Path) -> None:
    """Written over after this run staged it: this run's shard reads the copy, one version
    throughout, and its identity is that version's, so that a later run (--resume) sees the
    change (input_changed) and, staging for itself, asks and downloads the new version."""
    uri = s3.upload(slide_path)
    with StageCache(str(tmp_path), max_bytes=1 << 30, run="run-1").open(uri, s3.options(), StageClocks()):
        pass
    old = slide_path.read_bytes()
    s3.upload_bytes(old + b"written over", uri.split("/", 3)[3])
    with StageCache(str(tmp_path), max_bytes=1 << 30, run="run-1").open(uri, s3.options(), StageClocks()) as this:
        assert Path(this.path).read_bytes() == old and this.identity is not None
        assert this.identity["size"] == len(old)
    assert input_changed(uri, this.identity, s3.options()) is not None
    with StageCache(str(tmp_path), max_bytes=1 << 30, run="run-2").open(uri, s3.options(), StageClocks()) as later:
        assert Path(later.path).read_bytes() == old + b"written over"
        assert later.identity == input_identity(uri, s3.options()) != this.identity


def test_a_worker_serving_two_runs_stages_each_for_its_own(tmp_path: Path, s3: S3Stack, slide_path: Path) -> None:
    """A worker process's run was the process's (set as each shard started): run A's prefetch,
    its HEAD in flight while a shard of run B started in the same process (two jobs on one Dask
    cluster), recorded the version A asked as run B's. The slide then written over, run B's
    other worker took that old version from the record, with no HEAD, and read the old bytes.
    The run is each shard's now (staging_for), kept by the entries it asks for."""
    uri = s3.upload(slide_path)
    key = uri.removeprefix("s3://")
    b_started = threading.Event()
    s3.proxy.configure(held_heads={key: 60.0}, stall_release=b_started.is_set)
    worker = StageCache(str(tmp_path), max_bytes=1 << 30)
    with staging_for("run-A"):
        worker.prefetch([uri], s3.options())
    deadline = time.monotonic() + 60
    while not s3.proxy.heads.get(key) and time.monotonic() < deadline:  # A's HEAD is held
        time.sleep(0.01)
    with staging_for("run-B"):  # a shard of run B starts in this process meanwhile
        b_started.set()
    with staging_for("run-A"), worker.open(uri, s3.options(), StageClocks()) as for_a:  # waits for A's download
        old = slide_path.read_bytes()
        assert Path(for_a.path).read_bytes() == old
    s3.upload_bytes(old + b"written over", uri.split("/", 3)[3])
    other = StageCache(str(tmp_path), max_bytes=1 << 30)  # run B's other worker
    with staging_for("run-B"), other.open(uri, s3.options(), StageClocks()) as for_b:
        assert Path(for_b.path).read_bytes() == old + b"written over"
        assert for_b.identity == input_identity(uri, s3.options())


def test_a_copy_another_process_replaced_is_not_reopened_as_the_version_staged(
        tmp_path: Path, s3: S3Stack, slide_path: Path) -> None:
    """A worker keeps the entry of a copy it staged (prefetched, or opened by a shard) until its
    shard releases it. Meanwhile the object was written over, and another worker process (of
    another run) found its copy out of date and replaced it, in the folder both share, with the
    new version. Reopened, the first worker took the file as the version it had staged: the new
    bytes under the old version's identity and ETag. A pin checks the record's version now: the
    replaced copy is asked again (a HEAD) and opened as the version it is."""
    uri = s3.upload(slide_path)
    worker = StageCache(str(tmp_path), max_bytes=1 << 30)
    with staging_for("run-A"), worker.open(uri, s3.options(), StageClocks()) as first:
        old = slide_path.read_bytes()
        assert Path(first.path).read_bytes() == old
    new = old + b"written over"
    s3.upload_bytes(new, uri.split("/", 3)[3])
    proc, hold, done = _child(str(tmp_path), uri, s3.options(), run="run-B")  # the other worker
    try:
        assert done.wait(120)
    finally:
        hold.set()
        proc.join(60)
    assert proc.exitcode == 0
    s3.proxy.reset()
    with staging_for("run-A"), worker.open(uri, s3.options(), StageClocks()) as again:
        assert Path(again.path).read_bytes() == new
        assert again.identity == input_identity(uri, s3.options()) != first.identity
        assert again.etag == again.identity["etag"]
    assert (s3.proxy.stats["HEAD"], s3.proxy.stats["GET"]) == (2, 0)  # asked again (+ this check's); no download


def test_a_copy_released_while_a_shard_reads_it_stays_pinned_until_closed(
        tmp_path: Path, s3: S3Stack, uris: list[str]) -> None:
    """Releasing (or clearing) a copy a shard of this process still has open closed its lock,
    which was the pin: any process's eviction could then delete the file under the reader. It
    goes when the last reader closes it now."""
    cache = StageCache(str(tmp_path), max_bytes=1 << 30)
    with cache.open(uris[0], s3.options(), StageClocks()) as reading:
        cache.clear()
        evicting = StageCache(str(tmp_path), max_bytes=1)  # room for nothing: evicts all it can
        with evicting.open(uris[1], s3.options(), StageClocks()):
            pass
        evicting.release(uris[1])
        assert Path(reading.path).exists()
    assert not Path(reading.path).exists()  # released: deleted once closed


def test_each_jobs_stage_settings_have_a_cache_kept_while_a_shard_is_in_it(tmp_path: Path) -> None:
    """Shards of jobs with different stage settings each get the cache of theirs, the same one
    for the same settings; past MAX_CACHES, idle caches are retired and a busy one stays."""
    from gpubatch.io import stage_cache

    def settings(n: int) -> dict[str, Any]:
        return {"dir": str(tmp_path / "stage"), "max_bytes": (n + 1) << 20}

    with stage_cache.shard_stage("run-A", settings(0)) as in_a:
        assert stage_cache.get_stage_cache() is in_a
        with stage_cache.shard_stage("run-B", settings(1)) as in_b:
            assert stage_cache.get_stage_cache() is in_b and in_b.max_bytes == 2 << 20
        with stage_cache.shard_stage("run-A2", settings(0)) as again:
            assert again is in_a
        for n in range(1, stage_cache.MAX_CACHES + 2):
            with stage_cache.shard_stage(f"run-{n}", settings(n)):
                pass
        assert in_a in stage_cache._caches.values()  # in use: kept
        assert len(stage_cache._caches) <= stage_cache.MAX_CACHES
    assert stage_cache.get_stage_cache() is not in_a  # outside a shard: the process's
