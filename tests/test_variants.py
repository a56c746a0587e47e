"""Variants: VCF/BCF reading, skips and counts, errors, and the ref/alt window rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import dna_codes

from gpubatch.core.errors import SpecError
from gpubatch.ops.kernels import encode_dna  # the code under test (variant_windows takes codes)
from gpubatch.sources.genome.reference import ContigTable
from gpubatch.sources.genome.variants import (
    alt_skip_reason,
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
    assert table.counts == {"records": 5, "variants": 5, "skipped": {
        "alt_missing": 1, "symbolic": 1, "spanning_deletion": 1, "breakend": 0, "iupac": 0, "not_sequence": 0}}
    assert table.layout == "vcf" and table.notes == []


def test_an_id_split_over_biallelic_records_is_told_apart_by_alt(tmp_path: Path) -> None:
    """``bcftools norm -m-`` splits rs9 C>A,G into two records, both ID rs9: both rows had the
    variant_id 'rs9' (a join on it paired each with both), where the record unsplit gives
    'rs9:A' and 'rs9:G'."""
    split = read_variants(write_vcf(tmp_path, ["chr1\t5\trs9\tC\tA\t.\t.\t.", "chr1\t5\trs9\tC\tG\t.\t.\t.",
                                               "chr1\t9\trs7\tC\tT\t.\t.\t."]), CONTIGS)
    whole = read_variants(write_vcf(tmp_path, ["chr1\t5\trs9\tC\tA,G\t.\t.\t.", "chr1\t9\trs7\tC\tT\t.\t.\t."],
                                    name="whole.vcf"), CONTIGS)
    assert split.variant_id == whole.variant_id == ["rs9:A", "rs9:G", "rs7"]


def test_a_lowercase_allele_has_the_id_of_its_row(tmp_path: Path) -> None:
    """REF and ALT are scored and written upper-cased, but the ID was made of the file's letters:
    a row REF 'T' ALT 'AC' had the id 'chr1:20:t:Ac', and a multi-allelic rs5 'rs5:g' where the
    same record split (``bcftools norm -m-``) gave 'rs5:G'. The id is made of the row's alleles."""
    table = read_variants(write_vcf(tmp_path, ["chr1\t10\trs5\ta\tg,Ct\t.\t.\t.", "chr1\t20\t.\tt\tAc\t.\t.\t."]),
                          CONTIGS)
    assert table.variant_id == ["rs5:G", "rs5:CT", "chr1:20:T:AC"]
    assert [(r["ref"], r["alt"]) for r in table.rows()] == [("A", "G"), ("A", "CT"), ("T", "AC")]


def test_repeated_variants_and_an_alt_equal_to_its_ref_are_noted(tmp_path: Path) -> None:
    """Both are scored (one row each, as before) but were scored without a word: a repeated
    record (a file concatenated twice) doubles its rows in any join, and ALT == REF ('t' against
    'T' too) is no change, every delta 0."""
    table = read_variants(write_vcf(tmp_path, ["chr1\t10\trs1\tA\tG\t.\t.\t.", "chr1\t12\t.\tT\tt,C\t.\t.\t.",
                                               "chr1\t10\trs1\tA\tG\t.\t.\t.", "chr1\t10\t.\tA\tG\t.\t.\t."]),
                          CONTIGS)
    assert len(table) == 5
    assert table.notes == [
        "2 variant(s) repeat an earlier one (the same CHROM, POS, REF and ALT; first: v.vcf line 8, chr1:10 A>G): "
        "each is scored, so rows repeat; drop them first (`bcftools norm -d exact`) to score each variant once",
        "1 ALT allele(s) equal their REF (first: v.vcf line 7, chr1:12 T>T): no change, so their alt window is "
        "the ref window and every delta is 0"]
    assert read_variants(write_vcf(tmp_path, RECORDS, name="plain.vcf"), CONTIGS).notes == []


def test_a_vcf_whose_header_gives_other_contig_lengths_is_noted_as_another_build(tmp_path: Path) -> None:
    """A GRCh37 VCF against a GRCh38 reference: the header's ##contig lengths said so before any
    record was read, and went unread; where its records hold no SNV to fail a REF check, the
    wrong bases were scored without a word. The note names the contig, both lengths and, for
    chr1, both builds; under the other naming convention ('1' against 'chr1') too."""
    hg38 = ContigTable(("chr1", "chr2"), (248_956_422, 120))
    header = HEADER.replace("##contig=<ID=chr1,length=300>", "##contig=<ID=1,length=249250621>")
    table = read_variants(write_vcf(tmp_path, ["chr1\t20\t.\tC\tCTTT\t.\t.\t."], header=header), hg38)
    assert len(table) == 1 and table.notes[0].startswith(
        "v.vcf's header gives 1 contig(s) other lengths than the reference (first: 1 249,250,621 bases against "
        "248,956,422) (GRCh37/hg19 against the reference's GRCh38/hg38): the VCF may be of another genome build"), table.notes
    assert read_variants(write_vcf(tmp_path, RECORDS, name="same.vcf"), CONTIGS).notes == []


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


