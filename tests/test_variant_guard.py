"""A text VCF's lines reach htslib with their first eight fields bounded (``variant_guard``).

A REF or ALT longer than one read of the reference holds, or an ID/CHROM/POS/QUAL/FILTER field
of over 64 KiB, makes its record a bad one, named by its line and left out unread; an INFO of over
64 KiB is dropped (variant mode does not read it) and the record scored; FORMAT and the genotype
columns are cut off every line (and the sample names off the ``#CHROM`` line); ``##`` lines pass whole. The same in every form of the file (plain, bgzip, plain gzip).
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path
from typing import Any

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
    assert kept[7] == _snv(200).encode()  # INFO dropped, FORMAT and genotypes cut off
    assert kept[6] == _snv(100).encode()  # every record the same
    assert kept[8] == b"chrA\t301\t.\tN\t.\t.\t.\t."  # the placeholder of the REF's line
    assert kept[2] == text.split(b"\n")[2] and len(kept[2]) > SHORT_LINE  # '##' lines whole
    assert kept[5] == b"#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO"  # no sample names
    assert max(line.count(b"\t") for line in kept) == 7


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


def _cohort_rows(samples: int) -> list[str]:
    """Records with FORMAT and ``samples`` genotype columns, some bad: GT-only lines under 64 KiB
    and GT:PL lines over it (read a field at a time), a REF too long (lines 9 of a file), a POS
    that is no number (11), a contig not in the reference (13), a line of six columns (15)."""
    gt = "\tGT\t" + "\t".join(["0|1", "0|0", "1|1", "0/1"][i % 4] for i in range(samples))
    pl = "\tGT:PL\t" + "\t".join("0/1:" + ",".join(["30"] * 20) for _ in range(samples))
    rows = [_snv(p, rid=f"rs{p}") + (gt if p % 200 else pl) for p in range(100, 4100, 100)]
    rows[3] = f"chrA\t401\t.\t{'ACGT' * 1000}\tA\t.\t.\t." + pl
    rows[5] = "chrA\tsix\t.\tA\tC\t.\t.\t." + gt
    rows[7] = "chrB\t800\t.\tA\tC\t.\t.\t." + gt
    rows[9] = "chrA\t1000\t.\tA\tC\t."
    return rows


def _cohort_header(samples: int) -> str:
    return ("##fileformat=VCFv4.2\n##contig=<ID=chrA,length=5000>\n"
            "##FORMAT=<ID=GT,Number=1,Type=String,Description=\"Genotype\">\n"
            "##FORMAT=<ID=PL,Number=G,Type=Integer,Description=\"Phred-scaled likelihoods\">\n"
            "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO"
            + "".join(f"\t{name}" for name in (["FORMAT"] + [f"S{i}" for i in range(samples)] if samples else [])) + "\n")


def _write(path: Path, text: str, form: str) -> Path:
    """``text`` at ``path`` as a plain, bgzip or plain-gzip file (the latter two as ``path``.gz)."""
    path.write_text(text)
    if form == "bgzip":
        pysam.tabix_compress(str(path), str(path) + ".gz")
    elif form == "gzip":
        Path(str(path) + ".gz").write_bytes(gzip.compress(text.encode(), compresslevel=1))
    return path if form == "plain" else Path(str(path) + ".gz")


def _variant_run(tmp: Path, fasta: Path, model: Path, vcf: Path) -> tuple[Any, dict[str, Any]]:
    import json

    import pandas as pd
    from conftest import write_job

    from gpubatch.cli.main import main

    job = {"kind": "genome", "windows": {"reference": str(fasta), "variants": str(vcf), "length": 16,
                                         "windows_per_shard": 8, "max_bad_records": 0.5, "chunk_bases": 2048},
           "model": {"path": str(model)}, "output": {"uri": str(tmp / "out")}, "run": {"profile": "inline"}}
    assert main(["run", str(write_job(tmp / "job.yaml", job))]) == 3  # partial: the bad lines left out
    report = json.loads((tmp / "out" / "report.json").read_text())
    scored = pd.read_parquet(tmp / "out" / "predictions.parquet")
    return scored.sort_values(["chrom", "pos"]).reset_index(drop=True), report


@pytest.mark.parametrize("form", ["plain", "bgzip", "gzip"])
def test_a_cohort_vcf_gives_what_its_sites_only_twin_gives(tmp_path: Path, form: str) -> None:
    """A cohort VCF's FORMAT and genotype columns (and the '#CHROM' line's sample names) are cut
    off before htslib reads it: the same variants, scores and quarantined lines (by line number
    and problem) as the same file without them, in every form of the file."""
    from gpubatch.cli.demo_models import make_genome_model

    fasta = tmp_path / "ref.fa"
    fasta.write_text(">chrA\n" + "".join(CONTIG[i : i + 60] + "\n" for i in range(0, len(CONTIG), 60)))
    pysam.faidx(str(fasta))
    model = make_genome_model(tmp_path / "g.onnx", 16)
    rows = _cohort_rows(1500)
    assert min(map(len, rows)) < SHORT_LINE < max(map(len, rows))  # both the short lines' and the long lines' path
    sites = [row if row.count("\t") < 8 else "\t".join(row.split("\t")[:8]) for row in rows]
    results = {}
    for name, header, body in (("cohort", _cohort_header(1500), rows), ("sites", _cohort_header(0), sites)):
        (tmp_path / name).mkdir()
        vcf = _write(tmp_path / name / "v.vcf", header + "".join(r + "\n" for r in body), form)
        results[name] = _variant_run(tmp_path / name, fasta, model, vcf)
    (cohort, cohort_report), (sites_scored, sites_report) = results["cohort"], results["sites"]
    assert cohort_report["failed"][0]["error"].startswith("REF of 4,000 bases is longer than the 2,048 bases")
    assert len(cohort) == 36 and cohort.equals(sites_scored)
    assert cohort_report["failed"] == sites_report["failed"]
    assert [f["input"].rsplit(" ", 1)[1] for f in cohort_report["failed"]] == ["9", "11", "13", "15"]
    quality = [{k: v for k, v in r["data_quality"]["variants"].items() if k != "file"} for _, r in results.values()]
    assert quality[0] == quality[1] and quality[0]["scored"] == 36


def test_a_cohort_vcf_costs_validate_no_memory_for_its_samples(tmp_path: Path) -> None:
    """The peak RSS of `gpubatch validate` (which reads every record) on a VCF of 500,000 samples
    (a biobank extract: a 4.4 MB #CHROM line, 2 MB a record) is that on the same records with
    20 samples: htslib parsed the sample names into its dictionary and held each line whole, 272 MiB
    against 188 MiB (no difference at 2,000 samples: ``subset_samples([])`` already spared the
    genotypes' parse, so the sample count shows only at a biobank's)."""
    from conftest import write_job
    from test_hostile import cli_peak

    from gpubatch.cli.demo_models import make_genome_model

    fasta = tmp_path / "ref.fa"
    fasta.write_text(">chrA\n" + "".join(CONTIG[i : i + 60] + "\n" for i in range(0, len(CONTIG), 60)))
    pysam.faidx(str(fasta))
    model = make_genome_model(tmp_path / "g.onnx", 16)
    peaks = {}
    for samples in (20, 500_000):
        genotypes = "\tGT" + "\t0|1" * samples
        text = _cohort_header(samples) + "".join(_snv(p) + genotypes + "\n" for p in range(100, 1100, 100))
        vcf = _write(tmp_path / f"c{samples}.vcf", text, "bgzip")
        job = {"kind": "genome", "windows": {"reference": str(fasta), "variants": str(vcf), "length": 16},
               "model": {"path": str(model)}, "output": {"uri": str(tmp_path / "out")}, "run": {"profile": "inline"}}
        done, peaks[samples] = cli_peak("validate", str(write_job(tmp_path / "job.yaml", job)))
        assert done.returncode == 0 and "10 items" in done.stdout, done.stdout + done.stderr
    assert peaks[500_000] < 1.1 * peaks[20], f"{peaks[500_000] / 1024:.0f} MiB against {peaks[20] / 1024:.0f} MiB"
