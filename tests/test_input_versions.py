"""Inputs' versions on real servers: what a run records of them, and the requests it costs.

A moto S3 server behind the counting proxy of ``s3_fixtures``, and small local HTTP servers for
what S3 never answers (weak ETags, no Content-Length).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpubatch.spec import JobSpec

pysam = pytest.importorskip("pysam")
pytest.importorskip("moto")

from s3_fixtures import S3Stack, start_s3_stack  # noqa: E402


@pytest.fixture(scope="module")
def stack() -> Iterator[S3Stack]:
    s3 = start_s3_stack("versions")
    yield s3
    s3.close()


@pytest.fixture
def s3(stack: S3Stack) -> Iterator[S3Stack]:
    stack.proxy.reset()
    yield stack
    stack.proxy.reset()


def write_fasta(path: Path, contigs: dict[str, str], width: int = 60, bgzip: bool = False) -> Path:
    """A FASTA (bgzip-compressed when asked) and its samtools index (.fai, and .gzi for bgzip)."""
    plain = path.with_suffix(".plain") if bgzip else path
    with open(plain, "w") as f:
        for name, seq in contigs.items():
            f.write(f">{name}\n")
            f.writelines(seq[i : i + width] + "\n" for i in range(0, len(seq), width))
    if bgzip:
        pysam.tabix_compress(str(plain), str(path), force=True)
    pysam.faidx(str(path))
    return path


CONTIGS = {"chrA": "ACGT" * 500, "chrB": "GATTACA" * 100}


def genome_spec(tmp_path: Path, reference: str, storage: dict[str, Any] | None = None, **windows: Any) -> dict[str, Any]:
    from gpubatch.cli.demo_models import make_genome_model

    model = tmp_path / "g.onnx"
    if not model.exists():
        make_genome_model(model, 100)
    return {"kind": "genome", "input": {"storage": storage or {}},
            "windows": {"reference": reference, "length": 100, "windows_per_shard": 10, **windows},
            "model": {"path": str(model)}, "output": {"uri": str(tmp_path / "out")},
            "run": {"profile": "inline"}}


# -- the spec's result fields: asked once per run ------------------------------------------------


def test_a_remote_bed_is_asked_for_its_version_once_per_run(s3: S3Stack, tmp_path: Path) -> None:
    """The spec's result fields HEAD a remote BED; a run asked for them three times (the spec
    record, its hash, the workers' hash). Now once per run, and a second run asks again: a BED
    changed between the runs is still a changed result field."""
    from gpubatch.runtime.runner import run_job
    from gpubatch.sources.genome.source import GenomeSource

    fasta = write_fasta(tmp_path / "ref.fa", CONTIGS)
    bed = tmp_path / "regions.bed"
    bed.write_text("chrA\t0\t1000\n")
    uri = s3.upload(bed, "beds/once.bed")
    job = JobSpec.model_validate(genome_spec(tmp_path, str(fasta), s3.options(), regions=uri))
    key = uri.removeprefix("s3://")
    GenomeSource().plan(job)  # the plan's own reads of the BED, counted apart
    planned = s3.proxy.heads.get(key, 0)
    s3.proxy.reset()
    assert run_job(job, profile="inline", show_progress=False).exit_code == 0
    assert s3.proxy.heads.get(key, 0) == planned + 1
    s3.proxy.reset()
    assert run_job(job, profile="inline", resume=True, show_progress=False).exit_code == 0
    assert s3.proxy.heads.get(key, 0) == planned + 1  # the plan is made again on resume
    bed.write_text("chrA\t0\t1000\nchrA\t1000\t2000\n")
    s3.upload(bed, "beds/once.bed")
    from gpubatch.core.errors import SpecError

    with pytest.raises(SpecError, match="windows.regions_version"):
        run_job(job, profile="inline", resume=True, show_progress=False)
