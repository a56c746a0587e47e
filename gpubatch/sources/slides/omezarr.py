"""OME-Zarr (OME-NGFF 0.1 to 0.5) multiscale RGB images as slides, local or in object storage.

OME-Zarr is what bioformats2raw, QuPath and cloud pathology archives write for images too large
for one file, and it is read straight from object storage chunk by chunk: no staging of a
multi-gigabyte file. Neither tifffile nor openslide reads it.

What is read: the first multiscale image of the group (or of ``0/`` in a bioformats2raw layout),
its levels ordered by their scale, finest first (NGFF's order, which some writers reverse), the
c, y and x axes (any order, any NGFF version), one plane of any t or z axis of size 1, and
microns per pixel from the level-0 scale when the x axis has a length unit (none without one: a
unitless scale could mean anything, and a wrong mpp would tile at the wrong magnification),
across (x) and down (y) apart, so pixels that are not square are refused at ``tiles.mpp`` as in
every other format. Only uint8 is a slide here: RGB or RGBA (3 or 4 channels), or gray (one
channel, or no c axis), read as RGB with the gray in every channel and said to be gray, as gray
TIFF and DICOM slides are. An image whose ``omero`` metadata says fluorescence is refused, and so is one
of four channels whose metadata does not say red, green, blue (:mod:`gpubatch.sources.slides.omero`). A reduced level whose width and height are not reduced
alike (NGFF allows a scale per axis) is not read: tiles from it would be squashed, and a square
tile has one downsample.

Each read is split honestly: the stored chunks (or shards) a region touches are fetched as
encoded bytes, concurrently, each request retried and counted (the storage part); then zarr
decodes the region from those bytes held in memory (the decode part). Boxes close together are
read as the one region they span, so a chunk under several boxes is fetched and decoded once;
boxes far apart are read one by one. Encoded chunks on the shared edge of two planned reads are
kept between them, so no chunk is fetched twice. A chunk absent from the store reads as the
array's fill value (zarr's rule: writers leave out chunks that are all fill value), which a
partial copy also looks like: the absent ones the tile reads met are counted, for free, as
every fetch of one answers None, and the slide's notes say how many.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputError
from gpubatch.io.metrics import record_request
from gpubatch.io.redact import redact
from gpubatch.io.retried_fs import RetriedFS
from gpubatch.io.retry import (
    RetryPolicy,
    call_with_retries,
    count_retries,
    default_policy,
    is_throttled,
    is_transient,
    storage_error,
)
from gpubatch.io.uris import uri_name
from gpubatch.sources.slides.backends import (
    DecodedTileCache,
    SlideBackend,
    SlideInfo,
    composite_on_white,
    paste_tile,
    white_where_outside,
)
from gpubatch.sources.slides.omero import channel_verdict, omero_channels

UNIT_TO_MICRONS = {"angstrom": 1e-4, "nanometer": 1e-3, "micrometer": 1.0, "micron": 1.0,
                   "millimeter": 1e3, "centimeter": 1e4, "meter": 1e6}
DEFAULT_AXES = "tczyx"  # NGFF 0.1 and 0.2 had no axes metadata: always 5D in this order
ZARR_SUFFIXES = (".zarr", ".ome.zarr")
ZARR_METADATA = ("zarr.json", ".zgroup", ".zattrs")
MAX_WASTE = 2.0  # read the union of boxes when it is at most this many times their own area
MAX_UNION_PIXELS = 16 << 20  # 48 MiB of RGB: a union read must not defeat the memory bound

Region = tuple[int, int, int, int]  # x, y, w, h in pixels of the level


def is_zarr_uri(uri: str) -> bool:
    """A ``.zarr`` name (what OME-Zarr images are called), local or remote."""
    return uri_name(uri).lower().endswith(ZARR_SUFFIXES)


def folder_is_zarr(fs: RetriedFS, folder: str) -> bool:
    """A folder holding zarr metadata at its top (an OME-Zarr image named without ``.zarr``)."""
    return any(fs.exists(f"{folder.rstrip('/')}/{name}") for name in ZARR_METADATA)


@dataclass(frozen=True)
class Multiscale:
    """The parts of an NGFF multiscales entry a reader needs."""

    axes: tuple[str, ...]  # axis names, in array order
    paths: tuple[str, ...]  # one array per level, highest resolution first
    mpp: float | None  # level-0 um/px across (x)
    version: str
    mpp_y: float | None = None  # level-0 um/px down (y), read apart so non-square pixels are seen


def find_multiscales(root: Any, url: str) -> tuple[Any, list[dict[str, Any]], str]:
    """(image group, its 'multiscales' list, NGFF version), following a bioformats2raw layout."""
    attrs = dict(root.attrs)
    ome = attrs.get("ome") or {}
    if "multiscales" in ome:  # 0.5: everything under attributes['ome']
        return root, ome["multiscales"], str(ome.get("version", "0.5"))
    if "multiscales" in attrs:  # 0.1 to 0.4
        multiscales = attrs["multiscales"]
        version = str(multiscales[0].get("version", "0.4")) if multiscales else "0.4"
        return root, multiscales, version
    if "bioformats2raw.layout" in attrs or "bioformats2raw.layout" in ome:
        return find_multiscales(root["0"], url)
    raise InputError(url, "zarr group holds no OME-NGFF 'multiscales' metadata; a multiscale "
                          "image was expected (not a plate, a label group or a plain array)")


def parse_multiscale(entry: dict[str, Any], version: str, url: str) -> Multiscale:
    """Axes, level paths and mpp of one multiscales entry (any NGFF version)."""
    raw_axes = entry.get("axes") or list(DEFAULT_AXES)
    axes = tuple(a["name"] if isinstance(a, dict) else str(a) for a in raw_axes)
    datasets = entry.get("datasets") or []
    if not datasets:
        raise InputError(url, "the multiscales entry lists no datasets (levels)")
    datasets = finest_first(datasets, axes)
    paths = tuple(str(d["path"]) for d in datasets)
    mpp, mpp_y = _mpp(entry, raw_axes, datasets[0], axes)
    return Multiscale(axes, paths, mpp, version, mpp_y)


def finest_first(datasets: list[dict[str, Any]], axes: tuple[str, ...]) -> list[dict[str, Any]]:
    """The datasets ordered by their x scale, finest first. NGFF requires that order, but some
    writers list the coarsest first, and the first listed is taken for level 0 (its scale for
    the mpp, the others' downsamples from its size): left as listed where a level's scale is not
    written inline (NGFF 0.1 and 0.2 have none) or is no number or zero, as there is then nothing
    to order by. Ordered by magnitude: negative scales (a flipped axis, which NGFF does not
    allow) ordered by sign put the coarsest level first, read as level 0 at a downsample of 1."""
    if "x" not in axes:
        return datasets
    index = axes.index("x")
    known = [(abs(scale), n) for n, d in enumerate(datasets)
             if (scale := _inline_scale(d, index)) is not None and math.isfinite(scale) and scale != 0]
    if len(known) < len(datasets):
        return datasets
    return [datasets[n] for _, n in sorted(known)]


def _inline_scale(dataset: dict[str, Any], index: int) -> float | None:
    """A dataset's scale on axis ``index`` (the product of its scale transforms), None where it
    has none written inline."""
    scales = [t for t in dataset.get("coordinateTransformations") or [] if t.get("type") == "scale"]
    if not scales or any(not isinstance(t.get("scale"), list) or len(t["scale"]) <= index for t in scales):
        return None
    return float(np.prod([float(t["scale"][index]) for t in scales]))


def _mpp(entry: dict[str, Any], raw_axes: list[Any], level0: dict[str, Any],
         axes: tuple[str, ...]) -> tuple[float | None, float | None]:
    """Microns per pixel at level 0 across (x) and down (y), each None without a length unit.

    Both are read, each at its own axis's index in ``axes`` and in its own unit: pixels that are
    not square must be seen (the grid refuses to tile them at ``tiles.mpp``), and x alone said
    nothing about y. Down is only meaningful beside across, so it is None when across is.
    """
    across = _axis_mpp(entry, raw_axes, level0, axes, "x")
    return across, _axis_mpp(entry, raw_axes, level0, axes, "y") if across is not None else None


def _axis_mpp(entry: dict[str, Any], raw_axes: list[Any], level0: dict[str, Any],
              axes: tuple[str, ...], name: str) -> float | None:
    """Microns per pixel along axis ``name`` at level 0: dataset scale times global scale, in
    that axis's unit (None where the axis is absent or has no length unit, or a scale is kept
    in a file of its own: leaving it out would take the scale for 1, a wrong mpp)."""
    if name not in axes:
        return None
    index = axes.index(name)
    axis = raw_axes[index] if isinstance(raw_axes[index], dict) else {}
    factor = UNIT_TO_MICRONS.get(str(axis.get("unit", "")).lower())
    if factor is None:
        return None
    scale = 1.0
    for transforms in (level0.get("coordinateTransformations"), entry.get("coordinateTransformations")):
        for t in transforms or []:
            if t.get("type") != "scale":
                continue
            if "scale" not in t:  # NGFF 0.4's scale stored in a file ("path"): not read, so not known
                return None
            scale *= float(t["scale"][index])
    return scale * factor


def plan_reads(boxes: np.ndarray, width: int, height: int) -> list[tuple[Region, list[int]]]:
    """(region to read, indices of the boxes it serves) for ``boxes`` (k, 4) at one level.

    One read of the union when it covers little more than the boxes themselves, else one read
    per box: neighbours share the chunks on their edges, far-apart boxes would read the gaps.
    """
    clipped = [(i, r) for i, box in enumerate(boxes) if (r := _clip(box, width, height)) is not None]
    if not clipped:
        return []
    x0, y0 = min(r[0] for _, r in clipped), min(r[1] for _, r in clipped)
    x1, y1 = max(r[0] + r[2] for _, r in clipped), max(r[1] + r[3] for _, r in clipped)
    union = (x1 - x0) * (y1 - y0)
    own = sum(r[2] * r[3] for _, r in clipped)
    if len(clipped) == 1 or (union <= MAX_WASTE * own and union <= MAX_UNION_PIXELS):
        return [((x0, y0, x1 - x0, y1 - y0), [i for i, _ in clipped])]
    return [(r, [i]) for i, r in clipped]


def _clip(box: np.ndarray, width: int, height: int) -> Region | None:
    x, y, w, h = (int(v) for v in box)
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
    return (x0, y0, x1 - x0, y1 - y0) if x1 > x0 and y1 > y0 else None


class _Level:
    """One level's array: where its chunks are stored and how a region maps onto them."""

    def __init__(self, array: Any, axes: tuple[str, ...], plane: dict[str, int]):
        self.array, self.axes, self.plane = array, axes, plane
        self.grid = tuple(int(c) for c in (array.shards or array.chunks))  # the stored objects
        self.prefix = str(array.store_path.path)
        self.width = int(array.shape[axes.index("x")])
        self.height = int(array.shape[axes.index("y")])

    def keys(self, region: Region) -> list[str]:
        """Store keys of the chunks (or shards) under ``region`` in the chosen plane."""
        x, y, w, h = region
        ranges = []
        for axis, size, step in zip(self.axes, self.array.shape, self.grid, strict=True):
            if axis == "x":
                ranges.append(range(x // step, (x + w - 1) // step + 1))
            elif axis == "y":
                ranges.append(range(y // step, (y + h - 1) // step + 1))
            elif axis == "c":
                ranges.append(range(-(-int(size) // step)))
            else:
                ranges.append(range(self.plane[axis] // step, self.plane[axis] // step + 1))
        encode = self.array.metadata.encode_chunk_key
        return [self.path(encode(coords)) for coords in itertools.product(*ranges)]

    def path(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def index(self, region: Region) -> tuple[Any, ...]:
        x, y, w, h = region
        return tuple(slice(y, y + h) if a == "y" else slice(x, x + w) if a == "x"
                     else slice(None) if a == "c" else self.plane[a] for a in self.axes)


def _alike_reduced(levels: list[_Level], paths: tuple[str, ...], url: str) -> list[_Level]:
    """Level 0 and the levels reduced alike across and down (to a pixel of rounding): a level
    halved across only would be read as if halved both ways, its tiles squashed. An empty level
    0, or a level larger than it, is refused: the first was a ZeroDivisionError, the second (a
    coarser scale on a larger array) read the smaller array as the full image."""
    w0, h0 = levels[0].width, levels[0].height
    if not w0 or not h0:
        raise InputError(url, f"level {paths[0]!r} is {w0}x{h0} px: an image with no pixels (an interrupted "
                              "write or conversion?); convert the image again")
    for path, lv in zip(paths, levels, strict=True):
        if lv.width > w0 or lv.height > h0:
            raise InputError(url, f"level {path!r} ({lv.width}x{lv.height} px) is larger than level {paths[0]!r} "
                                  f"({w0}x{h0} px), which the multiscales metadata makes the full resolution (the "
                                  "finest scale, or listed first where no scale is written): the metadata "
                                  "contradicts the arrays' sizes; list the levels finest first, with the scales "
                                  "their sizes imply")
    return [lv for lv in levels if lv.width and lv.height and abs(w0 * lv.height / h0 - lv.width) <= 1
            and abs(h0 * lv.width / w0 - lv.height) <= 1]


class OmeZarrBackend(SlideBackend):
    """Reads boxes of an OME-Zarr multiscale RGB(A) or gray uint8 image; pixels outside are white."""

    def __init__(self, url: str, clocks: StageClocks | None = None, *,
                 options: dict[str, Any] | None = None, policy: RetryPolicy | None = None,
                 cache_bytes: int = 32 << 20):
        self.path = redact(url)
        self.policy = policy or default_policy()
        root = self._open_root(url, options)
        group, multiscales, version = find_multiscales(root, self.path)
        if not multiscales:
            raise InputError(self.path, "the 'multiscales' list is empty")
        self.meta = parse_multiscale(multiscales[0], version, self.path)
        arrays = [self._array(group, p) for p in self.meta.paths]
        self.open_notes = self._check_channels(dict(group.attrs), arrays[0])
        self.grayscale = self._check_axes(arrays[0])
        plane = self._plane(arrays[0])
        self.levels = _alike_reduced([_Level(a, self.meta.axes, plane) for a in arrays], self.meta.paths, self.path)
        self.store = arrays[0].store_path.store
        self.cache = DecodedTileCache(cache_bytes)
        self.planned: tuple[int, set[str]] = (0, set())  # the tiles' level, and the chunks they need
        self.absent: set[str] = set()  # chunks a read asked for that the store does not hold
        self.lock = threading.Lock()
        dims = tuple((lv.width, lv.height) for lv in self.levels)
        w0, h0 = dims[0]
        downs = tuple((w0 / w + h0 / h) / 2.0 for w, h in dims)
        self.info = SlideInfo(dims, downs, self.meta.mpp, None, f"ome-zarr-{version}", "zarr",
                              "NGFF coordinateTransformations scale" if self.meta.mpp is not None else "",
                              mpp_y=self.meta.mpp_y)

    def _open_root(self, url: str, options: dict[str, Any] | None) -> Any:
        from gpubatch.io.zarr_groups import open_zarr_group

        try:
            return call_with_retries(lambda: open_zarr_group(url, options, mode="r"), self.path, self.policy)
        except InputError as exc:
            if exc.retryable or exc.message.startswith("access denied"):
                raise
            raise InputError(self.path, "not a zarr group (no zarr.json or .zgroup found)") from None

    def _array(self, group: Any, path: str) -> Any:
        try:
            array = group[path]
        except KeyError:
            raise InputError(self.path, f"level array {path!r} named in multiscales is missing (an interrupted "
                                        "copy, upload or conversion?); copy or convert the image again") from None
        if array.dtype != np.uint8:
            raise InputError(self.path, f"level {path!r} is {array.dtype}, not uint8: slides are read as 8-bit "
                                        "RGB or gray, and fluorescence or 16-bit images are not; export the "
                                        "image as uint8 (rescaled to 0-255) to read it")
        if array.ndim != len(self.meta.axes):
            raise InputError(self.path, f"level {path!r} has {array.ndim} dimensions but "
                                        f"{len(self.meta.axes)} axes {self.meta.axes}")
        return array

    def _check_channels(self, attrs: dict[str, Any], array: Any) -> list[str]:
        """Refuse an image whose ``omero`` metadata says fluorescence (its channels would reach
        the model as red, green and blue); the note for one that only raises a doubt."""
        axes = self.meta.axes
        count = int(array.shape[axes.index("c")]) if "c" in axes else 1
        refusal, note = channel_verdict(omero_channels(attrs), count)
        if refusal:
            raise InputError(self.path, refusal)
        return [note] if note else []

    def _check_axes(self, array: Any) -> bool:
        """y and x must be there, and c (where there) hold RGB, RGBA or one gray channel; True for
        gray (for tissue detection to look for darkness, not stain colour)."""
        axes = self.meta.axes
        for name in ("y", "x"):
            if name not in axes:
                raise InputError(self.path, f"axes {axes} lack {name!r}; an image needs y and x")
        channels = int(array.shape[axes.index("c")]) if "c" in axes else 1
        if channels not in (1, 3, 4):
            raise InputError(self.path, f"the c axis has {channels} channels; RGB (3), RGBA (4) or gray (1) "
                                        "expected: a multichannel (fluorescence) image is not a slide this reads")
        return channels == 1

    def _plane(self, array: Any) -> dict[str, int]:
        """Index 0 of every axis other than c, y, x; such an axis must have one entry only."""
        plane = {}
        for name, size in zip(self.meta.axes, array.shape, strict=True):
            if name in ("c", "y", "x"):
                continue
            if int(size) > 1:
                raise InputError(self.path, f"axis {name!r} has {size} entries (a time series or "
                                            "z-stack); a slide has one plane")
            plane[name] = 0
        return plane

    def read_boxes(self, level: int, boxes: np.ndarray, clocks: StageClocks) -> np.ndarray:
        lv = self.levels[level]
        out = white_where_outside(boxes, lv.width, lv.height)
        plan = plan_reads(boxes, lv.width, lv.height)
        wanted = {key: None for region, _ in plan for key in lv.keys(region)}
        with clocks.part("storage"):
            chunks = self._chunks(list(wanted), clocks)
        with clocks.part("decode"):
            for region, members in plan:
                pixels = self._decode(lv, region, chunks)
                for b in members:
                    paste_tile(out[b], pixels, region[0] - int(boxes[b, 0]), region[1] - int(boxes[b, 1]))
                clocks.count("decode.regions")
                clocks.count("decode.pixels", region[2] * region[3])
        return out

    def expect_reads(self, level: int, blocks: Iterable[np.ndarray]) -> None:
        """Announced to the cache block by block; all of them are the chunks the tiles need,
        of which the absent ones are counted (:meth:`notes`)."""
        lv = self.levels[level]
        needed: set[str] = set()
        for boxes in blocks:
            keys = {k for region, _ in plan_reads(boxes, lv.width, lv.height) for k in lv.keys(region)}
            self.cache.expect(keys)
            needed |= keys
        self.planned = (level, needed)

    def notes(self, level: int) -> list[str]:
        """The channel doubt found at open, and how many of the chunks the tiles at ``level``
        need were absent when read: zarr reads them as the fill value, rightly where a writer
        left out chunks of fill value only, silently where a copy was cut short."""
        planned_level, needed = self.planned
        with self.lock:
            absent = len(self.absent & needed) if planned_level == level else 0
        if not absent:
            return list(self.open_notes)
        unit = "shards" if self.levels[level].array.shards else "chunks"
        return [*self.open_notes, f"{absent} of {len(needed)} {unit} the tiles needed are absent: read as "
                                  f"fill value; a partial copy? (a writer may also leave out {unit} that "
                                  "are all fill value)"]

    def _chunks(self, keys: list[str], clocks: StageClocks) -> dict[str, Any]:
        """Encoded chunks by key: kept ones from the cache, the rest fetched concurrently."""
        from zarr.core.sync import sync

        found = {k: c for k in keys if (c := self.cache.take(k)) is not None}
        missing = [k for k in keys if k not in found]
        if missing:
            fetched = sync(self._get_all(missing, clocks))
            for key, chunk in zip(missing, fetched, strict=True):
                if chunk is not None:
                    found[key] = chunk
                    self.cache.offer(key, chunk)
            absent = [k for k, c in zip(missing, fetched, strict=True) if c is None]
            if absent:  # zarr supplies the fill value: counted, as a partial copy reads so too
                with self.lock:
                    self.absent.update(absent)
        clocks.count("storage.chunks", len(missing))
        clocks.count("storage.cache_hits", len(keys) - len(missing))
        return found

    async def _get_all(self, keys: list[str], clocks: StageClocks) -> list[Any]:
        return list(await asyncio.gather(*(self._get(k, clocks) for k in keys)))

    async def _get(self, key: str, clocks: StageClocks) -> Any:
        """One stored chunk's bytes (None when absent), retried under the policy and counted."""
        from zarr.core.buffer import default_buffer_prototype

        for attempt in range(self.policy.attempts):
            t0 = time.perf_counter()
            try:
                chunk = await self.store.get(key, prototype=default_buffer_prototype())
            except Exception as exc:
                if not is_transient(exc) or attempt + 1 >= self.policy.attempts:
                    raise storage_error(self.path, exc, attempt + 1) from None
                count_retries(clocks, throttled=int(is_throttled(exc)))
                await asyncio.sleep(self.policy.delay(attempt, exc))
                continue
            record_request(clocks, len(chunk) if chunk is not None else 0, time.perf_counter() - t0)
            return chunk
        raise AssertionError("unreachable")

    def _decode(self, lv: _Level, region: Region, chunks: dict[str, Any]) -> np.ndarray:
        """(h, w, 3) uint8 of a region, decoded by zarr from the fetched chunks held in memory."""
        from zarr import Array, AsyncArray
        from zarr.storage import MemoryStore, StorePath

        memory = MemoryStore({k: chunks[k] for k in lv.keys(region) if k in chunks})
        array = Array(AsyncArray(metadata=lv.array.metadata, store_path=StorePath(memory, lv.prefix)))
        try:
            block = np.asarray(array[lv.index(region)])
        except Exception as exc:  # a corrupt chunk: this input fails, not the run
            raise InputError(self.path, f"cannot decode region {region}: {str(exc)[:300]}") from None
        kept = [a for a in self.meta.axes if a in ("y", "x", "c")]  # integer-indexed axes drop out
        if "c" not in kept:
            block, kept = block[..., np.newaxis], [*kept, "c"]
        pixels = np.transpose(block, [kept.index("y"), kept.index("x"), kept.index("c")])
        if pixels.shape[-1] == 1:
            return np.repeat(pixels, 3, axis=-1)
        return composite_on_white(pixels) if pixels.shape[-1] == 4 else np.ascontiguousarray(pixels)

    def integrity_notes(self) -> list[str]:
        """Chunks are decoded by their zarr codecs, which carry no checksum by default (blosc,
        zstd as written): strict cannot vouch for data a codec decodes without an error."""
        from gpubatch.sources.slides.integrity import unchecked_note

        if not self.strict:
            return []
        return [unchecked_note("its chunks carry no checksum of their own", "zarr")]

    def close(self) -> None:
        self.levels = []
