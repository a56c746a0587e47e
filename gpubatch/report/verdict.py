"""The bottleneck verdict: which of the four layers practitioners profile limited the run.

The layers are model compute, memory transfer, batching and storage/host transport; the verdict
names one with the evidence and the concrete next move. Starvation bands are the TensorFlow
profiler's: under 5% not input-bound, 5-20% moderately, 20%+ input-bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gpubatch.report.gap import OTHER_SHARE, gap
from gpubatch.report.words import (
    BAND_LOW,
    BAND_NOT_JUDGED,
    BAND_NOT_MEASURED,
    band,
    cores_sentence,
    ms_words,
    pct,
)

LAYER_COMPUTE = "model compute"
LAYER_TRANSFER = "memory transfer"
LAYER_BATCHING = "batching"
LAYER_STORAGE = "storage/host transport"
LAYERS = (LAYER_COMPUTE, LAYER_TRANSFER, LAYER_BATCHING, LAYER_STORAGE)
# Which layer each timed part belongs to. "open" is per-shard setup (slide open + tissue mask):
# host work before the pipeline starts, so it is charged to storage/host transport.
PART_LAYERS = {
    "storage": LAYER_STORAGE, "open": LAYER_STORAGE, "decode": LAYER_STORAGE,
    "resample": LAYER_STORAGE, "slice": LAYER_STORAGE, "write": LAYER_STORAGE, "commit": LAYER_STORAGE,
    "preprocess": LAYER_TRANSFER,
    "transfer": LAYER_TRANSFER, "compute": LAYER_COMPUTE,
}
REDUCED_PRECISIONS = ("fp16", "bf16", "int8", "fp8")
FLOAT64 = "fp64"  # report.json's precision for a model computing in float64 (a float64 torch module)
TRANSFER_SHARE = 0.25   # transfer + preprocess against compute: above this, moving data dominates
BLOCKED_SHARE = 0.05    # model stage waiting on the writer: above this, output is the limit
FILL_MIN = 0.75         # mean batch fill below this: batches are under-filled
SMALL_BATCH = 16        # batches smaller than this rarely fill an accelerator
SMALL_BATCH_BYTES = 4 << 20  # ...unless each call still carries this much input (100 kb windows)
# ...or, on a run with no device (no host-to-device copies), each call computes this long: per-call
# overhead on the host is well under a millisecond, so a heavy model's batch of 4 (21 ms a call)
# ran no slower than its batch of 32
LONG_HOST_CALL_S = 0.005
SHORT_RUN_SHARE = 0.5   # fixed start-up above this share of worker time: figures are noisy
# Below either of these a run is too small to judge: the first batch waits for the first read
# and a warm-up, so starvation over a handful of batches says more about start-up than about
# the pipeline's steady state. docs/spec.md ("The verdict") documents both.
MIN_BATCHES = 5         # model batches timed in this run
MIN_MODEL_S = 1.0       # seconds the model stage ran (busy + starved) in this run
MAX_LISTED_ERRORS = 3
#: verdict["state"]: a verdict was given, or why not
STATE_VERDICT, STATE_FAILED, STATE_EMPTY, STATE_RESUMED, STATE_TOO_SMALL = (
    "verdict", "failed", "empty", "nothing-ran", "too-small")
# The workers' cores this busy while shards ran are full: more threads only take turns on them.
CORES_FULL = 0.90
# The writer is named for the model's wait on it only when its own work explains that wait: its
# busy time at least this share of the model's blocked time. Below it the wait is each batch's
# hand-off (a thread waking on a loaded host), which no change of output formats shortens.
WRITER_EXPLAINS = 0.5


@dataclass
class _Figures:
    """The numbers the verdict rules read, pulled out of a summary once (missing keys are 0)."""

    starvation: float
    storage: float
    open: float
    decode: float
    preprocess: float
    transfer: float
    compute: float
    model_busy: float
    model_blocked: float
    model_starved: float
    fill: float
    batch_size: int
    precision: str
    readers: int
    items_per_shard: float
    p99_ms: float | None
    fell_back: str  # the reduced precision asked for that did not run, if any
    fell_back_cause: str  # why it could not run at all, in a few words; "" where the validation gate refused it
    kind: str = "slides"
    batch_bytes: int = 0  # model input per full batch; 0 when the run did not record it
    model_parts: dict[str, float] | None = None  # the model stage's busy time by part, with other
    host_cpu: dict[str, Any] | None = None  # the report's host_cpu (core.cpu), None when not measured
    tuning: dict[str, Any] | None = None  # the report's tuning where batch_size: auto chose the run's size
    access: dict[str, int] = field(default_factory=dict)  # shards by how their input was read (stage, stream)
    batches: int = 0  # model calls timed in this run
    shard_fixed: float = 0.0  # shards' time outside open and pipeline (shard_stats.fixed_s)
    commit: float = 0.0  # of which committing each shard's outputs
    formats: tuple[str, ...] = ()  # output.formats, empty in a report from before it was recorded
    shards_ran: int = 0
    resample: float = 0.0  # of decode: resizing tiles read at a finer level than the target
    stage_ahead: int | None = None  # run.stage_ahead, None in a report from before it was recorded
    read: dict[str, float] | None = None  # the read stage's clocks, None in a report without them
    write: dict[str, float] | None = None  # the write stage's clocks, likewise

    @classmethod
    def of(cls, summary: dict[str, Any]) -> _Figures:
        parts: dict[str, float] = summary.get("parts") or {}
        model = (summary.get("stages") or {}).get("model", {})
        shards = summary.get("shards") or []
        stats = summary.get("shard_stats") or {}
        per_shard = stats.get("items_per_shard", sum(s.get("items", 0) for s in shards) / len(shards) if shards else 0.0)
        return cls(
            starvation=summary.get("starvation", 0.0), storage=parts.get("storage", 0.0),
            open=parts.get("open", 0.0),
            decode=parts.get("decode", 0.0) + parts.get("resample", 0.0) + parts.get("slice", 0.0),
            preprocess=parts.get("preprocess", 0.0), transfer=parts.get("transfer", 0.0),
            compute=parts.get("compute", 0.0), model_busy=model.get("busy_s", 0.0),
            model_blocked=model.get("blocked_s", 0.0), model_starved=model.get("starved_s", 0.0), fill=summary.get("batch_fill", 1.0),
            batch_size=int(summary.get("batch_size") or 0), precision=str(summary.get("precision", "fp32")),
            readers=int(summary.get("readers") or 0), items_per_shard=float(per_shard),
            p99_ms=(summary.get("storage") or {}).get("p99_ms"), fell_back=_refused_precision(summary),
            fell_back_cause=_fallback_cause(summary),
            kind=str(summary.get("kind", "slides")),
            batch_bytes=int(summary.get("batch_input_bytes") or 0),
            model_parts=(summary.get("stage_parts") or {}).get("model"),
            host_cpu=summary.get("host_cpu"),
            tuning=_tuned_choice(summary),
            access=dict((summary.get("storage") or {}).get("access") or {}), stage_ahead=summary.get("stage_ahead"),
            batches=int(summary.get("batches") or 0), resample=parts.get("resample", 0.0),
            shard_fixed=float(stats.get("fixed_s", 0.0)), shards_ran=_shard_counts(summary)[1],
            commit=parts.get("commit", 0.0), formats=tuple(summary.get("formats") or ()),
            read=(summary.get("stages") or {}).get("read"), write=(summary.get("stages") or {}).get("write"),
        )

    @property
    def long_host_calls(self) -> bool:
        """A run with no device whose model calls each computed LONG_HOST_CALL_S or more."""
        return self.transfer <= 0 and self.batches > 0 and self.compute / self.batches >= LONG_HOST_CALL_S

    @property
    def readers_kept_up(self) -> bool:
        """The readers waited longer for room in the ready queue than they worked (their busy
        time summed over reader threads): they were not what the model waited for, so more
        readers or staging would not shorten its wait (per-batch hand-off, per-shard start)."""
        return self.read is not None and self.read.get("blocked_s", 0.0) > self.read.get("busy_s", 0.0)

    @property
    def writer_explains_block(self) -> bool:
        """The writer's own work accounts for the model's wait on it (true where not recorded)."""
        return self.write is None or self.write.get("busy_s", 0.0) >= WRITER_EXPLAINS * self.model_blocked

    @property
    def cores_full(self) -> bool:
        return self.host_cpu is not None and self.host_cpu["busy"] >= CORES_FULL

    def cores_evidence(self) -> str:
        """"; " and :func:`cores_sentence`, or nothing where the cores were not measured."""
        return "" if self.host_cpu is None else "; " + cores_sentence(self.host_cpu)


def _tuned_choice(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The report's ``tuning`` where a sweep (fresh or cached) chose the size the run used; None
    for a size from the spec, or an auto run that found nothing to tune on (``skipped``)."""
    tuning = summary.get("tuning")
    if not isinstance(tuning, dict) or tuning.get("skipped") or not tuning.get("curve"):
        return None
    return tuning if tuning.get("batch_size") == summary.get("batch_size") else None


