"""A text VCF's record lines with their first eight fields bounded, before htslib reads them.

htslib holds a record's line whole, then its fields again (REF, ALT, ID and INFO in the record's
shared buffer), and pysam makes a Python string of each allele asked for: one record with a 20 MB
REF cost about 100 MB of the client before it could be checked at all, and the plan's copies of
it (upper case, the variant's ID, the REF check's codes, the workers' read around it) about
17 times its size in a run. Memory is bounded by the job's configuration, not by one line, so
the text htslib reads passes through :class:`FieldGuard` first:

* Every line but a ``##`` meta line is cut after its eighth field (INFO): variant mode reads
  CHROM, POS, ID, REF and ALT, so the ``#CHROM`` line reaches htslib without FORMAT and the
  sample names, and each record without its genotype columns, as in a sites-only VCF. A cohort's
  (thousands to hundreds of thousands of samples, megabytes a line) cost htslib its sample
  dictionary and each line whole; now neither memory nor parsing grows with the sample count.
* A line up to ``SHORT_LINE`` bytes is otherwise passed as it is (every record of an ordinary
  VCF: no field of it can be over a limit that matters, and the plan checks each allele's length itself).
* In a longer line, the first eight fields are read one at a time, each held up to its limit:
  REF and ALT up to ``max_allele`` (the bases one read of the reference holds: an allele longer
  than that cannot be checked or windowed in one read), CHROM, POS, ID, QUAL and FILTER up to
  ``SHORT_LINE`` bytes; the fields after them are read past unheld. A field over its limit makes
  the line a bad record: it is replaced by a placeholder record htslib reads in a few bytes, and
  its line number and problem are kept in ``problems``, which the reader reports in its place
  (quarantined like any malformed line).
* INFO is not used by variant mode: over ``SHORT_LINE`` bytes it is passed on as ``.``
  (counted in ``info_dropped``, the first lines kept in ``info_dropped_lines``: the report's
  note names them, for whoever reads INFO downstream).

``##`` meta lines pass through whole: htslib reads the header itself. One line keeps one line,
so every record keeps its number.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO

#: lines up to this long pass unexamined; longer lines' fields other than REF and ALT are held up to it
SHORT_LINE = 1 << 16
#: the line numbers of records whose INFO was dropped that are kept to name in the report's note
INFO_LINES_KEPT = 5
#: the VCF's first eight columns, as messages name them
COLUMNS = ("CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO")
REF, ALT, INFO = 3, 4, 7
#: a line's FORMAT and sample columns (the ninth field on), in any line but a ``##`` meta line
_PAST_INFO = re.compile(rb"^(?!##)([^\t\n]*+(?:\t[^\t\n]*+){7})\t[^\n]*+", re.MULTILINE)


def cut_after_info(lines: bytes) -> bytes:
    """Whole ``lines`` (short ones: held whole already) each cut after its INFO field, as a
    sites-only VCF's; a ``##`` line and a line of eight fields or fewer as they are."""
    return _PAST_INFO.sub(rb"\1", lines)


def allele_too_long(which: str, size: int, max_allele: int) -> str:
    """The problem of a REF or ALT longer than one read of the reference, and its fix."""
    return (f"{which} of {size:,} bases is longer than the {max_allele:,} bases one read of the reference holds "
            f"(windows.chunk_bases, or windows.length when larger; a window shows at most its first half-window "
            f"of bases anyway): left out unread. Raise windows.chunk_bases to at least {size:,} to score it, "
            f"or leave such records out first (`bcftools view -e 'strlen({which})>{max_allele}'`)")


def field_limit(column: int, max_allele: int) -> int:
    """The most bytes a record's field ``column`` (0 for CHROM) is read up to."""
    return max_allele if column in (REF, ALT) else SHORT_LINE


def field_problem(column: int, size: int, max_allele: int) -> str:
    """The problem of a record whose field ``column`` of ``size`` bytes is over its limit."""
    if column in (REF, ALT):
        return allele_too_long(COLUMNS[column], size, max_allele)
    return (f"its {COLUMNS[column]} field is {size:,} bytes long (over {SHORT_LINE:,}): no VCF value is; "
            "left out unread. Mend the line or leave it out")


def field_verdict(sizes: Sequence[int], max_allele: int) -> tuple[str | None, bool]:
    """A record's first fields of ``sizes`` bytes (CHROM on; as many as it has): the problem of the
    first over its limit but INFO (the record is left out), or None; and whether INFO is over its
    limit (the record is read with INFO as '.'). One rule for a text VCF, a BCF and a VCF body."""
    over = [i for i, size in enumerate(sizes[: len(COLUMNS)]) if size > field_limit(i, max_allele)]
    bad = [i for i in over if i != INFO]
    return (field_problem(bad[0], sizes[bad[0]], max_allele) if bad else None), INFO in over


@dataclass
class GuardState:
    """What a guard (a text VCF's :class:`FieldGuard`, a BCF's ``variant_bcf.BcfGuard``) found,
    for the reader: the records it replaced by a placeholder, and those whose INFO it dropped."""

    out: IO[bytes]
    max_allele: int
    #: line (a BCF's: record) number -> problem, for each record replaced by a placeholder
    problems: dict[int, str] = field(default_factory=dict)
    info_dropped: int = 0
    #: the first INFO_LINES_KEPT of those records' numbers (a file of millions keeps a few)
    info_dropped_lines: list[int] = field(default_factory=list)
    lines: int = 0  # lines (records) passed on whole so far (a damaged stream is refused after the last)

    def drop_info(self, number: int) -> None:
        """Record ``number`` is passed on with its INFO dropped."""
        self.info_dropped += 1
        if len(self.info_dropped_lines) < INFO_LINES_KEPT:
            self.info_dropped_lines.append(number)


