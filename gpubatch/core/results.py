"""Typed results: what a worker returns for one shard, and the run's summary.

A shard's result crosses a process boundary (worker -> client) and is kept on disk (the manifest),
so it is a plain dataclass with a dict form; readers use attributes, never string keys spelled
in four places.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any

from gpubatch.io.redact import redact

DONE = "done"
FAILED = "failed"
#: shard counters of items with a NaN or infinity in any model output, and per output (prefix)
NONFINITE_ITEMS = "model.nonfinite_items"
NONFINITE_OUTPUT = "model.nonfinite."


def nonfinite_counts(counters: dict[str, float]) -> dict[str, Any] | None:
    """{items, outputs: {name: items}} of NaN/inf model outputs in these counters; None if none."""
    items = int(counters.get(NONFINITE_ITEMS, 0))
    if not items:
        return None
    outputs = {k[len(NONFINITE_OUTPUT):]: int(v) for k, v in counters.items() if k.startswith(NONFINITE_OUTPUT)}
    return {"items": items, "outputs": dict(sorted(outputs.items()))}


@dataclass
class ShardResult:
    """One shard's outcome: counts, clocks, where and when it ran, its committed part or its error."""

    shard_id: str
    input: str
    status: str = DONE
    items: int = 0
    wall_s: float = 0.0
    #: StageClocks.to_dict() of the shard: stages, parts, counters, per-batch samples
    clocks: dict[str, Any] = field(default_factory=dict)
    #: allowlisted, JSON-able facts about the input (grid, level, mpp; reference, contigs)
    attrs: dict[str, Any] = field(default_factory=dict)
    #: the model as the worker loaded it (backend, precision, device, path, sha256)
    model: dict[str, Any] = field(default_factory=dict)
    host: str | None = None
    pid: int | None = None
    start: float | None = None
    end: float | None = None
    #: the committed parquet part: file name, row count and sha256 (the manifest's checksum)
    part: str | None = None
    rows: int = 0
    sha256: str | None = None
    error: str | None = None
    #: whether another attempt could succeed (a lost worker, a storage timeout) or not (a corrupt file)
    retryable: bool = False
    traceback: str = ""
    #: committed by an earlier run and skipped by this one (``--resume``)
    resumed: bool = False
    #: which attempt of this shard produced the result (1 = first)
    attempt: int = 1
    #: the attempt's name: its files are written under it (outputs.layout)
    attempt_name: str = ""
    #: the zarr group of the committed attempt (None when zarr is not written)
    group: str | None = None
    #: what the result depends on, checked by ``--resume``: the input's size and mtime or ETag,
    #: the sha256 of the model file the worker loaded, the hash of the result-changing spec fields
    input_identity: dict[str, Any] = field(default_factory=dict)
    model_sha256: str | None = None
    spec_sha256: str | None = None
    run_id: str | None = None
    #: the attempt failed for a reason that is the run's, not the input's (a full disk): the
    #: client stops the run with ``error`` rather than retrying or quarantining the input
    stops_run: bool = False
    #: what a second stage reduced the shard's items to, on the worker (a slide head's logits):
    #: output name -> nested lists of floats (None where undefined, e.g. a slide with no tiles)
    shard_outputs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A result is written to the manifest, the audit trail and the report: it names its
        # input without credentials, whoever built it.
        self.input = redact(self.input)
        if self.error:
            self.error = redact(self.error)
        if self.traceback:
            self.traceback = redact(self.traceback)

    @property
    def ok(self) -> bool:
        return self.status == DONE

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict for serialising: shallow (its nested dicts are the result's own),
        where ``dataclasses.asdict`` deep-copied every clock sample of the shard on each commit."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardResult:
        """From a dict form (a manifest entry); unknown keys from other versions are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def failure(cls, shard_id: str, input_uri: str, error: str, *, retryable: bool) -> ShardResult:
        return cls(shard_id, input_uri, FAILED, error=error, retryable=retryable)


def quarantined_count(failed: list[dict[str, Any]]) -> int:
    """How many inputs or records a ``failed`` list stands for: an entry may speak for ``count``
    of them (a BED's bad lines past those listed one by one)."""
    return sum(int(f.get("count", 1)) for f in failed)


def failure_groups(failed: list[dict[str, Any]], shown_inputs: int = 3) -> list[dict[str, Any]]:
    """Quarantined inputs grouped by their error, largest group first: [{error, count, inputs}].

    Errors that differ only in numbers (a byte offset, a level) or in naming their own input are
    one group; ``error`` is the first input's text and ``inputs`` its first ``shown_inputs``
    inputs. 5,000 failures of three kinds read as three lines; each input stays in the list."""
    groups: dict[str, dict[str, Any]] = {}
    for f in failed:
        text, where = str(f.get("error") or ""), str(f.get("input") or "")
        key = re.sub(r"\d+", "N", text.replace(where, "<input>") if where else text)
        group = groups.setdefault(key, {"error": text, "count": 0, "inputs": []})
        group["count"] += int(f.get("count", 1))
        if len(group["inputs"]) < shown_inputs:
            group["inputs"].append(where)
    return sorted(groups.values(), key=lambda g: -g["count"])


@dataclass
class RunSummary:
    """report.json as a type: the contract's keys as fields, every other figure in ``extra``.

    The contract keys (``items``, ``items_per_s``, ``wall_s``, ``starvation``, ``verdict``,
    ``stages``, ``failed``) are what scripts may rely on; ``to_dict`` gives the document as written.
    """

    name: str
    kind: str
    items: int
    items_per_s: float
    wall_s: float
    starvation: float
    stages: dict[str, dict[str, float]]
    failed: list[dict[str, Any]]
    verdict: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        core = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **core}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSummary:
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            name=str(data.get("name", "job")), kind=str(data.get("kind", "slides")),
            items=int(data.get("items", 0)), items_per_s=float(data.get("items_per_s", 0.0)),
            wall_s=float(data.get("wall_s", 0.0)), starvation=float(data.get("starvation", 0.0)),
            stages=dict(data.get("stages") or {}), failed=list(data.get("failed") or []),
            verdict=dict(data.get("verdict") or {}),
            extra={k: v for k, v in data.items() if k not in names})
