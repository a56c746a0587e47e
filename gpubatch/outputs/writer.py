"""Per-shard result writing under a unique attempt name, so a crash never leaves half a shard.

A shard's rows stream into its attempt's parquet part and zarr group while the shard runs (memory
stays at one flush of batches). Nothing reads an attempt's files until the shard's commit record
(outputs.manifest) names them, so ``commit`` only finishes the files and returns what the record
needs; no rename is involved, which is what lets the same protocol work on object storage. A shard
killed before its record is written leaves an attempt no record names, which the next run sweeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gpubatch.outputs.layout import PARTS_DIR, ZARR, group_name, part_name
from gpubatch.outputs.store import OutputStore, output_errors

#: outputs wider than this go to zarr only; parquet keeps the index columns for them (a source
#: may allow more per output: ``ShardReader.column_limit``)
MAX_PARQUET_WIDTH = 32
FLUSH_BYTES = 32 << 20  # outputs buffered per shard before a row group / zarr append
ZARR_CHUNK_ROWS = 16384
#: zarr chunks aim at this many bytes (before compression): big enough for few requests, small
#: enough that reading one track, or one window, does not read the whole output
ZARR_CHUNK_BYTES = 4 << 20
#: wide and track outputs are sharded (zarr v3): one file holds about this many bytes of whole
#: rows, so a genome-wide run writes a file per few windows, not one per window and track chunk
ZARR_SHARD_BYTES = 8 << 20
#: tracks per chunk of an (N, bins, tracks) array, and values per chunk of a wide (N, W) one
TRACK_CHUNK = 64
WIDE_CHUNK = 256


def output_columns(name: str, values: np.ndarray, limit: int | None = None) -> dict[str, np.ndarray]:
    """One parquet column per output value: ``name`` for scalars, ``name_i`` for vectors.

    Outputs of rank 3, (N, bins, tracks), are never flattened into columns (zarr keeps them
    whole); nor are outputs of more than ``limit`` values (default MAX_PARQUET_WIDTH).
    """
    if not parquet_holds(values.shape[1:], limit):
        return {}
    flat = values.reshape(len(values), int(np.prod(values.shape[1:])))  # also for zero rows
    if flat.shape[1] == 1:
        return {name: flat[:, 0]}
    return {f"{name}_{i}": flat[:, i] for i in range(flat.shape[1])}


def parquet_holds(item_shape: tuple[int, ...], limit: int | None = None) -> bool:
    """Whether an output of this per-item shape becomes parquet columns (else zarr alone holds
    it): not (bins, tracks), and at most ``limit`` values (default MAX_PARQUET_WIDTH)."""
    return len(item_shape) != 2 and int(np.prod(item_shape)) <= (MAX_PARQUET_WIDTH if limit is None else limit)


def zarr_layout(shape: tuple[int, ...], itemsize: int) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """(chunks, shards) of an (N, ...) output array.

    Scalars and narrow vectors: chunks of whole rows, as many as fit ZARR_CHUNK_BYTES, no shards.
    Track outputs (N, bins, tracks) and wide (N, W) ones are chunked by rows *and* tracks (every
    TRACK_CHUNK tracks, WIDE_CHUNK values), so one track or one window reads a small part; their
    chunks are grouped into shards of whole rows (ZARR_SHARD_BYTES), one file per shard.
    """
    tail = list(shape[1:])
    wide = len(shape) == 3 or (len(shape) == 2 and shape[1] > WIDE_CHUNK)
    if wide:
        tail[-1] = max(1, min(tail[-1], TRACK_CHUNK if len(shape) == 3 else WIDE_CHUNK))
    chunk_row = max(1, int(np.prod(tail, dtype=np.int64)) * itemsize)
    rows = min(ZARR_CHUNK_ROWS, max(1, ZARR_CHUNK_BYTES // chunk_row))
    if not wide:
        return (rows, *tail), None
    full_row = max(1, int(np.prod(shape[1:], dtype=np.int64)) * itemsize)
    shard_rows = min(ZARR_CHUNK_ROWS, max(1, ZARR_SHARD_BYTES // full_row))
    rows = min(rows, shard_rows)
    shard_tail = [*shape[1:-1], -(-shape[-1] // tail[-1]) * tail[-1]]
    return (rows, *tail), (shard_rows - shard_rows % rows, *shard_tail)



def rows_table(constants: dict[str, Any], index: dict[str, np.ndarray], outputs: dict[str, np.ndarray],
               column_limit: Callable[[str], int | None] = lambda name: None) -> pa.Table:
    """A batch of rows as a shard's parquet part holds them: the shard's constant columns (the
    slide), its index columns, then each output's columns (:func:`output_columns`)."""
    n = len(next(iter(index.values()))) if index else len(next(iter(outputs.values())))
    columns: dict[str, Any] = {k: pa.array(np.full(n, v)) if not isinstance(v, str)
                               else pa.array([v] * n, pa.string()) for k, v in constants.items()}
    columns.update({k: pa.array(v) for k, v in index.items()})
    for name, values in outputs.items():
        columns.update({k: pa.array(v) for k, v in output_columns(name, values, column_limit(name)).items()})
    return pa.table(columns)


