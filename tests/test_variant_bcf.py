"""A BCF's records reach htslib with their shared fields bounded and no sample data (``variant_bcf``).

htslib read every BCF record whole, and its samples' data, before a REF of 50 MB could be checked
(``validate``'s peak: 234 MiB against 43 for the same file with a one-base REF), and put a cohort's
sample names in its dictionary (183 MiB against 43 at 500,000 samples). Now a record's lengths,
given up front, frame it: the same bad records, by the same rule and in the same words as in a
text VCF (named ``record N``), an INFO of over 64 KiB dropped and noted, samples never read.
"""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpubatch.core.errors import SpecError
from gpubatch.sources.genome.reference import ContigTable
from gpubatch.sources.genome.variant_bcf import BcfGuard
from gpubatch.sources.genome.variant_guard import SHORT_LINE
from gpubatch.sources.genome.variants import read_variants, refuse_ref_mismatches

pysam = pytest.importorskip("pysam")
pytest_plugins = ["s3_fixtures"]

CONTIG = "".join(np.random.default_rng(11).choice(list("ACGT"), 5000))
CONTIGS = ContigTable(("chrA",), (len(CONTIG),))
MAX_ALLELE = 2048
#: (pos, id, alleles, INFO X) of each record: an INFO of 200 KB (dropped), a REF of 200,000 bases,
#: an ID of 100,000 bytes, an ALT of 3,000 in a short record, 40 ALTs of 2,000 bases (80,039 as a
#: text VCF writes them) in a long one
RECORDS = [
    (100, None, (CONTIG[99], "C"), None),
    (200, "rs2", (CONTIG[199], "G"), "a" * 200_000),
    (301, None, ("ACGT" * 50_000, "A"), None),
    (400, "r" * 100_000, (CONTIG[399], "T"), None),
    (501, None, (CONTIG[500], "G" * 3000), None),
    (600, None, (CONTIG[599], *("ACGT"[i % 4] * 2000 for i in range(40))), None),
    (700, "rs7", (CONTIG[699], "A"), "short"),
]


def _header(samples: int) -> Any:
    header = pysam.VariantHeader()
    header.add_line("##contig=<ID=chrA,length=5000>")
    header.add_line('##INFO=<ID=X,Number=1,Type=String,Description="x">')
    header.add_line('##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">')
    header.add_line('##FORMAT=<ID=DP,Number=1,Type=Integer,Description="Depth">')
    for i in range(samples):
        header.add_sample(f"S{i}")
    return header


def _write(path: Path, mode: str, records: list[tuple[int, str | None, tuple[str, ...], str | None]],
           samples: int = 3) -> Path:
    """``records`` at ``path`` through pysam (mode 'wb' BGZF BCF, 'w' text VCF; 'wbu' an
    uncompressed BCF, as ``bcftools view -Ou`` writes: BGZF's decompressed), each with a GT and
    DP for each of ``samples`` samples."""
    with pysam.VariantFile(str(path), mode.rstrip("u"), header=_header(samples)) as out:
        for pos, rid, alleles, info in records:
            rec = out.new_record(contig="chrA", start=pos - 1, alleles=alleles, id=rid)
            if info is not None:
                rec.info["X"] = info
            for i in range(samples):
                rec.samples[f"S{i}"]["GT"] = (0, 1)
                rec.samples[f"S{i}"]["DP"] = i
            out.write(rec)
    if mode.endswith("u"):
        path.write_bytes(gzip.decompress(path.read_bytes()))
    return path


@pytest.mark.parametrize("mode", ["wb", "wbu"])
def test_a_bcfs_bad_records_are_a_text_vcfs_by_record_number(tmp_path: Path, mode: str) -> None:
    """The same records as a BCF (BGZF or uncompressed) and a text VCF: the same records scored
    and left out, with the same problems, named by record in the BCF and by line in the VCF."""
    bcf = _write(tmp_path / "v.bcf", mode, RECORDS)
    vcf = _write(tmp_path / "v.vcf", "w", RECORDS)
    tables = {path.suffix: read_variants(str(path), CONTIGS, max_bad=0.9, max_allele=MAX_ALLELE) for path in (bcf, vcf)}
    assert tables[".bcf"].pos == tables[".vcf"].pos == [100, 200, 700]
    assert tables[".bcf"].variant_id == ["chrA:100:" + CONTIG[99] + ":C", "rs2", "rs7"]
    failed = {f["input"]: f["error"] for f in tables[".bcf"].failed}
    assert list(failed) == [f"v.bcf record {n}" for n in (3, 4, 5, 6)]
    assert list(failed.values()) == [f["error"] for f in tables[".vcf"].failed]
    ref, rid, alt, alts = failed.values()
    assert ref.startswith("REF of 200,000 bases is longer than the 2,048 bases one read of the reference holds")
    assert "windows.chunk_bases to at least 200,000" in ref
    assert rid.startswith("its ID field is 100,000 bytes long (over 65,536)")
    assert alt.startswith("ALT of 3,000 bases is longer") and alts.startswith("ALT of 80,039 bases is longer")
    assert tables[".bcf"].counts["info_dropped"] == 1
    (note,) = [n for n in tables[".bcf"].notes if "INFO" in n]
    assert note.startswith("v.bcf: 1 record(s) have an INFO field of over 65,536 bytes (record 2): read with INFO")


