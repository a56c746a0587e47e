"""Batch-size tuning: sweep powers of two, measure throughput and memory, pick the knee.

Throughput rises with batch size until the device is saturated, then flattens while memory keeps
growing linearly, so the best *choice* is not the argmax: it is the smallest batch within 95% of
the best measured throughput (less memory, less latency, smaller tail batches, same speed).

Memory is measured as the growth of the process's resident set since the sweep began (the larger
of current-RSS growth via psutil and ``ru_maxrss`` high-water-mark growth). ``tracemalloc`` sees
only Python allocations, not ONNX Runtime's arena, so it would report ~0 for every size. On CUDA
with the torch backend the figure is ``torch.cuda.max_memory_allocated`` instead.

Each size is timed after an untimed warm-up run, in three rounds (the first climbing the sizes,
the others going back over them); its figure is its fastest round's median run, so a moment of
contention on a shared machine slows one round, not the choice. The sweep stops at ``max_batch``
(512); at a size that fails (out of memory, outputs without one row per item), keeping the sizes
before it; before a size whose memory growth or time, judged from the size before, would pass
the budget or the sweep's time limit (``MAX_SWEEP_S``); or when one batch takes longer than
``max_batch_s``. Why it stopped is part of the result.

Choices are cached in ``$GPUBATCH_CACHE/tune.json`` (default ``~/.cache/gpubatch``), keyed by
(model sha256, backend and its library's version, precision, device, item shape), so
``batch_size: auto`` costs one sweep per model, machine and library version, and
``gpubatch tune JOB`` refreshes the entry.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpubatch.core.errors import GpubatchError
from gpubatch.core.files import cache_root, write_json_atomic
from gpubatch.core.plural import counted, plural
from gpubatch.models.base import BACKENDS, Model, OutputRowsError, check_output_rows, gpu_name

log = logging.getLogger("gpubatch")

MAX_BATCH = 512
WITHIN = 0.95
DEFAULT_MEMORY_BUDGET_MB = 4096.0
#: measurement rounds per size: a moment of contention slows one round, not the size's figure
ROUNDS = 3
#: timed runs of one size in one round last at least this long (after an untimed warm-up run)
MIN_TIME_S = 0.1
#: the sweep's wall-clock limit: sizes and rounds that would pass it are left out, and it says so
MAX_SWEEP_S = 60.0


@dataclass
class CurvePoint:
    """One batch size's figures: ``batch_s`` is the median timed run of its fastest round, over
    ``runs`` timed runs in ``rounds`` rounds (warm-ups excluded); ``spread`` is how much slower its
    slowest round was (0.3: 30%), the noise the choice had to see through."""

    batch_size: int
    items_per_s: float
    peak_mb: float
    batch_s: float
    runs: int = 0
    rounds: int = 0
    spread: float = 0.0


@dataclass
class TuneResult:
    batch_size: int
    curve: list[CurvePoint] = field(default_factory=list)
    cached: bool = False
    key: str = ""
    stopped_by: str = ""
    #: what the figures were measured on and how (items, inputs, warm-up, rounds, statistic)
    measured_on: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, entry: dict[str, Any], cached: bool = False) -> TuneResult:
        """What :meth:`as_dict` wrote (a cache entry, a report's ``tuning``); TypeError,
        ValueError or KeyError for anything else."""
        batch_size = entry["batch_size"]
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size {batch_size!r}")
        return cls(batch_size, [CurvePoint(**p) for p in entry.get("curve", [])], cached,
                   str(entry.get("key", "")), str(entry.get("stopped_by", "")), dict(entry.get("measured_on") or {}))

    def items_per_s_at(self, batch_size: int) -> float | None:
        return next((p.items_per_s for p in self.curve if p.batch_size == batch_size), None)

    def as_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "cached": self.cached, "key": self.key,
                "stopped_by": self.stopped_by, "memory_metric": "peak RSS growth (MB)",
                "measured_on": self.measured_on, "curve": [asdict(p) for p in self.curve]}


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
    """A quarter of available memory, at most 4 GiB: tuning must never push a host into swap.
    In a container, what its memory cgroup may still take where that is less: the machine's
    available memory is the node's there, and a sweep sized on it met the OOM killer."""
    from gpubatch.core.memory_limit import find_cgroup_memory

    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:
        return DEFAULT_MEMORY_BUDGET_MB
    group = find_cgroup_memory()
    room = group.room() if group is not None else None
    return min(DEFAULT_MEMORY_BUDGET_MB, min(available, room if room is not None else available) / 2**20 / 4)


def make_batch(items: np.ndarray, batch_size: int) -> np.ndarray:
    """``batch_size`` items, repeating the sample as needed (content does not change the cost)."""
    reps = -(-batch_size // len(items))
    return np.ascontiguousarray(np.concatenate([items] * reps)[:batch_size]) if reps > 1 else items[:batch_size].copy()


class BatchFailed(GpubatchError):
    """A batch size the model cannot run: out of memory, a capped batch axis, outputs that do
    not have one row per item."""


def timed_runs(model: Model, batch: np.ndarray, min_time_s: float = MIN_TIME_S, min_runs: int = 2,
               clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds of each run after one warm-up run (untimed; its outputs checked), repeated until
    ``min_runs`` runs and ``min_time_s`` have passed. Whatever the model raises is a BatchFailed."""
    try:
        check_output_rows(model.run(batch), len(batch))
        times: list[float] = []
        start = clock()
        while len(times) < min_runs or clock() - start < min_time_s:
            t0 = clock()
            model.run(batch)
            times.append(clock() - t0)
    except BatchFailed:
        raise
    except OutputRowsError as exc:
        raise BatchFailed(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - backends raise many types for "cannot run this batch"
        raise BatchFailed(error_words(exc)) from exc
    return times


def error_words(exc: BaseException) -> str:
    """A backend's error in one line: a multi-line one (TorchScript's interpreter traceback) by its
    last line, which names the error raised (``builtins.RuntimeError: CUDA out of memory...``)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1:
        return lines[-1][:300]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def measure(model: Model, batch: np.ndarray, min_time_s: float = 0.15, min_runs: int = 2) -> tuple[float, float]:
    """(items/s, seconds per batch: the median run) after one warm-up run."""
    per_batch = float(np.median(timed_runs(model, batch, min_time_s, min_runs)))
    return len(batch) / per_batch, per_batch


@dataclass
class _Figures:
    """Per batch size: each round's median run, the timed runs and the memory growth."""

    medians: dict[int, list[float]] = field(default_factory=dict)
    runs: dict[int, int] = field(default_factory=dict)
    peaks: dict[int, float] = field(default_factory=dict)

    def add(self, batch_size: int, times: list[float], peak_mb: float) -> None:
        self.medians.setdefault(batch_size, []).append(float(np.median(times)))
        self.runs[batch_size] = self.runs.get(batch_size, 0) + len(times)
        self.peaks.setdefault(batch_size, peak_mb)  # the first round's: sizes then ran in order

    def last(self, batch_size: int) -> float:
        return self.medians[batch_size][-1]

    def drop_from(self, batch_size: int) -> None:
        for b in [b for b in self.medians if b >= batch_size]:
            del self.medians[b], self.runs[b], self.peaks[b]

    def curve(self) -> list[CurvePoint]:
        points = []
        for b in sorted(self.medians):
            fastest, slowest = min(self.medians[b]), max(self.medians[b])
            points.append(CurvePoint(b, b / fastest, self.peaks[b], fastest, self.runs[b],
                                     len(self.medians[b]), slowest / fastest - 1.0))
        return points


@dataclass
class _Sweep:
    """One sweep's settings and clock: the first round climbs the sizes, later rounds re-measure."""

    model: Model
    items: np.ndarray
    max_batch: int
    budget_mb: float
    max_batch_s: float
    min_time_s: float
    max_sweep_s: float
    clock: Callable[[], float]
    max_batch_why: str = ""
    figures: _Figures = field(default_factory=_Figures)

    def __post_init__(self) -> None:
        self.probe = _memory_probe(self.model)
        self.start = self.clock()

    def cost_s(self, per_batch: float) -> float:
        """What measuring one size costs at ``per_batch`` seconds a run: a warm-up and the runs."""
        return per_batch + max(2 * per_batch, self.min_time_s)

    def time_left(self, per_batch: float) -> bool:
        return self.clock() - self.start + self.cost_s(per_batch) <= self.max_sweep_s

    def run(self, batch_size: int) -> list[float]:
        return timed_runs(self.model, make_batch(self.items, batch_size), self.min_time_s, clock=self.clock)

    def next_size_refused(self, b: int) -> str | None:
        """Why batch ``b`` is not tried, judged from ``b / 2`` (cost and memory grow with the batch)."""
        grown = 2 * self.figures.peaks[b // 2]
        if grown > self.budget_mb:
            return (f"batch {b} would grow memory to about {grown:.0f} MB, over the "
                    f"{self.budget_mb:.0f} MB budget")
        if not self.time_left(2 * self.figures.last(b // 2)):
            return f"the sweep's {self.max_sweep_s:.0f} s limit (batch {b} would pass it)"
        return None

    def first_round(self) -> str:
        """Sizes 1, 2, 4, ... until a limit; why it stopped."""
        b = 1
        while b <= self.max_batch:
            refused = self.next_size_refused(b) if b > 1 else None
            if refused:
                return refused
            try:
                times = self.run(b)
            except BatchFailed as exc:
                if b == 1:
                    raise BatchFailed(f"{self.model.path} cannot run a batch of 1 item: {exc}") from exc
                return f"batch {b} failed ({exc})"
            self.figures.add(b, times, self.probe())
            if self.figures.peaks[b] > self.budget_mb:
                return f"memory growth {self.figures.peaks[b]:.0f} MB > budget {self.budget_mb:.0f} MB"
            if self.figures.last(b) > self.max_batch_s:
                return f"one batch took {self.figures.last(b):.2f} s > {self.max_batch_s} s"
            b *= 2
        return f"reached max batch {self.max_batch}{self.max_batch_why}"

    def more_rounds(self, rounds: int) -> str:
        """Rounds 2.. over the measured sizes, largest first, while time is left; '' when all ran."""
        for r in range(1, rounds):
            for b in sorted(self.figures.medians, reverse=True):
                if not self.time_left(self.figures.last(b)):
                    return f"; {r} of {rounds} rounds (the sweep's {self.max_sweep_s:.0f} s limit)"
                try:
                    self.figures.add(b, self.run(b), 0.0)
                except BatchFailed as exc:
                    self.figures.drop_from(b)
                    return f"; batch {b} failed in round {r + 1} ({exc}), it and larger ones dropped"
        return ""


def sweep(model: Model, items: np.ndarray, *, max_batch: int = MAX_BATCH, memory_budget_mb: float | None = None,
          max_batch_s: float = 2.0, min_time_s: float = MIN_TIME_S, rounds: int = ROUNDS,
          max_sweep_s: float = MAX_SWEEP_S, clock: Callable[[], float] = time.perf_counter,
          max_batch_why: str = "") -> tuple[list[CurvePoint], str]:
    """Throughput and memory per power-of-two batch size; returns (curve, why it stopped).

    Each size is measured in ``rounds`` rounds (the first climbing the sizes, the others going
    back over them), and its figure is its fastest round's median run: a moment of contention
    on a shared machine slows one round of one size, not the choice. A size that fails (out
    of memory, wrong output rows) ends the sweep with the sizes before it, and so do a size
    whose memory or time would pass the limits, judged from the size before, before it runs.
    ``max_batch_why`` says what set ``max_batch`` (a worker's memory), in the reason.
    """
    budget = default_memory_budget_mb() if memory_budget_mb is None else memory_budget_mb
    state = _Sweep(model, items, max_batch, budget, max_batch_s, min_time_s, max_sweep_s, clock, max_batch_why)
    why = state.first_round()
    why += state.more_rounds(rounds)
    return state.figures.curve(), why


def cache_path() -> Path:
    return cache_root() / "tune.json"


def device_id(model: Model) -> str:
    """The hardware the figures hold for: device kind (and the GPU's name: a cache on a shared
    home serves an A100 and an H100 node alike), machine, core count and the model's threads."""
    device = model.device
    if device.startswith("cuda"):
        device = f"{device}({gpu_name()})"
    return f"{device}:{platform.machine()}:{os.cpu_count()}cpu:{model.threads or 'default'}threads"


def backend_version(backend: str) -> str:
    """``package-version`` of the library a backend runs on (onnxruntime, torch, tensorrt): an
    upgrade can move the best batch size, so a choice holds for one version. The imported
    module's ``__version__`` (the model has imported it; onnxruntime-gpu's distribution is not
    named onnxruntime), else the installed distribution's, else ``unknown``."""
    entry = BACKENDS.get(backend)
    package = entry.package if entry is not None else backend
    version = getattr(sys.modules.get(package), "__version__", None)
    if not version:
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
    return f"{package}-{version}"


def tune_key(model_sha256: str, backend: str, precision: str, device: str, item_shape: tuple[int, ...]) -> str:
    """The cache key: the model file, the backend and its library's version, the precision, the
    hardware (:func:`device_id`) and one item's shape."""
    return "|".join([model_sha256, backend, backend_version(backend), precision, device,
                     "x".join(map(str, item_shape))])


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
        return dataclasses.replace(TuneResult.from_dict(entry, cached=True), key=key)
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
               sample: dict[str, Any] | None = None, **sweep_options: Any) -> TuneResult:
    """The cached choice for this model and machine, or a fresh sweep (stored for next time).

    ``sample`` says where ``items`` came from (``{"items": 16, "inputs": 2}``), for the report.
    """
    key = tune_key(model_sha256, model.backend, model.precision, device_id(model), tuple(items.shape[1:]))
    max_batch = int(sweep_options.get("max_batch", MAX_BATCH))
    if not refresh and (hit := within_limit(load_cached(key), max_batch)) is not None:
        log.info("model.batch_size auto: %d, from the tuning cache %s", hit.batch_size, cache_path())
        return hit
    limit = sweep_options.get("max_sweep_s", MAX_SWEEP_S)
    log.info("model.batch_size auto: measuring batch sizes 1 to %d on %s (at most %.0f s; "
             "`gpubatch tune JOB` prints the curve)", max_batch, counted(len(items), "item"), limit)
    curve, why = sweep(model, items, **sweep_options)
    measured_on = {**(sample or {"items": len(items)}), "warm_up_runs_per_size_and_round": 1,
                   "rounds": sweep_options.get("rounds", ROUNDS),
                   "min_time_s_per_round": sweep_options.get("min_time_s", MIN_TIME_S),
                   "statistic": "median run of the size's fastest round", "max_batch": max_batch}
    result = TuneResult(choose_batch(curve), curve, False, key, why, measured_on)
    log.info("model.batch_size auto: %d (%s); sweep stopped: %s", result.batch_size, explain(result), why)
    store(result)
    return result


def within_limit(hit: TuneResult | None, max_batch: int) -> TuneResult | None:
    """A cached choice as it holds under ``max_batch`` (a worker's memory allows no more): chosen
    again among the cached sizes up to it; None (sweep again) when none is, or when the cached
    sweep was cut short by a lower limit than this one."""
    if hit is None:
        return None
    swept_to = int(hit.measured_on.get("max_batch", MAX_BATCH))
    if swept_to < max_batch and hit.stopped_by.startswith("reached max batch"):
        return None
    if hit.batch_size <= max_batch:
        return hit
    allowed = [p for p in hit.curve if p.batch_size <= max_batch]
    if not allowed:
        return None
    return dataclasses.replace(hit, batch_size=choose_batch(allowed),
                               stopped_by=f"{hit.stopped_by}; chosen among the sizes up to {max_batch}")


def explain(result: TuneResult) -> str:
    """Why the chosen size won, in words: the rule and the best it was held against."""
    best = max(result.curve, key=lambda p: p.items_per_s, default=None)
    if best is None:
        return "no curve"
    chosen = result.items_per_s_at(result.batch_size) or 0.0
    return (f"{chosen:.1f} items/s, the smallest batch within {WITHIN:.0%} of the best measured, "
            f"{best.items_per_s:.1f} items/s at batch {best.batch_size}")


def format_curve(result: TuneResult) -> str:
    """The curve as a text table, the chosen row marked; ``noise`` is how much slower the size's
    slowest round was than its fastest."""
    best = max((p.items_per_s for p in result.curve), default=0.0)
    lines = [f"{'batch':>6} {'items/s':>10} {'of best':>8} {'s/batch':>9} {'runs':>6} {'noise':>6} {'peak MB':>9}"]
    for p in result.curve:
        mark = "  <- chosen" if p.batch_size == result.batch_size else ""
        runs = f"{p.runs:>6} {p.spread:>6.0%}" if p.runs else f"{'-':>6} {'-':>6}"
        lines.append(f"{p.batch_size:>6} {p.items_per_s:>10.1f} {p.items_per_s / best if best else 0:>8.1%} "
                     f"{p.batch_s:>9.4f} {runs} {p.peak_mb:>9.1f}{mark}")
    return "\n".join(lines)


def describe_method(result: TuneResult) -> str:
    """One line on what the curve measured: the items, their origin, the warm-up, the repeats."""
    m = result.measured_on
    if not m:
        return "measured by an earlier gpubatch (no record of the items or repeats)"
    inputs = f" read from {m['inputs']} of the job's inputs" if m.get("inputs") else ""
    return (f"measured on {m.get('items', '?')} {plural(m.get('items'), 'item')}{inputs} (repeated to fill the larger batches): per size, "
            f"one untimed warm-up run, then timed runs for at least {m.get('min_time_s_per_round', '?')} s, "
            f"in {m.get('rounds', '?')} rounds; the figure is the {m.get('statistic', '?')}")
