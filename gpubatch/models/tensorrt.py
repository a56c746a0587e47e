"""TensorRT backend: an engine built from the ONNX file, cached on disk, run on a CUDA stream.

Building an engine takes seconds to minutes, so engines (and TensorRT's timing cache, which makes
rebuilds for other shapes or precisions fast) are cached under ``$GPUBATCH_CACHE`` or
``~/.cache/gpubatch/trt``, keyed by the sha256 of everything that makes an engine valid: the model
file's sha256, the GPU, the TensorRT version, the precision and the batch profile. A stale or
corrupt engine is rebuilt, never trusted.

Precision follows the design's decision 1: reduced precision is explicit in the ONNX file.
int8 / fp8 need a QDQ model (``gpubatch`` quantizes with ``quantize_static``), built as a strongly
typed network; INT8 calibrators are never used (deprecated in TensorRT 10.1, removed in 11). fp16 /
bf16 use the builder flag where this TensorRT has it (10.x); TensorRT 11 removed those flags and
builds every network strongly typed, so there the ONNX file itself must carry fp16 / bf16 casts
(e.g. made with modelopt's autocast) and a plain fp32 file stays fp32 (``describe()`` says so).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import tensorrt as trt

from gpubatch.core.errors import GpubatchError
from gpubatch.core.files import file_sha256
from gpubatch.models.base import Model, gpu_name, refuse_unfeedable_input

log = logging.getLogger(__name__)

_LOGGER = trt.Logger(trt.Logger.WARNING)
QUANTIZED = ("int8", "fp8")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
#: IExecutionContext::setTensorAddress: "The pointer must have at least 256-byte alignment."
TENSOR_ALIGNMENT = 256


def cache_dir() -> Path:
    """Where engines and timing caches live; GPUBATCH_CACHE overrides the per-user default."""
    root = os.environ.get("GPUBATCH_CACHE")
    path = Path(root) / "trt" if root else Path.home() / ".cache" / "gpubatch" / "trt"
    path.mkdir(parents=True, exist_ok=True)
    return path


def engine_key(model_sha: str, gpu: str, precision: str, shapes: dict[str, list[list[int]]]) -> str:
    """sha256 over everything that makes a serialized engine valid for this run."""
    payload = {
        "model": model_sha, "gpu": gpu, "tensorrt": trt.__version__,
        "precision": precision, "shapes": shapes,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _onnx_has_qdq(path: str) -> bool:
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    return any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in graph.node)


class TensorRTModel(Model):
    """A TensorRT engine for one ONNX file, with a dynamic batch profile min 1, opt B, max 2B."""

    backend = "tensorrt"

    def __init__(
        self,
        path: str,
        *,
        precision: str = "fp32",
        threads: int | None = None,
        batch_size: int | None = None,
        max_batch_size: int | None = None,
        workspace_mb: int | None = None,
    ):
        super().__init__(path, precision=precision, threads=threads)
        if precision not in PRECISIONS:
            raise GpubatchError(f"tensorrt precision must be one of {PRECISIONS}, not {precision!r}")
        from gpubatch.ops.kernels_gpu import gpu_available

        if not gpu_available():  # TensorRT imports without a GPU, then fails deep in the build
            raise GpubatchError(f"backend tensorrt needs a CUDA device visible to CuPy, and none is here "
                                f"(or CuPy is not installed: pip install 'gpubatch[gpu]'); {path} can run "
                                "with backend onnxruntime on the CPU")
        import cupy

        self._cupy = cupy
        self.batch_size = int(batch_size or os.environ.get("GPUBATCH_TRT_BATCH") or 64)
        self.max_batch_size = int(max_batch_size or 2 * self.batch_size)
        self.workspace_mb = workspace_mb or int(os.environ.get("GPUBATCH_TRT_WORKSPACE_MB", 0)) or None
        self.notes: list[str] = []
        self.cache_hit = False
        self.engine, self.engine_path = self._load_or_build()
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._dtypes = {n: tensor_dtype(self.engine.get_tensor_dtype(n), n, path, n in self._inputs) for n in names}
        self._buffers: dict[str, Any] = {}
        self._stream = cupy.cuda.Stream(non_blocking=True)
        self._lock = threading.Lock()

    @classmethod
    def available(cls) -> bool:
        """True only with a visible CUDA device (TensorRT imports fine on GPU-less machines)."""
        from gpubatch.ops.kernels_gpu import gpu_available

        return gpu_available()

    @property
    def input_name(self) -> str:
        return self._inputs[0]

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    @property
    def device(self) -> str:
        return "cuda"

    @property
    def input_dtype(self) -> np.dtype:
        return self._dtypes[self.input_name]

    runs_on_stream = True

    def supports_device(self) -> bool:
        return True

    # -- build and cache -------------------------------------------------------------------

    def _load_or_build(self) -> tuple[Any, Path]:
        """Deserialize the cached engine for this key, or build, serialize and cache a new one."""
        network_parts = self._parse()
        shapes = self._profile_shapes(network_parts[1])
        key = engine_key(file_sha256(self.path), gpu_name(), self.precision, shapes)
        path = cache_dir() / f"{key}.engine"
        runtime = self._runtime = trt.Runtime(_LOGGER)  # must outlive the engine it deserializes
        if path.exists():
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is not None:
                self.cache_hit = True
                self._set_precision(None)
                return engine, path
            log.warning("cached TensorRT engine %s did not load; rebuilding", path)
        plan = self._build(*network_parts, shapes)
        _atomic_write(path, plan)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise GpubatchError(f"TensorRT built an engine for {self.path} that does not deserialize")
        return engine, path

    def _network_flags(self) -> int:
        """Strongly typed where the precision lives in the ONNX file (QDQ) or where TRT needs it."""
        flags = 0
        strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        wants_typed = self.precision in QUANTIZED or not hasattr(trt.BuilderFlag, "FP16")
        if strongly is not None and wants_typed:
            flags |= 1 << int(strongly)
        return flags

    def _parse(self) -> tuple[Any, Any, Any, Any]:
        """Builder, network, parser, config for the ONNX file (kept together: TRT needs them alive)."""
        if self.precision in QUANTIZED and not _onnx_has_qdq(self.path):
            raise GpubatchError(
                f"precision {self.precision} needs an explicitly quantized (QDQ) ONNX model; "
                f"{self.path} has no QuantizeLinear/DequantizeLinear nodes and calibrators are not used"
            )
        builder = trt.Builder(_LOGGER)
        network = builder.create_network(self._network_flags())
        parser = trt.OnnxParser(network, _LOGGER)
        if not parser.parse_from_file(self.path):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise GpubatchError(f"TensorRT could not parse {self.path}: {errors}")
        return builder, network, parser, builder.create_builder_config()

    def _profile_shapes(self, network: Any) -> dict[str, list[list[int]]]:
        """min/opt/max per input: batch 1 / batch_size / max_batch_size; other dims must be static."""
        shapes: dict[str, list[list[int]]] = {}
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            dims = list(tensor.shape)
            if any(d < 0 for d in dims[1:]):
                raise GpubatchError(
                    f"input {tensor.name!r} of {self.path} has dynamic non-batch dims {dims}; "
                    "export the model with fixed item shape"
                )
            if dims and dims[0] >= 0:  # static batch: the engine runs exactly that batch
                shapes[tensor.name] = [dims, dims, dims]
                continue
            rest = dims[1:]
            shapes[tensor.name] = [[1, *rest], [self.batch_size, *rest], [self.max_batch_size, *rest]]
        return shapes

    def _set_precision(self, config: Any | None) -> None:
        """Builder flags for fp16/bf16 where TRT still has them; note what happens where it doesn't.

        ``config`` is None for a cached engine: only the notes are recorded then.
        """
        if self.precision in ("fp16", "bf16"):
            flag = getattr(trt.BuilderFlag, self.precision.upper(), None)
            if flag is not None:
                if config is not None:
                    config.set_flag(flag)
            else:
                self.notes.append(
                    f"TensorRT {trt.__version__} has no {self.precision.upper()} builder flag: the "
                    "network is strongly typed, so the ONNX file's own types decide the precision"
                )
        elif self.precision in QUANTIZED:
            self.notes.append("explicit quantization from the QDQ ONNX model; no calibrator")

    def _build(self, builder: Any, network: Any, parser: Any, config: Any, shapes: dict) -> bytes:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        if self.workspace_mb:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.workspace_mb) << 20)
        self._set_precision(config)
        tag = hashlib.sha256((gpu_name() + trt.__version__).encode()).hexdigest()[:16]
        timing_path = cache_dir() / f"timing-{tag}.cache"
        blob = timing_path.read_bytes() if timing_path.exists() else b""
        timing = config.create_timing_cache(blob)
        config.set_timing_cache(timing, False)
        log.info("building TensorRT %s engine for %s (profile %s)", self.precision, self.path, shapes)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise GpubatchError(f"TensorRT failed to build an engine for {self.path} ({self.precision})")
        _atomic_write(timing_path, bytes(memoryview(config.get_timing_cache().serialize())))
        return bytes(memoryview(plan))

    # -- run -------------------------------------------------------------------------------

    def _output_buffer(self, name: str, shape: tuple[int, ...]) -> Any:
        """Reused device buffer per output (grown on demand): no allocation per batch."""
        dtype = self._dtypes[name]
        size = int(np.prod(shape))
        buf = self._buffers.get(name)
        if buf is None or buf.size < size:
            buf = self._buffers[name] = self._cupy.empty((max(size, 1),), dtype=dtype)
        return buf[:size].reshape(shape)

    def _execute(self, x: Any, stream: Any) -> dict[str, Any]:
        name = self.input_name
        x = _aligned(self._cupy.ascontiguousarray(x.astype(self.input_dtype, copy=False)))
        _set_input_shape(self.context, name, tuple(x.shape), self.path)
        self._address(name, x)
        outputs = {}
        for out in self._outputs:
            buf = self._output_buffer(out, tuple(self.context.get_tensor_shape(out)))
            self._address(out, buf)
            outputs[out] = buf
        if not self.context.execute_async_v3(stream.ptr):
            raise GpubatchError(f"TensorRT execution failed for {self.path}")
        return outputs

    def _address(self, name: str, arr: Any) -> None:
        if not self.context.set_tensor_address(name, int(arr.data.ptr)):
            raise GpubatchError(f"TensorRT refused the device address of {name!r} ({self.path})")

    def run_device(self, x: Any, stream: Any | None = None) -> dict[str, Any]:
        """Run a CuPy batch on ``stream`` (asynchronously); outputs are device arrays.

        Outputs live in buffers this model reuses: copy them (on the same stream) before the next
        call. Batches above the profile's max run in chunks and come back concatenated.
        """
        stream = stream or self._cupy.cuda.get_current_stream()
        with self._lock, stream:
            if x.shape[0] <= self.max_batch_size:
                return self._execute(x, stream)
            # a chunk starts mid-array: _execute copies it where its address is not 256-aligned
            parts = []
            for start in range(0, x.shape[0], self.max_batch_size):
                chunk = self._execute(x[start : start + self.max_batch_size], stream)
                parts.append({k: v.copy() for k, v in chunk.items()})
            return {k: self._cupy.concatenate([p[k] for p in parts]) for k in self._outputs}

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Host in, host out (uploads, runs on the model's stream, downloads)."""
        cp = self._cupy
        with self._stream:
            x = cp.asarray(np.ascontiguousarray(batch))
            out = self.run_device(x, self._stream)
            host = {k: cp.asnumpy(v, stream=self._stream) for k, v in out.items()}
        self._stream.synchronize()
        return host

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update({
            "tensorrt": trt.__version__, "engine": str(self.engine_path), "cache_hit": self.cache_hit,
            "batch_profile": [1, self.batch_size, self.max_batch_size], "notes": list(self.notes),
        })
        return info


