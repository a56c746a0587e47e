"""Storage through fsspec: URI expansion, retries, redaction, read metrics and opening slides.

In object storage every request costs tens of milliseconds and some fail transiently (503
SlowDown, resets). ``input.access: stream`` reads TIFF-family slides by byte range: tifffile parses
the header through a small readahead-cached file, then :class:`RemoteRangeReader` fetches stored
tiles coalesced and concurrently on fsspec's event loop, so latency is paid once per batch of
requests, not per tile, and nothing is downloaded whole. ``stage`` downloads whole files ahead of
use into a bounded local cache (:mod:`gpubatch.io.stage_cache`), for formats only openslide reads.
``auto`` streams TIFF-family suffixes, stages the rest, falls back to stage when a TIFF-family file
cannot be tile-decoded, and records its choice (``backend.access``, counters).

This module owns the one retry layer for storage: s3fs's and botocore's own retries are switched
off on the filesystems it creates (unless the user sets them), so that every retry is counted, the
backoff is exponential with jitter, and the number of attempts is bounded. Credentials never appear
in a message it builds: every one goes through :func:`redact`.
"""

from __future__ import annotations

import asyncio
import errno
import glob as _glob
import io
import json
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from gpubatch.core.errors import InputError
from gpubatch.spec import is_remote

if TYPE_CHECKING:
    from gpubatch.core.clocks import StageClocks
    from gpubatch.sources.slides.backends import SlideBackend
    from gpubatch.spec import JobSpec

T = TypeVar("T")

SENSITIVE_KEYS = frozenset({
    "key", "secret", "token", "password", "passwd", "access_key", "secret_key", "access_key_id",
    "secret_access_key", "session_token", "aws_access_key_id", "aws_secret_access_key",
    "aws_session_token", "security_token", "sas_token", "account_key", "credential",
    "credentials", "client_secret", "refresh_token", "api_key", "authorization", "username",
})
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
              "AWS_SECURITY_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_KEY")
MASK = "***"
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_QUERY_SECRET = re.compile(
    r"(?i)\b(X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|AWSAccessKeyId|"
    r"sig|token|access_token|key|secret|password)=([^&\s\"']+)")
_ASSIGN_SECRET = re.compile(
    r"(?i)(\b[\"']?(?:aws_)?(?:secret_access_key|access_key_id|session_token|secret|password|token|key)"
    r"[\"']?\s*[:=]\s*[\"']?)([^\"',}\s]+)")
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{12,}\b")
_secrets: set[str] = set()
_secrets_lock = threading.Lock()

# Latency histogram: log-spaced upper bounds (ms), factor sqrt(2), 0.25 ms .. ~92 s, plus +inf.
LATENCY_BOUNDS_MS = tuple(round(0.25 * 2 ** (i / 2), 3) for i in range(38)) + (math.inf,)
LATENCY_PREFIX = "storage.latency_ms.bucket_"
TIFF_FAMILY = (".svs", ".tif", ".tiff", ".btf", ".tf8", ".qptiff")
TRANSIENT_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
                    errno.ECONNREFUSED, errno.EPIPE, errno.ENETUNREACH, errno.EHOSTUNREACH,
                    getattr(errno, "EREMOTEIO", 121)}
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                   "ServiceUnavailable", "RequestTimeTooSkewed", "503", "500", "502", "504"}


# -- redaction ------------------------------------------------------------------------------------

def _register_secrets(options: Any) -> None:
    """Remember secret values so that :func:`redact` can scrub them from free text too."""
    if isinstance(options, dict):
        for k, v in options.items():
            if str(k).lower() in SENSITIVE_KEYS and isinstance(v, str) and len(v) >= 4:
                with _secrets_lock:
                    _secrets.add(v)
            else:
                _register_secrets(v)


