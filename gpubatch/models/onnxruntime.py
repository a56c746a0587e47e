"""ONNX Runtime backend: CPU provider here; CUDA and TensorRT execution providers when present.

On a CUDA provider the engine hands a device array straight to the session through IO binding
(:meth:`OnnxRuntimeModel.run_device`): bound by pointer, no host copy of the input.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np
import onnxruntime as ort

from gpubatch.core.files import cache_root
from gpubatch.models.base import Model, refuse_unfeedable_input
from gpubatch.models.ort_tensorrt import TRT_EP, EngineFacts, engine_cache_dir, open_trt_session

#: the providers that run on a CUDA device and take device memory through IO binding ("cuda")
CUDA_PROVIDERS = (TRT_EP, "CUDAExecutionProvider")


def load_provider_libraries(providers: list[str]) -> None:
    """Load what the CUDA providers link, from the gpu extra's wheels, before a session asks.

    The TensorRT provider links libnvinfer.so.10, which the tensorrt wheel keeps in its own folder
    (tensorrt_libs), off the loader's path: ``import tensorrt`` loads it, and the provider then
    finds it loaded. Without it the session printed "libnvinfer.so.10: cannot open shared object
    file" and fell back to the CUDA provider. The CUDA provider needs cuDNN 9 and the CUDA 12
    libraries, which onnxruntime-gpu's ``[cuda,cudnn]`` extras install as nvidia-* wheels and its
    ``preload_dlls`` (1.21+) loads from their folders, as ONNX Runtime's docs say to; without them
    the session fell back to the CPU provider.
    """
    if not any(p in CUDA_PROVIDERS for p in providers):
        return
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        preload()
    if TRT_EP in providers:
        with contextlib.suppress(ImportError):
            import tensorrt  # noqa: F401


def _providers() -> list[str]:
    available = ort.get_available_providers()
    wanted = [TRT_EP, "CUDAExecutionProvider", "CPUExecutionProvider"]
    if os.environ.get("GPUBATCH_ORT_PROVIDERS"):
        wanted = os.environ["GPUBATCH_ORT_PROVIDERS"].split(",")
    return [p for p in wanted if p in available] or ["CPUExecutionProvider"]


def ort_element(type_name: str) -> str:
    """numpy's name for ONNX Runtime's 'tensor(float)', 'tensor(bfloat16)': 'float32', 'bfloat16'."""
    element = type_name.removeprefix("tensor(").removesuffix(")")
    return {"float": "float32", "double": "float64"}.get(element, element)


#: input types fed from a batch of another type: the preprocessing kernels (the host twin's and
#: the CUDA ones) write float32 and float16 only, and a float64 input is fed their float32 batch
#: widened, which is exact. Fed float32 as it was, a float64 model failed every batch ("Unexpected
#: input data type. Actual: (tensor(float)), expected: (tensor(double))") after validate passed it.
WIDENED_FROM = {"float64": np.dtype(np.float32)}


class OnnxRuntimeModel(Model):
    backend = "onnxruntime"

    def __init__(self, path: str, *, precision: str = "fp32", threads: int | None = None):
        super().__init__(path, precision=precision, threads=threads)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        # Reader threads decode beside the model on the same cores: idle ORT threads must sleep,
        # not spin, or they burn the CPU the decoders need.
        opts.add_session_config_entry("session.intra_op.allow_spinning", os.environ.get("GPUBATCH_ORT_SPIN", "0"))
        # The memory pattern is one block per run that ONNX Runtime reserves outside its arena and
        # frees after the run: tens of MB mapped and faulted in on every batch, and a worker's
        # peak memory then depends on what else happens to run beside it. Without it activations
        # come from the arena, sized once by the warm-up batch and reused.
        opts.enable_mem_pattern = False
        providers = _providers()
        load_provider_libraries(providers)
        #: what the TensorRT provider's engine is built for (None off that provider)
        self.trt_facts: EngineFacts | None = None
        if providers[0] == TRT_EP:
            self.session, self.trt_facts = open_trt_session(path, opts, providers, precision)
        else:
            self.session = ort.InferenceSession(path, sess_options=opts, providers=providers)
        self._input = self.session.get_inputs()[0]
        refuse_unfeedable_input(path, self._input.name, ort_element(self._input.type))
        element = ort_element(self._input.type)
        #: the element type the session takes (float64 for a double input); run casts to it
        self.feed_dtype = np.dtype(element) if element in ("float16", "float64") else np.dtype(np.float32)
        self._outputs = [o.name for o in self.session.get_outputs()]

    @property
    def max_batch(self) -> int | None:
        """The largest batch one call runs: the TensorRT provider's profile's (None: no limit)."""
        facts = self.trt_facts
        return facts.max_batch_size if facts is not None and facts.has_profile else None

    @property
    def input_name(self) -> str:
        return self._input.name

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    @property
    def device(self) -> str:
        return "cuda" if self.session.get_providers()[0] in CUDA_PROVIDERS else "cpu"

    @property
    def input_dtype(self) -> np.dtype:
        """What preprocessing makes for this model: its input's type, or the type that input is
        widened from as it is fed (float32 for a float64 input, :data:`WIDENED_FROM`)."""
        return WIDENED_FROM.get(self.feed_dtype.name, self.feed_dtype)

    def supports_device(self) -> bool:
        return self.device == "cuda"

    def run_device(self, x: Any, stream: Any) -> dict[str, Any]:
        """Run a CuPy batch through IO binding; outputs are CuPy views of ORT's device tensors.

        ORT runs on a stream of its own, so the preprocessed input must be complete first, and the
        outputs are finished when this returns (``runs_on_stream`` is False).
        """
        if not self.supports_device():
            raise NotImplementedError(f"ONNX Runtime runs {self.path} on {self.session.get_providers()[0]}: "
                                      "host arrays only (Model.run)")
        if x.dtype != self.feed_dtype or not x.flags.c_contiguous:  # bound by pointer: C order, its type
            with stream:
                x = x.astype(self.feed_dtype, order="C")
        stream.synchronize()
        if self.max_batch and x.shape[0] > self.max_batch:  # beyond the TensorRT profile: in chunks
            import cupy

            # a chunk starts mid-array: copied, so that its address is aligned as TensorRT needs
            parts = [self._bound_run(x[i : i + self.max_batch] if i == 0 else x[i : i + self.max_batch].copy())
                     for i in range(0, x.shape[0], self.max_batch)]
            return {n: cupy.concatenate([p[n] for p in parts]) for n in self._outputs}
        return self._bound_run(x)

    def _bound_run(self, x: Any) -> dict[str, Any]:
        """One IO-bound run of a C-ordered device batch of the input's type."""
        binding = self.session.io_binding()
        binding.bind_input(
            name=self.input_name, device_type="cuda", device_id=int(x.device.id),
            element_type=x.dtype.type, shape=tuple(x.shape), buffer_ptr=int(x.data.ptr),
        )
        for name in self._outputs:
            binding.bind_output(name, "cuda", int(x.device.id))
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        values = binding.get_outputs()
        return {n: _wrap_ortvalue(v, int(x.device.id)) for n, v in zip(self._outputs, values, strict=True)}

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if batch.dtype != self.feed_dtype:
            batch = batch.astype(self.feed_dtype)
        if self.max_batch and len(batch) > self.max_batch:  # beyond the TensorRT profile: in chunks
            parts = [self.run(batch[i : i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
            return {n: np.concatenate([p[n] for p in parts]) for n in self._outputs}
        results = self.session.run(self._outputs, {self._input.name: batch})
        return dict(zip(self._outputs, results, strict=True))

    def describe(self) -> dict:
        info = super().describe()
        info["providers"] = self.session.get_providers()
        facts = self.trt_facts
        if facts is not None:
            info["engine_cache"] = str(engine_cache_dir(cache_root(), facts))
            info["batch_profile"] = [1, facts.batch_size, facts.max_batch_size] if facts.has_profile else None
        return info


def _wrap_ortvalue(value: Any, device_id: int) -> Any:
    """A CuPy view of an ORT device tensor (no copy); the view keeps the OrtValue alive. The device
    is given, not looked up from the pointer: an empty output's pointer may be null."""
    import cupy
    from onnx.helper import tensor_dtype_to_np_dtype

    dtype = np.dtype(tensor_dtype_to_np_dtype(value.element_type()))
    shape = tuple(value.shape())
    nbytes = int(np.prod(shape)) * dtype.itemsize
    mem = cupy.cuda.UnownedMemory(int(value.data_ptr()), nbytes, owner=value, device_id=device_id)
    return cupy.ndarray(shape, dtype=dtype, memptr=cupy.cuda.MemoryPointer(mem, 0))
