"""Batch-size tuning: sweep powers of two, measure throughput and memory, pick the knee.

Throughput rises with batch size until the device is saturated, then flattens while memory keeps
growing linearly, so the best *choice* is not the argmax: it is the smallest batch within 95% of
the best measured throughput (less memory, less latency, smaller tail batches, same speed).

Memory is measured as the growth of the process's resident set since the sweep began (the larger
of current-RSS growth via psutil and ``ru_maxrss`` high-water-mark growth). ``tracemalloc`` sees
only Python allocations, not ONNX Runtime's arena, so it would report ~0 for every size. On CUDA
with the torch backend the figure is ``torch.cuda.max_memory_allocated`` instead. The sweep stops
at ``max_batch`` (512), when the memory growth passes the budget, or when one batch takes longer
than ``max_batch_s``.

Choices are cached in ``$GPUBATCH_CACHE/tune.json`` (default ``~/.cache/gpubatch``), keyed by
(model sha256, backend, precision, device, item shape), so ``batch_size: auto`` costs one sweep per
model and machine, and ``gpubatch tune JOB`` refreshes the entry.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpubatch.core.files import cache_root, write_json_atomic
from gpubatch.models.base import Model

log = logging.getLogger("gpubatch")

MAX_BATCH = 512
WITHIN = 0.95
DEFAULT_MEMORY_BUDGET_MB = 4096.0


@dataclass
class CurvePoint:
    batch_size: int
    items_per_s: float
    peak_mb: float
    batch_s: float


@dataclass
class TuneResult:
    batch_size: int
    curve: list[CurvePoint] = field(default_factory=list)
    cached: bool = False
    key: str = ""
    stopped_by: str = ""

    def items_per_s_at(self, batch_size: int) -> float | None:
        return next((p.items_per_s for p in self.curve if p.batch_size == batch_size), None)

    def as_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "cached": self.cached, "key": self.key,
                "stopped_by": self.stopped_by, "memory_metric": "peak RSS growth (MB)",
                "curve": [asdict(p) for p in self.curve]}


def choose_batch(curve: list[CurvePoint], within: float = WITHIN) -> int:
    """The smallest batch size whose throughput is within ``within`` of the best measured."""
    if not curve:
        raise ValueError("empty tuning curve")
    best = max(p.items_per_s for p in curve)
    return min(p.batch_size for p in curve if p.items_per_s >= within * best)


def _rss_mb() -> float:
    """Current resident set (MB); ORT keeps its arena after a run, so this tracks its peak."""
    import psutil

    return float(psutil.Process().memory_info().rss) / 2**20


def _max_rss_mb() -> float:
    """The process's resident high-water mark (MB), or 0 where getrusage is missing."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if platform.system() != "Darwin" else kb / 2**20


class _RssGrowth:
    """Memory growth since creation: the larger of current-RSS growth and high-water-mark growth.

    The high-water mark alone hides growth below an earlier peak (e.g. the sample arrays that
    were freed before the sweep); current RSS alone misses transient peaks inside a run.
    """

    def __init__(self) -> None:
        self.rss0, self.max0 = _rss_mb(), _max_rss_mb()

    def __call__(self) -> float:
        return max(0.0, _rss_mb() - self.rss0, _max_rss_mb() - self.max0)


def _memory_probe(model: Model) -> Any:
    """A function returning memory growth in MB since the probe was made, for this device."""
    if model.device.startswith("cuda") and model.backend == "torch":
        import torch

        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated()
        return lambda: (torch.cuda.max_memory_allocated() - base) / 2**20
    return _RssGrowth()


def default_memory_budget_mb() -> float:
    """A quarter of available memory, at most 4 GiB: tuning must never push a host into swap."""
    try:
        import psutil

        return min(DEFAULT_MEMORY_BUDGET_MB, psutil.virtual_memory().available / 2**20 / 4)
    except ImportError:
        return DEFAULT_MEMORY_BUDGET_MB


