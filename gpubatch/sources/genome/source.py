"""Genomes as a Source: windows tiled over regions, or ref/alt window pairs around variants.

The twin of ``slides.py``. Planning (client) reads the reference's contig table, the BED file or
the VCF's positions, never sequence, and cuts the work into shards of
``windows.windows_per_shard`` windows or variants. A shard's payload describes its windows
compactly (runs of windows as [chrom, first start, count, strand]; variants as short lists), so
it stays small however large the genome.

On a worker, each read unit is one long contiguous reference read (at most
``windows.chunk_bases`` bases, more only when one window is longer) that is sliced into many
windows: big read, then slice. Memory per read unit is about twice max(chunk_bases, length)
bytes, set by configuration and not by genome size.

Window index columns are ``chrom``, ``start``, ``end`` (= start + length, also where the window runs
past the contig end and is padded with N), ``strand`` and ``region`` (the window's region: its BED
line, its index in the spec's list, or its contig's place among the non-empty ones; duplicate or
overlapping regions give the same window once per region, told apart by it). Sequences travel as uint8 codes: windows as (k, L), variant pairs as (k, 2, L) with ref then alt.
They become one-hot floats only in the device stage (the readers' ``preprocess`` declaration;
N -> ``n_value`` in all four channels). With ``reverse_complement: average`` the model sees every window on both strands
(a batch of 2N, or 4N for variant pairs) and ``from_model_output`` averages the two strands' outputs
back to N rows: per-window scores as they are, track outputs (N, bins, tracks) with the reverse
strand's bins flipped first. Track outputs are reduced and scored there too, on the worker
(``genome.tracks``): see that module for the outputs a track model's job writes.

Errors: problems in the spec's files (unknown contig, malformed BED line, region past the contig
end, VCF without header, FASTA without index) are found at plan time and raise ``SpecError``
(exit 2, nothing runs). Problems met on a worker (a file that changed or vanished) raise
``InputError`` and quarantine the shard. A REF allele that disagrees with the reference is not an
error: the variant is scored and flagged (``ref_match`` False, counted in ``ref_mismatches``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from typing import Any

import numpy as np

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputChanged, InputError, SpecError
from gpubatch.core.phases import phase
from gpubatch.core.plural import counted
from gpubatch.core.results import ShardResult
from gpubatch.io.redact import redact
from gpubatch.io.storage import input_identity, reads_pinned
from gpubatch.io.uris import suffixed
from gpubatch.ops.kernels import reverse_complement_codes, window_rows
from gpubatch.ops.preprocess import Preprocess
from gpubatch.sources.base import ItemBlock, ReadUnit, Shard, ShardReader, Source
from gpubatch.sources.genome.opening import open_reference
from gpubatch.sources.genome.reference import (
    ContigTable,
    Reference,
    changed_source_note,
    group_reads,
    load_contigs,
    zarr_marker,
)
from gpubatch.sources.genome.regions import (
    WindowPlan,
    gap_note,
    overlap_note,
    padding_note,
    resolve_regions,
)
from gpubatch.sources.genome.tracks import TrackOutputs
from gpubatch.sources.genome.variants import (
    SKIP_REASONS,
    VariantTable,
    check_refs,
    max_allele_bases,
    read_variants,
    refuse_ref_mismatches,
    variant_span,
    variant_windows,
    window_notes,
)
from gpubatch.spec import JobSpec, WindowsSpec

WINDOW_COLUMNS = ["chrom", "start", "end", "strand", "region"]
VARIANT_COLUMNS = ["variant_id", "chrom", "pos", "ref", "alt", "ref_match"]


def _windows(job: JobSpec) -> WindowsSpec:
    if job.windows is None:
        raise SpecError([("windows", "kind: genome needs a `windows` section")])
    return job.windows


def _stride(w: WindowsSpec) -> int:
    return w.stride or w.length


class WindowShards(Sequence[Shard]):
    """The shards of a windows job, made when asked for (by index or in order), never all at once."""

    def __init__(self, plan: WindowPlan, reference: str, notes: list[str] | None = None,
                 facts: dict[str, Any] | None = None):
        self.plan, self.reference = plan, reference
        self.facts = facts or {}  # what the plan found of the reference (reference_facts)
        self.notes = notes or []  # what the plan found in the regions, for data_quality

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, index: int) -> Shard:  # type: ignore[override]
        segments, count = self.plan[index]
        i = index if index >= 0 else index + len(self)
        payload = {"mode": "windows", "segments": segments, **self.facts}
        return Shard(f"windows-{i:06d}", self.reference, payload, count)


class VariantShards(Sequence[Shard]):
    """The shards of a variants job, each's payload cut from the plan's table when the shard is
    asked for: the table is held once (compactly), not again as every shard's lists."""

    def __init__(self, table: VariantTable, uri: str, per: int, common: dict[str, Any]):
        self.table, self.uri, self.per, self.common = table, uri, per, common

    def __len__(self) -> int:
        return -(-len(self.table) // self.per)

    def __getitem__(self, index: int) -> Shard:  # type: ignore[override]
        i = index if index >= 0 else index + len(self)
        if not 0 <= i < len(self):
            raise IndexError(index)
        lo, hi = i * self.per, min((i + 1) * self.per, len(self.table))
        payload = {"mode": "variants", "uri": self.uri, **self.common, **self.table.slice_payload(lo, hi)}
        return Shard(f"variants-{i:06d}", self.uri, payload, hi - lo)


def reference_facts(contigs: ContigTable) -> dict[str, Any]:
    """What the plan found of the reference that every shard's worker would otherwise ask again:
    the index version its windows were cut with (a worker refuses another) and the reference's
    form (a worker opens it as that, without the 3 requests of probing it)."""
    return {"index_version": contigs.index_version, "reference_format": contigs.format}


def planned_identity(uri: str, storage: dict[str, Any], contigs: ContigTable) -> dict[str, Any] | None:
    """The reference's identity as the plan found it (a FASTA's size and ETag or mtime), which
    every shard carries: a windows shard's input is the reference, and a worker that finds
    another version at its start refuses it (engine.worker.unchanged_since_planned); a variants
    shard's reader holds its reference reads to it (reference.FastaReference). Either way the
    run's windows never come from two versions of it. None for a genome zarr (a folder)."""
    return None if contigs.format == "zarr" else _checked_identity(uri, storage, contigs)


def reference_identity(uri: str, storage: dict[str, Any], contigs: ContigTable) -> dict[str, Any]:
    """The identity a shard's reader holds its reference to (reference.open_reference's
    ``planned``): the FASTA's, or a genome zarr's ``zarr.json``'s (its own identity as a folder
    says nothing). Variants shards and windows shards over a zarr carry it; windows shards over
    a FASTA have the worker's check of their input instead (``planned_identity``)."""
    if contigs.format == "zarr":
        return input_identity(zarr_marker(uri), storage)
    return _checked_identity(uri, storage, contigs)


def _checked_identity(uri: str, storage: dict[str, Any], contigs: ContigTable) -> dict[str, Any]:
    """The FASTA's identity, which must be the version its index was checked against where the
    check's reads were pinned to one: a FASTA written over between that check and this HEAD
    would be recorded as the run's, and every shard would read it by the index of the other
    (both held to the plan's versions, neither refused). A spec error: plan again."""
    identity = input_identity(uri, storage)
    if contigs.checked_version and identity.get("etag") != contigs.checked_version:
        raise SpecError([("windows.reference", f"{redact(uri)} changed while the run was planned: its index was "
                                               f"checked against ETag {contigs.checked_version}, it is now "
                                               f"{identity.get('etag')}; run the job again")])
    return identity


def refuse_another_index(shard: Shard, reference: Reference) -> None:
    """The index a worker read must be the one its shard was planned with: the windows (and the
    contig-start check, the one check a worker makes) go by its offsets and line widths, so a
    .fai or .gzi rebuilt or written over since the plan reads other bases in the same windows,
    unseen. Compared where both versions are known (a local file's sha256, a pinned ETag): no
    request more. InputChanged: read again, then reported, naming the index."""
    planned, read = shard.payload.get("index_version"), reference.index_version
    if not planned or not read or planned == read:
        return
    was, now = (dict(part.split(" ", 1) for part in v.split("; ")) for v in (planned, read))
    files = ", ".join(redact(suffixed(reference.uri, f".{ext}")) for ext in now if was.get(ext) != now[ext])
    raise InputChanged(redact(reference.uri), f"the reference's index {files} changed since the run was planned "
                       f"({planned} planned, {read} read): the shard's windows were cut with the other one; "
                       "run the job again (--overwrite) to plan with this index")


def index_columns(job: JobSpec) -> list[str]:
    """The index columns of a genome job: variant columns in variant mode, else window columns."""
    return VARIANT_COLUMNS if job.windows is not None and job.windows.variants else WINDOW_COLUMNS


class _GenomeReader(ShardReader):
    """What window and variant readers share: the open reference and the model-side encoding."""

    pair = False  # items are (k, 2, L) ref/alt pairs

    def __init__(self, shard: Shard, job: JobSpec, reference: Reference, clocks: StageClocks):
        self.shard, self.w, self.reference, self.clocks = shard, _windows(job), reference, clocks
        self.length = self.w.length
        self.average = self.w.reverse_complement == "average"
        self.tracks = TrackOutputs.from_job(job)
        self._lock = threading.Lock()

    def _base_attrs(self, contigs: list[str]) -> dict[str, Any]:
        return {
            "reference": redact(self.reference.uri), "reference_format": self.reference.format,
            "reference_contigs": len(self.reference.contigs.names), "contigs": sorted(set(contigs)),
            "length": self.length, "stride": _stride(self.w),
            "reverse_complement": self.w.reverse_complement, "layout": self.w.encoding.layout,
            "n_value": self.w.encoding.n_value, "codes": "A=0 C=1 G=2 T=3 N=4",
            "coordinates": "0-based, end-exclusive", "tracks": self.tracks.describe(),
        }

    @property
    def preprocess(self) -> Preprocess:
        """uint8 codes -> one-hot; pairs go as [all refs; all alts], both strands when averaging."""
        enc = self.w.encoding
        return Preprocess("dna", layout=enc.layout, n_value=enc.n_value, dtype=enc.dtype,
                          pairs=self.pair, both_strands=self.average)

    def column_limit(self, name: str) -> int | None:
        return self.tracks.column_limit(name)

    def input_identity(self) -> dict[str, Any] | None:
        """The planned identity of the reference where the shard's input is the reference and its
        reads are pinned to that version (If-Match: another is refused by the read itself): the
        worker's start identity with no HEAD of its own, as a streamed slide's open gives it."""
        planned = self.shard.payload.get("planned_identity")
        pinned = self.input_version()
        return planned if planned and pinned and planned.get("etag") == pinned else None

    def input_version(self) -> str | None:
        """The reference's pinned ETag where the shard's input is the reference (windows; a
        variants shard's input is its VCF, which these reads are not of): the worker's HEAD
        after the shard is then not needed, as for a pinned slide."""
        return self.reference.version() if self.shard.input_uri == self.reference.uri else None

    def close(self) -> None:
        self.reference.close()


class GenomeWindowReader(_GenomeReader):
    """Tiled windows over regions; minus-strand windows are reverse-complemented at read time."""

    def __init__(self, shard: Shard, job: JobSpec, reference: Reference, clocks: StageClocks):
        super().__init__(shard, job, reference, clocks)
        stride = _stride(self.w)
        segments = shard.payload["segments"]
        self.chroms = [seg[0] for seg in segments for _ in range(seg[2])]
        self.strands = np.array([seg[3] for seg in segments for _ in range(seg[2])], dtype=object)
        self.regions = np.repeat(np.array([seg[4] if len(seg) > 4 else -1 for seg in segments], dtype=np.int64),
                                 [seg[2] for seg in segments])
        self.starts = np.concatenate([seg[1] + stride * np.arange(seg[2], dtype=np.int64)
                                      for seg in segments]) if segments else np.zeros(0, np.int64)
        for c in set(self.chroms):
            if c not in reference.contigs:
                raise InputError(reference.uri, reference.contigs.missing_message(c))
        self.attrs = {**self._base_attrs(self.chroms), "mode": "windows", "windows": len(self.starts)}

    @property
    def n_items(self) -> int:
        return len(self.starts)

    def read_units(self) -> Iterator[ReadUnit]:
        ends = self.starts + self.length
        for i, j in group_reads(self.chroms, self.starts, ends, self.w.chunk_bases, self.length):
            yield partial(self._read_run, i, j)

    def _read_run(self, i: int, j: int) -> ItemBlock:
        starts, chrom = self.starts[i:j], self.chroms[i]
        lo, hi = int(starts.min()), int(starts.max()) + self.length
        seq = self.reference.fetch(chrom, lo, hi)
        with self.clocks.part("slice"):  # the windows and their index columns, cut from the read
            items = window_rows(seq, starts - lo, self.length)
            minus = self.strands[i:j] == "-"
            if minus.any():
                items = items.copy()
                items[minus] = reverse_complement_codes(items[minus])
            index = {"chrom": np.array(self.chroms[i:j], dtype=object), "start": starts.copy(),
                     "end": starts + self.length, "strand": self.strands[i:j].copy(),
                     "region": self.regions[i:j].copy()}
        return ItemBlock(items, index)

    def from_model_output(self, outputs: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        return self.tracks.windows(outputs)


class VariantReader(_GenomeReader):
    """Ref/alt window pairs around variants; REF mismatches are scored and flagged, not skipped."""

    pair = True

    def __init__(self, shard: Shard, job: JobSpec, reference: Reference, clocks: StageClocks):
        super().__init__(shard, job, reference, clocks)
        p = shard.payload
        self.v = {k: p[k] for k in ("variant_id", "chrom", "pos", "ref", "alt")}
        self.spans = [variant_span(pos, ref, alt, self.length)
                      for pos, ref, alt in zip(p["pos"], p["ref"], p["alt"], strict=True)]
        self.attrs = {**self._base_attrs(p["chrom"]), "mode": "variants", "variants_uri": redact(p["uri"]),
                      "variants": len(self.spans), "ref_mismatches": 0,
                      "window_rule": "start = POS-1 - length//2; alt = (left flank + ALT + right flank)[:length]",
                      "plan_counts": p.get("plan_counts", {})}

    @property
    def n_items(self) -> int:
        return len(self.spans)

    def read_units(self) -> Iterator[ReadUnit]:
        starts = np.array([s.start for s in self.spans], dtype=np.int64)
        ends = np.array([s.need_end for s in self.spans], dtype=np.int64)
        for i, j in group_reads(self.v["chrom"], starts, ends, self.w.chunk_bases, self.length):
            yield partial(self._read_run, i, j, int(starts[i:j].min()), int(ends[i:j].max()))

    def _read_run(self, i: int, j: int, lo: int, hi: int) -> ItemBlock:
        seq = self.reference.fetch(self.v["chrom"][i], lo, hi)
        items = np.empty((j - i, 2, self.length), dtype=np.uint8)
        match = np.empty(j - i, dtype=bool)
        for k in range(i, j):
            ref, alt = self.v["ref"][k], self.v["alt"][k]
            items[k - i, 0], items[k - i, 1], match[k - i] = variant_windows(
                seq, lo, self.spans[k], ref, alt, self.length)
        self._count_mismatches(int((~match).sum()))
        index: dict[str, np.ndarray] = {
            c: np.array(self.v[c][i:j], dtype=np.int64 if c == "pos" else object)
            for c in ("variant_id", "chrom", "pos", "ref", "alt")}
        index["ref_match"] = match
        return ItemBlock(items, index)

    def _count_mismatches(self, n: int) -> None:
        if n:
            with self._lock:
                self.attrs["ref_mismatches"] += n
            self.clocks.count("variants.ref_mismatches", n)

    def from_model_output(self, outputs: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        return self.tracks.variants(outputs, n)


def _skip_text(table: VariantTable) -> str:
    if not table.counts["records"]:
        return "the file holds no variant records (a header alone, or an empty file)"
    skipped = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in table.counts["skipped"].items() if n)
    records = table.counts["records"]
    return (f"{counted(records, 'record')}, {counted(table.skipped, 'ALT allele')} skipped "
            f"({skipped or 'none'})")


def _source_note(uri: str, storage: dict[str, Any], contigs: ContigTable) -> str | None:
    """A genome zarr's note that its FASTA changed since the ingest (reference.changed_source_note)."""
    return changed_source_note(uri, storage) if contigs.format == "zarr" else None


def _held_identity(shard: Shard, storage: dict[str, Any]) -> dict[str, Any] | None:
    """The identity a shard's reference reads are held to: its ``reference_identity`` (variants,
    a zarr's: checked as it opens), else a windows shard's ``planned_identity`` (its input, the
    FASTA) where its reads can be pinned to the planned ETag (obstore, If-Match): they then ask
    neither its size nor its version (no HEAD), and a FASTA written over is refused by the read.
    Elsewhere (fsspec, a weak ETag, a local file) None: the worker checks its input before and
    after, as any input's; holding the reads to it too would ask a HEAD more."""
    held = shard.payload.get("reference_identity")
    if held:
        return dict(held)
    planned = shard.payload.get("planned_identity")
    if planned and reads_pinned(shard.input_uri, storage, planned.get("etag")):
        return dict(planned)
    return None


class GenomeSource(Source):
    """``kind: genome``: windows over regions, or variant-effect mode when ``windows.variants`` is set."""

    kind = "genome"

    def plan(self, job: JobSpec) -> tuple[Sequence[Shard], list[dict[str, str]]]:
        """Shards from metadata only: the contig table, then the BED/regions or the VCF positions."""
        w = _windows(job)
        contigs = self.contig_table(w.reference, job.input.storage)
        if w.variants:
            return self._plan_variants(w, contigs, job.input.storage)
        regions, failed = resolve_regions(w.regions, contigs, job.input.storage, w.max_bad_records)
        notes = [n for n in (overlap_note(regions), padding_note(regions, contigs, w.length, _stride(w)),
                             gap_note(regions, w.length, _stride(w)),
                             _source_note(w.reference, job.input.storage, contigs)) if n]
        plan = WindowPlan(regions, w.length, _stride(w), w.windows_per_shard)
        storage = job.input.storage
        facts = {**reference_facts(contigs), "planned_identity": planned_identity(w.reference, storage, contigs)}
        if contigs.format == "zarr":
            facts["reference_identity"] = reference_identity(w.reference, storage, contigs)
        return WindowShards(plan, w.reference, notes, facts), failed

    @staticmethod
    def contig_table(uri: str, storage: dict[str, Any]) -> ContigTable:
        """The reference's contigs, its index checked against it; a problem is a spec error."""
        try:
            return load_contigs(uri, storage)
        except InputError as exc:
            raise SpecError([("windows.reference", f"{exc.input_uri}: {exc.message}")]) from None

    @staticmethod
    def _plan_variants(w: WindowsSpec, contigs: ContigTable,
                       storage: dict[str, Any]) -> tuple[Sequence[Shard], list[dict[str, str]]]:
        """One shard per ``windows_per_shard`` variants, after the plan-time REF check; a file
        with none to score is a failed input."""
        assert w.variants is not None
        name = os.path.basename(w.variants.rstrip("/"))
        # ten seconds a million variants here: a file of tens of millions ran minutes with no line
        with phase(f"planning: reading the variants of {redact(name)}", unit="record") as said:
            table = read_variants(w.variants, contigs, storage, w.max_bad_records, progress=said,
                                  max_allele=max_allele_bases(w.chunk_bases, w.length))
            table.notes += window_notes(table, contigs, w.length, name)
            if not len(table):
                return [], [*table.failed, {"input": w.variants, "error": "no scorable variants: " + _skip_text(table)}]
            said.step("planning: checking each variant's REF against the reference", len(table), "variant")
            reference = open_reference(w.reference, storage, fmt=contigs.format)
            try:
                match = check_refs(table, reference, w.chunk_bases, progress=said)
            finally:
                reference.close()
        refuse_ref_mismatches(table, match, w.reference, w.max_ref_mismatch)
        source_note = _source_note(w.reference, storage, contigs)
        counts = {**table.counts, "ref_mismatches": int((~match).sum()), "layout": table.layout,
                  "notes": [*table.notes, *([source_note] if source_note else [])]}
        facts = {**reference_facts(contigs), "reference_identity": reference_identity(w.reference, storage, contigs)}
        shards = VariantShards(table, w.variants, w.windows_per_shard, {"plan_counts": counts, **facts})
        return shards, table.failed

    def data_quality(self, job: JobSpec, shards: Sequence[Shard],
                     results: Iterable[ShardResult]) -> dict[str, Any]:
        """Variant mode: what the plan read and skipped, and the REF mismatches among scored rows
        (the sum of the shards' zarr ``ref_mismatches`` attributes, so the two always agree)."""
        w = _windows(job)
        if isinstance(shards, WindowShards):
            return {"notes": list(shards.notes)} if shards.notes else {}
        if not w.variants or not shards:
            return {}
        plan = shards[0].payload.get("plan_counts") or {}
        scored = mismatches = 0
        for r in results:
            if r.ok:
                scored += r.items
                mismatches += int(r.attrs.get("ref_mismatches", 0))
        return {"variants": {
            "file": w.variants, "layout": plan.get("layout", "vcf"), "records": plan.get("records", 0),
            "scorable": plan.get("variants", 0), "scored": scored,
            "skipped": {k: int((plan.get("skipped") or {}).get(k, 0)) for k in SKIP_REASONS},
            "ref_mismatches": mismatches, "ref_mismatch_share": mismatches / scored if scored else 0.0,
            "ref_mismatches_planned": plan.get("ref_mismatches", 0), "max_ref_mismatch": w.max_ref_mismatch,
            "info_dropped": plan.get("info_dropped", 0),
        }, "notes": list(plan.get("notes") or [])}

    def open(self, shard: Shard, job: JobSpec, clocks: StageClocks) -> ShardReader:
        """Open the reference on this worker and build the shard's reader: as the form the plan
        found and, where this process read the planned index already, with that index (no
        request for either); a shard planned without them (an older plan) asks as before."""
        w = _windows(job)
        p = shard.payload
        reference = open_reference(w.reference, job.input.storage, clocks, p.get("reference_format"),
                                   p.get("index_version"), _held_identity(shard, job.input.storage))
        cls = VariantReader if shard.payload.get("mode") == "variants" else GenomeWindowReader
        try:
            refuse_another_index(shard, reference)
            return cls(shard, job, reference, clocks)
        except BaseException:
            reference.close()
            raise

    def open_finds_identity(self, job: JobSpec, shard: Shard) -> bool:
        """A windows shard over a remote FASTA whose reads are pinned to the planned ETag: that
        version is its start identity (its reader's ``input_identity``), no HEAD beside the open.
        Where they cannot be pinned (fsspec, a weak ETag) the worker asks beside the open."""
        return not shard.payload.get("reference_identity") and _held_identity(shard, job.input.storage) is not None

    def model_input(self, job: JobSpec, batch_size: int) -> tuple[tuple[int, ...], str]:
        """Variant pairs run refs and alts together, and strand averaging both strands."""
        w = _windows(job)
        rows = batch_size * (2 if w.variants else 1) * (2 if w.reverse_complement == "average" else 1)
        item = (w.length, 4) if w.encoding.layout == "NLC" else (4, w.length)
        return (rows, *item), w.encoding.dtype

    def read_unit_bytes(self, job: JobSpec) -> tuple[int, tuple[str, ...]]:
        """One read of at most max(chunk_bases, length) bases (a run of windows no longer than a
        shard's) and the windows cut from it, a ref and an alt for each variant (``group_reads``)."""
        w = _windows(job)
        per_read = min(w.windows_per_shard, max(1, w.chunk_bases // w.length))
        read = max(w.chunk_bases, w.length)
        if not w.variants:
            read = min(read, (per_read - 1) * _stride(w) + w.length)
        return read + per_read * w.length * (2 if w.variants else 1), ("windows.chunk_bases",)

    def index_schema(self, job: JobSpec) -> list[str]:
        return list(index_columns(job))
