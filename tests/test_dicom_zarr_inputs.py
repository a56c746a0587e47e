"""DICOM-WSI series and OME-Zarr images as a pathology archive holds them, partly broken: each is
read right (the stored picture's pixels at the right level-0 places) or refused by name with the
fix, and ``validate`` says what ``run`` quarantines.

Expected pixels come from the picture the writers store (tests/pathology_files.py), never from
the readers under test.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from conftest import slide_job, write_job
from pathology_files import write_ancillary_dicom, write_dicom_wsi, write_ome_zarr

import gpubatch
from gpubatch.core.errors import EXIT_OK, SpecError
from gpubatch.runtime.preflight import validate_job
from gpubatch.sources.slides.listing import slide_inputs
from gpubatch.spec import load_job

if TYPE_CHECKING:
    from s3_fixtures import S3Stack

pytest_plugins = ["s3_fixtures", "pathology_files"]

TILE = 128


def validated(job_path: Path) -> list[dict[str, str]]:
    """The inputs ``validate`` says a run would quarantine, with its words (all of them refused
    is a SpecError naming each)."""
    try:
        return validate_job(load_job(str(job_path))).failed
    except SpecError as err:
        return [{"input": field, "error": message} for field, message in err.problems if field]


def validate_and_run(tmp_path: Path, uris: list[str], model: Path, **sections: Any) -> tuple[list[dict[str, str]], gpubatch.Result]:
    tiles = {"size": TILE, "level": 0, "mpp": None, **sections.pop("tiles", {})}
    job = slide_job(uris, model, tmp_path / "out", tiles=tiles, **sections)
    path = write_job(tmp_path / "job.yaml", job)
    return validated(path), gpubatch.run(str(path))


def tile_means(picture: np.ndarray, xs: Any, ys: Any, extent: int = TILE) -> np.ndarray:
    """Per-tile channel means in [0, 1] of the picture itself (tiles ``extent`` level-0 pixels
    on a side, white past its edge): what the mean-colour model outputs."""
    rows = []
    for x, y in zip(xs, ys, strict=True):
        tile = np.full((extent, extent, 3), 255, np.uint8)
        part = picture[y : y + extent, x : x + extent]
        tile[: part.shape[0], : part.shape[1]] = part
        rows.append(tile.reshape(-1, 3).mean(0) / 255.0)
    return np.array(rows)


def assert_reads_picture(result: gpubatch.Result, picture: np.ndarray, tolerance: float = 3.0 / 255,
                         extent: int = TILE) -> None:
    df = result.predictions()
    want = tile_means(picture, df["x"], df["y"], extent)
    got = df[["mean_0", "mean_1", "mean_2"]].to_numpy()
    assert len(df) and np.abs(got - want).mean() < tolerance


# -- DICOM-WSI: label, overview and thumbnail images


def test_a_label_and_overview_in_a_series_of_their_own_are_no_second_slide(
        tmp_path: Path, picture: np.ndarray, mean_model: Path) -> None:
    """Scanners may write the label and overview as a series of their own beside the pyramid's.
    The folder was refused as holding 2 DICOM-WSI series (validate and run), and its files
    listed by a glob made the label an input of its own, quarantined (exit 3)."""
    folder = tmp_path / "case"
    write_dicom_wsi(picture, folder, levels=2)
    black = np.zeros_like(picture[:200, :300])  # read as tissue, it would turn every mean to 0
    write_ancillary_dicom(black, folder / "label.dcm", "LABEL", own_series=True)
    write_ancillary_dicom(black, folder / "overview.dcm", "OVERVIEW", own_series=True)
    files = sorted(str(p) for p in folder.glob("*.dcm"))
    assert slide_inputs(files) == [str(folder)]
    for name, uris in (("folder", [str(folder)]), ("glob", [f"{folder}/*.dcm"])):
        (tmp_path / name).mkdir()
        refused, result = validate_and_run(tmp_path / name, uris, mean_model)
        assert refused == [] and result.failed == [] and result.exit_code == EXIT_OK
        assert list(result.predictions()["slide"].unique()) == [str(folder)]
        assert_reads_picture(result, picture)


@pytest.mark.parametrize("target", ["folder", "label.dcm"])
def test_only_the_label_and_overview_are_refused_by_name(tmp_path: Path, picture: np.ndarray,
                                                         mean_model: Path, target: str) -> None:
    """A copy that holds the label and overview but no pyramid level: wsidicom said only 'Level
    files not found' (and OpenSlide 'No pyramid levels found'), naming neither what was there
    nor what to do."""
    folder = tmp_path / "case"
    write_ancillary_dicom(picture[:200, :300], folder / "label.dcm", "LABEL")
    write_ancillary_dicom(picture[:200, :300], folder / "overview.dcm", "OVERVIEW")
    uri = str(folder if target == "folder" else folder / target)
    refused, result = validate_and_run(tmp_path, [uri], mean_model)
    assert [f["input"] for f in result.failed] == [f["input"] for f in refused] == [uri]
    assert result.failed[0]["error"] == refused[0]["error"]
    assert "ImageType VOLUME" in refused[0]["error"] and "never read as tissue" in refused[0]["error"]
    assert "VOLUME files" in refused[0]["error"]  # the fix


# -- DICOM-WSI: level files cut short or short of frames


def _rewrite_frames(path: Path, keep: int | None = None, offset_table: bool = True) -> None:
    """Rewrite a TILED_FULL level file with its first ``keep`` frames only (NumberOfFrames too:
    a well-formed file whose tile grid has holes), or without its basic offset table (as files
    over 4 GiB, which cannot have one, are written)."""
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(path)
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))[:keep]
    ds.NumberOfFrames = len(frames)
    ds.PixelData = encapsulate(frames, has_bot=offset_table)
    ds["PixelData"].VR = "OB"
    ds.save_as(path)


@pytest.fixture(scope="module")
def broken_series(tmp_path_factory: pytest.TempPathFactory, picture: np.ndarray) -> Path:
    """3-level JPEG series whose level 0 is: cut inside its frames (with and without an offset
    table), cut inside its header (the reader then sees a 2-level slide), cut within the file
    meta, short of 2 frames of its grid."""
    root = tmp_path_factory.mktemp("broken")
    for name, at in (("frames", 0.7), ("no-table", 0.7), ("header", 1500), ("meta", 140), ("missing", None)):
        paths = write_dicom_wsi(picture, root / name, levels=3)
        if name == "no-table":
            _rewrite_frames(paths[0], offset_table=False)
        data = paths[0].read_bytes()
        if at is None:
            _rewrite_frames(paths[0], keep=10)  # of 4 x 3
        else:
            paths[0].write_bytes(data[: int(len(data) * at) if isinstance(at, float) else at])
    return root


@pytest.mark.parametrize(("name", "words"), [
    ("frames", "truncated: level file level0.dcm"),
    ("no-table", "truncated: level file level0.dcm"),
    ("header", "truncated: DICOM file level0.dcm (1500 bytes) ends within its header"),
    ("meta", "truncated: DICOM file level0.dcm (140 bytes) ends within its header"),
    ("missing", "level file level0.dcm holds 10 frames, but the TILED_FULL tile grid needs 12: frames are missing"),
])
@pytest.mark.parametrize("target", ["", "level1.dcm"])  # the folder (wsidicom) or a file (OpenSlide)
def test_a_series_cut_short_is_refused_at_open_in_validate_as_in_run(
        tmp_path: Path, broken_series: Path, mean_model: Path, name: str, words: str, target: str) -> None:
    """validate passed a level file cut short or short of frames and the run quarantined it at
    the read that reached the gap (through OpenSlide, and through wsidicom); one cut within its
    header was left out, and the series read as a 2-level slide without its level 0."""
    uri = str(broken_series / name / target) if target else str(broken_series / name)
    refused, result = validate_and_run(tmp_path, [uri], mean_model)
    assert [f["input"] for f in refused] == [f["input"] for f in result.failed] == [uri]
    assert refused[0]["error"] == result.failed[0]["error"]
    assert words in refused[0]["error"] and "copy the series again" in refused[0]["error"]


def test_a_series_cut_short_in_object_storage_is_refused_at_open(tmp_path: Path, s3: S3Stack,
                                                                broken_series: Path) -> None:
    from gpubatch.core.clocks import StageClocks
    from gpubatch.core.errors import InputError
    from gpubatch.sources.slides.open import open_slide_input

    for name in ("frames", "no-table"):
        uri = s3.upload_folder(broken_series / name, f"cut/{name}")
        with pytest.raises(InputError) as err:
            open_slide_input(uri, StageClocks(), options=s3.options())
        assert "truncated: level file level0.dcm" in err.value.message


@pytest.mark.parametrize("left_out", [None, 1])
def test_a_concatenated_level_reads_and_one_missing_instance_is_named(
        tmp_path: Path, picture: np.ndarray, mean_model: Path, left_out: int | None) -> None:
    """A level split over the instances of a concatenation (frames of one TILED_FULL grid in
    several files) reads whole; with one of its instances missing, the grid is short of frames:
    refused at open by name, where wsidicom's own read of the gap would fail mid-run."""
    from pathology_files import split_into_concatenation

    paths = write_dicom_wsi(picture, tmp_path / "case", levels=2)
    parts = split_into_concatenation(paths[0], 3)
    if left_out is not None:
        parts[left_out].unlink()
    refused, result = validate_and_run(tmp_path, [str(tmp_path / "case")], mean_model)
    if left_out is None:
        assert refused == result.failed == []
        assert_reads_picture(result, picture)
    else:
        assert [f["error"] for f in refused] == [f["error"] for f in result.failed]
        assert ("level files level0-part0.dcm, level0-part2.dcm (one concatenation) hold 8 frames, but the "
                "TILED_FULL tile grid needs 12: frames are missing") in refused[0]["error"]


