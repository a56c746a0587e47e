"""The client's state does not grow with the job: committed shards indexed on disk, the audit
sorted on disk, per-shard submission state dropped when a shard is final, and Dask's
per-submission span records folded (bench/bench_client.py measures the memory itself)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import windows_job

from gpubatch.core import external_sort
from gpubatch.core.external_sort import sorted_lines
from gpubatch.outputs.commits import CommitIndex
from gpubatch.outputs.manifest import CommitRef


def test_commit_index_answers_in_plan_order_from_disk(tmp_path: Path) -> None:
    index = CommitIndex(tmp_path)
    assert list(tmp_path.iterdir()) == []  # unlinked once open: a killed client leaves nothing
    ids = [f"s{i:05d}" for i in range(1200)]
    committed = ids[::3]
    for i in random.Random(1).sample(committed, len(committed)):
        index.add(CommitRef(i, f"{i}-a.parquet", f"{i}-1" if i.endswith("0") else None, "m1"))
    index.add(CommitRef("s00003", "s00003-b.parquet", None, "m2"))  # a later commit replaces the first
    plan = ids[::-1]
    got = list(index.in_order(plan))
    assert [r.shard_id for r in got] == [i for i in plan if i in set(committed)]
    assert len(index) == len(committed) and "s00003" in index and "s00001" not in index
    assert index.has_part("s00003-b.parquet") and not index.has_part("s00003-a.parquet")
    assert index.has_group("s00030-1") and not index.has_group("s00003-1")
    assert index.model_hashes() == {"m1", "m2"}
    index.close()


def test_sorted_lines_spill_and_merge_like_a_sort(tmp_path: Path) -> None:
    rng = random.Random(2)
    lines = [(float(rng.randint(0, 500)), rng.choice(["a", "b"]), json.dumps({"n": i, "t": "x\ty"}) + "\n")
             for i in range(5000)]
    assert list(sorted_lines(lines, folder=tmp_path, chunk=333)) == sorted(lines)
    assert list(sorted_lines(lines[:10], folder=tmp_path, chunk=333)) == sorted(lines[:10])
    assert list(tmp_path.iterdir()) == []  # the spilled runs are gone
    with pytest.raises(ValueError, match="newline"):
        list(sorted_lines([(1.0, "a", "two\nlines\n")] * 3, folder=tmp_path, chunk=2))


def test_a_run_keeps_no_per_shard_state_and_its_audit_is_sorted_on_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gpubatch
    from gpubatch.runtime import submit

    submitters: list[Any] = []
    run_all = submit.Submitter.run

    def run_and_keep(self: Any, shards: Any) -> None:
        submitters.append(self)
        run_all(self, shards)

    monkeypatch.setattr(submit.Submitter, "run", run_and_keep)
    monkeypatch.setattr(external_sort, "CHUNK_LINES", 7)  # 40 commit lines: six spilled runs
    result = gpubatch.run(windows_job(tmp_path, 40), show_progress=False)
    assert result.exit_code == 0
    assert submitters and submitters[0].attempts == {}  # every shard final: nothing left per shard
    audit = [json.loads(line) for line in (tmp_path / "out" / "audit.jsonl").read_text().splitlines()]
    commits = [a for a in audit if a["event"] == "shard_committed"]
    assert sorted(a["shard_id"] for a in commits) == [f"windows-{i:06d}" for i in range(40)]
    assert [a["time"] for a in audit] == sorted(a["time"] for a in audit)
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "out" / "predictions.parquet")
    assert table.num_rows == 40 and table.column("start").to_pylist() == [i * 32 for i in range(40)]


@pytest.fixture
def cluster_after_30_tasks() -> Iterator[tuple[Any, Any]]:
    """An in-process Dask cluster and client that have run 30 tasks, one key each."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, processes=False, threads_per_worker=1,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        for i in range(30):
            client.submit(abs, -i, key=f"k-{i}").result()
        yield cluster, client


def test_the_schedulers_per_task_records_are_trimmed(cluster_after_30_tasks: tuple[Any, Any]) -> None:
    from dask.utils import key_split

    from gpubatch.runtime.executors import trim_scheduler

    cluster, client = cluster_after_30_tasks
    spans = cluster.scheduler.extensions["spans"].spans.values()
    before = sum(len((s._metadata or {}).get("collections", [])) for s in spans)
    assert before >= 30  # Dask's record of every submit (what the fold exists for)
    assert key_split.cache_info().currsize >= 30  # and of every key's name
    assert client.run_on_scheduler(trim_scheduler) == before - len(spans)
    assert all(s._metadata["collections"] == [{"type": "Future"}] for s in spans if s._metadata)
    assert key_split.cache_info().currsize == 0


