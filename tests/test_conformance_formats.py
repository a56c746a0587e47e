"""DICOM-WSI, OME-Zarr and OME-TIFF backends pass SlideBackendTests, each against another reader.

References are read independently of the backend under test: OpenSlide for the JPEG DICOM series
that wsidicom reads (and wsidicom itself, the library, for the series OpenSlide reads), the
stored picture itself for lossless formats (JPEG-LS DICOM, OME-Zarr), OpenSlide for OME-TIFF.
Remote variants read from a real S3 server (moto) through the fault-injecting proxy.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from gpubatch.core.clocks import StageClocks
from gpubatch.sources.slides.backends import SlideBackend
from gpubatch.sources.slides.dicom import WsiDicomBackend
from gpubatch.sources.slides.omezarr import OmeZarrBackend
from gpubatch.sources.slides.open import open_slide
from gpubatch.sources.slides.openslide_backend import OpenSlideBackend
from gpubatch.sources.slides.tiff_backend import TiffBackend
from gpubatch.testing.backends import SlideBackendTests

if TYPE_CHECKING:
    from s3_fixtures import S3Stack

pytest_plugins = ["s3_fixtures", "pathology_files"]


def _openslide_level0(path: Path) -> np.ndarray:
    import openslide

    slide = openslide.OpenSlide(str(path))
    try:
        w, h = slide.level_dimensions[0]
        return np.asarray(slide.read_region((0, 0), 0, (w, h)).convert("RGB"))
    finally:
        slide.close()


def _read_everything(backend: SlideBackend) -> None:
    try:
        for level, (w, h) in enumerate(backend.info.level_dimensions):
            backend.read_boxes(level, np.array([[0, 0, w, h]]), StageClocks())
    finally:
        backend.close()


@pytest.fixture(scope="module")
def truncated_dicom(formats_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The JPEG series with level 0 cut to 60% of its bytes: the header opens, frames are missing."""
    folder = tmp_path_factory.mktemp("truncated") / "dicom"
    shutil.copytree(formats_dir / "dicom", folder)
    level0 = folder / "level0.dcm"
    level0.write_bytes(level0.read_bytes()[: int(level0.stat().st_size * 0.6)])
    return folder


