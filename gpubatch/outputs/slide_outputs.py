"""slide_predictions.parquet: one row per slide of what a slide-level head gave.

A slide head (``slide_model``) runs on the worker over each slide's bag of tile features; its
slide-level outputs come back in the shard's result, committed with the shard's manifest entry, so
a resumed run has them for every slide without recomputing. Here they become one row per slide, in
plan order: ``slide``, ``tiles`` (the bag's size), then the outputs as predictions.parquet names
them (``logits_0``, ``logits_1``, ...; a scalar keeps its name; an output wider than
``MAX_PARQUET_WIDTH`` values stays one list column). A slide with no tiles has nulls.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gpubatch.core.results import ShardResult
from gpubatch.io.redact import redact
from gpubatch.outputs.layout import SLIDE_PREDICTIONS
from gpubatch.outputs.store import OutputStore
from gpubatch.outputs.writer import MAX_PARQUET_WIDTH


class SlidePredictions:
    """slide_predictions.parquet written as the shards' records stream past (plan order), a few
    hundred rows at a time: the client never holds every slide's outputs at once."""

    ROWS = 512  # rows per row group

    def __init__(self, store: OutputStore):
        self.store = store
        self._rows: list[dict[str, Any]] = []
        self._files = contextlib.ExitStack()
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> SlidePredictions:
        return self

    def add(self, result: ShardResult) -> None:
        self._rows.append({"slide": redact(result.input), "tiles": result.items, **_flatten(result.shard_outputs)})
        if len(self._rows) >= self.ROWS:
            self._flush()

    def _flush(self) -> None:
        table = _table(self._rows)
        if self._writer is None:
            f = self._files.enter_context(self.store.open_write(SLIDE_PREDICTIONS))
            self._writer = pq.ParquetWriter(f, table.schema)
        self._writer.write_table(table.cast(self._writer.schema))
        self._rows = []

    def __exit__(self, kind: Any, *rest: Any) -> None:
        try:
            if kind is None and (self._rows or self._writer is None):
                self._flush()
            if self._writer is not None:
                self._writer.close()
        finally:
            self._files.__exit__(kind, *rest)


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    names = list(dict.fromkeys(k for row in rows for k in row))
    columns: dict[str, Any] = {"slide": pa.array([r["slide"] for r in rows], pa.string()),
                               "tiles": pa.array([r["tiles"] for r in rows], pa.int64())}
    for name in names[2:]:
        values = [row.get(name) for row in rows]
        listed = any(isinstance(v, list) for v in values)
        columns[name] = pa.array(values, pa.list_(pa.float64()) if listed else pa.float64())
    return pa.table(columns)


def _flatten(outputs: dict[str, Any]) -> dict[str, Any]:
    """Output name -> columns: ``name`` for one value, ``name_i`` for a few, a list for many."""
    out: dict[str, Any] = {}
    for name, value in outputs.items():
        flat = np.array(value, dtype=np.float64).ravel()  # None (no tiles) becomes NaN
        cells = [None if np.isnan(v) else float(v) for v in flat]
        if len(cells) == 1:
            out[name] = cells[0]
        elif len(cells) <= MAX_PARQUET_WIDTH:
            out.update({f"{name}_{i}": v for i, v in enumerate(cells)})
        else:
            out[name] = cells
    return out
