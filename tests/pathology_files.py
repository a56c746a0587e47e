"""Test slides in the formats gpubatch reads beside TIFF: DICOM-WSI, OME-Zarr and OME-TIFF.

Every writer stores the same deterministic, tissue-like picture (stain blobs with texture on
glass), and level n is ``downsample(image, 2**n)``, so any reader's level n can be held to the
picture itself, independently of the reader under test.

DICOM-WSI is written with pydicom, not a converter: wsidicomizer pins wsidicom < 0.32 (pip would
downgrade the wsidicom gpubatch reads with) and highdicom has no constructor for the VL Whole
Slide Microscopy IOD. One file per level, TILED_FULL (frames are the tile grid in row-major
order), JPEG baseline frames in YBR_FULL_422; UIDs derive from ``seed`` so a fixture is the same
bytes every time. OME-Zarr is written by hand with zarr (any axis layout, NGFF 0.4 or 0.5) or by
the ``ome-zarr`` package, the reference implementation.
"""

from __future__ import annotations

import datetime as _dt
import itertools
from pathlib import Path
from typing import Any, Literal

import imagecodecs
import numpy as np
from pydicom import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    VLWholeSlideMicroscopyImageStorage,
    generate_uid,
)

GLASS = 242  # bright, unsaturated background: what a scanner records for empty glass


def synthetic_slide(width: int = 1024, height: int = 768, seed: int = 0) -> np.ndarray:
    """(height, width, 3) uint8: pink/purple elliptical tissue blobs with texture on glass."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    tissue = np.zeros((height, width), dtype=np.float32)
    for _ in range(5):
        cx, cy = rng.uniform(0.15, 0.85) * width, rng.uniform(0.15, 0.85) * height
        rx, ry = rng.uniform(0.08, 0.25) * width, rng.uniform(0.08, 0.25) * height
        inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
        tissue = np.maximum(tissue, np.clip(1.5 - inside, 0.0, 1.0))
    texture = _texture(xx, yy, rng)
    hematoxylin = np.array([110, 60, 160], dtype=np.float32)  # purple
    eosin = np.array([225, 120, 170], dtype=np.float32)  # pink
    stain = eosin + (hematoxylin - eosin) * texture[..., None]
    image = GLASS + (stain - GLASS) * tissue[..., None]
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _texture(xx: np.ndarray, yy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A [0, 1] field of a few random sinusoids: structure at 10-60 px, smooth enough for JPEG."""
    field = np.zeros_like(xx)
    for _ in range(4):
        period = rng.uniform(10.0, 60.0)
        angle = rng.uniform(0.0, np.pi)
        phase = rng.uniform(0.0, 2 * np.pi)
        field += np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period) + phase)
    return (field - field.min()) / max(float(field.max() - field.min()), 1e-6)


def downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Box-filter an (h, w, 3) image by an integer factor; a ragged edge is padded with white.

    The pyramid makers use this so that every format's level n holds the same pixels, and a
    test can compare any backend's level n against ``downsample(source, 2**n)``.
    """
    if factor == 1:
        return image
    h, w = image.shape[:2]
    ph, pw = -h % factor, -w % factor
    padded = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=255) if ph or pw else image
    hh, ww = padded.shape[0] // factor, padded.shape[1] // factor
    blocks = padded.reshape(hh, factor, ww, factor, padded.shape[2]).astype(np.float32)
    return np.round(blocks.mean(axis=(1, 3))).astype(np.uint8)


def pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    """Level 0 and ``levels - 1`` successive 2x box-filtered reductions of it."""
    return [downsample(image, 2**i) for i in range(levels)]


# -- DICOM-WSI

WHITE = 255


def write_dicom_wsi(image: np.ndarray, folder: str | Path, *, levels: int = 3, tile: int = 256,
                    pixel_spacing_mm: float | None = 0.00025, quality: int = 92, seed: int = 0,
                    magnification: float | None = 40.0, codec: str = "jpeg",
                    name: str = "level", gray: str | None = None) -> list[Path]:
    """Write ``image`` (h, w, 3 uint8) as a ``levels``-level DICOM-WSI series; one .dcm per level.

    Level n is ``image`` box-filtered by 2**n with pixel spacing ``pixel_spacing_mm * 2**n`` (None:
    no Pixel Measures at all, as some converters write, and no imaged volume size).
    ``codec``: "jpeg" (baseline, YBR_FULL_422: what scanners write, and OpenSlide 4 reads) or
    "jpegls" (JPEG-LS lossless, RGB: valid DICOM that OpenSlide 4 refuses and wsidicom reads).
    ``gray``: "MONOCHROME2" (black is 0) or "MONOCHROME1" (white is 0, stored inverted): one
    sample per pixel, the first channel of ``image`` as displayed (OpenSlide 4 reads neither).
    Returns the written paths (``{name}{n}.dcm``), level 0 first.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    uids = _series_uids(seed)
    paths = []
    for index, level in enumerate(pyramid(image, levels)):
        spacing = None if pixel_spacing_mm is None else pixel_spacing_mm * 2**index
        ds = _wsi_dataset(level, index, uids, tile, spacing, magnification)
        frames = _encode_frames(ds, level, tile, codec, quality) if gray is None else \
            _encode_gray_frames(ds, level, tile, codec, quality, gray)
        ds.NumberOfFrames = len(frames)
        ds.PixelData = encapsulate(frames)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        path = out / f"{name}{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _encode_frames(ds: Dataset, level: np.ndarray, tile: int, codec: str, quality: int) -> list[bytes]:
    """The level's tiles encoded, with the transfer syntax and colour model the codec implies."""
    tiles = _tiles(level, tile)
    if codec == "jpeg":
        frames = [bytes(imagecodecs.jpeg8_encode(t, level=quality, outcolorspace="YCbCr", subsampling="422"))
                  for t in tiles]
        ds.LossyImageCompressionRatio = f"{level.nbytes / sum(len(f) for f in frames):.2f}"
        return frames
    if codec != "jpegls":
        raise ValueError(f"codec must be 'jpeg' or 'jpegls', got {codec!r}")
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PhotometricInterpretation = "RGB"
    ds.LossyImageCompression = "00"
    del ds.LossyImageCompressionMethod
    return [bytes(imagecodecs.jpegls_encode(t)) for t in tiles]


def _encode_gray_frames(ds: Dataset, level: np.ndarray, tile: int, codec: str, quality: int,
                        photometric: str) -> list[bytes]:
    """The level's first channel as one-sample frames, inverted for MONOCHROME1 (white is 0)."""
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"gray must be 'MONOCHROME1' or 'MONOCHROME2', got {photometric!r}")
    tiles = [np.ascontiguousarray(t[..., 0] if photometric == "MONOCHROME2" else WHITE - t[..., 0])
             for t in _tiles(level, tile)]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    del ds.PlanarConfiguration  # type 1C: only where there is more than one sample
    if codec == "jpeg":
        return [bytes(imagecodecs.jpeg8_encode(t, level=quality)) for t in tiles]
    if codec != "jpegls":
        raise ValueError(f"codec must be 'jpeg' or 'jpegls', got {codec!r}")
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.LossyImageCompression = "00"
    del ds.LossyImageCompressionMethod
    return [bytes(imagecodecs.jpegls_encode(t)) for t in tiles]


def _series_uids(seed: int) -> dict[str, UID]:
    """Study, series, frame of reference, pyramid and specimen UIDs shared by every level."""
    names = ("study", "series", "frame_of_reference", "pyramid", "specimen", "dimension_organization")
    return {name: generate_uid(entropy_srcs=["gpubatch-test-wsi", str(seed), name]) for name in names}


def _tiles(level: np.ndarray, tile: int) -> list[np.ndarray]:
    """The level's tile grid, row-major, edge tiles padded with white to the full tile size."""
    h, w = level.shape[:2]
    padded = np.pad(level, ((0, -h % tile), (0, -w % tile), (0, 0)), constant_values=WHITE)
    return [np.ascontiguousarray(padded[y : y + tile, x : x + tile])
            for y in range(0, padded.shape[0], tile) for x in range(0, padded.shape[1], tile)]


