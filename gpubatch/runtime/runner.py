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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpubatch import __version__
from gpubatch.core.errors import EXIT_OK, EXIT_PARTIAL
from gpubatch.core.files import file_sha256, write_json_atomic
from gpubatch.engine.worker import RunContext, execute_shard
from gpubatch.models.base import resolve_backend
from gpubatch.outputs.audit import audit_line
from gpubatch.outputs.manifest import Manifest
from gpubatch.outputs.writer import PARTS_DIR, ZARR_NAME, merge_parquet, remove_temporaries
from gpubatch.report.summary import summarize, write_report
from gpubatch.runtime.cluster import (
    cpu_count,
    load_profile,
    open_cluster,
    start_worker_imports,
    worker_count,
)
from gpubatch.runtime.preflight import preflight
from gpubatch.runtime.progress import Progress
from gpubatch.sources import Shard, get_source
from gpubatch.spec import JobSpec

log = logging.getLogger("gpubatch")


@dataclass
class Result:
    """What ``gpubatch.run`` returns: the report, the outputs' location, and the exit code."""

    report: dict[str, Any]
    output_uri: str
    exit_code: int = EXIT_OK
    failed: list[dict[str, str]] = field(default_factory=list)

    def predictions(self) -> Any:
        """predictions.parquet as a pandas DataFrame."""
        import pandas as pd

        return pd.read_parquet(Path(self.output_uri) / "predictions.parquet")

    def timeline(self) -> Any:
        """One row per batch: t, items, busy_s, starved_s, queue_depth, shard."""
        from gpubatch.report.frames import timeline_frame

        return timeline_frame(self.report)

    def throughput(self, buckets: int = 40) -> Any:
        """Items/s, starvation and queue depth per time bucket: the report's plots as data."""
        from gpubatch.report.frames import throughput_frame

        return throughput_frame(self.report, buckets=buckets)

    def stages(self) -> Any:
        """Busy, starved, blocked seconds and starvation per stage."""
        from gpubatch.report.frames import stage_frame

        return stage_frame(self.report)

    def parts(self) -> Any:
        """Seconds and share per part (storage, decode, preprocess, transfer, compute, write)."""
        from gpubatch.report.frames import parts_frame

        return parts_frame(self.report)

    def shards(self) -> Any:
        """One row per input: items, seconds, starvation, retries, errors."""
        from gpubatch.report.frames import shard_frame

        return shard_frame(self.report)

    def storage_latency(self) -> Any:
        """The storage request latency histogram (empty without remote requests)."""
        from gpubatch.report.frames import latency_frame

        return latency_frame(self.report)


def _fresh_outdir(outdir: Path, resume: bool) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    remove_temporaries(outdir)
    if resume:
        return
    import shutil

    Manifest(outdir).clear()
    for name in (PARTS_DIR, ZARR_NAME):
        shutil.rmtree(outdir / name, ignore_errors=True)
    for name in ("predictions.parquet", "report.json", "audit.jsonl", "status.json", "report.html"):
        (outdir / name).unlink(missing_ok=True)


