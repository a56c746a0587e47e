"""The report's requests by kind against the server's own log: a genome run whose reference, BED
and output are all on a real S3 server (moto), behind the recording proxy of ``s3_fixtures``.

The report counted gpubatch's reads and HEADs of inputs only: the plan's listings and existence
checks, the BED read through an fsspec file, and every request of the output store (the lease,
the ledger, commit records, parts, the merge's reads and writes, deletes) went uncounted, and its
"not counted" sentence had to name them. Each kind it now reports must be what the server saw,
request for request, up to the report's own write (what follows it cannot be in it).
"""

from __future__ import annotations

import urllib.parse
from collections import Counter
from pathlib import Path

import pytest

from gpubatch.spec import JobSpec

pytest.importorskip("pysam")
pytest.importorskip("moto")

from s3_fixtures import S3Stack  # noqa: E402
from test_genome_versions import CLIENTS, _upload_bgzip  # noqa: E402
from test_input_versions import genome_spec  # noqa: E402

pytest_plugins = ["s3_fixtures"]


def request_kind(method: str, path: str) -> str:
    """A logged request's kind as S3 bills it (io.metrics.S3_OPERATION_KINDS, from the wire)."""
    parts = urllib.parse.urlsplit(path)
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    object_key = "/" in parts.path.strip("/")
    if method == "HEAD":
        return "head"
    if method == "GET":
        if "list-type" in query or "uploads" in query or "uploadId" in query or not object_key:
            return "list" if not {"location", "versioning"} & set(query) else "other"
        return "get"
    if method == "DELETE" or (method == "POST" and "delete" in query):
        return "delete"
    return "write"  # PUT: an object, a part; POST: a multipart upload's start or completion


def server_kinds(log: list[tuple[str, str]]) -> dict[str, int]:
    """The server's requests by kind, up to the PUT of report.json (the report counts up to it)."""
    seen: Counter[str] = Counter()
    for method, path in log:
        if method == "PUT" and urllib.parse.urlsplit(path).path.endswith("/report.json"):
            return dict(seen)
        seen[request_kind(method, path)] += 1
    raise AssertionError("report.json was never written")


@pytest.mark.parametrize(("client", "profile"), [*((c, "inline") for c in CLIENTS), ("obstore", "local")])
def test_every_request_kind_the_report_counts_is_what_the_server_saw(
        s3: S3Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client: str, profile: str) -> None:
    """Inputs (a bgzip FASTA, its indexes, a BED) and the output on S3, 2 shards, in this process
    and in a worker process (``local``: its last commit record is written after its last claim,
    and gathered at the run's end). Before (obstore, inline), the report said 16 requests + 15
    HEADs where the server had answered 30 GETs, 69 HEADs, 49 listings, 84 writes and 8 deletes;
    now get, head, list, write and delete each equal the server's count of them, and the
    client's share of the listings and writes is some, not all."""
    from gpubatch.report.text import format_summary
    from gpubatch.runtime.runner import run_job
    from gpubatch.sources.genome.indexes import forget_indexes

    monkeypatch.setenv("GPUBATCH_RANGE_READER", client)
    uri = _upload_bgzip(s3, tmp_path, f"kinds-{client}-{profile}/ref.fa.gz")
    bed = tmp_path / "regions.bed"
    bed.write_text("chrA\t0\t1000\nchrB\t0\t600\n")
    bed_uri = s3.upload(bed, f"kinds-{client}-{profile}/regions.bed")
    spec = genome_spec(tmp_path, uri, s3.options(), regions=bed_uri)
    spec["output"] = {"uri": s3.uri(f"kinds-{client}-{profile}/out"), "storage": s3.options()}
    spec["run"].update(profile=profile, workers=1, heartbeat_s=3600, lease_stale_s=10800)  # no beat mid-run: the log's order is the run's
    job = JobSpec.model_validate(spec)
    forget_indexes()
    s3.proxy.reset()
    result = run_job(job, profile=profile, show_progress=False)
    assert result.exit_code == 0, result.report["failed"]
    assert result.report["shards_total"] >= 2
    storage = result.report["storage"]
    seen = server_kinds(s3.proxy.log)
    assert seen.get("write", 0) > 0 and seen.get("list", 0) > 0 and seen.get("delete", 0) > 0, seen
    assert storage["by_kind"] == seen, s3.proxy.log
    client_share = storage["client_by_kind"]
    assert all(0 < client_share.get(kind, 0) < n for kind, n in seen.items() if kind in ("list", "write")), client_share
    text = format_summary(result.report)
    line = next(line for line in text.splitlines() if "by kind: " in line)
    assert all(f" {n} {kind}" in line for kind, n in seen.items()), line
    assert "not counted: listings" not in text
