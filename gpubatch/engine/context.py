"""RunContext: what the client resolved once for a whole run and every worker reads."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

from gpubatch.core.cpu import usable_cores
from gpubatch.io.retry import RetryPolicy

log = logging.getLogger("gpubatch")
IDENTITY_TIMEOUT_S = 10  # the scheduler's list of workers, asked once per worker process


@dataclass(frozen=True)
class RunContext:
    """Settings the client resolved once for the whole run (model file after quantization, ...)."""

    #: the output's URI (local folder or object-store prefix) and its storage options
    outdir: str
    model_path: str
    backend: str
    precision: str
    batch_size: int
    threads: int | None
    model_sha256: str
    spec_hash: str
    version: str
    #: per-item confidence fallback (``model.fallback``): the fp32 model low-confidence items are
    #: re-run on, and the top-probability threshold below which an item counts as low-confidence
    fallback_model_path: str | None = None
    fallback_max_prob: float | None = None
    #: the profile's ``storage`` (fsspec options), ``range_reader`` and ``stage_cache`` settings, each
    #: shard's own on a worker (engine.worker.execute_shard), whatever other job it serves
    storage_profile: dict[str, Any] | None = None
    output_options: dict[str, Any] | None = None
    #: the run that writes the commit records, and the hash of the result-changing spec fields
    run_id: str = ""
    result_hash: str = ""
    #: the storage options ``model_path`` is read with where it is remote (the inputs' for the
    #: user's own model URI, the output's for a reduced model uploaded beside the outputs)
    model_storage: dict[str, Any] | None = None
    #: ``model_path``'s version as the client found it where it is remote (size, ETag, mtime: one
    #: HEAD for the run): a worker loads its host's copy of that version with no request, or
    #: fetches that version (io.localized); None: local, or asked by the worker
    model_version: dict[str, Any] | None = None
    #: ``slide_model.path``'s version, the same way (the client's one HEAD, handed to the workers)
    slide_model_version: dict[str, Any] | None = None
    #: the job's retry policy (``run.storage_attempts``, ``run.storage_max_wait_s``): every storage
    #: call of a worker's shards that names none retries under it (io.retry.default_policy)
    storage_policy: RetryPolicy | None = None
    #: gpubatch's cache (``GPUBATCH_CACHE``) as the client resolved it, where every worker shares
    #: its host: a worker forked from a forkserver has the environment the forkserver started
    #: with, which a process that ran before (a notebook, a test session) may have had otherwise,
    #: and its workers fetched the model again into another cache; None: the worker's own
    cache_dir: str | None = None
    #: worker processes that share one worker's cores, where the client knows (a SLURM job's
    #: processes); None: counted on the worker, as the scheduler's workers on its host
    workers_per_host: int | None = None


def model_threads(ctx: RunContext) -> int:
    """Intra-op threads for this worker process's model: the client's figure where it knows the
    workers' host (``model.threads``, or every worker on the client's host); else this host's
    usable cores over the worker processes sharing them. Sized on the client's cores, a run
    submitted from a 4-core login node gave every worker on a 32-core node one thread."""
    if ctx.threads:
        return ctx.threads
    return _share_of_cores(ctx.workers_per_host)


@functools.cache
def _share_of_cores(workers_per_host: int | None) -> int:
    sharing = workers_per_host or _workers_on_this_host()
    threads = max(1, usable_cores() // max(1, sharing))
    log.info("model threads: %d (%d usable cores, %d worker process(es) sharing them)",
             threads, usable_cores(), sharing)
    return threads


def _workers_on_this_host() -> int:
    """The Dask workers the scheduler lists on this worker's host (1 outside a Dask worker, or
    when the scheduler does not answer within its timeout)."""
    try:
        from distributed import get_worker
        from distributed.utils import sync

        worker = get_worker()
        info = sync(worker.loop, worker.scheduler.identity, callback_timeout=IDENTITY_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - not on a Dask worker, or no answer: this process alone
        return 1
    return sum(1 for w in info.get("workers", {}).values() if w.get("host") == worker.ip) or 1