def test_a_plain_gzip_vcf_reads_like_the_bgzip_one(tmp_path: Path) -> None:
    """``gzip`` (not ``bgzip``) is how many VCFs arrive; htslib cannot open it (it asks the
    stream's offset), which was a traceback. Its lines are fed to htslib decompressed, through a
    pipe (never a copy on disk: test_variant_streams), their numbers those of the file; a damaged
    one is refused naming the file."""
    import gzip

    plain = write_vcf(tmp_path, RECORDS)
    gz = tmp_path / "plain.vcf.gz"
    gz.write_bytes(gzip.compress(Path(plain).read_bytes()))
    got, want = read_variants(str(gz), CONTIGS), read_variants(plain, CONTIGS)
    assert (got.variant_id, got.pos, got.counts) == (want.variant_id, want.pos, want.counts)
    bad = tmp_path / "bad-pos.vcf.gz"
    bad.write_bytes(gzip.compress((HEADER + "chr1\tx\t.\tA\tG\t.\t.\t.\n").encode()))
    with pytest.raises(SpecError, match="bad-pos.vcf.gz line 6"):
        read_variants(str(bad), CONTIGS)
    cut = tmp_path / "cut.vcf.gz"
    cut.write_bytes(gz.read_bytes()[:-20])
    with pytest.raises(SpecError, match="cut.vcf.gz"):
        read_variants(str(cut), CONTIGS)


LONG = [f"chr1\t{i + 1}\t.\tN\tA\t.\t.\tDP={i}" for i in range(6000)]


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_a_bgzip_vcf_cut_short_is_refused_as_cut(tmp_path: Path, keep: float) -> None:
    """A bgzip VCF that a copy or a full disk cut short (at 0.5 the cut is in its only block of
    records) was 'not a readable VCF/BCF ... a VCF starts with ##fileformat', or 'not a VCF/BCF
    (no #CHROM header line) ... its first data line is ""': the file's fault named as another.
    It is refused as cut short, with the test and the fix."""
    gz = tmp_path / "v.vcf.gz"
    pysam.tabix_compress(write_vcf(tmp_path, LONG[: 6000 if keep > 0.9 else 40]), str(gz))
    data = gz.read_bytes()
    gz.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(SpecError) as err:
        read_variants(str(gz), CONTIGS)
    text = str(err.value)
    assert "v.vcf.gz is cut short" in text and "`bgzip -t v.vcf.gz`" in text, text
    assert "#CHROM" not in text and "##fileformat" not in text


@pytest.mark.parametrize("layout", ["table", "body", "vcf"])
def test_a_gzip_file_cut_short_is_refused_naming_its_last_whole_line(tmp_path: Path, layout: str) -> None:
    """A plain-gzip table or VCF body cut short raised EOFError out of the plan (a traceback,
    exit 1); it is refused as cut short after its last line read, like a plain-gzip VCF."""
    import gzip

    columns = [r.split("\t") for r in LONG]
    lines = {"table": ["chrom\tpos\tref\talt", *("\t".join(c[i] for i in (0, 1, 3, 4)) for c in columns)],
             "body": LONG, "vcf": [HEADER.rstrip("\n"), *LONG]}[layout]
    data = gzip.compress("".join(x + "\n" for x in lines).encode(), 1)
    cut = tmp_path / "v.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SpecError, match=r"v.gz is cut short: the gzip stream breaks off after line [1-9]\d{2,}; "
                                        r".*`gzip -t v.gz`"):
        read_variants(str(cut), CONTIGS)


@pytest.mark.parametrize("header", ["", "##fileformat=VCFv4.2\n##source=eqtl-pipeline\n"])
def test_vcf_body_without_its_chrom_line_is_read_with_a_note(tmp_path: Path, header: str) -> None:
    with_header = read_variants(write_vcf(tmp_path, RECORDS), CONTIGS)
    body = read_variants(write_vcf(tmp_path, RECORDS, header=header, name="bare.vcf"), CONTIGS)
    for column in ("variant_id", "chrom", "pos", "ref", "alt"):
        assert getattr(body, column) == getattr(with_header, column)
    assert body.counts == with_header.counts
    assert body.layout == "vcf-without-header"
    assert body.notes and "bare.vcf has no '#CHROM' header line" in body.notes[0]
    # line numbers still name the file's own lines
    bad = write_vcf(tmp_path, [*RECORDS, "chrZ\t5\t.\tA\tG"], header=header, name="bad.vcf")
    with pytest.raises(SpecError, match=f"bad.vcf line {header.count(chr(10)) + 6}: contig 'chrZ'"):
        read_variants(bad, CONTIGS)