@pytest.mark.parametrize(("mode", "first"), [("wb", "record 2 chrA:200"), ("w", "line 9 chrA:200")])
def test_ref_mismatches_in_a_bcf_are_named_by_record(tmp_path: Path, mode: str, first: str) -> None:
    """The refusal of a job whose variants disagree with the reference names the first ones by
    where they are: in a BCF by record (its numbers count records), in a text VCF by line. A
    BCF's record 2 was named "line 2", a line no BCF has."""
    path = _write(tmp_path / ("v.bcf" if mode == "wb" else "v.vcf"), mode, RECORDS)
    table = read_variants(str(path), CONTIGS, max_bad=0.9, max_allele=MAX_ALLELE)
    match = np.array([True, False, False])  # the records at 200 and 700 disagree
    with pytest.raises(SpecError, match=f"2 of 3 variants .* First: {first} REF"):
        refuse_ref_mismatches(table, match, "ref.fa", 0.05)


def test_a_remote_bcf_is_guarded_as_a_local_one(tmp_path: Path, s3: Any) -> None:
    """A BCF at an s3:// URL (its bytes were piped to htslib as stored, records read whole):
    the same records and bad records as the local file, by the same guard."""
    bcf = _write(tmp_path / "v.bcf", "wb", RECORDS, samples=500)
    local = read_variants(str(bcf), CONTIGS, max_bad=0.9, max_allele=MAX_ALLELE)
    remote = read_variants(s3.upload(bcf), CONTIGS, s3.options(), max_bad=0.9, max_allele=MAX_ALLELE)
    assert (remote.pos, remote.alt, remote.failed, remote.notes) == (local.pos, local.alt, local.failed, local.notes)
    assert [f["input"] for f in remote.failed] == [f"v.bcf record {n}" for n in (3, 4, 5, 6)]


def _guarded(data: bytes, sizes: list[int]) -> tuple[bytes, BcfGuard]:
    """An uncompressed BCF's bytes through a BcfGuard, read in pieces of the sizes given, then whole."""
    out, source = io.BytesIO(), io.BytesIO(data)
    pieces = iter(sizes)
    guard = BcfGuard(out, MAX_ALLELE, name="v.bcf")
    guard.copy(b"", lambda n: source.read(min(n, next(pieces, n))))
    return out.getvalue(), guard


def test_the_guard_passes_sites_only_records_however_the_stream_is_cut(tmp_path: Path) -> None:
    """A cohort BCF's records come out with no samples and no FORMAT, their shared fields as
    written (a long record's too, its INFO dropped), the header's #CHROM line without sample
    names: what pysam reads of it is what it reads of the file, sites only."""
    data = _write(tmp_path / "v.bcf", "wbu", RECORDS, samples=2000).read_bytes()
    whole, guard = _guarded(data, [])
    rng = np.random.default_rng(5)
    for scale in (1, 100, SHORT_LINE, 3 * SHORT_LINE):
        assert _guarded(data, rng.integers(1, scale + 1, 5000).tolist())[0] == whole
    assert guard.lines == len(RECORDS) and sorted(guard.problems) == [3, 4, 6]
    assert len(whole) < 8_000  # the header and the records passed on: no sample data, no long field
    (tmp_path / "out.bcf").write_bytes(whole)
    with pysam.VariantFile(str(tmp_path / "out.bcf")) as out, pysam.VariantFile(str(tmp_path / "v.bcf")) as src:
        assert list(out.header.samples) == [] and str(out.header).endswith("\tFILTER\tINFO\n")
        for n, (rec, orig) in enumerate(zip(out, src, strict=True), start=1):
            assert (rec.chrom, rec.pos) == (orig.chrom, orig.pos)
            if n in guard.problems:
                assert rec.alleles == ("N",) and rec.id is None
                continue
            assert (rec.id, rec.alleles, list(rec.filter)) == (orig.id, orig.alleles, list(orig.filter))
            assert dict(rec.info) == ({} if n == 2 else dict(orig.info))
            assert len(rec.format) == 0


def _long_value_offset(data: bytes, value: bytes) -> int:
    """Where the typed value ``value`` (15 or more bytes) starts: its type byte, then its count as
    a typed int32 (a byte and 4)."""
    return data.index(value) - 6


