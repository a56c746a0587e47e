"""openslide for every format it opens and tifffile does not (MRXS, NDPI, SCN, ...), and as the
fallback: one region per box, openslide caching the stored tiles.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputError
from gpubatch.sources.slides.backends import SlideBackend, SlideInfo, composite_on_white
from gpubatch.sources.slides.tiff_backend import resolution_tag, tiff_stores_gray


def _openslide_mpp_source(props: Any) -> str:
    """openslide derives mpp-x from the vendor's metadata, or, for generic TIFF, from the TIFF
    resolution tag: name the tag in that case."""
    vendor = str(props.get("openslide.vendor", "unknown"))
    if vendor == "generic-tiff" and props.get("tiff.XResolution") and props.get("tiff.ResolutionUnit"):
        try:
            return resolution_tag(str(props["tiff.ResolutionUnit"]), float(props["tiff.XResolution"]))
        except ValueError:
            pass
    return f"openslide.mpp-x ({vendor})"


def _bounds(props: Any) -> tuple[int, int, int, int] | None:
    """openslide's ``bounds-*`` properties, as QuPath's OpenSlide reader takes them: all four, or
    none (a value that is not an integer makes QuPath ignore them too)."""
    keys = [f"openslide.bounds-{k}" for k in ("x", "y", "width", "height")]
    try:
        x, y, w, h = (int(props[k]) for k in keys)
    except (KeyError, ValueError):
        return None
    return x, y, w, h


class OpenSlideBackend(SlideBackend):
    """openslide for every format it opens; one region per box (openslide caches stored tiles)."""

    def __init__(self, path: str):
        import openslide

        try:
            self.slide = openslide.OpenSlide(path)
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise InputError(path, f"not a slide format openslide or tifffile can read ({exc})") from exc
        except openslide.OpenSlideError as exc:
            raise InputError(path, f"openslide cannot open it: {exc}") from exc
        self.path = path
        props = self.slide.properties
        mpp, mpp_y = props.get("openslide.mpp-x"), props.get("openslide.mpp-y")
        mag = props.get("openslide.objective-power")
        self.info = SlideInfo(
            tuple(tuple(d) for d in self.slide.level_dimensions),  # type: ignore[misc]
            tuple(self.slide.level_downsamples),
            float(mpp) if mpp else None, float(mag) if mag else None,
            str(props.get("openslide.vendor", "unknown")), "openslide", _openslide_mpp_source(props) if mpp else "",
            mpp_y=float(mpp_y) if mpp and mpp_y else None, bounds=_bounds(props),
        )
        self.grayscale = tiff_stores_gray(path)  # a gray TIFF tifffile left to openslide (white is 0)
        #: openslide misses some corrupt JPEG data, so under strict a check runs first
        self.tile_check: Any = None  # integrity.StoredTileCheck, made on the first strict read
        self._unchecked: str | None = None  # why the tiles cannot be checked, once looked at
        self._check_lock = threading.Lock()

    def read_boxes(self, level: int, boxes: np.ndarray, clocks: StageClocks) -> np.ndarray:
        import openslide

        ds = self.info.level_downsamples[level]
        k, bw, bh = len(boxes), int(boxes[0, 2]), int(boxes[0, 3])
        out = np.empty((k, bh, bw, 3), dtype=np.uint8)
        with clocks.part("decode"):
            check = self._tile_check() if self.strict else None
            if check is not None:
                check.before_read(level, boxes)
            for b, (x, y, w, h) in enumerate(boxes.astype(np.int64)):
                try:
                    region = self.slide.read_region((int(round(x * ds)), int(round(y * ds))), level, (int(w), int(h)))
                except openslide.OpenSlideError as exc:
                    raise InputError(self.path, f"openslide failed to read a region: {exc}") from exc
                out[b] = composite_on_white(np.asarray(region))
        return out

    def _tile_check(self) -> Any:
        """The stored-tile check, opened on first use: a lenient run never parses the TIFF."""
        with self._check_lock:
            if self.tile_check is None and self._unchecked is None:
                from gpubatch.sources.slides.integrity import open_tile_check

                self.tile_check, self._unchecked = open_tile_check(self.path, self.info)
            return self.tile_check

    def integrity_notes(self) -> list[str]:
        if not self.strict or self._tile_check() is not None:
            return []
        from gpubatch.sources.slides.integrity import unchecked_note

        return [unchecked_note(self._unchecked or "")]

    def close(self) -> None:
        if self.tile_check is not None:
            self.tile_check.close()
        self.slide.close()
