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
  (or a REF that runs past the end), and a REF that is not sequence (``.``, symbolic, IUPAC
  codes other than N) leave that record out, listed by file and line in report.json's ``failed``
  (``bad_records``). Past ``windows.max_bad_records`` of the file the job is refused at plan time
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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpubatch.core.errors import InputError, SpecError
from gpubatch.io.storage import local_copy
from gpubatch.io.uris import is_remote, local_path
from gpubatch.ops.kernels import encode_dna
from gpubatch.sources.genome.bad_records import BadRecords
from gpubatch.sources.genome.reference import ContigTable, Reference, group_reads
from gpubatch.sources.genome.variant_files import MalformedRecord, RawRecord, iter_records, sniff

FIELD = "windows.variants"
MAX_LISTED_MISMATCHES = 5
BASES = frozenset("ACGT")
#: IUPAC ambiguity codes (N included): a position's possible bases, not a base
IUPAC = frozenset("RYSWKMBDHVN")
#: why an ALT allele is not scored; every reason is counted, zero or not, so report.json keeps one shape
SKIP_REASONS = ("alt_missing", "symbolic", "spanning_deletion", "breakend", "iupac", "not_sequence")


@dataclass
class VariantTable:
    """Scorable variants (one per ALT allele) in file order, plus what was skipped and why."""

    variant_id: list[str] = field(default_factory=list)
    chrom: list[str] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    ref: list[str] = field(default_factory=list)
    alt: list[str] = field(default_factory=list)
    line: list[int] = field(default_factory=list)  # the file line (or BCF record) each came from
    counts: dict[str, Any] = field(default_factory=lambda: {
        "records": 0, "variants": 0, "skipped": dict.fromkeys(SKIP_REASONS, 0)})
    layout: str = "vcf"
    notes: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)  # records left out, as report entries

    def __len__(self) -> int:
        return len(self.pos)

    def add(self, vid: str, chrom: str, pos: int, ref: str, alt: str, line: int = 0) -> None:
        self.variant_id.append(vid)
        self.chrom.append(chrom)
        self.pos.append(pos)
        self.ref.append(ref)
        self.alt.append(alt)
        self.line.append(line)
        self.counts["variants"] += 1

    def skip(self, reason: str) -> None:
        self.counts["skipped"][reason] += 1

    @property
    def skipped(self) -> int:
        return int(sum(self.counts["skipped"].values()))

    def slice_payload(self, lo: int, hi: int) -> dict[str, list[Any]]:
        """The variants [lo, hi) as plain lists: a shard's payload, small and JSON-able."""
        return {k: getattr(self, k)[lo:hi] for k in ("variant_id", "chrom", "pos", "ref", "alt")}


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
        return f"REF {ref!r} is a symbolic allele, not a sequence"
    bad = sorted(set(ref.upper()) - BASES - {"N"})
    if not bad:
        return None
    what = "IUPAC ambiguity codes" if set(bad) <= IUPAC else "characters that are not bases"
    return f"REF {ref!r} holds {what} ({', '.join(bad)})"


def _variant_id(record_id: str | None, chrom: str, pos: int, ref: str, alt: str, n_alts: int) -> str:
    if record_id and record_id != ".":
        return record_id if n_alts == 1 else f"{record_id}:{alt}"
    return f"{chrom}:{pos}:{ref}:{alt}"


def _check_record(rec: RawRecord, contigs: ContigTable) -> str | None:
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
        return f"REF {rec.ref!r} at POS {rec.pos} runs past the end of {rec.chrom} (length {length})"
    return None


def _add_record(table: VariantTable, rec: RawRecord) -> None:
    if not rec.alts:
        table.skip("alt_missing")
        return
    for alt in rec.alts:
        reason = alt_skip_reason(alt)
        if reason is not None:
            table.skip(reason)
            continue
        vid = _variant_id(rec.record_id, rec.chrom, rec.pos, rec.ref, alt, len(rec.alts))
        table.add(vid, rec.chrom, rec.pos, rec.ref.upper(), alt.upper(), rec.line)


def _scan(records: Iterator[RawRecord | MalformedRecord], table: VariantTable, contigs: ContigTable,
          bad: BadRecords) -> None:
    """Add every usable record to ``table``, and every other to ``bad`` with its problem."""
    for rec in records:
        table.counts["records"] += 1
        bad.total += 1
        problem = rec.problem if isinstance(rec, MalformedRecord) else _check_record(rec, contigs)
        if problem is None and isinstance(rec, RawRecord):
            _add_record(table, rec)
        else:
            bad.add(rec.where, problem or "", rec.chrom if isinstance(rec, RawRecord) else None)


