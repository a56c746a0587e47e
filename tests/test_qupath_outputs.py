"""The per-slide outputs a pathologist opens, held to what their tools make of them.

GeoJSON is checked against QuPath's own reader (qupath-core ``QuPathTypeAdapters`` and
``GsonTools.PathClassTypeAdapter``, ``PathClass.fromString``): a classification name is split
into a derived class at every ``:`` and refused (the whole file with it) for a line break;
measurements are numbers; coordinates are pixels of the image QuPath shows, top-left origin, y
down. Heatmaps are checked against the slide: a tile at a known place colours the pixels there.
Files are made by the real writers from a real predictions.parquet.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import slide_job, write_job
from pathology_files import synthetic_slide, write_leica_scn
from PIL import Image

import gpubatch
from gpubatch.outputs.geojson import write_slide_geojson
from gpubatch.outputs.heatmaps import SlideGrid, write_heatmaps
from gpubatch.outputs.store import OutputStore
from gpubatch.sources.slides.source import slide_key

SLIDE = "s3://lab/slides/case-1.svs"


def _predictions(out: Path, columns: dict[str, Any]) -> OutputStore:
    """predictions.parquet of one slide's rows (``x``, ``y`` and outputs given), as a run writes it."""
    n = len(columns["x"])
    table = pa.table({"slide": [SLIDE] * n, "x": np.asarray(columns["x"], np.int64),
                      "y": np.asarray(columns["y"], np.int64), "level": np.zeros(n, np.int32),
                      **{k: np.asarray(v, np.float32) for k, v in columns.items() if k not in ("x", "y")}})
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / "predictions.parquet")
    return OutputStore(out)


def _features(store: OutputStore, extent: float = 100.0) -> list[dict[str, Any]]:
    """The slide's GeoJSON features, parsed as strictly as JSON allows (no NaN, no Infinity)."""
    (name,) = write_slide_geojson(store, {SLIDE: ("case-1", SlideGrid(1000, 1000, extent, extent))})
    doc = json.loads((Path(store.url()) / name).read_text(encoding="utf-8"),
                     parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in the GeoJSON"))
    assert doc["type"] == "FeatureCollection"
    return list(doc["features"])


def test_a_tile_without_an_answer_leaves_the_slide_classified(tmp_path: Path) -> None:
    """One tile whose probabilities are NaN (or inf: an fp16 overflow) took the classification
    off every tile of the slide and its heatmap with it: the group no longer summed to 1."""
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [np.nan] * 3, [np.inf, 0.0, 0.0]])
    store = _predictions(tmp_path, {"x": [0, 100, 200, 300], "y": [0] * 4,
                                    **{f"probs_{i}": probs[:, i] for i in range(3)}})
    features = _features(store)
    classes = [f["properties"].get("classification", {}).get("name") for f in features]
    assert classes == ["probs_0", "probs_1", None, None]  # no class for a tile the model gave none
    assert features[2]["properties"]["measurements"] == {}
    assert set(features[3]["properties"]["measurements"]) == {"probs_1", "probs_2"}

    (name,) = write_heatmaps(store, {SLIDE: ("case-1", SlideGrid(400, 100, 100.0, 100.0))})
    image = Image.open(Path(store.url()) / name)
    assert image.text["gpubatch:colour"] == "top class probability"
    rgb = np.asarray(image.convert("RGB"))
    cell = rgb.shape[1] // 4
    grey = (210, 210, 210)
    assert [tuple(rgb[0, c * cell]) for c in (2, 3)] == [grey, grey]  # missing, not a colour
    assert tuple(rgb[0, 0]) != grey and tuple(rgb[0, cell]) != grey


def test_class_names_are_ones_qupath_keeps_whole(tmp_path: Path) -> None:
    """Output names come from the ONNX file: tf2onnx names them like ``softmax:0``. QuPath reads
    ``softmax:0_1`` as class ``0_1`` derived from ``softmax`` and refuses a name with a line break
    (and with it the file); unicode and quotes are names like any other."""
    odd = ['softmax:0', 'tumör "grade"\n']
    columns = {f"{base}_{i}": p for base in odd for i, p in enumerate([0.9, 0.1])}
    store = _predictions(tmp_path, {"x": [0], "y": [0], **{k: [v] for k, v in columns.items()}})
    features = _features(store)
    klass = features[0]["properties"]["classification"]["name"]
    assert klass == "softmax_0_0"  # the first group's top class, whole
    assert ":" not in klass and "\n" not in klass and "\r" not in klass
    assert set(features[0]["properties"]["measurements"]) == set(columns)  # measured as named


