"""ONNX Runtime backend: CPU provider here; CUDA and TensorRT execution providers when present."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from gpubatch.models.base import Model


def _providers() -> list[str]:
    available = ort.get_available_providers()
    wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    if os.environ.get("GPUBATCH_ORT_PROVIDERS"):
        wanted = os.environ["GPUBATCH_ORT_PROVIDERS"].split(",")
    return [p for p in wanted if p in available] or ["CPUExecutionProvider"]


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
        self.session = ort.InferenceSession(path, sess_options=opts, providers=_providers())
        self._input = self.session.get_inputs()[0]
        self._outputs = [o.name for o in self.session.get_outputs()]

    @property
    def input_name(self) -> str:
        return self._input.name

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    @property
    def device(self) -> str:
        return "cuda" if self.session.get_providers()[0] != "CPUExecutionProvider" else "cpu"

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(np.float16) if "float16" in self._input.type else np.dtype(np.float32)

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if batch.dtype != self.input_dtype:
            batch = batch.astype(self.input_dtype)
        results = self.session.run(self._outputs, {self._input.name: batch})
        return dict(zip(self._outputs, results, strict=True))

    def describe(self) -> dict:
        info = super().describe()
        info["providers"] = self.session.get_providers()
        return info
