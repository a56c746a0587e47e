"""Variant files as records: VCF/BCF with a header, a VCF body without one, or a plain table.

Three layouts are read, told apart from the file's first lines, never from its name alone:

* **VCF or BCF with a header** (``#CHROM`` line, or BCF's magic): read with pysam, which checks
  the records against the header.
* **A VCF body without its header** (no ``#CHROM`` line; common output of eQTL pipelines): data
  lines of at least five tab-separated fields whose second is an integer. The columns are read
  as CHROM, POS, ID, REF, ALT; the contigs a header would declare are the reference's own (every
  record is checked against them by the caller). A note says so in the report.
* **A table** (TSV or CSV) whose first line names its columns: ``chrom``, ``pos``, ``ref``,
  ``alt`` and optionally ``id`` (case-insensitive; ``chr``/``chromosome``/``contig``,
  ``position``, ``reference``, ``alternate``, ``variant_id``/``rsid``/``name`` are accepted, and
  ``bcftools query -H``'s numbered names, ``[2]POS``).
  POS is 1-based, as in a VCF. ALT may list several alleles separated by commas (in a CSV, quoted: ``"G,T"``).
  A ``#CHROM POS ID REF ALT ...`` line without the ``##fileformat`` line htslib needs (the
  ``##`` lines stripped, or the first columns cut out) is such a table too.

Every layout yields the same :class:`RawRecord` with where it came from (``file line N``), so
that every later error names the line, or a :class:`MalformedRecord` saying what is wrong with a
line that cannot be read as a record (the caller leaves it out or refuses the file). Text files may be plain, gzip or bgzip,
local or at any fsspec URL. Files are read as streams (``variant_stream``), never copied: neither memory nor
disk grows with the file (the caller keeps what it scores).
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from gpubatch.core.errors import MissingExtraError, SpecError
from gpubatch.io.redact import excerpt
from gpubatch.sources.genome.long_lines import (
    VCF_COLUMNS,
    FieldMeter,
    line_too_long,
    vcf_field_sizes,
)
from gpubatch.sources.genome.variant_guard import (
    INFO_LINES_KEPT,
    SHORT_LINE,
    GuardState,
    field_verdict,
)
from gpubatch.sources.genome.variant_stream import (
    GZIP_MAGIC,
    Feed,
    VariantInput,
    htslib_readable,
    numbered_lines,
)

FIELD = "windows.variants"
#: lines past the meta lines looked at to tell a file's layout, and the bytes of each looked at
SNIFF_LINES, SNIFF_LINE_BYTES = 20, 1 << 16
#: failed reads in a row after which a VCF/BCF is taken as corrupt from there on
MAX_FAILING_IN_A_ROW = 1000
LAYOUT_VCF, LAYOUT_BCF, LAYOUT_BODY, LAYOUT_TABLE = "vcf", "bcf", "vcf-without-header", "table"
#: column names a table may use, by the field they fill
COLUMN_ALIASES = {
    "chrom": ("chrom", "chr", "chromosome", "contig", "#chrom"),
    "pos": ("pos", "position", "bp"),
    "ref": ("ref", "reference"),
    "alt": ("alt", "alternate", "alts"),
    "id": ("id", "variant_id", "rsid", "name", "snp"),
}
BODY_NOTE = ("{name} has no '#CHROM' header line: read as VCF columns CHROM, POS, ID, REF, ALT, "
             "with the reference's contigs standing in for the header's")
#: the column number ``bcftools query -H`` writes before each name: ``[2]POS``
_BCFTOOLS_NUMBER = re.compile(r"^\[\d+\]")
TABLE_NOTE = "{name} read as a {kind} table with columns {columns}; POS taken as 1-based, as in a VCF"
#: the empty block that ends every BGZF file (SAM spec 4.1.2): a file without it was cut short
BGZF_EOF = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")


@dataclass(frozen=True)
class RawRecord:
    """One data line as read: where it is, and its alleles as written (not yet checked)."""

    where: str
    line: int
    chrom: str
    pos: int
    record_id: str | None
    ref: str
    alts: tuple[str, ...]  # empty for ALT '.'


@dataclass(frozen=True)
class MalformedRecord:
    """A data line that is not a record, and why."""

    where: str
    line: int
    problem: str


@dataclass
class Layout:
    """How a file is laid out, decided from its first lines."""

    kind: str
    header_lines: int = 0  # lines before the first record (text files)
    delimiter: str = "\t"
    columns: dict[str, int] = field(default_factory=dict)  # table: field -> column index
    note: str = ""
    names: tuple[str, ...] = ()  # table: its columns' names, as its header (or a VCF) names them
    #: the header's ``##contig`` lengths, filled in as a VCF/BCF is read
    declared: dict[str, int] = field(default_factory=dict)
    #: header lines met among a text VCF's records (VCFs joined with ``cat``), and the first's number
    stray_headers: int = 0
    first_stray_header: int = 0
    #: a text VCF's records read with their INFO (over SHORT_LINE bytes) as '.', and the first lines
    info_dropped: int = 0
    info_dropped_lines: list[int] = field(default_factory=list)

    def notes_after_reading(self, name: str) -> list[str]:
        """What the read found that is no record's problem: header lines among the records, and
        records whose INFO was too long to read (said, though no output reads INFO: whoever joins
        INFO to the scores from what gpubatch read would otherwise find it '.' without a word)."""
        notes = []
        if self.stray_headers:
            notes.append(f"{name} has {self.stray_headers} header line(s) among its records (first: line "
                         f"{self.first_stray_header}): VCFs joined with `cat`? The records after them were read "
                         "too; join VCFs with `bcftools concat`, which keeps one header")
        if self.info_dropped:
            unit = "record" if self.kind == LAYOUT_BCF else "line"
            notes.append(info_dropped_note(name, self.info_dropped, self.info_dropped_lines, unit))
        return notes

    def drop_info(self, number: int) -> None:
        """Line ``number`` of a VCF body is read with its INFO (over SHORT_LINE bytes) unread, as a VCF's."""
        self.info_dropped += 1
        if len(self.info_dropped_lines) < INFO_LINES_KEPT:
            self.info_dropped_lines.append(number)

    def count_info_dropped(self, guard: GuardState | None) -> None:
        """The records whose INFO ``guard`` dropped, once htslib has read to the end of what it
        passed on (the guard is done: its thread closed the pipe after its last line)."""
        if guard is not None:
            self.info_dropped, self.info_dropped_lines = guard.info_dropped, list(guard.info_dropped_lines)


