"""``tiles.integrity: strict`` on the openslide path: corrupt JPEG tiles in slides openslide reads.

openslide 4 decodes most corrupt JPEG tiles silently (libjpeg's 'Corrupt JPEG data' warnings are
dropped and the tile comes back gray or garbled); only a premature end of data is an error. A TIFF
named ``.ndpi`` is read by openslide (as generic-tiff), so these slides prove that strict holds
there as it does on the tifffile path (tests/test_hostile.py), and that where it cannot be checked
the slide's notes say so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import slide_job, write_job
from hostile_inputs import flip_tile_bytes, truncate_tile, zero_tile_bytes

from gpubatch.cli.demo import write_synthetic_slide
from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputError
from gpubatch.sources.slides.openslide_backend import OpenSlideBackend

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``gpubatch ARGS`` in a fresh process (this checkout's code), output captured."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "gpubatch", *args], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-level JPEG TIFF whose damaged tiles openslide mostly decodes without an error.

    The damage helpers parse it with tifffile under its .tif name (tifffile takes a .ndpi name
    for Hamamatsu's 64-bit offsets); the copies they write are named .ndpi, for openslide."""
    from s3_fixtures import write_pyramid_tiff

    return write_pyramid_tiff(tmp_path_factory.mktemp("os") / "source.tif", 1024, 1024, levels=1)


@pytest.fixture(scope="module")
def pyramid3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-level JPEG pyramid in top-level IFDs, as openslide's generic-tiff reads them."""
    path = tmp_path_factory.mktemp("os3") / "pyramid.tif"
    return write_synthetic_slide(path, 1024, 1024, levels=3, tile=256, mpp=0.5)


@pytest.fixture(scope="module")
def good(source: Path) -> Path:
    """The intact pyramid named .ndpi: read by openslide, as generic-tiff."""
    return Path(shutil.copy(source, source.with_name("good.ndpi")))


def _corrupt(source: Path, folder: Path) -> dict[Path, str]:
    """Damaged copies of ``source`` -> the libjpeg complaint strict must report for each."""
    return {
        flip_tile_bytes(source, folder / "flipped.ndpi", n_bytes=10, seed=2): "Corrupt JPEG data",
        truncate_tile(source, folder / "truncated.ndpi", index=5): "Premature end of JPEG file",
        zero_tile_bytes(source, folder / "zeroed.ndpi", index=6): "Corrupt JPEG data",
        zero_tile_bytes(source, folder / "zeroed-to-end.ndpi", index=9, length=None): "Premature end of JPEG file",
    }


def _read_all(backend: OpenSlideBackend, level: int) -> np.ndarray:
    w, h = backend.info.level_dimensions[level]
    return backend.read_boxes(level, np.array([[0, 0, w, h]]), StageClocks())


def test_strict_run_quarantines_openslide_slides_with_corrupt_tiles(
        tmp_path: Path, source: Path, good: Path, classifier: Path) -> None:
    """Each damaged slide fails once (not retried) with an error naming it, the tile and the
    level; the intact one, through the same openslide path, is committed. Lenient runs them all."""
    bad = _corrupt(source, tmp_path)
    out = tmp_path / "out"
    job = slide_job([str(good), *map(str, bad)], classifier, out, tiles={"level": 0})
    del job["tiles"]["mpp"]
    path = write_job(tmp_path / "job.yaml", job)
    done = cli("run", str(path))
    assert done.returncode == 3, done.stdout[-3000:] + done.stderr[-3000:]
    for slide, complaint in bad.items():
        assert f"{slide}: corrupt tile" in done.stdout and complaint in done.stdout, done.stdout[-3000:]
    assert f"{tmp_path / 'truncated.ndpi'}: corrupt tile 5 at level 0" in done.stdout
    assert f"{tmp_path / 'zeroed.ndpi'}: corrupt tile 6 at level 0" in done.stdout
    audit = pd.read_json(out / "audit.jsonl", lines=True)
    failed = audit[audit["event"] == "shard_failed"]
    assert sorted(failed["input"]) == sorted(map(str, bad)) and set(failed["attempt"]) == {1}
    committed = audit[audit["event"] == "shard_committed"]
    assert committed["input"].tolist() == [str(good)]
    # lenient: what openslide decodes without an error is committed, gray and garbled as it is;
    # what openslide itself refuses (a truncated tile) still fails, as it did before
    lenient = cli("run", str(path), "--overwrite", "--set", "tiles.integrity=lenient")
    audit = pd.read_json(out / "audit.jsonl", lines=True)
    committed = audit[audit["event"] == "shard_committed"]["input"].tolist()
    assert {str(good), str(tmp_path / "flipped.ndpi"), str(tmp_path / "zeroed.ndpi")} <= set(committed)
    assert f"{tmp_path / 'truncated.ndpi'}: openslide failed to read a region" in lenient.stdout


