"""Whole-file staging: a bounded local cache of remote files, downloaded ahead of use.

Some inputs cannot be read by byte range (slide formats only openslide reads: MRXS, NDPI, SCN,
VMS, BIF), so their files are downloaded whole and opened locally; this module knows files, not
slides (the slide layer decides what to stage and opens the local copy). Download time then adds
to every slide unless it overlaps compute: :meth:`StageCache.prefetch` starts downloads of the
next slides in background threads while the current ones compute (after this process's own
foreground downloads), and :meth:`StageCache.open` uses a finished download, waits for an
in-flight one, or downloads in the caller when nothing was prefetched.

The cache is one per host and user, shared by the worker processes there (``io.host_files``):
the slide one worker downloaded ahead serves whichever worker runs its shard, and a download in
progress elsewhere is waited for, not repeated. It is bounded (``max_bytes``, for the host): a
prefetch that would not fit after evicting unused files (least recently used first; a file
another process has open is never evicted) is skipped rather than allowed to fill the disk,
while the slide being opened always proceeds. A slide's files are deleted by :meth:`release`
once its shard commits. A file may come with a *companion directory* (its stem, as MRXS keeps
its data beside the index file): the caller asks for it with ``companions=True`` and the whole
directory is staged too.

A lone file's version is asked once per run (a HEAD): its record keeps that version (size,
ETag, mtime) and the run that asked, so that another process of the same run (the client that
staged the first slides before the workers started, a worker that prefetched it) takes the copy
as that version with no request of its own. A copy another run staged is asked again before
it is used, and its record then names this run. The run is the shard's (stage_entries.staging_for),
kept by each entry: two runs in one worker process (one Dask cluster) never take each other's.
Nor their caches: a shard stages in the cache of its job's settings (:func:`shard_stage`), and
a copy reopened is checked to be still the version it staged (another process may replace it).
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputError
from gpubatch.core.threads import ContextPool
from gpubatch.io.host_files import (
    SHARED,
    EntryLock,
    read_record,
    touch,
    try_exclusive,
    write_record,
)
from gpubatch.io.redact import redact
from gpubatch.io.retry import (
    RangesIgnored,
    RetryPolicy,
    changed_while_read,
    default_policy,
)
from gpubatch.io.stage_entries import (
    RemoteFile,
    StagedFile,
    StageEntry,
    listing,
    local_name,
    max_bytes_of,
    mtime_of,
    shard_cache,
    shard_run,
    stage_root,
    staging_for,
    whole_object,
    write_chunks,
)
from gpubatch.io.storage import open_ranges, stat

CHUNK_BYTES = 8 << 20
CHUNKS_IN_FLIGHT = 8
#: the longest an open waits for another process's download of the same file, or a lock
WAIT_S = 3600.0
#: the longest the client waits for the first slides' versions (HEADs) before its workers start;
#: past it they start anyway, and a worker may ask a version again (one more HEAD, nothing worse)
VERSIONS_WAIT_S = 10.0
#: how long a released copy's record stays (it stops prefetches asked before the release)
RELEASED_KEPT_S = 3600.0


class StageCache:
    """Bounded LRU cache of whole files with background prefetch, shared by a host's processes;
    thread-safe."""

    def __init__(self, directory: str | None = None, max_bytes: int | None = None, parallel: int = 2,
                 run: str | None = None):
        root = stage_root(directory)
        # one cache per user on a host; a process of its own where processes cannot lock files
        self.dir = os.path.join(root, f"u{getattr(os, 'getuid', lambda: 0)()}" if SHARED else f"p{os.getpid()}")
        self._records = os.path.join(self.dir, ".records")
        self.max_bytes = max_bytes_of(max_bytes)
        #: by (URI, run): each run's entry asks and records the version for that run
        self._entries: dict[tuple[str, str | None], StageEntry] = {}
        self._lock = threading.Lock()
        self._foreground = threading.Condition(self._lock)
        self._opening = 0  # this process's downloads that a shard waits on
        #: every request this cache's downloads made (a copy's first opener reports its own too)
        self.spent = StageClocks()
        #: downloads run in the context of the shard that asked for them: its storage options
        self._pool = ContextPool(max(1, parallel), "gpubatch-stage")
        #: the run this cache stages for outside a shard's (the client's cache): a record
        #: of the same run gives its file's version; None: every file is asked (a HEAD) before use
        self.run = run
        self.users = 0  # shards in it now (shard_stage): a cache in use is never retired

    # -- public ---------------------------------------------------------------------------------

    def prefetch(self, uris: list[str], options: dict[str, Any] | None,
                 policy: RetryPolicy | None = None, companions: bool = False) -> list[str]:
        """Start background downloads of ``uris`` not yet cached; returns the ones started."""
        started, run = [], self._run_now()
        for uri in uris:
            with self._lock:
                if (uri, run) in self._entries:
                    continue
                entry = self._new_entry(uri, run)
            self._pool.submit(self._download, entry, options, policy or default_policy(), False, companions)
            started.append(uri)
        return started

    def open(self, uri: str, options: dict[str, Any] | None, clocks: StageClocks,
             policy: RetryPolicy | None = None, companions: bool = False) -> StagedFile:
        """The staged copy, pinned: cached, in flight here or elsewhere (wait), or downloaded now."""
        t0 = time.perf_counter()  # this shard waits on a download: its own, a prefetch, another's
        run = self._run_now()
        for _ in range(4):  # a skipped prefetch or a copy evicted meanwhile: take it over
            with self._lock:
                entry = self._entries.get((uri, run)) or self._new_entry(uri, run)
                hit = entry.state == "ready"
            if entry.state == "pending":
                self._download(entry, options, policy or default_policy(), True, companions)
            entry.done.wait(WAIT_S)
            if entry.state == "ready" and self._pin(entry):
                break
            if entry.state in ("failed", "downloading"):
                break
            self._forget(entry)
        clocks.count("storage.wait_s", time.perf_counter() - t0)
        with self._lock:
            if entry.error is not None or entry.state != "ready" or entry.pins <= 0:
                self._entries.pop((uri, run), None)
                raise entry.error or InputError(redact(uri), "staging did not finish")
            self._report(entry, clocks, hit)
        return StagedFile(entry.local, lambda: self._unpin(entry), entry.etag, entry.identity)

    def wait_recorded(self, uris: list[str], timeout_s: float) -> None:
        """Wait (``timeout_s`` at most, in all) until this process's downloads of ``uris`` have
        asked their versions and recorded them: the client staging the first slides, so that the
        workers it then starts take those versions instead of asking again beside it."""
        deadline = time.monotonic() + timeout_s
        keys = [(uri, self._run_now()) for uri in uris]
        with self._lock:
            entries = [self._entries[k] for k in keys if k in self._entries]
        for entry in entries:
            entry.recorded.wait(max(0.0, deadline - time.monotonic()))

    def release(self, uri: str) -> None:
        """Delete a file's staged copy (its shard committed) unless another process uses it."""
        self._release((uri, self._run_now()))

    def _release(self, key: tuple[str, str | None]) -> None:
        """A copy still pinned here (a shard reads it) goes when its last pin does (:meth:`_unpin`):
        closing its lock now let go of the pin, and any process could evict the file under it."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return
            entry.released = True
            if entry.pins > 0 or entry.state == "downloading":
                return  # an in-flight download deletes its own files when it ends
            self._delete(entry.root, entry.record, entry.lock, released=True)
            entry.lock.close()

    def used_bytes(self) -> int:
        """Bytes staged on this host (ready or being downloaded), by every process."""
        return sum(int(read_record(p).get("size", 0)) for p in glob.glob(os.path.join(self._records, "*.json")))

    def cached(self) -> dict[str, str]:
        """uri -> state of this process's entries, for tests and diagnostics."""
        with self._lock:
            return {uri: e.state for (uri, _), e in self._entries.items()}

    def clear(self) -> None:
        """Release this process's entries (other processes' copies stay)."""
        with self._lock:
            keys = list(self._entries)
        for key in keys:
            self._release(key)

    def idle(self) -> bool:
        """No shard in it, and none of its copies pinned or being downloaded."""
        with self._lock:
            return self.users == 0 and all(e.pins == 0 and e.state != "downloading" for e in self._entries.values())

    def close(self) -> None:
        """:meth:`clear`, and its download threads end (a retired cache)."""
        self.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- internals ------------------------------------------------------------------------------

    def _run_now(self) -> str | None:
        """The run staged for: the shard's (stage_entries.staging_for), else this cache's own."""
        return shard_run() or self.run

    def _new_entry(self, uri: str, run: str | None = None) -> StageEntry:
        """``uri``'s entry for ``run``: its own flock, apart from another run's as another process's."""
        key = hashlib.sha1(uri.encode()).hexdigest()[:16]
        root = os.path.join(self.dir, key)
        entry = StageEntry(uri, root, os.path.join(root, local_name(uri)),
                       EntryLock(os.path.join(self._records, f"{key}.lock")),
                       os.path.join(self._records, f"{key}.json"), run=run)
        self._entries[(uri, run)] = entry
        return entry

    def _forget(self, entry: StageEntry) -> None:
        with self._lock:
            if self._entries.get((entry.uri, entry.run)) is entry:
                self._entries.pop((entry.uri, entry.run))
        entry.lock.close()

    def _pin(self, entry: StageEntry) -> bool:
        """Hold the copy (a shared lock: no process evicts it); False when it is gone meanwhile."""
        with self._lock:
            if entry.pins > 0:
                entry.pins += 1
                return True
        if not entry.lock.shared(WAIT_S):
            return False
        if not self._copy_of(entry, entry.tag):  # gone, or replaced by another version meanwhile
            entry.lock.unlock()
            return False
        with self._lock:
            entry.pins += 1
        touch(entry.record)
        return True

    def _report(self, entry: StageEntry, clocks: StageClocks, hit: bool) -> None:
        """Fold the download's metrics into the first shard that opens it; later opens are hits."""
        if not entry.reported:
            entry.reported = True
            clocks.merge(entry.clocks)
            clocks.count("storage.staged_bytes", entry.size)
            if hit or not entry.clocks.counters:  # prefetched ahead, or downloaded by another process
                clocks.count("storage.cache_hits")
        else:
            clocks.count("storage.cache_hits")

    def _unpin(self, entry: StageEntry) -> None:
        with self._lock:
            entry.pins = max(0, entry.pins - 1)
            last, released = entry.pins == 0, entry.released
        if last:
            touch(entry.record)
            entry.lock.unlock()
            if released:  # released while pinned (:meth:`_release`)
                self._delete(entry.root, entry.record, entry.lock, released=True)
                entry.lock.close()

    def _claim(self, entry: StageEntry, required: bool) -> bool:
        with self._lock:
            if entry.state != "pending" or entry.released:
                return False
            entry.state = "downloading"
            if required:
                self._opening += 1
            else:  # a shard waiting on its own download goes first
                self._foreground.wait_for(lambda: self._opening == 0, WAIT_S)
            return True

    def _download(self, entry: StageEntry, options: dict[str, Any] | None, policy: RetryPolicy,
                  required: bool, companions: bool) -> None:
        """Download ``entry`` (all its files) to partial names, then rename; never raises. Another
        process's copy of this very object is used, and its download in progress waited for."""
        if not self._claim(entry, required):
            return
        try:
            if self._stale(entry, required):
                return
            files, tag, held = self._version_locked(entry, options, policy, required, companions)
            entry.tag = tag  # the version its copy is of, checked again at every pin
            # the version a shard's identity is compared with: a lone file's comes from the same
            # HEAD (io.storage.stat) as that identity; a listing's (companions) from fsspec, whose
            # ETag may be another spelling of it (GCS's JSON API): then left to the HEAD after
            entry.etag = files[0].etag if not companions else None
            total = sum(f.size for f in files)
            if held == "shared":
                entry.size = total  # another process staged this very object: use its copy
                self._stamp(entry, tag)
                self._finish(entry, "ready")
                return
            if held == "elsewhere":  # a prefetch that another process is making already
                self._finish(entry, "skipped", delete=False)
                return
            if self._stale(entry, required):  # released while this process was listing it
                return
            self._delete(entry.root, entry.record, entry.lock, keep_lock=True)  # an older version's copy
            if not self._reserve(entry, total, required):
                self._finish(entry, "skipped")
                return
            record = {"size": total, "tag": tag, **self._asked_by(entry)}
            write_record(entry.record, {**record, "ready": False})
            entry.recorded.set()
            for remote in files:
                self._fetch_file(remote, options, policy, entry.clocks)
            write_record(entry.record, {**record, "ready": True})
            self._finish(entry, "ready")
        except InputError as exc:
            entry.error = exc
            self._finish(entry, "failed")
        except Exception as exc:  # noqa: BLE001 - surfaced to the opener as an InputError
            entry.error = InputError(redact(entry.uri), redact(f"staging failed: {type(exc).__name__}: {exc}"))
            self._finish(entry, "failed")
        finally:
            self.spent.merge(entry.clocks)
            with self._lock:
                if required:
                    self._opening -= 1
                    self._foreground.notify_all()

    def _version_locked(self, entry: StageEntry, options: dict[str, Any] | None, policy: RetryPolicy,
                        required: bool, companions: bool) -> tuple[list[RemoteFile], str, str]:
        """The file's listing and version tag, and the lock held for it (:meth:`_lock_for`). The
        version this run's record gives, where there is one: its copy (ready, or being downloaded
        by another process of this run, waited for) is used with no request. Where that copy is
        gone (its download failed, it was evicted), the object is asked again, as it is when
        the record is another run's or there is none."""
        recorded = self._recorded(entry, companions)
        if recorded is not None:
            held = self._lock_for(entry, recorded[1], wait=required)
            if held != "exclusive":
                return *recorded, held
            entry.lock.unlock()
        files, tag = listing(entry, options, policy, companions)
        return files, tag, self._lock_for(entry, tag, wait=required)

    def _recorded(self, entry: StageEntry, companions: bool) -> tuple[list[RemoteFile], str] | None:
        """A lone file's listing and tag as this run's record of it says (another process of
        this run asked its version: the client staging before the workers, a worker's
        prefetch); None where the record is another run's, or there is none."""
        record = read_record(entry.record)
        identity = record.get("identity")
        if companions or not entry.run or record.get("run") != entry.run or not isinstance(identity, dict):
            return None
        entry.identity = identity
        remote = RemoteFile(entry.uri, entry.local, int(identity.get("size") or 0), identity.get("etag"))
        return [remote], str(record.get("tag"))

    def _asked_by(self, entry: StageEntry) -> dict[str, Any]:
        """What a copy's record keeps of the version asked (a lone file's identity) and of the
        run that asked it, which that run's other processes take (:meth:`_recorded`)."""
        if entry.run is None or entry.identity is None:
            return {}
        return {"run": entry.run, "identity": entry.identity}

    def _stamp(self, entry: StageEntry, tag: str) -> None:
        """A ready copy of version ``tag`` that another run staged, whose version this run has
        just asked: its record names this run from now on, so this run's other processes (its
        workers, after the client) take it with no HEAD of their own. Held shared meanwhile, so
        nobody evicts or rewrites it; a record already this run's is left as it is."""
        record, asked = read_record(entry.record), self._asked_by(entry)
        if asked and record.get("ready") and record.get("tag") == tag and record.get("run") != asked["run"]:
            write_record(entry.record, {**record, **asked})

    def _stale(self, entry: StageEntry, required: bool) -> bool:
        """A prefetch asked before its copy was released (its shard ran, in any process) is
        skipped, so that nobody downloads a copy nobody will open; True when so."""
        if required or read_record(entry.record).get("released", -1.0) < entry.asked:
            return False
        self._finish(entry, "skipped", delete=False)
        return True

    def _lock_for(self, entry: StageEntry, tag: str, wait: bool) -> str:
        """``shared`` when a ready copy of this version is there (held so that nobody deletes it),
        else ``exclusive`` (held to download it). While another process downloads it: wait, or
        (``wait`` False, a prefetch) ``elsewhere``."""
        deadline = time.monotonic() + WAIT_S
        while True:
            if self._copy_of(entry, tag):
                if entry.lock.shared(None):
                    if self._copy_of(entry, tag):
                        return "shared"
                    entry.lock.unlock()
            elif entry.lock.exclusive(None):
                if not self._copy_of(entry, tag):
                    return "exclusive"
                entry.lock.unlock()  # finished elsewhere while this process waited: use it
                continue
            elif not wait:
                return "elsewhere"
            if time.monotonic() > deadline:
                raise InputError(redact(entry.uri), f"another process kept its copy locked for {WAIT_S:g} s",
                                 retryable=True)
            time.sleep(0.05)

    @staticmethod
    def _copy_of(entry: StageEntry, tag: str | None) -> bool:
        """Whether a ready copy of version ``tag`` is there: one another process replaced since
        (its object written over) names another in its record."""
        record = read_record(entry.record)
        return bool(record.get("ready")) and record.get("tag") == tag and os.path.exists(entry.local)

    def _finish(self, entry: StageEntry, state: str, delete: bool = True) -> None:
        with self._lock:
            if state == "skipped" and self._entries.get((entry.uri, entry.run)) is entry:
                self._entries.pop((entry.uri, entry.run))  # no room now: forget it, a later open downloads
            entry.state = state
            released = entry.released
        entry.recorded.set()
        if delete and (released or state in ("failed", "skipped")):
            self._delete(entry.root, entry.record, entry.lock)
        entry.lock.unlock()
        entry.done.set()

    def _delete(self, root: str, record: str, lock: EntryLock, keep_lock: bool = False,
                released: bool = False) -> None:
        """Delete a copy nobody uses, its record and (unless ``keep_lock``: this process goes on
        to download it) its lock file: under ``lock`` when it is held exclusively, else when the
        lock can be taken without waiting (a process using the copy holds it shared). ``released``
        (its shard committed): the record stays, saying when, so that prefetches asked before
        then, still queued in any process, do not download it again (:data:`RELEASED_KEPT_S`)."""
        held = lock if lock.state == "exclusive" else try_exclusive(lock.path)
        if held is None:
            return  # another process has it open: eviction takes it later
        try:
            shutil.rmtree(root, ignore_errors=True)
            if released:
                write_record(record, {"size": 0, "released": time.time()})
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(record)
        finally:
            if released:
                if held is not lock:
                    held.close()
            elif held is not lock:
                held.remove()
            elif not keep_lock:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(lock.path)  # still held: unlocked by the caller

    def _reserve(self, entry: StageEntry, size: int, required: bool) -> bool:
        """Evict copies nobody uses, least recently used first, until ``size`` fits the host's
        budget; records left by a process that died mid-download go first."""
        entry.size = size
        records = [p for p in glob.glob(os.path.join(self._records, "*.json")) if p != entry.record]
        for path in records:  # released copies' records, kept for stale prefetches: long enough
            if time.time() - read_record(path).get("released", time.time()) > RELEASED_KEPT_S:
                lock = try_exclusive(path[: -len(".json")] + ".lock")
                if lock is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
                    lock.remove()
        records = [p for p in records if "released" not in read_record(p)]
        used = sum(int(read_record(p).get("size", 0)) for p in records)
        for path in sorted(records, key=lambda p: (read_record(p).get("ready", False), mtime_of(p))):
            if used + size <= self.max_bytes:
                break
            lock = try_exclusive(path[: -len(".json")] + ".lock")
            if lock is None:
                continue  # in use or being downloaded
            try:
                freed = int(read_record(path).get("size", 0))
                self._delete(os.path.join(self.dir, os.path.basename(path)[: -len(".json")]), path, lock)
            finally:
                lock.close()
            used -= freed
            entry.clocks.count("storage.evictions")
            with self._lock:
                for key, other in list(self._entries.items()):
                    if other.record == path and other.state == "ready" and other.pins == 0:
                        self._entries.pop(key)
                        other.lock.close()
        return required or used + size <= self.max_bytes

    def _fetch_file(self, remote: RemoteFile, options: dict[str, Any] | None, policy: RetryPolicy,
                    clocks: StageClocks) -> None:
        """Chunked range download (each chunk retried on its own), written with pwrite, of the
        version listed: obstore's reads are pinned to its ETag (If-Match); fsspec's cannot be,
        so the object is asked again after them (a HEAD), and a change fails the download."""
        uri, local, size = remote.uri, remote.local, remote.size
        os.makedirs(os.path.dirname(local), exist_ok=True)
        part = local + ".part"
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with open_ranges(uri, options, clocks, policy, max_concurrency=CHUNKS_IN_FLIGHT,
                             count_wait=False, etag=remote.etag) as reader:
                try:
                    write_chunks(reader, fd, size, CHUNK_BYTES, CHUNKS_IN_FLIGHT)
                except RangesIgnored:  # its server answers every GET whole: take one
                    size = 0
                if size <= 0:  # size unknown (some HTTP servers), or no ranges: one whole-object request
                    whole_object(remote, options, policy, clocks, fd, CHUNK_BYTES)
                pinned = reader.version() is not None
            if not pinned and remote.etag is not None and size > 0:
                now = stat(uri, options, policy, clocks)
                if (now["size"], now["etag"]) != (size, remote.etag):
                    raise changed_while_read(uri, f"ETag {remote.etag} -> {now['etag']}, downloaded by fsspec")
        finally:
            os.close(fd)
        os.replace(part, local)


