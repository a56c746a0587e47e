"""Whole-slide image backends: the interface (``SlideBackend``) and the machinery shared by
backends that read a grid of stored tiles (``TileGridBackend``: tifffile's in ``tiff_backend``,
DICOM frames in ``dicom``); openslide, the fallback, is ``openslide_backend``; ``open.open_slide``
picks the backend for a file.

Decode is usually what limits a slide pipeline, so TIFF-family slides (SVS, generic and OME TIFF)
are decoded here tile by tile with tifffile/imagecodecs: a read of many boxes fetches every stored
tile it needs once, with neighbouring byte ranges coalesced into one request, and decodes each
stored tile once. Formats tifffile cannot read (MRXS, NDPI, ...) go through openslide.

Only an allowlist of metadata leaves this module (dimensions, levels, mpp, magnification,
vendor): label, macro and thumbnail images and any other slide properties never do.
"""

from __future__ import annotations

import itertools
import threading
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import GpubatchError

#: the one list of TIFF-family suffixes: tifffile tile-decodes these, and they stream by range
TIFF_SUFFIXES = (".svs", ".tif", ".tiff", ".btf", ".tf8", ".qptiff")
METADATA_ALLOWLIST = ("width", "height", "level_count", "level_dimensions", "level_downsamples",
                      "mpp", "mpp_source", "magnification", "vendor", "backend", "bounds")
WHITE = 255
JPEG = 7  # TIFF compression tag value
#: TIFF compression tag values of JPEG 2000 (Aperio's two, and the standard one)
JPEG2000 = (33003, 33004, 33005, 34712)
YCBCR, RGB, MINISBLACK, MINISWHITE = 6, 2, 1, 0  # TIFF photometric tag values


@dataclass(frozen=True)
class SlideInfo:
    """The allowlisted metadata of a slide: all that may reach an output, report or log."""

    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    magnification: float | None
    vendor: str
    backend: str
    #: the tag the mpp was read from, as a reader would name it ("TIFF XResolution 72 per inch")
    mpp_source: str = ""
    #: why a resolution the file records counts as missing (``mpp`` is then None), naming the tag
    #: ("TIFF XResolution 40000/0 per centimeter has a zero denominator: no resolution"). It
    #: reaches the report as the grid's note or error (grid.level0_mpp), so as_dict leaves it out
    mpp_ignored: str = ""
    #: level-0 um/px down, where the file records it apart from ``mpp`` (across); None where it
    #: records one figure. Pixels that are not square are refused by the grid (grid.level0_mpp);
    #: it reaches the report in that error, so as_dict leaves it out
    mpp_y: float | None = None
    #: the level-0 region (x, y, width, height) that viewers show as the image, where it is not
    #: all of level 0: openslide's ``openslide.bounds-*`` (Leica SCN, MIRAX: a slide-sized canvas
    #: with the scanned area inside). QuPath's OpenSlide reader crops to it, and Bio-Formats shows
    #: the scanned area alone, so their pixel (0, 0) is level-0 (x, y) here. None: all of level 0
    bounds: tuple[int, int, int, int] | None = None

    def as_dict(self) -> dict[str, Any]:
        w, h = self.level_dimensions[0]
        return {
            "width": w, "height": h, "level_count": len(self.level_dimensions),
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": list(self.level_downsamples), "mpp": self.mpp, "mpp_source": self.mpp_source,
            "magnification": self.magnification, "vendor": self.vendor, "backend": self.backend,
            "bounds": list(self.bounds) if self.bounds is not None else None,
        }


