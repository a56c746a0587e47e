"""The throughput gap: model-only against end-to-end items/s, what the data path costs the model,
and where the workers' time went outside their shards' pipelines (start-up, planning, idle).

The verdict (report.verdict) quotes it as evidence; report.json carries it as ``verdict.gap``.
"""

from __future__ import annotations

from typing import Any

from gpubatch.report.words import pct

OTHER_SHARE = 0.05      # a model-stage part is named in the evidence above this share of its busy time


def gap(summary: dict[str, Any]) -> dict[str, Any]:
    """Model-only against end-to-end throughput, what the gap costs, and where worker time went."""
    e2e = float(summary.get("items_per_s") or 0.0)
    # In-run figure (items / compute seconds) first; the standalone benchmark from model
    # preparation when the run timed no compute.
    model_only = summary.get("model_only_items_per_s") or summary.get("model_only_items_per_s_measured")
    parts = summary.get("parts") or {}
    worker_s = float(summary.get("wall_s", 0.0)) * max(1, int(summary.get("workers") or 1))
    stats = summary.get("shard_stats") or {}
    pipeline_s = stats.get("pipeline_s", sum(s.get("wall_s", 0.0) for s in summary.get("shards") or []
                                             if not s.get("resumed")))
    setup_s = parts.get("open", 0.0)
    # the workers' time in shards with a process's concurrent shards counted once, where the
    # summary has it; the sum of shard times (which double-counts them) in older reports
    in_shards_s = stats.get("in_shards_s", pipeline_s + setup_s)
    out: dict[str, Any] = {
        "items_per_s": e2e, "model_only_items_per_s": model_only, "cost": None, "end_to_end_cost": None,
        "text": "", "worker_s": worker_s, "pipeline_s": pipeline_s, "setup_s": setup_s,
        "overhead_s": max(0.0, worker_s - in_shards_s),
    }
    if model_only:
        out["end_to_end_cost"] = out["cost"] = max(0.0, 1.0 - e2e / model_only)
        out["text"] = (f"the data path costs {pct(out['cost'])} of the model's speed: {e2e:.1f} items/s "
                       f"end-to-end against {model_only:.1f} items/s model-only")
        idle = out["overhead_s"] / worker_s if worker_s > 0 and (stats or summary.get("shards")) else 0.0
        if idle > OTHER_SHARE:
            _split_startup(out, idle)
    return out


def _split_startup(out: dict[str, Any], idle: float) -> None:
    """Take the worker time outside shards (start-up, planning, idle workers) out of the data
    path's cost: a fed, compute-bound model whose run spent 29% of its time loading and planning
    read "the data path costs 30% of the model's speed" (it cost 1.5% over the shards' time).
    ``cost`` becomes the data path's over the shards' own time; ``end_to_end_cost`` keeps all."""
    e2e, model_only = out["items_per_s"], out["model_only_items_per_s"]
    out["cost"] = max(0.0, 1.0 - e2e / (model_only * (1.0 - idle)))
    out["text"] = (f"the data path costs {pct(out['cost'])} of the model's speed over the shards' own time; "
                   f"end-to-end {e2e:.1f} items/s against {model_only:.1f} items/s model-only "
                   f"({pct(out['end_to_end_cost'])} lower), as the time outside the shards' pipelines (start-up, "
                   f"planning, each shard's fixed cost, idle workers) took {out['overhead_s']:.1f} of "
                   f"{out['worker_s']:.1f} worker-seconds ({pct(idle)})")