def _wsi_dataset(level: np.ndarray, index: int, uids: dict[str, UID], tile: int,
                 spacing_mm: float | None, magnification: float | None) -> Dataset:
    """Every attribute of the VL WSI IOD that readers use, for one level of the pyramid."""
    h, w = level.shape[:2]
    sop_uid = generate_uid(entropy_srcs=[str(uids["series"]), "level", str(index)])
    ds = _base_dataset(VLWholeSlideMicroscopyImageStorage, sop_uid, JPEGBaseline8Bit, "SM", uids)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if index == 0 else \
        ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
    ds.PyramidUID = uids["pyramid"]
    ds.FrameOfReferenceUID = uids["frame_of_reference"]
    ds.PositionReferenceIndicator = "SLIDE_CORNER"
    ds.InstanceNumber = index + 1
    ds.VolumetricProperties = "VOLUME"
    ds.BurnedInAnnotation = "NO"
    ds.SpecimenLabelInImage = "NO"
    ds.FocusMethod = "AUTO"
    ds.ExtendedDepthOfField = "NO"
    _set_pixel_module(ds, tile, w, h)
    _set_geometry(ds, w, h, spacing_mm)
    _set_specimen(ds, uids)
    ds.OpticalPathSequence = Sequence([_optical_path(magnification)])
    ds.NumberOfOpticalPaths = 1
    return ds


def _base_dataset(sop_class: UID, sop_uid: UID, syntax: UID, modality: str,
                  uids: dict[str, UID]) -> Dataset:
    """Patient, study, series and SOP common modules: the same for WSI and non-WSI files."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.Modality = modality
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Synthetic", "SYNTH-0", "", ""
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.SeriesNumber = 1
    now = _dt.datetime(2024, 1, 1, 12, 0, 0)  # fixed: the same bytes on every run
    ds.StudyDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.Manufacturer, ds.ManufacturerModelName = "gpubatch-tests", "synthetic"
    ds.DeviceSerialNumber, ds.SoftwareVersions = "0", "0"
    return ds


def _set_pixel_module(ds: Dataset, tile: int, width: int, height: int) -> None:
    """Frame size (one tile), total pixel matrix and the JPEG colour model."""
    ds.Rows = ds.Columns = tile
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width, height
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"  # what baseline JPEG with 4:2:2 chroma holds
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.DimensionOrganizationType = "TILED_FULL"
    org = Dataset()
    org.DimensionOrganizationUID = generate_uid(entropy_srcs=[str(ds.SeriesInstanceUID), "dim"])
    ds.DimensionOrganizationSequence = Sequence([org])


def _set_geometry(ds: Dataset, width: int, height: int, spacing_mm: float | None) -> None:
    """Pixel spacing (mm, row then column), imaged size, and the image's place on the slide."""
    frame_type = Dataset()
    frame_type.FrameType = list(ds.ImageType)
    shared = Dataset()
    if spacing_mm is not None:
        measures = Dataset()
        measures.PixelSpacing = [f"{spacing_mm:.8g}", f"{spacing_mm:.8g}"]
        measures.SliceThickness = "0.001"
        shared.PixelMeasuresSequence = Sequence([measures])
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = width * spacing_mm, height * spacing_mm
    shared.WholeSlideMicroscopyImageFrameTypeSequence = Sequence([frame_type])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.ImagedVolumeDepth = 0.001
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = "20.0", "40.0"
    ds.TotalPixelMatrixOriginSequence = Sequence([origin])
    ds.ImageOrientationSlide = ["0", "-1", "0", "-1", "0", "0"]


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _set_specimen(ds: Dataset, uids: dict[str, UID]) -> None:
    """Container and specimen modules (type 1 in the IOD; wsidicom checks they are present)."""
    ds.ContainerIdentifier = "SLIDE-0"
    ds.IssuerOfTheContainerIdentifierSequence = Sequence()
    ds.ContainerTypeCodeSequence = Sequence([_code("433466003", "SCT", "Microscope slide")])
    ds.AcquisitionContextSequence = Sequence()
    specimen = Dataset()
    specimen.SpecimenIdentifier = "SPECIMEN-0"
    specimen.SpecimenUID = uids["specimen"]
    specimen.IssuerOfTheSpecimenIdentifierSequence = Sequence()
    specimen.SpecimenPreparationSequence = Sequence()
    ds.SpecimenDescriptionSequence = Sequence([specimen])


