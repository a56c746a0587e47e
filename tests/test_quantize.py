"""int8 QDQ quantization on the job's own tiles, the validation gate, the cache and the fallbacks.

Everything here is real: tifffile slides, torch-built ONNX models, onnxruntime.quantization and
ONNX Runtime's CPU provider.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import audit_lines, write_job

import gpubatch
from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import SpecError, ValidationGateError
from gpubatch.core.files import file_sha256
from gpubatch.engine.context import RunContext
from gpubatch.engine.model_stage import make_batch_runner
from gpubatch.models.base import get_model
from gpubatch.models.prepare import quantize
from gpubatch.models.prepare.resolve import PreparedModel, prepare_model
from gpubatch.models.prepare.sampling import SampleSettings, draw_items
from gpubatch.sources import get_source
from gpubatch.spec import JobSpec, load_job

TILE = 64


@pytest.fixture(scope="module")
def qdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 1024x768 slides: 16 x 12 = 192 tiles of 64 px at level 0 each, 384 in all."""
    from gpubatch.cli.demo import write_synthetic_slide

    d = tmp_path_factory.mktemp("quant")
    (d / "slides").mkdir()
    for i in range(2):
        write_synthetic_slide(d / "slides" / f"q{i}.tif", 1024, 768, seed=20 + i)
    return d


@pytest.fixture(scope="module")
def small_cnn(qdir: Path) -> Path:
    """The demo CNN at 64 px; seed 10 splits these slides' tiles about evenly between two classes."""
    from gpubatch.cli.demo import make_classifier

    return make_classifier(qdir / "cnn.onnx", size=TILE, seed=10)


def _tile_brightness(slides: Path) -> np.ndarray:
    import tifffile

    out = []
    for p in sorted(slides.glob("*.tif")):
        img = tifffile.imread(p).astype(np.float32) / 255.0
        h, w = img.shape[0] // TILE, img.shape[1] // TILE
        out.append(img[: h * TILE, : w * TILE].reshape(h, TILE, w, TILE, 3).mean(axis=(1, 3, 4)).ravel())
    return np.concatenate(out)


