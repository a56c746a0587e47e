"""The stage cache is one per host: worker processes share staged copies, wait for each other's
downloads instead of repeating them, and never evict a copy another process has open. Real
processes (spawned, as Dask's are not forked from the test), a real S3 server (moto) behind the
proxy that counts requests."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import pytest
from s3_fixtures import S3Stack

from gpubatch.core.clocks import StageClocks
from gpubatch.io.host_files import read_record
from gpubatch.io.retry import RetryPolicy
from gpubatch.io.stage_cache import StageCache

pytest_plugins = ["s3_fixtures"]

SPAWN = multiprocessing.get_context("spawn")


def _stage_in_child(directory: str, uri: str, options: dict[str, Any], hold: Any, done: Any) -> None:
    """Open (download) ``uri`` in another process; keep it open until ``hold`` is set."""
    cache = StageCache(directory, max_bytes=1 << 30)
    staged = cache.open(uri, options, StageClocks())
    done.set()
    hold.wait(120)
    staged.close()


def _child(directory: str, uri: str, options: dict[str, Any]) -> tuple[Any, Any, Any]:
    hold, done = SPAWN.Event(), SPAWN.Event()
    proc = SPAWN.Process(target=_stage_in_child, args=(directory, uri, options, hold, done))
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
