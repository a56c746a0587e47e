"""The one storage entry point: every read and write of an input, reference or output goes here.

Local paths, ``file://`` and every fsspec protocol (s3, gs, az, http(s), memory) are reached through
the same functions, which bring what each caller would otherwise repeat: the profile's and the
job's storage options merged, secrets registered for redaction, the retry policy, and request
metrics. Byte ranges go through :func:`open_ranges`, which picks a backend (pread locally;
obstore for s3, gs, az and plain http(s) objects when it can serve them exactly as fsspec would;
fsspec's async client for the rest and as the fallback) and wraps it in the retry and metrics
wrappers of :mod:`gpubatch.io.ranges`. :func:`stat` asks the same backend.

s3fs's, botocore's, gcsfs's, adlfs's and obstore's own retries are switched off on the clients
created here (unless the user sets them for fsspec), so that every retry is counted and bounded
by this layer. Two kinds of request this layer cannot send again keep the client's retries: those
a library makes itself (:func:`library_options`: zarr, wsidicom) and a streamed upload's parts
(:func:`upload_fs`).
Walking a store with fsspec's own calls goes through :func:`retried_fs`, one retried call each.

Every S3 client made here counts its requests on the wire, by kind (io.metrics.meter_s3_session):
listings, existence checks, the output's reads and writes, an fsspec file's and zarr's output
store's requests; range readers take an unmetered client, their reads counted where they are made.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from gpubatch.core.errors import InputError
from gpubatch.io import clouds, obstore
from gpubatch.io.metrics import record_head
from gpubatch.io.ranges import (
    Fetched,
    FsspecRangeReader,
    LocalRangeReader,
    RangeFile,
    RangeReader,
    ReaderWrapper,
    fsspec_reader,
    retried_and_measured,
)
from gpubatch.io.redact import redact, register_secrets, register_uri
from gpubatch.io.retried_fs import RetriedFS
from gpubatch.io.retry import RetryPolicy, call_with_retries, default_policy, ranges_refused
from gpubatch.io.retry_counts import count_library_retries
from gpubatch.io.storage_profile import (
    current_profile,
    range_reader_choice,
)
from gpubatch.io.uris import (
    is_remote,
    local_path,
    protocol_of,
    uri_name,
)

if TYPE_CHECKING:
    from gpubatch.core.clocks import StageClocks

#: fsspec backends gpubatch does not install by default, and the extra that brings each
PROTOCOL_EXTRAS = {"gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}
log = logging.getLogger("gpubatch")

#: botocore's retries where the client must retry itself (see library_options): standard mode
#: retries 5xx, throttling and dropped connections, re-sending a request's body; its attempts
#: are the run's (``run.storage_attempts``: io.retry.default_policy)
CLIENT_RETRY_MODE = "standard"

#: fsspec's HTTP client (aiohttp) waits 300 s for a whole request by default and nothing bounds a
#: read that stalls: these match obstore's (connect 10 s, 60 s of silence), see :func:`_http_timeouts`;
#: gcsfs and adlfs get the same (:func:`gpubatch.io.clouds.request_timeouts`)
HTTP_CONNECT_TIMEOUT_S = 10.0
HTTP_READ_TIMEOUT_S = 60.0

_fs_cache: dict[str, Any] = {}
_fs_lock = threading.Lock()
_fallbacks_logged: set[str] = set()
#: objects obstore refused for want of a Content-Length: auto reads them through fsspec from then on
_unsized: set[str] = set()
_log_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """fsspec's async filesystems refuse to run in a forked child ("not fork-safe"): a child
    makes its own, as obstore's module makes the child fall back from obstore."""
    global _fs_lock
    _fs_cache.clear()
    _fs_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _obstore_target(uri: str, options: dict[str, Any] | None) -> tuple[Any, str] | None:
    """(obstore store, key) when obstore serves ``uri``, else None (fsspec does; why is logged
    once per scheme and reason, or raised when the profile insists on obstore)."""
    choice = range_reader_choice()
    if choice == "fsspec" or protocol_of(uri) not in obstore.SCHEMES or uri in _unsized:
        return None
    try:
        return obstore.store_for(uri, resolve_options(uri, options))
    except obstore.Unsupported as exc:
        if choice == "obstore":
            raise InputError(redact(uri), f"range_reader is obstore, but obstore cannot read it: {exc}") from None
        _log_once(f"{protocol_of(uri)}: {exc}", "reading %s:// through fsspec: %s", protocol_of(uri), exc)
        return None


