"""Genome zarr layouts: small contigs packed into one array (version 2) read as the FASTA and as an
array per contig do, and genomes ingested in layout version 1 (an array per contig) still read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import dna_codes, shared_file

from gpubatch.core.errors import InputError
from gpubatch.sources.genome.ingest import ingest_genome
from gpubatch.sources.genome.opening import open_reference
from gpubatch.sources.genome.reference import (
    GENOME_ATTR,
    PACKED_ARRAY,
    load_contigs,
    open_genome_group,
)
from gpubatch.spec import parse_job

pysam = pytest.importorskip("pysam")

#: a genome zarr `gpubatch ingest genome` wrote in layout version 1, and the FASTA it was written from
V1_DIR = ("genomics", "gpubatch_v1")


def fasta_contigs(path: Path) -> dict[str, str]:
    """A FASTA's contigs as text, names the headers' first words."""
    contigs: dict[str, str] = {}
    name = ""
    for line in path.read_text().splitlines():
        if line.startswith(">"):
            name = line[1:].split()[0]
            contigs[name] = ""
        else:
            contigs[name] += line.strip()
    return contigs


def genome_codes(uri: Path | str) -> dict[str, bytes]:
    """Every contig's codes as a reader reads them, with a base of N padding either side."""
    reference = open_reference(str(uri))
    contigs = load_contigs(str(uri))
    return {name: bytes(reference.fetch(name, -1, length + 1))
            for name, length in zip(contigs.names, contigs.lengths, strict=True)}


def expected_codes(contigs: dict[str, str]) -> dict[str, bytes]:
    return {name: bytes(dna_codes("N" + seq + "N")) for name, seq in contigs.items()}


def soft_masked_fasta(path: Path, seed: int = 5) -> dict[str, str]:
    """Contigs from 1 base to 700, soft-masked runs, N runs and IUPAC codes among them."""
    rng = np.random.default_rng(seed)
    sizes = [700, 1, 37, 0, 120, 64, 63, 65, 250, 3, 500, 90]
    contigs = {}
    for i, size in enumerate(sizes):
        seq = "".join(rng.choice(list("ACGTacgtNRYKMSWBDHVn"), size))
        if size > 40:
            seq = seq[:10] + "N" * 20 + seq[30:]
        contigs[f"scaffold_{i}" if i != 2 else "seq|2"] = seq
    path.write_text("".join(f">{n} desc\n" + "\n".join(s[i:i + 50] for i in range(0, len(s), 50)) + "\n"
                            for n, s in contigs.items()))
    return contigs


def test_the_version_1_layout_is_still_read(tmp_path: Path) -> None:
    """A genome ingested before packing (an array per contig, ``arrays`` in its attribute) reads
    the bases of its FASTA, and the same as that FASTA ingested now."""
    v1 = shared_file(*V1_DIR, "v1.zarr")
    meta = open_genome_group(str(v1), None).attrs.asdict()[GENOME_ATTR]
    assert meta["version"] == 1 and "arrays" in meta and "layout" not in meta
    contigs = fasta_contigs(shared_file(*V1_DIR, "v1.fa"))
    assert load_contigs(str(v1)).names == tuple(contigs)
    assert genome_codes(v1) == expected_codes(contigs)
    ingest_genome(str(shared_file(*V1_DIR, "v1.fa")), str(tmp_path / "v2.zarr"), chunk_bases=64)
    assert genome_codes(tmp_path / "v2.zarr") == genome_codes(v1)


@pytest.mark.parametrize("pack_below", [0, 64, 1 << 20])
def test_packed_contigs_read_the_bases_of_the_fasta(tmp_path: Path, pack_below: int) -> None:
    """Contigs packed (below ``pack_below``), or each in its own array, or a mix: every base read
    back, padding past either end included, is the FASTA's, lowercase and IUPAC codes as ever."""
    fasta = tmp_path / "g.fa"
    contigs = soft_masked_fasta(fasta)
    out = tmp_path / "g.zarr"
    ingest_genome(str(fasta), str(out), chunk_bases=32, pack_below=pack_below)
    assert genome_codes(out) == expected_codes(contigs)
    layout = open_genome_group(str(out), None).attrs.asdict()[GENOME_ATTR]["layout"]
    own = {name for name, seq in contigs.items() if len(seq) >= pack_below}
    assert set(layout["arrays"]) == own
    assert [name for name, at in zip(contigs, layout["offsets"], strict=True) if at is None] == \
        [name for name in contigs if name in own]
    assert (out / PACKED_ARRAY).is_dir() == (len(own) < len(contigs))
    assert layout["packed_chunk"] in (None, 32)  # never more than the genome's chunk
    reference = open_reference(str(out))
    for name, seq in contigs.items():  # reads that start and end inside chunks, and across them
        padded = "N" * 50 + seq + "N" * 50
        for start, end in ((5, 40), (31, 33), (len(seq) - 7, len(seq) + 4)):
            assert bytes(reference.fetch(name, start, end)) == bytes(dna_codes(padded[start + 50 : end + 50])), \
                (name, start)