#: the most stage caches (one per job settings) a process keeps: past it, idle ones are retired
MAX_CACHES = 4

_cache: StageCache | None = None  # the process's, used outside a shard (configure_stage_cache)
_caches: dict[str, StageCache] = {}  # by settings_key, oldest first
_cache_lock = threading.Lock()


def settings_key(config: dict[str, Any] | None) -> str:
    """What tells two jobs' stage caches apart (folder, size, parallel downloads), hashed: nothing
    a profile holds is kept as it is, should a setting ever carry a secret."""
    config = config or {}
    chosen = [stage_root(config.get("dir")), max_bytes_of(config.get("max_bytes")), int(config.get("parallel", 2))]
    return hashlib.sha256(repr(chosen).encode()).hexdigest()[:16]


def _cache_for(config: dict[str, Any] | None) -> StageCache:
    """The cache of these settings, made on first use (under ``_cache_lock``); past
    :data:`MAX_CACHES`, idle ones (no shard in them, no copy pinned or downloading) are retired,
    oldest first. Each is bounded by its ``max_bytes`` in its folder (where caches count each
    other's copies): the disk used stays bounded by the settings in use."""
    key = settings_key(config)
    if key not in _caches:
        for old_key, old in list(_caches.items()):
            if len(_caches) < MAX_CACHES:
                break
            if old is not _cache and old.idle():
                del _caches[old_key]
                old.close()
        config = config or {}
        _caches[key] = StageCache(config.get("dir"), config.get("max_bytes"), int(config.get("parallel", 2)))
    return _caches[key]