def info_dropped_note(name: str, count: int, lines: list[int], unit: str = "line") -> str:
    """The note for ``count`` records whose INFO of over SHORT_LINE bytes was read as '.', the
    first of them on ``lines`` (a BCF's: record numbers, ``unit`` 'record')."""
    shown = [str(n) for n in lines]
    where = (f"first: {unit}s {', '.join(shown)}" if count > len(shown)
             else f"{unit} {shown[0]}" if count == 1 else f"{unit}s {', '.join(shown[:-1])} and {shown[-1]}")
    return (f"{name}: {count} record(s) have an INFO field of over {SHORT_LINE:,} bytes ({where}): read with INFO "
            "as '.', the rest of each record as written. Scores are unaffected: no output of gpubatch reads INFO (variant mode "
            "reads CHROM, POS, ID, REF and ALT). Where INFO matters, take it from the VCF itself, e.g. join "
            "`bcftools query -f '%CHROM\\t%POS\\t%REF\\t%ALT\\t%INFO\\n'` on chrom, pos, ref and alt")


def refuse_cut_bgzf(source: VariantInput) -> None:
    """A bgzip file (VCF.gz, BCF) without the empty block every BGZF file ends with was cut short:
    htslib refused it as 'not a readable VCF' and the header's first lines read as no VCF at all."""
    if source.head(2) != GZIP_MAGIC or source.is_plain_gzip() or source.tail(len(BGZF_EOF)) == BGZF_EOF:
        return
    uri, name = source.uri, source.name
    raise SpecError([(FIELD, f"{uri} is cut short: it ends without the empty block that ends every bgzip file; "
                             "the records past the cut are lost. Copy or write the file again whole "
                             f"(`bgzip -t {name}` tests a copy)")])


def _is_bcf(source: VariantInput) -> bool:
    try:
        with source.text() as f:
            return f.read(3) == b"BCF"
    except (OSError, EOFError):
        return False


