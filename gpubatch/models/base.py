"""The Model interface and a lazy registry of backends by name.

A backend implements three things: open a model file, run a batch, and describe itself. Sessions
are expensive (graph optimisation, engine builds), so ``get_model`` keeps one per worker process
per (file, backend, precision, threads) and every shard on that worker reuses it.
"""

from __future__ import annotations

import importlib
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpubatch.core.errors import GpubatchError, MissingExtraError
from gpubatch.core.files import file_sha256


class Model(ABC):
    """A loaded model, ready to run batches of float input."""

    backend: str = ""
    precision: str = "fp32"

    def __init__(self, path: str, *, precision: str = "fp32", threads: int | None = None):
        self.path = path
        self.precision = precision
        self.threads = threads

    @property
    @abstractmethod
    def input_name(self) -> str:
        """Name of the first input, which receives the batch."""

    @property
    @abstractmethod
    def output_names(self) -> list[str]:
        """Names of the outputs, in the order the model declares them."""

    @abstractmethod
    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch; returns each output as a host array with the batch as first axis."""

    @property
    def device(self) -> str:
        """Where the model runs: ``cpu`` or ``cuda``."""
        return "cpu"

    @property
    def computes_in(self) -> str:
        """The precision the model computes in, as reports name it: its own, unless its backend
        knows better (a float64 torch module computes in ``fp64`` whatever it was loaded as)."""
        return self.precision

    @property
    def input_dtype(self) -> np.dtype:
        """The element type preprocessing produces for the model's first input: the input's own
        type, or one its backend widens exactly as it feeds it (ONNX Runtime's float64 inputs)."""
        return np.dtype(np.float32)

    #: whether ``run_device`` enqueues its work on the stream it is given (TensorRT), so that its
    #: time is measured with CUDA events; False when it runs on a stream of its own and returns
    #: finished outputs (ONNX Runtime with IO binding)
    runs_on_stream: bool = False

    def supports_device(self) -> bool:
        """True when :meth:`run_device` can take a device (CuPy) array for this loaded model."""
        return False

    def run_device(self, x: Any, stream: Any) -> dict[str, Any]:
        """Run a batch that already lives on the GPU; outputs stay on the GPU.

        Backends that cannot (the CPU ones) keep this default, and the engine feeds them host
        arrays through :meth:`run` instead.
        """
        raise NotImplementedError(f"backend {self.backend!r} runs host arrays only (Model.run)")

    @classmethod
    def available(cls) -> bool:
        """True when this backend can run on this machine (package present, device visible)."""
        return True

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "precision": self.precision,
            "device": self.device,
            "path": self.path,
            "sha256": file_sha256(self.path),
            "threads": self.threads,
        }


def numpy_has_no_type(element: str) -> bool:
    """Whether numpy lacks the element type ONNX calls ``element`` (numpy's spelling of the rest:
    'bfloat16', 'float8e4m3fn', 'int4'): no array of it can be made, fed or read back."""
    return element == "bfloat16" or element.startswith(("float8", "float4")) or element in ("int4", "uint4")


def unfeedable_input_words(name: str, element: str) -> str:
    """Why an input of a type numpy lacks cannot be fed, and the fix. Neither ONNX Runtime's feed
    nor TensorRT's buffers can be filled with bfloat16 from the float batches gpubatch makes: a
    bf16 input died on a bare TypeError (TensorRT) or on INVALID_ARGUMENT at every batch (ONNX
    Runtime)."""
    torch = ", or run the PyTorch model with backend torch and precision bf16" if element == "bfloat16" else ""
    return (f"the model's input {name!r} takes {element}, which numpy has no type for, so gpubatch cannot "
            f"feed it; export the model with a float32 (or float16) input and a Cast to {element} after it "
            f"(the weights and the arithmetic stay {element}){torch}")


def refuse_unfeedable_input(path: str, name: str, element: str) -> None:
    """Refuse at load, naming the input and the fix, an input of a type numpy lacks."""
    if numpy_has_no_type(element):
        raise GpubatchError(f"{path}: {unfeedable_input_words(name, element)}")


class OutputRowsError(GpubatchError):
    """A model output without one row per input row."""


