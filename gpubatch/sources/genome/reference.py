"""Reference genome access: contig tables for planning, padded range reads for workers.

Three on-disk forms are read, all through fsspec so that local paths and object-store URLs behave
the same:

* a genome zarr written by ``gpubatch ingest genome`` (uint8 code arrays: an array per large
  contig, small ones packed into one, :func:`contig_locations`; the fastest form, and the only
  one that compresses well and reads in parallel over object storage);
* a plain FASTA with its ``.fai`` index (line geometry from the index turns a base range into one
  byte-range request);
* a bgzip FASTA with ``.fai`` and ``.gzi`` (the ``.gzi`` maps uncompressed offsets to BGZF blocks,
  so one range request fetches only the blocks that hold the bases).

Planning needs only the contig table (``.fai`` or zarr attributes), never sequence. Reads return
uint8 codes (A=0 C=1 G=2 T=3, anything else 4) and are padded with N (code 4) wherever the range
runs outside the contig, which is how windows past a contig end are defined.
"""

from __future__ import annotations

import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from gpubatch.core.errors import InputChanged, InputError
from gpubatch.io.redact import excerpt, redact
from gpubatch.io.storage import exists, input_changed, input_identity, open_ranges
from gpubatch.io.uris import child, is_remote, local_path
from gpubatch.io.zarr_groups import open_zarr_group
from gpubatch.ops.kernels import encode_dna
from gpubatch.sources.genome.fai import FaiTable
from gpubatch.sources.genome.indexes import (
    LOCAL_CHECKED,
    REMOTE_CHECKED,
    ParsedIndex,
    check_contig_start,
    check_fai,
    check_gzi,
    keep_index,
    read_bgzf_range,
    read_index,
    read_parsed,
    uncompressed_size,
)
from gpubatch.sources.genome.kept import KeptByVersion

if TYPE_CHECKING:
    from gpubatch.core.clocks import StageClocks

#: root attribute key of a genome zarr written by ``gpubatch ingest genome``
GENOME_ATTR = "gpubatch_genome"
#: the genome zarr layout ingest writes (2: small contigs packed into one array), and those read
#: (1: an array per contig, as every genome ingested before version 2 is)
LAYOUT_VERSION = 2
READ_LAYOUT_VERSIONS = (1, 2)
#: the packed array's key: no contig's own key starts with '__' (zarr_array_name)
PACKED_ARRAY = "__packed__"
N_CODE = 4
#: a genome zarr's fill value (no base's code): a chunk missing from the store (a partial copy)
#: reads as it and is refused, where a fill value of N read a lost chunk as a run of N, unsaid.
#: It also keeps all-N chunks (a centromere) written, so that a missing chunk is never expected
MISSING_CODE = 255
#: bytes read from the reference's start to tell its form (bgzip, gzip, FASTA text, or none)
HEAD_BYTES = 64
MAX_LISTED_CONTIGS = 20
_BGZF_MAGIC = b"\x1f\x8b\x08\x04"


