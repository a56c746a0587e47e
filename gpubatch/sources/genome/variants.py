"""Variant-effect mode: VCF/BCF records -> scored (ref, alt) window pairs.

Planning (client) reads only the records' positions and alleles (pysam.VariantFile); sequence is
read on workers. One item per ALT allele. Decisions, each tested:

* ``ALT = .`` (no alternate allele) is skipped and counted (``skipped_alt_dot``).
* Symbolic alleles (``<DEL>``, ``<INS:ME>``, ``*``, breakends with ``[`` or ``]``) are skipped and
  counted (``skipped_symbolic``): they carry no sequence to put in a window.
* A contig absent from the reference, or a POS past the contig end, is a plan-time ``SpecError``
  naming the file and line (the usual cause, 'chr1' against '1', affects every record, and
  scoring the rest silently would hide it).
* A REF allele that disagrees with the reference is **scored but flagged**: the ``ref_match``
  column is False and the shard's ``ref_mismatches`` count goes up. The ref window is always the
  reference's own sequence; the alt window splices ALT in place of len(REF) reference bases.

Window rule, for a variant whose REF starts at 0-based ``p = POS - 1`` and window ``length = L``::

    start = p - L // 2                       # the variant's first base sits at offset L // 2
    ref window = reference[start : start + L]
    alt window = (reference[start : p] + ALT + reference[p + len(REF) : ...])[:L]

The alt window keeps the left flank fixed and takes as much right flank as it needs to reach L
bases: a deletion pulls in more downstream sequence, an insertion pushes it out (and an ALT longer
than ``L - L // 2`` is cut at the window end). Bases outside the contig are N.

Output columns: ``variant_id`` (the VCF ID, suffixed ``:ALT`` for multi-allelic records, or
``chrom:POS:REF:ALT`` when ID is '.'), ``chrom``, ``pos`` (the VCF's 1-based POS, so rows join back
to the file), ``ref``, ``alt``, ``ref_match``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpubatch.core.errors import InputError, MissingExtraError, SpecError
from gpubatch.io.storage import local_copy
from gpubatch.ops.kernels import encode_dna
from gpubatch.sources.genome.reference import ContigTable

FIELD = "windows.variants"
MAX_PROBLEMS = 20


@dataclass
class VariantTable:
    """Scorable variants (one per ALT allele) in file order, plus what was skipped and why."""

    variant_id: list[str] = field(default_factory=list)
    chrom: list[str] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    ref: list[str] = field(default_factory=list)
    alt: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {
        "records": 0, "variants": 0, "skipped_alt_dot": 0, "skipped_symbolic": 0})

    def __len__(self) -> int:
        return len(self.pos)

    def add(self, vid: str, chrom: str, pos: int, ref: str, alt: str) -> None:
        self.variant_id.append(vid)
        self.chrom.append(chrom)
        self.pos.append(pos)
        self.ref.append(ref)
        self.alt.append(alt)
        self.counts["variants"] += 1

    def slice_payload(self, lo: int, hi: int) -> dict[str, list[Any]]:
        """The variants [lo, hi) as plain lists: a shard's payload, small and JSON-able."""
        return {k: getattr(self, k)[lo:hi] for k in ("variant_id", "chrom", "pos", "ref", "alt")}


def is_symbolic(alt: str) -> bool:
    """Alleles that name an event rather than spell its sequence."""
    return alt.startswith("<") or alt == "*" or "[" in alt or "]" in alt or alt.startswith(".") \
        or alt.endswith(".")


def _pysam() -> Any:
    try:
        import pysam
    except ImportError:
        raise MissingExtraError("variant mode (windows.variants)", "pysam", "genome") from None
    return pysam


