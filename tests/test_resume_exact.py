"""Resume, checksums and retries, counted exactly, in-process (inline profile): a resume computes
only the shards that are not committed and leaves committed parts byte for byte as they were; a
committed part whose bytes changed is found by its checksum and computed again; gpubatch's own
shard retry turns a failure that passes on the second attempt into a done shard, and says so."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import audit_lines, slide_job, write_job

import gpubatch
from gpubatch.sources.slides.source import SlideSource


def _job(tmp_path: Path, slides_dir: Path, model: Path, **run: Any) -> Path:
    job = slide_job([str(slides_dir / "*.tif")], model, tmp_path / "out", run={"retries": 0, **run})
    job["tiles"] = {"size": 128, "mpp": 0.5, "tissue": {"method": "none"}}
    return write_job(tmp_path / "job.yaml", job)


def _parts(out: Path) -> dict[str, str]:
    """Every parquet part in the output by name, with its sha256."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "_parts").glob("*.parquet")}


def _records(out: Path) -> dict[str, dict[str, Any]]:
    """Commit records by shard id."""
    return {r["shard_id"]: r for r in (json.loads(p.read_text()) for p in (out / "_manifest").glob("*.json"))}


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["slide", "x", "y"]).reset_index(drop=True)


def _first_run(tmp_path: Path, slides_dir: Path, classifier: Path) -> tuple[Path, Path, pd.DataFrame]:
    job = _job(tmp_path, slides_dir, classifier)
    result = gpubatch.run(job, show_progress=False)
    assert result.exit_code == 0 and len(_records(tmp_path / "out")) == 3
    return job, tmp_path / "out", _sorted(result.predictions())


def _resumed_run_ids(out: Path, first_run: str) -> dict[str, str]:
    """shard id -> the run that committed it, from audit.jsonl (one line per committed shard)."""
    lines = audit_lines(out)
    assert len(lines) == len({line["shard_id"] for line in lines}) == 3
    return {line["shard_id"]: ("first" if line["run_id"] == first_run else "resume") for line in lines}


def test_resume_recomputes_only_uncommitted_shards(tmp_path: Path, slides_dir: Path, classifier: Path) -> None:
    job, out, clean = _first_run(tmp_path, slides_dir, classifier)
    records = _records(out)
    lost = sorted(records)[1]  # as if the run had died before this shard committed
    first_run = records[lost]["run_id"]
    (out / "_manifest" / f"{lost}.json").unlink()
    kept = {r["part"]: sha for sid, r in records.items() if sid != lost for name, sha in _parts(out).items()
            if name == r["part"]}
    mtimes = {name: (out / "_parts" / name).stat().st_mtime_ns for name in kept}
    result = gpubatch.run(job, resume=True, show_progress=False)
    assert result.exit_code == 0
    assert sorted(s["shard_id"] for s in result.report["shards"] if not s["resumed"]) == [lost]
    after = _parts(out)
    assert {name: after.get(name) for name in kept} == kept  # committed parts byte for byte
    assert all((out / "_parts" / n).stat().st_mtime_ns == t for n, t in mtimes.items())  # never rewritten
    assert set(after) == set(kept) | {_records(out)[lost]["part"]}  # and the one new part, nothing else
    assert _resumed_run_ids(out, first_run) == {sid: "resume" if sid == lost else "first" for sid in records}
    pd.testing.assert_frame_equal(_sorted(result.predictions()), clean)


def test_corrupt_committed_part_is_detected_and_recomputed(tmp_path: Path, slides_dir: Path, classifier: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    job, out, clean = _first_run(tmp_path, slides_dir, classifier)
    records = _records(out)
    bad = sorted(records)[0]
    first_run = records[bad]["run_id"]
    part = out / "_parts" / records[bad]["part"]
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte; same size
    part.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="gpubatch"):
        result = gpubatch.run(job, resume=True, show_progress=False)
    assert result.exit_code == 0
    assert f"shard {bad}: its committed part is corrupt (checksum differs)" in caplog.text
    assert sorted(s["shard_id"] for s in result.report["shards"] if not s["resumed"]) == [bad]
    assert _records(out)[bad]["part"] != part.name and not part.exists()  # computed again, old one swept
    assert _resumed_run_ids(out, first_run) == {sid: "resume" if sid == bad else "first" for sid in records}
    pd.testing.assert_frame_equal(_sorted(result.predictions()), clean)