class DecodedTileCache:
    """Stored tiles (decoded, or encoded chunks) kept only until the last planned read that needs
    them, bounded in bytes.

    Neighbouring read blocks share the stored tiles along their common edge. The reader announces
    its blocks up front (``expect``); a tile that a later block will need is kept after decoding
    and dropped when that block has taken it, so the cache holds only the edge between blocks
    read and blocks to come, instead of filling to its limit with tiles nobody will ask for
    again. Tiles outside any plan (a thumbnail read) are never kept.
    """

    def __init__(self, max_bytes: int = 32 << 20):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._tiles: dict[Hashable, Any] = {}
        self._uses: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def expect(self, keys: Iterable[Hashable]) -> None:
        """Announce one future read of each key (call once per planned read block)."""
        with self._lock:
            for key in keys:
                self._uses[key] = self._uses.get(key, 0) + 1

    def take(self, key: Hashable) -> Any:
        """The cached tile for one read of ``key``, if any; counts that read as done."""
        with self._lock:
            left = self._uses.get(key, 0) - 1
            tile = self._tiles.get(key)
            if left > 0:
                self._uses[key] = left
            else:
                self._uses.pop(key, None)
                if tile is not None:
                    del self._tiles[key]
                    self.bytes -= _size(tile)
            return tile

    def offer(self, key: Hashable, tile: Any) -> None:
        """Keep a freshly read tile if a later planned read needs it and it fits."""
        size = _size(tile)
        with self._lock:
            if self._uses.get(key, 0) <= 0 or key in self._tiles or self.bytes + size > self.max_bytes:
                return
            self._tiles[key] = tile
            self.bytes += size


def _size(tile: Any) -> int:
    """Bytes held by a decoded tile (an array) or an encoded chunk (bytes, a zarr buffer)."""
    nbytes = getattr(tile, "nbytes", None)
    return int(nbytes) if nbytes is not None else len(tile)


