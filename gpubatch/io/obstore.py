"""Range reads through obstore (Rust ``object_store``) for s3, gs, az and plain http(s) objects.

Why: fsspec does every request's HTTP work in Python on its one event-loop thread, about 1.5-2 ms
of CPU per request on the cores that decode the tiles, and caps a process at about one core of
it (bench/NOTES.md, "Object storage"). obstore signs, sends and reads in Rust with the GIL
released for the whole call: 4-7x less client CPU per request.

:class:`ObstoreRangeReader` is a :class:`~gpubatch.io.ranges.RangeReader` (the two primitives),
so the storage entry point wraps it in the same retry and metrics layers as any backend: obstore's
own retries are off and every retry is gpubatch's, counted. :func:`store_for` decides whether
obstore can serve a URI *exactly* as fsspec would (every storage option understood, the region
known); when it cannot, it says why and :func:`gpubatch.io.storage.open_ranges` keeps fsspec.

Requests run on obstore's Rust runtime, started and collected by one asyncio loop thread per
process, so each request is timed and fails or succeeds on its own (a retry is one failed
request, counted); the calling thread waits with the GIL released meanwhile.

Forking: once obstore has made a request in a process (its tokio runtime started), any obstore
call in a ``fork()``ed child hangs. gpubatch's workers come from a forkserver that only imports
modules, so they are unaffected; a child forked from a process that used obstore falls back to
fsspec here (:func:`usable`), so nothing can hang.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import math
import os
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, cast
from urllib.parse import urlsplit

from gpubatch.core.errors import InputError
from gpubatch.io import clouds
from gpubatch.io.metrics import record_head
from gpubatch.io.ranges import Fetched, ObjectChanged, RangeReader
from gpubatch.io.redact import redact, register_secrets
from gpubatch.io.retry import storage_error

log = logging.getLogger("gpubatch")

#: URI scheme -> obstore store kind
SCHEMES = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure",
           "abfss": "azure", "http": "http", "https": "http"}
#: the longest a call waits for its requests: obstore's own timeouts (connect 10 s, request 60 s
#: by default) end every request well before; this only bounds a wait that would hang
WAIT_S = 600.0
#: each request's bounds where the options set none (config_kwargs connect_timeout, read_timeout:
#: s3 only): a server that accepts and never answers fails the request, which is retried
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
#: where an S3 bucket's region is asked when nothing configures it (the header s3fs reads too)
REGION_URL = "https://{bucket}.s3.amazonaws.com"

#: fsspec storage options each store kind understands (others send a URI to fsspec); options
#: gpubatch itself sets (listing cache, retries, pool size) are fsspec's business and ignored
_COMMON = {"use_listings_cache", "skip_instance_cache", "default_block_size", "default_fill_cache",
           "default_cache_type", "cache_regions"}
_S3_OPTIONS = _COMMON | {"key", "secret", "token", "endpoint_url", "client_kwargs", "config_kwargs",
                         "anon", "use_ssl", "region_name", "requester_pays", "profile"}
_S3_CLIENT = {"endpoint_url", "region_name", "aws_access_key_id", "aws_secret_access_key",
              "aws_session_token"}
_S3_CONFIG = {"retries", "max_pool_connections", "connect_timeout", "read_timeout", "s3"}
_GCS_OPTIONS = _COMMON | {"token", "project", "endpoint_url", "anon"}
_AZURE_OPTIONS = _COMMON | {"account_name", "account_key", "sas_token", "connection_string", "anon",
                            "client_id", "client_secret", "tenant_id", "account_host"}
_HTTP_OPTIONS = _COMMON | {"headers", "client_kwargs"}


class Unsupported(Exception):
    """obstore cannot serve this URI exactly as fsspec would; the message says why."""


class Unsized(InputError):
    """The object's server answers without Content-Length (an HTTP/1.0 server ending the body
    with the connection), which object_store refuses for every request, HEAD and GET alike.
    Known only once it answered: ``range_reader: auto`` then reads the object through fsspec
    (:mod:`gpubatch.io.storage`); ``range_reader: obstore`` fails with this message."""

    def __init__(self, uri: str):
        super().__init__(redact(uri), "its server sends no Content-Length, which obstore refuses: "
                                      "set range_reader to auto or fsspec (profile, or GPUBATCH_RANGE_READER) "
                                      "to read it through fsspec")


def _unsized(exc: BaseException, uri: str) -> BaseException:
    """``exc`` as :class:`Unsized` where it is object_store's refusal of an answer without
    Content-Length (a ``GenericError`` whose source is ``MissingContentLength``), else itself."""
    text = str(exc)
    if "MissingContentLength" in text or "Content-Length Header missing" in text:
        return Unsized(uri)
    return exc


# -- the fork guard ------------------------------------------------------------------------------

_used = False
_forked_after_use = False
_stores: dict[str, Any] = {}
_regions: dict[str, str | None] = {}
_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def _after_fork_in_child() -> None:
    global _forked_after_use, _loop, _lock
    _forked_after_use = _forked_after_use or _used
    _stores.clear()
    _loop = None  # the parent's loop thread does not exist here
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork either
    os.register_at_fork(after_in_child=_after_fork_in_child)


def usable() -> bool:
    """obstore is installed and may run here (not a fork of a process whose runtime started)."""
    if _forked_after_use:
        return False
    try:
        import obstore  # noqa: F401
    except ImportError:
        return False
    return True


def _mark_used() -> None:
    global _used
    _used = True


# -- URIs and options -> stores ------------------------------------------------------------------

def split_uri(uri: str) -> tuple[str, str, str, str | None]:
    """(store kind, bucket/container or base URL, key within it, azure account) of a URI."""
    parts = urlsplit(uri)
    kind = SCHEMES.get(parts.scheme.lower())
    if kind is None:
        raise Unsupported(f"{parts.scheme or 'a local path'} is not an obstore scheme")
    if parts.username or parts.password:
        raise Unsupported("a URL with credentials in it (user:password@) is read through fsspec")
    if kind == "http":
        if parts.query or parts.fragment:
            raise Unsupported("a URL with a query string (a presigned URL) is read through fsspec")
        base, _, name = parts.path.rpartition("/")
        if not name:
            raise Unsupported("a URL that ends in / names no object")
        return kind, f"{parts.scheme}://{parts.netloc}{base}", name, None
    # an object URI has no query or fragment: '?' and '#' are the key's own characters, as s3fs,
    # gcsfs and adlfs read them and a listing gives them (urlsplit's path would lose them)
    netloc, key, account = parts.netloc, uri.split("://", 1)[1].partition("/")[2].lstrip("/"), None
    if kind == "azure" and "@" in netloc:  # abfs[s]://container@account.dfs.core.windows.net/path
        netloc, host = netloc.split("@", 1)
        account = host.split(".", 1)[0]
    if not netloc or not key:
        raise Unsupported("expected scheme://bucket/key")
    return kind, netloc, key, account


def _unknown(options: dict[str, Any], known: set[str]) -> None:
    extra = sorted(set(options) - known)
    if extra:
        raise Unsupported(f"storage options obstore does not take: {extra}")


def _client_options(options: dict[str, Any], endpoint: str | None) -> Any:
    config = options.get("config_kwargs") or {}
    client: dict[str, Any] = {
        "timeout": timedelta(seconds=float(config.get("read_timeout") or READ_TIMEOUT_S)),
        "connect_timeout": timedelta(seconds=float(config.get("connect_timeout") or CONNECT_TIMEOUT_S)),
        # below a server's keep-alive (S3 closes idle connections after about 20 s): a pooled
        # connection found dead on reuse would cost a counted retry
        "pool_idle_timeout": timedelta(seconds=15),
    }
    if (endpoint or "").startswith("http://") or options.get("use_ssl") is False:
        client["allow_http"] = True
    return client


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in ("1", "true", "yes"))


def _s3_store(bucket: str, options: dict[str, Any]) -> Any:
    from obstore.store import S3Store

    _unknown(options, _S3_OPTIONS)
    ck, cfg = dict(options.get("client_kwargs") or {}), dict(options.get("config_kwargs") or {})
    _unknown(ck, _S3_CLIENT)
    _unknown(cfg, _S3_CONFIG)
    _unknown(cfg.get("s3") or {}, {"addressing_style"})
    env = os.environ
    endpoint = (options.get("endpoint_url") or ck.get("endpoint_url") or env.get("AWS_ENDPOINT_URL_S3")
                or env.get("AWS_ENDPOINT_URL"))
    config: dict[str, Any] = {}
    if endpoint:
        config["endpoint"] = endpoint
    if (cfg.get("s3") or {}).get("addressing_style") == "virtual":
        config["virtual_hosted_style_request"] = True
    if options.get("requester_pays"):
        config["request_payer"] = True
    provider, region = _s3_credentials(options, ck, config)
    region = (ck.get("region_name") or options.get("region_name") or env.get("AWS_REGION")
              or env.get("AWS_DEFAULT_REGION") or region or (None if endpoint else _bucket_region(bucket)))
    if region is None and not endpoint:
        raise Unsupported(f"the region of bucket {bucket} is not configured and could not be found "
                          "(set AWS_REGION or client_kwargs.region_name)")
    if region:
        config["region"] = region
    return S3Store(bucket, config=cast(Any, config), client_options=_client_options(options, endpoint),
                   retry_config={"max_retries": 0}, credential_provider=provider)


def _s3_credentials(options: dict[str, Any], ck: dict[str, Any], config: dict[str, Any]
                    ) -> tuple[Any, str | None]:
    """(credential provider or None, region a profile names) as botocore would resolve them.

    Explicit keys go in a provider, not the config: object_store reads the environment first and
    the config only overrides the keys it names, so an AWS_SESSION_TOKEN left in the environment
    would sign next to the option's key, which botocore never does. object_store reads neither
    ~/.aws nor AWS_PROFILE: a profile goes through botocore's own chain.
    """
    key = options.get("key") or ck.get("aws_access_key_id")
    secret = options.get("secret") or ck.get("aws_secret_access_key")
    token = options.get("token") or ck.get("aws_session_token")
    if _truthy(options.get("anon")):
        config["skip_signature"] = True
        return None, None
    if key and secret:
        creds = {"access_key_id": key, "secret_access_key": secret, "token": token, "expires_at": None}
        return (lambda: creds), None
    profile = options.get("profile")
    if profile or (not os.environ.get("AWS_ACCESS_KEY_ID") and _shared_aws_config()):
        try:
            import boto3
            from obstore.auth.boto3 import Boto3CredentialProvider
        except ImportError:
            raise Unsupported("AWS profiles need boto3 for obstore (pip install boto3)") from None
        session = boto3.Session(profile_name=profile) if profile else boto3.Session()
        return Boto3CredentialProvider(session), session.region_name
    return None, None  # AWS_* environment, or object_store's chain (web identity, ECS, EC2)


def _shared_aws_config() -> bool:
    env = os.environ
    if env.get("AWS_PROFILE"):
        return True
    home = os.path.expanduser("~")
    return any(os.path.isfile(p) for p in (
        env.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join(home, ".aws", "credentials"),
        env.get("AWS_CONFIG_FILE") or os.path.join(home, ".aws", "config")))


def _bucket_region(bucket: str) -> str | None:
    """The bucket's region from S3's ``x-amz-bucket-region`` header (an unsigned HEAD, answered
    even when the bucket is private), as s3fs looks it up; None when it cannot be asked."""
    with _lock:
        if bucket in _regions:
            return _regions[bucket]
    region = None
    request = urllib.request.Request(REGION_URL.format(bucket=bucket), method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - fixed https URL
            region = response.headers.get("x-amz-bucket-region")
    except urllib.error.HTTPError as exc:  # 301/403 still carry the header
        region = exc.headers.get("x-amz-bucket-region") if exc.headers else None
    except (OSError, ValueError):
        region = None
    with _lock:
        _regions[bucket] = region
    return region


def _gcs_store(bucket: str, options: dict[str, Any]) -> Any:
    from obstore.store import GCSStore

    _unknown(options, _GCS_OPTIONS)
    config: dict[str, Any] = {}
    token = options.get("token")
    if token == "anon" or _truthy(options.get("anon")):
        config["skip_signature"] = True
    elif isinstance(token, dict):
        config["service_account_key"] = json.dumps(token)
    elif isinstance(token, str) and os.path.isfile(os.path.expanduser(token)):
        path = os.path.expanduser(token)
        with open(path) as fh:
            kind = json.load(fh).get("type")
        config["service_account" if kind == "service_account" else "application_credentials"] = path
    elif token not in (None, "google_default", "cloud"):
        raise Unsupported("this gcs token form is read through fsspec")
    if clouds.anonymous_off_google(options):  # an emulator, and no credentials: gcsfs goes anonymous
        config["skip_signature"] = True
    endpoint = clouds.gcs_endpoint(options)
    if endpoint:
        config["base_url"] = endpoint
    return GCSStore(bucket, config=cast(Any, config), client_options=_client_options(options, endpoint),
                    retry_config={"max_retries": 0})


def _azure_store(container: str, account: str | None, options: dict[str, Any]) -> Any:
    from obstore.store import AzureStore

    _unknown(options, _AZURE_OPTIONS)
    opts = dict(options)
    conn = opts.get("connection_string") or os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
    if conn:
        fields = dict(p.split("=", 1) for p in conn.split(";") if "=" in p)
        for key, name in (("account_name", "AccountName"), ("account_key", "AccountKey"),
                          ("sas_token", "SharedAccessSignature"), ("account_host", "BlobEndpoint")):
            if fields.get(name):
                opts.setdefault(key, fields[name])
    config: dict[str, Any] = {}
    if account or opts.get("account_name"):
        config["account_name"] = account or opts["account_name"]
    if _truthy(opts.get("anon")):
        config["skip_signature"] = True
    elif opts.get("account_key"):
        config["account_key"] = opts["account_key"]
    elif opts.get("sas_token"):
        config["sas_key"] = str(opts["sas_token"]).lstrip("?")
    elif opts.get("client_id") and opts.get("client_secret") and opts.get("tenant_id"):
        config.update(client_id=opts["client_id"], client_secret=opts["client_secret"],
                      tenant_id=opts["tenant_id"])
    host = opts.get("account_host")
    endpoint = (host if "://" in host else f"https://{host}") if host else None
    if endpoint:
        config["endpoint"] = endpoint
    return AzureStore(container, config=cast(Any, config), client_options=_client_options(opts, endpoint),
                      retry_config={"max_retries": 0})


def _http_store(base: str, options: dict[str, Any]) -> Any:
    from obstore.store import HTTPStore

    _unknown(options, _HTTP_OPTIONS)
    _unknown(options.get("client_kwargs") or {}, {"headers"})
    client = _client_options(options, base)
    headers = options.get("headers") or (options.get("client_kwargs") or {}).get("headers")
    if headers:
        client["default_headers"] = dict(headers)
    return HTTPStore.from_url(base, client_options=client, retry_config={"max_retries": 0})


def store_for(uri: str, options: dict[str, Any] | None) -> tuple[Any, str]:
    """(obstore store, key) for ``uri`` with merged storage options; raises :class:`Unsupported`
    when fsspec must serve it. Stores are cached per process (one connection pool per bucket
    and options), like fsspec's filesystems."""
    if not usable():
        raise Unsupported("obstore is not installed" if not _forked_after_use else
                          "this process was forked after obstore ran in its parent")
    kind, container, key, account = split_uri(uri)
    opts = dict(options or {})
    register_secrets(opts)
    token = json.dumps([kind, container, account, opts], sort_keys=True, default=str)
    with _lock:
        store = _stores.get(token)
    if store is None:
        build: dict[str, Callable[[], Any]] = {
            "s3": lambda: _s3_store(container, opts), "gcs": lambda: _gcs_store(container, opts),
            "azure": lambda: _azure_store(container, account, opts), "http": lambda: _http_store(container, opts)}
        try:
            store = build[kind]()
        except Unsupported:
            raise
        except Exception as exc:  # a malformed option: obstore says which, without secrets
            raise Unsupported(redact(f"{type(exc).__name__}: {exc}").splitlines()[0][:200]) from None
        with _lock:
            store = _stores.setdefault(token, store)
    return store, key


