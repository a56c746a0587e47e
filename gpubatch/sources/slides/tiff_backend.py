"""TIFF-family slides (SVS, generic and OME TIFF) decoded by tifffile/imagecodecs on the file's
own tile grid: their resolution tags read as MPP, each page checked before it is trusted, and
every stored tile decoded once to RGB.
"""

from __future__ import annotations

import contextlib
import functools
import re
import struct
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import GpubatchError, InputError
from gpubatch.core.logs import collect_warnings, reading, route_library_logs
from gpubatch.core.threads import unlock_cached_properties
from gpubatch.io.ranges import RangeReader
from gpubatch.io.redact import safe_text
from gpubatch.io.storage import open_ranges
from gpubatch.sources.slides.backends import (
    JPEG,
    JPEG2000,
    LENIENT_HINT,
    MINISBLACK,
    MINISWHITE,
    RGB,
    WHITE,
    YCBCR,
    DecodedTileCache,
    SlideInfo,
    TileGrid,
    TileGridBackend,
    composite_on_white,
    tiles_of_boxes,
)
from gpubatch.sources.slides.tiff_layout import (
    check_channels,
    check_first_is_largest,
    check_planes,
    check_samples,
)

#: a decimal number as a description writes it: 0.2520, .5, 5e-1, 2.52E-01
NUMBER = r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"


def resolution_tag(unit: int | str, value: float | str, name: str = "XResolution") -> str:
    """How a TIFF resolution tag reads: 'TIFF XResolution 72 per inch' ('40000/0' as given)."""
    names = {2: "inch", 3: "centimeter", "inch": "inch", "centimeter": "centimeter"}
    shown = value if isinstance(value, str) else f"{value:g}"
    return f"TIFF {name} {shown} per {names.get(unit, str(unit))}"


class TiffMpp(NamedTuple):
    """What a TIFF-family slide records of its scale (the fields of SlideInfo of those names)."""

    mpp: float | None
    magnification: float | None
    vendor: str
    source: str
    ignored: str = ""
    mpp_y: float | None = None


def _mpp_from_tiff(tif: Any) -> TiffMpp:
    """The mpp, magnification and vendor of a TIFF-family slide, and the tag the mpp came from."""
    page = tif.pages[0]
    desc = page.description or ""
    if tif.is_svs:
        mpp = re.search(rf"\bMPP\s*=\s*({NUMBER})", desc)
        mag = re.search(rf"\bAppMag\s*=\s*({NUMBER})", desc)
        return TiffMpp(float(mpp.group(1)) if mpp else None, float(mag.group(1)) if mag else None, "aperio",
                       "Aperio ImageDescription MPP" if mpp else "")
    if tif.is_ome:
        (x, broken), (y, _) = (_ome_physical_size(tif.ome_metadata or "", axis) for axis in "XY")
        return TiffMpp(x, None, "ome-tiff", "OME PhysicalSizeX" if x is not None else "", broken,
                       mpp_y=y if x is not None else None)
    if tif.is_philips:
        return _mpp_from_philips(tif.philips_metadata or "")
    return _mpp_from_resolution_tags(page)


def _mpp_from_philips(xml: str) -> TiffMpp:
    """A Philips TIFF's mpp: level 0's DICOM_PIXEL_SPACING in its XML (the first
    PixelDataRepresentation, as tifffile orders the levels), in mm, down then across like DICOM
    PixelSpacing. Its resolution tags say nothing, so every Philips slide read as without MPP."""
    from xml.etree import ElementTree

    try:
        tree = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return TiffMpp(None, None, "philips", "", "Philips XML metadata does not parse: no resolution")
    found = [e.text for e in tree.iterfind('.//DataObject[@ObjectType="PixelDataRepresentation"]'
                                           '/Attribute[@Name="DICOM_PIXEL_SPACING"]') if e.text]
    if not found:
        return TiffMpp(None, None, "philips", "")
    try:  # tifffile's own series parse refuses these first; kept for a file it reads otherwise
        down, across = (float(v) * 1000.0 for v in found[0].replace('"', " ").split())
    except ValueError:
        return TiffMpp(None, None, "philips", "", "Philips DICOM_PIXEL_SPACING is not two numbers: no resolution")
    return TiffMpp(across, None, "philips", "Philips DICOM_PIXEL_SPACING", mpp_y=down)


