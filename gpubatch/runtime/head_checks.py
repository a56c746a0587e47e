"""What ``validate`` checks of a slide-level head (``slide_model``) and of the element types the
models return, before any tile is read.

A head that cannot take the bags gpubatch hands it fails on the worker only after the slide's
tiles were computed, at the end of every shard: each slide retried, then quarantined, the run's
compute spent for nothing. So what the ONNX files say is checked here: the head's file, the tile
output it names, the feature width, and the bag's axis, which must be dynamic (a slide's bag has as
many rows as the slide has tissue tiles). A torch tile model's output width no file says: it is
run once, on one zero tile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gpubatch.core.errors import SpecError
from gpubatch.models.base import Model
from gpubatch.runtime.model_facts import (
    Dims,
    local_model_file,
    model_inputs,
    model_outputs,
    unreadable_outputs,
)
from gpubatch.spec import JobSpec


def refuse_unreadable_outputs(path: str, field: str, shown: str) -> None:
    """Refuse a model whose outputs ONNX Runtime cannot hand to numpy as numbers (bfloat16, fp8,
    4-bit): a bf16 output failed every batch of every slide, and an fp8 one was written as its raw
    bytes (uint8 codes) without a word."""
    bad = unreadable_outputs(path, field)
    if bad:
        which = ", ".join(f"{name!r} ({dtype})" for name, dtype in bad.items())
        raise SpecError([(field, f"{shown} returns {which}, which ONNX Runtime cannot hand over as "
                                 "numbers; end the graph with a Cast to float32 (or float16), e.g. "
                                 "export with the output .float()")])


def check_slide_model(job: JobSpec, tile_model: str | None) -> None:
    """The slide head's file exists, the tile output it names exists, and the head takes that
    output's width, on a bag axis of any length. The width is what an ONNX tile model declares, or
    what a torch one gives for one zero tile (:func:`_torch_tile_outputs`). An ONNX head's input is
    read; a head the torch backend runs is loaded, and probed with a bag of that width, by the
    worker's own code (:meth:`SlideHead.check_file`).

    ``tile_model`` is the local file of the job's ONNX tile model (None for torch files).
    """
    spec = job.slide_model
    if spec is None:
        return
    # a remote head is fetched now (a missing one refused), into the copy the run loads
    local = local_model_file(spec.path, job.input.storage, "slide_model.path")
    if not Path(local).is_file():
        raise SpecError([("slide_model.path", f"file not found: {spec.path}")])
    on_torch = _runs_on_torch(spec.backend, local)
    head = local if spec.path.endswith(".onnx") and not on_torch else None
    if head is not None:
        refuse_unreadable_outputs(head, "slide_model.path", spec.path)
        _refuse_fixed_bag(spec.path, model_inputs(head, "slide_model.path")[0][1])
    name, width = _bag_width(job, tile_model)
    if on_torch:
        _check_torch_head(spec.path, local, spec.backend, name, width)
    if head is None or width is None:
        return
    head_dims = model_inputs(head, "slide_model.path")[0][1]
    if head_dims and head_dims[-1] is not None and head_dims[-1] != width:
        raise SpecError([("slide_model.path", f"{spec.path} takes features {head_dims[-1]} wide but model.path's "
                                              f"output {name!r} gives {width} per tile; {_width_fix(width)}")])


def _width_fix(width: int | None) -> str:
    return (f"export the head to take {width}-wide features, or set slide_model.features to the tile "
            "output it takes")


def _bag_width(job: JobSpec, tile_model: str | None) -> tuple[str | None, int | None]:
    """The tile output forming each slide's bag and its width per tile: what the ONNX tile model
    says, or what a torch tile model gives for one item (None where neither is known); a features
    name the model has no output of is refused."""
    if job.slide_model is None:
        return None, None
    outputs = model_outputs(tile_model) if tile_model is not None else _torch_tile_outputs(job)
    if not outputs:
        return None, None
    name = job.slide_model.features or next(iter(outputs))
    if name not in outputs:
        raise SpecError([("slide_model.features", f"{name!r} is not an output of model.path; its "
                                                  f"outputs are {list(outputs)}")])
    tail = [d for d in outputs[name][1:] if d is not None]
    return name, int(np.prod(tail)) if tail and len(tail) == len(outputs[name]) - 1 else None


def _torch_tile_outputs(job: JobSpec) -> dict[str, Dims] | None:
    """The shapes of a torch tile model's outputs for one item, from a batch of one zero tile run
    as a worker runs it (:func:`~gpubatch.engine.model_stage.zero_item_outputs`): no torch file
    declares its outputs' widths, and a head of the wrong width passed validate and failed at the
    end of every slide, once its tiles were computed. None where torch is not installed (the
    missing extra is check_environment's to name); a model that fails on the tile is refused."""
    if not _runs_on_torch(job.model.backend, job.model.path):
        return None
    try:
        import torch  # noqa: F401 - only whether it imports
    except ImportError:
        return None
    from gpubatch.engine.model_stage import zero_item_outputs
    from gpubatch.engine.slide_head import last_line
    from gpubatch.models.base import backend_class
    from gpubatch.sources import get_source

    shape = get_source(job.kind).model_input(job, 1)[0]
    local = local_model_file(job.model.path, job.input.storage, "model.path")
    try:
        outputs = zero_item_outputs(backend_class("torch")(local), shape)
    except Exception as exc:  # noqa: BLE001 - whatever the module raises, every batch would raise it
        shown = ", ".join(map(str, shape))
        raise SpecError([("model.path", (
            f"{job.model.path} fails on a batch of one zero tile of shape ({shown}), fed as the run feeds it: "
            f"{last_line(exc).replace(local, job.model.path)}; every batch would fail so: match tiles.size and "
            "model.input.layout to the model"))]) from None
    return {name: list(np.shape(value)) for name, value in outputs.items()}


def _runs_on_torch(backend: str, path: str) -> bool:
    """Whether the worker loads the head with the torch backend (``auto`` picks it for .pt/.pt2/.ts)."""
    from gpubatch.core.errors import GpubatchError
    from gpubatch.models.base import resolve_backend

    try:
        return resolve_backend(backend, path) == "torch"
    except GpubatchError:
        return False  # no ONNX backend installed: check_environment names the extra


def _check_torch_head(shown: str, local: str, backend: str, name: str | None, width: int | None) -> None:
    """Refuse, as the worker would at each slide's end, a torch head it cannot load or that does
    not take a bag of ``width``-wide features; skipped where torch is not installed (the missing
    extra is check_environment's to name)."""
    try:
        import torch  # noqa: F401 - only whether it imports
    except ImportError:
        return
    from gpubatch.core.errors import GpubatchError
    from gpubatch.engine.slide_head import HeadShapeError, SlideHead

    try:
        SlideHead.check_file(local, backend, width)
    except HeadShapeError as exc:
        words = str(exc).replace(local, shown)
        takes = _torch_head_width(exc.model)
        said = f"{shown} takes features {takes} wide and" if takes is not None else ""
        raise SpecError([("slide_model.path", f"{words}; {said} model.path's output {name!r} gives {width} "
                                              f"per tile: {_width_fix(width)}")]) from None
    except GpubatchError as exc:
        words = str(exc).replace(local, shown)
        raise SpecError([("slide_model.path", words)]) from None


def _torch_head_width(model: Model) -> int | None:
    """The feature width a torch head's file says it takes, for the refusal's words: an
    ExportedProgram's input signature, else the first linear layer or normalisation a TorchScript
    forward runs on its bag; None where neither says."""
    import torch

    from gpubatch.models.torch import first_weighted_op

    module = getattr(model, "module", None)
    if isinstance(module, torch.fx.GraphModule):
        value: Any = next((n.meta.get("val") for n in module.graph.nodes if n.op == "placeholder"), None)
        last = value.shape[-1] if getattr(value, "ndim", 0) else None
        return last if isinstance(last, int) else None
    first = first_weighted_op(module) if module is not None else None
    if first is None:
        return None
    op, weight = first
    if op == "aten::linear" and weight.ndim == 2:
        return int(weight.shape[1])
    return int(weight.shape[0]) if op.endswith("_norm") and weight.ndim == 1 else None


def _refuse_fixed_bag(path: str, dims: Dims) -> None:
    """A head taking (N, D) or (1, N, D) must leave N free: gpubatch hands it every tissue tile of
    a slide, as many as the slide has. A head exported with a fixed N (a bag sampled or padded to
    512 tiles in training) was refused by ONNX Runtime at every slide's end."""
    if len(dims) not in (2, 3):
        return  # the worker's probe names the layouts it tried
    bag, batch = dims[-2], dims[0] if len(dims) == 3 else None
    if bag is not None or batch not in (None, 1):
        shape = ", ".join("?" if d is None else str(d) for d in dims)
        batch_of_one = " and a batch axis of 1" if len(dims) == 3 else ""
        raise SpecError([("slide_model.path", (
            f"{path} takes a bag of shape ({shape}), but a slide's bag has one row per tissue tile, "
            "any number: export the head with a dynamic tiles axis (torch.onnx.export(..., "
            f"dynamic_axes={{'<input>': {{{len(dims) - 2}: 'tiles'}}}})){batch_of_one}"))])
