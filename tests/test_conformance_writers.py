"""The shard writer and commit protocol pass ShardWriterTests on a local folder and on S3 (moto),
for zarr and parquet together and parquet alone."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from gpubatch.outputs.store import OutputStore
from gpubatch.testing.writers import ShardWriterTests

if TYPE_CHECKING:
    from s3_fixtures import S3Stack

pytest_plugins = ["s3_fixtures"]


class TestLocalZarrAndParquet(ShardWriterTests):
    formats = ("zarr", "parquet")

    @pytest.fixture()
    def store(self, tmp_path: Path) -> OutputStore:
        return OutputStore(tmp_path / "out")


class TestLocalParquetOnly(TestLocalZarrAndParquet):
    formats = ("parquet",)


class TestS3ZarrAndParquet(ShardWriterTests):
    formats = ("zarr", "parquet")

    @pytest.fixture()
    def store(self, s3: S3Stack) -> OutputStore:
        return OutputStore(f"s3://{s3.bucket}/writers/{uuid.uuid4().hex}", s3.options())
