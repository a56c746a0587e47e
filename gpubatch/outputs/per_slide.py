"""predictions.parquet read back one slide at a time, for the outputs drawn per slide.

The per-slide GeoJSON and heatmaps are made from predictions only (never from pixels, so no tissue
and no label image can reach them). predictions.parquet holds each slide's rows together, in plan
order: one pass over its ``slide`` column (dictionary codes, 4 bytes a row) finds where each
slide's rows lie, and a slide's rows are then read from the file when asked, a chunk at a time
and only the columns asked for (``SlideRows.chunks``). Memory is one row group's columns (the
merge writes at most ``merge.ROW_GROUP_ROWS`` rows to one), whatever the slide's tile count: a
slide's whole table was read before, its URI column alone 80 bytes a row.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gpubatch.outputs.layout import PREDICTIONS
from gpubatch.outputs.store import OutputStore

INDEX_COLUMNS = ("slide", "x", "y", "level")
PROB_TOLERANCE = 1e-2
#: an int8 (QDQ) softmax stores each probability in steps of 1/255, each rounded by up to half a
#: step: k of them may sum k/510 away from 1 (20 classes summed to 252/255 in a real int8 run)
QUANTIZED_STEP = 1 / 255
#: a slide's rows examined or converted this many at a time: the outputs drawn per slide come
#: out the same, and their float64 temporaries stay this size whatever the slide's tile count
CHUNK_ROWS = 65536
_VECTOR_COLUMN = re.compile(r"^(?P<base>.+)_(?P<i>\d+)$")


@dataclass(frozen=True)
class SlideGrid:
    """Where a slide's tiles lie and what each was read from, in level-0 pixels: the slide's
    size, the grid's stride and a tile's edge; the downsample of the level read and a read's
    edge there (``read_size``; 0 where not recorded); and ``bounds``, the part of level 0 that
    viewers show as the image (``SlideInfo.bounds``; None: all of it)."""

    width: int
    height: int
    stride: float
    extent: float = 0.0
    level_downsample: float = 1.0
    read_size: int = 0
    bounds: tuple[int, int, int, int] | None = None

    @property
    def shown(self) -> tuple[int, int, int, int]:
        """(x, y, width, height): the part of level 0 that viewers show as the image."""
        return self.bounds if self.bounds is not None else (0, 0, self.width, self.height)

    def read_regions(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Where each tile's pixels came from, in the frame viewers show: (left, top, edge).

        A tile is read at its level from pixel round(x / downsample), read_size pixels on a
        side (``sources.slides.source._boxes``), then resized: its region is that box scaled to
        level 0, which differs from (x, y, extent) by up to half a pixel of the level read
        where the level or the resampling is not exact (a 153.6 px tile read as 77 px at
        downsample 2 covers 154)."""
        ds = self.level_downsample
        left, top = self.shown[:2]
        edge = self.read_size * ds if self.read_size else self.extent
        return np.round(xs / ds) * ds - left, np.round(ys / ds) * ds - top, edge


class SlideRows:
    """One slide's rows of predictions.parquet, read when asked: ``chunks`` yields at most
    CHUNK_ROWS rows of the columns asked for at a time, so a pass over a slide of millions of
    tiles holds a row group, never the slide."""

    def __init__(self, slide: str, schema: pa.Schema, spans: list[tuple[int, int, int]],
                 read_group: Callable[[int], pa.Table]):
        self.slide = slide
        self.schema = schema
        self.spans = spans  # (row group, first row, end row) in file order
        self._read_group = read_group

    @classmethod
    def of_table(cls, table: pa.Table, slide: str = "") -> SlideRows:
        """Rows already in memory, read the same way."""
        return cls(slide, table.schema, [(0, 0, table.num_rows)], lambda _: table)

    @property
    def num_rows(self) -> int:
        return sum(hi - lo for _, lo, hi in self.spans)

    @property
    def column_names(self) -> list[str]:
        return list(self.schema.names)

    def chunks(self, columns: list[str]) -> Iterator[pa.Table]:
        """The slide's rows in order, CHUNK_ROWS at most at a time, ``columns`` only."""
        for group, lo, hi in self.spans:
            table = self._read_group(group)
            for first in range(lo, hi, CHUNK_ROWS):
                yield table.slice(first, min(CHUNK_ROWS, hi - first)).select(columns)


class _RowGroups:
    """Row groups of predictions.parquet without their ``slide`` column, the last one read kept:
    the slides that share a row group, and each pass over one slide, read it once."""

    def __init__(self, pf: pq.ParquetFile):
        self.pf = pf
        self.columns = [n for n in pf.schema_arrow.names if n != "slide"]
        self.schema = pa.schema([pf.schema_arrow.field(n) for n in self.columns])
        self._kept: tuple[int, pa.Table] | None = None

    def read(self, group: int) -> pa.Table:
        if self._kept is None or self._kept[0] != group:
            self._kept = None  # the last one freed before the next is read
            self._kept = (group, self.pf.read_row_group(group, columns=self.columns))
        return self._kept[1]


