"""Slides as a Source: tissue mask, tile grid at the requested resolution, and block reads.

The grid is computed at the pyramid level nearest to (and not coarser than) the requested mpp;
only the remainder is resampled, never level 0 then shrink. Tiles are read in blocks: one read
unit covers a block of neighbouring grid tiles (about ``tiles.read_block`` pixels on a side at the
read level), so each stored tile is fetched and decoded once per block, then sliced into items.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputError
from gpubatch.ops.kernels import normalize_tiles, tissue_fraction
from gpubatch.sources.base import ItemBlock, ReadUnit, Shard, ShardReader, Source
from gpubatch.sources.slides.backends import SlideBackend, SlideInfo
from gpubatch.spec import JobSpec, TilesSpec

MPP_TOLERANCE = 0.1  # a slide scanned up to 10% coarser than asked still counts as that mpp
THUMBNAIL_EDGE = 1024  # ample: a tile spans tens of mask pixels at this size
MIN_SATURATION = 0.07  # below this no pixel is tissue, whatever Otsu says (blank slides)


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

    def __len__(self) -> int:
        return len(self.xs)

    def subset(self, keep: np.ndarray) -> TileGrid:
        return TileGrid(self.level, self.level_downsample, self.downsample, self.read_size, self.size,
                        self.xs[keep], self.ys[keep], self.cols[keep], self.rows[keep])


def choose_level(info: SlideInfo, tiles: TilesSpec, uri: str) -> tuple[int, float]:
    """(level to read, target downsample from level 0) for the spec's mpp or level."""
    if tiles.level is not None:
        if tiles.level >= len(info.level_dimensions):
            raise InputError(uri, f"tiles.level {tiles.level} does not exist: the slide has "
                                  f"{len(info.level_dimensions)} levels (0-{len(info.level_dimensions) - 1})")
        return tiles.level, info.level_downsamples[tiles.level]
    assert tiles.mpp is not None
    if info.mpp is None:
        raise InputError(uri, "the file records no microns-per-pixel (MPP), so tiles.mpp cannot be "
                              "honoured; set tiles.level instead (tiles.level: 0 for full resolution)")
    downsample = tiles.mpp / info.mpp
    if downsample < 1.0 - MPP_TOLERANCE:
        raise InputError(uri, f"slide is scanned at {info.mpp:.3f} mpp, coarser than the requested "
                              f"{tiles.mpp} mpp; lower-resolution tiles would need upsampling")
    downsample = max(downsample, 1.0)
    level = 0
    for i, ds in enumerate(info.level_downsamples):
        if ds <= downsample * 1.01:
            level = i
    return level, downsample


def make_grid(info: SlideInfo, tiles: TilesSpec, uri: str) -> TileGrid:
    """Every complete tile of the slide at the requested resolution, row-major."""
    level, downsample = choose_level(info, tiles, uri)
    level_ds = info.level_downsamples[level]
    read_size = max(1, int(round(tiles.size * downsample / level_ds)))
    extent = tiles.size * downsample  # tile edge in level-0 pixels
    step = max(extent * (1.0 - tiles.overlap), 1.0)
    w0, h0 = info.level_dimensions[0]
    nx = int(math.floor((w0 - extent) / step)) + 1 if w0 >= extent else 0
    ny = int(math.floor((h0 - extent) / step)) + 1 if h0 >= extent else 0
    col_grid, row_grid = np.meshgrid(np.arange(nx), np.arange(ny))
    cols, rows = col_grid.ravel(), row_grid.ravel()
    xs = np.round(cols * step).astype(np.int64)
    ys = np.round(rows * step).astype(np.int64)
    return TileGrid(level, level_ds, downsample, read_size, tiles.size, xs, ys, cols, rows)


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


