"""A draft assembly's genome zarr (thousands of small contigs, packed) read by a window job:
what each shard asks of object storage, counted at a real S3 server (moto behind the counting
proxy of ``s3_fixtures``), and the predictions the same as over its FASTA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gpubatch.sources.genome.ingest import ingest_genome
from gpubatch.sources.genome.opening import open_reference
from gpubatch.sources.genome.reference import load_contigs
from gpubatch.spec import JobSpec

pysam = pytest.importorskip("pysam")
pytest.importorskip("moto")

from s3_fixtures import S3Stack  # noqa: E402
from test_input_versions import genome_spec  # noqa: E402

pytest_plugins = ["s3_fixtures"]

CONTIGS = 3000


def assembly(path: Path, contigs: int = CONTIGS, seed: int = 3) -> Path:
    """A FASTA of ``contigs`` scaffolds of 20 to 200 bases (N runs among them), with its .fai."""
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b"ACGTACGTacgtN", np.uint8)
    path.write_text("".join(f">scaffold_{i}\n{alphabet[rng.integers(0, len(alphabet), int(n))].tobytes().decode()}\n"
                            for i, n in enumerate(rng.integers(20, 201, contigs))))
    pysam.faidx(str(path))
    return path


def predictions(tmp_path: Path, reference: str, name: str, storage: dict | None = None) -> pd.DataFrame:
    from gpubatch.runtime.runner import run_job

    spec = genome_spec(tmp_path, reference, storage, regions="genome", windows_per_shard=1500)
    job = JobSpec.model_validate({**spec, "output": {"uri": str(tmp_path / name)}})
    result = run_job(job, profile="inline", show_progress=False)
    assert result.exit_code == 0, result.report["failed"]
    assert result.report["shards_total"] >= 3
    return pd.read_parquet(tmp_path / name / "predictions.parquet")


def test_a_job_over_a_packed_genome_on_s3_reads_its_contig_table_once_and_each_chunk_once(
        s3: S3Stack, tmp_path: Path) -> None:
    """The genome's root attribute (every contig's name, length and offset: ~11 MB at 200,000
    contigs) was read by the plan twice and by each shard's start again, a GET and a JSON parse
    each; now once in the process, which its later shards and the plan's other steps share. And
    each contig's read fetched its 64 KB packed chunk again (a GET per contig: 3,000 here, for
    6 chunks); now a reader keeps its last chunks, so a chunk is fetched about once a shard,
    and the packed array's metadata once a shard (each of a reader's threads opened it).
    The predictions are those of the same job over the FASTA."""
    from gpubatch.sources.genome.indexes import forget_indexes

    fasta = assembly(tmp_path / "asm.fa")
    uri = f"s3://{s3.bucket}/many/asm.zarr"
    ingest_genome(str(fasta), uri, s3.options(via_proxy=False))
    forget_indexes()  # as a fresh worker process
    s3.proxy.reset()
    remote = predictions(tmp_path, uri, "remote", s3.options())
    shards = -(-len(remote) // 1500)
    key = uri.removeprefix("s3://")
    assert s3.proxy.gets.get(f"{key}/zarr.json") == 1
    assert s3.proxy.gets.get(f"{key}/__packed__/zarr.json", 0) <= shards  # opened once a reader
    chunk_gets = {k: n for k, n in s3.proxy.gets.items() if k.startswith(f"{key}/__packed__/c/")}
    assert 5 <= len(chunk_gets) <= 8  # ~330 kb of contigs in 64 KB chunks
    assert sum(chunk_gets.values()) <= len(chunk_gets) + 2 * shards
    pd.testing.assert_frame_equal(remote, predictions(tmp_path, str(fasta), "fasta"))


def test_a_genome_ingested_again_in_its_place_is_read_anew_not_as_kept(tmp_path: Path) -> None:
    """A process keeps a genome's contig table under its ``zarr.json``'s version: the genome
    ingested again at the same path (another FASTA) is another version, whose table and bases
    are read, never the kept ones of the genome it replaced."""
    out = str(tmp_path / "g.zarr")
    first = tmp_path / "a.fa"
    first.write_text(">a\nACGTACGT\n>b\nGGGG\n")
    ingest_genome(str(first), out)
    assert load_contigs(out).names == ("a", "b")
    assert bytes(open_reference(out).fetch("b", 0, 4)) == bytes([2, 2, 2, 2])
    second = tmp_path / "b.fa"
    second.write_text(">b\nTTTTTT\n>c\nCCCCCCCCCCCC\n")
    ingest_genome(str(second), out, overwrite=True)
    assert load_contigs(out).names == ("b", "c")
    assert bytes(open_reference(out).fetch("b", 0, 6)) == bytes([3] * 6)
