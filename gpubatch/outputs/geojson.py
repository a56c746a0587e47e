"""geojson/<slide>.geojson: each slide's tiles as QuPath tile objects, with the outputs as measurements.

QuPath's *File > Import objects from file* reads a GeoJSON FeatureCollection whose features carry
QuPath's own properties (qupath-core ``PathObjectTypeAdapters``, 0.4 and later):

* ``objectType: "tile"`` makes each feature a tile object (a square the viewer draws over the slide);
* ``classification: {"name": ..., "color": [r, g, b]}`` classifies it (both keys are required for
  the object form; the name is the column's, with ``:`` and line breaks, which QuPath reads as a
  derived class or refuses, replaced); for a classifier, the class of the highest probability (none for a tile
  whose probabilities are NaN or inf: the model gave no answer there);
* ``measurements: {name: number}`` become the object's measurements, listed and usable for colouring
  and filtering in QuPath (non-finite values are left out: JSON has no NaN).

Coordinates are level-0 pixels of the image QuPath shows, origin at its top-left, y down: for a
slide whose scan sits inside a larger canvas (Leica SCN, MIRAX: openslide's ``bounds-*``), that
image is the scan alone, so the scan's place is subtracted (predictions.parquet's ``x``, ``y`` keep
openslide's frame). Each square is the region the tile's pixels were read from
(``SlideGrid.read_regions``). One file
per slide, named by the slide's safe key (never its URI), written from predictions.parquet one slide
at a time, a chunk of its rows at a time (``per_slide.SlideRows``): no pixels, no metadata beyond
the outputs.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa

from gpubatch.core.phases import Phase
from gpubatch.outputs.layout import GEOJSON_DIR, geojson_name
from gpubatch.outputs.per_slide import (
    SlideGrid,
    SlideRows,
    finite_rows,
    iter_slides,
    output_columns_of,
    probability_groups,
)
from gpubatch.outputs.store import OutputStore

#: the first classes' colours (Tableau 20: its 10, then their light tints): distinct on a slide's
#: pinks and purples; classes past them get :func:`class_colours`' generated ones
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
           (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
           (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229))
#: hue steps of the golden ratio's conjugate: each new hue falls in the widest gap left so far
GOLDEN_STEP = 0.6180339887498949
#: saturation and value step too (by other irrationals, 1/g^2 and 1/g^3 of the plastic-like
#: g = 1.2207...), over these ranges: vivid to muted, never grey, white or black; so the
#: colours are not bounded by the ~1,500 8-bit hues of one saturation and value
SATURATION, VALUE = (0.45, 0.95), (0.55, 0.95)
SHADE_STEPS = (0.6710436067037893, 0.5497004779019703)

Colour = tuple[int, int, int]


def write_slide_geojson(store: OutputStore, slides: dict[str, tuple[str, SlideGrid]],
                        progress: Phase | None = None) -> list[str]:
    """One FeatureCollection per slide of predictions.parquet; ``slides``: URI -> (key, grid).
    Slides with no rows get an empty collection, so every slide has its file.
    Returns the files' names under the output. ``progress`` (the run's end) counts the slides."""
    written = []
    seen = set()
    each_slide = iter_slides(store)
    if progress is not None:
        progress.step(f"writing the slides' GeoJSON into {GEOJSON_DIR}/", len(slides), "slide")
        each_slide = progress.counting(each_slide)
    for rows in each_slide:
        if rows.slide in slides:
            key, grid = slides[rows.slide]
            written.append(_write(store, key, _features(rows, grid)))
            seen.add(rows.slide)
    for slide, (key, _) in slides.items():
        if slide not in seen:
            written.append(_write(store, key, iter(())))
    return written


def _write(store: OutputStore, key: str, features: Iterable[dict[str, Any]]) -> str:
    """Streamed: memory of one feature, the file appearing whole or not at all."""
    name = f"{GEOJSON_DIR}/{geojson_name(key)}"
    with store.open_write(name) as f:
        f.write(b'{"type": "FeatureCollection", "features": [')
        for i, feature in enumerate(features):
            f.write((("," if i else "") + "\n" + json.dumps(feature, allow_nan=False)).encode())
        f.write(b"\n]}\n")
    return name


def _features(rows: SlideRows, grid: SlideGrid) -> Iterable[dict[str, Any]]:
    """A tile object per row: its square, its class (classifiers) and its outputs as measurements.
    The classes are found over the slide's rows (a pass); the rows are then read and converted a
    chunk at a time (the whole slide's columns in float64 at once were 62 MB for a million tiles
    of 3 outputs)."""
    names = output_columns_of(rows)
    groups = probability_groups(rows)
    classes = groups[0] if groups else None
    palette = class_colours(len(classes)) if classes else []
    for part in rows.chunks(["x", "y", *names]):
        yield from _chunk_features(part, grid, names, classes, palette)


def class_colours(count: int) -> list[Colour]:
    """``count`` distinct colours, class ``k``'s always the same whatever the count (a prefix of a
    longer list): :data:`PALETTE`'s, then golden-ratio hue steps (saturation and value stepping
    too), a colour that rounds to one already given skipped. The palette's ``k % 10`` gave class 10
    class 0's colour, so QuPath showed the two classes as one."""
    import colorsys

    colours = list(PALETTE[:count])
    taken = set(colours)
    step = 1  # step 0 is hue 0 at the dullest shade: a brown beside PALETTE's
    while len(colours) < count:
        saturation = SATURATION[0] + (SATURATION[1] - SATURATION[0]) * ((step * SHADE_STEPS[0]) % 1.0)
        value = VALUE[0] + (VALUE[1] - VALUE[0]) * ((step * SHADE_STEPS[1]) % 1.0)
        rgb = colorsys.hsv_to_rgb((step * GOLDEN_STEP) % 1.0, saturation, value)
        colour = (round(rgb[0] * 255), round(rgb[1] * 255), round(rgb[2] * 255))
        step += 1
        if colour not in taken:
            colours.append(colour)
            taken.add(colour)
    return colours


