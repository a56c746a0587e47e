"""DICOM-WSI, OME-Zarr and OME-TIFF as a user meets them: routing, errors, listing, inspect, runs.

Expected values come from the stored picture (every format holds the same one) and from
pydicom's own table of SOP class names, never from the readers under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from conftest import slide_job, write_job

import gpubatch
from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import EXIT_PARTIAL, InputError
from gpubatch.sources.slides.listing import slide_inputs
from gpubatch.sources.slides.open import open_slide, open_slide_input

if TYPE_CHECKING:
    from s3_fixtures import S3Stack

pytest_plugins = ["s3_fixtures", "pathology_files"]

CT_NAME = "CT Image Storage (1.2.840.10008.5.1.4.1.1.2)"
SC_NAME = "Secondary Capture Image Storage (1.2.840.10008.5.1.4.1.1.7)"
WSI_NAME = "VL Whole Slide Microscopy Image Storage (1.2.840.10008.5.1.4.1.1.77.1.6)"



def _backend_of(path: Path) -> tuple[str, dict]:
    backend = open_slide(str(path), StageClocks())
    try:
        return backend.info.backend, backend.info.as_dict()
    finally:
        backend.close()


@pytest.mark.parametrize(("name", "backend", "levels", "mpp"), [
    ("dicom", "wsidicom", 3, 0.25),                 # a folder: OpenSlide cannot open one
    ("dicom/level0.dcm", "openslide", 3, 0.25),     # a local file OpenSlide 4 opens
    ("dicom-ls/level2.dcm", "wsidicom", 3, 0.25),   # JPEG-LS: OpenSlide refuses, wsidicom reads
    ("image.ome.zarr", "zarr", 3, 0.5),
    ("v04.ome.zarr", "zarr", 3, 0.5),
    ("image.ome.tif", "tifffile", 3, 0.5),          # every SubIFD level, not level 0 only
])
def test_each_format_goes_to_its_reader(formats_dir: Path, name: str, backend: str, levels: int,
                                        mpp: float) -> None:
    got, info = _backend_of(formats_dir / name)
    assert got == backend
    assert info["level_count"] == levels and info["mpp"] == pytest.approx(mpp)
    assert (info["width"], info["height"]) == (1024, 768)


def test_a_zarr_folder_without_the_suffix_is_still_read(formats_dir: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(formats_dir / "image.ome.zarr", tmp_path / "scan-0001")
    assert _backend_of(tmp_path / "scan-0001")[0] == "zarr"


@pytest.mark.parametrize(("name", "expected"), [
    ("not-slides/ct.dcm", f"is a DICOM file but not a whole-slide image: its SOP Class is {CT_NAME}; "
                          f"expected {WSI_NAME}"),
    ("not-slides/sc.dcm", f"its SOP Class is {SC_NAME}"),
    ("not-slides", f"folder holds 2 DICOM file(s) but no whole-slide image; SOP classes found: "
                   f"{CT_NAME}, {SC_NAME}"),
])
def test_dicom_that_is_not_a_slide_is_refused_by_its_sop_class(formats_dir: Path, name: str,
                                                               expected: str) -> None:
    with pytest.raises(InputError) as err:
        open_slide(str(formats_dir / name), StageClocks())
    assert expected in err.value.message


def test_unreadable_folders_and_files_say_what_they_are(tmp_path: Path, picture: np.ndarray) -> None:
    from pathology_files import write_dicom_wsi

    (tmp_path / "notes.dcm").write_text("not dicom at all\n" * 20)
    (tmp_path / "empty").mkdir()
    write_dicom_wsi(picture[:300, :300], tmp_path / "two", levels=1, seed=5, name="a")
    write_dicom_wsi(picture[:300, :300], tmp_path / "two", levels=1, seed=6, name="b")
    _assert_refused(tmp_path, {"notes.dcm": "not a DICOM file (no 'DICM' marker",
                               "empty": "neither an OME-Zarr image nor DICOM files",
                               "two": "folder holds 2 DICOM-WSI series; list its files (folder/*.dcm)"})


def _assert_refused(folder: Path, cases: dict[str, str]) -> None:
    """Each named input is an InputError whose message holds the expected words."""
    for name, expected in cases.items():
        with pytest.raises(InputError) as err:
            open_slide(str(folder / name), StageClocks())
        assert expected in err.value.message, (name, err.value.message)


def test_zarr_that_is_not_an_rgb_slide_is_refused(tmp_path: Path, picture: np.ndarray) -> None:
    import zarr
    from pathology_files import write_ome_zarr

    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w").create_array("x", shape=(4,), dtype="u1")
    write_ome_zarr(picture[:64, :64], tmp_path / "stack.zarr", axes="czyx", levels=1)
    group = zarr.open_group(str(tmp_path / "stack.zarr"), mode="a")
    group["0"].resize((3, 2, 64, 64))  # a z-stack of two planes
    grey = zarr.open_group(str(tmp_path / "deep.zarr"), mode="w")
    grey.create_array("0", shape=(3, 64, 64), dtype="u2")
    grey.attrs["ome"] = {"version": "0.5", "multiscales": [
        {"axes": [{"name": a, "type": t} for a, t in zip("cyx", ("channel", "space", "space"), strict=True)],
         "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 1]}]}]}]}
    _assert_refused(tmp_path, {"plain.zarr": "no OME-NGFF 'multiscales' metadata",
                               "stack.zarr": "axis 'z' has 2 entries",
                               "deep.zarr": "is uint16, not uint8: slides are read as 8-bit RGB or gray"})


def test_listing_makes_one_input_per_zarr_image_and_dicom_series(formats_dir: Path) -> None:
    root = str(formats_dir)
    inside = [f"{root}/image.ome.zarr/zarr.json", f"{root}/image.ome.zarr/0/c/0/0/0",
              f"{root}/image.ome.zarr/1/zarr.json"]
    dicom = sorted(str(p) for p in (formats_dir / "dicom").glob("*.dcm"))
    got = slide_inputs([*inside, *dicom, f"{root}/not-slides/ct.dcm", f"{root}/image.ome.tif"])
    assert got == [f"{root}/image.ome.zarr", f"{root}/dicom", f"{root}/not-slides/ct.dcm",
                   f"{root}/image.ome.tif"]


def test_listing_splits_a_folder_of_two_series(tmp_path: Path, picture: np.ndarray) -> None:
    from pathology_files import write_dicom_wsi

    write_dicom_wsi(picture[:300, :300], tmp_path / "two", levels=2, seed=5, name="a")
    write_dicom_wsi(picture[:300, :300], tmp_path / "two", levels=2, seed=6, name="b")
    files = sorted(str(p) for p in (tmp_path / "two").glob("*.dcm"))
    assert slide_inputs(files) == [str(tmp_path / "two" / "a0.dcm"), str(tmp_path / "two" / "b0.dcm")]
    for first in slide_inputs(files):
        backend = open_slide(first, StageClocks())  # each first file opens its own series
        assert backend.info.level_dimensions == ((300, 300), (150, 150))
        backend.close()


def _mean_colour_per_tile(picture: np.ndarray, df: object, size: int) -> np.ndarray:
    """The model's output computed from the picture itself: per-tile channel means in [0, 1]."""
    rows = []
    for x, y in zip(df["x"], df["y"], strict=True):  # type: ignore[index]
        tile = np.full((size, size, 3), 255, np.uint8)
        part = picture[y : y + size, x : x + size]
        tile[: part.shape[0], : part.shape[1]] = part
        rows.append(tile.reshape(-1, 3).mean(0) / 255.0)
    return np.array(rows)


