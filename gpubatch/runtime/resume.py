"""What a run does with the output it is given: start it, refuse it, wipe it, or resume it.

An output that holds committed shards is only ever continued by a run that would have produced
the same results: ``--resume`` checks the committed shards' spec fields and model against this
run's (a difference stops the run with exit 2, naming it), their parts' columns against this
gpubatch's (a part written with other columns, which no version string tells, likewise: it
could not be merged) and each committed input's identity
(an input replaced since is computed again, and said so). A run without ``--resume`` into such
an output stops with exit 2 saying which flag to use; ``--overwrite`` starts clean (removing only
what gpubatch wrote there).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any

from gpubatch.core.errors import SpecError
from gpubatch.core.files import file_sha256
from gpubatch.core.phases import Phase, phase
from gpubatch.core.results import ShardResult
from gpubatch.core.threads import ContextPool
from gpubatch.io.localized import localize
from gpubatch.io.redact import redact
from gpubatch.io.storage import input_identity
from gpubatch.io.uris import split_glob
from gpubatch.outputs.commits import CommitIndex
from gpubatch.outputs.layout import (
    LEASE,
    PARTS_DIR,
    REPORT_HTML,
    REPORT_JSON,
    RUN_DIRS,
    RUN_STATE,
    SPEC_RECORD,
)
from gpubatch.outputs.ledger import Ledger
from gpubatch.outputs.manifest import CommitRef, Manifest, PartSeen, remove_temporaries, sweep
from gpubatch.outputs.merge import PartColumns, mark_zarr_running, part_columns
from gpubatch.outputs.store import OutputStore
from gpubatch.sources import get_source
from gpubatch.spec import JobSpec

log = logging.getLogger("gpubatch")
IDENTITY_THREADS = 16  # inputs stat'ed at once when checking what changed since a commit
IDENTITY_BATCH = 256  # committed shards checked at a time (memory stays one batch)


def spec_record(job: JobSpec, fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the output records of the spec: ``fields``, this run's :meth:`JobSpec.result_fields`
    (asked once per run by the caller: they HEAD remote inputs), or asked now; and the job's
    ``name``, which the report of a run that stopped before its end shows (report.summary:
    it was "job"), not compared on --resume (spec_differences: a renamed job keeps its shards)."""
    fields = job.result_fields() if fields is None else fields
    return {"name": job.name, "result_fields": fields, "result_hash": job.result_hash(fields),
            "model_sha256": file_sha256(localize(job.model.path, job.input.storage))}


def wipe(store: OutputStore) -> None:
    """Remove everything a run wrote (keeps the marker, a live lease and cached models)."""
    for name in RUN_STATE:
        store.delete(name, recursive=name in RUN_DIRS)


def reconcile(store: OutputStore, job: JobSpec, ledger: Ledger, kept: CommitIndex, *, resume: bool,
              overwrite: bool, on_kept: Callable[[ShardResult], None] | None = None,
              fields: dict[str, Any] | None = None) -> None:
    """Add the committed shards this run keeps to ``kept`` (none for a fresh start); raises
    SpecError when the output may not be written as asked. Each kept record is handed to
    ``on_kept`` as it is read (the run's summary folds it), and only a small reference to it is
    kept, in the run's on-disk index. ``fields``: the run's result fields, computed once by it."""
    record = spec_record(job, fields)
    manifest = Manifest(store)
    # said as it goes (core.phases): a resume of 3,000 shards on object storage ran 110 s silent
    with phase("checking what the output holds", unit="shard") as said:
        remove_temporaries(store, spare=(LEASE,))  # the lease's heartbeat is writing
        committed = refuse_committed(store, job, resume=resume, overwrite=overwrite, record=record)
        if overwrite:
            said.step("removing the earlier runs' files")
            wipe(store)
        elif committed:
            said.step("verifying the committed shards' parts (each read whole for its checksum)",
                      manifest.count(), "shard")
            _resumable(store, job, manifest, ledger, kept, on_kept or (lambda entry: None), said)
            for name in (REPORT_JSON, REPORT_HTML):  # the run before's say finished: not while this one runs
                store.delete(name)
            mark_zarr_running(store)
            said.step("removing the files of attempts no commit names")
            sweep(store, kept)
            return
        else:
            wipe(store)  # reports and records of a run that committed nothing
        store.write_json(SPEC_RECORD, record)


def refuse_committed(store: OutputStore, job: JobSpec, *, resume: bool, overwrite: bool,
                     record: dict[str, Any] | None = None) -> bool:
    """Refuse (exit 2) an output whose committed shards this run may not continue: without
    --resume (nor --overwrite), or made by another spec or model. Writes nothing, so that
    ``validate`` refuses what ``run`` would. True when the output holds committed shards."""
    manifest = Manifest(store)
    committed = next(manifest.names(), None) is not None
    if overwrite or not committed:
        return committed
    if not resume:
        raise SpecError([("output.uri", f"{redact(store.uri)} holds {sum(1 for _ in manifest.names())} "
                                        "committed shard(s) of an "
                                        "earlier run: use --resume to finish that run, or --overwrite to start "
                                        "again (from Python: gpubatch.run(..., resume=True) or "
                                        "overwrite=True), or give a new output.uri")])
    if not store.exists(SPEC_RECORD):
        raise SpecError([("output.uri", f"{redact(store.uri)} was written by an older gpubatch without a "
                                        f"{SPEC_RECORD}: its shards cannot be checked; use --overwrite")])
    problems = spec_differences(store.read_json(SPEC_RECORD), record or spec_record(job))
    if problems:
        raise SpecError([(field, f"{text}; use --overwrite or a new output.uri") for field, text in problems])
    return committed


