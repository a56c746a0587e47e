"""Regions and the windows tiled over them: BED files, "chr:start-end" strings, or the whole genome.

Coordinates are 0-based and end-exclusive (BED), everywhere. Tiling rule: a region [start, end)
gets the fewest windows that cover it, starting at ``start`` and stepping by ``stride``::

    n = min(1 + max(0, ceil((end - start - length) / stride)), ceil((end - start) / stride))
    window k = [start + k * stride, start + k * stride + length)

so a region shorter than ``length`` gets one window that starts at the region start, every window
starts inside the region (which matters when stride > length leaves gaps), and the last window
may run past the region end. Past the region end it takes the reference's real bases;
past the *contig* end it is padded with N (code 4). ``regions: genome`` is one region per contig.

Problems are found at plan time (nothing has run yet). A bad line of a BED file (malformed, or
off the reference) is left out and listed by file and line (``bad_records``), up to
``windows.max_bad_records`` of the file; more than that, or a bad region written in the spec
itself, raises ``SpecError`` on the field ``windows.regions`` with every problem listed together.

A BED's regions are held as fixed-size records (:class:`RegionTable`), in memory up to
``region_store.IN_MEMORY`` of them and on local disk past that, and every pass over them (the
window counts, the overlap check's external sort, the padding note) goes a bounded block at a
time: a BED of 20 million lines plans in the memory of one of a few hundred thousand. Every
window carries its region's number (``region``: a BED's line, a list's index, a contig's place in
the reference), so that a window scored twice, for two overlapping or duplicate regions, is told
apart and traced to its line.
"""

from __future__ import annotations

import array
import gzip
import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpubatch.core.errors import InputError, SpecError
from gpubatch.io.redact import excerpt
from gpubatch.sources.genome import region_store
from gpubatch.sources.genome.bad_records import BadRecords
from gpubatch.sources.genome.reference import ContigTable
from gpubatch.sources.genome.region_store import (
    AT,
    END,
    GROUP,
    KEY_WIDTH,
    REGION,
    START,
    RecordStore,
    sorted_keys,
)

FIELD = "windows.regions"
GZIP_MAGIC = b"\x1f\x8b"
#: what a first line of column names calls the chromosome column
CHROM_COLUMN_NAMES = frozenset({"chrom", "chr", "chromosome", "contig", "seqname", "seqnames", "seqid"})
_REGION_RE = re.compile(r"^(?P<chrom>.+?):(?P<start>[0-9,_]+)-(?P<end>[0-9,_]+)(?::(?P<strand>[+.-]))?$")
#: what a region's number is: a BED's line, a list's index, a contig's place among the non-empty ones
LINE, INDEX, CONTIG = "line", "index", "contig"


@dataclass(frozen=True)
class Region:
    """A 0-based, end-exclusive interval on one strand; ``where`` says where it came from."""

    chrom: str
    start: int
    end: int
    strand: str = "+"
    where: str = ""
    #: its number, the output's ``region`` column: a BED's line, a list's index, a contig's place
    number: int = 0


#: RegionTable's columns as they are appended: REGION's fields, as array.array type codes
_COLUMNS = (("chrom", "i"), ("minus", "b"), ("start", "q"), ("end", "q"), ("number", "q"))


