"""ShardWriterTests: what a shard writer must guarantee (commit visible, abort leaves nothing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from gpubatch.core.files import file_sha256
from gpubatch.outputs.layout import TMP_PREFIX, OutputLayout
from gpubatch.outputs.writer import ShardWriter, merge_parquet, remove_temporaries


def _batch(start: int, n: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    index = {"x": np.arange(start, start + n, dtype=np.int64), "y": np.zeros(n, np.int64)}
    outputs = {"probs": np.random.default_rng(start).random((n, 3)).astype(np.float32),
               "embedding": np.random.default_rng(start + 1).random((n, 40)).astype(np.float32)}
    return index, outputs


class ShardWriterTests:
    """Subclass and provide the ``outdir`` fixture (an empty output folder); ``formats`` lists
    the output formats the writer is asked for."""

    formats: tuple[str, ...] = ("zarr", "parquet")

    def _writer(self, outdir: Path, shard_id: str = "s1") -> ShardWriter:
        return ShardWriter(outdir, shard_id, {"slide": "/data/a.svs"}, {"level": 0}, self.formats)

    def _temporaries(self, outdir: Path) -> list[Path]:
        return [p for p in outdir.rglob(f"{TMP_PREFIX}*")]

    def test_commit_makes_the_shard_visible_with_its_checksum(self, outdir: Path) -> None:
        writer = self._writer(outdir)
        for start in (0, 16):
            writer.write(*_batch(start, 16))
        part = writer.commit()
        layout = OutputLayout(outdir)
        path = layout.parts / part["part"]
        assert part["rows"] == 32 and file_sha256(path, cached=False) == part["sha256"]
        table = pq.read_table(path)
        assert table.column_names[:3] == ["slide", "x", "y"] and table.num_rows == 32
        assert "probs_0" in table.column_names and "embedding_0" not in table.column_names  # wide: zarr only
        if "zarr" in self.formats:
            import zarr

            group = zarr.open_group(str(layout.zarr / "s1"), mode="r")
            embedding = group["embedding"]
            assert isinstance(embedding, zarr.Array) and embedding.shape == (32, 40)
            assert group.attrs["level"] == 0
        assert not self._temporaries(outdir)

    def test_abort_leaves_nothing(self, outdir: Path) -> None:
        writer = self._writer(outdir, "s2")
        writer.write(*_batch(0, 8))
        writer.abort()
        layout = OutputLayout(outdir)
        assert not (layout.parts / "s2.parquet").exists() and not (layout.zarr / "s2").exists()
        assert not self._temporaries(outdir)

    def test_temporaries_of_a_killed_writer_are_removed(self, outdir: Path) -> None:
        writer = self._writer(outdir, "s3")
        writer.write(*_batch(0, 8))
        writer._flush()  # what a worker killed now leaves behind: temporaries on disk
        assert self._temporaries(outdir)
        remove_temporaries(outdir)
        assert not self._temporaries(outdir)

    def test_empty_shard_commits_and_merges(self, outdir: Path) -> None:
        assert self._writer(outdir, "empty").commit()["rows"] == 0
        full = self._writer(outdir, "full")
        full.write(*_batch(0, 4))
        full.commit()
        rows = merge_parquet(outdir, ["empty", "full"], index_columns=["slide", "x", "y"])
        assert rows == 4 and pq.read_table(OutputLayout(outdir).predictions).num_rows == 4

    def test_a_second_commit_of_a_shard_replaces_the_first(self, outdir: Path) -> None:
        first = self._writer(outdir, "again")
        first.write(*_batch(0, 4))
        first.commit()
        second = self._writer(outdir, "again")
        second.write(*_batch(100, 2))
        part = second.commit()
        table = pq.read_table(OutputLayout(outdir).parts / part["part"])
        assert table.column("x").to_pylist() == [100, 101]

