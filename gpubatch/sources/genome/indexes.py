"""FASTA indexes (``.fai``, ``.gzi``): parsed, then checked against the file they index.

An index that disagrees with its FASTA does not fail on its own: an offset one byte off, or one
line off, makes every window of that contig a shifted sequence, and a short length silently
truncates a contig. So an index is checked before it is trusted, cheaply: arithmetic over every
entry (positive lengths, sane line geometry, contigs in file order without overlap, the last base
inside the file), then a few small reads at sampled contigs (a newline right before the first
base, after a ``>NAME`` header line; line breaks where the geometry puts them; the contig's end
where the length puts it). A ``.gzi`` is checked the same way: monotonic block offsets inside the
compressed file, each sampled one at a BGZF block. Every problem names the contig and the fix.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpubatch.core.errors import InputError
from gpubatch.io.localized import read_small
from gpubatch.io.storage import open_ranges, version_text
from gpubatch.io.uris import has_query, is_remote, local_path, suffixed
from gpubatch.sources.genome.fai import REBUILD, FaiEntry, FaiTable, parse_fai
from gpubatch.sources.genome.kept import KeptByVersion, forget_all

#: contigs whose bytes are checked, in a local file and in one on object storage (all arithmetic
#: checks cover every contig; a contig not checked here is checked where it is first read)
LOCAL_CHECKED, REMOTE_CHECKED = 20_000, 1_024
SAMPLED_CONTIGS = 64
#: sampled contigs whose bytes are fetched (and held) at once; a remote FASTA's REMOTE_CHECKED in one call
PICKS_FETCHED = 1_024
#: bytes read before a contig's first base to find its header line
HEADER_WINDOW = 4096
#: bytes of a contig's first line (and before its last base) that its checks read at most: an
#: unwrapped FASTA's first line is its whole contig (``seqkit seq -w 0``), which the checks read
#: whole, at plan time and at a worker's first read of each contig (250 MB for chr1)
LINE_CHECKED = 1 << 16
_BGZF_MAGIC = b"\x1f\x8b\x08\x04"
TRAILING = ("its lines end in spaces or tabs after the bases, which windows read by position would "
            "take for bases: strip them (`sed -i 's/[[:blank:]]*$//' FILE`), then `samtools faidx` again")


def no_index(uri: str, ext: str) -> InputError:
    """The FASTA ``uri``'s index ``.ext`` is not where it is looked for (beside the FASTA, its
    path plus ``.ext``, a URL's query kept): that place, redacted, and the two fixes."""
    where = suffixed(uri, f".{ext}")
    make = (f"`samtools faidx {uri}`" if not is_remote(uri) else
            f"`samtools faidx` on a copy of the FASTA, then upload the index to {where}")
    return InputError(uri, f"FASTA index {where} not found; make it with {make} (bgzip files get "
                           f".fai and .gzi), or convert the FASTA once with `gpubatch ingest genome "
                           f"{uri} OUT.zarr` and use the zarr as windows.reference")


def unsigned_index(uri: str, ext: str, refusal: str) -> InputError:
    """The FASTA ``uri`` is a signed URL (presigned, a SAS token) and its index ``.ext``, asked
    at its own path with the FASTA's query, was refused (``refusal``: "access denied (403) ...").
    An S3 or GCS signature signs one object, so a URL presigned for the FASTA never reads its
    index; the user was told to sign the URL again, which changes nothing. The index needs its
    own signature, which windows.reference cannot carry: the fixes that work, the URL redacted."""
    where = suffixed(uri, f".{ext}")
    denied = refusal.split(":", 1)[0]
    return InputError(uri, f"FASTA index {where}: {denied}. A URL signed for the FASTA alone (an S3 "
                           f"or GCS presigned URL) does not sign its .{ext}, which is read at its own "
                           "path with the FASTA's query: the index needs its own signature, which "
                           "windows.reference cannot carry. Use a local copy of the FASTA with its "
                           "indexes, the object's s3://, gs:// or az:// URI with credentials in "
                           "input.storage, a token that signs the whole folder (an Azure container "
                           f"SAS), or convert the FASTA once with `gpubatch ingest genome {uri} "
                           "OUT.zarr` (it needs no index) and use the zarr as windows.reference")


#: an index's version per extension, as read: (``fai``/``gzi``) -> version or None (unknown)
Versions = dict[str, str | None]