def test_the_executor_trims_its_in_process_scheduler_without_waiting_on_it(
        cluster_after_30_tasks: tuple[Any, Any]) -> None:
    import time

    from dask.utils import key_split

    from gpubatch.runtime.executors import DaskExecutor

    cluster, client = cluster_after_30_tasks
    spans = list(cluster.scheduler.extensions["spans"].spans.values())
    assert any(len(s._metadata["collections"]) > 1 for s in spans if s._metadata)
    DaskExecutor(client, cluster).trim_scheduler()  # queued on the scheduler's loop
    assert key_split.cache_info().currsize == 0  # this process's own cache, at once
    deadline = time.monotonic() + 10
    while any(len(s._metadata["collections"]) > 1 for s in spans if s._metadata):
        assert time.monotonic() < deadline, "the scheduler's span records were not folded within 10 s"
        time.sleep(0.05)


def test_freed_memory_is_handed_back_to_the_system() -> None:
    """Freed blocks among live ones stay in RSS until handed back (glibc keeps holes in its
    heap); the client hands them back every HAND_BACK_S and between its end-of-run steps."""
    from gpubatch.core import memory

    if memory._libc() is None:
        pytest.skip("malloc is not glibc's here: nothing to hand back through malloc_trim")
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    memory.hand_back_freed_memory()
    blocks = [bytes(4000) + bytes([i % 251]) for i in range(40_000)]  # 160 MB in malloc'd blocks
    kept = blocks[::64]  # one live block in every 256 kB: no whole page run is free at the top
    del blocks
    before = proc.memory_info().rss
    memory.hand_back_freed_memory()
    after = proc.memory_info().rss
    assert before - after > 100 * 2**20, f"RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MB"
    assert len(kept) == 625


def test_the_audit_holds_the_commits_it_is_given(tmp_path: Path) -> None:
    """At the end of a run the audit is rebuilt from the run's commit index (what the merge
    used), not from a listing of the whole manifest held in memory."""
    import gpubatch
    from gpubatch.outputs.layout import record_name
    from gpubatch.outputs.ledger import Ledger
    from gpubatch.outputs.store import OutputStore

    assert gpubatch.run(windows_job(tmp_path, 6), show_progress=False).exit_code == 0
    ledger = Ledger(OutputStore(str(tmp_path / "out")), "check")

    def committed() -> list[str]:
        lines = (tmp_path / "out" / "audit.jsonl").read_text().splitlines()
        return [a["shard_id"] for a in map(json.loads, lines) if a["event"] == "shard_committed"]

    ledger.materialize(record_name(f"windows-{i:06d}") for i in (4, 1))
    assert sorted(committed()) == ["windows-000001", "windows-000004"]
    ledger.materialize()  # by default, every commit record in the manifest
    assert sorted(committed()) == [f"windows-{i:06d}" for i in range(6)]


def test_the_merge_gathers_small_parts_into_bounded_row_groups(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Many one-row parts: neither a row group per part (a footer that grows with the run) nor
    one group of every part (a join the merge keeps re-copying): groups of ROW_GROUP_PARTS."""
    import pyarrow.parquet as pq

    import gpubatch
    from gpubatch.outputs import merge

    monkeypatch.setattr(merge, "ROW_GROUP_PARTS", 7)
    monkeypatch.setattr(merge, "PARTS_HELD", 3)
    assert gpubatch.run(windows_job(tmp_path, 40), show_progress=False).exit_code == 0
    merged = pq.ParquetFile(tmp_path / "out" / "predictions.parquet")
    assert [merged.metadata.row_group(i).num_rows for i in range(merged.num_row_groups)] == [7] * 5 + [5]
    assert merged.read().column("start").to_pylist() == [i * 32 for i in range(40)]


def test_a_local_folder_is_listed_as_a_stream(tmp_path: Path) -> None:
    """Sweeping and resuming walk the parts and commit records entry by entry."""
    import types

    from gpubatch.outputs.store import OutputStore

    store = OutputStore(str(tmp_path))
    for i in range(50):
        store.write_bytes(f"_parts/p{i:02d}.parquet", b"x")
    names = store.iter_names("_parts")
    assert isinstance(names, types.GeneratorType)
    seen = []
    for name in names:  # deleting what was seen while the walk goes on
        seen.append(name)
        store.delete(f"_parts/{name}")
    assert sorted(seen) == [f"p{i:02d}.parquet" for i in range(50)] and store.listdir("_parts") == []
    assert list(store.iter_names("absent")) == []