@pytest.mark.parametrize("suffix", [".ndpi", ".scn"])
def test_strict_openslide_read_names_a_corrupt_tile_at_a_coarser_level(
        tmp_path: Path, pyramid3: Path, suffix: str) -> None:
    """The tiles checked are the stored tiles of the TIFF page that is openslide's level; the
    flipped byte (seed 0: one libjpeg notices, after the last scanline) openslide alone misses.
    A plain TIFF named after a vendor format is generic-tiff to openslide, and checked."""
    bad = flip_tile_bytes(pyramid3, tmp_path / f"level1{suffix}", n_bytes=1, level=1, seed=0)
    backend = OpenSlideBackend(str(bad))
    assert backend.info.vendor == "generic-tiff" and len(backend.info.level_dimensions) == 3
    assert _read_all(backend, 0).shape == (1, 1024, 1024, 3)  # level 0 is intact
    with pytest.raises(InputError, match=rf"^{bad}: corrupt tile \d at level 1: Corrupt JPEG data"):
        _read_all(backend, 1)
    assert backend.integrity_notes() == []  # checked: nothing to own up to
    backend.close()
    backend = OpenSlideBackend(str(bad))
    backend.accept_corrupt_tiles()
    assert _read_all(backend, 1).shape == (1, 512, 512, 3)  # openslide alone: no error
    backend.close()


def test_lenient_openslide_reads_do_not_check(tmp_path: Path, source: Path, good: Path) -> None:
    """lenient decodes what openslide decodes, as before: no TIFF parse, no check. openslide
    alone decodes this zeroed tile without an error, to wrong pixels: why strict checks first."""
    bad = zero_tile_bytes(source, tmp_path / "zeroed.ndpi", index=0)
    backend, intact = OpenSlideBackend(str(bad)), OpenSlideBackend(str(good))
    backend.accept_corrupt_tiles()
    pixels = _read_all(backend, 0)
    assert (pixels != _read_all(intact, 0)).any(axis=-1).sum() > 1000
    assert backend.integrity_notes() == [] and backend.tile_check is None
    backend.close()
    intact.close()