#: microns per OME UnitsLength symbol (the OME schema's; its default is µm), micro sign and Greek
#: mu alike: writers use either, and only the first was read (the file "recorded no MPP")
OME_MICRONS = {"µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "Å": 1e-4, "pm": 1e-6,
               "mm": 1e3, "cm": 1e4, "m": 1e6, "in": 25400.0}


def _ome_physical_size(ome: str, axis: str) -> tuple[float | None, str]:
    """OME PhysicalSizeX or Y in um, or None; and why a size the file records counts as missing
    (a value that is no number): the grid names it. A unit that is no length (pixel) is none.

    A value that is no number raised from here, and the slide went to openslide, which read it
    as a generic TIFF: without its SubIFD pyramid, at its TIFF resolution tags' scale.
    """
    found = re.search(rf'PhysicalSize{axis}="([^"]*)"', ome)
    unit = re.search(rf'PhysicalSize{axis}Unit="([^"]+)"', ome)
    scale = OME_MICRONS.get(unit.group(1).strip() if unit else "µm")
    if found is None or scale is None:
        return None, ""
    try:
        return float(found.group(1)) * scale, ""
    except ValueError:
        return None, f"OME PhysicalSize{axis} {safe_text(found.group(1)[:40])!r} is not a number: no resolution"


def _mpp_from_resolution_tags(page: Any) -> TiffMpp:
    """A generic TIFF's mpp from its XResolution tag, in inches or centimetres; a resolution tag
    that is no number (n/0, 0/n) makes it missing, with the tag named (:func:`_zero_rational`)."""
    res_unit = int(page.resolutionunit)
    if res_unit not in (2, 3):  # inch, centimeter; other units say nothing of the scan
        return TiffMpp(None, None, "generic-tiff", "")
    broken = _zero_rational(page, res_unit)
    if broken:
        return TiffMpp(None, None, "generic-tiff", "", broken)
    xres, yres = page.resolution if page.resolution else (0.0, 0.0)
    if xres > 0:
        microns = 25400.0 if res_unit == 2 else 10000.0
        return TiffMpp(microns / xres, None, "generic-tiff", resolution_tag(res_unit, xres),
                       mpp_y=microns / yres if yres > 0 else None)
    return TiffMpp(None, None, "generic-tiff", "")


def _zero_rational(page: Any, unit: int) -> str:
    """Why the page's resolution tags are no resolution, naming the tag; '' when they are one.

    tifffile reads a rational n/0 as n/1, so a tag with a zero denominator would give a confident,
    wrong mpp; a zero numerator would give an infinite one. Either is no resolution recorded.
    """
    for name in ("XResolution", "YResolution"):
        tag = page.tags.get(name)
        value = tag.value if tag is not None else None
        if isinstance(value, tuple) and len(value) == 2 and 0 in value:
            shown = resolution_tag(unit, f"{value[0]}/{value[1]}", name)
            return f"{shown} {'has a zero denominator' if value[1] == 0 else 'is zero'}: no resolution"
    return ""


class MalformedTiff(TypeError):
    """A TIFF whose structure contradicts itself (its tile tables do not fit its image size):
    the file is broken, and no other reader is tried (openslide opened one such file at the
    wrong scale, taking a lying page's size for the truth)."""