def check_output_rows(outputs: dict[str, Any], rows: int) -> None:
    """Every output has one row per input row (the first dimension is the batch): the run writes
    row i as item i's prediction. A model whose output kept a fixed number of rows (exported with
    a traced batch of 8, say) died in the writer on pyarrow's ArrowInvalid, each input
    quarantined for a mismatch no message named."""
    for name, values in outputs.items():
        shape = tuple(np.shape(values))
        if not shape or shape[0] != rows:
            got = f"{shape[0]} rows" if shape else "no rows (a scalar)"
            raise OutputRowsError(
                f"output {name!r} has {got} for a batch of {rows} (shape {shape}): its first dimension must "
                "be the batch, one row per input row; export the model with a dynamic batch axis "
                "(torch.onnx.export's dynamic_axes), or set model.batch_size to the batch it was exported with")


@dataclass(frozen=True)
class BackendEntry:
    module: str
    cls: str
    package: str
    extra: str


BACKENDS: dict[str, BackendEntry] = {
    "onnxruntime": BackendEntry("gpubatch.models.onnxruntime", "OnnxRuntimeModel", "onnxruntime", "gpu"),
    "tensorrt": BackendEntry("gpubatch.models.tensorrt", "TensorRTModel", "tensorrt", "gpu"),
    "torch": BackendEntry("gpubatch.models.torch", "TorchModel", "torch", "torch"),
}


def register_backend(name: str, entry: BackendEntry) -> None:
    BACKENDS[name] = entry


def backend_class(name: str) -> type[Model]:
    """Import a backend by name; a missing package names the extra that installs it."""
    try:
        entry = BACKENDS[name]
    except KeyError:
        raise GpubatchError(f"unknown model backend {name!r}; known: {sorted(BACKENDS)}") from None
    try:
        importlib.import_module(entry.package)
    except ImportError:
        raise MissingExtraError(f"model backend '{name}'", entry.package, entry.extra) from None
    module = importlib.import_module(entry.module)
    return getattr(module, entry.cls)


def backend_available(name: str) -> bool:
    try:
        cls = backend_class(name)
    except (ImportError, GpubatchError):
        return False
    return cls.available()


def resolve_backend(name: str, path: str) -> str:
    """``auto`` picks the fastest backend that is installed and has a device for this file."""
    if name != "auto":
        return name
    if path.endswith((".pt", ".pt2", ".ts")):
        return "torch"
    for candidate in ("tensorrt", "onnxruntime"):
        if backend_available(candidate):
            return candidate
    raise MissingExtraError("model backend 'auto'", "onnxruntime", "gpu")


#: the model sessions a process keeps warm, most recently used last. A run asks for up to three
#: (its model, the fp32 fallback, a slide head); a process that runs many jobs (a script calling
#: gpubatch.run in a loop over models, a long-lived Dask worker) kept every model it ever loaded,
#: each with its weights and runtime arena, and every version of a model file written over.
MAX_SESSIONS = 4
_SESSIONS: OrderedDict[tuple[Any, ...], Model] = OrderedDict()
_SESSIONS_LOCK = threading.Lock()
SESSIONS_CREATED = {"count": 0}


def get_model(path: str, backend: str = "auto", precision: str = "fp32", threads: int | None = None) -> Model:
    """The process-wide model session for this file and settings, created on first use; the least
    recently used beyond :data:`MAX_SESSIONS` is let go (a shard still running it keeps it)."""
    name = resolve_backend(backend, path)
    key = (path, file_sha256(path), name, precision, threads)
    with _SESSIONS_LOCK:
        model = _SESSIONS.get(key)
        if model is not None:
            _SESSIONS.move_to_end(key)
            return model
        model = backend_class(name)(path, precision=precision, threads=threads)
        _SESSIONS[key] = model
        SESSIONS_CREATED["count"] += 1
        while len(_SESSIONS) > MAX_SESSIONS:
            _SESSIONS.popitem(last=False)
        return model


def gpu_name() -> str:
    """The current CUDA device's name, through whichever of CuPy and torch is installed (cache
    keys name it: an engine or a tuning is the GPU's own); "unknown GPU" where neither says."""
    try:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice())
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001 - no CuPy, or no device it sees: ask torch
        pass
    try:
        import torch

        return str(torch.cuda.get_device_name())
    except Exception:  # noqa: BLE001 - neither knows: the key says so rather than failing the run
        return "unknown GPU"
