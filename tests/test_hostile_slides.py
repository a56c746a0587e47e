"""Slide files as a hostile user hands them over, each built here in its real format: read right,
or refused by name with the fix, and ``inspect``, ``validate`` and ``run`` say the same of each."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import slide_job, write_job
from pathology_files import write_ome_zarr

import gpubatch
from gpubatch.cli.main import main
from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import SpecError
from gpubatch.runtime.preflight import validate_job
from gpubatch.sources.slides.open import open_slide
from gpubatch.spec import load_job

pytest_plugins = ["pathology_files"]


def tiled_tiff(path: Path, levels: list[np.ndarray], compression: str = "jpeg", mpp: float = 0.5) -> str:
    """A tiled pyramid TIFF, one page per level (reduced pages marked so), resolution in cm."""
    import tifffile

    with tifffile.TiffWriter(path) as tw:
        for n, level in enumerate(levels):
            per_cm = 1e4 / (mpp * 2**n)
            tw.write(level, tile=(256, 256), compression=compression, photometric="rgb",
                     subfiletype=0 if n == 0 else 1, resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
    return str(path)


def validate_and_run(tmp_path: Path, uris: list[str], model: Path,
                     **tiles: Any) -> tuple[list[dict[str, str]], gpubatch.Result]:
    job = slide_job(uris, model, tmp_path / "out", tiles={"size": 64, "mpp": 0.5, **tiles})
    path = write_job(tmp_path / "job.yaml", job)
    try:
        refused = validate_job(load_job(str(path))).failed
    except SpecError as err:
        refused = [{"input": field, "error": message} for field, message in err.problems if field]
    return refused, gpubatch.run(str(path))


def inspected(path: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["inspect", path])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_float_tiff_is_refused_at_open_naming_its_samples(tmp_path: Path, picture: np.ndarray, mean_model: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A float32 TIFF (an analysis export) went past tifffile to openslide, which opened it:
    inspect described it as a slide, and the run failed at the first read with libtiff's 'Sorry,
    can not handle images with 32-bit samples'. It is refused at open, the samples and the fix
    named, by inspect, validate and run alike; the other slide proceeds."""
    floats = tiled_tiff(tmp_path / "float.tif", [picture.astype(np.float32) / 255], compression="zlib")
    good = tiled_tiff(tmp_path / "good.tif", [picture])
    refused, result = validate_and_run(tmp_path, [floats, good], mean_model)
    assert [f["input"] for f in refused] == [f["input"] for f in result.failed] == [floats]
    assert [f["error"] for f in refused] == [f["error"] for f in result.failed]
    assert "32-bit floating-point samples (float32)" in refused[0]["error"]
    assert "export the image as 8-bit" in refused[0]["error"]
    assert set(result.predictions()["slide"]) == {good}
    code, _, err = inspected(floats, capsys)
    assert code == 1 and floats in err and "32-bit floating-point samples" in err


def test_a_16_bit_tiff_is_read_scaled_to_8_bits(tmp_path: Path, picture: np.ndarray, mean_model: Path) -> None:
    """16-bit integer samples stay readable (openslide scales them), the refusal above does not
    reach them: the picture's means, as from its 8-bit self."""
    wide = tiled_tiff(tmp_path / "wide.tif", [picture.astype(np.uint16) * 257], compression="zlib")
    refused, result = validate_and_run(tmp_path, [wide], mean_model, level=0, mpp=None)
    assert refused == result.failed == []
    got = result.predictions()[["mean_0", "mean_1", "mean_2"]].to_numpy()
    assert len(got) == 16 * 12 and abs(got.mean() - picture.mean() / 255) < 1e-3


def test_ome_zarr_levels_with_negative_scales_keep_the_finest_first(tmp_path: Path, picture: np.ndarray) -> None:
    """Levels are ordered by scale; negative scales (a flipped axis, not NGFF) ordered by sign put
    the coarsest level first: the 512 x 384 level was level 0 and the full image a 'downsample'
    of 0.5, so tiles.level 0 read the coarse level and placed its tiles at half their places."""
    uri = write_ome_zarr(picture, tmp_path / "flipped.ome.zarr", levels=2, mpp=-0.5)
    backend = open_slide(uri, StageClocks())
    try:
        assert backend.info.level_dimensions == ((1024, 768), (512, 384))
        assert backend.info.level_downsamples == (1.0, 2.0)
    finally:
        backend.close()