@pytest.mark.parametrize("offset_table", [True, False])
def test_a_level_file_with_padding_after_its_frames_still_reads(tmp_path: Path, picture: np.ndarray,
                                                               mean_model: Path, offset_table: bool) -> None:
    """Data Set Trailing Padding (FFFC,FFFC) after the pixel data is allowed: the file does not
    end with the pixel data's delimiter, and its frames are followed to it instead (all there)."""
    paths = write_dicom_wsi(picture, tmp_path / "case", levels=2)
    if not offset_table:
        _rewrite_frames(paths[0], offset_table=False)
    padding = b"\xfc\xff\xfc\xff" + b"OB\x00\x00" + (16).to_bytes(4, "little") + bytes(16)
    paths[0].write_bytes(paths[0].read_bytes() + padding)
    refused, result = validate_and_run(tmp_path, [str(tmp_path / "case")], mean_model)
    assert refused == result.failed == []
    assert_reads_picture(result, picture)


# -- DICOM-WSI: a series without pixel spacing


@pytest.mark.parametrize(("tiles", "refusal"), [
    ({"level": 0, "mpp": None}, None),
    ({"level": None, "mpp": 0.5, "mpp_fallback": 0.25}, None),  # level 0 taken as 0.25 um/px: read at level 1
    ({"level": None, "mpp": 0.5}, "records no microns-per-pixel (MPP), so tiles.mpp cannot be honoured; "
                                  "set tiles.mpp_fallback"),
])
def test_a_folder_without_pixel_spacing_follows_the_mpp_rules(tmp_path: Path, picture: np.ndarray, mean_model: Path,
                                                              tiles: dict[str, Any], refusal: str | None) -> None:
    """wsidicom opens no pyramid without pixel spacing, and said only 'wsidicom cannot open the
    DICOM-WSI series: ' (its error has no words), whatever tiles.level or tiles.mpp_fallback
    said. A local folder is now read by OpenSlide, as a slide without MPP."""
    folder = tmp_path / "case"
    write_dicom_wsi(picture, folder, levels=2, pixel_spacing_mm=None)
    refused, result = validate_and_run(tmp_path, [str(folder)], mean_model, tiles=tiles)
    if refusal is None:
        assert refused == result.failed == []
        df = result.predictions()
        assert set(df["level"]) == {0 if tiles["level"] == 0 else 1}
        assert_reads_picture(result, picture, extent=TILE if tiles["level"] == 0 else 2 * TILE)
    else:
        assert [f["error"] for f in refused] == [f["error"] for f in result.failed]
        assert refusal in refused[0]["error"]


