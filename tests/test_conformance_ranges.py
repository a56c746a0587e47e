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


class ObjectStoreReaders(RangeReaderTests):
    """Through the storage entry point: ``client``'s reader (obstore, or fsspec's s3fs, gcsfs or
    adlfs) wrapped in the retry and metrics layers, against the real server of the ``stack``
    fixture (moto, fake-gcs-server, Azurite) behind a proxy that fails some requests; only the
    job-style storage options say where the server is. (Not collected itself: no Test prefix.)"""

    client, stack, seed = "obstore", "s3", 3

    @pytest.fixture(autouse=True)
    def _client(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("GPUBATCH_RANGE_READER", self.client)

    @pytest.fixture()
    def server(self, request: pytest.FixtureRequest) -> S3Stack | CloudStack:
        return request.getfixturevalue(self.stack)

    @pytest.fixture()
    def make_reader(self, server: S3Stack | CloudStack) -> Callable[[bytes], RangeReader]:
        server.proxy.configure(error_rate=0.1, seed=self.seed)

        def make(data: bytes) -> RangeReader:
            uri = server.upload_bytes(data, f"ranges/{uuid.uuid4().hex}.bin")
            reader = open_ranges(uri, server.options())
            assert reader.client == self.client
            return reader

        return make

    @pytest.fixture()
    def missing_reader(self, server: S3Stack | CloudStack) -> Callable[[], RangeReader]:
        return lambda: open_ranges(server.uri("ranges/absent.bin"), server.options())


class TestS3ReaderWithRetriesAndMetrics(ObjectStoreReaders):
    """obstore's S3 client, the default for s3://, against moto."""


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


class TestGcsObstoreReader(ObjectStoreReaders):
    """gs:// through obstore's GCS store (the default for gs://) against fake-gcs-server."""

    stack, seed = "gcs", 5


class TestGcsFsspecReader(TestGcsObstoreReader):
    """The same through gcsfs, the fallback (and gs://'s lister and writer)."""

    client = "fsspec"


class TestAzureObstoreReader(ObjectStoreReaders):
    """az:// through obstore's Azure store against Azurite, reached by connection string."""

    stack, seed = "azure", 5


class TestAzureFsspecReader(TestAzureObstoreReader):
    """The same through adlfs."""

    client = "fsspec"
