"""Run a job: plan shards on the client, run them on workers, commit, report.

The client only plans (metadata), submits small shard descriptions, and folds small summaries:
no pixels or bases are read here. Shards that raise are retried up to ``run.retries`` times; an
input that is bad (``InputError``) is quarantined at once; the run finishes the rest and exits 3
(or 1 when every input failed).

Around that: the output is guarded and leased (outputs.lease) and reconciled with what is already
committed there (runtime.resume); the lease and status.json carry a heartbeat while the run
lives; SIGINT and SIGTERM stop the workers, record the interruption in the audit ledger and leave
an output that ``--resume`` finishes; and every event lands in the ledger (outputs.ledger).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from gpubatch import __version__
from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import (
    DiskFull,
    InputError,
    OutputsNotWrittenError,
    disk_full,
    disk_full_message,
    finished_run_exit_code,
)
from gpubatch.core.files import cache_root, file_sha256
from gpubatch.core.memory import collections_of_this_run, hand_back_freed_memory
from gpubatch.core.phases import Phase, phase, shown_as
from gpubatch.core.results import ShardResult, quarantined_count
from gpubatch.engine.context import RunContext
from gpubatch.io.localized import localize, version_if_remote, versions_asked_once
from gpubatch.io.metrics import (
    CLIENT_WIRE_PREFIX,
    WIRE_PREFIX,
    count_claimed_requests,
    forget_unclaimed_requests,
)
from gpubatch.io.redact import redact
from gpubatch.io.retry import policy_for, run_policy
from gpubatch.io.retry_counts import count_claimed_retries, forget_unclaimed_retries
from gpubatch.io.tallies import counts_of_this_run
from gpubatch.io.uris import is_remote
from gpubatch.models.base import resolve_backend
from gpubatch.outputs.commits import CommitIndex
from gpubatch.outputs.layout import (
    AUDIT,
    LOGS_DIR,
    MODELS_DIR,
    PREDICTIONS,
    REPORT_HTML,
    REPORT_JSON,
    ZARR,
    record_name,
)
from gpubatch.outputs.lease import Lease, guard_output
from gpubatch.outputs.ledger import Ledger, new_run_id
from gpubatch.outputs.manifest import CommitRef, Manifest, remove_temporaries, sweep
from gpubatch.outputs.merge import describe_unfinished_zarr, describe_zarr, merge_parquet
from gpubatch.outputs.store import OutputStore
from gpubatch.report.summary import SummaryBuilder, write_report
from gpubatch.runtime.cluster import (
    cpu_count,
    load_profile,
    open_executor,
    start_worker_imports,
    worker_count,
)
from gpubatch.runtime.preflight import (
    check_cluster,
    preflight,
    refuse_empty_plan,
)
from gpubatch.runtime.progress import Progress
from gpubatch.runtime.result import Result
from gpubatch.runtime.resume import check_run_model, reconcile
from gpubatch.runtime.stopping import Terminated, raise_if_stopped, signals_held, stop_on_signals
from gpubatch.runtime.submit import Submitter
from gpubatch.runtime.worker_memory import largest_batch_in_memory
from gpubatch.sources import Shard, Source, get_source
from gpubatch.spec import JobSpec

log = logging.getLogger("gpubatch")


def run_job(job: JobSpec, *, profile: str | None = None, resume: bool = False, overwrite: bool = False,
            scheduler: str | None = None, show_progress: bool | None = None) -> Result:
    """Run a validated job to completion; see the module docstring for the failure rules."""
    prof = on_scheduler(load_profile(profile or job.run.profile), scheduler)
    start_worker_imports(prof)
    forget_unclaimed_requests()  # this run's requests and retries from here on
    forget_unclaimed_retries()
    # a remote model's version: one HEAD for every check of the run; the job's retry policy for
    # every storage call of the client's (checks, plan, preparation; an inline run's shards)
    # a signal from here on stops the run in order: planning, shards, the run's end, the lease's release;
    # the long steps around the shards show their progress as the shards' does (a bar or log lines)
    # and its requests and retries counted with no shard's clocks, its own (another run's in this process apart)
    with stop_on_signals(), versions_asked_once(), run_policy(policy_for(job.run)), shown_as(show_progress), \
            counts_of_this_run(), _caller_s_storage_after(prof):
        preflight(job, prof)
        if scheduler is None:
            check_cluster(prof)
        store = OutputStore(job.output.uri, job.output.storage)
        guard_output(store, job.output.uri)
        run, taken = _Run(job, prof, store), False
        try:
            with signals_held():  # a Ctrl-C as the lease is taken: raised once it is, to release it
                run.lease.acquire()
                taken = True
            run.lease.hold()  # beaten from now: the checks and the model's preparation may take minutes
            with collections_of_this_run():
                return run.execute(resume=resume, overwrite=overwrite, scheduler=scheduler,
                                   show_progress=show_progress)
        finally:
            if taken:
                _end_of_run(run, store)
            else:  # refused: its index's file was held as long as the caller kept the error
                run.commits.close()


def _end_of_run(run: _Run, store: OutputStore) -> None:
    """The run's lease released and its interrupted writes' temporaries removed, as it ends in
    any way. A Ctrl-C before the release is raised after it: cut short there, the lease stayed
    held and beaten for the life of the process (its next run into the output refused)."""
    with signals_held():
        run.commits.close()
        run.lease.release()
    if run.lease.lost is None:  # else they may be the run's that holds the output now
        with phase("removing the temporaries of interrupted writes"):  # listings: seconds at 3,000 shards
            remove_temporaries(store)


class _Run:
    """One run of a job into one output: its lease, ledger, progress and summary."""

    def __init__(self, job: JobSpec, prof: dict[str, Any], store: OutputStore):
        self.job, self.prof, self.store = job, prof, store
        self.run_id = new_run_id()
        self.lease = Lease(store, self.run_id, job.run.lease_stale_s, job.run.heartbeat_s)
        self.ledger = Ledger(store, self.run_id)
        self.builder = SummaryBuilder()
        self.one_host = False  # every worker on this host (set when the run starts)
        self.failed: list[dict[str, Any]] = []
        #: every committed shard's files, on local disk (the records themselves stay in the manifest)
        self.commits = CommitIndex()
        self.t_start = time.time()
        #: the spec's result fields, asked once per run (remote inputs' versions are HEADs); a
        #: later run asks again, so a file changed between runs is seen
        self.fields = job.result_fields()

    def execute(self, *, resume: bool, overwrite: bool, scheduler: str | None,
                show_progress: bool | None) -> Result:
        job, source = self.job, get_source(self.job.kind)
        committed = self.commits
        reconcile(self.store, job, self.ledger, committed, resume=resume, overwrite=overwrite,
                  on_kept=lambda entry: self.builder.add(dataclasses.replace(entry, resumed=True)),
                  fields=self.fields)
        shards, self.failed = source.plan(job)
        refuse_empty_plan(shards, self.failed)
        resumed = self._kept_in_plan(shards)
        todo = (s for s in shards if s.shard_id not in committed)  # a stream: the plan is never copied
        n_workers = worker_count(self.prof, max(len(shards) - resumed, 0), job.run.workers)
        self.one_host = all_workers_here(self.prof, scheduler)
        done_first = self._before_workers(source, shards, n_workers, scheduler)
        prepared, ctx = self._prepare(source, shards, n_workers)
        if resumed:
            check_run_model(committed, localize(ctx.model_path, ctx.model_storage, ctx.model_version))
            log.info("%d shard(s) already committed, skipped", resumed)
        self.ledger.event("run_start", resumed=resumed, planned=len(shards), spec=redact(job.model_dump(mode="json")),
                          backend=ctx.backend, precision=prepared.computes_in, gpubatch_version=__version__,
                          **prepared.audit)
        progress = Progress(len(shards), already=resumed, store=self.store, enabled=show_progress,
                            run_id=self.run_id, heartbeat_s=job.run.heartbeat_s, plan_failed=quarantined_count(self.failed),
                            started=self.t_start, items_planned=self._items_planned(shards))
        self.lease.also_beat(progress.heartbeat)
        lost: list[dict[str, Any]] = []
        # a signal: run_job's stop_on_signals raises it here; a Ctrl-C while merging is recorded as one
        try:  # the inner finally inside it: a signal landing there was recorded nowhere ("running")
            try:
                self._claim_client_requests()  # the checks', plan's and preparation's: not a shard's
                if len(shards) > resumed:
                    lost = self._submit(todo, ctx, progress, n_workers, scheduler)
                raise_if_stopped()  # one a finaliser dropped after the last poll
                self.lease.confirm()  # the run's end sweeps and writes the output's own files: only while it is ours
            finally:
                progress.close()
                head_start = done_first()
                if head_start is not None:  # requests made here before the workers ran
                    self.builder.clocks.merge(head_start)
        except BaseException as exc:
            full = _as_disk_full(exc, self.store.uri)
            self._abandon(progress, full or exc)
            if full is not None:
                raise full from exc
            raise
        try:
            result = self._finish(source, shards, ctx, prepared, n_workers, lost)
            progress.finish("finished", wall_s=result.report["wall_s"], items_per_s=result.report["items_per_s"])
        except (OSError, InputError) as exc:  # storage that kept failing: the commits stand
            error = OutputsNotWrittenError(redact(self.store.uri), exc, quarantined_count(self.failed))
            self._abandon(progress, error)
            raise error from exc
        except (KeyboardInterrupt, Terminated, Exception) as exc:  # the commits stand; recorded as
            self._abandon(progress, exc)  # interrupted or failed, never left saying "running"
            raise
        return result

    def _claim_client_requests(self) -> None:
        """The storage requests this process made with no shard's clocks since the last claim,
        into the run's clocks; the reads of bytes also as the client's (the report says client N,
        shards M: an in-process shard claims what the process asked while it ran)."""
        claimed = count_claimed_requests(self.builder.clocks)
        for name, n in claimed.items():
            if n and name in ("storage.requests", "storage.heads"):
                self.builder.clocks.count(name.replace("storage.", "storage.client_"), n)
            elif n and name.startswith(WIRE_PREFIX):
                self.builder.clocks.count(CLIENT_WIRE_PREFIX + name[len(WIRE_PREFIX):], n)

    def _kept_in_plan(self, shards: Sequence[Shard]) -> int:
        """How many of the plan's shards are already committed. A resume may plan other inputs
        than the run it finishes (the input list is no result field): a commit the plan no longer
        names stays in the manifest for a later run, but is neither done nor reported in this one.
        Counted as done, such commits kept as many new inputs from ever being submitted (exit 0)."""
        kept = sum(1 for _ in self.commits.in_order(s.shard_id for s in shards))
        if kept < len(self.commits):  # the summary folded every kept record: fold the plan's again
            self.builder = SummaryBuilder()
            names = (record_name(r.shard_id) for r in self.commits.in_order(s.shard_id for s in shards))
            for entry in Manifest(self.store).iter_entries(names):
                self.builder.add(dataclasses.replace(entry, resumed=True))
        return kept

    def _items_planned(self, shards: Sequence[Shard]) -> int | None:
        """The items of the shards this run submits, where the plan knows each one's count
        (windows, variants; a slide's tiles are known only once it is opened): the ETA's total."""
        total = 0
        for shard in shards:
            if shard.shard_id in self.commits:
                continue
            if shard.n_items_hint is None:
                return None
            total += shard.n_items_hint
        return total

    def _before_workers(self, source: Source, shards: Sequence[Shard], n_workers: int,
                        scheduler: str | None) -> Callable[[], StageClocks | None]:
        """When every worker shares this host: the source's head start on the first shards'
        inputs (staging) while the model is prepared and the cluster starts."""
        if not (self.one_host and self.job.run.stage_ahead):
            return lambda: None
        slots = n_workers * int(self.prof.get("threads_per_worker", 1))
        todo = (s.input_uri for s in shards if s.shard_id not in self.commits)
        first = list(itertools.islice(todo, slots + self.job.run.stage_ahead))
        profile = _storage_profile(self.prof, True)  # stage_cache.run: whose records the workers take
        profile["stage_cache"] = {**profile["stage_cache"], "run": self.run_id}
        return source.before_workers(self.job, first, profile)

    def _prepare(self, source: Source, shards: Sequence[Shard], n_workers: int) -> tuple[Any, RunContext]:
        """The model file, precision and batch size (prepare_model), and the context workers read."""
        from gpubatch.models.prepare import prepare_model

        job = self.job
        local_job = job.model_copy(update={"model": job.model.model_copy(
            update={"path": localize(job.model.path, job.input.storage)})})
        models_dir = self.store.local() if not self.store.remote else cache_root() / "outputs" / self.run_id
        threads = workers_model_threads(job, n_workers, self.one_host)
        prepared = prepare_model(local_job, source, shards, models_dir, threads=threads,
                                 batch_limit=batch_limit(job, self.prof))
        model_path, model_storage = self._model_for_workers(prepared.path, local_job.model.path)
        head_path = job.slide_model.path if job.slide_model is not None else None
        ctx = RunContext(
            outdir=self.store.uri, model_path=model_path,
            backend=resolve_backend(job.model.backend, local_job.model.path), precision=prepared.precision,
            batch_size=prepared.batch_size, threads=threads, model_sha256=file_sha256(local_job.model.path),
            spec_hash=job.spec_hash(), version=__version__, fallback_model_path=prepared.fallback_path,
            fallback_max_prob=prepared.fallback_max_prob,
            storage_profile=_storage_profile(self.prof, self.one_host),
            output_options=job.output.storage, run_id=self.run_id, result_hash=job.result_hash(self.fields),
            model_storage=model_storage, model_version=version_if_remote(model_path, model_storage),
            storage_policy=policy_for(job.run), cache_dir=str(cache_root()) if self.one_host else None,
            slide_model_version=version_if_remote(head_path, job.input.storage),
            workers_per_host=_workers_per_host(self.prof))
        return prepared, ctx

    def _model_for_workers(self, prepared_path: str, local_model: str) -> tuple[str, dict[str, Any] | None]:
        """Where workers find the model, and the storage options to read it with: the user's own
        URI when it was remote; a reduced model made here, uploaded beside the outputs when those
        are on object storage; else the path."""
        if prepared_path == local_model and is_remote(self.job.model.path):
            return self.job.model.path, self.job.input.storage
        if self.store.remote and prepared_path != local_model:
            name = f"{MODELS_DIR}/{Path(prepared_path).name}"
            self.store.write_bytes(name, Path(prepared_path).read_bytes())
            return self.store.url(name), self.job.output.storage
        return prepared_path, None

    def _submit(self, todo: Iterable[Shard], ctx: RunContext, progress: Progress, n_workers: int,
                scheduler: str | None) -> list[dict[str, Any]]:
        def on_result(result: ShardResult) -> None:
            if result.ok:
                self.builder.add(result)
                self.commits.add(CommitRef.of(result))
            else:
                self.failed.append({"input": result.input, "error": result.error or "", "attempts": result.attempt})
                self.ledger.failure(result)
            progress.update(result)

        threads = int(self.prof.get("threads_per_worker", 1))
        window = max(2 * n_workers * threads, n_workers + self.job.run.stage_ahead + 2)
        executor = open_executor(self.prof, n_workers, scheduler, self._log_dir(), self._job_name(),
                                 leave_after_s=self.job.run.lease_stale_s)
        def on_poll() -> None:
            self.lease.check()
            progress.tick()

        submitter = Submitter(executor, self.job, ctx, on_result, window, on_retry=self.ledger.failure,
                              ahead=_stage_ahead(self.job.run.stage_ahead, self.prof, n_workers * threads, scheduler),
                              on_poll=on_poll, in_flight=progress.in_flight, on_queued=progress.queued)
        try:
            submitter.run(todo)
            for name, n in executor.claim_worker_requests().items():  # their last commit records'
                if n:
                    self.builder.clocks.count(name, n)
        except BaseException:
            executor.cancel(submitter.pending)
            raise
        finally:
            lost = executor.lost_workers()
            executor.close()
        return lost

    def _log_dir(self) -> str:
        """Worker job logs (batch clusters): under a local output, else in gpubatch's cache."""
        if not self.store.remote:
            return str(self.store.local(LOGS_DIR, self.run_id))
        return str(cache_root() / "logs" / self.run_id)

    def _job_name(self) -> str:
        """Batch worker jobs' name, the same for every run into this output: a later run finds
        (and cancels) the queued jobs of one whose client was killed."""
        import hashlib

        return f"dask-worker-gpubatch-{hashlib.sha256(self.store.uri.encode()).hexdigest()[:10]}"

    def _abandon(self, progress: Progress, exc: BaseException) -> None:
        """An interrupted or failed run: say so in the ledger and status, keep what is committed."""
        interrupted = isinstance(exc, (KeyboardInterrupt, Terminated))
        kind = "run_interrupted" if interrupted else "run_failed"
        reason = redact(f"{type(exc).__name__}: {exc}") if not interrupted else (
            str(exc) if isinstance(exc, Terminated) else "interrupted")  # its cause: SIGHUP, a time limit
        steps: list[tuple[str, Callable[[Phase], Any]]] = [
            ("audit ledger", lambda _: self.ledger.event(kind, reason=reason, failed=len(self.failed)))]
        if self.lease.lost is None:  # else audit.jsonl and status.json are the new holder's now
            # each on its own: an audit.jsonl that could not be written left status.json "running"
            steps += [("status", lambda _: progress.finish("interrupted" if interrupted else "failed", reason=reason,
                                                           unheard=Manifest(self.store).unheard(self.commits))),
                      # every record: commits the client had not heard of too
                      ("audit", lambda said: self.ledger.materialize(progress=said)),
                      ("report", lambda _: _unfinished_report(self.store))]
            if "zarr" in self.job.output.formats:  # which groups are committed, said complete: false
                state = "interrupted" if interrupted else "failed"
                steps.append((f"{ZARR} root", lambda said: describe_unfinished_zarr(
                    self.store, said.counting(Manifest(self.store).iter_entries()), state,
                    {"gpubatch_version": __version__, "kind": self.job.kind})))
        with phase(f"recording the {kind}") as said:  # minutes at thousands of shards on object storage
            for what, step in steps:
                said.step(f"recording the {kind} in the {what}")
                try:
                    step(said)
                except Exception as inner:  # noqa: BLE001 - the original error is the one to report
                    log.warning("could not record the %s in the %s: %s", kind, what, redact(str(inner)))

    def _finish(self, source: Source, shards: Sequence[Shard], ctx: RunContext, prepared: Any, n_workers: int,
                lost: list[dict[str, Any]]) -> Result:
        """The run's end: the output's files from the committed shards, then the report. Said as it
        goes (core.phases): at 3,000 shards on object storage it ran 100 s without a line."""
        with phase("the run's end") as end:
            done = self._merge_outputs(source, shards, end)
            return self._report(source, shards, ctx, prepared, n_workers, lost, done, end)

    def _in_plan(self, shards: Sequence[Shard]) -> Iterator[CommitRef]:
        """The committed shards in plan order, looked up as used."""
        return self.commits.in_order(s.shard_id for s in shards)

    def _records(self, shards: Sequence[Shard]) -> Iterator[ShardResult]:
        """The committed shards' records in plan order, read as used."""
        return Manifest(self.store).iter_entries(record_name(r.shard_id) for r in self._in_plan(shards))

    def _merge_outputs(self, source: Source, shards: Sequence[Shard], end: Phase) -> int:
        """Sweep what no commit names, merge the parts, write the source's per-input outputs; the
        number of committed shards the run reports."""
        job, store = self.job, self.store
        end.step("removing the files of attempts no commit names")
        sweep(store, self.commits)
        done = sum(1 for _ in self._in_plan(shards))
        end.step(f"merging the parts into {PREDICTIONS}", done, "part")
        merge_parquet(store, self._in_plan(shards), source.index_schema(job), progress=end)  # counted as joined
        # each end-of-run step starts from what the run held, not on the last one's holes; the
        # merge's tables and buffers hold no cycles: they were freed when it returned
        hand_back_freed_memory(collect=False)
        end.step("reading the commit records for the per-input outputs", done, "record")
        source.write_outputs(job, store, end.counting(self._records(shards)), progress=end)
        return done

    def _report(self, source: Source, shards: Sequence[Shard], ctx: RunContext, prepared: Any, n_workers: int,
                lost: list[dict[str, Any]], done: int, end: Phase) -> Result:
        job, store = self.job, self.store
        end.step("reading the commit records for the data-quality notes", done, "record")
        run_info = {
            "name": job.name, "kind": job.kind, "gpubatch_version": __version__, "run_id": self.run_id,
            "backend": ctx.backend, "precision": prepared.computes_in, "batch_size": ctx.batch_size,
            "workers": n_workers, "profile": self.prof.get("cluster"), "readers": job.run.readers,
            "stage_ahead": job.run.stage_ahead, "formats": list(job.output.formats),
            "model_sha256": ctx.model_sha256, "spec_sha256": ctx.spec_hash, "shards_total": len(shards),
            "shards_done": done, "lost_workers": lost, "complete": True, "state": "finished",
            "batch_input_bytes": _batch_input_bytes(job, ctx.batch_size), **prepared.report,
            **_operator_facts(job, self.t_start),
            "data_quality": source.data_quality(job, shards, end.counting(self._records(shards))),
        }
        self.lease.confirm()  # the merge may have run minutes, a take-over among them (its reads counted)
        count_claimed_retries(self.builder.clocks)  # the client's: planning, uploads, in-process shards
        self._claim_client_requests()
        _in_plan_order(self.failed, shards)
        end.step(f"writing {REPORT_JSON} and {REPORT_HTML}")
        summary = self.builder.summary(self.failed, time.time() - self.t_start, run_info).to_dict()
        write_report(store, summary)
        from gpubatch.report.html import write_html

        write_html(store, summary)
        hand_back_freed_memory()
        if "zarr" in job.output.formats:
            end.step(f"describing {ZARR}")
            describe_zarr(store, self._in_plan(shards), {"model_sha256": ctx.model_sha256,
                                                         "gpubatch_version": __version__, "kind": job.kind})
        self.ledger.event("run_finish", done=done, failed=len(self.failed), total=len(shards))
        self.lease.check()
        end.step(f"rebuilding {AUDIT} from the records", done, "commit record")
        self.ledger.materialize((record_name(r.shard_id) for r in self._in_plan(shards)), progress=end)
        code = finished_run_exit_code(len(self.failed), done)
        return Result(summary, store.uri, code, self.failed, dict(job.output.storage))


def _unfinished_report(store: OutputStore) -> None:
    """report.json and report.html of a run that stopped: what is committed, marked unfinished
    (``complete: false``, the state, this run's id). A --resume removes the run before's pair
    when it starts; a resume that stopped had left them saying the output was finished, with the
    earlier run's numbers and run_id, to anyone reading the files rather than `gpubatch report`."""
    from gpubatch.report.html import write_html
    from gpubatch.report.summary import summarize_output

    summary = summarize_output(store)
    write_report(store, summary)
    write_html(store, summary)


def _as_disk_full(exc: BaseException, output_uri: str) -> DiskFull | None:
    """A full disk met on the client (an audit record, status.json) said as such, not as a
    traceback of the write that met it; None for any other error."""
    full = disk_full(exc) if not isinstance(exc, DiskFull) else None
    return DiskFull(disk_full_message(full, redact(output_uri))) if full is not None else None


def _operator_facts(job: JobSpec, started: float) -> dict[str, Any]:
    """When and where the run ran and from which spec file, for the report's reader."""
    import datetime
    import socket

    when = datetime.datetime.fromtimestamp(started, tz=datetime.timezone.utc)
    return {"started_at": when.isoformat(timespec="seconds"), "host": socket.gethostname(),
            "spec_path": job.spec_path}


def _stage_ahead(ahead: int, profile: dict[str, Any], slots: int, scheduler: str | None) -> int:
    """How far past each shard the inputs to stage ahead reach. On one host the shards that run
    beside it (its ``slots`` neighbours in plan order) are already being opened, and the stage
    cache is the host's: the look-ahead starts past them, so that run.stage_ahead slides are
    downloading while every slot computes. Across hosts a slide staged on one host does not help
    another, so the look-ahead stays run.stage_ahead. This is the plan-order look-ahead of shards
    run in this process (``inline``); shards dealt to worker processes name their own lane's
    next run.stage_ahead (runtime.dealing)."""
    return slots + ahead if ahead and all_workers_here(profile, scheduler) else ahead


def _caller_s_storage_after(profile: dict[str, Any]) -> contextlib.AbstractContextManager[None]:
    """An inline run's plan reads with the profile's storage options and range reader, as its
    shards do (theirs are the shard's: engine.worker); once applied to this process they stayed
    after the run, and a notebook's later reads (open_results, the next run's plan) took that
    profile's options, credentials included. The caller's are back after the run."""
    if profile.get("cluster") != "inline":
        return contextlib.nullcontext()
    from gpubatch.io.storage_profile import storage_profile

    return storage_profile(profile)


def _storage_profile(profile: dict[str, Any], one_host: bool) -> dict[str, Any]:
    """The profile's storage settings the workers apply; on one host with the stage directory
    resolved here, where the client stages into the workers' cache: a worker process may not see
    this process's environment as it is now (a forkserver keeps the environment it started with)."""
    from gpubatch.io.stage_cache import stage_root

    chosen: dict[str, Any] = {k: profile[k] for k in ("storage", "stage_cache", "range_reader") if k in profile}
    if one_host:
        stage = dict(chosen.get("stage_cache") or {})
        chosen["stage_cache"] = {**stage, "dir": stage_root(stage.get("dir"))}
    return chosen


def _workers_per_host(profile: dict[str, Any]) -> int | None:
    """Worker processes sharing one worker's cores where the profile says: a SLURM job's
    ``processes`` share its CPUs. None elsewhere: each worker counts its host's (engine.context)."""
    if profile.get("cluster") != "slurm":
        return None
    from gpubatch.runtime.slurm import processes_per_job

    return processes_per_job(dict(profile.get("slurm") or {}))


def workers_model_threads(job: JobSpec, n_workers: int, one_host: bool) -> int | None:
    """The intra-op threads each worker's model runs with, where the client knows them
    (``model.threads``, or this host's cores shared by its workers); None when the workers count
    their own host's (engine.context). Batch-size tuning measures at this figure: a curve timed
    on every core says little of a worker that has one."""
    return job.model.threads or (max(1, cpu_count() // n_workers) if one_host else None)


def batch_limit(job: JobSpec, profile: dict[str, Any]) -> tuple[int, str] | None:
    """The largest batch a worker's memory holds (preflight's figure), for the batch-size tuner."""
    largest, which = largest_batch_in_memory(job, profile)
    return None if largest is None else (largest, which)


def on_scheduler(profile: dict[str, Any], scheduler: str | None) -> dict[str, Any]:
    """The profile a run on an existing scheduler (``submit --scheduler``) runs under: its
    workers are the scheduler's, so the checks (a worker's memory budget among them: the
    workers' own memory_limit) are a ``scheduler`` profile's, not those of the job's profile
    (``local`` by default, whose budget was this machine's memory over its cores)."""
    return profile if scheduler is None else {**profile, "cluster": "scheduler", "address": scheduler}


def all_workers_here(profile: dict[str, Any], scheduler: str | None) -> bool:
    """Whether every worker of the run shares this process's host (and its stage cache)."""
    return scheduler is None and profile.get("cluster") in ("local", "local-cuda", "inline")


def _in_plan_order(failed: list[dict[str, Any]], shards: Sequence[Shard]) -> None:
    """Quarantined inputs in the plan's order (the plan's own refusals first), as validate lists
    them: shards fail in whatever order they finish, and two runs of one job listed them apart."""
    inputs = {f["input"] for f in failed}
    first: dict[str, int] = {}
    for i, shard in enumerate(shards):
        if shard.input_uri in inputs:
            first.setdefault(shard.input_uri, i)
    failed.sort(key=lambda f: first.get(f["input"], -1))


def _batch_input_bytes(job: JobSpec, batch_size: int) -> int:
    import numpy as np

    shape, dtype = get_source(job.kind).model_input(job, batch_size)
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def _refuse_in_a_starting_worker() -> None:
    """Stop at once in a worker process that is starting (forkserver, spawn) and re-importing a
    main script with no ``__main__`` guard: it went on to load the job and take the output's
    lease, and its traceback, printed above the parent's advice, said "another run is writing
    this output" (the parent's own run)."""
    import multiprocessing

    from gpubatch.core.errors import GpubatchError
    from gpubatch.runtime.cluster import main_guard_hint

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise GpubatchError(main_guard_hint(RuntimeError("bootstrapping phase")) or "worker processes could not start")


def run(job_or_path: JobSpec | str | Path, **overrides: Any) -> Result:
    """Python API: run a job spec (object or YAML path). Overrides use ``tiles__size=256`` keys.

    Reserved overrides: ``profile``, ``resume``, ``overwrite``, ``scheduler``, ``show_progress``.
    """
    from gpubatch.core.overrides import apply_overrides
    from gpubatch.spec import load_job, parse_job

    _refuse_in_a_starting_worker()
    reserved = ("profile", "resume", "overwrite", "scheduler", "show_progress")
    options = {k: overrides.pop(k) for k in reserved if k in overrides}
    if isinstance(job_or_path, JobSpec):
        job = parse_job(apply_overrides(job_or_path.model_dump(mode="python"), overrides)) if overrides else job_or_path
    else:
        job = load_job(job_or_path, overrides or None)
    return run_job(job, **options)