def _split(line: str, delimiter: str) -> list[str]:
    """A table line's fields; quoted fields (``"G,T"``, as pandas writes a multi-allelic ALT in a
    CSV; every string, as R's ``write.table`` writes a TSV) are one field, quotes removed."""
    text = line.rstrip("\r\n")
    fields = next(csv.reader([text], delimiter=delimiter)) if '"' in text else text.split(delimiter)
    return [f.strip() for f in fields]


def _table_columns(fields: list[str]) -> dict[str, int]:
    """The table's column index of each field, or {} when the line is not a header row. A name is
    read without its '#' and the ``[N]`` that ``bcftools query -H`` puts before it (``# [1]CHROM``)."""
    names = [_BCFTOOLS_NUMBER.sub("", f.lower().lstrip("#").strip()) for f in fields]
    found = {}
    for key, aliases in COLUMN_ALIASES.items():
        hit = next((i for i, n in enumerate(names) if n in {a.lstrip("#") for a in aliases}), None)
        if hit is not None:
            found[key] = hit
    return found if {"chrom", "pos", "ref", "alt"} <= set(found) else {}


def sniff(source: VariantInput) -> Layout:
    """The file's layout from its first lines past ``##`` and blank ones; a SpecError says what
    was expected. A table's header may follow ``#`` comment lines; a VCF body is told from its
    first line that reads as one, so a malformed first record is left out (listed) like any other,
    not taken for the whole file's format."""
    uri, name = source.uri, source.name
    refuse_cut_bgzf(source)
    if _is_bcf(source):
        return Layout(LAYOUT_BCF)
    lines = _first_lines(source)
    first = lines[0][1] if lines else ""
    if first.upper().startswith("#CHROM") and _declares_vcf(source):
        return Layout(LAYOUT_VCF)
    for number, line in lines:
        table = _table_layout(line, number, name)
        if table is not None:
            return table
        if not line.startswith("#"):  # data before any header: not a table with one
            break
    if any(_reads_as_body(line) for _, line in lines):
        return Layout(LAYOUT_BODY, lines[0][0] - 1, "\t", {"chrom": 0, "pos": 1, "id": 2, "ref": 3, "alt": 4},
                      BODY_NOTE.format(name=name), VCF_COLUMNS)
    raise SpecError([(FIELD, f"{uri}: not a VCF/BCF (no '#CHROM' header line) nor a table of variants; "
                             "give a VCF, a VCF body (tab-separated CHROM POS ID REF ALT ...), or a "
                             "TSV/CSV whose first line names the columns chrom, pos, ref, alt (and "
                             f"optionally id); its first data line is {first[:80]!r}")])


def _declares_vcf(source: VariantInput) -> bool:
    """Whether the file opens with ``##fileformat=VCF``, as htslib needs to read it as a VCF. A
    '#CHROM' line without it (the ``##`` lines stripped by ``grep -v '^##'``, or a file of the
    first five columns) is read as a table of the columns it names instead of refused."""
    with source.text() as f, contextlib.suppress(EOFError, OSError):
        return f.read(16) == b"##fileformat=VCF"
    return False


def _text(raw: bytes, number: int) -> str:
    """Line ``number`` as text, a UTF-8 byte-order mark off the first (Excel's "CSV UTF-8" writes
    one: the first column's name, or a headerless file's first contig, was U+FEFF + 'chrom')."""
    line = raw.decode("utf-8", "replace")
    return line.removeprefix("\ufeff") if number == 1 else line


def _first_lines(source: VariantInput) -> list[tuple[int, str]]:
    """(line number, text) of the first SNIFF_LINES lines that are not ``##`` meta or blank (only
    the first, when it is a VCF's ``#CHROM`` line), each its first SNIFF_LINE_BYTES bytes: the
    columns that tell the layout, in bounded memory whatever the file. A gzip stream damaged
    among them is refused."""
    found: list[tuple[int, str]] = []
    lines = numbered_lines(source, SNIFF_LINE_BYTES)
    with contextlib.closing(lines):
        for number, raw in lines:
            line = _text(raw, number)
            if line.startswith("##") or not line.strip():
                continue
            found.append((number, line))
            if len(found) == SNIFF_LINES or line.upper().startswith("#CHROM"):
                break
    return found