def reads_pinned(uri: str, options: dict[str, Any] | None, etag: str | None) -> bool:
    """Whether :func:`open_ranges` given ``etag`` reads only that version of ``uri``: obstore
    serves it (If-Match on every read) and the ETag is strong (``W/`` never matches). Then a
    caller that knows the version needs no HEAD to hold its reads to it; elsewhere (fsspec, a
    local file) it checks before and after."""
    return bool(etag) and not str(etag).startswith("W/") and obstore_reads(uri, options)


def obstore_reads(uri: str, options: dict[str, Any] | None) -> bool:
    """Whether remote ``uri`` is read through obstore, whose answers say its size and ETag."""
    return is_remote(uri) and _obstore_target(uri, options) is not None


def _log_once(reason: str, message: str, *args: Any) -> None:
    """Log why fsspec reads what obstore would, once per reason and process (not per object)."""
    with _log_lock:
        if reason in _fallbacks_logged:
            return
        _fallbacks_logged.add(reason)
    log.info(message, *args)


#: why auto reads an object through fsspec after obstore refused its server's answers
FSSPEC_BECAUSE = {"unsized": "sends no Content-Length", "ranges": "ignores byte ranges (answers 200)"}


def _read_by_fsspec(uri: str, why: str = "unsized") -> None:
    """``range_reader: auto`` met a server whose answers obstore refuses for every request (no
    Content-Length; a 200 to a ranged GET): this object is read through fsspec from now on, as
    ``range_reader: fsspec`` would read it (said once per server: the URI's host, no credentials)."""
    _unsized.add(uri)
    host = redact(uri).split("://", 1)[-1].split("/", 1)[0]
    _log_once(f"{why} {protocol_of(uri)}://{host}", "reading %s through fsspec (range_reader auto): its "
              f"server {FSSPEC_BECAUSE[why]}, which obstore refuses; so are that server's other objects "
              "like it", redact(uri))