def make_batch(items: np.ndarray, batch_size: int) -> np.ndarray:
    """``batch_size`` items, repeating the sample as needed (content does not change the cost)."""
    reps = -(-batch_size // len(items))
    return np.ascontiguousarray(np.concatenate([items] * reps)[:batch_size]) if reps > 1 else items[:batch_size].copy()


def measure(model: Model, batch: np.ndarray, min_time_s: float = 0.15, min_runs: int = 2) -> tuple[float, float]:
    """(items/s, seconds per batch) after one warm-up run; repeats until ``min_time_s``."""
    model.run(batch)
    runs, t0 = 0, time.perf_counter()
    while runs < min_runs or time.perf_counter() - t0 < min_time_s:
        model.run(batch)
        runs += 1
    elapsed = time.perf_counter() - t0
    return len(batch) * runs / elapsed, elapsed / runs


def sweep(model: Model, items: np.ndarray, *, max_batch: int = MAX_BATCH, memory_budget_mb: float | None = None,
          max_batch_s: float = 2.0, min_time_s: float = 0.15) -> tuple[list[CurvePoint], str]:
    """Throughput and memory per power-of-two batch size; returns (curve, why it stopped)."""
    budget = default_memory_budget_mb() if memory_budget_mb is None else memory_budget_mb
    probe = _memory_probe(model)
    curve: list[CurvePoint] = []
    b = 1
    while b <= max_batch:
        ips, per_batch = measure(model, make_batch(items, b), min_time_s)
        curve.append(CurvePoint(b, ips, probe(), per_batch))
        if curve[-1].peak_mb > budget:
            return curve, f"memory growth {curve[-1].peak_mb:.0f} MB > budget {budget:.0f} MB"
        if per_batch > max_batch_s:
            return curve, f"one batch took {per_batch:.2f} s > {max_batch_s} s"
        b *= 2
    return curve, f"reached max batch {max_batch}"


def cache_path() -> Path:
    return cache_root() / "tune.json"


def device_id(model: Model) -> str:
    """The hardware the figures hold for: device kind, machine and core count."""
    return f"{model.device}:{platform.machine()}:{os.cpu_count()}cpu:{model.threads or 'default'}threads"


def tune_key(model_sha256: str, backend: str, precision: str, device: str, item_shape: tuple[int, ...]) -> str:
    return "|".join([model_sha256, backend, precision, device, "x".join(map(str, item_shape))])


def _cache_entries() -> dict[str, Any]:
    """The cache's entries; a missing, unreadable or foreign file (a list, a truncated write by
    another tool) is an empty cache, replaced at the next store, never a traceback."""
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_cached(key: str) -> TuneResult | None:
    """The cached choice under ``key``; an entry that does not read back (edited, another version's
    fields) is a miss, and the sweep that follows replaces it."""
    entry = _cache_entries().get(key)
    if not entry:
        return None
    try:
        batch_size = entry["batch_size"]
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size {batch_size!r}")
        curve = [CurvePoint(**p) for p in entry.get("curve", [])]
        return TuneResult(batch_size, curve, True, key, str(entry.get("stopped_by", "")))
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        log.warning("ignored a damaged entry of %s (%s): sweeping again", cache_path(), exc)
        return None


def store(result: TuneResult) -> None:
    """Add one choice to the cache file (read-modify-write, replaced atomically); a cache that
    cannot be written (a read-only home) costs the next run a sweep, not this one its result."""
    data = _cache_entries()
    data[result.key] = {**result.as_dict(), "cached": False, "time": time.time()}
    try:
        write_json_atomic(cache_path(), data)
    except OSError as exc:
        log.warning("could not store the tuning choice in %s: %s", cache_path(), exc)


def tune_model(model: Model, items: np.ndarray, model_sha256: str, *, refresh: bool = False,
               **sweep_options: Any) -> TuneResult:
    """The cached choice for this model and machine, or a fresh sweep (stored for next time)."""
    key = tune_key(model_sha256, model.backend, model.precision, device_id(model), tuple(items.shape[1:]))
    if not refresh and (hit := load_cached(key)) is not None:
        return hit
    curve, why = sweep(model, items, **sweep_options)
    result = TuneResult(choose_batch(curve), curve, False, key, why)
    store(result)
    return result


def format_curve(result: TuneResult) -> str:
    """The curve as a text table, the chosen row marked."""
    best = max((p.items_per_s for p in result.curve), default=0.0)
    lines = [f"{'batch':>6} {'items/s':>10} {'of best':>8} {'s/batch':>9} {'peak MB':>9}"]
    for p in result.curve:
        mark = "  <- chosen" if p.batch_size == result.batch_size else ""
        lines.append(f"{p.batch_size:>6} {p.items_per_s:>10.1f} {p.items_per_s / best if best else 0:>8.1%} "
                     f"{p.batch_s:>9.4f} {p.peak_mb:>9.1f}{mark}")
    return "\n".join(lines)
