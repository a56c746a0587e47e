"""Stage clocks: busy, starved and blocked time per pipeline stage, plus named sub-timers.

Every stage of the pipeline keeps three clocks. *Starved* is time spent waiting for input from
upstream, *blocked* is time waiting for room downstream, *busy* is everything else. The model
stage's starvation, starved / (starved + busy), is the one number that says whether a run is
input-bound. Sub-timers (storage, decode, preprocess, transfer, compute, write) split busy time
into the layers a practitioner profiles.

Parts are also kept per stage: a part timed while a thread works for a stage (``in_stage``) is
charged to that stage, so each stage's busy time splits into named parts that add up, with
:func:`stage_breakdown` naming the remainder ``other`` (Python between the timed calls, lock and
GIL waits nobody timed). Parts timed outside any stage (a shard's opening) stay run-wide only.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

STAGES = ("read", "model", "write")
PARTS = ("storage", "decode", "preprocess", "transfer", "compute", "write")
#: what each stage's parts mean, for the report: the part names a stage may carry
STAGE_PARTS = {
    "read": ("storage", "decode", "resample", "slice", "batch"),
    "model": ("turn", "preprocess", "transfer", "compute", "fallback", "output"),
    "write": ("write",),
}
OTHER = "other"


@dataclass
class StageTimes:
    busy_s: float = 0.0
    starved_s: float = 0.0
    blocked_s: float = 0.0

    def add(self, other: StageTimes) -> None:
        self.busy_s += other.busy_s
        self.starved_s += other.starved_s
        self.blocked_s += other.blocked_s

    def as_dict(self) -> dict[str, float]:
        return {"busy_s": self.busy_s, "starved_s": self.starved_s, "blocked_s": self.blocked_s}


def starvation_of(times: StageTimes | dict[str, float]) -> float:
    """starved / (starved + busy); 0 when the stage never ran."""
    if isinstance(times, dict):
        starved, busy = times.get("starved_s", 0.0), times.get("busy_s", 0.0)
    else:
        starved, busy = times.starved_s, times.busy_s
    total = starved + busy
    return starved / total if total > 0 else 0.0


@dataclass
class StageClocks:
    """Thread-safe accumulators for one shard (or, merged, a whole run)."""

    stages: dict[str, StageTimes] = field(default_factory=lambda: {s: StageTimes() for s in STAGES})
    parts: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    counters: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    samples: list[dict[str, float]] = field(default_factory=list)
    #: parts per stage: {stage: {part: seconds}}, timed while a thread worked for that stage
    stage_parts: dict[str, dict[str, float]] = field(default_factory=dict)
    #: gauges merged by maximum (requests in flight, bytes read ahead), not summed
    peaks: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _local: threading.local = field(default_factory=threading.local, repr=False)

    def add(self, stage: str, kind: str, seconds: float) -> None:
        with self._lock:
            st = self.stages.setdefault(stage, StageTimes())
            setattr(st, f"{kind}_s", getattr(st, f"{kind}_s") + seconds)

    def add_part(self, part: str, seconds: float, stage: str | None = None) -> None:
        """Add to a part, charged to ``stage`` or else to the stage this thread works for."""
        stage = stage or getattr(self._local, "stage", None)
        with self._lock:
            self.parts[part] += seconds
            if stage is not None:
                per = self.stage_parts.setdefault(stage, {})
                per[part] = per.get(part, 0.0) + seconds

    @contextmanager
    def in_stage(self, stage: str) -> Iterator[None]:
        """Charge the parts this thread times inside the block to ``stage``."""
        previous = getattr(self._local, "stage", None)
        self._local.stage = stage
        try:
            yield
        finally:
            self._local.stage = previous

    def count(self, name: str, value: float = 1.0) -> None:
        with self._lock:
            self.counters[name] += value

    def peak(self, name: str, value: float) -> None:
        """Keep the largest value seen of a gauge."""
        with self._lock:
            if value > self.peaks.get(name, float("-inf")):
                self.peaks[name] = value

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add_part(name, time.perf_counter() - t0)

    def sample(self, **values: float) -> None:
        with self._lock:
            self.samples.append(dict(values))

    def hand_over(self, target: StageClocks) -> None:
        """Add what these clocks hold to ``target``, and send everything counted here from now
        on to ``target`` too: for work begun before its shard had clocks (a slide opened ahead),
        whose readers keep these clocks."""
        target.merge(self)
        with self._lock:
            self.stages, self.parts, self.counters = target.stages, target.parts, target.counters
            self.samples, self.stage_parts, self.peaks = target.samples, target.stage_parts, target.peaks
            self._lock = target._lock

    def merge(self, other: StageClocks) -> None:
        with self._lock:
            for name, st in other.stages.items():
                self.stages.setdefault(name, StageTimes()).add(st)
            for k, v in other.parts.items():
                self.parts[k] += v
            for k, v in other.counters.items():
                self.counters[k] += v
            for stage, parts in other.stage_parts.items():
                mine = self.stage_parts.setdefault(stage, {})
                for k, v in parts.items():
                    mine[k] = mine.get(k, 0.0) + v
            for k, v in other.peaks.items():
                self.peaks[k] = max(v, self.peaks.get(k, v))
            self.samples.extend(other.samples)

    def to_dict(self, max_samples: int | None = None) -> dict[str, Any]:
        """The clocks as JSON-able data; ``max_samples`` thins the per-batch samples evenly (a
        shard's result stays small however many batches it ran)."""
        samples = list(self.samples)
        if max_samples is not None and len(samples) > max_samples:
            step = len(samples) / max_samples
            samples = [samples[int(i * step)] for i in range(max_samples)]
        return {
            "stages": {k: v.as_dict() for k, v in self.stages.items()},
            "parts": dict(self.parts),
            "stage_parts": {k: dict(v) for k, v in self.stage_parts.items()},
            "peaks": dict(self.peaks),
            "counters": dict(self.counters),
            "samples": samples,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageClocks:
        clocks = cls()
        for k, v in data.get("stages", {}).items():
            clocks.stages[k] = StageTimes(**v)
        clocks.parts.update(data.get("parts", {}))
        clocks.stage_parts.update({k: dict(v) for k, v in (data.get("stage_parts") or {}).items()})
        clocks.peaks.update(data.get("peaks") or {})
        clocks.counters.update(data.get("counters", {}))
        clocks.samples.extend(data.get("samples", []))
        return clocks

    @property
    def starvation(self) -> float:
        return starvation_of(self.stages["model"])


def stage_breakdown(stages: dict[str, Any], stage_parts: dict[str, dict[str, float]]
                    ) -> dict[str, dict[str, float]]:
    """Each stage's busy seconds split into its parts plus ``other`` (busy less the timed parts,
    never negative), so the parts add up to the busy time."""
    out: dict[str, dict[str, float]] = {}
    for name, times in stages.items():
        busy = times.get("busy_s", 0.0) if isinstance(times, dict) else times.busy_s
        parts = {k: v for k, v in (stage_parts.get(name) or {}).items() if v > 0}
        if busy <= 0 and not parts:
            continue
        parts[OTHER] = max(0.0, busy - sum(parts.values()))
        out[name] = parts
    return out