@dataclass
class FieldGuard(GuardState):
    """Copies a text VCF to ``out`` line for line, record lines' fields bounded (see module)."""

    _held: bytearray = field(default_factory=bytearray)  # the start of a short line not yet ended
    _long: _LongLine | None = None

    def feed(self, data: bytes) -> None:
        """Pass on ``data``, the stream's next bytes: whole lines in bulk where every line is short."""
        at, size = 0, len(data)
        while at < size:
            if self._long is not None:
                at = self._long.take(data, at)
                if self._long.ended:
                    self._long, self.lines = None, self.lines + 1
                continue
            first = data.find(b"\n", at)
            if first < 0 or len(self._held) + first + 1 - at > SHORT_LINE:
                at = self._hold_or_examine(data, at, size if first < 0 else first + 1)
                continue
            end, last = first + 1, data.rfind(b"\n", first + 1)
            if last >= 0 and last - first <= SHORT_LINE:  # the lines after the first are short too
                end = last + 1
            self.out.write(cut_after_info(bytes(self._held) + data[at:end] if self._held else data[at:end]))
            self._held.clear()
            self.lines += data.count(b"\n", at, end)
            at = end

    def _hold_or_examine(self, data: bytes, at: int, end: int) -> int:
        """Keep the start of a line that may still be short; a line past SHORT_LINE is examined."""
        if len(self._held) + end - at <= SHORT_LINE:
            self._held += data[at:end]
            return end
        start = bytes(self._held)
        self._held.clear()
        self._long = _LongLine(self, self.lines + 1, (start + data[at : at + 2])[:2])
        self._long.take(start, 0)
        return at

    def close(self) -> None:
        """The stream's end: a last line without its newline is passed on as it stands."""
        if self._long is not None:
            self._long.take(b"\n", 0)
            self._long = None
        elif self._held:
            self.out.write(cut_after_info(bytes(self._held)))
            self._held.clear()


@dataclass
class _LongLine:
    """One line over SHORT_LINE bytes, read field by field as its bytes come."""

    guard: FieldGuard
    number: int
    head: bytes  # the line's first two bytes: '##' for a meta line, '#' first for the '#CHROM' line
    fields: list[bytes] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    _part: bytearray = field(default_factory=bytearray)
    _size: int = 0
    _passing: bool = False  # a '##' meta line: it passes through whole
    _skipping: bool = False  # past INFO, or a bad record: the rest is read past
    ended: bool = False

    def take(self, data: bytes, at: int) -> int:
        """Consume ``data`` from ``at`` up to this line's end or the data's; where it stopped."""
        while at < len(data) and not self.ended:
            newline = data.find(b"\n", at)
            stop = len(data) if newline < 0 else newline + 1
            if self._passing or self._skipping:
                if self._passing:
                    self.guard.out.write(data[at:stop])
                self.ended, at = newline >= 0, stop
                continue
            at = self._field(data, at, stop)
        return at

    def _field(self, data: bytes, at: int, stop: int) -> int:
        """Read the current field's bytes from ``data[at:stop]``; where it stopped."""
        if self.head == b"##":
            self._passing = True  # a meta line: htslib reads it whole
            return at
        tab = data.find(b"\t", at, stop)
        end = tab if tab >= 0 else (stop - 1 if data[stop - 1 : stop] == b"\n" else stop)
        self._part += data[at : at + max(0, min(self._limit() - len(self._part), end - at))]
        self._size += end - at
        if end == stop:  # the field goes on in the next data
            return stop
        kept = self._size <= self._limit() or self.head.startswith(b"#")  # a column name: kept as far as read
        self.fields.append(bytes(self._part) if kept else b"")
        self.sizes.append(self._size)
        self._part.clear()
        self._size = 0
        if tab < 0 or len(self.fields) == len(COLUMNS):
            self._decide(data[end : end + 1])
        return end + 1

    def _limit(self) -> int:
        return field_limit(len(self.fields), self.guard.max_allele)

    def _decide(self, after: bytes) -> None:
        """The line's first fields are read: pass them on, or a placeholder for a bad record."""
        guard = self.guard
        self._skipping, self.ended = after == b"\t", after != b"\t"  # FORMAT and genotypes read past
        if self.head.startswith(b"#"):  # the '#CHROM' line (or one among the records): its column names
            guard.out.write(b"\t".join(self.fields) + b"\n")
            return
        problem, info_over = field_verdict(self.sizes, guard.max_allele)
        if problem is not None:
            guard.problems[self.number] = problem
            guard.out.write(self._placeholder())
            return
        if info_over:
            self.fields[INFO] = b"."
            guard.drop_info(self.number)
        guard.out.write(b"\t".join(self.fields) + b"\n")

    def _placeholder(self) -> bytes:
        """A record htslib reads in a few bytes, in the bad line's place (its problem is reported instead)."""
        chrom = self.fields[0] if self.fields and self.fields[0] else b"."
        pos = self.fields[1] if len(self.fields) > 1 and self.fields[1].isdigit() else b"1"
        return chrom + b"\t" + pos + b"\t.\tN\t.\t.\t.\t.\n"
