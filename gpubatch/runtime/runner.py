"""Run a job: plan shards on the client, run them on workers, commit, report.

The client only plans (metadata), submits small shard descriptions, and folds small summaries:
no pixels or bases are read here. Shards that raise are retried up to ``run.retries`` times; an
input that is bad (``InputError``) is quarantined at once; the run finishes the rest and exits 3.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpubatch import __version__
from gpubatch.core.errors import EXIT_OK, EXIT_PARTIAL
from gpubatch.core.files import file_sha256, write_json_atomic
from gpubatch.core.results import ShardResult
from gpubatch.engine.context import RunContext
from gpubatch.engine.worker import execute_shard
from gpubatch.models.base import resolve_backend
from gpubatch.outputs.audit import audit_line
from gpubatch.outputs.layout import AUDIT, RUN_DIRS, RUN_FILES, STATUS, OutputLayout
from gpubatch.outputs.manifest import Manifest
from gpubatch.outputs.writer import merge_parquet, remove_temporaries
from gpubatch.report.summary import summarize, write_report
from gpubatch.runtime.cluster import (
    cpu_count,
    load_profile,
    open_executor,
    start_worker_imports,
    worker_count,
)
from gpubatch.runtime.executors import Executor
from gpubatch.runtime.preflight import preflight
from gpubatch.runtime.progress import Progress
from gpubatch.runtime.result import Result
from gpubatch.sources import Shard, get_source
from gpubatch.spec import JobSpec

log = logging.getLogger("gpubatch")


def _fresh_outdir(layout: OutputLayout, resume: bool) -> None:
    layout.root.mkdir(parents=True, exist_ok=True)
    remove_temporaries(layout.root)
    if resume:
        return
    import shutil

    Manifest(layout.root).clear()
    for name in RUN_DIRS:
        shutil.rmtree(layout / name, ignore_errors=True)
    for name in RUN_FILES:
        (layout / name).unlink(missing_ok=True)


def make_context(job: JobSpec, outdir: Path, n_workers: int, model_path: str, precision: str,
                 batch_size: int) -> RunContext:
    threads = job.model.threads or max(1, cpu_count() // n_workers)
    return RunContext(
        outdir=str(outdir), model_path=model_path, backend=resolve_backend(job.model.backend, model_path),
        precision=precision, batch_size=batch_size, threads=threads,
        model_sha256=file_sha256(job.model.path), spec_hash=job.spec_hash(), version=__version__,
    )


class _Submitter:
    """Submits shards, retries failures up to the limit, and hands results on as they finish."""

    def __init__(self, executor: Executor, job: JobSpec, ctx: RunContext,
                 on_result: Callable[[ShardResult], None]):
        self.executor, self.job, self.ctx, self.on_result = executor, job, ctx, on_result
        self.attempts: dict[str, int] = {}
        self.upcoming: dict[str, tuple[str, ...]] = {}

    def _submit(self, shard: Shard) -> Any:
        n = self.attempts.get(shard.shard_id, 0) + 1
        self.attempts[shard.shard_id] = n
        upcoming = self.upcoming.get(shard.shard_id, ()) if n == 1 else ()
        key = f"gpubatch-{shard.shard_id}-{n}-{time.time_ns()}"
        fut = self.executor.submit(execute_shard, shard, self.job, self.ctx, upcoming, key=key)
        fut.shard = shard
        return fut

    def _result(self, fut: Any) -> ShardResult:
        shard = fut.shard
        try:
            result: ShardResult = fut.result()
        except Exception as exc:  # a worker died or the task raised outside the shard
            result = ShardResult.failure(shard.shard_id, shard.input_uri, f"{type(exc).__name__}: {exc}",
                                         retryable=True)
        result.attempt = self.attempts[shard.shard_id]
        return result

    def run(self, shards: list[Shard]) -> None:
        ahead = self.job.run.stage_ahead
        self.upcoming = {s.shard_id: tuple(t.input_uri for t in shards[i + 1 : i + 1 + ahead])
                         for i, s in enumerate(shards)}
        pending = {self._submit(s) for s in shards}
        while pending:
            for fut in self.executor.wait_first(pending):
                pending.discard(fut)
                result = self._result(fut)
                if not result.ok and result.retryable and result.attempt <= self.job.run.retries:
                    log.warning("shard %s failed (%s); retrying", result.shard_id, result.error)
                    pending.add(self._submit(fut.shard))
                    continue
                self.on_result(result)


def run_job(job: JobSpec, *, profile: str | None = None, resume: bool = False,
            scheduler: str | None = None, show_progress: bool | None = None) -> Result:
    """Run a validated job to completion; see the module docstring for the failure rules."""
    prof = load_profile(profile or job.run.profile)
    start_worker_imports(prof)
    preflight(job)
    layout = OutputLayout(job.output.uri)
    _fresh_outdir(layout, resume)
    t_start = time.time()
    source = get_source(job.kind)
    shards, failed = source.plan(job)
    committed = Manifest(layout.root).committed() if resume else {}
    todo = [s for s in shards if s.shard_id not in committed]
    n_workers = worker_count(prof, len(todo), job.run.workers)
    from gpubatch.models.prepare import prepare_model

    prepared = prepare_model(job, source, shards, layout.root)
    ctx = make_context(job, layout.root, n_workers, prepared.path, prepared.precision, prepared.batch_size)
    ctx = dataclasses.replace(ctx, fallback_model_path=prepared.fallback_path,
                              fallback_max_prob=prepared.fallback_max_prob,
                              storage_profile={k: prof[k] for k in ("storage", "stage_cache") if k in prof})
    results: list[ShardResult] = [dataclasses.replace(e, resumed=True) for e in committed.values()]
    progress = Progress(len(shards), already=len(committed), outdir=layout.root, enabled=show_progress)
    run_fields = {"model_sha256": ctx.model_sha256, "backend": ctx.backend, "precision": ctx.precision,
                  "gpubatch_version": ctx.version, "spec_sha256": ctx.spec_hash}
    audit = (layout / AUDIT).open("a")

    def on_result(result: ShardResult) -> None:
        if result.ok:
            results.append(result)
        else:
            failed.append({"input": result.input, "error": result.error or ""})
        line = audit_line(result, run_fields, prepared.audit, job.input.storage)
        audit.write(json.dumps(line, default=str) + "\n")
        audit.flush()
        progress.update(result)

    try:
        if todo:
            with open_executor(prof, n_workers, scheduler) as executor:
                _Submitter(executor, job, ctx, on_result).run(todo)
    finally:
        audit.close()
        progress.close()
    return _finish(job, layout, shards, results, failed, time.time() - t_start, ctx, prepared, n_workers, prof)


def _finish(job: JobSpec, layout: OutputLayout, shards: list[Shard], results: list[ShardResult],
            failed: list[dict[str, str]], wall: float, ctx: RunContext, prepared: Any, n_workers: int,
            prof: dict[str, Any]) -> Result:
    source = get_source(job.kind)
    order = [s.shard_id for s in shards]
    done_ids = {r.shard_id for r in results}
    # Always: the parquet index is the table of record, beside zarr.
    merge_parquet(layout.root, [sid for sid in order if sid in done_ids], index_columns=source.index_schema(job))
    source.write_outputs(job, str(layout.root), results)
    position = {sid: i for i, sid in enumerate(order)}
    results.sort(key=lambda r: position.get(r.shard_id, len(order)))
    run_info = {
        "name": job.name, "kind": job.kind, "gpubatch_version": __version__,
        "backend": ctx.backend, "precision": ctx.precision, "batch_size": ctx.batch_size,
        "workers": n_workers, "profile": prof.get("cluster"), "readers": job.run.readers,
        "model_sha256": ctx.model_sha256, "spec_sha256": ctx.spec_hash,
        "shards_total": len(shards), "shards_done": len(done_ids),
        "batch_input_bytes": _batch_input_bytes(job, ctx.batch_size), **prepared.report,
    }
    summary = summarize(results, failed, wall, run_info).to_dict()
    write_report(layout.root, summary)
    from gpubatch.report.html import write_html

    write_html(layout.root, summary)
    _write_zarr_root(layout, summary, order, done_ids)
    write_json_atomic(layout / STATUS, {"state": "finished", "done": len(done_ids),
                                        "failed": len(failed), "total": len(shards)})
    code = EXIT_PARTIAL if failed else EXIT_OK
    return Result(summary, str(layout.root), code, failed)


def _batch_input_bytes(job: JobSpec, batch_size: int) -> int:
    import numpy as np

    shape, dtype = get_source(job.kind).model_input(job, batch_size)
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def _write_zarr_root(layout: OutputLayout, summary: dict[str, Any], order: list[str], done: set[str]) -> None:
    root = layout.zarr
    if not root.is_dir():
        return
    import zarr

    group = zarr.open_group(str(root), mode="a")
    group.attrs.update({"shards": [s for s in order if s in done], "model_sha256": summary["model_sha256"],
                        "gpubatch_version": summary["gpubatch_version"], "kind": summary["kind"]})


def run(job_or_path: JobSpec | str | Path, **overrides: Any) -> Result:
    """Python API: run a job spec (object or YAML path). Overrides use ``tiles__size=256`` keys.

    Reserved overrides: ``profile``, ``resume``, ``scheduler``, ``show_progress``.
    """
    from gpubatch.spec import apply_overrides, load_job, parse_job

    options = {k: overrides.pop(k) for k in ("profile", "resume", "scheduler", "show_progress") if k in overrides}
    if isinstance(job_or_path, JobSpec):
        job = parse_job(apply_overrides(job_or_path.model_dump(mode="python"), overrides)) if overrides else job_or_path
    else:
        job = load_job(job_or_path, overrides or None)
    return run_job(job, **options)
