"""Whole jobs over object storage: a real S3 server (moto) on loopback, s3fs, and a fault proxy."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pandas as pd
import pytest
from conftest import by_slide_name, slide_job, upload_slides, write_job
from s3_fixtures import S3Stack

import gpubatch

pytest_plugins = ["s3_fixtures"]


@pytest.fixture()
def remote_slides(s3: S3Stack, slides_dir: Path) -> str:
    return upload_slides(s3, slides_dir)


@pytest.mark.parametrize("access", ["stream", "stage"])
def test_remote_runs_equal_local(tmp_path: Path, s3: S3Stack, remote_slides: str, mean_model: Path,
                                 local_reference: pd.DataFrame, access: str) -> None:
    job = slide_job([f"{remote_slides}/*.tif"], mean_model, tmp_path / "out")
    job["input"].update(storage=s3.options(), access=access)
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job))
    assert result.exit_code == 0
    pd.testing.assert_frame_equal(by_slide_name(result.predictions()), local_reference)
    counters = result.report["counters"]
    assert counters.get(f"storage.access.{access}", 0) == 3
    assert result.report["storage"]["requests"] > 0
    assert counters.get("storage.client.obstore", 0) >= 3 and "storage.client.fsspec" not in counters


def test_dask_workers_read_through_obstore_after_the_client_did(tmp_path: Path, s3: S3Stack, remote_slides: str,
                                                                mean_model: Path, local_reference: pd.DataFrame) -> None:
    """obstore hangs in a process forked after it ran. The client reads through obstore first;
    the LocalCluster's workers (forked from the forkserver, which never runs obstore) then read
    every slide through obstore themselves, and the run ends with the local predictions."""
    from gpubatch.io import obstore as obstore_io
    from gpubatch.io.storage import read_bytes

    assert read_bytes(f"{remote_slides}/s0.tif", s3.options(), end=4) in (b"II*\x00", b"MM\x00*")
    assert obstore_io._used
    job = slide_job([f"{remote_slides}/*.tif"], mean_model, tmp_path / "out", run={"profile": "local", "workers": 2})
    job["input"].update(storage=s3.options(), access="stream")
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job))
    assert result.exit_code == 0, result.report["failed"]
    pd.testing.assert_frame_equal(by_slide_name(result.predictions()), local_reference)
    counters = result.report["counters"]
    assert counters["storage.client.obstore"] == 3 and "storage.client.fsspec" not in counters


def test_faulty_storage_still_gives_identical_predictions(tmp_path: Path, s3: S3Stack, remote_slides: str,
                                                          mean_model: Path, local_reference: pd.DataFrame) -> None:
    s3.proxy.configure(error_rate=0.15, reset_rate=0.05, latency_s=0.01, seed=7)
    job = slide_job([f"{remote_slides}/*.tif"], mean_model, tmp_path / "out", run={"profile": "local", "workers": 2})
    job["input"].update(storage=s3.options(), access="stream")
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job))
    assert result.exit_code == 0, result.report["failed"]
    pd.testing.assert_frame_equal(by_slide_name(result.predictions()), local_reference)
    assert s3.proxy.stats["errors"] > 0 and result.report["counters"].get("storage.retries", 0) > 0


def test_missing_and_forbidden_objects_are_quarantined(tmp_path: Path, s3: S3Stack, remote_slides: str,
                                                       classifier: Path, capsys: pytest.CaptureFixture) -> None:
    forbidden = f"{remote_slides}/s1.tif"
    s3.proxy.configure(forbidden={forbidden.removeprefix("s3://")})
    uris = [f"{remote_slides}/s0.tif", forbidden, f"{remote_slides}/absent.tif"]
    job = slide_job(uris, classifier, tmp_path / "out")
    job["input"].update(storage=s3.options(), access="stream")
    path = write_job(tmp_path / "job.yaml", job)
    from gpubatch.cli.main import main

    assert main(["run", str(path)]) == 3
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    errors = {Path(f["input"]).name: f["error"] for f in report["failed"]}
    assert set(errors) == {"s1.tif", "absent.tif"}
    assert "denied" in errors["s1.tif"].lower() and "not found" in errors["absent.tif"].lower()
    printed = capsys.readouterr()
    written = [p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()]
    for secret in (s3.secret, s3.key):
        assert secret not in printed.out + printed.err
        assert not any(secret.encode() in blob for blob in written)


def test_staging_reaches_past_the_busy_slots_and_downloads_each_slide_once(tmp_path: Path, s3: S3Stack,
                                                                           slides_dir: Path, mean_model: Path) -> None:
    """More slides than shard slots (2 workers x 2 shards): every slide past the first slots'
    is staged before its shard opens, whichever worker runs it (the stage cache is the host's),
    and no slide is downloaded twice."""
    folder = f"many-{uuid.uuid4().hex[:8]}"
    sources = sorted(slides_dir.glob("*.tif"))
    uris = [s3.upload(sources[i % len(sources)], f"{folder}/s{i}.tif") for i in range(9)]
    s3.proxy.configure(latency_s=0.05)
    job = slide_job(uris, mean_model, tmp_path / "out", run={"profile": "local", "workers": 2})
    job["input"].update(storage=s3.options(), access="stage")
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job))
    assert result.exit_code == 0, result.report["failed"]
    counters = result.report["counters"]
    assert s3.proxy.stats["GET"] == 9, s3.proxy.gets  # one download per slide: no worker repeated another's
    assert counters["storage.cache_hits"] >= 9 - 4  # staged ahead of every shard past the first four


def test_each_streamed_slide_is_opened_once_where_its_shard_runs(tmp_path: Path, s3: S3Stack, slides_dir: Path,
                                                                mean_model: Path) -> None:
    """Shards are dealt to the worker processes (runtime.dealing), so the slides a shard opens
    ahead are the ones its own process runs next: over 2 processes and more slides than slots,
    each slide's header is read once (when Dask chose the process, a slide was opened ahead in
    both and often a third time cold: 3 reads of one slide, 2 of several). The exception is the
    run's end, where an idle process takes the last shards of the other's lane (at most its
    depth, run.stage_ahead 2) and opens them again rather than wait. The shards past each
    process's first wave found their slide opened."""
    folder = f"dealt-{uuid.uuid4().hex[:8]}"
    sources = sorted(slides_dir.glob("*.tif"))
    keys = [f"{folder}/s{i}.tif" for i in range(10)]
    uris = [s3.upload(sources[i % len(sources)], key) for i, key in enumerate(keys)]
    s3.proxy.configure(latency_s=0.02)
    job = slide_job(uris, mean_model, tmp_path / "out", run={"profile": "local", "workers": 2})
    job["input"].update(storage=s3.options(), access="stream")
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job))
    assert result.exit_code == 0, result.report["failed"]
    reads = {key: s3.proxy.from_start.get(f"{s3.bucket}/{key}", 0) for key in keys}
    assert min(reads.values()) == 1 and max(reads.values()) <= 2, reads
    assert [key for key in keys if reads[key] > 1] in ([], keys[-1:], keys[-2:], keys[-2:-1]), reads
    counters = result.report["counters"]
    assert counters["storage.opened_ahead"] >= len(keys) - 4
    # those slides came with their reads planned (tissue found, blocks in flight) before their shard
    assert counters["slides.planned_ahead"] == counters["storage.opened_ahead"]
    local = tmp_path / "local"
    local.mkdir()
    for i, key in enumerate(keys):
        shutil.copy(sources[i % len(sources)], local / key.rsplit("/", 1)[1])
    want = gpubatch.run(write_job(tmp_path / "local.yaml", slide_job(
        [str(local / "*.tif")], mean_model, tmp_path / "local-out"))).predictions()
    pd.testing.assert_frame_equal(by_slide_name(result.predictions()), by_slide_name(want))