def _optical_path(magnification: float | None) -> Dataset:
    path = Dataset()
    path.OpticalPathIdentifier = "0"
    path.IlluminationTypeCodeSequence = Sequence([_code("111744", "DCM", "Brightfield illumination")])
    path.IlluminationColorCodeSequence = Sequence([_code("414298005", "SCT", "Full Spectrum")])
    if magnification is not None:
        path.ObjectiveLensPower = f"{magnification:g}"
    return path


def split_into_concatenation(path: str | Path, parts: int) -> list[Path]:
    """Rewrite one level file as a concatenation of ``parts`` instances (``{stem}-part{n}.dcm``),
    its frames split between them in order, as scanners split images too large for one file;
    the original file is removed. Returns the parts."""
    import pydicom
    from pydicom.encaps import generate_frames

    source = Path(path)
    frames = list(generate_frames(pydicom.dcmread(source).PixelData,
                                  number_of_frames=int(pydicom.dcmread(source).NumberOfFrames)))
    bounds = np.linspace(0, len(frames), parts + 1).round().astype(int)
    written = []
    for n, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        ds = pydicom.dcmread(source)
        ds.SOPInstanceUIDOfConcatenationSource = ds.SOPInstanceUID
        ds.ConcatenationUID = generate_uid(entropy_srcs=[str(ds.SOPInstanceUID), "concatenation"])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
            entropy_srcs=[str(ds.SOPInstanceUID), "part", str(n)])
        ds.ConcatenationFrameOffsetNumber, ds.InConcatenationNumber = int(lo), n + 1
        ds.InConcatenationTotalNumber = parts
        ds.NumberOfFrames = int(hi - lo)
        ds.PixelData = encapsulate(frames[lo:hi])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        written.append(source.with_name(f"{source.stem}-part{n}.dcm"))
        ds.save_as(written[-1], enforce_file_format=True)
    source.unlink()
    return written


def write_ancillary_dicom(image: np.ndarray, path: str | Path, kind: str = "LABEL", *, seed: int = 0,
                          own_series: bool = False) -> Path:
    """A LABEL, OVERVIEW or THUMBNAIL image (one JPEG frame of ``image``) of the slide that
    ``write_dicom_wsi(..., seed=seed)`` writes: part of the slide, never a pyramid level.
    ``own_series``: in a series of its own (same study and frame of reference), as some scanners
    write their label and overview images."""
    uids = _series_uids(seed)
    if own_series:
        uids = {**uids, "series": generate_uid(entropy_srcs=[str(uids["series"]), "ancillary", kind])}
    h, w = image.shape[:2]
    ds = _wsi_dataset(image, 0, uids, max(h, w), 0.01, None)
    ds.ImageType = ["ORIGINAL" if kind != "THUMBNAIL" else "DERIVED", "PRIMARY", kind,
                    "NONE" if kind != "THUMBNAIL" else "RESAMPLED"]
    ds.SharedFunctionalGroupsSequence[0].WholeSlideMicroscopyImageFrameTypeSequence[0].FrameType = list(ds.ImageType)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
        entropy_srcs=[str(uids["series"]), "ancillary", kind])
    ds.SpecimenLabelInImage = ds.BurnedInAnnotation = "YES" if kind == "LABEL" else "NO"
    frames = _encode_frames(ds, image, max(h, w), "jpeg", 92)
    ds.NumberOfFrames = len(frames)
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def write_non_wsi_dicom(path: str | Path, kind: str = "ct", seed: int = 0) -> Path:
    """A valid single-frame DICOM file that is not a slide: 'ct' (CT Image Storage, int16
    monochrome) or 'sc' (Secondary Capture, RGB). Readers must reject it by its SOP class."""
    sop_class = {"ct": CTImageStorage, "sc": SecondaryCaptureImageStorage}[kind]
    uids = _series_uids(seed + 1000)
    sop_uid = generate_uid(entropy_srcs=["non-wsi", kind, str(seed)])
    ds = _base_dataset(sop_class, sop_uid, ExplicitVRLittleEndian, "CT" if kind == "ct" else "OT", uids)
    ds.InstanceNumber = 1
    rng = np.random.default_rng(seed)
    if kind == "ct":
        ds.set_pixel_data(rng.integers(-1000, 1000, (64, 64), dtype=np.int16), "MONOCHROME2", 16,
                          generate_instance_uid=False)
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
    else:
        ds.set_pixel_data(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "RGB", 8,
                          generate_instance_uid=False)
        ds.ConversionType = "WSD"
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


