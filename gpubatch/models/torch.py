"""PyTorch backend: TorchScript (``.pt``/``.ts``, ``torch.jit.load``) or ExportedProgram (``.pt2``).

For users whose model exists only as PyTorch, and for checking an ONNX export against its source.
Runs on CUDA when a device is present (``GPUBATCH_TORCH_DEVICE`` overrides), else on CPU, under
``torch.inference_mode``. ``fp16`` and ``bf16`` run under ``torch.autocast`` (weights stay fp32,
matmuls and convolutions run in 16 bits; normalisations stay fp32, which is what keeps autocast
accurate where a blanket ``.half()`` is not). The float32 batch is cast to the dtype the module's input
takes (:func:`load_module`): a float64 module is fed it widened, exactly, and computes in float64,
which autocast leaves alone, so fp16/bf16 are refused for it (:func:`precision_problem`). int8/fp8
are not offered here: quantization in gpubatch is explicit QDQ in ONNX (see quantize.py), which
torch modules are not.

Output names: a tensor output is ``output``; a tuple gives ``output_0``, ``output_1``, ...; a dict
keeps its keys. Until the first batch has run they are taken from the ExportedProgram signature,
or assumed to be ``["output"]`` for TorchScript.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch

from gpubatch.core.errors import GpubatchError
from gpubatch.models.base import Model

log = logging.getLogger("gpubatch")

SUPPORTED_PRECISIONS = ("fp32", "fp16", "bf16")


def _pick_device() -> str:
    wanted = os.environ.get("GPUBATCH_TORCH_DEVICE")
    if wanted:
        # torch.jit.load(map_location="cuda") without a device raises a RuntimeError that
        # load_module would report as "not a TorchScript file"
        if wanted.startswith("cuda") and not torch.cuda.is_available():
            raise GpubatchError(f"GPUBATCH_TORCH_DEVICE={wanted} but torch sees no CUDA device "
                                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
                                "unset it to run on the CPU")
        return wanted
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_module(path: str, device: str) -> tuple[Any, list[str] | None, torch.dtype]:
    """The callable module, for an ExportedProgram its declared output names, and the dtype its
    input takes (:func:`scripted_input_dtype`, :func:`exported_input_dtype`)."""
    if path.endswith(".pt2"):
        try:
            program = torch.export.load(path)
        except Exception as exc:  # noqa: BLE001 - torch's errors for a file it cannot read are many
            words = " ".join(str(exc).split())[:300]
            raise GpubatchError(f"{path}: not an ExportedProgram torch can load ({type(exc).__name__}: {words}); "
                                "save it with torch.export.save") from None
        names = [str(spec.arg.name) for spec in program.graph_signature.output_specs
                 if spec.kind.name == "USER_OUTPUT"]
        return program.module().to(device), names or None, exported_input_dtype(path, program)
    try:
        module = torch.jit.load(path, map_location=device).eval()
    except RuntimeError as exc:
        raise GpubatchError(f"{path}: not a TorchScript file ({exc}); save with torch.jit.save, or "
                            "export with torch.export.save to a .pt2 file") from None
    return module, None, scripted_input_dtype(module, path)


#: the dtypes a module's input may take: the float32 batch gpubatch makes is cast to it as it is
#: fed (float64: widened, exact; float16/bfloat16: the module's own precision). Fed float32 as it
#: was, a float64 module failed every batch on a dtype mismatch after validate passed it.
FEEDABLE = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


#: the operators whose weight fixes the dtype their input must have: a float32 input to a float64
#: convolution, linear layer or normalisation fails, where elementwise arithmetic with a parameter
#: promotes instead
WEIGHTED_OPS = frozenset({
    "aten::_convolution", "aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::conv_transpose1d",
    "aten::conv_transpose2d", "aten::conv_transpose3d", "aten::linear", "aten::addmm", "aten::mm",
    "aten::matmul", "aten::bmm", "aten::einsum", "aten::batch_norm", "aten::layer_norm",
    "aten::group_norm", "aten::instance_norm",
})


def scripted_input_dtype(module: Any, path: str) -> torch.dtype:
    """What a TorchScript module's input must be. Its graph does not type the input, so: the dtype
    of the weight of the first convolution, linear layer or normalisation its forward runs (in
    graph order, control flow included); failing that, the dtype all its floating parameters and
    buffers share; float32 where it has none (it computes in whatever it is fed) or where they
    differ (said in a warning). The first registered parameter, which this used to be, was wrong
    for a module whose first parameter is a float64 scalar (a temperature) beside float32 layers:
    every batch was fed float64 and failed in the first convolution."""
    first = first_weighted_op(module)
    if first is not None:
        return first[1].dtype
    dtypes = {t.dtype for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()}
    if len(dtypes) == 1:
        return dtypes.pop()
    if dtypes:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        log.warning("%s: no convolution, linear layer or normalisation in its forward says which dtype its "
                    "input takes, and its parameters are of several (%s): feeding float32; export it with "
                    "torch.export (.pt2), whose signature records the input's dtype", path, names)
    return torch.float32


def first_weighted_op(module: Any) -> tuple[str, torch.Tensor] | None:
    """The first convolution, linear layer or normalisation a TorchScript module's forward runs
    (in graph order, control flow included), as (operator, its weight): it fixes the input's dtype,
    and a head's feature width. None where the graph runs none on a weight of the module's own."""
    try:
        graph = module.inlined_graph
    except (AttributeError, RuntimeError):  # no forward to read
        return None
    this = next(graph.inputs())
    for node in _walk(graph.block()):
        if node.kind() in WEIGHTED_OPS:
            weight = next((t for t in (_attribute(module, this, v) for v in node.inputs()) if t is not None), None)
            if weight is not None:
                return node.kind(), weight
    return None


def _walk(block: Any) -> Any:
    """A graph block's nodes in order, each followed by the nodes of its own blocks (if, loop)."""
    for node in block.nodes():
        yield node
        for inner in node.blocks():
            yield from _walk(inner)


