"""Fixed-size records held in memory up to a bound and on local disk past it, and their sort.

A BED of 20 million lines (every CpG site, a genome-wide tiling) held as arrays cost the client
about 2 GB to plan, growing with the file. Here a plan's regions, its cumulative window counts
and the overlap check's sorted copy are :class:`RecordStore` s: at most ``IN_MEMORY`` records
are held in memory; past that they are appended to an unlinked scratch file (``scratch_dir()``,
so a killed client leaves nothing) and read back by file reads, a range at a time, by those that
need them (a shard's regions, a binary search for the region a shard starts in). Every pass over
all of them goes ``IN_MEMORY`` records at a time (:meth:`RecordStore.blocks`).

:func:`sorted_keys` sorts (group, start, place, end) keys by (group, start, place) without holding
them: sorted runs of ``IN_MEMORY`` keys are spilled, then merged ``FAN_IN`` runs at a time (more
passes for more runs), each run read ``IN_MEMORY // FAN_IN`` keys at a time.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any

import numpy as np

from gpubatch.core.files import scratch_dir

#: records a store holds in memory, and a pass over a store holds at once (about 30 MB of
#: regions and their sort keys at most); past it the store spills to disk
IN_MEMORY = 1 << 17
#: a binary search over a spilled store reads one value at a time down to this many, then reads them
SEARCH_BLOCK = 512
#: sorted runs merged at once; more runs are merged in more passes
FAN_IN = 32
#: a region: its contig's code (RegionTable.names), strand, start, end and number (line, index)
REGION = np.dtype([("chrom", "<i4"), ("minus", "i1"), ("start", "<i8"), ("end", "<i8"), ("number", "<i8")])
#: an overlap check's sort key, a row of int64 (plain arrays: a structured array's field
#: arithmetic cost a merge's many small steps several times over): its group (contig code * 2 +
#: minus), start, place in the table, and end
GROUP, START, AT, END = range(4)
KEY_WIDTH = 4


class RecordStore:
    """Records of one dtype (rows of ``width`` of them, or single values) appended a block at a
    time, and read back a range at a time (from memory, or from the scratch file once spilled)."""

    def __init__(self, dtype: np.dtype[Any], width: int | None = None, on_disk: bool = False) -> None:
        self.dtype, self.on_disk = dtype, on_disk  # on_disk: every record goes straight to disk
        self.row: tuple[int, ...] = () if width is None else (width,)
        self._buffer = np.empty((0, *self.row), dtype)
        self._file: IO[bytes] | None = None  # unbuffered: records go in blocks
        self._on_disk = 0

    def __len__(self) -> int:
        return self._on_disk + len(self._buffer)

    def extend(self, rows: np.ndarray) -> None:
        """Records after the others: in memory while there are at most ``IN_MEMORY``, on disk
        (all of them) past that."""
        if not len(rows):
            return
        if self._file is None and not self.on_disk and len(self._buffer) + len(rows) <= IN_MEMORY:
            self._buffer = np.concatenate((self._buffer, rows)) if len(self._buffer) else np.array(rows, self.dtype)
            return
        if len(self._buffer):
            self._write(self._buffer)
            self._buffer = self._buffer[:0]
        self._write(rows)

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Records ``lo`` to ``hi`` (clipped to those there are), read from disk into memory once
        spilled: a file read, not a memory map, so that a pass over all of them leaves the
        process's resident memory as it found it (a map's pages, once read, stayed counted)."""
        lo, hi = max(0, lo), min(hi, len(self))
        if self._file is None or hi <= lo:
            return self._buffer[lo:hi]
        size = self.dtype.itemsize * (int(np.prod(self.row)) if self.row else 1)
        data = os.pread(self._file.fileno(), (hi - lo) * size, lo * size)
        return np.frombuffer(data, self.dtype).reshape(-1, *self.row)

    def searchsorted(self, value: int) -> int:
        """Where ``value`` goes in a sorted store of single values, after its equals (a binary
        search by file reads, ending in one block's)."""
        lo, hi = 0, len(self)
        while hi - lo > SEARCH_BLOCK:
            mid = (lo + hi) // 2
            if int(self.read(mid, mid + 1)[0]) <= value:
                lo = mid + 1
            else:
                hi = mid
        return lo + int(np.searchsorted(self.read(lo, hi), value, side="right"))

    def blocks(self, size: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(offset, records) ``size`` (``IN_MEMORY``) at a time."""
        size = size or IN_MEMORY
        for lo in range(0, len(self), size):
            yield lo, self.read(lo, lo + size)

    def _write(self, rows: np.ndarray) -> None:
        """Records onto the end of the scratch file, made at the first."""
        folder = scratch_dir()
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="regions-", dir=folder, buffering=0)  # noqa: SIM115 - closed with the store
            self._file.seek(0, os.SEEK_END)
            self._file.write(np.ascontiguousarray(rows, self.dtype).tobytes())
        except OSError as exc:
            raise OSError(exc.errno, f"planning keeps a BED's regions past {IN_MEMORY} on disk, in {folder} "
                                     f"(tens of bytes a region), and could not write there: {exc.strerror}; free "
                                     "space there or set GPUBATCH_CACHE to a folder on a disk with room") from exc
        self._on_disk += len(rows)


def sorted_keys(blocks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Key rows (GROUP, START, AT, END), given as blocks of at most ``IN_MEMORY``, in (group, start, at) order, as
    blocks; ``at`` is unique, so the order is total (a stable sort's by group and start of records
    given in ``at`` order). One block is sorted in memory; more are sorted runs on disk, merged
    ``FAN_IN`` at a time as they come (a level's ``FAN_IN`` runs make one of the next level), so
    the runs open at once are ``FAN_IN`` a level, not one per block of the file."""
    levels: list[list[RecordStore]] = []
    first: np.ndarray | None = None
    for block in blocks:
        if first is not None:
            _add_run(levels, _run([first]))
        first = block[_order(block)]
    if first is None:
        return
    if not levels:
        yield first
        return
    _add_run(levels, _run([first]))
    runs = [run for level in levels for run in level]
    while len(runs) > FAN_IN:
        runs = [_run(_merge(runs[i:i + FAN_IN])) for i in range(0, len(runs), FAN_IN)]
    yield from _merge(runs)


def _add_run(levels: list[list[RecordStore]], run: RecordStore, level: int = 0) -> None:
    """A sorted run into its level; a level's ``FAN_IN`` runs merged into one of the next."""
    if level == len(levels):
        levels.append([])
    levels[level].append(run)
    if len(levels[level]) == FAN_IN:
        merged = _run(_merge(levels[level]))
        levels[level] = []
        _add_run(levels, merged, level + 1)


def _run(blocks: Iterable[np.ndarray]) -> RecordStore:
    """Sorted blocks written, in order, to a run on disk."""
    run = RecordStore(np.dtype(np.int64), KEY_WIDTH, on_disk=True)
    for block in blocks:
        run.extend(block)
    return run


def _merge(runs: Sequence[RecordStore]) -> Iterator[np.ndarray]:
    """Sorted runs of key rows merged into sorted blocks, each run read ``IN_MEMORY // len(runs)`` keys
    at a time: every key up to the smallest of the heads' last keys is safe to give (each run's
    unread keys are past its head's last), and the run with that smallest one is read again."""
    size = max(1, IN_MEMORY // max(1, len(runs)))
    heads = [head for head in (_Head(run, size) for run in runs) if head.live]
    while heads:
        cutoff = min(head.last for head in heads)
        taken = [part for head in heads if len(part := head.take(cutoff))]
        heads = [head for head in heads if head.live]
        if len(taken) == 1:
            yield taken[0]
        else:
            block = np.concatenate(taken)
            yield block[_order(block)]


Key = tuple[int, int, int]


def _key(row: np.ndarray) -> Key:
    return int(row[GROUP]), int(row[START]), int(row[AT])


def _order(keys: np.ndarray) -> np.ndarray:
    """The order of key rows by group, start, then place."""
    return np.lexsort((keys[:, AT], keys[:, START], keys[:, GROUP]))


class _Head:
    """The next ``size`` keys of a sorted run, and the first and last of them as tuples (a
    merge's round compares those, not arrays, for the runs it takes nothing or everything from)."""

    def __init__(self, run: RecordStore, size: int) -> None:
        self.run, self.size, self.pos = run, size, 0
        self._read()

    @property
    def live(self) -> bool:
        return len(self.keys) > 0

    def _read(self) -> None:
        self.keys = self.run.read(self.pos, self.pos + self.size)
        self.pos += len(self.keys)
        if len(self.keys):
            self.first, self.last = _key(self.keys[0]), _key(self.keys[-1])

    def take(self, cutoff: Key) -> np.ndarray:
        """The head's keys at or before ``cutoff`` (its first ones), read past."""
        if self.first > cutoff:
            return self.keys[:0]
        n = len(self.keys) if self.last <= cutoff else _not_past(self.keys, cutoff)
        part, self.keys = self.keys[:n], self.keys[n:]
        if not len(self.keys):
            self._read()
        else:
            self.first = _key(self.keys[0])
        return part


def _not_past(head: np.ndarray, cutoff: Key) -> int:
    """How many of a sorted head's keys are at or before ``cutoff`` (they are its first ones)."""
    group, start, at = cutoff
    groups, starts = head[:, GROUP], head[:, START]
    before = (groups < group) | ((groups == group) & ((starts < start) | ((starts == start) & (head[:, AT] <= at))))
    return int(before.sum())