def make_context(job: JobSpec, outdir: Path, n_workers: int, model_path: str, precision: str,
                 batch_size: int) -> RunContext:
    threads = job.model.threads or max(1, cpu_count() // n_workers)
    return RunContext(
        outdir=str(outdir), model_path=model_path, backend=resolve_backend(job.model.backend, model_path),
        precision=precision, batch_size=batch_size, threads=threads,
        model_sha256=file_sha256(job.model.path), spec_hash=job.spec_hash(), version=__version__,
    )


class _Submitter:
    """Submits shards, retries failures up to the limit, and collects summaries as they finish."""

    def __init__(self, client: Any, job: JobSpec, ctx: RunContext, on_result: Any,
                 resources: dict[str, float] | None = None):
        self.client, self.job, self.ctx, self.on_result = client, job, ctx, on_result
        self.resources = resources  # e.g. {GPU: 1}: one shard per GPU at a time
        self.attempts: dict[str, int] = {}
        self.upcoming: dict[str, tuple[str, ...]] = {}

    def _submit(self, shard: Shard) -> Any:
        n = self.attempts.get(shard.shard_id, 0) + 1
        self.attempts[shard.shard_id] = n
        kwargs: dict[str, Any] = {}
        if hasattr(self.client, "scheduler"):
            kwargs = {"pure": False, "key": f"gpubatch-{shard.shard_id}-{n}-{time.time_ns()}"}
            if self.resources:
                kwargs["resources"] = self.resources
        upcoming = self.upcoming.get(shard.shard_id, ()) if n == 1 else ()
        fut = self.client.submit(execute_shard, shard, self.job, self.ctx, upcoming, **kwargs)
        fut.shard = shard
        return fut

    def run(self, shards: list[Shard]) -> None:
        ahead = self.job.run.stage_ahead
        self.upcoming = {s.shard_id: tuple(t.input_uri for t in shards[i + 1 : i + 1 + ahead])
                         for i, s in enumerate(shards)}
        pending = {self._submit(s) for s in shards}
        while pending:
            done = _wait_first(pending)
            for fut in done:
                pending.discard(fut)
                shard = fut.shard
                try:
                    result = fut.result()
                except Exception as exc:  # a worker died or the task raised outside the shard
                    result = {"shard_id": shard.shard_id, "input": shard.input_uri, "status": "failed",
                              "error": f"{type(exc).__name__}: {exc}", "retryable": True}
                if result["status"] == "failed" and result.get("retryable") and \
                        self.attempts[shard.shard_id] <= self.job.run.retries:
                    log.warning("shard %s failed (%s); retrying", shard.shard_id, result["error"])
                    pending.add(self._submit(shard))
                    continue
                self.on_result(result)


def _wait_first(pending: set[Any]) -> set[Any]:
    from concurrent.futures import FIRST_COMPLETED
    from concurrent.futures import wait as thread_wait

    sample = next(iter(pending))
    if hasattr(sample, "client"):
        from distributed import wait

        return set(wait(list(pending), return_when="FIRST_COMPLETED").done)
    return set(thread_wait(pending, return_when=FIRST_COMPLETED).done)


def run_job(job: JobSpec, *, profile: str | None = None, resume: bool = False,
            scheduler: str | None = None, show_progress: bool | None = None) -> Result:
    """Run a validated job to completion; see the module docstring for the failure rules."""
    prof = load_profile(profile or job.run.profile)
    start_worker_imports(prof)
    preflight(job)
    outdir = Path(job.output.uri)
    _fresh_outdir(outdir, resume)
    t_start = time.time()
    source = get_source(job.kind)
    shards, failed = source.plan(job)
    committed = Manifest(outdir).committed() if resume else {}
    todo = [s for s in shards if s.shard_id not in committed]
    n_workers = worker_count(prof, len(todo), job.run.workers)
    from gpubatch.models.prepare.resolve import prepare_model

    prepared = prepare_model(job, source, shards, outdir)
    ctx = make_context(job, outdir, n_workers, prepared.path, prepared.precision, prepared.batch_size)
    ctx = dataclasses.replace(ctx, fallback_model_path=prepared.fallback_path,
                              fallback_max_prob=prepared.fallback_max_prob,
                              storage_profile={k: prof[k] for k in ("storage", "stage_cache") if k in prof})
    results: list[dict[str, Any]] = [dict(e, resumed=True) for e in committed.values()]
    progress = Progress(len(shards), already=len(committed), outdir=outdir, enabled=show_progress)
    audit = (outdir / "audit.jsonl").open("a")

    def on_result(result: dict[str, Any]) -> None:
        if result["status"] == "done":
            results.append(result)
        else:
            failed.append({"input": result["input"], "error": result["error"]})
        run_fields = {"model_sha256": ctx.model_sha256, "backend": ctx.backend, "precision": ctx.precision,
                      "gpubatch_version": ctx.version, "spec_sha256": ctx.spec_hash}
        audit.write(json.dumps(audit_line(result, run_fields, prepared.audit), default=str) + "\n")
        audit.flush()
        progress.update(result)

    try:
        if todo:
            with open_cluster(prof, n_workers, scheduler) as client:
                _Submitter(client, job, ctx, on_result, prof.get("resources")).run(todo)
    finally:
        audit.close()
        progress.close()
    return _finish(job, outdir, shards, results, failed, time.time() - t_start, ctx, prepared, n_workers, prof,
                   source.index_schema(job))


def _finish(job: JobSpec, outdir: Path, shards: list[Shard], results: list[dict[str, Any]],
            failed: list[dict[str, str]], wall: float, ctx: RunContext, prepared: Any, n_workers: int,
            prof: dict[str, Any], index_columns: list[str]) -> Result:
    order = [s.shard_id for s in shards]
    done_ids = {r["shard_id"] for r in results}
    # Always: the parquet index is the table of record, beside zarr.
    merge_parquet(outdir, [sid for sid in order if sid in done_ids], index_columns=index_columns)
    if "geojson" in job.output.formats and job.kind == "slides":
        from gpubatch.outputs.geojson import write_geojson

        extents = {r["input"]: r.get("attrs", {}).get("extent_level0", job.tiles.size) for r in results}
        write_geojson(outdir, extents)
    position = {sid: i for i, sid in enumerate(order)}
    results.sort(key=lambda r: position.get(r["shard_id"], len(order)))
    run_info = {
        "name": job.name, "kind": job.kind, "gpubatch_version": __version__,
        "backend": ctx.backend, "precision": ctx.precision, "batch_size": ctx.batch_size,
        "workers": n_workers, "profile": prof.get("cluster"), "readers": job.run.readers,
        "model_sha256": ctx.model_sha256, "spec_sha256": ctx.spec_hash,
        "shards_total": len(shards), "shards_done": len(done_ids),
        "batch_input_bytes": _batch_input_bytes(job, ctx.batch_size), **prepared.report,
    }
    summary = summarize(results, failed, wall, run_info)
    write_report(outdir, summary)
    from gpubatch.report.html import write_html

    write_html(outdir, summary)
    _write_zarr_root(outdir, summary, order, done_ids)
    write_json_atomic(outdir / "status.json", {"state": "finished", "done": len(done_ids),
                                               "failed": len(failed), "total": len(shards)})
    code = EXIT_PARTIAL if failed else EXIT_OK
    return Result(summary, str(outdir), code, failed)


def _batch_input_bytes(job: JobSpec, batch_size: int) -> int:
    import numpy as np

    shape, dtype = get_source(job.kind).model_input(job, batch_size)
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def _write_zarr_root(outdir: Path, summary: dict[str, Any], order: list[str], done: set[str]) -> None:
    root = outdir / ZARR_NAME
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
