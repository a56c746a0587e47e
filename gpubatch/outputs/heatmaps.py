"""heatmaps/<slide>.png: each slide's tile grid coloured by one output, drawn from predictions only.

The picture is the slide as a viewer shows it (for a scan inside a larger canvas, the scan:
openslide's bounds), scaled to at most MAX_EDGE pixels a side in the slide's proportions, so it
overlays the slide's thumbnail; its ``gpubatch:region`` text chunk gives the level-0 region it
spans. It is made from predictions.parquet (tile positions and one value per tile), never from
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
        store.write_bytes(name, png(draw(table, coloured, grid), coloured, _shown(table, grid)))
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
    """(h, w, 3) uint8: the slide as viewers show it (``grid.shown``), one ``cell`` x ``cell``
    block per tile at its place on the grid, cut where the slide ends: the picture has the
    slide's proportions, ``cell / grid.stride`` pixels per level-0 pixel (whole cells of the
    grid were 1.67:1 for a 2:1 slide). Tiles outside the shown part are left out."""
    left, top, width, height = _shown(table, grid)
    col0, row0 = math.floor(left / grid.stride), math.floor(top / grid.stride)
    cols = max(1, math.ceil((left + width) / grid.stride) - col0)
    rows = max(1, math.ceil((top + height) / grid.stride) - row0)
    cell = max(1, min(MAX_CELL, MAX_EDGE // max(cols, rows)))
    image = np.empty((rows * cell, cols * cell, 3), np.uint8)
    image[:] = EMPTY
    blocks = image.reshape(rows, cell, cols, cell, 3)
    for lo in range(0, len(table), CHUNK_ROWS):  # in order: a later tile on the same cell wins, as before
        part = table.slice(lo, CHUNK_ROWS)
        c = np.round(_column(part, "x") / grid.stride).astype(int) - col0
        r = np.round(_column(part, "y") / grid.stride).astype(int) - row0
        inside = (c >= 0) & (c < cols) & (r >= 0) & (r < rows)
        rgb = colours(coloured.values[lo:lo + CHUNK_ROWS], coloured.low, coloured.high)
        blocks[r[inside], :, c[inside], :] = rgb[inside][:, None, None, :]
    scale = cell / grid.stride
    x0, y0 = round((left - col0 * grid.stride) * scale), round((top - row0 * grid.stride) * scale)
    return image[y0:y0 + max(1, math.ceil(height * scale)), x0:x0 + max(1, math.ceil(width * scale))]


def _shown(table: pa.Table, grid: SlideGrid) -> tuple[float, float, float, float]:
    """The level-0 region the picture spans: the grid's, or where its size was not recorded
    (0), the tiles' own extent."""
    left, top, width, height = grid.shown
    if width > 0 and height > 0:
        return left, top, width, height
    reach = max(grid.extent, grid.stride)
    far = [float(_column(table, c).max()) if len(table) else 0.0 for c in ("x", "y")]
    return 0.0, 0.0, far[0] + reach, far[1] + reach


def png(image: np.ndarray, coloured: Coloured, region: tuple[float, float, float, float] | None = None) -> bytes:
    """The picture as PNG bytes, its text chunks (ahead of the image data, where a reader finds
    them without decoding it) saying what coloured it, on what range, and the level-0 region
    (x y width height, openslide's frame) it spans, for an overlay. zlib's default level,
    not ``optimize``: a run's end draws one per slide, and optimize took 2.4x the time for a file
    a tenth smaller."""
    import io

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("gpubatch:colour", coloured.name)
    info.add_text("gpubatch:range", f"{coloured.low:.6g} {coloured.high:.6g}")
    if region is not None:
        info.add_text("gpubatch:region", " ".join(f"{v:g}" for v in region))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