@dataclass(frozen=True)
class ContigTable:
    """Contig names and lengths in reference order; what planning needs and nothing more."""

    names: tuple[str, ...]
    lengths: tuple[int, ...]
    #: the .fai/.gzi version the table was read from (``fai V; gzi V``), None where unknown or a
    #: zarr: the plan hands it to its shards, whose workers refuse another index (InputChanged)
    index_version: str | None = None
    #: the reference's form as the plan found it ('zarr', 'bgzip', 'fasta'; None where not said):
    #: the plan hands it to its shards, whose workers then open the reference without probing it
    format: str | None = None
    #: the FASTA's ETag the index was checked against, where those reads were pinned to one
    #: (obstore): the plan's record of the FASTA must be that version (planned_identity), or its
    #: shards would read another FASTA than the one their index fits
    checked_version: str | None = None

    #: name -> row in ``names``: made here, or shared with the index it was read from
    #: (:meth:`of_index`), so a worker's shards of a 50,000-contig FASTA build no dict each
    rows: dict[str, int] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.names) != len(self.lengths):
            raise ValueError(f"{len(self.names)} contig names for {len(self.lengths)} lengths")
        if self.rows is None:
            object.__setattr__(self, "rows", {name: row for row, name in enumerate(self.names)})

    @classmethod
    def of_index(cls, fai: FaiTable, index_version: str | None = None, format: str | None = None,
                 checked_version: str | None = None) -> ContigTable:
        """The contig table of a parsed .fai, sharing its names and name -> row lookup."""
        return cls(fai.names, tuple(fai.lengths.tolist()), index_version, format, checked_version, fai.rows)

    def __contains__(self, name: object) -> bool:
        return name in self.rows  # type: ignore[operator]

    def length(self, name: str) -> int:
        return int(self.lengths[self.rows[name]])  # type: ignore[index]

    def listing(self) -> str:
        """The first contig names, for error messages that must say what *is* there."""
        shown = ", ".join(self.names[:MAX_LISTED_CONTIGS])
        more = len(self.names) - MAX_LISTED_CONTIGS
        return f"{shown}, ... ({len(self.names)} contigs)" if more > 0 else shown

    def alias(self, name: str) -> str | None:
        """The reference's own name for ``name`` where the two follow different naming
        conventions: UCSC's 'chr1'/'chrM' against Ensembl's and NCBI's '1'/'MT', and 'Chr1' as
        some plant genomes write it. None where no contig answers to it."""
        if not hasattr(self, "_aliases"):
            table: dict[str, str] = {}
            for own in self.names:
                table.setdefault(_naming_key(own), own)
            object.__setattr__(self, "_aliases", table)
        found: str | None = self._aliases.get(_naming_key(name))  # type: ignore[attr-defined]
        return found if found != name else None

    def missing_message(self, name: str) -> str:
        """Why ``name`` is not usable, with a hint naming both conventions where the reference
        has the contig under its other name."""
        hint = ""
        alt = self.alias(name)
        if alt is not None:
            hint = f" (the reference has '{alt}': {naming_difference(name, alt)})"
        return f"contig {excerpt(name)} is not in the reference{hint}; reference contigs: {self.listing()}"


def _naming_key(name: str) -> str:
    """A contig name with the conventions' differences taken out: no 'chr' prefix, any case,
    and the mitochondrion's M and MT the same."""
    key = name.lower().removeprefix("chr")
    return "m" if key == "mt" else key


def naming_difference(name: str, alt: str) -> str:
    """How two names of one contig differ, in words: the 'chr' prefix, or M against MT."""
    if name.lower().removeprefix("chr") == alt.lower().removeprefix("chr"):
        return "the files disagree on the 'chr' prefix"
    return (f"the files follow different naming conventions, '{name}' against '{alt}' "
            "(UCSC's chrM, Ensembl's and NCBI's MT)")


def reference_format(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """'zarr', 'bgzip' or 'fasta', decided from the store marker or the file's first bytes.

    Asked by the plan, once; a worker takes the plan's answer from its shard (``reference_format``
    in the payload) and asks only where a shard has none (one planned before it was carried).
    A missing file is said by the read's own answer, not by a HEAD before it."""
    if exists(zarr_marker(uri), storage_options):
        return "zarr"
    if not is_remote(uri) and os.path.isdir(local_path(uri)):
        raise InputError(uri, "a folder, but not a genome zarr (no zarr.json in it); give a FASTA "
                              "with its .fai, or a genome zarr from `gpubatch ingest genome`")
    try:
        with open_ranges(uri, storage_options) as reader:
            size = reader.size()
            head = bytes(reader.fetch(0, min(size, HEAD_BYTES))) if size else b""
    except InputError as exc:
        if exc.message.startswith(("object not found", "file not found")):
            raise InputError(uri, "reference not found: check windows.reference (a FASTA with its "
                                  ".fai, or a genome zarr from `gpubatch ingest genome`)") from None
        raise
    if not head.strip():
        raise InputError(uri, f"the reference is empty ({size} bytes{', blank' if size else ''}): "
                              "a FASTA starts with a '>NAME' header line")
    if head[:2] == b"\x1f\x8b":
        if head[:4] != _BGZF_MAGIC:
            raise InputError(uri, "reference is gzip but not bgzip, so it cannot be read by range; "
                                  f"recompress it with `bgzip` then `samtools faidx`, or convert it "
                                  f"with `gpubatch ingest genome {uri} OUT.zarr`")
        return "bgzip"
    if not head.lstrip().startswith(b">"):
        raise InputError(uri, f"not a FASTA: it starts with {head[:40]!r}, where a FASTA starts with a "
                              "'>NAME' header line; windows.reference names the FASTA itself (not its "
                              ".fai or .gzi), or a genome zarr from `gpubatch ingest genome`")
    return "fasta"


_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,200}$")
#: keys a contig's own name cannot take: the fallback keys' own form (``c<index>``), and the
#: group's metadata file (an array there would overwrite it)
_TAKEN = re.compile(r"^c[0-9]+$|^zarr\.json$", re.IGNORECASE)


