"""The run summary and the bottleneck verdict, as data (report.json) and as terminal text.

The verdict names the limiting layer among the four practitioners profile (model compute, memory
transfer, batching, storage/host transport) with the evidence and the next move. Starvation
bands are the TensorFlow profiler's: under 5% not input-bound, 5-20% moderately, 20%+ input-bound.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpubatch.engine.clocks import StageClocks, starvation_of

BAND_LOW, BAND_HIGH = 0.05, 0.20


def band(starvation: float) -> str:
    if starvation < BAND_LOW:
        return "not input-bound"
    if starvation < BAND_HIGH:
        return "moderately input-bound"
    return "input-bound"


def _share(parts: dict[str, float], *names: str) -> float:
    total = sum(parts.values()) or 1.0
    return sum(parts.get(n, 0.0) for n in names) / total


def verdict(summary: dict[str, Any]) -> dict[str, Any]:
    """Name the limiting layer with its evidence and the concrete next move."""
    starv = summary["starvation"]
    parts: dict[str, float] = summary.get("parts", {})
    fill = summary.get("batch_fill", 1.0)
    model_only = summary.get("model_only_items_per_s") or 0.0
    e2e = summary.get("items_per_s") or 0.0
    gap = f"end-to-end {e2e:.1f} items/s against {model_only:.1f} model-only" if model_only else ""
    storage, decode = parts.get("storage", 0.0), parts.get("decode", 0.0) + parts.get("resample", 0.0)
    transfer, compute = parts.get("transfer", 0.0), parts.get("compute", 0.0)
    if starv >= BAND_LOW:
        if storage > decode:
            layer = "storage/host transport"
            move = ("add reader threads (run.readers) to hide storage latency, or stage files "
                    "(input.access: stage) ahead of compute")
            evidence = f"readers spent {storage:.1f} s waiting on storage against {decode:.1f} s decoding"
        else:
            layer = "storage/host transport"
            move = ("add reader threads (run.readers) or worker processes so decode keeps up; "
                    "read a coarser pyramid level if the model allows; decode on the GPU where available")
            evidence = f"readers spent {decode:.1f} s decoding/resampling against {storage:.1f} s on storage"
    elif transfer > 0.25 * max(compute, 1e-9):
        layer = "memory transfer"
        move = "keep tiles uint8 until the device, use pinned buffers and overlap copies with compute"
        evidence = f"host-device transfer {transfer:.1f} s against {compute:.1f} s of compute"
    elif fill < 0.5 or _share(parts, "preprocess") > 0.3:
        layer = "batching"
        move = "raise model.batch_size (or batch_size: auto) so each call carries more items"
        evidence = f"batches were {fill:.0%} full; preprocessing took {_share(parts, 'preprocess'):.0%} of busy time"
    else:
        layer = "model compute"
        precision = summary.get("precision", "fp32")
        move = ("quantize (model.precision: int8, behind the validation gate) or use a faster backend"
                if precision == "fp32" else
                "the model is fed and reduced precision is in use: scale out (more GPUs or workers)")
        evidence = f"the model stage waited for data only {starv:.1%} of its time"
    return {
        "band": band(starv), "starvation": starv, "limiting_layer": layer,
        "evidence": "; ".join(x for x in (evidence, gap) if x), "next_move": move,
        "text": f"{band(starv)} ({starv:.1%} starved): limited by {layer}. {evidence}. Next: {move}.",
    }


def _timeline(shards: list[dict[str, Any]], t0: float) -> list[dict[str, float]]:
    points = []
    for s in shards:
        start = s.get("start", t0)
        for sample in s.get("clocks", {}).get("samples", []):
            points.append({**sample, "t": sample["t"] + start - t0, "shard": s["shard_id"]})
    return sorted(points, key=lambda p: p["t"])


def summarize(shards: list[dict[str, Any]], failed: list[dict[str, str]], wall_s: float,
              run_info: dict[str, Any]) -> dict[str, Any]:
    """Fold shard summaries into the report.json document."""
    clocks = StageClocks()
    for s in shards:
        clocks.merge(StageClocks.from_dict(s.get("clocks", {})))
    items = int(sum(s.get("items", 0) for s in shards))
    batches = sum(len(s.get("clocks", {}).get("samples", [])) for s in shards)
    batch_size = run_info.get("batch_size") or 1
    compute_s = clocks.parts.get("compute", 0.0)
    workers = max(1, run_info.get("workers", 1))
    t0 = min((s.get("start", 0.0) for s in shards), default=0.0)
    summary: dict[str, Any] = {
        "items": items,
        "items_per_s": items / wall_s if wall_s > 0 else 0.0,
        "wall_s": wall_s,
        "starvation": clocks.starvation,
        "stages": {k: v.as_dict() for k, v in clocks.stages.items()},
        "parts": dict(clocks.parts),
        "counters": dict(clocks.counters),
        "model_only_items_per_s": items / compute_s * min(workers, len(shards) or 1) if compute_s else None,
        "batch_fill": items / (batches * batch_size) if batches else 1.0,
        "failed": failed,
        "shards": [_shard_row(s) for s in shards],
        "timeline": _timeline(shards, t0),
        **run_info,
    }
    summary["verdict"] = verdict(summary)
    return summary


def _shard_row(s: dict[str, Any]) -> dict[str, Any]:
    stages = s.get("clocks", {}).get("stages", {})
    return {
        "shard_id": s["shard_id"], "input": s["input"], "items": s.get("items", 0),
        "wall_s": s.get("wall_s", 0.0), "starvation": starvation_of(stages.get("model", {})),
        "host": s.get("host"), "resumed": s.get("resumed", False),
    }


def write_report(outdir: str | Path, summary: dict[str, Any]) -> Path:
    path = Path(outdir) / "report.json"
    path.write_text(json.dumps(summary, indent=1, default=str))
    return path


def load_report(outdir: str | Path) -> dict[str, Any]:
    path = Path(outdir) / "report.json"
    if not path.exists():
        raise FileNotFoundError(f"no report.json in {outdir}: has a run finished there?")
    return json.loads(path.read_text())


def format_summary(report: dict[str, Any]) -> str:
    """The short terminal summary: items, rate, wall time, starvation, per-stage seconds, verdict."""
    lines = [
        f"{report.get('name', 'job')}: {report['items']} items in {report['wall_s']:.1f} s "
        f"= {report['items_per_s']:.1f} items/s"
        + (f" (model alone: {report['model_only_items_per_s']:.1f} items/s)" if report.get("model_only_items_per_s") else ""),
        f"starvation {report['starvation']:.1%} ({report['verdict']['band']})",
    ]
    for name, st in report["stages"].items():
        lines.append(f"  {name:<6} busy {st['busy_s']:7.2f} s  starved {st['starved_s']:7.2f} s  blocked {st['blocked_s']:7.2f} s")
    parts = report.get("parts", {})
    if parts:
        lines.append("  time by part: " + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])))
    lines.append(f"verdict: {report['verdict']['text']}")
    if report.get("failed"):
        lines.append(f"quarantined {len(report['failed'])} input(s):")
        lines.extend(f"  {f['input']}: {f['error']}" for f in report["failed"])
    return "\n".join(lines)
