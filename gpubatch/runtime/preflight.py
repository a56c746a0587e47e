"""Checks before anything runs: what ``validate`` and ``run`` both refuse, with exit 2.

A run that dies at 3 a.m. on a missing file or a model that cannot take the job's items wastes a
night, so every check that needs no worker runs here, on the client, before planning finishes,
and ``gpubatch validate`` runs the same checks as ``gpubatch run`` and then plans the job as
``run`` would (variant files are read and their REF alleles checked there), so a job that
validates does not stop at its start for a reason that could have been known.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpubatch.core.errors import SpecError
from gpubatch.core.switches import check_switches
from gpubatch.io.listing import expand_uris
from gpubatch.io.localized import versions_asked_once
from gpubatch.io.retry import policy_for, run_policy
from gpubatch.io.storage import missing_extra
from gpubatch.io.uris import is_remote, local_path, other_host_problem, protocol_of, split_glob
from gpubatch.models.base import numpy_has_no_type, unfeedable_input_words
from gpubatch.outputs.writer import MAX_PARQUET_WIDTH, parquet_holds
from gpubatch.runtime.head_checks import check_slide_model, refuse_unreadable_outputs
from gpubatch.runtime.model_facts import (
    ZIP_MAGIC,
    Dims,
    OnnxInput,
    local_model_file,
    model_first_input,
    model_inputs,
    model_outputs,
    scalar_outputs,
)
from gpubatch.runtime.worker_memory import (
    memory_problem,
    sample_problem,
    workers_asked,
)
from gpubatch.sources import get_source
from gpubatch.sources.base import Shard
from gpubatch.spec import JobSpec

#: how long the credential check waits for an instance-metadata service (EC2/ECS roles); every
#: other credential source botocore knows is a local file or variable
IMDS_TIMEOUT_S = 0.25
S3_PROTOCOLS = ("s3", "s3a")
FLOAT_TYPES = ("float32", "float16", "float64")


def _missing_filesystems(uris: list[str]) -> list[tuple[str, str]]:
    """Remote schemes whose fsspec backend is not installed: a spec problem, not N quarantines."""
    problems = []
    for i, uri in enumerate(uris):
        hint = missing_extra(split_glob(uri)[0])
        if hint:
            problems.append((f"input.uris[{i}]", f"{protocol_of(uri)}:// needs an extra package: {hint}"))
    return problems


def check_file_hosts(job: JobSpec) -> None:
    """Refuse every ``file://host/...`` location naming another machine, by field, before any
    is read: ``file://server/p`` read as the relative path ``server/p`` read or wrote whatever
    the working directory held under that name (uris.other_host_problem)."""
    located = [(name, uri) for name, uri, _ in _spec_uris(job)]
    if job.slide_model is not None:
        located.append(("slide_model.path", job.slide_model.path))
    problems = [(name, f"{uri} {problem}") for name, uri in located
                if (problem := other_host_problem(uri)) is not None]
    if problems:
        raise SpecError(problems)


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
            problems.append(("windows.regions", _no_regions_file(str(w.regions))))
    if problems:
        raise SpecError(problems)


def _no_regions_file(regions: str) -> str:
    """What a ``windows.regions`` string that names no file is told: a bare name (``chr21``) is
    most likely a contig, which a list takes (a string is a BED file's path)."""
    name = Path(regions).name  # the spec's string is resolved against the job file's folder
    if name and "." not in name:
        return (f"file not found: {regions}; to tile contig {name}, list it (regions: [{name}]): "
                "a string names a BED file (or is 'genome')")
    return f"file not found: {regions} (or give 'genome' or a list of 'chr:start-end')"


# ---------------------------------------------------------------------------------------------
# storage credentials


def _spec_uris(job: JobSpec) -> list[tuple[str, str, str]]:
    """(field, uri, the spec key of its storage options) of every location the job reads or writes."""
    found = [(f"input.uris[{i}]", split_glob(u)[0], "input.storage") for i, u in enumerate(job.input.uris)]
    found += [("model.path", job.model.path, "input.storage"), ("output.uri", job.output.uri, "output.storage")]
    if job.windows is not None:
        w = job.windows
        found += [("windows.reference", w.reference, "input.storage")]
        found += [("windows.variants", w.variants, "input.storage")] if w.variants else []
        found += [("windows.regions", w.regions, "input.storage")] if isinstance(w.regions, str) else []
    return found


def _in_options(options: dict[str, Any]) -> bool:
    """Credentials (or anonymous access) given in fsspec/s3fs options themselves."""
    client = options.get("client_kwargs") or {}
    return bool(options.get("anon") or (options.get("key") and options.get("secret"))
                or (client.get("aws_access_key_id") and client.get("aws_secret_access_key")))


def s3_credential_source(options: dict[str, Any]) -> str | None:
    """Where S3 credentials would come from for these options, or None when nowhere.

    The options first, then botocore's own chain without its network providers (environment,
    AWS_PROFILE and the shared files, SSO, a credential process: all local), then an
    instance-metadata service, asked once with a short timeout unless AWS_EC2_METADATA_DISABLED
    is set. Bounded: never botocore's default of a second per metadata attempt.
    """
    if _in_options(options):
        return "storage options"
    import botocore.credentials as bc
    import botocore.exceptions
    import botocore.session

    try:
        session = botocore.session.Session(profile=options.get("profile"))
        resolver = bc.create_credential_resolver(session)
        resolver.remove("iam-role")
        creds = resolver.load_credentials()
    except botocore.exceptions.BotoCoreError as exc:  # an unknown profile, a broken config file
        raise SpecError([("input.storage", f"S3 credentials: {exc}")]) from None
    if creds is not None:
        return str(creds.method)
    if os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
        return None
    fetcher = bc.InstanceMetadataFetcher(timeout=IMDS_TIMEOUT_S, num_attempts=1)
    creds = bc.InstanceMetadataProvider(iam_role_fetcher=fetcher).load()
    return "instance metadata" if creds is not None else None


def check_credentials(job: JobSpec, profile: dict[str, Any] | None = None) -> None:
    """Refuse an s3:// location no credentials reach, with the three ways to supply them.

    Without this every slide is quarantined with botocore's ``NoCredentialsError`` after its
    retries, and nothing says where credentials go. Inputs use ``input.storage``, the output
    ``output.storage``; the profile's ``storage`` lies under both.
    """
    under = (profile or {}).get("storage") or {}
    options = {"input.storage": job.input.storage, "output.storage": job.output.storage}
    problems = []
    for key, opts in options.items():
        fields = [f for f, uri, k in _spec_uris(job) if k == key and protocol_of(uri) in S3_PROTOCOLS]
        if not fields or s3_credential_source({**under, **opts}) is not None:
            continue
        how = ("no S3 credentials found; give them in one of: the environment (AWS_ACCESS_KEY_ID and "
               "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE naming a profile in ~/.aws/credentials), the "
               f"cluster profile's `storage` section (key, secret), or the job's {key} (key, secret, "
               "or profile; anon: true for a public bucket)")
        problems += [(name, how) for name in fields]
    if problems:
        raise SpecError(problems)


# ---------------------------------------------------------------------------------------------
# the model against the job


def expected_item_shape(job: JobSpec) -> tuple[int, ...]:
    """The model input shape (without batch) a job will feed, per the contract's layouts."""
    return get_source(job.kind).model_input(job, 1)[0][1:]


def _shape_problem(job: JobSpec, inp: OnnxInput) -> str | None:
    want = expected_item_shape(job)
    dims = inp.dims
    if len(dims) != len(want) + 1 or any(d is not None and d != w for d, w in zip(dims[1:], want, strict=True)):
        shown = ["N" if d is None else d for d in dims]
        return (f"the model's input {inp.name!r} has shape {shown} but the job feeds (N, "
                f"{', '.join(map(str, want))}); {_shape_fix(job, dims)}")
    return None


def _shape_fix(job: JobSpec, dims: Dims) -> str:
    """What to change: the tiles' size or layout, or, for a model that takes no 3 channels at
    either end (a gray model), the model: tiles are RGB, a gray slide's too."""
    if job.kind == "slides" and len(dims) == 4 and 3 not in (dims[1], dims[3]):
        channels = dims[1 if job.model.input.layout == "NCHW" else 3]
        if channels is not None:
            return (f"tiles are RGB, 3 channels (a gray slide's tiles carry its gray in each), and this model "
                    f"takes {channels}: export it with 3 input channels (a gray model can average them in its "
                    "first layer)")
    return "match tiles.size / windows.length and the layout to the model"


def _batch_problem(job: JobSpec, inp: OnnxInput, tuning: bool = False) -> tuple[str, str] | None:
    """A fixed batch dimension is refused unless the job's batches have exactly that many rows.

    Refused rather than silently adopted: batch 1 instead of 32 changes a run's speed by an order
    of magnitude, and whether to run slowly now or re-export the model is the user's choice.
    ``tuning``: `gpubatch tune` asks, which sweeps batch sizes whatever the spec sets, so the
    words are of its sweep, not of a ``batch_size: auto`` the job may not have asked for.
    """
    fixed = inp.dims[0] if inp.dims else None
    if fixed is None:
        return None
    per_item = get_source(job.kind).model_input(job, 1)[0][0]  # rows one item becomes (pairs, strands)
    if not tuning and job.model.batch_size != "auto" and per_item * int(job.model.batch_size) == fixed:
        return None
    fits = fixed // per_item if fixed % per_item == 0 else None
    fix = (f"set model.batch_size: {fits}" + (" and `run` the job" if tuning else "") if fits else
           f"no batch size fits: each item becomes {per_item} rows and {fixed} is not a multiple of that")
    rows = f" ({per_item} rows per item)" if per_item > 1 else ""
    asked = (f"so only that batch runs{rows} and `gpubatch tune` has nothing to tune" if tuning else
             f"but the job asks for batch_size {job.model.batch_size}{rows}")
    return ("model.batch_size", (
        f"the model's input {inp.name!r} has a fixed batch dimension of {fixed}, {asked}; {fix}, or re-export "
        "the model with a dynamic batch axis (torch.onnx.export(..., dynamic_axes={'input': {0: 'batch'}}))"))


def _dtype_problem(job: JobSpec, inp: OnnxInput) -> tuple[str, str] | None:
    """Models take what gpubatch makes: floats. A genome job's encoding.dtype must be the model's."""
    if numpy_has_no_type(inp.dtype):  # a bf16 input: refused at load by every ONNX backend
        return ("model.path", unfeedable_input_words(inp.name, inp.dtype))
    if inp.dtype not in FLOAT_TYPES:
        what = "normalised pixels" if job.kind == "slides" else "one-hot DNA"
        return ("model.path", f"the model's input {inp.name!r} takes {inp.dtype}, but gpubatch feeds "
                              f"floating-point {what}; export the model with a float32 (or float16, or float64) "
                              f"input, with a Cast to {inp.dtype} inside the model if its first layer needs one")
    return _encoding_problem(job, inp)


def _encoding_problem(job: JobSpec, inp: OnnxInput) -> tuple[str, str] | None:
    """A genome job's one-hot is encoded in ``windows.encoding.dtype``, which must be what the
    model is fed: its input's type, or float32 for a float64 input (encoded in float32 and
    widened exactly as it is fed: the encoding kernels write float32 and float16 only)."""
    if job.windows is None:
        return None
    encoded = "float32" if inp.dtype == "float64" else inp.dtype
    if job.windows.encoding.dtype == encoded:
        return None
    widened = " (encoded in float32 and widened exactly as it is fed)" if encoded != inp.dtype else ""
    return ("windows.encoding.dtype", f"{job.windows.encoding.dtype}, but the model's input {inp.name!r} "
                                      f"takes {inp.dtype}{widened}; set windows.encoding.dtype: {encoded}")


TORCH_SUFFIXES = (".pt", ".pt2", ".ts")


def reads_onnx(backend: str, path: str) -> bool:
    """Whether the backend a job names loads ``path`` as ONNX (onnxruntime and tensorrt always,
    auto unless the name is a torch file's), whatever the file is called: a model.onnx that is
    really a TorchScript file, or a model.bin that is ONNX, is checked as ONNX all the same."""
    return backend in ("onnxruntime", "tensorrt") or backend == "auto" and not path.endswith(TORCH_SUFFIXES)


def _onnx_file(job: JobSpec) -> str | None:
    """The local file of the job's model where an ONNX backend loads it; None for torch."""
    if not reads_onnx(job.model.backend, job.model.path):
        return None
    return local_model_file(job.model.path, job.input.storage, "model.path")


def check_precision_backend(job: JobSpec) -> None:
    """A precision the backend cannot run at all (fp8 off TensorRT, int8 on torch) is refused
    here, with ``on_fail: error``, as ``run`` and ``tune`` refuse it once they have planned and
    loaded the model: ``validate`` passed such a job."""
    from gpubatch.core.errors import GpubatchError
    from gpubatch.models.base import resolve_backend
    from gpubatch.models.prepare.resolve import refusal, unsupported_reason

    if job.model.validation.on_fail != "error":
        return
    try:
        backend = resolve_backend(job.model.backend, job.model.path)
    except GpubatchError:
        return  # no backend installed: check_environment's to say
    reason = unsupported_reason(job.model.precision, backend)
    if reason:
        raise SpecError([("model.precision", refusal(reason))])


def check_torch_file(job: JobSpec) -> None:
    """The torch backend loads zip archives (torch.jit.save, torch.export.save); an ONNX file
    named to it would quarantine every input with torch's "not a TorchScript file"."""
    if reads_onnx(job.model.backend, job.model.path):
        return
    with open(local_model_file(job.model.path, job.input.storage, "model.path"), "rb") as f:
        head = f.read(len(ZIP_MAGIC))
    if head != ZIP_MAGIC:
        raise SpecError([("model.path", (
            f"{job.model.path} is not a TorchScript (.pt) or ExportedProgram (.pt2) file, which "
            "backend torch loads; for an ONNX model set model.backend: onnxruntime (or auto)"))])
    check_torch_input(job)


def check_torch_input(job: JobSpec) -> None:
    """Load the module as the torch backend will (on the CPU) and refuse what it cannot feed: an
    ExportedProgram with several inputs or an integer one; and fp16/bf16 for a float64 module
    (``on_fail: error``), which autocast would leave in float64. validate passed a float64
    module whose every batch then failed on a dtype mismatch; now it is fed float64."""
    try:
        from gpubatch.models.torch import load_module, precision_problem
    except ImportError:
        return  # torch is not installed: the missing extra is check_environment's to name
    from gpubatch.core.errors import GpubatchError
    from gpubatch.models.prepare.resolve import refusal

    path = local_model_file(job.model.path, job.input.storage, "model.path")
    try:
        _, _, dtype = load_module(path, "cpu")
    except GpubatchError as exc:
        raise SpecError([("model.path", str(exc))]) from None
    reason = precision_problem(job.model.path, dtype, job.model.precision)
    if reason and job.model.validation.on_fail == "error":
        raise SpecError([("model.precision", refusal(reason))])


def _precision_problem(job: JobSpec, inp: OnnxInput) -> tuple[str, str] | None:
    """int8/fp8 quantization calibrates a float32 graph; on a float16 one ONNX Runtime's
    quantizer fails, which ``run`` refuses (``on_fail: error``) after drawing calibration items."""
    if job.model.precision not in ("int8", "fp8") or inp.dtype == "float32":
        return None
    if job.model.validation.on_fail != "error":
        return None  # run falls back to fp32 and its report says why
    return ("model.precision", f"{job.model.precision} quantizes a float32 model, but {job.model.path}'s input "
                               f"{inp.name!r} is {inp.dtype}; export the model in float32, or set "
                               "model.validation.on_fail: fp32 to run it unquantized")


def check_model_input(job: JobSpec, tuning: bool = False) -> None:
    """Refuse, before any work, a model whose input disagrees with the job's batches: item
    shape, element type, or a fixed batch dimension the batches do not match (any fixed one,
    when ``tuning``: `gpubatch tune` would sweep sizes it cannot take)."""
    model = _onnx_file(job)
    if model is None:
        check_torch_file(job)
        return
    refuse_unreadable_outputs(model, "model.path", job.model.path)
    scalars = scalar_outputs(model)
    if scalars:
        raise SpecError([("model.path", (
            f"{job.model.path}'s output {scalars[0]!r} is one value per call, with no batch axis: gpubatch "
            "maps outputs to items along their first axis; export the model with outputs of shape (N, ...)"))])
    inputs = model_inputs(model)
    if len(inputs) > 1:
        raise SpecError([("model.path", (
            f"{job.model.path} takes {len(inputs)} inputs ({', '.join(n for n, _ in inputs)}), but gpubatch "
            "feeds one batch, to the first; export a model with one input (fix the others as "
            "constants, or fold them into the graph)"))])
    inp = model_first_input(model)
    shape = _shape_problem(job, inp)
    if shape:
        raise SpecError([("model.path", shape)])
    problems = [p for p in (_dtype_problem(job, inp), _batch_problem(job, inp, tuning), _precision_problem(job, inp)) if p]
    if problems:
        raise SpecError(problems)


def check_reference(job: JobSpec) -> None:
    """A local reference's index is checked against the FASTA now, as planning would check it."""
    w = job.windows
    if job.kind != "genome" or w is None or is_remote(w.reference):
        return
    from gpubatch.sources.genome.source import GenomeSource

    GenomeSource.contig_table(w.reference, job.input.storage)


def check_resources(job: JobSpec, profile: dict[str, Any] | None = None) -> None:
    """Refuse what is known to exhaust the machine before a slide is read: more local workers
    than cores (unless ``run.force_workers``); batches, read units and read-ahead in flight over
    a worker's memory (``worker_memory.memory_problem``; for ``batch_size: auto``, the smallest
    batch the tuner can choose, which sweeps no further than :func:`largest_batch_in_memory`);
    and a reduced precision's sample over the client's."""
    from gpubatch.runtime.cluster import cores_words, cpu_count, load_profile

    prof = profile if profile is not None else load_profile(job.run.profile)
    problems: list[tuple[str, str]] = []
    asked = workers_asked(job, prof)
    if prof.get("cluster") in ("local", "local-cuda") and asked and asked > cpu_count() and not job.run.force_workers:
        problems.append(("run.workers", f"{asked} worker processes on a machine with {cores_words()}; "
                                        "lower it, or set run.force_workers: true"))
    problems += [p for p in (memory_problem(job, prof), sample_problem(job)) if p is not None]
    if problems:
        raise SpecError(problems)


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


def _wide_without_zarr(job: JobSpec, outputs: dict[str, list[int | None]]) -> list[tuple[str, str]]:
    """A tile output parquet cannot hold as columns (a map, an embedding wider than
    MAX_PARQUET_WIDTH) goes to zarr only: with parquet alone it was left out, and the run exited 0
    with nothing but the index columns."""
    if "zarr" in job.output.formats:
        return []
    item_shapes = {name: dims[1:] for name, dims in outputs.items()}
    return [("output.formats", f"output {name!r} has {_per_item(shape)} per tile, more than parquet's "
                               f"{MAX_PARQUET_WIDTH} columns take: only zarr holds it; add zarr to output.formats")
            for name, shape in item_shapes.items()
            if None not in shape and not parquet_holds(tuple(int(d) for d in shape if d is not None))]


def _per_item(shape: list[int | None]) -> str:
    return " x ".join(str(d) for d in shape) + " values"


def check_track_outputs(job: JobSpec) -> None:
    """Refuse reductions of outputs the model lacks (or lacks in rank or bins), scores with
    nothing to score, and outputs with nowhere to go (whole tracks, wide tile outputs, without zarr)."""
    model = _onnx_file(job)
    if model is None:
        return
    outputs = model_outputs(model)
    if job.windows is None:
        problems = _wide_without_zarr(job, outputs)
    else:
        problems = _track_problems(job, outputs) + _whole_without_zarr(job, outputs)
    if problems:
        raise SpecError(problems)


def check_environment() -> None:
    """Refuse a malformed gpubatch variable the workers would read (they inherit this environment)."""
    check_switches()


def preflight(job: JobSpec, profile: dict[str, Any] | None = None, *, tuning: bool = False) -> None:
    """Everything ``run`` would refuse before planning: files, extras, storage credentials, the
    models' inputs and outputs, the reference's index, the machine's cores and memory.

    ``profile`` is the cluster profile (its ``storage`` may hold credentials); by default the
    one the job names. ``tuning``: `gpubatch tune` asks (its refusals speak of its sweep).
    """
    if profile is None:
        from gpubatch.runtime.cluster import load_profile

        profile = load_profile(job.run.profile)
    check_file_hosts(job)
    check_local_files(job)
    check_credentials(job, profile)
    check_model_input(job, tuning)
    check_precision_backend(job)
    check_track_outputs(job)
    check_reference(job)
    check_slide_model(job, _onnx_file(job))
    check_resources(job, profile)
    check_environment()


def check_cluster(profile: dict[str, Any]) -> None:
    """The worker jobs a batch profile would submit, tried without submitting (sbatch --test-only),
    where the run starts its own cluster (not `tune`, nor a run on an existing scheduler)."""
    if profile.get("cluster") == "slurm":
        from gpubatch.runtime.slurm import check_profile

        check_profile(dict(profile.get("slurm") or {}))


@dataclass
class PlanCheck:
    """What ``validate`` learned by planning the job as ``run`` would."""

    shards: int
    items: int | None
    failed: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def refuse_empty_plan(shards: Sequence[Shard], failed: list[dict[str, str]]) -> None:
    """A plan whose every input failed (a remote glob that matches nothing, a variant file with
    nothing to score) is refused before anything starts, the same in ``validate`` and ``run``."""
    if failed and not shards:
        raise SpecError([(f["input"], f["error"]) for f in failed] + [("", "nothing would run")])


def check_output(job: JobSpec, *, resume: bool = False, overwrite: bool = False) -> None:
    """What ``run`` refuses of its output before it plans, checked without writing there: a
    folder that is not gpubatch's (foreign files, a home folder, a file), a run writing it now
    (a live lease), and committed shards this run may not continue (no --resume, another
    spec's or model's, or parts whose columns this run's would not merge with). Without this a job validated, then its run stopped at once on exit 2."""
    from gpubatch.outputs.lease import check_output_folder, refuse_if_held
    from gpubatch.outputs.store import OutputStore
    from gpubatch.runtime.resume import refuse_committed, refuse_unmergeable_parts

    store = OutputStore(job.output.uri, job.output.storage)
    if not check_output_folder(store, job.output.uri):
        return  # empty or new: nothing there to refuse
    refuse_if_held(store, job.run.lease_stale_s)
    if refuse_committed(store, job, resume=resume, overwrite=overwrite) and not overwrite:
        refuse_unmergeable_parts(store, job)  # what a run's resume refuses as it reads them


def _plan_and_open(job: JobSpec, profile: dict[str, Any], open_inputs: bool,
                   ) -> tuple[Sequence[Shard], list[dict[str, str]], list[str]]:
    """The plan, as ``run`` makes it, and (``open_inputs``) every input opened as its shard
    would open it: the shards, the inputs that would fail, and the notes on the data."""
    from gpubatch.io.storage_profile import storage_profile

    source = get_source(job.kind)
    shards, failed = source.plan(job)
    refuse_empty_plan(shards, failed)
    notes = list(source.data_quality(job, shards, []).get("notes") or [])
    if open_inputs:
        with storage_profile(profile):
            would_fail, opened_notes = source.check_inputs(job, shards)
        failed, notes = failed + would_fail, notes + opened_notes
        if would_fail and len(would_fail) == len(shards):
            raise SpecError([(f["input"], f["error"]) for f in failed] + [("", "no input would run")])
    return shards, failed, notes


def validate_job(job: JobSpec, *, open_inputs: bool = True, profile_name: str | None = None,
                 resume: bool = False, overwrite: bool = False) -> PlanCheck:
    """``preflight`` and the output's checks, then the plan (headers, variant REF checks, globs):
    every refusal ``run`` (with the same --profile, --resume, --overwrite) makes before its first
    shard. A job whose plan leaves nothing to run is refused too.
    ``open_inputs``: also open every input as its shard would (slides), to list the ones a run
    would quarantine; a job none of whose inputs would run is refused."""
    from gpubatch.runtime.cluster import load_profile

    profile = load_profile(profile_name or job.run.profile)
    with run_policy(policy_for(job.run)):  # every request retried as the run's would be
        with versions_asked_once():  # a remote model: one HEAD for preflight's checks and the output's
            preflight(job, profile)
            check_cluster(profile)
            check_output(job, resume=resume, overwrite=overwrite)
        shards, failed, notes = _plan_and_open(job, profile, open_inputs)
    hints = [s.n_items_hint for s in shards]
    items = sum(h for h in hints if h is not None) if all(h is not None for h in hints) else None
    return PlanCheck(len(shards), items, failed, notes)
