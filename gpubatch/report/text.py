"""The short terminal summary of a run: what ran, where the time went, what the inputs held.

Written for the person reading it at 7 a.m. after an overnight run: the first line says whether
the run did its work; the verdict follows only when there is something to judge; then what an
operator needs (the precision gate's figures, data-quality counts, empty, retried and lost work,
notes) and the quarantined inputs. Every line is redacted and its control characters escaped.
"""

from __future__ import annotations

import os
from typing import Any

from gpubatch.core.plural import plural
from gpubatch.core.results import failure_groups, quarantined_count
from gpubatch.io.metrics import COUNTED_WORDS
from gpubatch.io.redact import safe_text
from gpubatch.report.words import cores_sentence, starvation_words

MAX_LISTED = 10
#: quarantined inputs the terminal summary lists; report.json lists them all
MAX_FAILED_SHOWN = 20
#: past MAX_FAILED_SHOWN, the errors the terminal summary shows (largest groups first)
MAX_FAILED_GROUPS = 10
#: a stage's unexplained remainder is shown when it is over this share of the stage's busy time
OTHER_SHOWN = 0.05
#: how each skip reason reads in a sentence
SKIP_WORDS = {
    "alt_missing": "no ALT ('.')", "symbolic": "symbolic (<DEL>, ...)", "spanning_deletion": "'*'",
    "breakend": "breakends", "iupac": "IUPAC ambiguity codes", "not_sequence": "not sequence",
}


def variant_lines(v: dict[str, Any]) -> list[str]:
    """Records read, scored, skipped by reason, and REF mismatches of a variant-mode run."""
    skipped = {k: n for k, n in (v.get("skipped") or {}).items() if n}
    total_skipped = sum(skipped.values())
    name = os.path.basename(str(v.get("file", "")).rstrip("/")) or "variants"
    layout = v.get("layout", "vcf")
    records, scored = v.get("records", 0), v.get("scored", 0)
    lines = [f"variants: {records} {plural(records, 'record')} in {name} ({layout}); {scored} "
             f"{plural(scored, 'ALT allele')} scored of {v.get('scorable', 0)} scorable"]
    if total_skipped:
        reasons = ", ".join(f"{n} {SKIP_WORDS.get(k, k)}" for k, n in skipped.items())
        lines.append(f"  skipped {total_skipped} ALT allele(s) that are not sequence: {reasons}")
    mismatches = int(v.get("ref_mismatches", 0))
    limit = v.get("max_ref_mismatch")
    share = float(v.get("ref_mismatch_share", 0.0))
    lines.append(f"  REF mismatches: {mismatches} of {v.get('scored', 0)} scored ({share:.1%}"
                 + (f"; the job is refused above {limit:.0%}" if limit is not None else "")
                 + ("), flagged ref_match = false" if mismatches else ")"))
    return lines


def quality_lines(report: dict[str, Any]) -> list[str]:
    """Every data-quality section of the report, as lines of text."""
    quality = report.get("data_quality") or {}
    lines: list[str] = []
    if quality.get("variants"):
        lines += variant_lines(quality["variants"])
    return lines


def _headline(report: dict[str, Any]) -> str:
    name = report.get("name", "job")
    v = report.get("verdict") or {}
    if v.get("state") == "failed":
        return f"{name}: FAILED: {v['evidence']}"
    model_only = report.get("model_only_items_per_s")
    return (f"{name}: {report['items']} {plural(report['items'], 'item')} in {report['wall_s']:.1f} s "
            f"= {report['items_per_s']:.1f} items/s"
            + (f" (model alone: {model_only:.1f} items/s)" if model_only else ""))


def _run_line(report: dict[str, Any]) -> str | None:
    """When, where, from which spec and with which gpubatch the run ran."""
    fields = [("run", report.get("started_at")), ("on", report.get("host")),
              ("spec", report.get("spec_path")), ("gpubatch", report.get("gpubatch_version"))]
    shown = [f"{k} {v}" for k, v in fields if v]
    return "  " + ", ".join(shown) if shown else None


def resumed_line(report: dict[str, Any]) -> str | None:
    resumed = report.get("resumed") or {}
    if not resumed.get("shards"):
        return None
    empty = f", {resumed['empty']} of them empty" if resumed.get("empty") else ""
    items = resumed.get("items", 0)
    return (f"  {resumed['shards']} shard(s) already committed, skipped ({items} {plural(items, 'item')}{empty}); "
            "the rates above cover this run's items only")