def test_a_remote_series_without_pixel_spacing_is_refused_with_the_fix(tmp_path: Path, s3: S3Stack,
                                                                         picture: np.ndarray) -> None:
    from gpubatch.core.clocks import StageClocks
    from gpubatch.core.errors import InputError
    from gpubatch.sources.slides.open import open_slide_input

    write_dicom_wsi(picture[:300, :300], tmp_path / "case", levels=1, pixel_spacing_mm=None)
    uri = s3.upload_folder(tmp_path / "case", "no-spacing/case")
    with pytest.raises(InputError) as err:
        open_slide_input(uri, StageClocks(), options=s3.options())
    assert "record no pixel spacing (PixelSpacing" in err.value.message
    assert "add PixelSpacing to the files, or copy the series to a local disk" in err.value.message


# -- OME-Zarr: gray images, levels reduced unlike across and down


@pytest.mark.parametrize(("axes", "version", "writer"), [("cyx", "0.5", "zarr"), ("yx", "0.4", "zarr"),
                                                          ("tczyx", "0.4", "ome-zarr"), ("yxc", "0.5", "zarr")])
def test_a_gray_ome_zarr_is_read_as_gray(tmp_path: Path, picture: np.ndarray, mean_model: Path,
                                         axes: str, version: str, writer: str) -> None:
    """One channel (or no c axis) was refused ('the c axis has 1 channels; RGB (3) or RGBA (4)
    expected', 'axes lack c'), where gray TIFF and DICOM slides are read: RGB with the gray in
    every channel, the tissue found by its darkness."""
    gray = picture[..., :1]
    uri = write_ome_zarr(gray, tmp_path / "gray.ome.zarr", levels=3, axes=axes, version=version, writer=writer)
    refused, result = validate_and_run(tmp_path, [uri], mean_model,
                                       tiles={"tissue": {"method": "otsu", "min_fraction": 0.5}})
    assert refused == result.failed == [] and result.exit_code == EXIT_OK
    df = result.predictions()
    assert 0 < len(df) < 6 * 8  # the glass is left out: the tissue was found
    np.testing.assert_array_equal(df["mean_0"], df["mean_1"])
    np.testing.assert_array_equal(df["mean_0"], df["mean_2"])
    assert_reads_picture(result, np.repeat(gray, 3, axis=-1), tolerance=1e-5)  # float32 means: lossless


