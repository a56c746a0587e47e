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
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from gpubatch.core.phases import Phase
from gpubatch.outputs.layout import HEATMAPS_DIR, heatmap_name
from gpubatch.outputs.per_slide import (
    SlideGrid,
    SlideRows,
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
    """What colours a picture: the column (or, for the top class probability, each row's largest
    of the columns) with the name and range the legend gives. Values are made from each chunk
    of rows as it is drawn (``values``), never held for the whole slide."""

    name: str
    columns: tuple[str, ...]
    low: float
    high: float

    def values(self, part: pa.Table) -> np.ndarray:
        """The chunk's values in float64: one column's, or each row's largest (NaN if any is)."""
        if len(self.columns) == 1:
            return _column(part, self.columns[0])
        return np.column_stack([_column(part, n) for n in self.columns]).max(1)


def write_heatmaps(store: OutputStore, slides: dict[str, tuple[str, SlideGrid]], by: str = "auto",
                   progress: Phase | None = None) -> list[str]:
    """One PNG per slide of predictions.parquet; ``slides``: URI -> (key, grid). Returns the files'
    names under the output. ``progress`` (the run's end) counts the slides drawn."""
    if by == "none":
        return []
    written = []
    each_slide = iter_slides(store)
    if progress is not None:
        progress.step(f"drawing the heatmaps into {HEATMAPS_DIR}/", len(slides), "slide")
        each_slide = progress.counting(each_slide)
    for rows in each_slide:
        if rows.slide not in slides or not rows.num_rows:
            continue
        coloured = choose_values(rows, by)
        if coloured is None:
            if by != "auto":
                log.warning("heatmaps: predictions.parquet has no column %r for %s; no heatmap drawn",
                            by, slides[rows.slide][0])
            continue
        key, grid = slides[rows.slide]
        name = f"{HEATMAPS_DIR}/{heatmap_name(key)}"
        region = _shown(rows, grid)  # the grid's bounds, or its tiles' where it has no size
        store.write_bytes(name, png(draw(rows, coloured, replace(grid, bounds=region)), coloured, region))
        written.append(name)
    return written


def choose_values(rows: SlideRows, by: str) -> Coloured | None:
    """What colours a slide's picture (see the module docstring), or None."""
    if by not in ("auto", TOP_PROBABILITY):
        if by not in rows.column_names:
            return None
        return _scaled(rows, by, (by,), fixed=any(by in group for group in probability_groups(rows)))
    if by == "auto" and "attention" in rows.column_names:
        return _scaled(rows, "attention", ("attention",), fixed=False)
    groups = probability_groups(rows)
    if groups:
        return _scaled(rows, TOP_PROBABILITY, tuple(groups[0]), fixed=True)
    if by == TOP_PROBABILITY:
        return None
    singles = [n for n in output_columns_of(rows) if not n.rsplit("_", 1)[-1].isdigit()]
    return _scaled(rows, singles[0], (singles[0],), fixed=False) if singles else None


def _column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)


def _scaled(rows: SlideRows, name: str, columns: tuple[str, ...], fixed: bool) -> Coloured:
    """Probabilities on 0..1; other values from their smallest to their largest finite one on
    the slide (a pass over its rows); 0..1 when it has none."""
    coloured = Coloured(name, columns, 0.0, 1.0)
    if fixed:
        return coloured
    low, high = math.inf, -math.inf
    for part in rows.chunks(list(columns)):
        values = coloured.values(part)
        finite = values[np.isfinite(values)]
        if len(finite):
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    return replace(coloured, low=low, high=high) if low <= high else coloured


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


def draw(rows: SlideRows, coloured: Coloured, grid: SlideGrid) -> np.ndarray:
    """(h, w, 3) uint8: the slide as viewers show it (``grid.shown``), one ``cell`` x ``cell``
    block per tile at its place on the grid, cut where the slide ends: the picture has the
    slide's proportions, ``cell / grid.stride`` pixels per level-0 pixel (whole cells of the
    grid were 1.67:1 for a 2:1 slide). Tiles outside the shown part are left out."""
    left, top, width, height = grid.shown
    col0, row0 = math.floor(left / grid.stride), math.floor(top / grid.stride)
    cols = max(1, math.ceil((left + width) / grid.stride) - col0)
    rows_ = max(1, math.ceil((top + height) / grid.stride) - row0)
    cell = max(1, min(MAX_CELL, MAX_EDGE // max(cols, rows_)))
    # a pixel per tile, then each pixel made a cell: writing every tile's cell x cell block in
    # place took 3x the time (2 against 0.65 ms for a slide of 324 tiles, at each run's end)
    tiles = np.empty((rows_, cols, 3), np.uint8)
    tiles[:] = EMPTY
    for part in rows.chunks(["x", "y", *coloured.columns]):  # in order: a later tile on a cell wins
        c = np.round(_column(part, "x") / grid.stride).astype(int) - col0
        r = np.round(_column(part, "y") / grid.stride).astype(int) - row0
        inside = (c >= 0) & (c < cols) & (r >= 0) & (r < rows_)
        rgb = colours(coloured.values(part), coloured.low, coloured.high)
        tiles[r[inside], c[inside]] = rgb[inside]
    image = tiles if cell == 1 else np.repeat(np.repeat(tiles, cell, axis=0), cell, axis=1)
    scale = cell / grid.stride
    x0, y0 = round((left - col0 * grid.stride) * scale), round((top - row0 * grid.stride) * scale)
    return image[y0:y0 + max(1, math.ceil(height * scale)), x0:x0 + max(1, math.ceil(width * scale))]


def _shown(rows: SlideRows, grid: SlideGrid) -> tuple[int, int, int, int]:
    """The level-0 region the picture spans: the grid's, or where the slide's size was not
    recorded (0), its tiles' extent (a pass over their places)."""
    left, top, width, height = grid.shown
    if width > 0 and height > 0:
        return left, top, width, height
    far = [0.0, 0.0]
    for part in rows.chunks(["x", "y"]):
        far = [max(far[0], float(_column(part, "x").max())), max(far[1], float(_column(part, "y").max()))]
    reach = max(grid.extent, grid.stride)
    return 0, 0, math.ceil(far[0] + reach), math.ceil(far[1] + reach)


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
