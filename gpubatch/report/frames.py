"""The report's figures as pandas DataFrames, for analysis scripts and the HTML report's plots.

So that scripts never re-derive them from the JSON by hand: ``timeline_frame``, ``throughput_frame``,
``stage_frame``, ``parts_frame``, ``shard_frame``, ``latency_frame``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from gpubatch.core.clocks import starvation_of
from gpubatch.io.metrics import LATENCY_BOUNDS_MS, LATENCY_PREFIX
from gpubatch.report.verdict import PART_LAYERS

if TYPE_CHECKING:
    import pandas as pd


def timeline_frame(report: dict[str, Any]) -> pd.DataFrame:
    """One row per model batch: t (s since the first shard started, at the batch's end), items,
    busy_s, starved_s, queue_depth (ready batches left in the prefetch queue), shard."""
    import pandas as pd

    cols = ["t", "items", "busy_s", "starved_s", "queue_depth", "shard"]
    df = pd.DataFrame(report.get("timeline") or [], columns=cols)
    return df.astype({"t": float, "items": int, "busy_s": float, "starved_s": float})


def bucket_width(span_s: float, buckets: int = 40) -> float:
    """A round bucket width (1, 2 or 5 x 10^k seconds) giving about ``buckets`` buckets."""
    raw = max(span_s, 1e-3) / max(1, buckets)
    exp = math.floor(math.log10(raw))
    return next(m * 10.0**exp for m in (1, 2, 5, 10) if m * 10.0**exp >= raw)


def throughput_frame(report: dict[str, Any], buckets: int = 40) -> pd.DataFrame:
    """Per time bucket: items/s (all workers together), model starvation (NaN where no batch
    ended), mean and max queue depth. Columns t_start, t_end, items, items_per_s, starvation,
    queue_depth_mean, queue_depth_max. Summed with numpy (a run's timeline has a row per batch;
    pandas' groupby was most of report.html's time on a short run)."""
    import numpy as np
    import pandas as pd

    cols = ["t_start", "t_end", "items", "items_per_s", "starvation", "queue_depth_mean", "queue_depth_max"]
    tl = timeline_frame(report)
    if tl.empty:
        return pd.DataFrame(columns=cols)
    t, items, busy, starved, depth = (tl[c].to_numpy(np.float64) for c in
                                      ("t", "items", "busy_s", "starved_s", "queue_depth"))
    # A bucket at least twice the typical batch time, so a sparse run does not alternate between
    # one-batch spikes and empty buckets.
    typical = float(np.median(busy + starved))
    width = max(bucket_width(float(t.max()), buckets), bucket_width(2 * typical, 1))
    bucket = np.floor(t / width).astype(np.int64)
    n = int(bucket.max()) + 1
    batches = np.bincount(bucket, minlength=n)
    total, waited = np.bincount(bucket, busy + starved, n), np.bincount(bucket, starved, n)
    deepest = np.full(n, -np.inf)
    np.maximum.at(deepest, bucket, depth)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = pd.DataFrame({
            "t_start": np.arange(n) * width, "t_end": np.arange(1, n + 1) * width,
            "items": np.bincount(bucket, items, n).astype(int),
            "starvation": np.where(total > 0, waited / total, np.nan),
            "queue_depth_mean": np.where(batches > 0, np.bincount(bucket, depth, n) / batches, np.nan),
            "queue_depth_max": np.where(batches > 0, deepest, np.nan)})
    out["items_per_s"] = out["items"] / width
    return out[cols]


def stage_frame(report: dict[str, Any]) -> pd.DataFrame:
    """One row per pipeline stage: busy_s, starved_s, blocked_s and starvation."""
    import pandas as pd

    rows = [{"stage": k, **v, "starvation": starvation_of(v)} for k, v in (report.get("stages") or {}).items()]
    return pd.DataFrame(rows, columns=["stage", "busy_s", "starved_s", "blocked_s", "starvation"])


def parts_frame(report: dict[str, Any]) -> pd.DataFrame:
    """One row per timed part (storage, open, decode, ...): seconds, share of all parts, layer."""
    import pandas as pd

    parts = report.get("parts") or {}
    total = sum(parts.values()) or 1.0
    rows = [{"part": k, "seconds": v, "share": v / total, "layer": PART_LAYERS.get(k, "other")}
            for k, v in sorted(parts.items(), key=lambda kv: -kv[1])]
    return pd.DataFrame(rows, columns=["part", "seconds", "share", "layer"])


def shard_frame(report: dict[str, Any]) -> pd.DataFrame:
    """One row per input: status (done/empty/resumed/failed), items, wall_s, items_per_s,
    starvation, retries, error, reason (why an empty input yielded no items). Quarantined inputs
    come from report["failed"] with their error."""
    import pandas as pd

    rows = [{**s, "status": s.get("status") or ("resumed" if s.get("resumed") else "done"),
             "items_per_s": s["items"] / s["wall_s"] if s.get("wall_s") else math.nan,
             "error": None, "reason": s.get("reason")}
            for s in report.get("shards") or []]
    rows += [{"shard_id": None, "input": f["input"], "status": "failed", "items": 0, "wall_s": math.nan,
              "items_per_s": math.nan, "starvation": math.nan, "retries": None, "error": f["error"],
              "reason": None}
             for f in report.get("failed") or []]
    cols = ["shard_id", "input", "status", "items", "wall_s", "items_per_s", "starvation", "retries", "error",
            "reason"]
    return pd.DataFrame(rows, columns=cols).astype({"items": int, "retries": "Int64"})


def latency_frame(report: dict[str, Any]) -> pd.DataFrame:
    """The storage request latency histogram: lower_ms, upper_ms (inf for the last), count, share.
    Empty when no request was timed (local files read without the remote storage path)."""
    import pandas as pd

    counters = report.get("counters") or {}
    seen = {float(k[len(LATENCY_PREFIX):]): v for k, v in counters.items() if k.startswith(LATENCY_PREFIX) and v > 0}
    cols = ["lower_ms", "upper_ms", "count", "share"]
    if not seen:
        return pd.DataFrame(columns=cols)
    # Every bucket from the first to the last one used, empty ones included, so the x axis stays
    # evenly log-spaced; a bound the storage module does not know (an older layout) is kept too.
    bounds = sorted(set(LATENCY_BOUNDS_MS) | set(seen))
    used = [b for b in bounds if min(seen) <= b <= max(seen)]
    total = sum(seen.values())
    rows, lower = [], used[0] / math.sqrt(2)
    for upper in used:
        count = seen.get(upper, 0.0)
        rows.append({"lower_ms": lower, "upper_ms": upper, "count": int(count), "share": count / total})
        lower = upper
    return pd.DataFrame(rows, columns=cols)


