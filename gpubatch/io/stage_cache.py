"""Whole-file staging: a bounded local cache of remote files, downloaded ahead of use.

Some inputs cannot be read by byte range (slide formats only openslide reads: MRXS, NDPI, SCN,
VMS, BIF), so their files are downloaded whole and opened locally; this module knows files, not
slides (the slide layer decides what to stage and opens the local copy). Download time then adds to every slide unless
it overlaps compute: :meth:`StageCache.prefetch` starts downloads of the next slides in background
threads while the current one computes, and :meth:`StageCache.open` uses a finished download, waits
for an in-flight one, or downloads in the caller when nothing was prefetched.

The cache is bounded (``max_bytes``): a prefetch that would not fit after evicting unpinned files
(least recently used first) is skipped rather than allowed to fill the disk, while the slide being
opened always proceeds. A slide's files are deleted by :meth:`release` once its shard commits.
Each worker process has its own subdirectory, so processes on one host never share a partial file.
A file may come with a *companion directory* (its stem, as MRXS keeps its data beside the index
file): the caller asks for it with ``companions=True`` and the whole directory is staged too.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputError
from gpubatch.io.redact import redact
from gpubatch.io.retry import RetryPolicy, call_with_retries
from gpubatch.io.storage import get_fs, open_ranges
from gpubatch.io.uris import uri_name

DEFAULT_MAX_BYTES = 20 << 30
CHUNK_BYTES = 8 << 20
CHUNKS_IN_FLIGHT = 8


@dataclass
class _Entry:
    """One remote slide in the cache; ``state``: pending -> downloading -> ready | failed."""

    uri: str
    root: str
    local: str
    state: str = "pending"
    size: int = 0
    pins: int = 0
    last_used: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    error: InputError | None = None
    released: bool = False
    reported: bool = False
    clocks: StageClocks = field(default_factory=StageClocks)


class StagedFile:
    """A ready local copy, pinned (never evicted) until :meth:`close`."""

    def __init__(self, path: str, unpin: Any):
        self.path, self._unpin = path, unpin

    def close(self) -> None:
        if self._unpin is not None:
            self._unpin()
            self._unpin = None

    def __enter__(self) -> StagedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _safe_name(uri: str) -> str:
    from gpubatch.core.files import safe_filename

    return safe_filename(uri_name(uri) or "file", 120)


class StageCache:
    """Bounded LRU cache of whole files with background prefetch; thread-safe."""

    def __init__(self, directory: str | None = None, max_bytes: int | None = None, parallel: int = 2):
        root = directory or os.environ.get("GPUBATCH_STAGE_DIR") or os.path.join(
            tempfile.gettempdir(), "gpubatch-stage")
        self.dir = os.path.join(root, f"p{os.getpid()}")
        env_cap = os.environ.get("GPUBATCH_STAGE_MAX_BYTES")
        self.max_bytes = int(max_bytes or (int(env_cap) if env_cap else DEFAULT_MAX_BYTES))
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max(1, parallel), "gpubatch-stage")

    # -- public ---------------------------------------------------------------------------------

    def prefetch(self, uris: list[str], options: dict[str, Any] | None,
                 policy: RetryPolicy | None = None, companions: bool = False) -> list[str]:
        """Start background downloads of ``uris`` not yet cached; returns the ones started."""
        started = []
        for uri in uris:
            with self._lock:
                if uri in self._entries:
                    continue
                entry = self._new_entry(uri)
            self._pool.submit(self._download, entry, options, policy or RetryPolicy(), False, companions)
            started.append(uri)
        return started

    def open(self, uri: str, options: dict[str, Any] | None, clocks: StageClocks,
             policy: RetryPolicy | None = None, companions: bool = False) -> StagedFile:
        """The staged copy: cached, in flight (wait), or downloaded now in this thread."""
        for _ in range(3):  # a skipped prefetch (cache full) leaves nothing: take it over
            with self._lock:
                entry = self._entries.get(uri) or self._new_entry(uri)
                hit = entry.state == "ready"
            t0 = time.perf_counter()  # this shard waits on a download, its own or a prefetch
            if entry.state == "pending":
                self._download(entry, options, policy or RetryPolicy(), True, companions)
            entry.done.wait()
            clocks.count("storage.wait_s", time.perf_counter() - t0)
            if entry.state != "skipped":
                break
        with self._lock:
            if entry.error is not None or entry.state != "ready":
                self._entries.pop(uri, None)
                raise entry.error or InputError(redact(uri), "staging did not finish")
            entry.pins += 1
            entry.last_used = time.monotonic()
            self._report(entry, clocks, hit)
        return StagedFile(entry.local, lambda: self._unpin(entry))

    def release(self, uri: str) -> None:
        """Delete a slide's staged files (its shard committed); later opens download again."""
        with self._lock:
            entry = self._entries.pop(uri, None)
            if entry is None:
                return
            entry.released = True
            downloading = entry.state == "downloading"
        if not downloading:  # an in-flight download deletes its own files when it ends
            shutil.rmtree(entry.root, ignore_errors=True)

    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.size for e in self._entries.values() if e.state in ("ready", "downloading"))

    def cached(self) -> dict[str, str]:
        """uri -> state, for tests and diagnostics."""
        with self._lock:
            return {u: e.state for u, e in self._entries.items()}

    def clear(self) -> None:
        with self._lock:
            uris = list(self._entries)
        for uri in uris:
            self.release(uri)
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- internals ------------------------------------------------------------------------------

    def _new_entry(self, uri: str) -> _Entry:
        root = os.path.join(self.dir, hashlib.sha1(uri.encode()).hexdigest()[:16])
        entry = _Entry(uri, root, os.path.join(root, _safe_name(uri)))
        self._entries[uri] = entry
        return entry

    def _report(self, entry: _Entry, clocks: StageClocks, hit: bool) -> None:
        """Fold the download's metrics into the first shard that opens it; later opens are hits."""
        if not entry.reported:
            entry.reported = True
            clocks.merge(entry.clocks)
            clocks.count("storage.staged_bytes", entry.size)
            if hit:
                clocks.count("storage.cache_hits")  # prefetched ahead of use
        else:
            clocks.count("storage.cache_hits")

    def _unpin(self, entry: _Entry) -> None:
        with self._lock:
            entry.pins = max(0, entry.pins - 1)
            entry.last_used = time.monotonic()

    def _claim(self, entry: _Entry) -> bool:
        with self._lock:
            if entry.state != "pending" or entry.released:
                return False
            entry.state = "downloading"
            return True

    def _download(self, entry: _Entry, options: dict[str, Any] | None, policy: RetryPolicy,
                  required: bool, companions: bool) -> None:
        """Download ``entry`` (all its files) to a partial name, then rename; never raises."""
        if not self._claim(entry):
            return
        try:
            files = self._listing(entry, options, policy, companions)
            total = sum(size for _, _, size in files)
            if not self._reserve(entry, total, required):
                self._finish(entry, "skipped")
                return
            for uri, local, size in files:
                self._fetch_file(uri, local, size, options, policy, entry.clocks)
            self._finish(entry, "ready")
        except InputError as exc:
            entry.error = exc
            self._finish(entry, "failed")
        except Exception as exc:  # noqa: BLE001 - surfaced to the opener as an InputError
            entry.error = InputError(redact(entry.uri), redact(f"staging failed: {type(exc).__name__}: {exc}"))
            self._finish(entry, "failed")

    def _finish(self, entry: _Entry, state: str) -> None:
        with self._lock:
            if state == "skipped" and self._entries.get(entry.uri) is entry:
                self._entries.pop(entry.uri)  # no room now: forget it, a later open downloads
            entry.state = state
            released = entry.released
        if released or state in ("failed", "skipped"):
            shutil.rmtree(entry.root, ignore_errors=True)
        entry.done.set()

    def _listing(self, entry: _Entry, options: dict[str, Any] | None, policy: RetryPolicy,
                 companions: bool) -> list[tuple[str, str, int]]:
        """(remote uri, local path, size) of the file and, when asked, of its companion directory."""
        fs, path = get_fs(entry.uri, options)
        info = call_with_retries(lambda: fs.info(path), entry.uri, policy, entry.clocks)
        if info.get("type") == "directory":
            raise InputError(redact(entry.uri), "is a directory (prefix), not a file")
        files = [(entry.uri, entry.local, int(info.get("size") or 0))]
        stem, suffix = os.path.splitext(path)
        if companions:
            found = call_with_retries(lambda: fs.find(stem, detail=True), entry.uri, policy, entry.clocks)
            local_stem = os.path.splitext(entry.local)[0]
            for name, meta in sorted(found.items()):
                rel = os.path.relpath(name, stem)
                files.append((fs.unstrip_protocol(name), os.path.join(local_stem, rel), int(meta.get("size") or 0)))
        return files

    def _reserve(self, entry: _Entry, size: int, required: bool) -> bool:
        """Evict unpinned ready files, least recently used first, until ``size`` fits."""
        with self._lock:
            entry.size = size
            used = sum(e.size for e in self._entries.values()
                       if e is not entry and e.state in ("ready", "downloading"))
            victims = sorted((e for e in self._entries.values()
                              if e is not entry and e.state == "ready" and e.pins == 0),
                             key=lambda e: e.last_used)
            while used + size > self.max_bytes and victims:
                victim = victims.pop(0)
                used -= victim.size
                self._entries.pop(victim.uri, None)
                shutil.rmtree(victim.root, ignore_errors=True)
                entry.clocks.count("storage.evictions")
            return required or used + size <= self.max_bytes

    def _fetch_file(self, uri: str, local: str, size: int, options: dict[str, Any] | None,
                    policy: RetryPolicy, clocks: StageClocks) -> None:
        """Chunked range download (each chunk retried on its own), written with pwrite."""
        os.makedirs(os.path.dirname(local), exist_ok=True)
        part = local + ".part"
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with open_ranges(uri, options, clocks, policy, max_concurrency=CHUNKS_IN_FLIGHT,
                             count_wait=False) as reader:
                if size <= 0:  # size unknown (some HTTP servers): one whole-object request
                    fs, path = get_fs(uri, options)
                    os.write(fd, call_with_retries(lambda: fs.cat_file(path), uri, policy, clocks))
                spans = [(s, min(s + CHUNK_BYTES, size)) for s in range(0, size, CHUNK_BYTES)]
                for wave in range(0, len(spans), CHUNKS_IN_FLIGHT):
                    batch = spans[wave: wave + CHUNKS_IN_FLIGHT]
                    for (start, _), blob in zip(batch, reader.fetch_many(batch), strict=True):
                        os.pwrite(fd, blob, start)
        finally:
            os.close(fd)
        os.replace(part, local)


_cache: StageCache | None = None
_cache_lock = threading.Lock()


def configure_stage_cache(config: dict[str, Any] | None) -> StageCache:
    """(Re)create this process's cache from a profile's ``stage_cache: {dir, max_bytes, parallel}``."""
    global _cache
    config = config or {}
    with _cache_lock:
        if _cache is not None:
            _cache.clear()
        _cache = StageCache(config.get("dir"), config.get("max_bytes"), int(config.get("parallel", 2)))
        return _cache


def get_stage_cache() -> StageCache:
    """This process's stage cache, created on first use from the environment's settings."""
    global _cache
    with _cache_lock:
        if _cache is None:
            _cache = StageCache()
        return _cache


@atexit.register
def _cleanup() -> None:
    if _cache is not None:
        with contextlib.suppress(Exception):
            _cache.clear()
