"""What a worker process keeps of a reference between its shards, and what a reader keeps between
its reads.

Why: every shard of a genome run opens the reference again, and some of what it reads at the
start is the same for each shard of the run: a FASTA's .fai and .gzi, a genome zarr's contig
table (its root attribute: ~11 MB of JSON at 200,000 contigs, one GET and a parse a shard over
object storage). :class:`KeptByVersion` keeps such a thing under the version it was read at, so
a later shard planned with that version takes it from memory, and a version written since is
never taken for it (its key is another). :class:`ChunkCache` keeps a reader's last few decoded
chunks: neighbouring small contigs of a packed genome lie in one chunk, which each contig's read
fetched and decompressed again.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import numpy as np

Kept = TypeVar("Kept")


class KeptByVersion(Generic[Kept]):
    """Values read at most once per process under a key that holds their version, the most
    recently used last, ``capacity`` at most. Threads asking for one key at once wait for the one
    read (shards opening together), not each make their own. Thread-safe, and fork-safe: a forked
    worker starts with its own locks (one held in the parent at the fork would never open)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._kept: OrderedDict[Hashable, Kept] = OrderedDict()
        self._reading: dict[Hashable, threading.Lock] = {}  # a key's read in flight
        self._lock = threading.Lock()
        _instances.add(self)

    def get_or_read(self, key: Hashable, read: Callable[[], tuple[Kept, bool]]) -> Kept:
        """The value kept under ``key``, else ``read()``'s, kept where it says so (its second
        item: False where what it read turned out not to be of the key's version)."""
        with self._lock:
            reading = self._reading.setdefault(key, threading.Lock())
        with reading:
            try:
                with self._lock:
                    if key in self._kept:
                        self._kept.move_to_end(key)
                        return self._kept[key]
                value, keep = read()
                if keep:
                    self._keep(key, value)
                return value
            finally:
                with self._lock:
                    if self._reading.get(key) is reading:
                        del self._reading[key]

    def _keep(self, key: Hashable, value: Kept) -> None:
        with self._lock:
            self._kept[key] = value
            while len(self._kept) > self.capacity:
                self._kept.popitem(last=False)

    def clear(self) -> None:
        """Drop everything kept (tests; a process that must read again)."""
        with self._lock:
            self._kept.clear()

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._reading.clear()


_instances: weakref.WeakSet[KeptByVersion[Any]] = weakref.WeakSet()


def forget_all() -> None:
    """Drop what every :class:`KeptByVersion` keeps: a process as fresh as a new worker's (tests)."""
    for kept in list(_instances):
        kept.clear()


def _after_fork_in_child() -> None:
    for kept in list(_instances):
        kept._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


#: locks of a chunk cache's reads: chunks next to each other take different ones
READ_STRIPES = 16


class ChunkCache:
    """A reader's last decoded chunks of 1-D arrays, read-only, at most ``max_chunks`` of them
    and ``max_bytes`` together. Keyed (array key, chunk index): a reader's arrays do not change
    under it (its genome's version is checked when it opens)."""

    def __init__(self, max_chunks: int = 8, max_bytes: int = 16 << 20):
        self.max_chunks, self.max_bytes = max_chunks, max_bytes
        self._chunks: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        #: held while a chunk is read, striped by chunk: a reader's threads read neighbouring
        #: contigs at once, and each missed the chunk the other was fetching
        self._reading = [threading.Lock() for _ in range(READ_STRIPES)]

    def reading(self, key: str, index: int) -> threading.Lock:
        """The lock a read of chunk ``index`` of ``key`` (and on) holds; threads after the same
        chunk wait for the first's read, then find it kept."""
        return self._reading[(hash(key) + index) % READ_STRIPES]

    def get(self, key: str, index: int) -> np.ndarray | None:
        with self._lock:
            chunk = self._chunks.get((key, index))
            if chunk is not None:
                self._chunks.move_to_end((key, index))
            return chunk

    def put(self, key: str, index: int, codes: np.ndarray, copy: bool = True) -> None:
        """Keep ``codes`` (a copy where they are a view of a longer read, so that read is not
        held alive); they are read-only from here on."""
        if codes.nbytes > self.max_bytes:
            return
        chunk = codes.copy() if copy else codes
        chunk.setflags(write=False)
        with self._lock:
            old = self._chunks.pop((key, index), None)
            self._bytes += chunk.nbytes - (old.nbytes if old is not None else 0)
            self._chunks[(key, index)] = chunk
            while len(self._chunks) > self.max_chunks or self._bytes > self.max_bytes:
                _, dropped = self._chunks.popitem(last=False)
                self._bytes -= dropped.nbytes


def read_through(cache: ChunkCache, key: str, chunk: int, size: int, lo: int, hi: int,
                 read: Callable[[int, int], np.ndarray]) -> np.ndarray:
    """Codes [lo, hi) of a 1-D array of ``size`` in chunks of ``chunk``, ``read`` where the
    cache lacks them. A range in one chunk or two is read chunk by chunk,
    each kept, or taken where kept (a thread after a chunk another is reading waits for it); a
    longer one is read whole (its inner chunks are no neighbour's), its first and last chunk
    kept: those are what a neighbour's read (the next run of windows) shares with it."""
    first, last = lo // chunk, (hi - 1) // chunk
    if last - first > 1:
        base = first * chunk
        span = read(base, min((last + 1) * chunk, size))
        for index in (first, last):
            cache.put(key, index, span[(index - first) * chunk : (index - first + 1) * chunk])
        return span[lo - base : hi - base]
    pieces = []
    for index in range(first, last + 1):
        with cache.reading(key, index):
            codes = cache.get(key, index)
            if codes is None:
                codes = read(index * chunk, min((index + 1) * chunk, size))
                cache.put(key, index, codes, copy=False)
        pieces.append(codes)
    joined = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    return joined[lo - first * chunk : hi - first * chunk]
