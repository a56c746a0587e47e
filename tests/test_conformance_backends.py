"""Every slide backend passes SlideBackendTests, against OpenSlide's reading of the same file.

The file is OpenSlide's CMU-1-Small-Region.svs (real Aperio JPEG tiles, vendored in tests/data);
tifffile's tile-grid decode must match OpenSlide pixel for pixel, read from disk, streamed by byte
range from S3 (moto) or staged from it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from conftest import shared_file

from gpubatch.core.clocks import StageClocks
from gpubatch.io.stage_cache import StageCache
from gpubatch.sources.slides.backends import SlideBackend
from gpubatch.sources.slides.open import open_slide, open_staged, open_stream
from gpubatch.sources.slides.openslide_backend import OpenSlideBackend
from gpubatch.sources.slides.tiff_backend import TiffBackend
from gpubatch.testing.backends import SlideBackendTests

if TYPE_CHECKING:
    from s3_fixtures import S3Stack

pytest_plugins = ["s3_fixtures"]
CMU = "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """Level 0 as OpenSlide reads it (the independent reference every backend is held to)."""
    import openslide

    slide = openslide.OpenSlide(str(shared_file("slides", CMU)))
    try:
        w, h = slide.level_dimensions[0]
        return np.asarray(slide.read_region((0, 0), 0, (w, h)).convert("RGB"))
    finally:
        slide.close()


@pytest.fixture(scope="module")
def truncated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 60% of the file's bytes: tiles near the end point past the end of the data."""
    data = shared_file("slides", CMU).read_bytes()
    path = tmp_path_factory.mktemp("truncated") / CMU
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path


def _read_everything(backend: SlideBackend) -> None:
    try:
        w, h = backend.info.level_dimensions[0]
        backend.read_boxes(0, np.array([[0, 0, w, h]]), StageClocks())
    finally:
        backend.close()


class TestTiffBackendLocal(SlideBackendTests):
    @pytest.fixture()
    def backend(self) -> Iterator[SlideBackend]:
        backend = open_slide(str(shared_file("slides", CMU)), StageClocks())
        assert isinstance(backend, TiffBackend)
        yield backend
        backend.close()

    @pytest.fixture()
    def truncated_backend(self, truncated: Path) -> Callable[[], None]:
        return lambda: _read_everything(open_slide(str(truncated), StageClocks()))


class TestOpenSlideBackend(SlideBackendTests):
    counts_tiles = False

    @pytest.fixture()
    def backend(self) -> Iterator[SlideBackend]:
        backend = OpenSlideBackend(str(shared_file("slides", CMU)))
        yield backend
        backend.close()

    @pytest.fixture()
    def truncated_backend(self, truncated: Path) -> Callable[[], None]:
        return lambda: _read_everything(OpenSlideBackend(str(truncated)))


class TestTiffBackendStreamedFromS3(SlideBackendTests):
    @pytest.fixture()
    def backend(self, s3: S3Stack) -> Iterator[SlideBackend]:
        uri = s3.upload(shared_file("slides", CMU), f"conformance/{CMU}")
        backend = open_stream(uri, s3.options(), StageClocks())
        yield backend
        backend.close()

    @pytest.fixture()
    def truncated_backend(self, s3: S3Stack, truncated: Path) -> Callable[[], None]:
        uri = s3.upload(truncated, f"conformance/truncated-{CMU}")
        return lambda: _read_everything(open_stream(uri, s3.options(), StageClocks()))


class TestStagedFromS3(SlideBackendTests):
    @pytest.fixture()
    def cache(self, tmp_path: Path) -> Iterator[StageCache]:
        cache = StageCache(str(tmp_path / "stage"), max_bytes=1 << 30)
        yield cache
        cache.clear()

    @pytest.fixture()
    def backend(self, s3: S3Stack, cache: StageCache) -> Iterator[SlideBackend]:
        uri = s3.upload(shared_file("slides", CMU), f"conformance/staged-{CMU}")
        backend = open_staged(uri, s3.options(), StageClocks(), cache=cache)
        yield backend
        backend.close()

    @pytest.fixture()
    def truncated_backend(self, s3: S3Stack, truncated: Path, cache: StageCache) -> Callable[[], None]:
        uri = s3.upload(truncated, f"conformance/staged-truncated-{CMU}")
        return lambda: _read_everything(open_staged(uri, s3.options(), StageClocks(), cache=cache))