def read_index_file(fasta: str, storage_options: dict[str, Any] | None, ext: str,
                    versions: Versions | None = None) -> bytes:
    """An index file's bytes, and (into ``versions[ext]``) the version they are of, in the form
    ``windows.reference_version`` gives it: a local file's sha256 (of these very bytes), an
    object's ETag (or size and mtime where it has none: :func:`_read_remote`), else None: what a
    worker compares with its plan's, and keeps an index read at (:func:`read_index`).

    No existence check first: the read's own answer says the file is missing, and that answer
    becomes :func:`no_index`, naming the index and how to make it.
    ``fasta``: the FASTA the index is of; the index is beside it (:func:`suffixed`)."""
    uri = suffixed(fasta, f".{ext}")
    try:
        if is_remote(uri):
            data, version = _read_remote(uri, storage_options)
        else:
            with open_ranges(uri, storage_options) as reader:
                data = reader.fetch(0, reader.size())
            version = f"sha256:{hashlib.sha256(data).hexdigest()}"
    except InputError as exc:
        if _missing(exc):
            raise no_index(fasta, ext) from None
        if exc.message.startswith("access denied") and has_query(fasta):
            raise unsigned_index(fasta, ext, exc.message) from None
        raise
    if versions is not None:
        versions[ext] = version
    return data


def _read_remote(uri: str, storage_options: dict[str, Any] | None) -> tuple[bytes, str | None]:
    """A remote index's bytes and the version they are of (io.localized.read_small): the one
    this run's result fields asked (no HEAD of the plan's own; obstore pins its GET to it, fsspec
    asks again after its read), else, through obstore, the version its one GET's answer says
    (a worker: no HEAD at all). A .fai written over mid-run (a new FASTA's, uploaded before that
    FASTA) then fails the read (InputChanged: read again) instead of cutting the planned FASTA's
    windows by another index. None only where nothing tells versions apart."""
    data, version = read_small(uri, storage_options)
    if not version or not (version.get("etag") or version.get("mtime")):
        return data, None
    return data, version_text(version)


def _missing(exc: InputError) -> bool:
    """Whether a read failed for want of the file (storage's 404, a local file not found)."""
    return exc.message.startswith(("object not found", "file not found"))


def index_version(versions: Versions) -> str | None:
    """``fai V; gzi V`` (the .fai/.gzi parts of ``windows.reference_version``), or None when
    any part is unknown: then there is nothing the plan and a worker could compare."""
    if not versions or any(v is None for v in versions.values()):
        return None
    return "; ".join(f"{ext} {v}" for ext, v in versions.items())


def read_fai(uri: str, storage_options: dict[str, Any] | None = None,
             versions: Versions | None = None) -> FaiTable:
    """Parse the ``.fai`` beside ``uri``; a missing index says how to make one, a malformed line which it is.
    ``versions``: where the version read is recorded (:func:`read_index_file`)."""
    text = read_index_file(uri, storage_options, "fai", versions).decode(errors="replace")
    return parse_fai(text, suffixed(uri, ".fai"))


def read_gzi(uri: str, storage_options: dict[str, Any] | None = None,
             versions: Versions | None = None) -> tuple[list[int], list[int]]:
    """Parse a ``.gzi``: (compressed offsets, uncompressed offsets) of BGZF block starts."""
    gzi_uri = suffixed(uri, ".gzi")
    raw = read_index_file(uri, storage_options, "gzi", versions)
    if len(raw) < 8:
        raise InputError(gzi_uri, f"too short to be a .gzi ({len(raw)} bytes); {REBUILD}")
    (count,) = struct.unpack_from("<Q", raw, 0)
    if len(raw) != 8 + 16 * count:
        raise InputError(gzi_uri, f"says {count} blocks but holds {(len(raw) - 8) / 16:g}; {REBUILD}")
    pairs = np.frombuffer(raw, dtype="<u8", count=2 * count, offset=8).reshape(-1, 2)
    coffs, uoffs = [0], [0]
    for c, u in pairs.tolist():
        if u != uoffs[-1]:
            coffs.append(int(c))
            uoffs.append(int(u))
    return coffs, uoffs


Gzi = tuple[list[int], list[int]]


