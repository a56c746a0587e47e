"""The audit ledger: every run's start and end, every failure, every committed shard, kept across
runs and resumes, so that audit.jsonl says what produced each result and nothing is lost.

Why records and a view, not an appended file: object stores cannot append, and the client can be
killed between a worker's commit and the moment it would have written that shard's line (a
resume then never learned of it). So each event is its own small record under ``_audit/`` and a
committed shard's line comes from its commit record, which the worker writes with the commit:
audit.jsonl is rebuilt from the records (at the end of a run, an interruption, or by
``gpubatch report``), in time order, and has exactly one line per committed shard by construction.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from gpubatch.core.external_sort import sorted_lines
from gpubatch.core.files import scratch_dir
from gpubatch.core.phases import Phase
from gpubatch.core.results import ShardResult
from gpubatch.core.threads import fetched_in_order
from gpubatch.outputs.layout import AUDIT, AUDIT_DIR
from gpubatch.outputs.manifest import BATCHES_AHEAD, READ_BATCH, Manifest
from gpubatch.outputs.store import OutputStore

#: the run-level fields every committed shard's line carries, from its run's start record
RUN_FIELDS = ("backend", "precision", "gpubatch_version", "run_model_sha256", "quantization",
              "batch_size_source")


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


class Ledger:
    """Writes one run's event records and rebuilds audit.jsonl from all runs' records."""

    def __init__(self, store: OutputStore, run_id: str):
        self.store, self.run_id = store, run_id
        self._seq = 0

    def event(self, kind: str, **fields: Any) -> None:
        """Record one event (run_start, run_finish, run_interrupted, run_failed, shard_failed,
        shard_superseded) as its own record."""
        self._seq += 1
        now = time.time()
        record = {"event": kind, "time": now, "run_id": self.run_id, "host": socket.gethostname(),
                  "pid": os.getpid(), **fields}
        self.store.write_json(f"{AUDIT_DIR}/{time.time_ns()}-{self.run_id}-{self._seq:06d}-{kind}.json", record)

    def failure(self, result: ShardResult) -> None:
        self.event("shard_failed", shard_id=result.shard_id, input=result.input, error=result.error,
                   attempt=result.attempt, input_identity=result.input_identity)

    def superseded(self, entry: ShardResult, why: str) -> None:
        """A committed shard computed again (its input changed): its old line stays in the ledger."""
        line = {k: v for k, v in commit_line(entry, {}).items() if k not in ("event", "time", "run_id")}
        self.event("shard_superseded", why=why, committed_by=entry.run_id, **line)

    def records(self) -> list[dict[str, Any]]:
        """Every event record of every run (small outputs and reports; a rebuild streams them)."""
        return list(self.iter_records(self.record_names()))

    def record_names(self) -> list[str]:
        return [f"{AUDIT_DIR}/{n}" for n in self.store.listdir(AUDIT_DIR) if n.endswith(".json")]

    def iter_records(self, names: list[str]) -> Iterator[dict[str, Any]]:
        """The event records of ``names``, read READ_BATCH at a time (the next batch meanwhile, as
        Manifest.iter_entries reads commit records)."""
        chunks = (names[lo : lo + READ_BATCH] for lo in range(0, len(names), READ_BATCH))
        for _, found in fetched_in_order(chunks, self.store.read_many, BATCHES_AHEAD if self.store.remote else 1,
                                         name="records"):
            yield from (json.loads(data) for data in found.values())

    def materialize(self, committed: Iterable[str] | None = None, progress: Phase | None = None) -> int:
        """Rewrite audit.jsonl from the records and commit records; returns its line count.

        ``committed`` names the commit records to include (a run passes its commit index's, in
        plan order); by default every record in the manifest. Records are streamed, each kept
        only as its sort key and its JSON line, and the lines are sorted on disk past a chunk
        (core.external_sort): memory does not grow with the number of shards. The event
        records' names are listed whole: a few per run, plus one per failed attempt. ``progress``
        counts the commit records read (the step's total is the caller's: it knows how many).
        """
        runs: dict[str, dict[str, Any]] = {}

        def lines() -> Iterator[tuple[float, str, str]]:
            for event in self.iter_records(self.record_names()):  # one read of each record
                if event.get("event") == "run_start":
                    runs[event["run_id"]] = event
                yield _sortable(event)
            entries = Manifest(self.store).iter_entries(committed)
            for entry in entries if progress is None else progress.counting(entries):  # after every run_start
                run = runs.get(entry.run_id or "", {})
                yield _sortable(commit_line(entry, {k: run[k] for k in RUN_FIELDS if k in run}))

        count = 0
        with self.store.open_write(AUDIT) as f:
            for _, _, text in sorted_lines(lines(), folder=scratch_dir()):
                f.write(text.encode())
                count += 1
        return count


def _sortable(line: dict[str, Any]) -> tuple[float, str, str]:
    return (line.get("time") or 0.0, line.get("event", ""), json.dumps(line, default=str) + "\n")


def commit_line(entry: ShardResult, run_fields: dict[str, Any]) -> dict[str, Any]:
    """The audit line of a committed shard: what it read, with which model, where and when."""
    return {
        "event": "shard_committed", "time": entry.end, "run_id": entry.run_id, "shard_id": entry.shard_id,
        "input": entry.input, "status": entry.status, **entry.input_identity, "items": entry.items,
        "model_sha256": entry.model_sha256, "spec_sha256": entry.spec_sha256, "part": entry.part,
        "part_sha256": entry.sha256, "host": entry.host, "pid": entry.pid, "start": entry.start,
        "end": entry.end, "attempt": entry.attempt, **run_fields,
    }
