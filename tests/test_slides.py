"""Tile grids, level choice, decode and tissue on generated slides and a real Aperio SVS."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pytest
from conftest import shared_file, slide_job, write_job

import gpubatch
from gpubatch.cli.demo import write_synthetic_slide
from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputError
from gpubatch.io.ranges import coalesce
from gpubatch.sources.slides.grid import choose_level, make_grid
from gpubatch.sources.slides.open import open_slide
from gpubatch.sources.slides.openslide_backend import OpenSlideBackend
from gpubatch.sources.slides.tiff_backend import TiffBackend
from gpubatch.sources.slides.tissue import otsu_threshold, tissue_mask
from gpubatch.spec import TilesSpec


def _tiles(**kw: object) -> TilesSpec:
    return TilesSpec.model_validate({"tissue": {"method": "none"}, **kw})


def test_level_nearest_to_mpp_and_remainder_only(slide_path: Path) -> None:
    backend = TiffBackend(str(slide_path))
    info = backend.info
    assert info.mpp == pytest.approx(0.25) and info.level_downsamples == (1.0, 2.0, 4.0)
    assert choose_level(info, _tiles(size=64, mpp=0.5), "s") == (1, 2.0)
    assert choose_level(info, _tiles(size=64, mpp=0.6), "s")[0] == 1  # never a coarser level
    assert choose_level(info, _tiles(size=64, mpp=1.0), "s") == (2, 4.0)
    grid = make_grid(info, _tiles(size=64, mpp=0.6), "s")
    assert grid.level == 1 and grid.read_size == round(64 * 2.4 / 2)  # 77 px at level 1 -> 64
    backend.close()


def test_grid_counts_overlap_and_level(slide_path: Path) -> None:
    info = TiffBackend(str(slide_path)).info
    grid = make_grid(info, _tiles(size=64, mpp=0.5), "s")
    assert len(grid) == 16 * 12  # 2048x1536 level 0, tiles span 128 level-0 px
    assert grid.xs.max() + 128 <= 2048 and grid.ys.max() + 128 <= 1536
    half = make_grid(info, _tiles(size=64, mpp=0.5, overlap=0.5), "s")
    assert len(half) == 31 * 23 and half.xs[1] - half.xs[0] == 64
    lvl = make_grid(info, TilesSpec.model_validate({"size": 100, "level": 2, "tissue": {"method": "none"}}), "s")
    assert lvl.level == 2 and lvl.read_size == 100 and len(lvl) == 5 * 3


def test_tifffile_decode_matches_openslide(slide_path: Path) -> None:
    tiff, osl = TiffBackend(str(slide_path)), OpenSlideBackend(str(slide_path))
    rng = np.random.default_rng(0)
    for level in range(3):
        w, h = tiff.info.level_dimensions[level]
        boxes = np.array([[rng.integers(0, w - 90), rng.integers(0, h - 90), 90, 90] for _ in range(5)])
        np.testing.assert_array_equal(tiff.read_boxes(level, boxes, StageClocks()),
                                      osl.read_boxes(level, boxes, StageClocks()))


def test_each_stored_tile_decoded_once_per_read(slide_path: Path) -> None:
    tiff = TiffBackend(str(slide_path))
    clocks = StageClocks()
    boxes = np.array([[x, y, 128, 128] for y in range(0, 1024, 128) for x in range(0, 1024, 128)])
    tiff.read_boxes(0, boxes, clocks)
    assert clocks.counters["decode.tiles"] == 16  # 1024x1024 of 256-px stored tiles
    assert clocks.counters["storage.requests"] <= 4  # adjacent tiles coalesced


def test_shared_edge_tiles_decoded_once_and_released(slide_path: Path) -> None:
    """Blocks of 3x3 boxes at 200 px overlap their neighbours' stored tiles (256 px): with the
    blocks announced, every stored tile is decoded once, and nothing stays cached at the end."""
    tiff = TiffBackend(str(slide_path))
    blocks = [np.array([[bx + x, by + y, 200, 200] for y in (0, 200, 400) for x in (0, 200, 400)])
              for by in (0, 600) for bx in (0, 600, 1200)]
    clocks = StageClocks()
    tiff.expect_reads(0, blocks)
    peak = 0
    for boxes in blocks:
        tiff.read_boxes(0, boxes, clocks)
        peak = max(peak, tiff.cache.bytes)
    assert clocks.counters["decode.tiles"] == 8 * 5  # 256-px stored tiles under 1800x1200 px, once each
    assert clocks.counters["decode.cache_hits"] > 0 and 0 < peak <= 12 * 256 * 256 * 3
    assert tiff.cache.bytes == 0

    unplanned = StageClocks()
    for boxes in blocks:
        tiff.read_boxes(0, boxes, unplanned)
    assert unplanned.counters["decode.tiles"] > 8 * 5 and tiff.cache.bytes == 0
    tiff.close()


def test_coalesce_groups_neighbours_and_keeps_members() -> None:
    ranges = [(100, 10), (0, 50), (60, 10), (10_000, 5)]
    groups = coalesce(ranges, gap=20)
    assert [(s, e, sorted(m)) for s, e, m in groups] == [(0, 70, [1, 2]), (100, 110, [0]), (10_000, 10_005, [3])]
    groups = coalesce(ranges, gap=40)
    assert [(s, e, sorted(m)) for s, e, m in groups] == [(0, 110, [0, 1, 2]), (10_000, 10_005, [3])]
    assert len(coalesce(ranges, gap=100)) == 2
    assert len(coalesce(ranges, gap=100, max_bytes=100)) == 3  # the cap bounds one read's size


def test_real_svs_grid_and_pixels() -> None:
    path = shared_file("slides", "CMU-1-Small-Region.svs")
    backend = open_slide(str(path), StageClocks())
    assert isinstance(backend, TiffBackend)
    assert backend.info.mpp == pytest.approx(0.499) and backend.info.magnification == 20
    grid = make_grid(backend.info, _tiles(size=224, mpp=0.5), str(path))
    assert grid.level == 0 and len(grid) == 9 * 13
    boxes = np.array([[0, 0, 240, 240], [1000, 1200, 240, 240], [1977, 2700, 240, 240]])
    slide = openslide.OpenSlide(str(path))
    for box, tile in zip(boxes, backend.read_boxes(0, boxes, StageClocks()), strict=True):
        ref = np.asarray(slide.read_region((int(box[0]), int(box[1])), 0, (240, 240)).convert("RGB"))
        np.testing.assert_array_equal(tile, ref)
    # Past the slide's edge both backends show white background, as openslide's alpha does.
    edge = np.array([[2100, 2900, 240, 240]])
    np.testing.assert_array_equal(backend.read_boxes(0, edge, StageClocks()),
                                  OpenSlideBackend(str(path)).read_boxes(0, edge, StageClocks()))


def test_otsu_and_tissue_mask() -> None:
    values = np.concatenate([np.full(500, 10), np.full(500, 200)]).astype(np.uint8)
    assert 10 <= otsu_threshold(values) < 200
    glass = np.full((64, 64, 3), 238, np.uint8)
    assert not tissue_mask(glass).any()  # blank glass: no tissue, whatever Otsu says
    stained = glass.copy()
    stained[16:48, 16:48] = (200, 110, 170)
    mask = tissue_mask(stained)
    assert mask[16:48, 16:48].all() and mask.sum() == 32 * 32


def test_missing_mpp_is_a_clear_input_error(tmp_path: Path) -> None:
    path = write_synthetic_slide(tmp_path / "nompp.tif", 512, 512, mpp=None, levels=1)
    backend = TiffBackend(str(path))
    assert backend.info.mpp is None
    with pytest.raises(InputError, match="no microns-per-pixel.*tiles.level"):
        make_grid(backend.info, _tiles(size=64, mpp=0.5), str(path))
    assert len(make_grid(backend.info, TilesSpec(size=64, level=0), str(path))) == 64


def test_coarser_scan_than_requested_is_refused(slide_path: Path) -> None:
    info = TiffBackend(str(slide_path)).info
    with pytest.raises(InputError, match="coarser than the requested"):
        choose_level(info, _tiles(size=64, mpp=0.1), "s")


@pytest.mark.parametrize(("name", "words"), [("unopenable.tiff", "compression"), ("unreadable.svs", "")])
def test_openslide_fixtures_fail_clearly(name: str, words: str) -> None:
    path = shared_file("slides", name)
    with pytest.raises(InputError) as info:
        backend = open_slide(str(path), StageClocks())
        backend.read_boxes(0, np.array([[0, 0, 16, 16]]), StageClocks())
    assert str(path) in str(info.value) and words in str(info.value)


def test_generic_tiff_fixture_levels() -> None:
    path = shared_file("slides", "boxes.tiff")
    backend = open_slide(str(path), StageClocks())
    ref = openslide.OpenSlide(str(path))
    assert backend.info.level_dimensions == tuple(ref.level_dimensions)
    assert backend.info.level_downsamples == pytest.approx(ref.level_downsamples)


def test_directory_and_empty_file_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="directory"):
        open_slide(str(tmp_path), StageClocks())
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="zero-byte"):
        open_slide(str(empty), StageClocks())


def test_a_plan_made_ahead_is_used_only_by_the_job_it_was_made_for(slide_path: Path) -> None:
    """A slide opened ahead of its shard carries its read plan; the shard's reader takes it when
    the tiles section matches (same grid, tissue tiles and blocks as planning there), and plans
    again when it does not (a worker that runs another job's shard next)."""
    from gpubatch.sources.base import Shard
    from gpubatch.sources.slides.source import SlideReader, plan_ahead
    from gpubatch.spec import JobSpec

    def job(size: int) -> JobSpec:
        return JobSpec.model_validate({"model": {"path": "m.onnx"}, "output": {"uri": "o"},
                                       "input": {"uris": [str(slide_path)]},
                                       "tiles": {"size": size, "level": 0, "read_block": 256,
                                                 "tissue": {"method": "otsu"}}})

    shard = Shard("s", str(slide_path), {})
    here = SlideReader(shard, job(64), TiffBackend(str(slide_path)), StageClocks())
    backend, clocks = TiffBackend(str(slide_path)), StageClocks()
    plan_ahead(job(64), backend, str(slide_path), StageClocks())
    taken = SlideReader(shard, job(64), backend, clocks)
    assert clocks.counters["slides.planned_ahead"] == 1 and backend.plan is None
    assert taken.attrs == here.attrs and [u.tolist() for u in taken.units] == [u.tolist() for u in here.units]
    backend, clocks = TiffBackend(str(slide_path)), StageClocks()
    plan_ahead(job(64), backend, str(slide_path), StageClocks())
    other = SlideReader(shard, job(32), backend, clocks)
    assert "slides.planned_ahead" not in clocks.counters and other.attrs["tile_size"] == 32


def gray_blob(size: int = 1024) -> np.ndarray:
    """(size, size) uint8 gray as displayed: light glass (about 225) with a dark "tissue" blob, an
    ellipse centred at (384, 512) of radii 256 x 320 (``over_the_blob`` checks tiles against it)."""
    yy, xx = np.mgrid[0:size, 0:size]
    blob = ((xx - 384) / 256) ** 2 + ((yy - 512) / 320) ** 2 <= 1.0
    noise = np.random.default_rng(0).normal(0, 6, (size, size))
    return np.clip(np.where(blob, 90, 225) + noise, 0, 255).astype(np.uint8)


def gray_pyramid(path: Path, alpha: bool = False, size: int = 1024, white_is_zero: bool = False) -> Path:
    """A tifffile-written two-level grayscale pyramid (SubIFDs) at 0.25 um/px of ``gray_blob``.
    One sample per pixel, JPEG; or (``alpha``) gray plus an opaque alpha sample, deflate; or
    (``white_is_zero``) one sample stored inverted under photometric MINISWHITE, deflate."""
    import tifffile

    gray = gray_blob(size)
    image = np.dstack([gray, np.full_like(gray, 255)]) if alpha else 255 - gray if white_is_zero else gray
    kw: dict = ({"extrasamples": ["unassalpha"], "compression": "zlib", "planarconfig": "contig"} if alpha
                else {"compression": "zlib" if white_is_zero else "jpeg"})
    photometric = "miniswhite" if white_is_zero else "minisblack"
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, subifds=1, tile=(256, 256), photometric=photometric,
                  resolution=(40000, 40000), resolutionunit="CENTIMETER", **kw)
        tif.write(image[::2, ::2], subfiletype=1, tile=(256, 256), photometric=photometric, **kw)
    return path