# -- OME-Zarr and OME-TIFF

NGFF_VERSIONS: dict[str, Literal[2, 3]] = {"0.4": 2, "0.5": 3}  # NGFF version -> zarr format
AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
AXIS_UNITS = {"t": "second", "z": "micrometer", "y": "micrometer", "x": "micrometer"}


def ngff_axes(axes: str) -> list[dict[str, str]]:
    """The NGFF ``axes`` list for a layout string such as 'tczyx' or 'yxc'."""
    out = []
    for name in axes:
        axis = {"name": name, "type": AXIS_TYPES[name]}
        if name in AXIS_UNITS:
            axis["unit"] = AXIS_UNITS[name]
        out.append(axis)
    return out


def level_scales(axes: str, levels: int, mpp: float, mpp_y: float | None = None) -> list[list[dict[str, Any]]]:
    """One ``coordinateTransformations`` list per level: a scale of mpp * 2**n on x and of
    mpp_y * 2**n on y (``mpp`` when not given: square pixels)."""
    per_axis = {"x": mpp, "y": mpp if mpp_y is None else mpp_y}

    def scale(n: int) -> list[float]:
        return [per_axis[a] * 2**n if a in per_axis else 1.0 for a in axes]

    return [[{"type": "scale", "scale": scale(n)}] for n in range(levels)]


def to_layout(rgb: np.ndarray, axes: str) -> np.ndarray:
    """An (h, w, channels) image as an array with the given axes; t and z get size 1. A gray
    (h, w, 1) image may leave out c."""
    arr = np.moveaxis(rgb, -1, 0)  # c, y, x
    source = "cyx"
    if "c" not in axes and arr.shape[0] == 1:
        arr, source = arr[0], "yx"
    for extra in "tz":
        if extra in axes:
            arr, source = arr[np.newaxis], extra + source
    order = [source.index(a) for a in axes]
    if sorted(axes) != sorted(source):
        raise ValueError(f"axes {axes!r} must be 'c', 'y', 'x' plus optional 't' and 'z'")
    return np.ascontiguousarray(np.transpose(arr, order))


def chunks_for(axes: str, chunk: int) -> tuple[int, ...]:
    """``chunk`` on y and x, the whole of c, one plane of t and z."""
    return tuple(chunk if a in "yx" else (3 if a == "c" else 1) for a in axes)


def write_ome_zarr(image: np.ndarray, url: str | Path, *, levels: int = 3, mpp: float = 0.5,
                   axes: str = "cyx", version: str = "0.5", chunk: int = 256,
                   writer: str = "zarr", storage_options: dict[str, Any] | None = None,
                   mpp_y: float | None = None) -> str:
    """Write ``image`` (h, w, 3 uint8; or h, w, 1 gray, with or without c in ``axes``) as a
    multiscale OME-Zarr image at ``url``; returns it.

    ``url`` is a local path or any fsspec URL (``memory://``, ``s3://``...). ``mpp`` is the
    level-0 um/px across (x); ``mpp_y`` down (y), the same as ``mpp`` when not given.
    """
    if version not in NGFF_VERSIONS:
        raise ValueError(f"NGFF version must be one of {sorted(NGFF_VERSIONS)}, got {version!r}")
    arrays = [to_layout(level, axes) for level in pyramid(image, levels)]
    scale = (mpp, mpp if mpp_y is None else mpp_y)
    if writer == "zarr":
        _write_with_zarr(arrays, str(url), axes, scale, version, chunk, storage_options)
    elif writer == "ome-zarr":
        _write_with_ome_zarr(arrays, str(url), axes, scale, version, chunk, storage_options)
    else:
        raise ValueError(f"writer must be 'zarr' or 'ome-zarr', got {writer!r}")
    return str(url)