def _storage_line(report: dict[str, Any]) -> str | None:
    st = report.get("storage") or {}
    if not st.get("requests"):
        return None
    lat = (f", latency p50 {st['p50_ms']:g} ms p99 {st['p99_ms']:g} ms" if st.get("p50_ms") is not None else "")
    mbs = f" ({st['mb_per_s']:.1f} MB/s)" if st.get("mb_per_s") is not None else ""
    size = f" of {st['bytes_per_request'] / 1e3:.0f} kB" if st.get("bytes_per_request") else ""
    flight = (f", {st['in_flight_mean']:g} in flight on average (peak {st.get('in_flight_peak') or '-'})"
              if st.get("in_flight_mean") else "")
    heads = f" + {st['heads']} HEADs" if st.get("heads") else ""
    return (f"  storage: {st['requests']} {plural(st['requests'], 'request')}{requests_split(st)}{size}{heads}, "
            f"{st['bytes'] / 1e6:.1f} MB"
            f"{mbs}{lat}{flight}, {retries_words(st)}")


def kinds_words(st: dict[str, Any]) -> str | None:
    """Every counted request by kind, the client's share of each apart, as a server's log would
    show them: "120 get (client 20), 30 head (client 12), 4 list (client 4), 9 write (client 5)"."""
    by_kind, client = st.get("by_kind") or {}, st.get("client_by_kind") or {}
    if not by_kind:
        return None
    return ", ".join(f"{n} {kind}" + (f" (client {client[kind]})" if client.get(kind) else "")
                     for kind, n in by_kind.items())


def requests_split(st: dict[str, Any]) -> str:
    """Whose the reads were: the client's (checks, plan, preparation) and the shards'."""
    client = st.get("client_requests")
    return f" (client {client}, shards {st['requests'] - client})" if client else ""


def retries_words(st: dict[str, Any]) -> str:
    """The storage retries, with how many the client libraries made themselves (io.retry_counts)
    and how many answered throttling (a server asking for less): "5 retries (2 throttled)"."""
    parts = [f"{st['library_retries']} by client libraries" if st.get("library_retries") else "",
             f"{st['throttled']} throttled" if st.get("throttled") else ""]
    said = "; ".join(p for p in parts if p)
    retries = st.get("retries", 0)
    return f"{retries} {plural(retries, 'retry', 'retries')}" + (f" ({said})" if said else "")


def _parts_line(parts: dict[str, float], busy: float) -> str | None:
    """A stage's busy time by part, largest first; ``other`` only when it is over 5% of busy."""
    shown = {k: v for k, v in parts.items() if v > 0 and (k != "other" or v > OTHER_SHOWN * busy)}
    if not shown:
        return None
    return "         = " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(shown.items(), key=lambda kv: -kv[1])) + " s"


def _clock_lines(report: dict[str, Any]) -> list[str]:
    v = report["verdict"]
    lines = ["starvation {} ({})".format(*starvation_words(report["starvation"], v))]
    stage_parts = report.get("stage_parts") or {}
    for name, st in report["stages"].items():
        lines.append(f"  {name:<6} busy {st['busy_s']:7.2f} s  starved {st['starved_s']:7.2f} s  blocked {st['blocked_s']:7.2f} s")
        parts = _parts_line(stage_parts.get(name) or {}, st["busy_s"])
        if parts:
            lines.append(parts)
    parts = report.get("parts", {})
    if parts and not stage_parts:  # a report from before the per-stage parts
        lines.append("  time by part: " + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])))
    elif parts.get("open"):
        lines.append(f"  setup: opening shards {parts['open']:.2f} s (before their pipelines)")
    storage = _storage_line(report)
    if storage:
        kinds = kinds_words(report.get("storage") or {})
        lines += [storage, *([f"           by kind: {kinds}"] if kinds else []),
                  f"           counted: {COUNTED_WORDS}"]
    cpu = report.get("host_cpu")
    if cpu:
        counted = "every process in the quota's cgroup" if cpu.get("quota") else "every process on them"
        lines.append(f"  cores: {cores_sentence(cpu)} ({counted} counted)")
    return lines


def _verdict_lines(v: dict[str, Any]) -> list[str]:
    if v.get("state", "verdict") != "verdict":
        return [f"verdict: none ({v['evidence']})"]
    lines = [f"verdict: limited by {v['limiting_layer']}" + (f" ({v['detail']})" if v.get("detail") else ""),
             f"  evidence: {v['evidence']}", f"  next: {v['next_move']}"]
    if v.get("caveat"):
        lines.append(f"  note: {v['caveat']}")
    return lines


