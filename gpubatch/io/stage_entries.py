"""What the stage cache keeps of each remote slide: its entry's state, the files to download,
and the pinned local copy a shard reads (io.stage_cache, the cache itself, is their only maker);
the run a shard stages for, and its cache; and the helpers of a download.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputError
from gpubatch.io.host_files import EntryLock
from gpubatch.io.ranges import RangeReader
from gpubatch.io.retry import RetryPolicy, call_with_retries, changed_while_read
from gpubatch.io.storage import get_fs, stat
from gpubatch.io.uris import protocol_of, uri_name

#: the run whose shard this thread (task) runs, set by :func:`staging_for`; None outside one
_shard_run: contextvars.ContextVar[str | None] = contextvars.ContextVar("gpubatch_stage_run", default=None)


@contextlib.contextmanager
def staging_for(run: str | None) -> Iterator[None]:
    """Within the block (one shard on a worker), the stage cache stages for ``run``: a record of
    that run gives its file's version, and a version asked is recorded as that run's. Per shard,
    not per process: a worker serving two runs at once (two jobs on one Dask cluster) keeps
    their versions apart, where the process's one run let either take the other's."""
    token = _shard_run.set(run or None)
    try:
        yield
    finally:
        _shard_run.reset(token)


def shard_run() -> str | None:
    """The run of the shard this thread runs (:func:`staging_for`), None outside one."""
    return _shard_run.get()


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