class RegionTable(Sequence[Region]):
    """Regions as fixed-size records (``region_store.REGION``, 29 bytes each), in memory up to
    ``region_store.IN_MEMORY`` of them and on local disk past that: a BED of 20 million lines
    plans in bounded memory (as Region objects, each with its message string, 5 million took
    2 GB). A Region is made when asked for. ``kind`` says what a region's number is: a BED's
    line (``label`` is the file's name), an index in the spec's list, or a contig's place among
    the non-empty ones."""

    def __init__(self, label: str, kind: str) -> None:
        self.label, self.kind = label, kind
        self.names: list[str] = []  # contig names, in order of first appearance
        self._codes: dict[str, int] = {}
        self._stored = RecordStore(REGION)
        #: regions appended since the last block was stored, by column (a record's appending alone
        #: cost several times a column's)
        self._pending = {name: array.array(code) for name, code in _COLUMNS}

    @classmethod
    def of(cls, regions: Iterable[Region], label: str = FIELD, kind: str = INDEX) -> RegionTable:
        table = cls(label, kind)
        for r in regions:
            table.append(r)
        return table

    def append(self, r: Region) -> None:
        code = self._codes.setdefault(r.chrom, len(self._codes))
        if code == len(self.names):
            self.names.append(r.chrom)
        pending = self._pending
        pending["chrom"].append(code)
        pending["minus"].append(r.strand == "-")
        pending["start"].append(r.start)
        pending["end"].append(r.end)
        pending["number"].append(r.number)
        if len(pending["start"]) >= region_store.IN_MEMORY:
            self._store_pending()

    @property
    def records(self) -> RecordStore:
        """The regions as REGION records (in memory, or on disk past ``region_store.IN_MEMORY``)."""
        self._store_pending()
        return self._stored

    def _store_pending(self) -> None:
        if not self._pending["start"]:
            return
        block = np.empty(len(self._pending["start"]), REGION)
        for name, values in self._pending.items():
            block[name] = np.frombuffer(values, dtype=values.typecode)
        self._stored.extend(block)
        self._pending = {name: array.array(code) for name, code in _COLUMNS}

    def __len__(self) -> int:
        return len(self._stored) + len(self._pending["start"])

    def __getitem__(self, k: int) -> Region:  # type: ignore[override]
        record = self._record(k)
        code, number = int(record["chrom"]), int(record["number"])
        return Region(self.names[code], int(record["start"]), int(record["end"]), "-" if record["minus"] else "+",
                      self._where(code, number), number)

    def where(self, k: int) -> str:
        """Where region ``k`` came from, as problems and notes name it."""
        record = self._record(k)
        return self._where(int(record["chrom"]), int(record["number"]))

    def _record(self, k: int) -> Any:
        i = k + len(self) if k < 0 else k
        if not 0 <= i < len(self):
            raise IndexError(k)
        return self.records.read(i, i + 1)[0]

    def _where(self, code: int, number: int) -> str:
        if self.kind == LINE:
            return f"{self.label} line {number}"
        return f"{FIELD}[{number}]" if self.kind == INDEX else f"contig {self.names[code]}"

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(index of the first, REGION records) at most ``region_store.IN_MEMORY`` at a time:
        every pass over all regions goes so, its memory bounded whatever the BED's length."""
        return self.records.blocks()


def _short(uri: str) -> str:
    return os.path.basename(uri.rstrip("/")) or uri


def _bed_line(fields: list[str], where: str, number: int) -> Region:
    """One BED line -> Region; raises ValueError with what was found."""
    if len(fields) < 3:
        raise ValueError(f"expected at least 3 tab-separated columns (chrom, start, end), "
                         f"found {len(fields)}: {excerpt(' '.join(fields))}")
    chrom, s, e = fields[0], fields[1], fields[2]
    if not (s.isascii() and s.isdigit() and e.isascii() and e.isdigit()):
        raise ValueError(f"start and end must be non-negative integers, found start={excerpt(s)} end={excerpt(e)}")
    start, end = int(s), int(e)
    if end == start:
        raise ValueError(f"a 0-length interval (start = end = {start}: a point between two bases, as for an "
                         f"insertion) has no bases to put windows on; give it one base at least (end {start + 1})")
    if end < start:
        raise ValueError(f"end ({end}) must be greater than start ({start}); BED is 0-based, end-exclusive")
    strand = fields[5] if len(fields) >= 6 else "+"
    if strand not in ("+", "-", "."):
        raise ValueError(f"column 6 (strand) must be '+', '-' or '.', found {excerpt(strand)}")
    return Region(chrom, start, end, "-" if strand == "-" else "+", where, number)


