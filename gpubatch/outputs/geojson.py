"""predictions.geojson for slides: one square polygon per tile, in level-0 pixel coordinates.

QuPath and most viewers import this as detections, so a pathologist can look at the model's
output over the slide. Written from predictions.parquet one row group at a time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq

INDEX = ("slide", "x", "y", "level")


def write_geojson(outdir: str | Path, extents: dict[str, float]) -> Path:
    """Stream predictions.parquet into predictions.geojson; ``extents``: tile edge per slide, level-0 px."""
    outdir = Path(outdir)
    target = outdir / "predictions.geojson"
    tmp = outdir / ".tmp-predictions.geojson"
    source = outdir / "predictions.parquet"
    with tmp.open("w") as f:
        f.write('{"type": "FeatureCollection", "features": [')
        first = True
        pf = pq.ParquetFile(source) if source.exists() and source.stat().st_size else None
        for i in range(pf.num_row_groups if pf is not None else 0):
            for row in pf.read_row_group(i).to_pylist():  # type: ignore[union-attr]
                f.write(("" if first else ",") + json.dumps(_feature(row, extents.get(row["slide"], 0.0))))
                first = False
        f.write("]}\n")
    os.replace(tmp, target)
    return target


def _feature(row: dict, extent: float) -> dict:
    """A tile's square footprint in level-0 pixels, with the row's outputs as properties."""
    x, y = row["x"], row["y"]
    ring = [[x, y], [x + extent, y], [x + extent, y + extent], [x, y + extent], [x, y]]
    props = {k: v for k, v in row.items() if k not in ("x", "y")}
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "tile", **props}}