def head(store: Any, key: str, uri: str = "") -> dict[str, Any]:
    """{size, etag, mtime} of an object, in the form :func:`gpubatch.io.storage.stat` gives;
    :class:`Unsized` (naming ``uri``) where its server gives no Content-Length."""
    import obstore

    _mark_used()
    try:
        meta = obstore.head(store, key)
    except Exception as exc:
        if isinstance(exc, obstore.exceptions.NotFoundError):
            record_head()  # answered (404) and billed: an existence check's, a prefix's
        unsized = _unsized(exc, uri or key)
        if unsized is exc:
            raise
        raise unsized from None
    record_head()
    return _described(meta)


def _described(meta: Any) -> dict[str, Any]:
    """An obstore ObjectMeta (a HEAD's, a GET's) in :func:`gpubatch.io.storage.stat`'s form."""
    etag = (meta.get("e_tag") or "").strip('"') or None
    mtime = meta.get("last_modified")
    return {"size": int(meta["size"]), "type": "file", "etag": etag,
            "mtime": str(mtime) if mtime is not None else None}


# -- the reader ----------------------------------------------------------------------------------

def _io_loop() -> asyncio.AbstractEventLoop:
    """One daemon thread per process running an asyncio loop for every obstore request.

    The requests run on obstore's own (Rust) runtime; the loop only starts them and collects their
    outcomes, so each request is timed, and fails or succeeds, on its own: a retry is then one
    failed request, counted, never a batch of its neighbours.
    """
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="gpubatch-obstore", daemon=True).start()
            _loop = loop
        return _loop


