"""Servers that misbehave at the HTTP level, met by the real range readers (obstore and fsspec):
one that never answers, one that stalls mid-body, one that ignores Range, one that answers another
range than asked. Every wait is bounded and every answer that is not the bytes asked for fails
the read with a message that names the object, never its signature."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import outcome_within
from http_servers import MisbehavingServer

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputError
from gpubatch.io import stage_cache, storage
from gpubatch.io.retry import RangesIgnored, RetryPolicy
from gpubatch.io.stage_cache import StageCache
from gpubatch.io.storage import open_ranges

DATA = bytes(range(256)) * 1024
#: a presigned URL's query: obstore refuses a URL with one, so fsspec reads it
SIGNED = "?X-Amz-Signature=deadbeefcafe0123456789&X-Amz-Expires=600"


@pytest.fixture
def server() -> Iterator[MisbehavingServer]:
    srv = MisbehavingServer(DATA)
    yield srv
    srv.close()


def read_bounded(url: str, start: int, stop: int, limit_s: float = 30.0) -> Any:
    """The bytes (or the exception) of one read of [start, stop), waited for at most ``limit_s``."""
    def read() -> Any:
        with open_ranges(url, {}, policy=RetryPolicy(attempts=2, base_s=0.01)) as reader:
            return reader.fetch(start, stop)

    return outcome_within(read, limit_s, f"the read of {url} was")


@pytest.mark.parametrize("mode", ["silent", "stall"])
def test_a_presigned_url_whose_server_stops_answering_fails_within_the_read_timeout(
        server: MisbehavingServer, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "HTTP_READ_TIMEOUT_S", 1.0)
    server.mode = mode
    got = read_bounded(f"{server.url}/slides/a.svs{SIGNED}", 1000, 5000)
    assert isinstance(got, InputError) and got.retryable, got
    assert "a.svs" in str(got) and "deadbeefcafe" not in str(got)


@pytest.mark.parametrize("client", ["obstore", "fsspec"])
def test_a_server_that_ignores_range_is_named_so(server: MisbehavingServer, client: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUBATCH_RANGE_READER", client)
    server.mode = "whole"
    got = read_bounded(f"{server.url}/slides/b.svs", 1000, 5000)
    assert isinstance(got, RangesIgnored) and not got.retryable, got
    assert "b.svs" in str(got) and "ignores byte ranges" in str(got)


@pytest.mark.parametrize("client", ["obstore", "fsspec"])
def test_staging_downloads_whole_an_object_whose_server_ignores_range(
        server: MisbehavingServer, client: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUBATCH_RANGE_READER", client)
    monkeypatch.setattr(stage_cache, "CHUNK_BYTES", 64 << 10)  # the object is 4 chunks
    server.mode = "whole"
    cache = StageCache(str(tmp_path / "stage"))
    with cache.open(f"{server.url}/slides/c.svs", {}, StageClocks(), RetryPolicy(attempts=2, base_s=0.01)) as staged:
        assert Path(staged.path).read_bytes() == DATA


def test_a_presigned_url_answered_with_another_range_than_asked_fails_the_read(server: MisbehavingServer) -> None:
    server.mode = "shifted"
    got = read_bounded(f"{server.url}/slides/d.svs{SIGNED}", 1000, 5000)
    assert isinstance(got, InputError) and not got.retryable, got
    assert "bytes 0-3999" in str(got) and "deadbeefcafe" not in str(got)


def test_a_range_ignored_is_refused_before_its_whole_body_is_read(server: MisbehavingServer) -> None:
    server.data = DATA * 64  # 16 MiB: the answer's body is left unread, not handed on
    server.mode = "whole"
    got = read_bounded(f"{server.url}/slides/e.svs{SIGNED}", 0, 10)
    assert isinstance(got, RangesIgnored), got
    assert "200" in str(got)


def test_an_s3_endpoint_that_ignores_range_is_named_so_and_staged_whole(
        server: MisbehavingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # an S3-compatible gateway: obstore's S3 client words its refusal otherwise than its HTTP one
    monkeypatch.setattr(stage_cache, "CHUNK_BYTES", 64 << 10)
    server.mode = "whole"
    options = {"endpoint_url": server.url, "key": "AKIAFAKEFAKEFAKE0002", "secret": "not-a-real-secret",
               "client_kwargs": {"region_name": "us-east-1"}}
    with open_ranges("s3://bucket/slides/f.svs", options, policy=RetryPolicy(attempts=2, base_s=0.01)) as reader:
        assert reader.client == "obstore"
        with pytest.raises(RangesIgnored, match="f.svs.*ignores byte ranges"):
            reader.fetch(1000, 5000)
    cache = StageCache(str(tmp_path / "stage"))
    with cache.open("s3://bucket/slides/f.svs", options, StageClocks(), RetryPolicy(attempts=2, base_s=0.01)) as staged:
        assert Path(staged.path).read_bytes() == DATA


STAGE_UNDER_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
sys.path.insert(0, "tests")
from pathlib import Path
from http_servers import MisbehavingServer
from gpubatch.core.clocks import StageClocks
from gpubatch.io import stage_cache
from gpubatch.io.retry import RetryPolicy
data = bytes(range(256)) * 1024
server = MisbehavingServer(data, sys.argv[2])
stage_cache.CHUNK_BYTES = 64 << 10
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit is cut short, then EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
cache = stage_cache.StageCache(sys.argv[1])
try:
    with cache.open(server.url + "/slides/g.svs", {}, StageClocks(), RetryPolicy(attempts=1)) as staged:
        print("staged", Path(staged.path).stat().st_size)
except Exception as exc:
    print("failed", exc)
"""


