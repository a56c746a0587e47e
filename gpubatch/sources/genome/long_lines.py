"""What makes a table's line too long to read: its fields measured as the line is read past.

A table (or a VCF body without its header) is read a line at a time up to the bytes a REF and an
ALT of ``max_allele`` bases and 64 KiB besides take (``variant_files``); a longer line is left out
unread. It was said to be so for its REF or ALT whatever made it long, and a VCF body's line is
long mostly for another reason: an INFO of annotations, or thousands of genotype columns. The
reader passes such a line here in pieces as it reads past it (``numbered_lines``'s ``long_line``),
and :class:`FieldMeter` keeps its columns' lengths, not their bytes: those of the columns read,
and the longest of the others and their sum. The problem then names what is too long and the fix.
A VCF body's line is long mostly for another reason (an INFO of annotations, thousands of genotype
columns), which a VCF's reader reads past: its QUAL, FILTER and INFO are measured too
(:func:`vcf_field_sizes`), and the line is read by the VCF's rule (``variant_guard.field_verdict``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gpubatch.sources.genome.variant_guard import SHORT_LINE

#: a VCF body's columns by number, as messages name them (the rest are its samples' genotypes)
VCF_COLUMNS = ("CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO", "FORMAT")


@dataclass
class FieldMeter:
    """The byte length of each column of one line, fed in pieces (quotes kept as ``_split``
    keeps them: a delimiter between double quotes is text); reset for the next line."""

    delimiter: bytes
    #: the columns the reader reads (field name -> column index)
    read: dict[str, int]
    #: columns not read whose lengths are kept too (a VCF body's QUAL, FILTER and INFO, which
    #: decide as in a VCF whether its record is left out or read with INFO as '.')
    measured: tuple[int, ...] = ()
    measured_lengths: dict[int, int] = field(default_factory=dict)
    lengths: dict[int, int] = field(default_factory=dict)  # the read columns' bytes
    longest: tuple[int, int] = (-1, 0)  # (column, bytes) of the longest column not read
    other_bytes: int = 0  # the bytes of the columns not read, together
    columns: int = 0  # columns ended so far
    length: int = 0  # the bytes of the column being read
    quoted: bool = False
    fed: bool = False
    finished: bool = False

    def reset(self) -> None:
        self.lengths, self.measured_lengths, self.longest, self.other_bytes = {}, {}, (-1, 0), 0
        self.columns = self.length = 0
        self.quoted = self.fed = self.finished = False

    def feed(self, piece: bytes) -> None:
        """The line's next bytes (its newline, at the end of the last piece, not counted)."""
        self.fed = True
        if piece.endswith(b"\n"):
            piece = piece[:-1]
        for i, segment in enumerate(piece.split(b'"')):
            if i:  # a quote: into or out of a quoted stretch, and a byte of its column
                self.quoted, self.length = not self.quoted, self.length + 1
            if self.quoted:
                self.length += len(segment)
                continue
            first, *rest = segment.split(self.delimiter)
            self.length += len(first)
            for text in rest:
                self._end_column()
                self.length = len(text)

    def finish(self) -> None:
        """The line's last column ended (when the line is read past; once, however often asked)."""
        if not self.finished:
            self._end_column()
            self.finished = True

    def _end_column(self) -> None:
        if self.columns in self.read.values():
            self.lengths[self.columns] = self.length
        else:
            if self.columns in self.measured:
                self.measured_lengths[self.columns] = self.length
            self.other_bytes += self.length
            if self.length > self.longest[1]:
                self.longest = (self.columns, self.length)
        self.columns, self.length = self.columns + 1, 0


