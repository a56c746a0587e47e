"""The manifest: one commit record per committed shard, so ``--resume`` skips exactly those.

Dask keeps no state across a failure, so gpubatch keeps its own. A shard's record (its
:class:`ShardResult`: the attempt's part and zarr group, the part's sha256, what the result
depends on) is written by the worker after the attempt's files are complete, in one request:
a crash at any instant leaves a shard either fully committed or not at all, on disk and on
object storage alike. Files of attempts that no record names are swept (:func:`sweep`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from gpubatch.core.errors import GpubatchError
from gpubatch.core.results import ShardResult
from gpubatch.core.threads import fetched_in_order
from gpubatch.io.redact import redact
from gpubatch.outputs.layout import MANIFEST_DIR, PARTS_DIR, TMP_PREFIX, ZARR, record_name
from gpubatch.outputs.store import OutputStore

log = logging.getLogger("gpubatch")
#: what ``Manifest.iter_committed`` hands a caller of each verified part: its record and bytes
PartSeen = Callable[[ShardResult, bytes], None]
VERIFY_BATCH = 32  # parts read back at once when checking checksums
READ_BATCH = 256  # commit records read at once
BATCHES_AHEAD = 2  # batches of records in flight at once: the one handed out, the next read meanwhile


@dataclass(frozen=True, slots=True)
class CommitRef:
    """What the end of a run needs of a committed shard (its files), a few hundred bytes: the run
    keeps these, not the records, so its memory does not grow with the records' size."""

    shard_id: str
    part: str | None
    group: str | None
    model_sha256: str | None = None

    @classmethod
    def of(cls, entry: ShardResult) -> CommitRef:
        return cls(entry.shard_id, entry.part, entry.group, entry.model_sha256)


class Manifest:
    def __init__(self, store: OutputStore):
        self.store = store

    def record(self, result: ShardResult) -> None:
        """Commit a shard: its record, written last, makes its attempt the shard's result."""
        self.store.write_json(f"{MANIFEST_DIR}/{record_name(result.shard_id)}", result.to_dict(), indent=None)

    def names(self) -> Iterator[str]:
        """The commit records' names, streamed (in no set order)."""
        return (n for n in self.store.iter_names(MANIFEST_DIR) if n.endswith(".json") and not n.startswith(TMP_PREFIX))

    def count(self) -> int:
        """How many commit records there are (a listing: a progress line's total)."""
        return sum(1 for _ in self.names())

    def iter_entries(self, names: Iterable[str] | None = None, batch: int = READ_BATCH) -> Iterator[ShardResult]:
        """Commit records (all, or those of ``names``), read ``batch`` at a time, the next batch
        read while this one is handed out (on object storage): unreadable ones are skipped with
        a warning."""
        pending = iter(self.names() if names is None else names)  # a stream of names is never held whole
        chunks = iter(lambda: [f"{MANIFEST_DIR}/{n}" for n in itertools.islice(pending, batch)], [])
        for _, found in fetched_in_order(chunks, self.store.read_many, BATCHES_AHEAD if self.store.remote else 1,
                                         name="records"):
            for name, data in found.items():
                try:
                    yield ShardResult.from_dict(json.loads(data))
                except (ValueError, TypeError):
                    log.warning("ignoring an unreadable commit record %s", name)

    def unheard(self, known: Container[str]) -> Iterator[ShardResult]:
        """The records of shards not in ``known`` (shard ids): commits that landed after the
        client stopped listening (a Ctrl-C while shards ran on: inline threads, a worker's last
        commit), which status.json left out. One listing, and only those records read."""
        return self.iter_entries([n for n in self.names() if n.removesuffix(".json") not in known])

    def entries(self) -> dict[str, ShardResult]:
        """Every commit record, by shard id (for small outputs and tests; runs stream them)."""
        return {e.shard_id: e for e in self.iter_entries()}

    def iter_committed(self, on_part: PartSeen | None = None) -> Iterator[ShardResult]:
        """Records whose parquet part still exists with the recorded checksum; a part that is
        missing or changed means the shard is not committed (it is computed again). ``on_part``
        is handed each verified part's bytes before its record is yielded (a resume checks the
        part's columns there: the bytes are read for the checksum, and not read twice)."""
        batch: list[ShardResult] = []
        for entry in self.iter_entries():
            batch.append(entry)
            if len(batch) == VERIFY_BATCH:
                yield from self._verified(batch, on_part)
                batch = []
        yield from self._verified(batch, on_part)

    def committed(self) -> dict[str, ShardResult]:
        return {e.shard_id: e for e in self.iter_committed()}

    def _verified(self, batch: list[ShardResult], on_part: PartSeen | None = None) -> Iterator[ShardResult]:
        """The entries whose part has its checksum and whose zarr group (where it has one) is
        there: a commit is both, and a resume that kept a shard without its group described a
        predictions.zarr naming groups that were gone."""
        parts = self.store.read_many([f"{PARTS_DIR}/{e.part}" for e in batch])
        groups = self.store.read_many([_group_marker(e.group) for e in batch if e.group])
        for entry in batch:
            data = parts.get(f"{PARTS_DIR}/{entry.part}")
            if data is None or hashlib.sha256(data).hexdigest() != entry.sha256:
                log.warning("shard %s: its committed part is %s; it will be computed again",
                            entry.shard_id, "missing" if data is None else "corrupt (checksum differs)")
            elif entry.group and _group_marker(entry.group) not in groups:
                log.warning("shard %s: its committed zarr group is missing; it will be computed again",
                            entry.shard_id)
            else:
                if on_part is not None:
                    on_part(entry, data)
                yield entry

    def remove(self, shard_id: str) -> None:
        self.store.delete(f"{MANIFEST_DIR}/{record_name(shard_id)}")