def resolve_options(uri: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """Profile options, then job options, then gpubatch's defaults for the protocol.

    For S3 the defaults hand retries to this layer (botocore's retries off, unless set) and widen
    the connection pool so that concurrent range reads are not queued behind ten connections.
    """
    merged = {**current_profile()[0], **(options or {})}
    register_secrets(merged)
    register_uri(uri)
    protocol = protocol_of(uri)
    if protocol != "file":  # a long run must see objects written after it listed a prefix
        merged.setdefault("use_listings_cache", False)
    if protocol in ("s3", "s3a"):
        config = dict(merged.get("config_kwargs") or {})
        config.setdefault("retries", {"max_attempts": 0, "mode": "legacy"})
        config.setdefault("max_pool_connections", 128)
        config.setdefault("connect_timeout", 10)
        config.setdefault("read_timeout", 60)
        merged["config_kwargs"] = config
    return merged


def library_options(uri: str, options: dict[str, Any] | None, attempts: int | None = None) -> dict[str, Any]:
    """Storage options for requests this layer does not make or cannot send again: a library's
    own (zarr's store, wsidicom's files, fsspec's file in :func:`open_file`) and a streamed
    upload's parts (:func:`upload_fs`). Profile then job options, secrets registered.

    The client library's own retries stay on for them (botocore's for S3, unless the options
    set theirs: ``attempts``, else the run's ``run.storage_attempts``), so a 503 is not fatal;
    they are counted from botocore's own lines (io.retry_counts), as the report's
    ``library_retries``.
    """
    count_library_retries()
    merged = {**current_profile()[0], **(options or {})}
    register_secrets(merged)
    if protocol_of(uri) in ("gs", "gcs"):
        clouds.serve_off_google(merged)
    if protocol_of(uri) in ("s3", "s3a"):
        config = dict(merged.get("config_kwargs") or {})
        config.setdefault("retries", {"max_attempts": attempts or default_policy().attempts,
                                      "mode": CLIENT_RETRY_MODE})
        merged["config_kwargs"] = config
    if protocol_of(uri) in ("http", "https"):  # fsspec.open's file: a silent server held it 300 s
        merged = _http_timeouts(merged)
    return clouds.request_timeouts(protocol_of(uri), merged, HTTP_CONNECT_TIMEOUT_S, HTTP_READ_TIMEOUT_S)


def missing_extra(uri: str) -> str | None:
    """The pip command that installs the filesystem for ``uri``'s scheme, when it is missing."""
    protocol = protocol_of(uri)
    if protocol not in PROTOCOL_EXTRAS:
        return None
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError:
        return f"pip install 'gpubatch[{PROTOCOL_EXTRAS[protocol]}]'"
    return None


def get_fs(uri: str, options: dict[str, Any] | None = None, *, client_retries: bool = False,
           metered: bool = True) -> tuple[Any, str]:
    """(filesystem, path) for a URI; one private instance per protocol and options per process.

    Instances are private (not fsspec's shared cache) because their retry setting is changed:
    the client's own retries are off (this layer retries and counts) unless ``client_retries``
    (a streamed upload's, see :func:`upload_fs`). Local paths get fsspec's local filesystem and
    no storage options. ``metered``: an S3 client's every request is counted on the wire, by kind
    (:func:`gpubatch.io.clouds.wire_counted`); range readers take an unmetered one, as their reads are counted
    where they are made (io.ranges: with their bytes and latency), which would count them twice.
    """
    import fsspec

    protocol = protocol_of(uri)
    merged = resolve_options(uri, options) if protocol != "file" else {}
    if protocol in ("gs", "gcs"):
        clouds.serve_off_google(merged)
    if protocol in ("http", "https"):
        merged = _http_timeouts(merged)
    merged = clouds.request_timeouts(protocol, merged, HTTP_CONNECT_TIMEOUT_S, HTTP_READ_TIMEOUT_S)
    token = protocol + str(client_retries) + str(metered) + json.dumps(merged, sort_keys=True, default=str)
    with _fs_lock:
        fs = _fs_cache.get(token)
        if fs is None:
            try:
                cls = fsspec.get_filesystem_class(protocol)
            except (ImportError, ValueError) as exc:
                extra = PROTOCOL_EXTRAS.get(protocol)
                hint = f"; pip install 'gpubatch[{extra}]'" if extra else ""
                raise InputError(redact(uri), f"no filesystem for {protocol}:// ({exc}){hint}") from None
            fs = cls(skip_instance_cache=True, **merged)
            if hasattr(fs, "retries"):
                fs.retries = 1  # this layer retries, with counting and jitter
            if not client_retries:
                clouds.client_retries_off(fs)  # gcsfs's and adlfs's, which that setting misses
            if metered:
                clouds.meter_requests(fs)
            _fs_cache[token] = fs
    path = fs._strip_protocol(uri) if protocol != "file" else local_path(uri)  # decoded: uris.local_path
    return fs, path


def _http_timeouts(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with aiohttp timeouts for fsspec's HTTP client, unless they set their own.

    aiohttp's default (300 s for a whole request, no bound on a silent socket) lets a server that
    accepts and never answers hold a read 300 s per attempt (a presigned URL is read by fsspec),
    and fails any download of an unsized object that takes longer. Instead: the connection within
    :data:`HTTP_CONNECT_TIMEOUT_S`, and no silence longer than :data:`HTTP_READ_TIMEOUT_S`."""
    client = dict(options.get("client_kwargs") or {})
    if "timeout" in client:
        return options
    import aiohttp

    client["timeout"] = aiohttp.ClientTimeout(total=None, sock_connect=HTTP_CONNECT_TIMEOUT_S,
                                              sock_read=HTTP_READ_TIMEOUT_S)
    return {**options, "client_kwargs": client}


def upload_fs(uri: str, options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """:func:`get_fs`'s filesystem with the client's retries on (:func:`library_options`), for
    streamed writes: a file written as a stream uploads its parts as its buffer fills, and a
    part that failed is gone from the stream, so only the client can send it again. An output's
    writes keep their own attempts (outputs.store), not the run's policy for its inputs."""
    return get_fs(uri, library_options(uri, options, RetryPolicy().attempts), client_retries=True)


def library_fs(uri: str, options: dict[str, Any] | None = None, *,
               asynchronous: bool = False, attempts: int | None = None) -> tuple[Any, str]:
    """:func:`get_fs`'s filesystem for requests a library makes on it (an fsspec file's, zarr's
    store of an output): the client's retries on, as :func:`library_options` says, and its
    requests counted as the rest of this layer's (an S3 client's on the wire). ``asynchronous``:
    for zarr, which runs it on its own event loop. ``attempts``: as :func:`library_options`."""
    merged = library_options(uri, options, attempts)
    if asynchronous:
        merged["asynchronous"] = True
    return get_fs(uri, merged, client_retries=True)


def retried_fs(uri: str, options: dict[str, Any] | None = None, policy: RetryPolicy | None = None,
               clocks: StageClocks | None = None) -> tuple[RetriedFS, str]:
    """:func:`get_fs`'s filesystem with each call retried and counted, for walking a store."""
    fs, path = get_fs(uri, options)
    return RetriedFS(fs, uri, policy, clocks, reader_fs=get_fs(uri, options, metered=False)[0]), path


def open_ranges(uri: str, options: dict[str, Any] | None = None, clocks: StageClocks | None = None,
                policy: RetryPolicy | None = None, *, max_concurrency: int = 64,
                count_wait: bool = True, etag: str | None = None, size: int | None = None) -> RangeReader:
    """A range reader for one file or object, with retries and metrics; close it when done.

    ``count_wait=False`` for background work (staging ahead), whose waits nobody sat through.
    ``etag``: the version a HEAD just found, which every read must be of (obstore pins it with
    If-Match; without it obstore pins the first answer's); fsspec cannot pin, see ``version()``.
    ``size``: that version's size, which the reader then answers without a HEAD of its own.
    """
    inner: RangeReader
    if not is_remote(uri):
        path = local_path(uri)
        try:
            inner = LocalRangeReader(path)
        except FileNotFoundError:
            raise InputError(uri, "file not found") from None
        except OSError as exc:
            raise InputError(uri, f"cannot be opened: {exc.strerror or exc}") from None
    elif (target := _obstore_target(uri, options)) is not None:
        inner = obstore.ObstoreRangeReader(*target, uri, max_concurrency=max_concurrency, etag=etag)
        inner.known_size = size
        if range_reader_choice() == "auto":
            inner = _FsspecWhenUnsized(inner, lambda: _fsspec_reader(uri, options, max_concurrency), uri, clocks)
    else:
        inner = _fsspec_reader(uri, options, max_concurrency)
        inner.known_size = size
    if clocks is not None and is_remote(uri):
        clocks.count(f"storage.client.{inner.client}")
    return retried_and_measured(inner, policy or default_policy(), clocks, count_wait)


def _fsspec_reader(uri: str, options: dict[str, Any] | None, max_concurrency: int) -> FsspecRangeReader:
    """fsspec's reader for ``uri``: for http(s) and s3, one that checks each answer is the range asked."""
    fs, path = get_fs(uri, options, metered=False)
    return fsspec_reader(fs, path, uri, max_concurrency)


class _FsspecWhenUnsized(ReaderWrapper):
    """auto's obstore reader, which becomes an fsspec one at the first answer obstore refuses for
    want of a Content-Length (:class:`gpubatch.io.obstore.Unsized`) or, over http(s), of range
    support (a 200, which is the answer to a read of the whole object: an index, a BED file), so that auto reads
    wherever fsspec would. Switched once; fsspec cannot pin, so ``version()`` is None from then
    on and callers check the object after their reads (the worker's HEAD after the shard)."""

    def __init__(self, inner: RangeReader, fallback: Callable[[], RangeReader], uri: str,
                 clocks: StageClocks | None):
        super().__init__(inner)
        self._fallback, self._raw_uri, self._clocks = fallback, uri, clocks
        self._http = protocol_of(uri) in ("http", "https")
        self._switching = threading.Lock()

    def _switch(self, stale: RangeReader, why: str = "unsized") -> None:
        with self._switching:
            if self.inner is stale:
                _read_by_fsspec(self._raw_uri, why)
                self.inner, self.client = self._fallback(), "fsspec"
                stale.close()
                if self._clocks is not None:
                    self._clocks.count("storage.client.fsspec")

    def fetch_spans(self, spans: Sequence[tuple[int, int]]) -> list[Fetched]:
        inner = self.inner
        results = inner.fetch_spans(spans)
        if any(isinstance(r.error, obstore.Unsized) for r in results):
            self._switch(inner, "unsized")
        elif self._http and any(r.error is not None and ranges_refused(r.error) for r in results):
            self._switch(inner, "ranges")  # fsspec's HTTP reader refuses a 200 unread (s3fs reads it)
        else:
            return results
        return self.inner.fetch_spans(spans)

    def size(self) -> int:
        inner = self.inner
        try:
            return inner.size()
        except obstore.Unsized:
            self._switch(inner)
            return self.inner.size()


def open_seekable(uri: str, options: dict[str, Any] | None = None, policy: RetryPolicy | None = None,
                  clocks: StageClocks | None = None, blocksize: int = 1 << 20) -> RangeFile:
    """A seekable, read-only file whose every read is one retried, counted request of at least
    ``blocksize`` bytes: for readers that seek about a file (parquet's footer, then its columns),
    which through fsspec's own file would fail on the first 503; close it when done."""
    reader = open_ranges(uri, options, clocks, policy)
    try:
        return RangeFile(reader, reader.size(), uri_name(uri), blocksize=blocksize)
    except BaseException:
        reader.close()
        raise


def stat(uri: str, options: dict[str, Any] | None = None, policy: RetryPolicy | None = None,
         clocks: StageClocks | None = None) -> dict[str, Any]:
    """{size, type, etag, mtime} of a file or object; a missing one raises InputError."""
    if not is_remote(uri):
        try:
            st = os.stat(local_path(uri))
        except FileNotFoundError:
            raise InputError(uri, "file not found") from None
        kind = "directory" if os.path.isdir(local_path(uri)) else "file"
        return {"size": st.st_size, "type": kind, "etag": None, "mtime": st.st_mtime}
    target = _obstore_target(uri, options)
    if target is not None:
        try:
            return call_with_retries(lambda: obstore.head(*target, uri), uri, policy, clocks)
        except obstore.Unsized:  # auto reads it as fsspec would; obstore insists
            if range_reader_choice() == "obstore":
                raise
            _read_by_fsspec(uri)
        except InputError as exc:  # no object of that name: a prefix (folder) is asked of fsspec
            if not exc.message.startswith("object not found"):
                raise
    fs, path = get_fs(uri, options)
    info = call_with_retries(lambda: fs.info(path), uri, policy, clocks)
    if info.get("type") != "directory" and not clouds.wire_counted(fs):  # a prefix: a listing (s3fs: after a 404 HEAD)
        record_head()
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    mtime = info.get("LastModified") or info.get("mtime") or info.get("updated")
    return {"size": int(info.get("size") or 0), "type": info.get("type", "file"),
            "etag": str(etag).strip('"') if etag else None,
            "mtime": str(mtime) if mtime is not None else None}


def input_identity(uri: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Size and mtime (local) or size and ETag (object storage): what says an input changed."""
    try:
        info = stat(uri, options, default_policy())
    except InputError:
        return {"size": None}
    return identity_of(uri, info)


def file_version(uri: str, options: dict[str, Any] | None = None, *, digest: bool = True) -> str | None:
    """A file's version as a result field records it (``--resume`` refuses when it differs):
    a local file's sha256 (``digest``: its content, so a copy or a touch is no change) or, for
    files too big to hash every run (a FASTA), its size and mtime; an object's ETag, or its size
    and mtime where it has none. None where there is no such file (a folder, a prefix, missing)."""
    if not is_remote(uri):
        path = local_path(uri)
        if not os.path.isfile(path):
            return None
        if digest:
            from gpubatch.core.files import file_sha256

            return f"sha256:{file_sha256(path)}"
        st = os.stat(path)
        return f"size:{st.st_size},mtime:{st.st_mtime}"
    try:
        info = stat(uri, options, default_policy())
    except InputError:
        return None
    if info["type"] == "directory":
        return None
    return version_text(info)


def version_text(info: dict[str, Any]) -> str:
    """An object's version as :func:`file_version` writes it: its ETag, else size and mtime."""
    return f"etag:{info['etag']}" if info.get("etag") else f"size:{info['size']},mtime:{info.get('mtime')}"


def identity_of(uri: str, info: dict[str, Any]) -> dict[str, Any]:
    """:func:`input_identity` from a :func:`stat` answer the caller has already (a slide's open)."""
    if not is_remote(uri):
        return {"size": info["size"], "mtime": info["mtime"]}
    return {"size": info["size"], "etag": info["etag"], "mtime": info["mtime"]}


def input_changed(uri: str, before: dict[str, Any], options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The input's :func:`input_identity` now, where it differs from ``before`` (it was written
    over or removed); None where it does not, or the input is a folder or prefix, or was not there.

    A local file is compared by size and mtime; an object by size and ETag (its mtime changes when
    the same bytes are written again, which mixes nothing), or by mtime where it has no ETag. An
    object's HEAD that keeps failing raises its InputError: a failed check is not a change.
    """
    if before.get("size") is None:
        return None
    if not is_remote(uri):
        if not os.path.isfile(local_path(uri)):
            return None
        after = input_identity(uri, options)
        return after if identity_differs(before, after) else None
    if before.get("etag") is None and before.get("mtime") is None:
        return None  # a prefix (an OME-Zarr image, a DICOM series): no one version to compare
    try:
        after = identity_of(uri, stat(uri, options, default_policy()))
    except InputError as exc:
        if not exc.message.startswith("object not found"):
            raise
        after = {"size": None}
    return after if identity_differs(before, after) else None


def identity_differs(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """Whether two :func:`input_identity` answers for one input are of different versions: by
    size and ETag where there is an ETag (an object's mtime moves when the same bytes are
    written again), else by size and mtime (a local file, an object without ETag)."""
    keys = ("size", "etag") if before.get("etag") else ("size", "mtime")
    return any(after.get(k) != before.get(k) for k in keys)


def exists(uri: str, options: dict[str, Any] | None = None, clocks: StageClocks | None = None) -> bool:
    if not is_remote(uri):
        return os.path.exists(local_path(uri))
    fs, path = get_fs(uri, options)
    return bool(call_with_retries(lambda: fs.exists(path), uri, None, clocks))


def read_bytes(uri: str, options: dict[str, Any] | None = None, start: int | None = None,
               end: int | None = None, clocks: StageClocks | None = None,
               policy: RetryPolicy | None = None) -> bytes:
    """A whole file, or bytes [start, end) of it, retried and counted; missing -> InputError."""
    with open_ranges(uri, options, clocks, policy) as reader:
        lo = start or 0
        hi = reader.size() if end is None else end
        return reader.fetch(lo, hi)


@contextlib.contextmanager
def open_file(uri: str, options: dict[str, Any] | None = None, mode: str = "rb",
              compression: str | None = None) -> Iterator[Any]:
    """A streaming file object (plain, or decompressed with ``compression='infer'``).

    For sequential reads of whole files (a FASTA to ingest, a BED file); opening is retried,
    a missing file raises InputError: an object's by its file's own HEAD (s3fs's check was a second).
    """
    import fsspec
    from fsspec.utils import infer_compression

    fs, path = get_fs(uri, options)
    if "r" in mode and protocol_of(uri) in ("file", "http", "https") and not _exists_checked(fs, path, uri):
        raise InputError(redact(uri), "file not found")
    # fsspec's file makes its own requests (its size, then a block at a time): the client's
    # retries stay on for them, as for any library's (a 503 on its HEAD ended the read); made
    # by library_fs, its requests are counted as the rest of this layer's
    file_fs = library_fs(uri, options)[0] if is_remote(uri) else fs
    if compression == "infer":
        compression = infer_compression(path)
    with contextlib.ExitStack() as stack:
        try:
            f = stack.enter_context(fsspec.core.OpenFile(file_fs, path, mode, compression=compression))
        except FileNotFoundError:
            raise InputError(redact(uri), "file not found") from None
        yield f


def _exists_checked(fs: Any, path: str, uri: str) -> bool:
    """Whether ``uri`` is there, its failures retried and named. fsspec's HTTP ``exists`` says
    False for any failure (a 503, a server that never answers), which read as "file not found";
    its ``info`` raises them, with the 404 told apart."""
    if protocol_of(uri) not in ("http", "https"):
        return bool(call_with_retries(lambda: fs.exists(path), uri))
    try:
        call_with_retries(lambda: fs.info(path), uri)
    except InputError as exc:
        if exc.message.startswith("object not found"):
            return False
        raise
    return True