@pytest.mark.parametrize("mode", ["ok", "whole"])
def test_a_staged_copy_cut_short_by_the_disk_fails_its_download(tmp_path: Path, mode: str) -> None:
    # a full disk (or a file size limit, here) cuts a write short without an error: the rest of
    # that chunk must be written or the download fail, never a copy with bytes missing
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", STAGE_UNDER_A_FILE_SIZE_LIMIT, str(tmp_path / "stage"), mode],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("failed") and "too large" in proc.stdout, proc.stdout


@pytest.mark.parametrize("client", ["obstore", "fsspec"])
@pytest.mark.parametrize("mode", ["silent", "stall"])
def test_an_s3_read_that_times_out_names_the_setting_that_bounds_it(
        server: MisbehavingServer, client: str, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUBATCH_RANGE_READER", client)
    server.mode = mode
    options = {"endpoint_url": server.url, "key": "AKIAFAKEFAKEFAKE0003", "secret": "not-a-real-secret",
               "client_kwargs": {"region_name": "us-east-1"}, "config_kwargs": {"read_timeout": 1}}
    with (open_ranges("s3://bucket/slides/h.svs", options, policy=RetryPolicy(attempts=2, base_s=0.01)) as reader,
          pytest.raises(InputError) as caught):
        reader.fetch(1000, 5000)
    assert caught.value.retryable and "h.svs" in str(caught.value)
    assert "timed out" in str(caught.value) and "config_kwargs.read_timeout" in str(caught.value), caught.value


@pytest.mark.parametrize("client", ["obstore", "fsspec"])
def test_auto_stages_a_slide_whose_server_ignores_range(tmp_path: Path, client: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # input.access auto streams a TIFF; its server ignoring Range, it falls back to a staged copy
    from s3_fixtures import write_pyramid_tiff

    from gpubatch.sources.slides.open import open_slide, open_slide_input, release

    monkeypatch.setenv("GPUBATCH_RANGE_READER", client)
    local = write_pyramid_tiff(tmp_path / "slide.tiff", width=900, height=700, levels=2)
    server = MisbehavingServer(local.read_bytes(), "whole")
    uri = f"{server.url}/slides/slide.tiff"
    clocks = StageClocks()
    try:
        backend = open_slide_input(uri, clocks, access="auto", options={},
                                   policy=RetryPolicy(attempts=2, base_s=0.01))
        try:
            assert backend.access == "stage"  # type: ignore[attr-defined]
            assert clocks.counters["storage.stream_fallbacks"] == 1
            assert backend.info.level_dimensions == open_slide(str(local), StageClocks()).info.level_dimensions
        finally:
            backend.close()
            release(uri)
    finally:
        server.close()


@pytest.mark.parametrize("access", ["auto", "stage"])
def test_a_presigned_url_whose_signature_expired_is_denied_not_missing(
        server: MisbehavingServer, access: str) -> None:
    from gpubatch.sources.slides.open import open_slide_input

    server.fail_first, server.fail_status = 1000, 403
    with pytest.raises(InputError) as caught:
        open_slide_input(f"{server.url}/slides/i.tiff{SIGNED}", StageClocks(), access=access, options={},
                         policy=RetryPolicy(attempts=5, base_s=0.01))
    message = str(caught.value)
    assert "access denied (403): the URL's signature" in message and "deadbeefcafe" not in message, message
    assert not caught.value.retryable and server.requests <= 4  # not retried


def test_a_presigned_url_s_size_is_asked_again_after_a_503(server: MisbehavingServer) -> None:
    server.fail_first, server.fail_status = 2, 503
    assert storage.stat(f"{server.url}/slides/j.tiff{SIGNED}", {}, RetryPolicy(attempts=5, base_s=0.01))["size"] == len(DATA)


def test_an_object_staged_whole_is_written_as_it_arrives_not_held_in_memory(
        server: MisbehavingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tracemalloc

    monkeypatch.setattr(stage_cache, "CHUNK_BYTES", 1 << 20)
    server.data = DATA * 128  # 32 MiB, from a server that ignores Range
    server.mode = "whole"
    cache = StageCache(str(tmp_path / "stage"))
    tracemalloc.start()
    try:
        with cache.open(f"{server.url}/slides/k.svs", {}, StageClocks(), RetryPolicy(attempts=2, base_s=0.01)) as staged:
            peak = tracemalloc.get_traced_memory()[1]
            assert Path(staged.path).stat().st_size == len(server.data)
    finally:
        tracemalloc.stop()
    assert peak < 12 << 20, f"{peak >> 20} MiB held at once"


@pytest.mark.parametrize(("client", "query"), [("auto", ""), ("fsspec", ""), ("auto", SIGNED)])
def test_a_whole_object_read_from_a_server_that_ignores_range_is_its_answer(
        server: MisbehavingServer, client: str, query: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # a .fai, a .gzi, a BED file: read whole, for which a 200 is the very answer asked for
    monkeypatch.setenv("GPUBATCH_RANGE_READER", client)
    server.mode = "whole"
    with open_ranges(f"{server.url}/ref/genome.fa.fai{query}", {}, policy=RetryPolicy(attempts=2, base_s=0.01)) as reader:
        assert reader.fetch(0, reader.size()) == DATA
        with pytest.raises(RangesIgnored):
            reader.fetch(0, 100)


@pytest.mark.parametrize("mode", ["shifted", "whole"])
def test_an_s3_endpoint_read_through_s3fs_is_checked_to_answer_the_range_asked(
        server: MisbehavingServer, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # range_reader fsspec (or an option obstore does not take) reads s3:// through s3fs, whose
    # _cat_file hands on any body: another range's bytes, or a whole object read into memory
    monkeypatch.setenv("GPUBATCH_RANGE_READER", "fsspec")
    server.mode = mode
    if mode == "whole":
        server.data = DATA * 64  # 16 MiB: refused on its status, its body left unread
    options = {"endpoint_url": server.url, "key": "AKIAFAKEFAKEFAKE0004", "secret": "not-a-real-secret",
               "client_kwargs": {"region_name": "us-east-1"}}
    with open_ranges("s3://bucket/slides/l.svs", options, policy=RetryPolicy(attempts=2, base_s=0.01)) as reader:
        assert reader.client == "fsspec"
        with pytest.raises(InputError) as caught:
            reader.fetch(1000, 5000)
    message = str(caught.value)
    assert not caught.value.retryable and "l.svs" in message and "not-a-real-secret" not in message
    if mode == "shifted":
        assert "asked bytes 1000-4999, answered bytes 0-3999" in message, message
    else:
        assert isinstance(caught.value, RangesIgnored) and "answered 200" in message, message


@pytest.mark.parametrize("mode", ["silent", "stall"])
def test_a_plain_url_read_by_obstore_from_a_server_that_stops_answering_fails_in_bounded_time(
        server: MisbehavingServer, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpubatch.io import obstore

    monkeypatch.setenv("GPUBATCH_RANGE_READER", "obstore")
    monkeypatch.setattr(obstore, "READ_TIMEOUT_S", 1.0)
    server.mode = mode
    got = read_bounded(f"{server.url}/slides/m.svs", 1000, 5000, limit_s=20)
    assert isinstance(got, InputError) and got.retryable, got
    assert "m.svs" in str(got) and "timed out" in str(got) and "a silence of 60 s" in str(got), got


def test_a_file_streamed_from_a_server_that_stops_answering_fails_in_bounded_time(
        server: MisbehavingServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # open_file's reads (a BED file, a FASTA) are fsspec's file's own requests, with library options
    monkeypatch.setattr(storage, "HTTP_READ_TIMEOUT_S", 1.0)
    server.mode = "silent"

    def read() -> bytes:
        with storage.open_file(f"{server.url}/ref/regions.bed") as f:
            return bytes(f.read())

    got = outcome_within(read, 20, "the streamed read was")
    assert isinstance(got, Exception) and "Timeout" in type(got).__name__, repr(got)


def test_a_file_streamed_from_a_throttling_server_is_not_called_missing(server: MisbehavingServer) -> None:
    # fsspec's HTTP exists() says False for a 503 (or a timeout): that read as "file not found"
    server.fail_first, server.fail_status, server.fail_headers = 10**6, 503, {"Retry-After": "0"}
    with pytest.raises(InputError) as caught, storage.open_file(f"{server.url}/ref/other.bed"):
        pass
    assert caught.value.retryable and "other.bed" in str(caught.value) and "503" in str(caught.value), caught.value
    server.fail_status = 404
    with pytest.raises(InputError, match="file not found"), storage.open_file(f"{server.url}/ref/missing.bed"):
        pass


AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@pytest.mark.parametrize("scheme", ["gs", "az"])
def test_a_gcs_or_azure_server_that_stops_answering_fails_within_the_read_timeout(
        server: MisbehavingServer, scheme: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """gcsfs's requests had no bound at all (its ``requests_timeout`` None is aiohttp's "none")
    and adlfs's downloads azure-core's 300 s of silence: a server that accepts and never answers
    held the read that long. Both now get the http(s) client's bounds (storage.HTTP_*_TIMEOUT_S,
    60 s of silence; 1 s here). fsspec reads them: obstore has its own bounds."""
    monkeypatch.setenv("GPUBATCH_RANGE_READER", "fsspec")
    monkeypatch.setattr(storage, "HTTP_READ_TIMEOUT_S", 1.0)
    server.mode = "silent"
    if scheme == "gs":
        uri, options = "gs://bucket/slides/g.svs", {"endpoint_url": server.url, "token": "anon"}
    else:
        uri = "az://container/slides/a.svs"
        options = {"connection_string": f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
                                        f"AccountKey={AZURITE_KEY};BlobEndpoint={server.url}/devstoreaccount1;"}

    def read() -> Any:
        with open_ranges(uri, options, policy=RetryPolicy(attempts=2, base_s=0.01)) as reader:
            return reader.fetch(1000, 5000)

    got = outcome_within(read, 30, f"the read of {uri} was")
    assert isinstance(got, InputError) and got.retryable, repr(got)
    assert uri.rsplit("/", 1)[1] in str(got), got
