"""Variants: VCF/BCF reading, skips and counts, errors, and the ref/alt window rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpubatch.core.errors import SpecError
from gpubatch.ops.kernels import encode_dna
from gpubatch.sources.genome.reference import ContigTable
from gpubatch.sources.genome.variants import (
    is_symbolic,
    read_variants,
    variant_span,
    variant_windows,
)

pysam = pytest.importorskip("pysam")

CONTIGS = ContigTable(("chr1", "chr2"), (300, 120))
HEADER = ("##fileformat=VCFv4.2\n##INFO=<ID=END,Number=1,Type=Integer,Description=\"End\">\n##contig=<ID=chr1,length=300>\n##contig=<ID=chr2,length=120>\n"
          "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n")
RECORDS = [
    "chr1\t10\trs1\tA\tG\t.\t.\t.",          # SNV
    "chr1\t20\t.\tC\tCTTT\t.\t.\t.",         # insertion
    "chr1\t30\t.\tGAA\tG\t.\t.\t.",          # deletion
    "chr1\t40\t.\tT\t.\t.\t.\t.",            # ALT . -> skipped
    "chr2\t5\tmulti\tA\tC,<DEL>,*,T\t.\t.\t.",  # two scorable, two symbolic
]


def write_vcf(tmp_path: Path, records: list[str], header: str = HEADER, name: str = "v.vcf") -> str:
    path = tmp_path / name
    path.write_text(header + "".join(r + "\n" for r in records))
    return str(path)


def test_records_skips_and_ids(tmp_path: Path) -> None:
    table = read_variants(write_vcf(tmp_path, RECORDS), CONTIGS)
    assert table.variant_id == ["rs1", "chr1:20:C:CTTT", "chr1:30:GAA:G", "multi:C", "multi:T"]
    assert table.pos == [10, 20, 30, 5, 5]
    assert table.counts == {"records": 5, "variants": 5, "skipped_alt_dot": 1, "skipped_symbolic": 2}


def test_bgzip_and_bcf_read_the_same(tmp_path: Path) -> None:
    plain = write_vcf(tmp_path, RECORDS)
    gz = str(tmp_path / "v.vcf.gz")
    pysam.tabix_compress(plain, gz)
    bcf = str(tmp_path / "v.bcf")
    with pysam.VariantFile(plain) as src, pysam.VariantFile(bcf, "wb", header=src.header) as dst:
        for rec in src:
            new = dst.new_record(contig=rec.chrom, start=rec.start, stop=rec.stop, id=rec.id)
            new.alleles = rec.alleles if len(rec.alleles) > 1 else (rec.ref, ".")
            dst.write(new)
    expected = read_variants(plain, CONTIGS).alt
    assert read_variants(gz, CONTIGS).alt == expected
    assert read_variants(bcf, CONTIGS).alt == expected


def test_vcf_without_header_names_the_file(tmp_path: Path) -> None:
    path = write_vcf(tmp_path, RECORDS, header="", name="bare.vcf")
    with pytest.raises(SpecError) as err:
        read_variants(path, CONTIGS)
    assert err.value.problems[0][0] == "windows.variants"
    assert "bare.vcf" in str(err.value) and "header" in str(err.value)


def test_unknown_contig_and_pos_past_end_name_the_line(tmp_path: Path) -> None:
    path = write_vcf(tmp_path, ["chr1\t10\t.\tA\tG\t.\t.\t.", "chrZ\t5\t.\tA\tG\t.\t.\t.",
                                "chr2\t121\t.\tA\tG\t.\t.\t."])
    with pytest.raises(SpecError) as err:
        read_variants(path, CONTIGS)
    messages = [m for _, m in err.value.problems]
    assert messages[0].startswith("v.vcf line 7: contig 'chrZ' is not in the reference")
    assert "chr1, chr2" in messages[0]
    assert messages[1] == "v.vcf line 8: POS 121 is past the end of chr2 (length 120)"


def test_missing_vcf(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="file not found"):
        read_variants(str(tmp_path / "none.vcf"), CONTIGS)


def test_symbolic_alleles() -> None:
    assert all(is_symbolic(a) for a in ("<DEL>", "<INS:ME>", "*", "G]17:198982]", "]13:123456]T", ".A", "A."))
    assert not any(is_symbolic(a) for a in ("A", "ACGT", "N"))


def _oracle(seq: str, pos: int, ref: str, alt: str, length: int) -> tuple[str, str]:
    """The documented rule, spelled out on strings: N outside the contig."""
    def get(a: int, b: int) -> str:
        return "".join(seq[i] if 0 <= i < len(seq) else "N" for i in range(a, b))

    p = pos - 1
    s = p - length // 2
    return get(s, s + length), (get(s, p) + alt + get(p + len(ref), p + len(ref) + length))[:length]


@pytest.mark.parametrize(("pos", "ref", "alt"), [
    (50, "A", "G"), (50, "A", "ATTTT"), (50, "ACGTA", "A"), (3, "A", "G"), (98, "AC", "A"),
    (50, "A", "G" * 30), (50, "A", "G" * 9), (1, "A", "AT"), (100, "A", "ACC"),
])
@pytest.mark.parametrize("length", [16, 17])
def test_window_rule_matches_oracle(pos: int, ref: str, alt: str, length: int) -> None:
    rng = np.random.default_rng(pos)
    seq = "".join(rng.choice(list("ACGT"), 100))
    seq = seq[: pos - 1] + ref + seq[pos - 1 + len(ref):]
    seq = seq[:100]
    span = variant_span(pos, ref, alt, length)
    lo, hi = span.start - 3, span.need_end + 5
    codes = encode_dna("".join(seq[i] if 0 <= i < len(seq) else "N" for i in range(lo, hi)))
    ref_win, alt_win, match = variant_windows(codes, lo, span, ref, alt, length)
    exp_ref, exp_alt = _oracle(seq, pos, ref, alt, length)
    assert len(ref_win) == len(alt_win) == length
    assert np.array_equal(ref_win, encode_dna(exp_ref))
    assert np.array_equal(alt_win, encode_dna(exp_alt))
    assert match == (seq[pos - 1 : pos - 1 + len(ref)] == ref[: max(0, 100 - pos + 1)])


def test_ref_mismatch_is_flagged() -> None:
    seq = "ACGTACGTACGTACGTACGT"
    span = variant_span(10, "T", "G", 8)  # 0-based 9 is 'C'
    _, alt_win, match = variant_windows(encode_dna(seq), 0, span, "T", "G", 8)
    assert not match
    assert alt_win[8 // 2] == encode_dna("G")[0]