#: numpy's names for the TensorRT types it has none of (trt.nptype raises a bare TypeError for them)
TRT_ELEMENTS = {"BF16": "bfloat16", "FP8": "float8e4m3fn", "INT4": "int4", "FP4": "float4e2m1fn"}


def tensor_dtype(dtype: Any, name: str, path: str, is_input: bool) -> np.dtype:
    """numpy's dtype of an engine tensor; one numpy has no type for (a bf16 input, which died on
    ``TypeError: Could not resolve TensorRT datatype`` at the first batch) is refused at load,
    naming the tensor and the fix."""
    try:
        return np.dtype(trt.nptype(dtype))
    except TypeError:
        element = TRT_ELEMENTS.get(getattr(dtype, "name", str(dtype).rsplit(".", 1)[-1]), str(dtype))
    if is_input:
        refuse_unfeedable_input(path, name, element)
    fix = "export the model with a float32 input" if is_input else "end the model with a Cast to float32"
    raise GpubatchError(f"{path}: the model's {'input' if is_input else 'output'} {name!r} is {element}, "
                        f"which numpy has no type for; {fix}")


def _aligned(x: Any) -> Any:
    """``x``, or a copy of it where its address is not 256-byte aligned as TensorRT requires of a
    tensor address (a chunk of a larger batch starts wherever its first item does)."""
    return x if int(x.data.ptr) % TENSOR_ALIGNMENT == 0 else x.copy()


def _set_input_shape(context: Any, name: str, shape: tuple[int, ...], path: str) -> None:
    """``set_input_shape``, which returns False (and only logs) for a shape outside the engine's
    profile, e.g. a batch other than a static-batch ONNX file's: say so instead of letting
    ``execute_async_v3`` fail without a reason."""
    if not context.set_input_shape(name, shape):
        raise GpubatchError(f"TensorRT refused input shape {list(shape)} for {name!r} of {path}: outside "
                            "the engine's profile (a static batch in the ONNX file runs only that batch; "
                            "export it with a dynamic batch axis)")
