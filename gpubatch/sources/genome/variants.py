"""Variant-effect mode: variant records -> scored (ref, alt) window pairs.

Planning (client) reads the records' positions and alleles (VCF, BCF, a VCF body without header,
or a TSV/CSV table: ``variant_files``) and checks every REF against the reference; the windows'
sequence is read on workers. One item per ALT allele. Decisions, each tested:

* Only ALT alleles spelled in A, C, G, T are scored. The others are skipped and counted by reason
  (``SKIP_REASONS``): ``alt_missing`` (ALT ``.``), ``symbolic`` (``<DEL>``, ``<INS:ME>``),
  ``spanning_deletion`` (``*``), ``breakend`` (``G]chr2:5]``, ``.A``), ``iupac`` (ambiguity codes
  such as K, Y, R, W, S, M, D, H, B, V, N: a masking VCF is full of them, and a window cannot
  hold "G or T") and ``not_sequence`` (anything else). They carry no bases to put in a window.
* A malformed record, a contig absent from the reference, a POS past the contig end or below 1
  (or a REF that runs past the end), a REF that is not sequence (``.``, symbolic, IUPAC codes
  other than N), and an ALT list with an empty allele (``A,,C``) leave that record out, listed
  by file and line in report.json's ``failed`` (``bad_records``). Past ``windows.max_bad_records`` of the file the job is refused at plan time
  instead: the usual causes of many (another genome build, the wrong file) affect every record,
  and scoring the rest would hide them.
* A REF allele that disagrees with the reference is **scored but flagged**: the ``ref_match``
  column is False and the shard's ``ref_mismatches`` count goes up. When more than
  ``windows.max_ref_mismatch`` of the variants disagree (checked at plan time, the reference read
  in bounded runs), the job is refused: that is a wrong genome build or swapped REF/ALT, not noise.
  The ref window is always the reference's own sequence; the alt window splices ALT in place of
  len(REF) reference bases.

Window rule, for a variant whose REF starts at 0-based ``p = POS - 1`` and window ``length = L``::

    start = p - L // 2                       # the variant's first base sits at offset L // 2
    ref window = reference[start : start + L]
    alt window = (reference[start : p] + ALT + reference[p + len(REF) : ...])[:L]

The alt window keeps the left flank fixed and takes as much right flank as it needs to reach L
bases: a deletion pulls in more downstream sequence, an insertion pushes it out (and an ALT longer
than ``L - L // 2`` is cut at the window end). Bases outside the contig are N.

Output columns: ``variant_id`` (the VCF ID, suffixed ``:ALT`` for multi-allelic records and where
records split from one (``bcftools norm -m-``) share it, or
``chrom:POS:REF:ALT`` when ID is '.'), ``chrom``, ``pos`` (the VCF's 1-based POS, so rows join back
to the file), ``ref``, ``alt``, ``ref_match``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gpubatch.core.errors import InputError, SpecError
from gpubatch.core.phases import Phase
from gpubatch.io.redact import excerpt
from gpubatch.io.uris import is_remote, local_path
from gpubatch.ops.kernels import encode_dna
from gpubatch.sources.genome import variant_table
from gpubatch.sources.genome.bad_records import BadRecords
from gpubatch.sources.genome.reference import ContigTable, Reference, group_reads
from gpubatch.sources.genome.variant_files import (
    LAYOUT_BCF,
    MalformedRecord,
    RawRecord,
    iter_records,
    sniff,
)
from gpubatch.sources.genome.variant_guard import allele_too_long
from gpubatch.sources.genome.variant_stream import VariantInput
from gpubatch.sources.genome.variant_table import (
    SKIP_REASONS,
    VariantTable,
    tell_alleles_apart,
)

__all__ = ["SKIP_REASONS", "VariantTable", "check_refs", "read_variants", "refuse_ref_mismatches",
           "variant_span", "variant_windows", "window_notes"]

FIELD = "windows.variants"
MAX_LISTED_MISMATCHES = 5
#: ``max_allele_bases`` of the default windows.chunk_bases and length
DEFAULT_MAX_ALLELE = 1 << 20
#: records read between two words to the plan's progress (a word per record cost more than its reading)
SAID_EVERY = 4096
BASES = frozenset("ACGT")
#: IUPAC ambiguity codes (N included): a position's possible bases, not a base
IUPAC = frozenset("RYSWKMBDHVN")


def max_allele_bases(chunk_bases: int, length: int) -> int:
    """The longest REF or ALT scored: one read of the reference (``group_reads``: max(chunk_bases,
    length) bases) must hold it, for the plan's REF check and the workers' windows alike. A
    window shows only its first ``length - length // 2`` bases anyway (``window_notes``)."""
    return max(chunk_bases, length)


