"""ShardWriterTests: what a shard writer and the commit protocol must guarantee, on any store."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from gpubatch.core.results import ShardResult
from gpubatch.outputs.layout import PARTS_DIR, PREDICTIONS, TMP_PREFIX, ZARR, new_attempt
from gpubatch.outputs.manifest import Manifest, sweep
from gpubatch.outputs.merge import merge_parquet
from gpubatch.outputs.store import OutputStore
from gpubatch.outputs.writer import ShardWriter


def _batch(start: int, n: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    index = {"x": np.arange(start, start + n, dtype=np.int64), "y": np.zeros(n, np.int64)}
    outputs = {"probs": np.random.default_rng(start).random((n, 3)).astype(np.float32),
               "embedding": np.random.default_rng(start + 1).random((n, 40)).astype(np.float32)}
    return index, outputs


class ShardWriterTests:
    """Subclass and provide the ``store`` fixture (an empty OutputStore: a local folder or an
    object-store prefix); ``formats`` lists the output formats the writer is asked for."""

    formats: tuple[str, ...] = ("zarr", "parquet")

    def _writer(self, store: OutputStore, shard_id: str = "s1") -> ShardWriter:
        return ShardWriter(store, shard_id, new_attempt(), {"slide": "/data/a.svs"}, {"level": 0}, self.formats)

    def _commit(self, store: OutputStore, writer: ShardWriter) -> ShardResult:
        result = ShardResult(writer.shard_id, "/data/a.svs", **writer.commit())
        Manifest(store).record(result)
        return result

    def _names(self, store: OutputStore) -> list[str]:
        return [f"{d}/{n}" for d in (PARTS_DIR, ZARR) for n in store.listdir(d)]

    def test_commit_makes_the_shard_visible_with_its_checksum(self, store: OutputStore) -> None:
        writer = self._writer(store)
        for start in (0, 16):
            writer.write(*_batch(start, 16))
        result = self._commit(store, writer)
        assert Manifest(store).committed() == {"s1": result}
        table = pq.read_table(io.BytesIO(store.read_bytes(f"{PARTS_DIR}/{result.part}")))
        assert result.rows == 32 and table.column_names[:3] == ["slide", "x", "y"] and table.num_rows == 32
        assert "probs_0" in table.column_names and "embedding_0" not in table.column_names  # wide: zarr only
        if "zarr" in self.formats:
            import zarr

            group = store.zarr_group(f"{ZARR}/{result.group}")
            embedding = group["embedding"]
            assert isinstance(embedding, zarr.Array) and embedding.shape == (32, 40)
            assert group.attrs["level"] == 0
        assert not [n for n in self._names(store) if n.rsplit("/", 1)[1].startswith(TMP_PREFIX)]

    def test_abort_leaves_nothing(self, store: OutputStore) -> None:
        writer = self._writer(store, "s2")
        writer.write(*_batch(0, 8))
        writer._flush()
        writer.abort()
        assert not [n for n in self._names(store) if "s2" in n]
        assert Manifest(store).committed() == {}

    def test_an_uncommitted_attempt_is_invisible_and_swept(self, store: OutputStore) -> None:
        killed = self._writer(store, "s3")
        killed.write(*_batch(0, 8))
        killed.commit()  # files complete, but the worker died before its commit record
        assert Manifest(store).committed() == {}
        kept = self._writer(store, "s3")
        kept.write(*_batch(100, 2))
        result = self._commit(store, kept)
        assert sweep(store, [result]) >= 1
        names = self._names(store)
        assert f"{PARTS_DIR}/{result.part}" in names and f"{PARTS_DIR}/{killed.part}" not in names

    def test_a_changed_part_is_not_committed(self, store: OutputStore) -> None:
        writer = self._writer(store, "s4")
        writer.write(*_batch(0, 4))
        result = self._commit(store, writer)
        data = bytearray(store.read_bytes(f"{PARTS_DIR}/{result.part}"))
        data[len(data) // 2] ^= 0xFF
        store.write_bytes(f"{PARTS_DIR}/{result.part}", bytes(data))
        assert Manifest(store).committed() == {}

    def test_empty_shard_commits_and_merges(self, store: OutputStore) -> None:
        empty = self._commit(store, self._writer(store, "empty"))
        full_writer = self._writer(store, "full")
        full_writer.write(*_batch(0, 4))
        full = self._commit(store, full_writer)
        assert empty.rows == 0
        rows = merge_parquet(store, [empty, full], index_columns=["slide", "x", "y"])
        assert rows == 4 and pq.read_table(io.BytesIO(store.read_bytes(PREDICTIONS))).num_rows == 4

    def test_small_parts_merge_into_few_row_groups_in_order(self, store: OutputStore, monkeypatch: Any) -> None:
        """Many one-row shards become row groups of ROW_GROUP_ROWS rows, not one per shard: the
        footer (held by the writer until it closes) stays small whatever the shard count."""
        from gpubatch.outputs import merge as merge_module

        monkeypatch.setattr(merge_module, "ROW_GROUP_ROWS", 4)
        results = []
        for i in range(10):
            writer = self._writer(store, f"p{i}")
            writer.write(*_batch(i, 1))
            results.append(self._commit(store, writer))
        assert merge_parquet(store, results, index_columns=["slide", "x", "y"]) == 10
        merged = pq.ParquetFile(io.BytesIO(store.read_bytes(PREDICTIONS)))
        assert merged.metadata.num_row_groups == 3  # 4 + 4 + 2 rows
        assert merged.read().column("x").to_pylist() == list(range(10))

    def test_only_text_columns_are_dictionary_encoded(self, store: OutputStore) -> None:
        """The slide name repeats on every row and is stored once per page; coordinates and
        scores are nearly all distinct, and a dictionary of them only adds to the file."""
        writer = self._writer(store, "d1")
        writer.write(*_batch(0, 64))
        result = self._commit(store, writer)
        merge_parquet(store, [result], index_columns=["slide", "x", "y"])
        for name in (f"{PARTS_DIR}/{result.part}", PREDICTIONS):
            meta = pq.ParquetFile(io.BytesIO(store.read_bytes(name))).metadata
            encoded = {meta.schema.column(i).name: meta.row_group(0).column(i).encodings
                       for i in range(meta.num_columns)}
            dictionary = {c for c, encodings in encoded.items() if any("DICTIONARY" in e for e in encodings)}
            assert dictionary == {"slide"}, (name, encoded)

    def test_track_outputs_whole_in_zarr_and_wide_columns_where_allowed(self, store: OutputStore,
                                                                       monkeypatch: Any) -> None:
        """(N, bins, tracks) never becomes parquet columns and reads back whole from zarr after
        flushes that split shards (every batch flushes here); an output the source allows wider
        (``column_limit``) gets its columns."""
        from gpubatch.outputs import writer as writer_module

        monkeypatch.setattr(writer_module, "FLUSH_BYTES", 1)
        writer = ShardWriter(store, "t1", new_attempt(), {}, {}, self.formats,
                             column_limit=lambda name: 300 if name == "scores" else None)
        rng = np.random.default_rng(5)
        tracks = rng.random((40, 6, 100), dtype=np.float32)
        scores = rng.random((40, 300), dtype=np.float32)
        for i in range(0, 40, 7):
            writer.write({"x": np.arange(i, min(i + 7, 40))}, {"tracks": tracks[i : i + 7], "scores": scores[i : i + 7]})
        result = self._commit(store, writer)
        table = pq.read_table(io.BytesIO(store.read_bytes(f"{PARTS_DIR}/{result.part}")))
        assert table.column_names == ["x", *(f"scores_{i}" for i in range(300))]
        np.testing.assert_array_equal(table.column("scores_299").to_numpy(), scores[:, 299])
        if "zarr" in self.formats:
            group = store.zarr_group(f"{ZARR}/{result.group}")
            np.testing.assert_array_equal(group["tracks"][:], tracks)
            np.testing.assert_array_equal(group["scores"][:], scores)
            assert group["tracks"].chunks[1:] == (6, 64)
