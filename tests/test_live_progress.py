"""Items done inside running shards reach the client while the shards run.

Progress was told only when a shard finished: a run of one 100k-tile slide (or one shard of a
million windows) said "0/1 shards, 0 items, ETA ?" for as long as it ran. Workers now report
their running counts every few seconds (engine.item_reports; Dask events on a cluster, a direct
call in-process), and the progress lines count them. They are display only: a finished shard's
figure is replaced by its committed count, a failed one's dropped.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import slide_job, synthetic_slides, write_job
from hostile_inputs import truncate_tile

import gpubatch
from gpubatch.core.results import ShardResult
from gpubatch.engine import item_reports
from gpubatch.engine.item_reports import ItemReporter, ShardItems
from gpubatch.runtime import progress
from gpubatch.runtime.progress import InFlight, Progress

LINE = re.compile(r"shards (\d+)/(\d+) done, (\d+) failed, ([\d,]+) items?(?: \(([\d,]+) in running shards\))?")


def _many_tiles_job(tmp_path: Path, uris: list[str], model: Path, profile: str, batch: int = 4,
                    **tiles: Any) -> Path:
    """~48k tiles of 32 px (overlapping by 3/4) from one 2048x1536 slide, ``batch`` to a batch: a
    shard of some seconds (reports come every 2 s) from a small file."""
    job = slide_job(uris, model, tmp_path / "out", tiles={"size": 32, "mpp": 0.25, "overlap": 0.75, **tiles},
                    run={"profile": profile, "workers": 1, "readers": 1, "heartbeat_s": 0.2, "retries": 0})
    job["model"]["batch_size"] = batch
    return write_job(tmp_path / "job.yaml", job)


def _lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, int, int, int, int]]:
    """(done, total, failed, items, of them in running shards) of each progress line logged."""
    found = []
    for record in caplog.records:
        m = LINE.search(record.getMessage())
        if m:
            found.append((int(m[1]), int(m[2]), int(m[3]), int(m[4].replace(",", "")),
                          int((m[5] or "0").replace(",", ""))))
    return found


def _rows(out: Path) -> int:
    return len(pd.read_parquet(out / "predictions.parquet"))


def test_a_running_shard_s_items_are_logged_before_it_finishes_and_counted_once(
        tmp_path: Path, slide_path: Path, mean_model: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A local cluster (a worker process; the reports are Dask events): the log says items
    while the one shard runs, and its end counts the committed rows, not those plus the last
    running figure."""
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    # two to a batch: the shard runs for seconds (here ~6 s), past the workers' 2 s interval
    job = _many_tiles_job(tmp_path, [str(slide_path)], mean_model, "local", batch=2)
    with caplog.at_level(logging.INFO, logger="gpubatch"):
        result = gpubatch.run(job, show_progress=False)
    assert result.exit_code == 0
    lines = _lines(caplog)
    running = [line for line in lines if line[0] == 0 and line[4] > 0]
    assert running, lines  # items moved while no shard had finished
    rows = _rows(tmp_path / "out")
    assert result.report["items"] == rows > max(line[3] for line in running)
    assert lines[-1] == (1, 1, 0, rows, 0)  # the final figure replaced the running one