def _group_marker(group: str) -> str:
    """The metadata document of a shard's zarr group (zarr v3), written when the group is made."""
    return f"{ZARR}/{group}/zarr.json"


@runtime_checkable
class KeptFiles(Protocol):
    """Which parts and zarr groups committed records name (a run's CommitIndex answers this
    from disk; a list of records is answered from memory)."""

    def has_part(self, name: str) -> bool: ...

    def has_group(self, name: str) -> bool: ...


class _KeptInMemory:
    def __init__(self, keep: Iterable[ShardResult | CommitRef]):
        keep = list(keep)
        self.parts = {e.part for e in keep if e.part}
        self.groups = {e.group for e in keep if e.group}

    def has_part(self, name: str) -> bool:
        return name in self.parts

    def has_group(self, name: str) -> bool:
        return name in self.groups


def sweep(store: OutputStore, keep: KeptFiles | Iterable[ShardResult | CommitRef]) -> int:
    """Delete parts and zarr groups of attempts no kept record names, and temporaries; returns
    how many were removed. Only names of gpubatch's own making are touched."""
    kept = keep if isinstance(keep, KeptFiles) else _KeptInMemory(keep)
    removed = 0
    for name in store.iter_names(PARTS_DIR):
        if (name.endswith(".parquet") or name.startswith(TMP_PREFIX)) and not kept.has_part(name):
            removed += _tidy(store, f"{PARTS_DIR}/{name}", recursive=False)
    for name in store.iter_names(ZARR):
        if name != "zarr.json" and not name.startswith(".") and not kept.has_group(name):
            removed += _tidy(store, f"{ZARR}/{name}", recursive=True)
    return removed


def _tidy(store: OutputStore, name: str, recursive: bool) -> int:
    """Delete an attempt no record names; 1 when it went. Readers never see such files, so one
    that will not go (storage that kept failing; a suspended run, taken over, that took up its
    shard again and is still writing the group) is left, said, for the next sweep, rather than
    failing the run that sweeps."""
    try:
        store.delete(name, recursive=recursive)
    except (GpubatchError, OSError) as exc:
        log.warning("could not remove %s, an attempt no commit names (%s); the next run sweeps it", name,
                    redact(f"{type(exc).__name__}: {exc}"))
        return 0
    return 1


def remove_temporaries(store: OutputStore, spare: tuple[str, ...] = ()) -> int:
    """Delete the temporary files a killed process left (an interrupted atomic write); call only
    while no process of this run writes, but for the files named in ``spare`` (the lease, whose
    heartbeat runs from the moment it is taken: their temporaries are left)."""
    from gpubatch.outputs.layout import AUDIT_DIR

    removed = 0
    for folder in ("", MANIFEST_DIR, AUDIT_DIR, PARTS_DIR):
        for name in store.iter_names(folder):
            if name.startswith(TMP_PREFIX) and not name.endswith(tuple(f"-{n}" for n in spare)):
                store.delete(f"{folder}/{name}" if folder else name)
                removed += 1
    return removed
