"""A slide's tissue filter and a level's tile decode: gpubatch's against each as it was before.

    python bench/bench_tissue.py [--slides 4] [--size 8192x8192] [--repeats 5] [--out F]

Tissue filter (``sources.slides.tissue.filter_tissue``, one call per slide, as a shard's plan
makes it): gpubatch's samples the coarsest level into the thumbnail tile by tile
(``read_subsampled``) and sums its integral image down the rows a row at a time; the other
contestant is the filter as it was before, the level read as one box and sampled with a strided
copy, the integral image's column sums by ``np.cumsum(axis=0)``. Both keep the same tiles
(checked). Tile decode (every stored tile of level 1, through ``TiffBackend.read_boxes``): the
other contestant wraps each tile's decode in the file's name redacted and escaped (``reading``
as it was before), where gpubatch's redacts it only when a library logs. CPU time of this
process, one thread; reported: the median of ``--repeats`` alternating rounds, ms per slide.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_slides import make_workload  # noqa: E402
from common import publish, slides_bench_args  # noqa: E402

GPUBATCH, BEFORE = "gpubatch", "before"


@contextlib.contextmanager
def _old_thumbnail_and_integral() -> Iterator[None]:
    """The filter as it was: the level as one box, sampled; the integral by cumsum down axis 0."""
    from gpubatch.sources.slides import tissue
    from gpubatch.sources.slides.backends import SlideBackend

    def fraction(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int32)
        inner = integral[1:, 1:]
        np.cumsum(mask, axis=0, dtype=np.int32, out=inner)
        np.cumsum(inner, axis=1, out=inner)
        h, w = mask.shape
        x0, y0 = np.clip(boxes[:, 0], 0, w), np.clip(boxes[:, 1], 0, h)
        x1 = np.clip(np.maximum(boxes[:, 2], x0 + 1), 0, w)
        y1 = np.clip(np.maximum(boxes[:, 3], y0 + 1), 0, h)
        total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        return total / np.maximum((x1 - x0) * (y1 - y0), 1)

    def thumbnail(backend: Any, clocks: Any, read_block: int) -> tuple[np.ndarray, float]:
        level = len(backend.info.level_dimensions) - 1
        w, h = backend.info.level_dimensions[level]
        step = max(1, -(-max(w, h) // tissue.THUMBNAIL_EDGE))
        return (SlideBackend.read_subsampled(backend, level, step, read_block, clocks),
                backend.info.level_downsamples[level] * step)

    saved = tissue.tissue_fraction, tissue.read_thumbnail
    tissue.tissue_fraction, tissue.read_thumbnail = fraction, thumbnail
    try:
        yield
    finally:
        tissue.tissue_fraction, tissue.read_thumbnail = saved


@contextlib.contextmanager
def _old_reading() -> Iterator[None]:
    """A tile decode's file name redacted and escaped on every tile, as ``reading`` did."""
    from gpubatch.core import logs
    from gpubatch.sources.slides import tiff_backend

    plain = tiff_backend.reading

    @contextlib.contextmanager
    def redacting(name: str) -> Iterator[None]:
        with plain(logs.safe_text(name)):
            yield

    tiff_backend.reading = redacting
    try:
        yield
    finally:
        tiff_backend.reading = plain


def _cpu_ms(fn: Callable[[], Any]) -> float:
    t0 = time.process_time()
    fn()
    return 1e3 * (time.process_time() - t0)


def _filters(slides: list[Path]) -> Callable[[], list[int]]:
    from gpubatch.core.clocks import StageClocks
    from gpubatch.sources.slides.grid import make_grid
    from gpubatch.sources.slides.tiff_backend import TiffBackend
    from gpubatch.sources.slides.tissue import filter_tissue
    from gpubatch.spec import TilesSpec

    spec = TilesSpec(size=224, mpp=0.5)
    backends = [TiffBackend(str(p)) for p in slides]
    return lambda: [len(filter_tissue(make_grid(b.info, spec, b.path), b, spec, StageClocks())) for b in backends]


def _decodes(slides: list[Path]) -> Callable[[], int]:
    from gpubatch.core.clocks import StageClocks
    from gpubatch.sources.slides.tiff_backend import TiffBackend

    backends = [TiffBackend(str(p)) for p in slides]

    def run() -> int:
        tiles = 0
        for b in backends:
            w, h = b.info.level_dimensions[1]
            clocks = StageClocks()
            b.read_boxes(1, np.array([[0, 0, w, h]]), clocks)
            tiles += int(clocks.counters["decode.tiles"])
        return tiles
    return run


def _rounds(work: Callable[[], Any], before: Callable[[], contextlib.AbstractContextManager[None]],
            repeats: int) -> tuple[dict[str, float], Any, Any]:
    """Median CPU ms of ``work`` with gpubatch's code and within ``before``, alternating."""
    with before():
        old = work()
    new = work()
    times: dict[str, list[float]] = {GPUBATCH: [], BEFORE: []}
    for r in range(repeats):
        for name in ([GPUBATCH, BEFORE] if r % 2 == 0 else [BEFORE, GPUBATCH]):
            with before() if name == BEFORE else contextlib.nullcontext():
                times[name].append(_cpu_ms(work))
    return {n: statistics.median(v) for n, v in times.items()}, new, old


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, (w, h) = slides_bench_args(__doc__, argv, slides=4, repeats=5)
    slides = make_workload("decode", args.slides, (w, h))["slides"]
    rows = []
    medians, new, old = _rounds(_filters(slides), _old_thumbnail_and_integral, args.repeats)
    if new != old:
        raise AssertionError(f"the two filters keep different tiles: {new} against {old}")
    for name in (GPUBATCH, BEFORE):
        rows.append({"work": "tissue filter", "contestant": name, "per": "slide",
                     "cpu ms": medians[name] / len(slides), "x faster": medians[BEFORE] / medians[name]})
    medians, tiles, _ = _rounds(_decodes(slides), _old_reading, args.repeats)
    for name in (GPUBATCH, BEFORE):
        rows.append({"work": f"decode level 1 ({tiles // len(slides)} tiles a slide)", "contestant": name,
                     "per": "slide", "cpu ms": medians[name] / len(slides),
                     "x faster": medians[BEFORE] / medians[name]})
    return publish("bench_tissue.py", rows, ["work", "contestant", "per", "cpu ms", "x faster"], args.out, argv)


if __name__ == "__main__":
    main()