def test_a_run_reads_every_format_and_quarantines_the_ct(tmp_path: Path, formats_dir: Path,
                                                         picture: np.ndarray, mean_model: Path) -> None:
    uris = [str(formats_dir / n) for n in ("dicom", "dicom-ls/level0.dcm", "image.ome.zarr",
                                           "v04.ome.zarr", "image.ome.tif", "not-slides/ct.dcm")]
    job = slide_job(uris, mean_model, tmp_path / "out", tiles={"size": 128, "level": 0, "mpp": None})
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job))
    assert result.exit_code == EXIT_PARTIAL
    assert [f["input"] for f in result.failed] == [uris[-1]]
    assert CT_NAME in result.failed[0]["error"]
    df = result.predictions()
    assert list(dict.fromkeys(df["slide"])) == uris[:-1]
    for uri in uris[:-1]:
        part = df[df["slide"] == uri]
        assert len(part) == 8 * 6
        want = _mean_colour_per_tile(picture, part, 128)
        got = part[["mean_0", "mean_1", "mean_2"]].to_numpy()
        assert np.abs(got - want).mean() < 3.0 / 255, uri  # JPEG where lossy, exact elsewhere
    assert _readers(result) == ["wsidicom", "wsidicom", "zarr", "zarr", "tifffile"]


def _readers(result: gpubatch.Result) -> list[str]:
    """The reader each slide went through, as its zarr group's attributes record it."""
    import zarr

    root = zarr.open_group(str(Path(result.output_uri) / "predictions.zarr"), mode="r")
    groups = root.attrs["groups"]
    return [root[groups[sid]].attrs["slide_info"]["backend"] for sid in root.attrs["shards"]]


