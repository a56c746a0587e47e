"""What runs on a worker for one shard: open, pipeline, commit, record. No client I/O here.

The function is submitted to Dask with only small arguments (the shard description and the job
spec) and returns only a small summary; pixels and bases are read here, on the worker.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputError
from gpubatch.engine.pipeline import PipelineConfig, run_pipeline
from gpubatch.models.base import Model, get_model
from gpubatch.outputs.manifest import Manifest
from gpubatch.outputs.writer import ShardWriter
from gpubatch.sources import Shard, ShardReader, get_source
from gpubatch.spec import JobSpec


@dataclass(frozen=True)
class RunContext:
    """Settings the client resolved once for the whole run (model file after quantization, ...)."""

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
    #: the profile's ``storage`` (fsspec options) and ``stage_cache`` settings, applied per worker
    storage_profile: dict[str, Any] | None = None


_CONFIGURED: dict[str, str] = {}
_CONFIGURE_LOCK = threading.Lock()
MALLOC_ARENAS = 2


def _limit_malloc_arenas() -> None:
    """Cap glibc's malloc arenas for this process.

    Each shard starts short-lived reader threads; glibc gives threads their own arenas (up to 8
    per core) and keeps their freed batches, so RSS creeps up with the number of shards run.
    Two arenas lower the plateau (bench/NOTES.md, "Memory"). The Dask profiles also set
    MALLOC_ARENA_MAX at worker start, which works better than this late mallopt.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, MALLOC_ARENAS)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to cap
        pass


def _use_system_arrow_pool() -> None:
    """pyarrow's default pool (mimalloc or jemalloc) keeps what the first parquet commit used for
    the life of the process; gpubatch's tables are small, and glibc hands the memory back."""
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())


def _configure_worker_once(ctx: RunContext) -> None:
    """Per worker process, once: malloc arenas, and the profile's storage settings (the stage cache
    lives on between shards, so it is configured again only when the settings change).

    Locked: a worker's first two shards start together, and a second configuration would
    replace the stage cache (deleting its files) under the first shard's downloads.
    """
    import json

    from gpubatch.io.stage_cache import configure_stage_cache
    from gpubatch.io.storage import configure_storage

    with _CONFIGURE_LOCK:
        if "malloc" not in _CONFIGURED:
            _limit_malloc_arenas()
            _use_system_arrow_pool()
            _CONFIGURED["malloc"] = "capped"
        key = json.dumps(ctx.storage_profile or {}, sort_keys=True, default=str)
        if _CONFIGURED.get("key") != key:
            configure_storage(ctx.storage_profile)
            configure_stage_cache((ctx.storage_profile or {}).get("stage_cache"))
            _CONFIGURED["key"] = key


def make_batch_runner(reader: ShardReader, model: Model, ctx: RunContext | None = None):
    """The model stage: preprocess on the device stage, run, map outputs back to items.

    With ``ctx.fallback_model_path`` set (a reduced-precision run with ``model.fallback``), items
    the reduced model is unsure of are re-run on the fp32 model, loaded once per worker.
    """
    from gpubatch.models.prepare.validate import rerun_low_confidence

    fallback: Model | None = None
    threshold = ctx.fallback_max_prob if ctx is not None else None
    if ctx is not None and ctx.fallback_model_path and threshold is not None:
        fallback = get_model(ctx.fallback_model_path, ctx.backend, "fp32", ctx.threads)

    stage = _gpu_stage(reader, model) if fallback is None else None
    if stage is not None:
        return lambda items, clocks: reader.from_model_output(stage(items, clocks), len(items))

    host = _host_stage(model)

    def run_batch(items: np.ndarray, clocks: StageClocks) -> dict[str, np.ndarray]:
        with host.turn(clocks):
            with clocks.part("preprocess"):
                x = host.keep(reader.to_model_input(items, out=host.buffer))
            with clocks.part("compute"):
                out = model.run(x)
                if fallback is not None and threshold is not None:
                    out = rerun_low_confidence(out, x, fallback, threshold, clocks)
            out = {k: v.copy() if np.may_share_memory(v, x) else v for k, v in out.items()}
        return reader.from_model_output(out, len(items))

    return run_batch


