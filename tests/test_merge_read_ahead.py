"""The merge reads parts ahead on object storage, within a window, and joins them in plan order.

A 3,000-part merge on S3 read one part at a time took 41 s, nearly all of it round trips. The
parts are now read PARTS_AHEAD at a time (within BYTES_AHEAD bytes) ahead of the part being
joined. Measured at the fault proxy of s3_fixtures in front of a real S3 server (moto): how many
part GETs were in flight at once, never more than the window; the merged file the same rows in
the same order as a serial merge's; a part that cannot be read fails the merge with the error a
serial read raises, stops the reads ahead, and leaves no predictions.parquet and no thread; the
merge's progress counts the parts joined, never those only read ahead.
"""

from __future__ import annotations

import gc
import io
import json
import random
import sys
import threading
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3_fixtures import S3Stack

from gpubatch.core.errors import InputError
from gpubatch.core.phases import Phase, phase, shown_as
from gpubatch.core.results import ShardResult
from gpubatch.io.retry import RetryPolicy
from gpubatch.outputs import merge
from gpubatch.outputs import store as store_module
from gpubatch.outputs.layout import MANIFEST_DIR, PARTS_DIR, PREDICTIONS, record_name
from gpubatch.outputs.manifest import CommitRef, Manifest
from gpubatch.outputs.store import OutputStore
from gpubatch.outputs.writer import parquet_writer

pytest_plugins = ["s3_fixtures"]
INDEX = ["slide", "x", "y", "level"]


def _part(shard: int, rows: int) -> pa.Table:
    """A slide part's table: ``rows`` tiles (0: a slide with no tissue, its columns typed)."""
    rng = np.random.default_rng(shard)
    return pa.table({"slide": pa.array([f"s{shard}"] * rows, pa.string()), "x": np.arange(rows, dtype=np.int64),
                     "y": np.full(rows, shard, np.int64), "level": np.zeros(rows, np.int32),
                     "score": rng.random(rows).astype(np.float32)})


def _upload_parts(s3: S3Stack, tables: list[pa.Table]) -> tuple[OutputStore, list[CommitRef]]:
    """The tables as committed parts of a fresh output on the S3 server (uploaded around the
    proxy), and the output's store through the proxy; the refs in a plan order other than the
    parts' names' order."""
    prefix = f"merge-{uuid.uuid4().hex[:8]}"
    files: dict[str, bytes] = {}
    refs = []
    for shard, table in enumerate(tables):
        buffer = io.BytesIO()
        with parquet_writer(buffer, table.schema) as writer:
            writer.write_table(table)
        name = f"{shard:05d}-a.parquet"
        files[f"{s3.bucket}/{prefix}/{PARTS_DIR}/{name}"] = buffer.getvalue()
        refs.append(CommitRef(f"{shard:05d}", name, None))
    s3.fs().pipe(files)
    return OutputStore(s3.uri(prefix), s3.options()), refs


def _merge_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("gpubatch-merge")]