def _chunk_features(table: pa.Table, grid: SlideGrid, names: list[str], classes: list[str] | None,
                    palette: list[Colour]) -> Iterable[dict[str, Any]]:
    values = {n: table.column(n).to_numpy(zero_copy_only=False).astype(np.float64) for n in names}
    top = _top_class(np.column_stack([values[n] for n in classes])) if classes is not None else None
    lefts, tops, edge = grid.read_regions(table.column("x").to_numpy(zero_copy_only=False),
                                          table.column("y").to_numpy(zero_copy_only=False))
    for i in range(len(table)):
        x, y = round(float(lefts[i]), 3), round(float(tops[i]), 3)
        x1, y1 = round(x + edge, 3), round(y + edge, 3)
        ring = [[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]
        props: dict[str, Any] = {"objectType": "tile"}
        if top is not None and classes is not None and top[i] >= 0:
            k = int(top[i])
            props["classification"] = {"name": class_name(classes[k]), "color": list(palette[k])}
        props["measurements"] = {n: float(v[i]) for n, v in values.items() if math.isfinite(v[i])}
        yield {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": props}


def class_name(column: str) -> str:
    """A column's name as a QuPath class of its own: QuPath's ``PathClass.fromString`` splits a
    name at every ``:`` into a derived class (``softmax:0_1``, as tf2onnx names outputs, became
    class ``0_1`` under ``softmax``) and refuses one with a line break, the whole file with it.
    Measurements keep the column's own name."""
    return re.sub(r"[\r\n]+", " ", column.replace(":", "_")).strip() or "class"


def _top_class(probabilities: np.ndarray) -> np.ndarray:
    """Each row's class of the highest probability; -1 (no class) where the model gave none
    (NaN or inf: argmax would name the class that held the NaN)."""
    top = probabilities.argmax(1)
    top[~finite_rows(probabilities)] = -1
    return top