@pytest.mark.parametrize("setting", [None, "0"])
def test_a_slide_opened_ahead_is_planned_ahead_unless_switched_off(s3: S3Stack, remote_slides: str, mean_model: Path,
                                                                   monkeypatch: pytest.MonkeyPatch, setting: str | None) -> None:
    """before_shard opens the next slides in the background and, by default, plans their reads
    there (tissue tiles and blocks, their bytes asked for); GPUBATCH_PLAN_AHEAD=0 stops at the
    opening."""
    from gpubatch.core.switches import PLAN_AHEAD
    from gpubatch.sources.slides import preopen
    from gpubatch.sources.slides.source import SlideSource
    from gpubatch.spec import parse_job

    if setting is not None:
        monkeypatch.setenv(PLAN_AHEAD, setting)
    uri = f"{remote_slides}/s1.tif"
    job = parse_job(slide_job([uri], mean_model, Path("unused")) | {"input": {"uris": [uri], "storage": s3.options(),
                                                                            "access": "stream"}})
    SlideSource().before_shard(job, [uri])
    opening = preopen.take(uri)
    assert opening is not None
    backend = opening.future.result(timeout=60)
    try:
        assert (backend.plan is None) == (setting == "0")
        if backend.plan is not None:
            assert len(backend.plan.kept) > 0 and backend.plan.units
    finally:
        backend.close()