def _refused_precision(summary: dict[str, Any]) -> str:
    """The reduced precision that was asked for but did not run: refused by the validation gate,
    or one the model cannot run at all (a refusal's ``used`` may be fp64, and a report from before
    refusals recorded ``used`` has only ``fell_back_to``)."""
    q = summary.get("quantization") or {}
    want = q.get("requested")
    ran = q.get("used", q.get("fell_back_to"))
    return str(want) if want in REDUCED_PRECISIONS and ran not in (None, want) else ""


def _fallback_cause(summary: dict[str, Any]) -> str:
    """Why the requested precision could not run at all, in a few words (``quantization.cause``);
    "" where a validation gate ran and refused it. A fallback with no gate was said to have failed
    the gate, and one without ``used`` was not noticed."""
    q = summary.get("quantization") or {}
    if not _refused_precision(summary) or "validation" in q:
        return ""
    return str(q.get("cause") or ("the model cannot run it" if q.get("reason") or q.get("note") else ""))


@dataclass
class _Finding:
    layer: str
    detail: str
    evidence: str
    move: str


def _more_readers(f: _Figures) -> str:
    return f"raise run.readers from {f.readers} to {2 * f.readers}" if f.readers else "add reader threads (run.readers)"


def _input_finding(f: _Figures) -> _Finding:
    """The model starved: readers (storage requests, decode) could not keep up."""
    lead = f"the model waited for data {f.model_starved:.2f} s, {f.starvation:.1%} of its time; readers spent"
    if f.storage >= f.decode:
        latency = f"; storage p99 latency {ms_words(f.p99_ms)} ms" if f.p99_ms else ""
        return _Finding(
            LAYER_STORAGE, "storage reads",
            f"{lead} {f.storage:.2f} s on storage against {f.decode:.2f} s decoding{latency}{f.cores_evidence()}",
            f"{_more_readers(f)} to keep more requests in flight, or stage inputs locally "
            "(input.access: stage) so the next slide is fetched while the current one computes")
    if f.kind == "genome":
        return _Finding(
            LAYER_STORAGE, "sequence reading on the host",
            f"{lead} {f.decode:.2f} s cutting windows against {f.storage:.2f} s on storage{f.cores_evidence()}",
            f"{_more_threads(f, 'window cutting')}; raise windows.chunk_bases so each read covers "
            "more windows; ingest the FASTA once (gpubatch ingest genome) for chunked, compressed reads")
    return _Finding(
        LAYER_STORAGE, "decode on the host",
        f"{lead} {f.decode:.2f} s decoding/resampling against {f.storage:.2f} s on storage{f.cores_evidence()}",
        f"{_more_threads(f, 'decode')}; {_level_words(f)}decode on the GPU (nvImageCodec/cuCIM) where available")


