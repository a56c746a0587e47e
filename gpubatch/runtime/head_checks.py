"""What ``validate`` checks of a slide-level head (``slide_model``) and of the element types the
models return, before any tile is read.

A head that cannot take the bags gpubatch hands it fails on the worker only after the slide's
tiles were computed, at the end of every shard: each slide retried, then quarantined, the run's
compute spent for nothing. So what the ONNX files say is checked here: the head's file, the tile
output it names, the feature width, and the bag's axis, which must be dynamic (a slide's bag has as
many rows as the slide has tissue tiles).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gpubatch.core.errors import SpecError
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
    """The slide head's file exists, the tile output it names exists, and, where both models are
    ONNX files, the head takes that output's width, on a bag axis of any length. A head the torch
    backend runs is loaded, and probed with a bag of that width where it is known, by the worker's
    own code (:meth:`SlideHead.check_file`).

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
        raise SpecError([("slide_model.path", f"the slide model takes features {head_dims[-1]} wide but "
                                              f"model.path's output {name!r} gives {width} per tile")])


def _bag_width(job: JobSpec, tile_model: str | None) -> tuple[str | None, int | None]:
    """The tile output forming each slide's bag and its width per tile, where the ONNX tile model
    says them (None where it does not, or for a torch tile model); a features name the model has
    no output of is refused."""
    if tile_model is None or job.slide_model is None:
        return None, None
    outputs = model_outputs(tile_model)
    name = job.slide_model.features or next(iter(outputs))
    if name not in outputs:
        raise SpecError([("slide_model.features", f"{name!r} is not an output of model.path; its "
                                                  f"outputs are {list(outputs)}")])
    tail = [d for d in outputs[name][1:] if d is not None]
    return name, int(np.prod(tail)) if tail and len(tail) == len(outputs[name]) - 1 else None


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
        raise SpecError([("slide_model.path", f"{words}; export the head to take model.path's output {name!r} "
                                              f"({width} per tile), or set slide_model.features to the tile "
                                              "output it takes")]) from None
    except GpubatchError as exc:
        words = str(exc).replace(local, shown)
        raise SpecError([("slide_model.path", words)]) from None


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