def gate_line(report: dict[str, Any]) -> str | None:
    """The reduced-precision validation gate: what was asked, what ran, and the figures."""
    q = report.get("quantization") or {}
    if not q.get("requested"):
        return None
    figures = q.get("validation") or {}
    if "agreement" not in figures:
        why = q.get("note") or q.get("reason") or ""
        return f"precision: {q['requested']} requested, {q.get('used', 'fp32')} used" + (f" ({why})" if why else "")
    metric = "top-1 agreement" if figures.get("task") == "classifier" else "Pearson correlation"
    outcome = "passed" if q.get("passed") else f"failed, ran {q.get('used', 'fp32')}"
    return (f"precision: {q['requested']} gate {outcome}: {metric} with fp32 {figures['agreement']:.4f} "
            f"(min {figures.get('min_agreement')}) on {figures.get('items')} {plural(figures.get('items'), 'held-out item')}, "
            f"task {figures.get('task')}")


def _listed(title: str, rows: list[str], count: int | None = None) -> list[str]:
    """A title and the first MAX_LISTED rows, with how many more there are (``count`` in all)."""
    total = len(rows) if count is None else count
    if not total:
        return []
    shown = rows[:MAX_LISTED]
    more = [f"  ... and {total - len(shown)} more (report.json)"] if total > len(shown) else []
    return [title, *(f"  {r}" for r in shown), *more]


def _when(value: Any) -> str:
    """A time as the report holds it (epoch seconds or ISO text), in ISO 8601 UTC."""
    if isinstance(value, (int, float)):
        import datetime

        return datetime.datetime.fromtimestamp(value, tz=datetime.timezone.utc).isoformat(timespec="seconds")
    return str(value)


def _counted(section: Any) -> tuple[int, list[Any]]:
    """(count, listed entries) of a report section written as {count, listed} (or a plain list)."""
    if isinstance(section, dict):
        return int(section.get("count", 0)), list(section.get("listed") or [])
    entries = list(section or [])
    return len(entries), entries


def operator_lines(report: dict[str, Any]) -> list[str]:
    """Empty inputs, retried shards, lost workers and notes: what happened besides the numbers."""
    n_empty, empty = _counted(report.get("empty"))
    n_retried, retried = _counted(report.get("retried"))
    lost = [f"{w.get('worker')} at {_when(w.get('time'))}: shards "
            f"{', '.join(map(str, w.get('shards') or [])) or 'none'}"
            + (f" ({w['cause']})" if w.get("cause") else "") for w in report.get("lost_workers") or []]
    return [*_listed(f"empty: {n_empty} input(s) yielded no items:", [f"{e['input']}: {e['reason']}" for e in empty],
                     n_empty),
            *_listed(f"retried: {n_retried} shard(s) needed more than one attempt:",
                     [f"{r['input']}: done on attempt {r['attempts']}" for r in retried], n_retried),
            *_listed(f"lost workers: {len(lost)}:", lost),
            *(f"note: {n}" for n in report.get("notes") or [])]


def failed_lines(failed: list[dict[str, Any]]) -> list[str]:
    """The quarantined inputs: each one where there are few; past MAX_FAILED_SHOWN, the
    MAX_FAILED_GROUPS largest groups by error with their counts and first inputs (5,000 failures
    printed 20 of them and "4980 more": which errors, how many of each, went unsaid)."""
    if not failed:
        return []
    count = quarantined_count(failed)
    if len(failed) <= MAX_FAILED_SHOWN:
        return [f"quarantined {count} input(s):", *(f"  {f['input']}: {f['error']}" for f in failed)]
    groups = failure_groups(failed)
    lines = [f"quarantined {count} input(s): {len(groups)} distinct error(s), largest first "
             f"(report.json's failed lists every input with its error):"]
    for g in groups[:MAX_FAILED_GROUPS]:
        more = ", ..." if g["count"] > len(g["inputs"]) else ""
        lines.append(f"  {g['count']} x {g['error']}  ({', '.join(g['inputs'])}{more})")
    if len(groups) > MAX_FAILED_GROUPS:
        rest = sum(g["count"] for g in groups[MAX_FAILED_GROUPS:])
        lines.append(f"  ... and {len(groups) - MAX_FAILED_GROUPS} more error(s) of {rest} input(s)")
    return lines


def format_summary(report: dict[str, Any]) -> str:
    """The terminal summary: headline, run facts, clocks and verdict (when there is something to
    judge), the precision gate, data quality, empty/retried/lost work, notes, quarantined inputs."""
    v = report["verdict"]
    lines = [_headline(report)]
    lines += [x for x in (_run_line(report), resumed_line(report)) if x]
    if v.get("state") != "failed":
        lines += _clock_lines(report)
        lines += _verdict_lines(v)
    gate = gate_line(report)
    if gate:
        lines.append(gate)
    lines += quality_lines(report)
    lines += operator_lines(report)
    lines += failed_lines(report.get("failed") or [])
    # Names, paths and errors come from users and files: every line redacted and made printable.
    return "\n".join(safe_text(line) for line in lines)