def tissue_mask(thumb: np.ndarray) -> np.ndarray:
    """Otsu on HSV saturation: stained tissue is saturated, glass and background are not."""
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
    w, h = info.level_dimensions[level]
    step = max(1, math.ceil(max(w, h) / THUMBNAIL_EDGE))
    block = max(step, (read_block // step) * step)
    if step == 1 and block >= max(w, h):  # the whole level in one read is the thumbnail itself
        return backend.read_boxes(level, np.array([[0, 0, w, h]]), clocks)[0], info.level_downsamples[level]
    out = np.empty((math.ceil(h / step), math.ceil(w / step), 3), dtype=np.uint8)
    for y in range(0, h, block):
        for x in range(0, w, block):
            bw, bh = min(block, w - x), min(block, h - y)
            region = backend.read_boxes(level, np.array([[x, y, bw, bh]]), clocks)[0]
            sub = region[::step, ::step]
            out[y // step : y // step + sub.shape[0], x // step : x // step + sub.shape[1]] = sub
    return out, info.level_downsamples[level] * step


def filter_tissue(grid: TileGrid, backend: SlideBackend, tiles: TilesSpec, clocks: StageClocks) -> TileGrid:
    if tiles.tissue.method == "none" or len(grid) == 0:
        return grid
    thumb, thumb_ds = read_thumbnail(backend, clocks, tiles.read_block)
    mask = tissue_mask(thumb)
    del thumb  # not needed beside the integral image
    extent = grid.size * grid.downsample
    boxes = np.stack([grid.xs / thumb_ds, grid.ys / thumb_ds,
                      (grid.xs + extent) / thumb_ds, (grid.ys + extent) / thumb_ds], axis=1)
    fraction = tissue_fraction(mask, np.floor(boxes).astype(np.int64))
    keep = fraction >= tiles.tissue.min_fraction if tiles.tissue.min_fraction > 0 else np.ones(len(grid), bool)
    return grid.subset(keep)


def _resize(tiles: np.ndarray, size: int) -> np.ndarray:
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


def _block_ids(grid: TileGrid, read_block: int) -> np.ndarray:
    """Block id of each tile: tiles whose level-pixel extent fits in about read_block share a block."""
    step_level = max((grid.xs[1] - grid.xs[0]) / grid.level_downsample, 1.0) if len(grid) > 1 else grid.read_size
    per_block = max(1, int((read_block - grid.read_size) // max(step_level, 1)) + 1)
    bcols = grid.cols // per_block
    brows = grid.rows // per_block
    return brows * (int(bcols.max()) + 1 if len(bcols) else 1) + bcols


class SlideReader(ShardReader):
    """One slide on a worker: the grid is computed here, after the slide is opened."""

    def __init__(self, shard: Shard, job: JobSpec, backend: SlideBackend, clocks: StageClocks):
        self.shard, self.job, self.backend = shard, job, backend
        grid = make_grid(backend.info, job.tiles, shard.input_uri)
        self.grid = filter_tissue(grid, backend, job.tiles, clocks)
        self.clocks = clocks
        norm = job.model.input
        self._norm = partial(normalize_tiles, mean=norm.mean, std=norm.std, layout=norm.layout)
        self.attrs = {
            "slide": shard.input_uri, "level": self.grid.level, "tile_size": job.tiles.size,
            "mpp": (backend.info.mpp * self.grid.downsample) if backend.info.mpp else None,
            "read_size": self.grid.read_size, "extent_level0": job.tiles.size * self.grid.downsample,
            "grid_tiles": len(grid), "tissue_tiles": len(self.grid),
            "slide_info": backend.info.as_dict(),
        }

    @property
    def n_items(self) -> int:
        return len(self.grid)

    def read_units(self) -> Iterator[ReadUnit]:
        if not len(self.grid):
            return
        blocks = _block_ids(self.grid, self.job.tiles.read_block)
        order = np.argsort(blocks, kind="stable")
        bounds = np.flatnonzero(np.diff(blocks[order])) + 1
        units = np.split(order, bounds)
        self.backend.expect_reads(self.grid.level, (self._boxes(members) for members in units))
        for members in units:
            yield partial(self._read_block, members)

    def _boxes(self, members: np.ndarray) -> np.ndarray:
        """Level-pixel boxes (x, y, w, h) of the grid tiles ``members``."""
        g = self.grid
        lx = np.round(g.xs[members] / g.level_downsample).astype(np.int64)
        ly = np.round(g.ys[members] / g.level_downsample).astype(np.int64)
        return np.stack([lx, ly, np.full_like(lx, g.read_size), np.full_like(ly, g.read_size)], axis=1)

    def _read_block(self, members: np.ndarray) -> ItemBlock:
        g = self.grid
        tiles = self.backend.read_boxes(g.level, self._boxes(members), self.clocks)
        with self.clocks.part("resample"):
            tiles = _resize(tiles, g.size)
        n = len(members)
        index = {
            "x": g.xs[members], "y": g.ys[members],
            "level": np.full(n, g.level, dtype=np.int32),
        }
        return ItemBlock(tiles, index)

    def to_model_input(self, batch: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return self._norm(batch, out=out)

    def device_preprocess(self) -> tuple[str, dict[str, Any]] | None:
        norm = self.job.model.input
        return "tiles", {"mean": norm.mean, "std": norm.std, "layout": norm.layout}

    def close(self) -> None:
        self.backend.close()


def slide_key(uri: str) -> str:
    """A short, filesystem-safe, collision-free name for a slide's outputs."""
    stem = os.path.basename(uri.rstrip("/")) or "slide"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:80]
    return f"{safe}-{hashlib.sha1(uri.encode()).hexdigest()[:8]}"


class SlideSource(Source):
    kind = "slides"

    def plan(self, job: JobSpec) -> tuple[list[Shard], list[dict[str, str]]]:
        from gpubatch.io.storage import expand_uris

        failed: list[dict[str, str]] = []
        uris: list[str] = []
        for pattern in job.input.uris:
            try:
                found = expand_uris([pattern], job.input.storage)
            except InputError as exc:  # a listing that kept failing: that pattern, not the run
                failed.append({"input": pattern, "error": exc.message})
                continue
            if not found:
                failed.append({"input": pattern, "error": "matches no file (check the path or glob)"})
            uris.extend(u for u in found if u not in uris)
        return [Shard(slide_key(u), u, {}) for u in uris], failed

    def open(self, shard: Shard, job: JobSpec, clocks: StageClocks) -> ShardReader:
        from gpubatch.io.retry import RetryPolicy
        from gpubatch.sources.slides.open import open_slide_input

        backend = open_slide_input(shard.input_uri, clocks, access=job.input.access,
                                   options=job.input.storage,
                                   policy=RetryPolicy(attempts=job.run.storage_attempts))
        try:
            return SlideReader(shard, job, backend, clocks)
        except BaseException:
            backend.close()
            raise

    def model_input(self, job: JobSpec, batch_size: int) -> tuple[tuple[int, ...], str]:
        size = job.tiles.size
        item = (3, size, size) if job.model.input.layout == "NCHW" else (size, size, 3)
        return (batch_size, *item), "float32"

    def index_schema(self, job: JobSpec) -> list[str]:
        return ["slide", "x", "y", "level"]