def _bed_text(uri: str, storage_options: dict[str, Any] | None) -> Iterator[str]:
    """The file's lines: gzip told by its magic bytes, not its name (``.bed.bgz``, ``regions``),
    a UTF-8 byte-order mark dropped (it made the first contig U+FEFF followed by 'chr1')."""
    from gpubatch.io.storage import open_file

    with open_file(uri, storage_options, "rb") as raw:
        gzipped = raw.read(2) == GZIP_MAGIC
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw) if gzipped else raw
        yield from io.TextIOWrapper(stream, encoding="utf-8-sig")


def _data_lines(uri: str, storage_options: dict[str, Any] | None) -> Iterator[tuple[int, list[str]]]:
    """(line number, stripped fields) of each data line, read as a stream (a BED of millions of
    lines is not held as text); a file that cannot be read is a SpecError. A first line of column
    names without its ``#`` (``chrom start end``, as a data frame writes it) is a header too."""
    first = True
    try:
        for n, line in enumerate(_bed_text(uri, storage_options), start=1):
            text = line.rstrip("\r\n")
            if not text.strip() or text.startswith("#") or _track_or_browser(text):
                continue
            fields = [f.strip() for f in (text.split("\t") if "\t" in text else text.split())]
            if not (first and _column_names(fields)):
                yield n, fields
            first = False
    except (FileNotFoundError, InputError):
        raise SpecError([(FIELD, f"file not found: {uri}")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([(FIELD, f"{uri}: cannot be read as a text BED file ({exc})")]) from None


def _column_names(fields: list[str]) -> bool:
    """Whether a line names the columns: a chromosome column's name first (``chrom``, ``seqnames``),
    then names where start and end go (``start``, ``chromEnd``); ``chr1 ten twenty`` is a
    malformed region, listed as one, not a header."""
    return (len(fields) >= 3 and fields[0].lower().lstrip("#") in CHROM_COLUMN_NAMES
            and all(f.isidentifier() for f in fields[1:3]))


def _track_or_browser(text: str) -> bool:
    """A UCSC ``track`` or ``browser`` line: that word alone before its settings, not a contig
    whose name starts with it (``track1  100  200`` is a region)."""
    first = text.split(None, 1)[0] if text.strip() else ""
    return first in ("track", "browser")


def parse_bed(uri: str, storage_options: dict[str, Any] | None = None, bad: BadRecords | None = None,
              contigs: ContigTable | None = None) -> RegionTable:
    """Read a BED file (plain or gzip, any fsspec URL); every malformed line is reported by number.

    Header lines (``#``, ``track``, ``browser``) and blank lines are skipped. Columns are split on
    tabs (or, failing that, on runs of whitespace); column 6, when present, is the strand and a
    '-' there makes that region's windows reverse-complemented; columns past it (BED12's thick
    part and blocks) are not read: a transcript's windows tile its introns too. With ``contigs``, a region off
    them is a bad line too. Bad lines go to ``bad`` when given (the caller decides how many it
    takes), in file order; without it any one is a SpecError.
    """
    found = bad if bad is not None else BadRecords(FIELD, uri, contigs=contigs)
    regions = RegionTable(_short(uri), LINE)
    for n, fields in _data_lines(uri, storage_options):
        where = f"{_short(uri)} line {n}"
        found.total += 1
        try:
            region = _bed_line(fields, where, n)
        except ValueError as exc:
            found.add(where, str(exc))
            continue
        problem = region_problem(region, contigs) if contigs is not None else None
        if problem is None:
            regions.append(region)
        else:
            found.add(where, problem, region.chrom)
    if not found.total:
        raise SpecError([(FIELD, f"{uri}: no regions (the BED file has no data lines)")])
    if bad is None:
        found.admit(0.0)
    return regions


def parse_region_string(text: str, index: int, contigs: ContigTable) -> Region:
    """'chr1:100-200' (0-based, end-exclusive; optional ':+', ':-' or ':.' strand) or a bare contig name."""
    where = f"{FIELD}[{index}]"
    text = text.strip()
    m = _REGION_RE.match(text)
    if m is None:
        if text in contigs:
            return Region(text, 0, contigs.length(text), "+", where, index)
        raise SpecError([(where, f"expected 'chrom:start-end' (0-based, end-exclusive) or a contig "
                                 f"name, got {text!r}")])
    start, end = (int(m.group(k).replace(",", "").replace("_", "")) for k in ("start", "end"))
    if end <= start:
        raise SpecError([(where, f"{text!r}: end must be greater than start. Region strings are 0-based, "
                                 f"end-exclusive (as in BED), not samtools' 1-based, inclusive ones: its "
                                 f"{m.group('chrom')}:{end}-{end} is {m.group('chrom')}:{max(end - 1, 0)}-{end} here")])
    return Region(m.group("chrom"), start, end, "-" if m.group("strand") == "-" else "+", where, index)


def genome_regions(contigs: ContigTable) -> RegionTable:
    """One region per contig of any length, forward strand, numbered in reference order (the
    number skips empty contigs, which a genome zarr may not hold: every form numbers alike)."""
    tiled = [(n, ln) for n, ln in zip(contigs.names, contigs.lengths, strict=True) if ln > 0]
    return RegionTable.of((Region(n, 0, ln, "+", f"contig {n}", i) for i, (n, ln) in enumerate(tiled)), kind=CONTIG)


def resolve_regions(regions: str | list[str], contigs: ContigTable,
                    storage_options: dict[str, Any] | None = None,
                    max_bad: float = 0.0) -> tuple[RegionTable, list[dict[str, str]]]:
    """The spec's ``windows.regions`` as checked Regions (BED path, region strings, or 'genome'),
    and the BED lines left out as report ``failed`` entries (at most ``max_bad`` of the file).
    A string alone is a region where it reads as one ('chr1:0-100:.'), else a BED file's path
    (a bare contig name is refused by preflight with the list that takes it)."""
    if isinstance(regions, str) and regions == "genome":
        return genome_regions(contigs), []
    if isinstance(regions, str) and not _REGION_RE.match(regions.strip()):
        return _bed_regions(regions, contigs, storage_options, max_bad)
    texts = [regions] if isinstance(regions, str) else regions
    found = [parse_region_string(r, i, contigs) for i, r in enumerate(texts)]
    check_regions(found, contigs)
    return RegionTable.of(found), []


def _bed_regions(uri: str, contigs: ContigTable, storage_options: dict[str, Any] | None,
                 max_bad: float) -> tuple[RegionTable, list[dict[str, str]]]:
    bad = BadRecords(FIELD, uri, contigs=contigs)
    kept = parse_bed(uri, storage_options, bad, contigs)
    return kept, bad.admit(max_bad)


def region_problem(r: Region, contigs: ContigTable) -> str | None:
    """Why a region cannot be tiled on this reference, or None."""
    if r.chrom not in contigs:
        return contigs.missing_message(r.chrom)
    if r.end > contigs.length(r.chrom):
        return f"region {r.chrom}:{r.start}-{r.end} runs past the end of {r.chrom} (length {contigs.length(r.chrom)})"
    return None


def check_regions(regions: Iterable[Region], contigs: ContigTable) -> None:
    """Every region must lie on a reference contig and end within it; all problems listed at once
    (regions written in the spec: none is left out)."""
    bad = BadRecords(FIELD, FIELD, contigs=contigs)
    for r in regions:
        bad.total += 1
        if (problem := region_problem(r, contigs)) is not None:
            bad.add(r.where, problem, r.chrom)
    bad.admit(0.0)


def overlap_note(regions: RegionTable) -> str | None:
    """A note when regions on the same contig and strand overlap: their shared bases get windows
    once per region, the same window twice in the output (tiling keeps each region whole, so
    merging them is the user's choice to make, not ours; the ``region`` column tells them apart).
    Found in a sorted copy spilled to disk past a bound (``region_store.sorted_keys``): a sort of
    every region at once grew with the BED, and a Python sort of 5 million took 90 s."""
    scan = _OverlapScan()
    for block in sorted_keys(_overlap_keys(regions)):
        scan.feed(block)
    if scan.first is None:
        return None
    first = regions[scan.first]
    return (f"{scan.count} region(s) overlap an earlier one on the same contig and strand (first: {first.where}, "
            f"{first.chrom}:{first.start}-{first.end}): windows over the shared bases are scored once per "
            "region, so rows repeat (the `region` column names each row's region); merge the regions first "
            "(`bedtools merge`) to score each window once")


def _overlap_keys(regions: RegionTable) -> Iterator[np.ndarray]:
    """Each block of regions as key rows: one group per contig and strand, and the region's place."""
    for lo, block in regions.blocks():
        keys = np.empty((len(block), KEY_WIDTH), np.int64)
        keys[:, GROUP] = block["chrom"].astype(np.int64) * 2 + block["minus"]
        keys[:, START], keys[:, END] = block["start"], block["end"]
        keys[:, AT] = np.arange(lo, lo + len(block), dtype=np.int64)
        yield keys


class _OverlapScan:
    """Regions in (group, start) order, a block at a time: a region overlaps when it starts
    before the furthest end of the earlier ones in its group, carried from block to block."""

    def __init__(self) -> None:
        self.count = 0  # regions that overlap an earlier one
        self.first: int | None = None  # the first's place in the table
        self.group, self.reach = -1, 0  # the last group seen and its furthest end so far

    def feed(self, keys: np.ndarray) -> None:
        group = np.concatenate(([self.group], keys[:, GROUP]))
        starts = np.concatenate(([0], keys[:, START]))
        shift = (group - group[0]) << 40  # past any contig's length: a group's ends stay above every earlier group's
        reach = np.concatenate(([self.reach], keys[:, END])) + shift
        np.maximum.accumulate(reach, out=reach)
        reach -= shift
        overlaps = np.flatnonzero((group[1:] == group[:-1]) & (starts[1:] < reach[:-1]))
        if len(overlaps) and self.first is None:
            self.first = int(keys[overlaps[0], AT])
        self.count += len(overlaps)
        self.group, self.reach = int(group[-1]), int(reach[-1])


def padding_note(regions: RegionTable, contigs: ContigTable, length: int, stride: int) -> str | None:
    """A note when windows run past their contig's end, their last bases N (a region on a contig
    shorter than one window, chrM under a 100 kb window, was scored as mostly N without a word)."""
    lengths = np.array([contigs.length(n) for n in regions.names], dtype=np.int64)
    padded_total, first = 0, None
    for lo, block in regions.blocks():
        starts, contig_lengths = block["start"], lengths[block["chrom"]]
        counts = window_counts(block["end"] - starts, length, stride)
        room = contig_lengths - length - starts  # windows k with k * stride <= room end on the contig
        padded = counts - np.where(room >= 0, np.minimum(counts, room // stride + 1), 0)
        padded_total += int(padded.sum())
        if first is None and padded.any():
            first = lo + int(np.flatnonzero(padded)[0])
    if first is None:
        return None
    region = regions[first]
    return (f"{padded_total} window(s) of {length} bases run past their contig's end and are padded with N "
            f"(encoding.n_value) (first: {region.where}, {region.chrom}:{region.start}-{region.end}, {region.chrom} "
            f"is {contigs.length(region.chrom)} bases long)")


def gap_note(regions: RegionTable, length: int, stride: int) -> str | None:
    """A note when ``stride`` > ``length`` leaves bases between windows unscored: a stride of
    100000 over 32-base windows scored 0.03% of the genome, and validate and the report said
    nothing (sparse sampling may be meant; a typo for ``length`` may be too)."""
    if stride <= length:
        return None
    total = unscored = 0
    for _, block in regions.blocks():
        spans = block["end"] - block["start"]
        counts = window_counts(spans, length, stride)
        covered = (counts - 1) * length + np.minimum(length, spans - (counts - 1) * stride)
        total += int(spans.sum())
        unscored += int((spans - covered).sum())
    if not unscored:
        return None
    return (f"windows.stride {stride} is longer than windows.length {length}: {unscored} of the regions' "
            f"{total} bases ({unscored / total:.1%}) lie between windows and are not scored; set "
            f"windows.stride to {length} or less (or leave it out) to score every base")


def n_windows(region_length: int, length: int, stride: int) -> int:
    """Windows that cover a region of ``region_length`` bases under the tiling rule above."""
    return int(window_counts(np.array([region_length]), length, stride)[0])


def window_counts(region_lengths: np.ndarray, length: int, stride: int) -> np.ndarray:
    """``n_windows`` of every region at once (integer arithmetic: ceil(a / b) = -(-a // b))."""
    cover = 1 + np.maximum(0, -((length - region_lengths) // stride))
    return np.minimum(cover, -(-region_lengths // stride))


#: a run of windows: [chrom, first window start, count, strand, region number]; windows step by the stride
Segment = tuple[str, int, int, str, int]


class WindowPlan(Sequence[tuple[list[Segment], int]]):
    """The tiled windows of all regions cut into shards of at most ``per_shard`` windows, as a
    sequence computed on demand: shard ``i``'s segments come from the regions' cumulative window
    counts, so a plan of 100,000 shards holds the regions, not the shards (planning's memory does
    not grow with the genome or the stride). The regions and the counts are held as
    :class:`RegionTable` holds its records, in memory up to a bound and on disk past it: a shard
    reads its own regions and a binary search's few pages. Each shard is described by segments
    (a start and a count per region piece), not by a list of windows, so a shard stays a few bytes."""

    def __init__(self, regions: RegionTable | Sequence[Region], length: int, stride: int, per_shard: int):
        self.regions = regions if isinstance(regions, RegionTable) else RegionTable.of(regions)
        self.stride, self.per_shard = stride, per_shard
        self._before = RecordStore(np.dtype("<i8"))  # windows before region k, then the total
        self._before.extend(np.zeros(1, np.int64))
        self.total = 0
        for _, block in self.regions.blocks():
            before = np.cumsum(window_counts(block["end"] - block["start"], length, stride)) + self.total
            self._before.extend(before)
            self.total = int(before[-1])

    def __len__(self) -> int:
        return -(-self.total // self.per_shard) if self.total else 0

    def __getitem__(self, index: int) -> tuple[list[Segment], int]:  # type: ignore[override]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        first, last = index * self.per_shard, min((index + 1) * self.per_shard, self.total)
        k, k_last = (self._before.searchsorted(at) - 1 for at in (first, last - 1))
        records = self.regions.records.read(k, k_last + 1)  # the shard's regions, read together
        before = self._before.read(k, k_last + 2).tolist()
        starts, ends = before[:-1], before[1:]
        names = self.regions.names
        segments: list[Segment] = []
        for code, minus, start, number, before_k, after_k in zip(
                records["chrom"].tolist(), records["minus"].tolist(), records["start"].tolist(),
                records["number"].tolist(), starts, ends, strict=True):
            lo, hi = max(first, before_k), min(last, after_k)  # the region's windows in the shard
            if hi > lo:
                segments.append((names[code], start + (lo - before_k) * self.stride, hi - lo, "-" if minus else "+",
                                 number))
        return segments, last - first