def _open_vcf(path: str, uri: str) -> Any:
    pysam = _pysam()
    if not os.path.exists(path):
        raise SpecError([(FIELD, f"file not found: {uri}")])
    previous = pysam.set_verbosity(0)  # htslib would log a missing index: none is needed here
    try:
        return pysam.VariantFile(path)
    except (ValueError, OSError) as exc:
        raise SpecError([(FIELD, f"{uri}: not a readable VCF/BCF with a header ({exc}); a VCF must "
                                 f"start with '##fileformat=VCFv4.x' and have a '#CHROM ...' line")]) from None
    finally:
        pysam.set_verbosity(previous)


def _header_lines(path: str) -> int | None:
    """Header lines of a text VCF (plain or bgzip), for line numbers in errors; None for BCF."""
    import gzip

    with open(path, "rb") as raw:
        magic = raw.read(4)
    opener: Any = gzip.open if magic[:2] == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as f:
            if f.read(3) == b"BCF":
                return None
            f.seek(0)
            count = 0
            for line in f:
                if not line.startswith(b"#"):
                    break
                count += 1
            return count
    except (OSError, EOFError):
        return None


def _where(name: str, header_lines: int | None, i: int) -> str:
    return f"{name} line {header_lines + i}" if header_lines is not None else f"{name} record {i}"


def _variant_id(record_id: str | None, chrom: str, pos: int, ref: str, alt: str, n_alts: int) -> str:
    if record_id and record_id != ".":
        return record_id if n_alts == 1 else f"{record_id}:{alt}"
    return f"{chrom}:{pos}:{ref}:{alt}"


def _check_record(chrom: str, pos: int, contigs: ContigTable, where: str) -> str | None:
    if chrom not in contigs:
        return f"{where}: {contigs.missing_message(chrom)}"
    if pos > contigs.length(chrom):
        return f"{where}: POS {pos} is past the end of {chrom} (length {contigs.length(chrom)})"
    return None


def _add_record(table: VariantTable, rec: Any) -> None:
    alts = rec.alts or ()
    if not alts:
        table.counts["skipped_alt_dot"] += 1
        return
    for alt in alts:
        if is_symbolic(alt):
            table.counts["skipped_symbolic"] += 1
            continue
        vid = _variant_id(rec.id, rec.chrom, rec.pos, rec.ref, alt, len(alts))
        table.add(vid, rec.chrom, int(rec.pos), rec.ref.upper(), alt.upper())


def _scan(vf: Any, table: VariantTable, contigs: ContigTable, name: str,
          header_lines: int | None) -> list[tuple[str, str]]:
    """Add every record to ``table``; return the records' problems (stops listing after a few)."""
    problems: list[tuple[str, str]] = []
    try:
        for i, rec in enumerate(vf, start=1):
            table.counts["records"] += 1
            problem = _check_record(rec.chrom, rec.pos, contigs, _where(name, header_lines, i))
            if problem is None:
                _add_record(table, rec)
                continue
            problems.append((FIELD, problem))
            if len(problems) >= MAX_PROBLEMS:
                problems.append((FIELD, "... (stopped listing)"))
                break
    except (ValueError, OSError) as exc:
        where = _where(name, header_lines, table.counts["records"] + 1)
        raise SpecError([(FIELD, f"{where}: malformed VCF record ({exc})")]) from None
    return problems


def read_variants(uri: str, contigs: ContigTable,
                  storage_options: dict[str, Any] | None = None) -> VariantTable:
    """All scorable variants of a VCF / VCF.gz / BCF, checked against the reference's contigs.

    The whole table is held on the client (a few hundred bytes per variant): fine for the
    millions of variants typical of effect scoring, not for scoring all of gnomAD in one job.
    """
    table = VariantTable()
    name = os.path.basename(uri.rstrip("/"))
    try:
        with local_copy(uri, storage_options) as path, _open_vcf(path, uri) as vf:
            problems = _scan(vf, table, contigs, name, _header_lines(path))
    except InputError as exc:  # a remote file that is missing or unreadable: the spec names it
        raise SpecError([(FIELD, f"{exc.input_uri}: {exc.message}")]) from None
    if problems:
        raise SpecError(problems)
    return table


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
