"""Range readers: byte ranges of one file or object, behind one small interface.

A backend implements two primitives, ``fetch_spans`` (fetch (start, stop) spans, concurrently where
it can, returning one :class:`Fetched` per span with its error instead of raising) and ``size``;
``fetch_many``, ``fetch`` and ``read_ranges`` (neighbouring ranges coalesced into one request, long
runs split) are derived. Cross-cutting concerns are wrappers, as zarr's ``LatencyStore`` and
logging stores are: :class:`RetryingReader` (the retry policy, per failed span) and
:class:`MeasuredReader` (requests, bytes, latency histogram, time waited) wrap any backend, so a
new backend gets retries and metrics by being wrapped, not by copying them.

Backends here: :class:`LocalRangeReader` (pread) and :class:`FsspecRangeReader` (fsspec's async
``_cat_file`` on its event loop); :class:`gpubatch.io.obstore.ObstoreRangeReader` (Rust
``object_store``, off the GIL) beside them. :func:`gpubatch.io.storage.open_ranges` picks one and
wraps it.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpubatch.core.errors import InputError
from gpubatch.io.metrics import in_background, record_head, record_request, requests_in_flight
from gpubatch.io.redact import redact
from gpubatch.io.retry import (
    RangesIgnored,
    RetryPolicy,
    call_with_retries,
    count_retries,
    is_throttled,
    is_transient,
    storage_error,
)

if TYPE_CHECKING:
    from gpubatch.core.clocks import StageClocks


class ObjectChanged(Exception):
    """An object's answer was of another version than the one its reader is pinned to: bytes of
    two versions must not meet in one result, so the read fails (never retried span by span; the
    storage layer makes it a retryable InputError and the shard is read again, from the start)."""

    def __init__(self, pinned: str, seen: str | None):
        super().__init__(f"ETag {pinned} -> {seen or 'another (412 Precondition Failed)'}")
        self.pinned, self.seen = pinned, seen


@dataclass
class Fetched:
    """One span's outcome: its bytes (or a zero-copy bytes-like view), or the error that stopped
    it; how long its request took, and how many requests it took (a long span may be split)."""

    data: bytes | None = None
    error: BaseException | None = None
    seconds: float = 0.0
    requests: int = 1


def coalesce(ranges: Sequence[tuple[int, int]], gap: int,
             max_bytes: int = 1 << 24) -> list[tuple[int, int, list[int]]]:
    """Group (offset, length) ranges less than ``gap`` bytes apart into single reads.

    Returns (start, stop, member indices) per group; a group never exceeds ``max_bytes`` so
    that coalescing cannot defeat the memory bound.
    """
    order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
    groups: list[list[Any]] = []
    for i in order:
        off, n = ranges[i]
        last = groups[-1] if groups else None
        if last and off <= last[1] + gap and max(last[1], off + n) - last[0] <= max_bytes:
            last[1] = max(last[1], off + n)
            last[2].append(i)
        else:
            groups.append([off, off + n, [i]])
    return [(start, stop, members) for start, stop, members in groups]


class RangeReader(ABC):
    """Byte ranges of one file or object; safe to call from several threads at once."""

    #: the object's URI, credentials redacted: what messages about it may say
    uri: str = ""
    #: neighbours closer than this are fetched in one request (a round trip costs more than bytes)
    gap: int = 64 * 1024
    #: a coalesced request is split above this, so long runs are fetched in parallel
    max_request: int = 16 << 20
    #: whether ``Fetched.seconds`` are network request latencies worth a histogram
    timed: bool = False
    #: the client library behind the reads, for the report's counters (storage.client.*)
    client: str = "local"

    @abstractmethod
    def fetch_spans(self, spans: Sequence[tuple[int, int]]) -> list[Fetched]:
        """Fetch (start, stop) spans; one result per span, in order; never raises for a span."""

    @abstractmethod
    def size(self) -> int:
        """Size of the object in bytes."""

    def close(self) -> None:  # noqa: B027 - readers without handles have nothing to release
        """Release handles."""

    def version(self) -> str | None:
        """The ETag every answer is checked against (unquoted), once known; None where the backend
        cannot check versions (local files, fsspec): their callers check before and after."""
        return None

    def pin(self, etag: str | None) -> None:  # noqa: B027 - backends that cannot check ignore it
        """Read only this version (an ETag a HEAD just gave) from now on; an answer of another
        fails with :class:`ObjectChanged`. Backends that cannot check versions ignore it."""

    def answered(self) -> dict[str, Any] | None:
        """The object as its first answered read found it ({size, type, etag, mtime}, the form
        :func:`gpubatch.io.storage.stat` gives), where a read's answer tells it (obstore: a ranged
        GET carries the whole object's size, ETag and Last-Modified), so that a caller needs no
        HEAD of its own beside its first read; None where it does not (fsspec, local files)."""
        return None

    def fetch_many(self, spans: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes of each span; the first failed span raises a clear InputError."""
        out: list[bytes] = []
        for (start, stop), got in zip(spans, self.fetch_spans(spans), strict=True):
            if got.error is not None:
                raise storage_error(self.uri, got.error) from None
            out.append(self._checked(got.data or b"", start, stop))
        return out

    def fetch(self, start: int, stop: int) -> bytes:
        """``bytes`` of [start, stop), whatever the client hands out (obstore: a zero-copy view,
        which the bulk paths keep; callers of this one parse text and headers with bytes' methods)."""
        data = self.fetch_many([(start, stop)])[0] if stop > start else b""
        return data if isinstance(data, bytes) else bytes(data)

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """(offset, length) ranges in one call: neighbours coalesced, requests issued together."""
        groups = coalesce(ranges, self.gap, self.max_request)
        blobs = self.fetch_many([(start, stop) for start, stop, _ in groups])
        out: list[bytes] = [b""] * len(ranges)
        for (start, _, members), blob in zip(groups, blobs, strict=True):
            for i in members:
                off, n = ranges[i]
                out[i] = blob[off - start : off - start + n]
        return out

    def _checked(self, blob: bytes, start: int, stop: int) -> bytes:
        """``blob`` if it is as long as [start, stop): shorter is a truncated object, longer an
        answer of more than was asked (fsspec hands on a 200's whole body)."""
        if len(blob) > stop - start:
            raise RangesIgnored(self.uri, f"{len(blob)} bytes answered to a request for bytes {start}-{stop - 1}")
        if len(blob) != stop - start:
            raise InputError(self.uri, f"truncated: data runs to byte {stop} but only "
                             f"{start + len(blob)} bytes could be read (the file is truncated or "
                             "changed while being read)")
        return blob

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalRangeReader(RangeReader):
    """pread on one descriptor: thread-safe without a lock, and releases the GIL."""

    def __init__(self, path: str):
        self.path = path
        self.uri = path
        self.fd = os.open(path, os.O_RDONLY)

    def fetch_spans(self, spans: Sequence[tuple[int, int]]) -> list[Fetched]:
        out = []
        for start, stop in spans:
            try:
                out.append(Fetched(os.pread(self.fd, stop - start, start)))
            except OSError as exc:
                out.append(Fetched(error=exc))
        return out

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FsspecRangeReader(RangeReader):
    """Spans of one object fetched concurrently on fsspec's event loop.

    Every span of a call is in flight at once, bounded by ``max_concurrency`` per object, so
    latency is paid once per call rather than once per tile.
    """

    max_request = 4 << 20
    timed = True
    client = "fsspec"

    def __init__(self, fs: Any, path: str, uri: str, max_concurrency: int = 64):
        if not getattr(fs, "async_impl", False):  # blocking filesystems run in threads
            from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

            fs = AsyncFileSystemWrapper(fs)
        self.fs, self.path, self.uri = fs, path, redact(uri)
        self.max_concurrency = max_concurrency
        self._sem: asyncio.Semaphore | None = None
        #: the object's size once asked (or given: a version already known), as obstore's reader
        #: keeps it: a bgzip FASTA's reads ask it for their last block, a HEAD each time
        self.known_size: int | None = None

    def fetch_spans(self, spans: Sequence[tuple[int, int]]) -> list[Fetched]:
        if not spans:
            return []
        from fsspec.asyn import sync

        async def gather() -> list[Fetched]:
            return list(await asyncio.gather(*(self._one(a, b) for a, b in spans)))

        return sync(self.fs.loop, gather)

    async def _one(self, start: int, stop: int) -> Fetched:
        if stop <= start:
            return Fetched(b"")
        if self._sem is None:  # created on the loop's own thread
            self._sem = asyncio.Semaphore(self.max_concurrency)
        async with self._sem:  # latency is timed inside: queueing here is not storage's
            t0 = time.perf_counter()
            try:
                blob = await self._get(start, stop)
            except Exception as exc:  # noqa: BLE001 - returned to the caller per span
                return Fetched(error=exc, seconds=time.perf_counter() - t0)
            return Fetched(bytes(blob), seconds=time.perf_counter() - t0)

    async def _get(self, start: int, stop: int) -> bytes:
        return await self.fs._cat_file(self.path, start=start, end=stop)

    def size(self) -> int:
        if self.known_size is not None:
            return self.known_size
        from fsspec.asyn import sync

        info = sync(self.fs.loop, self.fs._info, self.path)
        if info.get("type") == "directory":
            raise IsADirectoryError(self.path)
        record_head()
        self.known_size = int(info.get("size") or 0)
        return self.known_size