@pytest.fixture(scope="module")
def fragile(qdir: Path) -> Path:
    """A 3-class model on tile brightness whose features share one tensor with a 1e4 constant.

    fp32: the head splits tiles into brightness tertiles (varied classes). Per-tensor activation
    quantization gives the concat one scale (1e4 / 255 ~ 39 per step), which rounds the brightness
    feature (0..1) to zero, so int8 predicts one class for everything.
    """
    import torch
    from torch import nn

    from gpubatch.cli.demo import _export

    t1, t2 = np.quantile(_tile_brightness(qdir / "slides"), [1 / 3, 2 / 3])

    class Fragile(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(2, 3)
            with torch.no_grad():
                g = 200.0
                self.head.weight.copy_(torch.tensor([[-g, 0.0], [0.0, 0.0], [g, 0.0]]))
                self.head.bias.copy_(torch.tensor([g * t1, 0.0, -g * t2], dtype=torch.float32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            p = x.mean(dim=(1, 2, 3)).unsqueeze(1)
            both = torch.cat([p, torch.ones_like(p) * 1e4], dim=1)
            return torch.softmax(self.head(both), dim=1)

    return _export(Fragile(), torch.rand(2, 3, TILE, TILE), qdir / "fragile.onnx", ["probs"])


RAW = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}  # pixels in [0, 1]: what `fragile` expects


def _job(qdir: Path, model: Path, out: Path, **model_opts: Any) -> Path:
    """A slides job over the two slides; ImageNet normalisation unless ``input=`` is given."""
    job = {
        "name": "quant", "kind": "slides", "input": {"uris": [str(qdir / "slides" / "*.tif")]},
        "tiles": {"size": TILE, "level": 0, "tissue": {"method": "none"}},
        "model": {"path": str(model), "backend": "onnxruntime", "precision": "int8", "batch_size": 32,
                  "calibration": {"items": 64}, "validation": {"items": 128, "min_agreement": 0.95},
                  **model_opts},
        "output": {"uri": str(out)},
        "run": {"profile": "inline", "readers": 2, "prefetch_batches": 4, "retries": 0},
    }
    return write_job(out.parent / f"{out.name}.yaml", job)


def _prepare(job_path: Path) -> tuple[JobSpec, PreparedModel]:
    job = load_job(job_path)
    source = get_source(job.kind)
    shards, _ = source.plan(job)
    return job, prepare_model(job, source, shards, Path(job.output.uri))


def test_sampling_is_spread_and_disjoint(qdir: Path, small_cnn: Path, tmp_path: Path) -> None:
    job = load_job(_job(qdir, small_cnn, tmp_path / "out"))
    source = get_source("slides")
    shards, _ = source.plan(job)
    sample = draw_items(job, source, shards, SampleSettings(64, 128))
    assert sample.calibration.shape == (64, 3, TILE, TILE) and sample.validation.shape == (128, 3, TILE, TILE)
    assert len(sample.shards) == 2
    cal = {a.tobytes() for a in sample.calibration}
    assert not any(v.tobytes() in cal for v in sample.validation)


def test_int8_passes_gate_and_is_cached(qdir: Path, small_cnn: Path, tmp_path: Path) -> None:
    job_path = _job(qdir, small_cnn, tmp_path / "out")
    before = quantize.QUANTIZE_CALLS["count"]
    _, first = _prepare(job_path)
    q = first.report["quantization"]
    assert first.precision == "int8" and q["passed"] and "fell_back_to" not in q
    assert first.path.endswith(".int8.onnx") and Path(first.path).parent.name == quantize.MODELS_DIR
    assert q["validation"]["task"] == "classifier" and q["validation"]["agreement"] >= 0.95
    assert q["quantizer"]["format"] == "QDQ" and q["quantizer"]["per_channel"] is True
    assert q["quantizer"]["activation_type"] == "QUInt8" and q["quantizer"]["weight_type"] == "QInt8"
    assert q["quantizer"]["extra_options"]["WeightSymmetric"] is True
    assert first.audit["quantization"]["agreement"] == q["validation"]["agreement"]
    assert first.report["model_only_items_per_s_measured"] > 0
    assert quantize.QUANTIZE_CALLS["count"] == before + 1
    mtime = Path(first.path).stat().st_mtime_ns
    _, second = _prepare(job_path)
    assert quantize.QUANTIZE_CALLS["count"] == before + 1, "the rerun recalibrated"
    assert second.path == first.path and Path(second.path).stat().st_mtime_ns == mtime
    assert second.report["quantization"]["quantizer"]["cached"] is True


def test_quantized_model_is_qdq(qdir: Path, small_cnn: Path, tmp_path: Path) -> None:
    import onnx

    _, prepared = _prepare(_job(qdir, small_cnn, tmp_path / "out"))
    ops = {n.op_type for n in onnx.load(prepared.path).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_fragile_model_is_refused_with_figures(qdir: Path, fragile: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationGateError) as info:
        _prepare(_job(qdir, fragile, tmp_path / "out", input=RAW))
    assert info.value.exit_code == 1
    assert info.value.figures["agreement"] < 0.6
    assert "top-1 agreement" in str(info.value) and f"{info.value.figures['agreement']:.4f}" in str(info.value)


def test_fragile_model_falls_back_to_fp32(qdir: Path, fragile: Path, tmp_path: Path) -> None:
    job, prepared = _prepare(_job(qdir, fragile, tmp_path / "out", input=RAW,
                                  validation={"items": 128, "min_agreement": 0.95, "on_fail": "fp32"}))
    q = prepared.report["quantization"]
    assert prepared.precision == "fp32" and prepared.path == job.model.path
    assert q["passed"] is False and q["fell_back_to"] == "fp32" and q["validation"]["agreement"] < 0.6
    assert prepared.audit["quantization"]["fell_back_to"] == "fp32"


def test_gate_error_stops_run_before_predictions(qdir: Path, fragile: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationGateError):
        gpubatch.run(_job(qdir, fragile, tmp_path / "out", input=RAW), profile="inline", show_progress=False)
    assert not (tmp_path / "out" / "predictions.parquet").exists()


def test_fp8_on_cpu_names_tensorrt(qdir: Path, small_cnn: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="TensorRT on an Ada or Hopper GPU"):
        _prepare(_job(qdir, small_cnn, tmp_path / "out", precision="fp8"))
    _, prepared = _prepare(_job(qdir, small_cnn, tmp_path / "out2", precision="fp8",
                                validation={"on_fail": "fp32"}))
    assert prepared.precision == "fp32" and prepared.report["quantization"]["fell_back_to"] == "fp32"


def test_fp16_without_converter_keeps_fp32_and_says_so(qdir: Path, small_cnn: Path, tmp_path: Path) -> None:
    if quantize.fp16_converter_available():
        pytest.skip("onnxconverter-common is installed: fp16 conversion runs instead")
    _, prepared = _prepare(_job(qdir, small_cnn, tmp_path / "out", precision="fp16"))
    assert prepared.precision == "fp32" and "onnxconverter-common" in prepared.report["quantization"]["note"]


def _initializers(model: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_quantized_file_has_per_channel_weights_and_uint8_activations(qdir: Path, small_cnn: Path,
                                                                      tmp_path: Path) -> None:
    """Read in the quantized ONNX file itself (not the settings the code reports about it): every
    conv weight has one scale per output channel and zero points of 0 (symmetric int8), and every
    activation is quantized to uint8 (the CPU target's U8S8 encoding)."""
    import onnx

    _, prepared = _prepare(_job(qdir, small_cnn, tmp_path / "out"))
    model = onnx.load(prepared.path)
    inits = _initializers(model)
    weights = activations = 0
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and inits[node.input[0]].ndim == 4:
            w, scale, zero = (inits[name] for name in node.input[:3])
            assert w.dtype == np.int8 and scale.shape == (w.shape[0],), node.name  # per output channel
            assert zero.dtype == np.int8 and not zero.any(), node.name  # symmetric
            weights += 1
        elif node.op_type == "QuantizeLinear" and node.input[0] not in inits:
            assert inits[node.input[2]].dtype == np.uint8, node.name
            assert inits[node.input[1]].size == 1, node.name  # activations per tensor
            activations += 1
    assert weights == 3 and activations >= 4  # the demo CNN's three convs, and what flows between them


def test_int8_end_to_end_run(qdir: Path, small_cnn: Path, tmp_path: Path) -> None:
    """The workers load the int8 file: the audit's model sha256 is that file's, and predictions
    differ from an fp32 run of the same job (where int8 rounding changes the outputs)."""
    result = gpubatch.run(_job(qdir, small_cnn, tmp_path / "out"), profile="inline", show_progress=False)
    assert result.exit_code == 0
    report = result.report
    assert report["precision"] == "int8" and report["quantization"]["passed"] is True
    assert report["model_only_items_per_s_measured"] > 0 and report["items"] == 384
    preds = result.predictions()
    assert len(preds) == 384 and preds.filter(like="probs").shape[1] == 3
    lines = audit_lines(tmp_path / "out")
    assert len(lines) == 2 and all(line["quantization"]["passed"] for line in lines)
    (int8_file,) = (tmp_path / "out" / quantize.MODELS_DIR).glob("*.int8.onnx")
    assert {line["model_sha256"] for line in lines} == {file_sha256(int8_file, cached=False)}
    assert file_sha256(int8_file) != file_sha256(small_cnn)
    fp32 = gpubatch.run(_job(qdir, small_cnn, tmp_path / "fp32", precision="fp32"), profile="inline",
                        show_progress=False)
    a, b = (r.predictions().sort_values(["slide", "x", "y"]).reset_index(drop=True) for r in (result, fp32))
    diff = np.abs(a.filter(like="probs").to_numpy() - b.filter(like="probs").to_numpy())
    assert diff.max() > 1e-4, "int8 predictions equal fp32's: the workers ran the fp32 model"
    assert diff.max() < 0.2  # but close: the int8 model passed its gate


def _reader_and_models(qdir: Path, small_cnn: Path, tmp_path: Path) -> tuple[Any, Any, str]:
    job, prepared = _prepare(_job(qdir, small_cnn, tmp_path / "out"))
    source = get_source("slides")
    shards, _ = source.plan(job)
    reader = source.open(shards[0], job, StageClocks())
    return reader, get_model(prepared.path, "onnxruntime", "int8"), str(small_cnn)


@pytest.mark.parametrize("threshold,expect_all", [(0.85, True), (0.01, False)])
def test_confidence_fallback_reruns_unsure_items(qdir: Path, small_cnn: Path, tmp_path: Path,
                                                 threshold: float, expect_all: bool) -> None:
    reader, int8_model, fp32_path = _reader_and_models(qdir, small_cnn, tmp_path)
    ctx = RunContext(str(tmp_path), int8_model.path, "onnxruntime", "int8", 32, None, "", "", "",
                     fallback_model_path=fp32_path, fallback_max_prob=threshold)
    with reader:
        items = next(iter(reader.read_units()))().items
        clocks = StageClocks()
        out = make_batch_runner(reader, int8_model, ctx)(items, clocks)
        fp32 = get_model(fp32_path, "onnxruntime", "fp32").run(reader.preprocess.on_host(items))["probs"]
    n = clocks.counters.get("fallback.items", 0)
    if expect_all:  # this CNN is never 85% sure: every item is re-run, outputs are fp32's
        assert n == len(items)
        np.testing.assert_allclose(out["probs"], fp32, rtol=1e-5, atol=1e-6)
    else:
        assert n == 0


def test_confidence_fallback_through_a_run(qdir: Path, small_cnn: Path, tmp_path: Path) -> None:
    """model.fallback re-runs unsure items in fp32 inside a real run and reports the count."""
    job = _job(qdir, small_cnn, tmp_path / "out", fallback={"max_prob_below": 0.99})
    result = gpubatch.run(job, profile="inline", show_progress=False)
    rerun = result.report["counters"].get("fallback.items", 0)
    assert 0 < rerun <= result.report["items"]
    (int8_file,) = (tmp_path / "out" / quantize.MODELS_DIR).glob("*.int8.onnx")
    lines = audit_lines(tmp_path / "out")
    assert {line["model_sha256"] for line in lines} == {file_sha256(int8_file, cached=False)}  # not the fallback's
