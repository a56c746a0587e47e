"""Opening a slide on a worker: local, streamed by byte range, or staged whole, as ``access`` says.

In object storage every request costs tens of milliseconds and some fail transiently. ``stream``
reads TIFF-family slides by byte range: tifffile parses the header through a small readahead-cached
file, then the backend fetches stored tiles coalesced and concurrently through the storage entry
point's range reader, so latency is paid once per batch of requests, not per tile, and nothing is
downloaded whole. ``stage`` downloads whole files ahead of use into the bounded stage cache, for
formats only openslide reads. ``auto`` streams TIFF-family suffixes, stages the rest, falls back
to stage when a TIFF-family file cannot be tile-decoded, and records its choice (``backend.access``,
counters).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputError
from gpubatch.io.ranges import RangeFile, RangeReader
from gpubatch.io.redact import redact
from gpubatch.io.retry import RetryPolicy
from gpubatch.io.stage_cache import StageCache, StagedFile, get_stage_cache
from gpubatch.io.storage import open_ranges, stat
from gpubatch.io.uris import is_remote, local_path, uri_name
from gpubatch.sources.slides.backends import TIFF_SUFFIXES, SlideBackend, open_slide

#: formats whose data lives in a directory beside the file, named after its stem
COMPANION_SUFFIXES = (".mrxs",)


def choose_access(uri: str, requested: str) -> str:
    """``auto``: stream TIFF-family files by range, stage everything else (openslide formats)."""
    if requested != "auto":
        return requested
    return "stream" if uri_name(uri).lower().endswith(TIFF_SUFFIXES) else "stage"


def _has_companions(uri: str) -> bool:
    return uri_name(uri).lower().endswith(COMPANION_SUFFIXES)


def _mark(backend: SlideBackend, access: str, clocks: StageClocks) -> SlideBackend:
    backend.access = access  # type: ignore[attr-defined]
    clocks.count(f"storage.access.{access}")
    return backend


def open_stream(uri: str, options: dict[str, Any] | None, clocks: StageClocks,
                policy: RetryPolicy | None = None) -> SlideBackend:
    """Open a TIFF-family slide for range reads: header through a cached file, tiles by range."""
    policy = policy or RetryPolicy()
    info = stat(uri, options, policy, clocks)
    if info["type"] == "directory" or info["size"] <= 0:
        raise InputError(redact(uri), "is an empty object or a prefix (directory), not a slide file")
    reader = open_ranges(uri, options, clocks, policy)
    handle = RangeFile(reader, info["size"], uri_name(uri))
    try:
        backend = open_slide(redact(uri), clocks, fileobj=handle, ranges=reader, prefer="tifffile")
        _prewarm(backend, reader)
        return backend
    except InputError as exc:
        handle.close()
        raise InputError(redact(uri), redact(exc.message), retryable=exc.retryable) from None
    except BaseException:
        handle.close()
        raise


def _prewarm(backend: SlideBackend, reader: RangeReader) -> None:
    """Fill tifffile's lazy ``is_jfif`` for every level at open, in one concurrent round trip.

    Left lazy, it seeks and reads the shared file handle on each level's first decode: a round trip
    mid-pipeline, from racing reader threads.
    """
    pages = [p for p in getattr(backend, "pages", ())
             if p.compression in {6, 7, 34892, 33007} and len(p.dataoffsets)
             and p.dataoffsets[0] and p.databytecounts[0] >= 11]
    spans = [(int(p.dataoffsets[0]) + 6, int(p.dataoffsets[0]) + 10) for p in pages]
    for page, head in zip(pages, reader.fetch_many(spans), strict=True):
        page.__dict__["is_jfif"] = head == b"JFIF"


class StagedBackend(SlideBackend):
    """A slide opened from its staged local copy; closing it unpins the copy so it may be evicted."""

    def __init__(self, inner: SlideBackend, staged: StagedFile):
        self.inner, self.info, self._staged = inner, inner.info, staged

    def read_boxes(self, level: int, boxes: np.ndarray, clocks: StageClocks) -> np.ndarray:
        return self.inner.read_boxes(level, boxes, clocks)

    def expect_reads(self, level: int, blocks: Iterable[np.ndarray]) -> None:
        self.inner.expect_reads(level, blocks)

    def use_gpu_decode(self) -> None:
        self.inner.use_gpu_decode()

    def accept_corrupt_tiles(self) -> None:
        self.inner.accept_corrupt_tiles()

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            self._staged.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)


def open_staged(uri: str, options: dict[str, Any] | None, clocks: StageClocks,
                policy: RetryPolicy | None = None, cache: StageCache | None = None) -> SlideBackend:
    """Open the stage cache's local copy of a remote slide (downloaded now if not ahead of time)."""
    cache = cache or get_stage_cache()
    staged = cache.open(uri, options, clocks, policy, companions=_has_companions(uri))
    try:  # local preads are not storage traffic: keep them out of the storage counters
        return StagedBackend(open_slide(staged.path, StageClocks()), staged)
    except InputError as exc:
        staged.close()
        message = exc.message.replace(staged.path, os.path.basename(staged.path))
        raise InputError(redact(uri), redact(message), retryable=exc.retryable) from None
    except BaseException:
        staged.close()
        raise


def open_slide_input(uri: str, clocks: StageClocks, *, access: str = "auto",
                     options: dict[str, Any] | None = None,
                     policy: RetryPolicy | None = None) -> SlideBackend:
    """Open a slide on a worker: local, streamed or staged, as ``backend.access`` records."""
    if not is_remote(uri):
        path = local_path(uri)
        if not os.path.exists(path):
            raise InputError(uri, "file not found")
        return _mark(open_slide(path, clocks), "local", clocks)
    chosen = choose_access(uri, access)
    if chosen == "stream":
        try:
            return _mark(open_stream(uri, options, clocks, policy), "stream", clocks)
        except InputError as exc:
            if access != "auto" or _is_storage_failure(exc):
                raise
            clocks.count("storage.stream_fallbacks")
    return _mark(open_staged(uri, options, clocks, policy), "stage", clocks)


def _is_storage_failure(exc: InputError) -> bool:
    """Failures that staging would hit again (missing, forbidden, unreachable): no fallback."""
    return exc.retryable or exc.message.startswith(("object not found", "access denied", "storage",
                                                    "is an empty", "file not found"))


def prefetch(uris: Iterable[str], access: str, options: dict[str, Any] | None) -> list[str]:
    """Start background downloads of the slides among ``uris`` that will be staged.

    Call on a worker with the next few shards' URIs when a shard starts: their downloads then
    overlap this shard's compute. Streamed and local slides are ignored; a download that would not
    fit the stage cache is skipped (the slide downloads when opened). Returns the URIs started.
    """
    staged = [u for u in uris if is_remote(u) and choose_access(u, access) == "stage"]
    cache = get_stage_cache()
    started: list[str] = []
    for uri in staged:
        started += cache.prefetch([uri], options, companions=_has_companions(uri))
    return started


def release(uri: str) -> None:
    """Drop a slide's staged files once its shard has committed (no-op if it was not staged)."""
    if is_remote(uri):
        get_stage_cache().release(uri)
