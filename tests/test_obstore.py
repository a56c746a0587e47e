"""obstore behind the storage entry point: which URIs it serves, credentials, retries, errors,
object identity, and forking, against a real S3 server (moto) behind the fault proxy.

The conformance suite (tests/test_conformance_ranges.py) holds the reads themselves to
RangeReaderTests; this module holds what is particular to choosing and running obstore.
"""

from __future__ import annotations

import multiprocessing
import os
import uuid
from typing import Any

import pytest
from s3_fixtures import S3Stack

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputError
from gpubatch.io import listing, storage_profile
from gpubatch.io import obstore as obstore_io
from gpubatch.io.retry import RetryPolicy, is_transient
from gpubatch.io.storage import open_ranges, stat
from gpubatch.io.storage_profile import configure_storage

pytest_plugins = ["s3_fixtures"]

DATA = bytes(range(256)) * 16384  # 4 MiB
FAST = RetryPolicy(attempts=6, base_s=0.001, cap_s=0.01)


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch: pytest.MonkeyPatch) -> Any:
    for name in list(os.environ):
        if name.startswith("AWS_") or name == "GPUBATCH_RANGE_READER":
            monkeypatch.delenv(name)
    yield
    configure_storage(None)


@pytest.fixture()
def uri(s3: S3Stack) -> str:
    return s3.upload_bytes(DATA, f"obstore/{uuid.uuid4().hex}.bin")


def _client(uri: str, options: dict[str, Any] | None = None) -> str:
    with open_ranges(uri, options) as reader:
        return reader.client


