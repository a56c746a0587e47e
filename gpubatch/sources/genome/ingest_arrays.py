"""Where ``gpubatch ingest genome`` puts each contig's codes: its own array, or the packed one.

Why: an array per contig costs its metadata writes and store round trips whatever its size,
8-16 ms a contig on a local disk, so a draft assembly of 500,000 scaffolds took hours to ingest
(and each shard's first read of a contig another metadata request). Contigs shorter than
``pack_below`` bases are therefore appended, one after another, to one packed array (small
chunks, so a read of one contig decompresses little more than it), and the genome's layout
attribute gives each its offset there; a longer contig keeps an array of its own, as in layout
version 1. Ingest then costs per base, not per contig.

A contig's length is known only at its end (the FASTA is streamed), so its first ``pack_below``
bases wait in memory: past them it is given its own array, else at its end it is packed.
Memory stays bounded: that buffer plus one flush of the packed array.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpubatch.sources.genome.reference import MISSING_CODE, PACKED_ARRAY, zarr_array_name

#: the packed array's chunk: one read of a small contig decompresses a chunk or two of it
PACKED_CHUNK = 1 << 16


class Appender:
    """Appends codes to one zarr array in whole chunks, ``flush_bases`` (a multiple of chunks)
    at a time: each append rewrites the array's metadata, and a chunk written in part would be
    read back and written again."""

    def __init__(self, group: Any, key: str, chunk: int, flush_bases: int = 0):
        from zarr.codecs import ZstdCodec

        self.key, self.chunk = key, chunk
        self.flush_at = max(chunk, flush_bases)
        self.array = group.create_array(key, shape=(0,), chunks=(chunk,), dtype="uint8",
                                        compressors=ZstdCodec(level=3), fill_value=MISSING_CODE)
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.length = 0

    @property
    def bases(self) -> int:
        """Bases taken so far, written or buffered: where the next piece starts in the array."""
        return self.length + self.buffered

    def add(self, codes: np.ndarray) -> None:
        if not len(codes):
            return
        self.buffer.append(codes)
        self.buffered += len(codes)
        if self.buffered >= self.flush_at:
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
        """Write what is buffered (the last, partial chunk); the array's length."""
        if self.buffered:
            self._flush(whole_chunks=False)
        return self.length


class GenomeArrays:
    """The genome's arrays as written so far, and each contig's place: (array key, offset)."""

    def __init__(self, group: Any, chunk_bases: int, pack_below: int):
        self.group, self.chunk_bases, self.pack_below = group, chunk_bases, pack_below
        self.packed: Appender | None = None
        #: per contig, in FASTA order: its offset in the packed array, None where it has its own
        self.offsets: list[int | None] = []
        #: contig name -> key of its own array, for contigs not packed
        self.own: dict[str, str] = {}

    def contig(self, name: str, index: int) -> ContigWriter:
        """A writer for the next contig of the FASTA (``index``: its place in it)."""
        return ContigWriter(self, name, index)

    def own_array(self, name: str, index: int) -> Appender:
        key = zarr_array_name(name, index)
        self.own[name] = key
        return Appender(self.group, key, self.chunk_bases)

    def pack(self, pieces: list[np.ndarray]) -> None:
        """Append a whole small contig to the packed array, recording where it starts."""
        if self.packed is None:
            chunk = min(self.chunk_bases, PACKED_CHUNK)
            self.packed = Appender(self.group, PACKED_ARRAY, chunk, flush_bases=self.chunk_bases)
        self.offsets.append(self.packed.bases)
        for piece in pieces:
            self.packed.add(piece)

    def finish(self) -> dict[str, Any]:
        """Write the packed array's last chunk; the genome attribute's ``layout`` entry."""
        if self.packed is not None:
            self.packed.finish()
        return {"packed": PACKED_ARRAY if self.packed is not None else None,
                "packed_chunk": self.packed.chunk if self.packed is not None else None,
                "pack_below": self.pack_below, "offsets": self.offsets, "arrays": self.own}


class ContigWriter:
    """One contig's codes as they stream in: held until it is known to be small (packed at its
    end) or passes ``pack_below`` bases (then written to its own array from there on)."""

    def __init__(self, arrays: GenomeArrays, name: str, index: int):
        self.arrays, self.name, self.index = arrays, name, index
        self.pending: list[np.ndarray] = []
        self.pending_bases = 0
        self.own: Appender | None = None

    @property
    def bases(self) -> int:
        """Bases taken so far: where the next piece starts in the contig."""
        return self.own.bases if self.own is not None else self.pending_bases

    def add(self, codes: np.ndarray) -> None:
        if self.own is not None:
            self.own.add(codes)
            return
        self.pending.append(codes)
        self.pending_bases += len(codes)
        if self.pending_bases >= self.arrays.pack_below:
            self._to_own_array()

    def _to_own_array(self) -> None:
        self.own = self.arrays.own_array(self.name, self.index)
        for piece in self.pending:
            self.own.add(piece)
        self.pending = []

    def finish(self) -> int:
        """Write the contig's last bases where they belong; its length. A contig of
        ``pack_below`` bases or more has its own array (all of them, where that is 0)."""
        if self.own is None and self.pending_bases >= self.arrays.pack_below:
            self._to_own_array()
        if self.own is not None:
            self.arrays.offsets.append(None)
            return self.own.finish()
        self.arrays.pack(self.pending)
        self.pending = []
        return self.pending_bases
