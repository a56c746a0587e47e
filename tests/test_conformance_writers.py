"""The shard writer passes ShardWriterTests, for zarr and parquet together and parquet alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpubatch.testing.writers import ShardWriterTests


class _Suite(ShardWriterTests):
    @pytest.fixture()
    def outdir(self, tmp_path: Path) -> Path:
        return tmp_path / "out"


class TestZarrAndParquet(_Suite):
    formats = ("zarr", "parquet")


class TestParquetOnly(_Suite):
    formats = ("parquet",)
