"""What runs on a worker for one shard: open, pipeline, commit, record. No client I/O here.

The function is submitted to Dask with only small arguments (the shard description and the job
spec) and returns only a small :class:`ShardResult`; pixels and bases are read here, on the
worker. Kind-specific needs (staging ahead, constant columns, releasing a staged copy) come from
the source's hooks, so this module never asks which kind of input it runs.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from concurrent.futures import Future
from typing import Any

from gpubatch.core.clocks import StageClocks
from gpubatch.core.cpu import CoreTimes, core_times, count_core_use
from gpubatch.core.errors import InputChanged, InputError, disk_full, disk_full_message
from gpubatch.core.files import file_sha256
from gpubatch.core.memory import cap_malloc_arenas, use_system_arrow_pool
from gpubatch.core.results import ShardResult
from gpubatch.core.threads import background_pool
from gpubatch.engine.context import RunContext, model_threads
from gpubatch.engine.item_reports import ItemReporter
from gpubatch.engine.model_stage import (
    empty_rows,
    make_batch_runner,
    nonfinite_note,
    warm_host_stage,
)
from gpubatch.engine.pipeline import PipelineConfig, run_pipeline
from gpubatch.engine.slide_head import SlideHead, head_nonfinite_note
from gpubatch.io.localized import localize
from gpubatch.io.metrics import count_claimed_requests
from gpubatch.io.redact import redact
from gpubatch.io.retry_counts import count_claimed_retries
from gpubatch.io.storage import identity_differs, input_changed, input_identity
from gpubatch.io.uris import is_remote
from gpubatch.models.base import Model, get_model
from gpubatch.outputs.layout import new_attempt
from gpubatch.outputs.manifest import Manifest
from gpubatch.outputs.store import OutputStore
from gpubatch.outputs.writer import ShardWriter
from gpubatch.sources import Shard, Source, get_source
from gpubatch.spec import JobSpec

log = logging.getLogger("gpubatch")
#: per-batch timing samples a shard's result keeps (evenly thinned): its commit record stays small
MAX_SAMPLES = 256


_CONFIGURED: dict[str, str] = {}
_CONFIGURE_LOCK = threading.Lock()


def unchanged_while_read(uri: str, before: dict[str, Any], options: dict[str, Any] | None,
                         read_version: str | None = None) -> None:
    """An input written over while its shard read it gives outputs that mix two versions, and
    nothing in the reads need say so: its identity (a local file's size and mtime, an object's
    size and ETag: one HEAD) is asked again before the commit, and a change fails the shard
    (retried up to run.retries: the next attempt reads one version; then quarantined). Object
    reads through obstore are also pinned to one ETag (If-Match), which fails them at once; this
    check is what covers fsspec's reads, which cannot be pinned, and a libraries' own.

    ``read_version``: the ETag every read of the shard was of (a reader pinned when the slide was
    opened, maybe ahead of the shard; a staged copy's, downloaded as one version). An object
    written over between that and the shard's start is read consistently, but of the version
    before the one ``before`` records: that is a change too. Where it is the recorded version, the
    reads were all of it and the HEAD (a round trip before the commit) is not needed."""
    if read_version and before.get("etag"):
        if read_version != before["etag"]:
            raise InputChanged(uri, f"the input changed after it was opened or staged ahead (ETag {read_version} "
                                    f"read, {before['etag']} at the shard's start): the shard is read again")
        return
    after = input_changed(uri, before, options)
    if after is not None:
        raise InputChanged(uri, f"the input changed while it was read ({_what_changed(before, after)}): "
                                "its outputs would mix two versions; the shard is read again")


def unchanged_since_planned(shard: Shard, identity: dict[str, Any]) -> None:
    """A shard whose plan recorded its input's identity (``planned_identity`` in its payload: a
    genome reference, which many shards' windows are cut from) is refused where the input is
    another version at the shard's start: the run's other shards were read at the planned one,
    and its outputs would mix two versions of one input. InputChanged: read again, then reported."""
    planned = shard.payload.get("planned_identity")
    if not planned or identity.get("size") is None or not identity_differs(planned, identity):
        return
    raise InputChanged(shard.input_uri, f"the input changed since the run was planned "
                                        f"({_what_changed(planned, identity)}): the run's other shards read the "
                                        "planned version; run the job again (--overwrite) to plan with this one")


def unpinned_note(uri: str, identity: dict[str, Any]) -> str | None:
    """The shard's note where its object's reads could not be pinned to one version: no ETag, or
    a weak one (``W/``: If-Match never matches it, so none is sent, which would only draw 412s).
    The HEAD after the shard is then all the check there is; the report folds the note into one
    line for the run, naming the inputs, so a user sees which inputs had no version to pin."""
    if not is_remote(uri) or identity.get("size") is None or identity.get("mtime") is None and not identity.get("etag"):
        return None  # local, missing, or a prefix (no one version to pin)
    etag = identity.get("etag")
    if etag and not str(etag).startswith("W/"):
        return None
    why = "its ETag is weak (W/)" if etag else "the server gives no ETag"
    return (f"reads not pinned to one version: {why}, so If-Match cannot hold them to it; a HEAD "
            "after each shard checks the object did not change (size and ETag or mtime)")


def _what_changed(before: dict[str, Any], after: dict[str, Any]) -> str:
    """``size 10 -> 12, etag a -> b``: the fields of an identity that differ."""
    keys = [k for k in ("size", "etag", "mtime") if k in before or k in after]
    return ", ".join(f"{k} {before.get(k)} -> {after.get(k)}" for k in keys if before.get(k) != after.get(k))


def _read_again_if_changed(exc: BaseException, uri: str, identity: Any, options: dict[str, Any] | None,
                           ) -> BaseException:
    """An input error (a truncated read, corrupt data) met while the input was being written over
    is that writer's doing, not the input's: the shard is read again instead of failed for good."""
    if not isinstance(exc, InputError) or exc.retryable or identity is None or not identity.done():
        return exc
    try:
        changed = identity.exception() is None and input_changed(uri, identity.result(), options) is not None
    except (OSError, InputError):  # the check itself failed: the error met stands
        return exc
    if not changed:
        return exc
    return InputChanged(uri, f"{exc.message}; the input changed while it was read, so the shard is read again")


def _ask_identity(shard: Shard, job: JobSpec) -> Future[dict[str, Any]]:
    """The input's identity, asked in the background (a HEAD on object storage: a round trip)."""
    return background_pool("identity", 4).submit(input_identity, shard.input_uri, job.input.storage)


def _known(found: dict[str, Any] | None) -> Future[dict[str, Any]] | None:
    """An identity the open found, as the finished future the worker holds identities in."""
    if found is None:
        return None
    done: Future[dict[str, Any]] = Future()
    done.set_result(found)
    return done


def _forget_stale(source: Source, job: JobSpec, shard: Shard) -> None:
    """The input changed: drop what this worker holds of it, so the next attempt reads the new
    version (a failure here leaves the attempt's own error standing)."""
    try:
        source.forget_input(job, shard)
    except Exception as exc:  # noqa: BLE001
        log.warning("shard %s: forgetting a changed input: %s", shard.shard_id, redact(f"{type(exc).__name__}: {exc}"))


def _configure_worker_once(ctx: RunContext) -> None:
    """Per worker process, once: malloc arenas and library warnings into the log; per shard, on
    the client's host, its cache folder. The profile's storage settings, the run's retry policy
    and the stage cache are the shard's (execute_shard): another job's shards on this worker
    never replace them under it.

    Locked: a worker's first two shards start together.
    """
    from gpubatch.core.logs import route_library_logs

    with _CONFIGURE_LOCK:
        if "malloc" not in _CONFIGURED:
            cap_malloc_arenas()
            use_system_arrow_pool()
            route_library_logs(python_warnings=_in_a_dask_worker())
            _CONFIGURED["malloc"] = "capped"
        if ctx.cache_dir:  # the client's, on its host (core.files.cache_root)
            os.environ["GPUBATCH_CACHE"] = ctx.cache_dir


def _in_a_dask_worker() -> bool:
    """Whether this shard runs in a Dask worker rather than the caller's own process (the inline
    profile): only a worker's Python warnings are routed into gpubatch's log. Routed in the
    caller's, every warning a notebook raised after an inline run went to a DEBUG line nobody
    sees, for the rest of the session (``logging.captureWarnings`` is process-wide)."""
    import sys

    if "distributed" not in sys.modules:  # never imported: no worker runs this
        return False
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:
        return False
    return True


def _failure(shard: Shard, exc: BaseException, started: float, outdir: str) -> ShardResult:
    """The summary of a shard that failed: a bad input is not worth retrying, anything else may be.

    A full disk is neither: the storage wrappers make it an InputError (of the output's URI), and
    retried it fails every shard alike, each input quarantined as if bad. It stops the run."""
    full = disk_full(exc)
    bad_input = isinstance(exc, InputError) and full is None
    message = exc.message if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
    if full is not None:
        message = disk_full_message(full, outdir)
    result = ShardResult.failure(shard.shard_id, shard.input_uri, message,
                                 retryable=bool(getattr(exc, "retryable", False)) or not bad_input)
    result.stops_run = full is not None
    result.host, result.pid, result.start, result.end = socket.gethostname(), os.getpid(), started, time.time()
    result.traceback = "" if bad_input else traceback.format_exc(limit=5)
    return result


def _describe(model: Model, head: SlideHead | None) -> dict[str, Any]:
    info = model.describe()
    if head is not None:
        info["slide_model"] = head.model.describe()
    return info


def execute_shard(shard: Shard, job: JobSpec, ctx: RunContext, upcoming: tuple[str, ...] = (),
                  attempt: int = 1) -> ShardResult:
    """:func:`_execute_shard` with its run's settings, for this shard and the threads its work
    runs on, whatever other run this process serves meanwhile: the profile's storage options and
    range reader, the run's retry policy, and its staging (the versions this run's client and
    other workers staged, in the stage cache of its job's settings)."""
    from gpubatch.io.retry import run_policy
    from gpubatch.io.stage_cache import shard_stage
    from gpubatch.io.storage_profile import shard_storage

    profile = ctx.storage_profile or {}
    with shard_storage(profile), run_policy(ctx.storage_policy), \
            shard_stage(ctx.run_id, profile.get("stage_cache")):
        return _execute_shard(shard, job, ctx, upcoming, attempt)


def _execute_shard(shard: Shard, job: JobSpec, ctx: RunContext, upcoming: tuple[str, ...],
                   attempt: int) -> ShardResult:
    """Process one shard end to end on this worker, commit it, and return its small result.

    A bad input comes back as a ``failed`` result rather than an exception, so that one corrupt
    slide is quarantined without poisoning the Dask task graph. ``upcoming`` names the next
    inputs in plan order, for the source's ``before_shard`` hook (slides stage them ahead). The
    commit record is written here, on the worker, right after the shard's files: a client that
    dies meanwhile loses nothing that was computed.
    """
    started, cores_before = time.time(), core_times()
    _configure_worker_once(ctx)
    source = get_source(job.kind)
    source.before_shard(job, upcoming)
    run = _ShardRun(shard, job, ctx, source, attempt)
    try:
        result = run.execute(started, cores_before)
    except BaseException as exc:  # noqa: BLE001 - summarised for the client
        if run.writer is not None:
            run.writer.abort()
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        error = _read_again_if_changed(exc, shard.input_uri, run.identity, job.input.storage)
        if isinstance(error, InputChanged):
            _forget_stale(source, job, shard)
        failed = _failure(shard, error, started, ctx.outdir)
        failed.attempt = attempt
        return failed
    try:  # committed: a failure to tidy up after it must not turn the shard into a failure
        source.after_commit(job, shard)
    except Exception as exc:  # noqa: BLE001
        log.warning("shard %s: after commit: %s", shard.shard_id, redact(f"{type(exc).__name__}: {exc}"))
    return result


class _ShardRun:
    """One attempt at one shard on this worker, step by step: the model and the input opened,
    the pipeline run into the shard's writer, the commit and its record. ``writer`` and
    ``identity`` are kept for the caller's clean-up when a step fails."""

    def __init__(self, shard: Shard, job: JobSpec, ctx: RunContext, source: Source, attempt: int):
        self.shard, self.job, self.ctx, self.source, self.attempt = shard, job, ctx, source, attempt
        self.clocks = StageClocks()
        self.store = OutputStore(ctx.outdir, ctx.output_options)
        self.writer: ShardWriter | None = None
        self.identity: Future[dict[str, Any]] | None = None

    def execute(self, started: float, cores_before: CoreTimes | None) -> ShardResult:
        shard, job, ctx, clocks = self.shard, self.job, self.ctx, self.clocks
        # the input's identity (a HEAD on object storage: a round trip) is asked beside the open,
        # unless the open asks it anyway (a streamed slide): then its answer is taken after
        if not self.source.open_finds_identity(job, shard):
            self.identity = _ask_identity(shard, job)
        threads = model_threads(ctx)
        model = get_model(localize(ctx.model_path, ctx.model_storage, ctx.model_version), ctx.backend, ctx.precision, threads)
        head = SlideHead.for_job(job, threads, ctx.slide_model_version)
        warm_host_stage(model, *self.source.model_input(job, ctx.batch_size), clocks)
        with clocks.part("open"):
            reader = self.source.open(shard, job, clocks)
        self.identity = self.identity or _known(reader.input_identity()) or _ask_identity(shard, job)
        with reader:
            unchanged_since_planned(shard, self.identity.result())
            items, wall, shard_outputs, part = self._compute_and_commit(reader, model, head)
            shard_attrs = reader.attrs
        count_core_use(clocks, cores_before)
        count_claimed_retries(clocks)
        count_claimed_requests(clocks)
        assert self.writer is not None
        result = ShardResult(
            shard.shard_id, shard.input_uri, items=items, wall_s=wall, clocks=clocks.to_dict(MAX_SAMPLES),
            attrs=shard_attrs, model=_describe(model, head), host=socket.gethostname(), pid=os.getpid(),
            start=started, end=time.time(), attempt=self.attempt, attempt_name=self.writer.attempt,
            input_identity=self.identity.result(), model_sha256=file_sha256(model.path), spec_sha256=ctx.result_hash,
            run_id=ctx.run_id, shard_outputs=shard_outputs, **part)
        Manifest(self.store).record(result)
        return result

    def _compute_and_commit(self, reader: Any, model: Model,
                            head: SlideHead | None) -> tuple[int, float, dict[str, Any], dict[str, Any]]:
        """Run the shard's items through the model into its writer (or its slide head's bag),
        then commit: (items, wall seconds, the slide head's outputs, the commit's figures)."""
        shard, job, ctx, clocks, source = self.shard, self.job, self.ctx, self.clocks, self.source
        assert self.identity is not None
        attrs = {**reader.attrs, "model_sha256": ctx.model_sha256, "backend": model.backend,
                 "precision": model.computes_in, "gpubatch_version": ctx.version}
        writer = self.writer = ShardWriter(self.store, shard.shard_id, new_attempt(), source.constant_columns(shard),
                                           attrs, job.output.formats, column_limit=reader.column_limit)
        cfg = PipelineConfig(ctx.batch_size, job.run.readers, job.run.prefetch_batches, pad_last=True)
        t0 = time.perf_counter()
        bag = head.sink(reader.n_items) if head is not None else None
        reporter = ItemReporter(ctx.run_id, shard.shard_id, self.attempt, reader.n_items)
        items = run_pipeline(reader, make_batch_runner(reader, model, ctx), bag or writer, cfg, clocks,
                             on_batch=reporter)
        empty = lambda: empty_rows(reader, model, source.model_input(job, 1))  # noqa: E731
        shard_outputs = head.finish(bag, writer, empty, clocks) if head and bag else {}
        if items == 0 and head is None:
            writer.write(*empty())
        wall = time.perf_counter() - t0
        identity = self.identity.result()
        notes = [unpinned_note(shard.input_uri, identity), nonfinite_note(clocks, items), head_nonfinite_note(clocks)]
        if any(notes):
            reader.attrs["notes"] = [*reader.attrs.get("notes", []), *filter(None, notes)]
        writer.attrs.update(reader.attrs)  # counted while reading (REF mismatches)
        unchanged_while_read(shard.input_uri, identity, job.input.storage, reader.input_version())
        with clocks.part("commit"):  # each shard's outputs written and committed: a fixed cost
            part = writer.commit()
        return items, wall, shard_outputs, part
