"""gs:// and az:// through the storage entry point, against real emulators on loopback.

fake-gcs-server and Azurite (tests/cloud_fixtures.py), each behind the fault proxy, through both
range clients (obstore's GCS and Azure stores; gcsfs and adlfs): an object's identity, a missing
object's error, listings and globs, a reader pinned to one version, and the settings that point
gpubatch at an emulator. The reads themselves are held to RangeReaderTests in
tests/test_conformance_ranges.py; whole jobs are in tests/test_cloud_jobs.py.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from cloud_fixtures import AZURITE_KEY, CloudStack

from gpubatch.core.errors import InputChanged, InputError
from gpubatch.io.listing import expand_uris
from gpubatch.io.storage import input_changed, input_identity, open_ranges, stat

pytest_plugins = ["s3_fixtures", "cloud_fixtures"]
CLIENTS = ["obstore", "fsspec"]
DATA = bytes(range(256)) * 1024
#: a listing or a HEAD against a loopback emulator takes milliseconds; a client that waits on
#: something the emulator never answers (a retried probe) takes a minute
QUICK_S = 10.0


@pytest.fixture(params=CLIENTS)
def client(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("GPUBATCH_RANGE_READER", request.param)
    return str(request.param)


def _key(name: str) -> str:
    return f"{uuid.uuid4().hex[:8]}/{name}"


def test_stat_gives_size_etag_and_a_changed_identity(cloud: CloudStack, client: str) -> None:
    """What ``--resume`` and the worker's before-and-after check compare: the size and a strong
    ETag, the same from either client, and a different identity once the object is written over."""
    uri = cloud.upload_bytes(DATA, _key("a.bin"))
    started = time.monotonic()
    info = stat(uri, cloud.options())
    assert info["size"] == len(DATA) and info["type"] == "file" and info["etag"]
    assert not info["etag"].startswith(('"', "W/"))
    before = input_identity(uri, cloud.options())
    assert before == {"size": len(DATA), "etag": info["etag"], "mtime": info["mtime"]}
    assert input_changed(uri, before, cloud.options()) is None
    cloud.upload_bytes(DATA[::-1], uri.split("/", 3)[3])
    after = input_changed(uri, before, cloud.options())
    assert after is not None and after["size"] == len(DATA) and after["etag"] != before["etag"]
    assert time.monotonic() - started < QUICK_S


def test_both_clients_give_one_identity(cloud: CloudStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that read through obstore and one that read through fsspec (a fork's fallback, a
    changed ``range_reader``) record the same identity of one object, or ``--resume`` would take
    an unchanged input for a changed one."""
    uri = cloud.upload_bytes(DATA, _key("same.bin"))
    monkeypatch.setenv("GPUBATCH_RANGE_READER", "obstore")
    through_obstore = stat(uri, cloud.options())
    monkeypatch.setenv("GPUBATCH_RANGE_READER", "fsspec")
    through_fsspec = stat(uri, cloud.options())
    assert (through_obstore["size"], through_obstore["etag"]) == (through_fsspec["size"], through_fsspec["etag"])


def test_a_missing_object_is_named_without_credentials(cloud: CloudStack, client: str) -> None:
    """stat, a read and a glob's literal name: an InputError that names the URI and says not
    found, in which no key of the options appears (Azure's key rides in the connection string)."""
    uri = cloud.uri(_key("absent.tif"))
    for call in (lambda: stat(uri, cloud.options()),
                 lambda: open_ranges(uri, cloud.options()).read_ranges([(0, 10)])):
        with pytest.raises(InputError) as caught:
            call()
        text = str(caught.value)
        assert uri in text and "not found" in text and not caught.value.retryable, text
        assert AZURITE_KEY not in text and AZURITE_KEY[:20] not in text


