"""Every range reader passes RangeReaderTests: local pread, fsspec (memory://, S3 on moto, GCS on
fake-gcs-server, Azure on Azurite), obstore (the same three servers, plain HTTP), each wrapped in the
retry and metrics layers where it meets a server."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from gpubatch.io.ranges import FsspecRangeReader, LocalRangeReader, RangeReader
from gpubatch.io.storage import get_fs, open_ranges
from gpubatch.testing.ranges import RangeReaderTests

if TYPE_CHECKING:
    from cloud_fixtures import CloudStack
    from s3_fixtures import S3Stack

pytest_plugins = ["s3_fixtures", "cloud_fixtures"]


class TestLocalRangeReader(RangeReaderTests):
    @pytest.fixture()
    def make_reader(self, tmp_path: Path) -> Callable[[bytes], RangeReader]:
        def make(data: bytes) -> RangeReader:
            path = tmp_path / f"{uuid.uuid4().hex}.bin"
            path.write_bytes(data)
            return LocalRangeReader(str(path))

        return make

    @pytest.fixture()
    def missing_reader(self, tmp_path: Path) -> Callable[[], RangeReader]:
        return lambda: open_ranges(str(tmp_path / "absent.bin"))


class TestFsspecMemoryReader(RangeReaderTests):
    @pytest.fixture()
    def make_reader(self) -> Callable[[bytes], RangeReader]:
        def make(data: bytes) -> RangeReader:
            uri = f"memory://ranges/{uuid.uuid4().hex}.bin"
            fs, path = get_fs(uri)
            fs.pipe_file(path, data)
            return FsspecRangeReader(fs, path, uri)

        return make

    @pytest.fixture()
    def missing_reader(self) -> Callable[[], RangeReader]:
        return lambda: open_ranges("memory://ranges/absent.bin")


class TestS3ReaderWithRetriesAndMetrics(RangeReaderTests):
    """Through the storage entry point: obstore's S3 client (the default for s3://) wrapped in the
    retry and metrics layers, against a real S3 server (moto) behind a proxy that fails some
    requests."""

    client = "obstore"

    @pytest.fixture(autouse=True)
    def _client(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("GPUBATCH_RANGE_READER", self.client)

    @pytest.fixture()
    def make_reader(self, s3: S3Stack) -> Callable[[bytes], RangeReader]:
        s3.proxy.configure(error_rate=0.1, seed=3)

        def make(data: bytes) -> RangeReader:
            uri = s3.upload_bytes(data, f"ranges/{uuid.uuid4().hex}.bin")
            reader = open_ranges(uri, s3.options())
            assert reader.client == self.client
            return reader

        return make

    @pytest.fixture()
    def missing_reader(self, s3: S3Stack) -> Callable[[], RangeReader]:
        return lambda: open_ranges(f"s3://{s3.bucket}/ranges/absent.bin", s3.options())


class TestS3FsspecReaderWithRetriesAndMetrics(TestS3ReaderWithRetriesAndMetrics):
    """The same through fsspec's S3 client (s3fs), the fallback and the other protocols' client."""

    client = "fsspec"


class TestHttpObstoreReader(RangeReaderTests):
    """A plain http(s):// object through obstore's HTTP store, behind the same faulty proxy."""

    @pytest.fixture()
    def make_reader(self, s3: S3Stack) -> Callable[[bytes], RangeReader]:
        s3.proxy.configure(error_rate=0.1, seed=4)

        def make(data: bytes) -> RangeReader:
            uri = s3.upload_bytes(data, f"ranges/{uuid.uuid4().hex}.bin")
            s3.make_public(uri)
            reader = open_ranges(s3.http_url(uri))
            assert reader.client == "obstore"
            return reader

        return make

    @pytest.fixture()
    def missing_reader(self, s3: S3Stack) -> Callable[[], RangeReader]:
        return lambda: open_ranges(f"{s3.proxy.url}/{s3.bucket}/ranges/absent.bin")


class TestGcsObstoreReader(RangeReaderTests):
    """gs:// through the storage entry point: obstore's GCS store (the default for gs://) against
    fake-gcs-server, behind the proxy that fails some requests; only the job-style storage
    options (``endpoint_url``, ``token: anon``) say where the server is."""

    client, stack = "obstore", "gcs"

    @pytest.fixture(autouse=True)
    def _client(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("GPUBATCH_RANGE_READER", self.client)

    @pytest.fixture()
    def server(self, request: pytest.FixtureRequest) -> CloudStack:
        return request.getfixturevalue(self.stack)

    @pytest.fixture()
    def make_reader(self, server: CloudStack) -> Callable[[bytes], RangeReader]:
        server.proxy.configure(error_rate=0.1, seed=5)

        def make(data: bytes) -> RangeReader:
            uri = server.upload_bytes(data, f"ranges/{uuid.uuid4().hex}.bin")
            reader = open_ranges(uri, server.options())
            assert reader.client == self.client
            return reader

        return make

    @pytest.fixture()
    def missing_reader(self, server: CloudStack) -> Callable[[], RangeReader]:
        return lambda: open_ranges(server.uri("ranges/absent.bin"), server.options())


class TestGcsFsspecReader(TestGcsObstoreReader):
    """The same through gcsfs, the fallback (and gs://'s lister and writer)."""

    client = "fsspec"


class TestAzureObstoreReader(TestGcsObstoreReader):
    """az:// through obstore's Azure store against Azurite, reached by connection string."""

    client, stack = "obstore", "azure"


class TestAzureFsspecReader(TestGcsObstoreReader):
    """The same through adlfs."""

    client, stack = "fsspec", "azure"
