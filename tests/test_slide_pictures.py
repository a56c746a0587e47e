"""What a pathologist looks at: per-slide heatmaps (and report.html showing them), QuPath GeoJSON.

Expectations come from predictions.parquet and from QuPath's own GeoJSON reader rules
(qupath-core PathObjectTypeAdapters and GsonTools' PathClass adapter, 0.4+), not from the writers.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import slide_job, write_job
from PIL import Image

import gpubatch
from gpubatch.sources.slides.source import slide_key

#: matplotlib's viridis at 0, 0.25, 0.5, 0.75 and 1, written out here as the test's own table
VIRIDIS_ANCHORS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], float)
WHITE = (255, 255, 255)


def _on_viridis(rgb: np.ndarray) -> bool:
    """True when a colour lies on the piecewise-linear viridis curve (within rounding)."""
    for a, b in zip(VIRIDIS_ANCHORS[:-1], VIRIDIS_ANCHORS[1:], strict=True):
        t = np.clip(np.dot(rgb - a, b - a) / np.dot(b - a, b - a), 0, 1)
        if np.abs(a + t * (b - a) - rgb).max() <= 1.0:
            return True
    return False


@pytest.fixture(scope="module")
def classified(tmp_path_factory: pytest.TempPathFactory, slides_dir: Path, classifier: Path) -> gpubatch.Result:
    out = tmp_path_factory.mktemp("pictures")
    slides = [str(p) for p in sorted(slides_dir.glob("*.tif"))]
    job = slide_job(slides, classifier, out / "out", output={"formats": ["zarr", "parquet", "geojson"]},
                    tiles={"size": 64, "tissue": {"method": "otsu", "min_fraction": 0.3}})
    return gpubatch.run(write_job(out / "job.yaml", job))


def test_each_slide_gets_a_heatmap_of_its_top_class_probability(classified: gpubatch.Result) -> None:
    rows = classified.predictions()
    for slide, part in rows.groupby("slide", sort=False):
        path = Path(classified.output_uri) / "heatmaps" / f"{slide_key(slide)}.png"
        image = Image.open(path)
        assert image.text["gpubatch:colour"] == "top class probability"
        assert image.text["gpubatch:range"] == "0 1"
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
        colours = {tuple(c) for c in np.unique(pixels, axis=0)}
        assert all(c == WHITE or _on_viridis(np.array(c, float)) for c in colours)  # nothing but the scale
        tiles = len(part)
        grid_cells = 1536 // 128 * (1024 // 128)  # 64 px tiles at 0.5 mpp on a 0.25 mpp slide
        coloured = (pixels != 255).any(1).sum()
        cell = int(round(np.sqrt(coloured / tiles)))
        assert coloured == tiles * cell * cell and tiles < grid_cells  # one block per kept tile
        top = part[["probs_0", "probs_1", "probs_2"]].max(axis=1).to_numpy()
        rgb = np.asarray(image.convert("RGB"))
        luminance = [float(rgb[int(r.y) // 128 * cell, int(r.x) // 128 * cell] @ [0.299, 0.587, 0.114])
                     for r in (part.iloc[top.argmax()], part.iloc[top.argmin()])]
        assert luminance[0] > luminance[1]  # viridis brightens with the value


def test_report_html_shows_each_heatmap_small_with_the_slide_name(classified: gpubatch.Result) -> None:
    html = (Path(classified.output_uri) / "report.html").read_text()
    section = html[html.index('id="heatmaps"'):]
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="heatmap of ([^"]+)">', section)
    slides = list(dict.fromkeys(classified.predictions()["slide"]))
    assert [name for _, name in images] == [Path(s).name for s in slides]
    for (data, _), slide in zip(images, slides, strict=True):
        png = Path(classified.output_uri) / "heatmaps" / f"{slide_key(slide)}.png"
        assert base64.b64decode(data) == png.read_bytes()
    assert "img-src data:" in html and "top class probability, 0 to 1" in section


def test_geojson_per_slide_is_what_qupath_imports(classified: gpubatch.Result) -> None:
    out = Path(classified.output_uri)
    assert not (out / "predictions.geojson").exists()
    rows = classified.predictions()
    for slide, part in rows.groupby("slide", sort=False):
        text = (out / "geojson" / f"{slide_key(slide)}.geojson").read_text()
        doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
        assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(part)
        for feature, (_, row) in zip(doc["features"], part.iterrows(), strict=True):
            ring = feature["geometry"]["coordinates"][0]
            assert feature["geometry"]["type"] == "Polygon" and ring[0] == ring[-1]
            assert ring[0] == [row.x, row.y] and ring[2] == [row.x + 128, row.y + 128]  # level-0 pixels
            props = feature["properties"]
            assert props["objectType"] == "tile"
            probs = [row.probs_0, row.probs_1, row.probs_2]
            # QuPath's PathClass reader takes the object form only with both name and color
            assert props["classification"]["name"] == f"probs_{int(np.argmax(probs))}"
            assert len(props["classification"]["color"]) == 3
            assert props["measurements"] == {f"probs_{i}": pytest.approx(p) for i, p in enumerate(probs)}


def test_heatmaps_follow_output_heatmap(tmp_path: Path, slide_path: Path, mean_model: Path) -> None:
    runs = {}
    for by in ("none", "mean_2", "auto"):
        job = slide_job([str(slide_path)], mean_model, tmp_path / by, output={"heatmap": by})
        runs[by] = gpubatch.run(write_job(tmp_path / f"{by}.yaml", job))
    assert not (Path(runs["none"].output_uri) / "heatmaps").exists()
    key = slide_key(str(slide_path))
    picked = Image.open(Path(runs["mean_2"].output_uri) / "heatmaps" / f"{key}.png")
    values = runs["mean_2"].predictions()["mean_2"]
    assert picked.text["gpubatch:colour"] == "mean_2"
    assert picked.text["gpubatch:range"] == f"{values.min():.6g} {values.max():.6g}"
    assert not (Path(runs["auto"].output_uri) / "heatmaps").exists()  # no probability, no single column


def test_slides_are_read_back_whole_across_row_groups(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gpubatch.outputs.per_slide import iter_slides
    from gpubatch.outputs.store import OutputStore

    sizes = {"a": 7, "b": 3, "c": 9}
    slides = [s for s, n in sizes.items() for _ in range(n)]
    table = pa.table({"slide": slides, "x": np.arange(len(slides)), "y": np.zeros(len(slides), int)})
    pq.write_table(table, tmp_path / "predictions.parquet", row_group_size=4)
    got = [(r.slide, r.num_rows, [x for part in r.chunks(["x"]) for x in part.column("x").to_pylist()])
           for r in iter_slides(OutputStore(tmp_path))]
    assert got == [("a", 7, list(range(7))), ("b", 3, list(range(7, 10))), ("c", 9, list(range(10, 19)))]


def test_geojson_gives_every_class_its_own_colour(tmp_path: Path) -> None:
    """The palette was Tableau's 10, taken ``k % 10``: class 10 got class 0's colour, so QuPath
    drew two classes as one. Here 25 classes, each the top class of one tile, read back from
    the files as QuPath would."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gpubatch.outputs.geojson import class_colours, write_slide_geojson
    from gpubatch.outputs.per_slide import SlideGrid
    from gpubatch.outputs.store import OutputStore

    classes = 25
    probs = np.full((classes, classes), 0.2 / (classes - 1)) + np.eye(classes) * (0.8 - 0.2 / (classes - 1))
    table = pa.table({"slide": ["s"] * classes, "x": np.arange(classes) * 64, "y": np.zeros(classes, int),
                      **{f"probs_{k}": probs[:, k] for k in range(classes)}})
    pq.write_table(table, tmp_path / "predictions.parquet")
    store = OutputStore(tmp_path)
    names = write_slide_geojson(store, {"s": ("s", SlideGrid(classes * 64, 64, 64.0, 64.0))})
    doc = json.loads((tmp_path / names[0]).read_text())
    colour_of = {f["properties"]["classification"]["name"]: tuple(f["properties"]["classification"]["color"])
                 for f in doc["features"]}
    assert sorted(colour_of) == sorted(f"probs_{k}" for k in range(classes))
    assert len(set(colour_of.values())) == classes  # no two classes share a colour
    assert colour_of["probs_0"] == (31, 119, 180) and colour_of["probs_10"] != colour_of["probs_0"]
    many = class_colours(3000)
    assert len(set(many)) == 3000 and class_colours(classes) == many[:classes]  # class k's whatever the count
    assert all(0 <= c <= 255 for colour in many for c in colour)