def _write_with_zarr(arrays: list[np.ndarray], url: str, axes: str, scale: tuple[float, float],
                     version: str, chunk: int, storage_options: dict[str, Any] | None) -> None:
    """NGFF metadata by hand: 0.5 under attributes['ome'] (zarr v3), 0.4 at the top (zarr v2);
    ``scale`` is level 0's (um/px across, um/px down)."""
    import zarr

    zarr_format = NGFF_VERSIONS[version]
    root = zarr.open_group(url, mode="w", zarr_format=zarr_format, storage_options=storage_options)
    datasets = []
    for n, (arr, transforms) in enumerate(zip(arrays, level_scales(axes, len(arrays), *scale), strict=True)):
        z = root.create_array(str(n), shape=arr.shape, dtype=arr.dtype, chunks=chunks_for(axes, chunk),
                              fill_value=0, dimension_names=list(axes) if zarr_format == 3 else None)
        z[...] = arr
        datasets.append({"path": str(n), "coordinateTransformations": transforms})
    multiscale: dict[str, Any] = {"name": "image", "axes": ngff_axes(axes), "datasets": datasets}
    if version == "0.5":
        root.attrs["ome"] = {"version": "0.5", "multiscales": [multiscale]}
    else:
        root.attrs["multiscales"] = [{"version": "0.4", **multiscale}]


def _write_with_ome_zarr(arrays: list[np.ndarray], url: str, axes: str, scale: tuple[float, float],
                         version: str, chunk: int, storage_options: dict[str, Any] | None) -> None:
    """The reference writer: ome_zarr.writer.write_multiscale with an explicit NGFF format."""
    import zarr
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_multiscale

    fmt = FormatV05() if version == "0.5" else FormatV04()
    root = zarr.open_group(url, mode="w", zarr_format=fmt.zarr_format, storage_options=storage_options)
    # ``scale`` (level 0) and ``axes_units`` replace the deprecated explicit coordinate_transformations:
    # ome-zarr derives each level's scale (and a half-pixel translation) from the array shapes.
    write_multiscale(arrays, root, fmt=fmt, axes=axes, scale={"y": scale[1], "x": scale[0]},
                     axes_units={"y": "micrometer", "x": "micrometer"},
                     storage_options={"chunks": chunks_for(axes, chunk)})


def write_ome_tiff(image: np.ndarray, path: str | Path, *, levels: int = 3, mpp: float = 0.5,
                   tile: int = 256, compression: str = "jpeg") -> Path:
    """An OME-TIFF pyramid: level 0 in the main IFD, the reductions in its SubIFDs.

    This is the layout bioformats2raw/raw2ometiff and QuPath write; the physical pixel size goes
    into the OME-XML (PhysicalSizeX/Y in µm) and the TIFF resolution tags alike.
    """
    import tifffile

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    levels_px = pyramid(image, levels)
    options: dict[str, Any] = {"tile": (tile, tile), "compression": compression, "photometric": "rgb",
                               "resolutionunit": "CENTIMETER"}
    metadata = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
                "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm"}
    with tifffile.TiffWriter(out, bigtiff=False, ome=True) as tif:
        tif.write(levels_px[0], subifds=levels - 1, metadata=metadata,
                  resolution=(1e4 / mpp, 1e4 / mpp), **options)
        for n, level in enumerate(levels_px[1:], start=1):
            res = 1e4 / (mpp * 2**n)
            tif.write(level, subfiletype=1, metadata=None, resolution=(res, res), **options)
    return out


LEICA_NS = "http://www.leica-microsystems.com/scn/2010/10/01"


