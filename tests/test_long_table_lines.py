"""A table's line too long to read is left out saying what made it long; a VCF body's is read as a VCF's.

Such a line is read up to the bytes a REF and an ALT of ``max_allele`` bases and 64 KiB besides
take; a longer one was left out as if its REF or ALT were too long, whatever made it so: a VCF body's
INFO of annotations, its genotype columns, a table's notes column. Its columns are now measured as
it is read past (``long_lines.FieldMeter``, in bounded memory), and the problem names the column
and its size, and the fix: ``cut`` the columns read, the VCF header, or windows.chunk_bases.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from gpubatch.sources.genome.long_lines import FieldMeter
from gpubatch.sources.genome.reference import ContigTable
from gpubatch.sources.genome.variant_guard import SHORT_LINE
from gpubatch.sources.genome.variants import read_variants

CONTIG = "".join(np.random.default_rng(11).choice(list("ACGT"), 5000))
CONTIGS = ContigTable(("chrA",), (len(CONTIG),))
MAX_ALLELE = 1024
LINE_BYTES = 2 * MAX_ALLELE + SHORT_LINE


def _body_row(pos: int, ref: str | None = None, rest: str = ".\tPASS\tDP=3") -> str:
    return f"chrA\t{pos}\trs{pos}\t{ref or CONTIG[pos - 1]}\t{'ACGT'[pos % 4]}\t{rest}"


def _errors(path: Path) -> tuple[dict[str, str], list[int]]:
    table = read_variants(str(path), CONTIGS, max_bad=0.5, max_allele=MAX_ALLELE)
    return {f["input"]: f["error"] for f in table.failed}, table.pos


@pytest.mark.parametrize("form", ["plain", "gzip"])
def test_a_vcf_bodys_long_info_or_genotypes_are_read_past_as_a_vcfs(tmp_path: Path, form: str) -> None:
    """A VCF body's line long for its INFO or its genotypes was left out (a VCF with its header
    scored the same record, its INFO read as '.'); now it is read by the VCF's rule and words: an
    INFO over 64 KiB dropped and the line named in the report's note, genotypes not read, a REF or
    a FILTER too long left out as in a VCF. A line whose first five columns are too long together
    to be read (each under its limit) is still left out saying so."""
    rows = [_body_row(p) for p in range(100, 1100, 100)]
    rows[2] = _body_row(300, rest=".\tPASS\tCSQ=" + "x|" * 100_000)               # INFO of 200,004 bytes
    rows[3] = _body_row(400, rest=".\tPASS\t.\tGT\t" + "\t".join(["0|1"] * 30_000))  # 30,000 genotypes
    rows[4] = _body_row(500, ref="ACGT" * 1000, rest=".\tPASS\tCSQ=" + "x" * 100_000)  # a REF too long, and INFO
    rows[5] = _body_row(600, rest=".\tPASS\tCSQ=" + "y" * 66_000)  # INFO over 64 KiB in a line read whole
    rows[6] = _body_row(700, rest="." + "\t" + "F" * 70_000 + "\t.")  # a FILTER of 70,000 bytes
    rows[7] = f"{'c' * 60_000}\t800\t{'r' * 60_000}\tA\tC"  # CHROM and ID under 64 KiB each
    text = "".join(r + "\n" for r in rows)
    path = tmp_path / ("body.vcf" if form == "plain" else "body.vcf.gz")
    path.write_bytes(text.encode() if form == "plain" else gzip.compress(text.encode()))
    table = read_variants(str(path), CONTIGS, max_bad=0.5, max_allele=MAX_ALLELE)
    errors = {f["input"]: f["error"] for f in table.failed}
    assert table.pos == [100, 200, 300, 400, 600, 900, 1000]
    assert list(errors) == [f"{path.name} line {n}" for n in (5, 7, 8)]
    ref, filter_, columns = errors.values()
    assert ref.startswith("REF of 4,000 bases is longer than the 1,024 bases one read of the reference holds")
    assert "windows.chunk_bases to at least 4,000" in ref
    assert filter_.startswith("its FILTER field is 70,000 bytes long (over 65,536)")
    assert columns.startswith(f"the line is {len(rows[7]):,} bytes long, over the {LINE_BYTES:,} bytes")
    assert "its columns read hold more than that together" in columns
    assert table.counts["info_dropped"] == 2
    (note,) = [n for n in table.notes if "INFO" in n]
    assert note.startswith(f"{path.name}: 2 record(s) have an INFO field of over 65,536 bytes (lines 3 and 6)")


def test_a_tables_long_column_is_named_by_its_header_and_a_long_ref_as_before(tmp_path: Path) -> None:
    """A TSV with a notes column of 150 KB on one line, a REF of 80,000 bases on another, and a
    last line (no newline) of exactly the bytes a line is read up to, which is read and scored:
    it was taken for a longer line and left out."""
    def row(pos: int, ref: str = "", note: str = "x") -> str:
        return f"chrA\t{pos}\t{ref or CONTIG[pos - 1]}\tA\t{note}"
    rows = [row(p) for p in range(100, 600, 100)]
    rows[1] = row(200, note="n" * 150_000)
    rows[2] = row(300, ref="ACGT" * 20_000)
    last = row(600, note="")
    rows.append(last + "y" * (LINE_BYTES - len(last)))
    path = tmp_path / "v.tsv"
    path.write_text("chrom\tpos\tref\talt\tannotation\n" + "\n".join(rows))
    errors, scored = _errors(path)
    assert scored == [100, 400, 500, 600]
    assert list(errors) == ["v.tsv line 3", "v.tsv line 4"]
    note, ref = errors.values()
    assert "its 1 column(s) not read (all but CHROM, POS, REF, ALT) hold 150,000 bytes, most of them in column 5 " \
           "(annotation): 150,000 bytes" in note
    assert "keep those columns first (`cut -f1-4`)" in note and "REF is" not in note and "VCF header" not in note
    assert "its REF is 80,000 bases, longer than the 1,024 bases one read of the reference holds" in ref
    assert "raise windows.chunk_bases to at least 80,000 to score it" in ref and "column(s) not read" not in ref


def test_a_csvs_quoted_commas_are_no_column_breaks(tmp_path: Path) -> None:
    """A quoted ALT list and a quoted notes field full of commas: the notes column is named, whole."""
    path = tmp_path / "v.csv"
    notes = '"' + "a,b" * 40_000 + '"'
    path.write_text("chrom,pos,ref,alt,notes\n" + "".join(
        f'chrA,{p},{CONTIG[p - 1]},"A,G",{notes if p == 300 else "x"}\n' for p in range(100, 600, 100)))
    errors, _ = _errors(path)
    (problem,) = errors.values()
    assert f"most of them in column 5 (notes): {len(notes):,} bytes" in problem
    assert "ALT 5 bytes" in problem and "(`cut -d, -f1-4`)" in problem


def test_the_meter_measures_the_same_however_the_line_is_cut() -> None:
    """Pieces of any size, a quoted tab among them: the same lengths as the line fed whole."""
    line = b"chrA\t12\trs1\tA\t" + b"G" * 5000 + b'\t"q\tq"\t' + b"\t".join([b"0|1"] * 2000) + b"\n"
    seen = set()
    rng = np.random.default_rng(3)
    for scale in (1, 7, 100, 4096, len(line)):
        meter = FieldMeter(b"\t", {"chrom": 0, "pos": 1, "id": 2, "ref": 3, "alt": 4})
        at = 0
        while at < len(line):
            size = int(rng.integers(1, scale + 1))
            meter.feed(line[at : at + size])
            at += size
        meter.finish()
        seen.add((tuple(sorted(meter.lengths.items())), meter.longest, meter.other_bytes, meter.columns))
    assert seen == {(((0, 4), (1, 2), (2, 3), (3, 1), (4, 5000)), (5, 5), 5 + 2000 * 3, 2006)}