def _check_page(page: Any, level: int, decompressors: Any) -> None:
    """A level tifffile can tile-decode, whose IFD is whole: one offset and count per tile.

    A malformed IFD (tile tables shorter than the tile grid) would otherwise surface mid-read as
    ``IndexError: tuple index out of range``, without the file's name, and be retried.
    """
    if not page.is_tiled:  # openslide refuses these too: the fix is named here, as nowhere else
        raise TypeError(f"level {level} is stored in strips, not tiles (a plain image, not a slide pyramid); "
                        "convert it to a tiled pyramid, e.g. vips tiffsave IN OUT --tile --pyramid")
    if page.dtype != np.uint8 or not (page.shape[-1] in (3, 4) or _is_gray(page)):
        raise TypeError("not a tiled RGB or grayscale uint8 pyramid")
    if page.planarconfig != 1:
        raise TypeError("planar (separate) sample layout")
    if page.compression != 1 and page.compression not in decompressors:
        raise TypeError(f"unsupported TIFF compression {int(page.compression)}")
    tiles = int(np.prod(page.chunked))
    if len(page.dataoffsets) != tiles or len(page.databytecounts) != tiles:
        raise MalformedTiff(f"malformed IFD at level {level}: {len(page.dataoffsets)} tile offsets and "
                            f"{len(page.databytecounts)} byte counts for a grid of {tiles} tiles")


#: what tifffile logs (and reads on past) where a file's structure is cut short or broken: an IFD
#: or a tag's value past the end of the file, or a list of tags that is no list. It then drops
#: the pages or tags beyond, and the file reads as another one: fewer pyramid levels, an OME-TIFF
#: without its OME-XML (so without its resolution).
DAMAGED_STRUCTURE = ("invalid page offset", "invalid offset to page", "corrupted tag list",
                     "invalid value offset", "invalid circular reference", "invalid next page")


def _check_structure(complaints: list[str], path: str) -> None:
    """Refuse a TIFF whose IFD chain or tags run past its end or are broken (a file cut short by
    an interrupted copy or download): tifffile drops the pages or tags beyond and reads on
    (``DAMAGED_STRUCTURE``), and the file read as a smaller valid slide, without a word: fewer
    pyramid levels, an OME-TIFF without its OME-XML (so without its resolution)."""
    damage = next((c for c in complaints if any(d in c for d in DAMAGED_STRUCTURE)), None)
    if damage is not None:
        shown = re.sub(r"^(<[^>]*>\s*)+", "", damage)[:200]
        raise InputError(path, f"truncated or damaged TIFF structure: {shown} (tifffile would drop the "
                               f"pages or tags past it: pyramid levels, the resolution)")


def _check_within(tif: Any, pages: list[Any], path: str) -> None:
    """Refuse a TIFF whose stored tiles run past the end of the file (a copy cut short) before
    any is read: they were found only by a read that reached them, so validate passed the
    slide, and a tissue filter that skipped them passed it too."""
    size = int(tif.filehandle.size)
    for level, page in enumerate(pages):
        if len(page.dataoffsets) != len(page.databytecounts):
            continue  # a malformed IFD: _check_page refuses it, naming both counts
        ends = np.asarray(page.dataoffsets, np.int64) + np.asarray(page.databytecounts, np.int64)
        end = int(ends.max()) if len(ends) else 0
        if end > size:
            raise InputError(path, f"truncated: the stored tiles of level {level} run to byte {end}, past "
                                   f"the end of the file at {size} bytes (a copy or download cut short?)")


def stores_gray(page: Any) -> bool:
    """A page of gray, black or white is 0, alone or with an alpha sample: a slide that tissue
    detection must search for darkness, as gray has no stain colour (``SlideBackend.grayscale``)."""
    samples = int(page.samplesperpixel)
    one = samples == 1 or samples == 2 and len(page.extrasamples) == 1
    return one and int(page.photometric) in (MINISBLACK, MINISWHITE)


def _is_gray(page: Any) -> bool:
    """A gray page tifffile reads here (black is 0): read as RGB by :func:`as_rgb`.

    Other one-sample pages (white is 0, a palette) are left to openslide, which converts them.
    """
    return int(page.photometric) == MINISBLACK and stores_gray(page)


@functools.cache
def import_tifffile() -> Any:
    """tifffile, with its classes' cached properties lock-free on Python 3.11
    (:func:`gpubatch.core.threads.unlock_cached_properties`): slides that one process opens at
    once then parse their headers side by side instead of waiting on each other's reads."""
    import tifffile

    unlock_cached_properties(tifffile.TiffFile, tifffile.TiffPage, tifffile.TiffFrame,
                             tifffile.TiffPageSeries, tifffile.TiffTag)
    return tifffile


