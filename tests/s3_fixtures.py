"""An S3-protocol server on loopback, a fault-injecting proxy in front of it, and test slides.

Storage code is only trustworthy when it has met a real server that is slow and fails: this module
runs moto in server mode (a real HTTP S3 endpoint, no patching of botocore or fsspec) and a small
threaded HTTP proxy that adds latency, answers a share of requests with 503 SlowDown, resets
connections (before the response or mid-body), and denies chosen keys with 403 AccessDenied.

Reusable from any test module: ``from s3_fixtures import s3, s3_stack, write_pyramid_tiff`` brings
the fixtures in (pytest finds fixtures imported into a test module's namespace). The stack can also
run outside pytest (``start_s3_stack()``), e.g. from the benchmark.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import random
import re
import socket
import struct
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

DATA_DIR = Path(__file__).resolve().parent / "data"
CMU_SMALL = DATA_DIR / "slides" / "CMU-1-Small-Region.svs"
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-authorization", "proxy-authenticate", "content-length", "server", "date",
               "expect"}
#: a request's own Date is kept: a signature may cover it (Azure's SharedKey does, as object_store
#: signs); a response's is the proxy's to send
REQUEST_DROPPED = HOP_HEADERS - {"date"}
SLOWDOWN_XML = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                b"<Message>Please reduce your request rate.</Message><RequestId>fault</RequestId></Error>")
#: a GCS JSON-API upload's path: the bucket only (the object is named in the query or the body)
GCS_UPLOAD = re.compile(r"upload/storage/v1/b/([^/]+)/o")
#: the object's name in a multipart upload's JSON metadata (a JSON string, escapes and all)
MULTIPART_NAME = re.compile(rb'"name"\s*:\s*("(?:[^"\\]|\\.)*")')
DENIED_XML = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
              b"<Message>Access Denied</Message><RequestId>fault</RequestId></Error>")


@dataclass
class Faults:
    """What the proxy does to requests: reads (GET/HEAD) and, apart, writes (PUT/POST/DELETE)."""

    error_rate: float = 0.0     # share of reads answered 503 SlowDown
    write_error_rate: float = 0.0  # share of writes answered 503 SlowDown (an upload's parts too)
    reset_rate: float = 0.0     # share whose connection is reset (half before, half mid-body)
    latency_s: float = 0.0      # added to every request
    forbidden: set[str] = field(default_factory=set)  # "bucket/key" answered 403 AccessDenied
    failing_writes: set[str] = field(default_factory=set)  # writes to keys ending so answered 503
    #: "bucket/key" -> how many of its next GETs are answered 503 SlowDown (a server throttling once)
    slow_gets: dict[str, int] = field(default_factory=dict)
    #: key ending -> seconds the next write to such a key is held before it is forwarded (once
    #: each: a request that stalls in a load balancer, then lands late)
    stalled_writes: dict[str, float] = field(default_factory=dict)
    #: key ending -> seconds the next write to such a key is held, then its connection reset, the
    #: write never forwarded (once each: an upload whose client is killed while it is in flight)
    dropped_writes: dict[str, float] = field(default_factory=dict)
    #: writes to keys containing one of these answered 503, every time (one slide's files, say)
    writes_failing_within: set[str] = field(default_factory=set)
    #: key part -> seconds every write to a key containing it is held before it is forwarded
    writes_stalling_within: dict[str, float] = field(default_factory=dict)
    #: key ending -> seconds the next HEAD of such a key is held before it is forwarded (once
    #: each; ended early by ``stall_release``): a version asked while something else happens
    held_heads: dict[str, float] = field(default_factory=dict)
    #: access key id -> seconds every read (GET, HEAD) signed with it is held before it is
    #: forwarded (ended early by ``stall_release``): one holder of those credentials paused
    reads_held_for: dict[str, float] = field(default_factory=dict)
    #: ends a held request early once it answers True (asked every 50 ms): a race staged by what has
    #: happened, not by how long a loaded machine takes to get there
    stall_release: Callable[[], bool] | None = None
    seed: int = 0


class FaultProxy:
    """A threaded HTTP/1.1 proxy on loopback in front of ``upstream`` (host, port)."""

    def __init__(self, upstream: tuple[str, int], faults: Faults | None = None):
        self.upstream = upstream
        self.faults = faults or Faults()
        self.stats: dict[str, int] = {"requests": 0, "errors": 0, "resets": 0, "forbidden": 0,
                                      "GET": 0, "HEAD": 0, "write_errors": 0}
        #: the signing headers of the last reads (Authorization, x-amz-security-token), newest last
        self.signatures: list[dict[str, str]] = []
        #: every read as (bucket/key, the access key id that signed it, or None), in order
        self.signed_reads: list[tuple[str, str | None]] = []
        #: GET and HEAD requests per object key
        self.gets: dict[str, int] = {}
        self.heads: dict[str, int] = {}
        #: PUT and POST requests per object key (an upload, or a part or completion of one)
        self.uploads: dict[str, int] = {}
        #: every request, in the order they came: (method, path with its query), as a server's
        #: access log has them
        self.log: list[tuple[str, str]] = []
        #: GET requests per key that read from byte 0 (whole objects, and a slide's header: an opening)
        self.from_start: dict[str, int] = {}
        #: per key, whether each of those GETs was in flight at once with a HEAD of the key
        #: (either arriving first: the two are sent together, and either may reach us first)
        self.from_start_beside_head: dict[str, list[bool]] = {}
        #: GETs being answered now, and the most ever at once (reads overlapping, or not)
        self.gets_open = self.most_gets_open = 0
        self._heads_open: dict[str, int] = {}
        self._from_start_open: dict[str, set[int]] = {}  # per key, indices of unanswered ones
        self._request = threading.local()  # the from-start GET this handler thread is answering
        self._rng = random.Random(self.faults.seed)
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def configure(self, **changes: Any) -> None:
        """Change faults at run time (``latency_s=0.08``, ``error_rate=0.2``, ...)."""
        with self._lock:
            for key, value in changes.items():
                setattr(self.faults, key, value)
            if "seed" in changes:
                self._rng = random.Random(changes["seed"])

    def hold(self, seconds: float) -> None:
        """A held request's wait: ``seconds``, or until ``stall_release`` says the race is staged."""
        release, deadline = self.faults.stall_release, time.monotonic() + seconds
        while time.monotonic() < deadline and not (release is not None and release()):
            time.sleep(0.05)

    def reset(self) -> None:
        with self._lock:
            self.faults = Faults()
            self.stats = dict.fromkeys(self.stats, 0)
            self.log = []
            self.signatures = []
            self.signed_reads = []
            self.gets = {}
            self.heads = {}
            self.uploads = {}
            self.from_start = {}
            self.from_start_beside_head = {}
            self._heads_open = {}
            self._from_start_open = {}
            self.gets_open = self.most_gets_open = 0

    def note_signature(self, headers: Any, path: str = "") -> float:
        """Note a read's signature; returns how long to hold it (``reads_held_for`` its key)."""
        with self._lock:
            self.signatures.append({k.lower(): v for k, v in headers.items()
                                    if k.lower() in ("authorization", "x-amz-security-token")})
            del self.signatures[:-200]
            signer = access_key_of(headers.get("Authorization") or "")
            self.signed_reads.append((_key(path), signer))
            return self.faults.reads_held_for.get(signer or "", 0.0)

    def decide(self, method: str, path: str, byte_range: str | None = None, body: bytes | None = None) -> str:
        """'forward', 'error', 'reset-early', 'reset-body', 'forbidden', 'stall:SECONDS' (held,
        then forwarded) or 'drop:SECONDS' (held, then reset unforwarded) for one request;
        ``body``: a write's, which names the object of a GCS upload (:func:`_key`)."""
        with self._lock:
            self.stats["requests"] += 1
            self.log.append((method, path))
            if method in ("GET", "HEAD"):
                self.stats[method] += 1
            if method in ("PUT", "POST"):
                written = _key(path, body)
                self.uploads[written] = self.uploads.get(written, 0) + 1
            if method not in ("GET", "HEAD"):
                return self._decide_write(_key(path, body))
            key = _key(path)
            if method == "HEAD":
                self.heads[key] = self.heads.get(key, 0) + 1
                self._heads_open[key] = self._heads_open.get(key, 0) + 1
                for index in self._from_start_open.get(key, ()):
                    self.from_start_beside_head[key][index] = True
            if method == "GET":
                self.gets[key] = self.gets.get(key, 0) + 1
                self.gets_open += 1
                self.most_gets_open = max(self.most_gets_open, self.gets_open)
                if byte_range is None or byte_range.replace(" ", "").startswith("bytes=0-"):
                    self.from_start[key] = self.from_start.get(key, 0) + 1
                    beside = self.from_start_beside_head.setdefault(key, [])
                    beside.append(self._heads_open.get(key, 0) > 0)
                    self._from_start_open.setdefault(key, set()).add(len(beside) - 1)
                    self._request.from_start = (key, len(beside) - 1)
            held = next((end for end in self.faults.held_heads if key.endswith(end)), None)
            if method == "HEAD" and held is not None:
                return f"stall:{self.faults.held_heads.pop(held)}"
            if key in self.faults.forbidden:
                self.stats["forbidden"] += 1
                return "forbidden"
            if method == "GET" and self.faults.slow_gets.get(key, 0) > 0:
                self.faults.slow_gets[key] -= 1
                self.stats["errors"] += 1
                return "error"
            roll = self._rng.random()
            if roll < self.faults.error_rate:
                self.stats["errors"] += 1
                return "error"
            if roll < self.faults.error_rate + self.faults.reset_rate:
                self.stats["resets"] += 1
                return "reset-early" if self._rng.random() < 0.5 or method == "HEAD" else "reset-body"
            return "forward"

    def _decide_write(self, key: str) -> str:
        """What happens to one write (PUT, POST, DELETE) of ``key``; called holding the lock."""
        faults = self.faults
        stall = next((end for end in faults.stalled_writes if key.endswith(end)), None)
        if stall is not None:
            return f"stall:{faults.stalled_writes.pop(stall)}"
        drop = next((end for end in faults.dropped_writes if key.endswith(end)), None)
        if drop is not None:
            return f"drop:{faults.dropped_writes.pop(drop)}"
        held = next((s for part, s in faults.writes_stalling_within.items() if part in key), None)
        if held is not None:
            return f"stall:{held}"
        if (any(part in key for part in faults.writes_failing_within)
                or any(key.endswith(end) for end in faults.failing_writes)
                or (faults.write_error_rate and self._rng.random() < faults.write_error_rate)):
            self.stats["write_errors"] += 1
            return "error"
        return "forward"

    def finished(self, method: str, path: str) -> None:
        """A request has been answered (or dropped)."""
        with self._lock:
            key = _key(path)
            if method == "HEAD":
                self._heads_open[key] = max(0, self._heads_open.get(key, 0) - 1)
            if method == "GET":
                self.gets_open = max(0, self.gets_open - 1)
            answered = getattr(self._request, "from_start", None)
            if method == "GET" and answered is not None:
                self._from_start_open.get(answered[0], set()).discard(answered[1])
                self._request.from_start = None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def second_proxy(endpoint: str) -> Iterator[FaultProxy]:
    """A fault proxy of its own in front of the server at ``endpoint``: one writer's own way to
    it, whose requests a test holds or fails without touching the other writers'."""
    where = urllib.parse.urlsplit(endpoint)
    proxy = FaultProxy((where.hostname or "127.0.0.1", where.port or 80), Faults())
    try:
        yield proxy
    finally:
        proxy.close()