def zarr_array_name(contig: str, index: int) -> str:
    """The array key of a contig in a genome zarr: its own name when safe as a key, else c<index>.

    The keys of one genome never collide: a name of the fallback form, or zarr's metadata file's
    name, takes the fallback too (contigs ``seq|2`` then ``c0`` both asked for ``c0``)."""
    own = _SAFE_NAME.match(contig) and not contig.startswith("__") and not _TAKEN.match(contig)
    return contig if own else f"c{index}"


def open_genome_group(uri: str, storage_options: dict[str, Any] | None, mode: str = "r") -> Any:
    """zarr.open_group for local paths and fsspec URLs alike (FsspecStore for the latter)."""
    return open_zarr_group(uri, storage_options, mode=mode)


def _zarr_meta(uri: str, storage_options: dict[str, Any] | None) -> tuple[Any, dict[str, Any]]:
    group = open_genome_group(uri, storage_options)
    meta = group.attrs.asdict().get(GENOME_ATTR)
    if not isinstance(meta, dict) or not meta.get("complete"):
        raise InputError(uri, "this zarr is not a complete genome store from `gpubatch ingest genome` "
                              f"(no '{GENOME_ATTR}' root attribute; was the ingest interrupted?)")
    if meta.get("version", 1) not in READ_LAYOUT_VERSIONS:
        raise InputError(uri, f"the genome store is in layout version {meta.get('version')!r}, written by a "
                              f"newer gpubatch; this one reads versions {READ_LAYOUT_VERSIONS[0]} to "
                              f"{READ_LAYOUT_VERSIONS[-1]}: upgrade gpubatch, or ingest the FASTA again with this one")
    return group, meta


def contig_locations(meta: dict[str, Any]) -> dict[str, tuple[str, int]]:
    """Each contig's place in a genome zarr: (array key, offset of its first base there). The
    one place readers resolve a contig, whatever the layout version: 1 an array per contig
    (offset 0); 2 small contigs in the packed array at their offsets, others an array each."""
    names = meta["contigs"]
    if meta.get("version", 1) == 1:
        return {name: (key, 0) for name, key in zip(names, meta["arrays"], strict=True)}
    layout = meta["layout"]
    packed, own = layout["packed"], layout["arrays"]
    return {name: (own[name], 0) if offset is None else (packed, int(offset))
            for name, offset in zip(names, layout["offsets"], strict=True)}


@dataclass(frozen=True)
class ZarrGenome:
    """What a genome zarr's root attribute says, parsed: read once per process and version
    (:func:`read_genome`), shared by the plan and every reader of that version."""

    contigs: ContigTable
    #: each contig's (array key, offset): :func:`contig_locations`
    locations: dict[str, tuple[str, int]]
    #: the FASTA it was ingested from, and that FASTA's identity then (changed_source_note)
    source: str | None
    source_identity: dict[str, Any] | None


#: contig tables a process keeps (the latest few genome versions): a draft assembly's is ~11 MB
#: of JSON at 200,000 contigs, which each shard's start read again (a GET and a parse)
KEPT_GENOMES = 2
_genomes: KeptByVersion[ZarrGenome] = KeptByVersion(KEPT_GENOMES)


def read_genome(uri: str, storage_options: dict[str, Any] | None = None,
                planned: dict[str, Any] | None = None) -> ZarrGenome:
    """A genome zarr's contig table, read where this process has not read that version yet.

    The version is ``zarr.json``'s identity (size and ETag, or size and mtime; ingest writes it
    last, and a genome ingested again over it is another): ``planned`` (a shard's
    ``reference_identity``; another now is refused, InputChanged) or, without one, asked now.
    A table read is kept only where ``zarr.json`` is the same version after the read as before
    it, so the bytes read are of that version; a zarr.json that cannot tell versions apart (no
    ETag, no mtime) is read each time."""
    marker = zarr_marker(uri)
    if planned:
        refuse_if_changed(uri, marker, planned, storage_options)
    identity = planned or input_identity(marker, storage_options)
    version = _version_key(identity)
    if version is None:
        return _parse_genome(uri, storage_options)

    def read() -> tuple[ZarrGenome, bool]:
        genome = _parse_genome(uri, storage_options)
        if planned:
            refuse_if_changed(uri, marker, planned, storage_options)
            return genome, True
        return genome, input_changed(marker, identity, storage_options) is None

    return _genomes.get_or_read((uri, version), read)