@pytest.mark.parametrize("columns", ["#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO", "#CHROM\tPOS\tID\tREF\tALT"])
def test_a_chrom_line_without_fileformat_is_read_as_a_table(tmp_path: Path, columns: str) -> None:
    """A VCF whose ``##`` lines were stripped (``grep -v '^##'``), or its first five columns cut out
    (``#CHROM POS ID REF ALT``): htslib cannot open either (no ``##fileformat``), and the '#CHROM'
    line sent them to it, so they were refused, while a body with no header line at all is read."""
    width = columns.count("\t") + 1
    records = ["\t".join(r.split("\t")[:width]) for r in RECORDS]
    expected = read_variants(write_vcf(tmp_path, RECORDS), CONTIGS)
    table = read_variants(write_vcf(tmp_path, records, header=columns + "\n", name="cut.vcf"), CONTIGS)
    for column in ("variant_id", "chrom", "pos", "ref", "alt"):
        assert getattr(table, column) == getattr(expected, column)
    assert table.counts == expected.counts and table.line == [2, 3, 4, 6, 6]
    assert table.layout == "table" and "cut.vcf read as a tab-separated table" in table.notes[0]


@pytest.mark.parametrize(("name", "text"), [
    ("v.tsv", "chrom\tpos\tref\talt\tid\nchr1\t10\tA\tG\trs1\nchr1\t20\tC\tCTTT\t.\n"
              "chr2\t5\tA\tC,<DEL>\tmulti\nchr1\t40\tT\t.\t.\n"),
    ("v.csv", "CHROM,POS,REF,ALT\nchr1,10,A,G\nchr1,20,C,CTTT\nchr2,5,A,C\nchr1,40,T,.\n"),
])
def test_plain_variant_tables(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    table = read_variants(str(path), CONTIGS)
    assert table.chrom == ["chr1", "chr1", "chr2"] and table.pos == [10, 20, 5]
    assert table.ref == ["A", "C", "A"] and table.alt == ["G", "CTTT", "C"]
    assert table.line == [2, 3, 4]
    assert table.counts["records"] == 4 and table.counts["skipped"]["alt_missing"] == 1
    if name.endswith(".tsv"):
        assert table.variant_id == ["rs1", "chr1:20:C:CTTT", "multi:C"]
        assert table.counts["skipped"]["symbolic"] == 1
    else:
        assert table.variant_id == ["chr1:10:A:G", "chr1:20:C:CTTT", "chr2:5:A:C"]
    assert table.layout == "table" and "table with columns" in table.notes[0]


def test_gzip_table_and_errors_name_the_line(tmp_path: Path) -> None:
    import gzip

    path = tmp_path / "v.tsv.gz"
    with gzip.open(path, "wt") as f:
        f.write("chrom\tpos\tref\talt\nchr1\t10\tA\tG\nchr1\tten\tA\tG\n")
    with pytest.raises(SpecError, match="v.tsv.gz line 3: POS 'ten' is not an integer"):
        read_variants(str(path), CONTIGS)


def test_something_else_is_refused_with_what_is_expected(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("these are my variants\nchr1 10 A G\n")
    with pytest.raises(SpecError) as err:
        read_variants(str(path), CONTIGS)
    assert err.value.problems[0][0] == "windows.variants"
    assert "chrom, pos, ref, alt" in str(err.value) and "notes.txt" in str(err.value)


@pytest.mark.parametrize(("record", "said"), [
    ("chr1\tx\t.\tA\tG\t.\t.\t.", "POS 'x' is not a whole number"),
    ("chr1\t10\t.\tA", "4 tab-separated columns; a record has at least 8"),
])
def test_a_malformed_record_is_described_not_called_a_truncated_file(
        tmp_path: Path, record: str, said: str) -> None:
    """htslib calls both of these 'truncated file'; the message says what the line lacks."""
    with pytest.raises(SpecError) as err:
        read_variants(write_vcf(tmp_path, ["chr1\t5\t.\tC\tT\t.\t.\t.", record]), CONTIGS)
    text = str(err.value)
    assert "v.vcf line 7: malformed VCF record" in text and said in text and "truncated" not in text


SAMPLE_HEADER = ('##fileformat=VCFv4.2\n##FORMAT=<ID=GT,Number=1,Type=String,Description="GT">\n'
                 '##FORMAT=<ID=DP,Number=1,Type=Integer,Description="DP">\n'
                 "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\tS1\tS2\n")


@pytest.mark.parametrize("samples", ["GT:DP\t0/1:3", "GT", "GT:DP\t0/1:x\t1/1:y", "GT\t0/1\t1/1\t0/0"])
def test_the_genotypes_are_never_parsed(tmp_path: Path, samples: str) -> None:
    """Scoring reads CHROM to ALT; a cohort VCF's genotypes (100,000 samples: 400 kB a line) were
    parsed by htslib for every record, 5 ms a record (a night's planning for a million), and a
    record whose sample columns htslib could not parse (one short, a DP of 'x') was left out
    though its alleles were whole. The samples are not read: such a record is scored."""
    records = [f"chr1\t{10 + i}\t.\tA\tG\t.\t.\t.\tGT\t0/1\t1/1" for i in range(30)]
    table = read_variants(write_vcf(tmp_path, [*records[:5], f"chr1\t9\tshort\tA\tG\t.\t.\t.\t{samples}",
                                               *records[5:]], SAMPLE_HEADER), CONTIGS, max_bad=0.05)
    assert table.failed == [] and len(table) == 31
    assert table.row(5) == {"variant_id": "short", "chrom": "chr1", "pos": 9, "ref": "A", "alt": "G", "line": 10}


GOOD = [f"chr1\t{10 + i}\t.\tA\tG\t.\t.\t." for i in range(40)]


def test_malformed_records_are_left_out_and_the_read_goes_on(tmp_path: Path) -> None:
    """htslib fails a line and passes it by: the records after it are read, the line is listed."""
    records = [*GOOD[:20], "chr1\tx\t.\tA\tG\t.\t.\t.", *GOOD[20:]]
    table = read_variants(write_vcf(tmp_path, records), CONTIGS, max_bad=0.05)
    assert table.pos == list(range(10, 50)) and table.counts["records"] == 41
    assert table.failed == [{"input": "v.vcf line 26",
                             "error": "malformed VCF record (POS 'x' is not a whole number)"}]


def test_a_record_that_is_not_utf8_is_left_out_by_line(tmp_path: Path) -> None:
    """An ID in Latin-1 (b'rs\\xe9') raised UnicodeDecodeError out of the plan: a traceback for one
    record. It is left out by line, with the fix; the rest are read."""
    path = tmp_path / "v.vcf"
    path.write_bytes(HEADER.encode() + b"chr1\t9\trs\xe9\tA\tG\t.\t.\t.\n" + "".join(r + "\n" for r in GOOD).encode())
    table = read_variants(str(path), CONTIGS, max_bad=0.05)
    assert len(table) == 40
    assert table.failed == [{"input": "v.vcf line 6", "error": "malformed VCF record (not UTF-8 text: save the "
                                                              "file as UTF-8, e.g. `iconv -f latin1 -t utf-8`)"}]


def test_two_vcfs_joined_with_cat_read_both_bodies_and_say_so(tmp_path: Path) -> None:
    """`cat a.vcf b.vcf` puts b's header among the records: its lines were malformed records (the
    '#CHROM' line 'POS is not a whole number'), past max_bad_records a refusal naming neither the
    cause nor the fix. The header lines are no records: both bodies are read, and a note says so."""
    both = write_vcf(tmp_path, [*GOOD[:20], HEADER.rstrip("\n"), *GOOD[20:]])
    table = read_variants(both, CONTIGS)
    assert len(table) == 40 and table.failed == [] and table.counts["records"] == 40
    assert any(n.startswith("v.vcf has 5 header line(s) among its records (first: line 26): VCFs joined "
                            "with `cat`?") and "bcftools concat" in n for n in table.notes), table.notes


def test_a_record_separated_by_spaces_says_so(tmp_path: Path) -> None:
    table = read_variants(write_vcf(tmp_path, [*GOOD[:30], "chr1 10 . A G . . ."]), CONTIGS, max_bad=0.05)
    assert table.failed[0]["error"] == ("malformed VCF record (1 tab-separated columns; a record has at least 8: "
                                        "CHROM POS ID REF ALT QUAL FILTER INFO; its columns are separated by "
                                        "spaces, a VCF's by tabs)")


def test_blank_lines_in_a_vcf_are_no_records(tmp_path: Path) -> None:
    """htslib fails an empty line; it was counted as a malformed record (two trailing blank lines
    refused a file of 20 good records as 'a wrong file or genome build')."""
    table = read_variants(write_vcf(tmp_path, [*GOOD[:2], "", "   ", *GOOD[2:20], "", ""]), CONTIGS)
    assert len(table) == 20 and table.failed == [] and table.counts["records"] == 20


def test_a_blank_line_in_the_header_does_not_shift_the_line_numbers(tmp_path: Path) -> None:
    """htslib passes a blank line among the ``##`` lines by; the header was counted up to it, so
    every record was named by a line four above its own (and described from that other line)."""
    header = HEADER.replace("##INFO", "\n##INFO", 1)
    table = read_variants(write_vcf(tmp_path, [*GOOD[:30], "chr1\tx\t.\tA\tG\t.\t.\t."], header=header),
                          CONTIGS, max_bad=0.05)
    assert table.line[:2] == [7, 8]
    assert table.failed == [{"input": "v.vcf line 37",
                             "error": "malformed VCF record (POS 'x' is not a whole number)"}]


def test_records_off_the_reference_are_left_out_by_line(tmp_path: Path) -> None:
    records = [*GOOD[:39], "chrZ\t5\t.\tA\tG\t.\t.\t.", "chr1\t12\t.\tR\tG\t.\t.\t."]
    table = read_variants(write_vcf(tmp_path, records), CONTIGS, max_bad=0.05)
    assert len(table) == 39
    assert [f["input"] for f in table.failed] == ["v.vcf line 45", "v.vcf line 46"]
    assert table.failed[1]["error"].startswith("REF 'R' holds IUPAC ambiguity codes (R)")


def test_a_malformed_table_line_is_left_out(tmp_path: Path) -> None:
    path = tmp_path / "v.tsv"
    path.write_text("chrom\tpos\tref\talt\n" + "".join(f"chr1\t{10 + i}\tA\tG\n" for i in range(30))
                    + "chr1\tten\tA\tG\nchr1\t5\n")
    table = read_variants(str(path), CONTIGS, max_bad=0.1)
    assert len(table) == 30
    assert table.failed == [{"input": "v.tsv line 32", "error": "POS 'ten' is not an integer"},
                            {"input": "v.tsv line 33", "error": "expected at least 4 tab-separated fields, "
                                                               "got 2: 'chr1\\t5'"}]


def test_a_csv_quotes_its_multi_allelic_alt_and_pos_is_digits_only(tmp_path: Path) -> None:
    """pandas writes ALT "G,T" quoted: it was split on its comma into two non-sequence alleles,
    skipped; and int() read POS '1_2' as 12."""
    path = tmp_path / "v.csv"
    path.write_text('chrom,pos,ref,alt\nchr1,10,A,"G,T"\nchr1,20,C,A\nchr1,1_2,A,G\n')
    table = read_variants(str(path), CONTIGS, max_bad=0.5)
    assert list(zip(table.pos, table.alt, strict=True)) == [(10, "G"), (10, "T"), (20, "A")]
    assert table.failed == [{"input": "v.csv line 4", "error": "POS '1_2' is not an integer"}]


@pytest.mark.parametrize("header", ["# [1]CHROM\t[2]POS\t[3]ID\t[4]REF\t[5]ALT",
                                    "#[1]CHROM\t[2]POS\t[3]ID\t[4]REF\t[5]ALT"])
def test_a_bcftools_query_table_is_read_by_its_column_names(tmp_path: Path, header: str) -> None:
    """``bcftools query -H -f '%CHROM\\t%POS\\t%ID\\t%REF\\t%ALT\\n'`` numbers its column names
    (``[2]POS``; older versions put a space after the '#'): they named no column and the file was
    refused as neither a VCF nor a table."""
    path = tmp_path / "q.tsv"
    path.write_text(header + "\nchr1\t10\trs1\tA\tG\nchr2\t5\t.\tA\tC,T\n")
    table = read_variants(str(path), CONTIGS)
    assert table.layout == "table" and table.variant_id == ["rs1", "chr2:5:A:C", "chr2:5:A:T"]
    assert table.pos == [10, 5, 5] and table.line == [2, 3, 3]


def test_a_tsv_with_quoted_fields_as_r_writes_it(tmp_path: Path) -> None:
    """R's ``write.table(x, sep="\\t", row.names = FALSE)`` quotes every string: the quotes were
    kept in a TSV (only a CSV's were taken off), so its header named no column and it was refused."""
    path = tmp_path / "v.tsv"
    path.write_text('"chrom"\t"pos"\t"ref"\t"alt"\n"chr1"\t10\t"A"\t"G,T"\n"chr2"\t5\t"A"\t"C"\n')
    table = read_variants(str(path), CONTIGS)
    assert list(zip(table.chrom, table.pos, table.ref, table.alt, strict=True)) == [
        ("chr1", 10, "A", "G"), ("chr1", 10, "A", "T"), ("chr2", 5, "A", "C")]
    assert table.layout == "table"


@pytest.mark.parametrize(("name", "text"), [
    ("v.csv", "chrom,pos,ref,alt\nchr1,10,A,G\nchr2,5,A,C\n"),
    ("body.vcf", "chr1\t10\t.\tA\tG\nchr2\t5\t.\tA\tC\n"),
    ("v.vcf", HEADER + "chr1\t10\t.\tA\tG\t.\t.\t.\nchr2\t5\t.\tA\tC\t.\t.\t.\n"),
])
def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path: Path, name: str, text: str) -> None:
    """Excel's "CSV UTF-8" starts the file with a byte-order mark: the header named '\\ufeffchrom',
    no column, and the file was refused; a body's first contig was '\\ufeffchr1'; a VCF's
    ``##fileformat`` line was not one (htslib cannot read it: it is read as the table it names)."""
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    table = read_variants(str(path), CONTIGS)
    assert list(zip(table.chrom, table.pos, table.alt, strict=True)) == [("chr1", 10, "G"), ("chr2", 5, "C")]
    assert table.failed == []


def test_a_malformed_first_body_line_or_a_comment_before_a_header_is_not_the_format(tmp_path: Path) -> None:
    """The layout was told from the first line alone: a headerless VCF body whose first record was
    malformed, or a TSV with a '#' comment line before its header, were refused whole."""
    body = tmp_path / "body.vcf"
    body.write_text("chr1\tx\t.\tA\tG\n" + "".join(f"chr1\t{10 + i}\t.\tA\tG\n" for i in range(30)))
    table = read_variants(str(body), CONTIGS, max_bad=0.05)
    assert len(table) == 30 and table.layout == "vcf-without-header"
    assert table.failed == [{"input": "body.vcf line 1", "error": "POS 'x' is not an integer"}]
    tsv = tmp_path / "v.tsv"
    tsv.write_text("# exported 2026-12-06\nchrom\tpos\tref\talt\nchr1\t10\tA\tG\n")
    assert read_variants(str(tsv), CONTIGS).pos == [10]


def test_too_many_bad_records_refuse_the_file_with_the_fix(tmp_path: Path) -> None:
    records = [*GOOD[:10], "chrZ\t5\t.\tA\tG\t.\t.\t.", "chrZ\t6\t.\tA\tG\t.\t.\t."]
    with pytest.raises(SpecError) as err:
        read_variants(write_vcf(tmp_path, records), CONTIGS, max_bad=0.1)
    assert "2 of 12 records are unusable, more than windows.max_bad_records = 0.1" in str(err.value)


def test_a_file_that_keeps_failing_stops_with_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads that fail in a row (a corrupt stretch where nothing advances) end the read, bounded."""
    from gpubatch.sources.genome import variant_files

    monkeypatch.setattr(variant_files, "MAX_FAILING_IN_A_ROW", 3)
    records = [*GOOD[:5], *["chr1\tx\t.\tA\tG\t.\t.\t."] * 4, *GOOD[5:]]
    with pytest.raises(SpecError, match=r"v.vcf line 11: 3 records in a row from here could not be read"):
        read_variants(write_vcf(tmp_path, records), CONTIGS, max_bad=1.0)


def test_iupac_and_other_non_sequence_alts_are_skipped_by_reason(tmp_path: Path) -> None:
    # A masking VCF: ALT holds IUPAC ambiguity codes, which are not bases.
    records = [f"chr1\t{10 + i}\t.\tA\t{code}\t.\t.\t." for i, code in enumerate("KYRWSMDHBVN")]
    records += ["chr1\t30\t.\tA\tG,K\t.\t.\t.", "chr1\t31\t.\tA\tAX\t.\t.\t.",
                "chr1\t32\t.\tA\tG]chr2:5]\t.\t.\t.", "chr1\t33\t.\tA\tacgt\t.\t.\t."]
    table = read_variants(write_vcf(tmp_path, records), CONTIGS)
    assert table.alt == ["G", "ACGT"]  # only bases are scored (lower case is sequence)
    assert table.counts["skipped"] == {"alt_missing": 0, "symbolic": 0, "spanning_deletion": 0,
                                       "breakend": 1, "iupac": 12, "not_sequence": 1}


@pytest.mark.parametrize(("record", "message"), [
    ("chr1\t0\t.\tA\tG\t.\t.\t.", "v.vcf line 7: POS 0 is not a position"),
    ("chr1\t12\t.\t.\tG\t.\t.\t.", "v.vcf line 7: REF '.' is not a sequence"),
    ("chr1\t12\t.\tR\tG\t.\t.\t.", "v.vcf line 7: REF 'R' holds IUPAC ambiguity codes (R)"),
    ("chr1\t12\t.\t<DEL>\tG\t.\t.\t.", "v.vcf line 7: REF '<DEL>' is a symbolic allele"),
])
def test_bad_pos_and_non_sequence_ref_are_refused_with_the_line(tmp_path: Path, record: str, message: str) -> None:
    with pytest.raises(SpecError) as err:
        read_variants(write_vcf(tmp_path, ["chr1\t10\t.\tA\tG\t.\t.\t.", record]), CONTIGS)
    assert err.value.problems[0][1].startswith(message)


def test_a_long_field_is_quoted_by_its_start_and_length(tmp_path: Path) -> None:
    """A record's REF (a structural variant's, spelled out), ALT list, contig or POS was quoted
    whole in its problem, each of up to 1,000 listed held, written to report.json and printed: a
    20 kB REF made a 20 kB line of the refusal, a 10 Mb one 10 MB."""
    long_ref, long_alts = "ACGT" * 5000 + "R", ",".join(["A", "", "C" * 20_000])
    records = [f"chr1\t1\t.\t{long_ref}\tA\t.\t.\t.", f"chr1\t5\t.\t{'A' * 20_000}\tA\t.\t.\t.",
               f"chr2\t3\t.\tA\t{long_alts}\t.\t.\t.", f"chr{'Z' * 20_000}\t3\t.\tA\tC\t.\t.\t."]
    with pytest.raises(SpecError) as err:
        read_variants(write_vcf(tmp_path, records, header=HEADER.replace("chr2,length=120", "chr2,length=30000")),
                      ContigTable(("chr1", "chr2"), (300, 30_000)))
    problems = [m for _, m in err.value.problems]
    assert max(map(len, problems)) < 400, [len(m) for m in problems]
    assert f"REF '{'ACGT' * 15}'...(20,001 characters) holds IUPAC ambiguity codes (R)" in problems[1]
    assert f"REF '{'A' * 60}'...(20,000 characters) at POS 5 runs past the end of chr1" in problems[2]
    assert f"ALT 'A,.,{'C' * 56}'...(20,004 characters) lists an empty allele" in problems[3]
    assert f"contig 'chr{'Z' * 57}'...(20,003 characters) is not in the reference" in problems[4]
    table = tmp_path / "t.tsv"
    table.write_text(f"chrom\tpos\tref\talt\nchr1\t2\tA\tC\nchr1\t{'9' * 9_999}x\tA\tC\n")
    with pytest.raises(SpecError) as err:
        read_variants(str(table), CONTIGS)
    assert f"t.tsv line 3: POS '{'9' * 60}'...(10,000 characters) is not an integer" in str(err.value)


def test_ref_n_is_sequence(tmp_path: Path) -> None:
    table = read_variants(write_vcf(tmp_path, ["chr1\t10\t.\tN\tG\t.\t.\t."]), CONTIGS)
    assert table.ref == ["N"]


def test_unknown_contig_and_pos_past_end_name_the_line(tmp_path: Path) -> None:
    path = write_vcf(tmp_path, ["chr1\t10\t.\tA\tG\t.\t.\t.", "chrZ\t5\t.\tA\tG\t.\t.\t.",
                                "chr2\t121\t.\tA\tG\t.\t.\t."])
    with pytest.raises(SpecError) as err:
        read_variants(path, CONTIGS)
    messages = [m for _, m in err.value.problems]
    assert messages[0] == ("1 of 3 records are on contigs the reference does not have: 'chrZ' (1 record); "
                           "the reference's contigs are chr1, chr2")
    assert messages[1].startswith("v.vcf line 7: contig 'chrZ' is not in the reference")
    assert "chr1, chr2" in messages[1]
    assert messages[2] == "v.vcf line 8: POS 121 is past the end of chr2 (length 120)"


def test_a_vcf_of_the_other_contig_naming_is_refused_once_naming_both(tmp_path: Path) -> None:
    """An Ensembl-named VCF (1, MT) against a UCSC reference (chr1, chrM): refused at plan, as
    before, but with one line first that names both conventions and the rename map; the MT
    records' own lines had no hint at all (only the 'chr' prefix was looked for)."""
    contigs = ContigTable(("chr1", "chr2", "chrM"), (300, 120, 50))
    records = [f"1\t{10 + i}\t.\tA\tG\t.\t.\t." for i in range(30)] + ["MT\t5\t.\tA\tG\t.\t.\t."]
    with pytest.raises(SpecError) as err:
        read_variants(write_vcf(tmp_path, records), contigs, max_bad=0.05)
    messages = [m for _, m in err.value.problems]
    assert messages[0].startswith("31 of 31 records are on contigs the reference does not have: "
                                  "'1' (30 records), 'MT' (1 record). The reference has '1' as 'chr1', "
                                  "'MT' as 'chrM': the file and the reference follow different contig naming")
    assert "`bcftools annotate --rename-chrs MAP`, MAP's lines '1 chr1', 'MT chrM'" in messages[0]
    assert sum("... and" in m for m in messages) == 1 and len(messages) == 22  # summary, 20 lines, the rest
    table = read_variants(write_vcf(tmp_path, ["chr1\t10\t.\tA\tG\t.\t.\t."] * 30 + records[-1:],
                                    name="mt.vcf"), contigs, max_bad=0.05)
    assert table.failed[0]["input"] == "mt.vcf line 36"
    assert ("contig 'MT' is not in the reference (the reference has 'chrM': the files follow different "
            "naming conventions, 'MT' against 'chrM'") in table.failed[0]["error"]


