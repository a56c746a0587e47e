"""Job spec and profile models and YAML loading (``--set`` overrides: core.overrides).

The spec is validated in full before any work starts: an overnight run that dies at 3 a.m. on a
typo is the failure this module exists to prevent. Every error names the field path (``tiles.size``)
and what would be valid (core.spec_problems words pydantic's errors).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gpubatch.core.errors import SpecError
from gpubatch.core.overrides import apply_overrides
from gpubatch.core.spec_problems import validation_problems
from gpubatch.core.yaml_text import read_yaml
from gpubatch.io.uris import GLOB_PREFIX, is_remote, split_glob

#: the largest model.batch_size: a batch is one model call, and its tensors must fit a device
MAX_BATCH = 65536
#: the most intra-op threads a worker's model may ask for: `model.threads: 100000` made ONNX
#: Runtime start tens of thousands of threads (17 GB resident) and the run never started
MAX_THREADS = 1024
#: the most worker processes a run may ask for (a SLURM run of this many is already a large one):
#: `run.workers: 1e30`-sized numbers failed with a traceback in the cluster's start
MAX_WORKERS = 10_000
#: the longest windows.stride: no contig is this long, and past int64 the plan overflowed
MAX_STRIDE = 1 << 40
#: heartbeats a lease may miss before it is stale (run.lease_stale_s against run.heartbeat_s);
#: `gpubatch status` calls a run whose status.json missed this many beats interrupted
MISSED_BEATS = 3
#: the shortest run.heartbeat_s: each beat rewrites the lease and status.json in the output (a
#: request each on object storage); `heartbeat_s: 0.001` validated and the run only rewrote them
MIN_HEARTBEAT_S = 0.1
#: the shortest run.shard_timeout: counted from a shard's submission, it covers the wait behind the
#: shard queued ahead of it, the worker's opening of the input and its model's load, and deadlines
#: are looked at once a second; `shard_timeout: 0.001` validated and every shard timed out
MIN_SHARD_TIMEOUT_S = 5.0
#: the shortest run.worker_timeout: the submitter looks for workers about once a second and a
#: worker process takes seconds to start and connect; `worker_timeout: 0.001` validated and a run
#: failed a second after it found no worker there (one starting, or being replaced)
MIN_WORKER_TIMEOUT_S = 2.0
#: the shortest run.queue_timeout: SLURM is asked about pending worker jobs every 10 s
#: (runtime.slurm.ASK_EVERY_S), so a shorter wait for a busy queue ends before squeue is asked again
MIN_QUEUE_TIMEOUT_S = 10.0
#: the shortest run.storage_max_wait_s: every storage retry, a throttled one too, waits at most it
MIN_STORAGE_WAIT_S = 0.1
#: the shortest run.lease_stale_s: MISSED_BEATS heartbeats at the shortest run.heartbeat_s
MIN_LEASE_STALE_S = round(MISSED_BEATS * MIN_HEARTBEAT_S, 9)  # 0.3, not 0.30000000000000004
#: run.* durations with a floor, and why a shorter one means nothing: the spec model refuses one
#: under its floor (so `validate` as `run` does), naming the field, the floor, why and the fix
DURATION_FLOORS: dict[str, tuple[float, str]] = {
    "shard_timeout": (MIN_SHARD_TIMEOUT_S, "it counts from a shard's submission, over the worker's opening of "
                      "the input and loading of the model, so every shard would time out and its worker be "
                      "restarted"),
    "heartbeat_s": (MIN_HEARTBEAT_S, "each heartbeat rewrites the lease and status.json in the output (a "
                    "storage request each), and more often the run would spin rewriting them"),
    "worker_timeout": (MIN_WORKER_TIMEOUT_S, "workers are looked for about once a second and a worker process "
                       "takes seconds to start and connect, so the run would fail within a second of finding "
                       "no worker there (one starting, or being replaced)"),
    "queue_timeout": (MIN_QUEUE_TIMEOUT_S, "SLURM is asked about pending worker jobs every 10 s, so the wait "
                      "for a busy queue would end before squeue was asked again"),
    "storage_max_wait_s": (MIN_STORAGE_WAIT_S, "every storage retry waits at most this, a throttled one too, "
                           "so a server that asked for fewer requests would get its retries back to back"),
    "lease_stale_s": (MIN_LEASE_STALE_S, f"a lease is stale after {MISSED_BEATS} missed heartbeats, and "
                      f"run.heartbeat_s is at least {MIN_HEARTBEAT_S:g} s, so a live run's own lease would look "
                      f"stale between its beats"),
}


class _Strict(BaseModel):
    # strict: `batch_size: true` is not 1 and `integrity: 1` not a word; no NaN or infinity
    # anywhere (a NaN std gives all-NaN predictions, `mpp: .inf` no tiles)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        """A section written with nothing under it (``run:``, every key commented out) is YAML's
        null: where the section has defaults it is taken as left out, not refused."""
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if v is not None or k not in _defaulted_sections(cls)}


def _defaulted_sections(model: type[BaseModel]) -> set[str]:
    """The fields of ``model`` that are sections (models) of their own, with defaults."""
    return {name for name, field in model.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
            and not field.is_required()}


class TissueSpec(_Strict):
    method: Literal["otsu", "none"] = "otsu"
    min_fraction: float = Field(0.5, ge=0.0, le=1.0)


class TilesSpec(_Strict):
    size: int = Field(224, ge=1, le=16384)
    mpp: float | None = Field(0.5, gt=0.0, le=1000.0, description="microns per pixel (1000: a millimetre)")
    level: int | None = Field(None, ge=0)
    mpp_fallback: float | None = Field(
        None, ge=0.01, le=10.0,
        description="level-0 microns per pixel assumed for slides that record none (or an implausible "
                    "resolution tag); within 0.01-10, the scan resolutions a tag may give: outside, "
                    "a typo (0.0025 for 0.25) made every slide 'smaller than one tile', and exit 0")
    overlap: float = Field(0.0, ge=0.0, lt=1.0)
    tissue: TissueSpec = Field(default_factory=TissueSpec)
    read_block: int = Field(
        2048, ge=64, description="edge in pixels of one read at the chosen level (big read, then slice)"
    )
    decoder: Literal["cpu", "gpu"] = Field(
        "cpu", description="JPEG tile decode: libjpeg-turbo on the host, or nvImageCodec on the GPU")
    max_level_pixels: int = Field(
        1 << 36, ge=1, description="largest pyramid level (width x height) read, the tissue "
                                   "thumbnail's included; a slide claiming more is refused")
    max_tiles: int = Field(4_000_000, ge=1, description="tiles one slide may yield")
    max_read_bytes: int = Field(
        256 << 20, ge=1 << 20, description="decoded bytes one read unit may hold, whatever the "
                                           "overlap (a block holds fewer tiles to stay under it)")
    integrity: Literal["strict", "lenient"] = Field(
        "strict", description="strict: corrupt tile data (decoder warnings) quarantines the slide; "
                              "slides openslide reads are checked where their JPEG tiles can be "
                              "located, else noted as unchecked; lenient: decode what the decoder can")

    @model_validator(mode="after")
    def _mpp_or_level(self) -> TilesSpec:
        if self.level is not None and "mpp" not in self.model_fields_set:
            object.__setattr__(self, "mpp", None)
        if self.level is not None and self.mpp is not None:
            raise ValueError("give either `mpp` or `level`, not both")
        if self.level is None and self.mpp is None:
            raise ValueError("give `mpp` (target microns per pixel) or `level` (pyramid level)")
        return self


class EncodingSpec(_Strict):
    layout: Literal["NLC", "NCL"] = "NLC"
    n_value: float = 0.0
    dtype: Literal["float32", "float16"] = "float32"


#: what a blank ``windows`` path is told
BLANK = {"reference": "is empty: give the FASTA (with its .fai) or genome zarr, a path or URL",
         "regions": "is empty: give a BED file, a list of 'chr:start-end' or contig names, or 'genome'",
         "variants": "is empty: give the variant file, or leave it out (or null) to tile windows instead"}


class WindowsSpec(_Strict):
    reference: str
    regions: str | list[str] = "genome"
    variants: str | None = None
    length: int = Field(1000, ge=1, le=10_000_000)
    stride: int | None = Field(None, ge=1, le=MAX_STRIDE, description=(
        "step between window starts (default: length); above length, the bases between windows are "
        "not scored (a note says how many)"))
    reverse_complement: Literal["none", "average"] = "none"
    encoding: EncodingSpec = Field(default_factory=EncodingSpec)
    windows_per_shard: int = Field(4096, ge=1)
    chunk_bases: int = Field(1_048_576, ge=1024, description="bases read in one call, then sliced")
    max_bad_records: float = Field(
        0.05, ge=0.0, le=1.0,
        description="share of the BED or variant file's records that may be malformed or off the reference: "
                    "those are left out and listed in report.json's failed (exit 3); more, and the job is refused")
    max_ref_mismatch: float = Field(
        0.05, ge=0.0, le=1.0,
        description="share of variants whose REF may disagree with the reference before the job is refused")
    variant_scores: list[Literal["sad", "log2fc", "maxabs"]] = Field(
        default_factory=list, description="per-track scores of alt against ref for (N, bins, tracks) outputs")
    pseudocount: float = Field(1.0, ge=0.0, description="c in log2fc = log2((sum(alt) + c) / (sum(ref) + c))")
    track_columns: int = Field(
        1024, ge=0, le=65536, description="per-track parquet columns at most per reduced or scored output; wider: zarr only")

    @field_validator("reference", "regions", "variants")
    @classmethod
    def _not_blank(cls, v: str | list[str] | None, info: ValidationInfo) -> str | list[str] | None:
        """A blank path or an empty list of regions is refused: ``variants: ""`` (an unset
        variable in a templated spec, ``--set windows.variants=``) ran a windows job over the
        whole genome instead of scoring variants, and ``regions: []`` ran nothing, exit 0."""
        if isinstance(v, list) and not v:
            raise ValueError("is an empty list: give regions ('chr:start-end' or contig names), "
                             "a BED file, or 'genome'")
        texts = [v] if isinstance(v, str) else v or []
        if any(not text.strip() for text in texts):
            raise ValueError("holds an empty region" if isinstance(v, list) else BLANK[info.field_name or ""])
        return v

    @model_validator(mode="after")
    def _regions_or_variants(self) -> WindowsSpec:
        # variant mode scores every record of the file: regions beside it were ignored, silently
        if self.variants is not None and self.regions != "genome":
            raise ValueError("windows.regions and windows.variants do not combine: variant mode scores "
                             "every record of windows.variants. Keep the records in your regions first "
                             "(`bcftools view -R regions.bed`), and leave windows.regions out")
        return self


class InputNorm(_Strict):
    mean: list[float] = Field(default_factory=lambda: [0.485, 0.456, 0.406], min_length=3, max_length=3)
    std: list[float] = Field(default_factory=lambda: [0.229, 0.224, 0.225], min_length=3, max_length=3)
    layout: Literal["NCHW", "NHWC"] = "NCHW"

    @field_validator("std")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(s <= 0 for s in v):
            raise ValueError("every std must be > 0")
        return v


class CalibrationSpec(_Strict):
    items: int = Field(256, ge=1)


class ValidationSpec(_Strict):
    items: int = Field(256, ge=1)
    min_agreement: float = Field(0.99, ge=0.0, le=1.0)
    on_fail: Literal["error", "fp32"] = "error"
    task: Literal["auto", "classifier", "regressor"] = "auto"


class FallbackSpec(_Strict):
    max_prob_below: float = Field(0.85, gt=0.0, le=1.0)


class ReduceSpec(_Strict):
    """How one (N, bins, tracks) output becomes per-track columns (``model.reduce.OUTPUT``)."""

    how: Literal["sum", "mean", "max", "center"] | None = Field(
        None, description="over the bins (or the `bins` central ones); center: their mean, 1 bin by default")
    bins: int | None = Field(None, ge=1, description="reduce the K central bins only")
    keep: bool = Field(False, description="also keep the whole (N, bins, tracks) array in zarr")

    @model_validator(mode="after")
    def _something_to_do(self) -> ReduceSpec:
        if self.how is None and not self.keep:
            raise ValueError("give `how` (sum | mean | max | center), or `keep: true` to keep the whole array")
        if self.how is None and self.bins is not None:
            raise ValueError("`bins` needs `how` (sum | mean | max | center)")
        return self


class ModelSpec(_Strict):
    path: str
    backend: Literal["auto", "onnxruntime", "tensorrt", "torch"] = "auto"
    precision: Literal["fp32", "fp16", "bf16", "int8", "fp8"] = "fp32"
    batch_size: int | Literal["auto"] = Field(64, description="items per model call (<= 65536), or auto")
    input: InputNorm = Field(default_factory=InputNorm)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    fallback: FallbackSpec | None = None
    threads: int | None = Field(None, ge=1, le=MAX_THREADS, description="intra-op threads per worker process; default: the worker host's usable cores / its worker processes")
    reduce: dict[str, ReduceSpec] = Field(
        default_factory=dict, description="per output of shape (N, bins, tracks): a reduction over bins")
    track_layout: Literal["NLT", "NTL"] = Field(
        "NLT", description="axes of rank-3 outputs: (N, bins, tracks) or (N, tracks, bins)")

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= MAX_BATCH:
            raise ValueError(f"must be between 1 and {MAX_BATCH}, or 'auto', got {v}")
        return v


class SlideModelSpec(_Strict):
    """A slide-level head (attention MIL) run on each slide's whole bag of tile features."""

    path: str
    backend: Literal["auto", "onnxruntime", "tensorrt", "torch"] = "auto"
    features: str | None = Field(
        None, description="the tile model output that forms each slide's bag; default its first output")


