"""Two jobs on one Dask cluster (``cluster: scheduler``, or the Python API twice on one Client)
share its worker processes, and neither's settings reach the other's shards there: each shard
reads with its own job's profile storage options (credentials, range reader) and retries under
its own run's policy, in its own threads too (the pipeline's readers, the stage cache's
downloads), whatever the other job's shards set meanwhile and after either ends.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from conftest import by_slide_name, slide_job
from s3_fixtures import S3Stack

from gpubatch.io.retry import RetryPolicy, default_policy, run_policy

pytest_plugins = ["s3_fixtures"]

#: the access key ids of each job's profile (moto takes any): what signs a request says whose it is
KEY_A, KEY_B, CLIENT_KEY = "JOBAKEYJOBAKEY01", "JOBBKEYJOBBKEY01", "CLIENTKEYCLIENT1"


def _profile(path: Path, key: str, **settings: Any) -> str:
    path.write_text(yaml.safe_dump({"storage": {"key": key, "secret": f"secret-of-{key}"}, **settings}))
    return str(path)


def _signers(s3: S3Stack, reads: list[tuple[str, str | None]], uri: str) -> set[str | None]:
    key = uri.removeprefix("s3://")
    return {signer for read, signer in reads if read == key}


def test_a_held_job_reads_with_its_own_profile_credentials_after_another_job_ran(
        tmp_path: Path, s3: S3Stack, slides_dir: Path, mean_model: Path, local_reference: pd.DataFrame,
        monkeypatch: Any) -> None:
    """Job A's shard is held at its first reads (every read signed with A's profile key waits at
    the proxy) while job B, whose profile names other credentials, runs a shard on the same
    worker. The worker replaced its process's storage options with B's then, and A's shard
    read on with B's credentials (with another endpoint: failing, or another bucket's object of
    the same name). Each shard now reads with its own job's, in every thread it reads on."""
    from distributed import LocalCluster

    from gpubatch.runtime.runner import run_job
    from gpubatch.spec import JobSpec

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CLIENT_KEY)  # the client's own: it plans with no profile
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "client-secret")
    folder = f"share-jobs-{uuid.uuid4().hex[:8]}"
    a_slide, b_slide = sorted(slides_dir.glob("*.tif"))[:2]
    a_uri, b_uri = s3.upload(a_slide, f"{folder}/a/{a_slide.name}"), s3.upload(b_slide, f"{folder}/b/{b_slide.name}")
    # A reads through fsspec, whose reads are not pinned: its shard asks the version again after them
    profile_a = _profile(tmp_path / "a.yaml", KEY_A, range_reader="fsspec")
    profile_b = _profile(tmp_path / "b.yaml", KEY_B)
    where = {k: v for k, v in s3.options().items() if k not in ("key", "secret")}  # the profiles sign
    b_done = threading.Event()
    s3.proxy.configure(reads_held_for={KEY_A: 120.0}, stall_release=b_done.is_set)
    job_a = slide_job([a_uri], mean_model, tmp_path / "out-a", input={"uris": [a_uri], "storage": where})
    job_b = slide_job([b_uri], mean_model, tmp_path / "out-b", input={"uris": [b_uri], "storage": where})
    results: dict[str, Any] = {}
    with LocalCluster(n_workers=1, processes=False, threads_per_worker=2, dashboard_address=None,
                      silence_logs=50) as cluster:
        def run_a() -> None:
            results["a"] = run_job(JobSpec.model_validate(job_a), profile=profile_a,
                                   scheduler=cluster.scheduler_address, show_progress=False)

        thread = threading.Thread(target=run_a)
        thread.start()
        try:
            deadline = time.monotonic() + 120
            while KEY_A not in _signers(s3, list(s3.proxy.signed_reads), a_uri):  # A's shard reads, held
                assert thread.is_alive() and time.monotonic() < deadline, "job A's shard never read its slide"
                time.sleep(0.02)
            result_b = run_job(JobSpec.model_validate(job_b), profile=profile_b,
                               scheduler=cluster.scheduler_address, show_progress=False)
            assert result_b.exit_code == 0, result_b.report["failed"]
            after_b = len(s3.proxy.signed_reads)
        finally:
            b_done.set()
            thread.join(300)
    reads = list(s3.proxy.signed_reads)
    assert results["a"].exit_code == 0, results["a"].report["failed"]
    assert KEY_B not in _signers(s3, reads, a_uri), "job A's shard read with job B's credentials"
    assert KEY_A in _signers(s3, reads[after_b:], a_uri), "job A's shard read no more after B ran"
    assert _signers(s3, reads, b_uri) <= {KEY_B, CLIENT_KEY}
    want = local_reference[local_reference["slide"] == a_slide.name].reset_index(drop=True)
    pd.testing.assert_frame_equal(by_slide_name(results["a"].predictions()), want)


def test_overlapping_runs_each_keep_their_retry_policy_to_the_end() -> None:
    """Runs A and B overlap in one process (two jobs' shards on a worker, two API runs on one
    client): A ends first. B's calls then retried under the defaults (A's end put back what
    was before A), and once B ended the process kept A's policy for good."""
    policy_a, policy_b = RetryPolicy(attempts=2), RetryPolicy(attempts=9)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, RetryPolicy] = {}

    def run_a() -> None:
        with run_policy(policy_a):
            a_in.set()
            b_in.wait(30)
            seen["a"] = default_policy()
        a_out.set()

    def run_b() -> None:
        a_in.wait(30)
        with run_policy(policy_b):
            b_in.set()
            a_out.wait(30)
            seen["b after a ended"] = default_policy()

    threads = [threading.Thread(target=run_a), threading.Thread(target=run_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert seen == {"a": policy_a, "b after a ended": policy_b}
    assert default_policy() == RetryPolicy()  # neither run's is left behind


def test_a_runs_policy_and_storage_reach_its_reader_and_download_threads(tmp_path: Path) -> None:
    """What a shard's work runs on other threads (the pipeline's feeder, readers and writer, the
    stage cache's downloads) takes the shard's retry policy and profile storage options: those
    threads carry its context. (Plain threads and pools took the process's.)"""
    import numpy as np

    from gpubatch.core.clocks import StageClocks
    from gpubatch.engine.pipeline import PipelineConfig, run_pipeline
    from gpubatch.io import storage
    from gpubatch.io.stage_cache import StageCache
    from gpubatch.io.storage_profile import shard_storage
    from gpubatch.sources.base import ItemBlock

    policy = RetryPolicy(attempts=7)
    seen: list[tuple[RetryPolicy, dict[str, Any]]] = []

    def note() -> None:
        seen.append((default_policy(), storage.resolve_options("s3://b/k", None)))

    class Reader:
        n_items = 4

        def read_units(self) -> Any:
            for i in range(self.n_items):
                yield lambda i=i: (note(), ItemBlock(np.zeros((1, 2, 2, 3), np.uint8),
                                                     {"i": np.array([i])}))[1]

    class Sink:
        def write(self, index: Any, outputs: Any) -> None:
            note()

    cache = StageCache(str(tmp_path / "stage"))
    with shard_storage({"storage": {"key": "SHARDKEY"}}), run_policy(policy):
        run_pipeline(Reader(), lambda items, clocks: {"y": np.zeros(len(items))}, Sink(),  # type: ignore[arg-type]
                     PipelineConfig(2, readers=2, prefetch_batches=2), StageClocks())
        cache._pool.submit(note).result(30)
    cache.clear()
    assert len(seen) >= 6
    assert all(p == policy and o.get("key") == "SHARDKEY" for p, o in seen), seen