def _level_words(f: _Figures) -> str:
    """Reading a nearer pyramid level helps only where tiles were resampled after decoding: a
    job that asked for level 0 (no resampling) was told to read the level nearest its target."""
    if f.resample <= OTHER_SHARE * max(f.decode, 1e-9):
        return ""
    return f"read the pyramid level nearest the target resolution ({f.resample:.2f} s went to resampling); "


def _more_threads(f: _Figures, work: str) -> str:
    """More readers where the cores have room; where they are full, more cores, not threads."""
    if f.cores_full and f.host_cpu and f.host_cpu.get("quota"):
        return ("the cores are full, so more reader threads would only take turns on them: raise the "
                "workers' CPU quota (the container's CPU limit: Kubernetes resources.limits.cpu, "
                "docker --cpus) or run on more cores")
    if f.cores_full:
        return ("the cores are full, so more reader threads would only take turns on them: run on "
                "more cores (more or larger nodes, one worker process per few cores)")
    return f"{_more_readers(f)} or worker processes so {work} keeps up"


def _setup_finding(f: _Figures) -> _Finding:
    """Per-shard setup (slide open + tissue mask) runs before the pipeline, so the model idles."""
    what = "reference and region setup" if f.kind == "genome" else "slide open + tissue mask"
    return _Finding(
        LAYER_STORAGE, "per-shard setup",
        f"opening shards ({what}) took {f.open:.2f} s against {f.model_busy:.2f} s of "
        "model work, and the model sits idle while a shard opens",
        f"{_setup_move(f)} and run more workers than devices so one shard's setup "
        "overlaps another's compute; for small inputs, fewer larger shards")


