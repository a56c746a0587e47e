"""The run's index of committed shards, on local disk, so the client's memory does not grow
with the number of shards.

The end of a run needs, for every committed shard, the files its commit record names (to sweep
the rest, merge the parts in plan order and describe the zarr groups), and ``--resume`` needs to
know which shards to skip. At a few hundred bytes each that is tens of megabytes for a
100,000-shard job, so the references live in a SQLite file instead of a dict. The file is
scratch: the manifest on the output is the truth, and the index is rebuilt from it on resume.
It is unlinked as soon as it is open, so a killed client leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from gpubatch.core.files import scratch_dir
from gpubatch.outputs.manifest import CommitRef

LOOKUP_BATCH = 500  # shard ids looked up per query (SQLite's default limit on parameters is 999)
PAGE_CACHE_KB = 2048


class CommitIndex:
    """shard id -> :class:`CommitRef`, for one run; used from the thread that made it."""

    def __init__(self, folder: str | Path | None = None):
        where = Path(folder) if folder is not None else scratch_dir()
        fd, path = tempfile.mkstemp(prefix="commits-", suffix=".sqlite", dir=where)
        os.close(fd)
        self._db = sqlite3.connect(path, isolation_level=None)
        with contextlib.suppress(OSError):  # POSIX: the open file lives on until it is closed
            os.unlink(path)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=MEMORY",
                       f"cache_size=-{PAGE_CACHE_KB}"):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.execute("CREATE TABLE refs (shard_id TEXT PRIMARY KEY, part TEXT, grp TEXT, model TEXT)")
        self._db.execute("CREATE INDEX refs_part ON refs(part)")
        self._db.execute("CREATE INDEX refs_grp ON refs(grp)")

    def add(self, ref: CommitRef) -> None:
        """Record a committed shard (a later commit of the same shard replaces the earlier)."""
        self._db.execute("INSERT OR REPLACE INTO refs VALUES (?, ?, ?, ?)",
                         (ref.shard_id, ref.part, ref.group, ref.model_sha256))

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM refs").fetchone()[0])

    def __contains__(self, shard_id: object) -> bool:
        return self._db.execute("SELECT 1 FROM refs WHERE shard_id = ?", (shard_id,)).fetchone() is not None

    def has_part(self, name: str) -> bool:
        return self._db.execute("SELECT 1 FROM refs WHERE part = ?", (name,)).fetchone() is not None

    def has_group(self, name: str) -> bool:
        return self._db.execute("SELECT 1 FROM refs WHERE grp = ?", (name,)).fetchone() is not None

    def model_hashes(self) -> set[str]:
        """The distinct model checksums the committed shards were made with."""
        return {row[0] for row in self._db.execute("SELECT DISTINCT model FROM refs WHERE model IS NOT NULL")}

    def in_order(self, shard_ids: Iterable[str]) -> Iterator[CommitRef]:
        """The committed shards among ``shard_ids``, in that order (the plan's), looked up a
        batch at a time: the plan is streamed, never held."""
        ids = iter(shard_ids)
        while batch := list(itertools.islice(ids, LOOKUP_BATCH)):
            marks = ",".join("?" * len(batch))
            found = {row[0]: CommitRef(*row) for row in self._db.execute(
                f"SELECT shard_id, part, grp, model FROM refs WHERE shard_id IN ({marks})", batch)}
            yield from (found[i] for i in batch if i in found)

    def close(self) -> None:
        self._db.close()