def redact(value: Any) -> Any:
    """A copy of ``value`` with credentials removed: safe for logs, reports and error messages.

    Mappings lose the values of sensitive keys (key, secret, token, password, ...), at any depth;
    strings lose URL userinfo, secret-looking query parameters and assignments, AWS key ids, and
    every secret value seen in storage options or the AWS_* environment.
    """
    if isinstance(value, dict):
        return {k: (MASK if str(k).lower() in SENSITIVE_KEYS and v not in (None, "", False)
                    else redact(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if not isinstance(value, str):
        return value
    text = _USERINFO.sub(lambda m: m.group("scheme") + MASK + "@", value)
    text = _QUERY_SECRET.sub(lambda m: f"{m.group(1)}={MASK}", text)
    text = _ASSIGN_SECRET.sub(lambda m: m.group(1) + MASK, text)
    text = _AWS_KEY_ID.sub(MASK, text)
    with _secrets_lock:
        known = set(_secrets)
    known.update(v for v in (os.environ.get(k) for k in SECRET_ENV) if v and len(v) >= 4)
    for secret in sorted(known, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


# -- retries --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: attempt n waits U(0, min(cap, base * 2**n))."""

    attempts: int = 5
    base_s: float = 0.05
    cap_s: float = 5.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0.0, min(self.cap_s, self.base_s * 2 ** attempt))


def _status_and_code(exc: BaseException) -> tuple[int | None, str | None]:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        meta = response.get("ResponseMetadata", {})
        return meta.get("HTTPStatusCode"), response.get("Error", {}).get("Code")
    status = getattr(exc, "status", None) or getattr(exc, "status_code", None)
    return (status if isinstance(status, int) else None), None


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    node: BaseException | None = exc
    while node is not None and node not in out and len(out) < 8:
        out.append(node)
        node = node.__cause__ or node.__context__
    return out


def is_transient(exc: BaseException) -> bool:
    """True when trying again could succeed: 5xx/SlowDown, timeouts, resets, broken connections.

    s3fs translates botocore errors into OSError subclasses (SlowDown -> EBUSY, 500 -> EREMOTEIO,
    403 -> PermissionError, 404 -> FileNotFoundError) and passes connection errors through as
    botocore/aiohttp exceptions, so the whole cause chain is inspected, class names included, to
    avoid importing every client library.
    """
    for node in _chain(exc):
        if isinstance(node, (FileNotFoundError, PermissionError, IsADirectoryError)):
            return False
        status, code = _status_and_code(node)
        if code in TRANSIENT_CODES or (status is not None and (status >= 500 or status == 429)):
            return True
        if status is not None and 400 <= status < 500:
            return False
        if isinstance(node, (TimeoutError, asyncio.TimeoutError, ConnectionError)):
            return True
        names = {c.__name__ for c in type(node).__mro__}
        if names & {"HTTPClientError", "ClientConnectionError", "ClientPayloadError",
                    "ServerDisconnectedError", "FSTimeoutError", "IncompleteRead",
                    "ResponseParserError", "ReadTimeoutError", "ConnectTimeoutError",
                    "EndpointConnectionError", "ConnectionClosedError", "ProtocolError"}:
            return True
        if isinstance(node, OSError) and node.errno in TRANSIENT_ERRNOS:
            return True
    return False


def storage_error(uri: str, exc: BaseException, attempts: int = 1) -> InputError:
    """A clear, credential-free InputError for a failed storage call (retryable when transient)."""
    uri = redact(uri)
    detail = redact(f"{type(exc).__name__}: {exc}")[:300]
    if isinstance(exc, FileNotFoundError):
        return InputError(uri, "object not found (404): check the URI, bucket and prefix")
    if isinstance(exc, PermissionError) or _status_and_code(exc)[0] == 403:
        return InputError(uri, "access denied (403): the credentials from input.storage, the "
                          "profile or the AWS_* environment may not read this object")
    if is_transient(exc):
        return InputError(uri, f"storage kept failing after {attempts} attempt(s) ({detail})",
                          retryable=True)
    return InputError(uri, f"storage error ({detail})")


def call_with_retries(fn: Callable[[], T], uri: str, policy: RetryPolicy,
                      clocks: StageClocks | None = None) -> T:
    """Run a synchronous storage call under the retry policy; failures become InputError."""
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or attempt + 1 >= policy.attempts:
                raise storage_error(uri, exc, attempt + 1) from None
            if clocks is not None:
                clocks.count("storage.retries")
            time.sleep(policy.delay(attempt))
    raise AssertionError("unreachable")


# -- metrics --------------------------------------------------------------------------------------

def record_request(clocks: StageClocks | None, nbytes: int, seconds: float) -> None:
    """Count one request: requests, bytes and a latency histogram bucket (mergeable by sum)."""
    if clocks is None:
        return
    ms = seconds * 1000.0
    upper = next(b for b in LATENCY_BOUNDS_MS if ms <= b)
    clocks.count("storage.requests")
    clocks.count("storage.bytes", nbytes)
    clocks.count(f"{LATENCY_PREFIX}{upper:g}")


def latency_percentiles(counters: dict[str, float]) -> dict[str, float | None]:
    """p50 and p99 request latency (ms) from the histogram, log-interpolated inside a bucket."""
    buckets = sorted((float(k[len(LATENCY_PREFIX):]), v) for k, v in counters.items()
                     if k.startswith(LATENCY_PREFIX) and v > 0)
    total = sum(v for _, v in buckets)
    out: dict[str, float | None] = {"p50_ms": None, "p99_ms": None}
    if total <= 0:
        return out
    for name, q in (("p50_ms", 0.5), ("p99_ms", 0.99)):
        seen = 0.0
        for upper, count in buckets:  # buckets are sqrt(2) apart: interpolate inside this one
            if seen + count >= q * total:
                top = upper if math.isfinite(upper) else LATENCY_BOUNDS_MS[-2] * math.sqrt(2)
                lower = top / math.sqrt(2)
                out[name] = round(lower * math.sqrt(2) ** ((q * total - seen) / count), 3)
                break
            seen += count
    return out


def storage_summary(counters: dict[str, float], wall_s: float) -> dict[str, Any]:
    """The storage line of the report: requests, bytes, MB/s, p50/p99, retries, staging, waits."""
    get = counters.get
    nbytes = float(get("storage.bytes", 0.0))
    summary: dict[str, Any] = {
        "requests": int(get("storage.requests", 0)), "bytes": int(nbytes),
        "mb_per_s": round(nbytes / 1e6 / wall_s, 3) if wall_s > 0 else None,
        **latency_percentiles(counters),
        "retries": int(get("storage.retries", 0)), "staged_bytes": int(get("storage.staged_bytes", 0)),
        "cache_hits": int(get("storage.cache_hits", 0)), "wait_s": round(float(get("storage.wait_s", 0.0)), 4),
    }
    access = {k.rsplit(".", 1)[1]: int(v) for k, v in counters.items() if k.startswith("storage.access.")}
    if access:
        summary["access"] = access
    return summary


# -- filesystems and options ----------------------------------------------------------------------

_profile_options: dict[str, Any] = {}
_fs_cache: dict[str, Any] = {}
_fs_lock = threading.Lock()


def configure_storage(profile: dict[str, Any] | None) -> None:
    """Take ``storage`` (fsspec options; job options override) and ``stage_cache`` from a profile."""
    from gpubatch.io.stage_cache import configure_stage_cache

    profile = profile or {}
    _profile_options.clear()
    _profile_options.update(profile.get("storage") or {})
    _register_secrets(_profile_options)
    configure_stage_cache(profile.get("stage_cache"))


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def resolve_options(uri: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """Profile options, then job options, then gpubatch's defaults for the protocol.

    For S3 the defaults hand retries to this module (botocore's retries off, unless set) and widen
    the connection pool so that concurrent range reads are not queued behind ten connections.
    """
    merged = {**_profile_options, **(options or {})}
    _register_secrets(merged)
    if protocol_of(uri) != "file":  # a long run must see objects written after it listed a prefix
        merged.setdefault("use_listings_cache", False)
    if protocol_of(uri) in ("s3", "s3a"):
        config = dict(merged.get("config_kwargs") or {})
        config.setdefault("retries", {"max_attempts": 0, "mode": "legacy"})
        config.setdefault("max_pool_connections", 128)
        config.setdefault("connect_timeout", 10)
        config.setdefault("read_timeout", 60)
        merged["config_kwargs"] = config
    return merged


#: fsspec backends gpubatch does not install by default, and the extra that brings each
PROTOCOL_EXTRAS = {"gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}


def get_fs(uri: str, options: dict[str, Any] | None) -> tuple[Any, str]:
    """(filesystem, path) for a URI; one private instance per protocol and options per process.

    Instances are private (not fsspec's shared cache) because their retry setting is changed.
    """
    import fsspec
    from fsspec.core import split_protocol

    merged = resolve_options(uri, options)
    protocol = protocol_of(uri)
    token = protocol + json.dumps(merged, sort_keys=True, default=str)
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
                fs.retries = 1  # this module retries, with counting and jitter
            _fs_cache[token] = fs
    path = fs._strip_protocol(uri) if protocol != "file" else split_protocol(uri)[1]
    return fs, path


def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def _glob_remote(fs: Any, path: str, pattern: str) -> list[str]:
    """Matching object names; a missing bucket or prefix matches nothing."""
    try:
        # A listing is several requests and happens once, at plan time: be patient with it.
        return sorted(call_with_retries(lambda: fs.glob(path), pattern, RetryPolicy(attempts=10)))
    except InputError as exc:
        if "not found" in exc.message:
            return []
        raise


def remote_identity(uri: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Size and ETag (or mtime) of a remote object, for the audit trail; credential-free."""
    fs, path = get_fs(uri, options)
    info = call_with_retries(lambda: fs.info(path), uri, RetryPolicy(attempts=3))
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    mtime = info.get("LastModified") or info.get("mtime") or info.get("updated")
    return {"size": info.get("size"), "etag": str(etag).strip('"') if etag else None,
            "mtime": str(mtime) if mtime is not None else None}


def expand_uris(patterns: list[str], options: dict[str, Any] | None = None) -> list[str]:
    """Expand globs (local or remote) into a sorted, de-duplicated list of URIs.

    Remote names without a glob are kept as given (existence is checked on the worker, where a
    missing object quarantines just that slide); remote globs are listed through fsspec.
    """
    out: list[str] = []
    for pattern in patterns:
        if is_remote(pattern) and _has_magic(pattern.split("://", 1)[1]):
            fs, path = get_fs(pattern, options)
            found = [fs.unstrip_protocol(p) for p in _glob_remote(fs, path, pattern)
                     if not p.endswith("/")]
        elif is_remote(pattern):
            found = [pattern]
        else:
            path = pattern.removeprefix("file://")
            found = sorted(_glob.glob(path)) if _has_magic(path) else (
                [path] if os.path.exists(path) else [])
        out.extend(u for u in found if u not in out)
    return out


# -- range reads ----------------------------------------------------------------------------------

class RemoteRangeReader:
    """Byte ranges of one remote object: coalesced, concurrent, retried, measured; thread-safe.

    The engine's reader threads call :meth:`read_ranges` at once; each call coalesces its ranges
    (``gap``: neighbours closer than this are fetched in one request, which on a 50 ms link is far
    cheaper than a second round trip; ``max_request`` splits long runs so that they are fetched in
    parallel) and runs all its requests concurrently on fsspec's event loop, bounded by
    ``max_concurrency`` in-flight requests per object.
    """

    def __init__(self, fs: Any, path: str, uri: str, clocks: StageClocks | None,
                 policy: RetryPolicy | None = None, gap: int = 64 * 1024,
                 max_request: int = 4 << 20, max_concurrency: int = 64):
        if not getattr(fs, "async_impl", False):  # blocking filesystems run in threads
            from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

            fs = AsyncFileSystemWrapper(fs)
        self.fs, self.path, self.uri, self.clocks = fs, path, redact(uri), clocks
        self.policy = policy or RetryPolicy()
        self.gap, self.max_request, self.max_concurrency = gap, max_request, max_concurrency
        self._sem: asyncio.Semaphore | None = None
        self.closed = False

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        from gpubatch.sources.slides.backends import coalesce

        t0 = time.perf_counter()
        groups = coalesce(ranges, self.gap, self.max_request)
        blobs = self.fetch_many([(start, stop) for start, stop, _ in groups])
        out: list[bytes] = [b""] * len(ranges)
        for (start, _, members), blob in zip(groups, blobs, strict=True):
            for i in members:
                off, n = ranges[i]
                out[i] = blob[off - start: off - start + n]
        if self.clocks is not None:
            self.clocks.count("storage.wait_s", time.perf_counter() - t0)
        return out

    def fetch_many(self, spans: Sequence[tuple[int, int]]) -> list[bytes]:
        """Fetch (start, stop) spans concurrently; each span is retried on its own."""
        if not spans:
            return []
        from fsspec.asyn import sync

        async def gather() -> list[bytes]:
            return list(await asyncio.gather(*(self._fetch_async(a, b) for a, b in spans)))

        return sync(self.fs.loop, gather)

    def fetch(self, start: int, stop: int) -> bytes:
        return self.fetch_many([(start, stop)])[0]

    async def _fetch_async(self, start: int, stop: int) -> bytes:
        if stop <= start:
            return b""
        if self._sem is None:  # created on the loop's own thread
            self._sem = asyncio.Semaphore(self.max_concurrency)
        for attempt in range(self.policy.attempts):
            try:
                async with self._sem:  # latency is timed inside: queueing here is not storage's
                    t0 = time.perf_counter()
                    blob = await self.fs._cat_file(self.path, start=start, end=stop)
                    seconds = time.perf_counter() - t0
            except Exception as exc:
                if not is_transient(exc) or attempt + 1 >= self.policy.attempts:
                    raise storage_error(self.uri, exc, attempt + 1) from None
                if self.clocks is not None:
                    self.clocks.count("storage.retries")
                await asyncio.sleep(self.policy.delay(attempt))
                continue
            record_request(self.clocks, len(blob), seconds)
            return self._check(blob, start, stop)
        raise AssertionError("unreachable")

    def _check(self, blob: bytes, start: int, stop: int) -> bytes:
        if len(blob) != stop - start:
            raise InputError(self.uri, f"short read: asked bytes {start}-{stop}, got {len(blob)} "
                             "(the object changed or is truncated)")
        return blob

    def close(self) -> None:
        self.closed = True


class RangeFile(io.RawIOBase):
    """A read-only, seekable file over a RangeReader with fsspec's readahead cache.

    tifffile parses the TIFF header (IFDs, tile offset tables) through this: small scattered reads
    that the cache turns into a few ``blocksize`` requests, each retried like any tile read.
    """

    def __init__(self, reader: RemoteRangeReader, size: int, name: str, blocksize: int = 64 * 1024):
        from fsspec.caching import ReadAheadCache

        super().__init__()
        self.reader, self.size, self.name, self.mode = reader, size, name, "rb"
        self._cache = ReadAheadCache(blocksize, reader.fetch, size)
        self._pos = 0
        self._lock = threading.Lock()

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
            data = self._cache._fetch(self._pos, min(self._pos + len(view), self.size))
            view[: len(data)] = data
            self._pos += len(data)
        return len(data)

    def close(self) -> None:
        super().close()
        self.reader.close()


# -- opening slides -------------------------------------------------------------------------------

def choose_access(uri: str, requested: str) -> str:
    """``auto``: stream TIFF-family files by range, stage everything else (openslide formats)."""
    if requested != "auto":
        return requested
    return "stream" if uri.lower().split("?", 1)[0].endswith(TIFF_FAMILY) else "stage"


def _mark(backend: SlideBackend, access: str, clocks: StageClocks) -> SlideBackend:
    backend.access = access  # type: ignore[attr-defined]
    clocks.count(f"storage.access.{access}")
    return backend


def open_stream(uri: str, options: dict[str, Any] | None, clocks: StageClocks,
                policy: RetryPolicy | None = None, **reader_kwargs: Any) -> SlideBackend:
    """Open a TIFF-family slide for range reads: header through a cached file, tiles by range."""
    from gpubatch.sources.slides.backends import open_slide

    policy = policy or RetryPolicy()
    fs, path = get_fs(uri, options)
    info = call_with_retries(lambda: fs.info(path), uri, policy, clocks)
    size = int(info.get("size") or 0)
    if info.get("type") == "directory" or size <= 0:
        raise InputError(redact(uri), "is an empty object or a prefix (directory), not a slide file")
    reader = RemoteRangeReader(fs, path, uri, clocks, policy, **reader_kwargs)
    handle = RangeFile(reader, size, os.path.basename(path))
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


def _prewarm(backend: SlideBackend, reader: RemoteRangeReader) -> None:
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


def open_slide_input(uri: str, job: JobSpec, clocks: StageClocks) -> SlideBackend:
    """Open a slide on a worker: local, streamed or staged, as ``backend.access`` records."""
    from gpubatch.sources.slides.backends import open_slide

    if not is_remote(uri):
        path = uri.removeprefix("file://")
        if not os.path.exists(path):
            raise InputError(uri, "file not found")
        return _mark(open_slide(path, clocks), "local", clocks)
    access = choose_access(uri, job.input.access)
    policy = RetryPolicy(attempts=job.run.storage_attempts)
    if access == "stream":
        try:
            return _mark(open_stream(uri, job.input.storage, clocks, policy), "stream", clocks)
        except InputError as exc:
            if job.input.access != "auto" or _is_storage_failure(exc):
                raise
            clocks.count("storage.stream_fallbacks")
    from gpubatch.io.stage_cache import get_stage_cache

    backend = get_stage_cache().open(uri, job.input.storage, clocks, policy)
    return _mark(backend, "stage", clocks)


def _is_storage_failure(exc: InputError) -> bool:
    """Failures that staging would hit again (missing, forbidden, unreachable): no fallback."""
    return exc.retryable or exc.message.startswith(("object not found", "access denied", "storage",
                                                    "is an empty"))


def prefetch(uris: list[str], job: JobSpec) -> list[str]:
    """Start background downloads of the slides among ``uris`` that will be staged.

    Call on a worker with the next few shards' URIs when a shard starts: their downloads then
    overlap this shard's compute. Streamed and local slides are ignored; a download that would not
    fit the stage cache is skipped (the slide downloads when opened). Returns the URIs started.
    """
    from gpubatch.io.stage_cache import get_stage_cache

    staged = [u for u in uris if is_remote(u) and choose_access(u, job.input.access) == "stage"]
    return get_stage_cache().prefetch(staged, job.input.storage) if staged else []


def release(uri: str) -> None:
    """Drop a slide's staged files once its shard has committed (no-op if it was not staged)."""
    from gpubatch.io.stage_cache import get_stage_cache

    if is_remote(uri):
        get_stage_cache().release(uri)