def _setup_move(f: _Figures) -> str:
    """Staging for slides the run streamed; for slides it already staged (report.json's
    storage.access), more downloads ahead: a staged run was told to stage, and 12 staged slides
    behind 300 ms of latency spent 4.8 s of setup at run.stage_ahead 2 and 1.9 s at 6."""
    staged, streamed = f.access.get("stage", 0), f.access.get("stream", 0)
    if not staged and not streamed:
        return "stage inputs (input.access: stage)"
    ahead = (f"raise run.stage_ahead from {f.stage_ahead} to {2 * f.stage_ahead}" if f.stage_ahead
             else "turn run.stage_ahead back on" if f.stage_ahead == 0 else "raise run.stage_ahead")
    if streamed:
        return f"stage inputs (input.access: stage) or {ahead} so more slides open ahead,"
    return f"{ahead} so more slides download while one computes,"


def _fixed_cost_finding(f: _Figures) -> _Finding:
    """Each shard's work outside its open and pipeline (checks, model hand-over, warm-up,
    commit) outlasted the model's work: 150 slides of 64 tiles spent 79% of a run there while
    the verdict asked for more readers over 0.2 s of starvation."""
    each = f.shard_fixed / max(f.shards_ran, 1)
    if f.commit >= 0.5 * f.shard_fixed:
        return _commit_finding(f)
    if f.kind == "genome":
        move = "raise windows.windows_per_shard so each shard carries more windows"
    else:
        move = ("each slide is a shard, so run more worker processes (run.workers, on a profile that "
                "starts them) so that their fixed costs overlap")
    return _Finding(
        LAYER_STORAGE, "per-shard fixed cost",
        f"shards spent {f.shard_fixed:.2f} s outside their open and pipeline (summed over {f.shards_ran} "
        f"shards, about {each * 1e3:.0f} ms each: checks, model hand-over, warm-up, commit) against "
        f"{f.model_busy:.2f} s of model work", move)


