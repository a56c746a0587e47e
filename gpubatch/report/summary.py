"""The run summary: shard results folded into the report.json document, written and read back.

Results are folded one at a time as they arrive (:class:`SummaryBuilder`), so the client's memory
stays bounded however many shards a run has: the stage clocks are summed, the per-batch timeline
is thinned to at most ``MAX_TIMELINE_POINTS`` points, and at most ``MAX_SHARD_ROWS`` per-shard
rows are kept (the slowest; every committed shard's full record stays in the manifest). The
figures are rendered three ways: pandas frames (``frames``), terminal text (``text``) and HTML
(``html``); the verdict comes from ``verdict``.
"""

from __future__ import annotations

import bisect
import heapq
import json
import logging
from collections.abc import Container, Iterable
from typing import Any

from gpubatch.core.clocks import StageClocks, stage_breakdown, starvation_of
from gpubatch.core.cpu import (
    BUSY_KEY,
    CORES_KEY,
    ELAPSED_KEY,
    PERIODS_KEY,
    QUOTA_KEY,
    THROTTLED_KEY,
)
from gpubatch.core.phases import phase
from gpubatch.core.results import RunSummary, ShardResult, nonfinite_counts
from gpubatch.io.metrics import storage_summary
from gpubatch.io.redact import redact
from gpubatch.outputs.layout import REPORT_JSON, SPEC_RECORD
from gpubatch.outputs.store import OutputStore
from gpubatch.report.verdict import verdict

log = logging.getLogger("gpubatch")
MAX_TIMELINE_POINTS = 4_096
MAX_SHARD_ROWS = 2_000
MAX_LISTED = 200  # empty inputs, retried shards and notes listed by name (all are counted)


class _Spans:
    """The time each worker process spent in shards' pipelines (open, pipeline, commit), overlaps
    merged. Not from the shard's start: a worker's first shard loads the model, start-up the gap
    names apart, and every shard's fixed cost before its open is outside too (said as such).

    A process runs two shards at once (the second waits its turn at the model), so the sum of
    shard times is no measure of how long its workers were busy: a 2-worker compute-bound run
    summed 21 s of shards in 16 worker-seconds and hid 5 s of start-up. Per process, intervals
    are kept merged and sorted; back-to-back shards coalesce, so the list stays short.
    """

    def __init__(self) -> None:
        self.by_process: dict[tuple[str | None, int | None], list[list[float]]] = {}
        #: per process, (sum, largest) of each shard's time outside its open and pipeline
        self.fixed: dict[tuple[str | None, int | None], tuple[float, float]] = {}

    def add(self, result: ShardResult) -> None:
        if result.end is None:
            return
        opening = float(result.clocks.get("parts", {}).get("open", 0.0))
        began = result.end - result.wall_s - opening
        if result.start is not None:
            fixed = max(0.0, began - result.start)
            total, largest = self.fixed.get((result.host, result.pid), (0.0, 0.0))
            self.fixed[(result.host, result.pid)] = (total + fixed, max(largest, fixed))
        spans = self.by_process.setdefault((result.host, result.pid), [])
        at = bisect.bisect_left(spans, [began, result.end])
        spans.insert(at, [began, result.end])
        lo = max(at - 1, 0)
        while lo + 1 < len(spans):  # merge around the new span
            if spans[lo + 1][0] <= spans[lo][1]:
                spans[lo][1] = max(spans[lo][1], spans.pop(lo + 1)[1])
            elif lo >= at:
                break
            else:
                lo += 1

    @property
    def fixed_s(self) -> float:
        """The shards' time outside their open and pipeline (checks, model hand-over, warm-up,
        commit), less each process's largest: the shard that loaded its model."""
        return sum(total - largest for total, largest in self.fixed.values())

    @property
    def total_s(self) -> float:
        return sum(end - start for spans in self.by_process.values() for start, end in spans)


