"""Object storage: stream and stage reads against a real S3 server (moto) behind a faulty proxy."""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputError
from gpubatch.io.listing import expand_uris
from gpubatch.io.metrics import latency_percentiles, record_request, storage_summary
from gpubatch.io.redact import redact
from gpubatch.io.retry import RetryPolicy
from gpubatch.io.stage_cache import StageCache
from gpubatch.sources.slides.backends import SlideBackend
from gpubatch.sources.slides.open import (
    choose_access,
    open_slide,
    open_slide_input,
    open_staged,
    open_stream,
    prefetch,
    release,
)

if TYPE_CHECKING:
    from s3_fixtures import S3Stack

pytest_plugins = ["s3_fixtures"]  # the s3 / s3_stack fixtures (reusable by other test modules)
CMU_SMALL = Path(__file__).resolve().parent / "data" / "slides" / "CMU-1-Small-Region.svs"
FAST = RetryPolicy(attempts=8, base_s=0.002, cap_s=0.02)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from s3_fixtures import write_pyramid_tiff

    return write_pyramid_tiff(tmp_path_factory.mktemp("slides") / "synthetic.tif", 2600, 1900)


@pytest.fixture(scope="module")
def slide_uris(s3_stack: S3Stack, synthetic: Path) -> dict[str, tuple[Path, str]]:
    boxes = CMU_SMALL.parent / "boxes.tiff"  # generic deflate pyramid
    return {"synthetic": (synthetic, s3_stack.upload(synthetic, "case/synthetic.tif")),
            "cmu": (CMU_SMALL, s3_stack.upload(CMU_SMALL, "case/CMU-1-Small-Region.svs")),
            "boxes": (boxes, s3_stack.upload(boxes, "case/boxes.tiff"))}