def access_key_of(authorization: str) -> str | None:
    """The access key id an AWS Signature V4 ``Authorization`` header names, None if none."""
    if "Credential=" not in authorization:
        return None
    return authorization.split("Credential=", 1)[1].split("/", 1)[0]


def _key(path: str, body: bytes | None = None) -> str:
    """The "bucket/key" a request path names. A GCS JSON-API upload's path names only its bucket
    (``upload/storage/v1/b/<bucket>/o``): its object is named by the query's ``name`` or, for a
    multipart upload, by the metadata leading its body; such a write is "bucket/name" too, so
    that faults and counts find it by its key as they find an S3 PUT."""
    parts = urllib.parse.urlsplit(path)
    plain = urllib.parse.unquote(parts.path).lstrip("/")
    upload = GCS_UPLOAD.fullmatch(plain)
    if upload is None:
        return plain
    name = urllib.parse.parse_qs(parts.query).get("name", [""])[0] or _multipart_name(body or b"")
    return f"{upload.group(1)}/{name}" if name else plain


def _multipart_name(body: bytes) -> str:
    """The object name in a multipart upload's leading JSON metadata ("" when there is none)."""
    found = MULTIPART_NAME.search(body[:4096])
    return str(json.loads(found.group(1))) if found else ""


def _make_handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _relay(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            action = proxy.decide(self.command, self.path, self.headers.get("Range"), body)
            try:
                return self._respond(action, body)
            finally:
                proxy.finished(self.command, self.path)

        def _respond(self, action: str, body: bytes | None) -> None:
            if self.command in ("GET", "HEAD"):
                held = proxy.note_signature(self.headers, self.path)
                if held:
                    proxy.hold(held)
            if proxy.faults.latency_s:
                time.sleep(proxy.faults.latency_s)
            if action == "forbidden":
                return self._answer(403, DENIED_XML)
            if action == "error":
                return self._answer(503, SLOWDOWN_XML)
            if action == "reset-early":
                return self._reset()
            if action.startswith(("stall:", "drop:")):
                proxy.hold(float(action.split(":", 1)[1]))
                if action.startswith("drop:"):
                    return self._reset()
            status, headers, data = self._forward(body)
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            if self.command == "HEAD":
                self.end_headers()
                return None
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if action == "reset-body" and len(data) > 1:
                self.wfile.write(data[: len(data) // 2])
                return self._reset()
            self.wfile.write(data)
            return None

        def _forward(self, body: bytes | None) -> tuple[int, list[tuple[str, str]], bytes]:
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in REQUEST_DROPPED}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                keep = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_HEADERS]
                if self.command == "HEAD" and resp.getheader("Content-Length"):
                    keep.append(("Content-Length", resp.getheader("Content-Length") or "0"))
                return resp.status, keep, data
            finally:
                conn.close()

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body) if self.command != "HEAD" else 0))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _reset(self) -> None:
            """Abort the TCP connection with RST (SO_LINGER 0), as a failing load balancer does."""
            with contextlib.suppress(OSError):
                self.wfile.flush()
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            self.close_connection = True

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _relay

    return Handler