def configure_stage_cache(config: dict[str, Any] | None) -> StageCache:
    """This process's cache (used outside a shard) from a profile's ``stage_cache: {dir,
    max_bytes, parallel}``. Caches of other settings live on beside it: replacing (clearing)
    the process's one when another job's settings came deleted copies a shard of the first job
    was reading or about to open."""
    global _cache
    with _cache_lock:
        _cache = _cache_for(config)
        return _cache


@contextlib.contextmanager
def shard_stage(run: str | None, config: dict[str, Any] | None) -> Iterator[StageCache]:
    """One shard's staging on a worker: for its run, in the cache of its job's settings (given by
    :func:`get_stage_cache` in the block), kept while the shard is in it."""
    with _cache_lock:
        cache = _cache_for(config)
        cache.users += 1
    try:
        with staging_for(run, cache):
            yield cache
    finally:
        with _cache_lock:
            cache.users -= 1


def get_stage_cache() -> StageCache:
    """The shard's stage cache (:func:`shard_stage`), else this process's, made on first use
    from the environment's settings."""
    global _cache
    in_shard = shard_cache()
    if in_shard is not None:
        return in_shard  # type: ignore[no-any-return]
    with _cache_lock:
        if _cache is None:
            _cache = _cache_for(None)
        return _cache


@atexit.register
def forget_stage_caches() -> None:
    """Release every cache's entries (other processes' copies stay) and forget the caches."""
    global _cache
    with _cache_lock:
        caches = list(_caches.values())
        _caches.clear()
        _cache = None
    for cache in caches:
        with contextlib.suppress(Exception):
            cache.clear()