def test_the_merged_file_has_a_serial_merges_rows_in_plan_order(s3: S3Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many small parts, some empty, in a shuffled plan order: read ahead, the file is a serial
    merge's, row for row, and the parts' rows in the plan's order."""
    tables = [_part(shard, 0 if shard % 17 == 5 else 1 + shard % 7) for shard in range(300)]
    store, refs = _upload_parts(s3, tables)
    order = list(range(len(refs)))
    random.Random(3).shuffle(order)
    planned = [refs[i] for i in order]
    monkeypatch.setattr(merge, "PARTS_AHEAD", 1, raising=False)  # one at a time, as the merge read them before
    serial_rows = merge.merge_parquet(store, planned, INDEX, target="serial.parquet")
    monkeypatch.undo()
    assert merge.merge_parquet(store, planned, INDEX) == serial_rows
    merged = pq.read_table(io.BytesIO(store.read_bytes(PREDICTIONS)))
    assert merged.equals(pq.read_table(io.BytesIO(store.read_bytes("serial.parquet"))))
    assert merged.equals(pa.concat_tables(tables[i] for i in order))


@pytest.mark.parametrize("bound", ["parts", "bytes"])
def test_part_reads_overlap_within_the_window(s3: S3Stack, monkeypatch: pytest.MonkeyPatch, bound: str) -> None:
    """Every GET held 50 ms at the proxy: more than one part GET is in flight at once, never more
    than the window allows: 4 parts, or (the bytes bound) 2 parts' bytes."""
    tables = [_part(shard, 20) for shard in range(24)]
    store, refs = _upload_parts(s3, tables)
    largest = max(len(store.read_bytes(f"{PARTS_DIR}/{r.part}")) for r in refs)
    window = 4 if bound == "parts" else 2
    monkeypatch.setattr(merge, "PARTS_AHEAD", 4 if bound == "parts" else 8, raising=False)
    if bound == "bytes":
        monkeypatch.setattr(merge, "BYTES_AHEAD", 2 * largest + 1, raising=False)
    s3.proxy.reset()
    s3.proxy.configure(latency_s=0.05)
    assert merge.merge_parquet(store, refs, INDEX) == 24 * 20
    assert sum(s3.proxy.gets.values()) == len(refs)
    assert 1 < s3.proxy.most_gets_open <= window, s3.proxy.most_gets_open
    assert _merge_threads() == []


@pytest.mark.parametrize("failure", ["missing", "5xx"])
def test_a_part_that_cannot_be_read_fails_the_merge_as_before(s3: S3Stack, monkeypatch: pytest.MonkeyPatch,
                                                              failure: str) -> None:
    """The 11th part of 40 missing (404) or always answered 503: the merge raises the error a
    serial read of that part raises, reads no part past the window after it, leaves no
    predictions.parquet behind and no read thread running. Its writer is closed into the file it
    discards: left to its finaliser, it wrote the footer later into a closed file, said on stderr."""
    tables = [_part(shard, 5) for shard in range(40)]
    store, refs = _upload_parts(s3, tables)
    bad = refs[10]
    monkeypatch.setattr(store_module, "POLICY", RetryPolicy(attempts=2, base_s=0.01, throttle_base_s=0.01))
    if failure == "missing":
        s3.fs().rm_file(f"{store.root}/{PARTS_DIR}/{bad.part}")
    else:
        s3.proxy.configure(slow_gets={f"{store.root}/{PARTS_DIR}/{bad.part}": 1000})
    with pytest.raises(InputError) as serial:
        merge.read_part(store, bad)
    monkeypatch.setattr(merge, "PARTS_AHEAD", 4, raising=False)
    unraisable: list[Any] = []  # what finalisers failed at
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(InputError) as merging:
        merge.merge_parquet(store, refs, INDEX)
    assert str(merging.value) == str(serial.value) and type(merging.value) is type(serial.value)
    del merging  # its traceback holds the merge's frames, and its writer
    gc.collect()
    assert [repr(u.exc_value) for u in unraisable] == []
    assert not store.exists(PREDICTIONS)
    assert _merge_threads() == []
    read = {key.rsplit("/", 1)[-1] for key in s3.proxy.gets}
    assert not read & {r.part for r in refs[10 + 4:]}, "parts past the window were read"


def test_commit_records_are_read_ahead_in_the_order_named(s3: S3Stack) -> None:
    """The run's end reads commit records a batch ahead (Manifest.iter_entries, which the
    per-input outputs, the data-quality notes and audit.jsonl's rebuild read through): in the
    order named, an unreadable record skipped, and a reader that stops early leaves no thread."""
    store = OutputStore(s3.uri(f"records-{uuid.uuid4().hex[:8]}"), s3.options())
    manifest = Manifest(store)
    shards = [f"{i:03d}" for i in range(23)]
    s3.fs().pipe({f"{store.root}/{MANIFEST_DIR}/{record_name(s)}": json.dumps(ShardResult(s, f"in{s}").to_dict()).encode()
                  for s in shards})
    s3.fs().pipe_file(f"{store.root}/{MANIFEST_DIR}/{record_name(shards[7])}", b"{not json")
    named = shards[::-1]
    assert [e.shard_id for e in manifest.iter_entries(map(record_name, named), batch=4)] == \
        [s for s in named if s != shards[7]]
    entries = manifest.iter_entries(map(record_name, named), batch=4)
    assert next(entries).shard_id == named[0]
    assert any(t.name.startswith("gpubatch-records") for t in threading.enumerate())
    del entries
    assert not any(t.name.startswith("gpubatch-records") for t in threading.enumerate())


class _HeldStore(OutputStore):
    """The S3 output, its part reads held: those of ``held`` parts wait at ``barrier`` until every
    one of them is in flight (each wait bounded), and each part read notes the merge's progress
    count beside the parts read by then."""

    def __init__(self, uri: str, options: dict[str, Any], held: set[str], barrier: threading.Barrier):
        super().__init__(uri, options)
        self.held, self.barrier = held, barrier
        self.progress: Phase | None = None
        self.parts_read = 0
        self.seen: list[tuple[str, int, int]] = []  # (part, the progress count, parts read) as each read began
        self._lock = threading.Lock()

    def read_bytes(self, name: str) -> bytes:
        part = name.rsplit("/", 1)[-1]
        if name.startswith(f"{PARTS_DIR}/") and self.progress is not None:
            with self._lock:
                self.seen.append((part, self.progress.done, self.parts_read))
            if part in self.held:
                self.barrier.wait()
        data = super().read_bytes(name)
        if name.startswith(f"{PARTS_DIR}/"):
            with self._lock:
                self.parts_read += 1
        return data


def test_the_merge_counts_the_parts_joined_not_those_read_ahead(s3: S3Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's end counted the merge's parts as the reads ahead drew them (``Phase.counting``
    around the parts): with 8 parts read ahead and none of them read yet, it said "8 of 20 parts"
    where one part was merged. Parts 1 to 8 are held until all 8 are in flight: the count then is
    the one part joined, and it never passed the parts read."""
    tables = [_part(shard, 3) for shard in range(20)]
    uploaded, refs = _upload_parts(s3, tables)
    window = 8
    monkeypatch.setattr(merge, "PARTS_AHEAD", window, raising=False)
    at_barrier: list[tuple[int, str]] = []
    store = _HeldStore(uploaded.uri, s3.options(), {r.part for r in refs[1:1 + window]},
                       threading.Barrier(window, action=lambda: at_barrier.append(_said(store)), timeout=60))
    with shown_as(False), phase("merging the parts", len(refs), "part") as said:
        store.progress = said
        assert merge.merge_parquet(store, refs, INDEX, progress=said) == 20 * 3
        assert said.done == len(refs)
    assert at_barrier == [(1, "1 of 20 parts")]
    assert len(store.seen) == len(refs) and all(count <= read for _, count, read in store.seen), store.seen


def _said(store: _HeldStore) -> tuple[int, str]:
    """The merge's progress count now, and its words as status.json's ``ending`` says them."""
    assert store.progress is not None
    return store.progress.done, store.progress.describe()["words"]
