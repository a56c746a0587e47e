"""The overlapped pipeline on one worker: reader threads -> prefetch queue -> model -> writer.

Reader threads execute a shard's read units (big reads, sliced into items) concurrently; a feeder
thread keeps their results in output order and packs them into batches of uint8 items on a
bounded queue. The model stage (the calling thread) preprocesses and runs each batch; a writer
thread drains results. Memory is bounded by configuration: at most ``readers + 1`` read units in
flight plus ``prefetch_batches`` ready batches plus two result batches, whatever the shard's size.
"""

from __future__ import annotations

import contextvars
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from gpubatch.core.clocks import StageClocks
from gpubatch.core.threads import ContextPool
from gpubatch.engine.model_stage import count_nonfinite
from gpubatch.sources.base import ItemBlock, ShardReader

_DONE = object()


class ResultSink(Protocol):
    """Where the writer thread sends each batch's index columns and model outputs."""

    def write(self, index: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None: ...


class BatchRunner(Protocol):
    """The model stage: uint8 items in, per-item output columns out."""

    def __call__(self, items: np.ndarray, clocks: StageClocks) -> dict[str, np.ndarray]: ...


@dataclass
class PipelineConfig:
    batch_size: int = 64
    readers: int = 4
    prefetch_batches: int = 8
    #: pad a shard's short last batch to ``batch_size`` by repeating its last item; the padded
    #: rows' outputs are dropped. The model then sees one batch shape (every new shape makes ONNX
    #: Runtime's arena or a TensorRT profile allocate anew), and the padding costs no extra copy.
    pad_last: bool = False


class _Failure:
    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def set(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.stop.set()


def _put(q: queue.Queue, item: Any, failure: _Failure) -> float:
    """Put with cancellation; returns seconds spent waiting for room (blocked time)."""
    t0 = time.perf_counter()
    while not failure.stop.is_set():
        try:
            q.put(item, timeout=0.05)
            break
        except queue.Full:
            continue
    return time.perf_counter() - t0


def _get(q: queue.Queue, failure: _Failure) -> tuple[Any, float]:
    """Get with cancellation; returns (item, seconds spent waiting for it: starved time)."""
    t0 = time.perf_counter()
    while True:
        try:
            return q.get(timeout=0.05), time.perf_counter() - t0
        except queue.Empty:
            if failure.stop.is_set():
                return _DONE, time.perf_counter() - t0


class _Batcher:
    """Packs item blocks, in order, into batches of exactly ``size`` items (the last may be short)."""

    def __init__(self, size: int):
        self.size = size
        self.items: list[np.ndarray] = []
        self.index: list[dict[str, np.ndarray]] = []
        self.count = 0

    def add(self, block: ItemBlock) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray], int]]:
        start = 0
        while start < len(block):
            take = min(self.size - self.count, len(block) - start)
            self.items.append(block.items[start : start + take])
            self.index.append({k: v[start : start + take] for k, v in block.index.items()})
            self.count += take
            start += take
            if self.count == self.size:
                yield self.flush()

    def flush(self, pad: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
        """(items, index, real rows) of the batch so far; with ``pad``, the items are written into
        a full-size array whose extra rows repeat the last item."""
        real = self.count
        if pad and 0 < self.count < self.size:
            items = np.empty((self.size, *self.items[0].shape[1:]), dtype=self.items[0].dtype)
            np.concatenate(self.items, out=items[: self.count])
            items[self.count :] = items[self.count - 1]
        else:
            items = self.items[0] if len(self.items) == 1 else np.concatenate(self.items)
        keys = self.index[0].keys() if self.index else []
        index = {k: np.concatenate([ix[k] for ix in self.index]) for k in keys}
        self.items, self.index, self.count = [], [], 0
        return items, index, real


def _timed_unit(unit: Callable[[], ItemBlock], clocks: StageClocks) -> ItemBlock:
    t0 = time.perf_counter()
    try:
        with clocks.in_stage("read"):
            return unit()
    finally:
        clocks.add("read", "busy", time.perf_counter() - t0)


def _assembled(clocks: StageClocks, t0: float) -> None:
    """Batch assembly on the feeder thread is read-stage work: its own part, ``batch``."""
    seconds = time.perf_counter() - t0
    clocks.add("read", "busy", seconds)
    clocks.add_part("batch", seconds, "read")


def _feed(reader: ShardReader, cfg: PipelineConfig, q: queue.Queue, clocks: StageClocks, failure: _Failure) -> None:
    """Feeder thread: submit read units with bounded look-ahead, batch their results in order."""
    batcher = _Batcher(cfg.batch_size)
    pending: deque[Future[ItemBlock]] = deque()
    units = iter(reader.read_units())
    with ContextPool(cfg.readers, thread_name_prefix="gpubatch-read") as pool:
        try:
            exhausted = False
            while not failure.stop.is_set():
                while not exhausted and len(pending) < cfg.readers + 1:
                    unit = next(units, None)
                    if unit is None:
                        exhausted = True
                        break
                    pending.append(pool.submit(_timed_unit, unit, clocks))
                if not pending:
                    break
                block = pending.popleft().result()
                t0 = time.perf_counter()
                for batch in batcher.add(block):
                    _assembled(clocks, t0)
                    clocks.add("read", "blocked", _put(q, batch, failure))
                    t0 = time.perf_counter()
                _assembled(clocks, t0)
            if batcher.count and not failure.stop.is_set():
                t0 = time.perf_counter()
                last = batcher.flush(cfg.pad_last)
                _assembled(clocks, t0)
                clocks.add("read", "blocked", _put(q, last, failure))
        except BaseException as exc:  # noqa: BLE001 - handed to the model stage
            failure.set(exc)
            for fut in pending:
                fut.cancel()
        finally:
            _put(q, _DONE, failure)


def _drain(sink: ResultSink, q: queue.Queue, clocks: StageClocks, failure: _Failure) -> None:
    """Writer thread: hand each result batch to the sink until the model stage is done."""
    try:
        while True:
            item, waited = _get(q, failure)
            clocks.add("write", "starved", waited)
            if item is _DONE:
                return
            t0 = time.perf_counter()
            sink.write(*item)
            elapsed = time.perf_counter() - t0
            clocks.add("write", "busy", elapsed)
            clocks.add_part("write", elapsed, "write")
    except BaseException as exc:  # noqa: BLE001
        failure.set(exc)


def run_pipeline(
    reader: ShardReader,
    run_batch: BatchRunner,
    sink: ResultSink,
    cfg: PipelineConfig,
    clocks: StageClocks,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Run one shard through the overlapped pipeline; returns the number of items processed."""
    failure = _Failure()
    ready: queue.Queue = queue.Queue(maxsize=cfg.prefetch_batches)
    results: queue.Queue = queue.Queue(maxsize=2)
    # both in the shard's context (its storage options, retry policy, stage cache, tallies: io.storage
    # shard_storage), as the feeder's reader threads are (a ContextPool): another job's shard on this
    # worker has its own
    feeder = threading.Thread(target=contextvars.copy_context().run, args=(_feed, reader, cfg, ready, clocks, failure),
                              daemon=True)
    writer = threading.Thread(target=contextvars.copy_context().run, args=(_drain, sink, results, clocks, failure),
                              daemon=True)
    feeder.start()
    writer.start()
    done = 0
    t_start = time.perf_counter()
    try:
        while True:
            item, waited = _get(ready, failure)
            clocks.add("model", "starved", waited)
            if item is _DONE:
                break
            items, index, real = item
            t0 = time.perf_counter()
            with clocks.in_stage("model"):
                outputs = run_batch(items, clocks)
                if real < len(items):
                    outputs = {name: values[:real] for name, values in outputs.items()}
                    clocks.count("padded.items", len(items) - real)
                    items = items[:real]
                with clocks.part("output"):
                    count_nonfinite(outputs, clocks)
            busy = time.perf_counter() - t0
            clocks.add("model", "busy", busy)
            clocks.add("model", "blocked", _put(results, (index, outputs), failure))
            done += len(items)
            clocks.sample(
                t=time.perf_counter() - t_start, items=len(items), busy_s=busy,
                starved_s=waited, queue_depth=ready.qsize(),
            )
            if on_batch:
                on_batch(len(items))
    except BaseException as exc:
        failure.set(exc)
        raise
    finally:
        _put(results, _DONE, failure)
        feeder.join()
        writer.join()
    if failure.error is not None:
        raise failure.error
    return done