def test_a_level_reduced_across_only_is_not_read(tmp_path: Path, picture: np.ndarray, mean_model: Path) -> None:
    """NGFF allows a scale per axis: a level halved across but not down was read as if halved
    both ways (its mean downsample, 1.5): tiles at tiles.mpp 0.75 came from it squashed, at the
    wrong level-0 places. It is now left out and the tiles come from level 0."""
    import zarr
    from pathology_files import ngff_axes

    root = zarr.open_group(str(tmp_path / "aniso.ome.zarr"), mode="w", zarr_format=3)
    datasets = []
    for n, (level, scale) in enumerate([(picture, [1.0, 0.5, 0.5]), (picture[:, ::2], [1.0, 0.5, 1.0])]):
        array = root.create_array(str(n), shape=(3, *level.shape[:2]), dtype="u1", chunks=(3, 256, 256))
        array[...] = np.moveaxis(level, -1, 0)
        datasets.append({"path": str(n), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": ngff_axes("cyx"), "datasets": datasets}]}
    refused, result = validate_and_run(tmp_path, [str(tmp_path / "aniso.ome.zarr")], mean_model,
                                       tiles={"size": 64, "level": None, "mpp": 0.75})
    assert refused == result.failed == []
    df = result.predictions()
    assert set(df["level"]) == {0}
    assert_reads_picture(result, picture, tolerance=1.5 / 255, extent=96)


# -- object storage: what validate says of images read in place


def test_validate_names_the_remote_images_a_run_quarantines(tmp_path: Path, s3: S3Stack, picture: np.ndarray,
                                                            mean_model: Path) -> None:
    """An OME-Zarr image or a DICOM folder in object storage is read where it lies, never
    downloaded; validate (input.access auto) took any failure to open one for a slide a run
    would download instead ('1 slide(s) not opened: a run downloads them whole first'), and a
    DICOM folder named by its UID (no suffix) was not even opened: the run quarantined both."""
    import shutil

    write_ome_zarr(picture[:256, :256], tmp_path / "image.ome.zarr", levels=2)
    shutil.rmtree(tmp_path / "image.ome.zarr" / "1")  # a level the metadata names is gone
    write_ancillary_dicom(picture[:200, :300], tmp_path / "case" / "label.dcm", "LABEL")
    uris = [s3.upload_folder(tmp_path / "image.ome.zarr", "in-place/image.ome.zarr"),
            s3.upload_folder(tmp_path / "case", "in-place/1.2.826.0.1.3680043.2")]
    refused, result = validate_and_run(tmp_path, uris, mean_model, input={"uris": uris, "storage": s3.options()})
    assert [f["input"] for f in refused] == [f["input"] for f in result.failed] == uris
    assert [f["error"] for f in refused] == [f["error"] for f in result.failed]
    assert "level array '1' named in multiscales is missing" in refused[0]["error"]
    assert "ImageType VOLUME" in refused[1]["error"]


def test_a_gray_model_is_told_tiles_are_rgb(tmp_path: Path, picture: np.ndarray) -> None:
    """Gray slides reach the model as RGB, their gray in all three channels: a model taking one
    channel is refused before anything runs. The refusal said to 'match tiles.size /
    windows.length and the layout to the model', none of which can fit it."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, TILE, TILE])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])
    mean = helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)
    model = helper.make_model(helper.make_graph([mean], "gray", [x], [y]), opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, tmp_path / "gray.onnx")
    uri = write_ome_zarr(picture[..., :1], tmp_path / "gray.ome.zarr", levels=1, axes="yx")
    job = slide_job([uri], tmp_path / "gray.onnx", tmp_path / "out", tiles={"size": TILE, "level": 0, "mpp": None})
    with pytest.raises(SpecError) as err:
        validate_job(load_job(str(write_job(tmp_path / "job.yaml", job))))
    assert "tiles are RGB, 3 channels (a gray slide's tiles carry its gray in each), and this model takes 1" \
        in str(err.value)


def test_a_scale_kept_in_a_file_is_not_taken_for_one(tmp_path: Path, picture: np.ndarray) -> None:
    """NGFF 0.4 lets a scale be stored in a binary file ("path") instead of inline: it was
    skipped, the scale taken for 1, and level 0 said to be 1 um/px (a quarter of the
    magnification of a 0.25 um/px scan) with no word of doubt. It is now no MPP: the grid's
    rules ask for tiles.mpp_fallback or tiles.level."""
    import json

    from gpubatch.core.clocks import StageClocks
    from gpubatch.sources.slides.open import open_slide

    uri = write_ome_zarr(picture[:256, :256], tmp_path / "image.ome.zarr", levels=1, version="0.4")
    attrs_file = tmp_path / "image.ome.zarr" / ".zattrs"
    attrs = json.loads(attrs_file.read_text())
    attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"] = [{"type": "scale", "path": "scale.bin"}]
    attrs_file.write_text(json.dumps(attrs))
    backend = open_slide(uri, StageClocks())
    assert backend.info.mpp is None
    backend.close()


# -- OME-Zarr: fluorescence channels, levels listed smallest first, chunks absent


def _set_omero(uri: str, channels: list[dict[str, Any]]) -> None:
    """Give an image written by write_ome_zarr an NGFF ``omero`` block (0.5 under 'ome')."""
    import zarr

    root = zarr.open_group(uri, mode="r+")
    attrs = dict(root.attrs)
    if "ome" in attrs:
        root.attrs["ome"] = {**attrs["ome"], "omero": {"channels": channels}}
    else:
        root.attrs["omero"] = {"channels": channels}


def _channels(labels: list[str], colours: list[str], window: tuple[int, int] = (0, 255)) -> list[dict[str, Any]]:
    return [{"label": label, "color": colour, "active": True,
             "window": {"min": 0, "max": 255, "start": window[0], "end": window[1]}}
            for label, colour in zip(labels, colours, strict=True)]


@pytest.mark.parametrize(("labels", "colours", "version", "said"), [
    (["DAPI", "FITC", "TRITC"], ["0000FF", "00FF00", "FF0000"], "0.5", "omero channel labels 'DAPI', 'FITC', 'TRITC'"),
    (["Channel 0", "Channel 1", "Channel 2"], ["0000FF", "00FF00", "FF0000"], "0.4",
     "omero channels are coloured 0000FF, 00FF00, FF0000"),
    (["Hoechst 33342", "AF488", "Cy5", "alpha"], ["0000FF", "00FF00", "FF00FF", "FFFFFF"], "0.5",
     "labels 'Hoechst 33342', 'AF488', 'Cy5'"),
])
def test_a_fluorescence_ome_zarr_is_refused_by_name(tmp_path: Path, picture: np.ndarray, mean_model: Path,
                                                    labels: list[str], colours: list[str], version: str,
                                                    said: str) -> None:
    """A 3-channel uint8 fluorescence image (or 4 channels, taken for RGBA) has the shape of an RGB
    slide: it was read as one, its DAPI the 'blue' of an H&E model, predictions and exit 0. Its
    omero metadata says what it is: refused by name with the fix, in validate as in run."""
    image = picture if len(labels) == 3 else np.concatenate([picture, picture[..., :1]], axis=-1)
    uri = write_ome_zarr(image, tmp_path / "if.ome.zarr", levels=2, version=version)
    _set_omero(uri, _channels(labels, colours))
    refused, result = validate_and_run(tmp_path, [uri], mean_model)
    assert [f["error"] for f in refused] == [f["error"] for f in result.failed]
    assert len(refused) == 1 and "is a fluorescence image, not brightfield RGB" in refused[0]["error"]
    assert said in refused[0]["error"] and "no spec key picks channels" in refused[0]["error"]


@pytest.mark.parametrize(("labels", "colours", "window", "note"), [
    (["Channel 0", "Channel 1", "Channel 2"], ["FF0000", "00FF00", "0000FF"], (0, 255), None),  # bioformats2raw
    (["R", "G", "B"], ["0000FF", "00FF00", "FF0000"], (0, 255), "labelled R, G, B but coloured 0000FF"),
    (["Red", "Green", "Blue"], ["FF0000", "00FF00", "0000FF"], (3, 60), "display windows (3-60, 3-60, 3-60)"),
])
def test_a_brightfield_ome_zarr_with_omero_metadata_still_reads(tmp_path: Path, picture: np.ndarray, mean_model: Path,
                                                                labels: list[str], colours: list[str],
                                                                window: tuple[int, int], note: str | None) -> None:
    """An RGB scan converted by bioformats2raw (channels coloured red, green, blue in order) reads
    as before; metadata that only raises a doubt reads too, the doubt said in the slide's notes."""
    uri = write_ome_zarr(picture, tmp_path / "he.ome.zarr", levels=2)
    _set_omero(uri, _channels(labels, colours, window))
    refused, result = validate_and_run(tmp_path, [uri], mean_model)
    assert refused == result.failed == [] and result.exit_code == EXIT_OK
    assert_reads_picture(result, picture, tolerance=1e-4)  # float32 means of lossless chunks
    channel_notes = [n for n in result.report["notes"] if "omero" in n or "labelled" in n]
    assert len(channel_notes) == (note is not None)
    assert note is None or note in channel_notes[0]


def test_levels_listed_smallest_first_are_ordered_by_their_scale(tmp_path: Path, picture: np.ndarray,
                                                                 mean_model: Path) -> None:
    """NGFF wants datasets listed finest first; some writers list them coarsest first. The first
    was taken for level 0: the slide 256 x 192 px at 2 um/px, its finest level a 'downsample'
    of 0.25, tiles at tiles.mpp 1.0 read from the wrong places. Levels are now ordered by scale."""
    import zarr

    uri = write_ome_zarr(picture, tmp_path / "reversed.ome.zarr", levels=3, mpp=0.5)
    root = zarr.open_group(uri, mode="r+")
    ome = dict(root.attrs)["ome"]
    ome["multiscales"][0]["datasets"] = ome["multiscales"][0]["datasets"][::-1]
    root.attrs["ome"] = ome
    refused, result = validate_and_run(tmp_path, [uri], mean_model, tiles={"size": 64, "level": None, "mpp": 1.0})
    assert refused == result.failed == []
    from gpubatch.core.clocks import StageClocks
    from gpubatch.sources.slides.open import open_slide

    backend = open_slide(uri, StageClocks())
    assert backend.info.level_dimensions == ((1024, 768), (512, 384), (256, 192))
    assert backend.info.mpp == 0.5 and backend.info.level_downsamples == (1.0, 2.0, 4.0)
    backend.close()
    assert set(result.predictions()["level"]) == {1}
    assert_reads_picture(result, picture, tolerance=1.5 / 255, extent=128)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_chunks_absent_from_a_copy_are_counted_in_the_notes(tmp_path: Path, picture: np.ndarray, mean_model: Path,
                                                            request: pytest.FixtureRequest, where: str) -> None:
    """A chunk missing from the store is read as the fill value (zarr's rule, and zarr-python 3
    writes no chunk that is all fill value), so a partial copy read as black squares without a
    word. The slide still reads, and its notes count the chunks its tiles needed that are absent."""
    uri = write_ome_zarr(picture, tmp_path / "partial.ome.zarr", levels=2, chunk=256)
    level0 = sorted((tmp_path / "partial.ome.zarr" / "0" / "c").rglob("*"))
    chunks = [p for p in level0 if p.is_file()]
    assert len(chunks) == 12  # 4 x 3 chunks of 256 px
    for lost in chunks[:2]:
        lost.unlink()
    uris = [uri]
    sections: dict[str, Any] = {}
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        uris = [s3.upload_folder(tmp_path / "partial.ome.zarr", "partial/partial.ome.zarr")]
        sections["input"] = {"uris": uris, "storage": s3.options()}
    refused, result = validate_and_run(tmp_path, uris, mean_model, **sections)
    assert refused == result.failed == [] and result.exit_code == EXIT_OK
    absent = [n for n in result.report["notes"] if "are absent" in n]
    assert absent == [f"{uris[0]}: 2 of 12 chunks the tiles needed are absent: read as fill value; a partial copy? "
                      "(a writer may also leave out chunks that are all fill value)"]


def _four_channels(picture: np.ndarray) -> np.ndarray:
    """A 4-channel uint8 image: the picture's RGB and a fourth channel that is no alpha (the
    shape of a 4-plex fluorescence image, DAPI, CD3, CD8, PanCK, as bioformats2raw writes it)."""
    return np.concatenate([picture, 255 - picture[..., :1]], axis=-1)


@pytest.mark.parametrize(("version", "gray_channels"), [("0.5", False), ("0.4", False), ("0.5", True)])
def test_four_channels_without_omero_metadata_are_refused_by_name(tmp_path: Path, picture: np.ndarray,
                                                                  mean_model: Path, version: str, gray_channels: bool,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Four uint8 channels and no omero block were read as RGBA: the fourth channel taken for
    alpha and composited onto white, the first three sent to the model as red, green, blue, exit 0.
    Nothing says it is RGBA (no omero block, or one of gray 'Channel N's): refused by name, with
    the count and the fix, in validate, inspect and run alike; the run's other slide proceeds."""
    from gpubatch.cli.main import main

    four = write_ome_zarr(_four_channels(picture), tmp_path / "plex.ome.zarr", levels=2, version=version)
    if gray_channels:
        _set_omero(four, _channels([f"Channel {n}" for n in range(4)], ["FFFFFF"] * 4))
    rgb = write_ome_zarr(picture, tmp_path / "he.ome.zarr", levels=2, version=version)
    refused, result = validate_and_run(tmp_path, [four, rgb], mean_model)
    assert [f["input"] for f in refused] == [f["input"] for f in result.failed] == [four]
    assert [f["error"] for f in refused] == [f["error"] for f in result.failed]
    said = refused[0]["error"]
    assert "has 4 channels" in said and "omero" in said and "labels R, G, B, A" in said, said
    assert set(result.predictions()["slide"]) == {rgb}
    assert main(["inspect", four]) == 1
    err = capsys.readouterr().err
    assert four in err and "has 4 channels" in err and "Traceback" not in err


@pytest.mark.parametrize(("labels", "colours"), [
    (["R", "G", "B", "A"], ["", "", "", ""]),
    (["Channel 0", "Channel 1", "Channel 2", "Channel 3"], ["FF0000", "00FF00", "0000FF", "FFFFFF"]),
])
def test_four_channels_said_to_be_rgba_are_read_as_rgba(tmp_path: Path, picture: np.ndarray, mean_model: Path,
                                                        labels: list[str], colours: list[str]) -> None:
    """Labels R, G, B, A or the red, green, blue colouring of an RGB scan are evidence enough: the
    image reads as RGBA, its opaque alpha leaving the pixels as they are."""
    rgba = np.concatenate([picture, np.full_like(picture[..., :1], 255)], axis=-1)
    uri = write_ome_zarr(rgba, tmp_path / "rgba.ome.zarr", levels=2)
    _set_omero(uri, _channels(labels, colours))
    refused, result = validate_and_run(tmp_path, [uri], mean_model)
    assert refused == result.failed == [] and result.exit_code == EXIT_OK
    assert_reads_picture(result, picture, tolerance=1e-4)