def test_retryable_failure_succeeds_on_the_second_attempt(tmp_path: Path, slides_dir: Path, classifier: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """On the inline executor (no Dask to reschedule anything), a shard whose first open fails
    with a connection reset is run again by gpubatch's own retry and is done on attempt 2."""
    calls: dict[str, int] = {}
    real_open = SlideSource.open

    def flaky_open(self: SlideSource, shard: Any, job: Any, clocks: Any) -> Any:
        calls[shard.shard_id] = calls.get(shard.shard_id, 0) + 1
        if shard.input_uri.endswith("s1.tif") and calls[shard.shard_id] == 1:
            raise ConnectionResetError("connection reset by peer")
        return real_open(self, shard, job, clocks)

    monkeypatch.setattr(SlideSource, "open", flaky_open)
    result = gpubatch.run(_job(tmp_path, slides_dir, classifier, retries=1), show_progress=False)
    assert result.exit_code == 0 and result.report["failed"] == []
    attempts = {Path(s["input"]).name: s["attempt"] for s in result.report["shards"]}
    assert attempts == {"s0.tif": 1, "s1.tif": 2, "s2.tif": 1}
    assert result.report["retried"] == {"count": 1, "listed": [
        {"input": str(slides_dir / "s1.tif"), "shard_id": _shard_of(result.report, "s1.tif"), "attempts": 2}]}
    (line,) = [a for a in audit_lines(tmp_path / "out", "shard_failed")]
    assert line["attempt"] == 1 and "ConnectionResetError" in line["error"]
    assert {a["attempt"] for a in audit_lines(tmp_path / "out") if a["input"].endswith("s1.tif")} == {2}


def test_a_failure_on_every_attempt_is_quarantined_after_the_last_retry(
        tmp_path: Path, slides_dir: Path, classifier: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """retries: 2 means three attempts, each recorded in the audit, then the shard is quarantined
    and the other shards are done (exit 3)."""
    real_open = SlideSource.open

    def failing_open(self: SlideSource, shard: Any, job: Any, clocks: Any) -> Any:
        if shard.input_uri.endswith("s2.tif"):
            raise TimeoutError("read timed out")
        return real_open(self, shard, job, clocks)

    monkeypatch.setattr(SlideSource, "open", failing_open)
    result = gpubatch.run(_job(tmp_path, slides_dir, classifier, retries=2), show_progress=False)
    assert result.exit_code == 3
    (failed,) = result.report["failed"]
    assert failed["input"].endswith("s2.tif") and failed["attempts"] == 3 and "TimeoutError" in failed["error"]
    assert [a["attempt"] for a in audit_lines(tmp_path / "out", "shard_failed")] == [1, 2, 3]
    assert sorted(Path(a["input"]).name for a in audit_lines(tmp_path / "out")) == ["s0.tif", "s1.tif"]


def _shard_of(report: dict[str, Any], name: str) -> str:
    return next(s["shard_id"] for s in report["shards"] if s["input"].endswith(name))


def test_a_resume_whose_input_list_swapped_one_input_computes_the_new_one(tmp_path: Path, slides_dir: Path,
                                                                            mean_model: Path) -> None:
    """The input list is not a result field: a resume may drop one input and add another. The
    committed shards the plan no longer names must not count as this plan's: with as many kept
    commits as planned shards, the new input was never submitted and the run said exit 0."""
    job = slide_job([str(slides_dir / "s0.tif"), str(slides_dir / "s1.tif")], mean_model, tmp_path / "out")
    job["tiles"] = {"size": 128, "mpp": 0.5, "tissue": {"method": "none"}}
    assert gpubatch.run(write_job(tmp_path / "a.yaml", job), show_progress=False).exit_code == 0
    job["input"]["uris"] = [str(slides_dir / "s0.tif"), str(slides_dir / "s2.tif")]
    result = gpubatch.run(write_job(tmp_path / "b.yaml", job), resume=True, show_progress=False)
    assert result.exit_code == 0
    assert sorted(Path(s).name for s in result.predictions()["slide"].unique()) == ["s0.tif", "s2.tif"]
    assert result.report["shards_done"] == result.report["shards_total"] == 2
    assert result.report["resumed"]["shards"] == 1 and len(result.report["shards"]) == 2
    assert json.loads((tmp_path / "out" / "status.json").read_text())["done"] == 2


def test_a_committed_shard_whose_zarr_group_is_gone_is_recomputed(tmp_path: Path, slides_dir: Path,
                                                                   mean_model: Path) -> None:
    """A commit is its part and its zarr group. Only the part was checked on --resume: with
    predictions.zarr deleted (or one group of it), the resume kept every shard, exited 0, and
    the zarr root named groups that were not there (Result.array raised FileNotFoundError)."""
    import shutil

    job = slide_job([str(slides_dir / "*.tif")], mean_model, tmp_path / "out")
    job["tiles"] = {"size": 128, "mpp": 0.5, "tissue": {"method": "none"}}
    job["output"]["formats"] = ["zarr", "parquet"]
    path = write_job(tmp_path / "job.yaml", job)
    first = gpubatch.run(path, show_progress=False)
    out, records = tmp_path / "out", _records(tmp_path / "out")
    lost = sorted(records)[0]
    shutil.rmtree(out / "predictions.zarr" / records[lost]["group"])
    again = gpubatch.run(path, resume=True, show_progress=False)
    assert again.exit_code == 0 and again.report["resumed"]["shards"] == 2
    assert [s["shard_id"] for s in again.report["shards"] if not s["resumed"]] == [lost]
    np.testing.assert_array_equal(again.array("mean"), first.array("mean"))