def _version_key(identity: dict[str, Any]) -> tuple[Any, ...] | None:
    """What tells two versions of a file apart (storage.identity_differs), None where nothing does."""
    if identity.get("size") is None:
        return None
    if identity.get("etag"):
        return ("etag", identity["size"], identity["etag"])
    return ("mtime", identity["size"], identity["mtime"]) if identity.get("mtime") is not None else None


def _parse_genome(uri: str, storage_options: dict[str, Any] | None) -> ZarrGenome:
    _, meta = _zarr_meta(uri, storage_options)
    contigs = ContigTable(tuple(meta["contigs"]), tuple(int(n) for n in meta["lengths"]), format="zarr")
    source, identity = meta.get("source"), meta.get("source_identity")
    return ZarrGenome(contigs, contig_locations(meta), source if isinstance(source, str) else None,
                      identity if isinstance(identity, dict) else None)


def changed_source_note(uri: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """A note where a genome zarr's FASTA has changed since it was ingested (its recorded size and
    mtime or ETag differ): the run reads the genome as ingested, which a user who fetched a new
    FASTA (a patch release, a fixed download) does not expect, and nothing else says. None where
    it has not, is gone, cannot be asked (other credentials), or the zarr predates the record."""
    try:
        genome = read_genome(uri, storage_options)  # kept from the plan's contig table: no GET
    except InputError:
        return None
    source, ingested = genome.source, genome.source_identity
    if not isinstance(source, str) or not isinstance(ingested, dict):
        return None
    try:
        now = input_changed(source, ingested, storage_options)
    except Exception:  # noqa: BLE001 - a note, never a failure: the genome is read as it is
        return None
    if now is None or now.get("size") is None:
        return None
    return (f"the genome store {redact(uri)} was ingested from {source}, which has changed since "
            f"({_version_words(ingested)} then, {_version_words(now)} now): windows are of the FASTA as "
            f"it was then; ingest it again (`gpubatch ingest genome {source} {redact(uri)} --overwrite`) "
            "to follow it")


def _version_words(identity: dict[str, Any]) -> str:
    """A file version in words: its size, and its ETag or modification time."""
    mtime = identity.get("mtime")
    when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(mtime)) if isinstance(mtime, (int, float))
            else str(mtime))
    return f"{identity.get('size'):,} bytes, " + (f"ETag {identity['etag']}" if identity.get("etag")
                                                  else f"modified {when}")


def load_contigs(uri: str, storage_options: dict[str, Any] | None = None) -> ContigTable:
    """The reference's contig table from its index or zarr attributes; reads no sequence."""
    fmt = reference_format(uri, storage_options)
    if fmt == "zarr":
        return read_genome(uri, storage_options).contigs
    index, checked = read_checked_index(uri, fmt, storage_options)
    keep_index(uri, index)  # for this process's shards, and its next plan of this reference
    return ContigTable.of_index(index.fai, index.version, fmt, checked)


def read_checked_index(uri: str, fmt: str, storage_options: dict[str, Any] | None = None,
                       ) -> tuple[ParsedIndex, str | None]:
    """The .fai (and .gzi for bgzip), checked against the FASTA with a few small reads, and the
    FASTA's ETag those reads were pinned to (None where unpinned: fsspec, no ETag).

    Run at plan time, once per job: an index that does not match its file is refused there,
    naming the contig, instead of yielding shifted or truncated windows. A local index already
    parsed by this process (its files unchanged since) is taken as kept (indexes.read_index),
    and checked again all the same; a remote one is read: its read says its version.
    """
    index = read_parsed(uri, fmt, storage_options) if is_remote(uri) else read_index(uri, fmt, storage_options)
    fai, gzi = index.fai, index.gzi
    with open_ranges(uri, storage_options) as reader:
        size = reader.size()
        def fetch_many(spans: list[tuple[int, int]]) -> list[bytes]:  # bytes, not obstore's views
            return [bytes(blob) for blob in reader.fetch_many(spans)]

        checked = REMOTE_CHECKED if is_remote(uri) else LOCAL_CHECKED
        if gzi is None:
            check_fai(uri, fai, size, fetch_many, checked)
            return index, reader.version() if is_remote(uri) else None
        check_gzi(uri, gzi, size, fetch_many)
        plain = uncompressed_size(reader, gzi)
        check_fai(uri, fai, plain, lambda spans: [read_bgzf_range(reader, gzi, a, b) for a, b in spans], checked)
        return index, reader.version() if is_remote(uri) else None