def test_unicode_and_quotes_survive_in_a_class_name(tmp_path: Path) -> None:
    store = _predictions(tmp_path, {"x": [0, 100], "y": [0, 0], 'tumör "grade"_0': [0.2, 0.6],
                                    'tumör "grade"_1': [0.8, 0.4]})
    names = [f["properties"]["classification"]["name"] for f in _features(store)]
    assert names == ['tumör "grade"_1', 'tumör "grade"_0']


def _run(tmp_path: Path, slide: Path, model: Path, tiles: dict[str, Any]) -> tuple[Any, list[dict[str, Any]]]:
    """A real run over one slide with GeoJSON: its predictions and the slide's features."""
    job = slide_job([str(slide)], model, tmp_path / "out", tiles=tiles,
                    output={"formats": ["parquet", "geojson"]})
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job))
    text = (Path(result.output_uri) / "geojson" / f"{slide_key(str(slide))}.geojson").read_text()
    return result.predictions(), json.loads(text)["features"]


def _square(feature: dict[str, Any]) -> tuple[float, float, float]:
    ring = feature["geometry"]["coordinates"][0]
    (x0, y0), (x1, _), (_, y1) = ring[0], ring[1], ring[2]
    assert ring[0] == ring[-1] and x1 - x0 == pytest.approx(y1 - y0)  # a closed square
    return x0, y0, x1 - x0


def test_tiles_land_where_qupath_shows_a_slide_with_bounds(tmp_path: Path, mean_model: Path) -> None:
    """A Leica SCN (MIRAX alike): openslide's level 0 is the whole glass slide, the scan placed
    at openslide.bounds-x/y; QuPath shows the scan alone (its OpenSlide reader crops to the
    bounds, Bio-Formats reads the scan's image). Each tile's square must cover, in that frame,
    the pixels the model saw: the mean-colour model's outputs are those pixels' means."""
    picture = synthetic_slide(1024, 768, seed=5)
    slide = write_leica_scn(picture, tmp_path / "case.scn", offset=(300, 200), canvas=(1600, 1200))
    rows, features = _run(tmp_path, slide, mean_model, {"size": 64, "mpp": 0.5,
                                                         "tissue": {"method": "otsu", "min_fraction": 0.5}})
    assert len(features) == len(rows) >= 10
    # QuPath's frame, padded with the white openslide shows around the scan (a tile of the
    # glass slide's grid may reach past the scan's edge)
    shown = np.pad(picture, ((200, 200), (300, 300), (0, 0)), constant_values=255)
    for feature in features:
        x0, y0, side = _square(feature)
        assert -side < x0 < 1024 and -side < y0 < 768  # on the scan
        region = shown[int(y0) + 200:int(y0 + side) + 200, int(x0) + 300:int(x0 + side) + 300]
        seen = region.reshape(-1, 3).mean(0) / 255
        measured = [feature["properties"]["measurements"][f"mean_{c}"] for c in range(3)]
        assert np.abs(np.array(measured) - seen).max() < 0.02, (x0, y0, measured, seen)


def test_a_square_covers_the_region_a_resampled_tile_was_read_from(tmp_path: Path, slide_path: Path,
                                                                  mean_model: Path) -> None:
    """0.6 um/px tiles of 64 px on a 0.25 um/px slide: read at level 1 (downsample 2) as 77 px
    boxes from level-1 pixel round(x / 2), resized to 64. Their squares are those boxes in
    level-0 pixels (154 px from round(x / 2) * 2), not the grid's 153.6 px from x."""
    rows, features = _run(tmp_path, slide_path, mean_model, {"size": 64, "mpp": 0.6})
    assert set(rows["level"]) == {1} and len(features) == len(rows)
    shifted = 0
    for feature, (_, row) in zip(features, rows.iterrows(), strict=True):
        x0, y0, side = _square(feature)
        assert (x0, y0, side) == (np.round(row.x / 2) * 2, np.round(row.y / 2) * 2, 154)
        shifted += (x0, y0) != (row.x, row.y)
    assert shifted  # the grid's corners and the reads' differ on some tiles