def tiles_over_the_blob(path: str, model: Path, out: Path) -> None:
    """Run a job with Otsu tissue detection over a ``gray_blob`` slide: tiles come only from over
    the blob, and each is gray in RGB (the same in every channel) and dark."""
    job = slide_job([path], model, out / "out",
                    tiles={"size": 128, "mpp": 0.25, "tissue": {"method": "otsu", "min_fraction": 0.5}})
    result = gpubatch.run(write_job(out / "job.yaml", job), show_progress=False)
    assert result.exit_code == 0, result.report.get("failed")
    df = result.predictions()
    cx, cy = df["x"].to_numpy() + 64, df["y"].to_numpy() + 64
    assert len(df) >= 12  # the blob holds about 16 tiles of 128 px at least half inside it
    assert (((cx - 384) / 256) ** 2 + ((cy - 512) / 320) ** 2 <= 1.2).all()  # over the blob only
    means = df[["mean_0", "mean_1", "mean_2"]].to_numpy()
    assert np.allclose(means, means[:, :1], atol=1e-6) and (means < 0.6).all()  # gray in RGB, dark


@pytest.mark.parametrize("alpha", [False, True])
def test_a_grayscale_slide_yields_rgb_tiles_over_its_tissue(tmp_path: Path, mean_model: Path, alpha: bool) -> None:
    """A grayscale slide read as "no tissue" (the detector looks for stain colour, and gray has
    none) and was read by openslide one level only. tifffile reads it, every tile is RGB with the
    gray in all three channels, and tissue detection finds the dark blob (and nothing else)."""
    path = gray_pyramid(tmp_path / "gray.tif", alpha)
    backend = open_slide(str(path), StageClocks())
    assert backend.info.backend == "tifffile" and len(backend.info.level_dimensions) == 2
    box = backend.read_boxes(1, np.array([[0, 0, 512, 512]]), StageClocks())[0]
    assert box.shape == (512, 512, 3) and (box[..., 0] == box[..., 1]).all() and (box[..., 1] == box[..., 2]).all()
    backend.close()
    assert not tissue_mask(np.full((64, 64, 3), 225, np.uint8), grayscale=True).any()  # blank glass
    tiles_over_the_blob(str(path), mean_model, tmp_path)


