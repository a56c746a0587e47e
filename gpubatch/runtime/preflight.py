"""Checks before anything runs: what ``validate`` and ``run`` both refuse, with exit 2.

A run that dies at 3 a.m. on a missing file or a model that cannot take the job's items wastes a
night, so every check that needs no worker runs here, on the client, before planning finishes,
and ``gpubatch validate`` runs the same checks as ``gpubatch run``.
"""

from __future__ import annotations

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


def _onnx_outputs(path: str) -> dict[str, list[int | None]]:
    """Output name -> dims (None where dynamic) of an ONNX file, read without its weights."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    return {o.name: [d.dim_value if d.HasField("dim_value") else None for d in o.type.tensor_type.shape.dim]
            for o in model.graph.output}


def _reduce_problem(job: JobSpec, name: str, outputs: dict[str, list[int | None]]) -> tuple[str, str] | None:
    """Why ``model.reduce.NAME`` cannot apply to the model's outputs, or None."""
    dims, want = outputs.get(name), job.model.reduce[name].bins
    if dims is None:
        return f"model.reduce.{name}", f"the model has no output {name!r} (it has {', '.join(outputs) or 'none'})"
    if dims and len(dims) != 3:
        return f"model.reduce.{name}", f"output {name!r} has rank {len(dims)}; reductions over bins need (N, bins, tracks)"
    bins = dims[1 if job.model.track_layout == "NLT" else 2] if dims else None
    if want is not None and bins is not None and want > bins:
        return f"model.reduce.{name}.bins", f"{want} central bins asked, output {name!r} has {bins}"
    return None


def _track_problems(job: JobSpec, outputs: dict[str, list[int | None]]) -> list[tuple[str, str]]:
    """What the job asks of the model's track outputs that the model cannot give."""
    assert job.windows is not None
    problems = [p for name in job.model.reduce if (p := _reduce_problem(job, name, outputs)) is not None]
    ranks = {len(d) for d in outputs.values() if d}
    if job.windows.variant_scores and ranks and 3 not in ranks:
        problems.append(("windows.variant_scores", "the model has no output of shape (N, bins, tracks) "
                                                   "to score"))
    return problems


def _whole_without_zarr(job: JobSpec, outputs: dict[str, list[int | None]]) -> list[tuple[str, str]]:
    """Track outputs written whole go to zarr only: without zarr they would be lost."""
    assert job.windows is not None
    if "zarr" in job.output.formats:
        return []
    reduce = job.model.reduce
    return [("output.formats", f"output {name!r} is (N, bins, tracks) and is written whole, which "
                               f"only zarr holds: add zarr to output.formats, or reduce it "
                               f"(model.reduce.{name}) or score it (windows.variant_scores)")
            for name, dims in outputs.items()
            if len(dims) == 3 and (name in reduce and reduce[name].keep
                                   or name not in reduce and not job.windows.variant_scores)]


def check_track_outputs(job: JobSpec) -> None:
    """Refuse reductions of outputs the model lacks (or lacks in rank or bins), scores with
    nothing to score, and whole track outputs with nowhere to go."""
    if job.windows is None or not job.model.path.endswith(".onnx") or is_remote(job.model.path):
        return
    outputs = _onnx_outputs(job.model.path)
    problems = _track_problems(job, outputs) + _whole_without_zarr(job, outputs)
    if problems:
        raise SpecError(problems)


def preflight(job: JobSpec, profile: dict[str, Any] | None = None) -> None:
    """Everything ``run`` would refuse before planning: files, extras, the model's input and
    outputs, the reference's index, the machine's cores and memory."""
    check_local_files(job)
    check_model_input(job)
    check_track_outputs(job)
    check_reference(job)
    check_resources(job, profile)
