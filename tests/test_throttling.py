"""A server that throttles (S3's 503 SlowDown, 429 Too Many Requests), met by the real range
readers: each throttled retry backs off for seconds, not milliseconds, waits what the answer's
Retry-After asks (within the policy's bound), is counted, and a server that never stops
throttling fails the read in bounded time with a message that names the object and says so."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import pytest
from conftest import outcome_within
from http_servers import MisbehavingServer
from s3_fixtures import SLOWDOWN_XML

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputError
from gpubatch.io.retry import RetryPolicy
from gpubatch.io.storage import open_ranges, stat

DATA = bytes(range(256)) * 256
SIGNED = "?X-Amz-Signature=deadbeefcafe0123456789&X-Amz-Expires=600"
S3_OPTIONS = {"key": "AKIAFAKEFAKEFAKE0009", "secret": "not-a-real-secret-9",
              "client_kwargs": {"region_name": "us-east-1"}}
#: (range_reader, how the object is named): s3fs and obstore's S3 store, fsspec's HTTP reader
#: (a presigned URL) and obstore's HTTP store
CLIENTS = [("fsspec", "s3"), ("obstore", "s3"), ("fsspec", "presigned"), ("obstore", "http")]


@pytest.fixture
def server() -> Iterator[MisbehavingServer]:
    srv = MisbehavingServer(DATA)
    srv.fail_body = SLOWDOWN_XML
    yield srv
    srv.close()


def target(server: MisbehavingServer, how: str, name: str) -> tuple[str, dict[str, Any]]:
    """(URI, storage options) of object ``name`` on ``server``, named as ``how`` says."""
    if how == "s3":
        return f"s3://bucket/slides/{name}", {**S3_OPTIONS, "endpoint_url": server.url}
    return f"{server.url}/slides/{name}{SIGNED if how == 'presigned' else ''}", {}


def timed_read(uri: str, options: dict[str, Any], policy: RetryPolicy, clocks: StageClocks,
               limit_s: float = 20.0) -> tuple[Any, float]:
    """(the bytes [1000, 5000) or the exception, seconds it took), waited for at most ``limit_s``."""
    def read() -> Any:
        with open_ranges(uri, options, clocks, policy) as reader:
            return reader.fetch(1000, 5000)

    t0 = time.monotonic()
    got = outcome_within(read, limit_s, f"the read of {uri} was")
    return got, time.monotonic() - t0


@pytest.mark.parametrize(("status", "client", "how"), [(503, "fsspec", "s3"), (429, "fsspec", "s3"),
                                                       (503, "fsspec", "presigned"), (429, "fsspec", "presigned")])
def test_a_throttled_read_waits_what_retry_after_asks_then_succeeds(
        server: MisbehavingServer, status: int, client: str, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUBATCH_RANGE_READER", client)
    server.fail_first, server.fail_status, server.fail_headers = 2, status, {"Retry-After": "1"}
    uri, options = target(server, how, "a.svs")
    clocks = StageClocks()
    got, took = timed_read(uri, options, RetryPolicy(attempts=5, base_s=0.01), clocks)
    assert got == DATA[1000:5000], got
    gaps = [b - a for a, b in zip(server.arrivals, server.arrivals[1:], strict=False)]
    assert took >= 2.0 and min(gaps[:2]) >= 1.0, (took, gaps)
    assert clocks.counters["storage.retries"] == 2 and clocks.counters["storage.throttled"] == 2


@pytest.mark.parametrize(("client", "how"), [("obstore", "s3"), ("obstore", "http")])
def test_a_throttled_read_backs_off_for_seconds_where_no_retry_after_is_seen(
        server: MisbehavingServer, client: str, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # obstore's errors carry no headers: the throttled backoff (1 s at first by default, halved
    # at the least), not the 50 ms of a dropped connection's, spaces the retries
    monkeypatch.setenv("GPUBATCH_RANGE_READER", client)
    server.fail_first, server.fail_headers = 2, {"Retry-After": "1"}
    uri, options = target(server, how, "b.svs")
    clocks = StageClocks()
    got, took = timed_read(uri, options, RetryPolicy(attempts=5), clocks)
    assert got == DATA[1000:5000], got
    assert took >= 1.5, took  # U(0.5, 1) then U(1, 2)
    assert clocks.counters["storage.retries"] == 2 and clocks.counters["storage.throttled"] == 2


@pytest.mark.parametrize(("status", "how"), [(503, "s3"), (429, "s3"), (503, "http"), (429, "http")])
def test_obstores_throttled_retries_back_off_up_to_the_policys_bound(
        server: MisbehavingServer, status: int, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """obstore's errors carry the answer's status and body, never its headers, so a Retry-After
    (here an hour) is not seen: its throttled retries take the throttled backoff, which the
    policy's max_wait_s (run.storage_max_wait_s) bounds as it bounds a Retry-After that fsspec
    reads. Each wait the reader asks for is the policy's own, recorded: U(max/2, max) here."""
    monkeypatch.setenv("GPUBATCH_RANGE_READER", "obstore")
    server.fail_first, server.fail_status, server.fail_headers = 2, status, {"Retry-After": "3600"}
    waits: list[float] = []

    class Recorded(RetryPolicy):
        def delay_for(self, attempt: int, errors: Any) -> float:
            waits.append(super().delay_for(attempt, errors))
            return waits[-1]

    uri, options = target(server, how, f"bound-{status}.svs")
    clocks = StageClocks()
    got, _ = timed_read(uri, options, Recorded(attempts=4, throttle_base_s=30.0, max_wait_s=0.3), clocks)
    assert got == DATA[1000:5000], got
    assert len(waits) == 2 and all(0.15 <= w <= 0.3 for w in waits), waits
    assert clocks.counters["storage.throttled"] == 2