def _read_level(backend: SlideBackend, level: int, block: int, threads: int) -> np.ndarray:
    w, h = backend.info.level_dimensions[level]
    image = np.zeros((h, w, 3), np.uint8)
    boxes = [(x, y) for y in range(0, h, block) for x in range(0, w, block)]
    clocks = StageClocks()

    def work(part: list[tuple[int, int]]) -> None:
        for x, y in part:
            tile = backend.read_boxes(level, np.array([[x, y, block, block]]), clocks)[0]
            image[y: y + block, x: x + block] = tile[: h - y, : w - x]

    pool = [threading.Thread(target=work, args=(boxes[i::threads],)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return image


def read_all(backend: SlideBackend, block: int = 700, threads: int = 4) -> list[np.ndarray]:
    """Every pixel of every level, in blocks read concurrently (as the engine's readers do)."""
    return [_read_level(backend, level, block, threads) for level in range(len(backend.info.level_dimensions))]


def _local(path: Path) -> list[np.ndarray]:
    backend = open_slide(str(path), StageClocks())
    try:
        return read_all(backend)
    finally:
        backend.close()


def _assert_same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", ["synthetic", "cmu", "boxes"])
@pytest.mark.parametrize("access", ["stream", "stage"])
def test_remote_reads_match_local(s3: S3Stack, slide_uris: dict, name: str, access: str) -> None:
    local, uri = slide_uris[name]
    clocks = StageClocks()
    backend = open_slide_input(uri, clocks, options=s3.options(), access=access)
    try:
        assert backend.access == "stream" if access == "stream" else backend.access == "stage"  # type: ignore[attr-defined]
        assert backend.info.backend == "tifffile"
        _assert_same(read_all(backend), _local(local))
    finally:
        backend.close()
        release(uri)
    counters = clocks.counters
    assert counters["storage.requests"] > 0 and counters["storage.bytes"] > 0
    assert counters[f"storage.access.{access}"] == 1
    if access == "stage":
        assert counters["storage.staged_bytes"] == local.stat().st_size
    else:  # streamed: never the whole file
        assert counters.get("storage.staged_bytes", 0) == 0


def test_stream_reads_by_range_without_full_download(s3: S3Stack, slide_uris: dict) -> None:
    local, uri = slide_uris["synthetic"]
    clocks = StageClocks()
    backend = open_stream(uri, s3.options(), clocks)
    try:
        page = backend.pages[0]  # type: ignore[attr-defined]
        one_tile = int(page.databytecounts[0])
        before = clocks.counters["storage.bytes"]
        backend.read_boxes(0, np.array([[0, 0, 200, 200]]), clocks)
        assert clocks.counters["storage.bytes"] - before == one_tile
    finally:
        backend.close()
    assert clocks.counters["storage.bytes"] < local.stat().st_size / 2


@pytest.mark.parametrize(("client", "heads"), [("obstore", 0), ("fsspec", 1)])
def test_a_streamed_opening_asks_its_size_in_the_headers_round_trip(
        s3: S3Stack, slide_uris: dict, monkeypatch: pytest.MonkeyPatch, client: str, heads: int) -> None:
    """An opening pays one round trip for the object's size and version and its first bytes:
    obstore's first GET (from byte 0) answers both, its Content-Range carrying the whole size
    (no HEAD); fsspec's answer does not say, so it asks a HEAD (from the opening's thread while
    another sends the GET). The header is read once, and the slide reads the same as the local file."""
    monkeypatch.setenv("GPUBATCH_RANGE_READER", client)
    local, uri = slide_uris["synthetic"]
    key = uri.removeprefix("s3://")
    s3.proxy.reset()
    s3.proxy.configure(latency_s=0.05)
    backend = open_stream(uri, s3.options(), StageClocks())
    try:
        assert backend.input_identity()["size"] == local.stat().st_size
        _assert_same(read_all(backend), _local(local))
    finally:
        backend.close()
    assert s3.proxy.heads.get(key, 0) == heads and s3.proxy.from_start[key] == 1


def test_adjacent_tiles_are_coalesced(s3: S3Stack, slide_uris: dict) -> None:
    _, uri = slide_uris["synthetic"]
    clocks = StageClocks()
    backend = open_stream(uri, s3.options(), clocks)
    try:
        before = clocks.counters["storage.requests"]
        backend.read_boxes(0, np.array([[0, 0, 1024, 256]]), clocks)  # 4 neighbouring tiles
        assert clocks.counters["storage.requests"] - before == 1
        assert clocks.counters["decode.tiles"] == 4
    finally:
        backend.close()


@pytest.mark.parametrize("reader", ["obstore", "fsspec"])
def test_faults_are_retried_and_reads_identical(s3: S3Stack, slide_uris: dict, reader: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """5xx answers and reset connections, retried: every byte read is the file's, through both
    range readers (obstore's streamed open asks no HEAD now: its GETs alone meet the faults)."""
    monkeypatch.setenv("GPUBATCH_RANGE_READER", reader)
    s3.proxy.configure(error_rate=0.15, reset_rate=0.1, latency_s=0.003, seed=7)
    expected = {name: _local(local) for name, (local, _) in slide_uris.items()}
    for access in ("stream", "stage"):
        for name, (_, uri) in slide_uris.items():
            clocks = StageClocks()
            if access == "stream":
                backend = open_stream(uri, s3.options(), clocks, FAST)
            else:
                backend = open_staged(uri, s3.options(), clocks, FAST, cache=StageCache(max_bytes=1 << 30))
            try:
                _assert_same(read_all(backend), expected[name])
            finally:
                backend.close()
    stats = s3.proxy.stats
    assert stats["errors"] > 0 and stats["resets"] > 0


def test_retries_are_counted(s3: S3Stack, slide_uris: dict) -> None:
    _, uri = slide_uris["synthetic"]
    s3.proxy.configure(error_rate=0.3, seed=3)
    clocks = StageClocks()
    backend = open_stream(uri, s3.options(), clocks, FAST)
    try:
        read_all(backend)
    finally:
        backend.close()
    assert clocks.counters["storage.retries"] == s3.proxy.stats["errors"] > 0


def test_persistent_503_gives_retryable_error(s3: S3Stack, slide_uris: dict) -> None:
    _, uri = slide_uris["synthetic"]
    s3.proxy.configure(error_rate=1.0)
    clocks = StageClocks()
    with pytest.raises(InputError) as info:
        open_stream(uri, s3.options(), clocks, RetryPolicy(attempts=3, base_s=0.001))
    assert info.value.retryable and "after 3 attempt" in info.value.message
    # two requests, each tried 3 times: the size (HEAD) and, beside it, the header's first bytes
    assert s3.proxy.stats["errors"] == 6 and s3.proxy.stats["HEAD"] == 3
    assert clocks.counters["storage.retries"] == 4


@pytest.mark.parametrize("access", ["stream", "stage"])
def test_missing_object_is_quarantined(s3: S3Stack, access: str) -> None:
    uri = f"s3://{s3.bucket}/nowhere/missing.svs"
    with pytest.raises(InputError) as info:
        open_slide_input(uri, StageClocks(), options=s3.options(), access=access)
    assert not info.value.retryable
    assert "not found" in info.value.message and info.value.input_uri == uri


@pytest.mark.parametrize("access", ["stream", "stage"])
def test_forbidden_object_is_quarantined(s3: S3Stack, slide_uris: dict, access: str) -> None:
    _, uri = slide_uris["synthetic"]
    s3.proxy.configure(forbidden={uri.removeprefix("s3://")})
    with pytest.raises(InputError) as info:
        open_slide_input(uri, StageClocks(), options=s3.options(), access=access)
    assert not info.value.retryable and "access denied (403)" in info.value.message


def test_not_a_slide_is_a_clear_error(s3: S3Stack) -> None:
    uri = s3.upload_bytes(b"II*\x00" + b"\x00" * 400, "junk/notaslide.tif")
    with pytest.raises(InputError) as info:
        open_slide_input(uri, StageClocks(), options=s3.options(), access="stream")
    assert not info.value.retryable and "stage" in info.value.message


def test_credentials_never_in_errors(s3: S3Stack, slide_uris: dict) -> None:
    secret, key = "sup3r-s3cret-value-xyz", "AKIAABCDEFGHIJKLMNOP"
    options = {**s3.options(), "key": key, "secret": secret, "token": "tok-123456"}
    uri_userinfo = f"https://user:{secret}@127.0.0.1:{s3.proxy.port}/slides/missing.svs"
    messages = []
    for uri in (f"s3://{s3.bucket}/none/missing.svs", slide_uris["synthetic"][1], uri_userinfo):
        s3.proxy.configure(forbidden={slide_uris["synthetic"][1].removeprefix("s3://")})
        for access in ("stream", "stage"):
            with pytest.raises(InputError) as info:
                open_slide_input(uri, StageClocks(), options=options, access=access)
            messages += [str(info.value), info.value.message, info.value.input_uri]
    assert messages
    for text in messages:
        assert secret not in text and key not in text and "tok-123456" not in text
    assert redact(options)["secret"] == "***" and redact(options)["key"] == "***"
    assert redact({"client_kwargs": {"aws_secret_access_key": "zz-zz"}}) == {"client_kwargs": {"aws_secret_access_key": "***"}}
    assert redact(f"failed: {uri_userinfo}") == f"failed: https://***@127.0.0.1:{s3.proxy.port}/slides/missing.svs"
    assert secret not in redact(f"secret={secret}&x=1") and key not in redact(f"id {key} here")


def test_http_stream(s3: S3Stack, slide_uris: dict) -> None:
    local, uri = slide_uris["synthetic"]
    s3.make_public(uri)
    url = s3.http_url(uri)
    backend = open_slide_input(url, StageClocks(), options={})
    try:
        assert backend.access == "stream"  # type: ignore[attr-defined]
        _assert_same(read_all(backend), _local(local))
    finally:
        backend.close()


def test_expand_globs(s3: S3Stack, slide_uris: dict, tmp_path: Path) -> None:
    found = expand_uris([f"s3://{s3.bucket}/case/*.tif", f"s3://{s3.bucket}/case/*.svs"], s3.options())
    assert found == sorted(u for _, u in slide_uris.values() if u.endswith(".tif")) + sorted(
        u for _, u in slide_uris.values() if u.endswith(".svs"))
    assert expand_uris([f"s3://{s3.bucket}/nothing-here/*.svs"], s3.options()) == []
    (tmp_path / "a.svs").write_bytes(b"x")
    assert expand_uris([f"file://{tmp_path}/*.svs"]) == [str(tmp_path / "a.svs")]


def test_file_uris_are_percent_decoded_and_plain_paths_are_literal(tmp_path: Path) -> None:
    """RFC 8089: ``file:///data/my%20slides/a.tif`` names ``/data/my slides/a.tif`` (it named a
    folder ``my%20slides``, which does not exist); a plain path is a name, ``%20`` and all."""
    from urllib.parse import quote

    from gpubatch.cli.demo import write_synthetic_slide
    from gpubatch.io.storage import open_file
    from gpubatch.io.uris import local_path

    spaced = tmp_path / "my slides"
    spaced.mkdir()
    slide = write_synthetic_slide(spaced / "a b.tif", 256, 256, levels=1)
    uri = "file://" + quote(str(slide))
    assert "%20" in uri and local_path(uri) == str(slide)
    assert local_path("file://localhost" + quote(str(slide))) == str(slide)
    assert local_path("file:" + quote(str(slide))) == str(slide)  # RFC 8089's short form, file:/path
    assert expand_uris([uri]) == [str(slide)]
    assert expand_uris(["file://" + quote(str(spaced)) + "/*.tif"]) == [str(slide)]
    backend = open_slide_input(uri, StageClocks())
    try:
        assert backend.info.level_dimensions == ((256, 256),)
    finally:
        backend.close()
    with open_file(uri) as f:
        assert f.read(4) in (b"II*\x00", b"MM\x00*")
    literal = tmp_path / "lit%20eral"
    literal.mkdir()
    (literal / "x.svs").write_bytes(b"x")
    assert local_path(str(literal / "x.svs")) == str(literal / "x.svs")
    assert expand_uris([str(literal / "x.svs")]) == [str(literal / "x.svs")]
    assert expand_uris([str(literal / "*.svs")]) == [str(literal / "x.svs")]


def test_one_file_under_several_spellings_is_one_input(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``a/./b``, ``a//b``, ``a/../a/b`` and a symlink name one file: read once (it was read once
    per spelling, its predictions doubled), with a line saying so; two files stay two."""
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "one.tif").write_bytes(b"1")
    (folder / "two.tif").write_bytes(b"2")
    (tmp_path / "alias.tif").symlink_to(folder / "one.tif")
    spellings = [str(folder / "one.tif"), f"{folder}/./one.tif", f"{folder}//one.tif",
                 f"{folder}/../s/one.tif", str(tmp_path / "alias.tif"), str(folder / "two.tif")]
    with caplog.at_level("WARNING", logger="gpubatch"):
        assert expand_uris(spellings) == [str(folder / "one.tif"), str(folder / "two.tif")]
    assert sum("is the file" in r.getMessage() for r in caplog.records) == 4
    assert expand_uris([str(folder / "*.tif"), str(folder / "one.tif")]) == [str(folder / "one.tif"),
                                                                          str(folder / "two.tif")]


def test_a_streamed_slide_opened_ahead_is_taken_with_its_requests(s3: S3Stack, slide_uris: dict) -> None:
    """prefetch opens the next streamed slides in the background; the shard that opens one takes
    it without a round trip, and the requests made ahead and its tile reads after are the shard's."""
    from gpubatch.sources.slides import preopen

    local, uri = slide_uris["synthetic"]
    s3.proxy.configure(latency_s=0.1)
    assert prefetch([uri], "stream", s3.options()) == [uri]
    assert prefetch([uri], "stream", s3.options()) == []  # already being opened
    preopen._held[uri].future.result(60)
    clocks = StageClocks()
    t0 = time.perf_counter()
    backend = open_slide_input(uri, clocks, access="stream", options=s3.options())
    try:
        assert time.perf_counter() - t0 < 0.1  # not one round trip left
        assert clocks.counters["storage.opened_ahead"] == 1
        opening = clocks.counters["storage.requests"]
        assert opening >= 3  # HEAD, header, JPEG tables: made ahead, counted for the shard
        _assert_same(read_all(backend), _local(local))
        assert clocks.counters["storage.requests"] > opening
    finally:
        backend.close()
    again = StageClocks()
    open_slide_input(uri, again, access="stream", options=s3.options()).close()  # taken once only
    assert "storage.opened_ahead" not in again.counters


def test_a_slide_opened_ahead_has_its_coarsest_level_in_hand_for_tissue_detection(s3: S3Stack,
                                                                                  slide_uris: dict) -> None:
    from gpubatch.sources.slides import preopen
    from gpubatch.sources.slides.tissue import read_thumbnail

    _, uri = slide_uris["synthetic"]
    assert prefetch([uri], "stream", s3.options(), read_ahead=64 << 20, tissue=True) == [uri]
    preopen._held[uri].future.result(60)
    time.sleep(0.5)  # the coarsest level's fetch, issued by the opening, lands
    clocks = StageClocks()
    backend = open_slide_input(uri, clocks, access="stream", options=s3.options(), read_ahead=64 << 20)
    try:
        requests = clocks.counters["storage.requests"]
        thumb, _ = read_thumbnail(backend, clocks, 2048)
        assert thumb.size and clocks.counters["storage.read_ahead_hits"] > 0
        assert clocks.counters["storage.requests"] == requests  # every tile of it fetched ahead
    finally:
        backend.close()


def test_a_shard_s_own_open_requests_the_coarsest_level_before_its_last_round_trip(s3: S3Stack,
                                                                                   slide_uris: dict) -> None:
    """Opened for a shard that detects tissue, a streamed slide's coarsest level is requested
    once its header is parsed, beside the opening's last round trip: tissue detection then makes
    no request of its own."""
    from gpubatch.sources.slides.tissue import read_thumbnail

    _, uri = slide_uris["synthetic"]
    clocks = StageClocks()
    backend = open_slide_input(uri, clocks, access="stream", options=s3.options(), read_ahead=64 << 20,
                               tissue=True)
    try:
        thumb, _ = read_thumbnail(backend, clocks, 2048)
        assert thumb.size and clocks.counters["storage.read_ahead_hits"] > 0
        assert "storage.read_ahead_misses" not in clocks.counters  # no tile read in the foreground
    finally:
        backend.close()


def test_prefetch_then_open_is_a_cache_hit(s3: S3Stack, slide_uris: dict, tmp_path: Path) -> None:
    _, uri = slide_uris["synthetic"]
    s3.proxy.configure(latency_s=0.01)
    from gpubatch.io import stage_cache as staging

    staging.configure_stage_cache({"dir": str(tmp_path), "max_bytes": 1 << 30})
    try:
        assert prefetch([uri], "stage", s3.options()) == [uri]
        clocks = StageClocks()
        backend = open_slide_input(uri, clocks, options=s3.options(), access="stage")
        backend.close()
        assert clocks.counters["storage.staged_bytes"] > 0
        local_files = _staged_files(tmp_path)
        assert len(local_files) == 1 and not local_files[0].name.endswith(".part")
        again = StageClocks()
        open_slide_input(uri, again, options=s3.options(), access="stage").close()
        assert again.counters["storage.cache_hits"] == 1 and again.counters.get("storage.requests", 0) == 0
        release(uri)
        assert not _staged_files(tmp_path)
    finally:
        staging.configure_stage_cache(None)


def _staged_files(root: Path) -> list[Path]:
    """Staged copies under a stage directory, without the cache's lock files and records."""
    return [p for p in root.rglob("*") if p.is_file() and ".records" not in p.parts]


def test_stage_cache_is_bounded_lru(s3: S3Stack, synthetic: Path, tmp_path: Path) -> None:
    size = synthetic.stat().st_size
    uris = [s3.upload(synthetic, f"lru/s{i}.tif") for i in range(3)]
    cache = StageCache(str(tmp_path), max_bytes=int(size * 2.5))
    try:
        for uri in uris[:2]:
            cache.open(uri, s3.options(), StageClocks()).close()
        cache.open(uris[0], s3.options(), StageClocks()).close()  # s0 is now the most recent
        cache.open(uris[2], s3.options(), StageClocks()).close()  # evicts s1, the least recent
        assert set(cache.cached()) == {uris[0], uris[2]}
        assert cache.used_bytes() <= cache.max_bytes
        pinned = [cache.open(u, s3.options(), StageClocks()) for u in (uris[0], uris[2])]
        assert cache.prefetch([uris[1]], s3.options()) == [uris[1]]
        deadline = time.monotonic() + 20
        while uris[1] in cache.cached() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert uris[1] not in cache.cached()  # skipped: both cached files are in use
        late = cache.open(uris[1], s3.options(), StageClocks())  # an open always proceeds
        for b in [*pinned, late]:
            b.close()
        assert len(list(tmp_path.rglob("*.tif"))) == 3
    finally:
        cache.clear()


def test_auto_stages_openslide_formats(s3: S3Stack) -> None:
    """A format tifffile is not asked to read (suffix .scn) is staged and opened by openslide."""
    uri = s3.upload(CMU_SMALL, "case/as-openslide.scn")
    clocks = StageClocks()
    backend = open_slide_input(uri, clocks, options=s3.options())
    try:
        assert backend.access == "stage" and backend.info.backend == "openslide"  # type: ignore[attr-defined]
        local = open_slide(str(CMU_SMALL), StageClocks(), prefer="openslide")
        box = np.array([[100, 200, 500, 400]])
        np.testing.assert_array_equal(backend.read_boxes(0, box, StageClocks()),
                                      local.read_boxes(0, box, StageClocks()))
        local.close()
    finally:
        backend.close()
        release(uri)
    assert clocks.counters["storage.access.stage"] == 1


def test_auto_choice_and_fallback(s3: S3Stack, slide_uris: dict) -> None:
    assert choose_access("s3://b/x.svs", "auto") == "stream"
    assert choose_access("s3://b/x.OME.TIFF", "auto") == "stream"
    assert choose_access("s3://b/x.mrxs", "auto") == "stage"
    assert choose_access("s3://b/x.ndpi", "auto") == "stage"
    assert choose_access("s3://b/x.svs", "stage") == "stage"
    unopenable = CMU_SMALL.parent / "unopenable.tiff"
    uri = s3.upload(unopenable, "case/unopenable.tiff")
    clocks = StageClocks()
    with pytest.raises(InputError) as info:  # stream fails to parse -> staged -> openslide fails too
        open_slide_input(uri, clocks, options=s3.options())
    assert not info.value.retryable and "openslide" in info.value.message
    assert clocks.counters["storage.stream_fallbacks"] == 1


def test_latency_histogram_percentiles() -> None:
    clocks = StageClocks()
    for ms in [1.0] * 50 + [10.0] * 49 + [1000.0]:
        record_request(clocks, 100, ms / 1000)
    pct = latency_percentiles(clocks.counters)
    assert pct["p50_ms"] is not None and 0.7 <= pct["p50_ms"] <= 1.5
    assert pct["p99_ms"] is not None and 7 <= pct["p99_ms"] <= 15
    merged = StageClocks()
    merged.merge(clocks)
    merged.merge(clocks)
    assert latency_percentiles(merged.counters) == pct
    summary = storage_summary(clocks.counters, 2.0)
    assert summary["requests"] == 100 and summary["bytes"] == 10_000
    assert math.isclose(summary["mb_per_s"], 0.005)
    assert latency_percentiles({}) == {"p50_ms": None, "p99_ms": None}
    slow = StageClocks()
    for _ in range(3):
        record_request(slow, 1, 0.3)
    p50 = latency_percentiles(slow.counters)["p50_ms"]
    assert p50 is not None and 300 / 1.42 <= p50 <= 300 * 1.42  # within its sqrt(2) bucket


def test_env_stage_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GPUBATCH_STAGE_DIR", str(tmp_path))
    monkeypatch.setenv("GPUBATCH_STAGE_MAX_BYTES", "12345")
    cache = StageCache()
    assert cache.dir.startswith(str(tmp_path)) and cache.max_bytes == 12345
    assert os.path.basename(cache.dir) == f"u{os.getuid()}"  # one cache per user and host


def test_a_workers_shards_leave_the_process_storage_settings_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  ) -> None:
    """A worker's first two shards start together. They configured the process's storage (once,
    under a lock: a second configuration replaced the stage cache then, deleting the first
    shard's download under it); another job's shard later configured it again, under the first
    job's running shards (tests/test_jobs_share_workers.py). The profile's settings are now the
    shard's (io.storage_profile.shard_storage, in execute_shard): setting a worker up touches neither
    the process's storage options nor its stage cache."""
    import gpubatch.io.stage_cache
    import gpubatch.io.storage
    import gpubatch.io.storage_profile
    from gpubatch.engine import worker
    from gpubatch.engine.context import RunContext
    from gpubatch.io.stage_cache import get_stage_cache

    calls: list[dict | None] = []
    monkeypatch.setattr(gpubatch.io.storage_profile, "configure_storage", calls.append)
    monkeypatch.setattr(worker, "_CONFIGURED", {})
    monkeypatch.setattr(gpubatch.io.stage_cache, "_cache", gpubatch.io.stage_cache._cache)  # restored afterwards
    ctx = RunContext(str(tmp_path), "m.onnx", "onnxruntime", "fp32", 8, None, "", "", "",
                     storage_profile={"stage_cache": {"dir": str(tmp_path / "stage")}, "storage": {"key": "K1"}})
    start = threading.Barrier(2)
    caches = []

    def first_shard() -> None:
        start.wait()
        worker._configure_worker_once(ctx)
        caches.append(get_stage_cache())

    threads = [threading.Thread(target=first_shard) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [] and caches[0] is caches[1]
    assert "key" not in gpubatch.io.storage.resolve_options("s3://b/k", None)
    with gpubatch.io.storage_profile.shard_storage(ctx.storage_profile):
        assert gpubatch.io.storage.resolve_options("s3://b/k", None)["key"] == "K1"


def test_a_streamed_whole_file_read_survives_transient_errors(s3: S3Stack) -> None:
    """open_file (a FASTA or BED read front to back) is fsspec's file, whose requests (its size, a
    HEAD, then a block at a time) the client library makes: its retries must be on for them (with
    them off, a 503 on the HEAD, which carries no throttling text for s3fs to see, ended the read)."""
    from gpubatch.io.storage import open_file

    payload = np.random.default_rng(0).integers(0, 256, 12 << 20, dtype=np.uint8).tobytes()
    uri = s3.upload_bytes(payload, "whole/reference.bin")
    for seed in range(8):
        s3.proxy.configure(error_rate=0.3, seed=seed)
        with open_file(uri, {**s3.options(), "default_block_size": 4 << 20}, "rb") as f:
            got = b"".join(iter(lambda: f.read(1 << 20), b""))  # noqa: B023 - used at once
        assert got == payload
    assert s3.proxy.stats["errors"] > 0


def test_a_client_library_s_own_retries_are_counted_and_its_debug_lines_stay_quiet(
        s3: S3Stack, caplog: pytest.LogCaptureFixture) -> None:
    """A file read by fsspec with library options (open_file's, wsidicom's, zarr's) makes its
    own requests, retried by botocore: one retry counted per 503 the proxy gave (one reader,
    the proxy's faults seeded: the same requests fail every run), and botocore's debug lines,
    which the counting reads, reach no handler that did not ask for them."""
    import fsspec

    from gpubatch.io.retry_counts import claim_library_retries
    from gpubatch.io.storage import library_options

    payload = np.random.default_rng(1).integers(0, 256, 9 << 20, dtype=np.uint8).tobytes()
    uri = s3.upload_bytes(payload, "whole/counted.bin")
    options = {**library_options(uri, s3.options()), "default_block_size": 1 << 20}
    claim_library_retries()  # what earlier tests left
    s3.proxy.reset()
    for seed in range(4):
        s3.proxy.configure(error_rate=0.25, seed=seed)
        with fsspec.open(uri, "rb", **options) as f:
            got = b"".join(iter(lambda: f.read(1 << 20), b""))  # noqa: B023 - used at once
        assert got == payload
    assert s3.proxy.stats["errors"] > 3
    assert claim_library_retries() == s3.proxy.stats["errors"]
    assert claim_library_retries() == 0  # claimed once
    assert not [r for r in caplog.records if r.name.startswith("botocore")]