def alt_skip_reason(alt: str) -> str | None:
    """Why an ALT allele cannot be put in a window as bases, or None when it is plain sequence."""
    if alt in ("", "."):
        return "alt_missing"
    if alt == "*":
        return "spanning_deletion"
    if alt.startswith("<"):
        return "symbolic"
    if "[" in alt or "]" in alt or alt.startswith(".") or alt.endswith("."):
        return "breakend"
    letters = set(alt.upper())
    if letters <= BASES:
        return None
    return "iupac" if letters <= BASES | IUPAC else "not_sequence"


def is_symbolic(alt: str) -> bool:
    """Alleles that name an event rather than spell its sequence."""
    return alt_skip_reason(alt) in ("alt_missing", "symbolic", "spanning_deletion", "breakend")


def ref_problem(ref: str) -> str | None:
    """Why a REF allele is not sequence (the VCF spec allows A, C, G, T and N), or None."""
    if ref in ("", "."):
        return f"REF {ref!r} is not a sequence"
    if ref.startswith("<"):
        return f"REF {excerpt(ref)} is a symbolic allele, not a sequence"
    bad = sorted(set(ref.upper()) - BASES - {"N"})
    if not bad:
        return None
    what = "IUPAC ambiguity codes" if set(bad) <= IUPAC else "characters that are not bases"
    return f"REF {excerpt(ref)} holds {what} ({', '.join(bad)})"


def alt_list_problem(alts: tuple[str, ...]) -> str | None:
    """Why an ALT list of several alleles is malformed, or None: one of them is empty ('A,,C',
    'G,': pysam reads it as '.', a table as ''). Counted as ``alt_missing`` it was passed by
    without naming its record, where '.' stands only for a whole ALT of no allele."""
    if len(alts) < 2 or all(a not in ("", ".") for a in alts):
        return None
    return (f"ALT {excerpt(','.join(alts))} lists an empty allele (two commas in a row, one at either end, or '.', "
            "which stands only for a whole ALT of no allele): write each allele, or '.' alone for none")


def _variant_id(record_id: str | None, chrom: str, pos: int, ref: str, alt: str, n_alts: int) -> str:
    if record_id and record_id != ".":
        return record_id if n_alts == 1 else f"{record_id}:{alt}"
    return f"{chrom}:{pos}:{ref}:{alt}"


def _check_record(rec: RawRecord, contigs: ContigTable, max_allele: int) -> str | None:
    longest = max((rec.ref, *rec.alts), key=len)
    if len(longest) > max_allele:  # what the guard leaves out unread in a long line, in a short one
        return allele_too_long("REF" if longest is rec.ref else "ALT", len(longest), max_allele)
    if rec.chrom not in contigs:
        return contigs.missing_message(rec.chrom)
    if rec.pos < 1:
        return f"POS {rec.pos} is not a position (VCF POS counts from 1)"
    length = contigs.length(rec.chrom)
    if rec.pos > length:
        return f"POS {rec.pos} is past the end of {rec.chrom} (length {length})"
    problem = ref_problem(rec.ref)
    if problem:
        return f"{problem}; REF must spell the reference bases (A, C, G, T or N)"
    if rec.pos - 1 + len(rec.ref) > length:  # no base there to match: not a mismatch, off the contig
        return f"REF {excerpt(rec.ref)} at POS {rec.pos} runs past the end of {rec.chrom} (length {length})"
    return alt_list_problem(rec.alts)