def test_a_white_is_zero_gray_tiff_read_by_openslide_is_gray(tmp_path: Path, mean_model: Path) -> None:
    """A tiled gray TIFF stored white-is-zero (MINISWHITE) is left to openslide, which shows it
    as gray (inverted to what it depicts). Its backend said colour, so detection looked for
    stain colour and found none: it is known gray from the TIFF's own tags, and the tiles come
    from over the dark blob only."""
    path = gray_pyramid(tmp_path / "white0.tif", white_is_zero=True)
    backend = open_slide(str(path), StageClocks())
    try:
        assert backend.info.backend == "openslide" and backend.grayscale
        centre = backend.read_boxes(0, np.array([[384 - 8, 512 - 8, 16, 16]]), StageClocks())[0]
        assert centre.mean() < 120  # the blob is dark as displayed: openslide inverted it
    finally:
        backend.close()
    tiles_over_the_blob(str(path), mean_model, tmp_path)


def test_a_monochrome2_dicom_slide_is_read_gray_and_tiled_over_its_tissue(tmp_path: Path, mean_model: Path) -> None:
    """A DICOM-WSI series of one gray sample (MONOCHROME2, which OpenSlide 4 refuses) was
    refused by wsidicom's backend as "not RGB"; it is read, known gray, and tiled over its blob."""
    from pathology_files import write_dicom_wsi

    from gpubatch.sources.slides.open import open_slide_input

    folder = tmp_path / "mono2"
    write_dicom_wsi(np.repeat(gray_blob()[..., None], 3, axis=-1), folder, levels=2, gray="MONOCHROME2")
    backend = open_slide_input(str(folder / "level0.dcm"), StageClocks())
    try:
        assert backend.info.backend == "wsidicom" and backend.grayscale
        assert backend.info.mpp == pytest.approx(0.25)
    finally:
        backend.close()
    tiles_over_the_blob(str(folder), mean_model, tmp_path)


