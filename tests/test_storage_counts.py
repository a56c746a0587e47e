"""The report's storage line against what the object store saw: a real S3 server (moto) behind the
counting proxy of ``s3_fixtures``, a genome run over a bgzip reference through obstore and s3fs.

Its requests are every GET of the reference and its indexes the server answered, the plan's and
index reads included (they went uncounted: 6 reported of 18); a reader asks the FASTA's size
once, not per read; and retries made before the run in the same process are not the run's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gpubatch.spec import JobSpec

pytest.importorskip("pysam")
pytest.importorskip("moto")

from s3_fixtures import S3Stack  # noqa: E402
from test_genome_versions import CLIENTS, _upload_bgzip  # noqa: E402
from test_input_versions import genome_spec  # noqa: E402

pytest_plugins = ["s3_fixtures"]

ENDS = ("", ".fai", ".gzi")


def _run(s3: S3Stack, tmp_path: Path, uri: str, validate_first: bool = False) -> dict:
    """The report of a 3-shard genome run over ``uri``; the proxy's counts are of the run only."""
    from gpubatch.runtime.preflight import validate_job
    from gpubatch.runtime.runner import run_job
    from gpubatch.sources.genome.indexes import forget_indexes

    job = JobSpec.model_validate(genome_spec(tmp_path, uri, s3.options()))
    if validate_first:
        validate_job(job, profile_name="inline")
    forget_indexes()
    s3.proxy.reset()
    result = run_job(job, profile="inline", show_progress=False)
    assert result.exit_code == 0, result.report["failed"]
    assert result.report["shards_total"] == 3
    return result.report


@pytest.mark.parametrize("client", CLIENTS)
def test_the_storage_requests_are_every_get_the_server_answered(
        s3: S3Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client: str) -> None:
    """The plan's reads (the FASTA's probe, its .fai and .gzi, the checks of both against it) and
    a worker's index reads had no shard's clocks, and were not counted: 6 requests reported where
    the server answered 18 GETs. Now every read of bytes gpubatch makes is, the client's apart
    in the text ("client N, shards M"); s3fs's existence check of the genome zarr (a listing) is
    counted by kind, apart from the reads."""
    from gpubatch.report.html import render_html
    from gpubatch.report.text import format_summary

    monkeypatch.setenv("GPUBATCH_RANGE_READER", client)
    uri = _upload_bgzip(s3, tmp_path, f"counts-{client}/ref.fa.gz")
    report = _run(s3, tmp_path, uri)
    key = uri.removeprefix("s3://")
    answered = sum(s3.proxy.gets.get(key + end, 0) for end in ENDS)
    storage = report["storage"]
    assert storage["requests"] == answered > 6, s3.proxy.gets
    assert s3.proxy.stats["GET"] == answered + 1  # the existence check's listing, counted apart
    assert storage["by_kind"]["list"] == 1
    client_reads = storage["client_requests"]
    assert 0 < client_reads < answered
    text = format_summary(report)
    assert f"storage: {answered} requests (client {client_reads}, shards {answered - client_reads}) of " in text
    assert "not counted: zarr's and wsidicom's own input reads" in text
    assert f"{answered} (client {client_reads}, shards {answered - client_reads})" in render_html(report)


def test_a_bgzip_reference_through_s3fs_is_asked_its_size_once_per_reader(
        s3: S3Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fsspec's reader sent a HEAD for the FASTA's size at every read of a bgzip block run (its
    last block's end): 22 HEADs of the FASTA for 3 shards. It keeps the size as obstore's does,
    and a shard's reader takes the size of the version its plan recorded. Left: the plan's 4 (the
    format's probe, the index check's reader, the result fields' version, the planned identity)
    and 3 a shard that fsspec's unpinned reads need (the identity at its start, the FASTA held to
    the planned version, the identity again before the commit)."""
    monkeypatch.setenv("GPUBATCH_RANGE_READER", "fsspec")
    uri = _upload_bgzip(s3, tmp_path, "counts-heads/ref.fa.gz")
    report = _run(s3, tmp_path, uri)
    assert s3.proxy.heads.get(uri.removeprefix("s3://")) == 4 + 3 * 3, s3.proxy.heads
    answered = sum(s3.proxy.heads.get(uri.removeprefix("s3://") + end, 0) for end in ENDS)
    assert report["storage"]["heads"] == answered + 1  # and the 404 of the genome zarr's zarr.json


@pytest.mark.parametrize("client", CLIENTS)
def test_retries_before_the_run_in_its_process_are_not_the_runs(
        s3: S3Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client: str) -> None:
    """A ``validate`` in the same process (a notebook's way) whose read of the .fai was throttled
    once made a retry outside any shard's clocks, which the run's report then counted: 1 retry
    reported for a run the server answered without an error. The run's retries are its own."""
    monkeypatch.setenv("GPUBATCH_RANGE_READER", client)
    uri = _upload_bgzip(s3, tmp_path, f"counts-retries-{client}/ref.fa.gz")
    s3.proxy.configure(slow_gets={uri.removeprefix("s3://") + ".fai": 1})
    from gpubatch.runtime.preflight import validate_job

    validate_job(JobSpec.model_validate(genome_spec(tmp_path, uri, s3.options())), profile_name="inline")
    assert s3.proxy.stats["errors"] == 1  # the validate's read was retried
    report = _run(s3, tmp_path, uri)
    assert s3.proxy.stats["errors"] == 0
    assert report["storage"]["retries"] == 0
