"""The device stage: uint8 batch in, model outputs out, on a GPU or on the host behind one interface.

Items travel as uint8 (tiles) or uint8 base codes (DNA) and become float only here. On a GPU the
stage copies the bytes from pinned host memory to the device on a copy stream, normalises or
one-hot encodes them with the fused kernels of kernels/*.cu, hands the device array to the model
(TensorRT by pointer, ONNX Runtime's CUDA provider by IO binding) and copies the outputs back into
pinned host memory. The CPU twin does the same with the numpy kernels and ``model.run``.

Why two slots: with ``submit`` / ``collect`` (or ``map``) the next batch's host-to-device copy runs
on the copy stream while the current batch computes, so transfer hides behind compute instead of
adding to it. ``stage(items, clocks)`` is submit + collect for callers that hand over one batch at a
time. Clock parts: "transfer" (pinned staging, H2D and D2H), "preprocess" and "compute", timed
with CUDA events where the work runs on the stage's stream. Overlapped parts may sum to more than
the model stage's busy time: they measure each layer's work, not the critical path.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import GpubatchError
from gpubatch.models.base import Model
from gpubatch.ops.preprocess import Preprocess


class _StageBase:
    """submit / collect / map shared by both twins, so the engine can drive either the same way."""

    device = "cpu"

    def __call__(self, items: np.ndarray, clocks: StageClocks) -> dict[str, np.ndarray]:
        return self.collect(self.submit(items, clocks), clocks)

    def submit(self, items: np.ndarray, clocks: StageClocks) -> Any:
        raise NotImplementedError

    def collect(self, ticket: Any, clocks: StageClocks) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def map(self, batches: Iterable[np.ndarray], clocks: StageClocks) -> Iterator[dict[str, np.ndarray]]:
        """Results in order, with the next batch's upload in flight while the current one computes."""
        pending = None
        for items in batches:
            ticket = self.submit(items, clocks)
            if pending is not None:
                yield self.collect(pending, clocks)
            pending = ticket
        if pending is not None:
            yield self.collect(pending, clocks)


class CpuDeviceStage(_StageBase):
    """The host twin: numpy preprocessing and ``model.run``; the reference for DeviceStage."""

    device = "cpu"

    def __init__(self, model: Model, preprocess: Preprocess):
        self.model = model
        self.preprocess = preprocess

    def submit(self, items: np.ndarray, clocks: StageClocks) -> np.ndarray:
        return items

    def collect(self, ticket: np.ndarray, clocks: StageClocks) -> dict[str, np.ndarray]:
        with clocks.part("preprocess"):
            x = self.preprocess.on_host(ticket)
        with clocks.part("compute"):
            return self.model.run(x)


@dataclass
class _Slot:
    """One of the double buffers: pinned host staging, device input, preprocessed input, outputs."""

    events: dict[str, Any]
    host_in: np.ndarray | None = None
    dev_in: Any = None
    dev_x: Any = None
    host_out: dict[str, np.ndarray] = field(default_factory=dict)
    shape: tuple[int, ...] = ()
    busy: bool = False