class SummaryBuilder:
    """Folds shard results into the figures of a report, in memory bounded by configuration.

    Rates, clocks, the timeline and the verdict cover the shards this run executed; shards
    committed by an earlier run (``--resume``) are counted apart, so that they never inflate this
    run's throughput or lend it their clocks.
    """

    def __init__(self) -> None:
        self.clocks = StageClocks()
        self.items = self.batches = self.shards = self.resumed = self.ran = 0
        self.resumed_items = 0
        #: kept shards that yielded no items in the run that committed them: not "done" inputs
        #: either, though this run's lists (``empty``) and rates leave them out
        self.resumed_empty = 0
        self.pipeline_s = 0.0
        self.spans = _Spans()
        self.t0: float | None = None
        self._rows: list[tuple[float, int, dict[str, Any]]] = []
        #: timeline points as (field names, values): a tuple costs a third of a dict, and every
        #: sample of a run has the same few names, held once in ``_names``
        self._points: list[tuple[tuple[str, ...], tuple[Any, ...]]] = []
        self._names: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._stride, self._seen = 1, 0
        #: inputs with no items, shards that needed retries, and readers' notes: counted in full,
        #: listed up to MAX_LISTED each
        self.empty = _Listed()
        self.retried = _Listed()
        self.notes = _Notes()

    def add(self, result: ShardResult) -> None:
        self.shards += 1
        for note in result.attrs.get("notes") or []:
            self.notes.add(str(result.input), note)
        self._add_row(result)
        if result.resumed:
            self.resumed += 1
            self.resumed_items += result.items
            self.resumed_empty += result.items == 0
            return
        samples = result.clocks.get("samples", [])
        self.clocks.merge(StageClocks.from_dict({k: v for k, v in result.clocks.items() if k != "samples"}))
        self.ran += 1
        self.items += result.items
        self.batches += len(samples)
        self.pipeline_s += result.wall_s
        self.spans.add(result)
        if result.items == 0:
            self.empty.add({"input": result.input, "reason": empty_reason(result)})
        if result.attempt > 1:
            self.retried.add({"input": result.input, "shard_id": result.shard_id, "attempts": result.attempt})
        if result.start is not None:
            self.t0 = result.start if self.t0 is None else min(self.t0, result.start)
        self._add_points(result, samples)

    def _add_row(self, result: ShardResult) -> None:
        entry = (result.wall_s, self.shards, shard_row(result))
        if len(self._rows) < MAX_SHARD_ROWS:
            heapq.heappush(self._rows, entry)
        elif entry[0] > self._rows[0][0]:
            heapq.heapreplace(self._rows, entry)

    def _add_points(self, result: ShardResult, samples: list[dict[str, Any]]) -> None:
        """Per-batch samples on one clock (absolute); every ``stride``-th kept, the stride
        doubling (and the kept points halving) whenever the cap is reached."""
        start = (result.start or 0.0) + result.clocks.get("parts", {}).get("open", 0.0)
        for sample in samples:
            self._seen += 1
            if self._seen % self._stride:
                continue
            point = {**sample, "t": sample["t"] + start, "shard": result.shard_id}
            names = tuple(point)
            self._points.append((self._names.setdefault(names, names), tuple(point.values())))
            if len(self._points) >= MAX_TIMELINE_POINTS:
                self._points, self._stride = self._points[::2], self._stride * 2

    def _timeline(self, t0: float) -> list[dict[str, Any]]:
        """The kept points as dicts, in time order, their times from the run's first shard."""
        points = [dict(zip(names, values, strict=True)) for names, values in self._points]
        for point in points:
            point["t"] -= t0
        return sorted(points, key=lambda p: p["t"])

    def summary(self, failed: list[dict[str, Any]], wall_s: float, run_info: dict[str, Any]) -> RunSummary:
        """The report document for a run that took ``wall_s`` (this run's time, not a resumed one's)."""
        batch_size = run_info.get("batch_size") or 1
        compute_s = self.clocks.parts.get("compute", 0.0)
        workers = max(1, run_info.get("workers", 1))
        t0 = self.t0 or 0.0
        rows = [row for _, _, row in sorted(self._rows, key=lambda e: e[1])]
        info = dict(run_info)
        quality = dict(info.pop("data_quality", None) or {})
        notes = [*info.pop("notes", []), *quality.pop("notes", []), *self.notes.items]
        doc: dict[str, Any] = {
            "items": self.items,
            "items_per_s": self.items / wall_s if wall_s > 0 else 0.0,
            "wall_s": wall_s,
            "starvation": self.clocks.starvation,
            "stages": {k: v.as_dict() for k, v in self.clocks.stages.items()},
            "parts": dict(self.clocks.parts),
            "stage_parts": stage_breakdown(self.clocks.stages, self.clocks.stage_parts),
            "counters": dict(self.clocks.counters),
            "nonfinite": nonfinite_counts(self.clocks.counters),
            "peaks": dict(self.clocks.peaks),
            "storage": storage_summary(dict(self.clocks.counters), wall_s, self.clocks.peaks),
            "host_cpu": host_cpu(self.clocks.counters, self.clocks.peaks),
            "model_only_items_per_s": self.items / compute_s * min(workers, self.ran or 1) if compute_s else None,
            "batches": self.batches,
            "batch_fill": self.items / (self.batches * batch_size) if self.batches else 1.0,
            "items_total": self.items + self.resumed_items,
            "resumed": {"shards": self.resumed, "items": self.resumed_items, "empty": self.resumed_empty},
            "failed": failed,
            "shards": rows,
            "shard_stats": {"count": self.shards, "resumed": self.resumed, "resumed_items": self.resumed_items,
                            "resumed_empty": self.resumed_empty,
                            "rows_kept": len(rows), "pipeline_s": self.pipeline_s,
                            **({"in_shards_s": self.spans.total_s, "fixed_s": self.spans.fixed_s}
                               if self.spans.by_process else {}),
                            "items_per_shard": self.items / self.ran if self.ran else 0.0},
            "empty": self.empty.as_dict(), "retried": self.retried.as_dict(),
            "data_quality": quality, "notes": notes + self.notes.more(),
            "timeline": self._timeline(t0),
            "timeline_stride": self._stride,
            **info,
        }
        doc["verdict"] = verdict(doc)
        return RunSummary.from_dict(doc)


