"""Stage clocks: busy, starved and blocked time per pipeline stage, plus named sub-timers.

Every stage of the pipeline keeps three clocks. *Starved* is time spent waiting for input from
upstream, *blocked* is time waiting for room downstream, *busy* is everything else. The model
stage's starvation, starved / (starved + busy), is the one number that says whether a run is
input-bound. Sub-timers (storage, decode, preprocess, transfer, compute, write) split busy time
into the layers a practitioner profiles.
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
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, stage: str, kind: str, seconds: float) -> None:
        with self._lock:
            st = self.stages.setdefault(stage, StageTimes())
            setattr(st, f"{kind}_s", getattr(st, f"{kind}_s") + seconds)

    def add_part(self, part: str, seconds: float) -> None:
        with self._lock:
            self.parts[part] += seconds

    def count(self, name: str, value: float = 1.0) -> None:
        with self._lock:
            self.counters[name] += value

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

    def merge(self, other: StageClocks) -> None:
        with self._lock:
            for name, st in other.stages.items():
                self.stages.setdefault(name, StageTimes()).add(st)
            for k, v in other.parts.items():
                self.parts[k] += v
            for k, v in other.counters.items():
                self.counters[k] += v
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
            "counters": dict(self.counters),
            "samples": samples,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageClocks:
        clocks = cls()
        for k, v in data.get("stages", {}).items():
            clocks.stages[k] = StageTimes(**v)
        clocks.parts.update(data.get("parts", {}))
        clocks.counters.update(data.get("counters", {}))
        clocks.samples.extend(data.get("samples", []))
        return clocks

    @property
    def starvation(self) -> float:
        return starvation_of(self.stages["model"])