def _table_layout(line: str, number: int, name: str) -> Layout | None:
    """The table layout whose header is ``line`` (line ``number``), or None when it names no columns."""
    delimiter = "\t" if "\t" in line else ","
    names = _split(line, delimiter)
    columns = _table_columns(names)
    if not columns:
        return None
    kind = "tab-separated" if delimiter == "\t" else "comma-separated"
    shown = ", ".join(k for k in COLUMN_ALIASES if k in columns)
    return Layout(LAYOUT_TABLE, number, delimiter, columns, TABLE_NOTE.format(name=name, kind=kind, columns=shown),
                  tuple(names))


def text_layout_kind(text: str) -> str | None:
    """LAYOUT_TABLE or LAYOUT_BODY when the first lines of ``text`` (past ``##`` meta and blank
    lines) read as a table of variants or a VCF body, as ``sniff`` would take them, else None:
    for ``inspect``, which has the file's first bytes and no local copy."""
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("##")][:SNIFF_LINES]
    for line in lines:
        if _table_layout(line, 0, "") is not None:
            return LAYOUT_TABLE
        if not line.startswith("#"):
            break
    return LAYOUT_BODY if any(_reads_as_body(line) for line in lines) else None


def _reads_as_body(line: str) -> bool:
    """A VCF data line: at least five tab-separated fields, the second an integer."""
    fields = _split(line, "\t")
    return not line.startswith("#") and len(fields) >= 5 and fields[1].lstrip("-").isdigit()


def _table_records(source: VariantInput, layout: Layout, max_allele: int) -> Iterator[RawRecord | MalformedRecord]:
    """A table's records, each line read up to the bytes a REF and an ALT of ``max_allele``
    bases and the other columns take: a longer line is a malformed record, read past unheld,
    its columns measured on the way to say which made it long (``long_lines``). A VCF body's
    line is long mostly for its INFO or genotypes, which a VCF's reader reads past: it is read as
    a VCF's record is (``_body_problem``)."""
    name = source.name
    line_bytes = 2 * max_allele + SHORT_LINE
    body = layout.kind == LAYOUT_BODY
    meter = FieldMeter(layout.delimiter.encode(), layout.columns, measured=(5, 6, 7) if body else ())
    lines = numbered_lines(source, line_bytes, meter.feed)
    with contextlib.closing(lines):
        for n, raw in lines:
            long = meter.fed
            if n <= layout.header_lines:
                meter.reset()
                continue
            if body:
                problem = _body_problem(raw, meter, layout, n, max_allele)
            else:
                problem = line_too_long(meter, layout.names, line_bytes, max_allele, False) if long else None
            meter.reset()
            if problem is not None:
                yield MalformedRecord(f"{name} line {n}", n, problem)
                continue
            line = _text(raw, n)
            if line.strip() and not line.startswith("#"):
                yield _table_record(line, n, name, layout)


def _body_problem(raw: bytes, meter: FieldMeter, layout: Layout, number: int, max_allele: int) -> str | None:
    """What leaves a VCF body's line ``number`` out, or None, by a VCF's rule and in its words
    (``field_verdict``): its CHROM, POS, ID, QUAL or FILTER over 64 KiB or its REF or ALT over
    ``max_allele``; an INFO over 64 KiB is not read and the line counted in ``layout`` (the
    report's note); FORMAT and genotypes are not read at all, however many. ``raw`` is the line's
    first bytes: a line longer than them (``meter.fed``, measured as it was read past) whose first
    five columns are not all among them is left out as a table's line would be."""
    line_bytes = 2 * max_allele + SHORT_LINE
    if not meter.fed and len(raw) <= SHORT_LINE:  # no field of it can be over a limit
        return None
    sizes = vcf_field_sizes(meter) if meter.fed else [len(f) for f in raw.rstrip(b"\r\n").split(b"\t", 8)[:8]]
    problem, info_over = field_verdict(sizes, max_allele)
    if problem is None and meter.fed and sum(sizes[:5]) + 5 > line_bytes:
        return line_too_long(meter, layout.names, line_bytes, max_allele, True)
    if problem is None and info_over:
        layout.drop_info(number)
    return problem


def _float_hint(text: str) -> str:
    """Why a POS such as '12345.0' is there: pandas writes an integer column holding a missing
    value as floats, every row of it."""
    whole, dot, zeros = text.partition(".")
    if whole.isdigit() and dot and set(zeros) <= {"0"}:
        return (" (written as a float: a table saved by pandas with an empty POS somewhere turns the "
                "whole column to floats; drop those rows and save POS as integers)")
    return ""