def _add_record(table: VariantTable, rec: RawRecord) -> None:
    if not rec.alts:
        table.skip("alt_missing")
        return
    for alt in rec.alts:
        reason = alt_skip_reason(alt)
        if reason is not None:
            table.skip(reason)
            continue
        ref, alt_bases = rec.ref.upper(), alt.upper()  # the id is made of the row's letters, not the file's
        vid = _variant_id(rec.record_id, rec.chrom, rec.pos, ref, alt_bases, len(rec.alts))
        table.add(vid, rec.chrom, rec.pos, ref, alt_bases, rec.line)


def _scan(records: Iterator[RawRecord | MalformedRecord], table: VariantTable, contigs: ContigTable,
          bad: BadRecords, max_allele: int, progress: Phase | None = None) -> None:
    """Add every usable record to ``table``, and every other to ``bad`` with its problem;
    ``progress`` is told of every SAID_EVERY records read."""
    for rec in records:
        table.counts["records"] += 1
        if progress is not None and not table.counts["records"] % SAID_EVERY:
            progress.advance(SAID_EVERY)
        bad.total += 1
        problem = rec.problem if isinstance(rec, MalformedRecord) else _check_record(rec, contigs, max_allele)
        if problem is None and isinstance(rec, RawRecord):
            _add_record(table, rec)
        else:
            bad.add(rec.where, problem or "", rec.chrom if isinstance(rec, RawRecord) else None)


def read_variants(uri: str, contigs: ContigTable, storage_options: dict[str, Any] | None = None,
                  max_bad: float = 0.0, progress: Phase | None = None,
                  max_allele: int = DEFAULT_MAX_ALLELE) -> VariantTable:
    """All scorable variants of a VCF / VCF.gz / BCF / headerless VCF body / TSV or CSV table,
    checked against the reference's contigs (see ``variant_files`` for the layouts); records
    that cannot be scored are left out into ``table.failed``, up to ``max_bad`` of the file.

    The whole table is held on the client, compactly (``variant_table``: about 40 bytes a SNV):
    fine for the millions of variants typical of effect scoring. The file is read as streams,
    local or remote, never copied to disk (``variant_stream``). ``progress`` counts the records read.
    A record whose REF or ALT is longer than ``max_allele`` bases (``max_allele_bases``) is left
    out, never held whole: memory is bounded by the configuration, not by one record.
    """
    table = VariantTable()
    if not is_remote(uri) and not os.path.exists(local_path(uri)):
        raise SpecError([(FIELD, f"file not found: {uri}")])
    bad = BadRecords(FIELD, uri, contigs=contigs)
    try:
        source = VariantInput(uri, storage_options)
        layout = sniff(source)
        table.layout = layout.kind
        if layout.note:
            table.notes.append(layout.note)
        _scan(iter_records(source, layout, max_allele), table, contigs, bad, max_allele, progress)
        table.notes += layout.notes_after_reading(source.name)
        if layout.info_dropped:  # records read with INFO as '.' (data_quality.variants.info_dropped)
            table.counts["info_dropped"] = layout.info_dropped
    except InputError as exc:  # a remote file that is missing or unreadable: the spec names it
        raise SpecError([(FIELD, f"{exc.input_uri}: {exc.message}")]) from None
    table.finish()
    table.failed = bad.admit(max_bad)
    tell_alleles_apart(table)
    name = os.path.basename(uri.rstrip("/"))
    table.notes += _repeat_notes(table, name)
    build = other_build_note(layout.declared, contigs, name)
    if build:
        table.notes.insert(0, build)
    return table