def read_variants(uri: str, contigs: ContigTable, storage_options: dict[str, Any] | None = None,
                  max_bad: float = 0.0) -> VariantTable:
    """All scorable variants of a VCF / VCF.gz / BCF / headerless VCF body / TSV or CSV table,
    checked against the reference's contigs (see ``variant_files`` for the layouts); records
    that cannot be scored are left out into ``table.failed``, up to ``max_bad`` of the file.

    The whole table is held on the client (a few hundred bytes per variant): fine for the
    millions of variants typical of effect scoring, not for scoring all of gnomAD in one job.
    """
    table = VariantTable()
    if not is_remote(uri) and not os.path.exists(local_path(uri)):
        raise SpecError([(FIELD, f"file not found: {uri}")])
    bad = BadRecords(FIELD, uri, contigs=contigs)
    try:
        with local_copy(uri, storage_options) as path:
            layout = sniff(path, uri)
            table.layout = layout.kind
            if layout.note:
                table.notes.append(layout.note)
            _scan(iter_records(path, uri, layout), table, contigs, bad)
    except InputError as exc:  # a remote file that is missing or unreadable: the spec names it
        raise SpecError([(FIELD, f"{exc.input_uri}: {exc.message}")]) from None
    table.failed = bad.admit(max_bad)
    _tell_alleles_apart(table)
    table.notes += _repeat_notes(table, os.path.basename(uri.rstrip("/")))
    build = other_build_note(layout.declared, contigs, os.path.basename(uri.rstrip("/")))
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
    is no change at all (its delta is 0). Both were scored without a word."""
    seen: set[tuple[str, int, str, str]] = set()
    repeats, same, first_repeat, first_same = 0, 0, "", ""
    for i, key in enumerate(zip(table.chrom, table.pos, table.ref, table.alt, strict=True)):
        where = f"{name} line {table.line[i]}, {key[0]}:{key[1]} {key[2]}>{key[3]}"
        if key in seen:
            repeats, first_repeat = repeats + 1, first_repeat or where
        seen.add(key)
        if key[2] == key[3]:
            same, first_same = same + 1, first_same or where
    notes = []
    if repeats:
        notes.append(f"{repeats} variant(s) repeat an earlier one (the same CHROM, POS, REF and ALT; first: "
                     f"{first_repeat}): each is scored, so rows repeat; drop them first "
                     "(`bcftools norm -d exact`) to score each variant once")
    if same:
        notes.append(f"{same} ALT allele(s) equal their REF (first: {first_same}): no change, so their alt "
                     "window is the ref window and every delta is 0")
    return notes


def _tell_alleles_apart(table: VariantTable) -> None:
    """Suffix ``:ALT`` to an ID that other ALT alleles share, as a multi-allelic record's are: a
    file split into biallelic records (``bcftools norm -m-``, the usual step before scoring) gave
    every allele of rs123 the id 'rs123', and a join on ``variant_id`` paired each with all."""
    alts: dict[str, set[str]] = {}
    for vid, alt in zip(table.variant_id, table.alt, strict=True):
        alts.setdefault(vid, set()).add(alt)
    table.variant_id = [f"{vid}:{alt}" if len(alts[vid]) > 1 else vid
                        for vid, alt in zip(table.variant_id, table.alt, strict=True)]


def check_refs(table: VariantTable, reference: Reference, chunk_bases: int) -> np.ndarray:
    """Whether each variant's REF equals the reference there; the reference is read in runs of at
    most max(chunk_bases, longest REF) bases, contig by contig in position order (bounded memory)."""
    match = np.ones(len(table), dtype=bool)
    order = sorted(range(len(table)), key=lambda i: (table.chrom[i], table.pos[i]))
    chroms = [table.chrom[i] for i in order]
    starts = np.array([table.pos[i] - 1 for i in order], dtype=np.int64)
    ends = starts + np.array([len(table.ref[i]) for i in order], dtype=np.int64)
    longest = int((ends - starts).max()) if len(order) else 1
    for a, b in group_reads(chroms, starts, ends, chunk_bases, longest):
        lo, hi = int(starts[a:b].min()), int(ends[a:b].max())
        seq = reference.fetch(chroms[a], lo, hi)
        for k in range(a, b):
            i = order[k]
            observed = seq[starts[k] - lo : ends[k] - lo]
            match[i] = bool(np.array_equal(observed, encode_dna(table.ref[i])))
    return match


def refuse_ref_mismatches(table: VariantTable, match: np.ndarray, reference_uri: str,
                          limit: float) -> None:
    """SpecError when more than ``limit`` of the variants disagree with the reference: the usual
    causes (another genome build, REF and ALT swapped) spoil every score, not a few."""
    bad = np.flatnonzero(~match)
    if not len(table) or len(bad) / len(table) <= limit:
        return
    name = os.path.basename(reference_uri.rstrip("/")) or reference_uri
    lines = dict.fromkeys(int(table.line[i]) for i in bad)  # a multi-allelic record once
    first = {int(table.line[i]): i for i in bad[::-1]}
    shown = "; ".join(f"line {n} {table.chrom[first[n]]}:{table.pos[first[n]]} REF {table.ref[first[n]]}"
                      for n in list(lines)[:MAX_LISTED_MISMATCHES])
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