@pytest.mark.parametrize(("client", "how"), CLIENTS)
def test_a_server_that_throttles_forever_fails_the_read_in_bounded_time(
        server: MisbehavingServer, client: str, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUBATCH_RANGE_READER", client)
    server.fail_first, server.fail_headers = 10**6, {"Retry-After": "1"}
    uri, options = target(server, how, "c.svs")
    clocks = StageClocks()
    got, took = timed_read(uri, options, RetryPolicy(attempts=3, base_s=0.02), clocks)
    assert isinstance(got, InputError) and got.retryable, got
    message = str(got)
    assert "c.svs" in message and "throttled" in message and "(503" in message, message
    assert how != "s3" or "(503 SlowDown)" in message, message  # S3's error code, where it is read
    assert "deadbeefcafe" not in message and "not-a-real-secret" not in message
    assert took < 8.0 and clocks.counters["storage.throttled"] == 2


def test_a_retry_after_longer_than_the_policy_allows_is_cut_to_its_bound(
        server: MisbehavingServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUBATCH_RANGE_READER", "fsspec")
    server.fail_first, server.fail_status, server.fail_headers = 1, 429, {"Retry-After": "3600"}
    uri, options = target(server, "presigned", "d.svs")
    got, took = timed_read(uri, options, RetryPolicy(attempts=3, max_wait_s=0.5), StageClocks())
    assert got == DATA[1000:5000] and took < 3.0, (got, took)


def test_a_throttled_size_asked_again_after_the_http_date_retry_after(server: MisbehavingServer) -> None:
    # a presigned URL's size (fsspec's HEAD, then a GET when that fails: one attempt, two
    # requests): Retry-After as an HTTP-date, 1-2 s ahead
    when = datetime.now(timezone.utc) + timedelta(seconds=2)
    server.fail_first, server.fail_headers = 2, {"Retry-After": format_datetime(when, usegmt=True)}
    clocks = StageClocks()
    t0 = time.monotonic()
    assert stat(f"{server.url}/slides/e.svs{SIGNED}", {}, RetryPolicy(attempts=3, base_s=0.01), clocks)["size"] == len(DATA)
    assert time.monotonic() - t0 >= 0.9 and clocks.counters["storage.throttled"] == 1


def test_retry_after_is_read_as_seconds_or_an_http_date() -> None:
    from gpubatch.io.retry import parse_retry_after

    assert parse_retry_after("2") == 2.0 and parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("-3") == 0.0 and parse_retry_after("soon") is None
    ahead = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 28 <= (parse_retry_after(ahead) or 0) <= 30
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_the_run_section_bounds_each_wait() -> None:
    import pydantic

    from gpubatch.io.retry import policy_for
    from gpubatch.spec import RunSpec

    policy = policy_for(RunSpec.model_validate({"storage_attempts": 7, "storage_max_wait_s": 2}))
    assert (policy.attempts, policy.max_wait_s) == (7, 2.0)
    assert policy_for(RunSpec()).max_wait_s == 30.0
    with pytest.raises(pydantic.ValidationError, match="storage_max_wait_s"):
        RunSpec.model_validate({"storage_max_wait_s": 0})
    throttled = OSError("SlowDown")
    throttled.__cause__ = type("ClientError", (Exception,), {"response": {
        "Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503,
                                                            "HTTPHeaders": {"retry-after": "120"}}}})()
    assert policy.delay(0, throttled) == 2.0 and policy.delay(4, throttled) == 2.0
