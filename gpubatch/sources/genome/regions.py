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
"""

from __future__ import annotations

import bisect
import gzip
import io
import itertools
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from gpubatch.core.errors import InputError, SpecError
from gpubatch.sources.genome.bad_records import BadRecords
from gpubatch.sources.genome.reference import ContigTable

FIELD = "windows.regions"
GZIP_MAGIC = b"\x1f\x8b"
#: what a first line of column names calls the chromosome column
CHROM_COLUMN_NAMES = frozenset({"chrom", "chr", "chromosome", "contig", "seqname", "seqnames", "seqid"})
_REGION_RE = re.compile(r"^(?P<chrom>.+?):(?P<start>[\d,_]+)-(?P<end>[\d,_]+)(?::(?P<strand>[+-]))?$")


@dataclass(frozen=True)
class Region:
    """A 0-based, end-exclusive interval on one strand; ``where`` says where it came from."""

    chrom: str
    start: int
    end: int
    strand: str = "+"
    where: str = ""


def _short(uri: str) -> str:
    return os.path.basename(uri.rstrip("/")) or uri


def _bed_line(fields: list[str], where: str) -> Region:
    """One BED line -> Region; raises ValueError with what was found."""
    if len(fields) < 3:
        raise ValueError(f"expected at least 3 tab-separated columns (chrom, start, end), "
                         f"found {len(fields)}: {' '.join(fields)!r}")
    chrom, s, e = fields[0], fields[1], fields[2]
    if not (s.isdigit() and e.isdigit()):
        raise ValueError(f"start and end must be non-negative integers, found start={s!r} end={e!r}")
    start, end = int(s), int(e)
    if end == start:
        raise ValueError(f"a 0-length interval (start = end = {start}: a point between two bases, as for an "
                         f"insertion) has no bases to put windows on; give it one base at least (end {start + 1})")
    if end < start:
        raise ValueError(f"end ({end}) must be greater than start ({start}); BED is 0-based, end-exclusive")
    strand = fields[5] if len(fields) >= 6 else "+"
    if strand not in ("+", "-", "."):
        raise ValueError(f"column 6 (strand) must be '+', '-' or '.', found {strand!r}")
    return Region(chrom, start, end, "-" if strand == "-" else "+", where)


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
              contigs: ContigTable | None = None) -> list[Region]:
    """Read a BED file (plain or gzip, any fsspec URL); every malformed line is reported by number.

    Header lines (``#``, ``track``, ``browser``) and blank lines are skipped. Columns are split on
    tabs (or, failing that, on runs of whitespace); column 6, when present, is the strand and a
    '-' there makes that region's windows reverse-complemented. With ``contigs``, a region off
    them is a bad line too. Bad lines go to ``bad`` when given (the caller decides how many it
    takes), in file order; without it any one is a SpecError.
    """
    found = bad if bad is not None else BadRecords(FIELD, uri, contigs=contigs)
    regions: list[Region] = []
    for n, fields in _data_lines(uri, storage_options):
        where = f"{_short(uri)} line {n}"
        found.total += 1
        try:
            region = _bed_line(fields, where)
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
    """'chr1:100-200' (0-based, end-exclusive; optional ':+' or ':-' strand) or a bare contig name."""
    where = f"{FIELD}[{index}]"
    text = text.strip()
    m = _REGION_RE.match(text)
    if m is None:
        if text in contigs:
            return Region(text, 0, contigs.length(text), "+", where)
        raise SpecError([(where, f"expected 'chrom:start-end' (0-based, end-exclusive) or a contig "
                                 f"name, got {text!r}")])
    start, end = (int(m.group(k).replace(",", "").replace("_", "")) for k in ("start", "end"))
    if end <= start:
        raise SpecError([(where, f"{text!r}: end must be greater than start")])
    return Region(m.group("chrom"), start, end, m.group("strand") or "+", where)


def genome_regions(contigs: ContigTable) -> list[Region]:
    """One region per contig, whole length, forward strand."""
    return [Region(n, 0, ln, "+", f"contig {n}") for n, ln in zip(contigs.names, contigs.lengths, strict=True)
            if ln > 0]


def resolve_regions(regions: str | list[str], contigs: ContigTable,
                    storage_options: dict[str, Any] | None = None,
                    max_bad: float = 0.0) -> tuple[list[Region], list[dict[str, str]]]:
    """The spec's ``windows.regions`` as checked Regions (BED path, region strings, or 'genome'),
    and the BED lines left out as report ``failed`` entries (at most ``max_bad`` of the file)."""
    if isinstance(regions, str) and regions == "genome":
        return genome_regions(contigs), []
    if isinstance(regions, str) and not _REGION_RE.match(regions.strip()):
        return _bed_regions(regions, contigs, storage_options, max_bad)
    texts = [regions] if isinstance(regions, str) else regions
    found = [parse_region_string(r, i, contigs) for i, r in enumerate(texts)]
    check_regions(found, contigs)
    return found, []


def _bed_regions(uri: str, contigs: ContigTable, storage_options: dict[str, Any] | None,
                 max_bad: float) -> tuple[list[Region], list[dict[str, str]]]:
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


def overlap_note(regions: Sequence[Region]) -> str | None:
    """A note when regions on the same contig and strand overlap: their shared bases get windows
    once per region, the same window twice in the output (tiling keeps each region whole, so
    merging them is the user's choice to make, not ours)."""
    overlapping, first = 0, ""
    end_so_far: dict[tuple[str, str], int] = {}
    for r in sorted(regions, key=lambda r: (r.chrom, r.strand, r.start)):
        key = (r.chrom, r.strand)
        if r.start < end_so_far.get(key, -1):
            overlapping += 1
            first = first or f"{r.where}, {r.chrom}:{r.start}-{r.end}"
        end_so_far[key] = max(end_so_far.get(key, -1), r.end)
    if not overlapping:
        return None
    return (f"{overlapping} region(s) overlap an earlier one on the same contig and strand (first: {first}): "
            "windows over the shared bases are scored once per region, so rows repeat; merge the "
            "regions first (`bedtools merge`) to score each window once")


def n_windows(region_length: int, length: int, stride: int) -> int:
    """Windows that cover a region of ``region_length`` bases under the tiling rule above."""
    cover = 1 + max(0, math.ceil((region_length - length) / stride))
    return min(cover, math.ceil(region_length / stride))


#: a run of windows: [chrom, first window start, count, strand]; windows step by the job's stride
Segment = tuple[str, int, int, str]


class WindowPlan(Sequence[tuple[list[Segment], int]]):
    """The tiled windows of all regions cut into shards of at most ``per_shard`` windows, as a
    sequence computed on demand: shard ``i``'s segments come from the regions' cumulative window
    counts, so a plan of 100,000 shards holds the regions, not the shards (planning's memory does
    not grow with the genome or the stride). Each shard is described by segments (a start and a
    count per region piece), not by a list of windows, so a shard stays a few bytes."""

    def __init__(self, regions: list[Region], length: int, stride: int, per_shard: int):
        self.regions, self.stride, self.per_shard = regions, stride, per_shard
        self.counts = [n_windows(r.end - r.start, length, stride) for r in regions]
        self.before = list(itertools.accumulate(self.counts, initial=0))  # windows before region k
        self.total = self.before[-1]

    def __len__(self) -> int:
        return -(-self.total // self.per_shard) if self.total else 0

    def __getitem__(self, index: int) -> tuple[list[Segment], int]:  # type: ignore[override]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        first, last = index * self.per_shard, min((index + 1) * self.per_shard, self.total)
        segments: list[Segment] = []
        k = bisect.bisect_right(self.before, first) - 1
        at = first
        while at < last:
            r, offset = self.regions[k], at - self.before[k]
            take = min(self.counts[k] - offset, last - at)
            if take > 0:
                segments.append((r.chrom, r.start + offset * self.stride, take, r.strand))
                at += take
            k += 1
        return segments, last - first
