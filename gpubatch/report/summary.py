"""The run summary: shard results folded into the report.json document, written and read back.

The figures the summary holds are rendered three ways: as pandas frames (``frames``), as terminal
text (``text``) and as a self-contained HTML page (``html``); the verdict comes from ``verdict``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpubatch.core.clocks import StageClocks, starvation_of
from gpubatch.core.results import RunSummary, ShardResult
from gpubatch.io.metrics import storage_summary
from gpubatch.report.verdict import verdict


def _timeline(shards: list[ShardResult], t0: float) -> list[dict[str, Any]]:
    """Per-batch samples on one run clock. Sample times count from the pipeline's start, which
    follows the shard's setup ("open"), so the setup time is added to the shard's start."""
    points = []
    for s in shards:
        start = (s.start if s.start is not None else t0) + s.clocks.get("parts", {}).get("open", 0.0)
        for sample in s.clocks.get("samples", []):
            points.append({**sample, "t": sample["t"] + start - t0, "shard": s.shard_id})
    return sorted(points, key=lambda p: p["t"])


def summarize(shards: list[ShardResult], failed: list[dict[str, str]], wall_s: float,
              run_info: dict[str, Any]) -> RunSummary:
    """Fold shard results into the report.json document."""
    clocks = StageClocks()
    for s in shards:
        clocks.merge(StageClocks.from_dict(s.clocks))
    items = int(sum(s.items for s in shards))
    batches = sum(len(s.clocks.get("samples", [])) for s in shards)
    batch_size = run_info.get("batch_size") or 1
    compute_s = clocks.parts.get("compute", 0.0)
    workers = max(1, run_info.get("workers", 1))
    t0 = min((s.start for s in shards if s.start is not None), default=0.0)
    summary: dict[str, Any] = {
        "items": items,
        "items_per_s": items / wall_s if wall_s > 0 else 0.0,
        "wall_s": wall_s,
        "starvation": clocks.starvation,
        "stages": {k: v.as_dict() for k, v in clocks.stages.items()},
        "parts": dict(clocks.parts),
        "counters": dict(clocks.counters),
        "storage": storage_summary(dict(clocks.counters), wall_s),
        "model_only_items_per_s": items / compute_s * min(workers, len(shards) or 1) if compute_s else None,
        "batch_fill": items / (batches * batch_size) if batches else 1.0,
        "failed": failed,
        "shards": [_shard_row(s) for s in shards],
        "timeline": _timeline(shards, t0),
        **run_info,
    }
    summary["verdict"] = verdict(summary)
    return RunSummary.from_dict(summary)


def _shard_row(s: ShardResult) -> dict[str, Any]:
    counters = s.clocks.get("counters", {})
    return {
        "shard_id": s.shard_id, "input": s.input, "items": s.items, "wall_s": s.wall_s,
        "starvation": starvation_of(s.clocks.get("stages", {}).get("model", {})),
        "retries": int(counters.get("storage.retries", 0)), "host": s.host, "resumed": s.resumed,
    }


def write_report(outdir: str | Path, summary: dict[str, Any]) -> Path:
    path = Path(outdir) / "report.json"
    path.write_text(json.dumps(summary, indent=1, default=str))
    return path


def load_report(outdir: str | Path) -> dict[str, Any]:
    path = Path(outdir) / "report.json"
    if not path.exists():
        raise FileNotFoundError(f"no report.json in {outdir}: has a run finished there?")
    report: dict[str, Any] = json.loads(path.read_text())
    # Reports written before the verdict carried its gap (or the storage line) get both refreshed,
    # so `gpubatch report` on an old run still shows today's verdict.
    if "storage" not in report:
        report["storage"] = storage_summary(report.get("counters") or {}, report.get("wall_s", 0.0))
    if "gap" not in report.get("verdict", {}):
        report["verdict"] = verdict(report)
    return report