def test_obstore_serves_what_it_can_serve_exactly_and_fsspec_the_rest(s3: S3Stack, uri: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    s3.make_public(uri)
    assert _client(uri, s3.options()) == "obstore"
    assert _client(s3.http_url(uri)) == "obstore"
    # a presigned URL's query, credentials in a URL, options obstore does not take, memory://
    assert _client(s3.http_url(uri) + "?X-Amz-Signature=abc") == "fsspec"
    assert _client(s3.http_url(uri).replace("http://", "http://user:pw@")) == "fsspec"
    assert _client(uri, s3.options(client_kwargs={"region_name": "us-east-1", "verify": False})) == "fsspec"
    assert _client(uri, s3.options(s3_additional_kwargs={"RequestPayer": "requester"})) == "fsspec"
    assert _client("memory://somewhere/x.bin") == "fsspec"
    with open_ranges(uri, s3.options(client_kwargs={"region_name": "us-east-1", "verify": False})) as reader:
        assert reader.read_ranges([(10, 20)]) == [DATA[10:30]]
    configure_storage({"range_reader": "fsspec"})
    assert _client(uri, s3.options()) == "fsspec"
    configure_storage({"range_reader": "obstore"})
    with pytest.raises(InputError, match="range_reader is obstore.*verify"):
        open_ranges(uri, s3.options(client_kwargs={"region_name": "us-east-1", "verify": False}))
    configure_storage(None)
    monkeypatch.setenv("GPUBATCH_RANGE_READER", "fsspec")
    assert _client(uri, s3.options()) == "fsspec"


def test_every_retry_is_gpubatch_s_and_counted(s3: S3Stack, uri: str) -> None:
    """obstore's own retries are off: each failed request (503 or a reset connection) is exactly
    one retry in gpubatch's counters, and the bytes still arrive whole."""
    s3.proxy.configure(error_rate=0.25, reset_rate=0.1, seed=11)
    clocks = StageClocks()
    with open_ranges(uri, s3.options(), clocks, FAST) as reader:
        assert reader.client == "obstore"
        for i in range(40):
            assert reader.fetch(i * 9000, i * 9000 + 5000) == DATA[i * 9000 : i * 9000 + 5000]
    stats = s3.proxy.stats
    failed = stats["errors"] + stats["resets"]
    assert failed > 5 and stats["errors"] > 0 and stats["resets"] > 0
    assert clocks.counters["storage.retries"] == failed
    assert stats["requests"] == 40 + failed
    assert clocks.counters["storage.requests"] == 40 and clocks.counters["storage.client.obstore"] == 1


def test_many_ranges_are_in_flight_at_once_and_counted(s3: S3Stack, uri: str) -> None:
    s3.proxy.configure(latency_s=0.1)
    clocks = StageClocks()
    ranges = [(i * 150_000, 1000) for i in range(24)]  # far apart: 24 requests
    with open_ranges(uri, s3.options(), clocks) as reader:
        import time

        t0 = time.perf_counter()
        assert reader.read_ranges(ranges) == [DATA[o : o + n] for o, n in ranges]
        elapsed = time.perf_counter() - t0
    assert elapsed < 1.2, f"24 requests of 100 ms took {elapsed:.2f} s: not concurrent"
    assert clocks.counters["storage.requests"] == 24 and clocks.peaks["storage.in_flight"] == 24
    assert clocks.counters["storage.request_s"] >= 24 * 0.1


def _signed_with(s3: S3Stack) -> tuple[str, str | None]:
    last = s3.proxy.signatures[-1]
    key = last["authorization"].split("Credential=", 1)[1].split("/", 1)[0]
    return key, last.get("x-amz-security-token")


def test_credentials_resolve_as_with_fsspec(s3: S3Stack, uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The AWS_* environment (endpoint included), the profile's storage options, then the job's:
    each signs the requests, and explicit keys never pick up the environment's session token."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ENVKEYENVKEY0001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-0001")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "env-session-token-0001")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.proxy.url)
    with open_ranges(uri) as reader:
        assert reader.client == "obstore" and reader.fetch(0, 10) == DATA[:10]
    assert _signed_with(s3) == ("ENVKEYENVKEY0001", "env-session-token-0001")
    configure_storage({"storage": {"key": "PROFILEKEY00001", "secret": "profile-secret-1"}})
    with open_ranges(uri) as reader:
        assert reader.fetch(0, 10) == DATA[:10]
    assert _signed_with(s3) == ("PROFILEKEY00001", None)
    with open_ranges(uri, {"key": "JOBKEYJOBKEY0001", "secret": "job-secret-0001", "token": "job-token"}) as reader:
        assert reader.fetch(0, 10) == DATA[:10]
    assert _signed_with(s3) == ("JOBKEYJOBKEY0001", "job-token")


def test_failures_are_clear_redacted_and_not_retried_when_permanent(s3: S3Stack, uri: str) -> None:
    s3.proxy.configure(forbidden={uri.removeprefix("s3://")})
    clocks = StageClocks()
    with pytest.raises(InputError) as denied, open_ranges(uri, s3.options(), clocks, FAST) as reader:
        reader.read_ranges([(0, 10)])
    assert "access denied (403)" in denied.value.message and not denied.value.retryable
    with pytest.raises(InputError, match="object not found"):
        stat(f"s3://{s3.bucket}/obstore/absent.bin", s3.options(), FAST, clocks)
    assert clocks.counters.get("storage.retries", 0) == 0
    for text in (denied.value.message, str(denied.value)):
        assert s3.secret not in text and s3.key not in text and "Debug source" not in text


def test_transient_obstore_errors_are_recognised(s3: S3Stack, uri: str) -> None:
    """The raw exceptions obstore raises for a 503 and a reset connection are transient; 403 not."""
    import obstore
    from obstore.store import S3Store

    store = S3Store(s3.bucket, config={"endpoint": s3.proxy.url, "region": "us-east-1",
                                       "access_key_id": s3.key, "secret_access_key": s3.secret},
                    client_options={"allow_http": True}, retry_config={"max_retries": 0})
    key = uri.split("/", 3)[3]
    for faults, transient in (({"error_rate": 1.0}, True), ({"reset_rate": 1.0}, True),
                              ({"forbidden": {uri.removeprefix("s3://")}}, False)):
        s3.proxy.reset()
        s3.proxy.configure(**faults)
        with pytest.raises(Exception) as info:
            obstore.get_range(store, key, start=0, end=10)
        assert is_transient(info.value) is transient, (faults, info.value)


def test_stat_gives_the_same_identity_as_fsspec(s3: S3Stack, uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--resume`` compares identities recorded by one run with another's: obstore's HEAD must
    give what s3fs gives (size, ETag, mtime in the same form)."""
    through_obstore = stat(uri, s3.options())
    monkeypatch.setenv("GPUBATCH_RANGE_READER", "fsspec")
    through_fsspec = stat(uri, s3.options())
    assert through_obstore == {**through_fsspec, "type": "file"}
    assert through_obstore["size"] == len(DATA) and through_obstore["etag"]


def _read_in_child(uri: str, options: dict[str, Any], queue: Any) -> None:
    with open_ranges(uri, options) as reader:
        queue.put((reader.client, reader.fetch(100, 200)))


def test_a_fork_after_obstore_ran_reads_through_fsspec(s3: S3Stack, uri: str) -> None:
    """obstore hangs in a fork()ed child once its runtime started in the parent: such a child
    falls back to fsspec, and reads, within its time limit."""
    with open_ranges(uri, s3.options()) as reader:
        assert reader.client == "obstore" and reader.fetch(0, 5) == DATA[:5]
    assert obstore_io._used
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(uri, s3.options(), queue))
    child.start()
    try:
        client, data = queue.get(timeout=60)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    assert (client, data) == ("fsspec", DATA[100:200]) and child.exitcode == 0
    assert storage_profile.range_reader_choice() == "auto" and obstore_io.usable()  # this process still may


@pytest.mark.parametrize("name", ["q?x=1.bin", "h#1.bin", "a b+c%2Bd é.bin"])
def test_a_key_with_url_delimiters_is_the_object_fsspec_lists(s3: S3Stack, name: str) -> None:
    # '?' and '#' are a key's own characters in s3:// (s3fs and a listing say so), not a query
    uri = s3.upload_bytes(DATA[:5000], f"obstore/{uuid.uuid4().hex[:6]}/{name}")
    assert listing.expand_uris([uri.rsplit("/", 1)[0] + "/*.bin"], s3.options()) == [uri]
    with open_ranges(uri, s3.options(), policy=FAST) as reader:
        assert reader.client == "obstore"
        assert (reader.size(), reader.fetch(100, 200)) == (5000, DATA[100:200])
    assert stat(uri, s3.options())["size"] == 5000
