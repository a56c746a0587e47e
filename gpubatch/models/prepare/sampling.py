"""Draw calibration and validation items from the job's own inputs.

Quantization ranges and the validation gate are only as good as the items they see: ImageNet
statistics say nothing about an H&E slide, and a single slide says little about a cohort. So the
sample is spread over up to ``max_shards`` shards (evenly spaced over the plan) and, inside each
shard, over evenly spaced read units, then split into two *disjoint* sets with a seeded
permutation: calibration items never grade themselves.

This runs on the client, once per run, and reads only a few read units per shard.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import GpubatchError, InputError
from gpubatch.io.redact import redact
from gpubatch.sources.base import Shard, Source
from gpubatch.spec import JobSpec

log = logging.getLogger("gpubatch")

MAX_UNITS_PER_SHARD = 8  # reads per sampled shard, whatever the quota: sampling must stay cheap
MAX_REPLACEMENTS = 32  # shards tried in place of bad or empty ones before sampling gives up


class NoItemsError(GpubatchError):
    """No sampled input yielded an item: nothing to calibrate, validate or tune on."""


@dataclass(frozen=True)
class SampleSettings:
    """How items are drawn; part of the quantized model's cache key."""

    calibration_items: int = 256
    validation_items: int = 256
    max_shards: int = 8
    seed: int = 0

    @classmethod
    def from_job(cls, job: JobSpec, *, max_shards: int = 8, seed: int = 0) -> SampleSettings:
        return cls(job.model.calibration.items, job.model.validation.items, max_shards, seed)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class ItemSample:
    """Model-ready float inputs, split into disjoint calibration and validation sets."""

    calibration: np.ndarray
    validation: np.ndarray
    calibration_sha256: str
    shards: list[str] = field(default_factory=list)

    @property
    def item_shape(self) -> tuple[int, ...]:
        arr = self.validation if len(self.validation) else self.calibration
        return tuple(int(d) for d in arr.shape[1:])

    def describe(self) -> dict[str, Any]:
        return {"calibration_items": len(self.calibration), "validation_items": len(self.validation),
                "shards_sampled": len(self.shards)}


def spread(n: int, k: int) -> np.ndarray:
    """``k`` indices evenly spread over ``range(n)`` (all of them when k >= n)."""
    if k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


def _read_shard(source: Source, shard: Shard, job: JobSpec, quota: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Up to ``quota`` items spread over one shard: (uint8 items, model input), or None if empty.

    Read units are taken in a spread order (first, last, middle, ...) so that a small quota still
    covers the whole shard instead of its top-left corner.
    """
    with source.open(shard, job, StageClocks()) as reader:
        units = list(reader.read_units())
        if not units:
            return None
        blocks: list[np.ndarray] = []
        got = 0
        per_unit = max(1, math.ceil(quota / min(len(units), MAX_UNITS_PER_SHARD)))
        for i in _spread_order(len(units)):
            items = units[i]().items
            pick = items[spread(len(items), min(per_unit, quota - got))]
            blocks.append(pick)
            got += len(pick)
            if got >= quota:
                break
        raw = np.concatenate(blocks)
        return raw, host_array(reader.preprocess.on_host(raw))


def host_array(x: Any) -> np.ndarray:
    """A device array (CuPy, torch) as a contiguous host numpy array: samples live on the client."""
    if hasattr(x, "get") and not isinstance(x, np.ndarray):
        x = x.get()
    elif hasattr(x, "cpu") and not isinstance(x, np.ndarray):
        x = x.cpu().numpy()
    return np.ascontiguousarray(x)


def _spread_order(n: int) -> Iterator[int]:
    """0..n-1 in an order where every prefix is spread over the range (bit-reversal-like); lazy,
    so that a caller taking a few of a million shards pays for a few."""
    seen: set[int] = set()
    k = 1
    while len(seen) < n:
        for i in spread(n, k):
            if int(i) not in seen:
                seen.add(int(i))
                yield int(i)
        k *= 2


def draw_items(job: JobSpec, source: Source, shards: Sequence[Shard], settings: SampleSettings) -> ItemSample:
    """Items from the job's inputs, spread over shards; disjoint calibration/validation sets.

    A sampled shard that fails to open or holds no item is skipped (the run quarantines it
    later) and the next shard in spread order takes its place, up to ``MAX_REPLACEMENTS`` of
    them: the first and last slides being bad must not stop a run whose other slides are fine.
    Only when no shard tried yields an item does this raise: nothing to calibrate or tune on.
    """
    total = settings.calibration_items + settings.validation_items
    chosen = [int(i) for i in spread(len(shards), settings.max_shards)]
    quota = max(1, math.ceil(total / max(1, len(chosen))))
    raws: list[np.ndarray] = []
    inputs: list[np.ndarray] = []
    used: list[str] = []
    tried = 0
    for index in _sampling_order(len(shards), chosen):
        if len(used) == len(chosen) or tried == len(chosen) + MAX_REPLACEMENTS:
            break
        tried += 1
        got = _read_or_skip(source, shards[index], job, quota)
        if got is not None:
            raws.append(got[0])
            inputs.append(got[1])
            used.append(shards[index].shard_id)
    if not raws:
        raise NoItemsError(f"no items could be read from the job's inputs to calibrate, validate or tune "
                            f"the model: the {tried} input(s) tried (of {len(shards)}) all failed or were empty")
    return _split(np.concatenate(raws), np.concatenate(inputs), used, settings)


def _sampling_order(n: int, chosen: list[int]) -> Iterator[int]:
    """The chosen shards first (the sample when every input is good), then the others spread."""
    yield from chosen
    first = set(chosen)
    yield from (i for i in _spread_order(n) if i not in first)


def _read_or_skip(source: Source, shard: Shard, job: JobSpec, quota: int) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`_read_shard`, or None (with a warning) for an input that cannot be read."""
    try:
        return _read_shard(source, shard, job, quota)
    except InputError as exc:
        log.warning("sampling skipped %s: %s", redact(shard.input_uri), redact(str(exc)))
        return None


def _split(raw: np.ndarray, x: np.ndarray, used: list[str], settings: SampleSettings) -> ItemSample:
    """Seeded disjoint split; with fewer items than asked, both sets shrink in proportion."""
    n = len(x)
    total = settings.calibration_items + settings.validation_items
    n_cal = settings.calibration_items if n >= total else max(1, round(n * settings.calibration_items / total))
    n_val = min(settings.validation_items, n - n_cal)
    perm = np.random.default_rng(settings.seed).permutation(n)
    cal_idx, val_idx = np.sort(perm[:n_cal]), np.sort(perm[n_cal:n_cal + n_val])
    digest = hashlib.sha256(np.ascontiguousarray(raw[cal_idx]).tobytes())
    digest.update(repr(raw.shape[1:]).encode())
    return ItemSample(x[cal_idx], x[val_idx], digest.hexdigest(), used)


def draw_probe(job: JobSpec, source: Source, shards: Sequence[Shard], n: int = 16) -> ItemSample:
    """A few model-ready items (for batch-size tuning, where content barely matters), in
    ``calibration``; ``shards`` names the inputs they came from."""
    return draw_items(job, source, shards, SampleSettings(n, 0, max_shards=2))
