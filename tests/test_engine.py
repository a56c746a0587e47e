"""The overlapped pipeline: order, batching, bounded look-ahead, starvation both ways, failures."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from gpubatch.core.clocks import StageClocks
from gpubatch.engine.pipeline import PipelineConfig, run_pipeline
from gpubatch.ops.preprocess import Preprocess
from gpubatch.sources.base import ItemBlock, ReadUnit, ShardReader


class CountingReader(ShardReader):
    """Units of ``per_unit`` items whose values are their global index; optional read delay."""

    def __init__(self, units: int, per_unit: int, delay: float = 0.0, fail_at: int | None = None):
        self.units, self.per_unit, self.delay, self.fail_at = units, per_unit, delay, fail_at
        self.attrs = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.started = 0  # units whose read began
        self._lock = threading.Lock()

    @property
    def n_items(self) -> int:
        return self.units * self.per_unit

    def read_units(self) -> Iterator[ReadUnit]:
        for u in range(self.units):
            yield lambda u=u: self._read(u)

    def _read(self, u: int) -> ItemBlock:
        with self._lock:
            self.started += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if u == self.fail_at:
                raise OSError(f"unit {u} is unreadable")
            time.sleep(self.delay)
            ids = np.arange(u * self.per_unit, (u + 1) * self.per_unit)
            return ItemBlock(ids.astype(np.uint8).reshape(-1, 1), {"id": ids})
        finally:
            with self._lock:
                self.in_flight -= 1

    @property
    def preprocess(self) -> Preprocess:  # unused: these tests hand the pipeline their own model stage
        return Preprocess("dna")


class Sink:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.batches: list[int] = []

    def write(self, index: dict, outputs: dict) -> None:
        self.ids.extend(index["id"].tolist())
        self.batches.append(len(index["id"]))
        np.testing.assert_array_equal(outputs["y"][:, 0], (index["id"] % 256) * 2)


def model(delay: float = 0.0, fail: bool = False):
    def run(items: np.ndarray, clocks: StageClocks) -> dict[str, np.ndarray]:
        if fail:
            raise RuntimeError("model exploded")
        time.sleep(delay)
        return {"y": items.astype(np.int64) * 2}

    return run


def test_items_arrive_in_order_in_full_batches() -> None:
    reader, sink, clocks = CountingReader(units=7, per_unit=10), Sink(), StageClocks()
    done = run_pipeline(reader, model(), sink, PipelineConfig(batch_size=16, readers=3), clocks)
    assert done == 70 and sink.ids == list(range(70))
    assert sink.batches == [16, 16, 16, 16, 6]


def test_short_last_batch_is_padded_for_the_model_and_trimmed_after() -> None:
    reader, sink, clocks = CountingReader(units=7, per_unit=10), Sink(), StageClocks()
    shapes: list[int] = []

    def run(items: np.ndarray, clocks: StageClocks) -> dict[str, np.ndarray]:
        shapes.append(len(items))
        return model()(items, clocks)

    done = run_pipeline(reader, run, sink, PipelineConfig(batch_size=16, readers=3, pad_last=True), clocks)
    assert shapes == [16] * 5 and done == 70 and sink.ids == list(range(70))
    assert sink.batches == [16, 16, 16, 16, 6] and clocks.counters["padded.items"] == 10


def test_look_ahead_is_bounded_by_configuration() -> None:
    """Fast reads, a slow model: reads run ahead of the model by at most what the configuration
    allows (the prefetch queue, one batch held by the feeder, readers + 1 units submitted), never
    the whole shard; and no more than ``readers`` reads run at once."""
    reader = CountingReader(units=40, per_unit=4)
    cfg = PipelineConfig(batch_size=4, readers=3, prefetch_batches=2)
    lead: list[int] = []
    consumed = [0]

    def slow(items: np.ndarray, clocks: StageClocks) -> dict[str, np.ndarray]:
        consumed[0] += 1
        time.sleep(0.01)
        lead.append(reader.started - consumed[0])  # units read but not yet at the model (1 unit = 1 batch)
        return model()(items, clocks)

    run_pipeline(reader, slow, Sink(), cfg, StageClocks())
    assert reader.started == 40 and consumed[0] == 40
    assert max(lead) <= cfg.prefetch_batches + 1 + cfg.readers + 1, lead
    assert reader.max_in_flight <= cfg.readers


def test_slow_reader_means_high_starvation() -> None:
    clocks = StageClocks()
    run_pipeline(CountingReader(units=12, per_unit=4, delay=0.05), model(), Sink(),
                 PipelineConfig(batch_size=4, readers=1), clocks)
    assert clocks.starvation > 0.8


def test_slow_model_means_low_starvation() -> None:
    clocks = StageClocks()
    run_pipeline(CountingReader(units=12, per_unit=4), model(delay=0.05), Sink(),
                 PipelineConfig(batch_size=4, readers=2), clocks)
    assert clocks.starvation < 0.1
    assert clocks.stages["read"].blocked_s > 0.1  # readers waited for room: the queue is bounded


def test_reader_failure_propagates_without_hanging() -> None:
    with pytest.raises(OSError, match="unit 5 is unreadable"):
        run_pipeline(CountingReader(units=50, per_unit=4, fail_at=5), model(), Sink(),
                     PipelineConfig(batch_size=4, readers=2, prefetch_batches=1), StageClocks())


def test_model_failure_propagates_without_hanging() -> None:
    with pytest.raises(RuntimeError, match="model exploded"):
        run_pipeline(CountingReader(units=50, per_unit=4), model(fail=True), Sink(),
                     PipelineConfig(batch_size=4, readers=2, prefetch_batches=1), StageClocks())


def test_writer_failure_propagates_without_hanging() -> None:
    class BadSink:
        def write(self, index: dict, outputs: dict) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        run_pipeline(CountingReader(units=50, per_unit=4), model(), BadSink(),
                     PipelineConfig(batch_size=4, readers=2, prefetch_batches=1), StageClocks())


def test_empty_shard() -> None:
    sink = Sink()
    assert run_pipeline(CountingReader(units=0, per_unit=4), model(), sink, PipelineConfig(), StageClocks()) == 0
    assert sink.ids == []


def test_every_stage_s_busy_time_splits_into_parts_that_add_up() -> None:
    """Parts timed while a thread works for a stage are that stage's; what nobody timed is
    ``other``; batch assembly, output handling and the writer are parts, not gaps."""
    from gpubatch.core.clocks import stage_breakdown

    class TimedReader(CountingReader):
        def _read(self, u: int) -> ItemBlock:
            with self.clocks.part("decode"):
                time.sleep(0.02)
            time.sleep(0.01)  # untimed work in the unit: "other"
            return super()._read(u)

    reader, clocks = TimedReader(units=6, per_unit=8), StageClocks()
    reader.clocks = clocks

    def run(items: np.ndarray, clocks: StageClocks) -> dict[str, np.ndarray]:
        with clocks.part("compute"):
            time.sleep(0.03)
        time.sleep(0.01)
        return model()(items, clocks)

    with clocks.part("open"):  # outside every stage: run-wide only
        time.sleep(0.01)
    run_pipeline(reader, run, Sink(), PipelineConfig(batch_size=8, readers=2), clocks)
    split = stage_breakdown({k: v.as_dict() for k, v in clocks.stages.items()}, clocks.stage_parts)
    for stage, parts in split.items():
        assert sum(parts.values()) == pytest.approx(clocks.stages[stage].busy_s, rel=1e-9), stage
    # a sleep never returns early, and on a loaded machine returns late: bounds, not a tolerance
    assert 6 * 0.02 <= split["read"]["decode"] < 6 * 0.02 * 4 and split["read"]["other"] >= 6 * 0.01
    assert "batch" in split["read"] and 6 * 0.03 <= split["model"]["compute"] < 6 * 0.03 * 4
    assert split["model"]["other"] >= 6 * 0.01 * 0.9 and set(split["write"]) == {"write", "other"}
    assert "open" not in split["read"] and clocks.parts["open"] >= 0.01
