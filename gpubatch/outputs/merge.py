"""The end of a run: committed parts merged into predictions.parquet, the zarr root described.

Only committed attempts are read (the commit records say which), in plan order. On object
storage each part is a round trip (a 3,000-part merge on S3 took 41 s, nearly all of it waiting),
so up to PARTS_AHEAD parts are read ahead of the one being joined, within BYTES_AHEAD bytes
(core.threads.fetched_in_order); they are joined one at a time, in order. The same on a local
output on a network or shared filesystem (NFS, Lustre, GPFS, CephFS, SMB, FUSE: io.mounts), where
each part's open and read is a round trip too; on a local disk parts are read one at a time (threads
would only add overhead). Small parts are gathered into row groups of ROW_GROUP_ROWS rows (or ROW_GROUP_BYTES, or
ROW_GROUP_PARTS parts): a row group per part would make a genome run of 100,000 one-window shards a file
of 100,000 row groups, whose footer the writer holds in memory until it closes and every reader
parses. The merge's memory is one row group and the parts read ahead, whatever the run's size.

Parts join only when they have the same columns, in the same order (:class:`PartColumns`). A
``--resume`` checks its committed parts with it before it computes anything (an output written
by an earlier gpubatch, whose windows parts lacked the ``region`` column, had its resume compute
every remaining shard and then fail here); the merge checks every part again and names the one
that does not fit, rather than failing in pyarrow's cast.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from gpubatch.core.errors import PartsDoNotMergeError
from gpubatch.core.results import ShardResult
from gpubatch.core.threads import fetched_in_order
from gpubatch.io.mounts import on_network_filesystem
from gpubatch.io.redact import redact
from gpubatch.outputs.layout import PARTS_DIR, PREDICTIONS, ZARR
from gpubatch.outputs.manifest import VERIFY_BATCH, CommitRef
from gpubatch.outputs.store import OutputStore, output_errors
from gpubatch.outputs.writer import parquet_writer

if TYPE_CHECKING:
    from gpubatch.core.phases import Phase

ROW_GROUP_ROWS = 65536
ROW_GROUP_BYTES = 64 << 20
#: parts gathered into one row group at most: the gathered table is re-joined every PARTS_HELD
#: parts, and the joins of one group of 50,000 one-row parts left about 20 MB behind in the
#: allocator, 4,096 parts about 8 MB (100,000 one-row parts make 98 row groups of 1,024 rows)
ROW_GROUP_PARTS = 1024
#: parts held as separate tables before they are joined into one (each table's objects cost kBs)
PARTS_HELD = 64
#: parts read ahead of the merge at most, their requests in flight at once: as many as a resume
#: reads back at once to check their checksums (S3's connection pool is wider: io.storage)
PARTS_AHEAD = VERIFY_BATCH
#: bytes of parts read ahead at most, each part reckoned at the largest one read so far
BYTES_AHEAD = ROW_GROUP_BYTES
#: every index column's Arrow type, as the readers write it (docs/outputs.md lists them; the
#: sources' conformance tests check their rows against it): a guess by name typed slides'
#: ``level`` int64 where every part has int32, so an empty run's file had another schema
INDEX_TYPES: dict[str, pa.DataType] = {
    "slide": pa.string(), "x": pa.int64(), "y": pa.int64(), "level": pa.int32(),
    "chrom": pa.string(), "start": pa.int64(), "end": pa.int64(), "strand": pa.string(), "region": pa.int64(),
    "variant_id": pa.string(), "pos": pa.int64(), "ref": pa.string(), "alt": pa.string(), "ref_match": pa.bool_(),
}


def empty_index_table(columns: list[str]) -> pa.Table:
    """Zero rows with the index columns typed as a non-empty run types them."""
    return pa.schema([(c, INDEX_TYPES[c]) for c in columns]).empty_table()


def empty_run_schema(part: pa.Schema, index_columns: list[str]) -> pa.Schema | None:
    """The schema of a run with no rows, from a zero-row part (a slide with no tissue writes its
    columns typed, outputs included): the index columns as :data:`INDEX_TYPES` types them, then
    the part's outputs. None for a part that does not begin with the index columns (an earlier
    gpubatch's empty part has no columns at all)."""
    if part.names[:len(index_columns)] != index_columns:
        return None
    index = empty_index_table(index_columns).schema
    return pa.schema([*index, *(f for f in part if f.name not in index_columns)])


def read_part(store: OutputStore, entry: ShardResult | CommitRef, columns: Iterable[str] | None = None) -> pa.Table:
    """A committed shard's parquet part; ``columns``: only those of them it has (all when None)."""
    return part_table(part_bytes(store, entry), columns)


def part_bytes(store: OutputStore, entry: ShardResult | CommitRef) -> bytes:
    """A committed shard's parquet part, as stored."""
    return store.read_bytes(f"{PARTS_DIR}/{entry.part}")