def _table_record(line: str, n: int, name: str, layout: Layout) -> RawRecord | MalformedRecord:
    cols = layout.columns
    width = max(cols.values()) + 1
    where = f"{name} line {n}"
    fields = _split(line, layout.delimiter)
    if len(fields) < width:
        return MalformedRecord(where, n, f"expected at least {width} "
                                         f"{'tab' if layout.delimiter == chr(9) else 'comma'}-separated "
                                         f"fields, got {len(fields)}: {line.strip()[:80]!r}")
    if not fields[cols["pos"]].isdigit():  # int() also takes '1_2' and '+12'
        return MalformedRecord(where, n, f"POS {excerpt(fields[cols['pos']])} is not an integer"
                                         f"{_float_hint(fields[cols['pos']])}")
    pos = int(fields[cols["pos"]])
    alt = fields[cols["alt"]]
    alts = () if alt in (".", "") else tuple(a.strip() for a in alt.split(","))
    rid = fields[cols["id"]] if "id" in cols else None
    return RawRecord(where, n, fields[cols["chrom"]], pos, rid, fields[cols["ref"]], alts)


def _pysam() -> Any:
    try:
        import pysam
    except ImportError:
        raise MissingExtraError("variant mode (windows.variants)", "pysam", "genome") from None
    return pysam


def _vcf_records(source: VariantInput, layout: Layout, max_allele: int) -> Iterator[RawRecord | MalformedRecord]:
    """Records through pysam: text VCFs are numbered by line, BCFs by record. A text VCF reaches
    htslib through ``variant_guard``, a BCF through ``variant_bcf`` (a record with a REF or ALT
    over ``max_allele`` bases is quarantined unread, an INFO over 64 KiB passed on as '.' and
    counted in ``layout`` for the report's note, sample data never passed on).

    htslib stays quiet while the file is read: its warnings (a missing index, a contig the
    header does not declare) would go straight to the terminal, and the contigs are checked
    against the reference here anyway.
    """
    pysam = _pysam()
    previous = pysam.set_verbosity(0)
    try:
        with htslib_readable(source, max_allele) as (readable, feed), _LineFinder(source) as lines:
            yield from _pysam_records(pysam, readable, feed, source, layout, lines)
    finally:
        pysam.set_verbosity(previous)


def _open_vcf(pysam: Any, readable: IO[bytes], feed: Feed, source: VariantInput,
              layout: Layout) -> Any:
    """pysam's reader of ``readable`` (no samples: the guard cut them off), and the header's
    contig lengths in ``layout``; a file htslib cannot open is refused (where the feed broke off
    first: as that)."""
    try:
        vf = pysam.VariantFile(readable)
    except (ValueError, OSError) as exc:
        feed.raise_error()
        raise SpecError([(FIELD, f"{source.uri}: not a readable VCF/BCF ({exc}); a VCF starts with "
                                 "'##fileformat=VCFv4.x' and has a '#CHROM ...' line")]) from None
    layout.declared.update({str(n): int(c.length) for n, c in vf.header.contigs.items() if c.length})
    return vf


def _pysam_records(pysam: Any, readable: IO[bytes], feed: Feed, source: VariantInput,
                   layout: Layout, lines: _LineFinder) -> Iterator[RawRecord | MalformedRecord]:
    """The records of what pysam opens (``readable``: the file, or a pipe ``feed`` fills),
    numbered by the text file's lines.

    htslib reads a text VCF a line per record, and a line it cannot parse raises and is passed
    by: each failed step is that line, malformed. Steps that keep failing (a BCF or bgzip block
    that is corrupt, where nothing advances) stop the read after ``MAX_FAILING_IN_A_ROW``. Where
    the feed broke off (a plain-gzip file cut short), htslib's end is no file's end: refused.
    """
    name = source.name
    offset = lines.header_lines() if layout.kind == LAYOUT_VCF else None
    with _open_vcf(pysam, readable, feed, source, layout) as vf:
        records, failing, first = iter(vf), 0, ""
        for i in itertools.count(1):
            line = offset + i if offset is not None else i
            where = f"{name} line {line}" if offset is not None else f"{name} record {i}"
            try:
                rec = next(records)
            except StopIteration:
                feed.raise_error()
                layout.count_info_dropped(feed.guard)
                return
            except (ValueError, OSError) as exc:
                guarded = feed.problem(line)
                if guarded is not None:
                    yield MalformedRecord(where, line, guarded)
                    continue
                if offset is not None and _no_record(lines.line(line), line, layout):
                    continue
                failing, first = failing + 1, first if failing else where
                if failing > MAX_FAILING_IN_A_ROW:
                    raise SpecError([(FIELD, f"{first}: {MAX_FAILING_IN_A_ROW} records in a row from here could "
                                             f"not be read ({exc}): the file is corrupt or truncated here")]) from None
                why = lines.problem(line) if offset is not None else ""
                yield MalformedRecord(where, line, f"malformed VCF record ({why or exc})")
                continue
            failing = 0
            guarded = feed.problem(line)
            yield _raw_record(rec, where, line) if guarded is None else MalformedRecord(where, line, guarded)