def line_too_long(meter: FieldMeter, names: Sequence[str], line_bytes: int, max_allele: int, vcf_body: bool) -> str:
    """The problem of a line over ``line_bytes`` (measured by ``meter``, its column names
    ``names`` where known): what in it is too long, and how to mend or score it."""
    meter.finish()
    found: list[str] = []
    fixes: list[str] = []
    alleles = {key: meter.lengths.get(meter.read.get(key, -1), 0) for key in ("ref", "alt")}
    for key, size in alleles.items():
        if size > max_allele:
            found.append(f"its {key.upper()} is {size:,} bases, longer than the {max_allele:,} bases one read of the "
                         "reference holds (windows.chunk_bases, or windows.length when larger)")
    if max(alleles.values()) > max_allele:
        fixes.append(f"raise windows.chunk_bases to at least {max(alleles.values()):,} to score it, or leave such "
                     "lines out first")
    long_text = [key for key in ("chrom", "pos", "id") if meter.lengths.get(meter.read.get(key, -1), 0) > SHORT_LINE]
    for key in long_text:
        found.append(f"its {key.upper()} is {meter.lengths[meter.read[key]]:,} bytes long (over {SHORT_LINE:,})")
    if long_text:
        fixes.append("mend the line or leave it out")
    if meter.other_bytes > SHORT_LINE or not found:
        found.append(_unread(meter, names))
        fixes.append(_keep_read_columns(meter, vcf_body))
    shown = ", ".join(f"{key.upper()} {meter.lengths[i]:,}" for key, i in meter.read.items() if i in meter.lengths)
    total = sum(meter.lengths.values()) + meter.other_bytes + max(0, meter.columns - 1)
    return (f"the line is {total:,} bytes long, over the {line_bytes:,} bytes a line is read up to (a REF and an ALT of "
            f"{max_allele:,} bases and {SHORT_LINE:,} bytes besides): {'; '.join(found)} (the columns read: "
            f"{shown or 'none'} bytes). Left out unread: {'; '.join(fixes)}")


def vcf_field_sizes(meter: FieldMeter) -> list[int]:
    """The bytes of a VCF body line's first eight fields (as many as it has), measured by ``meter``
    (its ``read`` columns 0 to 4, ``measured`` 5 to 7) as the line was read past: ``field_verdict``'s."""
    meter.finish()
    sizes = {**meter.lengths, **meter.measured_lengths}
    return [sizes[i] for i in range(min(meter.columns, len(VCF_COLUMNS) - 1))]


def _unread(meter: FieldMeter, names: Sequence[str]) -> str:
    """The columns not read, in words: how many, their bytes, and the one that holds most of
    them (an INFO of annotations), or that none does (thousands of genotype columns)."""
    unread = meter.columns - len(meter.lengths)
    column, size = meter.longest
    if unread <= 0:
        return "its columns read hold more than that together"
    named = f" ({names[column]})" if column < len(names) and names[column] else ""
    which = (f"most of them in column {column + 1}{named}: {size:,} bytes" if 2 * size > meter.other_bytes
             else f"none of them over {size:,} bytes")
    return (f"its {unread:,} column(s) not read (all but {', '.join(k.upper() for k in meter.read)}) hold "
            f"{meter.other_bytes:,} bytes, {which}")


def _keep_read_columns(meter: FieldMeter, vcf_body: bool) -> str:
    """How to keep only the columns read (``cut``), and for a VCF body, the header that scores it."""
    comma = "" if meter.delimiter == b"\t" else "-d, "
    cut = f"cut {comma}-f{_ranges(sorted(i + 1 for i in meter.read.values()))}"
    fix = f"only {', '.join(k.upper() for k in meter.read)} are read: keep those columns first (`{cut}`)"
    if vcf_body:
        fix += (", or give the file its VCF header (##fileformat and #CHROM lines): a VCF's record is read "
                f"however long its INFO (over {SHORT_LINE:,} bytes read as '.') and genotype columns")
    return fix


def _ranges(numbers: list[int]) -> str:
    """Column numbers as ``cut`` takes them, runs joined: [1, 2, 3, 5] -> '1-3,5'."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
