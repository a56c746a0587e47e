"""Every range reader passes RangeReaderTests: local pread, fsspec (memory://, S3 on moto), wrapped."""

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
    from s3_fixtures import S3Stack

pytest_plugins = ["s3_fixtures"]


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
    """Through the storage entry point: fsspec's S3 client wrapped in the retry and metrics layers,
    against a real S3 server (moto) behind a proxy that fails some requests."""

    @pytest.fixture()
    def make_reader(self, s3: S3Stack) -> Callable[[bytes], RangeReader]:
        s3.proxy.configure(error_rate=0.1, seed=3)

        def make(data: bytes) -> RangeReader:
            uri = s3.upload_bytes(data, f"ranges/{uuid.uuid4().hex}.bin")
            return open_ranges(uri, s3.options())

        return make

    @pytest.fixture()
    def missing_reader(self, s3: S3Stack) -> Callable[[], RangeReader]:
        return lambda: open_ranges(f"s3://{s3.bucket}/ranges/absent.bin", s3.options())