def host_cpu(counters: dict[str, float], peaks: dict[str, float]) -> dict[str, Any] | None:
    """How busy the workers' cores were while shards ran (core.cpu), or None where not measured.

    ``cores`` is the most any worker had (a CPU quota's share where one limited it: ``quota``),
    and ``throttled`` the share of a quota's scheduling periods in which the kernel held it back.
    """
    elapsed = counters.get(ELAPSED_KEY, 0.0)
    if elapsed <= 0:
        return None
    cores = round(float(peaks.get(CORES_KEY, 0)), 2)
    doc: dict[str, Any] = {"busy": min(1.0, counters.get(BUSY_KEY, 0.0) / elapsed),
                           "cores": int(cores) if cores.is_integer() else cores}
    if peaks.get(QUOTA_KEY):
        periods = counters.get(PERIODS_KEY, 0.0)
        doc.update(quota=True, throttled=counters.get(THROTTLED_KEY, 0.0) / periods if periods else 0.0)
    return doc


def summarize(shards: list[ShardResult], failed: list[dict[str, str]], wall_s: float,
              run_info: dict[str, Any]) -> RunSummary:
    """Fold shard results into the report.json document (all at once)."""
    builder = SummaryBuilder()
    for s in shards:
        builder.add(s)
    return builder.summary(failed, wall_s, run_info)


class _Listed:
    """A count and the first MAX_LISTED entries: what a report lists without growing with the run."""

    def __init__(self) -> None:
        self.count = 0
        self.items: list[Any] = []

    def add(self, entry: Any) -> None:
        self.count += 1
        if len(self.items) < MAX_LISTED:
            self.items.append(entry)

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "listed": list(self.items)}

    def more(self) -> list[str]:
        left = self.count - len(self.items)
        return [f"... and {left} more notes (each shard's attributes hold its own)"] if left else []


class _Notes:
    """Readers' notes, one line per distinct note with the inputs it came from: a thousand NDPI
    slides with the same note make one line that says how many, not a thousand lines."""

    SHOWN_INPUTS = 3

    def __init__(self) -> None:
        self._by_note: dict[str, list[Any]] = {}  # note -> [count, first inputs]
        self.dropped = 0  # notes of inputs past MAX_LISTED distinct notes

    def add(self, source: str, note: str) -> None:
        entry = self._by_note.get(note)
        if entry is None:
            if len(self._by_note) >= MAX_LISTED:
                self.dropped += 1
                return
            entry = self._by_note[note] = [0, []]
        entry[0] += 1
        if len(entry[1]) < self.SHOWN_INPUTS:
            entry[1].append(source)

    @property
    def items(self) -> list[str]:
        return [f"{inputs[0]}: {note}" if count == 1 else
                f"{count} inputs ({', '.join(inputs)}{', ...' if count > len(inputs) else ''}): {note}"
                for note, (count, inputs) in self._by_note.items()]

    def more(self) -> list[str]:
        left = self.dropped
        return [f"... and {left} more notes (each shard's attributes hold its own)"] if left else []


def empty_reason(s: ShardResult) -> str:
    """Why a shard yielded no items, as its reader said (smaller than one tile, no tissue)."""
    return str(s.attrs.get("empty_reason") or "no items")


