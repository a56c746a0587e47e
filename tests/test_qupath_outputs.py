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
from PIL import Image

from gpubatch.outputs.geojson import write_slide_geojson
from gpubatch.outputs.heatmaps import SlideGrid, write_heatmaps
from gpubatch.outputs.store import OutputStore

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
    (name,) = write_slide_geojson(store, {SLIDE: ("case-1", extent)})
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
