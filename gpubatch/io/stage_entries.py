"""What the stage cache keeps of each remote slide: its entry's state, the files to download,
and the pinned local copy a shard reads (io.stage_cache, the cache itself, is their only maker);
the run a shard stages for, and its cache; and the helpers of a download.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputError
from gpubatch.io.host_files import EntryLock
from gpubatch.io.ranges import RangeReader
from gpubatch.io.redact import redact
from gpubatch.io.retry import RetryPolicy, call_with_retries, changed_while_read
from gpubatch.io.storage import get_fs, identity_of, stat
from gpubatch.io.uris import protocol_of, spelled_as, uri_name

DEFAULT_MAX_BYTES = 20 << 30

#: the run whose shard this thread (task) runs, set by :func:`staging_for`; None outside one
_shard_run: contextvars.ContextVar[str | None] = contextvars.ContextVar("gpubatch_stage_run", default=None)
#: that shard's stage cache (its job's settings), set by :func:`staging_for`; None outside one
_shard_cache: contextvars.ContextVar[Any] = contextvars.ContextVar("gpubatch_stage_cache", default=None)


@contextlib.contextmanager
def staging_for(run: str | None, cache: Any = None) -> Iterator[None]:
    """Within the block (one shard on a worker), the stage cache stages for ``run``: a record of
    that run gives its file's version, and a version asked is recorded as that run's. Per shard,
    not per process: a worker serving two runs at once (two jobs on one Dask cluster) keeps
    their versions apart, where the process's one run let either take the other's. ``cache``:
    the shard's stage cache (its job's settings, io.stage_cache.shard_stage), which
    ``get_stage_cache`` then gives in the block; None: the process's."""
    token, cache_token = _shard_run.set(run or None), _shard_cache.set(cache)
    try:
        yield
    finally:
        _shard_cache.reset(cache_token)
        _shard_run.reset(token)


def shard_run() -> str | None:
    """The run of the shard this thread runs (:func:`staging_for`), None outside one."""
    return _shard_run.get()


def shard_cache() -> Any:
    """The stage cache of the shard this thread runs (:func:`staging_for`), None outside one."""
    return _shard_cache.get()


def max_bytes_of(value: int | None) -> int:
    """A cache's size: ``value``, else ``GPUBATCH_STAGE_MAX_BYTES``, else :data:`DEFAULT_MAX_BYTES`."""
    env_cap = os.environ.get("GPUBATCH_STAGE_MAX_BYTES")
    return int(value or (int(env_cap) if env_cap else DEFAULT_MAX_BYTES))


def stage_root(directory: str | None = None) -> str:
    """Where stage caches live: ``directory`` (a profile's ``stage_cache.dir``), else the
    ``GPUBATCH_STAGE_DIR`` variable, else ``gpubatch-stage`` in the temporary directory."""
    return directory or os.environ.get("GPUBATCH_STAGE_DIR") or os.path.join(tempfile.gettempdir(), "gpubatch-stage")


class RemoteFile(NamedTuple):
    """One file to download: where from and to, and the version (size, unquoted ETag) listed."""

    uri: str
    local: str
    size: int
    etag: str | None


@dataclass
class StageEntry:
    """One remote slide in the cache; ``state``: pending -> downloading -> ready | failed."""

    uri: str
    root: str
    local: str
    lock: EntryLock
    record: str
    state: str = "pending"
    size: int = 0
    pins: int = 0
    last_used: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    #: set once its version was asked and recorded (or it ended): what another process can take
    recorded: threading.Event = field(default_factory=threading.Event)
    error: InputError | None = None
    released: bool = False
    reported: bool = False
    #: when the entry was asked for (a prefetch asked before its copy was released is stale)
    asked: float = field(default_factory=time.time)
    clocks: StageClocks = field(default_factory=StageClocks)
    etag: str | None = None  # the listed version of the (first) file, once listed
    #: a lone file's identity (io.storage.identity_of) as its listing's HEAD found it: the
    #: version the copy is of, which its shard takes instead of asking again
    identity: dict[str, Any] | None = None
    #: the run it stages for (io.stage_cache.staging_for): whose records give its version, and
    #: which run the version it asks is recorded as
    run: str | None = None
    #: the version (size and ETag or mtime, io.stage_cache._listing) of the copy it made or
    #: took: a copy whose record names another since (replaced by another process) is not it
    tag: str | None = None


