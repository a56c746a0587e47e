"""``tiles.integrity: strict`` for slides that openslide decodes: their stored JPEG tiles are
checked before openslide reads them.

openslide 4 turns libjpeg's warnings into errors, but it stops after a tile's last scanline and
never calls ``jpeg_finish_decompress``, so it never sees the warnings raised when the decoder
reads on to the end marker: 'Corrupt JPEG data: N extraneous bytes before marker 0xd9' (a
desynchronised entropy decoder, from flipped, zeroed or garbage bytes) and 'Premature end of JPEG
file' for a tile whose EOI is gone. Such a tile comes back as gray or garbled pixels without an
error (seen with openslide 4.0.1; only damage that runs out of data mid-scan fails there). So
where openslide reads a TIFF whose levels are plain TIFF pages (generic-tiff, Aperio), each stored
tile a read touches is entropy-decoded once more, at 1/8 scale with libjpeg-turbo stopping on any
warning: the check the tifffile path makes (``check_jpeg_tile``). tifffile only locates the
tiles (offsets, byte counts, JPEG tables); openslide still decodes the pixels, so which slide is
read and how does not change. Formats whose tiles cannot be located this way (MRXS, NDPI, SCN,
DICOM, ...) are not checked, and the slide's notes say so instead of claiming integrity.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpubatch.core.errors import InputError
from gpubatch.sources.slides.backends import JPEG, LENIENT_HINT, SlideInfo, TileGrid, tiles_of_boxes

#: openslide vendors whose levels are whole tiled TIFF pages, tile for tile (no stitching)
CHECKED_VENDORS = ("generic-tiff", "aperio")
NO_COMPRESSION = 1


class Unchecked(Exception):
    """Why a slide's stored tiles cannot be checked (said in its notes)."""


def check_jpeg_tile(blob: bytes, jpegtables: bytes | None) -> None:
    """Entropy-decode one stored JPEG tile at 1/8 scale; any libjpeg warning raises ValueError.

    Decoding at 1/8 scale runs the entropy decoder, where corrupt data shows, over the whole
    stream to its EOI, without most of the inverse DCT: the cheapest check that sees every
    warning. imagecodecs discards libjpeg's warnings; simplejpeg (TurboJPEG) stops on them.
    """
    import simplejpeg

    whole = jpegtables[:-2] + blob[2:] if jpegtables else blob
    simplejpeg.decode_jpeg(whole, colorspace="RGB", strict=True, min_factor=8)


@dataclass
class _Level:
    """Where one openslide level's stored tiles lie in the file, and those already checked."""

    grid: TileGrid
    offsets: np.ndarray
    counts: np.ndarray
    jpegtables: bytes | None
    checked: set[int] = field(default_factory=set)


class StoredTileCheck:
    """Checks the stored JPEG tiles under each openslide read of a TIFF slide, each tile once."""

    def __init__(self, path: str, levels: list[_Level | None]):
        self.path, self.levels = path, levels
        self._fd = os.open(path, os.O_RDONLY)
        self._lock = threading.Lock()

    def before_read(self, level: int, boxes: np.ndarray) -> None:
        """Raise InputError naming the tile if a stored tile under ``boxes`` (x, y, w, h at
        ``level``) is corrupt. Boxes grow by a pixel each way: openslide takes level-0
        coordinates and may round onto a neighbouring tile."""
        stored = self.levels[level]
        if stored is None:  # uncompressed: no decoder, nothing to check
            return
        grown = boxes.astype(np.int64) + np.array([-1, -1, 2, 2])
        for index in sorted(tiles_of_boxes(stored.grid, grown)):
            with self._lock:
                if index in stored.checked:
                    continue
            self._check(level, stored, index)
            with self._lock:
                stored.checked.add(index)

    def _check(self, level: int, stored: _Level, index: int) -> None:
        count = int(stored.counts[index])
        if count == 0:  # sparse tile: openslide shows background
            return
        blob = os.pread(self._fd, count, int(stored.offsets[index]))
        try:
            check_jpeg_tile(blob, stored.jpegtables)
        except Exception as exc:
            raise InputError(self.path, f"corrupt tile {index} at level {level}: {exc}{LENIENT_HINT}") from exc

    def close(self) -> None:
        os.close(self._fd)


def open_tile_check(path: str, info: SlideInfo) -> tuple[StoredTileCheck | None, str]:
    """The check for a slide openslide reads, or None and why its tiles cannot be checked."""
    if info.vendor not in CHECKED_VENDORS:
        return None, f"openslide reads it as {info.vendor}, whose stored tiles are not located here"
    import tifffile

    try:  # openslide found no Hamamatsu tags: never parse it as NDPI, whatever its name says
        with tifffile.TiffFile(path, is_ndpi=False) as tif:
            levels = [_stored_level(tif, level, dims) for level, dims in enumerate(info.level_dimensions)]
    except Unchecked as exc:
        return None, str(exc)
    except (ValueError, TypeError, OSError, IndexError, KeyError, tifffile.TiffFileError) as exc:
        return None, f"its TIFF structure cannot be read apart from openslide ({type(exc).__name__})"
    return StoredTileCheck(path, levels), ""


def _stored_level(tif: Any, level: int, dims: tuple[int, int]) -> _Level | None:
    """The one tiled TIFF page that is openslide's ``level`` (None: uncompressed); raises
    Unchecked where there is not exactly one, or its compression is not JPEG."""
    pages = [p for p in tif.pages if p.is_tiled and (int(p.imagewidth), int(p.imagelength)) == tuple(dims)]
    if len(pages) != 1:
        raise Unchecked(f"level {level} ({dims[0]}x{dims[1]}) is {len(pages)} tiled TIFF pages, not one")
    page = pages[0]
    if int(page.compression) == NO_COMPRESSION:
        return None
    if int(page.compression) != JPEG:
        raise Unchecked(f"level {level} is stored with TIFF compression {int(page.compression)}; "
                         f"only JPEG tiles are checked")
    grid = TileGrid(int(page.imagewidth), int(page.imagelength), int(page.tilewidth), int(page.tilelength))
    offsets, counts = np.asarray(page.dataoffsets), np.asarray(page.databytecounts)
    if len(offsets) != grid.nx * grid.ny or len(counts) != len(offsets):
        raise Unchecked(f"level {level}'s tile tables do not fit its tile grid")
    return _Level(grid, offsets, counts, page.jpegtables)


def unchecked_note(why: str, decoder: str = "openslide") -> str:
    """The slide note strict owes where it cannot check tile data: never a silent claim."""
    return (f"tiles.integrity: strict, but its tile data is not checked: {why}; {decoder}'s own decode "
            f"errors still fail the slide, corrupt data it decodes without an error does not")