#: a local index's files as stat says they are: (size, mtime_ns) of the .fai (and .gzi)
Stamp = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ParsedIndex:
    """A reference's .fai (and .gzi for bgzip) as parsed, and the version they were read at."""

    fai: FaiTable
    gzi: Gzi | None
    #: :func:`index_version`'s form; None where unknown (an fsspec read)
    version: str | None
    #: a local index's files as they were for the whole read (the same before and after it),
    #: the key it is kept under; None for a remote one, or one written over while it was read
    stamp: Stamp | None = None


#: parsed indexes a process keeps, the most recently used last: a few references at once (one
#: run reads one; a process that serves several runs or jobs keeps the latest few)
CACHED_INDEXES = 4
_indexes: KeptByVersion[ParsedIndex] = KeptByVersion(CACHED_INDEXES)


def read_index(uri: str, fmt: str, storage_options: dict[str, Any] | None = None,
               planned: str | None = None) -> ParsedIndex:
    """The .fai (and .gzi) of the FASTA ``uri`` for a worker's shard planned with index version
    ``planned``: read, or where this process has already read that very version, taken from
    memory without a request or a parse (shards opening at once wait for the one read, not each
    make their own: a .fai of 50,000 contigs took each shard's open ~0.1 s and 13 MB).

    Why it is sound: a remote index is kept under the version it was read at, and handed out only
    to a shard planned with that version, so the shard reads by the offsets its windows were cut
    with (a .fai written over since is refused by the shard that reads it, never taken from
    here). A local one is kept under its files' size and mtime_ns (:func:`_local_stamp`): a file
    written since has another, and is read again, whose sha256 the shard then compares with its
    plan's (a rewrite of the same size that also sets the old mtime back is not seen). Not kept:
    an unknown remote version (fsspec reads; nothing tells it from another)."""
    if not is_remote(uri):
        stamp = _local_stamp(uri, fmt)
        if stamp is None:  # not there: the read says so, naming the fix
            return read_parsed(uri, fmt, storage_options)

        def read_local() -> tuple[ParsedIndex, bool]:
            index = read_parsed(uri, fmt, storage_options)
            return index, index.stamp == stamp

        return _indexes.get_or_read(("local", uri, stamp), read_local)
    if not planned:
        return read_parsed(uri, fmt, storage_options)

    def read() -> tuple[ParsedIndex, bool]:
        index = read_parsed(uri, fmt, storage_options)
        return index, index.version == planned

    return _indexes.get_or_read((uri, planned), read)


def keep_index(uri: str, index: ParsedIndex) -> None:
    """Keep the plan's read of a reference's index (a remote one's version known, a local one's
    files unchanged while read) for this process's shards (:func:`read_index`): an inline run's,
    and a client's that plans again (validate, then run), read it once."""
    if index.version and is_remote(uri):
        _indexes.get_or_read((uri, index.version), lambda: (index, True))
    elif index.stamp and not is_remote(uri):
        _indexes.get_or_read(("local", uri, index.stamp), lambda: (index, True))


def _local_stamp(uri: str, fmt: str) -> Stamp | None:
    """(size, mtime_ns) of the local FASTA ``uri``'s .fai (and .gzi for bgzip); None where one
    cannot be stat'ed (missing: its read says so)."""
    try:
        stats = [os.stat(local_path(suffixed(uri, f".{ext}"))) for ext in _index_exts(fmt)]
    except (OSError, ValueError):
        return None
    return tuple((st.st_size, st.st_mtime_ns) for st in stats)


def _index_exts(fmt: str) -> tuple[str, ...]:
    return ("fai", "gzi") if fmt == "bgzip" else ("fai",)


def read_parsed(uri: str, fmt: str, storage_options: dict[str, Any] | None) -> ParsedIndex:
    """The index read and parsed; a local one stamped where its files did not change meanwhile."""
    before = None if is_remote(uri) else _local_stamp(uri, fmt)
    versions: Versions = {}
    fai = read_fai(uri, storage_options, versions)
    gzi = read_gzi(uri, storage_options, versions) if fmt == "bgzip" else None
    stamp = before if before is not None and _local_stamp(uri, fmt) == before else None
    return ParsedIndex(fai, gzi, index_version(versions), stamp)


def forget_indexes() -> None:
    """Drop every kept index, and every genome zarr's kept contig table (tests; a process that
    must read its references again, as a fresh worker does)."""
    forget_all()


