"""ONNX Runtime's TensorRT execution provider: its options, and an engine cache the workers of a
machine share.

Without options the provider builds its TensorRT engine in every worker process of every run:
minutes for a large model, paid again by each GPU worker. With ``trt_engine_cache_enable`` it
writes the engine once and later sessions deserialize it; with ``trt_timing_cache_enable`` even a
new model's build reuses the layer timings measured for others on the same GPU.

ONNX Runtime names cached engines by the model's path and graph, not its bytes, and its
documentation says to delete old engines whenever the model, ONNX Runtime, TensorRT or the GPU
change. So the cache folder is keyed by all of these (model sha256, precision, GPU, TensorRT and
ONNX Runtime versions, workspace): a model rewritten in place gets a fresh folder, and a stale
engine is never offered. The batch profile is given explicitly (min 1, opt B, max 2B, as the
``tensorrt`` backend builds): without it the provider builds at the first batch and rebuilds,
rewriting the cached engine, whenever a batch falls outside the shapes it has seen. With it the
engine is built while the session is created, which a file lock serializes per folder: one
worker builds, the others of the machine wait (boundedly) and load its engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gpubatch.core.errors import GpubatchError

log = logging.getLogger("gpubatch")

TRT_EP = "TensorrtExecutionProvider"
ENGINE_DIR = "ort-trt"
#: the precisions the provider builds from their flags; int8 needs a QDQ model (quantize.py);
#: bf16 and fp8 ONNX files are not made for this backend (resolve.keep_fp32_reason refuses first)
EP_PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_BATCH = 64
#: how long a worker waits for another one's engine build before building without the cache
DEFAULT_BUILD_WAIT_S = 1800.0
POLL_S = 0.5


@dataclass(frozen=True)
class EngineFacts:
    """Everything an engine built by the provider is valid for, and the profile it is built with."""

    model_sha256: str
    precision: str
    gpu: str
    tensorrt: str
    onnxruntime: str
    workspace_bytes: int | None = None
    input_name: str | None = None
    #: the first input's dims after the batch, when the batch is its only dynamic dim
    item_dims: tuple[int, ...] | None = None
    batch_size: int = DEFAULT_BATCH
    max_batch_size: int = 2 * DEFAULT_BATCH

    @property
    def has_profile(self) -> bool:
        return self.input_name is not None and self.item_dims is not None


def _key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def engine_cache_dir(root: Path, facts: EngineFacts) -> Path:
    """The engine folder for exactly these facts (workers with the same facts share it)."""
    return root / ENGINE_DIR / _key(asdict(facts))


def timing_cache_dir(root: Path, facts: EngineFacts) -> Path:
    """The timing cache holds for a GPU and a TensorRT version, whatever the model."""
    return root / ENGINE_DIR / f"timing-{_key({'gpu': facts.gpu, 'tensorrt': facts.tensorrt})}"


def profile_options(facts: EngineFacts) -> dict[str, str]:
    """``trt_profile_{min,opt,max}_shapes`` for the first input, batch 1 / B / 2B, e.g.
    ``input:1x3x224x224``; none where the input's item dims are not all fixed."""
    if not facts.has_profile:
        return {}
    item = "".join(f"x{d}" for d in facts.item_dims or ())
    sizes = {"min": 1, "opt": facts.batch_size, "max": facts.max_batch_size}
    return {f"trt_profile_{which}_shapes": f"{facts.input_name}:{n}{item}" for which, n in sizes.items()}


def tensorrt_provider_options(root: Path, facts: EngineFacts, *, cached: bool = True) -> dict[str, Any]:
    """The TensorRT provider's options for this engine: precision flags matching the job's
    precision, the engine and timing caches under ``root`` (``cached=False``: neither, for a
    worker that could not get the folder's build lock), the workspace where one is set, and the
    batch profile. Pure: the caller makes the folders."""
    if facts.precision not in EP_PRECISIONS:
        raise GpubatchError(f"precision {facts.precision} does not run on ONNX Runtime's TensorRT provider "
                            f"(it builds {', '.join(EP_PRECISIONS)}); use backend tensorrt")
    options: dict[str, Any] = {
        "trt_fp16_enable": facts.precision == "fp16",
        "trt_int8_enable": facts.precision == "int8",
        "trt_engine_cache_enable": cached,
        "trt_timing_cache_enable": cached,
    }
    if cached:
        options["trt_engine_cache_path"] = str(engine_cache_dir(root, facts))
        options["trt_timing_cache_path"] = str(timing_cache_dir(root, facts))
    if facts.workspace_bytes:
        options["trt_max_workspace_size"] = int(facts.workspace_bytes)
    return options | profile_options(facts)


