"""Per-shard result writing under a unique attempt name, so a crash never leaves half a shard.

A shard's rows stream into its attempt's parquet part and zarr group while the shard runs (memory
stays at one flush of batches). Nothing reads an attempt's files until the shard's commit record
(outputs.manifest) names them, so ``commit`` only finishes the files and returns what the record
needs; no rename is involved, which is what lets the same protocol work on object storage. A shard
killed before its record is written leaves an attempt no record names, which the next run sweeps.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gpubatch.outputs.layout import PARTS_DIR, ZARR, group_name, part_name
from gpubatch.outputs.store import OutputStore

#: outputs wider than this go to zarr only; parquet keeps the index columns for them
MAX_PARQUET_WIDTH = 32
FLUSH_BYTES = 32 << 20  # outputs buffered per shard before a row group / zarr append
ZARR_CHUNK_ROWS = 16384


def output_columns(name: str, values: np.ndarray) -> dict[str, np.ndarray]:
    """One parquet column per output value: ``name`` for scalars, ``name_i`` for vectors."""
    flat = values.reshape(len(values), int(np.prod(values.shape[1:])))  # also for zero rows
    if flat.shape[1] == 1:
        return {name: flat[:, 0]}
    if flat.shape[1] > MAX_PARQUET_WIDTH:
        return {}
    return {f"{name}_{i}": flat[:, i] for i in range(flat.shape[1])}


class ShardWriter:
    """Streams one attempt at a shard to its parquet part and zarr group; ``commit`` finishes them."""

    def __init__(self, store: OutputStore, shard_id: str, attempt: str, constants: dict[str, Any],
                 attrs: dict[str, Any], formats: Sequence[str]):
        self.store, self.shard_id, self.attempt = store, shard_id, attempt
        self.constants, self.attrs, self.formats = constants, attrs, formats
        self.rows = 0
        self.part = part_name(shard_id, attempt)
        self.group = group_name(shard_id, attempt) if "zarr" in formats else None
        self._files = contextlib.ExitStack()
        self._file: Any = None
        self._pq: pq.ParquetWriter | None = None
        self._zarr: Any = None
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_bytes = 0
        if self.group is not None:
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
        if self.group is not None:
            self._write_zarr({**index, **outputs})
            self._zarr.attrs.update({"index_columns": list(index), "outputs": list(outputs)})
        self._pending, self._pending_bytes = [], 0

    def _parquet(self, schema: pa.Schema) -> pq.ParquetWriter:
        if self._pq is None:
            self._file = self._files.enter_context(self.store.open_write(f"{PARTS_DIR}/{self.part}"))
            self._pq = pq.ParquetWriter(self._file, schema, compression="zstd")
        return self._pq

    def _write_parquet(self, index: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        n = len(next(iter(index.values()))) if index else len(next(iter(outputs.values())))
        columns: dict[str, Any] = {k: pa.array(np.full(n, v)) if not isinstance(v, str)
                                   else pa.array([v] * n, pa.string()) for k, v in self.constants.items()}
        columns.update({k: pa.array(v) for k, v in index.items()})
        for name, values in outputs.items():
            columns.update({k: pa.array(v) for k, v in output_columns(name, values).items()})
        table = pa.table(columns)
        self._parquet(table.schema).write_table(table)

    def _open_group(self) -> Any:
        if self._zarr is None:
            self._zarr = self.store.zarr_group(f"{ZARR}/{self.group}", mode="w")
            self._zarr.attrs.update(_jsonable(self.attrs))
        return self._zarr

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
        """Finish the attempt's files; returns what the commit record needs (names, rows, sha256)."""
        self._flush()
        self._parquet(pa.schema([])).close()
        sha = self._file.sha.hexdigest()
        self._files.close()
        if self.group is not None:
            self._open_group()
        return {"rows": self.rows, "part": self.part, "group": self.group, "sha256": sha}

    def abort(self) -> None:
        """Best effort on an already failing shard: close and delete this attempt's files."""
        with contextlib.suppress(Exception):
            if self._pq is not None:
                self._pq.close()
        with contextlib.suppress(Exception):
            self._files.close()
        with contextlib.suppress(Exception):
            self.store.delete(f"{PARTS_DIR}/{self.part}")
            if self.group is not None:
                self.store.delete(f"{ZARR}/{self.group}", recursive=True)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