def write_leica_scn(image: np.ndarray, path: str | Path, *, offset: tuple[int, int], canvas: tuple[int, int],
                    levels: int = 2, nm_per_pixel: int = 250, tile: int = 128) -> Path:
    """A Leica SCN as openslide's leica driver reads it: one brightfield main image of ``image``
    (level n is ``downsample(image, 2**n)``) placed at ``offset`` level-0 pixels on a slide of
    ``canvas`` pixels. openslide's level 0 is the whole slide (white outside the image) and its
    ``openslide.bounds-*`` the image's place; viewers (QuPath) show the image alone."""
    import tifffile

    h, w = image.shape[:2]
    levels_px = pyramid(image, levels)
    dims = "".join(f'<dimension sizeX="{lv.shape[1]}" sizeY="{lv.shape[0]}" r="{i}" ifd="{i}"/>'
                   for i, lv in enumerate(levels_px))
    xml = (f'<?xml version="1.0" encoding="utf-8"?><scn xmlns="{LEICA_NS}"><collection name="slide" '
           f'sizeX="{canvas[0] * nm_per_pixel}" sizeY="{canvas[1] * nm_per_pixel}"><image name="main">'
           f'<creationDate>2020-01-01T00:00:00Z</creationDate><device model="SCN400" version="1.5"/>'
           f'<pixels sizeX="{w}" sizeY="{h}">{dims}</pixels>'
           f'<view sizeX="{w * nm_per_pixel}" sizeY="{h * nm_per_pixel}" offsetX="{offset[0] * nm_per_pixel}" '
           f'offsetY="{offset[1] * nm_per_pixel}" spacingZ="0"/><scanSettings><objectiveSettings>'
           f'<objective>20</objective></objectiveSettings><illuminationSettings><numericalAperture>0.4'
           f'</numericalAperture><illuminationSource>brightfield</illuminationSource></illuminationSettings>'
           f'</scanSettings></image></collection></scn>')
    per_cm = 1e7 / nm_per_pixel
    out = Path(path)
    with tifffile.TiffWriter(out, bigtiff=True) as tif:
        for n, level in enumerate(levels_px):
            tif.write(level, tile=(tile, tile), compression="jpeg", photometric="rgb", metadata=None,
                      description=xml if n == 0 else None, resolution=(per_cm / 2**n, per_cm / 2**n),
                      resolutionunit="CENTIMETER")
    return out


# -- pytest fixtures (``pytest_plugins = ["pathology_files"]`` brings them into a test module)

import pytest  # noqa: E402 - the writers above need no pytest


@pytest.fixture(scope="session")
def picture() -> np.ndarray:
    """The picture every format stores: 1024 x 768, stain blobs on glass."""
    return synthetic_slide()


@pytest.fixture(scope="session")
def formats_dir(tmp_path_factory: pytest.TempPathFactory, picture: np.ndarray) -> Path:
    """One folder holding the picture in every format, and DICOM files that are not slides.

    dicom/            a JPEG DICOM-WSI series (OpenSlide 4 and wsidicom both read it)
    dicom-ls/         the same picture as JPEG-LS lossless (only wsidicom reads it)
    not-slides/       a CT image and a secondary capture: DICOM, but not slides
    image.ome.zarr    NGFF 0.5, hand-written (cyx, zarr v3)
    v04.ome.zarr      NGFF 0.4, written by the ome-zarr package (zarr v2)
    image.ome.tif     an OME-TIFF pyramid in SubIFDs
    """
    root = tmp_path_factory.mktemp("formats")
    write_dicom_wsi(picture, root / "dicom")
    write_dicom_wsi(picture, root / "dicom-ls", codec="jpegls", seed=1)
    write_non_wsi_dicom(root / "not-slides" / "ct.dcm", "ct")
    write_non_wsi_dicom(root / "not-slides" / "sc.dcm", "sc")
    write_ome_zarr(picture, root / "image.ome.zarr", version="0.5")
    write_ome_zarr(picture, root / "v04.ome.zarr", version="0.4", writer="ome-zarr")
    write_ome_tiff(picture, root / "image.ome.tif")
    return root
