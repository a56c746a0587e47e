"""SlideBackendTests: what every slide backend (tifffile local or streamed, openslide, staged,
DICOM, OME-Zarr) must do, checked against reference pixels read another way."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputError
from gpubatch.sources.slides.backends import WHITE, SlideBackend


class SlideBackendTests:
    """Subclass and provide fixtures: ``backend`` (an open SlideBackend), ``reference`` (the
    slide's level-0 RGB pixels as (h, w, 3) uint8, read independently of the backend, e.g. with
    openslide) and ``truncated_backend`` (a callable opening and reading a truncated copy).

    ``tolerance`` is the largest mean absolute pixel difference allowed (JPEG decoders may
    round differently); ``counts_tiles`` says whether the backend counts stored tiles it decodes.
    """

    tolerance: float = 0.0
    counts_tiles: bool = True

    def _box(self, backend: SlideBackend, size: int = 96) -> np.ndarray:
        w, h = backend.info.level_dimensions[0]
        size = min(size, w // 2, h // 2)
        return np.array([[0, 0, size, size], [w // 3, h // 3, size, size], [w - size, h - size, size, size]])

    def test_info_is_allowlisted_and_consistent(self, backend: SlideBackend) -> None:
        info = backend.info.as_dict()
        assert set(info) == {"width", "height", "level_count", "level_dimensions", "level_downsamples",
                             "mpp", "mpp_source", "magnification", "vendor", "backend", "bounds"}
        assert (info["mpp"] is None) == (info["mpp_source"] == "")  # an mpp always says where it came from
        assert info["level_count"] == len(info["level_dimensions"]) == len(info["level_downsamples"])
        assert info["level_downsamples"][0] == pytest.approx(1.0)

    def test_same_pixels_as_reference(self, backend: SlideBackend, reference: np.ndarray) -> None:
        boxes = self._box(backend)
        got = backend.read_boxes(0, boxes, StageClocks())
        for (x, y, w, h), tile in zip(boxes, got, strict=True):
            want = reference[y : y + h, x : x + w]
            assert tile.shape == want.shape and tile.dtype == np.uint8
            assert np.abs(tile.astype(int) - want.astype(int)).mean() <= self.tolerance

    def test_out_of_bounds_is_white(self, backend: SlideBackend) -> None:
        w, h = backend.info.level_dimensions[0]
        got = backend.read_boxes(0, np.array([[w - 8, h - 8, 32, 32], [-40, -40, 32, 32]]), StageClocks())
        assert (got[0, 8:, :] == WHITE).all() and (got[0, :, 8:] == WHITE).all()
        assert (got[1] == WHITE).all()

    def test_every_level_reads(self, backend: SlideBackend) -> None:
        for level, (w, h) in enumerate(backend.info.level_dimensions):
            box = np.array([[0, 0, min(64, w), min(64, h)]])
            assert backend.read_boxes(level, box, StageClocks()).shape == (1, box[0, 3], box[0, 2], 3)

    def test_a_subsampled_level_is_every_step_th_pixel_of_the_level(self, backend: SlideBackend) -> None:
        """The tissue thumbnail (``read_subsampled``): the level read whole, every ``step``-th
        pixel of every ``step``-th row, bit for bit, whatever the step (one that divides the
        stored tiles, one that does not) and the read block (smaller and larger than the level)."""
        level = len(backend.info.level_dimensions) - 1
        w, h = backend.info.level_dimensions[level]
        whole = backend.read_boxes(level, np.array([[0, 0, w, h]]), StageClocks())[0]
        for step, block in [(1, 4096), (2, 128), (2, 4096), (3, 300), (4, 1000)]:
            got = backend.read_subsampled(level, step, block, StageClocks())
            assert got.dtype == np.uint8 and np.array_equal(got, whole[::step, ::step]), (step, block)

    def test_concurrent_reads_equal_serial_reads(self, backend: SlideBackend) -> None:
        boxes = self._box(backend, 64)
        serial = backend.read_boxes(0, boxes, StageClocks())
        got: list[np.ndarray] = []

        def read() -> None:
            got.append(backend.read_boxes(0, boxes, StageClocks()))

        threads = [threading.Thread(target=read) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(got) == 4 and all(np.array_equal(g, serial) for g in got)

    def test_reads_are_counted(self, backend: SlideBackend) -> None:
        clocks = StageClocks()
        backend.read_boxes(0, self._box(backend), clocks)
        assert clocks.parts.get("decode", 0.0) + clocks.parts.get("storage", 0.0) > 0
        if self.counts_tiles:
            assert clocks.counters.get("decode.tiles", 0) + clocks.counters.get("decode.cache_hits", 0) > 0

    def test_truncated_file_is_an_input_error(self, truncated_backend: object) -> None:
        with pytest.raises(InputError):
            truncated_backend()  # type: ignore[operator]