def test_a_shard_that_fails_part_way_leaves_none_of_its_items_counted(
        tmp_path: Path, slide_path: Path, mean_model: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process (the inline profile: reports handed over directly): a slide with a tile near
    its end cut short counts items as it runs, then fails; the run's lines and report count
    only the good slide's rows."""
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    monkeypatch.setattr(item_reports, "REPORT_EVERY_S", 0.2)  # in-process: the shards' own clock
    bad = truncate_tile(slide_path, tmp_path / "bad.tif", index=47)  # the last stored tile
    good = synthetic_slides(tmp_path, 1, seed=5, prefix="good") / "good0.tif"  # small: ~6k tiles
    # read a stored tile at a time (not the whole level in one read): the cut tile is met late
    job = _many_tiles_job(tmp_path, [str(bad), str(good)], mean_model, "inline", read_block=256)
    with caplog.at_level(logging.INFO, logger="gpubatch"):
        result = gpubatch.run(job, show_progress=False)
    assert result.exit_code == 3
    assert [f["input"] for f in result.report["failed"]] == [str(bad)]
    lines, rows = _lines(caplog), _rows(tmp_path / "out")
    # running items beyond what the good slide has: the bad one's were shown as it ran
    assert any(line[2] == 0 and line[4] > rows for line in lines), lines
    assert result.report["items"] == rows
    assert lines[-1] == (1, 2, 1, rows, 0)


def test_a_retried_or_late_attempt_s_items_do_not_survive() -> None:
    """Only the attempt the client waits on counts: a retry starts from nothing, a late report
    of the attempt before (or of another run on the same scheduler) changes nothing, and an
    ended attempt's figure is gone."""
    flight = InFlight("run-1")
    flight.started("s1", 1)
    flight.report(ShardItems("run-1", "s1", 1, 500, 1000))
    assert flight.items() == 500 and flight.left() == (1, 500)
    flight.started("s1", 2)  # attempt 1 failed after 500 items; retried
    flight.report(ShardItems("run-1", "s1", 1, 700, 1000))  # attempt 1's last words, late
    flight.report(ShardItems("run-2", "s1", 2, 900, 1000))  # another run's shard of the same name
    assert flight.items() == 0
    flight.report(ShardItems("run-1", "s1", 2, 300, 1000))
    flight.report(ShardItems("run-1", "s1", 2, 200, 1000))  # out of order: the count only grows
    assert flight.items() == 300
    flight.ended("s1")
    flight.report(ShardItems("run-1", "s1", 2, 1000, 1000))  # after its result
    assert flight.items() == 0 and flight.left() == (0, 0)
    assert ShardItems.from_msg({"unrelated": 1}) is None
    assert ShardItems.from_msg(ShardItems("r", "s", 1, 2).to_msg()) == ShardItems("r", "s", 1, 2)


def test_a_shard_run_again_after_its_worker_was_lost_counts_from_nothing() -> None:
    """Dask runs a shard whose worker was lost again on another worker as the same attempt: its
    reports count, but its figure held the lost run's count (the larger, as the count only
    grows) until the new run passed it, and the ETA with it."""
    flight = InFlight("run-1")
    flight.started("s1", 1)
    flight.report(ShardItems("run-1", "s1", 1, 800, 1000))
    flight.restarted("s1")  # the submitter, told the worker executing s1 was lost
    assert flight.items() == 0 and flight.left() == (1, 1000)
    flight.report(ShardItems("run-1", "s1", 1, 100, 1000))
    assert flight.items() == 100
    flight.restarted("s2")  # a shard no longer in flight: nothing to do
    assert flight.left() == (1, 900)


def test_the_eta_goes_by_items_where_their_count_is_known() -> None:
    """A genome plan knows each shard's windows: its ETA is items left over the items' rate, not
    "?" until a shard finishes. Where the plan does not know (slides), the running shards' own
    counts give it, and a shard not started (or not yet said) counts as the mean of those known:
    a run of many slides said "ETA ?" until its first slide finished."""
    planned = Progress(1, enabled=False, run_id="r", items_planned=1000)
    planned.in_flight.started("s1", 1, 1000)
    assert planned.eta_s() is None  # nothing done: no rate yet
    planned.t0 -= 10.0
    planned.in_flight.report(ShardItems("r", "s1", 1, 250))
    assert planned.eta_s() == pytest.approx(30.0, rel=0.01)  # 750 left at 25 items/s
    slides = Progress(3, enabled=False, run_id="r")
    slides.t0 -= 10.0
    slides.in_flight.started("a", 1)
    assert slides.eta_s() is None  # no count known, nothing done
    slides.in_flight.report(ShardItems("r", "a", 1, 100, 400))
    # a: 300 left; b and c not started, counted as a's 400 each: 1,100 at 10 items/s
    assert slides.eta_s() == pytest.approx(110.0, rel=0.01)
    slides.in_flight.started("b", 1)
    slides.in_flight.report(ShardItems("r", "b", 1, 100, 200))
    # a 300 and b 100 left; c as the mean of 400 and 200: 700 at 20 items/s
    assert slides.eta_s() == pytest.approx(35.0, rel=0.01)
    slides.in_flight.ended("a")
    slides.update(ShardResult(shard_id="a", input="a.tiff", items=400))
    slides.in_flight.started("c", 1)  # started, its count not yet said: the mean of a and b
    assert slides.eta_s() == pytest.approx((100 + 300) * 10.0 / 500, rel=0.01)


class _Reader:
    """A shard of ``n`` one-byte items in one-item read units: a batch per item at batch_size 1."""

    attrs: dict[str, Any] = {}

    def __init__(self, n: int):
        self.n = n

    def read_units(self) -> Any:
        from gpubatch.sources.base import ItemBlock

        for i in range(self.n):
            yield lambda i=i: ItemBlock(np.full((1, 1), i % 256, np.uint8), {"i": np.array([i])})


class _Sink:
    def write(self, index: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        pass


def test_reporting_costs_a_message_per_interval_not_per_item() -> None:
    """The model stage tells the reporter of every batch; what it publishes is bounded by the
    shard's seconds, whatever its items: 5,000 one-item batches in well under a second make
    no report at the default interval and one per 50 ms at 50 ms."""
    from gpubatch.core.clocks import StageClocks
    from gpubatch.engine.pipeline import PipelineConfig, run_pipeline

    sent: list[ShardItems] = []
    for every_s in (2.0, 0.05):
        reporter = ItemReporter("r", "s", 1, 5_000, every_s=every_s, send=sent.append)
        t0 = time.monotonic()
        done = run_pipeline(_Reader(5_000), lambda items, clocks: {"y": items[:, 0]}, _Sink(),  # type: ignore[arg-type]
                            PipelineConfig(batch_size=1, readers=1), StageClocks(), on_batch=reporter)
        elapsed = time.monotonic() - t0
        assert done == reporter.items == 5_000
        assert reporter.sent == len(sent) <= elapsed / every_s + 1, (reporter.sent, elapsed)
        assert reporter.sent >= 1 or elapsed < 2 * every_s  # and it does report, at its pace
        sent.clear()