def test_globs_list_the_matching_objects_under_the_pattern_s_scheme(cloud: CloudStack, client: str) -> None:
    """``gs://bucket/dir/*.tif`` and ``az://container/dir/*.tif``: the .tif objects directly
    under dir, sorted, spelled with the scheme the user wrote (outputs, the audit and --resume
    name inputs by these URIs), quickly."""
    folder = uuid.uuid4().hex[:8]
    for name in ("b.tif", "a.tif", "notes.txt", "deeper/c.tif"):
        cloud.upload_bytes(b"II*\x00" + name.encode(), f"{folder}/{name}")
    started = time.monotonic()
    got = expand_uris([cloud.uri(f"{folder}/*.tif")], cloud.options())
    assert got == [cloud.uri(f"{folder}/a.tif"), cloud.uri(f"{folder}/b.tif")]
    assert expand_uris([cloud.uri(f"{folder}/**/*.tif")], cloud.options())[-1] == cloud.uri(f"{folder}/deeper/c.tif")
    assert expand_uris([cloud.uri(f"{folder}/absent-*.tif")], cloud.options()) == []
    assert time.monotonic() - started < QUICK_S


def test_a_denied_object_names_its_cloud_s_settings(cloud: CloudStack, client: str) -> None:
    """A 403 says access denied, not retryable, and names where that cloud's credentials come
    from (it named the AWS_* environment for every scheme)."""
    key = _key("denied.bin")
    uri = cloud.upload_bytes(DATA, key)
    cloud.forbid(key)
    for call in (lambda: stat(uri, cloud.options()),
                 lambda: open_ranges(uri, cloud.options()).read_ranges([(0, 10)])):
        with pytest.raises(InputError) as caught:
            call()
        text = str(caught.value)
        assert "access denied" in text and not caught.value.retryable, text
        assert "AWS_" not in text and ("GOOGLE_APPLICATION_CREDENTIALS" if cloud.scheme == "gs" else "AZURE_STORAGE_") in text


def test_a_pinned_reader_refuses_an_object_written_over_between_its_reads(cloud: CloudStack) -> None:
    """obstore pins a reader to the ETag its first answer gave; a read after the object was
    written over is refused (Azurite answers the If-Match 412; fake-gcs-server ignores If-Match,
    and the answer's other ETag is refused instead) and retryable: the shard is read again."""
    key = _key("pinned.bin")
    uri = cloud.upload_bytes(DATA, key)
    with open_ranges(uri, cloud.options()) as reader:
        assert reader.client == "obstore"
        assert reader.read_ranges([(0, 100)]) == [DATA[:100]]
        pinned = reader.version()
        assert pinned == stat(uri, cloud.options())["etag"]
        cloud.upload_bytes(DATA[::-1], key)
        with pytest.raises(InputChanged, match="changed while it was read") as caught:
            reader.read_ranges([(100, 200)])
        assert caught.value.retryable and reader.version() == pinned
    with open_ranges(uri, cloud.options()) as fresh:  # the next attempt: the new version, whole
        assert fresh.read_ranges([(0, 100)]) == [DATA[::-1][:100]]


def test_a_reader_given_a_listed_etag_refuses_a_newer_object(cloud: CloudStack) -> None:
    """The stage cache and the slide opener pin the ETag a HEAD found: written over between that
    HEAD and the first read, the read is refused rather than of the new bytes."""
    key = _key("listed.bin")
    uri = cloud.upload_bytes(DATA, key)
    etag = stat(uri, cloud.options())["etag"]
    cloud.upload_bytes(DATA[::-1], key)
    with open_ranges(uri, cloud.options(), etag=etag) as reader, pytest.raises(InputChanged):
        reader.read_ranges([(0, 100)])


def _read(uri: str, options: dict[str, Any] | None) -> tuple[str, bytes]:
    with open_ranges(uri, options) as reader:
        return reader.client, bytes(reader.read_ranges([(5, 10)])[0])


