"""Two jobs of different storage settings on one Dask cluster (``cluster: scheduler``, or the
Python API twice on one Client) share its worker processes: each job's shards stage in the cache
of that job's settings, beside the other's, and a copy one job reads is never deleted or
unpinned by the other's arrival. A real LocalCluster, a real S3 server (moto) behind the fault
proxy, which holds the first job's commit while the second runs."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from conftest import by_slide_name, slide_job
from s3_fixtures import S3Stack

pytest_plugins = ["s3_fixtures"]


def _profile(path: Path, stage_dir: Path, max_bytes: int) -> str:
    path.write_text(yaml.safe_dump({"stage_cache": {"dir": str(stage_dir), "max_bytes": max_bytes}}))
    return str(path)


def _staged(stage_dir: Path, name: str) -> list[Path]:
    return [p for p in stage_dir.rglob(name) if ".records" not in p.parts]


def test_a_job_of_other_stage_settings_never_deletes_a_copy_another_job_reads(
        tmp_path: Path, s3: S3Stack, slides_dir: Path, mean_model: Path, local_reference: pd.DataFrame) -> None:
    """Job A's shard holds its staged slide open (its commit held at the proxy) when job B, whose
    profile gives the stage cache another size, starts its shard on the same worker. The worker
    replaced its stage cache for B's settings, clearing A's: A's copy lost its pin, and B's
    download, over B's smaller budget, evicted it under A's shard. Each job's settings now have
    a cache of their own, and a copy in use stays pinned whatever else arrives."""
    from distributed import LocalCluster

    from gpubatch.runtime.runner import run_job
    from gpubatch.spec import JobSpec

    stage_dir, folder = tmp_path / "stage", f"stage-jobs-{uuid.uuid4().hex[:8]}"
    a_slide, b_slide = sorted(slides_dir.glob("*.tif"))[:2]
    a_uri, b_uri = s3.upload(a_slide, f"{folder}/a/{a_slide.name}"), s3.upload(b_slide, f"{folder}/b/{b_slide.name}")
    big = _profile(tmp_path / "a.yaml", stage_dir, 1 << 30)
    small = _profile(tmp_path / "b.yaml", stage_dir, int(b_slide.stat().st_size * 1.5))  # room for B's slide alone
    b_done = threading.Event()
    s3.proxy.configure(writes_stalling_within={f"{folder}/out-a/_parts/": 120.0}, stall_release=b_done.is_set)
    job_a = slide_job([a_uri], mean_model, tmp_path / "unused")
    job_a["input"].update(storage=s3.options(), access="stage")
    job_a["output"] = {"uri": f"s3://slides/{folder}/out-a", "storage": s3.options()}
    job_b = slide_job([b_uri], mean_model, tmp_path / "out-b", run={"stage_ahead": 0})
    job_b["input"].update(storage=s3.options(), access="stage")
    results: dict[str, Any] = {}
    with LocalCluster(n_workers=1, processes=False, threads_per_worker=2, dashboard_address=None,
                      silence_logs=50) as cluster:
        def run_a() -> None:
            results["a"] = run_job(JobSpec.model_validate(job_a), profile=big, scheduler=cluster.scheduler_address,
                                   show_progress=False)

        thread = threading.Thread(target=run_a)
        thread.start()
        try:
            deadline = time.monotonic() + 120
            while not any("/out-a/_parts/" in path for _, path in list(s3.proxy.log)):  # A's shard commits
                assert thread.is_alive() and time.monotonic() < deadline, "job A never reached its commit"
                time.sleep(0.02)
            assert _staged(stage_dir, a_slide.name), "job A's shard reads no staged copy"
            result_b = run_job(JobSpec.model_validate(job_b), profile=small, scheduler=cluster.scheduler_address,
                               show_progress=False)
            assert result_b.exit_code == 0, result_b.report["failed"]
            # A's shard still reads its copy (its commit is held): B's staging left it in place
            assert _staged(stage_dir, a_slide.name), "job B's staging deleted the copy job A's shard reads"
        finally:
            b_done.set()
            thread.join(300)
    assert results["a"].exit_code == 0, results["a"].report["failed"]
    want = local_reference[local_reference["slide"] == a_slide.name].reset_index(drop=True)
    pd.testing.assert_frame_equal(by_slide_name(results["a"].predictions()), want)
    # each job's release reached the cache that staged its copy: nothing is left behind
    assert not _staged(stage_dir, "*.tif"), os.listdir(stage_dir)