@pytest.fixture(scope="module")
def dicom_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-level DICOM-WSI file, read by OpenSlide 4 (vendor dicom): not a TIFF."""
    from pathology_files import synthetic_slide, write_dicom_wsi

    from gpubatch.sources.slides.dicom import open_dicom

    written = write_dicom_wsi(synthetic_slide(512, 512), tmp_path_factory.mktemp("dcm"), levels=1)
    backend = open_dicom(str(written[0]), StageClocks())
    backend.close()
    if not isinstance(backend, OpenSlideBackend):
        pytest.skip("this OpenSlide does not open DICOM")
    return written[0]


def test_strict_says_where_openslide_tiles_cannot_be_checked(
        tmp_path: Path, dicom_file: Path, classifier: Path) -> None:
    """strict cannot check a DICOM file's tiles: the run's notes say so for that slide instead
    of claiming integrity; lenient claims nothing, so has no note."""
    import gpubatch

    job = slide_job([str(dicom_file)], classifier, tmp_path / "out", tiles={"level": 0})
    del job["tiles"]["mpp"]
    spec = write_job(tmp_path / "job.yaml", job)
    result = gpubatch.run(spec, show_progress=False)
    assert result.exit_code == 0
    assert result.report["notes"] == [
        f"{dicom_file}: tiles.integrity: strict, but its tile data is not checked: openslide reads it as "
        "dicom, whose stored tiles are not located here; openslide's own decode errors still fail the "
        "slide, corrupt data it decodes without an error does not"]
    lenient = gpubatch.run(spec, show_progress=False, overwrite=True, tiles__integrity="lenient")
    assert lenient.exit_code == 0 and lenient.report["notes"] == []


def test_a_staged_slide_passes_on_its_readers_note(dicom_file: Path) -> None:
    """A remote slide openslide reads is staged and wrapped: the wrapper must not answer for it."""
    from gpubatch.sources.slides.open import StagedBackend

    class Staged:
        def close(self) -> None:
            pass

    inner = OpenSlideBackend(str(dicom_file))
    staged = StagedBackend(inner, Staged())  # type: ignore[arg-type]
    assert staged.integrity_notes() == inner.integrity_notes() != []
    staged.close()


def _dicom_with_a_corrupt_frame(folder: Path, codec: str = "jpeg") -> tuple[Path, int]:
    """A one-level DICOM-WSI series (read by wsidicom: a folder) with bytes flipped in the middle
    of one frame's entropy-coded data, the frame's length kept: (the folder, the frame's index)."""
    import pydicom
    from pathology_files import synthetic_slide, write_dicom_wsi
    from pydicom.encaps import encapsulate, generate_frames

    [path] = write_dicom_wsi(synthetic_slide(512, 512), folder, levels=1, codec=codec)
    ds = pydicom.dcmread(path)
    frames = [bytearray(f) for f in generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames))]
    index = max(range(len(frames)), key=lambda i: len(frames[i]))  # tissue, not a flat background
    rng = np.random.default_rng(0)  # flips libjpeg notices (JPEG has no checksum: some it cannot)
    for pos in rng.integers(len(frames[index]) * 2 // 5, len(frames[index]) * 3 // 5, 10):
        frames[index][pos] ^= 0x5A if frames[index][pos] not in (0xFF, 0x5A ^ 0xFF) else 0x33
    ds.PixelData = encapsulate([bytes(f) for f in frames])
    ds.save_as(path, enforce_file_format=True)
    return folder, index


def _read_dicom_level(backend: object) -> np.ndarray:
    info = backend.info  # type: ignore[attr-defined]
    w, h = info.level_dimensions[0]
    return backend.read_boxes(0, np.array([[0, 0, w, h]]), StageClocks())  # type: ignore[attr-defined]


def test_strict_holds_for_dicom_frames_read_by_wsidicom(tmp_path: Path) -> None:
    """A corrupt baseline-JPEG frame fails a strict read naming the frame (its decoder would return
    wrong pixels without a word); lenient decodes what it can, as on the other paths."""
    from gpubatch.sources.slides.dicom import WsiDicomBackend

    folder, index = _dicom_with_a_corrupt_frame(tmp_path / "series")
    strict = WsiDicomBackend(str(folder))
    with pytest.raises(InputError, match=f"corrupt DICOM frame {index} at level 0: .*Corrupt JPEG data"):
        _read_dicom_level(strict)
    assert strict.integrity_notes() == []
    strict.close()
    lenient = WsiDicomBackend(str(folder))
    lenient.accept_corrupt_tiles()
    assert _read_dicom_level(lenient).shape[1:] == (512, 512, 3)
    lenient.close()


def test_strict_says_where_dicom_frames_are_not_checked(tmp_path: Path) -> None:
    from pathology_files import synthetic_slide, write_dicom_wsi

    from gpubatch.sources.slides.dicom import WsiDicomBackend

    write_dicom_wsi(synthetic_slide(256, 256), tmp_path / "ls", levels=1, codec="jpegls")
    backend = WsiDicomBackend(str(tmp_path / "ls"))
    [note] = backend.integrity_notes()
    assert "its frames are stored as 1.2.840.10008.1.2.4.80, and only JPEG frames are checked" in note
    backend.accept_corrupt_tiles()
    assert backend.integrity_notes() == []
    backend.close()


def test_strict_says_ome_zarr_chunks_are_not_checked(tmp_path: Path) -> None:
    from pathology_files import synthetic_slide, write_ome_zarr

    from gpubatch.sources.slides.omezarr import OmeZarrBackend

    path = write_ome_zarr(synthetic_slide(256, 256), tmp_path / "image.zarr")
    backend = OmeZarrBackend(str(path))
    [note] = backend.integrity_notes()
    assert "its chunks carry no checksum of their own; zarr's own decode errors" in note
    backend.accept_corrupt_tiles()
    assert backend.integrity_notes() == []
    backend.close()
