"""The short terminal summary of a run: items, rate, starvation, stages, parts, storage, verdict."""

from __future__ import annotations

from typing import Any

from gpubatch.io.redact import printable, safe_text


def _headline(report: dict[str, Any]) -> str:
    model_only = report.get("model_only_items_per_s")
    return (f"{printable(report.get('name', 'job'))}: {report['items']} items in {report['wall_s']:.1f} s "
            f"= {report['items_per_s']:.1f} items/s"
            + (f" (model alone: {model_only:.1f} items/s)" if model_only else ""))


def _storage_line(report: dict[str, Any]) -> str | None:
    st = report.get("storage") or {}
    if not st.get("requests"):
        return None
    lat = (f", latency p50 {st['p50_ms']:g} ms p99 {st['p99_ms']:g} ms" if st.get("p50_ms") is not None else "")
    mbs = f" ({st['mb_per_s']:.1f} MB/s)" if st.get("mb_per_s") is not None else ""
    return f"  storage: {st['requests']} requests, {st['bytes'] / 1e6:.1f} MB{mbs}{lat}, {st.get('retries', 0)} retries"


def format_summary(report: dict[str, Any]) -> str:
    """The short terminal summary: items, rate, wall time, starvation, per-stage seconds, verdict."""
    v = report["verdict"]
    lines = [_headline(report), f"starvation {report['starvation']:.1%} ({v['band']})"]
    for name, st in report["stages"].items():
        lines.append(f"  {name:<6} busy {st['busy_s']:7.2f} s  starved {st['starved_s']:7.2f} s  blocked {st['blocked_s']:7.2f} s")
    parts = report.get("parts", {})
    if parts:
        lines.append("  time by part: " + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])))
    storage = _storage_line(report)
    if storage:
        lines.append(storage)
    lines.append(f"verdict: limited by {v['limiting_layer']}" + (f" ({v['detail']})" if v.get("detail") else ""))
    lines.append(f"  evidence: {v['evidence']}")
    lines.append(f"  next: {v['next_move']}")
    if v.get("caveat"):
        lines.append(f"  note: {v['caveat']}")
    if report.get("failed"):
        lines.append(f"quarantined {len(report['failed'])} input(s):")
        lines.extend(f"  {safe_text(f['input'])}: {safe_text(f['error'])}" for f in report["failed"])
    return "\n".join(lines)
