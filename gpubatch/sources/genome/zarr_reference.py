"""A genome zarr from ``gpubatch ingest genome`` read on a worker: each contig resolved to
(array, offset) by ``reference.contig_locations``, its codes sliced from that array.

What a shard's reader asks of the store is kept small, as a draft assembly of hundreds of
thousands of scaffolds over object storage makes it matter: the contig table is the process's
kept one (``reference.read_genome``: the root ``zarr.json`` is not read again a shard, only its
version asked), arrays are opened by their own metadata when first read, and the reader keeps
its last chunks (``kept.ChunkCache``), which neighbouring small contigs share.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from gpubatch.core.errors import InputError
from gpubatch.io.zarr_groups import zarr_store
from gpubatch.sources.genome.kept import ChunkCache, read_through
from gpubatch.sources.genome.reference import N_CODE, Reference, read_genome

if TYPE_CHECKING:
    from gpubatch.core.clocks import StageClocks


class ZarrReference(Reference):
    """A genome zarr from ``gpubatch ingest``: slices of its uint8 code arrays, each contig's
    resolved to (array, offset) by :func:`reference.contig_locations`."""

    format = "zarr"

    def __init__(self, uri: str, storage_options: dict[str, Any] | None,
                 clocks: StageClocks | None = None, planned: dict[str, Any] | None = None):
        """``planned``: its ``zarr.json``'s identity as the plan found it; another is refused
        (a genome ingested again over it since). The contig table is the process's kept one of
        that version (:func:`read_genome`), and the arrays are opened each by its own metadata,
        not through the group (whose ``zarr.json`` is that table: a GET of it a shard)."""
        super().__init__(clocks)
        self.uri = uri
        genome = read_genome(uri, storage_options, planned)
        self.contigs, self.locations = genome.contigs, genome.locations
        self.store = _genome_store(uri, storage_options)
        self.arrays: dict[str, Any] = {}
        self._opening = threading.Lock()
        self.chunks = ChunkCache()

    def _array(self, key: str) -> Any:
        """An array of the genome, opened at its first read: opening every contig's up front cost
        one metadata request per contig at each shard's start (an assembly of 100,000 scaffolds
        over object storage, in layout version 1: 100,000 requests before the first window).
        Opened once: a reader's threads all read the packed array at its start, and each opened
        it (its metadata's GET, 4 a shard)."""
        import zarr

        with self._opening:
            array = self.arrays.get(key)
            if array is None:
                array = self.arrays[key] = zarr.open_array(self.store, path=key, mode="r", zarr_format=3)
            return array

    def _read(self, contig: str, start: int, end: int) -> np.ndarray:
        key, offset = self.locations[contig]
        with self._part("storage"):
            codes = self._codes(key, offset + start, offset + end)
        if codes.size and int(codes.max()) > N_CODE:
            at = start + int(np.argmax(codes > N_CODE))
            raise InputError(self.uri, f"{contig}:{at}: the genome store lacks the chunk that holds these "
                                       "bases (copied in part? its chunk files must all be there); copy it "
                                       "again, or ingest the FASTA again")
        return codes

    def _codes(self, key: str, lo: int, hi: int) -> np.ndarray:
        """Codes [lo, hi) of array ``key``, through the reader's chunk cache: small contigs packed
        side by side share a chunk, which each one's read fetched and decoded again (zarr keeps
        no chunks); read-only where they come from the cache."""
        array = self._array(key)

        def read(a: int, b: int) -> np.ndarray:
            codes = np.asarray(array[a:b], dtype=np.uint8)
            self._count(codes.nbytes)
            return codes

        return read_through(self.chunks, key, int(array.chunks[0]), int(array.shape[0]), lo, hi, read)


def _genome_store(uri: str, storage_options: dict[str, Any] | None) -> Any:
    """A read-only zarr store of the genome, its arrays opened from it by key."""
    return zarr_store(uri, storage_options)
