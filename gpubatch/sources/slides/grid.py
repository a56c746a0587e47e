"""Where the tiles are: the pyramid level to read, the tile grid at the target resolution, blocks.

The grid is computed at the pyramid level nearest to (and not coarser than) the requested mpp;
only the remainder is resampled, never level 0 then shrink. Tiles are read in blocks: one read
unit covers a block of neighbouring grid tiles (about ``tiles.read_block`` pixels on a side at the
read level), so each stored tile is fetched and decoded once per block, then sliced into items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from gpubatch.core.errors import InputError
from gpubatch.sources.slides.backends import SlideInfo
from gpubatch.spec import TilesSpec

MPP_TOLERANCE = 0.1  # a slide scanned up to 10% coarser than asked still counts as that mpp
#: level-0 resolutions outside this range are not scans: a TIFF resolution tag of 72 or 96 per
#: inch (352.8 or 264.6 um/px) is what image software writes for screens; no slide scanner
#: records coarser than 10 um/px or finer than 0.01 um/px at level 0
PLAUSIBLE_MPP = (0.01, 10.0)
SCREEN_DPI = (72.0, 96.0, 150.0, 300.0)
#: across and down resolutions this close (relative) are one: the rounding of a tag or a format
SQUARE_TOLERANCE = 0.01


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles are: level-0 corners, the level read, and the read size at that level."""

    level: int
    level_downsample: float
    downsample: float  # target pixel size / level-0 pixel size
    read_size: int  # edge of one tile at ``level``, before resampling to ``size``
    size: int
    xs: np.ndarray  # level-0 x of each tile's top-left, int64
    ys: np.ndarray
    cols: np.ndarray  # grid column / row of each tile, for blocking
    rows: np.ndarray
    #: level-0 pixels between neighbouring grid tiles: the grid's stride, whichever tiles are
    #: kept (the tissue filter leaves any two first tiles, no longer neighbours)
    step: float
    mpp: float | None = None  # the level-0 microns per pixel used (the slide's, or the fallback)
    notes: tuple[str, ...] = ()  # what the reader of the report should know (a tag ignored)

    def __len__(self) -> int:
        return len(self.xs)

    def subset(self, keep: np.ndarray) -> TileGrid:
        return replace(self, xs=self.xs[keep], ys=self.ys[keep], cols=self.cols[keep], rows=self.rows[keep])


def _implausible(info: SlideInfo) -> str | None:
    """Why the slide's recorded mpp is not a scan resolution, naming the tag; None when it is one
    (or none is recorded). A tag the backend could not read as a number (``mpp_ignored``: n/0)
    is one such reason: missing MPP, said as an implausible tag is.

    The derived um/px is shown only for screen resolutions, where it explains the tag; for other
    out-of-range values (a garbled tag) it is noise, and would read as a claim about the scan.
    """
    mpp = info.mpp
    if mpp is None:
        return info.mpp_ignored or None
    tag = info.mpp_source or "the slide's metadata"
    if math.isfinite(mpp) and PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
        return None
    if any(f"XResolution {dpi:g} per inch" in tag for dpi in SCREEN_DPI):
        why = f"a screen resolution written by image software ({mpp:.4g} um/px at level 0), not a scan's"
    else:
        why = f"not a scan resolution: outside {PLAUSIBLE_MPP[0]:g}-{PLAUSIBLE_MPP[1]:g} um/px at level 0"
    return f"{tag} is {why}"


def level0_mpp(info: SlideInfo, tiles: TilesSpec, uri: str) -> tuple[float | None, list[str]]:
    """The level-0 microns per pixel to work with, and notes: the slide's own when plausible,
    else ``tiles.mpp_fallback`` (said in a note), else an InputError saying what to set."""
    ignored = _implausible(info)
    mpp = None if ignored else info.mpp
    notes = [f"{ignored}, so it counts as missing MPP"] if ignored else []
    notes += _square_or_refused(info, tiles, uri) if mpp is not None else []
    if mpp is not None or tiles.level is not None:
        return mpp, notes
    if tiles.mpp_fallback is not None:
        why = "its resolution tag is implausible" if ignored else "it records no microns-per-pixel (MPP)"
        return tiles.mpp_fallback, [*notes, f"{why}: level 0 taken as tiles.mpp_fallback = "
                                            f"{tiles.mpp_fallback:g} um/px"]
    raise InputError(uri, "the file records no microns-per-pixel (MPP)" + (f" ({ignored})" if ignored else "")
                     + ", so tiles.mpp cannot be honoured; set tiles.mpp_fallback (the scan's um/px, for "
                       "slides without one) or tiles.level instead (tiles.level: 0 for full resolution)")


def _not_square(info: SlideInfo) -> str | None:
    """What the slide records of its pixels when they are not square (um/px across and down more
    than SQUARE_TOLERANCE apart); None when they are, or when it records one figure."""
    x, y = info.mpp, info.mpp_y
    if x is None or y is None or abs(y - x) <= SQUARE_TOLERANCE * x:
        return None
    return f"the pixels are not square: {x:.4g} um/px across ({info.mpp_source}) but {y:.4g} um/px down"


def _square_or_refused(info: SlideInfo, tiles: TilesSpec, uri: str) -> list[str]:
    """Notes for pixels that are not square under ``tiles.level``; an InputError under
    ``tiles.mpp``, which no single figure can honour: tiles would come out squashed (the
    across figure alone was used before), and ``tiles.mpp_fallback`` would squash them too."""
    skewed = _not_square(info)
    if skewed is None:
        return []
    if tiles.level is None:
        raise InputError(uri, f"{skewed}, so tiles at tiles.mpp would have the wrong aspect; set tiles.level "
                              "(tiles.level: 0 for full resolution) to tile the file's own pixels, or "
                              "resample the slide to square pixels")
    return [f"{skewed}: tiles.level {tiles.level} tiles the file's own pixels"]


