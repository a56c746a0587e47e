"""Resolve the model a run will use: precision (quantize + validation gate) and batch size.

Runs once on the client before shards are submitted, so every worker loads the same file and no
prediction is written by a model that has not passed the gate. The steps, in order:

1. precision: for a reduced precision, draw calibration and validation items from the job's own
   inputs (sampling.py), make the reduced model once (quantize.py, cached under OUTDIR/_models),
   and hold it against fp32 on the held-out items (validate.py). Below ``min_agreement`` the run
   stops with the figures (``on_fail: error``) or runs in fp32 and says so (``on_fail: fp32``).
2. batch size: ``auto`` takes the cached tuning choice or sweeps (tune.py).
3. a quick model-only throughput figure, when step 1 or 2 already loaded the model.
4. the per-item confidence fallback settings, for the workers.

Figures land in ``PreparedModel.report`` (merged into report.json) and ``PreparedModel.audit``
(merged into every audit.jsonl line).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpubatch.core.errors import SpecError, ValidationGateError
from gpubatch.core.files import file_sha256
from gpubatch.core.plural import counted
from gpubatch.models.base import Model, backend_class, resolve_backend
from gpubatch.models.prepare.quantize import ensure_reduced, fp16_converter_available
from gpubatch.models.prepare.sampling import (
    ItemSample,
    NoItemsError,
    SampleSettings,
    draw_items,
    draw_probe,
)
from gpubatch.models.prepare.tune import MAX_BATCH, make_batch, measure, tune_model
from gpubatch.models.prepare.validate import GateResult, gate
from gpubatch.sources.base import Shard, Source
from gpubatch.spec import JobSpec

log = logging.getLogger("gpubatch")

ONNX_BACKENDS = ("onnxruntime", "tensorrt")
DEFAULT_BATCH = 64
MEASURE_S = 0.3


@dataclass
class PreparedModel:
    path: str
    precision: str
    batch_size: int
    report: dict[str, Any] = field(default_factory=dict)
    audit: dict[str, Any] = field(default_factory=dict)
    #: the fp32 model workers re-run low-confidence items on (``model.fallback``), else None
    fallback_path: str | None = None
    fallback_max_prob: float | None = None
    #: what the model computes in, for report.json's ``precision`` (Model.computes_in): ``precision``
    #: is what workers load it as, and a float64 torch module loaded as fp32 computes in fp64
    computes_in: str = ""


def unsupported_reason(precision: str, backend: str) -> str | None:
    """Why this backend cannot run this precision at all (before any work), else None."""
    if precision == "fp8" and backend != "tensorrt":
        return (f"precision fp8 needs TensorRT on an Ada or Hopper GPU (compute capability 8.9+); "
                f"this run uses backend {backend}, and ONNX Runtime's CPU provider has no fp8 kernels. "
                "Use int8 here")
    if precision in ("int8", "fp8") and backend == "torch":
        return (f"precision {precision} is explicit QDQ quantization of an ONNX model; the torch "
                "backend runs fp32, fp16 or bf16. Export the model to ONNX for int8")
    return None


def refusal(reason: str) -> str:
    """The refusal of a precision that cannot be had (``on_fail: error``), with the way out."""
    return f"{reason}; or set model.validation.on_fail: fp32 to run in fp32 instead"


def unquantizable_reason(path: str, precision: str, exc: BaseException) -> str:
    """Why ``path`` could not be made ``precision``, for a refusal or the report's fallback note:
    the quantizer's own words (ONNX Runtime's, one line), not its traceback."""
    words = " ".join(str(exc).split())[:300] or type(exc).__name__
    hint = (" (quantization takes a float32 model: export one in float32)" if precision in ("int8", "fp8")
            else "")
    return f"{path} could not be converted to {precision}: {type(exc).__name__}: {words}{hint}"


def unsupported_cause(precision: str, backend: str) -> str:
    """:func:`unsupported_reason` in a few words, for the verdict (``quantization.cause``)."""
    if backend == "torch":
        return f"backend torch cannot run {precision} (explicit QDQ ONNX quantization)"
    return f"backend {backend} cannot run {precision} (TensorRT on an Ada or Hopper GPU only)"


#: why an ONNX model stays fp32 for a 16-bit request (keep_fp32_reason), in a few words
KEPT_FP32_CAUSES = {"bf16": "gpubatch makes no bf16 ONNX model",
                    "fp16": "the fp16 ONNX converter (onnxconverter-common) is not installed"}


def saved_in_note(path: str, want: str) -> str:
    return (f"{path} is saved in {want}: it runs in {want} as loaded, and there is no fp32 model to check "
            "it against, so no validation gate ran")


def keep_fp32_reason(precision: str, backend: str) -> str | None:
    """Why an ONNX model stays fp32 for a 16-bit request (a note, not a failure), else None."""
    if backend not in ONNX_BACKENDS:
        return None
    if precision == "bf16":
        return "bf16 ONNX conversion is not provided; bf16 runs with backend torch. Kept fp32"
    if precision == "fp16" and not fp16_converter_available():
        return ("fp16 ONNX conversion needs onnxconverter-common (pip install onnxconverter-common); "
                "fp16 pays off with TensorRT on a GPU, not on ONNX Runtime's CPU provider. Kept fp32")
    return None


class _Preparation:
    """The state of one preparation: chosen file and precision, loaded model, figures."""

    def __init__(self, job: JobSpec, source: Source, shards: Sequence[Shard], outdir: Path,
                 threads: int | None = None, batch_limit: tuple[int, str] | None = None):
        self.job, self.source, self.shards, self.outdir = job, source, shards, outdir
        self.batch_limit = batch_limit  # the largest batch a worker's memory holds, and what says so
        self.threads = threads or job.model.threads  # the workers' figure, where the client knows it
        self.backend = resolve_backend(job.model.backend, job.model.path)
        self.path, self.precision = job.model.path, "fp32"
        self.model: Model | None = None
        self.sample: ItemSample | None = None
        self.probe: ItemSample | None = None  # a few items to time the model on, when no sample was drawn
        self.batch_size = job.model.batch_size if isinstance(job.model.batch_size, int) else DEFAULT_BATCH
        self.report: dict[str, Any] = {}
        self.audit: dict[str, Any] = {}

    def load(self, path: str, precision: str) -> Model:
        """A private session (not the worker cache): the client must not keep sessions alive."""
        return backend_class(self.backend)(path, precision=precision, threads=self.threads)

    def draw(self) -> ItemSample:
        if self.sample is None:
            self.sample = draw_items(self.job, self.source, self.shards, SampleSettings.from_job(self.job))
        return self.sample

    # -- precision ------------------------------------------------------------------------------

    def choose_precision(self) -> None:
        want = self.job.model.precision
        if want == "fp32":
            return
        reason = unsupported_reason(want, self.backend)
        if reason:
            self.refuse(want, reason, unsupported_cause(want, self.backend))
            return
        reason = self.torch_precision_problem(want)
        if reason:
            self.refuse(want, reason, f"the model is {self.torch_dtype()} and cannot run it")
            return
        if self.saved_in(want):
            self.report["quantization"] = {"requested": want, "used": want, "note": saved_in_note(self.path, want)}
            self.audit["quantization"] = {"requested": want, "used": want, "gate": "none: saved in it"}
            return
        note = keep_fp32_reason(want, self.backend)
        if note:
            log.warning("%s", note)
            cause = KEPT_FP32_CAUSES[want]
            self.report["quantization"] = {"requested": want, "used": "fp32", "note": note, "cause": cause}
            self.audit["quantization"] = {"requested": want, "used": "fp32", "cause": cause}
            return
        self.reduce(want)

    def torch_precision_problem(self, want: str) -> str | None:
        """Why a torch module cannot run ``want`` at all (a float64 one: autocast leaves it in float64),
        found on the fp32 model, kept for the run. With ``on_fail: fp32`` such a module went through
        the gate, both sides float64, passed it trivially, and the report said fp16."""
        if self.backend != "torch":
            return None
        from gpubatch.models.torch import TorchModel, precision_problem

        model = self.model = self.load(self.job.model.path, "fp32")
        assert isinstance(model, TorchModel)
        return precision_problem(self.job.model.path, model.feed_dtype, want)

    def torch_dtype(self) -> str:
        """The dtype the loaded torch module takes, as torch names it without its prefix."""
        return str(getattr(self.model, "feed_dtype", "float32")).removeprefix("torch.")

    def saved_in(self, want: str) -> bool:
        """Whether the torch module computes in ``want`` as it is saved (a float16 module under
        fp16): the gate's fp32 side would run in ``want`` too and agree with it exactly, and
        the report said the gate passed."""
        return self.backend == "torch" and self.model is not None and self.model.computes_in == want

    def refuse(self, want: str, reason: str, cause: str) -> None:
        """A precision this model cannot run at all: stop, or run fp32 when ``on_fail: fp32``.
        ``used`` is what then computes (fp64 for a float64 torch module) and ``cause`` says, in a
        few words, why ``want`` could not be had: no gate ran, and the verdict, which read every
        fallback as a failed gate, said nothing of it (no ``used``)."""
        if self.job.model.validation.on_fail == "error":
            raise SpecError([("model.precision", refusal(reason))])
        log.warning("%s; running in fp32 (on_fail: fp32)", reason)
        figures = {"requested": want, "used": self.computes_in(), "passed": False, "fell_back_to": "fp32",
                   "reason": reason, "cause": cause}
        self.report["quantization"] = figures
        self.audit["quantization"] = dict(figures)

    def computes_in(self) -> str:
        """What the run's model computes in (Model.computes_in), for the report. A torch module is
        loaded for it where preparing loaded none (a private copy, let go after): its dtype, not
        the precision asked, says whether it computes in fp64."""
        model = self.model
        if model is None and self.backend == "torch":
            model = self.load(self.path, self.precision)
        return model.computes_in if model is not None else self.precision

    def reduce(self, want: str) -> None:
        """Make the reduced model (cached), gate it against fp32, and adopt it or fall back."""
        sample = self.draw()
        reference = self.model or self.load(self.job.model.path, "fp32")
        info: dict[str, Any] = {}
        path = self.job.model.path
        if self.backend in ONNX_BACKENDS:
            target = "cpu" if self.backend == "onnxruntime" and reference.device == "cpu" else "gpu"
            calib_sha = sample.calibration_sha256 if want != "fp16" else ""
            sampling = SampleSettings.from_job(self.job).as_dict() if want != "fp16" else {}
            try:
                reduced_path, info = ensure_reduced(path, file_sha256(path), want, sample.calibration,
                                                    calib_sha, sampling, self.outdir, target)
            except Exception as exc:  # noqa: BLE001 - the quantizer's errors are many and all mean "cannot"
                self.refuse(want, unquantizable_reason(path, want, exc),
                            f"the model could not be converted to {want}")
                self.model = reference
                return
            path = str(reduced_path)
        reduced = self.load(path, want)
        result = self.run_gate(reference, reduced, sample, want)
        self.record(want, path, info, result, sample)
        if result.passed:
            self.path, self.precision, self.model = path, want, reduced
        elif self.job.model.validation.on_fail == "error":
            raise ValidationGateError(result.message(), result.figures)
        else:
            log.warning("%s\nrunning in fp32 (on_fail: fp32)", result.message())
            self.model = reference

    def run_gate(self, reference: Model, reduced: Model, sample: ItemSample, want: str) -> GateResult:
        v = self.job.model.validation
        if len(sample.validation) == 0:
            return GateResult(False, {"precision": want, "items": 0, "agreement": 0.0, "task": v.task,
                                      "min_agreement": v.min_agreement, "outputs": {},
                                      "reason": "no held-out items left to validate on"})
        batch = min(self.batch_size, 64)
        return gate(reference, reduced, sample.validation, precision=want,
                    min_agreement=v.min_agreement, task=v.task, batch_size=batch)

    def record(self, want: str, path: str, info: dict[str, Any], result: GateResult, sample: ItemSample) -> None:
        """Figures into the report (everything) and the audit (the decision and the headline)."""
        fell_back = not result.passed
        q = {"requested": want, "used": "fp32" if fell_back else want, "passed": result.passed,
             **({"fell_back_to": "fp32"} if fell_back else {}), "backend": self.backend,
             "model_path": path, "model_sha256": file_sha256(path), **sample.describe(),
             "validation": result.figures, "quantizer": info}
        self.report["quantization"] = q
        head = {k: q[k] for k in ("requested", "used", "passed", "model_sha256")}
        head.update({k: result.figures.get(k) for k in ("task", "agreement", "min_agreement", "items")})
        head.update({"cached": info.get("cached"), **({"fell_back_to": "fp32"} if fell_back else {})})
        self.audit["quantization"] = head

    # -- batch size and throughput ----------------------------------------------------------------

    def probe_items(self) -> np.ndarray:
        return self.probe_sample()[0]

    def probe_sample(self) -> tuple[np.ndarray, dict[str, Any]]:
        """Items to time the model on, from the job's inputs, and where they came from."""
        if self.sample is None and self.probe is None:
            self.probe = draw_probe(self.job, self.source, self.shards)
        sample = self.sample if self.sample is not None else self.probe
        assert sample is not None
        items = sample.validation if len(sample.validation) else sample.calibration
        return items, {"items": len(items), "inputs": len(sample.shards)}

    def choose_batch(self, retune: bool) -> None:
        if self.job.model.batch_size != "auto" and not retune:
            self.audit["batch_size_source"] = "spec"
            return
        try:
            items, origin = self.probe_sample()
        except NoItemsError as exc:
            if retune:  # `gpubatch tune`: nothing to measure is its failure
                raise
            self.untuned(str(exc))
            return
        if self.model is None:
            self.model = self.load(self.path, self.precision)
        result = tune_model(self.model, items, file_sha256(self.path), refresh=retune, sample=origin,
                            **self.sweep_limits())
        self.batch_size = result.batch_size
        self.report["tuning"] = result.as_dict() | {"backend": self.backend, "precision": self.precision,
                                                    "threads": self.threads, "device": self.model.device}
        self.audit["batch_size_source"] = "tuning cache" if result.cached else "tuned"
        if not result.cached and (ips := result.items_per_s_at(result.batch_size)):
            self.report["model_only_items_per_s_measured"] = ips

    def sweep_limits(self) -> dict[str, Any]:
        """The tuner's ``max_batch`` (and why) where a worker's memory holds less than it sweeps."""
        if self.batch_limit is None or self.batch_limit[0] >= MAX_BATCH:
            return {}
        largest, which = self.batch_limit
        return {"max_batch": largest, "max_batch_why": f" ({which} lets a worker hold at most {counted(largest, 'item')})"}

    def untuned(self, reason: str) -> None:
        """No input gave an item to tune on: the run goes on at the default size, and its shards
        are quarantined (and reported) as they fail, as with a batch size in the spec."""
        self.batch_size = min(DEFAULT_BATCH, self.sweep_limits().get("max_batch", DEFAULT_BATCH))
        log.warning("model.batch_size auto: %s; running at batch_size %d untuned", reason, self.batch_size)
        self.report["tuning"] = {"batch_size": self.batch_size, "skipped": reason}
        self.audit["batch_size_source"] = "default: nothing to tune on"

    def measure_throughput(self) -> None:
        """Model-only items/s at the chosen batch size, only if a model is already loaded."""
        if self.model is None or "model_only_items_per_s_measured" in self.report:
            return
        items = self.probe_items()
        ips, _ = measure(self.model, make_batch(items, self.batch_size), min_time_s=MEASURE_S, min_runs=1)
        self.report["model_only_items_per_s_measured"] = ips

    def configure_fallback(self) -> tuple[str | None, float | None]:
        fb = self.job.model.fallback
        if fb is None:
            return None, None
        if self.precision == "fp32":
            self.report["fallback"] = {"enabled": False, "reason": "the run is already fp32"}
            return None, None
        self.report["fallback"] = {"enabled": True, "max_prob_below": fb.max_prob_below,
                                   "model_path": self.job.model.path}
        return self.job.model.path, fb.max_prob_below


