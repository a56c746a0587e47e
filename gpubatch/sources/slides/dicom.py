"""DICOM-WSI slides: OpenSlide 4 where it opens the file, wsidicom where it cannot.

A DICOM-WSI slide is a series of files, one per pyramid level (plus label and overview images),
usually in a folder of its own and often in object storage. OpenSlide 4 opens a series from one
of its files on a local disk; it cannot open a folder or a remote object, and for a file that is
not a slide it says only "Unsupported or missing image file". wsidicom reads a folder or any of
its files, locally or through fsspec, so it takes those cases.

Before wsidicom sees them, the files are vetted with pydicom (header only, no pixel data): it is
handed the pyramid levels (ImageType VOLUME) of exactly one whole-slide series, never its label,
overview or thumbnail images (which may be a series of their own); a file that is DICOM but not
a slide (a CT, a secondary capture) is refused by name: "its SOP Class is CT Image Storage
(1.2.840...)", so a user who pointed a job at the wrong series learns that from the error alone.
Each level file must hold all its frames (its header against its tile grid, its pixel data's
end against the file's): a copy cut short is refused at open, by OpenSlide's path too, so that
validate names it, rather than at the read that reaches the gap.

Frames are read on the level's own tile grid like TIFF tiles: fetched as encoded bytes (the
storage part), decoded once each (the decode part), edge frames shared by two read blocks kept
between them. Label and overview images are never read; only the allowlisted ``SlideInfo`` leaves.

Gray series (one sample, MONOCHROME2) are read as RGB with the gray in every channel and said to
be gray (``grayscale``), so tissue detection looks for darkness, not stain colour. MONOCHROME1
(white is 0) is refused by name: DICOM-WSI does not allow it, and wsidicom drops it unread.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputError
from gpubatch.io.ranges import RangeFile
from gpubatch.io.redact import redact
from gpubatch.io.retried_fs import RetriedFS
from gpubatch.io.uris import is_remote, local_path
from gpubatch.sources.slides.backends import (
    LENIENT_HINT,
    DecodedTileCache,
    SlideBackend,
    SlideInfo,
    TileGrid,
    TileGridBackend,
)
from gpubatch.sources.slides.openslide_backend import OpenSlideBackend

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
HEADER_TAGS = ("SOPClassUID", "SeriesInstanceUID", "PhotometricInterpretation", "ImageType",
               "NumberOfFrames", "Rows", "Columns", "TotalPixelMatrixColumns", "TotalPixelMatrixRows",
               "TotalPixelMatrixFocalPlanes", "NumberOfOpticalPaths", "DimensionOrganizationType",
               "ConcatenationUID")
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD) and length 0: the last 8 bytes
ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000): one frame of encapsulated pixel data
UNDEFINED_LENGTH = 0xFFFFFFFF
#: ImageType value 3 of the DICOM-WSI images that are not pyramid levels: never read, never a slide
ANCILLARY_IMAGES = ("LABEL", "OVERVIEW", "THUMBNAIL")
DICOM_SUFFIXES = (".dcm", ".dicom")
#: transfer syntaxes whose frames libjpeg-turbo entropy-checks under tiles.integrity: strict (baseline, extended)
JPEG_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"})
MAGIC_OFFSET, MAGIC = 128, b"DICM"
EXTRA_HINT = "pip install 'gpubatch[dicom]'"
HEADER_BLOCK = 1 << 16


@dataclass(frozen=True)
class DicomHeader:
    """What is known of a file before wsidicom sees it: its SOP class and series."""

    path: str
    sop_class: str
    series_uid: str
    photometric: str = ""
    #: ImageType value 3: VOLUME (a pyramid level), LABEL, OVERVIEW or THUMBNAIL; '' when absent
    flavor: str = ""
    size: int = 0  # bytes of the file
    frames: int = 0  # NumberOfFrames
    #: frames a TILED_FULL image must hold (tiles across x down x focal planes x optical paths);
    #: 0 where the header does not say (TILED_SPARSE holds the frames it has)
    grid_frames: int = 0
    pixels_at: int = -1  # where the pixel data element starts (its tag), -1 where none was found
    #: ConcatenationUID: an image too large for one file is split over the instances that share it
    concatenation: str = ""

    @property
    def is_wsi(self) -> bool:
        return self.sop_class == WSI_SOP_CLASS

    @property
    def cut(self) -> bool:
        """A whole-slide image (or a file too damaged to say) whose header runs to the end of
        the file, or cannot be read: it holds no frames, whatever it claims."""
        return self.pixels_at < 0 and (self.is_wsi or not self.sop_class)

    @property
    def is_level(self) -> bool:
        """A pyramid level of a slide. Label, overview and thumbnail images are not, and may even
        be a series of their own beside the pyramid's: they never count as a slide, and are never
        handed to a reader (a file without ImageType is left to the reader to judge)."""
        return self.is_wsi and self.flavor not in ANCILLARY_IMAGES


class MissingFrames(InputError):
    """A level file that does not hold all its frames (cut short, or frames left out)."""


class NoPixelSpacing(InputError):
    """A series whose files record no pixel spacing: wsidicom orders a pyramid's levels by it and
    opens none without it. OpenSlide reads such a series from a local disk, as a slide without
    MPP (``files``: the series' level files, to hand it one)."""

    def __init__(self, uri: str, files: list[str]):
        super().__init__(uri, "its DICOM files record no pixel spacing (PixelSpacing, in the Pixel Measures "
                              "of the Shared Functional Groups), without which wsidicom, the reader of "
                              "DICOM-WSI folders and of series in object storage, cannot order its pyramid "
                              "levels; add PixelSpacing to the files, or copy the series to a local disk and "
                              "name one of its files, which OpenSlide reads as a slide without MPP")
        self.files = files


def require_dicom_packages(uri: str) -> None:
    """Refuse this input, naming the extra to install, when pydicom or wsidicom is missing."""
    try:
        import pydicom  # noqa: F401
        import wsidicom  # noqa: F401
    except ImportError:
        raise InputError(redact(uri), f"reading DICOM-WSI needs pydicom and wsidicom: {EXTRA_HINT}") from None


def describe_sop_class(uid: str) -> str:
    """'CT Image Storage (1.2.840.10008.5.1.4.1.1.2)': the name a user can look up, and the UID."""
    from pydicom.uid import UID

    name = UID(uid).name if uid else ""
    return f"{name} ({uid})" if name and name != uid else f"unknown SOP class ({uid or 'none'})"


def has_dicom_magic(path: str) -> bool:
    """True when a local file carries 'DICM' after the 128-byte preamble (any suffix)."""
    try:
        with open(path, "rb") as f:
            f.seek(MAGIC_OFFSET)
            return f.read(4) == MAGIC
    except OSError:
        return False


def looks_like_dicom(uri: str) -> bool:
    """A DICOM suffix, or (local files) the DICM magic: worth sending to the DICOM readers."""
    if uri.lower().rstrip("/").endswith(DICOM_SUFFIXES):
        return True
    return not is_remote(uri) and has_dicom_magic(local_path(uri))


def read_header(fs: RetriedFS, path: str, size: int) -> DicomHeader | None:
    """The file's SOP class and series (header only); None when it is not DICOM at all. A file
    with the DICM marker whose header cannot be read to its end (cut short, or damaged) comes
    back with what could be read, and ``cut`` True."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with fs.open(path, size, blocksize=HEADER_BLOCK) as f:  # a header, not the whole file
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=list(HEADER_TAGS))
            pixels_at = f.tell() if f.tell() < size else -1  # pydicom stops at the pixel data's tag
    except (InvalidDicomError, EOFError, ValueError, KeyError):
        with fs.open(path, size, blocksize=MAGIC_OFFSET + len(MAGIC)) as f:
            f.seek(MAGIC_OFFSET)
            return DicomHeader(path, "", "", size=size) if f.read(len(MAGIC)) == MAGIC else None
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else "") or "")
    image_type = ds.get("ImageType") or []
    values = [image_type] if isinstance(image_type, str) else list(image_type)
    flavor = str(values[2]).strip().upper() if len(values) > 2 else ""
    return DicomHeader(path, sop_class, str(ds.get("SeriesInstanceUID", "")),
                       str(ds.get("PhotometricInterpretation", "")), flavor, size,
                       _count(ds, "NumberOfFrames"), _grid_frames(ds), pixels_at,
                       str(ds.get("ConcatenationUID", "")))


def _count(ds: Any, keyword: str) -> int:
    """A positive count the header states, or 1 where it states none (or nothing readable):
    the readers judge a header that garbles one."""
    try:
        return max(int(ds.get(keyword) or 1), 1)
    except (TypeError, ValueError):
        return 1


def _grid_frames(ds: Any) -> int:
    """Frames a TILED_FULL image holds: one per tile of its grid, focal plane and optical path
    (wsidicom's rule); 0 where the header does not say."""
    if str(ds.get("DimensionOrganizationType", "")).upper() != "TILED_FULL" or not ds.get("TotalPixelMatrixColumns"):
        return 0
    rows, columns = _count(ds, "Rows"), _count(ds, "Columns")
    across = -(-_count(ds, "TotalPixelMatrixColumns") // columns)
    down = -(-_count(ds, "TotalPixelMatrixRows") // rows)
    return across * down * _count(ds, "TotalPixelMatrixFocalPlanes") * _count(ds, "NumberOfOpticalPaths")


def _files(fs: RetriedFS, folder: str) -> list[dict[str, Any]]:
    """The files directly in ``folder`` (hidden ones skipped), by name."""
    entries = [e for e in fs.ls(folder) if e.get("type") == "file"
               and not posixpath.basename(e["name"]).startswith(".")]
    return sorted(entries, key=lambda e: e["name"])


def folder_headers(fs: RetriedFS, folder: str) -> list[DicomHeader]:
    """Headers of the DICOM files directly in ``folder`` (not recursive; DICOMDIR skipped)."""
    headers = []
    for entry in _files(fs, folder):
        header = read_header(fs, entry["name"], int(entry.get("size") or 0))
        if header is not None and header.sop_class != DICOMDIR_SOP_CLASS:
            headers.append(header)
    return headers


def folder_holds_dicom(fs: RetriedFS, folder: str) -> bool:
    """Cheap test for a folder of DICOM files: one with a DICOM suffix, or the first file's magic."""
    files = _files(fs, folder)
    if any(e["name"].lower().endswith(DICOM_SUFFIXES) for e in files):
        return True
    for entry in files[:1]:
        with fs.open(entry["name"], int(entry.get("size") or 0)) as f:
            f.seek(MAGIC_OFFSET)
            return bool(f.read(4) == MAGIC)
    return False


def series_files(uri: str, options: dict[str, Any] | None = None, clocks: StageClocks | None = None) -> list[str]:
    """The files of the one DICOM-WSI series at ``uri``: a folder, or any one of its files.

    A file brings in its siblings of the same series (each level is a file of its own); a folder
    must hold exactly one WSI series, whose level files must hold all their frames
    (:func:`check_frames`). Raises InputError saying what was found instead.
    """
    from gpubatch.io.storage import retried_fs

    require_dicom_packages(uri)
    fs, path = retried_fs(uri, options, clocks=clocks)
    levels = _series_of_folder(fs, path, uri) if fs.isdir(path) else _series_of_file(fs, path, uri)
    _refuse_short_grids(levels, uri)
    for header in levels:
        check_frames(fs, header, uri)
    return sorted({fs.unstrip(h.path) for h in levels})


def _refuse_short_grids(levels: Sequence[DicomHeader], uri: str) -> None:
    """A TILED_FULL image holds a frame for every tile of its grid, in one file or over the
    instances of a concatenation: fewer is a file written short of frames, or an instance of the
    concatenation missing. Read as sparse, the gap would be white glass."""
    images: dict[str, list[DicomHeader]] = {}
    for header in levels:
        images.setdefault(header.concatenation or header.path, []).append(header)
    for parts in images.values():
        held, needed = sum(h.frames for h in parts), parts[0].grid_frames
        if needed and held < needed:
            names = ", ".join(sorted(posixpath.basename(h.path) for h in parts))
            what = f"level file {names} holds" if len(parts) == 1 else f"level files {names} (one concatenation) hold"
            raise MissingFrames(redact(uri), f"{what} {held} frames, but the TILED_FULL tile grid needs {needed}: "
                                             "frames are missing (a file or instance left out); export or copy "
                                             "the series again")


def check_frames(fs: RetriedFS, header: DicomHeader, uri: str) -> None:
    """Refuse a level file cut short (an interrupted copy or upload), read from its header and
    its pixel data's ends, so that validate names such a series as the run's first read of it
    would, and never lets a gap pass as a sparse tile."""
    name = posixpath.basename(header.path)
    if _cut_short(fs, header):
        raise MissingFrames(redact(uri), f"truncated: level file {name} ({header.size} bytes) ends before its "
                                         "last frame, as an interrupted copy, upload or download leaves it; "
                                         "copy the series again")


def _cut_short(fs: RetriedFS, header: DicomHeader) -> bool:
    """Whether the level file's pixel data runs past its end. Native frames: the element's length
    says where they end. Encapsulated ones end with a sequence delimiter, usually the file's last
    8 bytes; where it is not (trailing padding, or a cut), the frames are followed to it."""
    if header.pixels_at < 0:  # the header itself runs to the end: no pixel data
        return True
    with fs.open(header.path, header.size, blocksize=4096) as f:
        f.seek(header.pixels_at)
        head = f.read(12)
        if head[:4] != PIXEL_DATA_TAG:
            return False  # not where pydicom stopped: the reader judges the file
        explicit = head[4:6] in (b"OB", b"OW")
        length = int.from_bytes(head[8:12] if explicit else head[4:8], "little")
        start = header.pixels_at + (12 if explicit else 8)
        if length != UNDEFINED_LENGTH:
            return start + length > header.size
        f.seek(header.size - len(SEQUENCE_END))
        if f.read(len(SEQUENCE_END)) == SEQUENCE_END:
            return False
        return _frames_run_past(fs, header, f, start)


def _frames_run_past(fs: RetriedFS, header: DicomHeader, f: Any, start: int) -> bool:
    """Whether encapsulated frames from ``start`` (the offset table's item, then one item per
    frame) run past the file's end: from the last frame where the basic offset table says where
    it starts (two small reads), else through every frame (1 MiB reads, as wsidicom's own parse
    of such a file)."""
    f.seek(start)
    table = f.read(8)
    if table[:4] != ITEM_TAG:
        return True
    table_bytes = int.from_bytes(table[4:8], "little")
    first = start + 8 + table_bytes
    if table_bytes >= 4:
        f.seek(first - 4)
        return not _items_end_within(f, first + int.from_bytes(f.read(4), "little"), header.size)
    with fs.open(header.path, header.size, blocksize=RangeFile.KEPT_CHUNK_BYTES - 8) as walk:
        return not _items_end_within(walk, first, header.size)


def _items_end_within(f: Any, position: int, size: int) -> bool:
    """Whether the items of encapsulated pixel data from ``position`` end with their sequence
    delimiter inside a file of ``size`` bytes."""
    while position + 8 <= size:
        f.seek(position)
        head = f.read(8)
        if head == SEQUENCE_END:
            return True
        if head[:4] != ITEM_TAG:
            return False
        position += 8 + int.from_bytes(head[4:8], "little")
    return False


def _series_of_folder(fs: RetriedFS, folder: str, uri: str) -> list[DicomHeader]:
    headers = folder_headers(fs, folder)
    _refuse_cut(headers, uri)
    levels = [h for h in headers if h.is_level]
    if not levels:
        raise InputError(redact(uri), _no_wsi_message(headers))
    series = {h.series_uid for h in levels}
    if len(series) > 1:
        raise InputError(redact(uri), f"folder holds {len(series)} DICOM-WSI series; list its "
                                      "files (folder/*.dcm) to read each series as a slide")
    _refuse_white_is_zero(levels, uri)
    return levels


def _series_of_file(fs: RetriedFS, path: str, uri: str) -> list[DicomHeader]:
    if not fs.exists(path):
        raise InputError(redact(uri), "file not found")
    header = read_header(fs, path, fs.size(path))
    if header is None:
        raise InputError(redact(uri), "not a DICOM file (no 'DICM' marker after the 128-byte preamble)")
    _refuse_cut([header], uri)
    if not header.is_wsi:
        raise InputError(redact(uri), not_a_slide_message(header.sop_class))
    siblings = folder_headers(fs, posixpath.dirname(path) or ".")
    _refuse_cut(siblings, uri)
    same = [h for h in siblings if h.is_level and h.series_uid == header.series_uid]
    if not header.is_level and not same:  # a label or overview in a series of its own
        raise InputError(redact(uri), f"{ancillary_message(header.flavor)}, and no pyramid level of its "
                                      "series lies beside it; point the job at the slide's VOLUME files")
    _refuse_white_is_zero([header, *same], uri)
    listed = {h.path for h in same}
    return same + [header] if header.is_level and header.path not in listed else same


def _refuse_cut(headers: Sequence[DicomHeader], uri: str) -> None:
    """A file of the series cut within its header belongs to no series that can be told: left
    out, the rest would read as a smaller slide (a pyramid without its level 0)."""
    for header in headers:
        if header.cut:
            raise MissingFrames(redact(uri), f"truncated: DICOM file {posixpath.basename(header.path)} "
                                             f"({header.size} bytes) ends within its header, before any "
                                             "frame, as an interrupted copy, upload or download leaves it; "
                                             "copy the series again")


def _refuse_white_is_zero(headers: Sequence[DicomHeader], uri: str) -> None:
    """MONOCHROME1 (white is 0) is refused by name: the DICOM-WSI standard does not allow it
    (gray slides are MONOCHROME2), and wsidicom drops such files unread, leaving only "Level
    files not found" to explain a series it was handed whole."""
    if any(h.photometric == "MONOCHROME1" for h in headers):
        raise InputError(redact(uri), "its PhotometricInterpretation is MONOCHROME1 (white is 0), which "
                                      "DICOM-WSI does not allow and wsidicom does not read; gray slides are "
                                      "MONOCHROME2: invert the frames and rewrite the series as MONOCHROME2")


def not_a_slide_message(sop_class: str) -> str:
    return (f"is a DICOM file but not a whole-slide image: its SOP Class is "
            f"{describe_sop_class(sop_class)}; expected {describe_sop_class(WSI_SOP_CLASS)}")


def ancillary_message(flavor: str) -> str:
    return (f"is the slide's {flavor.lower()} image (ImageType {flavor}), not a pyramid level (ImageType "
            "VOLUME): it is never read as tissue")


def _no_wsi_message(headers: Sequence[DicomHeader]) -> str:
    if not headers:
        return "folder holds no DICOM files"
    ancillary = sorted({h.flavor for h in headers if h.is_wsi})
    if ancillary:
        return (f"folder holds no pyramid level (ImageType VOLUME), only the slide's {', '.join(ancillary)} "
                "image(s), which are never read as tissue; copy the series' VOLUME files (its pyramid "
                "levels) into the folder")
    classes = sorted({describe_sop_class(h.sop_class) for h in headers})
    return (f"folder holds {len(headers)} DICOM file(s) but no whole-slide image; SOP classes "
            "found: " + ", ".join(classes))


def _pixel_kind(data: Any) -> str | None:
    """'gray' (one sample, MONOCHROME2), 'RGB' (three samples) or None for a level's image data."""
    samples = int(data.samples_per_pixel)
    if samples == 1 and str(data.photometric_interpretation) == "MONOCHROME2":
        return "gray"
    return "RGB" if samples == 3 else None


class WsiDicomBackend(TileGridBackend):
    """A DICOM-WSI series read through wsidicom, frame by frame on each level's tile grid.

    Reads the selected pyramid's default focal plane and optical path; z-stacks and fluorescence
    channels are out of scope. wsidicom's own frame caches are kept small: this backend keeps
    exactly the decoded frames later planned reads need (``expect_reads``), within ``cache_bytes``.
    """

    def __init__(self, uri: str, clocks: StageClocks | None = None, *,
                 options: dict[str, Any] | None = None, cache_bytes: int = 32 << 20):
        from wsidicom import Settings, WsiDicom
        from wsidicom.errors import WsiDicomNoResolutionError

        from gpubatch.io.storage import library_options

        self.path = redact(uri)
        files = series_files(uri, options, clocks)
        settings = Settings(decoded_frame_cache_size=1 << 20, encoded_frame_cache_size=1 << 20)
        file_options = library_options(uri, options) if is_remote(uri) else None  # wsidicom's requests
        try:
            self.slide = WsiDicom.open(files, file_options=file_options, settings=settings)
        except WsiDicomNoResolutionError:
            raise NoPixelSpacing(self.path, files) from None
        except Exception as exc:  # wsidicom's errors share no base class; the files were vetted
            why = redact(str(exc)) or type(exc).__name__  # some carry no words at all
            raise InputError(self.path, f"wsidicom cannot open the DICOM-WSI series: {why}") from None
        if clocks is not None:
            clocks.count("storage.files", len(files))
        self.levels = list(self.slide.levels)
        self.data = [lv.default_instance.image_data for lv in self.levels]
        self.grayscale = self._gray()
        self.grids = [TileGrid(int(lv.size.width), int(lv.size.height), int(d.tile_size.width),
                               int(d.tile_size.height)) for lv, d in zip(self.levels, self.data, strict=True)]
        self.cache = DecodedTileCache(cache_bytes)
        self.info = self._slide_info()

    def _gray(self) -> bool:
        """Whether the levels store gray (one sample, MONOCHROME2), for tissue detection to look
        for darkness, not stain colour; every level must be gray, or every level RGB (3 samples)."""
        kinds = [_pixel_kind(d) for d in self.data]
        for level, (kind, data) in enumerate(zip(kinds, self.data, strict=True)):
            if kind is None or kind != kinds[0]:
                raise InputError(self.path, f"level {level} has {data.samples_per_pixel} sample(s) per pixel "
                                            f"({data.photometric_interpretation}); a slide is RGB (3 samples) "
                                            "or gray (1, MONOCHROME2), the same at every level")
        return kinds[0] == "gray"

    def _slide_info(self) -> SlideInfo:
        dims = tuple((g.width, g.height) for g in self.grids)
        w0, h0 = dims[0]
        downs = tuple((w0 / w + h0 / h) / 2.0 for w, h in dims)
        mpp = self.levels[0].mpp
        return SlideInfo(dims, downs, float(mpp.width) if mpp is not None else None,
                         self._magnification(), "dicom", "wsidicom",
                         "DICOM PixelSpacing" if mpp is not None else "",
                         mpp_y=float(mpp.height) if mpp is not None else None)

    def _magnification(self) -> float | None:
        """Objective lens power of the first optical path, when the files record it."""
        try:
            power = self.slide.metadata.pyramid.optical_paths[0].objective.objective_power
        except Exception:  # optional metadata, and wsidicom's parse of it may fail: not fatal
            return None
        return float(power) if power else None

    def _grid(self, level: int) -> TileGrid:
        return self.grids[level]

    def _fetch(self, level: int, indices: list[int], clocks: StageClocks) -> list[bytes]:
        from wsidicom.geometry import Point

        data, nx = self.data[level], self.grids[level].nx
        points = [Point(i % nx, i // nx) for i in indices]
        try:
            frames = list(data.get_encoded_tiles(points, data.default_z, data.default_path))
            clocks.count("storage.bytes", sum(len(f) for f in frames))
            return frames
        except Exception as exc:  # truncated files, unreadable objects: this input fails, not the run
            raise InputError(self.path, f"cannot read DICOM frames at level {level}: "
                                        f"{redact(str(exc))[:300]}") from None

    def integrity_notes(self) -> list[str]:
        from gpubatch.sources.slides.integrity import unchecked_note

        other = sorted({str(d.transfer_syntax) for d in self.data} - JPEG_SYNTAXES)
        if not self.strict or not other:
            return []
        return [unchecked_note(f"its frames are stored as {', '.join(other)}, and only JPEG frames are checked",
                               "wsidicom")]

    def _decoded(self, level: int, blobs: list[bytes], indices: list[int]) -> Iterator[np.ndarray]:
        from gpubatch.sources.slides.integrity import check_jpeg_tile

        decoder = self.data[level].decoder
        check = self.strict and str(self.data[level].transfer_syntax) in JPEG_SYNTAXES
        for index, blob in zip(indices, blobs, strict=True):
            try:
                if check:
                    check_jpeg_tile(blob, None)
                tile = np.asarray(decoder.decode(blob))
            except Exception as exc:
                lenient = LENIENT_HINT if check else ""
                raise InputError(self.path, f"corrupt DICOM frame {index} at level {level}: "
                                            f"{str(exc)[:300]}{lenient}") from None
            yield tile[..., :3] if tile.ndim == 3 else np.repeat(tile[..., None], 3, axis=-1)

    def close(self) -> None:
        self.slide.close()


def open_dicom(uri: str, clocks: StageClocks, options: dict[str, Any] | None = None) -> SlideBackend:
    """A local DICOM file through OpenSlide 4 when it opens it, else wsidicom (folders and remote
    series always through wsidicom); when neither can, the error names the file's SOP class.
    A local folder whose series records no pixel spacing goes to OpenSlide, through one of its
    level files: a slide without MPP, which the grid's rules then read or refuse."""
    if is_remote(uri):
        return WsiDicomBackend(uri, clocks, options=options)
    if not os.path.isfile(local_path(uri)):
        try:
            return WsiDicomBackend(uri, clocks, options=options)
        except NoPixelSpacing as unordered:
            try:
                return OpenSlideBackend(local_path(unordered.files[0]))
            except InputError as second:
                raise InputError(unordered.input_uri, f"{unordered.message}; openslide: {second.message}") from None
    try:
        backend: SlideBackend = OpenSlideBackend(local_path(uri))
    except InputError as first:
        try:
            return WsiDicomBackend(uri, clocks, options=options)
        except InputError as second:
            if any(own in second.message for own in ("SOP Class", "not a DICOM file", "MONOCHROME1", "ImageType")):
                raise
            raise InputError(second.input_uri, f"{second.message}; openslide: {first.message}") from None
    _refuse_missing_frames(uri, backend)
    return backend


def _refuse_missing_frames(uri: str, backend: SlideBackend) -> None:
    """OpenSlide opens a series without reading its frames: a level file cut short, or short of
    frames, failed only at the read that reached the gap (validate passed it). Its files are
    vetted as wsidicom's are; where they cannot be (no pydicom), OpenSlide's opening stands."""
    try:
        series_files(uri)
    except MissingFrames:
        backend.close()
        raise
    except InputError:
        pass