def split_span(start: int, stop: int, max_request: int) -> list[tuple[int, int]]:
    """(start, stop) cut into near-equal pieces no longer than ``max_request``."""
    n = max(1, math.ceil((stop - start) / max_request))
    step = math.ceil((stop - start) / n)
    return [(a, min(a + step, stop)) for a in range(start, stop, step)]


class ObstoreRangeReader(RangeReader):
    """Spans of one object fetched through obstore: one attempt per call, a result per span.

    Every request of a call is in flight at once (at most ``max_concurrency`` per object), spans
    longer than ``max_request`` cut into concurrent requests. The calling thread waits without the
    GIL's involvement in the transfer: obstore signs, sends and reads in Rust. The data comes back
    as zero-copy ``obstore.Bytes`` (buffer protocol, ``len``, slicing, ``==`` with bytes).

    Every read is of one version of the object: the reader is pinned to an ETag (given, from a
    HEAD, or the first answer's) and each later GET carries ``If-Match`` with it, so a server whose
    object was written over refuses the read (412) instead of handing out the new bytes beside the
    old; an answer of another ETag (a server that ignores If-Match) fails the same way. Weak or
    missing ETags pin nothing: the caller's before-and-after check is then all there is.
    """

    max_request = 4 << 20
    timed = True
    client = "obstore"

    def __init__(self, store: Any, key: str, uri: str, max_concurrency: int = 64,
                 timeout_s: float = WAIT_S, etag: str | None = None):
        self.store, self.key, self.uri = store, key, redact(uri)
        self.max_concurrency, self.timeout_s = max_concurrency, timeout_s
        self._sem: asyncio.Semaphore | None = None
        self.known_size: int | None = None  # from its HEAD, or given: a version already known
        self._etag: str | None = None
        self._answered: dict[str, Any] | None = None  # the first GET's answer: its object's version
        self._pinning = threading.Lock()  # the first answer and a caller's pin may race to set it
        self.pin(etag)

    def size(self) -> int:
        if self.known_size is None:
            meta = head(self.store, self.key, self.uri)
            self.pin(meta["etag"])
            self.known_size = meta["size"]
        return self.known_size

    def version(self) -> str | None:
        return self._etag

    def answered(self) -> dict[str, Any] | None:
        return self._answered

    def pin(self, etag: str | None) -> None:
        changed = self._settle(_strong(etag))
        if changed is not None:
            raise storage_error(self.uri, changed)

    def _settle(self, seen: str | None) -> ObjectChanged | None:
        """Pin ``seen`` if nothing is pinned yet; the error to raise if another version is."""
        if seen is None:
            return None
        with self._pinning:
            if self._etag is None:
                self._etag = seen
            return ObjectChanged(self._etag, seen) if seen != self._etag else None

    def fetch(self, start: int, stop: int) -> bytes:
        """``bytes`` (not a view): fsspec's readahead cache under RangeFile concatenates them."""
        return bytes(super().fetch(start, stop))

    def fetch_spans(self, spans: Sequence[tuple[int, int]]) -> list[Fetched]:
        pieces: list[tuple[int, int]] = []
        owner: list[int] = []
        for k, (a, b) in enumerate(spans):
            if b > a:
                cut = split_span(a, b, self.max_request)
                pieces += cut
                owner += [k] * len(cut)
        got = self._attempt(pieces) if pieces else []
        parts: dict[int, list[Fetched]] = {}
        for k, result in zip(owner, got, strict=True):
            parts.setdefault(k, []).append(result)
        return [_joined(parts.get(k, [])) for k in range(len(spans))]

    def _attempt(self, pieces: list[tuple[int, int]]) -> list[Fetched]:
        _mark_used()

        async def gather() -> list[Fetched]:
            return list(await asyncio.gather(*(self._one(a, b) for a, b in pieces)))

        future = asyncio.run_coroutine_threadsafe(gather(), _io_loop())
        try:
            return future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            error = TimeoutError(f"no answer in {self.timeout_s:g} s")
            return [Fetched(error=error, seconds=self.timeout_s) for _ in pieces]

    async def _one(self, start: int, stop: int) -> Fetched:
        if self._sem is None:  # created on the loop's own thread
            self._sem = asyncio.Semaphore(self.max_concurrency)
        async with self._sem:  # latency is timed inside: queueing here is not storage's
            t0 = time.perf_counter()
            try:
                blob = await self._get(start, stop)
            except Exception as exc:  # noqa: BLE001 - returned to the caller per span
                return Fetched(error=_unsized(exc, self.uri), seconds=time.perf_counter() - t0)
            return Fetched(cast(bytes, blob), seconds=time.perf_counter() - t0)  # a bytes-like view

    async def _get(self, start: int, stop: int) -> Any:
        """One ranged GET of the pinned version (If-Match), pinning the first answer's ETag.
        (``get_range_async`` takes no options; a GET with options makes no request more, and
        its client CPU is in bench/NOTES.md.)"""
        import obstore

        options: dict[str, Any] = {"range": (start, stop)}
        if self._etag is not None:
            options["if_match"] = f'"{self._etag}"'
        result = await obstore.get_async(self.store, self.key, options=cast(Any, options))
        blob = await result.bytes_async()
        changed = self._settle(_strong(result.meta.get("e_tag")))
        if changed is not None:
            raise changed
        if self._answered is None:  # a ranged GET's meta is the whole object's (Content-Range's size)
            self._answered = _described(result.meta)
        return blob


def _strong(etag: str | None) -> str | None:
    """An ETag unquoted, or None for none or a weak one (``W/``: If-Match never matches it)."""
    if not etag or etag.startswith("W/"):
        return None
    return etag.strip('"') or None


def _joined(results: list[Fetched]) -> Fetched:
    """One span's result from its pieces' (a failed piece fails the span)."""
    if not results:
        return Fetched(b"")
    if len(results) == 1:
        return results[0]
    seconds = max(r.seconds for r in results)
    error = next((r.error for r in results if r.error is not None), None)
    if error is not None:
        return Fetched(error=error, seconds=seconds, requests=len(results))
    return Fetched(b"".join(r.data or b"" for r in results), seconds=seconds, requests=len(results))