def _commit_finding(f: _Figures) -> _Finding:
    """Most of the shards' fixed cost was committing their outputs: 40 slides of 64 tiles spent
    75 ms a shard committing zarr and parquet, 11 ms with parquet alone (a 2.6 s run took 0.8 s)."""
    each = f.commit / max(f.shards_ran, 1)
    formats = f" ({', '.join(f.formats)})" if f.formats else ""
    fewer = ("write fewer formats (output.formats: each shard commits a part of every format; zarr's "
             "costs the most)") if len(f.formats) != 1 else "shard larger inputs, so fewer commits"
    more = "raise windows.windows_per_shard so fewer shards commit" if f.kind == "genome" else \
        "run more worker processes (run.workers) so that commits overlap"
    return _Finding(
        LAYER_STORAGE, "per-shard output commits",
        f"shards spent {f.shard_fixed:.2f} s outside their open and pipeline (summed over {f.shards_ran} "
        f"shards), {f.commit:.2f} s of it committing their outputs{formats}, about {each * 1e3:.0f} ms a "
        f"shard, against {f.model_busy:.2f} s of model work", f"{fewer}; {more}")


def _output_finding(f: _Figures) -> _Finding:
    """The model stage waited for room downstream: the writer is the limit."""
    share = f.model_blocked / max(f.model_busy + f.model_blocked, 1e-9)
    return _Finding(
        LAYER_STORAGE, "output writes",
        f"the model waited {f.model_blocked:.2f} s ({pct(share)} of its time) for the writer to take results",
        "write fewer formats (output.formats), or write to local disk and copy to object storage after")


def _host_bound(f: _Figures) -> _Finding | None:
    """Storage/host transport, in three guises; the one that cost the model most seconds names
    the detail and the move, and the others are added to the evidence."""
    blocked_share = f.model_blocked / max(f.model_busy + f.model_blocked, 1e-9)
    costs = {
        _input_finding: f.model_starved if f.starvation >= BAND_LOW and not f.readers_kept_up else 0.0,
        _setup_finding: f.open if f.open > f.model_busy else 0.0,
        _fixed_cost_finding: f.shard_fixed if f.shard_fixed > f.model_busy else 0.0,
        _output_finding: f.model_blocked if blocked_share >= BLOCKED_SHARE and f.writer_explains_block else 0.0,
    }
    if max(costs.values()) <= 0:
        return None
    ranked = sorted((fn for fn, cost in costs.items() if cost > 0), key=lambda fn: -costs[fn])
    finding = ranked[0](f)
    for other in ranked[1:]:
        finding.evidence += "; also " + other(f).evidence
    return finding


def _transfer_bound(f: _Figures) -> _Finding | None:
    """Fed, but moving and converting batches costs a large share of the compute itself."""
    moving = f.transfer + f.preprocess
    if moving <= TRANSFER_SHARE * max(f.compute, 1e-9):
        return None
    items = "base codes" if f.kind == "genome" else "tiles"
    if f.transfer >= f.preprocess:
        move = f"keep {items} uint8 until the device, use pinned host buffers and overlap copies with compute"
    else:
        move = _conversion_move(f)
    return _Finding(
        LAYER_TRANSFER, "host-to-device copies" if f.transfer >= f.preprocess else "input conversion",
        f"host-to-device transfer {f.transfer:.2f} s and input conversion {f.preprocess:.2f} s "
        f"against {f.compute:.2f} s of compute", move)


def _conversion_move(f: _Figures) -> str:
    """Where input conversion (normalising tiles, one-hot encoding DNA) should run. A run with
    no host-to-device copies had no device: its conversion was the CPU twin's numpy, and "do it
    on the device" needs a GPU run; a genome job's conversion is one-hot encoding, not normalising."""
    genome = f.kind == "genome"
    if f.transfer > 0:
        verb = "one-hot encode" if genome else "normalise"
        return f"{verb} on the device (uint8 in, float on the GPU) rather than on the host"
    noun = "one-hot encoding the base codes" if genome else "normalising the tiles"
    return (f"this run had no GPU, so {noun} ran on the host's cores: a GPU run (profile local-cuda) "
            "does it on the device; on the host, only more cores shorten it")


def _size_words(n_bytes: int) -> str:
    """Bytes in MB, or in kB where MB would read 0.0 (a batch of one 32 px tile is 12 kB)."""
    return f"{n_bytes / 2**20:.1f} MB" if n_bytes >= 0.05 * 2**20 else f"{n_bytes / 1024:.0f} kB"