def test_a_layout_from_a_newer_gpubatch_is_refused_by_name(tmp_path: Path) -> None:
    """A reader that took a layout it does not know for its own would read the wrong bases."""
    out = tmp_path / "g.zarr"
    shutil.copytree(shared_file(*V1_DIR, "v1.zarr"), out)
    root = out / "zarr.json"
    doc = json.loads(root.read_text())
    doc["attributes"][GENOME_ATTR]["version"] = 3
    root.write_text(json.dumps(doc))
    for read in (load_contigs, open_reference):
        with pytest.raises(InputError, match="layout version 3, written by a newer gpubatch; this one reads "
                                             "versions 1 to 2: upgrade gpubatch"):
            read(str(out))


def test_a_chunk_missing_from_the_packed_array_is_refused_naming_the_contig(tmp_path: Path) -> None:
    """A partial copy lacks a packed chunk: the contigs in it are refused, not read as N."""
    fasta = tmp_path / "g.fa"
    fasta.write_text(">a\n" + "ACGT" * 25 + "\n>b\n" + "GATTACA" * 20 + "\n")  # 100 and 140 bases
    out = tmp_path / "g.zarr"
    ingest_genome(str(fasta), str(out), chunk_bases=64)  # packed chunks: [0, 64), [64, 128), ...
    (out / PACKED_ARRAY / "c" / "2").unlink()  # bases 128-191: b's 28-91
    reference = open_reference(str(out))
    assert bytes(reference.fetch("a", 0, 100)) == bytes(dna_codes("ACGT" * 25))
    assert bytes(reference.fetch("b", 0, 28)) == bytes(dna_codes(("GATTACA" * 20)[:28]))
    with pytest.raises(InputError, match=r"b:28: the genome store lacks the chunk"):
        reference.fetch("b", 20, 40)


# ------------------------------------------------------------------------------------------------
# end to end: a window job and a variant job give the same predictions from either layout


def run_predictions(tmp_path: Path, name: str, reference: Path, **windows: object) -> pd.DataFrame:
    from gpubatch.cli.demo_models import make_genome_model
    from gpubatch.runtime.runner import run_job

    model = tmp_path / "g.onnx"
    if not model.exists():
        make_genome_model(model, 32)
    job = parse_job({"kind": "genome", "windows": {"reference": str(reference), "length": 32, **windows},
                     "model": {"path": str(model), "batch_size": 8}, "output": {"uri": str(tmp_path / name)},
                     "run": {"profile": "inline"}})
    result = run_job(job, show_progress=False)
    assert result.exit_code == 0, result.report.get("failed")
    return pd.read_parquet(tmp_path / name / "predictions.parquet")


def ref_base(base: str) -> str:
    """A VCF's REF for a reference base: IUPAC codes other than N are spelled N."""
    return base.upper() if base.upper() in "ACGT" else "N"


def test_jobs_over_a_packed_genome_predict_as_over_its_fasta_and_an_unpacked_one(tmp_path: Path) -> None:
    fasta = tmp_path / "g.fa"
    contigs = soft_masked_fasta(fasta)
    pysam.faidx(str(fasta))
    ingest_genome(str(fasta), str(tmp_path / "packed.zarr"), chunk_bases=64, pack_below=300)
    ingest_genome(str(fasta), str(tmp_path / "own.zarr"), chunk_bases=64, pack_below=0)
    vcf = tmp_path / "v.vcf"
    snvs = [(name, pos) for name in ("scaffold_0", "scaffold_4", "scaffold_8", "scaffold_10")
            for pos in (1, 40, len(contigs[name]))]
    vcf.write_text("##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n" + "".join(
        f"{c}\t{p}\t{c}_{p}\t{ref_base(contigs[c][p - 1])}\tG\t.\t.\t.\n" for c, p in snvs))
    for spec in ({"regions": "genome", "stride": 16, "windows_per_shard": 7},
                 {"variants": str(vcf), "windows_per_shard": 5}):
        runs = {name: run_predictions(tmp_path, f"{name}-{len(spec)}-{'variants' in spec}", ref, **spec)
                for name, ref in (("fasta", fasta), ("packed", tmp_path / "packed.zarr"),
                                  ("own", tmp_path / "own.zarr"))}
        assert len(runs["fasta"]) >= len(snvs)  # every SNV scored; windows: over a hundred
        pd.testing.assert_frame_equal(runs["packed"], runs["fasta"])
        pd.testing.assert_frame_equal(runs["packed"], runs["own"])


def test_a_job_over_a_version_1_genome_predicts_as_over_it_ingested_now(tmp_path: Path) -> None:
    ingest_genome(str(shared_file(*V1_DIR, "v1.fa")), str(tmp_path / "v2.zarr"), chunk_bases=64)
    spec = {"regions": "genome", "stride": 8}
    old = run_predictions(tmp_path, "v1", shared_file(*V1_DIR, "v1.zarr"), **spec)
    new = run_predictions(tmp_path, "v2", tmp_path / "v2.zarr", **spec)
    assert len(old) > 50
    pd.testing.assert_frame_equal(old, new)
