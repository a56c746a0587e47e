"""The model stage on a worker: uint8 batch in, per-item output columns out.

The reader's :class:`~gpubatch.ops.preprocess.Preprocess` declaration becomes the host path (numpy
kernels, then ``Model.run``) or, for a model on a CUDA device, the fused-kernel GPU device stage
(``engine.device``); the reader then folds the outputs back to its items. A reduced-precision run
with ``model.fallback`` re-runs the items its model is unsure of on the fp32 model.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from gpubatch.core.clocks import StageClocks
from gpubatch.core.results import NONFINITE_ITEMS, NONFINITE_OUTPUT, nonfinite_counts
from gpubatch.models.base import Model, check_output_rows, get_model
from gpubatch.models.prepare.validate import top_probability
from gpubatch.ops.preprocess import Preprocess
from gpubatch.sources import ShardReader

if TYPE_CHECKING:
    from gpubatch.engine.context import RunContext


def make_batch_runner(reader: ShardReader, model: Model, ctx: RunContext | None = None) -> Any:
    """The model stage: preprocess on the device stage, run, map outputs back to items.

    With ``ctx.fallback_model_path`` set (a reduced-precision run with ``model.fallback``), items
    the reduced model is unsure of are re-run on the fp32 model, loaded once per worker.
    """
    fallback: Model | None = None
    threshold = ctx.fallback_max_prob if ctx is not None else None
    if ctx is not None and ctx.fallback_model_path and threshold is not None:
        fallback = get_model(ctx.fallback_model_path, ctx.backend, "fp32", model.threads)

    preprocess = reader.preprocess.with_dtype(model.input_dtype)
    stage = _gpu_stage(preprocess, model) if fallback is None else None
    if stage is not None:
        turns = _host_stage(model)

        def run_on_device(items: np.ndarray, clocks: StageClocks) -> dict[str, np.ndarray]:
            # one batch at a time per model on a worker, as on the host: the stage's two slots and
            # a TensorRT model's output buffers are shared by the worker's shards, and a second
            # shard's batch would take a slot still in use or overwrite outputs not yet copied back
            with turns.turn(clocks):
                out = stage(items, clocks)
            check_output_rows(out, preprocess.out_shape(items.shape)[0])
            with clocks.part("output"):
                return reader.from_model_output(out, len(items))

        return run_on_device

    host = _host_stage(model)

    def run_batch(items: np.ndarray, clocks: StageClocks) -> dict[str, np.ndarray]:
        with host.turn(clocks):
            with clocks.part("preprocess"):
                x = host.keep(preprocess.on_host(items, out=host.buffer))
            with clocks.part("compute"):
                out = model.run(x)
                check_output_rows(out, len(x))
                if fallback is not None and threshold is not None:
                    out = rerun_low_confidence(out, x, fallback, threshold, clocks)
            with clocks.part("output"):
                out = {k: v.copy() if np.may_share_memory(v, x) else v for k, v in out.items()}
        with clocks.part("output"):
            return reader.from_model_output(out, len(items))

    return run_batch


def count_nonfinite(columns: dict[str, np.ndarray], clocks: StageClocks) -> dict[str, np.ndarray]:
    """Count the items (rows) whose outputs hold NaN or an infinity, in all and per output.

    A model that overflows (fp16, a bad export, a tile it was never trained on) returns NaN for
    those items and nothing else says so: the rows would be written as valid predictions and the
    run would report success. The values are written as the model gave them; the counts make
    the shard's note, the report's ``nonfinite`` section and the zarr group's attributes. The
    pipeline counts a batch once its padding is cut off: the padding repeats the last item, and a
    NaN there was counted again ("32 of 29 items").
    """
    bad: np.ndarray | None = None
    for name, values in columns.items():
        if not isinstance(values, np.ndarray) or values.dtype.kind not in "fc" or not len(values):
            continue
        rows = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        if rows.any():
            clocks.count(NONFINITE_OUTPUT + name, int(rows.sum()))
            bad = rows if bad is None else bad | rows
    if bad is not None:
        clocks.count(NONFINITE_ITEMS, int(bad.sum()))
    return columns


def nonfinite_note(clocks: StageClocks, items: int) -> str | None:
    """The shard's note when some of its ``items`` came out of the model NaN or infinite."""
    counts = nonfinite_counts(clocks.counters)
    if counts is None:
        return None
    which = ", ".join(f"{name} {n}" for name, n in counts["outputs"].items())
    return (f"{counts['items']} of {items} item(s) have NaN or infinite model outputs ({which}), written as "
            "NaN/inf: not valid predictions; check the model (its precision, its input normalisation)")


