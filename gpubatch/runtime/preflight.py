"""Checks before anything runs: what ``validate`` and ``run`` both refuse, with exit 2.

A run that dies at 3 a.m. on a missing file or a model that cannot take the job's items wastes a
night, so every check that needs no worker runs here, on the client, before planning finishes,
and ``gpubatch validate`` runs the same checks as ``gpubatch run``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from gpubatch.core.errors import SpecError
from gpubatch.io.storage import expand_uris, missing_extra
from gpubatch.io.uris import is_remote, local_path, protocol_of, split_glob
from gpubatch.sources import get_source
from gpubatch.spec import JobSpec


def _missing_filesystems(uris: list[str]) -> list[tuple[str, str]]:
    """Remote schemes whose fsspec backend is not installed: a spec problem, not N quarantines."""
    problems = []
    for i, uri in enumerate(uris):
        hint = missing_extra(split_glob(uri)[0])
        if hint:
            problems.append((f"input.uris[{i}]", f"{protocol_of(uri)}:// needs an extra package: {hint}"))
    return problems


def check_local_files(job: JobSpec) -> None:
    """Fail before any work when a local input or model file named in the spec is missing."""
    problems: list[tuple[str, str]] = _missing_filesystems(job.input.uris)
    if not is_remote(job.model.path) and not Path(local_path(job.model.path)).is_file():
        problems.append(("model.path", f"file not found: {job.model.path}"))
    if job.kind == "slides":
        for i, uri in enumerate(job.input.uris):
            if not is_remote(split_glob(uri)[0]) and not expand_uris([uri], job.input.storage):
                problems.append((f"input.uris[{i}]", f"matches no file: {uri}"))
    if job.windows is not None:
        w = job.windows
        for key in ("reference", "variants"):
            value = getattr(w, key)
            if value and not is_remote(value) and not Path(local_path(value)).exists():
                problems.append((f"windows.{key}", f"file not found: {value}"))
        regions_file = isinstance(w.regions, str) and w.regions != "genome" and ":" not in w.regions
        if regions_file and not is_remote(str(w.regions)) and not Path(str(w.regions)).exists():
            problems.append(("windows.regions", f"file not found: {w.regions} (or give 'genome' or a list of 'chr:start-end')"))
    if problems:
        raise SpecError(problems)


def expected_item_shape(job: JobSpec) -> tuple[int, ...]:
    """The model input shape (without batch) a job will feed, per the contract's layouts."""
    return get_source(job.kind).model_input(job, 1)[0][1:]


def check_model_input(job: JobSpec) -> None:
    """Refuse, before any work, a model whose fixed input dims disagree with the job's items."""
    if not job.model.path.endswith(".onnx"):
        return
    import onnx

    model = onnx.load(job.model.path, load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    first = next(i for i in model.graph.input if i.name not in initializers)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in first.type.tensor_type.shape.dim]
    want = expected_item_shape(job)
    if len(dims) != len(want) + 1 or any(d is not None and d != w for d, w in zip(dims[1:], want, strict=True)):
        shown = ["N" if d is None else d for d in dims]
        raise SpecError([("model.path", f"the model's input {first.name!r} has shape {shown} but the job "
                                        f"feeds (N, {', '.join(map(str, want))}); match tiles.size / "
                                        "windows.length and the layout to the model")])


def _onnx_io(path: str) -> tuple[list[tuple[str, list[int | None]]], list[tuple[str, list[int | None]]]]:
    """(inputs, outputs) of an ONNX file as (name, dims) with None for a dynamic dim.

    Exporters often leave output widths unnamed; ONNX shape inference (with data propagation
    through Reshape and friends) usually recovers them from the graph alone, weights unread.
    """
    import onnx

    model = onnx.load(path, load_external_data=False)
    with contextlib.suppress(Exception):  # inference is a nicety: the declared shapes remain
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    graph = model.graph
    initializers = {i.name for i in graph.initializer}

    def dims(value: object) -> list[int | None]:
        shape = value.type.tensor_type.shape.dim  # type: ignore[attr-defined]
        return [d.dim_value if d.HasField("dim_value") else None for d in shape]

    return ([(i.name, dims(i)) for i in graph.input if i.name not in initializers],
            [(o.name, dims(o)) for o in graph.output])


