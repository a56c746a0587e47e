"""A FASTA reference given as an http(s) URL with a query (a presigned URL's signature, a SAS
token), served by bench/rangeserver.py (HTTP GET and HEAD with Range, in its own process): its
``.fai`` and ``.gzi`` are found beside it (the path's suffix, the query kept after it), and a
missing index is named at the URL it was looked for (redacted), with how to make one."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pytest
from conftest import outcome_within

from gpubatch.core.errors import SpecError
from gpubatch.io.uris import child, suffixed
from gpubatch.spec import JobSpec

pysam = pytest.importorskip("pysam")
s3fs = pytest.importorskip("s3fs")

from test_input_versions import CONTIGS, genome_spec, write_fasta  # noqa: E402

if TYPE_CHECKING:
    from s3_fixtures import S3Stack

pytest_plugins = ["s3_fixtures"]

RANGESERVER = Path(__file__).resolve().parents[1] / "bench" / "rangeserver.py"
SIGNED = "?X-Amz-Signature=deadbeefcafe0123456789&X-Amz-Expires=600"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """(the folder bench/rangeserver.py serves, its URL): the server ignores a query, as a bucket
    behind a presigned URL or a SAS token answers the object its path names."""
    root = tmp_path / "served"
    root.mkdir()
    proc = subprocess.Popen([sys.executable, str(RANGESERVER), str(root)], stdout=subprocess.PIPE, text=True)
    try:
        line = outcome_within(lambda: proc.stdout.readline() if proc.stdout else "", 30, "the range server's port")
        yield root, f"http://127.0.0.1:{int(str(line).split()[1])}"
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_a_suffix_goes_on_the_path_before_a_urls_query() -> None:
    assert suffixed(f"https://h/g.fa{SIGNED}", ".fai") == f"https://h/g.fa.fai{SIGNED}"
    assert suffixed("https://h/g.fa#x", ".gzi") == "https://h/g.fa.gzi#x"
    assert suffixed("s3://b/odd?name.fa", ".fai") == "s3://b/odd?name.fa.fai"  # a key's '?' is its own
    assert suffixed("/data/g.fa", ".fai") == "/data/g.fa.fai"
    assert child(f"https://h/g.zarr/{SIGNED}", "zarr.json") == f"https://h/g.zarr/zarr.json{SIGNED}"
    assert child("s3://b/g.zarr/", "zarr.json") == "s3://b/g.zarr/zarr.json"


@pytest.mark.parametrize("bgzip", [False, True])
def test_a_presigned_reference_runs_with_the_index_beside_it(served: tuple[Path, str], tmp_path: Path,
                                                             bgzip: bool) -> None:
    """The .fai (and .gzi) were asked at the FASTA's URL with '.fai' appended to the query's last
    value, which a server answers with the FASTA itself: the plan refused the reference (its
    first line is no .fai line), or took it for a genome zarr. Now the run reads the windows a
    local run of the same reference reads."""
    from gpubatch.runtime.runner import run_job

    root, url = served
    name = "ref.fa.gz" if bgzip else "ref.fa"
    fasta = write_fasta(root / name, CONTIGS, bgzip=bgzip)
    spec = genome_spec(tmp_path, f"{url}/{name}{SIGNED}", windows_per_shard=5)
    got = run_job(JobSpec.model_validate(spec), profile="inline", show_progress=False)
    assert got.exit_code == 0, got.report["failed"]
    local = genome_spec(tmp_path, str(fasta), windows_per_shard=5)
    want = run_job(JobSpec.model_validate({**local, "output": {"uri": str(tmp_path / "local")}}),
                   profile="inline", show_progress=False)
    on = ["chrom", "start", "end", "strand"]
    pd.testing.assert_frame_equal(got.predictions().sort_values(on).reset_index(drop=True),
                                  want.predictions().sort_values(on).reset_index(drop=True))


@pytest.mark.parametrize(("bgzip", "missing"), [(False, ".fai"), (True, ".gzi")])
def test_a_missing_index_of_a_presigned_reference_names_where_it_was_looked_for(
        served: tuple[Path, str], tmp_path: Path, bgzip: bool, missing: str) -> None:
    root, url = served
    name = "ref.fa.gz" if bgzip else "ref.fa"
    write_fasta(root / name, CONTIGS, bgzip=bgzip)
    (root / f"{name}{missing}").unlink()
    spec = genome_spec(tmp_path, f"{url}/{name}{SIGNED}")
    from gpubatch.sources.genome.source import GenomeSource

    with pytest.raises(SpecError) as caught:
        GenomeSource().plan(JobSpec.model_validate(spec))
    message = str(caught.value)
    assert f"FASTA index {url}/{name}{missing}?X-Amz-Signature=***" in message, message
    assert "`samtools faidx`" in message and "`gpubatch ingest genome" in message, message
    assert "deadbeefcafe" not in message


@pytest.mark.parametrize(("bgzip", "refused"), [(False, ".fai"), (True, ".gzi")])
def test_an_index_a_presigned_url_does_not_sign_says_it_needs_its_own(
        tmp_path: Path, s3: S3Stack, bgzip: bool, refused: str) -> None:
    """A URL presigned for the FASTA alone signs that object only: a real S3 server (moto, with
    the fault proxy answering the index 403 AccessDenied as S3 answers a signature of another
    key) refuses the index asked with the FASTA's query. The user saw "access denied ... sign
    it again", and signing the FASTA again changes nothing. Now the error says the index needs
    its own signature and gives what works, with the signature redacted."""
    from gpubatch.sources.genome.source import GenomeSource

    name = "ref.fa.gz" if bgzip else "ref.fa"
    fasta = write_fasta(tmp_path / name, CONTIGS, bgzip=bgzip)
    key = f"presigned/{uuid.uuid4().hex}/{name}"
    for end in ("", ".fai", ".gzi") if bgzip else ("", ".fai"):
        s3.upload(Path(f"{fasta}{end}"), f"{key}{end}")
    signer = s3fs.S3FileSystem(skip_instance_cache=True, **s3.options(config_kwargs={"signature_version": "s3v4"}))
    signed = signer.url(f"{s3.bucket}/{key}")
    assert "X-Amz-Signature=" in signed
    s3.proxy.configure(forbidden={f"{s3.bucket}/{key}{refused}"})
    with pytest.raises(SpecError) as caught:
        GenomeSource().plan(JobSpec.model_validate(genome_spec(tmp_path, signed)))
    message = str(caught.value)
    assert f"{s3.proxy.url}/{s3.bucket}/{key}{refused}?" in message, message
    assert "its own" in message and "local copy" in message and "gpubatch ingest genome" in message, message
    signature = signed.split("X-Amz-Signature=", 1)[1].split("&", 1)[0]
    assert signature not in message and "X-Amz-Signature=***" in message, message
    from gpubatch.sources.genome.ingest import ingest_genome

    ingest_genome(signed, str(tmp_path / "g.zarr"))  # the advice: the FASTA's own URL is enough
    shards, failed = GenomeSource().plan(JobSpec.model_validate(genome_spec(tmp_path, str(tmp_path / "g.zarr"))))
    assert shards and not failed
