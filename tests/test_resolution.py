"""Resolution: tiles.level alone, tiles.mpp_fallback, and implausible TIFF resolution tags.

The slides are real TIFFs written by tifffile with the resolution tags under test (72 and 96 per
inch, as image software writes for screens; 20 um/px in centimetre units), read through both the
tifffile backend and openslide.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import slide_job, write_job

import gpubatch
from gpubatch.core.errors import InputError
from gpubatch.sources.slides.grid import make_grid
from gpubatch.sources.slides.openslide_backend import OpenSlideBackend
from gpubatch.sources.slides.tiff_backend import TiffBackend
from gpubatch.spec import TilesSpec, load_job


def tagged_tiff(path: Path, unit: str, resolution: float, size: int = 512) -> Path:
    """A tiled JPEG RGB TIFF whose level-0 resolution tags say ``resolution`` per ``unit``."""
    import tifffile

    rng = np.random.default_rng(0)
    image = rng.integers(100, 200, (size, size, 3), dtype=np.uint8)
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", compression="jpeg",
                     resolution=(resolution, resolution), resolutionunit=unit)
    return path


def _tiles(**kw: Any) -> TilesSpec:
    return TilesSpec.model_validate({"size": 64, "tissue": {"method": "none"}, **kw})


@pytest.mark.parametrize("backend", [TiffBackend, OpenSlideBackend])
@pytest.mark.parametrize(("unit", "res", "tag", "um"), [
    ("INCH", 72, "TIFF XResolution 72 per inch", "352.8"),
    ("INCH", 96, "TIFF XResolution 96 per inch", "264.6"),
    ("CENTIMETER", 500, "TIFF XResolution 500 per centimeter", "20"),
])
def test_implausible_tags_count_as_missing_with_a_note(tmp_path: Path, backend: Any, unit: str, res: float,
                                                      tag: str, um: str) -> None:
    path = str(tagged_tiff(tmp_path / "t.tif", unit, res))
    info = backend(path).info
    assert info.mpp_source == tag and info.mpp == pytest.approx(float(um), rel=1e-3)
    if unit == "INCH":
        why = f"{tag} is a screen resolution written by image software ({um} um/px at level 0), not a scan's"
    else:  # the derived figure would read as a claim about the scan: not shown
        why = f"{tag} is not a scan resolution: outside 0.01-10 um/px at level 0"
    with pytest.raises(InputError) as err:
        make_grid(info, _tiles(mpp=0.5), path)
    assert err.value.message.startswith(f"the file records no microns-per-pixel (MPP) ({why}), so tiles.mpp")
    assert "tiles.mpp_fallback" in err.value.message and "tiles.level" in err.value.message
    grid = make_grid(info, _tiles(mpp=0.5, mpp_fallback=0.25), path)
    assert grid.mpp == 0.25 and grid.downsample == 2.0 and len(grid) == 4 * 4
    assert grid.notes == (why + ", so it counts as missing MPP",
                          "its resolution tag is implausible: level 0 taken as tiles.mpp_fallback = 0.25 um/px")


def test_a_scan_resolution_tag_is_used_as_is(tmp_path: Path) -> None:
    path = str(tagged_tiff(tmp_path / "t.tif", "CENTIMETER", 40000))  # 0.25 um/px
    grid = make_grid(TiffBackend(path).info, _tiles(mpp=0.5, mpp_fallback=1.0), path)
    assert grid.mpp == pytest.approx(0.25) and grid.notes == () and grid.downsample == pytest.approx(2.0)


def test_fallback_for_a_slide_without_mpp(tmp_path: Path) -> None:
    from gpubatch.cli.demo import write_synthetic_slide

    path = str(write_synthetic_slide(tmp_path / "n.tif", 512, 512, mpp=None, levels=1))
    grid = make_grid(TiffBackend(path).info, _tiles(mpp=0.5, mpp_fallback=0.5), path)
    assert grid.downsample == 1.0 and len(grid) == 64
    assert grid.notes == ("it records no microns-per-pixel (MPP): level 0 taken as tiles.mpp_fallback = 0.5 um/px",)


def test_tiles_level_alone_clears_the_default_mpp(tmp_path: Path, slide_path: Path, classifier: Path) -> None:
    job = slide_job([str(slide_path)], classifier, tmp_path / "out")  # tiles.mpp: 0.5 in the file
    spec = write_job(tmp_path / "job.yaml", job)
    assert load_job(spec, ["tiles.level=1"]).tiles.model_dump(include={"mpp", "level"}) == {"mpp": None, "level": 1}
    assert load_job(spec, ["tiles.mpp=1.0"]).tiles.mpp == 1.0
    del job["tiles"]["mpp"]
    job["tiles"]["level"] = 2
    assert load_job(write_job(tmp_path / "level.yaml", job)).tiles.mpp is None
    # the Python API: a JobSpec carries the default mpp in its dump, and the override still works
    base = load_job(spec)
    result = gpubatch.run(base, tiles__level=1, show_progress=False)
    assert result.exit_code == 0 and set(result.predictions()["level"]) == {1}


def test_run_with_a_72_dpi_slide(tmp_path: Path, classifier: Path) -> None:
    path = tagged_tiff(tmp_path / "screen.tif", "INCH", 72)
    spec = write_job(tmp_path / "job.yaml", slide_job([str(path)], classifier, tmp_path / "out"))
    refused = gpubatch.run(spec, show_progress=False)
    assert refused.exit_code == 1  # the only input failed
    assert "TIFF XResolution 72 per inch is a screen resolution" in refused.report["failed"][0]["error"]
    result = gpubatch.run(spec, tiles__mpp_fallback=0.25, show_progress=False)
    assert result.exit_code == 0 and result.report["items"] == 16
    notes = result.report["notes"]
    assert notes[0].startswith(f"{path}: TIFF XResolution 72 per inch is a screen resolution written by "
                               "image software (352.8 um/px at level 0)")
    from gpubatch.report.text import format_summary

    assert "note: " + notes[0] in format_summary(result.report)


def zero_denominator(path: Path, tag_name: str) -> Path:
    """Overwrite the denominator of ``tag_name`` (a RATIONAL) in place with 0: what tifffile
    refuses to write, and a hostile or broken writer leaves behind."""
    import struct

    import tifffile

    with tifffile.TiffFile(path) as tif:
        tag, order = tif.pages[0].tags[tag_name], tif.byteorder
        offset = tag.valueoffset
    with open(path, "r+b") as f:
        f.seek(offset + 4)
        f.write(struct.pack(order + "I", 0))
    return path


@pytest.mark.parametrize("tag_name", ["XResolution", "YResolution"])
def test_a_zero_denominator_resolution_counts_as_missing(tmp_path: Path, tag_name: str) -> None:
    """n/0 is no resolution: tifffile reads it as n/1 (0.25 um/px here, a confident wrong
    answer). It is missing MPP, handled as any missing MPP, the file and the tag named."""
    path = str(zero_denominator(tagged_tiff(tmp_path / "z.tif", "CENTIMETER", 40000), tag_name))
    info = TiffBackend(path).info
    assert info.mpp is None and info.mpp_source == ""
    tag = f"TIFF {tag_name} 40000/0 per centimeter"
    why = f"{tag} has a zero denominator: no resolution"
    with pytest.raises(InputError) as err:
        make_grid(info, _tiles(mpp=0.5), path)
    assert err.value.input_uri == path
    assert err.value.message.startswith(f"the file records no microns-per-pixel (MPP) ({why}), so tiles.mpp")
    assert "tiles.mpp_fallback" in err.value.message and "tiles.level" in err.value.message
    grid = make_grid(info, _tiles(mpp=0.5, mpp_fallback=0.25), path)
    assert grid.mpp == 0.25 and len(grid) == 4 * 4
    assert grid.notes == (why + ", so it counts as missing MPP",
                          "its resolution tag is implausible: level 0 taken as tiles.mpp_fallback = 0.25 um/px")
    assert len(make_grid(info, _tiles(level=0), path)) == 8 * 8


def anisotropic_tiff(path: Path, x_per_cm: float, y_per_cm: float, ome: bool = False) -> Path:
    """A tiled JPEG RGB TIFF whose pixels are x_per_cm across and y_per_cm down: in the TIFF
    resolution tags, or (``ome``) in OME PhysicalSizeX/Y (um)."""
    import tifffile

    image = np.random.default_rng(0).integers(100, 200, (512, 512, 3), dtype=np.uint8)
    kw: Any = {"tile": (256, 256), "photometric": "rgb", "compression": "jpeg"}
    if ome:
        kw["metadata"] = {"axes": "YXS", "PhysicalSizeX": 1e4 / x_per_cm, "PhysicalSizeXUnit": "µm",
                          "PhysicalSizeY": 1e4 / y_per_cm, "PhysicalSizeYUnit": "µm"}
    else:
        kw.update(resolution=(x_per_cm, y_per_cm), resolutionunit="CENTIMETER")
    tifffile.imwrite(path, image, ome=ome, **kw)
    return path


@pytest.mark.parametrize(("backend", "ome"), [(TiffBackend, False), (OpenSlideBackend, False), (TiffBackend, True)])
def test_pixels_that_are_not_square_are_refused_unless_tiles_level(tmp_path: Path, backend: Any, ome: bool) -> None:
    """0.25 um/px across, 0.5 down: tiles at tiles.mpp would be squashed two to one; no single
    mpp is right, so only tiles.level (the file's own pixels, said in a note) tiles it."""
    path = str(anisotropic_tiff(tmp_path / ("a.ome.tif" if ome else "a.tif"), 40000, 20000, ome=ome))
    info = backend(path).info
    assert (info.mpp, info.mpp_y) == pytest.approx((0.25, 0.5))
    for tiles in (_tiles(mpp=0.5), _tiles(mpp=0.5, mpp_fallback=0.25)):
        with pytest.raises(InputError) as err:
            make_grid(info, tiles, path)
        assert err.value.input_uri == path
        assert err.value.message.startswith(f"the pixels are not square: 0.25 um/px across ({info.mpp_source}) "
                                            "but 0.5 um/px down")
        assert "set tiles.level" in err.value.message
    grid = make_grid(info, _tiles(level=0), path)
    assert len(grid) == 8 * 8 and grid.notes[0].startswith("the pixels are not square: 0.25 um/px across")


def test_pixels_square_to_within_a_percent_are_square(tmp_path: Path) -> None:
    path = str(anisotropic_tiff(tmp_path / "r.tif", 40000, 40200))  # 0.25 and 0.2488 um/px: rounding
    grid = make_grid(TiffBackend(path).info, _tiles(mpp=0.5), path)
    assert grid.mpp == pytest.approx(0.25) and grid.notes == () and len(grid) == 4 * 4


def test_run_quarantines_a_slide_with_pixels_that_are_not_square(tmp_path: Path, classifier: Path) -> None:
    path = anisotropic_tiff(tmp_path / "aniso.tif", 40000, 20000)
    spec = write_job(tmp_path / "job.yaml", slide_job([str(path)], classifier, tmp_path / "out"))
    refused = gpubatch.run(spec, show_progress=False)
    assert refused.exit_code == 1
    assert "the pixels are not square: 0.25 um/px across" in refused.report["failed"][0]["error"]
    assert gpubatch.run(spec, tiles__level=0, show_progress=False).report["items"] == 64


def _ome_zarr(path: Path, across: float, down: float, axes: str, writer: str) -> str:
    """A 512 x 512 two-level OME-Zarr of random RGB at ``across`` x ``down`` um/px, written by
    hand (NGFF 0.5) or by the ome-zarr package (NGFF 0.4), with its axes in the order given."""
    from pathology_files import write_ome_zarr

    image = np.random.default_rng(0).integers(100, 200, (512, 512, 3), dtype=np.uint8)
    version = "0.5" if writer == "zarr" else "0.4"
    return write_ome_zarr(image, path, levels=2, mpp=across, mpp_y=down, axes=axes, version=version,
                          writer=writer)


@pytest.mark.parametrize(("axes", "writer"), [("cyx", "zarr"), ("yxc", "zarr"), ("tczyx", "ome-zarr")])
def test_ome_zarr_reads_pixels_across_and_down_and_refuses_them_unsquare(tmp_path: Path, axes: str,
                                                                      writer: str) -> None:
    """OME-Zarr read the x scale alone, so pixels 0.25 um across and 0.5 down were taken as
    square and tiled squashed two to one. Both scales are read (each at its axis in ``axes``);
    square pixels tile at tiles.mpp, pixels that are not are refused there as in the TIFF
    formats, and tiled under tiles.level with a note."""
    from gpubatch.sources.slides.omezarr import OmeZarrBackend

    square = OmeZarrBackend(_ome_zarr(tmp_path / "square.zarr", 0.25, 0.25, axes, writer)).info
    assert (square.mpp, square.mpp_y) == pytest.approx((0.25, 0.25))
    grid = make_grid(square, _tiles(mpp=0.5), "square.zarr")
    assert grid.notes == () and len(grid) == 4 * 4
    path = _ome_zarr(tmp_path / "skewed.zarr", 0.25, 0.5, axes, writer)
    info = OmeZarrBackend(path).info
    assert (info.mpp, info.mpp_y) == pytest.approx((0.25, 0.5))
    with pytest.raises(InputError) as err:
        make_grid(info, _tiles(mpp=0.5), path)
    assert err.value.message.startswith("the pixels are not square: 0.25 um/px across (NGFF "
                                        "coordinateTransformations scale) but 0.5 um/px down")
    assert "set tiles.level" in err.value.message
    grid = make_grid(info, _tiles(level=0), path)
    assert len(grid) == 8 * 8 and grid.notes[0].startswith("the pixels are not square: 0.25 um/px across")


def test_run_quarantines_an_ome_zarr_whose_pixels_are_not_square(tmp_path: Path, classifier: Path) -> None:
    path = _ome_zarr(tmp_path / "skewed.zarr", 0.25, 0.5, "cyx", "zarr")
    spec = write_job(tmp_path / "job.yaml", slide_job([path], classifier, tmp_path / "out"))
    refused = gpubatch.run(spec, show_progress=False)
    assert refused.exit_code == 1
    assert "the pixels are not square: 0.25 um/px across" in refused.report["failed"][0]["error"]
    assert gpubatch.run(spec, tiles__level=0, show_progress=False).report["items"] == 64


def ome_sized_tiff(path: Path, size: str | float, unit: str) -> Path:
    """A 512 px OME-TIFF pyramid (one SubIFD level) whose OME-XML says PhysicalSizeX and Y are
    ``size`` (written as given) in ``unit``, and whose TIFF resolution tags say 1 um/px."""
    import tifffile

    image = np.random.default_rng(0).integers(100, 200, (512, 512, 3), dtype=np.uint8)
    kw: Any = {"tile": (256, 256), "photometric": "rgb", "compression": "jpeg", "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(image, subifds=1, resolution=(1e4, 1e4), **kw,
                  metadata={"axes": "YXS", "PhysicalSizeX": size, "PhysicalSizeXUnit": unit,
                            "PhysicalSizeY": size, "PhysicalSizeYUnit": unit})
        tif.write(image[::2, ::2], subfiletype=1, resolution=(5e3, 5e3), **kw)
    return path


@pytest.mark.parametrize(("size", "unit"), [(0.25, "μm"), (250, "nm"), (0.00025, "mm"), (2500, "Å")])
def test_ome_sizes_in_any_length_unit_are_read_as_microns(tmp_path: Path, size: float, unit: str) -> None:
    """Only the micro sign's 'µm' was read: 'μm' (Greek mu, which writers use as often) and
    other length units made the slide one that 'records no microns-per-pixel'."""
    path = str(ome_sized_tiff(tmp_path / "s.ome.tif", size, unit))
    info = TiffBackend(path).info
    assert (info.mpp, info.mpp_y) == pytest.approx((0.25, 0.25)) and info.mpp_source == "OME PhysicalSizeX"
    assert make_grid(info, _tiles(mpp=0.5), path).downsample == pytest.approx(2.0)


def test_an_ome_size_that_is_no_number_is_missing_mpp_not_another_reader(tmp_path: Path) -> None:
    """PhysicalSizeX="1.2.3" raised ValueError inside the tifffile backend, and the slide went
    to openslide: read as a generic TIFF, its SubIFD level lost, at its TIFF tags' 1 um/px,
    'done' without a word. It is missing MPP, named, like a resolution tag that is no number."""
    from gpubatch.core.clocks import StageClocks
    from gpubatch.sources.slides.open import open_slide

    path = str(ome_sized_tiff(tmp_path / "s.ome.tif", "1.2.3", "µm"))
    backend = open_slide(path, StageClocks())
    assert backend.info.backend == "tifffile" and len(backend.info.level_dimensions) == 2
    assert backend.info.mpp is None
    with pytest.raises(InputError) as err:
        make_grid(backend.info, _tiles(mpp=0.5), path)
    assert err.value.message.startswith("the file records no microns-per-pixel (MPP) "
                                        "(OME PhysicalSizeX '1.2.3' is not a number: no resolution)")
    grid = make_grid(backend.info, _tiles(mpp=0.5, mpp_fallback=0.25), path)
    assert grid.notes[0] == "OME PhysicalSizeX '1.2.3' is not a number: no resolution, so it counts as missing MPP"
    backend.close()


def philips_tiff(path: Path) -> Path:
    """A 3-level Philips TIFF as Philips IntelliSite writes its structure: software 'Philips DP',
    the DPUfsImport XML in level 0's description holding one PixelDataRepresentation per level
    with its DICOM_PIXEL_SPACING (mm, down then across, each quoted), no resolution tags. Level
    0's pixels are 0.25 um down and 0.2501 across (square to within 1%); the others double them."""
    import tifffile

    image = np.random.default_rng(0).integers(100, 200, (512, 512, 3), dtype=np.uint8)
    reps = "".join(
        '<DataObject ObjectType="PixelDataRepresentation"><Attribute Name="DICOM_PIXEL_SPACING" Group="0x0028" '
        f'Element="0x0030" PMSVR="IDoubleArray">&quot;{0.00025 * 2**i:g}&quot; &quot;{0.0002501 * 2**i:g}&quot;'
        "</Attribute></DataObject>" for i in range(3))
    xml = ('<?xml version="1.0" encoding="UTF-8" ?><DataObject ObjectType="DPUfsImport"><Attribute '
           'Name="PIM_DP_SCANNED_IMAGES" PMSVR="IDataObjectArray"><Array><DataObject ObjectType="DPScannedImage">'
           '<Attribute Name="PIM_DP_IMAGE_TYPE" PMSVR="IString">WSI</Attribute><Attribute '
           'Name="PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE" PMSVR="IDataObjectArray"><Array>'
           f"{reps}</Array></Attribute></DataObject></Array></Attribute></DataObject>")
    with tifffile.TiffWriter(path) as tif:
        for i in range(3):
            tif.write(image[:: 2**i, :: 2**i], tile=(256, 256), compression="jpeg", photometric="rgb",
                      software="Philips DP v1.0", description=xml if i == 0 else f"level={i}", metadata=None,
                      subfiletype=1 if i else 0)
    return path


def test_a_philips_tiff_is_read_at_its_dicom_pixel_spacing(tmp_path: Path) -> None:
    """Philips TIFFs record their scale only as DICOM_PIXEL_SPACING in their XML, which was not
    read: every Philips slide 'recorded no microns-per-pixel' and was quarantined."""
    path = str(philips_tiff(tmp_path / "p.tiff"))
    backend = TiffBackend(path)
    info = backend.info
    assert info.vendor == "philips" and info.mpp_source == "Philips DICOM_PIXEL_SPACING"
    assert (info.mpp, info.mpp_y) == pytest.approx((0.2501, 0.25)) and len(info.level_dimensions) == 3
    assert make_grid(info, _tiles(mpp=0.5), path).level == 1
    backend.close()