def _pinned(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A numpy array backed by page-locked memory, so async copies really are async."""
    import cupy

    count = int(np.prod(shape))
    mem = cupy.cuda.alloc_pinned_memory(max(count * dtype.itemsize, 1))
    return np.frombuffer(mem, dtype=dtype, count=count).reshape(shape)


def _fits(arr: Any, shape: tuple[int, ...], dtype: np.dtype) -> Any:
    """A C-contiguous view of ``arr`` with ``shape`` when its buffer is large enough, else None."""
    if arr is None or arr.dtype != dtype or arr.size < int(np.prod(shape)):
        return None
    return arr.reshape(-1)[: int(np.prod(shape))].reshape(shape)


class DeviceStage(_StageBase):
    """The GPU device stage: pinned buffers, a copy stream, fused kernels, device-side model input."""

    device = "cuda"

    def __init__(self, model: Model, preprocess: Preprocess, slots: int = 2):
        import cupy

        self.model = model
        self.preprocess = preprocess
        self._cupy = cupy
        self._copy_stream = cupy.cuda.Stream(non_blocking=True)
        self._compute_stream = cupy.cuda.Stream(non_blocking=True)
        names = ("h2d0", "h2d1", "pre0", "pre1", "d2h0", "d2h1")
        self._slots = [_Slot({n: cupy.cuda.Event() for n in names}) for _ in range(slots)]
        self._next = 0

    def submit(self, items: np.ndarray, clocks: StageClocks) -> _Slot:
        """Stage the batch in pinned memory and start its upload on the copy stream."""
        cp = self._cupy
        slot = self._slots[self._next]
        if slot.busy:
            raise RuntimeError(f"collect() a batch before submitting more than {len(self._slots)}")
        self._next = (self._next + 1) % len(self._slots)
        items = np.ascontiguousarray(items)
        with clocks.part("transfer"):
            host = _fits(slot.host_in, items.shape, items.dtype)
            if host is None:
                slot.host_in = _pinned(items.shape, items.dtype)
                host = slot.host_in
            np.copyto(host, items)
        dev = _fits(slot.dev_in, items.shape, items.dtype)
        if dev is None:
            slot.dev_in = dev = cp.empty(items.shape, dtype=items.dtype)
        ev = slot.events
        ev["h2d0"].record(self._copy_stream)
        dev.set(host, stream=self._copy_stream)
        ev["h2d1"].record(self._copy_stream)
        slot.shape, slot.busy = items.shape, True
        return slot

    def collect(self, ticket: _Slot, clocks: StageClocks) -> dict[str, np.ndarray]:
        """Preprocess and run on the compute stream, copy outputs back, wait, record the clocks."""
        slot, cs, ev = ticket, self._compute_stream, ticket.events
        try:
            cs.wait_event(ev["h2d1"])
            x = self._preprocess(slot, cs)
            t0 = time.perf_counter()
            outputs = self.model.run_device(x, cs)
            on_stream = self.model.runs_on_stream
            host_compute = time.perf_counter() - t0
            host_out = self._download(slot, outputs, cs)
            ev["d2h1"].synchronize()
        finally:
            slot.busy = False
        self._record(ev, clocks, None if on_stream else host_compute)
        return {name: arr.copy() for name, arr in host_out.items()}

    def _preprocess(self, slot: _Slot, stream: Any) -> Any:
        shape = self.preprocess.out_shape(slot.shape)
        dtype = self.preprocess.np_dtype
        out = _fits(slot.dev_x, shape, dtype)
        if out is None:
            slot.dev_x = out = self._cupy.empty(shape, dtype=dtype)
        dev_in = _fits(slot.dev_in, slot.shape, np.dtype(np.uint8))
        slot.events["pre0"].record(stream)
        with stream:
            x = self.preprocess.on_device(dev_in, out=out)
        slot.events["pre1"].record(stream)
        return x

    def _download(self, slot: _Slot, outputs: dict[str, Any], stream: Any) -> dict[str, np.ndarray]:
        """Queue D2H copies of every output into the slot's pinned buffers (grown on demand)."""
        slot.events["d2h0"].record(stream)
        result: dict[str, np.ndarray] = {}
        with stream:
            for name, arr in outputs.items():
                shape, dtype = tuple(arr.shape), np.dtype(arr.dtype)
                host = _fits(slot.host_out.get(name), shape, dtype)
                if host is None:
                    slot.host_out[name] = host = _pinned(shape, dtype)
                self._cupy.asnumpy(self._cupy.ascontiguousarray(arr), stream=stream, out=host, blocking=False)
                result[name] = host
        slot.events["d2h1"].record(stream)
        return result

    def _record(self, ev: dict[str, Any], clocks: StageClocks, host_compute: float | None) -> None:
        ms = self._cupy.cuda.get_elapsed_time
        clocks.add_part("transfer", (ms(ev["h2d0"], ev["h2d1"]) + ms(ev["d2h0"], ev["d2h1"])) / 1e3)
        clocks.add_part("preprocess", ms(ev["pre0"], ev["pre1"]) / 1e3)
        compute = ms(ev["pre1"], ev["d2h0"]) / 1e3 if host_compute is None else host_compute
        clocks.add_part("compute", compute)


def make_device_stage(model: Model, preprocess: Preprocess, *, device: str = "auto") -> CpuDeviceStage | DeviceStage:
    """The device stage for this model: the GPU stage when a GPU can feed the model, else the twin.

    The preprocessing produces the model's own input dtype. ``device``: auto | cuda | cpu;
    ``cuda`` raises when the GPU path cannot run, instead of silently running on the host.
    """
    from gpubatch.ops.kernels_gpu import gpu_available

    preprocess = preprocess.with_dtype(model.input_dtype)
    if device == "cpu":
        return CpuDeviceStage(model, preprocess)
    if gpu_available() and model.supports_device():
        return DeviceStage(model, preprocess)
    if device == "cuda":
        why = "no CUDA device is visible" if not gpu_available() else "the model does not run on CUDA"
        raise GpubatchError(f"device stage 'cuda' requested but {why} (backend {model.backend})")
    return CpuDeviceStage(model, preprocess)