class _HostStage:
    """One model stage at a time per model on a worker, with one reused input buffer.

    A worker runs two shards at once (one opens while the other computes). Their model stages
    take turns: on the CPU two concurrent runs only share the same cores, and each would hold its
    own float batch and ONNX Runtime activations, so peak memory would depend on how often the
    two happened to overlap. Taking turns also makes reuse safe: the previous batch's input array
    (tens of MB) becomes the next batch's buffer instead of fresh pages on every batch.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buffer: np.ndarray | None = None

    @contextmanager
    def turn(self, clocks: StageClocks) -> Iterator[None]:
        t0 = time.perf_counter()
        with self.lock:
            clocks.count("model.turn_wait_s", time.perf_counter() - t0)
            yield

    def warm(self, model: Model, shape: tuple[int, ...], dtype: str, clocks: StageClocks) -> None:
        """Once per model and worker, before the first shard opens: one zero batch through the
        model (which sizes ONNX Runtime's arena), its input kept as the buffer. The first shard's
        compute time then holds no session set-up, and the worker holds its batch-sized memory
        from the start rather than from whichever shard first overlaps a slide opening with a
        model run."""
        with self.lock:
            if self.buffer is not None or model.device != "cpu":
                return
            t0 = time.perf_counter()
            x = np.empty(shape, dtype=dtype)
            x.fill(0)  # written, not np.zeros: untouched zero pages would hold no memory yet
            model.run(x)
            self.buffer = x
            clocks.count("model.warmup_s", time.perf_counter() - t0)

    def keep(self, x: np.ndarray) -> np.ndarray:
        self.buffer = x if x.flags.c_contiguous and x.flags.writeable and x.base is None else None
        return x


_HOST_STAGES: dict[int, _HostStage] = {}


def _host_stage(model: Model) -> _HostStage:
    return _HOST_STAGES.setdefault(id(model), _HostStage())


_GPU_STAGES: dict[tuple[int, str, str], Any] = {}


def _gpu_stage(reader: ShardReader, model: Model) -> Any:
    """The fused-kernel device stage (pinned buffers, copy stream) for a model on a CUDA device.

    One per worker, model and preprocessing, reused across shards. On the CPU the reader's own
    ``to_model_input`` is the device stage, and this returns None.
    """
    plan = reader.device_preprocess()
    if model.device != "cuda" or plan is None:
        return None
    kind, params = plan
    key = (id(model), kind, repr(sorted(params.items())))
    if key not in _GPU_STAGES:
        from gpubatch.engine.device import make_device_stage

        _GPU_STAGES[key] = make_device_stage(model, kind, **params)
    return _GPU_STAGES[key]


def _failure(shard: Shard, exc: BaseException, started: float) -> dict[str, Any]:
    message = exc.message if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
    return {
        "shard_id": shard.shard_id, "input": shard.input_uri, "status": "failed", "error": message,
        "retryable": bool(getattr(exc, "retryable", False)) or not isinstance(exc, InputError),
        "host": socket.gethostname(), "pid": os.getpid(), "start": started, "end": time.time(),
        "traceback": "" if isinstance(exc, InputError) else traceback.format_exc(limit=5),
    }


def execute_shard(shard: Shard, job: JobSpec, ctx: RunContext, upcoming: tuple[str, ...] = ()) -> dict[str, Any]:
    """Process one shard end to end on this worker; returns a small JSON-able summary.

    A bad input comes back as a ``failed`` summary rather than an exception, so that one corrupt
    slide is quarantined without poisoning the Dask task graph. ``upcoming`` names the next
    inputs in plan order: slides that will be staged start downloading now, behind this compute.
    """
    started = time.time()
    _configure_worker_once(ctx)
    if job.kind == "slides" and upcoming:
        from gpubatch.sources.slides.open import prefetch

        prefetch(upcoming, job.input.access, job.input.storage)
    clocks = StageClocks()
    source = get_source(job.kind)
    writer: ShardWriter | None = None
    try:
        model = get_model(ctx.model_path, ctx.backend, ctx.precision, ctx.threads)
        _host_stage(model).warm(model, *source.model_input(job, ctx.batch_size), clocks)
        with clocks.part("open"):
            reader = source.open(shard, job, clocks)
        with reader:
            constants = {"slide": shard.input_uri} if job.kind == "slides" else {}
            attrs = {**reader.attrs, "model_sha256": ctx.model_sha256, "backend": model.backend,
                     "precision": ctx.precision, "gpubatch_version": ctx.version}
            writer = ShardWriter(ctx.outdir, shard.shard_id, constants, attrs, job.output.formats)
            cfg = PipelineConfig(ctx.batch_size, job.run.readers, job.run.prefetch_batches, pad_last=True)
            t0 = time.perf_counter()
            items = run_pipeline(reader, make_batch_runner(reader, model, ctx), writer, cfg, clocks)
            wall = time.perf_counter() - t0
            entry = writer.commit()
            shard_attrs = reader.attrs
        if job.kind == "slides":
            from gpubatch.sources.slides.open import release

            release(shard.input_uri)
    except BaseException as exc:  # noqa: BLE001 - summarised for the client
        if writer is not None:
            writer.abort()
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return _failure(shard, exc, started)
    summary = {
        **entry, "input": shard.input_uri, "status": "done", "items": items, "wall_s": wall,
        "clocks": clocks.to_dict(), "attrs": shard_attrs, "host": socket.gethostname(),
        "pid": os.getpid(), "start": started, "end": time.time(), "model": model.describe(),
    }
    Manifest(ctx.outdir).record({k: v for k, v in summary.items() if k != "clocks"} | {"clocks": clocks.to_dict()})
    return summary
