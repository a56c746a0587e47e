"""A full disk under the output stops the run; it never blames, retries or quarantines an input.

The real test fills a real filesystem: a small tmpfs mounted over the output inside a user and
mount namespace (``unshare -rm``: no root needed where user namespaces are allowed; skipped
where they are not), filled up while the run is between shards, so that the kernel itself
answers ENOSPC to gpubatch's next writes. RLIMIT_FSIZE (EFBIG) was tried and rejected: it limits
every file of the process, and sqlite's index of commits failed before the output was reached.
The in-process test injects ENOSPC into the part writes only, so that the audit trail, on a disk
with room, can show what the run recorded (no shard_failed; a run_failed naming the disk).
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import audit_lines, slide_job, synthetic_slides, write_job

import gpubatch
from gpubatch.core.errors import DiskFull
from gpubatch.outputs import store as store_module
from gpubatch.outputs.layout import PARTS_DIR

N_SLIDES = 4


def _job(tmp_path: Path, slides: Path, model: Path, out: Path, **run: object) -> Path:
    job = slide_job([str(slides / "*.tif")], model, out,
                    run={"readers": 1, "retries": 2, "heartbeat_s": 0.2, **run})
    job["tiles"] = {"size": 16, "level": 0, "tissue": {"method": "none"}}
    job["model"]["batch_size"] = 1
    return write_job(tmp_path / "job.yaml", job)


def _can_mount_tmpfs(where: Path) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs '{where}'"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


def test_a_disk_that_fills_under_the_output_stops_the_run_naming_it(tmp_path: Path, classifier: Path) -> None:
    out, kept = tmp_path / "out", tmp_path / "kept"
    if not _can_mount_tmpfs(out):
        pytest.skip("no user+mount namespace here to mount a small tmpfs (unshare -rm)")
    (tmp_path / "slides").mkdir()
    slides = synthetic_slides(tmp_path / "slides", N_SLIDES, 11, "s")
    job = _job(tmp_path, slides, classifier, out, prefetch_batches=1)
    # inside the namespace: a 2 MiB tmpfs as the output; the run starts; once it has committed a
    # shard the disk is filled to the last byte; what the run left is copied out afterwards
    script = f"""
mount -t tmpfs -o size=2m tmpfs '{out}' || exit 99
'{sys.executable}' -m gpubatch run '{job}' > '{tmp_path}/log' 2>&1 &
run=$!
for i in $(seq 1200); do
  ls '{out}/_manifest/' 2>/dev/null | grep -q '^s.*json$' && break
  sleep 0.1
done
dd if=/dev/zero of='{out}/filler' bs=64k 2>/dev/null
wait $run; echo $? > '{tmp_path}/rc'
rm -f '{out}/filler'; cp -r '{out}' '{kept}'
"""
    subprocess.run(["unshare", "-rm", "sh", "-c", script], timeout=300, check=True)
    log = (tmp_path / "log").read_text()
    assert (tmp_path / "rc").read_text().strip() == "1", log
    assert "the disk is full" in log and "No space left on device" in log and str(out) in log, log
    assert "Traceback" not in log and "retrying" not in log, log
    committed = len(list((kept / "_manifest").glob("s*.json")))
    assert 1 <= committed < N_SLIDES, log
    # the run's own records (audit.jsonl is built from them when there is room)
    assert not list((kept / "_audit").glob("*shard_failed*")), "a full disk was recorded against an input"


def _parts_on_a_full_disk(monkeypatch: pytest.MonkeyPatch, after: int) -> None:
    """Every parquet part after the first ``after`` fails as a full disk does (ENOSPC on write)."""
    real = store_module.OutputStore.open_write
    calls = {"n": 0}

    def open_write(self: Any, name: str) -> Any:
        if name.startswith(PARTS_DIR):
            calls["n"] += 1
            if calls["n"] > after:
                raise OSError(errno.ENOSPC, "No space left on device", self.path(name))
        return real(self, name)

    monkeypatch.setattr(store_module.OutputStore, "open_write", open_write)


def test_a_full_disk_is_recorded_as_the_runs_failure_not_an_inputs(
        tmp_path: Path, classifier: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "slides").mkdir()
    slides = synthetic_slides(tmp_path / "slides", N_SLIDES, 11, "s")
    out = tmp_path / "out"
    job = _job(tmp_path, slides, classifier, out)
    _parts_on_a_full_disk(monkeypatch, after=1)
    with pytest.raises(DiskFull, match="the disk is full") as raised:
        gpubatch.run(job)
    assert f"{out}/{PARTS_DIR}/" in str(raised.value) and "--resume" in str(raised.value)
    assert not audit_lines(out, "shard_failed")  # not retried, not quarantined
    failed = audit_lines(out, "run_failed")
    assert len(failed) == 1 and "the disk is full" in failed[0]["reason"]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and "the disk is full" in status["reason"]
    monkeypatch.undo()  # room again: the resume finishes every input, none quarantined
    again = gpubatch.run(job, resume=True)
    assert again.exit_code == 0 and not again.report["failed"]
    assert again.report["shard_stats"]["resumed"] == 1