class StagedFile:
    """A ready local copy, pinned (never evicted) until :meth:`close`."""

    def __init__(self, path: str, unpin: Any, etag: str | None = None,
                 identity: dict[str, Any] | None = None):
        self.path, self._unpin = path, unpin
        self.etag = etag  # the object's version the copy is of, where the listing gave one
        self.identity = identity  # that version's size, ETag and mtime (a lone file's), else None

    def close(self) -> None:
        if self._unpin is not None:
            self._unpin()
            self._unpin = None

    def __enter__(self) -> StagedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def local_name(uri: str) -> str:
    """A file name for ``uri``'s copy: its own name, made safe and short."""
    from gpubatch.core.files import safe_filename

    return safe_filename(uri_name(uri) or "file", 120)


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """All of ``data`` at ``offset``. pwrite may write less than asked without an error (a disk
    that fills, a file size limit, Linux's 2 GiB cap per call): the rest is written by the next
    call, whose error (ENOSPC, EFBIG) then fails the download instead of a copy cut short."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(f"nothing written at byte {offset}")
        view, offset = view[written:], offset + written


def etag_of(info: dict[str, Any]) -> str | None:
    """An fsspec listing's ETag, unquoted, as :func:`gpubatch.io.storage.stat` gives it."""
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    return str(etag).strip('"') if etag else None


def mtime_of(path: str) -> float:
    """A record's modification time (its last use), 0 where it is gone."""
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


def write_chunks(reader: RangeReader, fd: int, size: int, chunk: int, in_flight: int) -> None:
    """[0, size) read in chunks of ``chunk`` bytes, ``in_flight`` at once, each written where it belongs."""
    spans = [(s, min(s + chunk, size)) for s in range(0, size, chunk)]
    for wave in range(0, len(spans), in_flight):
        batch = spans[wave: wave + in_flight]
        for (start, _), blob in zip(batch, reader.fetch_many(batch), strict=True):
            pwrite_all(fd, blob, start)


def whole_object(remote: RemoteFile, options: dict[str, Any] | None, policy: RetryPolicy,
                 clocks: StageClocks, fd: int, chunk: int) -> None:
    """An object of unknown size, or whose server ignores Range, in one GET written to ``fd``,
    checked to be the version listed: the GET's own ETag (an HTTP server's stream keeps its
    response), else a HEAD after it. No range read can pin it, so this check is all there is.
    An HTTP answer is written as it arrives, ``chunk`` bytes at a time: a slide of several
    GB is never held whole in memory."""
    fs, path = get_fs(remote.uri, options)

    def get() -> str | None:
        os.ftruncate(fd, 0)  # an attempt cut short leaves nothing behind for the next
        if protocol_of(remote.uri) not in ("http", "https"):
            pwrite_all(fd, fs.cat_file(path), 0)
            return None
        with fs.open(path, "rb", block_size=0) as f:  # one streamed GET, its response kept
            offset = 0
            while piece := f.read(chunk):
                pwrite_all(fd, piece, offset)
                offset += len(piece)
            headers = getattr(getattr(f, "r", None), "headers", None) or {}
            return headers.get("ETag")

    etag = call_with_retries(get, remote.uri, policy, clocks)
    if remote.etag is not None:
        got = str(etag).strip('"') if etag else stat(remote.uri, options, policy, clocks)["etag"]
        if got != remote.etag:
            raise changed_while_read(remote.uri, f"ETag {remote.etag} listed, {got} downloaded")


def listing(entry: StageEntry, options: dict[str, Any] | None, policy: RetryPolicy,
            companions: bool) -> tuple[list[RemoteFile], str]:
    """(remote uri, local path, size) of the file and, when asked, of its companion directory;
    and the object's version tag (size and ETag or mtime), which a reused copy must match.
    A lone file is asked of the storage entry point (obstore's HEAD where it serves the URI:
    no fsspec client is built in the worker); a companion directory is listed by fsspec."""
    if not companions:
        stated = stat(entry.uri, options, policy, entry.clocks)
        if stated["type"] == "directory":
            raise InputError(redact(entry.uri), "is a directory (prefix), not a file")
        tag = f"{stated['size']}|{stated.get('etag') or stated.get('mtime')}"
        entry.identity = identity_of(entry.uri, stated)
        return [RemoteFile(entry.uri, entry.local, int(stated["size"] or 0), stated.get("etag"))], tag
    fs, path = get_fs(entry.uri, options)
    info = call_with_retries(lambda: fs.info(path), entry.uri, policy, entry.clocks)
    if info.get("type") == "directory":
        raise InputError(redact(entry.uri), "is a directory (prefix), not a file")
    version = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime")
    tag = f"{info.get('size')}|{version}"
    files = [RemoteFile(entry.uri, entry.local, int(info.get("size") or 0), etag_of(info))]
    stem, suffix = os.path.splitext(path)
    if companions:
        found = call_with_retries(lambda: fs.find(stem, detail=True), entry.uri, policy, entry.clocks)
        local_stem = os.path.splitext(entry.local)[0]
        for name, meta in sorted(found.items()):
            rel = os.path.relpath(name, stem)
            files.append(RemoteFile(spelled_as(entry.uri, fs.unstrip_protocol(name)), os.path.join(local_stem, rel),
                                 int(meta.get("size") or 0), etag_of(meta)))
            tag += f"|{rel}:{meta.get('size')}:{meta.get('ETag') or meta.get('mtime')}"
    return files, tag
