"""PyTorch backend: TorchScript (``.pt``/``.ts``, ``torch.jit.load``) or ExportedProgram (``.pt2``).

For users whose model exists only as PyTorch, and for checking an ONNX export against its source.
Runs on CUDA when a device is present (``GPUBATCH_TORCH_DEVICE`` overrides), else on CPU, under
``torch.inference_mode``. ``fp16`` and ``bf16`` run under ``torch.autocast`` (weights stay fp32,
matmuls and convolutions run in 16 bits; normalisations stay fp32, which is what keeps autocast
accurate where a blanket ``.half()`` is not). int8/fp8 are not offered here: quantization in gpubatch
is explicit QDQ in ONNX (see quantize.py), which torch modules are not.

Output names: a tensor output is ``output``; a tuple gives ``output_0``, ``output_1``, ...; a dict
keeps its keys. Until the first batch has run they are taken from the ExportedProgram signature,
or assumed to be ``["output"]`` for TorchScript.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from gpubatch.core.errors import GpubatchError
from gpubatch.models.base import Model

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


def load_module(path: str, device: str) -> tuple[Any, list[str] | None]:
    """The callable module and, for an ExportedProgram, its declared output names."""
    if path.endswith(".pt2"):
        program = torch.export.load(path)
        names = [str(spec.arg.name) for spec in program.graph_signature.output_specs
                 if spec.kind.name == "USER_OUTPUT"]
        return program.module().to(device), names or None
    try:
        return torch.jit.load(path, map_location=device).eval(), None
    except RuntimeError as exc:
        raise GpubatchError(f"{path}: not a TorchScript file ({exc}); save with torch.jit.save, or "
                            "export with torch.export.save to a .pt2 file") from None


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
        self.module, declared = load_module(path, self._device)
        self._names = ["output"] if not declared or len(declared) == 1 else [f"output_{i}" for i in range(len(declared))]

    @classmethod
    def available(cls) -> bool:
        """torch imports (it did, to get here); CPU always works, so the backend is usable."""
        return True

    @property
    def input_name(self) -> str:
        return "input"

    @property
    def output_names(self) -> list[str]:
        return list(self._names)

    @property
    def device(self) -> str:
        return self._device

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self._device)
        device_type = "cuda" if self._device.startswith("cuda") else "cpu"
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        with torch.inference_mode(), torch.autocast(device_type, dtype=dtype, enabled=self.precision != "fp32"):
            out = _named(self.module(x))
        self._names = list(out)
        return {k: v.detach().float().cpu().numpy() for k, v in out.items()}