def iter_slides(store: OutputStore) -> Iterator[SlideRows]:
    """Each slide of the output's predictions.parquet, in file order, its rows read when asked
    (while the iteration is under way: the file is open until it ends)."""
    if not store.exists(PREDICTIONS):
        return
    with store.open_read(PREDICTIONS) as f:
        pf = pq.ParquetFile(f, read_dictionary=["slide"])
        if "slide" not in pf.schema_arrow.names:
            return
        groups = _RowGroups(pf)
        for slide, spans in _slide_spans(pf):
            yield SlideRows(slide, groups.schema, spans, groups.read)


def _slide_spans(pf: pq.ParquetFile) -> Iterator[tuple[str, list[tuple[int, int, int]]]]:
    """(slide, its (row group, first, end) spans) for each run of a slide's rows, in file order."""
    current: str | None = None
    spans: list[tuple[int, int, int]] = []
    for group in range(pf.num_row_groups):
        for slide, lo, hi in _runs(pf.read_row_group(group, columns=["slide"]).column("slide")):
            if slide != current and spans:
                yield str(current), spans
                spans = []
            current = slide
            spans.append((group, lo, hi))
    if spans:
        yield str(current), spans


def _runs(column: pa.ChunkedArray) -> list[tuple[str, int, int]]:
    """(value, first, end) of each run of equal values of a string column, read as dictionary
    codes: a string is made per run, not per row."""
    runs: list[tuple[str, int, int]] = []
    offset = 0
    for chunk in column.chunks:
        coded = chunk if pa.types.is_dictionary(chunk.type) else chunk.dictionary_encode()
        codes = coded.indices.fill_null(-1).to_numpy(zero_copy_only=False)
        if not len(codes):
            continue
        starts = [0, *(np.flatnonzero(codes[1:] != codes[:-1]) + 1).tolist()]
        for lo, hi in zip(starts, [*starts[1:], len(codes)], strict=True):
            value = str(coded.dictionary[int(codes[lo])].as_py()) if codes[lo] >= 0 else "None"
            if runs and runs[-1][0] == value and runs[-1][2] == offset + lo:
                runs[-1] = (value, runs[-1][1], offset + hi)
            else:
                runs.append((value, offset + lo, offset + hi))
        offset += len(chunk)
    return runs


def output_columns_of(rows: SlideRows) -> list[str]:
    """The numeric model-output columns of a slide's rows (not the index)."""
    return [f.name for f in rows.schema if f.name not in INDEX_COLUMNS
            and (pa.types.is_floating(f.type) or pa.types.is_integer(f.type))]


def probability_groups(rows: SlideRows) -> list[list[str]]:
    """Groups of columns ``name_0 .. name_k`` (k >= 1) whose rows are probabilities (sum to 1,
    within what an int8 softmax's rounding allows), found in one pass over the slide's rows.

    A row with NaN or inf among them is a tile the model gave no answer for: it neither makes
    nor breaks a group (one such tile took the classification off every tile of its slide);
    a group needs at least one row that is an answer."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for name in output_columns_of(rows):
        m = _VECTOR_COLUMN.match(name)
        if m:
            groups.setdefault(m.group("base"), []).append((int(m.group("i")), name))
    candidates = [[n for _, n in sorted(members)] for members in groups.values() if len(members) >= 2]
    answered: list[int | None] = [0] * len(candidates)
    for part in rows.chunks(sorted({n for names in candidates for n in names})) if candidates else ():
        for g, names in enumerate(candidates):
            held = answered[g]
            if held is not None:
                found = _probability_rows(part, names)
                answered[g] = None if found is None else held + found
    return [names for names, count in zip(candidates, answered, strict=True) if count]


def finite_rows(values: np.ndarray) -> np.ndarray:
    """Which rows of an (n, k) array hold k finite values: the tiles the model answered."""
    return np.isfinite(values).all(1)


def _probability_rows(part: pa.Table, names: list[str]) -> int | None:
    """How many rows of ``part`` hold probabilities in ``names``, or None when one of its
    answered rows does not. Both tests are per row, so a slide passes when each of its chunks
    does (a slide's rows at once took (n, k) float64 twice)."""
    values = np.column_stack([part.column(n).to_numpy(zero_copy_only=False) for n in names]).astype(np.float64)
    answered = values[finite_rows(values)]
    off = max(PROB_TOLERANCE, len(names) * QUANTIZED_STEP / 2)
    if not (np.all(answered >= -PROB_TOLERANCE) and np.allclose(answered.sum(1), 1.0, rtol=0.0, atol=off)):
        return None
    return len(answered)