@dataclass
class S3Stack:
    """A moto S3 server and a fault proxy; ``options()`` gives fsspec storage options for either."""

    endpoint: str
    proxy: FaultProxy
    bucket: str
    server: Any = None
    key: str = "AKIAFAKEFAKEFAKE0001"
    secret: str = "fake-secret-do-not-leak-0001"

    def options(self, via_proxy: bool = True, **extra: Any) -> dict[str, Any]:
        """fsspec/s3fs storage options (dummy credentials, loopback endpoint)."""
        return {"endpoint_url": self.proxy.url if via_proxy else self.endpoint, "key": self.key,
                "secret": self.secret, "client_kwargs": {"region_name": "us-east-1"}, **extra}

    def fs(self) -> Any:
        """A direct (proxy-less) filesystem for setup: uploads are never fault-injected."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.options(via_proxy=False))

    def uri(self, key: str) -> str:
        """``key``'s s3:// URI (as cloud_fixtures.CloudStack.uri gives gs:// and az:// ones)."""
        return f"s3://{self.bucket}/{key}"

    def upload(self, local: str | Path, key: str | None = None) -> str:
        """Upload a local file; returns its s3:// URI."""
        key = key or f"{uuid.uuid4().hex[:8]}/{Path(local).name}"
        self.fs().put_file(str(local), f"{self.bucket}/{key}")
        return self.uri(key)

    def upload_folder(self, local: str | Path, key: str) -> str:
        """Upload a folder (a DICOM series, an OME-Zarr image) under ``key``; returns its s3:// URI."""
        self.fs().put(str(local), f"{self.bucket}/{key}", recursive=True)
        return self.uri(key)

    def upload_bytes(self, data: bytes, key: str) -> str:
        self.fs().pipe_file(f"{self.bucket}/{key}", data)
        return self.uri(key)

    def make_public(self, uri: str) -> None:
        """Allow anonymous reads of one object (for plain http(s):// and ``anon`` tests)."""
        key = uri.removeprefix(f"s3://{self.bucket}/")
        self.fs().call_s3("put_object_acl", Bucket=self.bucket, Key=key, ACL="public-read")

    def http_url(self, uri: str) -> str:
        """The object's plain HTTP URL through the proxy (call ``make_public`` first)."""
        return f"{self.proxy.url}/{uri.removeprefix('s3://')}"

    def close(self) -> None:
        self.proxy.close()
        if self.server is not None:
            self.server.stop()