@pytest.mark.parametrize(("client", "access", "profile"), [
    ("obstore", "stream", "inline"), ("fsspec", "stream", "inline"), ("obstore", "stage", "inline"),
    ("fsspec", "stage", "local")])
def test_the_storage_summary_counts_the_heads_the_server_answered(
        tmp_path: Path, s3: S3Stack, remote_slides: str, mean_model: Path, monkeypatch: pytest.MonkeyPatch,
        client: str, access: str, profile: str) -> None:
    """HEADs were not counted ("storage: N requests" counts reads of bytes): the report's
    ``heads`` is every HEAD of the slides the server answered, the client's (plan, identity)
    and the workers' (identity, a reader's size; on worker processes too; none of a slide
    streamed through obstore, whose GETs carry its size and ETag), through obstore and s3fs alike; and the glob's existence probes (s3fs's HEAD of the pattern, and of the folder
    as it lists), which are counted now too, the listings by kind."""
    from gpubatch.report.html import render_html
    from gpubatch.report.text import format_summary

    monkeypatch.setenv("GPUBATCH_RANGE_READER", client)
    job = slide_job([f"{remote_slides}/*.tif"], mean_model, tmp_path / "out", run={"profile": profile, "workers": 2})
    job["input"].update(storage=s3.options(), access=access)
    s3.proxy.reset()
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job))
    assert result.exit_code == 0, result.report["failed"]
    folder = remote_slides.removeprefix("s3://")
    answered = sum(n for key, n in s3.proxy.heads.items() if key.startswith(folder))
    probes = s3.proxy.heads.get(f"{folder}/*.tif", 0) + s3.proxy.heads.get(folder, 0)
    heads = result.report["storage"]["heads"]
    slide_heads = 0 if (client, access) == ("obstore", "stream") else 3  # obstore's GETs say the size and ETag
    assert heads == answered >= slide_heads + probes and probes == 2, (heads, s3.proxy.heads)
    assert result.report["storage"]["client_by_kind"]["list"] >= 1
    assert f" + {heads} HEADs, " in format_summary(result.report)
    assert f"<th class=\"l\">storage HEADs</th><td class=\"l mono\">{heads}</td>" in render_html(result.report)


def test_two_runs_on_one_dask_cluster_each_stage_the_version_they_asked(
        tmp_path: Path, s3: S3Stack, slides_dir: Path, mean_model: Path, local_reference: pd.DataFrame) -> None:
    """Two jobs on one Dask cluster (the Python API twice on one scheduler) share its worker
    processes and their stage cache, whose run was the process's: the run a worker stages for
    is now each shard's (io.stage_cache.staging_for, from the shard's RunContext). The slide is
    written over between the runs, and the second run reads the new version, not the copy the
    first staged (nor the version the first asked)."""
    from distributed import LocalCluster

    from gpubatch.runtime.runner import run_job
    from gpubatch.spec import JobSpec

    sources = sorted(slides_dir.glob("*.tif"))
    key = f"two-runs-{uuid.uuid4().hex[:8]}/s0.tif"
    uri = s3.upload(sources[0], key)
    with LocalCluster(n_workers=1, processes=False, threads_per_worker=2, dashboard_address=None,
                      silence_logs=50) as cluster:
        got = []
        for n, source in enumerate(sources[:2]):
            s3.upload(source, key)  # the second run's slide is s1's bytes under s0's name
            job = slide_job([uri], mean_model, tmp_path / f"out{n}")
            job["input"].update(storage=s3.options(), access="stage")
            result = run_job(JobSpec.model_validate(job), scheduler=cluster.scheduler_address, show_progress=False)
            assert result.exit_code == 0, result.report["failed"]
            got.append(by_slide_name(result.predictions()).drop(columns="slide"))
    for n, source in enumerate(sources[:2]):
        want = local_reference[local_reference["slide"] == source.name].drop(columns="slide").reset_index(drop=True)
        pd.testing.assert_frame_equal(got[n], want)