def shard_row(s: ShardResult) -> dict[str, Any]:
    counters = s.clocks.get("counters", {})
    status = "resumed" if s.resumed else "empty" if s.items == 0 else "done"
    return {
        "shard_id": s.shard_id, "input": s.input, "status": status, "items": s.items, "wall_s": s.wall_s,
        "starvation": starvation_of(s.clocks.get("stages", {}).get("model", {})),
        "retries": int(counters.get("storage.retries", 0)), "host": s.host, "resumed": s.resumed,
        "attempt": s.attempt, **({"reason": empty_reason(s)} if status == "empty" else {}),
    }


def write_report(where: OutputStore | str, summary: dict[str, Any]) -> None:
    OutputStore.of(where).write_bytes(REPORT_JSON, report_json(summary).encode())


def report_json(summary: dict[str, Any]) -> str:
    """The report as JSON, one top-level key per line: readable in a pager, and written by the
    json module's C encoder (an ``indent`` sends all of it through the pure-Python one, which
    took 19 ms of a run's end for a 100,000-window report's timeline, against 6, timed by hand)."""
    lines = [f" {json.dumps(key)}: {json.dumps(value, default=str)}" for key, value in summary.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def load_report(where: OutputStore | str) -> dict[str, Any]:
    store = OutputStore.of(where)
    if not store.exists(REPORT_JSON):
        raise FileNotFoundError(f"no {REPORT_JSON} in {store.uri}: has a run finished there?")
    report: dict[str, Any] = store.read_json(REPORT_JSON)
    # Reports written before the verdict carried its gap (or the storage line) get both refreshed,
    # so `gpubatch report` on an old run still shows today's verdict.
    if "storage" not in report:
        report["storage"] = storage_summary(report.get("counters") or {}, report.get("wall_s", 0.0),
                                            report.get("peaks"))
    if "gap" not in report.get("verdict", {}):
        report["verdict"] = verdict(report)
    return report


def finished_report(where: OutputStore | str) -> dict[str, Any] | None:
    """report.json where it reports the output's latest run, and that run finished; else None
    (:func:`latest_report` says why not)."""
    return latest_report(where)[0]


def latest_report(where: OutputStore | str) -> tuple[dict[str, Any] | None, str]:
    """(report.json, "") where it reports the output's latest run and that run finished; else
    (None, why not), for a reader to say before the figures of what is committed.

    A run writes report.json at its end, and a --resume leaves the one before it in place until
    it writes its own: a resume that was interrupted, failed or is still going would be reported
    as the finished run before it (its shards, its failures), though more is committed now.
    status.json names the latest run and its state (absent only in outputs of older versions).
    A damaged report.json is said as such: "no finished run" contradicted a status.json that
    says the run finished."""
    store = OutputStore.of(where)
    uri = redact(store.uri)
    if not store.exists(REPORT_JSON):
        return None, f"no finished run in {uri}"
    try:
        report = load_report(store)
    except ValueError as exc:  # damaged (a full disk, a hand edit): what is committed is reported instead
        log.warning("%s in %s cannot be read (%s): reporting what is committed there", REPORT_JSON, uri, exc)
        return None, f"{uri}/{REPORT_JSON} cannot be read ({exc})"
    status = read_status(store)
    run_id = report.get("run_id", status.get("run_id") if status else None)
    if report.get("complete") is False or (status is not None and status.get("state") != "finished"):
        return None, f"no finished run in {uri}"
    if status is not None and status.get("run_id") != run_id:
        return None, (f"{uri}/{REPORT_JSON} is an earlier run's ({run_id}), not the latest "
                      f"({status.get('run_id')})")
    return report, ""


def read_status(store: OutputStore) -> dict[str, Any] | None:
    """status.json, or None where there is none or it cannot be read (a damaged one is no
    evidence of a finished run; ``gpubatch status`` names the damage itself)."""
    from gpubatch.outputs.layout import STATUS

    try:
        status = store.read_json(STATUS) if store.exists(STATUS) else None
    except ValueError:
        return None
    return status if isinstance(status, dict) else None


def still_failed(events: Iterable[dict[str, Any]], committed: Container[str]) -> list[dict[str, Any]]:
    """The failed inputs among the ledger's ``events``: each shard whose attempts failed and that
    is not committed (``committed`` holds shard ids), once, with its last attempt's error. The
    ledger keeps every failed attempt of every run, those a retry or a later run then committed
    too. Only failure events are kept from the stream: the run records are not held."""
    failures = (e for e in events if e.get("event") == "shard_failed" and e.get("shard_id") not in committed)
    last: dict[str, dict[str, Any]] = {}
    for event in sorted(failures, key=lambda e: e.get("time", 0.0)):
        last[str(event.get("shard_id"))] = event
    return [{"input": e.get("input"), "error": e.get("error"), "attempts": e.get("attempt")} for e in last.values()]


def summarize_output(where: OutputStore | str) -> dict[str, Any]:
    """A report for an output without a finished run's report.json: what is committed there.

    For ``gpubatch report`` and ``open_results`` on a run that is still going, was interrupted or
    failed: the committed shards' figures, the failures the ledger holds, the state status.json
    gives; marked ``"complete": False``.
    """
    from gpubatch.outputs.ledger import Ledger
    from gpubatch.outputs.manifest import Manifest

    store = OutputStore.of(where)
    builder = SummaryBuilder()
    committed: set[str] = set()  # shard ids only: the records stream past (a 10,000-shard output
    manifest = Manifest(store)  # held them all: 214 MB and 18 s, against 85 MB); said as they are read
    with phase("reading the commit records", manifest.count(), "record") as said:
        for entry in said.counting(manifest.iter_entries()):
            builder.add(entry)
            committed.add(entry.shard_id)
    status = read_status(store) or {}
    failed = still_failed(Ledger(store, "").iter_records(Ledger(store, "").record_names()), committed)
    wall = float(status.get("wall_s", float(status.get("heartbeat", 0.0)) - float(status.get("started", 0.0)))
                 ) if status else 0.0
    info = {**spec_named(store), **latest_run(store, status), "complete": False,
            "shards_total": status.get("total"), "shards_done": builder.shards, "workers": 1}
    return builder.summary(failed, max(wall, 0.0), info).to_dict()


def spec_named(store: OutputStore) -> dict[str, Any]:
    """The job's ``name`` and ``kind`` as the spec record its run wrote at the start says them
    (runtime.resume.spec_record): without them an unfinished output's report called the job
    "job" and judged a genome run as slides. Empty where there is none (an older gpubatch, a run
    stopped before it) or it cannot be read."""
    try:
        record = store.read_json(SPEC_RECORD) if store.exists(SPEC_RECORD) else {}
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    named = {"name": record.get("name"), "kind": (record.get("result_fields") or {}).get("kind")}
    return {key: value for key, value in named.items() if isinstance(value, str) and value}


def stale_for(status: dict[str, Any], now: float | None = None) -> float | None:
    """The seconds since a ``running`` status.json's last heartbeat where it missed
    MISSED_BEATS of them (its client was killed: SIGKILL, a lost node); else None."""
    import time

    from gpubatch.spec import MISSED_BEATS

    if status.get("state") != "running":
        return None
    age = (now or time.time()) - float(status.get("heartbeat", status.get("updated", 0.0)))
    return age if age > MISSED_BEATS * float(status.get("heartbeat_s", 10.0)) else None


def latest_run(store: OutputStore, status: dict[str, Any] | None) -> dict[str, Any]:
    """``state`` and ``run_id`` of the output's latest run, as a reader must say them: a live run
    holding the lease whose status.json is not written yet (a --resume checking and preparing)
    is ``running``, though status.json is still the finished run's before it; a ``running``
    whose heartbeat stopped is ``interrupted``. Both read as the run they were not."""
    from gpubatch.outputs.lease import live_holder
    from gpubatch.spec import RunSpec

    status = status or {}
    writer = live_holder(store, RunSpec.model_fields["lease_stale_s"].default)
    if writer is not None and writer.get("run_id") != status.get("run_id"):
        return {"state": "running", "run_id": writer.get("run_id")}
    age = stale_for(status)
    if age is not None:
        return {"state": "interrupted", "run_id": status.get("run_id"),
                "reason": f"killed: no heartbeat for {age:.0f} s"}
    return {"state": status.get("state", "unknown") if status else "not started", "run_id": status.get("run_id")}


def next_step(report: dict[str, Any]) -> str:
    """What a reader of an unfinished output does next, by its latest run's state: wait for a
    live run (a --resume meanwhile is refused by its lease), else finish it with --resume."""
    if report.get("state") == "running":
        return (f"run {report.get('run_id') or '?'} is writing it now: wait for it to finish "
                "(`gpubatch status OUTPUT` follows it)")
    if report.get("state") == "finished":  # its report.json is damaged or missing
        return "`gpubatch run JOB --resume` writes its report again (no committed shard is computed again)"
    return "finish it with `gpubatch run JOB --resume` (no committed shard is computed again)"