def _fed_words(f: _Figures) -> str:
    """How fed the model was, for the findings past storage/host transport: where it waited
    for data 5% of its time or more, the readers kept up (or that rule would have fired), so
    the wait is said to be the hand-off between batches, not slow reading."""
    if f.starvation < BAND_LOW or f.read is None:
        return f"the model was fed (starvation {f.starvation:.1%})"
    return (f"the model waited for data {f.starvation:.1%} of its time, yet the readers kept up (they waited "
            f"{f.read.get('blocked_s', 0.0):.2f} s for room in the queue against {f.read.get('busy_s', 0.0):.2f} s "
            "of work), so the wait is each batch's hand-off, not reading")


def _under_filled(f: _Figures) -> _Finding | None:
    """Fed and busy, but each model call carries fewer items than it could."""
    small = 0 < f.batch_size < SMALL_BATCH and f.batch_bytes < SMALL_BATCH_BYTES and not f.long_host_calls
    if f.fill >= FILL_MIN and not small:
        return None
    evidence = f"{_fed_words(f)}; batches were {pct(f.fill)} full on average at batch size {f.batch_size}"
    if f.batch_bytes:
        evidence += f" ({_size_words(f.batch_bytes)} of input per full batch)"
    if f.fill < FILL_MIN and 0 < f.items_per_shard < f.batch_size:
        return _Finding(
            LAYER_BATCHING, "partial batches at shard ends",
            evidence + f"; shards held {f.items_per_shard:.0f} items on average, less than one batch",
            "put several small inputs in one shard (or shard larger regions) so batches fill; "
            "a larger batch alone will not fill them")
    if f.tuning is None:
        return _Finding(LAYER_BATCHING, "small batches", evidence,
                        "raise model.batch_size (or batch_size: auto) so each call carries more items")
    limited, words = _tuning_words(f.tuning)
    if not limited and f.fill >= FILL_MIN:
        return None  # the sweep measured larger batches no faster: per-call overhead is not the limit
    return _Finding(LAYER_BATCHING, "small batches", evidence, words)


def _tuning_words(tuning: dict[str, Any]) -> tuple[bool, str]:
    """(whether a limit kept batch_size: auto from a larger, faster batch; what limited its choice).

    Raising the size contradicts what the run did: auto chose it either because larger batches
    measured no faster (the choice rule), or as the largest the sweep could take (it stopped at a
    failure, the memory budget or its time limit, or a worker's memory allowed no more).
    """
    from gpubatch.models.prepare.tune import WITHIN  # the choice rule's margin; imported where used

    chosen = int(tuning["batch_size"])
    speed = {int(p["batch_size"]): float(p["items_per_s"]) for p in tuning["curve"]}
    best = max(speed, key=lambda b: speed[b])
    larger = [b for b in speed if b > chosen]
    why = str(tuning.get("stopped_by") or "no reason recorded")
    if larger and speed[best] <= speed.get(chosen, 0.0) / WITHIN:
        return False, (f"batch_size: auto chose {chosen} because larger batches measured no faster "
                       f"({speed[best]:.1f} items/s at best, at batch {best}, against "
                       f"{speed.get(chosen, 0.0):.1f} at {chosen}), so a larger batch would not help")
    return True, (f"batch_size: auto chose {chosen}, the largest batch its sweep could take (the sweep "
                  f"stopped: {why}); a larger batch needs that limit lifted, not a larger setting")


def _model_account(f: _Figures) -> str:
    """Where the model stage's busy time went, when the run split it into parts: turn-taking
    with the worker's other shard, output conversion and unexplained Python are named."""
    parts = f.model_parts or {}
    named = {"turn": "waiting its turn behind the worker's other shard", "output": "converting outputs",
             "preprocess": "converting input", "other": "in no timed call (Python between them)"}
    shown = [f"{parts[k]:.2f} s {text}" for k, text in named.items()
             if parts.get(k, 0.0) > OTHER_SHARE * max(f.model_busy, 1e-9)]
    return f" ({', '.join(shown)})" if shown else ""