def check_gzi(uri: str, gzi: tuple[list[int], list[int]], compressed_size: int,
              fetch: Callable[[list[tuple[int, int]]], list[bytes]]) -> None:
    """Block offsets rise in both files, lie inside the compressed file and land on BGZF blocks."""
    coffs, uoffs = gzi
    gzi_uri = suffixed(uri, ".gzi")
    for i in range(1, len(coffs)):
        if coffs[i] <= coffs[i - 1] or uoffs[i] <= uoffs[i - 1] or coffs[i] >= compressed_size:
            raise InputError(gzi_uri, f"block {i} (compressed offset {coffs[i]}, uncompressed "
                                      f"{uoffs[i]}) is out of order or past the end of the "
                                      f"{compressed_size}-byte file; {REBUILD}")
    picks = _sample(len(coffs), SAMPLED_CONTIGS)
    heads = fetch([(coffs[i], coffs[i] + 4) for i in picks])
    for i, head in zip(picks, heads, strict=True):
        if head != _BGZF_MAGIC:
            raise InputError(gzi_uri, f"block {i} at compressed offset {coffs[i]} is not the start of "
                                      f"a BGZF block; {REBUILD}")


def check_fai(uri: str, fai: FaiTable, size: int,
              fetch: Callable[[list[tuple[int, int]]], list[bytes]], checked: int = SAMPLED_CONTIGS) -> None:
    """Check every entry's arithmetic, then ``checked`` contigs' bytes (spread over the file,
    the first and last among them), against the FASTA.

    ``size`` is the uncompressed file's size; ``fetch`` reads uncompressed byte spans. Where two
    checked contigs follow each other, no sequence may lie between the first's last base and the
    second's header line (nor after the last contig): samtools keeps only the first of two
    contigs with one name, and the second would otherwise be left out of the run without a word.
    """
    order = _InFileOrder(fai)
    _check_arithmetic(uri, fai, order.rows, size)
    picks = _sample(len(order), checked)
    last = order[-1][1]
    tail = (last.last_byte + 1, min(size, last.last_byte + 1 + HEADER_WINDOW))
    after_last = b""
    for c in range(0, len(picks), PICKS_FETCHED):
        chunk = picks[c : c + PICKS_FETCHED]
        more = [tail] if c + PICKS_FETCHED >= len(picks) and tail[1] > tail[0] else []
        after_last = _check_picks(uri, order, chunk, picks[c - 1] if c else None, size, fetch, more)
    if _holds_bases(after_last) or size - last.last_byte - 1 > HEADER_WINDOW:
        raise InputError(uri, f"the FASTA goes on after '{order[-1][0]}', its last contig in the .fai: "
                              f"{UNLISTED}")


class _InFileOrder:
    """A .fai's contigs by offset, as (name, FaiEntry) made when asked: the checks look at a
    sample of them, not at an object per contig."""

    def __init__(self, fai: FaiTable):
        self.fai = fai
        self.rows = np.argsort(fai.columns[:, 1], kind="stable")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[str, FaiEntry]:
        row = int(self.rows[i])
        return self.fai.names[row], self.fai.entry(row)


