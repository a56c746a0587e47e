"""report.html: the morning report, one self-contained page that opens offline.

Headline numbers and the verdict come first, because the reader's question is "was the run fast,
and if not, what do I change?"; the plots below are the evidence. Everything is inline (CSS, SVG,
a few lines of JS) and a Content-Security-Policy forbids any outside request, so the page can be
mailed, archived or opened on an air-gapped cluster and shows the same thing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from typing import Any

from gpubatch.core.plural import counted, plural
from gpubatch.core.results import failure_groups, quarantined_count
from gpubatch.io.metrics import COUNTED_WORDS
from gpubatch.io.uris import uri_name
from gpubatch.outputs.layout import HEATMAPS_DIR, REPORT_HTML, heatmap_name
from gpubatch.outputs.store import OutputStore
from gpubatch.report import plots
from gpubatch.report.frames import latency_frame, shard_frame, stage_frame, throughput_frame
from gpubatch.report.plots import AMBER, BLUE, GREEN, ORANGE, PURPLE, RED, Band, Series
from gpubatch.report.summary import next_step
from gpubatch.report.text import (
    gate_line,
    kinds_words,
    operator_lines,
    quality_lines,
    requests_split,
    resumed_line,
    retries_words,
)
from gpubatch.report.verdict import (
    LAYER_COMPUTE,
    LAYER_STORAGE,
    LAYER_TRANSFER,
    PART_LAYERS,
    verdict,
)
from gpubatch.report.words import BAND_HIGH, BAND_LOW, ms_words, pct, quota_words, starvation_words

LAYER_COLORS = {LAYER_STORAGE: ORANGE, LAYER_TRANSFER: PURPLE, LAYER_COMPUTE: BLUE}
BAND_COLORS = {"not input-bound": GREEN, "moderately input-bound": AMBER, "input-bound": RED}
# The per-stage breakdown: (part keys summed, label, layer).
BREAKDOWN = (
    (("storage",), "storage", LAYER_STORAGE), (("open",), "setup", LAYER_STORAGE),
    (("decode", "resample", "slice"), "decode", LAYER_STORAGE), (("preprocess",), "preprocess", LAYER_TRANSFER),
    (("transfer",), "transfer", LAYER_TRANSFER), (("compute",), "compute", LAYER_COMPUTE),
    (("slide_head",), "slide head", LAYER_COMPUTE),
    (("write",), "write", LAYER_STORAGE),
)
MUTED_LINE, INK_LINE = "#9aa5b1", "#1f2933"
# How the parts outside BREAKDOWN are labelled, where they are timed (core.clocks.STAGE_PARTS).
EXTRA_PARTS = {"commit": "output commit", "batch": "batch assembly", "turn": "model: waiting its turn", "output": "output conversion",
               "fallback": "fp32 fallback"}
MAX_HEATMAPS = 48  # inlined in the page; the rest stay in heatmaps/
MAX_FAILED_ROWS = 200  # quarantined inputs drawn one per row; past it, grouped by error as well
MAX_LISTED_GROUPS = 100  # distinct errors drawn
CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"

CSS = """
*{box-sizing:border-box}body{margin:0;background:#f5f7fa;color:#1f2933;
font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif}
main{max-width:1180px;margin:0 auto;padding:20px 24px 40px}
h1{font-size:22px;margin:0 0 2px}h2{font-size:16px;margin:24px 0 8px}.sub{color:#616e7c;margin:0 0 14px}
.tiles{display:grid;grid-template-columns:repeat(6,1fr);gap:10px;margin-bottom:14px}
.tile{background:#fff;border:1px solid #e4e7eb;border-radius:8px;padding:10px 12px}
.tile .v{font-size:22px;font-weight:650}.tile .k{color:#616e7c;font-size:12px}
.verdict{background:#fff;border:1px solid #e4e7eb;border-left:6px solid var(--band);border-radius:8px;
padding:12px 16px}.verdict h2{margin:0 0 6px;font-size:18px}.verdict p{margin:4px 0}
.verdict .next{font-weight:600}.verdict .gap{color:#3e4c59}.verdict .note{color:#616e7c;font-size:12px}
.pill{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;background:var(--band);font-size:12px}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:12px}
figure{margin:0;background:#fff;border:1px solid #e4e7eb;border-radius:8px;padding:8px}
svg.plot{width:100%;height:auto;display:block}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #e4e7eb}
th,td{padding:5px 8px;border-bottom:1px solid #e4e7eb;text-align:right;font-variant-numeric:tabular-nums}
th{background:#f0f2f5;font-weight:600}table#run{width:auto;min-width:460px}td.l,th.l{text-align:left}tr.failed td{background:#fdecec}
.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
ul.facts{background:#fff;border:1px solid #e4e7eb;border-radius:8px;margin:0;padding:8px 28px}
ul.facts li.sub{list-style:circle;margin-left:18px;color:#3e4c59}tr.empty td{background:#fff8e6}
.maps{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:10px}
.maps img{width:100%;height:auto;image-rendering:pixelated;display:block;background:#fff}
.maps figcaption{font-size:12px;color:#3e4c59;margin-top:4px;overflow-wrap:anywhere}
@media (max-width:800px){.grid{grid-template-columns:1fr}.tiles{grid-template-columns:repeat(3,1fr)}}
"""

# Marks each plot rendered when its SVG has a laid-out box and drawn marks; the tests (and a
# curious reader) see the result as data attributes in the DOM.
SELF_CHECK = """
(function(){var figs=document.querySelectorAll('svg.plot'),ok=0;
for(var i=0;i<figs.length;i++){var s=figs[i],r=s.getBoundingClientRect(),
marks=s.querySelectorAll('rect.bar,polyline.series,text.empty').length,
good=r.width>0&&r.height>0&&marks>0;s.setAttribute('data-rendered',good?'yes':'no');if(good)ok++;}
document.body.setAttribute('data-plots-rendered',ok+'/'+figs.length);})();
"""


def _cores_busy(report: dict[str, Any]) -> str | None:
    cpu = report.get("host_cpu")
    return f"{pct(cpu['busy'])} of {cpu.get('cores') or '?'}{quota_words(cpu)}" if cpu else None


def _num(v: float | None, fmt: str = "{:.1f}", none: str = "–") -> str:
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _rate(v: float | None) -> str:
    """Headline rates: one decimal below 100, thousands separators above."""
    return _num(v, "{:,.0f}" if v is not None and v >= 100 else "{:.1f}")


def _tiles(report: dict[str, Any], v: dict[str, Any]) -> str:
    """Six headline numbers: the end-to-end rate first, the model-only rate beside it."""
    gap = v.get("gap") or {}
    failed = quarantined_count(report.get("failed") or [])
    stats = report.get("shard_stats") or {}
    count = stats.get("count", len(report.get("shards") or []))
    # this run's empty inputs and those a resumed run kept: both yielded nothing
    empty = (report.get("empty") or {}).get("count", 0) + stats.get("resumed_empty", 0)
    done = count - empty
    extra = ", ".join(x for x in (f"{empty} empty" if empty else "", f"{failed} quarantined" if failed else "") if x)
    tiles = [
        (_rate(report.get("items_per_s")), "items/s end-to-end"),
        (_rate(gap.get("model_only_items_per_s")), "items/s model-only"),
        ("–" if gap.get("cost") is None else pct(gap["cost"]), "of model speed lost to the data path"),
        _starvation_tile(report, v),
        (f"{report.get('items', 0):,}", f"{plural(report.get('items', 0), 'item')} in {report.get('wall_s', 0.0):.1f} s"),
        (f"{done}/{count + failed}", "inputs done" + (f", {extra}" if extra else "")),
    ]
    cells = "".join(f'<div class="tile"><div class="v">{escape(a)}</div><div class="k">{escape(b)}</div></div>'
                    for a, b in tiles)
    return f'<section class="tiles" id="headline">{cells}</section>'


def _starvation_tile(report: dict[str, Any], v: dict[str, Any]) -> tuple[str, str]:
    shown, said = starvation_words(report.get("starvation", 0.0), v)
    return shown, f"model starvation ({said})"


NO_VERDICT_TITLES = {"failed": "Run failed: every input failed", "empty": "No items were processed",
                     "nothing-ran": "Nothing left to run", "too-small": "Too little work for a verdict"}


def _verdict_box(v: dict[str, Any]) -> str:
    """The verdict: limiting layer, evidence, next move, and what the gap costs; or, when there
    is nothing to judge, why not (and no advice)."""
    state = v.get("state", "verdict")
    if state != "verdict":
        color = RED if state == "failed" else MUTED_LINE
        return (f'<section class="verdict" id="verdict" data-state="{escape(state)}" style="--band:{color}">'
                f'<h2>{escape(NO_VERDICT_TITLES.get(state, "No verdict"))}</h2>'
                f'<p>{escape(v["evidence"][:1].upper() + v["evidence"][1:])}.</p></section>')
    color = BAND_COLORS.get(v["band"], AMBER)
    detail = f" — {v['detail']}" if v.get("detail") else ""
    gap_text = (v.get("gap") or {}).get("text", "")
    evidence = v["evidence"].replace("; " + gap_text, "") if gap_text else v["evidence"]
    lines = [
        f'<section class="verdict" id="verdict" data-state="verdict" style="--band:{color}">',
        f'<h2>Limited by {escape(v["limiting_layer"])}{escape(detail)}</h2>',
        f'<p><span class="pill">{escape(v["band"])}</span> model starved {v["starvation"]:.1%} of its time '
        f'(bands: under {BAND_LOW:.0%} fed, {BAND_LOW:.0%}–{BAND_HIGH:.0%} moderate, {BAND_HIGH:.0%}+ input-bound)</p>',
        f'<p><b>Evidence:</b> {escape(evidence)}</p>',
        f'<p class="next">Next move: {escape(v["next_move"])}</p>',
    ]
    if gap_text:
        lines.append(f'<p class="gap">{escape(gap_text[:1].upper() + gap_text[1:])}.</p>')
    if v.get("caveat"):
        lines.append(f'<p class="note">Note: {escape(v["caveat"])}.</p>')
    return "".join(lines) + "</section>"


def _unfinished(report: dict[str, Any]) -> str:
    """A banner on the page of a run that did not finish (``summarize_output``'s report): without
    it the page of an interrupted run looks like a finished one's, headline numbers and all."""
    if report.get("complete", True) is not False:
        return ""
    state = str(report.get("state") or "unknown")
    return (f'<p class="verdict" id="unfinished" style="--band:{RED}"><b>This run did not finish ({escape(state)}).'
            f"</b> The figures cover the {report.get('shards_done', 0)} shard(s) committed so far of "
            f"{escape(str(report.get('shards_total') or '?'))} planned; {escape(next_step(report))}.</p>")


def _facts(report: dict[str, Any]) -> str:
    """The precision gate, data quality, empty/retried/lost work and notes, as the terminal says them."""
    lines = [x for x in (gate_line(report), resumed_line(report)) if x]
    lines += quality_lines(report) + operator_lines(report)
    if not lines:
        return ""
    items = "".join(f'<li class="{"sub" if line.startswith("  ") else ""}">{escape(line.strip())}</li>'
                    for line in lines)
    return f'<h2>What the run met</h2><ul class="facts" id="facts">{items}</ul>'


def _time_plots(report: dict[str, Any]) -> list[str]:
    """Throughput, starvation (with the 5% and 20% bands) and queue depth over the run."""
    tf = throughput_frame(report)
    if tf.empty:
        msg = "no batches were timed in this run"
        return [plots.message_plot(n, t, msg) for n, t in (("throughput", "Throughput over time"),
                ("starvation", "Model starvation over time"), ("queue", "Prefetch queue depth over time"))]
    width = float(tf["t_end"].iloc[0] - tf["t_start"].iloc[0])
    mid = list(tf["t_start"] + width / 2)
    avg = report.get("items_per_s", 0.0)
    thr = plots.time_chart(
        "throughput", "Throughput over time",
        [Series("items/s", list(tf["t_start"]), list(tf["items_per_s"]), BLUE, "bars", list(tf["t_end"])),
         Series(f"run average {avg:.1f}", [0.0, float(tf["t_end"].iloc[-1])], [avg, avg], MUTED_LINE, dashed=True)],
        x_label="time since first shard started (s)", y_label="items/s",
        subtitle=f"items finished per {width:g} s bucket, all workers")
    bands = [Band(0.0, BAND_LOW, GREEN, "fed < 5%"), Band(BAND_LOW, BAND_HIGH, AMBER, "moderate 5–20%"),
             Band(BAND_HIGH, 1.0, RED, "input-bound ≥ 20%")]
    starv = plots.time_chart(
        "starvation", "Model starvation over time", [Series("starvation", mid, list(tf["starvation"]), INK_LINE)],
        x_label="time since first shard started (s)", y_label="starved / (starved + busy)", bands=bands,
        y_max=1.0, y_fmt="%", subtitle=f"share of model-stage time spent waiting for input, per {width:g} s")
    queue = plots.time_chart(
        "queue", "Prefetch queue depth over time",
        [Series("mean", mid, list(tf["queue_depth_mean"]), BLUE),
         Series("max", mid, list(tf["queue_depth_max"]), ORANGE, dashed=True)],
        x_label="time since first shard started (s)", y_label="ready batches",
        subtitle="ready batches queued after each model batch; near 0 = about to starve")
    return [thr, starv, queue]



def _breakdown_plot(report: dict[str, Any]) -> str:
    """Seconds per part, coloured by the layer it belongs to."""
    parts = report.get("parts") or {}
    total = sum(parts.values()) or 1.0
    rows = []
    for keys, label, layer in BREAKDOWN:
        sec = sum(parts.get(k, 0.0) for k in keys)
        note = f"{sec:.2f} s ({pct(sec / total)})" if any(k in parts for k in keys) else "not timed"
        rows.append((label, sec, LAYER_COLORS[layer], note))
    # Every other timed part gets its row too (batch assembly, a shard's turn behind the
    # worker's other one, output conversion): the shares are of all parts, and a page that
    # drew only some of them showed shares adding to 64%, its largest part (turn) not drawn.
    named = {k for keys, _, _ in BREAKDOWN for k in keys}
    for key, sec in parts.items():
        if key not in named and sec > 0:
            label = EXTRA_PARTS.get(key, key)
            rows.append((label, sec, LAYER_COLORS.get(PART_LAYERS.get(key, ""), MUTED_LINE), f"{sec:.2f} s ({pct(sec / total)})"))
    legend = [("storage/host", ORANGE), ("transfer", PURPLE), ("compute", BLUE)]
    if any(color == MUTED_LINE for _, _, color, _ in rows):
        legend.append(("pipeline", MUTED_LINE))
    return plots.hbar_chart("breakdown", "Time by stage part", rows, x_label="seconds (summed over workers and threads)",
                            legend=legend, subtitle="setup = slide open + tissue mask, per shard")


def _stage_clock_plot(report: dict[str, Any]) -> str:
    """Busy / starved / blocked seconds per pipeline stage."""
    sf = stage_frame(report)
    rows = []
    for _, r in sf.iterrows():
        for kind, color in (("busy", BLUE), ("starved", RED), ("blocked", AMBER)):
            sec = float(r[f"{kind}_s"])
            rows.append((f"{r['stage']} {kind}", sec, color, f"{sec:.2f} s"))
    return plots.hbar_chart("stages", "Stage clocks", rows, x_label="seconds",
                            legend=[("busy", BLUE), ("starved", RED), ("blocked", AMBER)],
                            subtitle="starved: waiting for input; blocked: waiting for room downstream")


def _latency_plot(report: dict[str, Any]) -> str:
    lf = latency_frame(report)
    title = "Storage request latency"
    if lf.empty:
        return plots.message_plot("latency", title, "no remote storage requests")
    st = report.get("storage") or {}
    labels = [f"≤{plots.fmt(u)}" if math.isfinite(u) else f">{plots.fmt(lo)}"
              for lo, u in zip(lf["lower_ms"], lf["upper_ms"], strict=True)]
    p50, p99 = (st.get(k) for k in ("p50_ms", "p99_ms"))
    sub = (f"{int(lf['count'].sum())} requests; p50 {'–' if p50 is None else ms_words(p50)} ms, "
           f"p99 {'–' if p99 is None else ms_words(p99)} ms")
    return plots.histogram("latency", title, labels, list(lf["count"]), x_label="latency bucket upper bound (ms, log-spaced)",
                           y_label="requests", subtitle=sub)


def _shard_table(report: dict[str, Any]) -> str:
    """Per input: items, seconds, rate, starvation, retries; quarantined inputs with their error,
    empty ones with the reason they yielded no items."""
    import pandas as pd

    failed = report.get("failed") or []
    df = shard_frame({**report, "failed": failed[:MAX_FAILED_ROWS]})
    if df.empty:
        return "<p>No shards ran.</p>"
    head = ("<tr><th class=l>input</th><th>status</th><th>items</th><th>seconds</th><th>items/s</th>"
            "<th>starvation</th><th>retries</th><th class=l>error or reason</th></tr>")
    body = []
    for _, r in df.iterrows():
        retries = "–" if pd.isna(r["retries"]) else str(r["retries"])
        why = next((x for x in (r["error"], r["reason"]) if isinstance(x, str)), "")
        body.append(
            f'<tr class="{escape(r["status"])}"><td class="l mono">{escape(str(r["input"]))}</td>'
            f'<td>{escape(r["status"])}</td><td>{int(r["items"]):,}</td><td>{_num(r["wall_s"], "{:.2f}")}</td>'
            f'<td>{_num(r["items_per_s"])}</td><td>{_num(r["starvation"], "{:.1%}")}</td><td>{retries}</td>'
            f'<td class="l">{escape(why)}</td></tr>')
    return f'{_failure_groups(failed)}<table id="shards">{head}{"".join(body)}</table>'


def _failure_groups(failed: list[dict[str, Any]]) -> str:
    """Past MAX_FAILED_ROWS quarantined inputs, a table of their errors with counts above the
    inputs' table, which then lists the first MAX_FAILED_ROWS: a run with 5,000 failures drew
    5,000 rows. report.json's ``failed`` lists every input."""
    if len(failed) <= MAX_FAILED_ROWS:
        return ""
    groups = failure_groups(failed)
    rows = "".join(f'<tr class="failed"><td>{g["count"]:,}</td><td class="l">{escape(g["error"])}</td>'
                   f'<td class="l mono">{escape(", ".join(g["inputs"]))}</td></tr>' for g in groups[:MAX_LISTED_GROUPS])
    more = len(groups) - MAX_LISTED_GROUPS
    note = f" ({more} more errors not shown)" if more > 0 else ""
    return (f'<p class=sub id="failures-note">{counted(quarantined_count(failed), "input")} quarantined, '
            f"{len(groups)} distinct {plural(len(groups), 'error')}{note}; the table below lists the first {MAX_FAILED_ROWS}, report.json's <span class=mono>failed"
            f'</span> every one.</p><table id="failures"><tr><th>inputs</th><th class=l>error (first input\'s)</th>'
            f"<th class=l>first inputs</th></tr>{rows}</table>")


def _requests_words(st: dict[str, Any]) -> str | None:
    """The storage requests, with the client's (checks, plan, preparation) and the shards' apart."""
    if st.get("requests") is None:
        return None
    return f"{st['requests']}{requests_split(st)}"


def _run_table(report: dict[str, Any]) -> str:
    """Run settings and storage figures, so the reader knows what the numbers were measured on."""
    st = report.get("storage") or {}
    rows = [("started", report.get("started_at")), ("host", report.get("host")), ("spec", report.get("spec_path")),
            ("kind", report.get("kind")), ("backend", report.get("backend")), ("precision", report.get("precision")),
            ("batch size", report.get("batch_size")), ("batch fill", None if report.get("batch_fill") is None else pct(report["batch_fill"])),
            ("workers", report.get("workers")), ("readers per worker", report.get("readers")),
            ("profile", report.get("profile")), ("storage requests", _requests_words(st)),
            ("storage HEADs", st.get("heads")), ("storage requests by kind", kinds_words(st)),
            ("storage counts", COUNTED_WORDS if st.get("requests") else None),
            ("storage MB", _num((st.get("bytes") or 0) / 1e6)), ("storage MB/s", _num(st.get("mb_per_s"))),
            ("storage retries", retries_words(st) if st else None),
            ("cores busy while shards ran", _cores_busy(report)),
            ("gpubatch", report.get("gpubatch_version")),
            ("model sha256", (report.get("model_sha256") or "")[:16])]
    cells = "".join(f'<tr><th class="l">{escape(k)}</th><td class="l mono">{escape(str(v if v is not None else "–"))}</td></tr>'
                    for k, v in rows)
    return f'<table id="run">{cells}</table>'


def _heatmap_section(heatmaps: list[Heatmap]) -> str:
    """Each slide's heatmap, small, with its name: drawn from predictions, so no tissue shows."""
    if not heatmaps:
        return ""
    figures = "".join(
        f'<figure><img src="{escape(h.data_uri)}" alt="heatmap of {escape(h.slide)}">'
        f"<figcaption><b>{escape(h.slide)}</b><br>{escape(h.caption)}</figcaption></figure>"
        for h in heatmaps[:MAX_HEATMAPS])
    more = len(heatmaps) - MAX_HEATMAPS
    note = f"<p class=sub>{more} more in heatmaps/.</p>" if more > 0 else ""
    return f'<h2>Slides</h2><section class="maps" id="heatmaps">{figures}</section>{note}'


def render_html(report: dict[str, Any], heatmaps: list[Heatmap] | None = None) -> str:
    """The whole page as a string (no file access), for tests and for embedding."""
    v = report.get("verdict") or {}
    if "gap" not in v:
        v = verdict(report)
    name = escape(str(report.get("name", "job")))
    figures = [*_time_plots(report), _breakdown_plot(report), _stage_clock_plot(report), _latency_plot(report)]
    grid = "".join(f"<figure>{svg}</figure>" for svg in figures)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>gpubatch report: {name}</title><style>{CSS}</style></head><body><main>"
        f"<h1>{name}</h1><p class=sub>gpubatch run report · {escape(str(report.get('kind', '')))} · "
        f"{escape(str(report.get('backend', '')))} {escape(str(report.get('precision', '')))}</p>"
        f"{_unfinished(report)}{_tiles(report, v)}{_verdict_box(v)}{_facts(report)}<h2>Where the time went</h2><section class=grid id=plots>{grid}</section>"
        f"{_heatmap_section(heatmaps or [])}"
        f"<h2>Inputs</h2>{_shard_table(report)}<h2>Run</h2>{_run_table(report)}"
        f"</main><script>{SELF_CHECK}</script></body></html>"
    )


def write_html(where: OutputStore | str, report: dict[str, Any]) -> str:
    """Write report.html into the output; returns its URI."""
    store = OutputStore.of(where)
    store.write_bytes(REPORT_HTML, render_html(report, read_heatmaps(store, report)).encode("utf-8"))
    return store.url(REPORT_HTML)
@dataclass(frozen=True)
class Heatmap:
    """One slide's picture for the page: its name, the PNG inline, what coloured it."""

    slide: str
    data_uri: str
    caption: str


def _inlined(data: bytes, shard: dict[str, Any]) -> Heatmap:
    """A heatmap PNG as the report shows it: inlined, captioned by its text chunks."""
    import base64
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:  # the chunks before the pixels: nothing decoded
        text = {k: v for k, v in image.info.items() if isinstance(v, str)}
    low, _, high = text.get("gpubatch:range", "").partition(" ")
    caption = f"{text.get('gpubatch:colour', 'output')}, {low} to {high}" if high else text.get("gpubatch:colour", "")
    return Heatmap(uri_name(str(shard.get("input", ""))), "data:image/png;base64," + base64.b64encode(data).decode("ascii"),
                   caption)


def read_heatmaps(store: OutputStore, report: dict[str, Any]) -> list[Heatmap]:
    """The heatmaps of the report's slides (heatmaps/<key>.png), inlined, ordered by slide URI: the
    first MAX_HEATMAPS found, read a few at a time (it read up to 2,000 pictures to show 48)."""
    shards = sorted((s for s in report.get("shards") or [] if s.get("shard_id")), key=lambda s: str(s.get("input")))
    names = {f"{HEATMAPS_DIR}/{heatmap_name(str(s['shard_id']))}": s for s in shards}
    found: list[Heatmap] = []
    if not store.exists(HEATMAPS_DIR):
        return found
    todo = list(names)
    while todo and len(found) < MAX_HEATMAPS:  # read as many as are still wanted: not every slide's
        wanted, todo = todo[:MAX_HEATMAPS - len(found)], todo[MAX_HEATMAPS - len(found):]
        pictures = store.read_many(wanted)
        for name in wanted:
            data = pictures.get(name)
            if data is not None:
                found.append(_inlined(data, names[name]))
    return found
