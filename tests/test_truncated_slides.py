"""TIFF slides cut short (an interrupted copy, upload or download) or with a broken IFD chain:
refused at open, by name, in ``validate`` as in ``run``, never read as a smaller valid slide.

The files are real tifffile-written pyramids (generic TIFF and OME-TIFF) with their tails cut
off at the places that matter: inside a stored tile, just before a pyramid level's IFD, and
inside the OME-XML that an OME-TIFF writes last.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tifffile
from conftest import cli, slide_job, write_job
from pathology_files import synthetic_slide, write_ome_tiff

from gpubatch.cli.demo import write_synthetic_slide
from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputError
from gpubatch.sources.slides.open import open_slide


def cut_short(src: Path, dst: Path, at: int) -> Path:
    """The first ``at`` bytes of ``src``: a file whose copy stopped there."""
    dst.write_bytes(src.read_bytes()[:at])
    return dst


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 3-level generic JPEG TIFF (levels in top-level IFDs) and a 3-level OME-TIFF (SubIFDs)."""
    folder = tmp_path_factory.mktemp("originals")
    return {"tiff": write_synthetic_slide(folder / "good.tif", 1024, 768, seed=1),
            "ome": write_ome_tiff(synthetic_slide(1024, 768, seed=2), folder / "good.ome.tif", mpp=0.25)}


def _cut_point(path: Path, where: str) -> int:
    """The byte at which a copy of ``path`` stops, for each way of cutting it short."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        if where == "in a tile":
            middle = len(page.dataoffsets) // 2
            return int(page.dataoffsets[middle]) + int(page.databytecounts[middle]) // 2
        if where == "before a level's IFD":
            return int(tif.pages[1].offset)
        return int(page.tags["ImageDescription"].valueoffset) + 100  # in the OME-XML, written last


CASES = {  # (original, where) -> what the refusal says
    "tiff, in a tile": ("tiff", "in a tile", "truncated: the stored tiles of level 0 run to byte"),
    "tiff, before level 1's IFD": ("tiff", "before a level's IFD", "truncated or damaged TIFF structure: invalid page offset"),
    "ome-tiff, in the OME-XML": ("ome", "in the OME-XML", "truncated or damaged TIFF structure: "),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_tiff_cut_short_is_refused_at_open(tmp_path: Path, originals: dict[str, Path], case: str) -> None:
    """Cut before a level's IFD, the slide read as one level fewer; cut in its OME-XML, an
    OME-TIFF read as a generic TIFF: both 'done', silently. Cut in a tile, it opened and was
    refused only when a read reached that tile (validate passed it; a tissue filter that skips
    the tile passed it too)."""
    kind, where, fragment = CASES[case]
    bad = cut_short(originals[kind], tmp_path / f"cut{originals[kind].name[4:]}", _cut_point(originals[kind], where))
    with pytest.raises(InputError) as err:
        open_slide(str(bad), StageClocks())
    assert str(err.value).startswith(f"{bad}: {fragment}")
    open_slide(str(originals[kind]), StageClocks()).close()  # the whole file opens


def test_validate_names_cut_files_and_run_quarantines_them(tmp_path: Path, originals: dict[str, Path],
                                                           mean_model: Path) -> None:
    """The run quarantined the file cut in a tile (exit 3), but validate had said nothing; the
    one cut before an IFD was 'done' by both. Now validate names both, and a job of cut files
    alone is refused before it runs (exit 2)."""
    cuts = [cut_short(originals["tiff"], tmp_path / f"cut{n}.tif", _cut_point(originals["tiff"], where))
            for n, where in enumerate(["in a tile", "before a level's IFD"])]
    job = write_job(tmp_path / "job.yaml", slide_job([str(originals["tiff"]), *map(str, cuts)], mean_model,
                                                     tmp_path / "out"))
    checked = cli("validate", str(job)).communicate()[0]
    for cut in cuts:
        assert f"warning: {cut} would be quarantined: truncated" in checked
    ran = cli("run", str(job))
    assert ran.wait() == 3
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sorted(f["input"] for f in report["failed"]) == sorted(map(str, cuts))
    assert [s["input"] for s in report["shards"]] == [str(originals["tiff"])]
    alone = write_job(tmp_path / "alone.yaml", slide_job(list(map(str, cuts)), mean_model, tmp_path / "out2"))
    assert cli("validate", str(alone)).wait() == 2


@pytest.mark.parametrize("where", ["in a tile", "before a level's IFD"])
def test_a_streamed_tiff_cut_short_is_refused_at_open(tmp_path: Path, originals: dict[str, Path], where: str) -> None:
    """Read by byte range over HTTP, the file's end is the object's size: the same refusal."""
    from http_servers import FileServer

    from gpubatch.sources.slides.open import open_slide_input

    data = originals["tiff"].read_bytes()[: _cut_point(originals["tiff"], where)]
    server = FileServer({"/cut.tif": data}, etag='"v1"')
    try:
        with pytest.raises(InputError, match="truncated"):
            open_slide_input(f"{server.url}/cut.tif", StageClocks(), access="stream")
    finally:
        server.close()


@pytest.mark.parametrize(("damage", "fragment"), [("cut in a tile", "truncated"), ("malformed IFD", "malformed IFD")])
def test_a_remote_tiff_cut_short_is_not_downloaded_to_be_refused_again(
        tmp_path: Path, originals: dict[str, Path], mean_model: Path, damage: str, fragment: str) -> None:
    """input.access auto fell back to staging a slide whose streamed open was refused as cut
    short (or its IFD malformed): a whole download to be refused the same way. And validate,
    which opens nothing a run would download, counted it 'not opened' instead of naming it."""
    from hostile_inputs import shorten_tile_offsets
    from http_servers import FileServer

    from gpubatch.sources.slides.open import open_slide_input

    if damage == "malformed IFD":
        data = shorten_tile_offsets(originals["tiff"], tmp_path / "ifd.tif").read_bytes()
    else:
        data = originals["tiff"].read_bytes()[: _cut_point(originals["tiff"], "in a tile")]
    server = FileServer({"/cut.tif": data}, etag='"v1"')
    url = f"{server.url}/cut.tif"
    try:
        clocks = StageClocks()
        with pytest.raises(InputError, match=fragment):
            open_slide_input(url, clocks, access="auto")
        assert clocks.counters.get("storage.stream_fallbacks", 0) == 0
        assert server.count("GET", "/cut.tif") <= 3  # the header and tables, never the whole file again
        job = write_job(tmp_path / "job.yaml", slide_job([str(originals["tiff"]), url], mean_model, tmp_path / "out"))
        checked = cli("validate", str(job)).communicate()[0]
        assert f"warning: {url} would be quarantined: {fragment}" in checked and "not opened" not in checked
    finally:
        server.close()