def part_table(data: bytes, columns: Iterable[str] | None = None) -> pa.Table:
    """A parquet part's table from its bytes; ``columns``: only those of them it has (all when None)."""
    # ParquetFile, not pq.read_table: the latter goes through the dataset API, whose per-call
    # state left about 20 kB per part behind (60 MB over a 3,000-shard merge)
    with pq.ParquetFile(io.BytesIO(data)) as part:
        if columns is None:
            return part.read()
        return part.read(columns=[c for c in columns if c in part.schema_arrow.names])


def part_columns(data: bytes) -> list[str] | None:
    """A parquet part's column names, from its footer alone; None for a part with no rows (a
    slide with no tiles: the merge skips it, and its schema is empty)."""
    meta = pq.read_metadata(pa.BufferReader(data))
    return None if meta.num_rows == 0 else meta.schema.to_arrow_schema().names


def columns_difference(names: Sequence[str], other: Sequence[str]) -> str:
    """``names`` against ``other``, in words: what it lacks and adds, or that the order differs."""
    lacks, adds = [c for c in other if c not in names], [c for c in names if c not in other]
    words = ([f"lacks {', '.join(lacks)}"] if lacks else []) + ([f"has {', '.join(adds)} besides"] if adds else [])
    return " and ".join(words) or f"has the same columns in another order ({', '.join(names)})"


class PartColumns:
    """Whether parts, seen one at a time, join into one predictions.parquet: each starts with the
    run's index columns (``index``: what this gpubatch writes; a part an earlier one wrote may lack
    one) and has the columns of the first part seen. Column types are left to the merge's cast,
    which joins what can be joined (an int32 column under an int64 one)."""

    def __init__(self, index: Sequence[str]):
        self.index = list(index)
        self.first: tuple[str, list[str]] | None = None

    def problem(self, part: str, names: list[str] | None) -> str | None:
        """What keeps ``part`` (of columns ``names``; None: no rows) from joining the others, or None."""
        if names is None:
            return None
        lacks = [c for c in self.index if c not in names]
        if lacks:
            return f"{part} lacks the column(s) {', '.join(lacks)}, which this gpubatch writes"
        if names[:len(self.index)] != self.index:
            return (f"{part} begins with the columns {', '.join(names[:len(self.index)])}; this gpubatch's "
                    f"begin with {', '.join(self.index)}")
        if self.first is None:
            self.first = (part, names)
        elif names != self.first[1]:
            return f"{part} {columns_difference(names, self.first[1])} against {self.first[0]}"
        return None


def merge_parquet(store: OutputStore, committed: Iterable[ShardResult | CommitRef], index_columns: list[str],
                  target: str = PREDICTIONS, *, progress: Phase | None = None) -> int:
    """Concatenate the committed parts, in the order given, into one file; returns the rows.

    With no rows at all, the file still has the columns a run with rows has, in their types:
    those of a committed part with no rows (a slide with no tissue), else (nothing committed)
    ``index_columns`` alone; downstream code that joins two runs' files sees one schema.

    ``progress`` counts each part once it is joined. Not ``committed`` drawn through
    ``Phase.counting``: the reads ahead draw it up to PARTS_AHEAD parts ahead of the join, so
    the count said 32 parts merged where one was (and "3,000 of 3,000" while 32 were still read).
    """
    columns = PartColumns(index_columns)
    empty: pa.Schema | None = None
    parts = fetched_in_order(committed, lambda entry: part_bytes(store, entry), PARTS_AHEAD if _reads_ahead(store) else 1,
                             size=len, budget=BYTES_AHEAD, name="merge")
    # closed before the file is discarded on an error: the reads ahead cancelled or finished first
    with store.open_write(target) as f, contextlib.closing(parts):
        joined = _Joined(f)
        try:
            for entry, data in parts:
                table = part_table(data)
                if table.num_rows == 0:  # a slide with no tiles adds no rows (its zarr group keeps the widths)
                    if empty is None:
                        empty = empty_run_schema(table.schema, index_columns)
                else:
                    problem = columns.problem(f"{PARTS_DIR}/{entry.part}", table.schema.names)
                    if problem is not None:
                        raise PartsDoNotMergeError(redact(store.uri), problem)
                    joined.add(table)
                if progress is not None:
                    progress.advance()
        except BaseException:
            joined.abandon()
            raise
        joined.finish(empty_index_table(index_columns).schema if empty is None else empty)
    return joined.rows


def _reads_ahead(store: OutputStore) -> bool:
    """Whether each part read waits on a network: object storage, or a local path on a network
    or shared filesystem (a cluster's outputs mostly are)."""
    return store.remote or on_network_filesystem(store.uri)