#: chr1's length in the builds people mix up, to name the build a mismatch points to
CHR1_BUILDS = {249_250_621: "GRCh37/hg19", 248_956_422: "GRCh38/hg38", 248_387_328: "T2T-CHM13",
               195_471_971: "GRCm38/mm10", 195_154_279: "GRCm39/mm39"}


def other_build_note(declared: dict[str, int], contigs: ContigTable, name: str) -> str | None:
    """A VCF whose header gives its contigs other lengths than the reference's is of another
    genome build: its records' REF checks then fail, or, where none can (no SNVs), it scores the
    wrong bases silently. Said up front, with the builds where chr1 tells them."""
    differ = [(own, length, contigs.length(ref)) for own, length in declared.items()
              for ref in [own if own in contigs else contigs.alias(own)] if ref and contigs.length(ref) != length]
    if not differ:
        return None
    own, theirs, ours = differ[0]
    builds = ""
    if own.lower().removeprefix("chr") == "1" and theirs in CHR1_BUILDS and ours in CHR1_BUILDS:
        builds = f" ({CHR1_BUILDS[theirs]} against the reference's {CHR1_BUILDS[ours]})"
    return (f"{name}'s header gives {len(differ)} contig(s) other lengths than the reference (first: {own} "
            f"{theirs:,} bases against {ours:,}){builds}: the VCF may be of another genome build; if its "
            "records are, score them against that build's reference (or lift them over first)")


def _repeat_notes(table: VariantTable, name: str) -> list[str]:
    """Notes for variants scored but not worth a row of their own: one that repeats an earlier
    (the same CHROM, POS, REF and ALT: a file concatenated twice, or merged from overlapping
    call sets) is a second, identical row, which doubles it in any join; an ALT equal to its REF
    is no change at all (its delta is 0). Both were scored without a word. Found on the table's
    columns (a sort of integer codes), not a set of a tuple per variant: the sort's order and one
    sorted key column at a time (the four keys stacked and sorted at once were the plan's peak, 70
    bytes a variant over the table's own)."""
    if not len(table):
        return []
    lines, ranks, positions = table.line_numbers(), table.chrom_ranks(), table.positions()
    ref, alt = table.text("ref").combine_chunks(), table.text("alt").combine_chunks()
    codes = [pc.dictionary_encode(col).indices.to_numpy(zero_copy_only=False) for col in (ref, alt)]
    order = np.lexsort((lines, codes[1], codes[0], positions, ranks))
    equal_keys = np.ones(len(order) - 1, dtype=bool)  # each sorted row's keys equal the row's before
    for column in (ranks, positions, *codes):
        ordered = column[order]
        equal_keys &= ordered[1:] == ordered[:-1]
        del ordered
    repeat = order[1:][equal_keys]
    same = np.flatnonzero(pc.equal(ref, alt).to_numpy(zero_copy_only=False))
    notes = []
    if len(repeat):
        notes.append(f"{len(repeat)} variant(s) repeat an earlier one (the same CHROM, POS, REF and ALT; first: "
                     f"{_where(table, name, _earliest(repeat, lines))}): each is scored, so rows repeat; drop them first "
                     "(`bcftools norm -d exact`) to score each variant once")
    if len(same):
        notes.append(f"{len(same)} ALT allele(s) equal their REF (first: {_where(table, name, _earliest(same, lines))}): no "
                     "change, so their alt window is the ref window and every delta is 0")
    return notes


