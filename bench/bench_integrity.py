"""What ``tiles.integrity: strict`` costs on the openslide path: every tile of a level read with
the stored-tile check (strict, the default) and without it (lenient), side by side.

    python bench/bench_integrity.py [--size 4096] [--repeats 5] [--out F]

openslide drops libjpeg's warnings after a tile's last scanline, so under strict gpubatch entropy-
checks each stored JPEG tile a read touches, once per slide (sources.slides.integrity), before
openslide decodes it. The slides: a synthetic generic-TIFF JPEG pyramid (named ``.ndpi``, as a
plain TIFF under a vendor's name is read by openslide) of ``--size`` px, and the vendored Aperio
``CMU-1-Small-Region.svs``. Each round opens the slide afresh (the check remembers what it
checked) and reads level 0 in 256 px boxes; the rounds alternate. Reported: the median seconds
per round, milliseconds per stored tile, and strict's cost as a share of the lenient read.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, publish  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BOX = 256


def _slides(size: int) -> dict[str, Path]:
    from gpubatch.cli.demo import write_synthetic_slide

    folder = WORK / "integrity"
    folder.mkdir(parents=True, exist_ok=True)
    tif = folder / f"synthetic-{size}.tif"
    if not tif.exists():
        write_synthetic_slide(tif, size, size, levels=2, quality=90)
    named = folder / f"synthetic-{size}.ndpi"
    shutil.copyfile(tif, named)
    return {f"synthetic {size} px (generic TIFF)": named,
            "CMU-1-Small-Region.svs (Aperio)": ROOT / "tests" / "data" / "slides" / "CMU-1-Small-Region.svs"}


def _read_level0(path: Path, strict: bool) -> tuple[float, int]:
    """Seconds to read level 0 box by box through a fresh backend, and its stored tiles."""
    from gpubatch.core.clocks import StageClocks
    from gpubatch.sources.slides.openslide_backend import OpenSlideBackend

    backend = OpenSlideBackend(str(path))
    if not strict:
        backend.accept_corrupt_tiles()
    w, h = backend.info.level_dimensions[0]
    xs, ys = np.meshgrid(np.arange(0, w - BOX + 1, BOX), np.arange(0, h - BOX + 1, BOX))
    boxes = np.stack([xs.ravel(), ys.ravel(), np.full(xs.size, BOX), np.full(xs.size, BOX)], axis=1)
    t0 = time.perf_counter()
    for row in boxes:
        backend.read_boxes(0, row[None, :], StageClocks())
    seconds = time.perf_counter() - t0
    tiles = len(backend.tile_check.levels[0].checked) if strict and backend.tile_check is not None else 0
    backend.close()
    return seconds, tiles


def _measure(name: str, path: Path, repeats: int) -> list[dict[str, Any]]:
    times: dict[str, list[float]] = {"strict": [], "lenient": []}
    tiles = 0
    _read_level0(path, True)  # the file in the page cache for both
    for r in range(repeats):
        for mode in (("strict", "lenient") if r % 2 == 0 else ("lenient", "strict")):
            seconds, checked = _read_level0(path, mode == "strict")
            times[mode].append(seconds)
            tiles = max(tiles, checked)
    med = {m: statistics.median(v) for m, v in times.items()}
    if not tiles:
        raise AssertionError(f"{name}: strict checked no tiles (the check was not built)")
    return [{"slide": name, "mode": m, "stored tiles": tiles, "median s": med[m],
             "ms per tile": 1e3 * med[m] / tiles, "cost % of lenient": 100 * (med[m] / med["lenient"] - 1)}
            for m in ("lenient", "strict")]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    rows = [row for name, path in _slides(args.size).items() for row in _measure(name, path, args.repeats)]
    return publish("bench_integrity.py", rows, ["slide", "mode", "stored tiles", "median s", "ms per tile",
                                                "cost % of lenient"], args.out, argv)


if __name__ == "__main__":
    main()
