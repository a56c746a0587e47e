"""A text VCF's lines reach htslib with their first eight fields bounded (``variant_guard``).

A REF or ALT longer than one read of the reference holds, or an ID/CHROM/POS/QUAL/FILTER field
of over 64 KiB, makes its record a bad one, named by its line and left out unread; an INFO of over
64 KiB is dropped (variant mode does not read it) and the record scored; genotype columns and
header lines pass whole. The same in every form of the file (plain, bgzip, plain gzip).
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pytest

from gpubatch.sources.genome.reference import ContigTable
from gpubatch.sources.genome.variant_guard import SHORT_LINE, FieldGuard
from gpubatch.sources.genome.variants import read_variants

pysam = pytest.importorskip("pysam")

CONTIG = "".join(np.random.default_rng(11).choice(list("ACGT"), 5000))
CONTIGS = ContigTable(("chrA",), (len(CONTIG),))
MAX_ALLELE = 2048
SAMPLES = [f"S{i}" for i in range(30_000)]  # a #CHROM line and genotype columns of over 64 KiB


def _snv(pos: int, rid: str = ".", info: str = ".") -> str:
    return f"chrA\t{pos}\t{rid}\t{CONTIG[pos - 1]}\t{'ACGT'[pos % 4]}\t.\t.\t{info}"


def _vcf_text() -> str:
    genotypes = "\tGT\t" + "\t".join("0|1" for _ in SAMPLES)
    rows = [_snv(p) + genotypes for p in range(100, 1100, 100)]
    rows[1] = _snv(200, info="X=" + "a" * 200_000) + genotypes         # INFO dropped, scored
    rows[2] = f"chrA\t301\t.\t{'ACGT' * 50_000}\tA\t.\t.\t." + genotypes  # REF of 200,000 in a long line
    rows[3] = _snv(400, rid="r" * 100_000) + genotypes                  # an ID of 100,000 bytes
    rows[4] = f"chrA\t501\t.\t{CONTIG[500]}\t{'G' * 3000}\t.\t.\t."       # ALT of 3,000 in a short line
    header = ("##fileformat=VCFv4.2\n##contig=<ID=chrA,length=5000>\n"
              f"##note={'x' * 100_000}\n"
              "##INFO=<ID=X,Number=1,Type=String,Description=\"x\">\n"
              "##FORMAT=<ID=GT,Number=1,Type=String,Description=\"Genotype\">\n"
              "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\t" + "\t".join(SAMPLES) + "\n")
    return header + "".join(r + "\n" for r in rows)


@pytest.mark.parametrize("form", ["plain", "bgzip", "gzip"])
def test_long_fields_are_quarantined_by_line_and_a_long_info_dropped(tmp_path: Path, form: str) -> None:
    text = _vcf_text()
    path = tmp_path / "v.vcf"
    path.write_text(text)
    if form == "bgzip":
        pysam.tabix_compress(str(path), str(tmp_path / "v.vcf.gz"))
        path = tmp_path / "v.vcf.gz"
    elif form == "gzip":
        path = tmp_path / "v.vcf.gz"
        path.write_bytes(gzip.compress(text.encode()))
    table = read_variants(str(path), CONTIGS, max_bad=0.5, max_allele=MAX_ALLELE)
    assert table.pos == [100, 200, 600, 700, 800, 900, 1000]
    failed = {f["input"]: f["error"] for f in table.failed}
    assert list(failed) == [f"{path.name} line {n}" for n in (9, 10, 11)]
    lines = [failed[f"{path.name} line {n}"] for n in (9, 10, 11)]
    assert lines[0].startswith("REF of 200,000 bases is longer than the 2,048 bases one read of the reference holds")
    assert "windows.chunk_bases to at least 200,000" in lines[0]
    assert lines[1].startswith("its ID field is 100,000 bytes long (over 65,536)")
    assert lines[2].startswith("ALT of 3,000 bases is longer than the 2,048 bases")


def _guarded(text: bytes, pieces: list[int]) -> bytes:
    """``text`` through a FieldGuard, fed in pieces of the sizes given (the rest in one)."""
    out = io.BytesIO()
    guard = FieldGuard(out, MAX_ALLELE)
    at = 0
    for size in [*pieces, len(text)]:
        guard.feed(text[at : at + size])
        at += size
    guard.close()
    return out.getvalue()


def test_the_guard_gives_the_same_lines_however_the_stream_is_cut() -> None:
    """Lines up to 64 KiB pass byte for byte; a long line's first fields are read across reads of
    any size: one line in, one line out, whatever the cuts."""
    text = _vcf_text().encode()
    whole = _guarded(text, [])
    assert whole.count(b"\n") == text.count(b"\n")
    rng = np.random.default_rng(5)
    for scale in (7, 1000, SHORT_LINE, 3 * SHORT_LINE):
        assert _guarded(text, rng.integers(1, scale + 1, 400).tolist()) == whole
    short = b"".join(_snv(p).encode() + b"\n" for p in range(1, 4000))
    assert _guarded(short, rng.integers(1, 5000, 100).tolist()) == short
    kept = whole.split(b"\n")
    assert kept[7].split(b"\t")[7] == b"." and kept[7].split(b"\t")[9] == b"0|1"  # INFO dropped, genotypes kept
    assert kept[8] == b"chrA\t301\t.\tN\t.\t.\t.\t."  # the placeholder of the REF's line
    assert kept[2] == text.split(b"\n")[2] and len(kept[5]) > SHORT_LINE  # header lines whole


def test_a_table_line_too_long_for_its_alleles_is_quarantined_unread(tmp_path: Path) -> None:
    path = tmp_path / "v.tsv"
    rows = [f"chrA\t{p}\t{CONTIG[p - 1]}\tA" for p in range(100, 1100, 100)]
    rows[3] = f"chrA\t400\t{'ACGT' * 20_000}\tA"
    path.write_text("chrom\tpos\tref\talt\n" + "".join(r + "\n" for r in rows))
    table = read_variants(str(path), CONTIGS, max_bad=0.5, max_allele=1024)
    assert 400 not in table.pos and len(table.pos) == 9
    assert [f["input"] for f in table.failed] == ["v.tsv line 5"]
    assert table.failed[0]["error"].startswith("the line is 80,011 bytes long, over the 67,584 bytes a line is read up to")
    assert "its REF is 80,000 bases, longer than the 1,024 bases" in table.failed[0]["error"]


def test_a_run_notes_the_records_whose_long_info_was_dropped(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Two records with an INFO of 100 KB among ordinary ones, in a run of several shards: both
    are scored (INFO passed on as '.'), and report.json's notes and the terminal summary say how
    many records lost their INFO, and on which lines, once (not once a shard), with what to do."""
    import json

    from conftest import write_job

    from gpubatch.cli.demo_models import make_genome_model
    from gpubatch.cli.main import main

    fasta = tmp_path / "ref.fa"
    fasta.write_text(">chrA\n" + "".join(CONTIG[i : i + 60] + "\n" for i in range(0, len(CONTIG), 60)))
    pysam.faidx(str(fasta))
    rows = [_snv(p) for p in range(100, 1100, 100)]
    rows[3] = _snv(400, info="X=" + "a" * 100_000)
    rows[7] = _snv(800, info="X=" + "b" * 100_000)
    vcf = tmp_path / "v.vcf"
    vcf.write_text("##fileformat=VCFv4.2\n##contig=<ID=chrA,length=5000>\n"
                   "##INFO=<ID=X,Number=1,Type=String,Description=\"x\">\n"
                   "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n" + "".join(r + "\n" for r in rows))
    job = {"kind": "genome", "windows": {"reference": str(fasta), "variants": str(vcf), "length": 16,
                                         "windows_per_shard": 3},
           "model": {"path": str(make_genome_model(tmp_path / "g.onnx", 16))},
           "output": {"uri": str(tmp_path / "out")}, "run": {"profile": "inline"}}
    assert main(["run", str(write_job(tmp_path / "job.yaml", job))]) == 0
    summary = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["shards"]) == 4 and report["data_quality"]["variants"]["scored"] == 10
    assert report["data_quality"]["variants"]["info_dropped"] == 2
    said = [n for n in report["notes"] if "INFO" in n]
    assert len(said) == 1, report["notes"]
    assert said[0].startswith("v.vcf: 2 record(s) have an INFO field of over 65,536 bytes (lines 8 and 12): "
                              "read with INFO as '.', the rest of each record as written")
    assert "no output of gpubatch reads INFO" in said[0]
    assert f"note: {said[0]}" in summary