def _not_blank(uri: str) -> str:
    """An input entry that names something: a blank one resolved to the spec's own folder."""
    if not uri.strip():
        raise ValueError("is blank: give a slide's path, glob or URL, or leave the entry out")
    return uri


class InputSpec(_Strict):
    uris: list[Annotated[str, AfterValidator(_not_blank)]] = Field(default_factory=list)
    storage: dict[str, Any] = Field(default_factory=dict)
    access: Literal["stream", "stage", "auto"] = "auto"
    read_ahead_mb: int = Field(64, ge=0, le=65536, description=(
        "streamed slides: at most this many MB of tile bytes fetched ahead of the reader threads "
        "(as much as latency x bandwidth needs, within it); 0 turns reading ahead off"))

    @field_validator("uris", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class OutputSpec(_Strict):
    uri: str
    formats: list[Literal["zarr", "parquet", "geojson"]] = Field(default_factory=lambda: ["zarr", "parquet"])  # type: ignore[arg-type]
    storage: dict[str, Any] = Field(default_factory=dict, description="fsspec options for output.uri")
    heatmap: str = Field(
        "auto", min_length=1,
        description="what colours heatmaps/<slide>.png: auto (attention with a slide model, else the "
                    "top class probability), none, or a column of predictions.parquet")


class RunSpec(_Strict):
    profile: str = "local"
    readers: int = Field(4, ge=1, le=256)
    prefetch_batches: int = Field(8, ge=1, le=1024)
    retries: int = Field(2, ge=0, le=100)
    storage_attempts: int = Field(5, ge=1, le=50, description="tries per storage request (transient errors)")
    storage_max_wait_s: float = Field(
        30.0, le=600, description="the longest one storage retry waits: a throttling server's "
                                          "Retry-After is honoured up to it, and throttled backoff stops growing there")
    stage_ahead: int = Field(2, ge=0, le=64, description="slides each worker process stages or opens ahead")
    workers: int | None = Field(None, ge=1, le=MAX_WORKERS, description="worker processes; default from the profile")
    worker_timeout: float = Field(
        1800.0, description="seconds without any worker (none arrived, or all were lost) before the run fails")
    queue_timeout: float = Field(
        86400.0, description="seconds a run waits for workers while every worker job is pending in a busy "
                                   "queue, for reasons the queue clears by itself (SLURM: Priority, Resources, "
                                   "a group limit, a reservation), before it fails; run.worker_timeout bounds the rest")
    shard_timeout: float = Field(
        21600.0, description="seconds a shard may go without a result, from its submission, before its "
                                   "worker is restarted and the shard counts as failed (retried, then quarantined)")
    heartbeat_s: float = Field(10.0, le=3600, description="seconds between lease and status.json heartbeats")
    lease_stale_s: float = Field(
        120.0, description="a lease whose heartbeat is older than this belongs to a dead run and is taken over")
    force_workers: bool = Field(False, description="allow more local workers than the machine has cores")
    max_worker_memory: int | None = Field(
        None, ge=1 << 20, description="bytes one worker's batches and read units in flight may hold; "
                                      "default: the machine's memory (its container's memory limit where "
                                      "lower) shared among its workers")

    @field_validator(*DURATION_FLOORS)
    @classmethod
    def _not_under_the_floor(cls, v: float, info: ValidationInfo) -> float:
        """A timeout, wait or period too short to mean anything is refused, not run: every shard
        would time out, the run fail waiting for workers, or the heartbeat only rewrite its files."""
        field = str(info.field_name)
        floor, why = DURATION_FLOORS[field]
        if v < floor:
            default = cls.model_fields[field].default
            raise ValueError(f"{v:g} s is under the {floor:g} s floor: {why}; set run.{field} "
                             f"to {floor:g} or more (default {default:g})")
        return v

    @field_validator("lease_stale_s")
    @classmethod
    def _lease_outlives_heartbeats(cls, v: float, info: ValidationInfo) -> float:
        """A lease staler than a few heartbeats is a dead run's; one that goes stale between two
        beats of a live run was taken over by the next run into the output, and the live one
        stopped at its next heartbeat (exit 1), blaming a suspension that never happened."""
        beat = info.data.get("heartbeat_s")
        # rounded: 3 x 0.1 is 0.30000000000000004, and `lease_stale_s: 0.3` was told to be 0.3 or more
        least = round(MISSED_BEATS * beat, 9) if beat is not None else 0.0
        if v < least:
            raise ValueError(
                f"{v:g} s is under {MISSED_BEATS} x run.heartbeat_s ({beat:g} s): a live run's own lease "
                f"would look stale between its heartbeats and the next run into the output would take it "
                f"over; raise run.lease_stale_s to {least:g} or more, or lower run.heartbeat_s")
        return v


class JobSpec(_Strict):
    name: str = "job"
    kind: Literal["slides", "genome"] = "slides"
    input: InputSpec = Field(default_factory=InputSpec)
    tiles: TilesSpec = Field(default_factory=TilesSpec)
    windows: WindowsSpec | None = None
    model: ModelSpec
    slide_model: SlideModelSpec | None = None
    output: OutputSpec
    run: RunSpec = Field(default_factory=RunSpec)
    #: the YAML file this spec was loaded from (``load_job``), for the report; not part of the spec
    _path: str | None = PrivateAttr(default=None)

    @property
    def spec_path(self) -> str | None:
        return self._path

    @model_validator(mode="after")
    def _kind_matches(self) -> JobSpec:
        if self.kind == "slides" and not self.input.uris:
            raise ValueError("kind: slides needs input.uris (paths, globs or URLs of slides)")
        if self.kind != "slides" and self.slide_model is not None:
            raise ValueError("slide_model is a second stage over a slide's tiles: kind: slides only")
        if self.kind == "genome" and self.windows is None:
            raise ValueError("kind: genome needs a `windows` section (reference, regions, length)")
        return self

    @model_validator(mode="after")
    def _tracks_fit_the_kind(self) -> JobSpec:
        if self.model.reduce and self.kind != "genome":
            raise ValueError("model.reduce (reductions of track outputs over bins) needs kind: genome")
        if self.windows is not None and self.windows.variant_scores and not self.windows.variants:
            raise ValueError("windows.variant_scores needs windows.variants (a VCF of variants to score)")
        return self

    def spec_hash(self) -> str:
        """sha256 of the resolved spec, recorded in the audit trail."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def result_fields(self) -> dict[str, Any]:
        """The spec fields that change results (and how they are split into shards): what a
        resumed run must share with the committed shards it keeps. Where and how fast a run goes
        (profile, readers, batch size, threads, storage options, the output's location) is not
        among them; the model file is checked by its sha256, not by its path."""
        data = self.model_dump(mode="json")
        model = {k: data["model"][k] for k in ("backend", "precision", "input", "calibration", "validation",
                                              "fallback", "reduce", "track_layout") if k in data["model"]}
        tiles = {k: v for k, v in data["tiles"].items() if k != "read_block"} if self.kind == "slides" else None
        windows = ({k: v for k, v in data["windows"].items() if k not in ("chunk_bases", "max_bad_records")}
                   if data.get("windows") else None)
        if windows is not None:
            windows["regions_version"] = self._regions_version()
            windows["reference_version"] = self._reference_version()
        return {"kind": self.kind, "tiles": tiles, "windows": windows, "model": model,
                "formats": sorted(self.output.formats), "slide_model": self._slide_model_fields()}

    def _regions_version(self) -> str | None:
        """A BED file's version (a local file's sha256, an object's ETag): a windows shard is a
        run of the plan's windows, so a BED mended between a run and its ``--resume`` (a line
        fixed, added or removed) moves every later shard's windows, and kept shards would lose
        some and double others. None for region strings and ``genome``."""
        from gpubatch.io.storage import file_version

        regions = self.windows.regions if self.windows is not None else None
        if not isinstance(regions, str) or regions == "genome":
            return None
        return file_version(regions, self.input.storage)

    def _reference_version(self) -> str | None:
        """The reference's version with its indexes': the FASTA's (size and mtime, or ETag), its
        ``.fai``'s and ``.gzi``'s (sha256, or ETag); a genome zarr's metadata's. A shard records
        the FASTA's identity alone, so an index rebuilt between a run and its ``--resume`` (other
        offsets, lengths or blocks: other bases in the same windows) went unseen; now it is a
        changed result field. None where nothing is found (the plan names what is missing).
        A remote index's version is asked once per run (io.localized.run_file_version): the plan
        reads the index at that version, with no HEAD of its own."""
        from gpubatch.io.localized import run_file_version
        from gpubatch.io.storage import file_version
        from gpubatch.io.uris import suffixed
        from gpubatch.sources.genome.reference import zarr_marker

        if self.windows is None:
            return None
        uri, storage = self.windows.reference, self.input.storage
        fasta = file_version(uri, storage, digest=False)
        if fasta is None:  # a genome zarr (folder or prefix): its metadata is written last by the ingest
            meta = file_version(zarr_marker(uri), storage, digest=False)
            return f"zarr.json {meta}" if meta else None
        found = ((ext, run_file_version(suffixed(uri, f".{ext}"), storage)) for ext in ("fai", "gzi"))
        return "; ".join([f"fasta {fasta}", *(f"{ext} {v}" for ext, v in found if v)])

    def _slide_model_fields(self) -> dict[str, Any] | None:
        """The slide head's settings and its file's sha256 (its outputs are committed with each
        shard, so another head must not meet them on --resume). A remote head's is its copy's at
        the version the run asked (io.localized: fetched by preflight, no request more); its URI
        stood in for it, so a head written over between a run and its resume went unseen."""
        if self.slide_model is None:
            return None
        from gpubatch.core.files import file_sha256
        from gpubatch.io.localized import localize

        path = self.slide_model.path
        if is_remote(path):
            path = localize(path, self.input.storage)
        return {"backend": self.slide_model.backend, "features": self.slide_model.features,
                "sha256": file_sha256(path) if os.path.isfile(path) else path}

    def result_hash(self, fields: dict[str, Any] | None = None) -> str:
        """sha256 of :meth:`result_fields`, or of ``fields`` when the caller has them already: a
        run computes them once (a remote BED's or reference's version is a HEAD each time)."""
        text = json.dumps(fields if fields is not None else self.result_fields(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# loading


def parse_job(data: dict[str, Any], source: str | None = None, base_dir: Path | None = None) -> JobSpec:
    """Validate a job mapping; relative file paths are resolved against ``base_dir``."""
    if not isinstance(data, dict):
        raise SpecError("the job spec must be a YAML mapping of keys to values", source)
    try:
        job = JobSpec.model_validate(data)
    except ValidationError as exc:
        problems = validation_problems(exc, JobSpec)
        raise SpecError(problems, source) from None
    if base_dir is not None:
        job = _resolve_paths(job, base_dir)
    return job


def _resolve(value: str, base_dir: Path) -> str:
    value, glob = split_glob(value)
    prefix = GLOB_PREFIX if glob else ""
    if is_remote(value) or value.startswith("file://") or os.path.isabs(value):
        return prefix + value
    return prefix + str((base_dir / value).resolve())


def _resolve_paths(job: JobSpec, base_dir: Path) -> JobSpec:
    data = job.model_dump(mode="python")
    data["input"]["uris"] = [_resolve(u, base_dir) for u in job.input.uris]
    data["model"]["path"] = _resolve(job.model.path, base_dir)
    if data.get("slide_model"):
        data["slide_model"]["path"] = _resolve(job.slide_model.path, base_dir)  # type: ignore[union-attr]
    data["output"]["uri"] = _resolve(job.output.uri, base_dir)
    w = data.get("windows")
    if w:
        w["reference"] = _resolve(w["reference"], base_dir)
        if isinstance(w["regions"], str) and w["regions"] != "genome" and ":" not in w["regions"]:
            w["regions"] = _resolve(w["regions"], base_dir)
        if w.get("variants"):
            w["variants"] = _resolve(w["variants"], base_dir)
    return JobSpec.model_validate(data)


def load_job(path: str | Path, overrides: dict[str, Any] | list[str] | None = None) -> JobSpec:
    """Load, override and validate a job spec file; paths inside are relative to the file."""
    data = read_yaml(path)
    if overrides:
        data = apply_overrides(data, overrides)
    job = parse_job(data, str(path), Path(path).resolve().parent)
    job._path = str(Path(path).resolve())
    return job