def parquet_writer(where: Any, schema: pa.Schema) -> pq.ParquetWriter:
    """A writer for gpubatch's parquet (parts and predictions.parquet): zstd, and dictionary
    pages for text and flag columns only (slide, chrom, strand, ...), whose values repeat.
    Numbers are nearly all distinct (scores, window starts): dictionary-encoding them first, as
    pyarrow does by default, made a 100,000-window genome output 1.8x larger and its write
    2.7x the CPU (bench/bench_parquet.py)."""
    repeated = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
                or pa.types.is_boolean(f.type)]
    return pq.ParquetWriter(where, schema, compression="zstd", use_dictionary=repeated)


class ShardWriter:
    """Streams one attempt at a shard to its parquet part and zarr group; ``commit`` finishes them."""

    def __init__(self, store: OutputStore, shard_id: str, attempt: str, constants: dict[str, Any],
                 attrs: dict[str, Any], formats: Sequence[str],
                 column_limit: Callable[[str], int | None] | None = None):
        self.store, self.shard_id, self.attempt = store, shard_id, attempt
        self.constants, self.attrs, self.formats = constants, attrs, formats
        self.column_limit = column_limit or (lambda name: None)
        #: rows held back per zarr array so that appends fill whole shards (none is rewritten)
        self._zarr_carry: dict[str, np.ndarray] = {}
        self.rows = 0
        self.part = part_name(shard_id, attempt)
        self.group = group_name(shard_id, attempt) if "zarr" in formats else None
        self._files = contextlib.ExitStack()
        self._file: Any = None
        self._pq: pq.ParquetWriter | None = None
        self._zarr: Any = None
        #: the group's arrays as created: looked up by name, each append cost two metadata reads
        self._arrays: dict[str, Any] = {}
        #: the group's index and output names, written with the attributes at commit
        self._names: dict[str, list[str]] = {}
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_bytes = 0
        if self.group is not None:
            # Opened now, not at the first flush: an output that cannot be written fails the
            # shard before its compute is spent, and zarr's set-up (its I/O loop, the codecs)
            # happens beside the slide opening rather than beside another shard's batches.
            with output_errors(self.store, f"{ZARR}/{self.group}"):
                self._open_group()

    def write(self, index: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Buffer one batch; rows go out in large row groups and zarr appends (small ones are slow)."""
        with output_errors(self.store):
            self._buffer(index, outputs)

    def _buffer(self, index: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        batch = {**index, **{f"\0{k}": v for k, v in outputs.items()}}
        self._pending.append(batch)
        self._pending_bytes += sum(np.asarray(v).nbytes for v in batch.values())
        self.rows += len(next(iter(batch.values())))
        if self._pending_bytes >= FLUSH_BYTES:
            self._flush(final=False)

    def _flush(self, final: bool = True, attrs: bool = False) -> None:
        """Write what is buffered; ``final`` (at commit) also writes rows zarr held back, and
        ``attrs`` the zarr group's attributes, in the same hand-over to zarr."""
        if not self._pending:
            if self.group is not None and ((final and self._zarr_carry) or attrs):
                self._write_zarr({}, final, attrs)
            return
        # each column's batches are dropped as they are joined: the buffer is held once, not twice
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        merged = {k: np.concatenate([b.pop(k) for b in pending]) for k in list(pending[0])}
        index = {k: v for k, v in merged.items() if not k.startswith("\0")}
        outputs = {k[1:]: v for k, v in merged.items() if k.startswith("\0")}
        self._write_parquet(index, outputs)
        if self.group is not None:
            columns = {**index, **outputs}
            self._names = {"index_columns": list(index), "outputs": list(outputs)}
            del merged, index, outputs
            self._write_zarr(columns, final, attrs)

    def _parquet(self, schema: pa.Schema) -> pq.ParquetWriter:
        if self._pq is None:
            self._file = self._files.enter_context(self.store.open_write(f"{PARTS_DIR}/{self.part}"))
            self._pq = parquet_writer(self._file, schema)
        return self._pq

    def _write_parquet(self, index: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        table = rows_table(self.constants, index, outputs, self.column_limit)
        self._parquet(table.schema).write_table(table)

    def _open_group(self) -> Any:
        if self._zarr is None:
            self._zarr = self.store.zarr_group(f"{ZARR}/{self.group}", mode="w", attributes=_jsonable(self.attrs))
        return self._zarr

    def _write_zarr(self, columns: dict[str, np.ndarray], final: bool, attrs: bool = False) -> None:
        """Append to each array in whole chunks of rows; the rest waits for the next flush (or
        ``final``), so that no chunk is read back and rewritten by the next append. ``columns``
        is emptied as it goes, so each array is freed once it is written. ``attrs``: the group's
        attributes too (at commit).

        Every array's writes (and ``attrs``) go to zarr at once, one hand-over to its event loop
        for all of them: one by one, a small slide's shard spent most of its time handing its
        four arrays' creations and appends to zarr's thread and waiting for each.
        """
        group = self._open_group()._async_group
        work = [group.update_attributes({**_jsonable(self.attrs), **self._names})] if attrs else []
        for name in columns.keys() | self._zarr_carry.keys():
            arr = self._carried(name, columns.pop(name, None))
            text = arr.dtype == object or arr.dtype.kind == "U"
            if text:  # variable-length UTF-8: the string type zarr v3 specifies
                arr = arr.astype(object)
            array = self._arrays.get(name)
            if array is None:
                chunks, shards = ((ZARR_CHUNK_ROWS,), None) if text else zarr_layout(arr.shape, arr.dtype.itemsize)
            else:
                chunks, shards = array.chunks, array.shards
            rows = (shards or chunks)[0]
            whole = len(arr) if final else len(arr) - len(arr) % rows
            if whole < len(arr):
                self._zarr_carry[name] = arr[whole:].copy()
            if array is None:
                work.append(self._create_array(group, name, arr[:whole], chunks, shards, str if text else arr.dtype))
            elif whole:
                work.append(array.append(arr[:whole]))
        _run_together(work)

    async def _create_array(self, group: Any, name: str, rows: np.ndarray, chunks: tuple[int, ...],
                            shards: tuple[int, ...] | None, dtype: Any) -> None:
        """Create ``name`` holding ``rows`` (already its shape: no append's metadata rewrite)."""
        array = await group.create_array(name, shape=rows.shape, chunks=chunks, shards=shards, dtype=dtype)
        self._arrays[name] = array
        if len(rows):
            await array.setitem(slice(None), rows)

    def _carried(self, name: str, values: np.ndarray | None) -> np.ndarray:
        carry = self._zarr_carry.pop(name, None)
        if values is None:
            assert carry is not None
            return carry
        arr = _canonical(np.ascontiguousarray(values))
        return arr if carry is None else np.concatenate([carry, arr])

    def commit(self) -> dict[str, Any]:
        """Finish the attempt's files; returns what the commit record needs (names, rows, sha256)."""
        with output_errors(self.store):
            return self._finish()

    def _finish(self) -> dict[str, Any]:
        # Attributes again at commit: the reader's counts (REF mismatches) grow while it reads;
        # one write of the group's metadata, with the names of what it holds, beside the last
        # rows (zarr's ``attrs.update`` rewrites the metadata once per key: 16 times a slide's).
        self._flush(attrs=True)
        self._parquet(pa.schema([])).close()
        sha = self._file.sha.hexdigest()
        self._files.close()
        return {"rows": self.rows, "part": self.part, "group": self.group, "sha256": sha}

    def abort(self) -> None:
        """Best effort on an already failing shard: drop this attempt's files. An open part is
        left as a failed write (OutputStore.open_write discards it): closed cleanly, object
        storage received the half-written part only to have it deleted, and kept it where that
        delete failed too; on disk it was renamed into place first."""
        with contextlib.suppress(Exception):
            if self._pq is not None:
                self._pq.close()  # else its finaliser writes the footer into the dropped file
        with contextlib.suppress(BaseException):
            aborted = _Aborted(self.part)
            self._files.__exit__(_Aborted, aborted, None)
        with contextlib.suppress(Exception):
            self.store.delete(f"{PARTS_DIR}/{self.part}")
            if self.group is not None:
                self.store.delete(f"{ZARR}/{self.group}", recursive=True)


def _run_together(work: list[Coroutine[Any, Any, Any]]) -> None:
    """Run zarr coroutines at once on zarr's event loop; all of them finish before the first
    error is raised, so that an aborted shard deletes its group after its last write, not
    before a straggler's."""
    if not work:
        return
    from zarr.core.sync import sync

    async def together() -> list[Any]:
        return await asyncio.gather(*work, return_exceptions=True)

    for outcome in sync(together()):
        if isinstance(outcome, BaseException):
            raise outcome


def _canonical(arr: np.ndarray) -> np.ndarray:
    """``arr`` viewed with numpy's canonical dtype for its kind and size: ONNX Runtime returns
    int64 outputs as C ``long long`` (dtype char 'q'), equal to int64 but a distinct dtype that
    zarr's type registry does not match, which failed every shard of an integer-output model."""
    if arr.dtype.kind not in "biufc":
        return arr
    return arr.view(np.dtype(arr.dtype.str))


class _Aborted(Exception):
    """Thrown into an aborted shard's open part, so that it is discarded rather than published."""


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
