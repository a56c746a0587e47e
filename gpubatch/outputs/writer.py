"""Per-shard result writing, committed atomically so that a crash never leaves half a shard.

A shard's rows stream into a temporary parquet part and a temporary zarr group while the shard
runs (memory stays at one batch); ``commit`` renames both into place and returns a checksum for
the manifest. A shard killed before commit leaves only temporaries, which the next run removes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gpubatch.core.files import file_sha256
from gpubatch.outputs.layout import PARTS_DIR, PREDICTIONS, TMP_PREFIX, ZARR, part_name

#: outputs wider than this go to zarr only; parquet keeps the index columns for them
MAX_PARQUET_WIDTH = 32
FLUSH_BYTES = 32 << 20  # outputs buffered per shard before a row group / zarr append
ZARR_CHUNK_ROWS = 16384


def output_columns(name: str, values: np.ndarray) -> dict[str, np.ndarray]:
    """One parquet column per output value: ``name`` for scalars, ``name_i`` for vectors."""
    flat = values.reshape(len(values), -1)
    if flat.shape[1] == 1:
        return {name: flat[:, 0]}
    if flat.shape[1] > MAX_PARQUET_WIDTH:
        return {}
    return {f"{name}_{i}": flat[:, i] for i in range(flat.shape[1])}


class ShardWriter:
    """Streams one shard's rows to parquet and zarr under temporary names; commit makes them real."""

    def __init__(self, outdir: str | Path, shard_id: str, constants: dict[str, Any],
                 attrs: dict[str, Any], formats: Sequence[str]):
        self.outdir = Path(outdir)
        self.shard_id = shard_id
        self.constants = constants
        self.attrs = attrs
        self.formats = formats
        self.rows = 0
        tag = uuid.uuid4().hex[:8]
        (self.outdir / PARTS_DIR).mkdir(parents=True, exist_ok=True)
        self.part_tmp = self.outdir / PARTS_DIR / f"{TMP_PREFIX}{shard_id}-{tag}.parquet"
        self.part_path = self.outdir / PARTS_DIR / part_name(shard_id)
        self.zarr_tmp = self.outdir / ZARR / f"{TMP_PREFIX}{shard_id}-{tag}"
        self.zarr_path = self.outdir / ZARR / shard_id
        self._pq: pq.ParquetWriter | None = None
        self._group: Any = None
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_bytes = 0
        if "zarr" in formats:
            # Opened now, not at the first flush: an output that cannot be written fails the
            # shard before its compute is spent, and zarr's set-up (its I/O loop, the codecs)
            # happens beside the slide opening rather than beside another shard's batches.
            self._open_group()

    def write(self, index: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Buffer one batch; rows go out in large row groups and zarr appends (small ones are slow)."""
        batch = {**index, **{f"\0{k}": v for k, v in outputs.items()}}
        self._pending.append(batch)
        self._pending_bytes += sum(np.asarray(v).nbytes for v in batch.values())
        self.rows += len(next(iter(batch.values())))
        if self._pending_bytes >= FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        merged = {k: np.concatenate([b[k] for b in self._pending]) for k in self._pending[0]}
        index = {k: v for k, v in merged.items() if not k.startswith("\0")}
        outputs = {k[1:]: v for k, v in merged.items() if k.startswith("\0")}
        self._write_parquet(index, outputs)
        if "zarr" in self.formats:
            self._write_zarr({**index, **outputs})
        self._pending, self._pending_bytes = [], 0

    def _write_parquet(self, index: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        n = len(next(iter(index.values()))) if index else len(next(iter(outputs.values())))
        columns: dict[str, Any] = {k: pa.array(np.full(n, v) if not isinstance(v, str) else [v] * n)
                                   for k, v in self.constants.items()}
        columns.update({k: pa.array(v) for k, v in index.items()})
        for name, values in outputs.items():
            columns.update({k: pa.array(v) for k, v in output_columns(name, values).items()})
        table = pa.table(columns)
        if self._pq is None:
            self._pq = pq.ParquetWriter(self.part_tmp, table.schema, compression="zstd")
        self._pq.write_table(table)

    def _open_group(self) -> Any:
        import zarr

        if self._group is None:
            self._group = zarr.open_group(str(self.zarr_tmp), mode="w")
            self._group.attrs.update(_jsonable(self.attrs))
        return self._group

    def _write_zarr(self, columns: dict[str, np.ndarray]) -> None:
        group = self._open_group()
        for name, values in columns.items():
            arr = np.ascontiguousarray(values)
            text = arr.dtype == object or arr.dtype.kind == "U"
            if text:  # variable-length UTF-8: the string type zarr v3 specifies
                arr = arr.astype(object)
            if name not in group:
                chunks = (max(ZARR_CHUNK_ROWS, 1),) + arr.shape[1:]
                group.create_array(name, shape=(0,) + arr.shape[1:], chunks=chunks,
                                   dtype=str if text else arr.dtype)
            group[name].append(arr)

    def commit(self) -> dict[str, Any]:
        """Rename the temporaries into place; returns the part's name, row count and sha256."""
        self._flush()
        if self._pq is None:
            self._pq = pq.ParquetWriter(self.part_tmp, pa.schema([]), compression="zstd")
        self._pq.close()
        if "zarr" in self.formats:
            self._open_group()
            if self.zarr_path.exists():
                shutil.rmtree(self.zarr_path)
            os.replace(self.zarr_tmp, self.zarr_path)
        os.replace(self.part_tmp, self.part_path)
        return {"rows": self.rows, "part": str(self.part_path.name),
                "sha256": file_sha256(self.part_path, cached=False)}

    def abort(self) -> None:
        if self._pq is not None:
            with contextlib.suppress(Exception):  # best effort on an already failing shard
                self._pq.close()
        self.part_tmp.unlink(missing_ok=True)
        shutil.rmtree(self.zarr_tmp, ignore_errors=True)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def remove_temporaries(outdir: str | Path) -> None:
    """Delete what shards killed before commit left behind."""
    for parent in (Path(outdir) / PARTS_DIR, Path(outdir) / ZARR):
        if parent.is_dir():
            for p in parent.glob(f"{TMP_PREFIX}*"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


TEXT_COLUMNS = {"slide", "chrom", "strand", "variant_id", "ref", "alt"}


def empty_index_table(columns: list[str]) -> pa.Table:
    """Zero rows with the index columns typed as a non-empty run would type them."""
    def kind(name: str) -> pa.DataType:
        return pa.string() if name in TEXT_COLUMNS else pa.bool_() if name == "ref_match" else pa.int64()

    return pa.table({c: pa.array([], kind(c)) for c in columns})


def merge_parquet(outdir: str | Path, shard_ids: list[str], target: str = PREDICTIONS,
                  index_columns: list[str] | None = None) -> int:
    """Concatenate committed parts, in plan order, into one file; streams part by part.

    With no rows at all, the file still has ``index_columns`` (zero rows), so readers of
    predictions.parquet see the same schema prefix whatever the run found.
    """
    outdir = Path(outdir)
    tmp = outdir / f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{target}"
    writer: pq.ParquetWriter | None = None
    rows = 0
    schema: pa.Schema | None = None
    try:
        for sid in shard_ids:
            part = outdir / PARTS_DIR / part_name(sid)
            if not part.exists():
                continue
            table = pq.read_table(part)
            if table.num_rows == 0 and not table.schema.names:
                continue
            if writer is None:
                schema = table.schema
                writer = pq.ParquetWriter(tmp, schema, compression="zstd")
            writer.write_table(table.cast(schema) if schema is not None else table)
            rows += table.num_rows
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        pq.write_table(empty_index_table(index_columns or []), tmp)
    os.replace(tmp, outdir / target)
    return rows