def test_a_record_whose_values_overrun_its_length_is_malformed_and_the_next_read(tmp_path: Path) -> None:
    """A long record whose ID says it is longer than the record: left out as malformed, named by
    record; the records after it are read, found by the lengths that frame each record."""
    data = bytearray(_write(tmp_path / "v.bcf", "wbu", RECORDS).read_bytes())
    at = _long_value_offset(bytes(data), b"r" * 100_000)
    assert data[at] == 0xF7 and data[at + 1] == 0x13 and struct.unpack_from("<i", data, at + 2)[0] == 100_000
    struct.pack_into("<i", data, at + 2, 10_000_000)
    (tmp_path / "v.bcf").write_bytes(data)
    table = read_variants(str(tmp_path / "v.bcf"), CONTIGS, max_bad=0.9, max_allele=MAX_ALLELE)
    failed = {f["input"]: f["error"] for f in table.failed}
    assert failed["v.bcf record 4"].startswith("malformed BCF record (a value of 10,000,000 bytes runs past the record's")
    assert table.pos == [100, 200, 700]


def test_a_bcf_cut_inside_a_record_is_refused_saying_so(tmp_path: Path) -> None:
    """An uncompressed BCF (``bcftools view -Ou``) that ends inside its third record: refused (its
    later records are lost), not read as the two records before."""
    data = _write(tmp_path / "v.bcf", "wbu", RECORDS).read_bytes()
    (tmp_path / "v.bcf").write_bytes(data[: data.index(b"ACGT" * 1000)])
    with pytest.raises(SpecError, match=r"v\.bcf is cut short: the BCF ends inside record 3; the records past it"):
        read_variants(str(tmp_path / "v.bcf"), CONTIGS, max_bad=0.9, max_allele=MAX_ALLELE)


def _validate_peak(tmp_path: Path, bcf: Path) -> int:
    """The peak RSS (KiB) of `gpubatch validate` (which reads every record) of a job on ``bcf``."""
    from conftest import write_job
    from test_hostile import cli_peak

    from gpubatch.cli.demo_models import make_genome_model

    fasta = tmp_path / "ref.fa"
    if not fasta.exists():
        fasta.write_text(">chrA\n" + "".join(CONTIG[i : i + 60] + "\n" for i in range(0, len(CONTIG), 60)))
        pysam.faidx(str(fasta))
        make_genome_model(tmp_path / "g.onnx", 16)
    job = {"kind": "genome", "windows": {"reference": str(fasta), "variants": str(bcf), "length": 16,
                                         "max_bad_records": 0.5},
           "model": {"path": str(tmp_path / "g.onnx")}, "output": {"uri": str(tmp_path / "out")},
           "run": {"profile": "inline"}}
    done, peak = cli_peak("validate", str(write_job(tmp_path / "job.yaml", job)))
    assert done.returncode == 0 and "items" in done.stdout, done.stdout + done.stderr
    return peak


def test_a_bcf_record_of_50_mb_costs_validate_no_memory_for_it(tmp_path: Path) -> None:
    """A BCF whose second record's REF is 50 MB: validate's peak is that of the same file with a
    one-base REF there (234 MiB against 43 before: htslib held the record, pysam its REF)."""
    peaks = {}
    for size in (1, 50_000_000):
        snvs = [(p, None, (CONTIG[p - 1], "C"), None) for p in (100, 300, 400)]
        records = [snvs[0], (200, None, (CONTIG[199] * size, "C"), None), *snvs[1:]]
        peaks[size] = _validate_peak(tmp_path, _write(tmp_path / f"r{size}.bcf", "wb", records, samples=0))
    assert peaks[50_000_000] < peaks[1] + 16 * 1024, f"{peaks[50_000_000] >> 10} MiB against {peaks[1] >> 10} MiB"


def test_a_cohort_bcf_costs_validate_no_memory_for_its_samples(tmp_path: Path) -> None:
    """A BCF of 500,000 samples (a biobank extract, converted by htslib from its VCF): validate's
    peak is that of the same records with 20 samples (183 MiB against 43 before: htslib's
    dictionary of the sample names, and each record's genotypes read whole)."""
    peaks = {}
    for samples in (20, 500_000):
        names = "".join(f"\tS{i}" for i in range(samples))
        text = ("##fileformat=VCFv4.2\n##contig=<ID=chrA,length=5000>\n"
                "##FORMAT=<ID=GT,Number=1,Type=String,Description=\"Genotype\">\n"
                f"#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT{names}\n"
                + "".join(f"chrA\t{p}\t.\t{CONTIG[p - 1]}\tC\t.\t.\t.\tGT" + "\t0|1" * samples + "\n"
                          for p in range(100, 1100, 100)))
        (tmp_path / "c.vcf").write_text(text)
        bcf = tmp_path / f"c{samples}.bcf"
        with pysam.VariantFile(str(tmp_path / "c.vcf")) as src, \
                pysam.VariantFile(str(bcf), "wb", header=src.header) as out:
            for rec in src:
                out.write(rec)
        peaks[samples] = _validate_peak(tmp_path, bcf)
    assert peaks[500_000] < 1.1 * peaks[20], f"{peaks[500_000] >> 10} MiB against {peaks[20] >> 10} MiB"