@dataclass(frozen=True)
class TileGrid:
    """One level's stored tiles: the level's size in pixels and the size of one stored tile."""

    width: int
    height: int
    tile_w: int
    tile_h: int

    @property
    def nx(self) -> int:
        return -(-self.width // self.tile_w)

    @property
    def ny(self) -> int:
        return -(-self.height // self.tile_h)


def tiles_of_boxes(grid: TileGrid, boxes: np.ndarray) -> dict[int, list[int]]:
    """Stored tile index (row-major) -> the boxes (rows of ``boxes``) that overlap it, at one level."""
    th, tw, ny, nx = grid.tile_h, grid.tile_w, grid.ny, grid.nx
    needed: dict[int, list[int]] = {}
    for b, (x, y, w, h) in enumerate(boxes.astype(np.int64)):
        for ty in range(max(y // th, 0), min((y + h - 1) // th, ny - 1) + 1):
            for tx in range(max(x // tw, 0), min((x + w - 1) // tw, nx - 1) + 1):
                needed.setdefault(int(ty * nx + tx), []).append(b)
    return needed


def white_where_outside(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """The (k, h, w, 3) uint8 result for ``boxes`` at a width x height level: white where a box
    overhangs the image; boxes wholly inside are left for the reads to cover."""
    k, bw, bh = len(boxes), int(boxes[0, 2]), int(boxes[0, 3])
    out = np.empty((k, bh, bw, 3), dtype=np.uint8)
    outside = (boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 0] + bw > width) | (boxes[:, 1] + bh > height)
    if outside.any():
        out[outside] = WHITE
    return out


#: what a corrupt-tile error adds under tiles.integrity: strict
LENIENT_HINT = " (tiles.integrity: lenient decodes what it can instead)"


class SlideBackend(ABC):
    """Reads RGB uint8 boxes at a pyramid level; coordinates are pixels of that level."""

    info: SlideInfo
    #: the shard's read plan when it was made where the slide was opened ahead (sources.slides.source)
    plan: Any = None
    #: the most bytes one stored tile decodes to, where the format says (0: not known)
    stored_tile_bytes: int = 0
    #: the slide stores gray, not colour: its tiles are still RGB (the gray in every channel), but
    #: tissue detection must look for darkness, as gray has no stain colour to find
    grayscale: bool = False
    #: ``tiles.integrity: strict``: corrupt tile data the backend can see is an error, never
    #: silently wrong pixels; what it cannot see, its ``integrity_notes`` say
    strict: bool = True
    #: the object's identity (size, ETag, mtime) as a streamed open's HEAD found it; None where
    #: the open asked none (local files, staged copies, libraries' own requests)
    opened_identity: dict[str, Any] | None = None

    @abstractmethod
    def read_boxes(self, level: int, boxes: np.ndarray, clocks: StageClocks) -> np.ndarray:
        """Read k boxes (x, y, w, h at ``level``, all the same w and h) -> (k, h, w, 3) uint8."""

    def read_subsampled(self, level: int, step: int, block: int, clocks: StageClocks) -> np.ndarray:
        """All of ``level``, every ``step``-th pixel of every ``step``-th row (a thumbnail), read
        in boxes of about ``block`` pixels so that a level of any size never needs to be in
        memory whole -> (ceil(h / step), ceil(w / step), 3) uint8."""
        w, h = self.info.level_dimensions[level]
        block = max(step, (block // step) * step)
        out = np.empty((-(-h // step), -(-w // step), 3), dtype=np.uint8)
        for y in range(0, h, block):
            for x in range(0, w, block):
                bw, bh = min(block, w - x), min(block, h - y)
                sub = self.read_boxes(level, np.array([[x, y, bw, bh]]), clocks)[0][::step, ::step]
                out[y // step : y // step + sub.shape[0], x // step : x // step + sub.shape[1]] = sub
        return out

    def expect_reads(self, level: int, blocks: Iterable[np.ndarray]) -> None:  # noqa: B027 - optional
        """Announce the ``read_boxes`` calls to come (one box array each), so that a backend can
        keep exactly the decoded data that more than one of them needs."""

    def use_gpu_decode(self) -> None:
        """Decode on the GPU from now on; backends that cannot say so."""
        raise GpubatchError(f"tiles.decoder: gpu needs a JPEG TIFF read by tifffile; "
                            f"this slide is read by {self.info.backend}")

    def accept_corrupt_tiles(self) -> None:
        """``tiles.integrity: lenient``: decode what the decoder can, warnings or not."""
        self.strict = False

    def integrity_notes(self) -> list[str]:
        """What ``tiles.integrity: strict`` cannot vouch for on this slide (its notes say it)."""
        return []

    def notes(self, level: int) -> list[str]:
        """What the report should say of this slide's pixels as read so far, tiles at ``level``
        (a doubt about its channels, stored data found absent): asked again after every read
        block, as some are only known once read."""
        return []

    def input_version(self) -> str | None:
        """The ETag of the object the tiles are read from, where it is pinned (None: not known)."""
        return None

    def input_identity(self) -> dict[str, Any] | None:
        """The object's identity (size, ETag, mtime) as the open's HEAD found it, where the open
        asked one (a streamed slide): the shard's start identity without a HEAD of its own."""
        return self.opened_identity

    def close(self) -> None:  # noqa: B027 - optional
        """Release handles."""


class TileGridBackend(SlideBackend):
    """A backend whose levels are grids of stored tiles (TIFF tiles, DICOM frames).

    A read of many boxes fetches every stored tile it needs once (``_fetch``: the storage part)
    and decodes each once (``_decoded``: the decode part), pasting each tile into the boxes it
    overlaps as soon as it is decoded, so a read holds one decoded tile at a time (plus those the
    cache keeps for later reads). Tiles on the shared edge of two planned reads are kept between
    them (``expect_reads``). Subclasses set ``path`` and ``cache``.
    """

    path: str
    cache: DecodedTileCache

    @abstractmethod
    def _grid(self, level: int) -> TileGrid:
        """The stored tile grid of ``level``."""

    @abstractmethod
    def _fetch(self, level: int, indices: list[int], clocks: StageClocks) -> list[bytes]:
        """The encoded bytes of the stored tiles ``indices`` (row-major) at ``level``."""

    @abstractmethod
    def _decoded(self, level: int, blobs: list[bytes], indices: list[int]) -> Iterator[np.ndarray]:
        """Decoded (tile_h, tile_w, 3) uint8 tiles of ``blobs``, in order."""

    def read_boxes(self, level: int, boxes: np.ndarray, clocks: StageClocks) -> np.ndarray:
        grid = self._grid(level)
        out = white_where_outside(boxes, grid.width, grid.height)
        needed = tiles_of_boxes(grid, boxes)
        tiles = {i: t for i in needed if (t := self.cache.take((level, i))) is not None}
        missing = sorted(i for i in needed if i not in tiles)
        with clocks.part("storage"):
            blobs = self._fetch(level, missing, clocks) if missing else []

        def paste(index: int, tile: np.ndarray) -> None:
            ty, tx = divmod(index, grid.nx)
            for b in needed[index]:
                paste_tile(out[b], tile, tx * grid.tile_w - int(boxes[b, 0]), ty * grid.tile_h - int(boxes[b, 1]))

        with clocks.part("decode"):
            for index, tile in tiles.items():
                paste(index, tile)
            for index, tile in zip(missing, self._decoded(level, blobs, missing), strict=True):
                ty, tx = divmod(index, grid.nx)
                # Edge tiles carry padding past the image; openslide shows background there.
                tile = tile[: grid.height - ty * grid.tile_h, : grid.width - tx * grid.tile_w]
                self.cache.offer((level, index), tile)
                paste(index, tile)
        clocks.count("decode.tiles", len(missing))
        clocks.count("decode.cache_hits", len(needed) - len(missing))
        return out

    def read_subsampled(self, level: int, step: int, block: int, clocks: StageClocks) -> np.ndarray:
        """As the base class's, the same pixels, but each stored tile's sampled pixels copied
        straight into the thumbnail as it is decoded: no level-sized box to fill and sample (for
        the tissue thumbnail of an 8192 px slide, a 12 MB box and a strided copy of it, a third of
        the thumbnail's time). Stored tiles are read in squares of about ``block`` pixels.
        Tiles whose size ``step`` does not divide would sample off the grid: the base class's."""
        grid = self._grid(level)
        if grid.tile_w % step or grid.tile_h % step:
            return super().read_subsampled(level, step, block, clocks)
        out = np.empty((-(-grid.height // step), -(-grid.width // step), 3), dtype=np.uint8)
        rows, cols = max(1, block // grid.tile_h), max(1, block // grid.tile_w)
        for top, left in itertools.product(range(0, grid.ny, rows), range(0, grid.nx, cols)):
            indices = [row * grid.nx + col for row in range(top, min(top + rows, grid.ny))
                       for col in range(left, min(left + cols, grid.nx))]
            with clocks.part("storage"):
                blobs = self._fetch(level, indices, clocks)
            with clocks.part("decode"):
                for index, tile in zip(indices, self._decoded(level, blobs, indices), strict=True):
                    ty, tx = divmod(index, grid.nx)
                    sub = tile[: grid.height - ty * grid.tile_h : step, : grid.width - tx * grid.tile_w : step]
                    y, x = ty * grid.tile_h // step, tx * grid.tile_w // step
                    for channel in range(3):  # a plane at a time: 4x faster than pixels of 3 bytes
                        out[y : y + sub.shape[0], x : x + sub.shape[1], channel] = sub[..., channel]
            clocks.count("decode.tiles", len(indices))
        return out

    def expect_reads(self, level: int, blocks: Iterable[np.ndarray]) -> None:
        grid = self._grid(level)
        for boxes in blocks:
            self.cache.expect((level, index) for index in tiles_of_boxes(grid, boxes))


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA (or gray + alpha) on white, the last sample the alpha: openslide shows background
    where a slide is transparent, and tiles carry no alpha."""
    alpha = rgba[..., -1:].astype(np.uint16)
    rgb = (rgba[..., :-1].astype(np.uint16) * alpha + WHITE * (255 - alpha)) // 255
    return rgb.astype(np.uint8)


def paste_tile(dst: np.ndarray, tile: np.ndarray, dx: int, dy: int) -> None:
    """Copy ``tile`` into ``dst`` with its top-left at (dx, dy) in dst coordinates, clipped."""
    h, w = dst.shape[:2]
    th, tw = tile.shape[:2]
    x0, y0 = max(dx, 0), max(dy, 0)
    x1, y1 = min(dx + tw, w), min(dy + th, h)
    if x1 > x0 and y1 > y0:
        dst[y0:y1, x0:x1] = tile[y0 - dy : y1 - dy, x0 - dx : x1 - dx]