def _attribute(module: Any, this: Any, value: Any) -> torch.Tensor | None:
    """The floating tensor ``value`` is, where it is an attribute of the module (a chain of
    ``prim::GetAttr`` from the graph's ``self``), else None."""
    names = []
    while value.node().kind() == "prim::GetAttr":
        names.append(value.node().s("name"))
        value = value.node().input()
    if value is not this or not names:
        return None
    found = module
    for name in reversed(names):
        found = getattr(found, name, None)
    return found if isinstance(found, torch.Tensor) and found.is_floating_point() else None


def exported_input_dtype(path: str, program: Any) -> torch.dtype:
    """The dtype an ExportedProgram's one input was exported with (its signature records it);
    refused at load, with the fix, where gpubatch cannot feed it: several inputs, or one that
    is not floating-point."""
    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    inputs = [spec.arg.name for spec in program.graph_signature.input_specs if spec.kind.name == "USER_INPUT"]
    if len(inputs) != 1:
        raise GpubatchError(f"{path} takes {len(inputs)} inputs ({', '.join(inputs)}), but gpubatch feeds one "
                            "batch; export the module with one tensor input")
    value = placeholders[inputs[0]].meta.get("val")
    dtype: torch.dtype = getattr(value, "dtype", torch.float32)
    if dtype not in FEEDABLE:
        raise GpubatchError(f"{path}: the module's input {inputs[0]!r} takes {str(dtype).removeprefix('torch.')}, "
                            "but gpubatch feeds floating-point batches; export it with a float32 (or float64, "
                            "float16, bfloat16) input, converting inside the module if its first layer needs to")
    return dtype


#: what a module saved in a dtype other than float32 computes in, whatever autocast asks
SAVED_PRECISION = {torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}


def precision_problem(path: str, dtype: torch.dtype, precision: str) -> str | None:
    """Why ``precision`` cannot be had for a module whose input is ``dtype``: autocast casts float32
    only, so a float64 module under fp16/bf16 would run in float64 (a bfloat16 one under fp16 in
    bfloat16) and its report say the precision asked. None where it can, a module saved in the
    16 bits asked for included (it runs in them as loaded)."""
    own = SAVED_PRECISION.get(dtype)
    if precision not in ("fp16", "bf16") or own in (None, precision):
        return None
    name = str(dtype).removeprefix("torch.")
    return (f"precision {precision} runs torch.autocast, which leaves {name} arithmetic in {name}, and "
            f"{path} is a {name} module (its input takes {name}): it would run in {name} under the "
            f"name {precision}. Set model.precision: fp32 (it then runs in {own}, as saved), or save the "
            f"module in float32 (module.float()) to run it in {precision}")


def computed_precision(dtype: torch.dtype, precision: str) -> str:
    """What a module whose input is ``dtype`` computes in at ``precision``, as reports name it:
    ``fp64`` for a float64 module whatever is asked (autocast leaves float64 alone), a float16 or
    bfloat16 module's own 16 bits at fp32; else ``precision``. A float64 module's report said fp32."""
    if dtype == torch.float64:
        return "fp64"
    return SAVED_PRECISION.get(dtype, precision) if precision == "fp32" else precision


def _host(value: Any) -> np.ndarray:
    """An output as numpy: float64 kept (a float64 module's outputs, as ONNX Runtime keeps a
    double model's), 16-bit floats as float32 (numpy has no bfloat16)."""
    value = value.detach()
    return (value if value.dtype == torch.float64 else value.float()).cpu().numpy()


def _named(out: Any) -> dict[str, Any]:
    if isinstance(out, dict):
        return {str(k): v for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return {f"output_{i}": v for i, v in enumerate(out)}
    return {"output": out}


class TorchModel(Model):
    backend = "torch"

    def __init__(self, path: str, *, precision: str = "fp32", threads: int | None = None):
        super().__init__(path, precision=precision, threads=threads)
        if precision not in SUPPORTED_PRECISIONS:
            raise GpubatchError(f"the torch backend runs {', '.join(SUPPORTED_PRECISIONS)}, not {precision}: "
                                "int8/fp8 are explicit QDQ ONNX models (export to ONNX and use "
                                "backend onnxruntime or tensorrt)")
        if threads:
            torch.set_num_threads(threads)
        self._device = _pick_device()
        self.module, declared, self.feed_dtype = load_module(path, self._device)
        reason = precision_problem(path, self.feed_dtype, precision)
        if reason:  # what runs is what the report names: never float64 under the name fp16
            raise GpubatchError(reason)
        self._names = ["output"] if not declared or len(declared) == 1 else [f"output_{i}" for i in range(len(declared))]

    @classmethod
    def available(cls) -> bool:
        """torch imports (it did, to get here); CPU always works, so the backend is usable."""
        return True

    @property
    def input_name(self) -> str:
        return "input"

    @property
    def computes_in(self) -> str:
        return computed_precision(self.feed_dtype, self.precision)

    @property
    def output_names(self) -> list[str]:
        return list(self._names)

    @property
    def device(self) -> str:
        return self._device

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self._device, self.feed_dtype)
        device_type = "cuda" if self._device.startswith("cuda") else "cpu"
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        with torch.inference_mode(), torch.autocast(device_type, dtype=dtype, enabled=self.precision != "fp32"):
            out = _named(self.module(x))
        self._names = list(out)
        return {k: _host(v) for k, v in out.items()}
