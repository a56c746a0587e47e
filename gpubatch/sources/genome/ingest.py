"""``gpubatch ingest genome FASTA OUT``: a FASTA once converted into a genome zarr for fast reads.

Why: a FASTA is text with line breaks, so every window read must fetch bytes, strip newlines and
encode; a bgzip FASTA adds block decompression, and a plain gzip FASTA cannot be read by range at
all. The genome zarr stores each contig as uint8 base *codes* (A=0 C=1 G=2 T=3, anything else 4,
as ``kernels.encode_dna``), in ~1 Mb compressed chunks, so a worker reads a window range with one
or two chunk requests over any fsspec store and does no parsing.

Layout (version 2): contigs shorter than ``pack_below`` (1 Mb) one after another in one packed
array, longer ones an array each (named after the contig when the name is a safe zarr key, else
``c<index>``), as ``ingest_arrays`` writes them; root attribute ``gpubatch_genome`` = {format,
version, contigs, lengths, layout {packed, packed_chunk, pack_below, offsets, arrays}, source,
codes, chunk, complete}. Version 1 (an array per contig, ``arrays`` for ``layout``) is still read
(``reference.contig_locations``). ``complete`` is written last, so an interrupted ingest is never
mistaken for a genome.

The FASTA is streamed (plain, gzip or bgzip, told by their bytes; local or any fsspec URL):
memory is one chunk plus one read block, whatever the genome's size or its lines' length. Contig
names are the first word of each header line. What is not a genome is refused, naming the file
and where: a byte in a sequence line that is not a letter ('-', '*', '.', digits: an alignment, a
GenBank dump); letters that are no nucleotide code as often as in a protein (a few are read as N,
as a job reading the FASTA reads them, and warned of); a bgzip file without its EOF block, or a
FASTA ending in a bare header (both cut short); contigs other than the .fai's beside it (a plain
FASTA cut mid-record); a FASTA written while read. The genome records its FASTA's location (no
credentials) and version: a plan that finds the FASTA changed since notes it
(``reference.changed_source_note``).

The output is leased while written and, on local disk, replaced only by a complete genome
(``ingest_output``): two ingests into one output, or a bad FASTA given with ``--overwrite``,
never cost the genome already there.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from typing import IO, Any, cast

import numpy as np

from gpubatch.core.errors import InputError, OutputRefused
from gpubatch.core.phases import Phase, phase
from gpubatch.io.redact import redact
from gpubatch.io.storage import exists, identity_of, input_changed, open_file, stat
from gpubatch.io.uris import is_remote, local_path
from gpubatch.ops.kernels import encode_dna
from gpubatch.outputs.store import OutputStore
from gpubatch.sources.genome.indexes import REBUILD, read_fai
from gpubatch.sources.genome.ingest_arrays import ContigWriter, GenomeArrays
from gpubatch.sources.genome.ingest_output import ingest_lease, output_path, staged_output
from gpubatch.sources.genome.reference import (
    GENOME_ATTR,
    LAYOUT_VERSION,
    MAX_LISTED_CONTIGS,
    open_genome_group,
    zarr_marker,
)

log = logging.getLogger("gpubatch")
CHUNK_BASES = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
#: a BGZF block's first bytes (gzip with the extra field), and the empty block that ends a whole
#: bgzip file (the SAM spec's EOF marker, 28 bytes): a file cut at a block boundary lacks it
BGZF_MAGIC = b"\x1f\x8b\x08\x04"
BGZF_EOF = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")
READ_BLOCK = 8 << 20
#: contigs shorter than this go into the packed array (``ingest_arrays``), longer ones into their own
PACK_BELOW = CHUNK_BASES
#: what a genome FASTA's sequence lines hold once line ends, spaces and tabs are dropped: the
#: nucleotides and IUPAC ambiguity codes, either case (lowercase: soft-masked repeats)
NUCLEOTIDES = b"ACGTUNRYSWKMBDHVacgtunryswkmbdhv"
LETTERS = bytes(range(ord("A"), ord("Z") + 1)) + bytes(range(ord("a"), ord("z") + 1))
#: the share of bases that, as letters no nucleotide code, make a FASTA a protein's
PROTEIN_SHARE = 0.1
LAYOUT_BYTES = b"\r\n \t"
UTF8_BOM = b"\xef\xbb\xbf"


def _events(data: bytes, line_start: bool) -> Iterator[tuple[str, bytes]]:
    """Header and sequence events of a buffer; a '>' is a header only at the start of a line."""
    pos = 0
    while pos < len(data):
        gt = data.find(b">", pos)
        while gt >= 0 and not (gt == 0 and line_start) and not (gt > 0 and data[gt - 1] == 10):
            gt = data.find(b">", gt + 1)
        if gt < 0:
            yield "seq", data[pos:]
            return
        if gt > pos:
            yield "seq", data[pos:gt]
        eol = data.find(b"\n", gt)
        eol = len(data) if eol < 0 else eol
        yield "header", data[gt + 1 : eol]
        pos = eol + 1


class _Peeked:
    """The FASTA's raw bytes with their first ones (the magic, read to tell the compression)
    handed back first, where a seek back to 0 failed on a streamed HTTP body ("Cannot seek
    streaming HTTP file", a traceback); the last bytes read are kept: where a bgzip file ends,
    its EOF block, checked without a seek to the end. ``on_read`` is told how many raw bytes
    each read took (the ingest's progress: the file's size is its total, compressed or not)."""

    def __init__(self, raw: IO[bytes], head: bytes, keep: int = len(BGZF_EOF),
                 on_read: Callable[[int], None] | None = None):
        self.raw, self.head, self.keep, self.tail = raw, head, keep, b""
        self.mode = "rb"
        self.on_read = on_read or (lambda n: None)
        self.on_read(len(head))

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            data, self.head = self.head + self.raw.read(), b""
        elif self.head:
            data, self.head = self.head[:size], self.head[size:]
            data += self.raw.read(size - len(data)) if len(data) < size else b""
        else:
            data = self.raw.read(size)
        self.on_read(len(data))
        self.tail = (self.tail + data[-self.keep :])[-self.keep :]
        return data


def _cut_bgzf(uri: str) -> InputError:
    return InputError(uri, "the bgzip FASTA ends without BGZF's end-of-file block, so it was cut short "
                           "at a block boundary (an interrupted download or copy) and its last contig "
                           "would be ingested short; fetch it again (`bgzip -t` tests a file). A whole "
                           "file whose writer left the block out: recompress it with `bgzip`")


@contextlib.contextmanager
def _open_fasta(uri: str, storage_options: dict[str, Any] | None,
                on_read: Callable[[int], None] | None = None) -> Iterator[IO[bytes]]:
    """The FASTA's bytes, decompressed: gzip and bgzip told by their magic bytes, as
    ``windows.reference`` tells them (a bgzip FASTA named ``.bgz``, or a gzip one without a
    suffix, was read as text by its name, and a plain one named ``.gz`` as a broken gzip); other
    compressions (``.bz2``, ``.xz``) by the name, as fsspec infers them. A bgzip file read to
    its end without its EOF block is refused: cut at a block boundary, it inflates cleanly.
    ``on_read``: told of the raw bytes read (:class:`_Peeked`)."""
    from fsspec.compression import compr
    from fsspec.utils import infer_compression

    with open_file(uri, storage_options, "rb") as raw:
        magic = raw.read(len(BGZF_MAGIC))
        stream = _Peeked(raw, magic, on_read=on_read)
        by_name = infer_compression(uri)
        if magic[:2] == GZIP_MAGIC:
            yield cast(IO[bytes], gzip.GzipFile(fileobj=cast(IO[bytes], stream)))
            if magic == BGZF_MAGIC and stream.tail != BGZF_EOF:
                raise _cut_bgzf(uri)
        elif by_name not in (None, "gzip"):
            yield cast(IO[bytes], compr[by_name](stream, mode="rb"))
        else:
            yield cast(IO[bytes], stream)


def _fasta_stream(uri: str, storage_options: dict[str, Any] | None,
                  on_read: Callable[[int], None] | None = None) -> Iterator[tuple[str, bytes]]:
    """Yield ('header', name line) and ('seq', bases) events from a FASTA, read in large blocks.

    Blocks are cut at line ends so a header is never split; a sequence line longer than a block
    (unwrapped FASTA) is passed on in pieces, and of a header line longer than a block only its
    first block is kept (``_long_header``), so memory stays a block or two whatever the lines' length.
    """
    with _open_fasta(uri, storage_options, on_read) as f:
        carry, line_start = b"", True
        while True:
            block = f.read(READ_BLOCK)
            data, carry = carry + block, b""
            if block:
                nl = data.rfind(b"\n")
                if nl < 0:
                    if line_start and data.startswith(b">") and len(data) < READ_BLOCK:
                        carry = data  # a header not yet read to its end (a short read): keep reading
                    elif line_start and data.startswith(b">"):
                        header, carry = _long_header(f, data, uri)
                        yield "header", header
                    else:
                        yield "seq", data
                        line_start = False
                    continue
                data, carry = data[: nl + 1], data[nl + 1 :]
            yield from _events(data, line_start)
            line_start = True
            if not block:
                return


def _long_header(f: IO[bytes], data: bytes, fasta_uri: str) -> tuple[bytes, bytes]:
    """A header line longer than a read block: (its first ``READ_BLOCK`` bytes, without the '>',
    what follows its end). Only its first word, the contig name, is read, and the rest (its
    description) is passed over a block at a time: the whole line was held, growing with it, and
    a FASTA whose lines end in a bare CR (no '\\n' anywhere) was held whole as one header."""
    header = data[1:READ_BLOCK]
    if len(header.split(maxsplit=1)) == 1 and header == header.rstrip():  # the name runs on past it
        raise InputError(fasta_uri, f"a '>' header line's first word (the contig name) is longer than "
                                    f"{READ_BLOCK:,} bytes: not a FASTA header; a name is a few words at most")
    while block := f.read(READ_BLOCK):
        nl = block.find(b"\n")
        if nl >= 0:
            return header, block[nl + 1 :]
    return header, b""


def _header_name(raw: bytes, fasta_uri: str, seen: set[str]) -> str:
    """The contig name of a header line, added to ``seen`` (the names so far: one set for the
    whole file, as a set rebuilt per header made an assembly of many scaffolds quadratic). A CR
    inside the line is a FASTA whose lines end in a bare CR (classic Mac OS): no '\\n' anywhere,
    the file read as one header line and refused as "cut short"."""
    if b"\r" in raw.rstrip(b"\r"):
        raise InputError(fasta_uri, "its lines end in a bare CR (carriage return) without a line feed, as "
                                    "classic Mac OS wrote them; convert them first (`tr '\\r' '\\n' < IN > OUT`)")
    words = raw.decode(errors="replace").split()
    if not words:
        raise InputError(fasta_uri, "a '>' header line has no sequence name")
    name = words[0]
    if name in seen:
        raise InputError(fasta_uri, f"contig name {name!r} appears twice")
    seen.add(name)
    return name


class _OddLetters:
    """Letters that are no nucleotide code (Z, X, E, ...): read as N, as a job reading the FASTA
    itself reads them, counted, and the first one's place kept for the warning or refusal."""

    def __init__(self) -> None:
        self.count = 0
        self.first = ""

    def add(self, odd: bytes, where: str) -> None:
        self.first = self.first or where
        self.count += len(odd)


def _sequence_codes(data: bytes, fasta_uri: str, writer: ContigWriter, letters: _OddLetters) -> np.ndarray:
    """The codes of a piece of sequence lines. A byte that is not even a letter is refused, naming
    the contig and the base: an alignment or protein FASTA ('-', '.', '*'), a numbered GenBank
    dump, a '>' inside a line, was ingested as N. Other letters are counted (``_OddLetters``)."""
    bases = data.translate(None, LAYOUT_BYTES)
    odd = bases.translate(None, NUCLEOTIDES)
    if not odd:
        return encode_dna(bases)
    not_letters = odd.translate(None, LETTERS)
    first = not_letters[:1] or odd[:1]
    where = f"contig '{writer.name}', base {writer.bases + bases.index(first) + 1:,}: {first.decode('latin-1')!r}"
    if not_letters:
        raise InputError(fasta_uri, f"{where} is not a nucleotide code. A genome FASTA holds A, C, G, T, U, N "
                                    "and the IUPAC ambiguity codes (RYSWKMBDHV), either case: is this an "
                                    "alignment or protein FASTA? Replace other characters with N to ingest it")
    letters.add(odd, where)
    return encode_dna(bases)


def _judge_odd_letters(fasta_uri: str, letters: _OddLetters, bases: int) -> None:
    """A few odd letters are read as N and warned of; as many as a protein's (Q, E, I, L, F, P:
    a third of a protein's residues) are refused, long before a genome's would be."""
    if not letters.count:
        return
    if letters.count > PROTEIN_SHARE * bases:
        raise InputError(fasta_uri, f"{letters.count:,} of {bases:,} bases are letters that are no nucleotide "
                                    f"code (first: {letters.first}): a protein FASTA, not a genome")
    log.warning("%s: %d letter(s) that are no nucleotide code read as N (first: %s)",
                redact(fasta_uri), letters.count, letters.first)


def _before_any_header(fasta_uri: str, data: bytes) -> InputError:
    """Text before the first header; a UTF-8 byte-order mark (a FASTA saved by a Windows editor)
    hides the first '>' and is named, where "not a FASTA file" left the user looking at a FASTA."""
    if data.startswith(UTF8_BOM):
        return InputError(fasta_uri, "the file starts with a UTF-8 byte-order mark before its first '>' "
                                     "header; save it without one (e.g. `sed -i '1s/^\\xEF\\xBB\\xBF//' FILE`)")
    return InputError(fasta_uri, "sequence before the first '>' header: not a FASTA file")


def _ended_by_header(fasta_uri: str, writer: ContigWriter) -> InputError:
    return InputError(fasta_uri, f"the FASTA ends with the header of contig '{writer.name}' and no "
                                 "sequence after it: the file looks cut short (samtools faidx refuses it "
                                 "as truncated too); fetch it again, or remove that header line")


def _check_output(out_uri: str, storage_options: dict[str, Any] | None, overwrite: bool) -> None:
    """An existing OUT is replaced only with ``overwrite``, and only where it is a zarr store
    (an earlier ingest's, finished or not) or an empty folder: ``--overwrite`` given a results
    folder, a home directory or a file by mistake must not delete it. Either refusal is exit 2,
    nothing read or written, as ``run``'s of an output it may not write (was exit 1 without
    ``--overwrite``: "anything else", as if the FASTA had failed)."""
    if not exists(out_uri, storage_options):
        return
    if not overwrite:
        raise OutputRefused(f"{redact(out_uri)}: output already exists; remove it, or replace it with "
                            "`gpubatch ingest genome --overwrite` (overwrite=True in Python)")
    if not exists(zarr_marker(out_uri), storage_options) and not OutputStore(out_uri, storage_options).is_empty():
        raise OutputRefused(f"{redact(out_uri)} is not a genome store (no zarr.json in it): --overwrite "
                            "replaces only an earlier ingest's output. Give a new path, or remove it yourself")


def _write_contigs(group: Any, fasta_uri: str, storage_options: dict[str, Any] | None,
                   chunk_bases: int, pack_below: int,
                   progress: Phase | None = None) -> tuple[list[str], list[int], dict[str, Any]]:
    """Stream the FASTA into code arrays, small contigs packed into one; (names, lengths, the
    genome attribute's ``layout``: where each contig is). ``progress`` counts the bytes read."""
    names: list[str] = []
    lengths: list[int] = []
    arrays = GenomeArrays(group, chunk_bases, pack_below)
    seen: set[str] = set()
    letters = _OddLetters()
    writer: ContigWriter | None = None
    try:
        for kind, data in _fasta_stream(fasta_uri, storage_options, progress.advance if progress else None):
            if kind == "header":
                if writer is not None:
                    lengths.append(writer.finish())
                names.append(_header_name(data, fasta_uri, seen))
                writer = arrays.contig(names[-1], len(names) - 1)
            elif data.strip():
                if writer is None:
                    raise _before_any_header(fasta_uri, data)
                writer.add(_sequence_codes(data, fasta_uri, writer, letters))
    except FileNotFoundError:
        raise InputError(fasta_uri, "FASTA file not found") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:  # a cut or damaged gzip/bgzip file
        raise InputError(fasta_uri, f"FASTA is truncated or corrupt: {exc}") from None
    if writer is None:
        raise InputError(fasta_uri, "no '>' header found: not a FASTA file")
    lengths.append(writer.finish())
    if not lengths[-1]:
        raise _ended_by_header(fasta_uri, writer)
    layout = arrays.finish()
    _judge_odd_letters(fasta_uri, letters, sum(lengths))
    _note_empty(names, lengths)
    return names, lengths, layout


def _note_empty(names: list[str], lengths: list[int]) -> None:
    """Contigs whose header has no sequence are kept, length 0 (no window falls on them), and
    named: samtools faidx leaves them out of a .fai, so the FASTA read with one lacks them."""
    empty = [name for name, length in zip(names, lengths, strict=True) if not length]
    if empty:
        shown = ", ".join(empty[:MAX_LISTED_CONTIGS]) + (", ..." if len(empty) > MAX_LISTED_CONTIGS else "")
        log.warning("%d contig(s) have a header and no sequence, kept with length 0: %s", len(empty), shown)


def ingest_genome(fasta_uri: str, out_uri: str, storage_options: dict[str, Any] | None = None,
                  *, chunk_bases: int = CHUNK_BASES, overwrite: bool = False,
                  pack_below: int = PACK_BELOW) -> dict[str, Any]:
    """Convert a FASTA (plain/gzip/bgzip, local or fsspec URL) into a genome zarr at ``out_uri``.

    Returns a summary: {"uri", "contigs", "lengths", "bases", "chunk_bases"}. Raises InputError
    for a missing or malformed FASTA (no header before sequence, duplicate or empty names, a
    byte that is no nucleotide code, a cut bgzip file, contigs other than its .fai's);
    OutputRefused (exit 2) for an existing output unless ``overwrite``, and while another ingest
    writes the output. The output is leased and, on disk, replaced only by a complete genome
    (``ingest_output``): a failed ingest leaves the old one as it was. ``pack_below``: contigs
    shorter than this many bases share one packed array (0: every contig its own array).
    """
    out = output_path(out_uri)
    with ingest_lease(out, storage_options) as lease:
        _check_output(out_uri, storage_options, overwrite)
        identity = _fasta_identity(fasta_uri, storage_options)  # before anything at OUT is touched
        with staged_output(out, storage_options, overwrite) as where:
            names, lengths = _write_genome(where, fasta_uri, storage_options, identity, lease.confirm,
                                           chunk_bases=chunk_bases, pack_below=pack_below)
    return {"uri": out_uri, "contigs": names, "lengths": lengths, "bases": int(sum(lengths)),
            "chunk_bases": chunk_bases}


def _fasta_identity(fasta_uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The FASTA's size and mtime or ETag, which the genome records (a run can tell that its
    source changed since) and which must not change while it is read; a missing FASTA, or a
    folder (a genome zarr given as the FASTA), is refused naming it (was a traceback)."""
    try:
        info = stat(fasta_uri, storage_options)
    except InputError as exc:
        if exc.message.startswith(("file not found", "object not found")):
            raise InputError(fasta_uri, "FASTA file not found") from None
        raise
    if info["type"] == "directory":
        what = ("a genome zarr already: give it as windows.reference as it is"
                if exists(zarr_marker(fasta_uri), storage_options) else "a folder")
        raise InputError(fasta_uri, f"not a FASTA file but {what}")
    return identity_of(fasta_uri, info)


def _write_genome(where: str, fasta_uri: str, storage_options: dict[str, Any] | None,
                  identity: dict[str, Any], confirm_lease: Callable[[], None], *, chunk_bases: int,
                  pack_below: int) -> tuple[list[str], list[int]]:
    """The genome zarr at ``where``: the contigs' arrays, then the root attribute, ``complete``
    last, so an interrupted write is never mistaken for a genome. A FASTA written over while it
    was read (a download still running) is refused: its genome would be a mix, or cut short.
    ``confirm_lease`` raises if another ingest took OUT over meanwhile (this process suspended
    past its lease): that ingest swept this one's staging folder, so chunks written before the
    suspension are gone, and marked complete, the genome would read them as fill."""
    group = open_genome_group(where, storage_options, mode="w")
    # a human genome ran a minute here (a gzip FASTA from object storage, minutes) with no line
    with phase(f"ingesting {redact(fasta_uri)}", identity.get("size"), "byte") as said:
        names, lengths, layout = _write_contigs(group, fasta_uri, storage_options, chunk_bases, pack_below, said)
    if input_changed(fasta_uri, identity, storage_options) is not None:
        raise InputError(fasta_uri, "the FASTA changed while it was read (still being written or "
                                    "downloaded?); ingest it again once it is complete")
    _check_against_fai(fasta_uri, storage_options, names, lengths)
    confirm_lease()
    group.attrs[GENOME_ATTR] = {
        "format": "gpubatch-genome", "version": LAYOUT_VERSION, "contigs": names,
        "lengths": lengths, "layout": layout, "source": _public_uri(fasta_uri),
        "source_identity": identity,
        "codes": "A=0 C=1 G=2 T=3 other=4", "chunk": chunk_bases, "complete": True,
    }
    return names, lengths


def _check_against_fai(fasta_uri: str, storage_options: dict[str, Any] | None,
                       names: list[str], lengths: list[int]) -> None:
    """Where the FASTA has a .fai beside it, its contigs as ingested must be the index's: a plain
    FASTA cut short mid-record (a copy that stopped) reads as a whole one with a shorter last
    contig, and its .fai, made from the whole file, is then the only witness. Contigs with no
    sequence are left out (samtools faidx leaves them out of a .fai)."""
    if not exists(fasta_uri + ".fai", storage_options):
        return
    try:
        fai = read_fai(fasta_uri, storage_options)
    except InputError as exc:
        log.warning("not checked against its .fai, which cannot be read: %s", exc)
        return
    ingested = dict(zip(names, lengths, strict=True))
    for name, entry in fai.items():
        if ingested.get(name) != entry.length:
            found = f"{ingested[name]:,} bases" if name in ingested else "no such contig"
            raise InputError(fasta_uri, f"contig '{name}': the FASTA holds {found}, its .fai {entry.length:,}: "
                                        "the FASTA is cut short, or the .fai is of another file; fetch the "
                                        "FASTA again, or rebuild the .fai with `samtools faidx`")
    extra = [name for name, length in ingested.items() if length and name not in fai]
    if extra:
        raise InputError(fasta_uri, f"contig '{extra[0]}' is in the FASTA but not in its .fai ({len(extra)} such): "
                                    f"the .fai is of another file; {REBUILD}")


def _public_uri(uri: str) -> str:
    """The FASTA's location as recorded: no userinfo and no query string (either may hold a
    credential: ``https://user:token@host/...`` was written into the genome as given)."""
    if not is_remote(uri):
        return os.path.abspath(local_path(uri))
    parts = urllib.parse.urlsplit(uri)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
