"""The outputs drawn per slide (heatmap, QuPath GeoJSON) convert a slide's rows a chunk at a time:
their temporaries scale with ``per_slide.CHUNK_ROWS``, not with the slide's tile count
(bench/bench_slide_memory.py measures a whole run)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from gpubatch.outputs import geojson, heatmaps, per_slide

CHUNK = 4096
ROWS = 200_000  # 49 chunks


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in (per_slide, heatmaps, geojson):
        monkeypatch.setattr(module, "CHUNK_ROWS", CHUNK, raising=False)


def _classifier_rows(n: int) -> pa.Table:
    side = int(np.sqrt(n))
    rng = np.random.default_rng(0)
    p = rng.random((n, 3)).astype(np.float32)
    p /= p.sum(1, keepdims=True)
    cells = np.arange(n)
    return pa.table({"slide": pa.array(["s"] * n), "x": (cells % side) * 32, "y": (cells // side) * 32,
                     "level": np.zeros(n, np.int32), "prob_0": p[:, 0], "prob_1": p[:, 1], "prob_2": p[:, 2]})


def _traced_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    """fn's result and the most it held above what was traced when it began, in bytes."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = fn()
        return result, tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def test_heatmap_of_a_large_slide_holds_chunks_not_the_slide(small_chunks: None) -> None:
    table = _classifier_rows(ROWS)
    side = int(np.sqrt(ROWS))
    grid = heatmaps.SlideGrid(side * 32, side * 32, 32.0, 32.0)
    rows = per_slide.SlideRows.of_table(table)
    coloured, chosen = _traced_peak(lambda: heatmaps.choose_values(rows, "auto"))
    assert coloured.name == heatmaps.TOP_PROBABILITY
    image, drawn = _traced_peak(lambda: heatmaps.draw(rows, coloured, grid))
    # whole-slide float64 temporaries were 3-6 values per tile (choose 8.8 MB, draw 22 MB here),
    # then one per tile (the colouring values, 1.6 MB): now none
    assert chosen < 100 * CHUNK * 8, chosen
    assert drawn < image.nbytes + 100 * CHUNK * 8, drawn


def test_geojson_features_of_a_large_slide_hold_chunks_not_the_slide(small_chunks: None) -> None:
    table = _classifier_rows(ROWS)

    def first_features() -> list[dict[str, Any]]:
        features = iter(geojson._features(per_slide.SlideRows.of_table(table), per_slide.SlideGrid(0, 0, 32.0, 32.0)))
        return [next(features) for _ in range(10)]

    features, held = _traced_peak(first_features)
    assert features[0]["properties"]["classification"]["name"] in ("prob_0", "prob_1", "prob_2")
    assert held < 100 * CHUNK * 8, held  # was the slide's outputs in float64: 12 MB here


def test_a_slide_is_read_back_a_row_group_at_a_time(tmp_path: Path, small_chunks: None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The heatmap and GeoJSON of a slide of many tiles, from a predictions.parquet made by the
    real merge: what Arrow holds while the features are made is a row group's columns, not the
    slide's table. The table was read whole (200,000 rows here, 21 MB, most of it its URI, once
    a row), from one row group (a part was written as one, up to pyarrow's million rows)."""
    import pyarrow.parquet as pq

    from gpubatch.outputs import merge
    from gpubatch.outputs.layout import PARTS_DIR
    from gpubatch.outputs.manifest import CommitRef
    from gpubatch.outputs.store import OutputStore

    monkeypatch.setattr(merge, "ROW_GROUP_ROWS", CHUNK)
    slide = "s3://pathology-archive/2026/hospital-a/cases/HE-0001234-block-A1.svs"
    table = _classifier_rows(ROWS).set_column(0, "slide", pa.array([slide] * ROWS))
    (tmp_path / PARTS_DIR).mkdir()
    pq.write_table(table, tmp_path / PARTS_DIR / "s.parquet")
    store = OutputStore(tmp_path)
    assert merge.merge_parquet(store, [CommitRef("s", "s.parquet", None)], list(per_slide.INDEX_COLUMNS)) == ROWS
    assert pq.ParquetFile(tmp_path / "predictions.parquet").metadata.row_group(0).num_rows == CHUNK
    side = int(np.sqrt(ROWS))
    grid = per_slide.SlideGrid(side * 32, side * 32, 32.0, 32.0)

    assert heatmaps.write_heatmaps(store, {slide: ("s", grid)})
    before, held = pa.total_allocated_bytes(), 0  # Arrow's live allocations, sampled as features go
    for rows in per_slide.iter_slides(store):  # the file is open while the slides are read
        assert rows.num_rows == ROWS
        for i, _ in enumerate(geojson._features(rows, grid)):
            if i % 1000 == 0:
                held = max(held, pa.total_allocated_bytes() - before)
    assert i + 1 == ROWS
    assert held < 1 << 20, held