def test_a_ref_that_runs_past_the_contig_end_is_left_out_by_line(tmp_path: Path) -> None:
    """POS inside the contig but REF going on past its end (another build's longer contig): it was
    scored against N padding and counted as a REF mismatch, toward "wrong genome build?", rather
    than left out like a POS past the end."""
    path = write_vcf(tmp_path, [*GOOD[:30], "chr2\t119\t.\tAC\tA\t.\t.\t.", "chr2\t119\t.\tACG\tA\t.\t.\t."])
    table = read_variants(path, CONTIGS, max_bad=0.05)
    assert table.pos[-1] == 119 and table.ref[-1] == "AC"
    assert table.failed == [{"input": "v.vcf line 37",
                             "error": "REF 'ACG' at POS 119 runs past the end of chr2 (length 120)"}]


def test_missing_vcf(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="file not found"):
        read_variants(str(tmp_path / "none.vcf"), CONTIGS)


def test_symbolic_alleles() -> None:
    assert all(is_symbolic(a) for a in ("<DEL>", "<INS:ME>", "*", "G]17:198982]", "]13:123456]T", ".A", "A."))
    assert not any(is_symbolic(a) for a in ("A", "ACGT", "N"))


@pytest.mark.parametrize(("alt", "reason"), [
    ("A", None), ("acgT", None), (".", "alt_missing"), ("<DUP:TANDEM>", "symbolic"), ("*", "spanning_deletion"),
    ("A[chr2:5[", "breakend"), (".T", "breakend"), ("K", "iupac"), ("ACN", "iupac"), ("Y", "iupac"),
    ("AU", "not_sequence"), ("1", "not_sequence"),
])
def test_alt_skip_reasons(alt: str, reason: str | None) -> None:
    assert alt_skip_reason(alt) == reason


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
    assert np.array_equal(ref_win, dna_codes(exp_ref))
    assert np.array_equal(alt_win, dna_codes(exp_alt))
    assert match == (seq[pos - 1 : pos - 1 + len(ref)] == ref[: max(0, 100 - pos + 1)])