def start_s3_stack(bucket: str = "slides") -> S3Stack:
    """Start moto on a free loopback port, a fault proxy in front of it, and create ``bucket``."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    stack = S3Stack(f"http://{host}:{port}", FaultProxy((host, port)), bucket, server)
    stack.fs().call_s3("create_bucket", Bucket=bucket)  # us-east-1: no location constraint
    return stack


@pytest.fixture(scope="session")
def s3_stack() -> Iterator[S3Stack]:
    """One moto server and proxy for the whole session."""
    stack = start_s3_stack()
    yield stack
    stack.close()


@pytest.fixture
def s3(s3_stack: S3Stack) -> Iterator[S3Stack]:
    """The session's stack with the proxy's faults and counters reset around each test."""
    s3_stack.proxy.reset()
    yield s3_stack
    s3_stack.proxy.reset()


def write_pyramid_tiff(path: str | Path, width: int = 3000, height: int = 2200, tile: int = 256,
                       levels: int = 3, seed: int = 0, quality: int = 90) -> Path:
    """A tiled, JPEG-compressed RGB pyramid (SubIFDs) with tissue-like texture."""
    import tifffile

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 90 * np.sin(xx / (37 + 9 * c) + yy / (53 + 7 * c) + c) for c in range(3)], -1)
    image = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    path = Path(path)
    opts: dict[str, Any] = {"tile": (tile, tile), "compression": "jpeg", "compressionargs": {"level": quality},
            "photometric": "rgb"}
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, subifds=levels - 1, resolution=(1e4 / 0.5, 1e4 / 0.5),
                  resolutionunit="CENTIMETER", **opts)
        for level in range(1, levels):
            factor = 2 ** level
            small = image[: height // factor * factor, : width // factor * factor]
            small = small.reshape(height // factor, factor, width // factor, factor, 3).mean((1, 3))
            tif.write(small.astype(np.uint8), subfiletype=1, **opts)
    return path
