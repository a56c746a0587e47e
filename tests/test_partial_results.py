"""Reading a run's zarr outputs before it finished: ``Result.array(name, partial=True)``.

``array()`` of an interrupted run raised UnfinishedOutputError with no way round it, where
``predictions(partial=True)`` read the committed rows: the zarr arrays of an hours-long run that
stopped could not be read until a --resume finished it. Real interrupted runs (Ctrl-C after a
committed shard) and a real --resume read while it runs, over the test slides and a slide cut
short (quarantined in its shard: a shard that is never committed, deterministically).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from conftest import slide_job, write_job

import gpubatch
from gpubatch.core.errors import UnfinishedOutputError
from gpubatch.outputs.manifest import Manifest
from gpubatch.outputs.store import OutputStore
from gpubatch.runtime.progress import Progress
from gpubatch.runtime.result import PartialArray

MEAN = ["mean_0", "mean_1", "mean_2"]  # the mean-colour model's output "mean", as predictions.parquet's columns


def _cut_in_a_tile(src: Path, dst: Path) -> Path:
    """``src`` copied up to the middle of a level-0 tile: planned, then quarantined in its shard."""
    with tifffile.TiffFile(src) as tif:
        page = tif.pages.first
        middle = len(page.dataoffsets) // 2
        at = int(page.dataoffsets[middle]) + int(page.databytecounts[middle]) // 2
    dst.write_bytes(src.read_bytes()[:at])
    return dst


def _interrupted_after_a_commit(job: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``job``, Ctrl-C as its first shard is committed (a quarantined one does not count)."""
    update = Progress.update

    def update_then_interrupt(self: Progress, result: Any) -> None:
        update(self, result)
        if result.ok:
            os.kill(os.getpid(), signal.SIGINT)

    with monkeypatch.context() as patch:
        patch.setattr(Progress, "update", update_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            gpubatch.run(job, show_progress=False)


def test_an_interrupted_run_s_array_is_read_partially_with_what_is_missing(
        tmp_path: Path, slides_dir: Path, mean_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``partial`` the error names the state and both ways on; with it, the committed
    shards' rows, row for row with predictions(partial=True), which shards they are, and how many
    are missing (at least the cut slide); the same shards' rows as the run that finishes it."""
    cut = _cut_in_a_tile(slides_dir / "s0.tif", tmp_path / "cut.tif")
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", slide_job([str(slides_dir / "s0.tif"), str(cut),
                                                      str(slides_dir / "s1.tif")], mean_model, out))
    _interrupted_after_a_commit(job, monkeypatch)
    result = gpubatch.open_results(str(out))
    assert not result.complete
    with pytest.raises(UnfinishedOutputError, match=r"did not finish \(interrupted.*--resume.*array\('mean', partial=True\)"):
        result.array("mean")
    part = result.array("mean", partial=True)
    assert isinstance(part, PartialArray) and part.state == "interrupted"
    assert part.shards == sorted(Manifest(OutputStore(str(out))).entries())
    assert len(part.shards) == result.report["shards_done"] >= 1
    assert part.missing == result.report["shards_total"] - len(part.shards) >= 1  # the cut slide at least
    committed = result.predictions(partial=True)
    np.testing.assert_array_equal(part.values, committed[MEAN].to_numpy())
    np.testing.assert_array_equal(np.asarray(part), part.values)
    assert part.offsets[0] == 0 and part.offsets[-1] == len(part.values) and len(part.offsets) == len(part.shards) + 1
    with pytest.raises(KeyError, match="is not committed"):
        part.rows("cut.tif")

    finished = gpubatch.run(job, resume=True, show_progress=False)
    assert finished.complete and len(finished.failed) == 1
    whole = finished.array("mean", partial=True)
    np.testing.assert_array_equal(whole.values, finished.array("mean"))
    assert (whole.state, whole.missing) == ("finished", 1)  # the cut slide, quarantined
    for shard in part.shards:
        np.testing.assert_array_equal(part.rows(shard), whole.rows(shard))


def test_a_resume_s_array_is_read_from_its_commits_while_it_runs(
        tmp_path: Path, slides_dir: Path, mean_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A --resume marks the zarr root ``state: running`` and leaves the finished run's shard list
    in it until its end: read while it runs, the partial array is the commits' (the shard it has
    committed too), not the root's stale list; without ``partial``, it says to wait."""
    out = tmp_path / "out"
    job = slide_job([str(slides_dir / "s0.tif"), str(slides_dir / "s1.tif")], mean_model, out)
    assert gpubatch.run(write_job(tmp_path / "a.yaml", job), show_progress=False).exit_code == 0
    job["input"]["uris"].append(str(slides_dir / "s2.tif"))
    update, seen = Progress.update, []

    def update_then_read(self: Progress, result: Any) -> None:
        update(self, result)
        if not seen:
            reading = gpubatch.open_results(out)
            root = OutputStore(str(out)).zarr_group("predictions.zarr").attrs
            with pytest.raises(UnfinishedOutputError) as said:
                reading.array("mean")
            seen.append((root["state"], len(root["shards"]), str(said.value), reading.array("mean", partial=True),
                         reading.predictions(partial=True)))

    monkeypatch.setattr(Progress, "update", update_then_read)
    assert gpubatch.run(write_job(tmp_path / "b.yaml", job), resume=True, show_progress=False).exit_code == 0
    root_state, root_shards, error, part, committed = seen[0]
    assert (root_state, root_shards) == ("running", 2)
    assert "is writing it now" in error and "array('mean', partial=True)" in error
    assert part.state == "running" and len(part.shards) == 3 and part.missing == 0
    np.testing.assert_array_equal(part.values, committed[MEAN].to_numpy())