def test_a_run_from_object_storage_equals_the_local_run(tmp_path: Path, s3: S3Stack, formats_dir: Path,
                                                        mean_model: Path) -> None:
    remote = [s3.upload_folder(formats_dir / "dicom", "runs/case-1.2.3"),
              s3.upload_folder(formats_dir / "image.ome.zarr", "runs/image.ome.zarr")]
    # transient 503s on one request in five: each request retried on its own (a folder walk of a
    # dozen requests retried as a whole, or a library's request with its retries off, failed here)
    s3.proxy.configure(error_rate=0.2, seed=3)
    job = slide_job(remote, mean_model, tmp_path / "remote", tiles={"size": 128, "level": 0, "mpp": None},
                    input={"uris": remote, "storage": s3.options()})
    got = gpubatch.run(write_job(tmp_path / "remote.yaml", job))
    injected = s3.proxy.stats["errors"]
    s3.proxy.reset()
    local = [str(formats_dir / "dicom"), str(formats_dir / "image.ome.zarr")]
    want = gpubatch.run(write_job(tmp_path / "local.yaml", slide_job(
        local, mean_model, tmp_path / "local", tiles={"size": 128, "level": 0, "mpp": None})))
    assert got.exit_code == want.exit_code == 0
    a, b = got.predictions(), want.predictions()
    np.testing.assert_array_equal(a[["x", "y", "mean_0", "mean_1", "mean_2"]].to_numpy(),
                                  b[["x", "y", "mean_0", "mean_1", "mean_2"]].to_numpy())
    assert _readers(got) == ["wsidicom", "zarr"]
    storage = got.report["storage"]
    assert storage["requests"] > 0 and storage["retries"] > 0
    # wsidicom's and zarr's own requests are retried by their client (botocore): counted too, and
    # no retry twice (each follows one of the 503s the proxy gave)
    assert 0 < storage["library_retries"] < storage["retries"] <= injected


def test_listing_on_object_storage_does_not_descend_into_images(s3: S3Stack, formats_dir: Path) -> None:
    from gpubatch.io.listing import expand_uris

    s3.upload_folder(formats_dir / "image.ome.zarr", "listing/a/image.ome.zarr")
    s3.upload_folder(formats_dir / "dicom", "listing/b")
    found = expand_uris([f"s3://{s3.bucket}/listing/**"], s3.options())
    assert len(found) > 10  # every chunk and level file is listed...
    assert slide_inputs(found, s3.options()) == [  # ...and they are two slides
        f"s3://{s3.bucket}/listing/a/image.ome.zarr", f"s3://{s3.bucket}/listing/b"]


def _inspect_cli(target: str, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run([sys.executable, "-m", "gpubatch", "inspect", target], capture_output=True,
                         text=True, timeout=120, env={**os.environ, **(env or {})}, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize(("name", "vendor"), [("dicom", "dicom"), ("dicom/level0.dcm", "dicom"),
                                              ("v04.ome.zarr", "ome-zarr-0.4"), ("image.ome.tif", "ome-tiff")])
def test_inspect_describes_every_format(formats_dir: Path, name: str, vendor: str) -> None:
    info = _inspect_cli(str(formats_dir / name))
    assert info["vendor"] == vendor and info["level_count"] == 3 and info["width"] == 1024


def test_inspect_reads_object_storage_with_the_standard_environment(s3: S3Stack, formats_dir: Path) -> None:
    zarr_uri = s3.upload_folder(formats_dir / "image.ome.zarr", "inspect/image.ome.zarr")
    dicom_uri = s3.upload_folder(formats_dir / "dicom", "inspect/dicom")
    env = {"AWS_ENDPOINT_URL": s3.endpoint, "AWS_ACCESS_KEY_ID": s3.key,
           "AWS_SECRET_ACCESS_KEY": s3.secret, "AWS_DEFAULT_REGION": "us-east-1"}
    assert _inspect_cli(zarr_uri, env)["backend"] == "zarr"
    info = _inspect_cli(dicom_uri, env)
    assert (info["backend"], info["mpp"], info["magnification"]) == ("wsidicom", 0.25, 40.0)


def test_a_remote_prefix_with_no_slide_is_an_input_error(s3: S3Stack) -> None:
    s3.upload_bytes(b"hello", "empty-prefix/readme.txt")
    with pytest.raises(InputError) as err:
        open_slide_input(f"s3://{s3.bucket}/empty-prefix", StageClocks(), options=s3.options())
    assert "neither an OME-Zarr image nor DICOM files" in err.value.message
