"""The per-slide outputs' memory (heatmap and QuPath GeoJSON from predictions.parquet), two
versions of gpubatch side by side on the same slide.

    python bench/bench_per_slide_read.py --before /path/to/old/checkout [--after .] [--tiles 1000000]
        [--outputs 3] [--what heatmap geojson]

For each version, a fresh process writes predictions.parquet for one slide of N tiles as that
version's merge writes it (its row groups), then another fresh process draws the heatmap and
the GeoJSON from it under an RSS sampler (every 5 ms). ``growth_mb`` is the peak less the RSS
once imports were done. The slide's URI is a realistic 66 characters: its column, a string per
row once read, is what a whole slide's table held most of.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SLIDE = "s3://pathology-archive/2026/hospital-a/cases/HE-0001234-block-A1.svs"


def write(folder: str, tiles: int, outputs: int) -> None:
    """predictions.parquet of one slide, through this version's merge writer."""
    import numpy as np
    import pyarrow as pa

    from gpubatch.outputs import merge
    from gpubatch.outputs.store import OutputStore

    side = int(np.ceil(np.sqrt(tiles)))
    cells = np.arange(tiles)
    p = np.random.default_rng(0).random((tiles, outputs), dtype=np.float32)
    p /= p.sum(1, keepdims=True)
    table = pa.table({"slide": pa.array([SLIDE] * tiles), "x": (cells % side) * 224, "y": (cells // side) * 224,
                      "level": np.zeros(tiles, np.int32), **{f"probs_{i}": p[:, i] for i in range(outputs)}})
    store = OutputStore(folder)
    with store.open_write("predictions.parquet") as f:
        writer = merge.parquet_writer(f, table.schema)
        merge._write_row_group(writer, [table])
        writer.close()


def read(folder: str, tiles: int, what: list[str]) -> None:
    """The heatmap and GeoJSON drawn under the sampler; one JSON line."""
    import math
    import time

    from common import PeakRss

    from gpubatch.outputs import geojson, heatmaps
    from gpubatch.outputs.store import OutputStore

    grid_type: Any = getattr(heatmaps, "SlideGrid")  # noqa: B009 - in heatmaps in both versions
    side = math.isqrt(tiles - 1) + 1
    grid = grid_type(side * 224, side * 224, 224.0, 224.0)
    store = OutputStore(folder)
    with PeakRss() as rss:
        t0 = time.perf_counter()
        if "heatmap" in what:
            assert heatmaps.write_heatmaps(store, {SLIDE: ("slide", grid)})
        if "geojson" in what:
            try:
                geojson.write_slide_geojson(store, {SLIDE: ("slide", grid)})
            except TypeError:  # before the SlideGrid: the tile's edge
                geojson.write_slide_geojson(store, {SLIDE: ("slide", 224.0)})
        seconds = time.perf_counter() - t0
    print(json.dumps({"base_mb": rss.base / 2**20, "growth_mb": (rss.peak - rss.base) / 2**20, "seconds": seconds}))


def child(root: str, *args: str) -> str:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False,
                         env={"PYTHONPATH": root, "PATH": "/usr/bin:/bin"})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", help="the package root of the version to compare with (required)")
    ap.add_argument("--after", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--tiles", type=int, default=1_000_000)
    ap.add_argument("--outputs", type=int, default=3)
    ap.add_argument("--what", nargs="+", default=["heatmap", "geojson"])
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, folder = args.child
        write(folder, args.tiles, args.outputs) if kind == "write" else read(folder, args.tiles, args.what)
        return
    if not args.before:
        ap.error("--before is required")
    for name, root in (("before", args.before), ("after", args.after)):
        with tempfile.TemporaryDirectory() as folder:
            common = ["--tiles", str(args.tiles), "--outputs", str(args.outputs), "--what", *args.what]
            child(root, *common, "--child", "write", folder)
            size = (Path(folder) / "predictions.parquet").stat().st_size
            row = json.loads(child(root, *common, "--child", "read", folder))
            print(f"{name}: {args.tiles} tiles, {' + '.join(args.what)}: peak +{row['growth_mb']:.0f} MB over "
                  f"{row['base_mb']:.0f} MB, {row['seconds']:.1f} s (predictions.parquet {size / 2**20:.1f} MB)",
                  flush=True)


if __name__ == "__main__":
    main()