def test_ref_mismatch_is_flagged() -> None:
    seq = "ACGTACGTACGTACGTACGT"
    span = variant_span(10, "T", "G", 8)  # 0-based 9 is 'C'
    _, alt_win, match = variant_windows(encode_dna(seq), 0, span, "T", "G", 8)
    assert not match
    assert alt_win[8 // 2] == 2  # G


def test_htslib_stays_off_the_terminal(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A header without ##contig lines makes htslib warn per contig, straight to fd 2."""
    header = "##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
    table = read_variants(write_vcf(tmp_path, RECORDS[:3], header=header), CONTIGS)
    assert len(table) == 3
    assert "[W::" not in capfd.readouterr().err


def test_a_pos_saved_as_a_float_says_why_and_an_empty_vcf_says_it_holds_nothing(tmp_path: Path) -> None:
    """pandas saves an integer column with one missing value as floats, every row ('12.0'); the
    quarantine said only "not an integer". A VCF of a header alone said "no scorable variants: 0
    records, 0 ALT alleles skipped (none)"."""
    from gpubatch.sources.genome.source import _skip_text

    path = tmp_path / "v.tsv"
    path.write_text("chrom\tpos\tref\talt\nchr1\t10.0\tA\tG\nchr1\t20\tC\tA\n")
    table = read_variants(str(path), CONTIGS, max_bad=0.5)
    (failed,) = table.failed
    assert failed["error"].startswith("POS '10.0' is not an integer (written as a float: a table saved by pandas")
    empty = read_variants(write_vcf(tmp_path, [], name="empty.vcf"), CONTIGS)
    assert len(empty) == 0 and _skip_text(empty) == "the file holds no variant records (a header alone, or an empty file)"


def test_an_alt_list_with_an_empty_allele_is_left_out_naming_its_line(tmp_path: Path) -> None:
    """``A,,C`` (or ``G,``): pysam reads the empty allele as '.', which was counted as
    ``alt_missing`` and its record scored for the others, no line named. It is a malformed
    record, left out and listed by line like the others, in a VCF and in a table alike."""
    records = [*GOOD[:30], "chr1\t10\tr1\tA\tG,,C\t.\t.\t.", "chr1\t12\tr2\tT\tG,\t.\t.\t."]
    table = read_variants(write_vcf(tmp_path, records), CONTIGS, max_bad=0.1)
    assert [f["input"] for f in table.failed] == ["v.vcf line 36", "v.vcf line 37"]
    assert "ALT 'G,.,C' lists an empty allele" in table.failed[0]["error"]
    assert table.counts["skipped"]["alt_missing"] == 0 and len(table) == 30
    tsv = tmp_path / "v.tsv"
    tsv.write_text("chrom\tpos\tref\talt\n" + "".join(f"chr1\t{i}\tN\tA\n" for i in range(1, 31)) + "chr1\t40\tN\tG,\n")
    table = read_variants(str(tsv), CONTIGS, max_bad=0.1)
    assert [f["input"] for f in table.failed] == ["v.tsv line 32"]
    assert "ALT 'G,' lists an empty allele" in table.failed[0]["error"]