def tiff_stores_gray(path: str) -> bool:
    """Whether a local file another reader opens (openslide) is a TIFF whose first page stores
    gray: openslide hands gray back as RGB (white is 0 inverted to what it shows) and says
    nothing of it, so the file's own tags are asked. False for anything tifffile cannot parse."""
    tifffile = import_tifffile()

    try:
        with tifffile.TiffFile(path) as tif:
            return stores_gray(tif.pages.first)
    except Exception:  # noqa: BLE001 - not a TIFF (MRXS, NDPI's own quirks): colour, as before
        return False


class TiffBackend(TileGridBackend):
    """Tile-grid decode with tifffile: every stored tile a read needs is fetched and decoded once."""

    def __init__(self, path: str, fileobj: Any = None, ranges: RangeReader | None = None,
                 clocks: StageClocks | None = None, cache_bytes: int = 32 << 20):
        tifffile = import_tifffile()

        self.path = path
        route_library_logs(python_warnings=False)
        # tifffile's warnings about this file's tags name the file; its complaints are kept
        with reading(path), collect_warnings() as complaints:
            self.tif = tifffile.TiffFile(fileobj if fileobj is not None else path)
            check_first_is_largest(self.tif)
            series = self.tif.series[0]
            self.pages = [lvl.keyframe for lvl in series.levels]
            scale = _mpp_from_tiff(self.tif)
        try:
            _check_within(self.tif, self.pages, path)
            _check_structure(complaints, path)
            check_planes(self.tif.series[0], path)
            for level, page in enumerate(self.pages):
                check_samples(page, level, path)
                check_channels(page, level, path)
                _check_page(page, level, tifffile.TIFF.DECOMPRESSORS)
        except BaseException:
            self.tif.close()
            raise
        self.ranges = ranges if ranges is not None else open_ranges(path, clocks=clocks)
        # decoded to RGB, whatever is stored (gray grows threefold)
        self.stored_tile_bytes = max(p.tilelength * p.tilewidth * max(p.samplesperpixel, 3) * np.dtype(p.dtype).itemsize
                                     for p in self.pages)
        self.grayscale = _is_gray(self.pages[0])
        dims = tuple((int(p.shape[1]), int(p.shape[0])) for p in self.pages)
        w0, h0 = dims[0]
        downs = tuple((w0 / w + h0 / h) / 2.0 for w, h in dims)
        self.info = SlideInfo(dims, downs, scale.mpp, scale.magnification, scale.vendor, "tifffile", scale.source,
                              mpp_ignored=scale.ignored, mpp_y=scale.mpp_y)
        self.cache = DecodedTileCache(cache_bytes)
        #: a streamed slide's tiles fetched ahead of the reads (set by the opener; io.readahead)
        self.read_ahead: Any = None
        self.gpu_decode = False
        #: (level, sparse tiles, tiles) of the planned reads: the slide's notes (:meth:`notes`)
        self.sparse: tuple[int, int, int] = (0, 0, 0)

    def read_boxes(self, level: int, boxes: np.ndarray, clocks: StageClocks) -> np.ndarray:
        with self._malformed_is_input_error(level):
            return super().read_boxes(level, boxes, clocks)

    def read_subsampled(self, level: int, step: int, block: int, clocks: StageClocks) -> np.ndarray:
        with self._malformed_is_input_error(level):
            return super().read_subsampled(level, step, block, clocks)

    @contextlib.contextmanager
    def _malformed_is_input_error(self, level: int) -> Iterator[None]:
        """A file whose structure lies about its data fails the same way every time: an input
        error with the file's name, not a retryable crash."""
        try:
            yield
        except (IndexError, KeyError, ValueError, TypeError, struct.error) as exc:
            raise InputError(self.path, f"malformed TIFF data at level {level}: "
                                        f"{type(exc).__name__}: {exc}") from exc

    def input_version(self) -> str | None:
        return self.ranges.version()

    def _grid(self, level: int) -> TileGrid:
        page = self.pages[level]
        return TileGrid(int(page.shape[1]), int(page.shape[0]), int(page.tilewidth), int(page.tilelength))

    def _fetch(self, level: int, indices: list[int], clocks: StageClocks) -> list[bytes]:
        page = self.pages[level]  # the range reader counts requests and bytes
        ranges = [(int(page.dataoffsets[i]), int(page.databytecounts[i])) for i in indices]
        return (self.read_ahead or self.ranges).read_ranges(ranges)

    def expect_reads(self, level: int, blocks: Iterable[np.ndarray]) -> None:
        blocks = list(blocks)
        super().expect_reads(level, blocks)
        self._count_sparse(level, blocks)
        if self.read_ahead is None:
            return
        page, grid = self.pages[level], self._grid(level)
        first: set[int] = set()  # tiles an earlier block reads: later ones take them decoded
        planned = []
        for boxes in blocks:
            new = sorted(set(tiles_of_boxes(grid, boxes)) - first)
            first.update(new)
            planned.append([(int(page.dataoffsets[i]), int(page.databytecounts[i])) for i in new])
        self.read_ahead.plan(planned)

    def _count_sparse(self, level: int, blocks: list[np.ndarray]) -> None:
        """Count the stored tiles the planned reads need that are sparse (no bytes): they read as
        white background, as openslide shows them, rightly where a scanner left out blank glass,
        silently where a write was cut short under tissue (tissue found at a coarser level and
        read as white at this one). From the tile tables: no read is needed."""
        grid, counts = self._grid(level), self.pages[level].databytecounts
        needed = {index for boxes in blocks for index in tiles_of_boxes(grid, boxes)}
        self.sparse = (level, sum(1 for i in needed if not counts[i]), len(needed))

    def notes(self, level: int) -> list[str]:
        """How many of the stored tiles the tiles at ``level`` need are sparse (read as white)."""
        planned, sparse, needed = self.sparse
        if planned != level or not sparse:
            return []
        return [f"{sparse} of {needed} stored tiles the tiles needed at level {level} are sparse (no bytes "
                "stored): read as white background; a write cut short? (a scanner may also leave out tiles "
                "of blank glass)"]

    def read_coarsest_ahead(self) -> None:
        """Fetch the coarsest level's stored tiles in the background (tissue detection reads all
        of them first): for a slide opened ahead, so its shard starts without those round trips."""
        if self.read_ahead is None:
            return
        page = self.pages[-1]
        self.read_ahead.plan([[(int(page.dataoffsets[i]), int(page.databytecounts[i]))
                               for i in range(len(page.dataoffsets)) if page.databytecounts[i]]])

    def use_gpu_decode(self) -> None:
        """Decode JPEG tiles with nvImageCodec on the GPU (a batch per read) instead of libjpeg-turbo.

        Relieves the host's cores, which limit a decode-bound GPU run; raises where it cannot run.
        """
        from gpubatch.sources.slides.gpu_decode import gpu_decode_available

        ok, why = gpu_decode_available()
        if not ok:
            raise GpubatchError(f"tiles.decoder: gpu, but GPU JPEG decode cannot run here: {why}")
        self.gpu_decode = True

    def _decoded(self, level: int, blobs: list[bytes], indices: list[int]) -> Iterator[np.ndarray]:
        """Decoded tiles of ``blobs``, in order: one by one on the host, or one GPU batch for JPEG."""
        page = self.pages[level]
        # nvImageCodec is given RGB JPEG tiles only: gray ones are decoded on the host
        if self.gpu_decode and int(page.compression) == JPEG and not self.grayscale and any(blobs):
            from gpubatch.sources.slides.gpu_decode import decode_jpeg_tiles_gpu

            batch = decode_jpeg_tiles_gpu(blobs, page.jpegtables, photometric=int(page.photometric))
            yield from batch.get()
            return
        for index, blob in zip(indices, blobs, strict=True):
            yield self._decode(page, blob, index)

    def _decode(self, page: Any, blob: bytes, index: int) -> np.ndarray:
        th, tw = page.tilelength, page.tilewidth
        if not blob:  # sparse tile: openslide shows it as background
            return np.full((th, tw, 3), WHITE, dtype=np.uint8)
        try:
            with reading(self.path), collect_warnings() as complaints:
                segment = self._decode_checked(page, blob, index)
            if complaints and self.strict and int(page.compression) in JPEG2000:
                raise ValueError(f"JPEG 2000 decoder: {complaints[0]}")
        except MemoryError as exc:  # the worker's memory, not the tile's data: may pass on a retry
            raise MemoryError(f"out of memory decoding tile {index} at level {self.pages.index(page)} of "
                              f"{self.path} ({page.tilewidth}x{page.tilelength} px)") from exc
        except Exception as exc:
            raise InputError(self.path, f"corrupt tile {index} at level {self.pages.index(page)}: {exc}"
                             + (LENIENT_HINT if self.strict else "")) from exc
        tile = _tile_shaped(np.asarray(segment), (th, tw, int(page.samplesperpixel)), self.path, index,
                            self.pages.index(page))
        return as_rgb(tile)

    def _decode_checked(self, page: Any, blob: bytes, index: int) -> Any:
        """Decode one stored tile; with ``strict``, libjpeg's warnings (corrupt data, premature
        end, extraneous bytes) raise instead of yielding silently wrong pixels.

        imagecodecs discards libjpeg's warnings, so JPEG goes through simplejpeg (the same
        libjpeg-turbo, with TurboJPEG's stop-on-warning): the decode itself for YCbCr tiles, whose
        pixels are identical to tifffile's; a check at 1/8 scale (entropy decoding, where the
        warnings arise, without the full inverse DCT) before tifffile's decode for tiles tifffile
        reads as raw RGB (Aperio). JPEG 2000 warnings are collected from imagecodecs' log.
        """
        if self.strict and int(page.compression) == JPEG:
            import simplejpeg

            from gpubatch.sources.slides.integrity import check_jpeg_tile

            if _decodes_as_ycbcr(page):
                whole = page.jpegtables[:-2] + blob[2:] if page.jpegtables else blob
                return simplejpeg.decode_jpeg(whole, colorspace="RGB", strict=True)
            check_jpeg_tile(blob, page.jpegtables)
        segment, _, _ = page.decode(blob, index, jpegtables=page.jpegtables)
        return segment

    def close(self) -> None:
        if self.read_ahead is not None:
            self.read_ahead.close()
        self.tif.close()
        self.ranges.close()