class _Joined:
    """predictions.parquet as the merge writes it: the parts gathered into row groups (the
    module's docstring says why), the writer made with the first part's schema."""

    def __init__(self, f: Any):
        self.f = f
        self.writer: pq.ParquetWriter | None = None
        self.gathered: list[pa.Table] = []
        self.rows = self.held_rows = self.held_bytes = self.held_parts = 0

    def add(self, table: pa.Table) -> None:
        """One part's rows, after those added before (cast to the first part's types)."""
        if self.writer is None:
            self.writer = parquet_writer(self.f, table.schema)
        writer = self.writer
        self.gathered.append(table if table.schema.equals(writer.schema) else table.cast(writer.schema))
        self.rows, self.held_rows = self.rows + table.num_rows, self.held_rows + table.num_rows
        self.held_bytes, self.held_parts = self.held_bytes + table.nbytes, self.held_parts + 1
        if self.held_rows >= ROW_GROUP_ROWS or self.held_bytes >= ROW_GROUP_BYTES or self.held_parts >= ROW_GROUP_PARTS:
            _write_row_group(writer, self.gathered)
            self.held_rows = self.held_bytes = self.held_parts = 0
        elif len(self.gathered) >= PARTS_HELD:  # thousands of tiny tables cost more than their rows
            self.gathered[:] = [pa.concat_tables(self.gathered).combine_chunks()]

    def finish(self, empty: pa.Schema) -> None:
        """The file's last row group and footer; with no rows added, a file of ``empty``'s columns."""
        if self.writer is None:
            pq.write_table(empty.empty_table(), self.f)
            return
        _write_row_group(self.writer, self.gathered)
        self.writer.close()

    def abandon(self) -> None:
        """A merge that failed: its writer closed now, into the file about to be discarded, else
        its finaliser writes the footer later into a closed file (and says so on stderr)."""
        if self.writer is not None:
            with contextlib.suppress(Exception):  # the merge's own error is the one to report
                self.writer.close()


def _write_row_group(writer: pq.ParquetWriter, tables: list[pa.Table]) -> None:
    """The gathered parts as one row group, or as several of ROW_GROUP_ROWS rows where they hold
    more (a slide's part of a million tiles was one row group, which a reader of one slide's
    rows, ``per_slide``, then held whole); the list is emptied."""
    if tables:
        writer.write_table(pa.concat_tables(tables), row_group_size=ROW_GROUP_ROWS)
    tables.clear()


def describe_zarr(store: OutputStore, committed: Iterable[ShardResult | CommitRef], info: dict[str, Any],
                  state: str = "finished") -> None:
    """The zarr root's attributes: shards in plan order and the group holding each one's arrays.
    For a run whose output formats include zarr: written even when no shard committed (every
    input quarantined), as ``shards: []``, so that readers of the root find it and its keys.
    ``complete`` and ``state`` say whether the run that wrote them finished (a run that stopped
    writes them too, :func:`describe_unfinished_zarr`; the run that finishes it rewrites them).

    Groups are named by attempt (``<shard>-<attempt>``): read ``groups[shard_id]`` to find a
    shard's arrays, never a group name from a listing, which may include a killed attempt's.
    """
    groups = {e.shard_id: e.group for e in committed if e.group}  # in order: dicts keep it
    with output_errors(store, ZARR):
        root = store.zarr_group(ZARR, mode="a")
        # one write of the root's metadata (``attrs.update`` rewrites it per key, ``groups`` each time)
        root.update_attributes({"shards": list(groups), "groups": groups, **info,
                                "complete": state == "finished", "state": state})


def mark_zarr_running(store: OutputStore) -> None:
    """Say in the zarr root that a run is under way on it (``complete: false``, ``state:
    running``), where a root is there. A --resume of a finished output left its root saying
    ``complete: true`` while it recomputed shards (one whose input changed: its group swept) and
    until its own end rewrote it, though it had removed report.json and report.html as it began."""
    if not store.exists(f"{ZARR}/zarr.json"):
        return
    with output_errors(store, ZARR):
        store.zarr_group(ZARR, mode="a").update_attributes({"complete": False, "state": "running"})


def describe_unfinished_zarr(store: OutputStore, committed: Iterable[ShardResult], state: str,
                             info: dict[str, Any]) -> None:
    """The zarr root of a run that stopped (interrupted, failed): every committed shard's group
    (``committed``: the commit records, the workers' commits the client never heard of too), by
    shard id as ``predictions(partial=True)`` orders its rows (the plan is the run's alone), with
    ``complete: false``. Without it, a reader of the zarr found the groups but no root saying
    which were committed (a killed attempt leaves one behind), or a finished run's stale list.
    ``model_sha256`` is the records' own where they agree (None where they do not)."""
    groups: dict[str, str] = {}
    models: set[str | None] = set()
    for entry in committed:
        models.add(entry.model_sha256)
        if entry.group:
            groups[entry.shard_id] = entry.group
    model = next(iter(models)) if len(models) == 1 else None
    ordered = [CommitRef(sid, None, groups[sid]) for sid in sorted(groups)]
    describe_zarr(store, ordered, {**info, "model_sha256": model}, state)