def provider_entries(providers: list[str], trt_options: dict[str, Any]) -> list[Any]:
    """The ``providers`` argument of ``InferenceSession``: the TensorRT one with its options."""
    return [(name, trt_options) if name == TRT_EP else name for name in providers]


# -- what this machine and model are ----------------------------------------------------------------


def tensorrt_version() -> str:
    """The installed TensorRT's version, from its wheel (ONNX Runtime loads libnvinfer, not the
    Python package); ``unknown`` where TensorRT came from elsewhere."""
    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu12-libs", "tensorrt-libs"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(dist)
    return "unknown"


def batch_sizes() -> tuple[int, int]:
    """The profile's opt and max batch: GPUBATCH_TRT_BATCH (64) and twice it, as backend tensorrt."""
    batch = int(os.environ.get("GPUBATCH_TRT_BATCH") or DEFAULT_BATCH)
    return batch, 2 * batch


def engine_facts(path: str, precision: str, ort_version: str) -> EngineFacts:
    """The facts of this model, precision and machine (the GPU's name, TensorRT's version)."""
    from gpubatch.core.files import file_sha256
    from gpubatch.models.base import gpu_name
    from gpubatch.runtime.model_facts import model_first_input

    first = model_first_input(path)
    dynamic_batch_only = bool(first.dims) and first.dims[0] is None and None not in first.dims[1:]
    workspace_mb = int(os.environ.get("GPUBATCH_TRT_WORKSPACE_MB") or 0)
    batch, max_batch = batch_sizes()
    return EngineFacts(
        file_sha256(path), precision, gpu_name(), tensorrt_version(), ort_version,
        workspace_mb << 20 or None, first.name if dynamic_batch_only else None,
        tuple(int(d) for d in first.dims[1:] if d is not None) if dynamic_batch_only else None,
        batch, max_batch)


# -- one builder per folder -------------------------------------------------------------------------


@contextlib.contextmanager
def build_lock(folder: Path, wait_s: float) -> Iterator[bool]:
    """Hold ``folder``'s build lock: True once held, False after ``wait_s`` without it. ONNX
    Runtime writes an engine in place, so a worker loading it while another writes it would read
    half an engine; waiting here lets one build and the others load what it wrote."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".build.lock", "a+b") as handle:
        deadline, told = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                if not told:
                    log.info("another worker is building the TensorRT engine in %s; waiting up to %.0f s",
                             folder, wait_s)
                    told = True
                time.sleep(POLL_S)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_trt_session(path: str, sess_options: Any, providers: list[str], precision: str) -> tuple[Any, EngineFacts]:
    """An ``InferenceSession`` on the TensorRT provider with a shared engine cache; where the
    folder's builder holds it past GPUBATCH_TRT_BUILD_WAIT_S, one built without the cache."""
    import onnxruntime as ort

    from gpubatch.core.files import cache_root

    facts = engine_facts(path, precision, ort.__version__)
    folder = engine_cache_dir(cache_root(), facts)
    timing_cache_dir(cache_root(), facts).mkdir(parents=True, exist_ok=True)
    wait_s = float(os.environ.get("GPUBATCH_TRT_BUILD_WAIT_S") or DEFAULT_BUILD_WAIT_S)
    with build_lock(folder, wait_s) as held:
        if not held:
            log.warning("the TensorRT engine in %s was still being built after %.0f s (GPUBATCH_TRT_BUILD_WAIT_S); "
                        "building this worker's own, uncached", folder, wait_s)
        options = tensorrt_provider_options(cache_root(), facts, cached=held)
        session = ort.InferenceSession(path, sess_options=sess_options, providers=provider_entries(providers, options))
    return session, facts