def _tile_shaped(segment: np.ndarray, shape: tuple[int, int, int], path: str, index: int, level: int) -> np.ndarray:
    """A decoded tile as ``shape`` (th, tw, samples); a tile whose data decodes to another size (a
    JPEG larger than the level's tiles, which a reshape would scramble into the samples) is
    malformed. RGB pages may decode to 3 or 4 samples (an alpha); gray ones to what they store."""
    th, tw, samples = shape
    allowed = (3, 4) if samples >= 3 else (samples,)
    height_width = segment.shape[-3:-1] if segment.ndim >= 3 else None
    if height_width != (th, tw) or segment.shape[-1] not in allowed:
        kind = "RGB" if samples >= 3 else f"{samples}-sample gray"
        raise InputError(path, f"malformed tile {index} at level {level}: its data decodes to "
                               f"{'x'.join(map(str, segment.shape))}, the level's tiles are {tw}x{th} {kind}")
    return segment.reshape(th, tw, -1)


def as_rgb(tile: np.ndarray) -> np.ndarray:
    """A decoded (h, w, samples) tile as (h, w, 3) RGB, what every read returns (models and tissue
    detection take RGB): an alpha sample composited on white (gray + alpha, RGBA), then gray
    replicated into all three channels."""
    if tile.shape[-1] in (2, 4):
        tile = composite_on_white(tile)
    if tile.shape[-1] == 1:
        return np.repeat(tile, 3, axis=-1)
    return tile[..., :3]


def _decodes_as_ycbcr(page: Any) -> bool:
    """Whether tifffile decodes this JPEG page from YCbCr to RGB (libjpeg's default conversion)."""
    plain = not page.extrasamples and page.planarconfig == 1
    return plain and (page.photometric == YCBCR or (page.photometric == RGB and page.is_jfif))