def _raw_record(rec: Any, where: str, line: int) -> RawRecord | MalformedRecord:
    """pysam's record as a RawRecord; pysam decodes its text as UTF-8 when asked for a field, and a
    Latin-1 ID (b'rs\\xe9') raised UnicodeDecodeError out of the plan."""
    try:
        return RawRecord(where, line, rec.chrom, int(rec.pos), rec.id, rec.ref or ".", tuple(rec.alts or ()))
    except UnicodeDecodeError:
        return MalformedRecord(where, line, "malformed VCF record (not UTF-8 text: save the file as UTF-8, "
                                            "e.g. `iconv -f latin1 -t utf-8`)")


def _no_record(text: bytes, number: int, layout: Layout) -> bool:
    """Whether a line htslib failed is no record at all: a blank line, or a header line among the
    records (counted in ``layout``: ``cat a.vcf b.vcf`` puts b's header there)."""
    if text.startswith(b"#"):
        layout.stray_headers += 1
        layout.first_stray_header = layout.first_stray_header or number
        return True
    return not text.strip()


class _LineFinder:
    """Lines of a text VCF by number, asked for in rising order: one pass over the file however
    many malformed lines there are (the file is opened at the first question)."""

    def __init__(self, source: VariantInput):
        self.source = source
        self._stack = contextlib.ExitStack()
        self._lines: Iterator[bytes] | None = None
        self._at = 0  # the number of the last line read

    def __enter__(self) -> _LineFinder:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def header_lines(self) -> int:
        """Header lines at the top, up to and with the ``#CHROM`` line, for the data lines'
        numbers: htslib passes a blank line among the ``##`` lines by, so counting the ``#``
        lines alone named every record by a line above its own."""
        with contextlib.closing(numbered_lines(self.source, SNIFF_LINE_BYTES)) as lines:
            for number, line in lines:
                if line.upper().startswith(b"#CHROM"):
                    return number
        return 0

    def line(self, number: int) -> bytes:
        """Line ``number``'s first SNIFF_LINE_BYTES bytes (all a problem is told from: a line of a
        20 MB REF passed on the way was held whole)."""
        if self._lines is None or number <= self._at:
            self._stack.close()
            self._lines = (raw for _, raw in self._stack.enter_context(
                contextlib.closing(numbered_lines(self.source, SNIFF_LINE_BYTES))))
            self._at = 0
        text = b""
        while self._at < number:
            text = next(self._lines, b"")
            self._at += 1
        return text

    def problem(self, number: int) -> str:
        """What is wrong with line ``number``, in words, where it can be said (htslib says
        "truncated file" for a short line and for a POS that is not a number alike)."""
        text = self.line(number).decode(errors="replace").rstrip("\r\n")
        fields = text.split("\t")
        if len(fields) < 8:
            spaces = "; its columns are separated by spaces, a VCF's by tabs" if len(text.split()) >= 8 else ""
            return (f"{len(fields)} tab-separated columns; a record has at least 8: "
                    f"CHROM POS ID REF ALT QUAL FILTER INFO{spaces}")
        if not fields[1].isdigit():
            return f"POS {fields[1][:40]!r} is not a whole number"
        return ""


def iter_records(source: VariantInput, layout: Layout, max_allele: int) -> Iterator[RawRecord | MalformedRecord]:
    """Every data record of the file, in file order, whatever its layout; a line too long to
    hold REF and ALT of ``max_allele`` bases is a malformed record, never held whole."""
    if layout.kind in (LAYOUT_VCF, LAYOUT_BCF):
        return _vcf_records(source, layout, max_allele)
    return _table_records(source, layout, max_allele)