def prepare_model(job: JobSpec, source: Source, shards: Sequence[Shard], outdir: Path,
                  *, retune: bool = False, threads: int | None = None,
                  batch_limit: tuple[int, str] | None = None) -> PreparedModel:
    """The model file, precision and batch size this run will use, with the figures behind them.

    Raises ``ValidationGateError`` (gate failed, ``on_fail: error``) or ``SpecError`` (precision
    impossible on this backend) before any shard runs. ``retune`` forces a fresh batch-size sweep
    (``gpubatch tune``). ``threads``: the intra-op threads the workers' model will run with, so
    that the batch size is tuned (and cached) for them; by default ``model.threads``.
    ``batch_limit``: (the largest batch a worker's memory holds, what sets it): the tuner chooses
    no larger one (preflight.largest_batch_in_memory).
    """
    prep = _Preparation(job, source, shards, Path(outdir).resolve(), threads, batch_limit)
    prep.choose_precision()
    prep.choose_batch(retune)
    prep.measure_throughput()
    fallback_path, threshold = prep.configure_fallback()
    prep.audit["run_model_sha256"] = file_sha256(prep.path)
    return PreparedModel(prep.path, prep.precision, prep.batch_size, prep.report, prep.audit,
                         fallback_path, threshold, prep.computes_in())