def choose_level(info: SlideInfo, tiles: TilesSpec, uri: str) -> tuple[int, float]:
    """(level to read, target downsample from level 0) for the spec's mpp or level."""
    return _choose(info, tiles, uri, level0_mpp(info, tiles, uri)[0])


def _choose(info: SlideInfo, tiles: TilesSpec, uri: str, mpp: float | None) -> tuple[int, float]:
    if tiles.level is not None:
        if tiles.level >= len(info.level_dimensions):
            raise InputError(uri, f"tiles.level {tiles.level} does not exist: the slide has "
                                  f"{len(info.level_dimensions)} levels (0-{len(info.level_dimensions) - 1})")
        return tiles.level, info.level_downsamples[tiles.level]
    assert tiles.mpp is not None and mpp is not None
    downsample = tiles.mpp / mpp
    if downsample < 1.0 - MPP_TOLERANCE:
        raise InputError(uri, f"slide is scanned at {mpp:.3f} mpp, coarser than the requested "
                              f"{tiles.mpp} mpp; lower-resolution tiles would need upsampling")
    downsample = max(downsample, 1.0)
    level = 0
    for i, ds in enumerate(info.level_downsamples):
        if ds <= downsample * 1.01:
            level = i
    return level, downsample


def check_level_size(info: SlideInfo, level: int, tiles: TilesSpec, uri: str, why: str) -> None:
    """Refuse a level larger than ``tiles.max_level_pixels`` before any of it is read."""
    w, h = info.level_dimensions[level]
    if w * h > tiles.max_level_pixels:
        raise InputError(uri, f"level {level} ({why}) is {w} x {h} pixels, over tiles.max_level_pixels "
                              f"({tiles.max_level_pixels}); raise it if the slide is real")


def make_grid(info: SlideInfo, tiles: TilesSpec, uri: str) -> TileGrid:
    """Every complete tile of the slide at the requested resolution, row-major.

    Bounded before anything is allocated: the level read must fit ``tiles.max_level_pixels``,
    the grid ``tiles.max_tiles`` and one tile ``tiles.max_read_bytes``.
    """
    mpp, notes = level0_mpp(info, tiles, uri)
    level, downsample = _choose(info, tiles, uri, mpp)
    check_level_size(info, level, tiles, uri, "the level tiles are read from")
    level_ds = info.level_downsamples[level]
    read_size = max(1, int(round(tiles.size * downsample / level_ds)))
    if read_size * read_size * 3 > tiles.max_read_bytes:
        raise InputError(uri, f"one tile is read as {read_size} x {read_size} pixels at level {level}, "
                              f"over tiles.max_read_bytes ({tiles.max_read_bytes} bytes)")
    extent = tiles.size * downsample  # tile edge in level-0 pixels
    step = max(extent * (1.0 - tiles.overlap), 1.0)
    w0, h0 = info.level_dimensions[0]
    nx = int(math.floor((w0 - extent) / step)) + 1 if w0 >= extent else 0
    ny = int(math.floor((h0 - extent) / step)) + 1 if h0 >= extent else 0
    if nx * ny > tiles.max_tiles:
        raise InputError(uri, f"the grid has {nx} x {ny} = {nx * ny} tiles, over tiles.max_tiles "
                              f"({tiles.max_tiles}); raise it, or lower tiles.overlap")
    col_grid, row_grid = np.meshgrid(np.arange(nx), np.arange(ny))
    cols, rows = col_grid.ravel(), row_grid.ravel()
    xs = np.round(cols * step).astype(np.int64)
    ys = np.round(rows * step).astype(np.int64)
    return TileGrid(level, level_ds, downsample, read_size, tiles.size, xs, ys, cols, rows, step, mpp, tuple(notes))


def resize(tiles: np.ndarray, size: int) -> np.ndarray:
    """Resample (k, s, s, 3) tiles to (k, size, size, 3): box filter for integer factors, else PIL."""
    k, s = tiles.shape[0], tiles.shape[1]
    if s == size:
        return tiles
    if s % size == 0:
        f = s // size
        return tiles.reshape(k, size, f, size, f, 3).mean(axis=(2, 4)).round().astype(np.uint8)
    from PIL import Image

    out = np.empty((k, size, size, 3), dtype=np.uint8)
    for i in range(k):
        out[i] = np.asarray(Image.fromarray(tiles[i]).resize((size, size), Image.Resampling.BILINEAR))
    return out


def block_ids(grid: TileGrid, read_block: int, max_read_bytes: int | None = None) -> np.ndarray:
    """Block id of each tile: tiles whose level-pixel extent fits in about read_block share a block.

    A block holds at most ``max_read_bytes`` of decoded tiles: with a large overlap many tiles
    share each read pixel, and a block of ``read_block`` pixels would otherwise hold thousands.
    Blocks are cut from the grid's stride, never from where its first two tiles lie: after the
    tissue filter those may be far apart (a read per tile) or on two rows (reads of the cap's size).
    """
    step_level = max(grid.step / grid.level_downsample, 1.0)
    per_block = max(1, int((read_block - grid.read_size) // max(step_level, 1)) + 1)
    if max_read_bytes is not None:
        fits = int(math.isqrt(max(max_read_bytes // (grid.read_size * grid.read_size * 3), 1)))
        per_block = max(1, min(per_block, fits))
    bcols = grid.cols // per_block
    brows = grid.rows // per_block
    return brows * (int(bcols.max()) + 1 if len(bcols) else 1) + bcols