def window_notes(table: VariantTable, contigs: ContigTable, length: int, name: str) -> list[str]:
    """Notes for windows that do not show their variant whole, each scored as the window rule
    says but without a word before: windows that run off a contig (padded with N, which a model
    trained on whole windows never saw), and REF or ALT alleles longer than the ``length - length
    // 2`` bases a window holds from the variant's first base on (a 41-base deletion in a 16-base
    window: the ref window shows 8 of its bases). Counted ``CHUNK_ROWS`` variants at a time."""
    half = length - length // 2
    found = {"off": _Flagged(), "long": _Flagged()}
    ends = np.array([contigs.length(c) for c in table.ranked_names()], dtype=np.int64)
    ranks, lines = table.chrom_ranks(), table.line_numbers()
    for lo in range(0, len(table), variant_table.CHUNK_ROWS):
        hi = min(lo + variant_table.CHUNK_ROWS, len(table))
        pos = table.positions()[lo:hi]
        ref_len, alt_len = (pc.utf8_length(table.text(k).slice(lo, hi - lo)).to_numpy(zero_copy_only=False)
                            .astype(np.int64) for k in ("ref", "alt"))
        start = pos - 1 - length // 2
        need_end = np.maximum(start + length, pos - 1 + ref_len + np.maximum(0, half - alt_len))
        found["off"].add(lo + np.flatnonzero((start < 0) | (need_end > ends[ranks[lo:hi]])), lines)
        found["long"].add(lo + np.flatnonzero(np.maximum(ref_len, alt_len) > half), lines)
    off, long = found["off"], found["long"]
    notes = []
    if off.count:
        notes.append(f"{off.count} variant(s) are within half a window of a contig end (first: "
                     f"{_where(table, name, off.first)}): their windows run past it and hold N there (code 4, "
                     "scored as the encoding's n_value), bases the model does not see in a window inside a contig")
    if long.count:
        notes.append(f"{long.count} variant(s) have a REF or ALT longer than the {half} bases a {length}-base window "
                     f"holds from the variant on (first: {_where(table, name, long.first)}): their windows hold "
                     f"only its first {half} bases; a windows.length of twice the longest allele holds them whole")
    return notes


@dataclass
class _Flagged:
    """How many variants a note is about, and the earliest of them in the file (its row)."""

    count: int = 0
    first: int = -1
    first_line: int = 0

    def add(self, rows: np.ndarray, lines: np.ndarray) -> None:
        if not len(rows):
            return
        self.count += len(rows)
        row = int(rows[np.argmin(lines[rows])])
        if self.first < 0 or lines[row] < self.first_line:
            self.first, self.first_line = row, int(lines[row])


def _where(table: VariantTable, name: str, row: int) -> str:
    """One variant as a note names it: where it is in the file, and what it is."""
    found = table.row(row)
    return f"{name} line {found['line']}, {found['chrom']}:{found['pos']} {_allele(found['ref'])}>{_allele(found['alt'])}"


def _allele(bases: str) -> str:
    """An allele as a message shows it: a 10 Mb REF spelled out is its first 20 bases and its length."""
    return bases if len(bases) <= 20 else f"{bases[:20]}...({len(bases):,} bases)"


def _earliest(rows: np.ndarray, lines: np.ndarray) -> int:
    """The row among ``rows`` that comes first in the file."""
    return int(rows[np.argmin(lines[rows])])


def check_refs(table: VariantTable, reference: Reference, chunk_bases: int,
               progress: Phase | None = None) -> np.ndarray:
    """Whether each variant's REF equals the reference there; the reference is read in runs of at
    most max(chunk_bases, longest REF) bases, contig by contig in position order, ``CHUNK_ROWS``
    variants of that order at a time (bounded memory beside the table's own arrays); ``progress``
    counts the variants checked. Starts and ends are made a block at a time (whole columns of
    them, and of REF lengths, were 28 bytes a variant more at the plan's peak)."""
    match = np.ones(len(table), dtype=bool)
    if not len(table):
        return match
    positions = table.positions()
    order = np.lexsort((positions, table.chrom_ranks()))  # stable: ties keep file order
    longest = int(pc.max(pc.utf8_length(table.text("ref"))).as_py())
    rows = variant_table.CHUNK_ROWS
    for b in range(0, len(order), rows):
        block = order[b : b + rows]
        starts = positions[block] - 1
        ends = starts + pc.utf8_length(table.text("ref").take(pa.array(block))).to_numpy().astype(np.int64)
        match[block] = _check_block(table, reference, block, starts, ends, chunk_bases, longest)
        if progress is not None:
            progress.advance(len(block))
    return match