def check_slide_model(job: JobSpec) -> None:
    """The slide head's file exists, the tile output it names exists, and the widths agree (where
    both models are ONNX files with fixed feature widths)."""
    spec = job.slide_model
    if spec is None:
        return
    if not is_remote(spec.path) and not Path(local_path(spec.path)).is_file():
        raise SpecError([("slide_model.path", f"file not found: {spec.path}")])
    if not job.model.path.endswith(".onnx"):
        return
    outputs = dict(_onnx_io(job.model.path)[1])
    name = spec.features or next(iter(outputs))
    if name not in outputs:
        raise SpecError([("slide_model.features", f"{name!r} is not an output of model.path; its "
                                                  f"outputs are {list(outputs)}")])
    tail = [d for d in outputs[name][1:] if d is not None]
    width = int(np.prod(tail)) if tail and len(tail) == len(outputs[name]) - 1 else None
    if not spec.path.endswith(".onnx") or width is None:
        return
    head_dims = _onnx_io(spec.path)[0][0][1]
    if head_dims and head_dims[-1] is not None and head_dims[-1] != width:
        raise SpecError([("slide_model.path", f"the slide model takes features {head_dims[-1]} wide but "
                                              f"model.path's output {name!r} gives {width} per tile")])


def check_reference(job: JobSpec) -> None:
    """A local reference's index is checked against the FASTA now, as planning would check it."""
    w = job.windows
    if job.kind != "genome" or w is None or is_remote(w.reference):
        return
    from gpubatch.sources.genome.source import GenomeSource

    GenomeSource.contig_table(w.reference, job.input.storage)


def machine_memory() -> int:
    """Physical memory of this machine in bytes (0 where the platform does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def check_resources(job: JobSpec, profile: dict[str, Any] | None = None) -> None:
    """Refuse what is known to exhaust the machine before a slide is read: more local workers
    than cores (unless ``run.force_workers``), and batches in flight larger than a worker's
    share of memory (``run.max_worker_memory``)."""
    from gpubatch.runtime.cluster import cpu_count, load_profile

    prof = profile if profile is not None else load_profile(job.run.profile)
    problems: list[tuple[str, str]] = []
    local = prof.get("cluster") in ("local", "local-cuda")
    asked = job.run.workers or (prof.get("workers") if isinstance(prof.get("workers"), int) else None)
    cores = cpu_count()
    if local and asked and asked > cores and not job.run.force_workers:
        problems.append(("run.workers", f"{asked} worker processes on a machine with {cores} cores; "
                                        "lower it, or set run.force_workers: true"))
    workers = asked or (1 if not local else cores)
    budget = job.run.max_worker_memory or machine_memory() // max(workers, 1)
    if isinstance(job.model.batch_size, int) and budget:
        shape, dtype = get_source(job.kind).model_input(job, job.model.batch_size)
        batch = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
        # queued batches travel as uint8 (a quarter of the float input), two float copies at once
        held = batch * (job.run.prefetch_batches / 4 + 2)
        if held > budget:
            problems.append(("model.batch_size", (
                f"{job.model.batch_size} items make a {batch / 2**30:.2f} GiB model input; with "
                f"run.prefetch_batches {job.run.prefetch_batches} a worker holds about "
                f"{held / 2**30:.2f} GiB, over its {budget / 2**30:.2f} GiB "
                f"({'run.max_worker_memory' if job.run.max_worker_memory else 'memory / workers'}); "
                "lower model.batch_size, tiles.size or run.prefetch_batches")))
    if problems:
        raise SpecError(problems)


def preflight(job: JobSpec, profile: dict[str, Any] | None = None) -> None:
    """Everything ``run`` would refuse before planning: files, extras, the models' inputs, the
    reference's index, the machine's cores and memory."""
    check_local_files(job)
    check_model_input(job)
    check_reference(job)
    check_slide_model(job)
    check_resources(job, profile)