class WrongRange(Exception):
    """A 206 answer whose Content-Range is not the range asked: its bytes are of another place."""


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def check_answer(uri: str, start: int, stop: int, status: int | None, content_range: str | None,
                 length: int | None) -> None:
    """Refuse an answer to a GET of bytes [start, stop) that is not of those bytes, before its
    body is read: a 200 (the server ignores Range: the whole object) unless the whole object
    was asked for (from byte 0 to its Content-Length), or a Content-Range of another place. An
    answer that stops short at the object's end is let through: the caller says it is truncated."""
    whole = start == 0 and length in (None, stop)  # asked for all of it: the answer
    if status == 200 and not whole:
        raise RangesIgnored(uri, f"a request for bytes {start}-{stop - 1} was answered 200")
    answered = (content_range or "").strip()
    if not answered or answered.startswith(f"bytes {start}-{stop - 1}/"):
        return
    parts = _CONTENT_RANGE.fullmatch(answered)
    at_end = (parts is not None and int(parts[1]) == start and parts[3] != "*"
              and int(parts[2]) == int(parts[3]) - 1 < stop - 1)
    if not at_end:
        raise WrongRange(f"asked bytes {start}-{stop - 1}, answered {answered}")


class HttpRangeReader(FsspecRangeReader):
    """fsspec's HTTP filesystem, with each answer checked before its body is used.

    fsspec's ``_cat_file`` hands on whatever body comes back: a server that ignores Range (200)
    gives the whole object, read into memory for every span, and one that answers 206 with another
    range than asked gives bytes of another place, which nothing else would notice. Here the
    status and Content-Range are read first (obstore checks the same). A 200 to a request for
    the whole object (from byte 0 to its Content-Length) is the answer asked for."""

    async def _get(self, start: int, stop: int) -> bytes:
        fs = self.fs
        options = dict(fs.kwargs)
        headers = {**(options.pop("headers", None) or {}), "Range": f"bytes={start}-{stop - 1}"}
        session = await fs.set_session()
        async with session.get(fs.encode_url(self.path), headers=headers, **options) as r:
            fs._raise_not_found_for_status(r, self.path)
            check_answer(self.uri, start, stop, r.status, r.headers.get("Content-Range"), r.content_length)
            return await r.read()  # (a refused answer's body is left unread)