def test_a_monochrome1_dicom_slide_is_refused_saying_why(tmp_path: Path) -> None:
    """MONOCHROME1 (white is 0) is not a photometric interpretation the DICOM-WSI standard allows,
    and wsidicom drops such files unread ("Level files not found"); the refusal says so."""
    from pathology_files import write_dicom_wsi

    from gpubatch.sources.slides.open import open_slide_input

    folder = tmp_path / "mono1"
    write_dicom_wsi(np.repeat(gray_blob(512)[..., None], 3, axis=-1), folder, levels=1, gray="MONOCHROME1")
    for uri in (str(folder), str(folder / "level0.dcm")):
        with pytest.raises(InputError) as err:
            open_slide_input(uri, StageClocks())
        assert err.value.message.startswith("its PhotometricInterpretation is MONOCHROME1 (white is 0)")
        assert "MONOCHROME2" in err.value.message


@pytest.mark.parametrize("access", ["stage", "stream"])
def test_a_remote_grayscale_slide_is_known_gray_staged_or_streamed(tmp_path: Path, access: str) -> None:
    """Tissue detection asks the backend whether the slide is gray: a staged slide's wrapper
    must answer for the backend it wraps (its class default said no)."""
    import fsspec

    from gpubatch.sources.slides.open import open_slide_input

    fsspec.filesystem("memory").pipe(f"/gray-{access}/g.tif", gray_pyramid(tmp_path / "g.tif").read_bytes())
    backend = open_slide_input(f"memory://gray-{access}/g.tif", StageClocks(), access=access, options={})
    try:
        assert backend.grayscale and backend.info.backend == "tifffile"
    finally:
        backend.close()