def part_columns_check(store: OutputStore, job: JobSpec) -> PartSeen:
    """A check of each committed part's columns, as the manifest verifies it: every part must
    join this run's into one predictions.parquet (merge.PartColumns). A part an earlier gpubatch
    wrote with other columns (windows before the ``region`` column; the version string does not
    tell them apart) was found only by the merge, after the resume had computed every shard left;
    it is refused here, exit 2, before anything is computed."""
    columns = PartColumns(get_source(job.kind).index_schema(job))

    def check(entry: ShardResult, data: bytes) -> None:
        problem = columns.problem(f"{PARTS_DIR}/{entry.part}", part_columns(data))
        if problem is not None:
            raise SpecError([("output.uri", f"{redact(store.uri)}: the committed part {problem}: its rows "
                                            "cannot be merged with this run's (parts of another gpubatch or "
                                            "model); nothing was computed. Use --overwrite to compute every "
                                            "shard again, or a new output.uri")])
    return check


def refuse_unmergeable_parts(store: OutputStore, job: JobSpec) -> None:
    """``validate --resume``'s twin of the check a resume makes as it reads the committed parts
    (:func:`part_columns_check`): the same parts (those whose checksum holds), the same refusal."""
    manifest = Manifest(store)
    with phase("validate: checking the committed parts (each read whole for its checksum)",
               manifest.count(), "part") as said:
        for _ in said.counting(manifest.iter_committed(on_part=part_columns_check(store, job))):
            pass


def _resumable(store: OutputStore, job: JobSpec, manifest: Manifest, ledger: Ledger,
               kept: CommitIndex, on_kept: Callable[[ShardResult], None], progress: Phase) -> None:
    batch: list[ShardResult] = []
    verified = progress.counting(manifest.iter_committed(on_part=part_columns_check(store, job)))
    for entry in itertools.chain(verified, [None]):
        if entry is not None:
            batch.append(entry)
        if batch and (entry is None or len(batch) == IDENTITY_BATCH):
            changed = {e.shard_id for e in _changed_inputs(batch, job)}
            for e in batch:
                if e.shard_id in changed:
                    log.warning("input changed since it was committed: %s; computing it again", redact(e.input))
                    ledger.superseded(e, "input changed since it was committed")
                    manifest.remove(e.shard_id)
                else:
                    kept.add(CommitRef.of(e))
                    on_kept(e)
            batch = []


def spec_differences(committed: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, what changed) for each difference between the committed spec record and now."""
    out: list[tuple[str, str]] = []
    if committed.get("model_sha256") != now["model_sha256"]:
        out.append(("model", f"sha256 {str(committed.get('model_sha256'))[:12]}... committed, "
                             f"{now['model_sha256'][:12]}... now"))
    old, new = _flatten(committed.get("result_fields") or {}), _flatten(now["result_fields"])
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            out.append((key, f"{old.get(key)!r} committed, {new.get(key)!r} now"))
    return out


def check_run_model(committed: CommitIndex, run_model: str) -> None:
    """The model file workers will load must be the one the committed shards were made with (a
    reduced-precision model is re-made from cache; a different file means different results)."""
    sha = file_sha256(run_model)
    other = committed.model_hashes() - {sha}
    if other:
        raise SpecError([("model", f"the model workers would load has sha256 {sha[:12]}..., the committed "
                                   f"shards were made with {sorted(other)[0][:12]}...; use --overwrite or a "
                                   "new output.uri")])


def _raw_uris(job: JobSpec) -> dict[str, str]:
    """The spec's own URIs by their redacted form: a committed shard names its input redacted,
    and a presigned URL is only readable with its signature."""
    w = job.windows
    named = [split_glob(u)[0] for u in job.input.uris] + ([w.reference, w.variants or ""] if w else [])
    return {redact(u): u for u in named if u}


def _changed_inputs(entries: Any, job: JobSpec) -> list[ShardResult]:
    entries = list(entries)
    inputs = sorted({e.input for e in entries})
    raw = _raw_uris(job)

    def identity(uri: str) -> dict[str, Any]:
        return input_identity(raw.get(uri) or uri, job.input.storage)

    with ContextPool(IDENTITY_THREADS) as pool:
        now = dict(zip(inputs, pool.map(identity, inputs), strict=True))
    return [e for e in entries if e.input_identity and now[e.input] != e.input_identity]


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out
