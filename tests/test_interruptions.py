"""Interrupted runs: SIGKILL at several instants, SIGINT and SIGTERM, then --resume. Nothing is
lost or doubled, the audit ledger has exactly one line per committed shard, status.json tells an
interrupted run from a running one, and `report` on an unfinished output summarises what is there."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import audit_lines, cli, committed_count, slide_job, wait_for, write_job

import gpubatch
from gpubatch.cli.demo import write_synthetic_slide

pytestmark = pytest.mark.slow
N_SLIDES = 7


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("interrupt")
    for i in range(N_SLIDES):  # the last slide, 4x the others, is still running when the kill lands
        big = i == N_SLIDES - 1
        write_synthetic_slide(d / f"s{i}.tif", 1536 if big else 768, 1024 if big else 512, seed=400 + i, levels=2)
    return d


def _job(tmp_path: Path, slides: Path, model: Path, profile: str = "inline", tile: int = 32,
         batch_size: int = 4) -> Path:
    job = slide_job([str(slides / "*.tif")], model, tmp_path / "out",
                    run={"readers": 1, "prefetch_batches": 1, "profile": profile, "heartbeat_s": 0.3,
                         "workers": 1})
    job["tiles"] = {"size": tile, "level": 0, "tissue": {"method": "none"}}
    job["model"]["batch_size"] = batch_size
    return write_job(tmp_path / "job.yaml", job)


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["slide", "x", "y"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, slides: Path, classifier: Path) -> pd.DataFrame:
    return _sorted(gpubatch.run(_job(tmp_path_factory.mktemp("clean"), slides, classifier)).predictions())


def _parts(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "_parts").glob("*.parquet")}


def _committed_parts(out: Path) -> dict[str, str]:
    records = [json.loads(p.read_text()) for p in (out / "_manifest").glob("*.json")]
    parts = _parts(out)
    return {r["part"]: parts[r["part"]] for r in records}


def _resume_equals_clean(job: Path, out: Path, clean: pd.DataFrame, kept: dict[str, str]) -> None:
    proc = cli("run", str(job), "--resume")
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    assert f"{len(kept)} shard(s) already committed, skipped" in log
    df = _sorted(pd.read_parquet(out / "predictions.parquet"))
    assert not df.duplicated(["slide", "x", "y"]).any()
    pd.testing.assert_frame_equal(df, clean)
    after = _parts(out)
    assert all(after.get(name) == sha for name, sha in kept.items())  # committed parts untouched
    committed = [line["shard_id"] for line in audit_lines(out)]
    assert len(committed) == len(set(committed)) == N_SLIDES  # exactly one line per committed shard
    reruns = [line for line in audit_lines(out) if line["part"] not in kept]
    assert len(reruns) == N_SLIDES - len(kept)  # the resume computed exactly the rest


@pytest.mark.parametrize("instant", [1, 3, 5])
def test_client_sigkill_at_several_instants_then_resume(tmp_path: Path, slides: Path, classifier: Path,
                                                        clean: pd.DataFrame, instant: int) -> None:
    job, out = _job(tmp_path, slides, classifier), tmp_path / "out"
    proc = cli("run", str(job), start_new_session=True)
    wait_for(lambda: committed_count(out) >= instant, 120, f"{instant} commits")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = _committed_parts(out)
    assert instant <= len(kept) < N_SLIDES
    time.sleep(1.5)  # five missed heartbeats
    status = cli("status", str(out)).communicate(timeout=60)[0]
    assert status.startswith("interrupted (no heartbeat"), status
    report = cli("report", str(out))
    text = report.communicate(timeout=60)[0]
    assert report.returncode == 0 and "no finished run" in text and "Traceback" not in text, text
    # status.json says running, its heartbeat stale: the readers said "latest run: running"
    assert "latest run: interrupted;" in text and "gpubatch run JOB --resume" in text, text
    assert gpubatch.open_results(str(out)).report["state"] == "interrupted"
    _resume_equals_clean(job, out, clean, kept)


@pytest.mark.parametrize("sig,profile", [(signal.SIGINT, "local"), (signal.SIGTERM, "inline")])
def test_sigint_and_sigterm_stop_the_workers_and_record_the_interruption(
        tmp_path: Path, slides: Path, classifier: Path, clean: pd.DataFrame, sig: int, profile: str) -> None:
    job, out = _job(tmp_path, slides, classifier, profile), tmp_path / "out"
    proc = cli("run", str(job))
    wait_for(lambda: committed_count(out) >= 2, 180, "two commits")
    proc.send_signal(sig)
    log = proc.communicate(timeout=60)[0]
    assert proc.returncode == 1 and "interrupted" in log and "--resume" in log, log
    settled = committed_count(out)
    time.sleep(3)  # workers were stopped with the client: nothing commits after it exited
    assert committed_count(out) == settled < N_SLIDES
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "interrupted"
    assert [line["event"] for line in audit_lines(out, None) if line["event"].startswith("run_")] == \
        ["run_start", "run_interrupted"]
    assert len(audit_lines(out)) == settled  # the ledger already holds every committed shard
    _resume_equals_clean(job, out, clean, _committed_parts(out))