def _check_block(table: VariantTable, reference: Reference, block: np.ndarray, starts: np.ndarray,
                 ends: np.ndarray, chunk_bases: int, longest: int) -> np.ndarray:
    """``check_refs`` for one block of variants in (contig, position) order."""
    chroms = [table.chrom_at(int(i)) for i in block]
    refs = table.text("ref").take(pa.array(block)).to_pylist()
    match = np.ones(len(block), dtype=bool)
    for a, b in group_reads(chroms, starts, ends, chunk_bases, longest):
        lo, hi = int(starts[a:b].min()), int(ends[a:b].max())
        seq = reference.fetch(chroms[a], lo, hi)
        for k in range(a, b):
            observed = seq[starts[k] - lo : ends[k] - lo]
            match[k] = bool(np.array_equal(observed, encode_dna(refs[k])))
    return match


def refuse_ref_mismatches(table: VariantTable, match: np.ndarray, reference_uri: str,
                          limit: float) -> None:
    """SpecError when more than ``limit`` of the variants disagree with the reference: the usual
    causes (another genome build, REF and ALT swapped) spoil every score, not a few."""
    bad = np.flatnonzero(~match)
    if not len(table) or len(bad) / len(table) <= limit:
        return
    name = os.path.basename(reference_uri.rstrip("/")) or reference_uri
    line_of = table.line_numbers()
    lines = dict.fromkeys(int(line_of[i]) for i in bad)  # a multi-allelic record once
    first = {int(line_of[i]): int(i) for i in bad[::-1]}
    rows = {n: table.row(first[n]) for n in list(lines)[:MAX_LISTED_MISMATCHES]}
    unit = "record" if table.layout == LAYOUT_BCF else "line"  # a BCF's numbers count records
    shown = "; ".join(f"{unit} {n} {r['chrom']}:{r['pos']} REF {_allele(r['ref'])}" for n, r in rows.items())
    raise SpecError([(FIELD, f"{len(bad)} of {len(table)} variants ({len(bad) / len(table):.1%}) have a REF "
                             f"allele that disagrees with the reference {name} (more than "
                             f"windows.max_ref_mismatch = {limit:g}): wrong genome build or REF/ALT "
                             f"swapped? First: {shown}. Use the reference the variants were called "
                             "on, or raise windows.max_ref_mismatch to score them anyway")])


@dataclass(frozen=True)
class VariantSpan:
    """Where one variant's windows come from: the reference range both windows need."""

    start: int  # ref window start (may be < 0: padded with N)
    p: int  # 0-based REF start
    need_end: int  # end of the reference range either window uses


def variant_span(pos: int, ref: str, alt: str, length: int) -> VariantSpan:
    """The range of reference bases the ref and alt windows of one variant need."""
    p = pos - 1
    start = p - length // 2
    right = max(0, length - length // 2 - len(alt))
    return VariantSpan(start, p, max(start + length, p + len(ref) + right))


def variant_windows(seq: np.ndarray, seq_start: int, span: VariantSpan, ref: str, alt: str,
                    length: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(ref codes, alt codes, ref_match) cut from ``seq``, the reference's codes from ``seq_start``."""
    o = span.start - seq_start
    ref_win = seq[o : o + length]
    left = seq[o : span.p - seq_start]
    rest = span.p + len(ref) - seq_start
    right = seq[rest : rest + max(0, length - len(left) - len(alt))]
    alt_win = np.concatenate([left, encode_dna(alt), right])[:length]
    observed = seq[span.p - seq_start : rest]
    ref_match = bool(np.array_equal(observed, encode_dna(ref)))
    return ref_win, alt_win, ref_match
