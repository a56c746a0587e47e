"""Tissue detection: Otsu on the saturation of a thumbnail read from the coarsest pyramid level
(on its darkness for grayscale slides, which have no stain colour).

The thumbnail is the slide's own coarsest level read in blocks, never the file's embedded
thumbnail image (which must not be used or copied); tiles whose tissue fraction is below
``tiles.tissue.min_fraction`` are dropped from the grid before any level-0 pixel is read.
"""

from __future__ import annotations

import math

import numpy as np

from gpubatch.core.clocks import StageClocks
from gpubatch.ops.kernels import tissue_fraction
from gpubatch.sources.slides.backends import SlideBackend
from gpubatch.sources.slides.grid import TileGrid
from gpubatch.spec import TilesSpec

THUMBNAIL_EDGE = 1024  # ample: a tile spans tens of mask pixels at this size
MIN_SATURATION = 0.07  # below this no pixel is tissue, whatever Otsu says (blank slides)
#: grayscale slides: a pixel lighter than 80% white is glass, whatever Otsu says (blank slides,
#: whose glass scans at 220-250 and whose noise Otsu would split in two); tissue is darker
MIN_DARKNESS = 0.2


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values (between-class variance maximised over 256 bins)."""
    flat = values.ravel()
    hist = np.zeros(256, dtype=np.float64)
    for start in range(0, len(flat), 1 << 16):  # bincount widens to int64: 8 bytes per pixel at once
        hist += np.bincount(flat[start : start + (1 << 16)], minlength=256)
    total = hist.sum()
    if total == 0:
        return 255.0
    weight_bg = np.cumsum(hist)
    weight_fg = total - weight_bg
    cum_mean = np.cumsum(hist * np.arange(256))
    mean_bg = cum_mean / np.maximum(weight_bg, 1)
    mean_fg = (cum_mean[-1] - cum_mean) / np.maximum(weight_fg, 1)
    between = weight_bg * weight_fg * (mean_bg - mean_fg) ** 2
    return float(np.argmax(between))


def tissue_mask(thumb: np.ndarray, grayscale: bool = False) -> np.ndarray:
    """Otsu on HSV saturation: stained tissue is saturated, glass and background are not.

    A grayscale slide (its gray in all three channels) has no saturation anywhere, so all of it
    read as glass: there, Otsu on darkness instead (tissue absorbs light, glass lets it through).
    """
    if grayscale:
        dark = 255 - thumb[..., 0]
        return dark > max(otsu_threshold(dark), MIN_DARKNESS * 255)
    sat = np.empty(thumb.shape[:2], dtype=np.uint8)
    # In strips of rows: a slide opens beside another shard's running batches, and the textbook
    # expression over the whole thumbnail held five thumbnail-sized temporaries at once.
    for top in range(0, thumb.shape[0], 128):
        strip = thumb[top : top + 128]
        r, g, b = strip[..., 0], strip[..., 1], strip[..., 2]
        mx = np.maximum(np.maximum(r, g), b)
        wide = np.subtract(mx, np.minimum(np.minimum(r, g), b), dtype=np.uint16)
        wide *= 255
        wide //= np.maximum(mx, 1)
        sat[top : top + 128] = wide
    threshold = max(otsu_threshold(sat), MIN_SATURATION * 255)
    return sat > threshold


def read_thumbnail(backend: SlideBackend, clocks: StageClocks, read_block: int) -> tuple[np.ndarray, float]:
    """The coarsest pyramid level, subsampled to at most THUMBNAIL_EDGE; (image, level-0 px per px).

    Read in blocks so that a slide without a small level never needs the whole level in memory.
    (This is never the file's embedded thumbnail image, which must not be used or copied.)
    """
    info = backend.info
    level = len(info.level_dimensions) - 1
    step = max(1, math.ceil(max(info.level_dimensions[level]) / THUMBNAIL_EDGE))
    return backend.read_subsampled(level, step, read_block, clocks), info.level_downsamples[level] * step


def filter_tissue(grid: TileGrid, backend: SlideBackend, tiles: TilesSpec, clocks: StageClocks) -> TileGrid:
    if tiles.tissue.method == "none" or len(grid) == 0:
        return grid
    thumb, thumb_ds = read_thumbnail(backend, clocks, tiles.read_block)
    mask = tissue_mask(thumb, backend.grayscale)
    del thumb  # not needed beside the integral image
    extent = grid.size * grid.downsample
    boxes = np.stack([grid.xs / thumb_ds, grid.ys / thumb_ds,
                      (grid.xs + extent) / thumb_ds, (grid.ys + extent) / thumb_ds], axis=1)
    fraction = tissue_fraction(mask, np.floor(boxes).astype(np.int64))
    keep = fraction >= tiles.tissue.min_fraction if tiles.tissue.min_fraction > 0 else np.ones(len(grid), bool)
    return grid.subset(keep)


