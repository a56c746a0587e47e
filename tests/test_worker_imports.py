"""A shard imports nothing in its worker process: the forkserver the workers fork from has
imported every module a shard needs (runtime.cluster.WORKER_MODULES).

Each run starts new worker processes, so a module a shard imports itself is imported again in
every worker of every run, in front of its first shard: ``gpubatch.sources.slides.open`` and the
backends it names took about 50 ms of CPU per worker, a tenth of a second of a 1-second run on
2 cores (bench/NOTES.md, fifteenth session)."""

from __future__ import annotations

import multiprocessing
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import slide_job, synthetic_slides


def _shard_in_a_fresh_worker(args: tuple[Any, ...], conn: Any) -> None:
    """Run in a process forked from the forkserver: one shard, then the modules it imported."""
    from gpubatch.engine.worker import execute_shard

    before = set(sys.modules)
    result = execute_shard(*args)
    conn.send((result.ok, result.error, sorted(set(sys.modules) - before)))
    conn.close()


def _a_shards_arguments(tmp_path: Path, classifier: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ...]:
    """What the runner submits for a shard of a slides job (tissue detection on, parquet and
    zarr outputs), taken from an inline run of it."""
    import gpubatch
    from gpubatch.runtime.executors import InlineExecutor
    from gpubatch.spec import parse_job

    (tmp_path / "slides").mkdir()
    slides = synthetic_slides(tmp_path / "slides", 1, 11, "s")
    job = slide_job([str(slides / "s0.tif")], classifier, tmp_path / "out",
                    tiles={"tissue": {"method": "otsu", "min_fraction": 0.0}},
                    output={"formats": ["parquet", "zarr"]})
    submitted: list[tuple[Any, ...]] = []
    submit = InlineExecutor.submit

    def recorded(self: InlineExecutor, fn: Any, *args: Any, key: str, worker: str | None = None) -> Any:
        submitted.append(args)
        return submit(self, fn, *args, key=key, worker=worker)

    monkeypatch.setattr(InlineExecutor, "submit", recorded)
    assert gpubatch.run(parse_job(job), show_progress=False).exit_code == 0
    return submitted[0]


def test_a_shard_imports_nothing_the_forkserver_has_not(tmp_path: Path, classifier: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from gpubatch.runtime import cluster

    if cluster._mp_method() != "forkserver":
        pytest.skip("workers are spawned, not forked, on this platform")
    args = _a_shards_arguments(tmp_path, classifier, monkeypatch)
    cluster._ensure_forkserver()
    ctx = multiprocessing.get_context("forkserver")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_shard_in_a_fresh_worker, args=(args, child))
    proc.start()
    child.close()
    assert parent.poll(120), "the forked process sent nothing"
    ok, error, imported = parent.recv()
    proc.join(30)
    assert ok, error
    assert [m for m in imported if m.startswith("gpubatch")] == [], str(imported)[:3000]
    assert imported == []
