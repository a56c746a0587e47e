"""predictions.geojson for slides: one square polygon per tile, in level-0 pixel coordinates.

QuPath and most viewers import this as detections, so a pathologist can look at the model's
output over the slide. Written from predictions.parquet one row group at a time.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from gpubatch.outputs.layout import GEOJSON, PREDICTIONS
from gpubatch.outputs.store import OutputStore

INDEX = ("slide", "x", "y", "level")


def write_geojson(where: OutputStore | str, extents: dict[str, float]) -> str:
    """Stream predictions.parquet into predictions.geojson; ``extents``: tile edge per slide, level-0 px."""
    store = OutputStore.of(where)
    pf = pq.ParquetFile(store.open_read(PREDICTIONS)) if store.exists(PREDICTIONS) else None
    with store.open_write(GEOJSON) as f:
        f.write(b'{"type": "FeatureCollection", "features": [')
        first = True
        for i in range(pf.num_row_groups if pf is not None else 0):
            for row in pf.read_row_group(i).to_pylist():  # type: ignore[union-attr]
                feature = json.dumps(_feature(row, extents.get(row["slide"], 0.0)))
                f.write((("" if first else ",") + feature).encode())
                first = False
        f.write(b"]}\n")
    return store.url(GEOJSON)


def _feature(row: dict, extent: float) -> dict:
    """A tile's square footprint in level-0 pixels, with the row's outputs as properties."""
    x, y = row["x"], row["y"]
    ring = [[x, y], [x + extent, y], [x + extent, y + extent], [x, y + extent], [x, y]]
    props = {k: v for k, v in row.items() if k not in ("x", "y")}
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "tile", **props}}