class Reference(ABC):
    """An open reference on a worker. Thread-safe: reads are stateless range requests."""

    uri: str
    format: str
    contigs: ContigTable
    #: the version of the index this reader read (ContigTable.index_version's form), None unknown
    index_version: str | None = None

    def __init__(self, clocks: StageClocks | None = None):
        self.clocks = clocks

    @abstractmethod
    def _read(self, contig: str, start: int, end: int) -> np.ndarray:
        """Codes of [start, end), a range already clipped to the contig."""

    def fetch(self, contig: str, start: int, end: int) -> np.ndarray:
        """uint8 codes of [start, end), possibly read-only; positions outside the contig (< 0 or
        >= length) are N."""
        if contig not in self.contigs:
            raise InputError(self.uri, self.contigs.missing_message(contig))
        if 0 <= start < end <= self.contigs.length(contig):
            return self._read(contig, start, end)  # the common case: no N padding, no copy
        out = np.full(max(end - start, 0), N_CODE, dtype=np.uint8)
        lo, hi = max(start, 0), min(end, self.contigs.length(contig))
        if hi > lo:
            out[lo - start : hi - start] = self._read(contig, lo, hi)
        return out

    def _count(self, nbytes: int) -> None:
        """Count a read that did not go through a range reader (zarr does its own requests)."""
        if self.clocks is not None:
            self.clocks.count("storage.requests")
            self.clocks.count("storage.bytes", nbytes)

    def _part(self, name: str) -> Any:
        from contextlib import nullcontext

        return self.clocks.part(name) if self.clocks is not None else nullcontext()

    def version(self) -> str | None:
        """The ETag every sequence read so far was of, where the reads are pinned to one (a remote
        FASTA read through obstore, If-Match); None where they are not (local files, fsspec, a
        weak or missing ETag, a zarr read by zarr's own requests): the worker then asks after."""
        return None

    def close(self) -> None:  # noqa: B027 - nothing held open by default
        """Release handles (none are held: every read is a stateless range request)."""


