"""predictions.parquet read back one slide at a time, for the outputs drawn per slide.

The per-slide GeoJSON and heatmaps are made from predictions only (never from pixels, so no tissue
and no label image can reach them). predictions.parquet holds each slide's rows together, in plan
order, so one pass over its row groups yields the slides in turn with memory of one slide's rows.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gpubatch.outputs.layout import PREDICTIONS
from gpubatch.outputs.store import OutputStore

INDEX_COLUMNS = ("slide", "x", "y", "level")
PROB_TOLERANCE = 1e-2
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


def iter_slides(store: OutputStore) -> Iterator[tuple[str, pa.Table]]:
    """(slide, its rows) for each slide of the output's predictions.parquet, in file order."""
    if not store.exists(PREDICTIONS):
        return
    with store.open_read(PREDICTIONS) as f:
        yield from _slides_of(pq.ParquetFile(f))


def _slides_of(pf: pq.ParquetFile) -> Iterator[tuple[str, pa.Table]]:
    if "slide" not in pf.schema_arrow.names:
        return
    current: str | None = None
    pieces: list[pa.Table] = []
    for i in range(pf.num_row_groups):
        group = pf.read_row_group(i)
        if group.num_rows == 0:
            continue
        slides = group.column("slide").to_numpy(zero_copy_only=False)
        starts = [0, *(np.flatnonzero(slides[1:] != slides[:-1]) + 1), len(slides)]
        for lo, hi in zip(starts[:-1], starts[1:], strict=True):
            if slides[lo] != current and pieces:
                yield str(current), pa.concat_tables(pieces)
                pieces = []
            current = slides[lo]
            pieces.append(group.slice(lo, hi - lo))
    if pieces:
        yield str(current), pa.concat_tables(pieces)


def output_columns_of(table: pa.Table) -> list[str]:
    """The numeric model-output columns of a slide's rows (not the index)."""
    return [f.name for f in table.schema if f.name not in INDEX_COLUMNS
            and (pa.types.is_floating(f.type) or pa.types.is_integer(f.type))]


def probability_groups(table: pa.Table) -> list[list[str]]:
    """Groups of columns ``name_0 .. name_k`` (k >= 1) whose rows are probabilities (sum to 1).

    A row with NaN or inf among them is a tile the model gave no answer for: it neither makes
    nor breaks a group (one such tile took the classification off every tile of its slide);
    a group needs at least one row that is an answer."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for name in output_columns_of(table):
        m = _VECTOR_COLUMN.match(name)
        if m:
            groups.setdefault(m.group("base"), []).append((int(m.group("i")), name))
    found = []
    for members in groups.values():
        names = [n for _, n in sorted(members)]
        if len(names) < 2:
            continue
        answers = [_probability_rows(table.slice(lo, CHUNK_ROWS), names) for lo in range(0, len(table), CHUNK_ROWS)]
        if answers and None not in answers and sum(a for a in answers if a is not None):
            found.append(names)
    return found


def finite_rows(values: np.ndarray) -> np.ndarray:
    """Which rows of an (n, k) array hold k finite values: the tiles the model answered."""
    return np.isfinite(values).all(1)


def _probability_rows(part: pa.Table, names: list[str]) -> int | None:
    """How many rows of ``part`` hold probabilities in ``names``, or None when one of its
    answered rows does not. Both tests are per row, so a slide passes when each of its chunks
    does (a slide's rows at once took (n, k) float64 twice)."""
    values = np.column_stack([part.column(n).to_numpy(zero_copy_only=False) for n in names]).astype(np.float64)
    answered = values[finite_rows(values)]
    if not (np.all(answered >= -PROB_TOLERANCE) and np.allclose(answered.sum(1), 1.0, atol=PROB_TOLERANCE)):
        return None
    return len(answered)