def _heatmap(store: OutputStore, grid: SlideGrid) -> tuple[np.ndarray, dict[str, str]]:
    (name,) = write_heatmaps(store, {SLIDE: ("case-1", grid)})
    image = Image.open(Path(store.url()) / name)
    return np.asarray(image.convert("RGB")), dict(image.text)


@pytest.mark.parametrize("bounds", [None, (300, 200, 1024, 512)], ids=["whole", "scan-in-canvas"])
def test_a_heatmap_spans_the_slide_and_puts_each_tile_at_its_place(tmp_path: Path, bounds: Any) -> None:
    """The picture is the slide as a viewer shows it, scaled: its sides in the slide's
    proportions (a 1000 x 500 slide of 224 px tiles was drawn 5 x 3 cells, 1.67:1, so an overlay
    stretched onto the slide's thumbnail put the last tiles 17% off), the level-0 region it
    spans in a text chunk, and a tile at a known place coloured at that place. With a scan
    inside a larger canvas (openslide's bounds), the picture is the scan's."""
    stride = 224.0 if bounds is None else 128.0
    xs, ys = ([0, 448, 672], [0, 224, 0]) if bounds is None else ([384, 1152, 512], [256, 512, 384])
    store = _predictions(tmp_path, {"x": xs, "y": ys, "score": [0.0, 1.0, 0.5]})
    grid = SlideGrid(1000, 500, stride, stride) if bounds is None else SlideGrid(1600, 1200, stride, stride,
                                                                                  bounds=bounds)
    rgb, text = _heatmap(store, grid)
    left, top, width, height = grid.shown
    assert [float(v) for v in text["gpubatch:region"].split()] == [left, top, width, height]
    scale = rgb.shape[1] / width
    assert rgb.shape[0] == pytest.approx(height * scale, abs=1.0)  # the slide's proportions
    for x, y, want in zip(xs, ys, ([68, 1, 84], [253, 231, 37], [33, 145, 140]), strict=True):
        # the middle of the tile's cell, in the picture
        px, py = int((x - left + stride / 2) * scale), int((y - top + stride / 2) * scale)
        assert rgb[py, px].tolist() == want, (x, y)
    assert ((rgb != 255).any(-1)).sum() == pytest.approx(3 * (stride * scale) ** 2, rel=0.1)


def test_a_slide_with_no_rows_gets_an_empty_collection_and_no_heatmap(tmp_path: Path) -> None:
    """Every tile of it filtered out (or a slide smaller than one tile): QuPath imports an empty
    FeatureCollection; a heatmap of nothing is not drawn."""
    store = _predictions(tmp_path, {"x": [], "y": [], "score": []})
    assert _features(store) == []
    assert write_heatmaps(store, {SLIDE: ("case-1", SlideGrid(1000, 500, 224.0, 224.0))}) == []


def test_a_slide_of_unrecorded_size_is_drawn_over_its_tiles(tmp_path: Path) -> None:
    store = _predictions(tmp_path, {"x": [0, 200], "y": [0, 100], "score": [0.0, 1.0]})
    rgb, text = _heatmap(store, SlideGrid(0, 0, 100.0, 100.0))
    assert text["gpubatch:region"] == "0 0 300 200" and rgb.shape[1] == pytest.approx(1.5 * rgb.shape[0], abs=1)
    assert rgb[-1, -1].tolist() == [253, 231, 37]  # the far tile, in the far corner


def test_an_int8_classifier_of_many_classes_is_still_a_classifier(tmp_path: Path) -> None:
    """An int8 (QDQ) softmax stores each probability in steps of 1/255: 20 of them summed to
    252/255 on 23 of 768 tiles of a real int8 run, past the 1e-2 tolerance, and no tile of the
    slide was classified, nor its heatmap drawn."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 1, (200, 20))
    exact = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    stored = np.round(exact * 255) / 255  # what the quantized output holds
    assert (np.abs(stored.sum(1) - 1) > 1e-2).any()
    store = _predictions(tmp_path, {"x": np.arange(200) % 20 * 100, "y": np.arange(200) // 20 * 100,
                                    **{f"probs_{i}": stored[:, i] for i in range(20)}})
    features = _features(store)
    names = [f["properties"]["classification"]["name"] for f in features]
    assert names == [f"probs_{k}" for k in stored.astype(np.float32).argmax(1)]
    assert write_heatmaps(store, {SLIDE: ("case-1", SlideGrid(2000, 1000, 100.0, 100.0))})