@pytest.fixture(scope="module")
def truncated_zarr(formats_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The NGFF 0.5 image with every level-0 chunk cut in half: zarr cannot decode them."""
    folder = tmp_path_factory.mktemp("truncated") / "image.ome.zarr"
    shutil.copytree(formats_dir / "image.ome.zarr", folder)
    for chunk in (folder / "0" / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    return folder



class TestWsiDicomFolder(SlideBackendTests):
    tolerance = 0.5  # the same JPEG frames through two libjpeg builds

    @pytest.fixture()
    def reference(self, formats_dir: Path) -> np.ndarray:
        return _openslide_level0(formats_dir / "dicom" / "level0.dcm")

    @pytest.fixture()
    def backend(self, formats_dir: Path) -> Iterator[SlideBackend]:
        backend = open_slide(str(formats_dir / "dicom"), StageClocks())
        assert isinstance(backend, WsiDicomBackend)
        yield backend
        backend.close()

    @pytest.fixture()
    def truncated_backend(self, truncated_dicom: Path) -> Callable[[], None]:
        return lambda: _read_everything(open_slide(str(truncated_dicom), StageClocks()))


class TestDicomThroughOpenSlide(SlideBackendTests):
    """A local DICOM file goes to OpenSlide 4 first, which opens the whole series from it."""

    counts_tiles = False
    tolerance = 0.5

    @pytest.fixture()
    def reference(self, formats_dir: Path) -> np.ndarray:
        from wsidicom import WsiDicom

        with WsiDicom.open(formats_dir / "dicom") as slide:
            w, h = slide.levels[0].size.width, slide.levels[0].size.height
            return np.asarray(slide.read_region((0, 0), 0, (w, h), as_array=True))[..., :3]

    @pytest.fixture()
    def backend(self, formats_dir: Path) -> Iterator[SlideBackend]:
        backend = open_slide(str(formats_dir / "dicom" / "level1.dcm"), StageClocks())
        assert isinstance(backend, OpenSlideBackend) and backend.info.vendor == "dicom"
        yield backend
        backend.close()

    @pytest.fixture()
    def truncated_backend(self, truncated_dicom: Path) -> Callable[[], None]:
        return lambda: _read_everything(open_slide(str(truncated_dicom / "level0.dcm"), StageClocks()))


class TestWsiDicomJpegLs(SlideBackendTests):
    """JPEG-LS frames: OpenSlide 4 refuses the transfer syntax, so wsidicom reads the file."""

    @pytest.fixture()
    def reference(self, picture: np.ndarray) -> np.ndarray:
        return picture  # lossless

    @pytest.fixture()
    def backend(self, formats_dir: Path) -> Iterator[SlideBackend]:
        backend = open_slide(str(formats_dir / "dicom-ls" / "level0.dcm"), StageClocks())
        assert isinstance(backend, WsiDicomBackend)
        yield backend
        backend.close()

    @pytest.fixture()
    def truncated_backend(self, truncated_dicom: Path) -> Callable[[], None]:
        return lambda: _read_everything(WsiDicomBackend(str(truncated_dicom)))


class TestWsiDicomFromS3(SlideBackendTests):
    tolerance = 0.5

    @pytest.fixture()
    def reference(self, formats_dir: Path) -> np.ndarray:
        return _openslide_level0(formats_dir / "dicom" / "level0.dcm")

    @pytest.fixture()
    def backend(self, s3: S3Stack, formats_dir: Path) -> Iterator[SlideBackend]:
        uri = s3.upload_folder(formats_dir / "dicom", "conformance/dicom")
        backend = WsiDicomBackend(uri, StageClocks(), options=s3.options())
        yield backend
        backend.close()

    @pytest.fixture()
    def truncated_backend(self, s3: S3Stack, truncated_dicom: Path) -> Callable[[], None]:
        uri = s3.upload_folder(truncated_dicom, "conformance/truncated-dicom")
        return lambda: _read_everything(WsiDicomBackend(uri, StageClocks(), options=s3.options()))


class TestOmeZarrLocal(SlideBackendTests):
    counts_tiles = False

    @pytest.fixture(params=["image.ome.zarr", "v04.ome.zarr"])
    def backend(self, request: pytest.FixtureRequest, formats_dir: Path) -> Iterator[SlideBackend]:
        backend = open_slide(str(formats_dir / request.param), StageClocks())
        assert isinstance(backend, OmeZarrBackend)
        yield backend
        backend.close()

    @pytest.fixture()
    def reference(self, picture: np.ndarray) -> np.ndarray:
        return picture  # lossless

    @pytest.fixture()
    def truncated_backend(self, truncated_zarr: Path) -> Callable[[], None]:
        return lambda: _read_everything(open_slide(str(truncated_zarr), StageClocks()))


class TestOmeZarrFromS3(SlideBackendTests):
    counts_tiles = False

    @pytest.fixture()
    def reference(self, picture: np.ndarray) -> np.ndarray:
        return picture

    @pytest.fixture()
    def backend(self, s3: S3Stack, formats_dir: Path) -> Iterator[SlideBackend]:
        uri = s3.upload_folder(formats_dir / "v04.ome.zarr", "conformance/v04.ome.zarr")
        backend = OmeZarrBackend(uri, StageClocks(), options=s3.options())
        yield backend
        backend.close()

    @pytest.fixture()
    def truncated_backend(self, s3: S3Stack, truncated_zarr: Path) -> Callable[[], None]:
        uri = s3.upload_folder(truncated_zarr, "conformance/truncated.ome.zarr")
        return lambda: _read_everything(OmeZarrBackend(uri, StageClocks(), options=s3.options()))


class TestOmeTiff(SlideBackendTests):
    """OME-TIFF pyramids in SubIFDs: tifffile reads every level (OpenSlide 4 sees level 0 only)."""

    @pytest.fixture()
    def reference(self, formats_dir: Path) -> np.ndarray:
        return _openslide_level0(formats_dir / "image.ome.tif")

    @pytest.fixture()
    def backend(self, formats_dir: Path) -> Iterator[SlideBackend]:
        backend = open_slide(str(formats_dir / "image.ome.tif"), StageClocks())
        assert isinstance(backend, TiffBackend) and backend.info.vendor == "ome-tiff"
        yield backend
        backend.close()

    @pytest.fixture()
    def truncated_backend(self, formats_dir: Path, tmp_path: Path) -> Callable[[], None]:
        data = (formats_dir / "image.ome.tif").read_bytes()
        path = tmp_path / "cut.ome.tif"
        path.write_bytes(data[: int(len(data) * 0.6)])
        return lambda: _read_everything(open_slide(str(path), StageClocks()))