def test_inspect_shows_a_nan_mpp_as_json(tmp_path: Path, picture: np.ndarray,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """An OME-Zarr scale of NaN was printed as a bare NaN: no JSON (jq and json.loads with
    strict constants refuse the whole answer). It is shown as the text 'nan'."""
    uri = write_ome_zarr(picture[:256, :256], tmp_path / "nan.ome.zarr", levels=1, mpp=float("nan"))
    code, out, _ = inspected(uri, capsys)

    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    assert code == 0 and json.loads(out, parse_constant=no_constants)["mpp"] == "nan"


def make_sparse(path: str, tiles: list[int], level: int = 0) -> str:
    """Set the byte counts of ``tiles`` at ``level`` to 0: sparse tiles, as a write cut short
    (or a scanner leaving out blank glass) stores them."""
    import struct

    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[level]
        tag = page.tags["TileByteCounts"]
        offset, kind = tag.valueoffset, {3: "<H", 4: "<I", 16: "<Q"}[int(tag.dtype)]
    data = bytearray(Path(path).read_bytes())
    for index in tiles:
        struct.pack_into(kind, data, offset + struct.calcsize(kind) * index, 0)
    Path(path).write_bytes(data)
    return path


def test_sparse_tiles_under_tissue_are_counted_in_the_notes(tmp_path: Path, picture: np.ndarray,
                                                            mean_model: Path) -> None:
    """Sparse tiles (no bytes stored) read as white, as openslide shows them; under tissue found at
    a coarser level they were white tiles in the predictions without a word. The slide's notes
    now count the sparse stored tiles its tiles needed, as the absent chunks of an OME-Zarr are."""
    uri = make_sparse(tiled_tiff(tmp_path / "sparse.tif", [picture, picture[::2, ::2].copy()]), list(range(12)))
    refused, result = validate_and_run(tmp_path, [uri], mean_model, level=0, mpp=None,
                                       tissue={"method": "otsu", "min_fraction": 0.5})
    assert refused == result.failed == []
    means = result.predictions()[["mean_0", "mean_1", "mean_2"]].to_numpy()
    assert 0 < len(means) < 16 * 12 and np.all(means == 1.0)  # tissue found at level 1, read as white
    sparse = [n for n in result.report["notes"] if "sparse" in n]
    assert len(sparse) == 1 and sparse[0].startswith(f"{uri}: ") and " are sparse (no bytes stored)" in sparse[0]


def test_a_staged_slide_passes_on_its_sparse_tiles(tmp_path: Path, picture: np.ndarray) -> None:
    """A slide read from its staged copy is wrapped; the wrapper's own (empty) notes hid the
    reader's."""
    import fsspec

    from gpubatch.sources.slides.open import open_slide_input

    local = make_sparse(tiled_tiff(tmp_path / "s.tif", [picture]), [0, 1])
    fsspec.filesystem("memory").pipe("/sparse-staged/s.tif", Path(local).read_bytes())
    backend = open_slide_input("memory://sparse-staged/s.tif", StageClocks(), access="stage", options={})
    try:
        backend.expect_reads(0, [np.array([[0, 0, 512, 256]])])
        assert backend.notes(0) and backend.notes(0)[0].startswith("2 of 2 stored tiles")
    finally:
        backend.close()


def test_a_pyramid_stored_smallest_first_is_refused_not_read_as_its_thumbnail(
        tmp_path: Path, picture: np.ndarray, mean_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A generic TIFF whose levels are stored smallest first (each page with its own resolution)
    was read as its first page: a 256 x 192 slide at 2 um/px, tiles.level 0 tiling the thumbnail
    and tiles.mpp 0.5 refused as 'coarser than requested' though the file holds 0.5 um/px; openslide
    orders the levels but takes the first page's resolution. Refused by name, with the fix."""
    import tifffile

    path = tmp_path / "reversed.tif"
    with tifffile.TiffWriter(path) as tw:
        for n in (2, 1, 0):
            per_cm = 1e4 / (0.5 * 2**n)
            tw.write(picture[:: 2**n, :: 2**n].copy(), tile=(256, 256), compression="jpeg", photometric="rgb",
                     resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
    refused, result = validate_and_run(tmp_path, [str(path)], mean_model, level=0, mpp=None)
    assert [f["error"] for f in refused] == [f["error"] for f in result.failed]
    assert len(refused) == 1 and "is not its largest (image 3, 1024x768 px)" in refused[0]["error"]
    code, _, err = inspected(str(path), capsys)
    assert code == 1 and "a pyramid stored smallest first" in err


def _channels_tiff(path: Path, picture: np.ndarray, case: str) -> str:
    """A TIFF whose 3 or 4 channels are not red, green, blue (and alpha), as tifffile writes it."""
    import tifffile

    four = np.concatenate([picture, 255 - picture[..., :1]], axis=-1)
    common: dict[str, Any] = {"tile": (256, 256), "compression": "zlib", "resolution": (2e4, 2e4),
                              "resolutionunit": "CENTIMETER"}
    if case == "rgb-and-unspecified":
        tifffile.imwrite(path, four, photometric="rgb", extrasamples=["unspecified"], **common)
    elif case == "four-gray":
        tifffile.imwrite(path, four, photometric="minisblack", planarconfig="contig", **common)
    elif case == "three-gray":
        tifffile.imwrite(path, picture, photometric="minisblack", planarconfig="contig", **common)
    else:  # an OME-TIFF of three fluorescence channels, one page each
        tifffile.imwrite(path, np.moveaxis(picture, -1, 0).copy(), photometric="minisblack", **common,
                         metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "FITC", "TRITC"]},
                                   "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    return str(path)


@pytest.mark.parametrize(("case", "said"), [
    ("rgb-and-unspecified", "the fourth not alpha (ExtraSamples 0, unspecified)"),
    ("four-gray", "stores 4 gray samples per pixel (photometric MINISBLACK)"),
    ("three-gray", "stores 3 gray samples per pixel (photometric MINISBLACK)"),
    ("ome-channels", "3 channels stored as planes of their own"),
])
def test_tiff_channels_that_are_not_rgb_are_refused_by_name(tmp_path: Path, picture: np.ndarray, mean_model: Path,
                                                            case: str, said: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """As the OME-Zarr rule: channels the file does not call red, green, blue (and alpha) were
    read as if it did, exit 0: a fourth sample tagged 'unspecified' or four gray samples
    composited away as alpha, three gray samples sent as RGB, and an OME-TIFF of DAPI, FITC,
    TRITC planes read as its DAPI plane in gray. Refused by inspect, validate and run alike."""
    uri = _channels_tiff(tmp_path / f"{case}.ome.tif", picture, case)
    good = tiled_tiff(tmp_path / "good.tif", [picture])
    refused, result = validate_and_run(tmp_path, [uri, good], mean_model)
    assert [f["input"] for f in refused] == [f["input"] for f in result.failed] == [uri]
    assert [f["error"] for f in refused] == [f["error"] for f in result.failed]
    assert said in refused[0]["error"] and "render the channels to an 8-bit RGB image" in refused[0]["error"]
    assert set(result.predictions()["slide"]) == {good}
    code, _, err = inspected(uri, capsys)
    assert code == 1 and said in err


def _zarr_levels(path: Path, picture: np.ndarray, shapes: list[tuple[int, int]], scales: list[float]) -> str:
    """An NGFF 0.5 image of levels of the given (height, width), each with its x/y scale (um)."""
    import zarr
    from pathology_files import ngff_axes

    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    datasets = []
    for n, ((h, w), scale) in enumerate(zip(shapes, scales, strict=True)):
        array = root.create_array(str(n), shape=(3, h, w), dtype="u1", chunks=(3, 256, 256), fill_value=0)
        if h and w:
            array[...] = np.moveaxis(picture[:: 768 // h, :: 1024 // w][:h, :w], -1, 0)
        datasets.append({"path": str(n), "coordinateTransformations": [{"type": "scale", "scale": [1.0, scale, scale]}]})
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": ngff_axes("cyx"), "datasets": datasets}]}
    return str(path)


@pytest.mark.parametrize(("shapes", "scales", "said"), [
    ([(0, 0)], [0.5], "level '0' is 0x0 px: an image with no pixels"),
    ([(384, 512), (768, 1024)], [0.5, 1.0], "level '1' (1024x768 px) is larger than level '0' (512x384 px)"),
])
def test_ome_zarr_levels_that_contradict_their_sizes_are_refused_by_name(
        tmp_path: Path, picture: np.ndarray, mean_model: Path, capsys: pytest.CaptureFixture[str],
        shapes: list[tuple[int, int]], scales: list[float], said: str) -> None:
    """An empty level 0 was 'ZeroDivisionError: division by zero' (a traceback from inspect); a
    coarser scale on the larger array made the smaller the full image, the larger a 'downsample'
    of 0.5, and the run read it, exit 0. Both refused by name, in inspect, validate and run."""
    uri = _zarr_levels(tmp_path / "odd.ome.zarr", picture, shapes, scales)
    refused, result = validate_and_run(tmp_path, [uri], mean_model, level=0, mpp=None)
    assert [f["error"] for f in refused] == [f["error"] for f in result.failed]
    assert len(refused) == 1 and said in refused[0]["error"]
    code, _, err = inspected(uri, capsys)
    assert code == 1 and said in err


def test_an_empty_reduced_ome_zarr_level_is_left_out(tmp_path: Path, picture: np.ndarray) -> None:
    """A reduced level of 0 x 0 px (a conversion cut short) was a ZeroDivisionError at open; it
    is left out, as a level reduced unlike across and down is, and the image reads."""
    uri = _zarr_levels(tmp_path / "cut.ome.zarr", picture, [(768, 1024), (0, 0)], [0.5, 1.0])
    backend = open_slide(uri, StageClocks())
    try:
        assert backend.info.level_dimensions == ((1024, 768),)
    finally:
        backend.close()


def test_a_tiff_in_strips_is_refused_with_the_fix(tmp_path: Path, picture: np.ndarray,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A plain image in strips (a microscope export, not a slide pyramid) is read by neither
    reader; the refusal said 'not a tiled RGB or grayscale uint8 pyramid', as for any other
    reason, and not how to make one."""
    import tifffile

    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, picture, photometric="rgb", rowsperstrip=16)
    code, _, err = inspected(str(path), capsys)
    assert code == 1 and "level 0 is stored in strips, not tiles" in err and "--tile --pyramid" in err