class _HostStage:
    """One model stage at a time per model on a worker, with one reused input buffer (the host
    path's; the GPU device stage takes the same turns, its buffers live in the stage).

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
        """Hold the model stage; the wait for it is the model stage's ``turn`` part (time this
        shard's batch sat ready while the worker's other shard ran the model)."""
        t0 = time.perf_counter()
        with self.lock:
            clocks.add_part("turn", time.perf_counter() - t0)
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


#: per model object, not per id(): a model session the process let go (models.base.MAX_SESSIONS)
#: takes its stage (a batch-sized buffer) with it, and a new model given the old one's id gets a
#: fresh stage, not the old one's buffer and warm-up
_HOST_STAGES: weakref.WeakKeyDictionary[Model, _HostStage] = weakref.WeakKeyDictionary()
_STAGES_LOCK = threading.Lock()


def _host_stage(model: Model) -> _HostStage:
    with _STAGES_LOCK:
        return _HOST_STAGES.setdefault(model, _HostStage())


def warm_host_stage(model: Model, shape: tuple[int, ...], dtype: str, clocks: StageClocks) -> None:
    """Warm this worker's host stage for ``model`` once, before its first shard opens."""
    _host_stage(model).warm(model, shape, dtype, clocks)


_GPU_STAGES: weakref.WeakKeyDictionary[Model, dict[Preprocess, Any]] = weakref.WeakKeyDictionary()


def _gpu_stage(preprocess: Preprocess, model: Model) -> Any:
    """The fused-kernel device stage (pinned buffers, copy stream) for a model on a CUDA device.

    One per worker, model and preprocessing, reused across shards; None when the model runs
    host arrays (the host path is then the device stage).
    """
    if model.device != "cuda" or not model.supports_device():
        return None
    with _STAGES_LOCK:
        stages = _GPU_STAGES.setdefault(model, {})
    if preprocess not in stages:
        from gpubatch.engine.device import make_device_stage

        stages[preprocess] = make_device_stage(model, preprocess)
    return stages[preprocess]


def rerun_low_confidence(out: dict[str, np.ndarray], x: np.ndarray, fallback: Model, threshold: float,
                          clocks: Any) -> dict[str, np.ndarray]:
    """Re-run items whose top probability is under ``threshold`` on the fp32 model; count them.

    The per-item side of decision 2: a reduced model that passed the gate on average can still
    be unsure of single items, and those are the ones where rounding decides the class.
    ``clocks`` is the shard's StageClocks; the count goes to its ``fallback.items`` counter.
    """
    top = top_probability(out)
    if top is None:
        return out
    low = np.flatnonzero(top < threshold)
    if len(low) == 0:
        return out
    redo = fallback.run(x[low])
    out = {k: np.array(v, copy=True) for k, v in out.items()}
    for name, value in redo.items():
        if name in out:
            out[name][low] = value.astype(out[name].dtype, copy=False)
    clocks.count("fallback.items", len(low))
    return out


_TEMPLATES: dict[tuple[int, tuple[int, ...]], dict[str, np.ndarray]] = {}


def empty_rows(reader: ShardReader, model: Model, item: tuple[tuple[int, ...], str]
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Zero-length index columns and outputs, typed and shaped as a real batch's, for a shard with
    no items (a slide with no tissue): its zarr group then still has every array at its width.

    The outputs' shapes come from one zero item run through the model, once per model and
    worker; ``item`` is the source's (shape, dtype) of a batch of one.
    """
    shape = tuple(item[0])
    key = (id(model), shape)
    if key not in _TEMPLATES:
        out = zero_item_outputs(model, shape)
        _TEMPLATES[key] = {k: np.asarray(v)[:0].copy() for k, v in reader.from_model_output(out, 1).items()}
    return reader.empty_index(), dict(_TEMPLATES[key])


def zero_item_outputs(model: Model, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The model's outputs for a batch of ``shape`` (one item: the source's ``model_input(job, 1)``)
    of zeros, fed as a run feeds it: what its outputs' names and shapes are, learned without data.
    An empty slide's columns take their widths from it, and ``validate`` the bag width a slide
    head gets from a torch tile model, which no file declares."""
    return model.run(np.zeros(shape, dtype=model.input_dtype))
