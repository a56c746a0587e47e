"""Small HTTP servers on loopback for what S3 never answers: weak ETags, no Content-Length,
If-Match on a plain HTTP server."""

from __future__ import annotations

import time
from typing import Any


class FileServer:
    """A threaded HTTP/1.1 server on loopback for files held in memory: HEAD, GET and single
    byte ranges, answering each file's ``etag`` header as given (None: none) and, when
    ``lengths`` is off, no Content-Length (the body ends with the connection). Every request's
    method, path and If-Match header are kept; ``get_etags`` writes an object over between GETs.
    A request whose If-Match names another version than ``etag`` is answered 412, as RFC 9110
    asks (a weak ETag never matches); ``files`` and ``etag`` may be changed while it serves."""

    def __init__(self, files: dict[str, bytes], etag: str | None, lengths: bool = True):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.files, self.etag, self.lengths = files, etag, lengths
        #: the next GETs' ETags, one each (then ``etag``): an object written over after them
        self.get_etags: list[str] = []
        self.requests: list[tuple[str, str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if lengths else "HTTP/1.0"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
                self._answer(body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(body=True)

            def _precondition_failed(self) -> bool:
                """If-Match naming another version than the object's now (strong comparison)."""
                wanted = self.headers.get("If-Match")
                return bool(wanted) and (server.etag is None or server.etag.startswith("W/") or wanted != server.etag)

            def _answer(self, body: bool) -> None:
                server.requests.append((self.command, self.path, self.headers.get("If-Match")))
                data = server.files.get(self.path)
                if data is None or self._precondition_failed():
                    self.send_response(404 if data is None else 412)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                lo, hi, status = 0, len(data), 200
                wanted = self.headers.get("Range")
                if wanted and body:
                    a, _, b = wanted.removeprefix("bytes=").partition("-")
                    lo, hi, status = int(a), min(int(b) + 1 if b else len(data), len(data)), 206
                self.send_response(status)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {lo}-{hi - 1}/{len(data)}")
                etag = server.get_etags.pop(0) if body and server.get_etags else server.etag
                if etag is not None:
                    self.send_header("ETag", etag)
                if server.lengths:
                    self.send_header("Content-Length", str(hi - lo))
                self.send_header("Last-Modified", "Mon, 07 Dec 2026 10:00:00 GMT")
                self.end_headers()
                if body:
                    self.wfile.write(data[lo:hi])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        import threading

        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def count(self, method: str, path: str) -> int:
        return sum(1 for m, p, _ in self.requests if (m, p) == (method, path))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class MisbehavingServer:
    """A loopback HTTP/1.1 server for one in-memory object that misbehaves as ``mode`` says:
    ``silent`` accepts a GET and never answers it, ``stall`` sends half a body and then nothing
    (the connection held open), ``whole`` answers a Range request 200 with the whole object (a
    server without range support), ``shifted`` answers 206 with another range than asked (its
    Content-Range says which). HEAD is always answered truthfully; ``mode`` may be changed while
    it serves; ``fail_first`` requests are answered ``fail_status`` first (with ``fail_headers``
    and ``fail_body``: a throttling server's Retry-After and S3's SlowDown). Stalled handlers wait
    on ``release``, which :meth:`close` sets."""

    def __init__(self, data: bytes, mode: str = "ok"):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.data, self.mode, self.release = data, mode, threading.Event()
        #: the next this many requests (HEAD or GET) are answered ``fail_status``, with no body
        self.fail_first, self.fail_status, self.requests = 0, 503, 0
        self.fail_headers: dict[str, str] = {}
        self.fail_body = b""
        #: when each request arrived (time.monotonic), to measure how long a client backed off
        self.arrivals: list[float] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _failed(self) -> bool:
                server.requests += 1
                server.arrivals.append(time.monotonic())
                if server.fail_first <= 0:
                    return False
                server.fail_first -= 1
                body = server.fail_body if self.command != "HEAD" else b""
                self.send_response(server.fail_status)
                for name, value in server.fail_headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return True

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
                if self._failed():
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.data)))
                self.send_header("ETag", '"v1"')
                self.end_headers()

            def do_GET(self) -> None:  # noqa: N802
                if self._failed():
                    return
                if server.mode == "silent":
                    server.release.wait(120)
                    return
                lo, hi = server.asked(self.headers.get("Range"))
                if server.mode == "shifted":
                    lo, hi = 0, hi - lo
                whole = server.mode == "whole" or self.headers.get("Range") is None
                body = server.data if whole else server.data[lo:hi]
                self.send_response(200 if whole else 206)
                if not whole:
                    self.send_header("Content-Range", f"bytes {lo}-{hi - 1}/{len(server.data)}")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", '"v1"')
                self.end_headers()
                if server.mode == "stall":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    server.release.wait(120)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def asked(self, header: str | None) -> tuple[int, int]:
        """The [lo, hi) a Range header asks for (the whole object without one)."""
        if not header:
            return 0, len(self.data)
        a, _, b = header.removeprefix("bytes=").partition("-")
        return int(a), min(int(b) + 1 if b else len(self.data), len(self.data))

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
