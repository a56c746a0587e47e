"""``gpubatch ingest genome FASTA OUT``: a FASTA once converted into a genome zarr for fast reads.

Why: a FASTA is text with line breaks, so every window read must fetch bytes, strip newlines and
encode; a bgzip FASTA adds block decompression, and a plain gzip FASTA cannot be read by range at
all. The genome zarr stores each contig as uint8 base *codes* (A=0 C=1 G=2 T=3, anything else 4,
as ``kernels.encode_dna``), in ~1 Mb compressed chunks, so a worker reads a window range with one
or two chunk requests over any fsspec store and does no parsing.

Layout: one array per contig (named after the contig when the name is a safe zarr key, else
``c<index>``); root attribute ``gpubatch_genome`` = {format, version, contigs, lengths, arrays,
source, codes, chunk, complete}. ``complete`` is written last, so an interrupted ingest is never
mistaken for a genome.

The FASTA is streamed (plain, gzip or bgzip, told by their bytes; local or any fsspec URL):
memory is one chunk plus one read block, whatever the genome's size. Contig names are the first word of each header line.

The output is leased while written and, on local disk, replaced only by a complete genome
(``ingest_output``): two ingests into one output, or a bad FASTA given with ``--overwrite``,
never cost the genome already there.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import zlib
from collections.abc import Iterator
from typing import IO, Any, cast

import numpy as np

from gpubatch.core.errors import InputError, OutputRefused
from gpubatch.io.redact import redact
from gpubatch.io.storage import exists, open_file
from gpubatch.io.uris import is_remote, local_path
from gpubatch.ops.kernels import encode_dna
from gpubatch.outputs.store import OutputStore
from gpubatch.sources.genome.ingest_output import ingest_lease, output_path, staged_output
from gpubatch.sources.genome.reference import (
    GENOME_ATTR,
    open_genome_group,
    zarr_array_name,
    zarr_marker,
)

CHUNK_BASES = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
READ_BLOCK = 8 << 20
FORMAT_VERSION = 1


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


@contextlib.contextmanager
def _open_fasta(uri: str, storage_options: dict[str, Any] | None) -> Iterator[IO[bytes]]:
    """The FASTA's bytes, decompressed: gzip and bgzip told by their magic bytes, as
    ``windows.reference`` tells them (a bgzip FASTA named ``.bgz``, or a gzip one without a
    suffix, was read as text by its name, and a plain one named ``.gz`` as a broken gzip); other
    compressions (``.bz2``, ``.xz``) by the name, as fsspec infers them."""
    from fsspec.compression import compr
    from fsspec.utils import infer_compression

    with open_file(uri, storage_options, "rb") as raw:
        gzipped = raw.read(2) == GZIP_MAGIC
        raw.seek(0)
        by_name = infer_compression(uri)
        if gzipped:
            yield cast(IO[bytes], gzip.GzipFile(fileobj=raw))
        elif by_name not in (None, "gzip"):
            yield cast(IO[bytes], compr[by_name](raw, mode="rb"))
        else:
            yield raw


def _fasta_stream(uri: str, storage_options: dict[str, Any] | None) -> Iterator[tuple[str, bytes]]:
    """Yield ('header', name line) and ('seq', bases) events from a FASTA, read in large blocks.

    Blocks are cut at line ends so a header is never split; a sequence line longer than a block
    (unwrapped FASTA) is passed on in pieces, so memory stays one block whatever the line length.
    """
    with _open_fasta(uri, storage_options) as f:
        carry, line_start = b"", True
        while True:
            block = f.read(READ_BLOCK)
            data, carry = carry + block, b""
            if block:
                nl = data.rfind(b"\n")
                if nl < 0:
                    if line_start and data.startswith(b">"):
                        carry = data  # a header longer than a block: keep reading
                    else:
                        yield "seq", data
                        line_start = False
                    continue
                data, carry = data[: nl + 1], data[nl + 1 :]
            yield from _events(data, line_start)
            line_start = True
            if not block:
                return


class _ContigWriter:
    """Buffers one contig's codes and appends them to its zarr array in whole chunks."""

    def __init__(self, group: Any, name: str, index: int, chunk: int):
        from zarr.codecs import ZstdCodec

        self.key = zarr_array_name(name, index)
        self.chunk = chunk
        self.array = group.create_array(self.key, shape=(0,), chunks=(chunk,), dtype="uint8",
                                        compressors=ZstdCodec(level=3), fill_value=4)
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.length = 0

    def add(self, codes: np.ndarray) -> None:
        self.buffer.append(codes)
        self.buffered += len(codes)
        if self.buffered >= self.chunk:
            self._flush(whole_chunks=True)

    def _flush(self, whole_chunks: bool) -> None:
        data = np.concatenate(self.buffer) if len(self.buffer) != 1 else self.buffer[0]
        cut = (len(data) // self.chunk) * self.chunk if whole_chunks else len(data)
        if cut:
            self.array.append(data[:cut])
            self.length += cut
        rest = data[cut:]
        self.buffer, self.buffered = ([rest], len(rest)) if len(rest) else ([], 0)

    def finish(self) -> int:
        if self.buffered:
            self._flush(whole_chunks=False)
        return self.length


def _header_name(raw: bytes, fasta_uri: str, seen: set[str]) -> str:
    words = raw.decode(errors="replace").split()
    if not words:
        raise InputError(fasta_uri, "a '>' header line has no sequence name")
    name = words[0]
    if name in seen:
        raise InputError(fasta_uri, f"contig name {name!r} appears twice")
    seen.add(name)
    return name


def _check_output(out_uri: str, storage_options: dict[str, Any] | None, overwrite: bool) -> None:
    """An existing OUT is replaced only with ``overwrite``, and only where it is a zarr store
    (an earlier ingest's, finished or not) or an empty folder: ``--overwrite`` given a results
    folder, a home directory or a file by mistake must not delete it."""
    if not exists(out_uri, storage_options):
        return
    if not overwrite:
        raise InputError(out_uri, "output already exists; remove it, or replace it with "
                                  "`gpubatch ingest genome --overwrite` (overwrite=True in Python)")
    if not exists(zarr_marker(out_uri), storage_options) and not OutputStore(out_uri, storage_options).is_empty():
        raise OutputRefused(f"{redact(out_uri)} is not a genome store (no zarr.json in it): --overwrite "
                            "replaces only an earlier ingest's output. Give a new path, or remove it yourself")


def _write_contigs(group: Any, fasta_uri: str, storage_options: dict[str, Any] | None,
                   chunk_bases: int) -> tuple[list[str], list[int], list[str]]:
    """Stream the FASTA into one code array per contig; (names, lengths, array keys)."""
    names: list[str] = []
    lengths: list[int] = []
    keys: list[str] = []
    writer: _ContigWriter | None = None
    try:
        for kind, data in _fasta_stream(fasta_uri, storage_options):
            if kind == "header":
                if writer is not None:
                    lengths.append(writer.finish())
                names.append(_header_name(data, fasta_uri, set(names)))
                writer = _ContigWriter(group, names[-1], len(names) - 1, chunk_bases)
                keys.append(writer.key)
            elif data.strip():
                if writer is None:
                    raise InputError(fasta_uri, "sequence before the first '>' header: not a FASTA file")
                writer.add(encode_dna(data.translate(None, b"\r\n \t")))
    except FileNotFoundError:
        raise InputError(fasta_uri, "FASTA file not found") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:  # a cut or damaged gzip/bgzip file
        raise InputError(fasta_uri, f"FASTA is truncated or corrupt: {exc}") from None
    if writer is not None:
        lengths.append(writer.finish())
    if not names:
        raise InputError(fasta_uri, "no '>' header found: not a FASTA file")
    return names, lengths, keys


def ingest_genome(fasta_uri: str, out_uri: str, storage_options: dict[str, Any] | None = None,
                  *, chunk_bases: int = CHUNK_BASES, overwrite: bool = False) -> dict[str, Any]:
    """Convert a FASTA (plain/gzip/bgzip, local or fsspec URL) into a genome zarr at ``out_uri``.

    Returns a summary: {"uri", "contigs", "lengths", "bases", "chunk_bases"}. Raises InputError
    for a missing or malformed FASTA (no header before sequence, duplicate or empty names) and
    for an existing output unless ``overwrite``; OutputRefused (exit 2) while another ingest
    writes the output. The output is leased and, on disk, replaced only by a complete genome
    (``ingest_output``): a failed ingest leaves the old one as it was.
    """
    out = output_path(out_uri)
    with ingest_lease(out, storage_options):
        _check_output(out_uri, storage_options, overwrite)
        if not exists(fasta_uri, storage_options):  # before anything at OUT is touched
            raise InputError(fasta_uri, "FASTA file not found")
        with staged_output(out, storage_options, overwrite) as where:
            names, lengths, keys = _write_genome(where, fasta_uri, storage_options, chunk_bases)
    return {"uri": out_uri, "contigs": names, "lengths": lengths, "bases": int(sum(lengths)),
            "chunk_bases": chunk_bases}


def _write_genome(where: str, fasta_uri: str, storage_options: dict[str, Any] | None,
                  chunk_bases: int) -> tuple[list[str], list[int], list[str]]:
    """The genome zarr at ``where``: the contigs' arrays, then the root attribute, ``complete``
    last, so an interrupted write is never mistaken for a genome."""
    group = open_genome_group(where, storage_options, mode="w")
    names, lengths, keys = _write_contigs(group, fasta_uri, storage_options, chunk_bases)
    group.attrs[GENOME_ATTR] = {
        "format": "gpubatch-genome", "version": FORMAT_VERSION, "contigs": names,
        "lengths": lengths, "arrays": keys, "source": _public_uri(fasta_uri),
        "codes": "A=0 C=1 G=2 T=3 other=4", "chunk": chunk_bases, "complete": True,
    }
    return names, lengths, keys


def _public_uri(uri: str) -> str:
    """The FASTA's location as recorded: no query string (it may hold a signed credential)."""
    return uri.split("?", 1)[0] if is_remote(uri) else os.path.abspath(local_path(uri))