def _compute_bound(f: _Figures) -> _Finding:
    """Fed, filled, and little else: the model itself is the limit."""
    waited = (f"the model waited for data only {f.starvation:.1%} of its time" if f.starvation < BAND_LOW
              else _fed_words(f))
    evidence = f"{waited} and compute took {f.compute:.2f} s of its {f.model_busy:.2f} s busy{_model_account(f)}"
    if f.fell_back_cause:
        return _Finding(LAYER_COMPUTE, f"{f.precision} model", evidence + f"; {f.fell_back} was requested; "
                        f"{f.fell_back_cause}: ran {f.precision}", _unreduced_move(f))
    if f.fell_back:
        return _Finding(LAYER_COMPUTE, f"{f.precision} model", evidence + f"; {f.fell_back} failed the validation gate",
                        "try model.precision: fp16 or bf16 on a GPU (behind the same gate); if reduced "
                        "precision cannot pass, scale out: more GPUs (one worker each) or more nodes")
    if f.precision == FLOAT64:
        return _Finding(LAYER_COMPUTE, f"{f.precision} model", evidence, _unreduced_move(f))
    if f.precision not in REDUCED_PRECISIONS:
        return _Finding(LAYER_COMPUTE, f"{f.precision} model", evidence,
                        "reduce precision: model.precision: int8 (QDQ, behind the validation gate), "
                        "or fp16/bf16 on a GPU")
    return _Finding(LAYER_COMPUTE, f"{f.precision} model, fed", evidence + f", already at {f.precision}",
                    "scale out: more GPUs (one worker each) or more nodes; the model is compute-bound, "
                    "fed and at reduced precision")


def _unreduced_move(f: _Figures) -> str:
    """The next move for a compute-bound model that could not run the precision asked, or runs
    in float64: a float64 module runs no reduced precision until it is saved in float32."""
    if f.precision == FLOAT64:
        return ("save the module in float32 (module.float()): float64 is the slowest arithmetic on every "
                "device, and only a float32 module runs fp16 or bf16 (behind the validation gate); "
                "else scale out: more GPUs (one worker each) or more nodes")
    return (f"make {f.fell_back} runnable as report.json's quantization.reason says, or try model.precision: "
            "fp16 or bf16 on a GPU (behind the validation gate); else scale out: more GPUs (one worker "
            "each) or more nodes")


# Batching before memory transfer: in small batches, per-call overhead inflates both the input
# conversion and the compute per item, so the transfer/compute ratio says little until batches
# are larger (a batch_size 1 run read "input conversion" there, yet a larger batch was 12x faster).
_RULES = (_host_bound, _under_filled, _transfer_bound)


def verdict(summary: dict[str, Any]) -> dict[str, Any]:
    """Name the limiting layer with its evidence and the concrete next move.

    Rules run in order: storage/host transport first (the model starved while the readers
    worked, idled through shard setup, or waited on a writer that was working), then batching,
    then memory transfer; model compute only when
    none fired, because a model that is not fed cannot show its own speed. Scaling out is suggested only for a fed,
    compute-bound model that already runs at reduced precision.

    No layer is named, and no move advised, when there is nothing to judge (``state`` says why):
    every input failed, no input yielded an item, nothing was left to run on resume, or the run
    was too small (fewer than MIN_BATCHES batches or MIN_MODEL_S seconds of model time).
    """
    no_verdict = _no_verdict(summary)
    if no_verdict is not None:
        return no_verdict
    f = _Figures.of(summary)
    finding = next((r for r in (rule(f) for rule in _RULES) if r is not None), None) or _compute_bound(f)
    g = gap(summary)
    caveat = ""
    if g["worker_s"] > 0 and g["overhead_s"] / g["worker_s"] > SHORT_RUN_SHARE:
        caveat = (f"short run or many small shards: {g['overhead_s']:.1f} of {g['worker_s']:.1f} worker-seconds "
                  "went outside the shards' pipelines (start-up, planning, each shard's fixed cost, idle "
                  "workers); a short run's end-to-end figures understate a long run's")
    text = (f"{band(f.starvation)} ({f.starvation:.1%} starved): limited by {finding.layer} "
            f"({finding.detail}). {_cap(finding.evidence)}. Next: {finding.move}."
            + (f" {_cap(g['text'])}." if g["text"] else ""))
    return {
        "state": STATE_VERDICT,
        "band": band(f.starvation), "starvation": f.starvation, "limiting_layer": finding.layer,
        "detail": finding.detail, "evidence": "; ".join(x for x in (finding.evidence, g["text"]) if x),
        "next_move": finding.move, "gap": g, "caveat": caveat, "text": text,
    }


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _shard_counts(summary: dict[str, Any]) -> tuple[int, int]:
    """(shards committed, of which this run executed), from the counts (the listed rows are capped)."""
    stats = summary.get("shard_stats")
    if stats:
        return int(stats.get("count", 0)), int(stats.get("count", 0)) - int(stats.get("resumed", 0))
    rows = summary.get("shards") or []
    return len(rows), sum(1 for s in rows if not s.get("resumed"))