class FastaReference(Reference):
    """Plain or bgzip FASTA: one byte-range request per read, newlines stripped, then encoded."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None, fmt: str,
                 clocks: StageClocks | None = None, planned_index: str | None = None,
                 planned: dict[str, Any] | None = None):
        """``planned_index``: the index version the shard was planned with, under which this
        process may have kept the index already (indexes.read_index): then no request for it.
        ``planned``: the FASTA's identity as the plan found it, which every read must be of
        (:meth:`_hold_to`)."""
        super().__init__(clocks)
        self.uri, self.format = uri, fmt
        index = read_index(uri, fmt, storage_options, planned_index)
        self.fai, self.gzi, self.index_version = index.fai, index.gzi, index.version
        self.contigs = ContigTable.of_index(self.fai)
        etag, size = (planned or {}).get("etag"), (planned or {}).get("size")
        self.ranges = open_ranges(uri, storage_options, clocks, etag=etag if is_remote(uri) else None,
                                  size=int(size) if is_remote(uri) and size is not None else None)
        self._started: set[str] = set()  # contigs whose start this reader has checked
        self._planned_etag: str | None = None  # the plan's ETag, where every read is pinned to it
        if planned:
            self._hold_to(planned, storage_options)

    def _hold_to(self, planned: dict[str, Any], storage_options: dict[str, Any] | None) -> None:
        """Every read of the planned version of the FASTA: a variants shard's input is its VCF, so
        nothing else checks the reference its REF and windows come from. Remote reads pinned to
        the plan's ETag (If-Match: another version is refused by the read itself, no request
        more); where they cannot be (fsspec, no ETag) and for a local file (a stat), the file is
        compared with the plan's now. InputChanged: read again, then reported."""
        if is_remote(self.uri) and self.ranges.version() and self.ranges.version() == planned.get("etag"):
            self._planned_etag = self.ranges.version()
            return
        try:
            refuse_if_changed(self.uri, self.uri, planned, storage_options)
        except InputChanged:
            self.ranges.close()
            raise

    def _read(self, contig: str, start: int, end: int) -> np.ndarray:
        entry = self.fai[contig]
        if contig not in self._started:
            check_contig_start(self.uri, contig, entry, self._read_bytes)
            self._started.add(contig)
        b0, b1 = entry.byte(start), entry.byte(end - 1) + 1
        raw = self._read_bytes(b0, b1)
        with self._part("decode"):
            codes = encode_dna(raw, delete=b"\r\n")
        if len(codes) != end - start:
            raise InputError(self.uri, f"{contig}:{start}-{end} read {len(codes)} bases, expected "
                                       f"{end - start}: the .fai index does not match the file "
                                       f"(rebuild it with `samtools faidx`)")
        return codes

    def _read_bytes(self, b0: int, b1: int) -> bytes:
        try:
            with self._part("storage"):
                if self.gzi is None:
                    return self.ranges.fetch(b0, b1)
                return read_bgzf_range(self.ranges, self.gzi, b0, b1)
        except InputChanged as exc:
            if self._planned_etag is None:
                raise
            # pinned to the plan's version, a read refused (412) or of another ETag means the FASTA is
            # no longer the planned one, whenever it was written over: as a HEAD at the start says
            raise changed_since_planned(self.uri, f"a read of its planned ETag {self._planned_etag} found "
                                                  f"another version: {exc.detail or exc.message}") from None

    def version(self) -> str | None:
        return self.ranges.version()

    def close(self) -> None:
        self.ranges.close()


def refuse_if_changed(uri: str, version_uri: str, planned: dict[str, Any],
                      storage_options: dict[str, Any] | None) -> None:
    """InputChanged (read again, then reported) where ``version_uri`` (the FASTA, or a genome
    zarr's ``zarr.json``) is another version than the plan found: the run's other shards read
    the planned one, and windows of two versions of a reference must not sit in one output."""
    if input_changed(version_uri, planned, storage_options) is not None:
        raise changed_since_planned(uri)


def changed_since_planned(uri: str, detail: str | None = None) -> InputChanged:
    """The error of a shard that found its reference another version than the plan's (``detail``:
    how it was found, where a read found it): read again, then reported, naming --overwrite."""
    found = f" ({detail})" if detail else ""
    return InputChanged(uri, f"the reference changed since the run was planned{found}: the run's other shards "
                             "read the planned version; run the job again (--overwrite) to plan with this one")


def zarr_marker(uri: str) -> str:
    """A genome zarr's ``zarr.json``: the object whose version is the zarr's (ingest writes it);
    a URL's query kept after its path (a presigned FASTA's was cut into, and its server could
    answer the FASTA itself for the marker)."""
    return child(uri, "zarr.json")


#: a gap wider than this between consecutive windows starts a new read instead of reading through it
MAX_GAP_BASES = 1 << 16


def group_reads(chroms: list[str], starts: np.ndarray, ends: np.ndarray,
                chunk_bases: int, length: int) -> Iterator[tuple[int, int]]:
    """Split items (in output order) into runs [i, j) that one contiguous read can serve.

    Workers' window and variant readers and the client's plan-time REF check all read the
    reference this way, in runs bounded by ``chunk_bases``.

    A run ends when the contig changes, an item starts before the run's first item, the read
    would exceed max(chunk_bases, length) bases, the run holds max(1, chunk_bases // length)
    items, or a gap of more than MAX_GAP_BASES would be read through.
    """
    budget, max_items = max(chunk_bases, length), max(1, chunk_bases // length)
    starts_, ends_ = np.asarray(starts).tolist(), np.asarray(ends).tolist()  # Python ints compare 10x faster
    i, n = 0, len(starts_)
    while i < n:
        lo, hi, j = starts_[i], ends_[i], i + 1
        while j < n and j - i < max_items and chroms[j] == chroms[i] and starts_[j] >= lo \
                and max(hi, ends_[j]) - lo <= budget and starts_[j] <= hi + MAX_GAP_BASES:
            hi = max(hi, ends_[j])
            j += 1
        yield i, j
        i = j