def _check_arithmetic(uri: str, fai: FaiTable, rows: np.ndarray, size: int) -> None:
    """Every contig's line geometry and length inside the file, and no two overlapping (each
    starts after the last base before it and its own header line), over the columns at once;
    the first contig in file order that fails is named, as :func:`_check_geometry` says."""
    length, offset, line_bases, line_width = (fai.columns[rows, k] for k in range(4))
    whole = np.maximum(line_bases, 1)
    last = offset + ((length - 1) // whole) * line_width + (length - 1) % whole
    bad = ((length < 1) | (offset < 1) | (line_bases < 1) | ~np.isin(line_width - line_bases, (1, 2))
           | (last >= size))
    header = np.fromiter((len(fai.names[r].encode()) + 2 for r in rows.tolist()), np.int64, len(rows))
    end_prev = np.concatenate(([-1], last[:-1]))
    hit = np.flatnonzero(bad | (offset < end_prev + 1 + header))
    if not len(hit):
        return
    i = int(hit[0])
    name, prev = fai.names[rows[i]], fai.names[rows[i - 1]] if i else ""
    _check_geometry(uri, name, fai.entry(int(rows[i])), size)  # raises where the geometry is wrong
    raise InputError(uri, f"contigs '{prev}' and '{name}' overlap in the .fai ('{prev}' ends at "
                          f"byte {end_prev[i]}, '{name}' starts at byte {offset[i]} after its "
                          f"header): an offset or a length is wrong; {REBUILD}")


def _check_picks(uri: str, order: _InFileOrder, picks: list[int], before: int | None, size: int,
                 fetch: Callable[[list[tuple[int, int]]], list[bytes]], more: list[tuple[int, int]]) -> bytes:
    """``check_fai``'s byte checks for some sampled contigs (``before``: the pick ahead of them),
    fetched together with the spans ``more``; returns those spans' bytes joined. PICKS_FETCHED at
    a time: a 4 kB header window each, all 20,000 of a local FASTA's at once held 90 MB."""
    spans: list[tuple[int, int]] = []
    for i in picks:
        e = order[i][1]
        start, after_first_line = _start_spans(e, size)
        spans += [start, after_first_line or (start[0], start[0]),
                  (max(0, e.last_byte - min(e.line_width, LINE_CHECKED)), min(size, e.last_byte + 4))]
    wanted = [span for span in spans + more if span[1] > span[0]]
    got = dict(zip(wanted, fetch(wanted), strict=True))
    for k, i in enumerate(picks):
        name, e = order[i]
        (head_lo, _), line_end, (end_lo, _) = spans[3 * k : 3 * k + 3]
        head = got[spans[3 * k]]
        header_at = _check_start(uri, name, e, head, head_lo, got.get(line_end, b""))
        _check_end(uri, name, e, got[spans[3 * k + 2]], end_lo)
        if (picks[k - 1] if k else before) == i - 1:
            _check_between(uri, order[i - 1], name, head, head_lo, header_at)
    return b"".join(got[span] for span in more)


UNLISTED = (f"a contig the .fai does not list (two contigs with one name? samtools keeps only the "
            f"first: rename the other); {REBUILD}")


def _holds_bases(text: bytes) -> bool:
    """Whether ``text`` (what lies between two indexed contigs) has a line of sequence: blank lines
    and the header of an empty contig (which samtools leaves out of the .fai) hold none."""
    return any(line.strip() and not line.startswith(b">") for line in text.split(b"\n"))


def _check_between(uri: str, before: tuple[str, FaiEntry], name: str, blob: bytes, lo: int,
                   header_at: int | None) -> None:
    """No sequence between ``before``'s last base and the header line of ``name``."""
    gap_start = before[1].last_byte + 1
    if header_at is None:  # a header longer than the window: its start was not seen
        return
    if gap_start < lo or _holds_bases(blob[gap_start - lo : header_at - lo]):
        raise InputError(uri, f"between contigs '{before[0]}' and '{name}' the FASTA holds "
                              f"{UNLISTED}")


def check_contig_start(uri: str, name: str, e: FaiEntry, read: Callable[[int, int], bytes]) -> None:
    """One contig's start checked where it is first read: the header line before its offset, its
    first line's break. For a contig the plan's check did not reach (a file with more contigs
    than it checks), and for a file that changed since: a wrong offset would shift every window."""
    head, line_end = _start_spans(e, e.last_byte + 1)
    _check_start(uri, name, e, read(*head), head[0], read(*line_end) if line_end else b"")


def _start_spans(e: FaiEntry, size: int) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """What a contig's start check reads, up to byte ``size``: its header window and its first
    line with the line break after it; of a first line longer than ``LINE_CHECKED`` (an unwrapped
    contig), its first ``LINE_CHECKED`` bytes and, apart, the break after it where there is one
    (a contig longer than its first line), so the check reads kB, not the contig."""
    lo = max(0, e.offset - HEADER_WINDOW)
    if e.line_width < LINE_CHECKED:
        return (lo, min(size, e.offset + e.line_width + 1)), None
    line_end = (e.offset + e.line_bases, min(size, e.offset + e.line_width))
    return (lo, min(size, e.offset + LINE_CHECKED)), line_end if e.length > e.line_bases else None


def _check_geometry(uri: str, name: str, e: FaiEntry, size: int) -> None:
    problem = None
    if e.length < 1:
        problem = f"length {e.length} (must be at least 1)"
    elif e.offset < 1:
        problem = f"offset {e.offset} (the first base follows a '>' header line)"
    elif e.line_bases < 1 or e.line_width - e.line_bases not in (1, 2):
        problem = (f"line geometry {e.line_bases} bases in {e.line_width} bytes per line (a line "
                   "holds its bases and one newline, or CR LF)")
    elif e.last_byte >= size:
        problem = f"length {e.length} puts its last base at byte {e.last_byte}, past the file's {size} bytes"
    if problem:
        raise InputError(uri, f"contig '{name}': the .fai gives {problem}; {REBUILD}")


def _check_start(uri: str, name: str, e: FaiEntry, blob: bytes, lo: int, line_end: bytes = b"") -> int | None:
    """A newline right before the first base, closing the line ``>NAME ...``; a full first line
    (as much of it as ``blob`` holds; the break after it in ``blob``, else in ``line_end``).
    Returns where the header line starts, or None when it starts before ``blob``."""
    at = e.offset - lo
    fail = f"contig '{name}': the .fai offset {e.offset} is not where its sequence starts"
    if at < 1 or blob[at - 1 : at] != b"\n":
        raise InputError(uri, f"{fail} (the byte before it is not the end of a header line); {REBUILD}")
    start = blob.rfind(b"\n", 0, at - 1) + 1
    seen = start > 0 or lo == 0
    if seen:
        line = blob[start : at - 1].rstrip(b"\r")
        if not line.startswith(b">") or line[1:].split(maxsplit=1)[:1] != [name.encode()]:
            raise InputError(uri, f"{fail} (the line before it is not '>{name}'); {REBUILD}")
    first = blob[at : at + min(e.line_bases, e.length)]
    if b"\n" in first or b">" in first:
        raise InputError(uri, f"contig '{name}': its first line is shorter than the .fai's "
                              f"{e.line_bases} bases per line; {REBUILD}")
    line_end = line_end or blob[at + e.line_bases : at + e.line_width]
    if e.length > e.line_bases and line_end.rstrip(b"\r\n"):
        if not line_end.strip():
            raise InputError(uri, f"contig '{name}': {TRAILING}")
        raise InputError(uri, f"contig '{name}': no line break after {e.line_bases} bases, where the "
                              f".fai puts one; {REBUILD}")
    return lo + start if seen else None


def _check_end(uri: str, name: str, e: FaiEntry, blob: bytes, lo: int) -> None:
    """The last base is a base, followed by a line end and then the next header (or nothing)."""
    at = e.last_byte - lo
    last, after = blob[at : at + 1], blob[at + 1 :]
    rest = after.lstrip(b"\r\n")
    short = after[:1] not in (b"\n", b"\r", b"") or rest[:1] not in (b">", b"")
    if short and after[:1] in (b" ", b"\t"):
        raise InputError(uri, f"contig '{name}': {TRAILING}")
    if last in (b"\n", b"\r", b">", b"") or short:
        raise InputError(uri, f"contig '{name}': the .fai length {e.length} does not end where the "
                              f"sequence ends (the contig is longer or shorter); {REBUILD}")


def _sample(n: int, k: int) -> list[int]:
    """Up to ``k`` indexes of ``n``, evenly spread, always the first and the last."""
    if n <= k:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist()))


def read_bgzf_range(reader: Any, gzi: tuple[list[int], list[int]], b0: int, b1: int) -> bytes:
    """Uncompressed bytes [b0, b1) of a bgzip file: one range read of the blocks that hold them."""
    coffs, uoffs = gzi
    first = bisect.bisect_right(uoffs, b0) - 1
    last = bisect.bisect_left(uoffs, b1)  # first block starting at or after b1
    c_end = coffs[last] if last < len(coffs) else reader.size()
    plain = inflate_bgzf(reader.fetch(coffs[first], c_end))
    return plain[b0 - uoffs[first] : b1 - uoffs[first]]


def uncompressed_size(reader: Any, gzi: tuple[list[int], list[int]]) -> int:
    """The bgzip file's uncompressed size: where its last block starts, plus that block inflated."""
    coffs, uoffs = gzi
    return uoffs[-1] + len(inflate_bgzf(reader.fetch(coffs[-1], reader.size())))


def inflate_bgzf(data: bytes) -> bytes:
    """Decompress a run of concatenated BGZF (gzip) members."""
    parts: list[bytes] = []
    while data:
        d = zlib.decompressobj(31)
        parts.append(d.decompress(data))
        if not d.eof:
            break
        data = d.unused_data
    return b"".join(parts)
