"""A slide's label and macro images and its private metadata never reach the outputs.

An Aperio SVS with a label and a macro image (a real scan, and a synthetic one whose label is
noise and whose scanner field is made up) runs through the command line; then the output
folder may hold only the files gpubatch is known to write (a hand-written allow-list, not the
code's own list), no file or embedded blob in it may decode as a raster image except the
heatmaps (report plots are SVG), and no decodable image may look like the label or the macro at
any size, whatever its name.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, shared_file, slide_job, write_job
from hostile_inputs import svs_with_label_and_macro

openslide = pytest.importorskip("openslide")
from PIL import Image  # noqa: E402 - after the skip: Pillow comes with openslide-python

pytestmark = pytest.mark.slow

#: what a finished fp32 run into a local folder may hold, as patterns on the relative path
ALLOWED = [re.compile(p) for p in (
    r"predictions\.parquet", r"slide_predictions\.parquet", r"geojson/[\w.-]+\.geojson", r"heatmaps/[\w.-]+\.png",
    r"report\.json", r"report\.html", r"audit\.jsonl",
    r"status\.json", r"_spec\.json", r"\.gpubatch-output", r"_parts/[\w.-]+\.parquet",
    r"_manifest/[\w.-]+\.json", r"_audit/[\w.-]+\.json", r"predictions\.zarr/(?:[\w.-]+/)*[\w.-]+",
)]
BASE64_RUN = re.compile(rb"[A-Za-z0-9+/]{256,}={0,2}")


def _decoded_images(blob: bytes) -> list[Image.Image]:
    """Every raster image the bytes are, or hold as a base64 run."""
    found = []
    candidates = [blob]
    for run in BASE64_RUN.findall(blob):
        try:
            candidates.append(base64.b64decode(run + b"=" * (-len(run) % 4)))
        except (binascii.Error, ValueError):
            continue
    for data in candidates:
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
            found.append(img.convert("RGB"))
        except Exception:  # noqa: BLE001 - not an image
            continue
    return found


def _looks_like(img: Image.Image, ref: np.ndarray) -> bool:
    """Mean absolute difference under 12 of 255 once resized to the reference's size."""
    resized = np.asarray(img.resize((ref.shape[1], ref.shape[0])), dtype=np.float32)
    return float(np.abs(resized - ref.astype(np.float32)).mean()) < 12


@pytest.mark.parametrize("which", ["CMU-1-Small-Region.svs", "synthetic"])
def test_label_macro_and_private_metadata_never_reach_outputs(tmp_path: Path, classifier: Path, which: str) -> None:
    if which == "synthetic":
        path = svs_with_label_and_macro(tmp_path / "synthetic.svs")
    else:
        path = shared_file("slides", which)
    slide = openslide.OpenSlide(str(path))
    assert {"label", "macro"} <= set(slide.associated_images)
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", slide_job([str(path)], classifier, out, tiles={"size": 224, "mpp": 0.5},
                                                     output={"formats": ["parquet", "zarr", "geojson"]}))
    proc = cli("run", str(job))
    log = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, log
    proc = cli("report", str(out), "--html")
    log += proc.communicate(timeout=60)[0]
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert json.loads(files["report.json"])["items"] > 0  # the slide was read, tiles and all
    unknown = [name for name in files if not any(rx.fullmatch(name) for rx in ALLOWED)]
    assert not unknown, f"files gpubatch does not write: {unknown}"
    private = [v for k, v in slide.properties.items()
               if k.startswith("aperio.") and len(v) >= 5 and not v.replace(".", "").isdigit()
               and v not in str(path)]  # the input's own path is, of course, in the outputs
    private += ["ScanScope", "Aperio Image Library"]
    for value in private:
        assert not any(value.encode() in b for b in [log.encode(), *files.values()]), f"slide metadata {value!r} leaked"
    refs = {name: np.asarray(slide.associated_images[name].convert("RGB")) for name in ("label", "macro")}
    images = {name: _decoded_images(data) for name, data in files.items()}
    heatmaps = [np.asarray(img).tobytes() for name, found in images.items() if name.startswith("heatmaps/")
                for img in found]
    for name, found in images.items():
        for img in found:
            for ref_name, ref in refs.items():
                assert not _looks_like(img, ref), f"{name} holds the slide's {ref_name} image"
            if name == "report.html":  # the page shows the heatmaps, and nothing else raster
                assert np.asarray(img).tobytes() in heatmaps, f"report.html shows an image ({img.size}) no heatmap is"
            else:
                assert name.startswith("heatmaps/"), f"{name} holds a raster image ({img.size}); only heatmaps may"


def test_the_image_check_finds_a_label_however_it_is_stored() -> None:
    """The check above is not blind: a PNG, a JPEG and a base64 copy of the label are all found."""
    slide = openslide.OpenSlide(str(shared_file("slides", "CMU-1-Small-Region.svs")))
    label = slide.associated_images["label"].convert("RGB")
    ref = np.asarray(label)
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        label.resize((label.width // 2, label.height // 2)).save(buf, fmt)
        for blob in (buf.getvalue(), b'{"x": "' + base64.b64encode(buf.getvalue()) + b'"}'):
            images = _decoded_images(blob)
            assert images and _looks_like(images[0], ref)
    macro = np.asarray(slide.associated_images["macro"].convert("RGB"))
    assert not _looks_like(label, macro)