def _why_no_verdict(summary: dict[str, Any]) -> tuple[str, str] | None:
    """(state, what to say instead of a verdict), or None when the run can be judged."""
    committed, ran = _shard_counts(summary)
    failed = summary.get("failed") or []
    if failed and not committed:
        errors = "; ".join(f"{f.get('input')}: {f.get('error')}" for f in failed[:MAX_LISTED_ERRORS])
        more = f" (and {len(failed) - MAX_LISTED_ERRORS} more)" if len(failed) > MAX_LISTED_ERRORS else ""
        return STATE_FAILED, f"all {len(failed)} input(s) failed, nothing was processed: {errors}{more}"
    if not committed and not failed:
        return STATE_EMPTY, "no items: the plan found nothing to process (no inputs, or regions without bases)"
    if not ran:
        return STATE_RESUMED, f"nothing left to run: all {committed} shard(s) were already committed"
    if not summary.get("items"):
        return STATE_EMPTY, f"no items: all {ran} input(s) this run processed were empty"
    batches = summary.get("batches")
    model = (summary.get("stages") or {}).get("model") or {}
    model_s = float(model.get("busy_s", 0.0)) + float(model.get("starved_s", 0.0))
    # Shard setup is measured time the model waited too (before each pipeline, not in its
    # starved clock): 12 staged slides whose 4 s of downloads were the run read "too little work".
    setup_s = float((summary.get("parts") or {}).get("open", 0.0))
    setup_s += float((summary.get("shard_stats") or {}).get("fixed_s", 0.0))  # each shard's fixed cost too
    if batches is not None and (batches < MIN_BATCHES or model_s + setup_s < MIN_MODEL_S):
        setup = f" and {setup_s:.2f} s of shard setup" if setup_s >= 0.005 else ""
        return STATE_TOO_SMALL, (
            f"too little work for a verdict: {batches} batch(es) and {model_s:.2f} s of model time{setup}; "
            f"a verdict needs at least {MIN_BATCHES} batches and {MIN_MODEL_S:g} s, because the first "
            "batches wait for the first reads and say more about start-up than about the pipeline")
    return None


def _no_verdict(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The verdict document when there is nothing to judge: no layer, no advice, the reason."""
    why = _why_no_verdict(summary)
    if why is None:
        return None
    state, text = why
    starvation = float(summary.get("starvation") or 0.0)
    busy = float(((summary.get("stages") or {}).get("model") or {}).get("busy_s", 0.0))
    judged = BAND_NOT_MEASURED if not summary.get("items") or busy <= 0 else BAND_NOT_JUDGED
    return {"state": state, "band": judged, "starvation": starvation, "limiting_layer": None,
            "detail": "", "evidence": text, "next_move": "", "gap": gap(summary), "caveat": "",
            "text": _cap(text) + "."}
