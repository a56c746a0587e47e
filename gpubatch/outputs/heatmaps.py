"""heatmaps/<slide>.png: each slide's tile grid coloured by one output, drawn from predictions only.

The picture is made from predictions.parquet (tile positions and one value per tile), never from
pixels: no tissue, no label or macro image and no slide metadata can reach it, so it may be mailed
and shown in report.html. One pixel block per tile, on white where no tile was kept; viridis
colours, light grey for a tile whose value is missing.

What colours it (``output.heatmap``): ``auto`` takes the slide head's ``attention`` when there is
one, else the top class probability of a classifier (the largest of ``name_0 .. name_k`` that sum
to 1), else the first single-valued output; a column name picks that column; ``none`` draws
nothing. Probabilities keep a fixed 0..1 scale; other values (attention) are scaled from their
smallest to their largest on each slide, as attention heatmaps are. The PNG's text chunks record
what coloured it and the range, so a reader (report.html) can say so.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from gpubatch.outputs.layout import HEATMAPS_DIR, heatmap_name
from gpubatch.outputs.per_slide import (
    CHUNK_ROWS,
    SlideGrid,
    iter_slides,
    output_columns_of,
    probability_groups,
)
from gpubatch.outputs.store import OutputStore

log = logging.getLogger("gpubatch")

MAX_EDGE = 512  # longest side of a picture, pixels (before a cell shrinks to one pixel)
MAX_CELL = 32  # pixels per tile on small grids
EMPTY, MISSING = (255, 255, 255), (210, 210, 210)
#: viridis at 0, 0.25, 0.5, 0.75, 1 (matplotlib's values), interpolated linearly between
VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], np.float64)
TOP_PROBABILITY = "top class probability"


@dataclass(frozen=True)
class Coloured:
    """The values a picture shows: per tile, with the name and range the legend gives."""

    name: str
    values: np.ndarray
    low: float
    high: float


def write_heatmaps(store: OutputStore, slides: dict[str, tuple[str, SlideGrid]], by: str = "auto") -> list[str]:
    """One PNG per slide of predictions.parquet; ``slides``: URI -> (key, grid). Returns the files'
    names under the output."""
    if by == "none":
        return []
    written = []
    for slide, table in iter_slides(store):
        if slide not in slides or not len(table):
            continue
        coloured = choose_values(table, by)
        if coloured is None:
            if by != "auto":
                log.warning("heatmaps: predictions.parquet has no column %r for %s; no heatmap drawn",
                            by, slides[slide][0])
            continue
        key, grid = slides[slide]
        name = f"{HEATMAPS_DIR}/{heatmap_name(key)}"
        store.write_bytes(name, png(draw(table, coloured, grid), coloured))
        written.append(name)
    return written


def choose_values(table: pa.Table, by: str) -> Coloured | None:
    """The values that colour a slide's picture (see the module docstring), or None."""
    if by not in ("auto", TOP_PROBABILITY):
        if by not in table.column_names:
            return None
        return _scaled(by, _column(table, by), fixed=by in _probability_columns(table))
    if by == "auto" and "attention" in table.column_names:
        return _scaled("attention", _column(table, "attention"), fixed=False)
    groups = probability_groups(table)
    if groups:
        return _scaled(TOP_PROBABILITY, _top(table, groups[0]), fixed=True)
    if by == TOP_PROBABILITY:
        return None
    singles = [n for n in output_columns_of(table) if not n.rsplit("_", 1)[-1].isdigit()]
    return _scaled(singles[0], _column(table, singles[0]), fixed=False) if singles else None


def _top(table: pa.Table, names: list[str]) -> np.ndarray:
    """Each row's largest of ``names``, in float64, made CHUNK_ROWS rows at a time."""
    top = np.empty(len(table), np.float64)
    for lo in range(0, len(table), CHUNK_ROWS):
        part = table.slice(lo, CHUNK_ROWS)
        top[lo:lo + len(part)] = np.column_stack([_column(part, n) for n in names]).max(1)
    return top


def _column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)


def _probability_columns(table: pa.Table) -> set[str]:
    return {n for group in probability_groups(table) for n in group}


def _scaled(name: str, values: np.ndarray, fixed: bool) -> Coloured:
    finite = values[np.isfinite(values)]
    if fixed or not len(finite):
        return Coloured(name, values, 0.0, 1.0)
    return Coloured(name, values, float(finite.min()), float(finite.max()))


def colours(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """(n, 3) uint8 viridis colours of ``values`` on [low, high]; grey where not finite."""
    span = high - low if high > low else 1.0
    t = np.clip((values - low) / span, 0.0, 1.0)
    pos = np.nan_to_num(t, nan=0.0) * (len(VIRIDIS) - 1)
    i = np.minimum(pos.astype(int), len(VIRIDIS) - 2)
    frac = (pos - i)[:, None]
    rgb = VIRIDIS[i] * (1 - frac) + VIRIDIS[i + 1] * frac
    rgb[~np.isfinite(values)] = MISSING
    return np.round(rgb).astype(np.uint8)


def draw(table: pa.Table, coloured: Coloured, grid: SlideGrid) -> np.ndarray:
    """(h, w, 3) uint8: one ``cell`` x ``cell`` block per tile at its place on the slide's grid."""
    cols = max(1, math.ceil(grid.width / grid.stride))
    rows = max(1, math.ceil(grid.height / grid.stride))
    cell = max(1, min(MAX_CELL, MAX_EDGE // max(cols, rows)))
    image = np.empty((rows * cell, cols * cell, 3), np.uint8)
    image[:] = EMPTY
    blocks = image.reshape(rows, cell, cols, cell, 3)
    for lo in range(0, len(table), CHUNK_ROWS):  # in order: a later tile on the same cell wins, as before
        part = table.slice(lo, CHUNK_ROWS)
        c = np.clip(np.round(_column(part, "x") / grid.stride).astype(int), 0, cols - 1)
        r = np.clip(np.round(_column(part, "y") / grid.stride).astype(int), 0, rows - 1)
        rgb = colours(coloured.values[lo:lo + CHUNK_ROWS], coloured.low, coloured.high)
        blocks[r, :, c, :] = rgb[:, None, None, :]
    return image


def png(image: np.ndarray, coloured: Coloured) -> bytes:
    """The picture as PNG bytes, its text chunks (ahead of the image data, where a reader finds
    them without decoding it) saying what coloured it and on what range. zlib's default level,
    not ``optimize``: a run's end draws one per slide, and optimize took 2.4x the time for a file
    a tenth smaller."""
    import io

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("gpubatch:colour", coloured.name)
    info.add_text("gpubatch:range", f"{coloured.low:.6g} {coloured.high:.6g}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