class S3RangeReader(FsspecRangeReader):
    """s3fs, with each GetObject's answer checked before its body is used.

    s3fs's ``_cat_file`` hands on whatever body comes back, as fsspec's HTTP client does: an
    S3-compatible server (a gateway, a proxy) that ignores Range answers 200 with the whole
    object, read into memory for every span, and one that answers another range than asked gives
    bytes of another place. Here the status and ContentRange are read first, as
    :class:`HttpRangeReader` reads its answer's (obstore checks the same)."""

    async def _get(self, start: int, stop: int) -> bytes:
        from s3fs.core import version_id_kw

        fs = self.fs
        bucket, key, version = fs.split_path(self.path)
        answer = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{stop - 1}",
                                   **version_id_kw(version))
        body = answer["Body"]
        try:
            status = (answer.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            check_answer(self.uri, start, stop, status, answer.get("ContentRange"), answer.get("ContentLength"))
            return await body.read()
        finally:
            body.close()


def fsspec_reader(fs: Any, path: str, uri: str, max_concurrency: int = 64) -> FsspecRangeReader:
    """fsspec's reader for ``fs``: for http(s) and s3, one that checks each answer is the range
    asked (their clients hand on any body); for the rest, the client's own ``_cat_file``."""
    if hasattr(fs, "set_session") and hasattr(fs, "encode_url"):  # fsspec's HTTP filesystem
        return HttpRangeReader(fs, path, uri, max_concurrency=max_concurrency)
    if hasattr(fs, "_call_s3") and hasattr(fs, "split_path"):  # s3fs
        return S3RangeReader(fs, path, uri, max_concurrency=max_concurrency)
    return FsspecRangeReader(fs, path, uri, max_concurrency=max_concurrency)


class ReaderWrapper(RangeReader):
    """A reader around another one: delegates everything, so subclasses override only their part."""

    def __init__(self, inner: RangeReader):
        self.inner = inner
        self.uri, self.gap, self.max_request, self.timed = inner.uri, inner.gap, inner.max_request, inner.timed
        self.client = inner.client

    def fetch_spans(self, spans: Sequence[tuple[int, int]]) -> list[Fetched]:
        return self.inner.fetch_spans(spans)

    def size(self) -> int:
        return self.inner.size()

    def version(self) -> str | None:
        return self.inner.version()

    def pin(self, etag: str | None) -> None:
        self.inner.pin(etag)

    def answered(self) -> dict[str, Any] | None:
        return self.inner.answered()

    def close(self) -> None:
        self.inner.close()


class RetryingReader(ReaderWrapper):
    """Retries transient failures span by span under the policy; the rest of a call is kept.

    A failed span is fetched again after the backoff, together with the other failed spans of the
    call; when attempts run out its error becomes a retryable InputError naming the attempts.
    """

    def __init__(self, inner: RangeReader, policy: RetryPolicy, clocks: StageClocks | None = None):
        super().__init__(inner)
        self.policy, self.clocks = policy, clocks

    def fetch_spans(self, spans: Sequence[tuple[int, int]]) -> list[Fetched]:
        results = self.inner.fetch_spans(spans)
        for attempt in range(1, self.policy.attempts):
            failed = [i for i, r in enumerate(results) if r.error is not None and is_transient(r.error)]
            if not failed:
                return results
            errors = [e for e in (results[i].error for i in failed) if e is not None]
            count_retries(self.clocks, len(failed), sum(is_throttled(e) for e in errors))
            time.sleep(self.policy.delay_for(attempt - 1, errors))
            for i, again in zip(failed, self.inner.fetch_spans([spans[i] for i in failed]), strict=True):
                results[i] = again
        for r in results:
            if r.error is not None:
                r.error = storage_error(self.uri, r.error, self.policy.attempts)
        return results

    def size(self) -> int:
        return call_with_retries(self.inner.size, self.uri, self.policy, self.clocks)


class MeasuredReader(ReaderWrapper):
    """Counts each successful request (requests, bytes, latency when timed) and, unless the caller
    accounts for it itself (a background download), the time the caller waited."""

    def __init__(self, inner: RangeReader, clocks: StageClocks | None, count_wait: bool = True):
        super().__init__(inner)
        self.clocks, self.count_wait = clocks, count_wait

    def fetch_spans(self, spans: Sequence[tuple[int, int]]) -> list[Fetched]:
        t0 = time.perf_counter()
        with requests_in_flight(self.clocks, len(spans) if self.timed else 0):
            results = self.inner.fetch_spans(spans)
        counted = self.clocks is not None or self.client != "local"  # no clocks: storage's only
        for r in results:
            if counted and r.error is None and r.data is not None:
                record_request(self.clocks, len(r.data), r.seconds if self.timed else None, r.requests)
        if self.timed and self.count_wait and not in_background() and self.clocks is not None:
            self.clocks.count("storage.wait_s", time.perf_counter() - t0)
        return results


def retried_and_measured(inner: RangeReader, policy: RetryPolicy, clocks: StageClocks | None,
                         count_wait: bool = True) -> RangeReader:
    """``inner`` as every caller gets it: transient failures retried span by span, then each
    successful request counted (retries inside, so a retried span counts once)."""
    return MeasuredReader(RetryingReader(inner, policy, clocks), clocks, count_wait)


class RangeFile(io.RawIOBase):
    """A read-only, seekable file over a RangeReader that keeps the last few chunks it fetched.

    tifffile parses the TIFF header (IFDs, tile offset tables) through this: small scattered reads,
    each turned into one request of at least ``blocksize`` bytes, retried like any tile read. It
    walks the IFD chain and then reads the same IFDs again; a one-block read-ahead cache (fsspec's)
    fetched each of them twice: a round trip more per pyramid level on every slide opened.
    Kept: up to ``KEPT_CHUNKS`` chunks of at most ``KEPT_CHUNK_BYTES`` each.
    """

    KEPT_CHUNKS = 16
    KEPT_CHUNK_BYTES = 1 << 20
    BLOCKSIZE = 64 * 1024
    #: what the first request asks for: tifffile's 8-byte header read, and a block past it
    FIRST_READ = 8 + BLOCKSIZE

    def __init__(self, reader: RangeReader, size: int, name: str, blocksize: int = BLOCKSIZE,
                 first: bytes | None = None):
        """``first``: the object's first bytes, already fetched (kept like a fetched chunk)."""
        super().__init__()
        self.reader, self.size, self.name, self.mode = reader, size, name, "rb"
        self.blocksize = blocksize
        self._chunks: deque[tuple[int, bytes]] = deque(maxlen=self.KEPT_CHUNKS)
        if first and len(first) <= self.KEPT_CHUNK_BYTES:
            self._chunks.append((0, first[: self.size]))
        self._pos = 0
        self._lock = threading.Lock()

    def _read(self, start: int, stop: int) -> bytes:
        """[start, stop) from a kept chunk, or one request reading ``blocksize`` bytes past it."""
        for first, data in self._chunks:
            if first <= start and stop <= first + len(data):
                return data[start - first : stop - first]
        data = self.reader.fetch(start, min(self.size, stop + self.blocksize))
        if len(data) <= self.KEPT_CHUNK_BYTES:
            self._chunks.append((start, data))
        return data[: stop - start]

    def readable(self) -> bool:
        return True

    seekable = readable

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        with self._lock:
            stop = min(self._pos + len(view), self.size)
            data = self._read(self._pos, stop) if stop > self._pos else b""
            view[: len(data)] = data
            self._pos += len(data)
        return len(data)

    def close(self) -> None:
        super().close()
        self.reader.close()