def test_a_symbolic_link_that_leads_nowhere_is_called_so(tmp_path: Path) -> None:
    """A glob lists a link whose target is gone, or that points at itself; it was 'file not found'."""
    from gpubatch.core.errors import InputError
    from gpubatch.sources.slides.open import open_slide_input

    (tmp_path / "loop.svs").symlink_to(tmp_path / "loop.svs")
    (tmp_path / "gone.svs").symlink_to(tmp_path / "moved-away.svs")
    for name in ("loop.svs", "gone.svs"):
        with pytest.raises(InputError, match="is a symbolic link that leads nowhere"):
            open_slide_input(str(tmp_path / name), StageClocks())
    with pytest.raises(InputError, match="file not found"):
        open_slide_input(str(tmp_path / "never.svs"), StageClocks())


@pytest.mark.parametrize("read", ["boxes", "thumbnail"])
def test_a_tile_that_breaks_the_parser_is_an_input_error_naming_the_file(slide_path: Path, read: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A file whose structure lies about its data fails the same way every time: tifffile's
    IndexError or struct.error while a tile is read becomes an InputError naming the file (the
    shard is quarantined, not retried as a crash), for the tissue thumbnail's read as for boxes."""
    from gpubatch.sources.slides.tissue import read_thumbnail

    def lying(self: TiffBackend, level: int, blobs: list[bytes], indices: list[int]) -> Any:
        raise struct.error("unpack requires a buffer of 8 bytes")

    backend = TiffBackend(str(slide_path))
    monkeypatch.setattr(TiffBackend, "_decoded", lying)
    try:
        with pytest.raises(InputError, match="malformed TIFF data at level") as raised:
            if read == "boxes":
                backend.read_boxes(0, np.array([[0, 0, 64, 64]]), StageClocks())
            else:
                read_thumbnail(backend, StageClocks(), 2048)
        assert str(slide_path) in str(raised.value)
    finally:
        backend.close()


def _specks_and_tissue(path: Path, specks: list[tuple[int, int]]) -> Path:
    """A 4096 px square slide at 0.5 um/px: glass, a stained square over tiles 8-23 of a 128 px
    grid, and single stained tiles at ``specks`` (col, row), which the tissue filter keeps first."""
    image = np.full((4096, 4096, 3), 242, np.uint8)
    stain = np.random.default_rng(0).integers(0, 60, size=(4096, 4096, 3), dtype=np.uint8) + np.array([150, 60, 140], np.uint8)
    image[1024:3072, 1024:3072] = stain[1024:3072, 1024:3072]
    for col, row in specks:
        image[row * 128 : (row + 1) * 128, col * 128 : (col + 1) * 128] = stain[:128, :128]
    return write_synthetic_slide(path, 4096, 4096, mpp=0.5, image=image, levels=3)


@pytest.mark.parametrize("specks", [[(0, 0), (30, 0)], [(30, 0), (0, 1)]], ids=["far-apart", "next-row"])
def test_the_tissue_filter_never_changes_how_tiles_are_grouped_into_reads(tmp_path: Path,
                                                                          specks: list[tuple[int, int]]) -> None:
    """Read blocks were sized from the first two kept tiles' distance, as if they were
    neighbours: two specks 30 tiles apart made every tile of the slide a read of its own (a
    slide's worth of 1-tile reads); a speck on the next row, left of the first, made blocks
    as large as tiles.max_read_bytes allows (36 x 36 tiles here, 150 MB a read)."""
    from gpubatch.sources.slides.source import plan_slide
    from gpubatch.spec import JobSpec

    backend = open_slide(str(_specks_and_tissue(tmp_path / "s.tif", specks)), StageClocks())
    job = JobSpec.model_validate({"input": {"uris": ["s.tif"]}, "model": {"path": "m.onnx"}, "output": {"uri": "o"},
                                  "tiles": {"size": 128, "mpp": 0.5, "read_block": 1024,
                                            "tissue": {"method": "otsu", "min_fraction": 0.5}}})
    plan = plan_slide(backend, job, "s.tif", StageClocks())
    backend.close()
    kept = plan.kept
    assert {(int(c), int(r)) for c, r in zip(kept.cols, kept.rows, strict=True)} >= set(specks)
    per_block = (1024 - 128) // 128 + 1  # 8 tiles of 128 px a side in a 1024 px read
    blocks = {(int(c) // per_block, int(r) // per_block) for c, r in zip(kept.cols, kept.rows, strict=True)}
    assert len(plan.units) == len(blocks)  # one read per block of the grid holding kept tiles
    for members in plan.units:
        assert len({(int(c) // per_block, int(r) // per_block)
                    for c, r in zip(kept.cols[members], kept.rows[members], strict=True)}) == 1