def test_the_gcs_emulator_named_by_storage_emulator_host_alone(gcs: CloudStack, client: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``STORAGE_EMULATOR_HOST`` (Google's libraries' setting, with or without its http://) and
    no options: both clients reach the emulator, unsigned (gcsfs goes anonymous where it finds no
    Google credentials; obstore asked the metadata server for a token and failed, 403)."""
    uri = gcs.upload_bytes(DATA, _key("env.bin"))
    for host in (gcs.proxy.url, gcs.proxy.url.removeprefix("http://")):
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", host)
        assert _read(uri, None) == (client, DATA[5:15])
        assert stat(uri)["size"] == len(DATA)
        assert expand_uris([uri.rsplit("/", 1)[0] + "/*.bin"]) == [uri]


def test_azurite_named_by_the_connection_string_environment(azure: CloudStack, client: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``AZURE_STORAGE_CONNECTION_STRING`` (Azure's tools' setting) and no options reach Azurite
    through both clients."""
    uri = azure.upload_bytes(DATA, _key("env.bin"))
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azure.options()["connection_string"])
    assert _read(uri, None) == (client, DATA[5:15])
    assert stat(uri)["size"] == len(DATA)
    assert expand_uris([uri.rsplit("/", 1)[0] + "/*.bin"]) == [uri]


def test_transient_failures_are_retried_and_counted(cloud: CloudStack, client: str) -> None:
    """A share of the emulator's answers 503 (the proxy's): every read still arrives whole, and
    the retries are gpubatch's, counted and quick (gcsfs retried each 503 itself, 6 times with
    sleeps up to 16 s, and adlfs's Azure client 3 times from 15 s apart, none of it counted)."""
    from gpubatch.core.clocks import StageClocks
    from gpubatch.io.retry import RetryPolicy

    uri = cloud.upload_bytes(DATA, _key("flaky.bin"))
    cloud.proxy.configure(error_rate=0.3, seed=21)
    clocks = StageClocks()
    started = time.monotonic()
    with open_ranges(uri, cloud.options(), clocks, RetryPolicy(attempts=8, base_s=0.001, cap_s=0.01)) as reader:
        for i in range(20):
            assert reader.read_ranges([(i * 1000, 500)]) == [DATA[i * 1000: i * 1000 + 500]]
    assert cloud.proxy.stats["errors"] > 0
    assert clocks.counters.get("storage.retries", 0) >= 1
    assert time.monotonic() - started < QUICK_S


def test_a_folder_walk_names_its_files_in_the_scheme_written(cloud: CloudStack, client: str) -> None:
    """A folder format's walk (DICOM series, OME-Zarr) names the files it finds as the user wrote
    the folder: ``az://``, not adlfs's ``abfs://``; those names reach errors and the audit."""
    from gpubatch.io.storage import retried_fs

    folder = uuid.uuid4().hex[:8]
    cloud.upload_bytes(b"DICM", f"{folder}/a.dcm")
    walker, path = retried_fs(cloud.uri(folder), cloud.options())
    assert [walker.unstrip(entry["name"]) for entry in walker.ls(path)] == [cloud.uri(f"{folder}/a.dcm")]


@pytest.mark.parametrize("size", [1000, 12 << 20])
def test_an_output_write_that_fails_midway_leaves_no_object(cloud: CloudStack, size: int) -> None:
    """As on S3 (tests/test_remote_outputs.py): gcsfs's and adlfs's files commit on close, error or
    not; a write that raises publishes nothing, and the next write of the name lands whole."""
    import os

    from gpubatch.outputs.store import OutputStore

    store = OutputStore(cloud.uri(f"aborted/{uuid.uuid4().hex}"), cloud.options())
    with pytest.raises(KeyboardInterrupt), store.open_write("predictions.parquet") as f:
        f.write(os.urandom(size))
        raise KeyboardInterrupt
    assert not store.exists("predictions.parquet")
    with store.open_write("predictions.parquet") as f:
        f.write(b"whole")
    assert store.read_bytes("predictions.parquet") == b"whole"


@pytest.mark.parametrize("name", ["q?x=1.bin", "h#1.bin"])
def test_a_key_with_url_delimiters_is_read_as_the_listing_names_it(cloud: CloudStack, client: str, name: str) -> None:
    """'?' and '#' are a key's own characters in gs:// and az:// (the listing gives them so),
    not a query or a fragment: obstore asked for the key cut at them, a 404."""
    uri = cloud.upload_bytes(DATA[:5000], _key(name))
    assert expand_uris([uri.rsplit("/", 1)[0] + "/*.bin"], cloud.options()) == [uri]
    with open_ranges(uri, cloud.options()) as reader:
        assert reader.client == client
        assert (reader.size(), reader.fetch(100, 200)) == (5000, DATA[100:200])
